//! The hot path: bytes between a client and its backend, forwarded as they arrive.
//!
//! One task owns both sockets and one buffer per direction. Only the `read_buf` calls are
//! raced in `select!` (they lose nothing when dropped); writes happen in the arm bodies, so a
//! slow reader on either side pushes back on the other exactly as PostgreSQL itself would.
//! Headers are examined through [`Framer`]; bodies are never copied or decoded except the
//! one-byte status of ReadyForQuery. Buffers are reused, so steady state allocates nothing.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::App;
use crate::pool::{Leftover, Welcome};
use crate::protocol::{backend_tag, error_field, frontend_tag, parse_error_fields, parse_parameter_status, FrameError, Framer, Step};

/// Whether an ErrorResponse/NoticeResponse body says the server is ending the connection.
fn is_termination(body: &[u8]) -> bool {
    let fields = parse_error_fields(body);
    matches!(error_field(&fields, b'V').or_else(|| error_field(&fields, b'S')), Some("FATAL" | "PANIC"))
        || matches!(error_field(&fields, b'C'), Some("57P01" | "57P02" | "57P03"))
}

/// Free space kept in a buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Drops the first `n` bytes of `buf`, which have been forwarded.
///
/// A fully forwarded buffer keeps (or gets back) its read position at the start of its
/// allocation. Advancing instead would make every read land after the previous one, and a
/// session would walk through its whole 16 KiB buffer before `reserve` wrapped it around:
/// with dozens of sessions that is a working set of megabytes, each read writing into cache
/// lines long evicted. Kept at the start, the reads of a request/response session hit the
/// same few hot lines. For a buffer of READ_CHUNK or more, the common case (everything
/// forwarded, nothing advanced before) costs a truncation and a comparison. A smaller buffer
/// (the client's starts at the 4 KiB its first request was read into, and the relay only
/// grows it when less than READ_CHUNK / 4 is free) takes the `try_reclaim` path every time:
/// still correct, just not the cheap path.
#[inline]
fn consume(buf: &mut BytesMut, n: usize) {
    if n < buf.len() {
        buf.advance(n);
        return;
    }
    // Truncating leaves the read position where it is. A capacity below READ_CHUNK means an
    // earlier partial forward may have advanced it (or the buffer is a small one); then
    // asking for one byte more than the free space makes `try_reclaim` move the (empty)
    // contents back to the front if there is room before them. It never allocates. A grown
    // buffer advanced by a partial forward is left to `reserve`, which reclaims the space
    // when it runs low.
    buf.clear();
    if buf.capacity() < READ_CHUNK {
        let _ = buf.try_reclaim(buf.capacity() + 1);
    }
}

/// Why the relay stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client closed its socket.
    ClientGone,
    /// The client stayed idle past `client_idle_timeout`.
    IdleTimeout,
    /// The proxy is shutting down and the session reached an idle point.
    Shutdown,
    /// The backend announced it is going away (an unsolicited FATAL) while the session was
    /// idle; the message was not forwarded, so the session can continue elsewhere.
    BackendLost,
    /// The primary assignment changed (switchover, promotion) and the client sent a new request
    /// while idle. The request was read into the client buffer but not forwarded: the session
    /// continues on a backend of the current primary.
    Rerouted,
}

/// What a client set up on its backend that a replacement backend must be given: named
/// prepared statements (their Parse messages, as sent) and reported settings.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Parse messages of named statements, by statement name.
    pub prepared: std::collections::HashMap<Vec<u8>, bytes::Bytes>,
    /// ParameterStatus values of the welcome, shared by every client of the pool.
    welcome: Welcome,
    /// Values reported since the welcome; kept apart so an idle client costs no copy.
    changed: std::collections::BTreeMap<String, String>,
}

impl SessionState {
    /// State of a client welcomed with these ParameterStatus values.
    pub fn new(welcome: Welcome) -> SessionState {
        SessionState { welcome, ..SessionState::default() }
    }

