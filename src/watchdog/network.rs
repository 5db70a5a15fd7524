//! Peer RPC: wire format, connection pool, openraft network client and peer bookkeeping.
//!
//! Wire format: every message is a frame `u32 big-endian length` + `serde_json` body.
//! A connection carries one request at a time (request, then response). Connections are
//! pooled per peer and reused; a connection is only returned to the pool after a complete
//! request/response exchange, so a cancelled or failed call (openraft wraps calls in
//! timeouts) simply drops its socket and can never desynchronize the framing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, LeaderId, RaftNetwork, RaftNetworkFactory, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::config::PeerConfig;
use super::types::{Command, SharedState, TypeConfig};
use super::WatchdogStatus;

/// Largest accepted frame body (bytes). Anything bigger is treated as a protocol error.
pub(crate) const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Idle connections kept per peer.
const MAX_IDLE_PER_PEER: usize = 4;

/// A request sent to a peer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Ask for the peer's [`WatchdogStatus`].
    Status,
    /// Ask the peer (expected to be the leader) to commit a command.
    Propose(Command),
}

/// Why a forwarded proposal was not committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ProposeRejection {
    /// The receiver is not the leader; `leader` is its best guess.
    NotLeader { leader: Option<u64> },
    /// Any other failure.
    Failed(String),
}

/// A response from a peer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Status(Box<WatchdogStatus>),
    Propose(Result<SharedState, ProposeRejection>),
    /// The request could not be decoded or served.
    Error(String),
}

/// Writes one frame.
pub(crate) async fn write_frame<W, T>(w: &mut W, msg: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds limit {MAX_FRAME}", body.len()),
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one raw frame body. `Ok(None)` on clean EOF before the header.
pub(crate) async fn read_frame_bytes<R>(r: &mut R) -> std::io::Result<Option<Vec<u8>>>
where
    R: AsyncRead + Unpin,
{
    let mut hdr = [0u8; 4];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("incoming frame of {len} bytes exceeds limit {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Reads and decodes one frame; EOF is an error here.
pub(crate) async fn read_frame<R, T>(r: &mut R) -> std::io::Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let body = read_frame_bytes(r).await?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed")
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Failure of one RPC call.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// Could not establish a connection (peer down / unreachable).
    Connect(String),
    /// The exchange failed after connecting (I/O, decode).
    Io(String),
    /// The call did not complete in time.
    Timeout(Duration),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Connect(e) => write!(f, "connect failed: {e}"),
            CallError::Io(e) => write!(f, "i/o error: {e}"),
            CallError::Timeout(d) => write!(f, "timed out after {d:?}"),
        }
    }
}

/// Bookkeeping for one peer.
#[derive(Debug)]
struct PeerEntry {
    addr: String,
    witness: bool,
    idle: Vec<TcpStream>,
    /// Latest AppendEntries acknowledged by this peer for a leader vote, with the time the
    /// request was SENT (taken before the request was written).
    last_ack: Option<(LeaderId<u64>, Instant)>,
    /// Last successful outgoing RPC.
    last_ok: Option<Instant>,
    /// Last incoming RPC from this peer.
    last_heard: Option<Instant>,
    last_error: Option<String>,
}

/// Snapshot of a peer's bookkeeping (for status).
#[derive(Debug, Clone)]
pub(crate) struct PeerSnapshot {
    pub id: u64,
    pub addr: String,
    pub witness: bool,
    pub last_ack: Option<Instant>,
    pub last_contact: Option<Instant>,
    pub last_error: Option<String>,
}

