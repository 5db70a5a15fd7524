//! Configuration of the watchdog (consensus) subsystem.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::WatchdogError;

/// Configuration of one watchdog node.
///
/// Durations are written in humantime notation (`"100ms"`, `"1s"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// Raft id of this node. Must be unique among all voters and stable across restarts.
    pub node_id: u64,
    /// Address the peer RPC server of this node listens on.
    pub listen: SocketAddr,
    /// All OTHER voters of the cluster (proxies and witnesses), not including this node.
    pub peers: Vec<PeerConfig>,
    /// Interval between leader heartbeats (AppendEntries) to followers.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    #[serde(default = "default_election_min", with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    #[serde(default = "default_election_max", with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Length of the leader lease: the leader considers its leadership valid until
    /// `last quorum-acknowledged heartbeat send time + lease`.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// Directory where the Raft vote, log and snapshot are persisted.
    pub state_dir: PathBuf,
    /// The virtual IP the leader holds (pgpool: `delegate_IP`); none when absent.
    #[serde(default)]
    pub vip: Option<VipConfig>,
    /// Run when this node becomes the leader, before it brings the VIP up (pgpool:
    /// `wd_escalation_command`).
    #[serde(default)]
    pub escalation_command: String,
    /// Run when this node stops being the leader, after the VIP is dropped (pgpool:
    /// `wd_de_escalation_command`).
    #[serde(default)]
    pub de_escalation_command: String,
}

/// The virtual IP and how it is brought up, announced and dropped. Commands are shell
/// templates with pgpool's `$_IP_$` placeholder; empty ones get defaults using
/// `ip addr add/del` and `arping`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// `ADDRESS/PREFIX`, e.g. `10.0.0.50/24` (pgpool: `delegate_IP`, with the prefix from
    /// its `if_up_cmd`).
    pub address: String,
    /// Interface the address is added to.
    pub interface: String,
    /// pgpool: `if_up_cmd`.
    #[serde(default)]
    pub if_up_cmd: String,
    /// pgpool: `if_down_cmd`.
    #[serde(default)]
    pub if_down_cmd: String,
    /// pgpool: `arping_cmd`.
    #[serde(default)]
    pub arping_cmd: String,
}

/// One other voter of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Raft id of the peer.
    pub id: u64,
    /// `host:port` of the peer's RPC listener.
    pub addr: String,
    /// Whether the peer is a witness (votes but never campaigns). Used to pick the node
    /// that bootstraps the cluster: the lowest-id *proxy* voter does it, so that a witness
    /// never becomes the first leader. Defaults to `false`.
    #[serde(default)]
    pub witness: bool,
}

// Defaults sized for a VIP that moves within about a second of a leader's failure: detection
// (election timeout) plus one lease that the new leader waits out. A leader whose heartbeats
// are not acknowledged for a lease drops the VIP, so the lease is several heartbeats long.
fn default_heartbeat() -> Duration {
    Duration::from_millis(50)
}
fn default_election_min() -> Duration {
    Duration::from_millis(200)
}
fn default_election_max() -> Duration {
    Duration::from_millis(350)
}
fn default_lease() -> Duration {
    Duration::from_millis(400)
}

impl WatchdogConfig {
    /// Builds a config with default timings.
    pub fn new(
        node_id: u64,
        listen: SocketAddr,
        peers: Vec<PeerConfig>,
        state_dir: PathBuf,
    ) -> Self {
        WatchdogConfig {
            node_id,
            listen,
            peers,
            heartbeat_interval: default_heartbeat(),
            election_timeout_min: default_election_min(),
            election_timeout_max: default_election_max(),
            lease: default_lease(),
            state_dir,
            vip: None,
            escalation_command: String::new(),
            de_escalation_command: String::new(),
        }
    }

    /// Checks internal consistency of the configuration.
    pub fn validate(&self) -> Result<(), WatchdogError> {
        let bad = |msg: String| Err(WatchdogError::Config(msg));
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be > 0".into());
        }
        if self.election_timeout_min <= self.heartbeat_interval {
            return bad(format!(
                "election_timeout_min ({:?}) must be greater than heartbeat_interval ({:?})",
                self.election_timeout_min, self.heartbeat_interval
            ));
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return bad(format!(
                "election_timeout_max ({:?}) must be greater than election_timeout_min ({:?})",
                self.election_timeout_max, self.election_timeout_min
            ));
        }
        if self.lease <= self.heartbeat_interval {
            return bad(format!(
                "lease ({:?}) must be greater than heartbeat_interval ({:?}) to be renewed",
                self.lease, self.heartbeat_interval
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        seen.insert(self.node_id);
        for p in &self.peers {
            if !seen.insert(p.id) {
                return bad(format!(
                    "duplicate voter id {} (peer ids must differ from each other and from node_id)",
                    p.id
                ));
            }
            if p.addr.trim().is_empty() {
                return bad(format!("peer {} has an empty addr", p.id));
            }
        }
        Ok(())
    }
}
