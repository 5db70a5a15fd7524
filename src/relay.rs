//! The hot path: bytes between a client and its backend, forwarded as they arrive.
//!
//! One task ([`spawn`]) owns both sockets and one buffer per direction while a client has a
//! backend. Its future, written by hand, polls both sockets for readiness, reads what
//! arrived and writes it on at once; a slow reader on either side pushes back on the other
//! exactly as PostgreSQL itself would.
//! Headers are examined through [`Framer`]; bodies are never copied or decoded except the
//! one-byte status of ReadyForQuery. Buffers are reused, so steady state allocates nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use crate::app::App;
use crate::backend::BackendConn;
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
/// same few hot lines. For a buffer of READ_CHUNK or more (the relay gives both of its
/// buffers that much), the common case (everything forwarded, nothing advanced before) costs
/// a truncation and a comparison. A smaller buffer takes the `try_reclaim` path every time:
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
    /// More than 4 GiB of messages waited in one buffer (impossible within the limits on
    /// message sizes; checked rather than assumed).
    #[error("more than 4 GiB of messages waiting in one buffer")]
    Oversized,
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
#[derive(Debug, Default)]
struct LocalStats {
    to_backend: u64,
    to_client: u64,
    /// Per batch of [`Self::FLUSH_EVERY`] reads, far below `u32::MAX` (a ReadyForQuery is 6 bytes).
    transactions: u32,
    events: u32,
}

impl LocalStats {
    const FLUSH_EVERY: u32 = 64;

    #[inline]
    fn tick(&mut self, metrics: &crate::metrics::Metrics) {
        self.events += 1;
        if self.events >= Self::FLUSH_EVERY {
            self.flush(metrics);
        }
    }

    fn flush(&mut self, metrics: &crate::metrics::Metrics) {
        if self.to_backend > 0 {
            metrics.bytes_to_backend.inc_by(std::mem::take(&mut self.to_backend));
        }
        if self.to_client > 0 {
            metrics.bytes_to_client.inc_by(std::mem::take(&mut self.to_client));
        }
        if self.transactions > 0 {
            metrics.transactions.inc_by(std::mem::take(&mut self.transactions).into());
        }
        self.events = 0;
    }
}

/// Writes what the socket takes right now, without waiting: 0 if it takes nothing.
/// The common case of a relay write is a small message into an empty socket buffer, which
/// this finishes in one system call without building a write future.
///
/// The call goes straight to the (non-blocking) socket rather than through tokio's
/// `try_write`, which first reads the socket's readiness from the reactor's shared state:
/// one more cache line per write, for an answer the system call gives anyway. A full socket
/// then falls back to tokio (`poll_write_ready`), whose stale readiness costs at most one
/// more attempt before it registers for the wake-up.
#[inline]
fn try_write_now(sock: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    match socket2::SockRef::from(sock).send_with_flags(data, libc::MSG_NOSIGNAL) {
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => Ok(0),
        Err(e) => Err(e),
    }
}

/// What forwarding the complete part of a buffer did without waiting.
enum Forwarded {
    /// All of it was written and consumed. `stop`: the scan stopped at a message that ends
    /// the relay (Terminate from the client; the server terminating an idle session).
    Done { stop: bool },
    /// The socket took only part of the scanned bytes; nothing is consumed yet.
    Partial(Pending),
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
    stats: &mut LocalStats,
) -> Result<Forwarded, RelayError> {
    let mut transactions = 0u32;
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
                    transactions += (*status == b'I') as u32;
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
    stats.transactions = stats.transactions.saturating_add(transactions);
    let written = try_write_now(client, &bbuf[..scan.forward]).map_err(RelayError::Client)?;
    if written < scan.forward {
        return Ok(Forwarded::Partial(Pending::new(written, scan.forward, lost)?));
    }
    consume(bbuf, scan.forward);
    stats.to_client += scan.forward as u64;
    Ok(Forwarded::Done { stop: lost })
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
    stats: &mut LocalStats,
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
        return Ok(Forwarded::Partial(Pending::new(written, scan.forward, scan.stopped)?));
    }
    consume(cbuf, scan.forward);
    stats.to_backend += scan.forward as u64;
    Ok(Forwarded::Done { stop: scan.stopped })
}

