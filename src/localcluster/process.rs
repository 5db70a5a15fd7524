//! Running the PostgreSQL programs: tools to completion under a time limit, servers as
//! children that die with this process, and what /proc says about a process.

use std::fs;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{io_err, lock, ClusterError, Result, TAIL_LINES};

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(super) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads `pipe` to its end on a helper thread, then sends `(is_stdout, contents)` on `tx`.
/// Returns how many readers it started (0 for no pipe), for the caller to wait on.
fn drain<R: Read + Send + 'static>(pipe: Option<R>, is_stdout: bool, tx: &mpsc::Sender<(bool, Vec<u8>)>) -> usize {
    let Some(mut pipe) = pipe else {
        return 0;
    };
    let tx = tx.clone();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send((is_stdout, buf));
    });
    1
}

/// Runs a command to completion with a time limit and returns its stdout.
pub(super) fn run(mut cmd: Command, timeout: Duration) -> Result<String> {
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
    let readers = drain(child.stdout.take(), true, &tx) + drain(child.stderr.take(), false, &tx);
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

// Servers, as children that die with this process.

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-lifetime spawner thread with a parent-death signal.
///
/// `PR_SET_PDEATHSIG` fires when the forking *thread* exits. Forking from a
/// thread that lives as long as the process means servers get SIGQUIT
/// (immediate shutdown) exactly when this process dies, and never earlier
/// because some short-lived thread (a test thread, a blocking-pool worker)
/// that happened to create the cluster finished.
pub(super) fn spawn_with_death_signal(mut cmd: Command) -> Result<Child> {
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

// Processes, from /proc.

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
pub(super) fn process_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

pub(super) fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| matches!(proc_stat(p), Some((s, pp)) if pp == pid && s != 'Z' && s != 'X'))
        .collect()
}

pub(super) fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; failures (e.g. already exited) are irrelevant here.
    unsafe {
        libc::kill(pid, sig);
    }
}
