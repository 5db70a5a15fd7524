//! `pglifeguard drill`: a failover drill. By default it starts the demo cluster (synchronous
//! replication) and kills its primary the way `pg_ctl stop -m immediate` does; with a config
//! it drills that cluster, stopping the primary with the operator's command. Either way it
//! runs the proxy, write load and idle sessions through it, and reports how long detection,
//! the failover hook, the switch and the first successful write took, what clients saw, and
//! whether any acknowledged commit is missing on the new primary.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::BackendCredential;
use crate::backend::{BackendConn, ConnectSpec};
use crate::cli::Signals;
use crate::cluster::NodeStatus;
use crate::config::Config;
use crate::demo::{self, DemoSetup, DEMO_PASSWORD, DEMO_USER};
use crate::server::Proxy;

const WRITERS: usize = 4;
const IDLE_SESSIONS: usize = 10;

/// What one drill measured.
#[derive(Debug, Default)]
pub struct DrillReport {
    /// Kill until the proxy marked the primary down.
    pub detected: Option<Duration>,
    /// How long `failover_command` ran.
    pub hook: Option<Duration>,
    /// Kill until sessions were routed to the new primary (the hook has finished by then).
    pub switched: Option<Duration>,
    /// Kill until the first write the new primary acknowledged through the proxy.
    pub first_write: Option<Duration>,
    /// Writes that failed (in flight at the kill, or refused while no primary was known).
    pub write_errors: usize,
    /// Acknowledged writes.
    pub acknowledged: usize,
    /// Acknowledged writes missing on the new primary.
    pub missing: usize,
    /// Idle sessions whose next statement after the failover succeeded.
    pub idle_survived: usize,
    /// Idle sessions in the drill.
    pub idle_total: usize,
}

/// Drills an existing cluster described by a config file.
#[derive(Debug)]
pub struct Existing {
    /// The proxy config (backends, hooks, health checks).
    pub config: std::path::PathBuf,
    /// Shell command that stops the primary.
    pub kill_command: String,
    /// User the drill connects as.
    pub user: String,
    /// Its password, if the proxy asks for one.
    pub password: Option<String>,
    /// Database for the drill's table.
    pub database: String,
}

/// How the drill reaches the proxy and how it kills the primary.
struct Target {
    user: String,
    password: Option<String>,
    database: String,
    kill: Kill,
}

enum Kill {
    /// SIGQUIT to a postmaster this process started.
    Pid(u32),
    /// The operator's command.
    Command(String),
}

