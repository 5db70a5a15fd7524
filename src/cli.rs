//! Command-line interface: `run`, `check-config`, `demo`, `drill`, `ctl`, `witness` and `passwd`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::server::Proxy;

/// pglifeguard: a PostgreSQL proxy for streaming-replication clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), overridden by RUST_LOG.
    #[arg(long, global = true, default_value = "info,openraft=warn")]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy against an existing cluster.
    Run {
        /// YAML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file; exits non-zero with the reason when it is invalid.
    CheckConfig {
        /// YAML config file.
        file: PathBuf,
    },
    /// Start a local primary and two streaming standbys plus the proxy, for trying it out.
    Demo {
        /// Port for the proxy on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Number of standbys.
        #[arg(long, default_value_t = 2)]
        standbys: usize,
        /// Run this many proxies (2 or more) with a watchdog among them, on consecutive ports.
        #[arg(long, default_value_t = 1)]
        peers: usize,
    },
    /// Failover drill: write load and idle sessions through the proxy, kill the primary,
    /// report timings, client errors and lost commits. By default on a throwaway cluster;
    /// with `--config`, against the cluster that config describes.
    Drill {
        /// Number of standbys of the throwaway cluster (synchronous replication).
        #[arg(long, default_value_t = 2)]
        standbys: usize,
        /// Drill an existing cluster: the proxy runs in this process with this config (give
        /// it a free `listen` port if a proxy already runs with it).
        #[arg(long, requires = "kill_command")]
        config: Option<PathBuf>,
        /// With `--config`: shell command that stops the primary (e.g.
        /// `ssh db1 pg_ctl stop -m immediate -D /var/lib/postgresql/15/main`).
        #[arg(long)]
        kill_command: Option<String>,
        /// With `--config`: user the drill writes as (password from PGPASSWORD).
        #[arg(long, default_value = "postgres")]
        user: String,
        /// With `--config`: database the drill writes in (it creates table `drill_acked`).
        #[arg(long, default_value = "postgres")]
        database: String,
    },
    /// Talk to a running proxy's admin endpoint.
    Ctl {
        /// Admin address (`admin_listen` of the proxy).
        #[arg(long, default_value = "127.0.0.1:9631")]
        admin: String,
        /// `status`, `watchdog`, `attach N`, `detach N`, `promote N` or `switchover N`.
        #[arg(num_args = 1..=2, required = true)]
        command: Vec<String>,
    },
    /// Print an auth-file line for a user: a SCRAM-SHA-256 verifier (or md5 hash).
    Passwd {
        /// User name.
        user: String,
        /// Password (read from stdin when omitted).
        password: Option<String>,
        /// Print an md5 hash instead of a SCRAM verifier.
        #[arg(long)]
        md5: bool,
    },
    /// Run a watchdog witness: a voter without a proxy, the third vote of a two-proxy
    /// deployment (instead of pgpool's half-vote setting). The config file holds a
    /// `watchdog:` section like a proxy's.
    Witness {
        /// YAML file with a `watchdog:` section.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// The VIP guardian, started by the proxy itself (see `watchdog.vip`).
    #[command(hide = true)]
    VipGuardian {
        /// Guardian arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::VipGuardian { args } = cli.command {
        // stdout is the guardian's channel to the proxy: logs go to stderr.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()))
            .with_target(false)
            .try_init();
        return crate::vip::guardian_main(args);
    }
    init_logging(&cli.log);
    match cli.command {
        Command::VipGuardian { .. } => ExitCode::FAILURE,
        Command::Witness { config } => witness(&config),
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Demo { port, standbys, peers } => crate::demo::run(port, standbys, peers),
        Command::Passwd { user, password, md5 } => passwd(&user, password, md5),
        Command::Ctl { admin, command } => ctl(&admin, &command),
        Command::Drill { standbys, config: None, .. } => crate::drill::run_local(standbys),
        Command::Drill { config: Some(config), kill_command, user, database, .. } => {
            crate::drill::run_existing(crate::drill::Existing {
                config,
                kill_command: kill_command.unwrap_or_default(),
                user,
                password: std::env::var("PGPASSWORD").ok(),
                database,
            })
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file).map_err(|e| e.to_string()).and_then(|c| {
        match &c.auth.file {
            Some(f) => crate::auth::UserList::load(f).map(|u| (c.backends.len(), u.len())).map_err(|e| e.to_string()),
            None => Ok((c.backends.len(), 0)),
        }
    }) {
        Ok((backends, users)) => {
            println!("{}: ok ({backends} backends, {users} users)", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

/// Builds the runtime the proxy runs on: single-threaded for `worker_threads: 1`, else a
/// multi-threaded one (`0` = one worker per core).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().thread_name("pglifeguard").build()
}

/// [`runtime`] with [`Signals`] installed in it, for a command that must not be killed by
/// a signal before it has cleaned up what it starts. The error is the message to print.
pub fn runtime_with_signals(worker_threads: usize) -> Result<(tokio::runtime::Runtime, Signals), String> {
    let rt = runtime(worker_threads).map_err(|e| format!("cannot start runtime: {e}"))?;
    let signals = rt.block_on(async { Signals::install() }).map_err(|e| format!("cannot install signal handlers: {e}"))?;
    Ok((rt, signals))
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let (rt, signals) = match runtime_with_signals(config.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let proxy = match Proxy::start(config, Some(path)).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        serve_until_signal(proxy, signals).await;
        ExitCode::SUCCESS
    })
}

/// SIGHUP, SIGTERM and SIGINT, registered before a command starts anything. From registration
/// on, these signals are recorded instead of ending the process, so one that arrives while the
/// proxy (or the demo's cluster) is still starting is acted on once startup is done, and every
/// cleanup runs; registering only once serving would let an early Ctrl-C kill the process and
/// leave what it started behind.
pub struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. Must be called inside a Tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at SIGINT or SIGTERM, at once for one received since [`Signals::install`].
    pub async fn stop(&mut self) {
        stop_signal(&mut self.terminate, &mut self.interrupt).await
    }

    /// Whether SIGINT or SIGTERM has arrived, giving the runtime `grace` to deliver one that is
    /// already pending (a current-thread runtime only handles signals while it is driven).
    pub async fn stop_received(&mut self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.stop()).await.is_ok()
    }
}

/// What [`Signals::stop`] waits for, over the two fields alone so that a caller can wait for
/// SIGHUP at the same time.
async fn stop_signal(terminate: &mut tokio::signal::unix::Signal, interrupt: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

/// Serves until SIGINT/SIGTERM, reloading the config on SIGHUP.
pub async fn serve_until_signal(proxy: Proxy, signals: Signals) {
    let Signals { mut hangup, mut terminate, mut interrupt } = signals;
    loop {
        tokio::select! {
            _ = hangup.recv() => match proxy.app.reload() {
                Ok(()) => tracing::info!("configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "reload refused; keeping the current configuration"),
            },
            _ = stop_signal(&mut terminate, &mut interrupt) => break,
        }
    }
    tracing::info!("shutting down");
    proxy.shutdown(Duration::from_secs(10)).await;
}

fn passwd(user: &str, password: Option<String>, md5: bool) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() {
                eprintln!("cannot read the password from stdin");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\n', '\r']).to_owned()
        }
    };
    let secret = if md5 {
        crate::auth::md5_user_hash(&password, user)
    } else {
        postgres_protocol::password::scram_sha_256(password.as_bytes())
    };
    println!("\"{}\" \"{}\"", user.replace('"', "\"\""), secret);
    ExitCode::SUCCESS
}

/// The `watchdog:` section of a witness's config file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WitnessFile {
    watchdog: crate::watchdog::WatchdogConfig,
}

fn witness(path: &std::path::Path) -> ExitCode {
    let loaded = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_yaml::from_str::<WitnessFile>(&text).map_err(|e| e.to_string()));
    let mut config = match loaded {
        Ok(f) => f.watchdog,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if let (true, Some(dir)) = (config.state_dir.is_relative(), path.parent()) {
        config.state_dir = dir.join(&config.state_dir);
    }
    let (rt, mut signals) = match runtime_with_signals(1) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let wd = match crate::watchdog::Watchdog::start(config, crate::watchdog::PeerRole::Witness).await {
            Ok(wd) => wd,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(node = wd.id(), addr = %wd.local_addr(), "watchdog witness running");
        signals.stop().await;
        let _ = wd.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn ctl(admin: &str, command: &[String]) -> ExitCode {
    let request = match command {
        [c] if c == "status" => "GET /status".to_owned(),
        [c] if c == "watchdog" => "GET /watchdog".to_owned(),
        [c, n] if ["attach", "detach", "promote", "switchover"].contains(&c.as_str()) => format!("POST /nodes/{n}/{c}"),
        _ => {
            eprintln!("usage: pglifeguard ctl [--admin ADDR] status | watchdog | attach N | detach N | promote N | switchover N");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: std::io::Result<String> = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(format!("{request} HTTP/1.0\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    });
    match result {
        Ok(reply) => {
            let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
            print!("{body}");
            if head.starts_with("HTTP/1.0 200") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cannot reach the admin endpoint at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}
