//! Watchdog: Raft-based leader election and a small replicated state for pglifeguard peers.
//!
//! 2–3 proxy peers (plus optionally a witness that only votes) run openraft 0.9 over a plain
//! TCP RPC ([`network`]). The elected leader holds a *lease* ([`Watchdog::lease`]) that the
//! application uses to gate leader-only side effects (virtual IP, failover hooks), and every
//! node exposes the applied [`SharedState`] ([`Watchdog::state`]).
//!
//! # Lease reasoning
//!
//! The leader's lease deadline is `T_ack + lease`, where `T_ack` is the largest instant such
//! that a quorum of voters (the leader itself counting as "now") acknowledged an AppendEntries
//! of the leader's current term that was **sent** at or after `T_ack`. The send time is taken
//! before the request is written to the socket (see `PeerClient::append_entries`), i.e. it is
//! never later than the moment the follower processed it.
//!
//! Why a new leader may act after waiting `lease` from its own election:
//! a new leader of term `T' > T` was elected by a quorum `V` of votes. A voter that granted the
//! `T'` vote has persisted it and rejects every later AppendEntries of term `T`, so every term-`T`
//! acknowledgement from that voter was *sent* before the voter granted its vote, hence before
//! the new leader learned it was elected (`t_e`). Any quorum `Q` the old leader can use
//! intersects `V`; if the intersection is a peer, its ack time is `< t_e`; if it is the old leader
//! itself, the old leader granted the `T'` vote, left the leader state and dropped the lease
//! (up to the few milliseconds it takes for openraft's metrics to propagate). So the old
//! leader's `T_ack < t_e` and its deadline `< t_e + lease`. The new leader records
//! `Leadership::Leader { since }` when it *observes* its own leadership (`since >= t_e`), so
//! waiting until `since + lease` guarantees the old lease has expired, assuming clock rates
//! differ by less than [`LEASE_DRIFT_ALLOWANCE`] (the deadline is shortened by that fraction)
//! and metrics propagation is much shorter than `lease`.
//!
//! openraft also exposes `RaftMetrics::millis_since_quorum_ack`, computed from the same kind of
//! send times, but the metrics value carries no timestamp of when it was computed: turning it
//! into an `Instant` at observation time would over-estimate `T_ack` by the scheduling delay.
//! We therefore track acknowledgements ourselves in the network layer and use the metric only
//! as an additional gate (it must be `Some`, i.e. openraft also sees a quorum ack).
//!
//! Openraft 0.9 does not step a leader down when it loses its quorum; the lease does, which is
//! why callers must use [`Watchdog::lease`] rather than `is_leader` for side effects.

mod config;
mod error;
mod network;
mod server;
mod store;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::InitializeError;
use openraft::{BasicNode, Raft, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{PeerConfig, VipConfig, WatchdogConfig};
pub use error::WatchdogError;
pub use types::{Command, SharedState, TypeConfig};

use network::{CallError, NetworkFactory, PeerTable, ProposeRejection, RpcRequest, RpcResponse};
use store::{LogStore, StateMachineStore};

/// Fraction of `lease` subtracted from the leader's deadline to tolerate clock-rate drift
/// between nodes (1%).
pub const LEASE_DRIFT_ALLOWANCE: f64 = 0.01;

/// Role of this node in the watchdog cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    /// A proxy: votes and may become leader.
    Proxy,
    /// A witness: votes but never campaigns (openraft `enable_elect = false`), so it never
    /// becomes leader except transiently if it is (mis)configured as the bootstrap node.
    Witness,
}

/// Leadership as seen by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Not the leader.
    Follower {
        /// Leader known to this node, if any.
        leader: Option<u64>,
        /// Current term.
        term: u64,
    },
    /// This node is the Raft leader of `term`.
    Leader {
        /// Term of the leadership.
        term: u64,
        /// When this node observed that it became leader (never earlier than the election).
        since: Instant,
    },
}

impl Leadership {
    /// Whether this is [`Leadership::Leader`].
    pub fn is_leader(&self) -> bool {
        matches!(self, Leadership::Leader { .. })
    }
}