    /// The latest value of a reported setting the client was told about.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.changed
            .get(name)
            .or_else(|| self.welcome.iter().find(|(k, _)| k == name).map(|(_, v)| v))
            .map(String::as_str)
    }

    /// Records the body of a Parse (`P`) or Close (`C`) message the client sent.
    fn on_frontend(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'P' => {
                let name = cstr(body);
                if !name.is_empty() {
                    let mut message = Vec::with_capacity(body.len() + 5);
                    message.push(b'P');
                    message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    message.extend_from_slice(body);
                    self.prepared.insert(name.to_vec(), message.into());
                }
            }
            b'C' if body.first() == Some(&b'S') => {
                self.prepared.remove(cstr(&body[1..]));
            }
            _ => {}
        }
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// Why the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from or writing to the client failed.
    #[error("client connection failed: {0}")]
    Client(#[source] std::io::Error),
    /// Reading from or writing to the backend failed.
    #[error("backend connection failed: {0}")]
    Backend(#[source] std::io::Error),
    /// The backend closed the connection.
    #[error("backend closed the connection")]
    BackendClosed,
    /// The client sent an impossible message header.
    #[error("invalid message from client: {0}")]
    ClientFrame(FrameError),
    /// The backend sent an impossible message header.
    #[error("invalid message from backend: {0}")]
    BackendFrame(FrameError),
}

/// Protocol state of a session, as far as pooling needs to know it.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// Requests (Query, Sync, FunctionCall) not yet answered by ReadyForQuery.
    outstanding: u32,
    /// Status byte of the last ReadyForQuery.
    status: u8,
    /// Extended-protocol messages sent since the last Sync: the server holds unsynced state.
    unsynced: bool,
    client: Framer,
    backend: Framer,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker { outstanding: 0, status: b'I', unsynced: false, client: Framer::new(), backend: Framer::new() }
    }
}

impl Tracker {
    #[inline]
    fn on_frontend(&mut self, tag: u8) -> Step {
        match tag {
            frontend_tag::QUERY | frontend_tag::FUNCTION_CALL => self.outstanding += 1,
            frontend_tag::SYNC => {
                self.outstanding += 1;
                self.unsynced = false;
            }
            frontend_tag::TERMINATE => return Step::StopBefore,
            // Flush and COPY traffic carry no new request.
            b'H' | b'd' | b'c' | b'f' => {}
            _ => self.unsynced = true,
        }
        Step::Forward
    }

    /// Whether the session sits between transactions with nothing pending.
    #[inline]
    pub fn is_idle(&self) -> bool {
        self.outstanding == 0 && self.status == b'I' && !self.unsynced
    }

    /// In what state the backend would be left if the session ended now.
    pub fn leftover(&self) -> Leftover {
        if self.outstanding > 0 || self.unsynced || !self.client.at_boundary() || !self.backend.at_boundary() {
            Leftover::Busy
        } else if self.status == b'I' {
            Leftover::Idle
        } else {
            Leftover::InTransaction
        }
    }
}

/// Relay counters kept locally and added to the shared metrics in batches, so two sessions on
/// different cores do not fight over the same cache line on every message.
struct LocalStats<'a> {
    metrics: &'a crate::metrics::Metrics,
    to_backend: u64,
    to_client: u64,
    transactions: u64,
    events: u32,
}

impl LocalStats<'_> {
    const FLUSH_EVERY: u32 = 64;

    #[inline]
    fn tick(&mut self) {
        self.events += 1;
        if self.events >= Self::FLUSH_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.to_backend > 0 {
            self.metrics.bytes_to_backend.inc_by(std::mem::take(&mut self.to_backend));
        }
        if self.to_client > 0 {
            self.metrics.bytes_to_client.inc_by(std::mem::take(&mut self.to_client));
        }
        if self.transactions > 0 {
            self.metrics.transactions.inc_by(std::mem::take(&mut self.transactions));
        }
        self.events = 0;
    }
}

