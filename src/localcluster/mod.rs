//! Throwaway local PostgreSQL streaming-replication clusters.
//!
//! Used by `pglifeguard demo` and by the integration tests. Every cluster
//! lives in its own temporary directory, listens on free TCP ports on
//! 127.0.0.1 and is torn down when the [`LocalCluster`] is dropped, so many
//! clusters can run side by side inside one test process.
//!
//! Design notes:
//!
//! * `initdb` is slow (a second or more), so it runs once per process into a
//!   template directory; each new primary is a `cp -a` of that template.
//! * Servers are direct children (`postgres -D ...`, not `pg_ctl start`), so
//!   we always know the postmaster PID and never have to find a server by
//!   name. They are spawned from one dedicated, never-exiting thread with
//!   `PR_SET_PDEATHSIG = SIGQUIT`: the kernel delivers that signal when the
//!   *thread* that forked the child exits, and a process-lifetime thread
//!   turns it into "when this process dies". A crashed or killed test run
//!   therefore does not leave servers behind, whatever thread (or async
//!   runtime worker) created the cluster.
//! * PostgreSQL refuses to run as root. When we are root, all server-side
//!   programs run as the `postgres` OS user and the directories they touch
//!   are chowned to it. Client programs (`psql`, `pg_isready`) run as
//!   ourselves.
//!
//! Where things are: this file assembles clusters (template, standbys, configuration
//! files); `server` is one postmaster and what can be done to it; `process` runs programs
//! and spawns the servers; `install` finds the PostgreSQL programs and the server OS user;
//! `ports` hands out free ports.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

mod install;
mod ports;
mod process;
mod server;

pub use install::pg_bin;
pub use ports::free_port;
pub use server::PgServer;

use install::{as_server_user, check_temp_dir_accessible, chown_to_server_user, server_command};
use process::run;
use server::{append_file, remove_stale_shmem, sql_ident, sql_literal};

/// How often readiness / replication conditions are re-checked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound for a server to become ready and for replication conditions.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one `psql` invocation, so a frozen server cannot hang a test forever.
const PSQL_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for `initdb`, `pg_basebackup`, `cp` and `pg_ctl`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
/// How many times a new server is retried on a fresh port when its port was taken.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of a log or of stderr go into error messages.
const TAIL_LINES: usize = 30;

/// Errors from building, starting, stopping or querying a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL server installation was found.
    #[error(
        "PostgreSQL server binaries not found: {0}. Install them (e.g. `apt-get install postgresql`) \
         or set PG_BIN to the directory containing `postgres`, `initdb`, `pg_ctl`, `pg_basebackup` and `psql`"
    )]
    BinariesNotFound(String),

    /// We run as root, but PostgreSQL refuses root and there is no `postgres` user to switch to.
    #[error(
        "running as root but the OS user `postgres` does not exist (PostgreSQL refuses to run as root); \
         create it (e.g. `useradd --system --create-home postgres`) or run as a non-root user"
    )]
    NoPostgresUser,

    /// A filesystem or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An external command exited unsuccessfully.
    #[error("command `{command}` failed ({status}); stderr tail:\n{stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },

    /// An external command did not finish in time and was killed.
    #[error("command `{command}` did not finish within {timeout:?} and was killed; stderr tail:\n{stderr}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The time limit.
        timeout: Duration,
        /// The last lines of its standard error.
        stderr: String,
    },

    /// A server process exited or misbehaved while starting.
    #[error("server {name} (port {port}) failed to start: {reason}; log {log_path}:\n{log_tail}")]
    StartFailed {
        /// Node name (`node0`, ...).
        name: String,
        /// Port it was meant to listen on.
        port: u16,
        /// Why we consider the start failed.
        reason: String,
        /// Path of the server log.
        log_path: String,
        /// The last lines of the server log.
        log_tail: String,
    },

    /// A condition we were polling for did not become true in time.
    #[error("timed out after {waited:?} waiting for {what}; log tail of {node}:\n{log_tail}")]
    Timeout {
        /// The condition.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// Node whose log is attached.
        node: String,
        /// The last lines of that node's log.
        log_tail: String,
    },

    /// The request does not make sense for the current state (bad node index, server not running, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of this module.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// Locks a mutex, ignoring poisoning: the protected data are simple caches