/// Status of one peer as seen by this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer id.
    pub id: u64,
    /// Configured address.
    pub addr: String,
    /// Configured as witness.
    pub witness: bool,
    /// Contact (an outgoing RPC succeeded or an incoming RPC arrived) within
    /// 2 × `election_timeout_max`.
    pub reachable: bool,
    /// Milliseconds since the send time of the last AppendEntries the peer acknowledged
    /// (only maintained while this node is/was leader).
    pub last_ack_ms_ago: Option<u64>,
    /// Milliseconds since the last contact in either direction.
    pub last_contact_ms_ago: Option<u64>,
    /// Last outgoing RPC error, cleared on success.
    pub last_error: Option<String>,
    /// Highest log index known to be replicated to the peer (leader only).
    pub matched_index: Option<u64>,
}

/// Status of this node (served as JSON on the status endpoint and via the `Status` RPC).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchdogStatus {
    /// This node's id.
    pub id: u64,
    /// This node's role.
    pub role: PeerRole,
    /// openraft server state (`Leader`, `Follower`, `Candidate`, `Learner`, `Shutdown`).
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Current leader, if known.
    pub leader: Option<u64>,
    /// This node is the Raft leader (may be true without a valid lease; see `lease_valid`).
    pub is_leader: bool,
    /// This node is leader AND holds a valid lease.
    pub lease_valid: bool,
    /// Lease deadline (not serialized; `lease_remaining_ms` is).
    #[serde(skip)]
    pub lease_deadline: Option<Instant>,
    /// Milliseconds until the lease deadline.
    pub lease_remaining_ms: Option<u64>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied log entry (0 if none).
    pub last_applied: u64,
    /// Epoch of the applied [`SharedState`].
    pub epoch: u64,
    /// Other voters.
    pub peers: Vec<PeerStatus>,
}

/// State shared by the public handle, the RPC server and the monitor task.
pub(crate) struct Inner {
    id: u64,
    role: PeerRole,
    config: WatchdogConfig,
    raft: Raft<TypeConfig>,
    peers: Arc<PeerTable>,
    state_rx: watch::Receiver<SharedState>,
    lease_rx: watch::Receiver<Option<Instant>>,
    leadership_rx: watch::Receiver<Leadership>,
    /// Timeout for a proposal to commit, and for Status / Propose RPCs.
    control_timeout: Duration,
}

impl Inner {
    fn status(&self) -> WatchdogStatus {
        let m = self.raft.metrics().borrow().clone();
        let now = Instant::now();
        let lease_deadline = (*self.lease_rx.borrow()).filter(|d| *d > now);
        let reach_window = self.config.election_timeout_max * 2;
        let matched: BTreeMap<u64, Option<u64>> = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default();
        let peers = self
            .peers
            .snapshot()
            .into_iter()
            .map(|p| PeerStatus {
                id: p.id,
                addr: p.addr,
                witness: p.witness,
                reachable: p
                    .last_contact
                    .is_some_and(|t| now.saturating_duration_since(t) < reach_window),
                last_ack_ms_ago: p
                    .last_ack
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                last_contact_ms_ago: p
                    .last_contact
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                last_error: p.last_error,
                matched_index: matched.get(&p.id).copied().flatten(),
            })
            .collect();
        let is_leader = m.state == ServerState::Leader;
        WatchdogStatus {
            id: self.id,
            role: self.role,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            is_leader,
            lease_valid: is_leader && lease_deadline.is_some(),
            lease_deadline,
            lease_remaining_ms: lease_deadline
                .map(|d| d.saturating_duration_since(now).as_millis() as u64),
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            epoch: self.state_rx.borrow().epoch,
            peers,
        }
    }
}

