//! Failover: health checks notice a dead primary, the hook promotes a standby, routing moves,
//! the other standby follows, idle sessions survive, and two primaries never both get writes.

use std::time::Duration;

use pglifeguard::localcluster::ClusterOptions;

use crate::common::{connect, http_get, pg_tool, wait_until, Env, Setup};

/// pg_ctl as the servers' owner: hooks run as the proxy's user, root in CI.
fn pg_ctl() -> String {
    let bin = pg_tool("pg_ctl").display().to_string();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        format!("runuser -u postgres -- {bin}")
    } else {
        bin
    }
}

/// Hooks like the ones in conf/hooks: promote %m; re-point %d at the new primary.
fn hooks() -> String {
    let ctl = pg_ctl();
    format!(
        "  failover_command: \"{ctl} promote -w -t 60 -D %R\"\n\
         \x20 follow_primary_command: \"echo \\\"primary_conninfo = 'host=%H port=%r user=postgres application_name=follower%d'\\\" >> %D/postgresql.auto.conf && {ctl} reload -D %D\"\n\
         \x20 command_timeout: 60s\n"
    )
}

fn two_standbys(failover: String) -> Setup {
    Setup {
        cluster: ClusterOptions { standbys: 2, synchronous: true, ..Default::default() },
        failover,
        pool: "  pool_size: 10\n",
        ..Setup::default()
    }
}

