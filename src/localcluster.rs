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

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

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
// Locating binaries
// ---------------------------------------------------------------------------

/// Returns the full path of a PostgreSQL program (`postgres`, `initdb`, `psql`, ...).
///
/// The directory is taken from the `PG_BIN` environment variable if set,
/// otherwise from `pg_config --bindir` if that directory contains `postgres`,
/// otherwise the highest-versioned `/usr/lib/postgresql/*/bin` that contains
/// `postgres`. The error explains how to install PostgreSQL or set `PG_BIN`.
pub fn pg_bin(tool: &str) -> Result<PathBuf> {
    let dir = pg_bin_dir()?;
    let path = dir.join(tool);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::BinariesNotFound(format!(
            "`{tool}` is not in {}",
            dir.display()
        )))
    }
}

fn pg_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        // An explicit setting is never second-guessed, so a wrong PG_BIN is reported instead of silently bypassed.
        let dir = PathBuf::from(dir);
        if dir.join("postgres").is_file() {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesNotFound(format!(
            "PG_BIN={} does not contain `postgres`",
            dir.display()
        )));
    }
    // Probing spawns pg_config, and psql is looked up for every query, so remember the answer.
    static DETECTED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = lock(&DETECTED);
    if let Some(dir) = cached.as_ref() {
        return Ok(dir.clone());
    }
    let dir = detect_bin_dir().ok_or_else(|| {
        ClusterError::BinariesNotFound(
            "neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin contains `postgres`".into(),
        )
    })?;
    *cached = Some(dir.clone());
    Ok(dir)
}

fn detect_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("postgres").is_file() {
                return Some(dir);
            }
        }
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let bin = entry.path().join("bin");
        if !bin.join("postgres").is_file() {
            continue;
        }
        // "9.6" < "10" < "15": compare numerically component by component.
        let version: Vec<u64> = entry
            .file_name()
            .to_string_lossy()
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, dir)| dir)
}

// ---------------------------------------------------------------------------
// Server OS user
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ServerUser {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// The user server-side programs must run as: `None` means "as ourselves".
fn server_user() -> Result<Option<&'static ServerUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    match USER.get_or_init(|| lookup_user("postgres")) {
        Some(u) => Ok(Some(u)),
        None => Err(ClusterError::NoPostgresUser),
    }
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid and is overwritten by getpwnam_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // The reentrant variant because tests look users up from many threads at once.
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let home = if pwd.pw_dir.is_null() {
        PathBuf::from("/")
    } else {
        // SAFETY: getpwnam_r succeeded, so pw_dir points to a NUL-terminated string inside `buf`.
        PathBuf::from(OsStr::from_bytes(
            unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes(),
        ))
    };
    Some(ServerUser {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home,
    })
}

/// Makes `cmd` run as the server user when we are root.
fn as_server_user(cmd: &mut Command) -> Result<()> {
    if let Some(u) = server_user()? {
        cmd.uid(u.uid).gid(u.gid).env("HOME", &u.home);
    }
    // The caller's cwd may be unreadable for the server user, which makes initdb and postgres complain.
    cmd.current_dir("/");
    // Keeps server messages in English, so the log can be searched for known errors.
    cmd.env("LC_ALL", "C");
    Ok(())
}

fn server_command(tool: &str) -> Result<Command> {
    let mut cmd = Command::new(pg_bin(tool)?);
    as_server_user(&mut cmd)?;
    Ok(cmd)
}