/// A running watchdog node. Dropping it stops the node (best effort, without waiting);
/// prefer [`Watchdog::shutdown`].
pub struct Watchdog {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Watchdog {
    /// Starts a watchdog node: opens the durable storage in `config.state_dir`, binds
    /// `config.listen`, starts the RPC server and the Raft node. On first start (empty log) the
    /// lowest-id proxy voter bootstraps the cluster with all configured voters; the others wait
    /// to be contacted.
    pub async fn start(config: WatchdogConfig, role: PeerRole) -> Result<Watchdog, WatchdogError> {
        config.validate()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| WatchdogError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Self::start_with_listener(config, role, listener).await
    }

    /// Like [`Watchdog::start`] but serves RPC on an already bound listener (e.g. bound to
    /// port 0 in tests, or inherited). `config.listen` is then only used as this node's
    /// advertised address in the initial membership.
    pub async fn start_with_listener(
        config: WatchdogConfig,
        role: PeerRole,
        listener: TcpListener,
    ) -> Result<Watchdog, WatchdogError> {
        Self::start_inner(config, role, listener, |_| {}).await
    }

    /// Shared start path; `tweak` lets tests adjust the openraft config (snapshot policy).
    pub(crate) async fn start_inner(
        config: WatchdogConfig,
        role: PeerRole,
        listener: TcpListener,
        tweak: impl FnOnce(&mut openraft::Config),
    ) -> Result<Watchdog, WatchdogError> {
        config.validate()?;
        let id = config.node_id;
        let local_addr = listener
            .local_addr()
            .map_err(|source| WatchdogError::Bind {
                addr: config.listen,
                source,
            })?;

        let log_store = LogStore::open(&config.state_dir)?;
        let (state_machine, state_rx) = StateMachineStore::open(&config.state_dir)?;

        let hb = config.heartbeat_interval;
        let peers = Arc::new(PeerTable::new(
            &config.peers,
            (hb * 2).max(Duration::from_millis(20)),
        ));
        let mut raft_config = openraft::Config {
            cluster_name: "pglifeguard-watchdog".to_string(),
            heartbeat_interval: hb.as_millis() as u64,
            election_timeout_min: config.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.election_timeout_max.as_millis() as u64,
            // A witness votes but never campaigns, so it never becomes leader on its own.
            enable_elect: role == PeerRole::Proxy,
            ..Default::default()
        };
        tweak(&mut raft_config);
        let raft_config = raft_config
            .validate()
            .map_err(|e| WatchdogError::Config(format!("openraft config: {e}")))?;

        let factory = NetworkFactory {
            peers: peers.clone(),
            request_timeout: config.election_timeout_max,
            backoff: hb,
        };
        let raft = Raft::new(id, Arc::new(raft_config), factory, log_store, state_machine)
            .await
            .map_err(|e| WatchdogError::Raft {
                context: "creating raft node",
                detail: e.to_string(),
            })?;

        let initial_term = raft.metrics().borrow().current_term;
        let (lease_tx, lease_rx) = watch::channel(None);
        let (leadership_tx, leadership_rx) = watch::channel(Leadership::Follower {
            leader: None,
            term: initial_term,
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);

        let inner = Arc::new(Inner {
            id,
            role,
            control_timeout: config.election_timeout_max * 4,
            config,
            raft: raft.clone(),
            peers: peers.clone(),
            state_rx,
            lease_rx,
            leadership_rx,
        });

        let server = tokio::spawn(server::serve(listener, inner.clone(), shutdown_rx.clone()));
        let monitor = tokio::spawn(monitor(
            id,
            inner.config.lease,
            hb,
            raft.metrics(),
            peers,
            lease_tx,
            leadership_tx,
            shutdown_rx,
        ));

        let wd = Watchdog {
            inner,
            local_addr,
            shutdown_tx,
            tasks: Mutex::new(vec![server, monitor]),
            stopped: AtomicBool::new(false),
        };
        wd.maybe_initialize().await?;
        Ok(wd)
    }

    async fn maybe_initialize(&self) -> Result<(), WatchdogError> {
        let inner = &self.inner;
        let initialized = inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| WatchdogError::Raft {
                context: "checking initialization",
                detail: e.to_string(),
            })?;
        if initialized {
            return Ok(());
        }
        let mut proxies: BTreeSet<u64> = inner
            .config
            .peers
            .iter()
            .filter(|p| !p.witness)
            .map(|p| p.id)
            .collect();
        if inner.role == PeerRole::Proxy {
            proxies.insert(inner.id);
        }
        let mut all: BTreeSet<u64> = inner.config.peers.iter().map(|p| p.id).collect();
        all.insert(inner.id);
        let bootstrapper = proxies.iter().next().or(all.iter().next()).copied();
        if bootstrapper != Some(inner.id) {
            tracing::info!(
                id = inner.id,
                ?bootstrapper,
                "watchdog log is empty; waiting for the bootstrap node"
            );
            return Ok(());
        }
        let mut members: BTreeMap<u64, BasicNode> = inner
            .config
            .peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    BasicNode {
                        addr: p.addr.clone(),
                    },
                )
            })
            .collect();
        members.insert(
            inner.id,
            BasicNode {
                addr: inner.config.listen.to_string(),
            },
        );
        tracing::info!(id = inner.id, voters = ?members.keys().collect::<Vec<_>>(), "bootstrapping watchdog cluster");
        match inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(e) => match e.api_error() {
                // Another start already initialized (or we raced with an incoming append).
                Some(InitializeError::NotAllowed(_)) => {
                    tracing::debug!(error = %e, "watchdog already initialized");
                    Ok(())
                }
                _ => Err(WatchdogError::Raft {
                    context: "initializing cluster",
                    detail: e.to_string(),
                }),
            },
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Address the RPC server actually listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current status of this node.
    pub fn status(&self) -> WatchdogStatus {
        self.inner.status()
    }

    /// Leader lease: `Some(deadline)` only while this node is leader and a quorum acknowledged
    /// a heartbeat recently; the deadline is `send time of that heartbeat + lease` (minus the
    /// drift allowance). Updated at least every half heartbeat interval. Consumers should also
    /// compare the deadline with `Instant::now()` before acting.
    pub fn lease(&self) -> watch::Receiver<Option<Instant>> {
        self.inner.lease_rx.clone()
    }

    /// Whether this node currently holds a valid (unexpired) leader lease.
    pub fn has_valid_lease(&self) -> bool {
        (*self.inner.lease_rx.borrow()).is_some_and(|d| d > Instant::now())
    }

    /// Leadership changes of this node.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership_rx.clone()
    }

    /// When this node became leader of the current term, if it is leader.
    pub fn became_leader_at(&self) -> Option<Instant> {
        match *self.inner.leadership_rx.borrow() {
            Leadership::Leader { since, .. } => Some(since),
            Leadership::Follower { .. } => None,
        }
    }

    /// The replicated state as applied on this node.
    pub fn state(&self) -> watch::Receiver<SharedState> {
        self.inner.state_rx.clone()
    }

    /// Commits `cmd` through Raft and returns the state right after it was applied (on the
    /// leader). On a follower the command is forwarded to the current leader over RPC (the
    /// forwarded request may be retried once on a fresh connection, so commands should be
    /// idempotent — all current [`Command`]s are). Errors with [`WatchdogError::NoLeader`] if
    /// no leader is known and [`WatchdogError::Timeout`] if the command is not committed
    /// within 4 × `election_timeout_max` (e.g. the leader lost its quorum; the command may
    /// still be committed later).
    pub async fn propose(&self, cmd: Command) -> Result<SharedState, WatchdogError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(WatchdogError::Shutdown);
        }
        let mut hint: Option<u64> = None;
        for _attempt in 0..3 {
            let target = match hint.take() {
                Some(l) if l != self.inner.id => l,
                _ => match tokio::time::timeout(
                    self.inner.control_timeout,
                    self.inner.raft.client_write(cmd.clone()),
                )
                .await
                .map_err(|_| WatchdogError::Timeout(self.inner.control_timeout))?
                {
                    Ok(resp) => return Ok(resp.data),
                    Err(e) => match e.forward_to_leader::<BasicNode>() {
                        Some(f) => match f.leader_id {
                            Some(l) if l != self.inner.id => l,
                            Some(_) => {
                                // Leadership is in flux on this node; let it settle.
                                tokio::time::sleep(self.inner.config.heartbeat_interval).await;
                                continue;
                            }
                            None => return Err(WatchdogError::NoLeader),
                        },
                        None => {
                            return Err(WatchdogError::Raft {
                                context: "proposing command",
                                detail: e.to_string(),
                            })
                        }
                    },
                },
            };
            match self.forward(target, cmd.clone()).await? {
                Ok(state) => return Ok(state),
                Err(ProposeRejection::NotLeader { leader }) => {
                    tracing::debug!(target, ?leader, "forwarded proposal hit a non-leader");
                    if leader.is_none() {
                        tokio::time::sleep(self.inner.config.heartbeat_interval).await;
                    }
                    hint = leader;
                }
                Err(ProposeRejection::Failed(detail)) => {
                    return Err(WatchdogError::Remote {
                        peer: target,
                        detail,
                    })
                }
            }
        }
        Err(WatchdogError::NoLeader)
    }

    async fn forward(
        &self,
        leader: u64,
        cmd: Command,
    ) -> Result<Result<SharedState, ProposeRejection>, WatchdogError> {
        let addr = self
            .inner
            .peers
            .addr(leader)
            .ok_or(WatchdogError::UnknownLeader(leader))?;
        // Wait a bit longer than the leader's own commit timeout so its answer arrives.
        let timeout = self.inner.control_timeout + self.inner.config.election_timeout_max;
        match self
            .inner
            .peers
            .call(leader, None, &RpcRequest::Propose(cmd), timeout)
            .await
        {
            Ok(RpcResponse::Propose(r)) => Ok(r),
            Ok(RpcResponse::Error(detail)) => Err(WatchdogError::Remote {
                peer: leader,
                detail,
            }),
            Ok(other) => Err(WatchdogError::Rpc {
                peer: leader,
                addr,
                detail: format!("unexpected response {other:?}"),
            }),
            Err(e) => Err(rpc_err(leader, addr, e)),
        }
    }

    /// Fetches the status of peer `peer` over RPC.
    pub async fn peer_status(&self, peer: u64) -> Result<WatchdogStatus, WatchdogError> {
        let addr = self
            .inner
            .peers
            .addr(peer)
            .ok_or(WatchdogError::UnknownLeader(peer))?;
        match self
            .inner
            .peers
            .call(peer, None, &RpcRequest::Status, self.inner.control_timeout)
            .await
        {
            Ok(RpcResponse::Status(s)) => Ok(*s),
            Ok(other) => Err(WatchdogError::Rpc {
                peer,
                addr,
                detail: format!("unexpected response {other:?}"),
            }),
            Err(e) => Err(rpc_err(peer, addr, e)),
        }
    }

    /// Stops the node: RPC server, lease monitor and the Raft core. The lease is withdrawn
    /// (set to `None`) before anything else.
    ///
    /// openraft 0.9.25 has no leadership-transfer API, so a leader cannot hand over
    /// gracefully; the remaining nodes elect a new leader after their election timeout
    /// (and openraft's follower-side leader lease, `election_timeout_max`).
    pub async fn shutdown(&self) -> Result<(), WatchdogError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let _ = self.shutdown_tx.send(true);
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let res = self.inner.raft.shutdown().await;
        self.inner.peers.clear_pools();
        res.map_err(|e| WatchdogError::Raft {
            context: "shutting down raft",
            detail: e.to_string(),
        })
    }
}

