//! Raft type configuration, replicated commands and the replicated state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// openraft type configuration of the watchdog.
    pub TypeConfig:
        D = Command,
        R = SharedState,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A command replicated through the Raft log and applied to [`SharedState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Peer `peer` currently sees backend `node` as failed.
    ReportFailure {
        /// Backend name.
        node: String,
        /// Reporting peer id.
        peer: u64,
    },
    /// Peer `peer` no longer sees backend `node` as failed.
    ClearFailure {
        /// Backend name.
        node: String,
        /// Reporting peer id.
        peer: u64,
    },
    /// Set the cluster-wide view of the primary and the set of down backends.
    /// Bumps [`SharedState::epoch`] when the primary changes.
    SetPrimary {
        /// New primary backend name (None = no primary).
        primary: Option<String>,
        /// Backends considered down.
        down: BTreeSet<String>,
    },
}

/// The replicated state machine value, identical on every node once applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    /// Name of the current primary backend, if decided.
    pub primary: Option<String>,
    /// Backends considered down cluster-wide.
    pub down: BTreeSet<String>,
    /// Incremented every time the primary changes; fences stale decisions.
    pub epoch: u64,
    /// For each backend, the set of peers that currently report it as failed
    /// (used for quorum-gated failover).
    pub reports: BTreeMap<String, BTreeSet<u64>>,
}

impl SharedState {
    /// Applies one command (deterministically) to the state.
    pub fn apply(&mut self, cmd: &Command) {
        match cmd {
            Command::ReportFailure { node, peer } => {
                self.reports.entry(node.clone()).or_default().insert(*peer);
            }
            Command::ClearFailure { node, peer } => {
                if let Some(set) = self.reports.get_mut(node) {
                    set.remove(peer);
                    if set.is_empty() {
                        self.reports.remove(node);
                    }
                }
            }
            Command::SetPrimary { primary, down } => {
                if *primary != self.primary {
                    self.epoch += 1;
                    self.primary = primary.clone();
                }
                self.down = down.clone();
            }
        }
    }

    /// Number of distinct peers currently reporting `node` as failed.
    pub fn failure_reports(&self, node: &str) -> usize {
        self.reports.get(node).map_or(0, |s| s.len())
    }
}