async fn port_of_session(env: &Env) -> Option<i32> {
    let c = connect(&env.url("postgres", None)).await.ok()?;
    let row = c.query_one("select current_setting('port')::int, pg_is_in_recovery()", &[]).await.ok()?;
    (!row.get::<_, bool>(1)).then(|| row.get(0))
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load_writes_resume_and_standby_follows() {
    let mut env = Env::start(two_standbys(hooks())).await;
    let setup = env.client().await;
    setup.batch_execute("create table acked(id int primary key)").await.expect("create");
    drop(setup);

    // Write load: every acknowledged insert is remembered.
    let url = env.url("postgres", None);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut next = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(c) = connect(&url).await {
                    while c.execute("insert into acked values ($1)", &[&next]).await.is_ok() {
                        acked.push(next);
                        next += 1;
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                    }
                    next += 1; // the failed insert's id may or may not exist: never reuse it
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    let idle = env.client().await;
    let stmt = idle.prepare("select $1::int + 1").await.expect("prepare before failover");
    idle.batch_execute("set timezone = 'Asia/Tokyo'").await.expect("set");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old_port = env.cluster.nodes[0].port as i32;
    env.cluster.node_mut(0).stop_immediate();
    let moved = wait_until(Duration::from_secs(30), || async {
        port_of_session(&env).await.is_some_and(|p| p != old_port)
    })
    .await;
    assert!(moved, "writes never moved to a promoted standby");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    assert!(acked.len() > 10, "the writer made progress");

    // The idle session kept its connection, its prepared statement and its settings.
    let v: i32 = idle.query_one(&stmt, &[&41]).await.expect("prepared statement after failover").get(0);
    assert_eq!(v, 42);
    let tz: String = idle.query_one("show timezone", &[]).await.expect("show").get(0);
    assert_eq!(tz, "Asia/Tokyo");

    // Synchronous replication: every acknowledged insert is on the new primary.
    let c = env.client().await;
    let present: i64 = c
        .query_one("select count(*) from acked where id = any($1)", &[&acked])
        .await
        .expect("count")
        .get(0);
    assert_eq!(present as usize, acked.len(), "acknowledged commits lost");

    // The hooks ran once each, and the other standby follows the new primary.
    let metrics = http_get(env.proxy.metrics_addr.expect("metrics"), "/metrics").await;
    assert_eq!(metric(&metrics, "pglifeguard_hook_runs_total{hook=\"failover_command\",outcome=\"success\"}"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "pglifeguard_hook_runs_total{hook=\"follow_primary_command\",outcome=\"success\"}"), 1.0, "{metrics}");
    let new_port = port_of_session(&env).await.expect("primary");
    let follower = env.cluster.nodes.iter().position(|n| n.port as i32 != new_port && n.port as i32 != old_port).expect("other standby");
    c.batch_execute("create table after_failover(v int); insert into after_failover values (7)").await.expect("write");
    let node = &env.cluster.nodes[follower];
    let followed = wait_until(Duration::from_secs(30), || async {
        node.psql("select v from after_failover").map(|o| o.trim() == "7").unwrap_or(false)
    })
    .await;
    assert!(followed, "the remaining standby did not follow the new primary");

    // The old primary, restarted as it was (a primary on the old timeline), gets nothing.
    env.cluster.node_mut(0).start().expect("restart old primary");
    let status_url = env.proxy.admin_addr.expect("admin");
    let seen = wait_until(Duration::from_secs(10), || async {
        http_get(status_url, "/status").await.lines().any(|l| l.contains("node0") && l.contains("down"))
    })
    .await;
    assert!(seen, "old primary must stay down");
    for _ in 0..5 {
        assert_eq!(port_of_session(&env).await, Some(new_port), "sessions stay on the new primary");
    }

    // A restarted proxy keeps the state: node1 primary, node0 down, although node0 also
    // claims to be primary.
    env.restart_proxy().await;
    assert!(env.proxy.wait_for_primary(Duration::from_secs(10)).await);
    assert_eq!(port_of_session(&env).await, Some(new_port));
    let status = http_get(env.proxy.admin_addr.expect("admin"), "/status").await;
    assert!(status.lines().any(|l| l.contains("node0") && l.contains("down")), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_inside_a_transaction_get_an_error() {
    let mut env = Env::start(two_standbys(hooks())).await;
    let in_tx = env.client().await;
    in_tx.batch_execute("begin; select 1").await.expect("begin");
    env.cluster.node_mut(0).stop_immediate();
    let err = in_tx.batch_execute("select 2").await.expect_err("transaction cannot survive");
    let code = err.code().cloned();
    assert!(
        err.is_closed() || matches!(code, Some(ref c) if c.code() == "08006" || c.code() == "57P01"),
        "unexpected error {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_hook_is_killed_and_a_failing_hook_is_reported() {
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let failover = format!(
        "  failover_command: \"if [ %d = 0 ]; then sleep 60; else echo ran >> {} ; exit 3; fi\"\n  command_timeout: 500ms\n",
        marker.path().display()
    );
    let mut env = Env::start(two_standbys(failover)).await;
    // Standby failure: its hook fails; the node is down and service goes on.
    env.cluster.node_mut(2).stop_immediate();
    let status_url = env.proxy.admin_addr.expect("admin");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            http_get(status_url, "/status").await.lines().any(|l| l.contains("node2") && l.contains("down"))
        })
        .await
    );
    assert!(wait_until(Duration::from_secs(10), || async { std::fs::read_to_string(marker.path()).unwrap_or_default().contains("ran") }).await);
    let c = env.client().await;
    c.batch_execute("create table t(v int)").await.expect("primary unaffected by a standby failure");
    drop(c);

    // Primary failure with a hook that hangs: killed at the deadline; an operator's promotion
    // is then found by the primary search.
    env.cluster.wait_replayed().expect("replayed");
    env.cluster.node_mut(0).stop_immediate();
    let metrics_url = env.proxy.metrics_addr.expect("metrics");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            metric(&http_get(metrics_url, "/metrics").await, "pglifeguard_hook_runs_total{hook=\"failover_command\",outcome=\"timeout\"}") == 1.0
        })
        .await,
        "hanging hook not cut off"
    );
    env.cluster.nodes[1].promote().expect("promote");
    let node1 = env.cluster.nodes[1].port as i32;
    assert!(wait_until(Duration::from_secs(30), || async { port_of_session(&env).await == Some(node1) }).await);
    let metrics = http_get(metrics_url, "/metrics").await;
    assert_eq!(metric(&metrics, "pglifeguard_hook_runs_total{hook=\"failover_command\",outcome=\"failed\"}"), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_are_resolved_to_the_recorded_one() {
    let fenced = tempfile::NamedTempFile::new().expect("fence marker");
    let failover = format!("  fence_command: \"echo %d >> {}\"\n", fenced.path().display());
    let env = Env::start(Setup {
        cluster: ClusterOptions { standbys: 1, ..Default::default() },
        failover,
        ..Setup::default()
    })
    .await;
    let primary = env.cluster.nodes[0].port as i32;
    // Someone promotes the standby behind the proxy's back: two nodes accept writes.
    env.cluster.nodes[1].promote().expect("promote");
    let status_url = env.proxy.admin_addr.expect("admin");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            http_get(status_url, "/status").await.lines().any(|l| l.contains("node1") && l.contains("down"))
        })
        .await,
        "the second primary was not taken out of service"
    );
    // The node is taken out of service first, then fenced.
    let fence_ran = wait_until(Duration::from_secs(10), || async {
        !std::fs::read_to_string(fenced.path()).unwrap_or_default().trim().is_empty()
    })
    .await;
    assert!(fence_ran, "fence hook did not run");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(std::fs::read_to_string(fenced.path()).expect("fence ran").trim(), "1", "fence hook ran once, for node 1");
    for _ in 0..5 {
        assert_eq!(port_of_session(&env).await, Some(primary), "writes stay on the recorded primary");
    }
}

