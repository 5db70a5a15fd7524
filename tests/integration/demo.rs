//! `pglifeguard demo`: what it leaves behind when stopped.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::wait_until;

/// Processes whose command line mentions `dir` (the demo's PostgreSQL servers run with their
/// data directories under it).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmd| cmd.contains(&needle))
        .collect()
}

/// A Ctrl-C while the demo is still creating its cluster (initdb, base backups) used to end the
/// process at once, leaving the servers' directories behind. Now the signal is noted, setup is
/// finished or fails, and everything it created is stopped and removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_demo_setup_removes_what_it_started() {
    // The demo's own temporary directory, so what it leaves is easy to see; reachable by the
    // `postgres` user when the tests run as root.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"));
    cmd.args(["--log", "warn", "demo", "--port", "0", "--standbys", "1"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: signal(2) is async-signal-safe. A terminal's Ctrl-C reaches a process whose
    // SIGINT has its default action; the test runner may have started us with it ignored.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start demo");
    let started = wait_until(Duration::from_secs(60), || async {
        std::fs::read_dir(tmp.path()).map(|mut d| d.next().is_some()).unwrap_or(false)
    })
    .await;
    assert!(started, "the demo created nothing in {}", tmp.path().display());
    // SAFETY: plain kill(2) of the demo process this test started.
    unsafe {
        libc::kill(child.id().expect("pid") as i32, libc::SIGINT);
    }
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await.expect("demo exits").expect("wait");
    assert_eq!(status.code(), Some(1), "interrupted setup exits with a failure status, not killed by the signal: {status:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("read tmp").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
    let gone = wait_until(Duration::from_secs(10), || async { processes_under(tmp.path()).is_empty() }).await;
    assert!(gone, "servers still running: {:?}", processes_under(tmp.path()));
}
