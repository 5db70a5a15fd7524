//! One PostgreSQL server of a local cluster: started, stopped, frozen, queried.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::install::{chown_to_server_user, pg_bin, server_command};
use super::ports::free_port;
use super::process::{children_of, process_alive, run, signal, spawn_with_death_signal, tail};
use super::{io_err, ClusterError, Result, POLL_INTERVAL, PORT_ATTEMPTS, PSQL_TIMEOUT, READY_TIMEOUT, TAIL_LINES, TOOL_TIMEOUT};

/// One PostgreSQL server (postmaster) of a [`LocalCluster`](super::LocalCluster), running as our direct child.
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
    pub(super) fn new(name: String, cluster_dir: &Path) -> PgServer {
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
    pub(super) fn poll_until(&self, what: &str, mut cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
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
    pub(super) fn write_port(&self) -> Result<()> {
        append_file(
            &self.data_dir.join("postgresql.conf"),
            &format!("port = {}\n", self.port),
        )
    }

    /// Picks a free port and starts a freshly created data directory, moving to another
    /// port if the chosen one turns out to be taken.
    pub(super) fn start_on_free_port(&mut self) -> Result<()> {
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
pub(super) fn remove_stale_shmem(data_dir: &Path) {
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

pub(super) fn append_file(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io_err(format!("appending to {}", path.display())))
}

pub(super) fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(super) fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
