//! The YAML configuration: its types, defaults, validation and loading.
//!
//! A [`Config`] is an immutable snapshot. The running proxy keeps the current one in an
//! `ArcSwap` (see [`crate::app::App`]) and replaces it whole on SIGHUP; nothing mutates a
//! loaded config. YAML parsing is confined to [`Config::from_yaml`] so the parser crate can be
//! swapped without touching the rest of the proxy.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// Dotted key path where the problem was found (`.` for the document root).
        path: String,
        /// What is wrong, with the line and column when the parser knows them.
        message: String,
    },
    /// The YAML parsed but a value is not acceptable.
    #[error("{path}: {message}")]
    Invalid {
        /// Dotted key path of the offending value.
        path: String,
        /// Why the value is rejected.
        message: String,
    },
}

/// Method the proxy uses to authenticate its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// Accept every client without a password (pg_hba `trust`).
    Trust,
    /// MD5 challenge; users whose stored secret is a SCRAM verifier are asked for SCRAM instead.
    Md5,
    /// SCRAM-SHA-256 for every user.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to (pgpool: `listen_addresses` + `port`).
    pub listen: SocketAddr,
    /// HTTP endpoint for `/status` and `/health` (operators and probes); off when absent.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// HTTP endpoint for Prometheus `/metrics`; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Threads relaying traffic: 1 runs everything on one thread (like PgBouncer, least CPU
    /// per transaction), 0 uses one per CPU core. Read at start only.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// The PostgreSQL servers of the cluster, in node-id order (pgpool: `backend_*N`).
    pub backends: Vec<BackendConfig>,
    /// Pool sizes, limits and timeouts.
    #[serde(default)]
    pub pool: PoolConfig,
    /// How clients authenticate and where their secrets live.
    #[serde(default)]
    pub auth: AuthConfig,
    /// How every backend is checked, which also finds the current primary.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// What happens when a node fails.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// Peers that agree on the cluster and elect the holder of the virtual IP (pgpool:
    /// watchdog); off when absent.
    #[serde(default)]
    pub watchdog: Option<crate::watchdog::WatchdogConfig>,
}

/// One PostgreSQL server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name used in logs, metrics and status output.
    pub name: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Relative weight for load balancing reads (kept for pgpool compatibility).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Data directory on the server's host, passed to failover hooks as `%D`.
    #[serde(default)]
    pub data_directory: Option<PathBuf>,
}

/// Pooling limits and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most client connections served at once; more are refused with SQLSTATE 53300
    /// (pgpool: `num_init_children`, PgBouncer: `max_client_conn`).
    pub max_client_connections: usize,
    /// Most backend connections per (user, database) pair (pgpool: `max_pool` ×
    /// `num_init_children`, PgBouncer: `default_pool_size`). Clients beyond it wait.
    pub pool_size: usize,
    /// Statement run on a backend before it is handed to another client (pgpool:
    /// `reset_query_list`, PgBouncer: `server_reset_query`). Several statements separated by
    /// `;` run one at a time. Empty disables the reset.
    pub reset_query: String,
    /// Deadline for opening and logging in to a backend connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a client waits for a free backend before it gets SQLSTATE 53300.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Idle backend connections older than this are closed; 0 keeps them.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Backend connections are closed once this old, at their next release; 0 disables
    /// (pgpool: `connection_life_time`, PgBouncer: `server_lifetime`).
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// A client idle this long between transactions is disconnected; 0 disables
    /// (pgpool: `client_idle_limit`, PgBouncer: `client_idle_timeout`).
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A client must finish startup and authentication within this time
    /// (pgpool: `authentication_timeout`, PgBouncer: `client_login_timeout`).
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Deadline for the reset query (and rollback) when a client leaves.
    #[serde(with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// Largest single message accepted from a client before startup completes is fixed by the
    /// protocol; this bounds messages after startup (bytes). Larger ones close the client.
    pub max_message_size: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_client_connections: 1000,
            pool_size: 50,
            reset_query: "DISCARD ALL".to_owned(),
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(30),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            client_idle_timeout: Duration::ZERO,
            client_login_timeout: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(5),
            max_message_size: 1 << 30,
        }
    }
}

/// Client authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How clients prove who they are.
    pub method: AuthMethod,
    /// Users and their secrets, in PgBouncer `userlist.txt` or pgpool `pool_passwd` format.
    /// The same secrets are used to log in to the backends. Relative paths are resolved from
    /// the directory of the config file.
    pub file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { method: AuthMethod::Trust, file: None }
    }
}

