//! Shared setup: a throwaway cluster, a proxy in front of it, and client helpers.

use std::path::PathBuf;
use std::time::Duration;

use pglifeguard::config::Config;
use pglifeguard::localcluster::{ClusterOptions, LocalCluster};
use pglifeguard::server::Proxy;
use tokio_postgres::{Client, NoTls};

/// A cluster plus a proxy in front of it. Dropping it stops both.
pub struct Env {
    pub cluster: LocalCluster,
    pub proxy: Proxy,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Knobs for [`Env::start`].
#[derive(Default)]
pub struct Setup {
    pub cluster: ClusterOptions,
    /// Extra YAML appended under `pool:`.
    pub pool: &'static str,
    /// `auth:` section body; trust when empty.
    pub auth: String,
    /// Contents of the users file (written next to the config).
    pub users: String,
    /// `failover:` section body; defaults when empty.
    pub failover: String,
}

impl Env {
    /// Starts a second proxy with the same config file (as after a restart of the first).
    pub async fn restart_proxy(&mut self) {
        self.proxy.app.begin_shutdown();
        let config = Config::load(&self.config_path).expect("valid config");
        let replacement = Proxy::start(config, Some(self.config_path.clone())).await.expect("restart proxy");
        let old = std::mem::replace(&mut self.proxy, replacement);
        old.shutdown(Duration::from_secs(5)).await;
    }

    /// Starts a primary-only cluster and a trust-auth proxy.
    pub async fn start_default() -> Env {
        Env::start(Setup::default()).await
    }

    pub async fn start(setup: Setup) -> Env {
        start_suite_watchdog();
        // RUST_LOG=debug shows the proxy's side of a failure next to the test's.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let cluster = LocalCluster::start(&setup.cluster).expect("start cluster");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("pglifeguard.yaml");
        std::fs::write(dir.path().join("users.txt"), &setup.users).expect("write users");
        std::fs::write(&config_path, config_text(&cluster, &setup)).expect("write config");
        let config = Config::load(&config_path).expect("valid config");
        let proxy = Proxy::start(config, Some(config_path.clone())).await.expect("start proxy");
        assert!(proxy.wait_for_primary(Duration::from_secs(30)).await, "proxy found no primary");
        Env { cluster, proxy, config_path, dir }
    }

    pub fn port(&self) -> u16 {
        self.proxy.addr.port()
    }

    /// libpq-style connection string through the proxy.
    pub fn url(&self, user: &str, password: Option<&str>) -> String {
        let pw = password.map(|p| format!(" password={p}")).unwrap_or_default();
        format!("host=127.0.0.1 port={} user={user} dbname=postgres{pw} connect_timeout=10", self.port())
    }

    /// A tokio-postgres client through the proxy as `postgres`.
    pub async fn client(&self) -> Client {
        connect(&self.url("postgres", None)).await.expect("connect through proxy")
    }

    /// psql through the proxy; returns (success, stdout, stderr).
    pub async fn psql(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = tokio::process::Command::new(pg_tool("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .arg("-p")
            .arg(self.port().to_string())
            .args(args)
            .env("PGCONNECT_TIMEOUT", "10");
        let out = cmd.output().await.expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.proxy.app.begin_shutdown();
    }
}

fn config_text(cluster: &LocalCluster, setup: &Setup) -> String {
    let backends = cluster.backends_yaml();
    let auth = if setup.auth.is_empty() { "  method: trust\n".to_owned() } else { setup.auth.clone() };
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\n\
         backends:\n{backends}\
         pool:\n{}\
         auth:\n{auth}\
         health_check:\n  period: 500ms\n  timeout: 5s\n\
         failover:\n  status_file: status\n{}",
        if setup.pool.contains("checkout_timeout") { setup.pool.to_owned() } else { format!("  checkout_timeout: 60s\n{}", setup.pool) },
        setup.failover
    )
}

/// How long the whole integration suite may run (it takes a few minutes) before the process
/// is ended.
const SUITE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Ends the test process once the suite has run for [`SUITE_LIMIT`]: a test stuck for ever
/// (a lost wake-up in the proxy leaves a client waiting without end) then fails the run with
/// a message, instead of holding CI until its own time limit. Started by the first test that
/// sets up a cluster; the servers of every test die with the process (their spawner asks for
/// a death signal).
pub fn start_suite_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(SUITE_LIMIT);
            eprintln!("integration suite still running after {SUITE_LIMIT:?}: a test is stuck; aborting the run");
            std::process::abort();
        });
    });
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Path of a PostgreSQL client tool from the same installation as the servers.
pub fn pg_tool(name: &str) -> PathBuf {
    pglifeguard::localcluster::pg_bin(name).expect("PostgreSQL binaries (set PG_BIN or apt-get install postgresql)")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fetches an HTTP path from a proxy endpoint.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