impl Drop for LocalStats<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Writes what the socket takes right now, without waiting: 0 if it takes nothing.
/// The common case of a relay write is a small message into an empty socket buffer, which
/// this finishes in one system call without building a write future or spending the task's
/// cooperative-scheduling budget (the read that woke the task already did).
#[inline]
fn try_write_now(sock: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    match sock.try_write(data) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// What forwarding the complete part of a buffer did without waiting.
enum Forwarded {
    /// All of it was written and consumed. `stop`: the scan stopped at a message that ends
    /// the relay (Terminate from the client; the server terminating an idle session).
    Done { stop: bool },
    /// The socket took only `written` of the `forward` bytes; nothing is consumed yet.
    Partial { written: usize, forward: usize, stop: bool },
}

/// Scans backend bytes in `bbuf`, updates the protocol state and writes the complete part to
/// the client as far as its socket takes it now. Synchronous on purpose: its locals live on
/// the (shared, hot) stack instead of in each session's future, which keeps the memory a
/// wake-up touches per session small; with dozens of sessions that decides whether their
/// state stays in the CPU's cache.
fn forward_backend_now(
    bbuf: &mut BytesMut,
    client: &TcpStream,
    tracker: &mut Tracker,
    session: &mut SessionState,
    stats: &mut LocalStats<'_>,
) -> Result<Forwarded, RelayError> {
    let mut transactions = 0u64;
    let mut lost = false;
    let Tracker { backend: framer, outstanding, status, .. } = tracker;
    let inspect = |t| {
        matches!(
            t,
            backend_tag::READY_FOR_QUERY
                | backend_tag::PARAMETER_STATUS
                | backend_tag::ERROR_RESPONSE
                | backend_tag::NOTICE_RESPONSE
        )
    };
    let scan = framer
        .scan(bbuf, u32::MAX, inspect, |tag, body| {
            match tag {
                backend_tag::READY_FOR_QUERY => {
                    *outstanding = outstanding.saturating_sub(1);
                    *status = body.first().copied().unwrap_or(b'I');
                    transactions += (*status == b'I') as u64;
                }
                backend_tag::PARAMETER_STATUS => {
                    if let Some((k, v)) = parse_parameter_status(body) {
                        session.changed.insert(k, v);
                    }
                }
                // Nothing was asked, yet the server speaks: it is terminating the connection
                // (shutdown, crash, administrator). Between transactions the session can move
                // to another backend, so the client is not told.
                backend_tag::ERROR_RESPONSE | backend_tag::NOTICE_RESPONSE
                    if *outstanding == 0 && *status == b'I' && is_termination(body) =>
                {
                    lost = true;
                    return Step::StopBefore;
                }
                _ => {}
            }
            Step::Forward
        })
        .map_err(RelayError::BackendFrame)?;
    stats.transactions += transactions;
    stats.tick();
    let written = try_write_now(client, &bbuf[..scan.forward]).map_err(RelayError::Client)?;
    if written < scan.forward {
        return Ok(Forwarded::Partial { written, forward: scan.forward, stop: lost });
    }
    consume(bbuf, scan.forward);
    stats.to_client += scan.forward as u64;
    Ok(Forwarded::Done { stop: lost })
}

/// Forwards the complete part of `bbuf` to the client, waiting for room if its socket is
/// full. Returns true if the backend announced it is terminating while the session was idle
/// (that message is kept back).
async fn forward_backend(
    bbuf: &mut BytesMut,
    client: &mut TcpStream,
    tracker: &mut Tracker,
    session: &mut SessionState,
    stats: &mut LocalStats<'_>,
) -> Result<bool, RelayError> {
    match forward_backend_now(bbuf, client, tracker, session, stats)? {
        Forwarded::Done { stop } => Ok(stop),
        Forwarded::Partial { written, forward, stop } => {
            finish_backend_write(bbuf, written, forward, client, stats).await?;
            Ok(stop)
        }
    }
}

/// Writes `bbuf[written..forward]` (already scanned) to the client, waiting for room, then
/// consumes it.
async fn finish_backend_write(
    bbuf: &mut BytesMut,
    written: usize,
    forward: usize,
    client: &mut TcpStream,
    stats: &mut LocalStats<'_>,
) -> Result<(), RelayError> {
    client.write_all(&bbuf[written..forward]).await.map_err(RelayError::Client)?;
    consume(bbuf, forward);
    stats.to_client += forward as u64;
    Ok(())
}

/// Scans client bytes in `cbuf`, updates the protocol state and writes the complete part to
/// the backend as far as its socket takes it now. Synchronous for the same reason as
/// [`forward_backend_now`].
fn forward_client_now(
    cbuf: &mut BytesMut,
    backend: &TcpStream,
    tracker: &mut Tracker,
    session: &mut SessionState,
    max_len: u32,
    stats: &mut LocalStats<'_>,
) -> Result<Forwarded, RelayError> {
    let mut framer = std::mem::take(&mut tracker.client);
    let result = framer.scan(cbuf, max_len, |t| t == b'P' || t == b'C', |tag, body| {
        if tag == b'P' || tag == b'C' {
            session.on_frontend(tag, body);
        }
        tracker.on_frontend(tag)
    });
    tracker.client = framer;
    let scan = result.map_err(RelayError::ClientFrame)?;
    let written = try_write_now(backend, &cbuf[..scan.forward]).map_err(RelayError::Backend)?;
    if written < scan.forward {
        return Ok(Forwarded::Partial { written, forward: scan.forward, stop: scan.stopped });
    }
    consume(cbuf, scan.forward);
    stats.to_backend += scan.forward as u64;
    Ok(Forwarded::Done { stop: scan.stopped })
}

/// Forwards the complete part of `cbuf` to the backend, relaying the server's replies while
/// its input is full. Returns true if the client sent Terminate.
#[allow(clippy::too_many_arguments)]
async fn forward_client(
    cbuf: &mut BytesMut,
    backend: &mut TcpStream,
    bbuf: &mut BytesMut,
    client_sock: &mut TcpStream,
    tracker: &mut Tracker,
    session: &mut SessionState,
    max_len: u32,
    stats: &mut LocalStats<'_>,
) -> Result<bool, RelayError> {
    match forward_client_now(cbuf, backend, tracker, session, max_len, stats)? {
        Forwarded::Done { stop } => Ok(stop),
        Forwarded::Partial { written, forward, stop } => {
            finish_client_write(cbuf, written, forward, backend, bbuf, client_sock, tracker, session, stats).await?;
            Ok(stop)
        }
    }
}

/// Writes `cbuf[written..forward]` (already scanned) to the backend while relaying the
/// server's replies, then consumes it: a client that pipelines megabytes and reads results
/// at the same time would otherwise deadlock with the server, each waiting for the other to
/// read.
#[allow(clippy::too_many_arguments)]
async fn finish_client_write(
    cbuf: &mut BytesMut,
    mut written: usize,
    forward: usize,
    backend: &mut TcpStream,
    bbuf: &mut BytesMut,
    client_sock: &mut TcpStream,
    tracker: &mut Tracker,
    session: &mut SessionState,
    stats: &mut LocalStats<'_>,
) -> Result<(), RelayError> {
    while written < forward {
        if bbuf.capacity() - bbuf.len() < READ_CHUNK / 4 {
            bbuf.reserve(READ_CHUNK);
        }
        let (mut from_backend, mut to_backend) = backend.split();
        tokio::select! {
            biased;
            r = to_backend.write(&cbuf[written..forward]) => {
                match r.map_err(RelayError::Backend)? {
                    0 => return Err(RelayError::Backend(std::io::ErrorKind::WriteZero.into())),
                    n => written += n,
                }
            }
            r = from_backend.read_buf(bbuf) => {
                if r.map_err(RelayError::Backend)? == 0 {
                    return Err(RelayError::BackendClosed);
                }
                if forward_backend(bbuf, client_sock, tracker, session, stats).await? {
                    // The server is going away in the middle of a request.
                    return Err(RelayError::BackendClosed);
                }
            }
        }
    }
    consume(cbuf, forward);
    stats.to_backend += forward as u64;
    Ok(())
}

/// Resolves when the proxy shuts down. The select loop polls it every time both sockets are
/// idle, i.e. twice per transaction; polling the token's future costs a lock-free but long
/// walk through its waiter list, so it is polled once, to register this task's waker, and
/// afterwards only the flag that [`App::begin_shutdown`] sets before cancelling is read.
struct ShutdownSignal<'a, F> {
    app: &'a App,
    cancelled: std::pin::Pin<&'a mut F>,
    registered: bool,
}