async fn ctl(env: &Env, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"))
        .arg("ctl")
        .arg("--admin")
        .arg(env.proxy.admin_addr.expect("admin").to_string())
        .args(args)
        .output()
        .await
        .expect("run ctl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_detaches_and_attaches_a_standby() {
    let env = Env::start(Setup { cluster: ClusterOptions { standbys: 1, ..Default::default() }, ..Setup::default() }).await;
    let (ok, out) = ctl(&env, &["detach", "1"]).await;
    assert!(ok, "{out}");
    let (_, status) = ctl(&env, &["status"]).await;
    assert!(status.lines().any(|l| l.contains("node1") && l.contains("down") && l.contains("detached")), "{status}");
    // Detached means detached: health checks that succeed do not bring it back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, status) = ctl(&env, &["status"]).await;
    assert!(status.lines().any(|l| l.contains("node1") && l.contains("down")), "{status}");
    let (ok, out) = ctl(&env, &["attach", "1"]).await;
    assert!(ok, "{out}");
    let (_, status) = ctl(&env, &["status"]).await;
    assert!(status.lines().any(|l| l.contains("node1") && l.contains("standby")), "{status}");
    let (ok, _) = ctl(&env, &["detach", "9"]).await;
    assert!(!ok, "unknown node refused");
}

/// A drill report with every phase timed (the hook's included), every idle session alive and
/// no acknowledged write missing.
fn assert_clean_drill(out: &std::process::Output) {
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drill failed:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("idle sessions that survived    10 of 10"), "{report}");
    assert!(report.contains("acknowledged writes missing    0"), "{report}");
    assert!(!report.contains("never"), "every phase completed, the hook included: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_command_reports_a_clean_failover() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"))
        .args(["drill", "--standbys", "2"])
        .output()
        .await
        .expect("run drill");
    assert_clean_drill(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pool_nodes_on_the_console_database() {
    let env = Env::start(Setup { cluster: ClusterOptions { standbys: 1, ..Default::default() }, ..Setup::default() }).await;
    let mut cmd = tokio::process::Command::new(pg_tool("psql"));
    cmd.args(["-X", "-A", "-F", "|", "-h", "127.0.0.1", "-U", "postgres", "-d", "pglifeguard", "-c", "show pool_nodes"])
        .arg("-p")
        .arg(env.port().to_string());
    let out = cmd.output().await.expect("psql");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("node_id|hostname|port|status|pg_status|lb_weight|role|pg_role|select_cnt|load_balance_node|replication_delay|replication_state|replication_sync_state|last_status_change")
    );
    let rows: Vec<Vec<&str>> = lines.take(2).map(|l| l.split('|').collect()).collect();
    assert_eq!(rows[0][0], "0");
    assert_eq!(rows[0][2], env.cluster.nodes[0].port.to_string());
    assert_eq!((rows[0][3], rows[0][6], rows[0][9]), ("up", "primary", "true"));
    assert_eq!((rows[1][3], rows[1][6], rows[1][9]), ("up", "standby", "false"));
    // Unknown commands are errors, and the console stays usable.
    let out = tokio::process::Command::new(pg_tool("psql"))
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres", "-d", "pglifeguard", "-c", "drop table x", "-c", "show version"])
        .arg("-p")
        .arg(env.port().to_string())
        .output()
        .await
        .expect("psql");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown console command"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_promotes_a_standby() {
    let fenced = tempfile::NamedTempFile::new().expect("fence marker");
    let failover = format!("{}  fence_command: \"echo %d >> {}\"\n", hooks(), fenced.path().display());
    let env = Env::start(two_standbys(failover)).await;
    let (ok, out) = ctl(&env, &["promote", "2"]).await;
    assert!(ok, "{out}");
    let node2 = env.cluster.nodes[2].port as i32;
    assert_eq!(port_of_session(&env).await, Some(node2), "sessions go to the promoted node");
    // The old primary still runs and still accepts writes on its own: it is fenced, not used.
    assert!(
        wait_until(Duration::from_secs(10), || async { std::fs::read_to_string(fenced.path()).unwrap_or_default().trim() == "0" }).await,
        "old primary fenced"
    );
    let (_, status) = ctl(&env, &["status"]).await;
    assert!(status.lines().any(|l| l.contains("node0") && l.contains("down")), "{status}");
    assert!(status.lines().any(|l| l.contains("node1") && l.contains("standby")), "{status}");
}