/// Health checks: a real login plus `SELECT pg_is_in_recovery()` on every node, which also
/// tells which node is the primary (pgpool: `health_check_*` and `sr_check_*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// User the proxy logs in as (pgpool: `health_check_user`).
    pub user: String,
    /// Its password; may be omitted when the auth file has it or the servers trust the proxy.
    pub password: Option<String>,
    /// Database to connect to (pgpool: `health_check_database`).
    pub database: String,
    /// Time between checks of a node (pgpool: `health_check_period`).
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Deadline for one attempt: connect, login and query (pgpool: `health_check_timeout`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after a failed one before the node is declared down
    /// (pgpool: `health_check_max_retries`). A refused connection needs only
    /// `max_retries_refused` more: a server that refuses connections is not merely slow.
    pub max_retries: u32,
    /// Extra attempts after a refused connection or a shutdown error (57P01-57P03).
    pub max_retries_refused: u32,
    /// Pause between attempts (pgpool: `health_check_retry_delay`).
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            user: "postgres".to_owned(),
            password: None,
            database: "postgres".to_owned(),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            max_retries: 3,
            max_retries_refused: 1,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// Failover: hooks, primary search, holding clients (pgpool: `failover_command`,
/// `follow_primary_command`, `search_primary_node_timeout`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Run when a node fails, with pgpool's placeholders (`%d %h %p %D %m %H %M %P %r %R %N
    /// %S %%`). For a failed primary it is expected to promote the node given as `%m`.
    /// Empty: nothing runs, the proxy still waits for some standby to become primary.
    pub failover_command: String,
    /// Run for every remaining standby once a new primary is in place, to re-point it
    /// (`%d` is that standby, `%m`/`%H`/`%r` the new primary).
    pub follow_primary_command: String,
    /// Run against a node that claims to be primary while another one is the recorded
    /// primary (split brain): the place to stop or fence it. Same placeholders, `%d` the node.
    pub fence_command: String,
    /// Deadline for each hook; a hook still running then is killed with its process group.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long to wait for a new primary after a failover (pgpool:
    /// `search_primary_node_timeout`).
    #[serde(with = "humantime_serde")]
    pub search_primary_timeout: Duration,
    /// How long new sessions and idle clients' next requests wait for a primary instead of
    /// failing while none is known.
    #[serde(with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// Switchover (`ctl switchover N`): how long to wait for open transactions on the old
    /// primary to finish, and then for the new primary to replay all of its WAL. Sessions
    /// still inside a transaction after the first wait are terminated; if the standby has not
    /// caught up after the second, the switchover is called off and the old primary stays.
    #[serde(with = "humantime_serde")]
    pub switchover_timeout: Duration,
    /// Put a down standby back in service on its own once it is streaming again on the
    /// primary's timeline (pgpool: `auto_failback`). Nodes detached by an operator and nodes
    /// that claimed to be primary are never brought back this way.
    pub auto_failback: bool,
    /// Where node states and the primary are kept across restarts (pgpool: `pgpool_status`).
    /// Relative paths are resolved from the config file's directory. Absent: not kept.
    pub status_file: Option<PathBuf>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            failover_command: String::new(),
            follow_primary_command: String::new(),
            fence_command: String::new(),
            command_timeout: Duration::from_secs(60),
            search_primary_timeout: Duration::from_secs(60),
            hold_timeout: Duration::from_secs(30),
            switchover_timeout: Duration::from_secs(10),
            auto_failback: false,
            status_file: None,
        }
    }
}

/// Runtime threads when the config does not set `worker_threads`: one, as PgBouncer runs.
pub const DEFAULT_WORKER_THREADS: usize = 1;

fn default_worker_threads() -> usize {
    DEFAULT_WORKER_THREADS
}

fn default_pg_port() -> u16 {
    5432
}

