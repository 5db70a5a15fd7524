//! What the proxy believes about the cluster: each node's address, health and role, and which
//! node is the primary. Published as an immutable [`ClusterState`] snapshot through arc-swap;
//! the health task is its only writer, and every routing decision reads it without locks.

use std::fmt;
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

/// A node's health and, when it answers, its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Not checked yet.
    Unknown,
    /// Answered the last check.
    Up(Role),
    /// Failed the last check.
    Down {
        /// When it was first seen failing.
        since: Instant,
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
}

/// One backend as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Configured name.
    pub name: String,
    /// `host:port`.
    pub addr: String,
    /// Latest known status.
    pub status: NodeStatus,
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
                .map(|b| Node { name: b.name.clone(), addr: format!("{}:{}", b.host, b.port), status: NodeStatus::Unknown })
                .collect(),
            primary: None,
            epoch: 0,
        }
    }

    /// Applies the outcome of checking every node and decides the primary.
    ///
    /// When several nodes claim to be primary (a promoted standby while the old primary still
    /// runs), the one already recorded keeps the role so sessions never move on a claim alone;
    /// if none of them was recorded, the lowest node id wins. The others are reported.
    pub fn with_observations(&self, observed: &[NodeStatus]) -> ClusterState {
        let mut next = self.clone();
        for (node, status) in next.nodes.iter_mut().zip(observed) {
            node.status = match (node.status, *status) {
                // Keep the first failure time while a node stays down.
                (NodeStatus::Down { since }, NodeStatus::Down { .. }) => NodeStatus::Down { since },
                (_, s) => s,
            };
        }
        let claimants: Vec<usize> = next
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.status == NodeStatus::Up(Role::Primary))
            .map(|(i, _)| i)
            .collect();
        let primary = match self.primary {
            Some(p) if claimants.contains(&p) => Some(p),
            _ => claimants.first().copied(),
        };
        if claimants.len() > 1 {
            tracing::warn!(
                nodes = ?claimants.iter().map(|&i| next.nodes[i].name.as_str()).collect::<Vec<_>>(),
                chosen = primary.map(|i| next.nodes[i].name.as_str()),
                "more than one node reports it is not in recovery; only the chosen one gets sessions"
            );
        }
        if primary != self.primary {
            next.primary = primary;
            next.epoch = self.epoch + 1;
        }
        next
    }

    /// Address of the primary, if known.
    pub fn primary_addr(&self) -> Option<(usize, &str)> {
        self.primary.map(|i| (i, self.nodes[i].addr.as_str()))
    }
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            writeln!(f, "{i}\t{}\t{}\t{}", n.name, n.addr, n.status.name())?;
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

    const P: NodeStatus = NodeStatus::Up(Role::Primary);
    const S: NodeStatus = NodeStatus::Up(Role::Standby);

    #[test]
    fn single_primary_found_and_epoch_bumped() {
        let s = state(3).with_observations(&[S, P, S]);
        assert_eq!(s.primary, Some(1));
        assert_eq!(s.epoch, 1);
        let again = s.with_observations(&[S, P, S]);
        assert_eq!(again.epoch, 1, "no change, no new epoch");
    }

    #[test]
    fn recorded_primary_wins_over_new_claimant() {
        let s = state(3).with_observations(&[S, P, S]);
        let two = s.with_observations(&[P, P, S]);
        assert_eq!(two.primary, Some(1));
    }

    #[test]
    fn primary_lost_then_promoted_standby_taken() {
        let down = NodeStatus::Down { since: Instant::now() };
        let s = state(2).with_observations(&[P, S]);
        let lost = s.with_observations(&[down, S]);
        assert_eq!(lost.primary, None);
        let promoted = lost.with_observations(&[down, P]);
        assert_eq!(promoted.primary, Some(1));
        assert_eq!(promoted.epoch, 3);
    }
}
