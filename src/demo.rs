//! `pglifeguard demo`: a local primary and streaming standbys from the installed PostgreSQL
//! binaries, plus the proxy in front of them, all removed again on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Signals;
use crate::config::Config;
use crate::localcluster::{ClusterOptions, LocalCluster};
use crate::server::Proxy;

/// Demo user and password written to the demo's auth file.
pub const DEMO_USER: &str = "postgres";
/// Password of [`DEMO_USER`].
pub const DEMO_PASSWORD: &str = "postgres";

/// A demo cluster with its proxy config written next to it.
pub struct DemoSetup {
    /// The PostgreSQL servers; dropping it stops them and removes the directory.
    pub cluster: LocalCluster,
    /// The proxy's config file, inside the cluster directory.
    pub config_path: PathBuf,
}

/// Starts the servers and writes the proxy config, users file and failover hooks.
/// Must run on the main thread (the servers are tied to it).
pub fn prepare(port: u16, standbys: usize, synchronous: bool) -> Result<DemoSetup, String> {
    let cluster = LocalCluster::start(&ClusterOptions { standbys, synchronous, ..Default::default() })
        .map_err(|e| format!("cannot start the demo cluster: {e}"))?;
    let dir = cluster.dir().to_owned();
    let hooks = dir.join("hooks");
    let pg_bin = crate::localcluster::pg_bin("pg_ctl")
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_default();
    let write = || -> std::io::Result<()> {
        std::fs::write(dir.join("userlist.txt"), format!("\"{DEMO_USER}\" \"{DEMO_PASSWORD}\"\n"))?;
        std::fs::create_dir_all(&hooks)?;
        for (name, text) in [("failover.sh", FAILOVER_HOOK), ("follow_primary.sh", FOLLOW_PRIMARY_HOOK)] {
            let path = hooks.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        std::fs::write(dir.join("pglifeguard.yaml"), demo_config(port, &cluster, &hooks, &pg_bin))
    };
    write().map_err(|e| format!("cannot write the demo config: {e}"))?;
    Ok(DemoSetup { config_path: dir.join("pglifeguard.yaml"), cluster })
}

/// The example hooks shipped in `conf/hooks/`, used by the demo as they are.
const FAILOVER_HOOK: &str = include_str!("../conf/hooks/failover.sh");
const FOLLOW_PRIMARY_HOOK: &str = include_str!("../conf/hooks/follow_primary.sh");

/// Runs the demo until Ctrl-C; with `peers` > 1, that many proxies with a watchdog.
pub fn run(port: u16, standbys: usize, peers: usize) -> ExitCode {
    // The runtime and the signal handlers come first: a Ctrl-C while the servers are being
    // created must not kill the process before it has removed them and their directory.
    // The demo's config leaves `worker_threads` at its default.
    let (rt, mut signals) = match crate::cli::runtime_with_signals(crate::config::DEFAULT_WORKER_THREADS) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let plural = if standbys == 1 { "" } else { "s" };
    eprintln!("starting a PostgreSQL primary and {standbys} streaming standby{plural}...");
    let setup = prepare(port, standbys, false);
    // In a terminal, Ctrl-C also reaches initdb and the servers, so setup may have failed
    // because of it: report the interruption, not the failure it caused.
    if rt.block_on(signals.stop_received(Duration::from_millis(100))) {
        if let Ok(s) = &setup {
            eprintln!("interrupted; stopping PostgreSQL servers and removing {}", s.cluster.dir().display());
        } else {
            eprintln!("interrupted");
        }
        drop(setup);
        return ExitCode::FAILURE;
    }
    let DemoSetup { cluster, config_path } = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = cluster.dir().to_owned();
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo config is invalid: {e}");
            return ExitCode::FAILURE;
        }
    };
    if peers > 1 {
        let code = rt.block_on(run_peers(port, peers, &cluster, config_path.clone(), signals));
        drop(rt);
        eprintln!("stopping PostgreSQL servers and removing {}", dir.display());
        drop(cluster);
        return code;
    }
    let code = rt.block_on(async {
        let proxy = match Proxy::start(config, Some(config_path.clone())).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if !proxy.wait_for_primary(Duration::from_secs(30)).await {
            eprintln!("the proxy found no primary; see the logs above");
        }
        print_banner(&proxy, &cluster, &config_path);
        crate::cli::serve_until_signal(proxy, signals).await;
        ExitCode::SUCCESS
    });
    drop(rt);
    eprintln!("stopping PostgreSQL servers and removing {}", dir.display());
    drop(cluster);
    code
}