/// Runs a drill against the cluster of `existing.config` and prints its report.
pub fn run_existing(existing: Existing) -> ExitCode {
    // Signals first, so a Ctrl-C stops the drill cleanly instead of killing it; one worker
    // per core.
    let (rt, signals) = match crate::cli::runtime_with_signals(0) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(&existing.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let target = Target {
        user: existing.user,
        password: existing.password,
        database: existing.database,
        kill: Kill::Command(existing.kill_command),
    };
    drill_with(&rt, signals, config, existing.config, target)
}

/// Runs one drill on a throwaway cluster and prints its report.
pub fn run_local(standbys: usize) -> ExitCode {
    // As in run_existing; a Ctrl-C during setup also removes the throwaway cluster.
    let (rt, mut signals) = match crate::cli::runtime_with_signals(0) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("starting a PostgreSQL primary and {standbys} synchronous standbys for the drill...");
    let setup = demo::prepare(0, standbys.max(1), true);
    if rt.block_on(signals.stop_received(Duration::from_millis(100))) {
        eprintln!("interrupted; removing the drill's cluster");
        return ExitCode::FAILURE;
    }
    let DemoSetup { cluster, config_path } = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drill config is invalid: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(victim) = cluster.nodes[0].pid() else {
        eprintln!("the primary is not running");
        return ExitCode::FAILURE;
    };
    let target = Target {
        user: DEMO_USER.to_owned(),
        password: Some(DEMO_PASSWORD.to_owned()),
        database: "postgres".to_owned(),
        kill: Kill::Pid(victim),
    };
    let code = drill_with(&rt, signals, config, config_path, target);
    drop(rt);
    drop(cluster);
    code
}

fn drill_with(rt: &tokio::runtime::Runtime, mut signals: Signals, config: Config, config_path: std::path::PathBuf, target: Target) -> ExitCode {
    // Session pooling: every drill session holds a backend of its own.
    let needed = WRITERS + IDLE_SESSIONS + 2;
    if config.pool.pool_size < needed {
        eprintln!("the drill opens {needed} sessions at once; set pool.pool_size to at least {needed} (it is {})", config.pool.pool_size);
        return ExitCode::FAILURE;
    }
    let result = rt.block_on(async {
        let proxy = Proxy::start(config, Some(config_path)).await.map_err(|e| e.to_string())?;
        let report = tokio::select! {
            r = async {
                if !proxy.wait_for_primary(Duration::from_secs(30)).await {
                    return Err("the proxy found no primary".to_owned());
                }
                drill(&proxy, &target).await
            } => r,
            _ = signals.stop() => Err("interrupted".to_owned()),
        };
        proxy.shutdown(Duration::from_secs(5)).await;
        report
    });
    match result {
        Ok(r) => {
            print_report(&r);
            if r.missing == 0 && r.first_write.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("drill failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where and as whom the drill's clients connect.
#[derive(Clone)]
struct Login {
    addr: SocketAddr,
    user: String,
    password: Option<String>,
    database: String,
}

async fn client(login: &Login) -> Result<BackendConn, String> {
    let mut params = BTreeMap::new();
    params.insert("application_name".to_owned(), "pglifeguard drill".to_owned());
    let spec = ConnectSpec {
        node: 0,
        addr: login.addr.to_string(),
        user: login.user.clone(),
        database: login.database.clone(),
        params: Arc::new(params),
        credential: match &login.password {
            Some(p) => BackendCredential::Password(p.clone()),
            None => BackendCredential::None,
        },
    };
    BackendConn::connect(&spec, 0, Duration::from_secs(10)).await.map_err(|e| e.to_string())
}

/// Acknowledged ids with the time and the server port that acknowledged them, and the number
/// of failed writes, of one writer.
type WriterLog = (Vec<(i64, Instant, u16)>, usize);

async fn writer(login: Login, id: usize, stop: Arc<AtomicBool>) -> WriterLog {
    let mut acked = Vec::new();
    let mut errors = 0;
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = client(&login).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let key = (id as i64) << 40 | n;
            n += 1;
            match c.simple_query(&format!("insert into drill_acked(id) values ({key}) returning inet_server_port()")).await {
                Ok(rows) => {
                    let port = rows.first().and_then(|r| r.first()?.as_deref()?.parse().ok()).unwrap_or(0);
                    acked.push((key, Instant::now(), port));
                }
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
    }
    (acked, errors)
}

async fn drill(proxy: &Proxy, target: &Target) -> Result<DrillReport, String> {
    let login =
        Login { addr: proxy.addr, user: target.user.clone(), password: target.password.clone(), database: target.database.clone() };
    let (old_primary, old_port) = {
        let state = proxy.app.cluster.load();
        let p = state.primary.ok_or("no primary")?;
        (p, state.nodes[p].port)
    };
    let mut setup = client(&login).await?;
    setup
        .simple_query("create table if not exists drill_acked(id bigint primary key, at timestamptz default clock_timestamp())")
        .await
        .map_err(|e| e.to_string())?;
    let mut idle = Vec::new();
    for _ in 0..IDLE_SESSIONS {
        let mut c = client(&login).await?;
        c.simple_query("select 1").await.map_err(|e| e.to_string())?;
        idle.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS).map(|i| tokio::spawn(writer(login.clone(), i + 1, Arc::clone(&stop)))).collect();

    // Watch the proxy's view to time detection and switch.
    let app = Arc::clone(&proxy.app);
    let events: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let watcher = {
        let events = Arc::clone(&events);
        let mut changes = app.cluster_changed.subscribe();
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let state = app.cluster.load();
                let mut e = events.lock().unwrap_or_else(|p| p.into_inner());
                if e.0.is_none() && matches!(state.nodes[old_primary].status, NodeStatus::Down { .. }) {
                    e.0 = Some(Instant::now());
                }
                if e.1.is_none() && state.primary.is_some_and(|p| p != old_primary) {
                    e.1 = Some(Instant::now());
                    return;
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    match &target.kill {
        Kill::Pid(pid) => {
            eprintln!("killing the primary (SIGQUIT, as pg_ctl stop -m immediate)");
            // SAFETY: plain syscall on the PID of a server this process started.
            unsafe {
                libc::kill(*pid as i32, libc::SIGQUIT);
            }
        }
        Kill::Command(cmd) => {
            eprintln!("stopping the primary: {cmd}");
            let status = tokio::process::Command::new("sh").arg("-c").arg(cmd).status().await;
            if !status.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("kill command failed: {status:?}; waiting for the proxy anyway");
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), watcher).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let mut report = DrillReport { idle_total: IDLE_SESSIONS, ..DrillReport::default() };
    let mut acked = HashSet::new();
    for w in writers {
        let (ids, errors) = w.await.map_err(|e| e.to_string())?;
        report.write_errors += errors;
        for (id, at, port) in ids {
            acked.insert(id);
            // The outage ends with the first write the new primary acknowledges.
            if at > killed && port != old_port {
                let since = at - killed;
                report.first_write = Some(report.first_write.map_or(since, |f| f.min(since)));
            }
        }
    }
    report.acknowledged = acked.len();
    {
        let e = events.lock().unwrap_or_else(|p| p.into_inner());
        report.detected = e.0.map(|t| t - killed);
        report.switched = e.1.map(|t| t - killed);
    }
    let hook = proxy.app.metrics.hook_seconds.with_label_values(&["failover_command"]);
    if hook.get_sample_count() > 0 {
        report.hook = Some(Duration::from_secs_f64(hook.get_sample_sum()));
    }
    for mut c in idle {
        if c.simple_query("select 1").await.is_ok() {
            report.idle_survived += 1;
        }
    }
    let mut check = client(&login).await?;
    let rows = check.simple_query("select id from drill_acked").await.map_err(|e| e.to_string())?;
    let present: HashSet<i64> = rows.iter().filter_map(|r| r.first()?.as_deref()?.parse().ok()).collect();
    report.missing = acked.difference(&present).count();
    Ok(report)
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "never".to_owned())
}

fn print_report(r: &DrillReport) {
    println!("\nfailover drill ({WRITERS} writers, {} idle sessions)", r.idle_total);
    println!("  primary marked down after      {}", ms(r.detected));
    println!("  failover_command ran for       {}", ms(r.hook));
    println!("  sessions routed to new primary {}", ms(r.switched));
    println!("  first write acknowledged after {}", ms(r.first_write));
    println!("  failed writes                  {}", r.write_errors);
    println!("  idle sessions that survived    {} of {}", r.idle_survived, r.idle_total);
    println!("  acknowledged writes            {}", r.acknowledged);
    println!("  acknowledged writes missing    {}", r.missing);
}