/// The example hooks from conf/hooks, as an operator would configure them.
fn example_hooks() -> String {
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/hooks");
    let bin = pg_tool("pg_ctl").parent().expect("bin dir").display().to_string();
    format!(
        "  failover_command: \"PG_BIN={bin} {hooks}/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S\"\n\
         \x20 follow_primary_command: \"PG_BIN={bin} {hooks}/follow_primary.sh %d %h %p %D %m %H %M %P %r %R\"\n\
         \x20 command_timeout: 120s\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_no_session_and_no_commit() {
    let env = Env::start(two_standbys(example_hooks())).await;
    let setup = env.client().await;
    setup.batch_execute("create table acked(id int primary key)").await.expect("create");
    drop(setup);

    // One writer session that must never see an error, and one idle session with a
    // prepared statement and a setting.
    let writer_client = env.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, progress) = (stop.clone(), progress.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut next = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer_client.execute("insert into acked values ($1)", &[&next]).await.map_err(|e| (e, acked.len()))?;
                acked.push(next);
                next += 1;
                progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, (tokio_postgres::Error, usize)>(acked)
        })
    };
    let idle = env.client().await;
    let stmt = idle.prepare("select $1::int + 1").await.expect("prepare");
    idle.batch_execute("set timezone = 'Asia/Tokyo'").await.expect("set");
    let writes = || progress.load(std::sync::atomic::Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || async { writes() >= 20 }).await, "writer made no progress");

    let (ok, out) = ctl(&env, &["switchover", "1"]).await;
    assert!(ok, "switchover failed: {out}");
    assert!(out.contains("switched over from node0 to node1") && out.contains("node0 is a standby now"), "{out}");
    let after = writes();
    assert!(wait_until(Duration::from_secs(10), || async { writes() >= after + 20 }).await, "writes did not resume");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = match writer.await.expect("writer task") {
        Ok(acked) => acked,
        Err((e, n)) => panic!("the writer got an error after {n} writes: {e:?}"),
    };

    // Sessions moved: writes and the idle session now run on node1, with their state.
    let node1 = env.cluster.nodes[1].port as i32;
    assert_eq!(port_of_session(&env).await, Some(node1));
    let v: i32 = idle.query_one(&stmt, &[&41]).await.expect("prepared statement after switchover").get(0);
    assert_eq!(v, 42);
    let row = idle.query_one("select current_setting('timezone'), current_setting('port')::int", &[]).await.expect("query");
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("Asia/Tokyo".to_owned(), node1));

    // Every acknowledged write is on the new primary, and the old primary is its standby.
    let c = env.client().await;
    let present: i64 =
        c.query_one("select count(*) from acked where id = any($1)", &[&acked]).await.expect("count").get(0);
    assert_eq!(present as usize, acked.len(), "acknowledged commits lost");
    c.batch_execute("create table after_switchover(v int); insert into after_switchover values (7)").await.expect("write");
    for follower in [0, 2] {
        let node = &env.cluster.nodes[follower];
        let followed = wait_until(Duration::from_secs(30), || async {
            node.psql("select v from after_switchover").map(|o| o.trim() == "7").unwrap_or(false)
        })
        .await;
        assert!(followed, "node{follower} does not follow the new primary");
        assert_eq!(node.psql("select pg_is_in_recovery()").expect("psql").trim(), "t", "node{follower} is a standby");
    }
    let (_, status) = ctl(&env, &["status"]).await;
    for (name, role) in [("node0", "standby"), ("node1", "primary"), ("node2", "standby")] {
        assert!(status.lines().any(|l| l.contains(name) && l.contains(role)), "{name} {role}: {status}");
    }
    let metrics = http_get(env.proxy.metrics_addr.expect("metrics"), "/metrics").await;
    assert_eq!(metric(&metrics, "pglifeguard_switchovers_total{outcome=\"done\"}"), 1.0, "{metrics}");

    // A switchover to a node that is not a standby is refused and changes nothing.
    let (ok, out) = ctl(&env, &["switchover", "1"]).await;
    assert!(!ok && out.contains("not an in-service standby"), "{out}");
    assert_eq!(port_of_session(&env).await, Some(node1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failback_brings_back_a_standby_that_streams_again() {
    let mut env = Env::start(Setup {
        cluster: ClusterOptions { standbys: 1, ..Default::default() },
        failover: "  auto_failback: true\n".to_owned(),
        ..Setup::default()
    })
    .await;
    let admin = env.proxy.admin_addr.expect("admin");
    let node1_is = |state: &'static str| async move {
        http_get(admin, "/status").await.lines().any(|l| l.contains("node1") && l.contains(state))
    };
    env.cluster.node_mut(1).stop_immediate();
    assert!(wait_until(Duration::from_secs(20), || node1_is("down")).await, "stopped standby not marked down");
    env.cluster.node_mut(1).start().expect("restart standby");
    assert!(wait_until(Duration::from_secs(30), || node1_is("standby")).await, "streaming standby not brought back");

    // A standby an operator detached stays out even though it streams.
    let (ok, out) = ctl(&env, &["detach", "1"]).await;
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(node1_is("down").await, "detached standby came back by itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_against_an_existing_cluster_from_its_config() {
    let env = Env::start(Setup { pool: "  pool_size: 20\n", ..two_standbys(example_hooks()) }).await;
    // The drill runs its own proxy on this config; this one must not fail over too.
    env.proxy.app.begin_shutdown();
    let pid = env.cluster.nodes[0].pid().expect("primary runs");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"))
        .arg("drill")
        .arg("--config")
        .arg(&env.config_path)
        .args(["--kill-command", &format!("kill -QUIT {pid}")])
        .output()
        .await
        .expect("run drill");
    assert_clean_drill(&out);
}