/// Scanned bytes at the front of a buffer that a socket has not fully taken yet.
///
/// Counts are `u32` so that both directions' pending writes fit on the relay's first cache
/// line. A buffer never holds 4 GiB: it holds at most one incomplete message whose body the
/// relay reads (client messages are capped by `max_message_size`, at most 1 GiB; the server's
/// inspected messages are short) plus one read.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// How many of them were written.
    written: u32,
    /// How many there are (the buffer's prefix that was scanned).
    forward: u32,
    /// The scan stopped at a message that ends the relay, right after these bytes.
    stop: bool,
}

impl Pending {
    fn new(written: usize, forward: usize, stop: bool) -> Result<Pending, RelayError> {
        match (u32::try_from(written), u32::try_from(forward)) {
            (Ok(written), Ok(forward)) => Ok(Pending { written, forward, stop }),
            _ => Err(RelayError::Oversized),
        }
    }
}

/// Reads what `sock` has into `buf` (making room first), or registers this task for the
/// socket's next readiness.
///
/// The read is one `recv` inside `try_io`, which checks tokio's readiness first and clears it
/// when told `WouldBlock`. A read shorter than the room offered is reported that way (after
/// keeping its bytes), as tokio's own `poll_read` does: the socket's queue was drained, the
/// next packet is a new event, and the `recv` that would only say so is saved.
///
/// Whenever nothing was read, the task registers again through `poll_read_ready`, even if it
/// registered on an earlier poll. Skipping that (remembering "already registered") loses
/// wake-ups: the I/O driver sets a socket's readiness and takes its waker in two steps, so a
/// poll that reads the data and registers between them has its fresh registration taken by
/// the driver, and the next packet then finds no waker. That hung a session with its request
/// unread in the socket (under CPU contention, within a few dozen pgbench runs).
#[inline]
fn poll_recv(sock: &TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    // A read into no room would return 0, which means end of stream.
    ensure_room(buf);
    loop {
        let room = buf.capacity() - buf.len();
        let mut short = None;
        let result = sock.try_io(tokio::io::Interest::READABLE, || {
            let n = socket2::SockRef::from(sock).recv(buf.spare_capacity_mut())?;
            if n > 0 && n < room {
                short = Some(n);
                return Err(WouldBlock.into());
            }
            Ok(n)
        });
        let n = match (result, short) {
            (_, Some(n)) | (Ok(n), None) => n,
            // Nothing to read (tokio's readiness was clear, or is now): register, or read
            // again if the socket became ready meanwhile.
            (Err(e), None) if e.kind() == WouldBlock => {
                ready!(sock.poll_read_ready(cx))?;
                continue;
            }
            (Err(e), None) if e.kind() == Interrupted => continue,
            (Err(e), None) => return Poll::Ready(Err(e)),
        };
        // SAFETY: `recv` initialised the first `n` bytes of the spare room it was given.
        unsafe { buf.set_len(buf.len() + n) };
        return Poll::Ready(Ok(n));
    }
}

