//! What the proxy believes about the cluster: each node's address, health and role, and which
//! node is the primary. Published as an immutable [`ClusterState`] snapshot through arc-swap;
//! the failover manager ([`crate::failover`]) is its only writer, and every routing decision
//! reads it without locks.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::BackendConfig;

/// A node's replication role, as reported by `pg_is_in_recovery()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// In recovery: streaming standby.
    Standby,
}

/// What one successful health check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The node's role.
    pub role: Role,
    /// Current WAL position (primary) or last replayed position (standby).
    pub lsn: u64,
    /// Timeline of the WAL being written; 0 for standbys.
    pub timeline: u32,
}

/// A node's state as the proxy manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStatus {
    /// Not checked yet.
    Unknown,
    /// In service with the given role.
    Up(Role),
    /// Out of service: failed its health checks, was detached, or claimed to be primary while
    /// another node was. It is never put back in service on its own (an operator attaches it).
    Down {
        /// When it went down.
        since: Instant,
        /// Why, for status output.
        reason: String,
    },
}

impl NodeStatus {
    /// Short name for status output and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            NodeStatus::Unknown => "unknown",
            NodeStatus::Up(Role::Primary) => "primary",
            NodeStatus::Up(Role::Standby) => "standby",
            NodeStatus::Down { .. } => "down",
        }
    }

    /// Whether the node is in service.
    pub fn is_up(&self) -> bool {
        matches!(self, NodeStatus::Up(_))
    }
}

/// One backend as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Configured name.
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Data directory on its host, for hooks.
    pub data_directory: Option<PathBuf>,
    /// Managed status.
    pub status: NodeStatus,
    /// What the last successful check saw, even while the node is down.
    pub last_seen: Option<Observed>,
}

impl Node {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A consistent view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    /// Nodes in configuration order; the index is the node id.
    pub nodes: Vec<Node>,
    /// The node that receives sessions, if one is known.
    pub primary: Option<usize>,
    /// Bumped every time `primary` changes, so connections opened under an older assignment
    /// are never handed out again.
    pub epoch: u64,
}

impl ClusterState {
    /// The starting view: every node unknown, no primary.
    pub fn new(backends: &[BackendConfig]) -> ClusterState {
        ClusterState {
            nodes: backends
                .iter()
                .map(|b| Node {
                    name: b.name.clone(),
                    host: b.host.clone(),
                    port: b.port,
                    data_directory: b.data_directory.clone(),
                    status: NodeStatus::Unknown,
                    last_seen: None,
                })
                .collect(),
            primary: None,
            epoch: 0,
        }
    }

    /// Address of the primary, if known.
    pub fn primary_addr(&self) -> Option<(usize, String)> {
        self.primary.map(|i| (i, self.nodes[i].addr()))
    }

    /// Sets the primary, bumping the epoch if it changed.
    pub fn set_primary(&mut self, primary: Option<usize>) {
        if self.primary != primary {
            self.primary = primary;
            self.epoch += 1;
        }
    }

    /// The standby to promote when the primary fails: the in-service standby that has
    /// replayed the most WAL (lowest id on a tie), so the fewest transactions are lost.
    pub fn promotion_candidate(&self, failed: usize) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != failed && n.status == NodeStatus::Up(Role::Standby))
            .max_by_key(|(i, n)| (n.last_seen.map(|o| o.lsn).unwrap_or(0), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
    }

    /// Among nodes that claim to be primary, the one to keep: the recorded primary if it is
    /// among them, else the one on the newest timeline (then furthest WAL, then lowest id).
    pub fn resolve_claimants(&self, claimants: &[(usize, Observed)]) -> Option<usize> {
        if let Some(p) = self.primary {
            if claimants.iter().any(|(i, _)| *i == p) {
                return Some(p);
            }
        }
        claimants
            .iter()
            .max_by_key(|(i, o)| (o.timeline, o.lsn, std::cmp::Reverse(*i)))
            .map(|(i, _)| *i)
    }
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            let detail = match &n.status {
                NodeStatus::Down { reason, .. } => format!("\t{reason}"),
                _ => String::new(),
            };
            writeln!(f, "{i}\t{}\t{}\t{}{detail}", n.name, n.addr(), n.status.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> ClusterState {
        let backends: Vec<BackendConfig> = (0..n)
            .map(|i| BackendConfig { name: format!("pg{i}"), host: "h".into(), port: 5432 + i as u16, weight: 1, data_directory: None })
            .collect();
        ClusterState::new(&backends)
    }

    fn obs(role: Role, lsn: u64, timeline: u32) -> Observed {
        Observed { role, lsn, timeline }
    }

    #[test]
    fn epoch_moves_only_when_primary_changes() {
        let mut s = state(2);
        s.set_primary(Some(0));
        s.set_primary(Some(0));
        assert_eq!(s.epoch, 1);
        s.set_primary(None);
        s.set_primary(Some(1));
        assert_eq!(s.epoch, 3);
    }

    #[test]
    fn candidate_is_most_advanced_standby() {
        let mut s = state(3);
        for (i, lsn) in [(0, 500), (1, 100), (2, 300)] {
            s.nodes[i].status = NodeStatus::Up(if i == 0 { Role::Primary } else { Role::Standby });
            s.nodes[i].last_seen = Some(obs(Role::Standby, lsn, 0));
        }
        assert_eq!(s.promotion_candidate(0), Some(2));
        s.nodes[2].status = NodeStatus::Down { since: Instant::now(), reason: "x".into() };
        assert_eq!(s.promotion_candidate(0), Some(1));
    }

    #[test]
    fn recorded_primary_wins_then_newest_timeline() {
        let mut s = state(3);
        s.primary = Some(0);
        let claims = [(0, obs(Role::Primary, 10, 1)), (1, obs(Role::Primary, 5, 2))];
        assert_eq!(s.resolve_claimants(&claims), Some(0));
        s.primary = None;
        assert_eq!(s.resolve_claimants(&claims), Some(1));
    }
}