fn default_weight() -> u32 {
    1
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths inside it are resolved
    /// from the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Config::from_yaml(&text)?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde_yaml sometimes prefixes the path itself; say it once.
            let message = message.strip_prefix(&format!("{path}: ")).map(str::to_owned).unwrap_or(message);
            ConfigError::Parse { path, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for file in [&mut self.auth.file, &mut self.failover.status_file].into_iter().flatten() {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        if let Some(w) = &mut self.watchdog {
            if w.state_dir.is_relative() {
                w.state_dir = base.join(&w.state_dir);
            }
        }
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: &str, message: String| {
            Err(ConfigError::Invalid { path: path.to_owned(), message })
        };
        if self.backends.is_empty() {
            return invalid("backends", "at least one backend is required".into());
        }
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.name.is_empty() {
                return invalid(&format!("backends[{i}].name"), "must not be empty".into());
            }
            if !names.insert(b.name.as_str()) {
                return invalid(
                    &format!("backends[{i}].name"),
                    format!("duplicate backend name \"{}\"", b.name),
                );
            }
            if b.host.is_empty() {
                return invalid(&format!("backends[{i}].host"), "must not be empty".into());
            }
            if b.port == 0 {
                return invalid(&format!("backends[{i}].port"), "must be between 1 and 65535".into());
            }
        }
        let p = &self.pool;
        if p.max_client_connections == 0 {
            return invalid("pool.max_client_connections", "must be at least 1".into());
        }
        if p.pool_size == 0 {
            return invalid("pool.pool_size", "must be at least 1".into());
        }
        for (key, d) in [
            ("pool.connect_timeout", p.connect_timeout),
            ("pool.checkout_timeout", p.checkout_timeout),
            ("pool.client_login_timeout", p.client_login_timeout),
            ("pool.reset_timeout", p.reset_timeout),
            ("health_check.period", self.health_check.period),
            ("health_check.timeout", self.health_check.timeout),
            ("failover.command_timeout", self.failover.command_timeout),
            ("failover.search_primary_timeout", self.failover.search_primary_timeout),
            ("failover.switchover_timeout", self.failover.switchover_timeout),
        ] {
            if d.is_zero() {
                return invalid(key, "must be greater than zero".into());
            }
        }
        if !(1024..=1 << 30).contains(&p.max_message_size) {
            return invalid("pool.max_message_size", "must be between 1024 bytes and 1 GiB (PostgreSQL's own limit)".into());
        }
        if let Some(w) = &self.watchdog {
            if let Err(e) = w.validate() {
                return invalid("watchdog", e.to_string());
            }
            if let Some(v) = &w.vip {
                if let Err(e) = crate::vip::GuardianConfig::new(&v.address, &v.interface) {
                    return invalid("watchdog.vip", e.to_string());
                }
            }
        }
        if self.auth.method != AuthMethod::Trust && self.auth.file.is_none() {
            return invalid(
                "auth.file",
                format!("required when auth.method is {:?}", self.auth.method).to_lowercase(),
            );
        }
        Ok(())
    }

    /// Settings that only take effect at start: a reload that changes them is refused.
    pub fn restart_required_changes(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != next.listen {
            changed.push("listen");
        }
        if self.admin_listen != next.admin_listen {
            changed.push("admin_listen");
        }
        if self.metrics_listen != next.metrics_listen {
            changed.push("metrics_listen");
        }
        if self.worker_threads != next.worker_threads {
            changed.push("worker_threads");
        }
        if self.backends != next.backends {
            changed.push("backends");
        }
        if format!("{:?}", self.watchdog) != format!("{:?}", next.watchdog) {
            changed.push("watchdog");
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: 127.0.0.1:6432\nbackends:\n  - name: pg0\n    host: 127.0.0.1\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.backends[0].port, 5432);
        assert_eq!(c.pool.reset_query, "DISCARD ALL");
        assert_eq!(c.auth.method, AuthMethod::Trust);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = format!("{MINIMAL}pool:\n  pool_sise: 3\n");
        let err = Config::from_yaml(&text).unwrap_err().to_string();
        assert!(err.starts_with("pool.pool_sise"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_duration_names_its_path() {
        let text = format!("{MINIMAL}pool:\n  connect_timeout: soon\n");
        let err = Config::from_yaml(&text).unwrap_err().to_string();
        assert!(err.starts_with("pool.connect_timeout"), "{err}");
    }

    #[test]
    fn duplicate_backend_rejected() {
        let text = "listen: 127.0.0.1:6432\nbackends:\n  - {name: a, host: h}\n  - {name: a, host: h}\n";
        let err = Config::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains("backends[1].name") && err.contains("duplicate"), "{err}");
    }

    #[test]
    fn password_method_needs_file() {
        let text = format!("{MINIMAL}auth:\n  method: scram-sha-256\n");
        let err = Config::from_yaml(&text).unwrap_err().to_string();
        assert!(err.starts_with("auth.file"), "{err}");
    }
}
