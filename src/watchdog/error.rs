//! Error type of the watchdog subsystem.

use std::path::PathBuf;

/// Errors returned by the watchdog API.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The configuration is inconsistent.
    #[error("invalid watchdog config: {0}")]
    Config(String),
    /// A local file operation on the state directory failed.
    #[error("watchdog storage error at {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Persisted state could not be decoded.
    #[error("corrupt watchdog state in {path}: {detail}")]
    Corrupt {
        /// File involved.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Binding the peer RPC listener failed.
    #[error("failed to bind watchdog peer listener on {addr}: {source}")]
    Bind {
        /// Address that could not be bound.
        addr: std::net::SocketAddr,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error reported by the Raft core (fatal, storage, ...).
    #[error("raft error during {context}: {detail}")]
    Raft {
        /// What the watchdog was doing.
        context: &'static str,
        /// Error text from openraft.
        detail: String,
    },
    /// No leader is currently known, so a proposal cannot be placed.
    #[error("no raft leader is currently known")]
    NoLeader,
    /// The leader is not one of the configured peers (should not happen).
    #[error("leader {0} is not a configured peer")]
    UnknownLeader(u64),
    /// A peer RPC failed (connect, timeout, I/O or decode).
    #[error("RPC to peer {peer} at {addr} failed: {detail}")]
    Rpc {
        /// Peer id, 0 if unknown.
        peer: u64,
        /// Peer address.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The remote node rejected a forwarded proposal.
    #[error("peer {peer} rejected forwarded proposal: {detail}")]
    Remote {
        /// Peer id.
        peer: u64,
        /// Error text returned by the peer.
        detail: String,
    },
    /// A proposal was not committed in time (it may still be committed later).
    #[error("proposal not committed within {0:?}")]
    Timeout(std::time::Duration),
    /// The watchdog has been shut down.
    #[error("watchdog is shut down")]
    Shutdown,
}

impl WatchdogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WatchdogError::Io {
            path: path.into(),
            source,
        }
    }
}
