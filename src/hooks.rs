//! Operator hooks (`failover_command`, `follow_primary_command`, `fence_command`): pgpool's
//! placeholders, run through `sh -c` in their own process group under a deadline, with their
//! output and exit status logged.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::cluster::{ClusterState, Node};

/// The nodes a hook is about, from which the placeholders are filled.
#[derive(Debug, Clone, Copy)]
pub struct HookNodes {
    /// The node the event concerns (`%d %h %p %D`).
    pub node: usize,
    /// The new main node: the promotion candidate or new primary (`%m %H %r %R`).
    pub new_main: Option<usize>,
    /// The old main node (`%M`); pglifeguard's main node is the primary.
    pub old_main: Option<usize>,
    /// The old primary (`%P %N %S`).
    pub old_primary: Option<usize>,
}

/// Replaces pgpool's placeholders. Unknown values become empty strings, `-1` for ids (as
/// pgpool does), and unknown `%x` sequences are kept as they are.
pub fn expand(template: &str, state: &ClusterState, nodes: HookNodes) -> String {
    let node = |i: Option<usize>| i.and_then(|i| state.nodes.get(i));
    let id = |i: Option<usize>| i.map(|i| i.to_string()).unwrap_or_else(|| "-1".to_owned());
    let host = |n: Option<&Node>| n.map(|n| n.host.clone()).unwrap_or_default();
    let port = |n: Option<&Node>| n.map(|n| n.port.to_string()).unwrap_or_default();
    let dir = |n: Option<&Node>| {
        n.and_then(|n| n.data_directory.as_ref()).map(|d| d.display().to_string()).unwrap_or_default()
    };
    let failed = node(Some(nodes.node));
    let new_main = node(nodes.new_main);
    let old_primary = node(nodes.old_primary);
    let mut out = String::with_capacity(template.len() + 32);
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&id(Some(nodes.node))),
            Some('h') => out.push_str(&host(failed)),
            Some('p') => out.push_str(&port(failed)),
            Some('D') => out.push_str(&dir(failed)),
            Some('m') => out.push_str(&id(nodes.new_main)),
            Some('H') => out.push_str(&host(new_main)),
            Some('r') => out.push_str(&port(new_main)),
            Some('R') => out.push_str(&dir(new_main)),
            Some('M') => out.push_str(&id(nodes.old_main)),
            Some('P') => out.push_str(&id(nodes.old_primary)),
            Some('N') => out.push_str(&host(old_primary)),
            Some('S') => out.push_str(&port(old_primary)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// Exited with status 0.
    Success,
    /// Exited with another status, or was killed by a signal.
    Failed(String),
    /// Still running at the deadline: its process group was killed.
    TimedOut,
    /// Could not be started.
    NotStarted(String),
}

impl HookOutcome {
    /// Label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HookOutcome::Success => "success",
            HookOutcome::Failed(_) => "failed",
            HookOutcome::TimedOut => "timeout",
            HookOutcome::NotStarted(_) => "not_started",
        }
    }
}

/// Runs one hook command line; never panics and never outlives `timeout`.
pub async fn run(name: &str, command: &str, timeout: Duration) -> (HookOutcome, Duration) {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so a hook that forks (ssh, pg_ctl) is killed whole on timeout.
        .process_group(0)
        .kill_on_drop(true);
    tracing::info!(hook = name, command, "running hook");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(hook = name, error = %e, "cannot start hook");
            return (HookOutcome::NotStarted(e.to_string()), started.elapsed());
        }
    };
    let pid = child.id();
    // Kills the whole group if this future is dropped before the command finished (shutdown,
    // an aborted task): kill_on_drop alone would reach only the shell.
    let guard = GroupKill(pid);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let wait = async {
        let (status, out, err) = tokio::join!(child.wait(), read_all(stdout), read_all(stderr));
        (status, out, err)
    };
    let outcome = match tokio::time::timeout(timeout, wait).await {
        Ok((status, out, err)) => {
            guard.disarm();
            log_output(name, &out, &err);
            match status {
                Ok(s) if s.success() => HookOutcome::Success,
                Ok(s) => HookOutcome::Failed(match (s.code(), s.signal()) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "unknown status".to_owned(),
                }),
                Err(e) => HookOutcome::Failed(e.to_string()),
            }
        }
        // Dropping the guard kills the hook's process group.
        Err(_) => HookOutcome::TimedOut,
    };
    let elapsed = started.elapsed();
    match &outcome {
        HookOutcome::Success => tracing::info!(hook = name, ?elapsed, "hook succeeded"),
        other => tracing::error!(hook = name, ?elapsed, outcome = ?other, "hook did not succeed"),
    }
    (outcome, elapsed)
}

/// Kills a process group on drop unless disarmed.
struct GroupKill(Option<u32>);

impl GroupKill {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: plain kill(2); the group id is the child's pid because it was started
            // with process_group(0).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut buf).await;
    }
    buf
}

fn log_output(name: &str, out: &[u8], err: &[u8]) {
    for (stream, bytes) in [("stdout", out), ("stderr", err)] {
        for line in String::from_utf8_lossy(bytes).lines().filter(|l| !l.trim().is_empty()).take(200) {
            tracing::info!(hook = name, stream, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn state() -> ClusterState {
        let b = |i: u16| BackendConfig {
            name: format!("n{i}"),
            host: format!("host{i}"),
            port: 5000 + i,
            weight: 1,
            data_directory: Some(format!("/data/{i}").into()),
        };
        ClusterState::new(&[b(0), b(1), b(2)])
    }

    #[test]
    fn placeholders_follow_pgpool() {
        let nodes = HookNodes { node: 0, new_main: Some(2), old_main: Some(0), old_primary: Some(0) };
        let got = expand("%d %h %p %D %m %H %M %P %r %R %N %S %% %x", &state(), nodes);
        assert_eq!(got, "0 host0 5000 /data/0 2 host2 0 0 5002 /data/2 host0 5000 % %x");
        let none = HookNodes { node: 1, new_main: None, old_main: None, old_primary: None };
        assert_eq!(expand("%m:%H:%P", &state(), none), "-1::-1");
    }

    #[tokio::test]
    async fn failing_and_hanging_hooks_are_reported() {
        let (ok, _) = run("t", "echo hello", Duration::from_secs(5)).await;
        assert_eq!(ok, HookOutcome::Success);
        let (failed, _) = run("t", "exit 3", Duration::from_secs(5)).await;
        assert_eq!(failed, HookOutcome::Failed("exit status 3".into()));
        // A hook whose child keeps the pipes open is still cut off at the deadline.
        let (hung, took) = run("t", "sleep 30 & sleep 30", Duration::from_millis(300)).await;
        assert_eq!(hung, HookOutcome::TimedOut);
        assert!(took < Duration::from_secs(10));
    }
}