/// When we are root, the server user must be able to reach the temporary directory;
/// otherwise initdb fails with a confusing permission error deep inside a template path.
fn check_temp_dir_accessible() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(u) = server_user()? else {
        return Ok(());
    };
    let tmp = std::env::temp_dir();
    for dir in tmp.ancestors() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let reachable = mode & 0o001 != 0
            || (meta.uid() == u.uid && mode & 0o100 != 0)
            || (meta.gid() == u.gid && mode & 0o010 != 0);
        if !reachable {
            return Err(ClusterError::Invalid(format!(
                "the temporary directory {} is not accessible to the `postgres` user ({} is mode {:o}); \
                 set TMPDIR to a world-accessible directory such as /tmp",
                tmp.display(),
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Gives a directory or file we created to the server user (no-op unless root).
fn chown_to_server_user(path: &Path) -> Result<()> {
    let Some(u) = server_user()? else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
        .map_err(io_err(format!("chown {} to postgres", path.display())))
}

// ---------------------------------------------------------------------------
// Running external commands
// ---------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion with a time limit and returns its stdout.
fn run(mut cmd: Command, timeout: Duration) -> Result<String> {
    let command = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("spawning `{command}`")))?;

    // Pipes are drained on helper threads so a chatty command cannot block on a full pipe,
    // and so we can stop waiting when the time limit expires.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let mut readers = 0;
    if let Some(mut out) = child.stdout.take() {
        let tx = tx.clone();
        readers += 1;
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            let _ = tx.send((true, buf));
        });
    }
    if let Some(mut err) = child.stderr.take() {
        let tx = tx.clone();
        readers += 1;
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            let _ = tx.send((false, buf));
        });
    }
    drop(tx);

    let deadline = Instant::now() + timeout;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut timed_out = false;
    for _ in 0..readers {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    if timed_out {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ClusterError::CommandTimeout {
            command,
            timeout,
            stderr: tail(&String::from_utf8_lossy(&stderr), TAIL_LINES),
        });
    }
    let status = child
        .wait()
        .map_err(io_err(format!("waiting for `{command}`")))?;
    if !status.success() {
        return Err(ClusterError::CommandFailed {
            command,
            status: status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&stderr), TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

// ---------------------------------------------------------------------------
// Spawning servers
// ---------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-lifetime spawner thread with a parent-death signal.
///
/// `PR_SET_PDEATHSIG` fires when the forking *thread* exits. Forking from a
/// thread that lives as long as the process means servers get SIGQUIT
/// (immediate shutdown) exactly when this process dies, and never earlier
/// because some short-lived thread (a test thread, a blocking-pool worker)
/// that happened to create the cluster finished.
fn spawn_with_death_signal(mut cmd: Command) -> Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let command = describe(&cmd);

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGQUIT as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // If we died between fork and prctl the signal was never delivered; do not start an orphan.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    // A process group of its own keeps a terminal Ctrl-C aimed at us from also hitting the servers
    // directly; they are shut down by us, or by the death signal if we die.
    cmd.process_group(0);

    let (reply_tx, reply_rx) = mpsc::channel();
    {
        let mut guard = lock(&SPAWNER);
        if guard.is_none() {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            thread::Builder::new()
                .name("pg-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .map_err(io_err("starting the server spawner thread"))?;
            *guard = Some(tx);
        }
        let sender = guard.as_ref().ok_or_else(|| {
            ClusterError::Invalid("server spawner thread is not available".into())
        })?;
        if sender.send((cmd, reply_tx)).is_err() {
            *guard = None;
            return Err(ClusterError::Invalid(
                "server spawner thread has exited".into(),
            ));
        }
    }
    match reply_rx.recv() {
        Ok(res) => res.map_err(io_err(format!("spawning `{command}`"))),
        Err(_) => Err(ClusterError::Invalid(
            "server spawner thread has exited".into(),
        )),
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Picks a TCP port on 127.0.0.1 that nothing is bound to, for a server this process (or a
/// child it starts) is about to bind.
///
/// The port is free only when probed; what matters is that nobody takes it before the server
/// binds it. Two measures make that unlikely:
/// - Ports handed out are remembered for the life of the process, so two clusters or proxies
///   in one test process never receive the same port, even after a node stopped (restarts
///   reuse a node's port).
/// - Ports come from below the kernel's ephemeral range when there is room. A port from that
///   range can be handed by the kernel to any `bind(…:0)` or outgoing connection in the
///   meantime, and the test suite does many of both in parallel; a port below it is taken only
///   by someone asking for it by number.
///
/// A collision with another process is still possible; servers started here retry on
/// another port when theirs is taken.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = lock(&HANDED_OUT);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let probe = |port: u16| -> Result<Option<u16>> {
        match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)) {
            Ok(l) => Ok(Some(
                l.local_addr()
                    .map_err(io_err("reading the address of a probe socket"))?
                    .port(),
            )),
            Err(e) if port != 0 && e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(io_err("binding 127.0.0.1 to find a free port")(e)),
        }
    };
    if let Some((low, high)) = non_ephemeral_ports() {
        let span = u32::from(high - low) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span {
            let port = (u32::from(low) + (start + i) % span) as u16;
            if !handed_out.contains(&port) && probe(port)?.is_some() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..1000 {
        if let Some(port) = probe(0)? {
            if handed_out.insert(port) {
                return Ok(port);
            }
        }
    }
    Err(ClusterError::Invalid(
        "could not find an unused TCP port on 127.0.0.1".into(),
    ))
}

/// A range of ports just below the kernel's ephemeral range (`ip_local_port_range`), or
/// `None` when that range starts too low to leave room.
fn non_ephemeral_ports() -> Option<(u16, u16)> {
    const WANTED: u16 = 8000;
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_low: u16 = text.split_whitespace().next()?.parse().ok()?;
    let high = ephemeral_low.checked_sub(1)?;
    let low = ephemeral_low.checked_sub(WANTED)?;
    (low >= 10_000).then_some((low, high))
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

/// Parses `/proc/PID/stat` into (state, ppid).
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombies count as dead: orphans are reaped by PID 1, which in containers may never happen.
fn process_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| matches!(proc_stat(p), Some((s, pp)) if pp == pid && s != 'Z' && s != 'X'))
        .collect()
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; failures (e.g. already exited) are irrelevant here.
    unsafe {
        libc::kill(pid, sig);
    }
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
// One server
// ---------------------------------------------------------------------------

/// One PostgreSQL server (postmaster) of a [`LocalCluster`], running as our direct child.
pub struct PgServer {
    /// Node name, `node0` for the initial primary, `node1`... for standbys; also the
    /// standby's `application_name` in `pg_stat_replication`.
    pub name: String,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Server log (stdout and stderr of the postmaster), outside the data directory.
    pub log_path: PathBuf,
    child: Option<Child>,
}

enum LaunchError {
    PortInUse(ClusterError),
    Other(ClusterError),
}

impl From<ClusterError> for LaunchError {
    fn from(e: ClusterError) -> Self {
        LaunchError::Other(e)
    }
}

impl PgServer {
    fn new(name: String, cluster_dir: &Path) -> PgServer {
        PgServer {
            data_dir: cluster_dir.join(&name),
            log_path: cluster_dir.join(format!("{name}.log")),
            name,
            port: 0,
            child: None,
        }
    }

    /// PID of the postmaster, if it was started and has not been reaped yet.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's TCP address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// A libpq connection string for user `postgres`, database `postgres`.
    pub fn conn_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Whether the postmaster is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) => {
                self.child = None;
                false
            }
            // try_wait only fails if the child was already reaped, which means it is gone.
            Some(Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Immediate shutdown (SIGQUIT), waiting for the postmaster to exit.
    ///
    /// Like a crash from the clients' point of view; crash recovery runs on the next start.
    pub fn stop_immediate(&mut self) {
        self.stop_with(libc::SIGQUIT, Duration::from_secs(30));
    }

    /// Fast shutdown (SIGINT): disconnects clients, writes a shutdown checkpoint.
    ///
    /// Escalates to an immediate shutdown if that takes longer than 60 s (e.g. a frozen
    /// standby keeping a walsender busy).
    pub fn stop_fast(&mut self) {
        self.stop_with(libc::SIGINT, Duration::from_secs(60));
    }

    /// SIGKILLs the postmaster only, as in a hard crash of the server process.
    ///
    /// The backends notice the postmaster's death and exit by themselves; this method
    /// waits for that (up to 10 s, then SIGKILLs the stragglers by PID), because a
    /// restart is refused while old backends are still attached to shared memory.
    pub fn kill9(&mut self) {
        let Some(pid) = self.live_pid() else {
            return;
        };
        let children = children_of(pid);
        signal(pid, libc::SIGKILL);
        // Frozen backends would never notice the postmaster's death.
        for &c in &children {
            signal(c, libc::SIGCONT);
        }
        self.reap(Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while children.iter().any(|&c| process_alive(c)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        for &c in &children {
            if process_alive(c) {
                signal(c, libc::SIGKILL);
            }
        }
    }

    /// Suspends the postmaster and all its child processes (SIGSTOP), simulating a hung server:
    /// TCP connections are still accepted by the kernel but nothing answers.
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            // Postmaster first so it cannot fork new backends while we walk its children.
            signal(pid as i32, libc::SIGSTOP);
            for c in children_of(pid as i32) {
                signal(c, libc::SIGSTOP);
            }
        }
    }

    /// Resumes a server suspended by [`PgServer::freeze`].
    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            for c in children_of(pid as i32) {
                signal(c, libc::SIGCONT);
            }
            signal(pid as i32, libc::SIGCONT);
        }
    }

    /// Starts the server again on the same data directory and port and waits until it
    /// accepts connections. Does nothing if it is already running.
    ///
    /// If the port was grabbed by someone else meanwhile, retries a few times before failing.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortInUse(e)) if attempt < PORT_ATTEMPTS => {
                    tracing::debug!(node = %self.name, port = self.port, error = %e, "port busy, retrying");
                    thread::sleep(Duration::from_millis(500));
                }
                Err(LaunchError::PortInUse(e)) | Err(LaunchError::Other(e)) => return Err(e),
            }
        }
    }

    /// Runs one SQL string in database `postgres` as user `postgres` and returns the
    /// trimmed, unaligned, tuples-only output. Errors if the SQL fails.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_db("postgres", sql)
    }

    /// Like [`PgServer::psql`] but in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> Result<String> {
        self.psql_as("postgres", None, db, sql)
    }

    /// Like [`PgServer::psql`] but as `user` with an optional password, in database `db`,
    /// for exercising authentication.
    pub fn psql_as(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
        sql: &str,
    ) -> Result<String> {
        let mut cmd = Command::new(pg_bin("psql")?);
        cmd.args(["-X", "-A", "-t", "-q", "-w", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", user, "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql])
            // A frozen server accepts the TCP connection and then never answers.
            .env("PGCONNECT_TIMEOUT", "10");
        match password {
            Some(p) => cmd.env("PGPASSWORD", p),
            None => cmd.env_remove("PGPASSWORD"),
        };
        Ok(run(cmd, PSQL_TIMEOUT)?.trim().to_string())
    }

    /// Promotes a standby (`pg_ctl promote -w`) and waits until it leaves recovery.
    pub fn promote(&self) -> Result<()> {
        if self.pid().is_none() {
            return Err(ClusterError::Invalid(format!(
                "cannot promote {}: not running",
                self.name
            )));
        }
        let mut cmd = server_command("pg_ctl")?;
        cmd.args(["promote", "-w", "-t", "60", "-D"])
            .arg(&self.data_dir);
        run(cmd, TOOL_TIMEOUT)?;
        self.poll_until("promotion to finish", |s| {
            Ok(s.psql("select pg_is_in_recovery()")? == "f")
        })
    }

    /// The whole server log so far (all runs of this node).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        tail(&self.log_contents(), TAIL_LINES)
    }

    /// Polls `cond` every [`POLL_INTERVAL`] until it returns true, up to [`READY_TIMEOUT`].
    /// Errors from `cond` count as "not yet" (the server may be restarting), but the
    /// last one is reported on timeout.
    fn poll_until(&self, what: &str, mut cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        let mut last_err = None;
        loop {
            match cond(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if start.elapsed() >= READY_TIMEOUT {
                let what = match last_err {
                    Some(e) => format!("{what} (last error: {e})"),
                    None => what.to_string(),
                };
                return Err(ClusterError::Timeout {
                    what,
                    waited: start.elapsed(),
                    node: self.name.clone(),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The postmaster PID if it is still running.
    fn live_pid(&mut self) -> Option<i32> {
        if self.is_running() {
            self.pid().map(|p| p as i32)
        } else {
            None
        }
    }

    /// Waits for our child to exit and reaps it; returns false on timeout.
    fn reap(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop_with(&mut self, sig: libc::c_int, timeout: Duration) {
        let Some(pid) = self.live_pid() else {
            return;
        };
        // A frozen server would keep the signal pending forever.
        self.thaw();
        signal(pid, sig);
        if self.reap(timeout) {
            return;
        }
        if sig != libc::SIGQUIT {
            tracing::warn!(node = %self.name, "shutdown timed out, escalating to immediate shutdown");
            signal(pid, libc::SIGQUIT);
            if self.reap(Duration::from_secs(30)) {
                return;
            }
        }
        tracing::warn!(node = %self.name, "immediate shutdown timed out, killing");
        self.kill9();
    }

    /// Spawns the postmaster and waits until it is ready; classifies port conflicts so the
    /// caller can retry.
    fn launch(&mut self) -> Result<(), LaunchError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(format!("opening {}", self.log_path.display())))?;
        chown_to_server_user(&self.log_path)?;
        let log_start = log
            .metadata()
            .map_err(io_err(format!("stat {}", self.log_path.display())))?
            .len();
        // Marks restarts in the log, which helps reading it after a failed test.
        let _ = writeln!(
            log,
            "----- pglifeguard: starting {} on port {} -----",
            self.name, self.port
        );
        let log_err = log.try_clone().map_err(io_err(format!(
            "duplicating handle of {}",
            self.log_path.display()
        )))?;

        let mut cmd = server_command("postgres")?;
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        self.child = Some(spawn_with_death_signal(cmd)?);

        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(reason) => {
                self.stop_immediate();
                let new_log = self.log_since(log_start);
                let err = ClusterError::StartFailed {
                    name: self.name.clone(),
                    port: self.port,
                    reason,
                    log_path: self.log_path.display().to_string(),
                    log_tail: tail(&new_log, TAIL_LINES),
                };
                if new_log.contains("could not bind") || new_log.contains("Address already in use")
                {
                    Err(LaunchError::PortInUse(err))
                } else {
                    Err(LaunchError::Other(err))
                }
            }
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        let start = (offset as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Waits until the postmaster reports itself ready (or hot-standby ready) in
    /// `postmaster.pid` with *our* child's PID, and `pg_isready` agrees.
    ///
    /// Checking the PID file first means a different server that happens to own the
    /// port can never be mistaken for ours.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let pid = self.pid().ok_or("not spawned")?;
        let pg_isready = pg_bin("pg_isready").map_err(|e| e.to_string())?;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("postmaster exited during startup ({status})"));
            }
            if pidfile_ready(&self.data_dir, pid) {
                let ok = Command::new(&pg_isready)
                    .args([
                        "-q",
                        "-h",
                        "127.0.0.1",
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                        "-t",
                        "5",
                        "-p",
                    ])
                    .arg(self.port.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    return Ok(());
                }
            }
            if start.elapsed() >= READY_TIMEOUT {
                return Err(format!("not ready after {:?}", start.elapsed()));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Appends `port = N` to postgresql.conf; later settings win, so this overrides any
    /// port inherited from a template or base backup.
    fn write_port(&self) -> Result<()> {
        append_file(
            &self.data_dir.join("postgresql.conf"),
            &format!("port = {}\n", self.port),
        )
    }

    /// Picks a free port and starts a freshly created data directory, moving to another
    /// port if the chosen one turns out to be taken.
    fn start_on_free_port(&mut self) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = free_port()?;
            self.write_port()?;
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortInUse(e)) if attempt < PORT_ATTEMPTS => {
                    tracing::debug!(node = %self.name, port = self.port, error = %e, "port busy, trying another");
                }
                Err(LaunchError::PortInUse(e)) | Err(LaunchError::Other(e)) => return Err(e),
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_immediate();
        stop_adopted_postmaster(&self.data_dir);
        remove_stale_shmem(&self.data_dir);
    }
}

/// Stops a postmaster that runs on this server's data directory but is not our child: one a
/// failover hook restarted with `pg_ctl start` (after pg_rewind or a rebuild). It is found
/// by the PID in the data directory's own `postmaster.pid`, and only if that process is a
/// `postgres` whose working directory is this data directory.
fn stop_adopted_postmaster(data_dir: &Path) {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else {
        return;
    };
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let ours = match (cwd, fs::canonicalize(data_dir).ok()) {
        (Some(cwd), Some(dir)) => cwd == dir,
        _ => false,
    };
    if !ours || !process_alive(pid) {
        return;
    }
    signal(pid, libc::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if process_alive(pid) {
        signal(pid, libc::SIGKILL);
    }
}

/// Removes the System V shared memory segment recorded in a stale `postmaster.pid`.
///
/// A postmaster that was SIGKILLed cannot remove its (small) segment; PostgreSQL
/// cleans it up on the next start of the same data directory, but a data directory
/// that is wiped or dropped instead would leak it until reboot. Only the segment
/// named in this data directory's own PID file is touched, and only if nothing is
/// attached to it any more.
fn remove_stale_shmem(data_dir: &Path) {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let pid_alive = lines
        .first()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .is_some_and(process_alive);
    if pid_alive {
        return;
    }
    // Line 7 holds "<key> <shmid>".
    let Some(shmid) = lines
        .get(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse::<libc::c_int>().ok())
    else {
        return;
    };
    // SAFETY: shmid_ds is plain old data and shmctl only writes into the buffer we pass.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &raw mut ds) == 0 && ds.shm_nattch == 0 {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

fn pidfile_ready(data_dir: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    // Line 1 is the postmaster PID, line 8 its status ("ready" or "standby" once connections are allowed).
    lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
        && matches!(
            lines.get(7).map(|l| l.trim()),
            Some("ready") | Some("standby")
        )
}

fn append_file(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io_err(format!("appending to {}", path.display())))
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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

    /// Ports handed out are bindable, never repeat within the process (even across
    /// threads), and stay out of the kernel's ephemeral range when there is room below it.
    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let handles: Vec<_> = (0..4)
            .map(|_| thread::spawn(|| (0..50).map(|_| free_port().expect("free port")).collect::<Vec<u16>>()))
            .collect();
        let ports: Vec<u16> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if let Some((low, high)) = non_ephemeral_ports() {
            assert!(ports.iter().all(|p| (low..=high).contains(p)), "{ports:?} not all in {low}-{high}");
        }
        for port in ports.iter().take(20) {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port)).expect("handed-out port binds");
        }
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