/// that stay consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// How to build a [`LocalCluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Number of streaming standbys besides the primary.
    pub standbys: usize,
    /// Makes replication synchronous (`synchronous_standby_names = 'ANY 1 (*)'` on the primary).
    /// Ignored without standbys.
    pub synchronous: bool,
    /// Extra `postgresql.conf` lines appended after the defaults (later lines win).
    pub extra_conf: Vec<String>,
    /// Require passwords for TCP connections from 127.0.0.1, except for user `postgres`
    /// (which stays `trust` so the harness itself can always connect).
    ///
    /// The `pg_hba.conf` method is `md5`, which PostgreSQL upgrades to SCRAM-SHA-256 for
    /// roles whose password is stored as SCRAM (the default, see [`LocalCluster::add_user`]),
    /// while still allowing MD5 for roles created with [`LocalCluster::add_user_md5`].
    /// A literal `scram-sha-256` method would reject the latter outright.
    pub hba_password: bool,
}

// ---------------------------------------------------------------------------
// Template data directory
// ---------------------------------------------------------------------------

/// Root of the process-wide template, removed at process exit.
static TEMPLATE_ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_template_at_exit() {
    if let Some(root) = TEMPLATE_ROOT.get() {
        let _ = fs::remove_dir_all(root);
    }
}