/// Writes `data[*written..]` to `sock` as room appears, advancing `written`.
fn poll_write_rest(sock: &TcpStream, cx: &mut Context<'_>, data: &[u8], written: &mut u32) -> Poll<std::io::Result<()>> {
    while (*written as usize) < data.len() {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_write(&data[*written as usize..]) {
            Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            // At most data.len(), which fits (see Pending).
            Ok(n) => *written += n as u32,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Makes sure a read into `buf` has room.
#[inline]
fn ensure_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// What one turn of the relay's poll loop came to.
type Turn = Poll<Result<Option<RelayEnd>, RelayError>>;

/// What the relay of a session owns while it runs, and gives back when it ends.
#[derive(Debug)]
pub struct RelayParts {
    /// The client's socket.
    pub client: TcpStream,
    /// The backend connection, taken out of its lease.
    pub conn: BackendConn,
    /// What the client set up on its backend.
    pub session: SessionState,
    /// Client bytes read but not forwarded: the request that caused the backend checkout on
    /// the way in; on the way out, a request the relay kept back ([`RelayEnd::Rerouted`]).
    pub cbuf: BytesMut,
    /// Protocol state of the session, at the end of the relay.
    pub tracker: Tracker,
}

/// How a relay ended, with everything it owned.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Why it ended.
    pub result: Result<RelayEnd, RelayError>,
    /// The sockets, buffers and state it owned.
    pub parts: RelayParts,
}

/// Relays between a client and its backend, in a task of its own, until the client leaves,
/// the session times out or the proxy shuts down.
///
/// Why a task of its own: every wake-up of a task walks from the task down to the future
/// that is waiting, and a session's own future is a chain of async functions (session, its
/// loop, the relay) whose states lie on different cache lines. With dozens of sessions those
/// lines decide much of the proxy's CPU time. As the top-level future of its task, the relay
/// is reached directly, and it owns its sockets instead of pointing to them. The session's
/// task sleeps on the join handle meanwhile and is woken once, when the relay ends.
///
/// `parts.cbuf` may already hold client bytes (the request that caused the backend
/// checkout). A request that starts a new transaction after the cluster epoch moved past the
/// connection's is not sent to it ([`RelayEnd::Rerouted`]).
///
/// The outcome is boxed: a task's output type is moved around on every poll of the task, and
/// inline it would be several hundred bytes copied per wake-up.
pub fn spawn(app: Arc<App>, parts: RelayParts) -> tokio::task::JoinHandle<Box<RelayOutcome>> {
    tokio::spawn(Relay::new(app, parts))
}

/// How many events one poll of a relay handles before it lets the worker run other tasks: a
/// client streaming COPY data, or a server streaming a large result, would otherwise keep
/// its relay looping while the other sessions on the same worker wait. (Reads that find data
/// do not spend tokio's cooperative budget, which would otherwise bound it.)
const TURNS_PER_POLL: u32 = 64;

/// The relay of one session, as a future written by hand rather than an `async fn` with a
/// `select!`: polling a socket builds no future, and the state a wake-up touches is laid
/// out by [`RelayState`].
///
/// Flow control mirrors PostgreSQL's own: backend bytes the client cannot take yet stop
/// everything else until it does, and client bytes the server cannot take yet stop reading
/// the client while the server's replies keep flowing (a client that pipelines megabytes
/// and reads results at the same time would otherwise deadlock with the server).
struct Relay {
    /// The relay's state; `None` once it has ended and handed everything back.
    ///
    /// Boxed, so that whether it is there is read from the pointer, next to the task's own
    /// state. Inline, `Option` (and the task's stage around it) would keep its tag in the
    /// largest niche of the state's fields, a timer's or the connection's nanoseconds on a
    /// cold line, and every poll would load that line.
    state: Option<Box<RelayState>>,
}

/// A field of this type makes the next field of a `repr(C)` struct start a cache line.
#[derive(Debug, Default, Clone, Copy)]
#[repr(align(64))]
struct LineStart;

/// What a relay owns. Every wake-up walks this state, so what a wake-up touches (the protocol
/// state, both buffers, the client socket, the counters, then the backend socket) comes
/// first, on consecutive cache lines of a cache-line-aligned struct (`repr(C)`: the order
/// below is the layout; a unit test checks the offsets).
#[repr(C, align(64))]
struct RelayState {
    // First line: protocol state, pending writes, flags and the idle timer.
    tracker: Tracker,
    /// Backend bytes scanned but not yet taken by the client.
    to_client: Option<Pending>,
    /// Client bytes scanned but not yet taken by the backend.
    to_backend: Option<Pending>,
    max_len: u32,
    /// The first poll forwards the request already in `cbuf`.
    started: bool,
    /// The proxy is shutting down: the relay ends at the next idle point.
    draining: bool,
    /// The shutdown future has registered this task's waker.
    registered: bool,
    /// The idle timer, when `client_idle_timeout` is set: read on every wake-up, so its
    /// absence costs no other line.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    // Second line: the buffers.
    _line1: LineStart,
    cbuf: BytesMut,
    bbuf: BytesMut,
    // Third line: the client socket, the counters.
    client: TcpStream,
    app: Arc<App>,
    stats: LocalStats,
    // Fourth line: the backend socket, first field of the connection.
    conn: BackendConn,
    // Touched on rarer paths.
    session: SessionState,
    /// `client_idle_timeout`, read only when `idle` is set.
    idle_timeout: std::time::Duration,
    /// Created once and polled once, to register with the shared token: polling it costs a
    /// walk through its waiter list, so afterwards only the flag that
    /// [`App::begin_shutdown`] sets before cancelling is read.
    cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Relay {
    fn new(app: Arc<App>, parts: RelayParts) -> Relay {
        let config = app.config.load();
        let max_len = config.pool.max_message_size;
        let idle_timeout = config.pool.client_idle_timeout;
        drop(config);
        let idle = (!idle_timeout.is_zero()).then(|| Box::pin(tokio::time::sleep(idle_timeout)));
        let RelayParts { client, conn, session, mut cbuf, tracker } = parts;
        // The first request was read into a small buffer; at READ_CHUNK, `consume` takes its
        // cheap path.
        if cbuf.capacity() < READ_CHUNK {
            cbuf.reserve(READ_CHUNK - cbuf.len().min(READ_CHUNK));
        }
        Relay {
            state: Some(Box::new(RelayState {
                tracker,
                to_client: None,
                max_len,
                started: false,
                draining: false,
                registered: false,
                _line1: LineStart,
                cbuf,
                bbuf: BytesMut::with_capacity(READ_CHUNK),
                client,
                stats: LocalStats::default(),
                to_backend: None,
                conn,
                session,
                idle,
                idle_timeout,
                cancelled: Box::pin(app.shutdown.clone().cancelled_owned()),
                app,
            })),
        }
    }
}

impl std::future::Future for Relay {
    type Output = Box<RelayOutcome>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Box<RelayOutcome>> {
        let this = self.get_mut();
        let state = this.state.as_mut().expect("relay polled after it ended");
        let result = ready!(state.poll_relay(cx));
        let Some(mut state) = this.state.take() else { unreachable!("checked above") };
        state.stats.flush(&state.app.metrics);
        let RelayState { client, conn, session, cbuf, tracker, .. } = *state;
        Poll::Ready(Box::new(RelayOutcome { result, parts: RelayParts { client, conn, session, cbuf, tracker } }))
    }
}

impl RelayState {
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Result<RelayEnd, RelayError>> {
        if !self.started {
            self.started = true;
            if let Some(end) = self.forward_client()? {
                return Poll::Ready(Ok(end));
            }
        }
        for _ in 0..TURNS_PER_POLL {
            match self.turn(cx) {
                Poll::Ready(Ok(None)) => continue,
                Poll::Ready(Ok(Some(end))) => return Poll::Ready(Ok(end)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Budget spent with work left: poll again after the worker's other tasks.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles one event, or registers for all of them and returns `Pending`.
    fn turn(&mut self, cx: &mut Context<'_>) -> Turn {
        if let Some(pending) = self.to_client {
            return self.finish_to_client(cx, pending);
        }
        if let Some(pending) = self.to_backend {
            return self.finish_to_backend(cx, pending);
        }
        // The socket expected to speak next is polled first: a wake-up is then served by the
        // first poll, and the shutdown and idle checks only run when both sockets are quiet.
        if self.tracker.outstanding > 0 {
            if let Poll::Ready(r) = self.poll_backend(cx) {
                return Poll::Ready(r);
            }
            if let Poll::Ready(r) = self.poll_client(cx) {
                return Poll::Ready(r);
            }
        } else {
            if let Poll::Ready(r) = self.poll_client(cx) {
                return Poll::Ready(r);
            }
            if let Poll::Ready(r) = self.poll_backend(cx) {
                return Poll::Ready(r);
            }
        }
        if !self.draining && self.poll_shutdown(cx) {
            self.draining = true;
            if self.tracker.is_idle() {
                return Poll::Ready(Ok(Some(RelayEnd::Shutdown)));
            }
        }
        if self.tracker.is_idle() {
            if let Some(sleep) = &mut self.idle {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Some(RelayEnd::IdleTimeout)));
                }
            }
        }
        Poll::Pending
    }

    /// Whether the proxy is shutting down.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> bool {
        if self.app.is_stopping() {
            return true;
        }
        if !self.registered {
            self.registered = true;
            return self.cancelled.as_mut().poll(cx).is_ready();
        }
        false
    }

    fn touch_idle_timer(&mut self) {
        if let Some(sleep) = &mut self.idle {
            sleep.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
        }
    }

    /// Reads the client and forwards its complete messages.
    fn poll_client(&mut self, cx: &mut Context<'_>) -> Turn {
        let n = ready!(poll_recv(&self.client, cx, &mut self.cbuf)).map_err(RelayError::Client)?;
        if n == 0 {
            return Poll::Ready(Ok(Some(RelayEnd::ClientGone)));
        }
        // Checked only between transactions, as one atomic load: a session keeps its backend
        // until it is idle, then follows the primary (this is what makes a switchover lose
        // no session).
        if self.tracker.is_idle()
            && self.tracker.client.at_boundary()
            && self.app.epoch() != self.conn.epoch
            && self.cbuf.first() != Some(&frontend_tag::TERMINATE)
        {
            return Poll::Ready(Ok(Some(RelayEnd::Rerouted)));
        }
        let end = self.forward_client()?;
        if end.is_none() && self.to_backend.is_none() {
            self.stats.tick(&self.app.metrics);
            self.touch_idle_timer();
        }
        Poll::Ready(Ok(end))
    }

    /// Forwards the complete messages in `cbuf`, as far as the backend takes them now.
    fn forward_client(&mut self) -> Result<Option<RelayEnd>, RelayError> {
        match forward_client_now(&mut self.cbuf, &self.conn.stream, &mut self.tracker, &mut self.session, self.max_len, &mut self.stats)? {
            Forwarded::Done { stop: true } => Ok(Some(RelayEnd::ClientTerminated)),
            Forwarded::Done { stop: false } => Ok(None),
            // Rare: the server's input is full.
            Forwarded::Partial(pending) => {
                self.to_backend = Some(pending);
                Ok(None)
            }
        }
    }

    /// Reads the backend and forwards its complete messages.
    fn poll_backend(&mut self, cx: &mut Context<'_>) -> Turn {
        let lost = ready!(self.read_and_forward_backend(cx))?;
        if self.to_client.is_some() {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(Ok(self.after_backend(lost)))
    }

    /// Reads the backend and forwards what the client takes now. Returns whether the server
    /// announced it is terminating (that message is kept back).
    fn read_and_forward_backend(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, RelayError>> {
        let n = ready!(poll_recv(&self.conn.stream, cx, &mut self.bbuf)).map_err(RelayError::Backend)?;
        if n == 0 {
            return Poll::Ready(Err(RelayError::BackendClosed));
        }
        self.stats.tick(&self.app.metrics);
        Poll::Ready(match forward_backend_now(&mut self.bbuf, &self.client, &mut self.tracker, &mut self.session, &mut self.stats)? {
            Forwarded::Done { stop } => Ok(stop),
            // Rare: the client's socket is full.
            Forwarded::Partial(pending) => {
                self.to_client = Some(pending);
                Ok(false)
            }
        })
    }

    /// What follows backend bytes fully forwarded while no client bytes wait.
    fn after_backend(&mut self, lost: bool) -> Option<RelayEnd> {
        if lost {
            return Some(RelayEnd::BackendLost);
        }
        if self.draining && self.tracker.is_idle() {
            return Some(RelayEnd::Shutdown);
        }
        self.touch_idle_timer();
        None
    }

    /// Writes the backend bytes the client has not taken yet; nothing else moves meanwhile.
    fn finish_to_client(&mut self, cx: &mut Context<'_>, mut p: Pending) -> Turn {
        let r = poll_write_rest(&self.client, cx, &self.bbuf[..p.forward as usize], &mut p.written);
        self.to_client = Some(p);
        ready!(r).map_err(RelayError::Client)?;
        self.to_client = None;
        consume(&mut self.bbuf, p.forward as usize);
        self.stats.to_client += u64::from(p.forward);
        if self.to_backend.is_some() {
            // The server is going away in the middle of a request.
            return Poll::Ready(if p.stop { Err(RelayError::BackendClosed) } else { Ok(None) });
        }
        Poll::Ready(Ok(self.after_backend(p.stop)))
    }

    /// Writes the client bytes the backend has not taken yet, relaying the server's replies
    /// while its input is full.
    fn finish_to_backend(&mut self, cx: &mut Context<'_>, mut p: Pending) -> Turn {
        let r = poll_write_rest(&self.conn.stream, cx, &self.cbuf[..p.forward as usize], &mut p.written);
        self.to_backend = Some(p);
        if let Poll::Ready(r) = r {
            r.map_err(RelayError::Backend)?;
            self.to_backend = None;
            consume(&mut self.cbuf, p.forward as usize);
            self.stats.to_backend += u64::from(p.forward);
            if p.stop {
                return Poll::Ready(Ok(Some(RelayEnd::ClientTerminated)));
            }
            self.stats.tick(&self.app.metrics);
            self.touch_idle_timer();
            return Poll::Ready(Ok(None));
        }
        if ready!(self.read_and_forward_backend(cx))? {
            // The server is going away in the middle of a request.
            return Poll::Ready(Err(RelayError::BackendClosed));
        }
        Poll::Ready(Ok(None))
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
    fn hot_fields_fill_the_first_cache_lines() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<RelayState>(), 64);
        assert_eq!(offset_of!(RelayState, cbuf), 64, "first line: tracker, pending output, flags, idle timer");
        assert!(offset_of!(RelayState, idle) + size_of::<Option<Pin<Box<tokio::time::Sleep>>>>() <= 64);
        assert_eq!(offset_of!(RelayState, client), 128, "second line: the two buffers");
        assert!(offset_of!(RelayState, stats) + size_of::<LocalStats>() <= 192, "third line: client socket, counters");
        assert_eq!(offset_of!(RelayState, conn), 192, "fourth line: the backend socket");
        assert_eq!(offset_of!(BackendConn, stream), 0);
        assert!(offset_of!(BackendConn, epoch) + size_of::<u64>() <= 64, "the epoch shares the socket's line");
    }

    /// A waker that counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Every `Pending` from `poll_recv` leaves the waker of that poll registered, even when an
    /// earlier poll registered one already (remembering that registration instead lost
    /// wake-ups: the driver can take a waker after its readiness was consumed). And a read
    /// that fills the room offered is not taken for a drained socket.
    #[tokio::test]
    async fn every_pending_read_registers_and_full_reads_keep_reading() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);

        // Nothing to read: a first poll registers one waker, a second poll another.
        let first = Arc::new(Counter(AtomicUsize::new(0)));
        let second = Arc::new(Counter(AtomicUsize::new(0)));
        for counter in [&first, &second] {
            let waker = std::task::Waker::from(Arc::clone(counter));
            // Accepted sockets start out readable: the first poll clears that and registers.
            assert!(poll_recv(&reader, &mut Context::from_waker(&waker), &mut buf).is_pending());
        }

        // Data arrives: the waker of the latest poll is the one woken.
        writer.write_all(b"hello").await.unwrap();
        let woken = || second.0.load(SeqCst) > 0;
        crate::test_support::wait_until("the latest poll's waker to be woken", Duration::from_secs(10), Duration::from_millis(5), woken).await;
        let waker = std::task::Waker::from(Arc::clone(&second));
        let read = poll_recv(&reader, &mut Context::from_waker(&waker), &mut buf);
        assert!(matches!(read, Poll::Ready(Ok(5))), "{read:?}");
        assert_eq!(&buf[..], b"hello");

        // More than the room offered, all of it already queued on the socket: reads that fill
        // their room must not be taken for a drained socket, or no new event would come for
        // what is left and the loop below would wait forever.
        let payload: Vec<u8> = (0..48 * 1024u32).map(|i| i as u8).collect();
        tokio::time::timeout(Duration::from_secs(10), writer.write_all(&payload))
            .await
            .expect("the socket buffers hold the payload")
            .unwrap();
        buf = BytesMut::with_capacity(READ_CHUNK);
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            while buf.len() < payload.len() {
                let n = std::future::poll_fn(|cx| poll_recv(&reader, cx, &mut buf)).await.unwrap();
                assert!(n > 0);
            }
            buf
        })
        .await
        .expect("every byte was read");
        assert_eq!(&got[..], &payload[..]);
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