/// Writes one config per peer (next to the single-proxy one) with a `watchdog:` section, starts
/// them all in this process, and serves until SIGINT/SIGTERM.
async fn run_peers(port: u16, peers: usize, cluster: &LocalCluster, base: PathBuf, mut signals: Signals) -> ExitCode {
    let base_text = match std::fs::read_to_string(&base) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", base.display());
            return ExitCode::FAILURE;
        }
    };
    let raft_ports = match (0..peers).map(|_| crate::localcluster::free_port()).collect::<Result<Vec<u16>, _>>() {
        Ok(ports) => ports,
        Err(e) => {
            eprintln!("cannot find free ports for the watchdog peers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut proxies = Vec::new();
    for i in 0..peers {
        let id = i as u64 + 1;
        let listen = if port == 0 { 0 } else { port + i as u16 };
        let others: String = (0..peers)
            .filter(|&j| j != i)
            .map(|j| format!("    - {{ id: {}, addr: \"127.0.0.1:{}\" }}\n", j + 1, raft_ports[j]))
            .collect();
        let text = base_text
            .replace(&format!("listen: 127.0.0.1:{port}\n"), &format!("listen: 127.0.0.1:{listen}\n"))
            .replace("status_file: status\n", &format!("status_file: status{id}\n"))
            + &format!(
                "watchdog:\n  node_id: {id}\n  listen: 127.0.0.1:{}\n  state_dir: watchdog{id}\n  peers:\n{others}",
                raft_ports[i]
            );
        let path = base.with_file_name(format!("pglifeguard-peer{id}.yaml"));
        let started = match std::fs::write(&path, text).map_err(|e| e.to_string()).and_then(|()| Config::load(&path).map_err(|e| e.to_string())) {
            Ok(config) => Proxy::start(config, Some(path.clone())).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match started {
            Ok(p) => proxies.push((id, path, p)),
            Err(e) => {
                eprintln!("cannot start peer {id}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for (_, _, p) in &proxies {
        p.wait_for_primary(Duration::from_secs(30)).await;
    }
    let mut lines = String::new();
    for (id, path, p) in &proxies {
        let admin = p.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        lines.push_str(&format!(
            "    peer {id}: psql \"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{}/postgres\"\n\
             \x20           pglifeguard ctl --admin {admin} watchdog      (config {})\n",
            p.addr.port(),
            path.display()
        ));
    }
    let nodes: String =
        cluster.nodes.iter().map(|n| format!("    {} 127.0.0.1:{}  data {}\n", n.name, n.port, n.data_dir.display())).collect();
    println!(
        "\npglifeguard demo is running with {peers} watchdog peers (no virtual IP on loopback).\n\n\
         PostgreSQL nodes:\n{nodes}\nProxies:\n{lines}\n\
         The leader runs failovers once a majority of the peers sees the primary fail.\n\
         Press Ctrl-C to stop everything and remove the temporary directory.\n"
    );
    signals.stop().await;
    for (_, _, p) in proxies {
        p.shutdown(Duration::from_secs(5)).await;
    }
    ExitCode::SUCCESS
}

fn demo_config(port: u16, cluster: &LocalCluster, hooks: &Path, pg_bin: &str) -> String {
    let backends = cluster.backends_yaml();
    let hooks = hooks.display();
    format!(
        "# Written by `pglifeguard demo`; see conf/pglifeguard.yaml for every setting.\n\
         listen: 127.0.0.1:{port}\n\
         admin_listen: 127.0.0.1:0\n\
         metrics_listen: 127.0.0.1:0\n\
         backends:\n{backends}\
         pool:\n  pool_size: 20\n\
         auth:\n  method: scram-sha-256\n  file: userlist.txt\n\
         health_check:\n  period: 1s\n\
         failover:\n\
         \x20 failover_command: \"PG_BIN={pg_bin} {hooks}/failover.sh %d %h %p %D %m %H %M %P %r %R %N %S\"\n\
         \x20 follow_primary_command: \"PG_BIN={pg_bin} {hooks}/follow_primary.sh %d %h %p %D %m %H %M %P %r %R\"\n\
         \x20 status_file: status\n"
    )
}

fn print_banner(proxy: &Proxy, cluster: &LocalCluster, config_path: &std::path::Path) {
    let port = proxy.addr.port();
    let mut nodes = String::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let role = if i == 0 { "primary" } else { "standby" };
        nodes.push_str(&format!("    {} ({role}) 127.0.0.1:{}  data {}\n", n.name, n.port, n.data_dir.display()));
    }
    let admin = proxy.admin_addr.map(|a| format!("http://{a}/status")).unwrap_or_default();
    let metrics = proxy.metrics_addr.map(|a| format!("http://{a}/metrics")).unwrap_or_default();
    println!(
        "\npglifeguard demo is running.\n\n\
         PostgreSQL nodes:\n{nodes}\n\
         Connect through the proxy (password: {DEMO_PASSWORD}):\n\
         \x20   psql \"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/postgres\"\n\
         \x20   JDBC: jdbc:postgresql://127.0.0.1:{port}/postgres?user={DEMO_USER}&password={DEMO_PASSWORD}\n\
         \x20   PGPASSWORD={DEMO_PASSWORD} pgbench -h 127.0.0.1 -p {port} -U {DEMO_USER} -i postgres\n\
         \x20   PGPASSWORD={DEMO_PASSWORD} pgbench -h 127.0.0.1 -p {port} -U {DEMO_USER} -c 8 -T 10 -S postgres\n\n\
         Status:  {admin}\nMetrics: {metrics}\nConfig:  {}\n\n\
         Press Ctrl-C to stop everything and remove the temporary directory.\n",
        config_path.display()
    );
}