/// Returns the data directory initialized by the one `initdb` run of this process.
fn template_data_dir() -> Result<PathBuf> {
    // A Mutex rather than OnceLock::get_or_init so a failed initdb is reported and retried
    // instead of being cached, while concurrent callers still wait for the first run.
    static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut guard = lock(&TEMPLATE);
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let root = match TEMPLATE_ROOT.get() {
        Some(root) => root.clone(),
        None => {
            let root = tempfile::Builder::new()
                .prefix("pglifeguard-template-")
                .tempdir_in(std::env::temp_dir())
                .map_err(io_err("creating the template directory"))?
                // Statics are never dropped, so cleanup is tied to process exit instead.
                .keep();
            let root = TEMPLATE_ROOT.get_or_init(|| root).clone();
            // SAFETY: registering a plain extern "C" function without captured state.
            unsafe {
                libc::atexit(remove_template_at_exit);
            }
            root
        }
    };
    chown_to_server_user(&root)?;
    let data = root.join("data");
    if data.exists() {
        fs::remove_dir_all(&data).map_err(io_err(format!("removing {}", data.display())))?;
    }
    let mut cmd = server_command("initdb")?;
    cmd.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run(cmd, TOOL_TIMEOUT)?;
    *guard = Some(data.clone());
    Ok(data)
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A primary plus streaming standbys, each a [`PgServer`] in one temporary directory.
///
/// Dropping it stops all servers (standbys first) and removes the directory.
pub struct LocalCluster {
    /// The servers; index 0 is the initial primary, 1.. the standbys.
    pub nodes: Vec<PgServer>,
    opts: ClusterOptions,
    // Declared last so it is removed only after the servers in `nodes` are gone.
    dir: TempDir,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("dir", &self.dir.path())
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl LocalCluster {
    /// The `backends:` entries of a pglifeguard config for this cluster's nodes, in order.
    pub fn backends_yaml(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "  - name: {}\n    host: 127.0.0.1\n    port: {}\n    data_directory: {}\n",
                node.name,
                node.port,
                node.data_dir.display()
            ));
        }
        out
    }

    /// Creates and starts a cluster: a primary and `opts.standbys` streaming standbys,
    /// each ready for connections, with every standby streaming from the primary (and,
    /// with `opts.synchronous`, at least one of them acting as synchronous standby).
    pub fn start(opts: &ClusterOptions) -> Result<LocalCluster> {
        // Fail early with the clear messages instead of halfway through.
        pg_bin("postgres")?;
        check_temp_dir_accessible()?;
        let template = template_data_dir()?;

        let dir = tempfile::Builder::new()
            .prefix("pglifeguard-cluster-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_err("creating the cluster directory"))?;
        chown_to_server_user(dir.path())?;
        let sock_dir = dir.path().join("sock");
        fs::create_dir(&sock_dir).map_err(io_err(format!("creating {}", sock_dir.display())))?;
        chown_to_server_user(&sock_dir)?;

        let mut cluster = LocalCluster {
            nodes: Vec::with_capacity(opts.standbys + 1),
            opts: opts.clone(),
            dir,
        };

        let mut primary = PgServer::new("node0".into(), cluster.dir.path());
        let mut cp = Command::new("cp");
        as_server_user(&mut cp)?;
        cp.arg("-a").arg(&template).arg(&primary.data_dir);
        run(cp, TOOL_TIMEOUT)?;
        append_file(
            &primary.data_dir.join("postgresql.conf"),
            &base_conf(&sock_dir, opts),
        )?;
        fs::write(
            primary.data_dir.join("pg_hba.conf"),
            hba_conf(opts.hba_password),
        )
        .map_err(io_err("writing pg_hba.conf"))?;
        primary.start_on_free_port()?;
        let primary_port = primary.port;
        cluster.nodes.push(primary);

        // Standbys are independent of each other, so build them concurrently; the servers
        // themselves are forked by the spawner thread, so these scoped threads may end.
        let names: Vec<String> = (1..=opts.standbys).map(|i| format!("node{i}")).collect();
        let cluster_dir = cluster.dir.path().to_path_buf();
        let built: Vec<Result<PgServer>> = thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    let cluster_dir = &cluster_dir;
                    s.spawn(move || {
                        let mut node = PgServer::new(name.clone(), cluster_dir);
                        build_standby(&mut node, primary_port)?;
                        node.start_on_free_port()?;
                        Ok(node)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClusterError::Invalid(
                            "standby setup thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        for node in built {
            cluster.nodes.push(node?);
        }
        for i in 1..cluster.nodes.len() {
            cluster.wait_streaming(0, i)?;
        }

        if opts.synchronous && opts.standbys > 0 {
            // Enabled only now: while no standby was connected, commits on the primary would block.
            let p = &cluster.nodes[0];
            append_file(
                &p.data_dir.join("postgresql.conf"),
                "synchronous_standby_names = 'ANY 1 (*)'\n",
            )?;
            p.psql("select pg_reload_conf()")?;
            p.poll_until("a synchronous standby", |p| {
                Ok(p.psql(
                    "select count(*) from pg_stat_replication where sync_state in ('sync', 'quorum')",
                )? != "0")
            })?;
        }
        Ok(cluster)
    }

    /// The initial primary (node 0).
    pub fn primary(&self) -> &PgServer {
        &self.nodes[0]
    }

    /// Mutable access to node `i`.
    ///
    /// # Panics
    /// If `i` is not a valid node index.
    pub fn node_mut(&mut self, i: usize) -> &mut PgServer {
        &mut self.nodes[i]
    }

    /// The cluster's temporary directory (data directories, logs, socket directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The options the cluster was built with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Creates a login role with a SCRAM-SHA-256 password on the primary.
    pub fn add_user(&self, name: &str, password: &str) -> Result<()> {
        self.create_role(name, password, "scram-sha-256")
    }

    /// Creates a login role whose password is stored as MD5, for testing MD5 authentication.
    pub fn add_user_md5(&self, name: &str, password: &str) -> Result<()> {
        self.create_role(name, password, "md5")
    }

    fn create_role(&self, name: &str, password: &str, encryption: &str) -> Result<()> {
        // Same session, so the setting applies to this CREATE ROLE only.
        self.primary().psql(&format!(
            "SET password_encryption = {}; CREATE ROLE {} LOGIN PASSWORD {}",
            sql_literal(encryption),
            sql_ident(name),
            sql_literal(password)
        ))?;
        Ok(())
    }

    /// Waits until every running standby has replayed the primary's (node 0) current WAL position.
    pub fn wait_replayed(&self) -> Result<()> {
        self.wait_replayed_from(0)
    }

    /// Like [`LocalCluster::wait_replayed`] with node `primary` as the primary, e.g. after a
    /// failover. Nodes that are not running or not in recovery are skipped.
    pub fn wait_replayed_from(&self, primary: usize) -> Result<()> {
        let p = self.checked_node(primary)?;
        let lsn = p.psql("select pg_current_wal_lsn()")?;
        let query = format!(
            "select case when pg_is_in_recovery() then pg_last_wal_replay_lsn() >= {}::pg_lsn else true end",
            sql_literal(&lsn)
        );
        for (i, node) in self.nodes.iter().enumerate() {
            if i == primary || node.pid().is_none() {
                continue;
            }
            node.poll_until(&format!("{} to replay up to {lsn}", node.name), |n| {
                Ok(n.psql(&query)? == "t")
            })?;
        }
        Ok(())
    }

    /// Re-creates node `i` as a standby of node `from`: stops it, wipes its data directory,
    /// takes a fresh base backup from `from`, starts it on its old port and waits until it streams.
    ///
    /// Used to re-point a standby after a failover, or to turn an old primary into a standby.
    pub fn rebuild_standby(&mut self, i: usize, from: usize) -> Result<()> {
        self.checked_node(i)?;
        let source_port = self.checked_node(from)?.port;
        if i == from {
            return Err(ClusterError::Invalid(format!(
                "node{i} cannot be rebuilt from itself"
            )));
        }
        let node = &mut self.nodes[i];
        node.stop_immediate();
        remove_stale_shmem(&node.data_dir);
        if node.data_dir.exists() {
            fs::remove_dir_all(&node.data_dir)
                .map_err(io_err(format!("removing {}", node.data_dir.display())))?;
        }
        build_standby(node, source_port)?;
        node.write_port()?;
        node.start()?;
        self.wait_streaming(from, i)
    }

    fn checked_node(&self, i: usize) -> Result<&PgServer> {
        self.nodes.get(i).ok_or_else(|| {
            ClusterError::Invalid(format!(
                "no node {i} (cluster has {} nodes)",
                self.nodes.len()
            ))
        })
    }

    /// Waits until `upstream` lists `standby` as streaming in `pg_stat_replication`.
    fn wait_streaming(&self, upstream: usize, standby: usize) -> Result<()> {
        let name = &self.nodes[standby].name;
        let query = format!(
            "select count(*) from pg_stat_replication where application_name = {} and state = 'streaming'",
            sql_literal(name)
        );
        self.nodes[upstream]
            .poll_until(&format!("{name} to stream"), |p| Ok(p.psql(&query)? != "0"))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Standbys first, so a primary's walsenders are not left waiting for them.
        for node in self.nodes.iter_mut().rev() {
            node.stop_immediate();
        }
    }
}

/// Takes a base backup of the server on `source_port` into `node.data_dir` and configures
/// it as a standby (port not yet set).
fn build_standby(node: &mut PgServer, source_port: u16) -> Result<()> {
    let mut cmd = server_command("pg_basebackup")?;
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(source_port.to_string())
        .args(["-U", "postgres", "-D"])
        .arg(&node.data_dir)
        // -R writes standby.signal; fast checkpoint avoids waiting for a spread one.
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    run(cmd, TOOL_TIMEOUT)?;
    // Later lines win. The application_name makes the node identifiable in
    // pg_stat_replication and usable in synchronous_standby_names.
    append_file(
        &node.data_dir.join("postgresql.auto.conf"),
        &format!(
            "primary_conninfo = 'host=127.0.0.1 port={source_port} user=postgres application_name={}'\n",
            node.name
        ),
    )?;
    // The source's synchronous_standby_names is copied along; on a promoted standby with no
    // standbys of its own it would make every commit hang.
    append_file(
        &node.data_dir.join("postgresql.conf"),
        "synchronous_standby_names = ''\n",
    )
}

fn base_conf(sock_dir: &Path, opts: &ClusterOptions) -> String {
    // Unix socket paths are limited to ~107 bytes; without a socket the servers still work over TCP.
    let sock = sock_dir.join(".s.PGSQL.65535");
    let sockets = if sock.as_os_str().len() < 100 {
        sock_dir.display().to_string().replace('\'', "''")
    } else {
        String::new()
    };
    let mut conf = format!(
        "\n# pglifeguard localcluster settings\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{sockets}'\n\
         fsync = off\n\
         # on (not off), so commits survive kill9 and wait for a synchronous standby when configured\n\
         synchronous_commit = on\n\
         # both let pg_rewind turn a former primary into a standby (conf/hooks/follow_primary.sh)\n\
         full_page_writes = on\n\
         wal_log_hints = on\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         max_connections = 300\n\
         hot_standby = on\n\
         wal_keep_size = '256MB'\n\
         shared_buffers = '32MB'\n\
         logging_collector = off\n\
         log_line_prefix = '%m [%p] %q%u@%d/%a '\n"
    );
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

fn hba_conf(password: bool) -> String {
    let mut hba = String::from(
        "# TYPE  DATABASE     USER      ADDRESS        METHOD\n\
         local   all          all                      trust\n\
         local   replication  all                      trust\n\
         host    replication  all       127.0.0.1/32   trust\n",
    );
    if password {
        // md5 rather than scram-sha-256: see ClusterOptions::hba_password.
        hba.push_str(
            "host    all          postgres  127.0.0.1/32   trust\n\
             host    all          all       127.0.0.1/32   md5\n",
        );
    } else {
        hba.push_str("host    all          all       127.0.0.1/32   trust\n");
    }
    hba
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn standby_sees_primary_writes() {
        let cluster = LocalCluster::start(&ClusterOptions {
            standbys: 1,
            ..Default::default()
        })
        .expect("start cluster");
        let primary = cluster.primary();
        primary
            .psql("create table t (id int primary key, v text); insert into t values (1, 'one'), (2, 'two')")
            .expect("create table");
        cluster.wait_replayed().expect("wait replayed");
        let standby = &cluster.nodes[1];
        assert_eq!(standby.psql("select pg_is_in_recovery()").unwrap(), "t");
        assert_eq!(
            standby
                .psql("select string_agg(v, ',' order by id) from t")
                .unwrap(),
            "one,two"
        );
        assert!(standby.psql("insert into t values (3, 'x')").is_err());
        assert_ne!(primary.port, standby.port);
        assert!(primary
            .log_contents()
            .contains("ready to accept connections"));
    }

    #[test]
    fn promote_standby_and_repoint() {
        let mut cluster = LocalCluster::start(&ClusterOptions {
            standbys: 2,
            synchronous: true,
            ..Default::default()
        })
        .expect("start cluster");
        cluster
            .primary()
            .psql("create table t (v int); insert into t values (1)")
            .unwrap();
        cluster.wait_replayed().unwrap();

        cluster.node_mut(0).kill9();
        assert!(!cluster.node_mut(0).is_running());
        cluster.nodes[1].promote().expect("promote");
        assert_eq!(
            cluster.nodes[1].psql("select pg_is_in_recovery()").unwrap(),
            "f"
        );
        // Would hang if the promoted node had inherited synchronous_standby_names.
        cluster.nodes[1].psql("insert into t values (2)").unwrap();

        cluster.rebuild_standby(2, 1).expect("re-point node2");
        cluster
            .rebuild_standby(0, 1)
            .expect("old primary becomes standby");
        cluster.nodes[1].psql("insert into t values (3)").unwrap();
        cluster.wait_replayed_from(1).unwrap();
        for i in [0, 2] {
            assert_eq!(cluster.nodes[i].psql("select sum(v) from t").unwrap(), "6");
            assert_eq!(
                cluster.nodes[i].psql("select pg_is_in_recovery()").unwrap(),
                "t"
            );
        }
    }

    #[test]
    fn restart_freeze_and_kill9() {
        let mut cluster = LocalCluster::start(&ClusterOptions::default()).expect("start cluster");
        let node = cluster.node_mut(0);
        let port = node.port;
        let first_pid = node.pid().unwrap();

        node.stop_fast();
        assert!(!node.is_running());
        assert!(node.pid().is_none());
        node.start().unwrap();
        assert_eq!(node.port, port);
        assert_eq!(node.psql("select 1").unwrap(), "1");

        node.freeze();
        assert!(std::net::TcpStream::connect(node.addr()).is_ok());
        node.thaw();
        assert_eq!(node.psql("select 2").unwrap(), "2");

        node.kill9();
        assert!(!node.is_running());
        node.start().expect("restart after kill -9");
        assert_ne!(node.pid().unwrap(), first_pid);
        assert_eq!(node.psql("select 3").unwrap(), "3");

        // Stopping a frozen server must not hang.
        node.freeze();
        node.stop_immediate();
        assert!(!node.is_running());
    }

    #[test]
    fn restart_on_busy_port_fails_then_recovers() {
        let mut cluster = LocalCluster::start(&ClusterOptions::default()).expect("start cluster");
        let node = cluster.node_mut(0);
        node.stop_immediate();
        let squatter = TcpListener::bind(node.addr()).expect("occupy the port");
        let err = node.start().expect_err("port is busy");
        assert!(
            matches!(&err, ClusterError::StartFailed { log_tail, .. } if log_tail.contains("could not bind")),
            "{err}"
        );
        drop(squatter);
        node.start().expect("start after the port was freed");
        assert_eq!(node.psql("select 1").unwrap(), "1");
    }

    #[test]
    fn password_auth() {
        let cluster = LocalCluster::start(&ClusterOptions {
            hba_password: true,
            ..Default::default()
        })
        .expect("start cluster");
        cluster.add_user("alice", "s3cret").unwrap();
        cluster.add_user_md5("bob", "hunter'2").unwrap();
        let p = cluster.primary();
        assert_eq!(
            p.psql("select rolname || ':' || left(rolpassword, 3) from pg_authid where rolname in ('alice', 'bob') order by rolname")
                .unwrap(),
            "alice:SCR\nbob:md5"
        );
        assert_eq!(
            p.psql_as("alice", Some("s3cret"), "postgres", "select current_user")
                .unwrap(),
            "alice"
        );
        assert_eq!(
            p.psql_as("bob", Some("hunter'2"), "postgres", "select current_user")
                .unwrap(),
            "bob"
        );
        assert!(p
            .psql_as("alice", Some("wrong"), "postgres", "select 1")
            .is_err());
        assert!(p.psql_as("alice", None, "postgres", "select 1").is_err());
        // The harness user stays trusted.
        assert_eq!(p.psql("select current_user").unwrap(), "postgres");
    }

    #[test]
    fn many_clusters_in_parallel() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                thread::spawn(|| {
                    let c = LocalCluster::start(&ClusterOptions {
                        standbys: 1,
                        ..Default::default()
                    })?;
                    c.primary().psql("create table x as select 1 as a")?;
                    c.wait_replayed()?;
                    c.nodes[1].psql("select a from x")
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), "1");
        }
    }
}