impl<F: std::future::Future<Output = ()>> std::future::Future for ShutdownSignal<'_, F> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.app.is_stopping() {
            return std::task::Poll::Ready(());
        }
        if !self.registered {
            self.registered = true;
            return self.cancelled.as_mut().poll(cx);
        }
        std::task::Poll::Pending
    }
}

/// What woke the relay loop.
enum Wake {
    Client(std::io::Result<usize>),
    Backend(std::io::Result<usize>),
    Shutdown,
    IdleTimeout,
}

/// Relays until the client leaves, the session times out or the proxy shuts down.
/// `cbuf` may already hold client bytes (the request that caused the backend checkout).
/// `epoch` is the cluster epoch the backend was assigned under: a request that starts a new
/// transaction after the epoch moved is not sent to this backend ([`RelayEnd::Rerouted`]).
pub async fn relay(
    app: &App,
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    backend: &mut TcpStream,
    epoch: u64,
    tracker: &mut Tracker,
    session: &mut SessionState,
) -> Result<RelayEnd, RelayError> {
    let config = app.config.load_full();
    let max_len = config.pool.max_message_size;
    let idle_timeout = config.pool.client_idle_timeout;
    drop(config);
    let mut bbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut stats = LocalStats { metrics: &app.metrics, to_backend: 0, to_client: 0, transactions: 0, events: 0 };
    if forward_client(cbuf, backend, &mut bbuf, client, tracker, session, max_len, &mut stats).await? {
        return Ok(RelayEnd::ClientTerminated);
    }
    let idle_enabled = !idle_timeout.is_zero();
    // The timer and the cancellation future are boxed: both are large and almost never
    // polled, and inline they would spread the loop's hot locals over more cache lines.
    let mut idle_sleep = Box::pin(tokio::time::sleep(idle_timeout));
    // Created once: a cancellation future registers itself with the shared token when first
    // polled, and re-creating it every iteration would take the token's lock per message.
    let mut cancelled = Box::pin(app.shutdown.cancelled());
    let mut shutdown = ShutdownSignal { app, cancelled: cancelled.as_mut(), registered: false };
    let mut changes = app.cluster_changed.subscribe();
    let mut draining = false;
    loop {
        if cbuf.capacity() - cbuf.len() < READ_CHUNK / 4 {
            cbuf.reserve(READ_CHUNK);
        }
        if bbuf.capacity() - bbuf.len() < READ_CHUNK / 4 {
            bbuf.reserve(READ_CHUNK);
        }
        // Biased, with the socket expected to speak next polled first: a wake-up is then
        // served by the first poll, and the shutdown and idle branches are only polled when
        // both sockets are quiet.
        let wake = if tracker.outstanding > 0 {
            tokio::select! {
                biased;
                r = backend.read_buf(&mut bbuf) => Wake::Backend(r),
                r = client.read_buf(cbuf) => Wake::Client(r),
                _ = &mut shutdown, if !draining => Wake::Shutdown,
                _ = idle_sleep.as_mut(), if idle_enabled && tracker.is_idle() => Wake::IdleTimeout,
            }
        } else {
            tokio::select! {
                biased;
                r = client.read_buf(cbuf) => Wake::Client(r),
                r = backend.read_buf(&mut bbuf) => Wake::Backend(r),
                _ = &mut shutdown, if !draining => Wake::Shutdown,
                _ = idle_sleep.as_mut(), if idle_enabled && tracker.is_idle() => Wake::IdleTimeout,
            }
        };
        match wake {
            Wake::Client(r) => {
                let n = r.map_err(RelayError::Client)?;
                if n == 0 {
                    return Ok(RelayEnd::ClientGone);
                }
                // Checked only between transactions, and only as an atomic load unless the
                // cluster view changed: a session keeps its backend until it is idle, then
                // follows the primary (this is what makes a switchover lose no session).
                if tracker.is_idle()
                    && tracker.client.at_boundary()
                    && changes.has_changed().unwrap_or(false)
                    && *changes.borrow_and_update() != epoch
                    && cbuf.first() != Some(&frontend_tag::TERMINATE)
                {
                    return Ok(RelayEnd::Rerouted);
                }
                // forward_client, spelled out: awaiting that async fn would store its state in
                // this future on every message (see forward_backend_now).
                let stop = match forward_client_now(cbuf, backend, tracker, session, max_len, &mut stats)? {
                    Forwarded::Done { stop } => stop,
                    // Rare: the server's input is full.
                    Forwarded::Partial { written, forward, stop } => {
                        finish_client_write(cbuf, written, forward, backend, &mut bbuf, client, tracker, session, &mut stats)
                            .await?;
                        stop
                    }
                };
                if stop {
                    return Ok(RelayEnd::ClientTerminated);
                }
                stats.tick();
                if idle_enabled {
                    idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            Wake::Backend(r) => {
                let n = r.map_err(RelayError::Backend)?;
                if n == 0 {
                    return Err(RelayError::BackendClosed);
                }
                // forward_backend, spelled out for the same reason.
                let lost = match forward_backend_now(&mut bbuf, client, tracker, session, &mut stats)? {
                    Forwarded::Done { stop } => stop,
                    // Rare: the client's socket is full.
                    Forwarded::Partial { written, forward, stop } => {
                        finish_backend_write(&mut bbuf, written, forward, client, &mut stats).await?;
                        stop
                    }
                };
                if lost {
                    return Ok(RelayEnd::BackendLost);
                }
                if draining && tracker.is_idle() {
                    return Ok(RelayEnd::Shutdown);
                }
                if idle_enabled {
                    idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            Wake::Shutdown => {
                draining = true;
                if tracker.is_idle() {
                    return Ok(RelayEnd::Shutdown);
                }
            }
            Wake::IdleTimeout => return Ok(RelayEnd::IdleTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_frontend(t: &mut Tracker, tags: &[u8]) {
        for &tag in tags {
            t.on_frontend(tag);
        }
    }

    fn rfq(t: &mut Tracker, status: u8) {
        t.outstanding = t.outstanding.saturating_sub(1);
        t.status = status;
    }

    #[test]
    fn consumed_buffer_reads_from_its_start_again() {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let start = buf.as_ptr();

        // Everything forwarded at once: the next read lands at the start.
        buf.extend_from_slice(&[7u8; 100]);
        consume(&mut buf, 100);
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr(), start, "the next read lands at the start");

        // Part forwarded: the waiting bytes stay where they are, untouched.
        buf.extend_from_slice(&[7u8; 100]);
        consume(&mut buf, 60);
        assert_eq!(buf.as_ptr(), start.wrapping_add(60));
        assert_eq!(&buf[..], &[7u8; 40][..]);

        // The rest forwarded later: back to the start, with the full capacity.
        consume(&mut buf, 40);
        assert!(buf.is_empty());
        assert_eq!(buf.as_ptr(), start, "the next read lands at the start again");
        assert!(buf.capacity() >= READ_CHUNK);
    }

    #[test]
    fn simple_query_cycle_is_idle() {
        let mut t = Tracker::default();
        feed_frontend(&mut t, b"Q");
        assert_eq!(t.leftover(), Leftover::Busy);
        rfq(&mut t, b'I');
        assert_eq!(t.leftover(), Leftover::Idle);
    }

    #[test]
    fn pipelined_extended_queries_need_every_sync_answered() {
        let mut t = Tracker::default();
        feed_frontend(&mut t, b"PBDES");
        feed_frontend(&mut t, b"BES");
        rfq(&mut t, b'I');
        assert_eq!(t.leftover(), Leftover::Busy, "second Sync still pending");
        rfq(&mut t, b'I');
        assert_eq!(t.leftover(), Leftover::Idle);
    }

    #[test]
    fn unsynced_extended_messages_are_busy() {
        let mut t = Tracker::default();
        feed_frontend(&mut t, b"PBE");
        assert_eq!(t.leftover(), Leftover::Busy);
    }

    #[test]
    fn open_transaction_needs_rollback() {
        let mut t = Tracker::default();
        feed_frontend(&mut t, b"Q");
        rfq(&mut t, b'T');
        assert_eq!(t.leftover(), Leftover::InTransaction);
        feed_frontend(&mut t, b"Q");
        rfq(&mut t, b'E');
        assert_eq!(t.leftover(), Leftover::InTransaction);
    }

    #[test]
    fn copy_in_keeps_request_outstanding() {
        let mut t = Tracker::default();
        feed_frontend(&mut t, b"Q");
        feed_frontend(&mut t, b"ddd");
        assert_eq!(t.leftover(), Leftover::Busy);
        feed_frontend(&mut t, b"c");
        rfq(&mut t, b'I');
        assert_eq!(t.leftover(), Leftover::Idle);
    }
}
