//! pgbench through the proxy in all three protocol modes.

use crate::common::{pg_tool, Env, Setup};

/// Runs pgbench through the proxy. A run that does not end within two minutes (it takes
/// seconds) fails the test instead of hanging the suite: a session stuck in the proxy
/// keeps pgbench waiting for ever.
async fn pgbench(env: &Env, args: &[&str]) -> String {
    let run = tokio::process::Command::new(pg_tool("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(env.port().to_string())
        .args(args)
        .arg("postgres")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("pgbench {args:?} still running after 120 s: a session is stuck in the proxy"))
        .expect("run pgbench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_prepared() {
    let env = Env::start(Setup { pool: "  pool_size: 8\n", ..Setup::default() }).await;
    pgbench(&env, &["-i", "-s", "1", "-q"]).await;
    for mode in ["simple", "extended", "prepared"] {
        let report = pgbench(&env, &["-n", "-M", mode, "-c", "4", "-j", "2", "-T", "3"]).await;
        assert!(report.contains("number of failed transactions: 0 "), "{mode}: {report}");
        assert!(processed(&report) > 100, "{mode}: too few transactions: {report}");
    }
    // Every session returned its backend clean.
    let pool = &env.proxy.app.pools.all()[0];
    let released = crate::common::wait_until(std::time::Duration::from_secs(5), || async { pool.in_use() == 0 }).await;
    assert!(released, "{} backends still lent after pgbench left", pool.in_use());
}