/// Shared table of peers: addresses, connection pools, ack times, errors.
#[derive(Debug)]
pub(crate) struct PeerTable {
    peers: Mutex<BTreeMap<u64, PeerEntry>>,
    connect_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerTable {
    pub(crate) fn new(peers: &[PeerConfig], connect_timeout: Duration) -> Self {
        let map = peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    PeerEntry {
                        addr: p.addr.clone(),
                        witness: p.witness,
                        idle: Vec::new(),
                        last_ack: None,
                        last_ok: None,
                        last_heard: None,
                        last_error: None,
                    },
                )
            })
            .collect();
        PeerTable {
            peers: Mutex::new(map),
            connect_timeout,
        }
    }

    /// Configured address of a peer.
    pub(crate) fn addr(&self, id: u64) -> Option<String> {
        lock(&self.peers).get(&id).map(|p| p.addr.clone())
    }

    /// Records that `peer` accepted an AppendEntries of leader `leader` that was sent at `sent`.
    pub(crate) fn record_ack(&self, peer: u64, leader: LeaderId<u64>, sent: Instant) {
        if let Some(p) = lock(&self.peers).get_mut(&peer) {
            match &p.last_ack {
                Some((l, t)) if *l == leader && *t >= sent => {}
                _ => p.last_ack = Some((leader, sent)),
            }
        }
    }

    /// Send time of the latest AppendEntries acknowledged by `peer` for `leader`.
    pub(crate) fn ack_time(&self, peer: u64, leader: &LeaderId<u64>) -> Option<Instant> {
        lock(&self.peers)
            .get(&peer)
            .and_then(|p| p.last_ack.as_ref())
            .and_then(|(l, t)| (l == leader).then_some(*t))
    }

    /// Records an incoming RPC from `peer`.
    pub(crate) fn record_heard(&self, peer: u64) {
        if let Some(p) = lock(&self.peers).get_mut(&peer) {
            p.last_heard = Some(Instant::now());
        }
    }

    fn record_result(&self, peer: u64, res: Result<(), &CallError>) {
        if let Some(p) = lock(&self.peers).get_mut(&peer) {
            match res {
                Ok(()) => {
                    p.last_ok = Some(Instant::now());
                    p.last_error = None;
                }
                Err(e) => p.last_error = Some(e.to_string()),
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<PeerSnapshot> {
        lock(&self.peers)
            .iter()
            .map(|(id, p)| PeerSnapshot {
                id: *id,
                addr: p.addr.clone(),
                witness: p.witness,
                last_ack: p.last_ack.map(|(_, t)| t),
                last_contact: match (p.last_ok, p.last_heard) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                },
                last_error: p.last_error.clone(),
            })
            .collect()
    }

    /// Drops all pooled connections (used at shutdown).
    pub(crate) fn clear_pools(&self) {
        for p in lock(&self.peers).values_mut() {
            p.idle.clear();
        }
    }

    /// Performs one request/response exchange with `peer` within `timeout` (connect included).
    pub(crate) async fn call(
        &self,
        peer: u64,
        fallback_addr: Option<&str>,
        req: &RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, CallError> {
        let res =
            match tokio::time::timeout(timeout, self.call_inner(peer, fallback_addr, req)).await {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout(timeout)),
            };
        self.record_result(peer, res.as_ref().map(|_| ()));
        res
    }

    async fn call_inner(
        &self,
        peer: u64,
        fallback_addr: Option<&str>,
        req: &RpcRequest,
    ) -> Result<RpcResponse, CallError> {
        let (pooled, addr) = {
            let mut peers = lock(&self.peers);
            match peers.get_mut(&peer) {
                Some(p) => (p.idle.pop(), p.addr.clone()),
                None => match fallback_addr {
                    Some(a) => (None, a.to_string()),
                    None => return Err(CallError::Connect(format!("unknown peer {peer}"))),
                },
            }
        };
        // A pooled connection may have been closed by the peer meanwhile; on failure of a
        // pooled connection retry once on a fresh one (the request is idempotent for Raft).
        if let Some(mut stream) = pooled {
            match exchange(&mut stream, req).await {
                Ok(resp) => {
                    self.put_back(peer, stream);
                    return Ok(resp);
                }
                Err(e) => {
                    tracing::debug!(peer, error = %e, "pooled connection failed, reconnecting")
                }
            }
        }
        let mut stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(CallError::Connect(format!("{addr}: {e}"))),
                Err(_) => {
                    return Err(CallError::Connect(format!(
                        "{addr}: connect timed out after {:?}",
                        self.connect_timeout
                    )))
                }
            };
        let _ = stream.set_nodelay(true);
        let resp = exchange(&mut stream, req)
            .await
            .map_err(|e| CallError::Io(format!("{addr}: {e}")))?;
        self.put_back(peer, stream);
        Ok(resp)
    }

    fn put_back(&self, peer: u64, stream: TcpStream) {
        if let Some(p) = lock(&self.peers).get_mut(&peer) {
            if p.idle.len() < MAX_IDLE_PER_PEER {
                p.idle.push(stream);
            }
        }
    }
}

