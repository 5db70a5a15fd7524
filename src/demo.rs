//! `pglifeguard demo`: a local primary and streaming standbys from the installed PostgreSQL
//! binaries, plus the proxy in front of them, all removed again on Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::localcluster::{ClusterOptions, LocalCluster};
use crate::server::Proxy;

/// Demo user and password written to the demo's auth file.
pub const DEMO_USER: &str = "postgres";
/// Password of [`DEMO_USER`].
pub const DEMO_PASSWORD: &str = "postgres";

/// Runs the demo until Ctrl-C.
pub fn run(port: u16, standbys: usize) -> ExitCode {
    eprintln!("starting a PostgreSQL primary and {standbys} streaming standbys...");
    // The cluster is created on this (the main) thread: its servers are tied to it and are
    // stopped when it is dropped at the end of this function.
    let cluster = match LocalCluster::start(&ClusterOptions { standbys, ..Default::default() }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the demo cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = cluster.dir().to_owned();
    let users = dir.join("userlist.txt");
    let config_path = dir.join("pglifeguard.yaml");
    let config_text = demo_config(port, &cluster);
    if let Err(e) = std::fs::write(&users, format!("\"{DEMO_USER}\" \"{DEMO_PASSWORD}\"\n"))
        .and_then(|_| std::fs::write(&config_path, &config_text))
    {
        eprintln!("cannot write the demo config: {e}");
        return ExitCode::FAILURE;
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo config is invalid: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match crate::cli::runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        crate::cli::serve_until_signal(proxy).await;
        ExitCode::SUCCESS
    });
    drop(rt);
    eprintln!("stopping PostgreSQL servers and removing {}", dir.display());
    drop(cluster);
    code
}

fn demo_config(port: u16, cluster: &LocalCluster) -> String {
    let mut backends = String::new();
    for node in &cluster.nodes {
        backends.push_str(&format!(
            "  - name: {}\n    host: 127.0.0.1\n    port: {}\n    data_directory: {}\n",
            node.name,
            node.port,
            node.data_dir.display()
        ));
    }
    format!(
        "# Written by `pglifeguard demo`; see conf/pglifeguard.yaml for every setting.\n\
         listen: 127.0.0.1:{port}\n\
         admin_listen: 127.0.0.1:0\n\
         metrics_listen: 127.0.0.1:0\n\
         backends:\n{backends}\
         pool:\n  pool_size: 20\n\
         auth:\n  method: scram-sha-256\n  file: userlist.txt\n\
         health_check:\n  period: 1s\n"
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