/// Fetches the status of the watchdog node listening at `addr` (`host:port`) without
/// running a node, e.g. for a CLI. One fresh connection, bounded by `timeout`.
pub async fn fetch_status(addr: &str, timeout: Duration) -> Result<WatchdogStatus, WatchdogError> {
    let err = |detail: String| WatchdogError::Rpc {
        peer: 0,
        addr: addr.to_string(),
        detail,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| err(format!("connect: {e}")))?;
        network::write_frame(&mut stream, &RpcRequest::Status)
            .await
            .map_err(|e| err(format!("send: {e}")))?;
        network::read_frame::<_, RpcResponse>(&mut stream)
            .await
            .map_err(|e| err(format!("receive: {e}")))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(err(format!("timed out after {timeout:?}"))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(RpcResponse::Status(s))) => Ok(*s),
        Ok(Ok(other)) => Err(err(format!("unexpected response {other:?}"))),
    }
}

fn rpc_err(peer: u64, addr: String, e: CallError) -> WatchdogError {
    WatchdogError::Rpc {
        peer,
        addr,
        detail: e.to_string(),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.shutdown_tx.send(true);
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.inner.peers.clear_pools();
        let raft = self.inner.raft.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn wait_stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Computes the lease deadline from the metrics and the per-peer ack send times.
fn compute_lease(
    id: u64,
    m: &RaftMetrics<u64, BasicNode>,
    peers: &PeerTable,
    lease: Duration,
    now: Instant,
) -> Option<Instant> {
    if m.state != ServerState::Leader || m.current_leader != Some(id) || !m.vote.is_committed() {
        return None;
    }
    // openraft's own view must also report a quorum acknowledgement.
    m.millis_since_quorum_ack?;
    let leader_id = *m.vote.leader_id();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    if !voters.contains(&id) {
        return None;
    }
    let quorum = voters.len() / 2 + 1;
    let mut times: Vec<Instant> = voters
        .iter()
        .filter_map(|v| {
            if *v == id {
                Some(now)
            } else {
                peers.ack_time(*v, &leader_id)
            }
        })
        .collect();
    if times.len() < quorum {
        return None;
    }
    times.sort_unstable_by(|a, b| b.cmp(a));
    // The quorum-th most recent ack: a quorum acknowledged requests sent at or after it.
    let base = times[quorum - 1];
    let effective = lease.mul_f64(1.0 - LEASE_DRIFT_ALLOWANCE);
    let deadline = base + effective;
    (deadline > now).then_some(deadline)
}

/// Publishes leadership and lease from openraft metrics, re-evaluating on every metrics
/// change and at least every half heartbeat interval (so an expiring lease is withdrawn
/// promptly even when no metrics change).
#[allow(clippy::too_many_arguments)]
async fn monitor(
    id: u64,
    lease: Duration,
    heartbeat: Duration,
    mut metrics: watch::Receiver<RaftMetrics<u64, BasicNode>>,
    peers: Arc<PeerTable>,
    lease_tx: watch::Sender<Option<Instant>>,
    leadership_tx: watch::Sender<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval((heartbeat / 2).max(Duration::from_millis(5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<(u64, Instant)> = None;
    let mut last_term = 0;
    loop {
        tokio::select! {
            _ = wait_stopped(&mut shutdown) => break,
            changed = metrics.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let m = metrics.borrow_and_update().clone();
        let now = Instant::now();
        last_term = m.current_term;
        let is_leader = m.state == ServerState::Leader && m.current_leader == Some(id);
        let leadership = if is_leader {
            let since = match leader_since {
                Some((term, since)) if term == m.current_term => since,
                _ => {
                    tracing::info!(id, term = m.current_term, "watchdog became leader");
                    leader_since = Some((m.current_term, now));
                    now
                }
            };
            Leadership::Leader {
                term: m.current_term,
                since,
            }
        } else {
            if leader_since.take().is_some() {
                tracing::info!(id, term = m.current_term, leader = ?m.current_leader, "watchdog lost leadership");
            }
            Leadership::Follower {
                leader: m.current_leader,
                term: m.current_term,
            }
        };
        // Withdraw/extend the lease before announcing leadership changes.
        let deadline = compute_lease(id, &m, &peers, lease, now);
        lease_tx.send_if_modified(|cur| {
            if *cur != deadline {
                *cur = deadline;
                true
            } else {
                false
            }
        });
        leadership_tx.send_if_modified(|cur| {
            if *cur != leadership {
                *cur = leadership;
                true
            } else {
                false
            }
        });
    }
    lease_tx.send_replace(None);
    leadership_tx.send_replace(Leadership::Follower {
        leader: None,
        term: last_term,
    });
}