async fn exchange(stream: &mut TcpStream, req: &RpcRequest) -> std::io::Result<RpcResponse> {
    write_frame(stream, req).await?;
    read_frame(stream).await
}

/// openraft network factory: one [`PeerClient`] per target, all sharing the [`PeerTable`].
#[derive(Clone)]
pub(crate) struct NetworkFactory {
    pub(crate) peers: Arc<PeerTable>,
    /// Upper bound for a single Raft RPC (openraft usually passes a shorter TTL).
    pub(crate) request_timeout: Duration,
    /// Backoff after an `Unreachable` error.
    pub(crate) backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            node_addr: node.addr.clone(),
            peers: self.peers.clone(),
            request_timeout: self.request_timeout,
            backoff: self.backoff,
        }
    }
}

/// openraft network client for one target peer.
pub(crate) struct PeerClient {
    target: u64,
    /// Address from the membership config; only used if the peer is not in our config.
    node_addr: String,
    peers: Arc<PeerTable>,
    request_timeout: Duration,
    backoff: Duration,
}

impl PeerClient {
    fn timeout(&self, option: &RPCOption) -> Duration {
        option.hard_ttl().min(self.request_timeout)
    }

    async fn call<E: std::error::Error>(
        &self,
        req: &RpcRequest,
        option: &RPCOption,
    ) -> Result<RpcResponse, RPCError<u64, BasicNode, E>> {
        self.peers
            .call(
                self.target,
                Some(&self.node_addr),
                req,
                self.timeout(option),
            )
            .await
            .map_err(|e| match e {
                CallError::Connect(m) => {
                    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(m)))
                }
                other => {
                    RPCError::Network(NetworkError::new(&std::io::Error::other(other.to_string())))
                }
            })
    }

    fn unexpected<E: std::error::Error>(&self, resp: RpcResponse) -> RPCError<u64, BasicNode, E> {
        let msg = match resp {
            RpcResponse::Error(e) => format!("peer {} returned error: {e}", self.target),
            other => format!(
                "peer {} returned unexpected response: {other:?}",
                self.target
            ),
        };
        RPCError::Network(NetworkError::new(&std::io::Error::other(msg)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let vote: Vote<u64> = rpc.vote;
        // Taken BEFORE the request is written: the lease is anchored at (no later than) the
        // send time of the acknowledged request.
        let sent = Instant::now();
        match self.call(&RpcRequest::AppendEntries(rpc), &option).await? {
            RpcResponse::AppendEntries(Ok(resp)) => {
                let accepted_leader = matches!(
                    resp,
                    AppendEntriesResponse::Success
                        | AppendEntriesResponse::PartialSuccess(_)
                        | AppendEntriesResponse::Conflict
                );
                if accepted_leader && vote.is_committed() {
                    self.peers.record_ack(self.target, *vote.leader_id(), sent);
                }
                Ok(resp)
            }
            RpcResponse::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .call(&RpcRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            RpcResponse::InstallSnapshot(Ok(resp)) => Ok(resp),
            RpcResponse::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(&RpcRequest::Vote(rpc), &option).await? {
            RpcResponse::Vote(Ok(resp)) => Ok(resp),
            RpcResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
