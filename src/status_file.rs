//! The status file (pgpool's `pgpool_status`): which node is primary and which are down,
//! kept across restarts so a restarted proxy neither forgets a failover nor re-admits a
//! failed node. Plain text, one fact per line, rewritten atomically on every change:
//!
//! ```text
//! primary node1
//! down node0
//! ```

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use crate::cluster::{ClusterState, NodeStatus};

/// What a status file says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// Name of the recorded primary.
    pub primary: Option<String>,
    /// Names of nodes out of service.
    pub down: HashSet<String>,
}

/// Reads a status file; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> std::io::Result<Option<Saved>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut saved = Saved::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.split_once(' ') {
            Some(("primary", name)) => saved.primary = Some(name.trim().to_owned()),
            Some(("down", name)) => {
                saved.down.insert(name.trim().to_owned());
            }
            _ => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected line {line:?}")))
            }
        }
    }
    Ok(Some(saved))
}

/// Writes the state of `cluster`: to a temporary file, then renamed over the old one, so a
/// crash never leaves half a file.
pub fn save(path: &Path, cluster: &ClusterState) -> std::io::Result<()> {
    let mut text = String::from("# pglifeguard node status; rewritten on every change\n");
    if let Some(p) = cluster.primary {
        text.push_str(&format!("primary {}\n", cluster.nodes[p].name));
    }
    for n in &cluster.nodes {
        if matches!(n.status, NodeStatus::Down { .. }) {
            text.push_str(&format!("down {}\n", n.name));
        }
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    #[test]
    fn roundtrip() {
        let b = |n: &str| BackendConfig { name: n.into(), host: "h".into(), port: 1, weight: 1, data_directory: None };
        let mut state = ClusterState::new(&[b("a"), b("b")]);
        state.primary = Some(1);
        state.nodes[0].status = NodeStatus::Down { since: std::time::Instant::now(), reason: "x".into() };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status");
        assert_eq!(load(&path).expect("no file is fine"), None);
        save(&path, &state).expect("save");
        let saved = load(&path).expect("load").expect("present");
        assert_eq!(saved.primary.as_deref(), Some("b"));
        assert!(saved.down.contains("a") && !saved.down.contains("b"));
    }
}
