//! The VIP guardian: a tiny helper process that holds a virtual IP address
//! only while its parent (the proxy) keeps renewing a lease over a pipe.
//!
//! Why a separate process: an address added with `ip addr add` belongs to the
//! kernel, not to the process that added it. If the proxy is SIGKILLed the
//! address would stay forever, and if the proxy is frozen (SIGSTOP, a long GC
//! like pause, a stuck disk) it would stay while the lease that justified it
//! expires. The guardian is small, does no I/O apart from its pipe and the
//! address commands, and drops the address as soon as the lease deadline
//! passes, whatever happens to the proxy.
//!
//! Protocol (guardian stdin, one command per line, ASCII):
//! * `renew <deadline_ns>`: hold the address until the absolute
//!   CLOCK_MONOTONIC time `deadline_ns` (see [`monotonic_ns`]). The guardian
//!   adds no margin of its own: the proxy computes the deadline from the time
//!   of its last quorum-acknowledged heartbeat.
//! * `release`: drop the address now, keep running.
//! * end of file: drop the address now and exit.
//!
//! The guardian writes one line to stdout per state change: `down` once at
//! start (after removing a stale address) and then `up` / `down`.

use std::ffi::OsString;
use std::fmt;
use std::io::{BufRead, Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Placeholder (pgpool's spelling) replaced by the bare VIP address, without
/// prefix length, in the command templates.
pub const IP_PLACEHOLDER: &str = "$_IP_$";

/// Path of iproute2's `ip`; absolute so the guardian does not depend on `PATH`
/// (it may be started with a minimal environment).
pub const IP_BIN: &str = "/usr/sbin/ip";

/// Default time limit for one if_up / if_down / arping command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a failed drop is retried: the address may still be up, which is
/// the one state we must not stay in, so retry soon.
const DROP_RETRY: Duration = Duration::from_millis(200);

/// Minimum spacing between two attempts to bring the address up after a
/// failure, so a broken if_up command is not run on every renewal.
const UP_RETRY: Duration = Duration::from_secs(1);

/// On EOF or a signal, how long the guardian keeps retrying a failed drop
/// before giving up and exiting with an error.
const EXIT_DROP_PATIENCE: Duration = Duration::from_secs(5);

/// Longest accepted protocol line; anything longer is garbage, not a command.
const MAX_LINE: usize = 256;

/// Errors of the guardian configuration and of the client side.
#[derive(Debug, thiserror::Error)]
pub enum GuardianError {
    /// The VIP is not `ADDRESS` or `ADDRESS/PREFIX`.
    #[error("invalid VIP {vip:?}: {reason}")]
    InvalidVip {
        /// The text given.
        vip: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The interface name is empty, too long, or has characters that would
    /// need shell quoting in the default command templates.
    #[error("invalid interface name {0:?}")]
    InvalidInterface(String),
    /// A command-line argument of the guardian subcommand is wrong.
    #[error("invalid guardian argument: {0}")]
    InvalidArgument(String),
    /// The guardian process could not be started.
    #[error("failed to spawn the VIP guardian: {0}")]
    Spawn(#[source] std::io::Error),
    /// Writing to the guardian's stdin failed (typically: it has exited).
    #[error("failed to write to the VIP guardian: {0}")]
    Pipe(#[source] std::io::Error),
    /// The guardian did not accept a message in time (it is stuck or frozen).
    #[error("VIP guardian did not accept a message within {0:?}")]
    Timeout(Duration),
    /// The guardian's stdin was already closed by this side.
    #[error("VIP guardian stdin is closed")]
    Closed,
}

/// Reads CLOCK_MONOTONIC in nanoseconds.
///
/// Both the proxy and the guardian use this so that a deadline computed in
/// one process means the same instant in the other (same host, same clock;
/// `std::time::Instant` uses the same clock on Linux but is opaque).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux so the call cannot fail with valid arguments.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    // Monotonic time is non-negative and far from u64 overflow (584 years).
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// A parsed virtual IP: address plus prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vip {
    /// The bare address (what replaces [`IP_PLACEHOLDER`]).
    pub addr: IpAddr,
    /// The prefix length used when the address is added; defaults to a host
    /// route (/32 or /128) when the configuration gives a bare address.
    pub prefix_len: u8,
}

impl Vip {
    /// The address as a host prefix (`a.b.c.d/32` or `x::y/128`), the form
    /// `ip addr show to` needs to match exactly this address.
    pub fn host_prefix(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        }
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Vip {
    type Err = GuardianError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| GuardianError::InvalidVip {
            vip: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_text {
            None => max,
            Some(p) => {
                let n: u8 = p.trim().parse().map_err(|_| bad("bad prefix length"))?;
                if n > max {
                    return Err(bad("prefix length too large"));
                }
                n
            }
        };
        Ok(Vip { addr, prefix_len })
    }
}

/// Which `arping` is installed; their flags differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpingFlavor {
    /// Debian package `arping` (Thomas Habets): interface is `-i`, source
    /// address `-S`; exits 1 when the unsolicited ARP gets no reply (which is
    /// normal, so the exit status of arping is only logged).
    Habets,
    /// Debian package `iputils-arping`: interface is `-I` (pgpool's default
    /// `arping -U $_IP_$ -w 1 -I eth0` is written for this one).
    Iputils,
}

impl ArpingFlavor {
    /// Detects the flavor from `arping --help` (Habets's prints its author's
    /// name; iputils' does not). Falls back to iputils, pgpool's assumption,
    /// when arping is missing or says nothing recognizable.
    pub fn detect() -> ArpingFlavor {
        let out = std::process::Command::new("arping")
            .arg("--help")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => {
                let text = [o.stdout, o.stderr].concat();
                if String::from_utf8_lossy(&text).contains("Habets") {
                    ArpingFlavor::Habets
                } else {
                    ArpingFlavor::Iputils
                }
            }
            Err(_) => ArpingFlavor::Iputils,
        }
    }
}

/// Configuration of one guardian: which address, where, and how to add,
/// remove and announce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardianConfig {
    /// The virtual IP, `ADDRESS/PREFIX` (e.g. `198.18.0.100/24`) or a bare
    /// address (then a host prefix is used by the default commands).
    pub vip: String,
    /// Interface the address is added to (e.g. `eth0`).
    pub interface: String,
    /// Shell template that adds the address; `$_IP_$` is the bare address.
    pub if_up_cmd: String,
    /// Shell template that removes the address; `$_IP_$` is the bare address.
    pub if_down_cmd: String,
    /// Shell template that announces the address (gratuitous ARP); its
    /// failure is only logged. Empty disables it.
    pub arping_cmd: String,
    /// Time limit for each command; the command's process group is killed
    /// when it is exceeded. Keep it well below the lease length: a drop can
    /// be delayed by a hanging if_down.
    pub command_timeout: Duration,
}

/// Checks that an interface name is a plausible Linux name that needs no
/// shell quoting (it is pasted into the default command templates).
fn validate_interface(name: &str) -> Result<(), GuardianError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(GuardianError::InvalidInterface(name.to_string()))
    }
}

impl GuardianConfig {
    /// A configuration with the default commands for `vip` on `interface`
    /// (arping flavor detected on this host).
    pub fn new(vip: &str, interface: &str) -> Result<GuardianConfig, GuardianError> {
        Self::with_arping(vip, interface, None)
    }

    /// Like [`GuardianConfig::new`], but with a given arping command, so the
    /// flavor detection (which runs `arping --help`) is skipped.
    fn with_arping(
        vip: &str,
        interface: &str,
        arping_cmd: Option<String>,
    ) -> Result<GuardianConfig, GuardianError> {
        let parsed: Vip = vip.parse()?;
        validate_interface(interface)?;
        Ok(GuardianConfig {
            vip: vip.to_string(),
            interface: interface.to_string(),
            if_up_cmd: Self::default_if_up_cmd(&parsed, interface),
            if_down_cmd: Self::default_if_down_cmd(&parsed, interface),
            arping_cmd: if let Some(c) = arping_cmd {
                c
            } else if parsed.addr.is_ipv4() {
                Self::default_arping_cmd(interface, ArpingFlavor::detect())
            } else {
                // ARP is IPv4 only; IPv6 would need unsolicited NA, not done.
                String::new()
            },
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        })
    }

    /// Default if_up: `ip addr add $_IP_$/<prefix> dev <if> label <if>:0`.
    /// The label (pgpool's habit, shows as `eth0:0`) is left out when it would
    /// exceed the kernel's 15-character limit.
    pub fn default_if_up_cmd(vip: &Vip, interface: &str) -> String {
        let label = format!("{interface}:0");
        let label_part = if label.len() <= 15 && vip.addr.is_ipv4() {
            format!(" label {label}")
        } else {
            String::new()
        };
        format!(
            "{IP_BIN} addr add {IP_PLACEHOLDER}/{} dev {interface}{label_part}",
            vip.prefix_len
        )
    }

    /// Default if_down: `ip addr del $_IP_$/<prefix> dev <if>`.
    pub fn default_if_down_cmd(vip: &Vip, interface: &str) -> String {
        format!(
            "{IP_BIN} addr del {IP_PLACEHOLDER}/{} dev {interface}",
            vip.prefix_len
        )
    }

    /// Default gratuitous-ARP command for the given arping flavor: one
    /// unsolicited ARP, at most one second.
    pub fn default_arping_cmd(interface: &str, flavor: ArpingFlavor) -> String {
        match flavor {
            ArpingFlavor::Habets => {
                // -S: without it Habets's arping takes the source address
                // from the interface and fails if the VIP is its only one.
                format!(
                    "arping -q -U -S {IP_PLACEHOLDER} -c 1 -w 1 -i {interface} {IP_PLACEHOLDER}"
                )
            }
            ArpingFlavor::Iputils => {
                format!("arping -q -U -c 1 -w 1 -I {interface} {IP_PLACEHOLDER}")
            }
        }
    }

    /// The VIP parsed.
    pub fn parsed_vip(&self) -> Result<Vip, GuardianError> {
        self.vip.parse()
    }

    /// The guardian subcommand arguments that reproduce this configuration
    /// (see [`GuardianConfig::from_args`]).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--vip".into(),
            self.vip.clone(),
            "--interface".into(),
            self.interface.clone(),
            "--if-up-cmd".into(),
            self.if_up_cmd.clone(),
            "--if-down-cmd".into(),
            self.if_down_cmd.clone(),
            "--arping-cmd".into(),
            self.arping_cmd.clone(),
            "--command-timeout-ms".into(),
            self.command_timeout.as_millis().to_string(),
        ]
    }

    /// Parses guardian subcommand arguments. `--vip` and `--interface` are
    /// required; missing commands get their defaults. Returns the
    /// configuration and the optional `--parent-pid`.
    pub fn from_args<I>(args: I) -> Result<(GuardianConfig, Option<i32>), GuardianError>
    where
        I: IntoIterator<Item = OsString>,
    {
        let mut vip = None;
        let mut interface = None;
        let mut if_up = None;
        let mut if_down = None;
        let mut arping = None;
        let mut timeout = None;
        let mut parent_pid = None;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let flag = flag
                .into_string()
                .map_err(|f| GuardianError::InvalidArgument(format!("{f:?}")))?;
            let mut value = || -> Result<String, GuardianError> {
                it.next()
                    .ok_or_else(|| GuardianError::InvalidArgument(format!("{flag} needs a value")))?
                    .into_string()
                    .map_err(|v| GuardianError::InvalidArgument(format!("{flag} {v:?}")))
            };
            match flag.as_str() {
                "--vip" => vip = Some(value()?),
                "--interface" => interface = Some(value()?),
                "--if-up-cmd" => if_up = Some(value()?),
                "--if-down-cmd" => if_down = Some(value()?),
                "--arping-cmd" => arping = Some(value()?),
                "--command-timeout-ms" => {
                    let v = value()?;
                    let ms: u64 = v.parse().map_err(|_| {
                        GuardianError::InvalidArgument(format!("--command-timeout-ms {v:?}"))
                    })?;
                    timeout = Some(Duration::from_millis(ms));
                }
                "--parent-pid" => {
                    let v = value()?;
                    let pid: i32 = v.parse().map_err(|_| {
                        GuardianError::InvalidArgument(format!("--parent-pid {v:?}"))
                    })?;
                    parent_pid = Some(pid);
                }
                other => {
                    return Err(GuardianError::InvalidArgument(format!(
                        "unknown argument {other:?}"
                    )))
                }
            }
        }
        let vip = vip.ok_or_else(|| GuardianError::InvalidArgument("--vip is required".into()))?;
        let interface = interface
            .ok_or_else(|| GuardianError::InvalidArgument("--interface is required".into()))?;
        let mut cfg = GuardianConfig::with_arping(&vip, &interface, arping)?;
        if let Some(c) = if_up {
            cfg.if_up_cmd = c;
        }
        if let Some(c) = if_down {
            cfg.if_down_cmd = c;
        }
        if let Some(t) = timeout {
            cfg.command_timeout = t;
        }
        Ok((cfg, parent_pid))
    }
}

/// Replaces [`IP_PLACEHOLDER`] in a command template by the bare address.
pub fn expand_template(template: &str, vip: &Vip) -> String {
    template.replace(IP_PLACEHOLDER, &vip.addr.to_string())
}

/// Whether `vip` (bare or with prefix) is assigned to `interface` in the
/// current network namespace. Any failure to ask counts as "not present";
/// use [`try_vip_present`] to tell the two apart.
pub fn vip_present(interface: &str, vip: &str) -> bool {
    try_vip_present(None, Some(interface), vip).unwrap_or(false)
}

/// Whether `vip` is assigned, asked with `ip [-n NETNS] -o addr show [dev IF]
/// to ADDR/32`. `netns` selects a named network namespace, `interface` limits
/// the check to one interface (None: any interface).
pub fn try_vip_present(
    netns: Option<&str>,
    interface: Option<&str>,
    vip: &str,
) -> std::io::Result<bool> {
    let parsed: Vip = vip
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut cmd = std::process::Command::new(IP_BIN);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-o", "addr", "show"]);
    if let Some(dev) = interface {
        cmd.args(["dev", dev]);
    }
    cmd.args(["to", &parsed.host_prefix()]);
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip addr show failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // `to ADDR/32` already filters; any output line means the address is there.
    Ok(out.stdout.iter().any(|b| !b.is_ascii_whitespace()))
}

// ---------------------------------------------------------------------------
// Guardian process side
// ---------------------------------------------------------------------------

/// One parsed protocol line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `renew <deadline_ns>`.
    Renew(u64),
    /// `release`.
    Release,
}

/// Parses one protocol line (without its newline).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("renew"), Some(n), None) => n
            .parse::<u64>()
            .map(Request::Renew)
            .map_err(|_| format!("bad deadline in {line:?}")),
        (Some("release"), None, None) => Ok(Request::Release),
        _ => Err(format!("unknown request {line:?}")),
    }
}

/// What the guardian's input thread delivers to its loop.
enum Input {
    Request(Request),
    /// End of file or a read error: the parent is gone or let go of us.
    Eof,
}

/// Runs an if_up / if_down / arping command like a hook (`sh -c`, own process group killed
/// on timeout or when dropped, output logged). Returns whether it exited with status 0.
async fn run_shell(what: &str, command: &str, limit: Duration) -> bool {
    crate::hooks::run(what, command, limit).await.0 == crate::hooks::HookOutcome::Success
}

/// What the guardian believes about the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not assigned (if_down succeeded or it was verified absent).
    Down,
    /// Assigned by us (if_up succeeded).
    Up,
    /// A drop failed: it may still be assigned; retried every [`DROP_RETRY`].
    Unknown,
}

/// The state of a running guardian.
struct GuardianLoop {
    cfg: GuardianConfig,
    vip: Vip,
    held: Held,
    deadline_ns: Option<u64>,
    arping: Option<tokio::task::JoinHandle<()>>,
    next_up_attempt: Instant,
    out: std::sync::mpsc::Sender<&'static str>,
    /// Last line written, so each state change is reported exactly once.
    reported: Option<&'static str>,
}

impl GuardianLoop {
    fn expand(&self, template: &str) -> String {
        expand_template(template, &self.vip)
    }

    fn emit(&mut self, line: &'static str) {
        if self.reported == Some(line) {
            return;
        }
        self.reported = Some(line);
        // The writer thread may be gone if stdout is closed; nothing to do.
        let _ = self.out.send(line);
    }

    /// Whether the address is verifiably absent from every interface here.
    fn verified_absent(&self) -> bool {
        matches!(
            try_vip_present(None, None, &self.vip.to_string()),
            Ok(false)
        )
    }

    /// Removes the address. Emits `down` when leaving the Up state.
    async fn drop_vip(&mut self, why: &str) {
        if let Some(task) = self.arping.take() {
            // Announcing an address we are dropping would be wrong.
            task.abort();
        }
        if self.held == Held::Down {
            return;
        }
        info!(vip = %self.vip, why, "dropping VIP");
        let cmd = self.expand(&self.cfg.if_down_cmd);
        let ok = run_shell("if_down", &cmd, self.cfg.command_timeout).await;
        // A failed if_down may just mean the address was already gone
        // (removed by hand); check before declaring the state unknown.
        if ok || self.verified_absent() {
            self.held = Held::Down;
            self.emit("down");
        } else {
            error!(vip = %self.vip, "VIP may still be assigned; retrying the drop");
            self.held = Held::Unknown;
        }
    }

    /// Adds the address if it is not held, then announces it in the background.
    async fn bring_up(&mut self) {
        if self.held == Held::Up {
            return;
        }
        if Instant::now() < self.next_up_attempt {
            debug!("if_up failed recently; not retrying yet");
            return;
        }
        if self.held == Held::Unknown {
            // Start from a known state so that if_up's result means something.
            self.drop_vip("clearing unknown state before if_up").await;
            if self.held != Held::Down {
                return;
            }
        }
        info!(vip = %self.vip, "bringing VIP up");
        let cmd = self.expand(&self.cfg.if_up_cmd);
        if run_shell("if_up", &cmd, self.cfg.command_timeout).await {
            self.held = Held::Up;
            self.emit("up");
            if !self.cfg.arping_cmd.trim().is_empty() {
                let cmd = self.expand(&self.cfg.arping_cmd);
                let limit = self.cfg.command_timeout;
                // In the background: arping can take a second, and the loop
                // must stay free to drop the address at the deadline.
                self.arping = Some(tokio::spawn(async move {
                    run_shell("arping", &cmd, limit).await;
                }));
            }
        } else {
            self.next_up_attempt = Instant::now() + UP_RETRY;
            // if_up may have half-worked (e.g. timed out after adding).
            self.held = Held::Unknown;
            self.drop_vip("cleaning up after failed if_up").await;
        }
    }

    /// When the loop must wake up next without input.
    fn next_wake(&self) -> Option<Instant> {
        match self.held {
            Held::Up => self.deadline_ns.map(ns_to_instant),
            Held::Unknown => Some(Instant::now() + DROP_RETRY),
            Held::Down => None,
        }
    }

    fn lease_valid(&self) -> bool {
        self.deadline_ns.is_some_and(|d| monotonic_ns() < d)
    }

    /// Drops the address, retrying for a while, before exiting.
    async fn drop_for_exit(&mut self, why: &str) -> ExitCode {
        self.deadline_ns = None;
        let give_up = Instant::now() + EXIT_DROP_PATIENCE;
        loop {
            self.drop_vip(why).await;
            if self.held == Held::Down {
                return ExitCode::SUCCESS;
            }
            if Instant::now() >= give_up {
                error!(vip = %self.vip, "could not drop VIP before exiting");
                return ExitCode::FAILURE;
            }
            tokio::time::sleep(DROP_RETRY).await;
        }
    }
}

/// Converts an absolute CLOCK_MONOTONIC time into a tokio instant. Both are
/// the same clock on Linux, so the only error is the few nanoseconds between
/// the two reads below.
fn ns_to_instant(deadline_ns: u64) -> Instant {
    let now_i = Instant::now();
    let now_ns = monotonic_ns();
    if deadline_ns <= now_ns {
        now_i
    } else {
        now_i + Duration::from_nanos(deadline_ns - now_ns)
    }
}

/// Reads protocol lines from stdin on a plain thread (a blocking read must
/// not hold up the runtime, nor its shutdown).
fn spawn_stdin_reader(tx: mpsc::UnboundedSender<Input>) {
    let spawned = std::thread::Builder::new()
        .name("guardian-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut reader = stdin.lock();
            let mut buf = Vec::with_capacity(64);
            loop {
                buf.clear();
                // Read at most MAX_LINE+1 bytes per line so garbage without
                // newlines cannot grow memory.
                let n = match Read::take(&mut reader, MAX_LINE as u64 + 1)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "reading stdin failed; treating as EOF");
                        let _ = tx.send(Input::Eof);
                        return;
                    }
                };
                if n == 0 {
                    let _ = tx.send(Input::Eof);
                    return;
                }
                if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
                    warn!("over-long input line ignored");
                    // Skip the rest of that line.
                    let mut sink = Vec::new();
                    if matches!(reader.read_until(b'\n', &mut sink), Ok(0) | Err(_)) {
                        let _ = tx.send(Input::Eof);
                        return;
                    }
                    continue;
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match parse_request(line) {
                    Ok(r) => {
                        if tx.send(Input::Request(r)).is_err() {
                            return;
                        }
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        });
    if let Err(e) = spawned {
        error!(error = %e, "cannot start the stdin reader");
    }
}

/// Writes state lines to stdout on a plain thread: if the parent is frozen
/// and the pipe fills up, only this thread blocks, never the drop logic.
fn spawn_stdout_writer() -> std::sync::mpsc::Sender<&'static str> {
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let spawned = std::thread::Builder::new()
        .name("guardian-stdout".into())
        .spawn(move || {
            let stdout = std::io::stdout();
            for line in rx {
                let mut lock = stdout.lock();
                // EPIPE (parent gone) is expected; Rust ignores SIGPIPE.
                if writeln!(lock, "{line}").and_then(|_| lock.flush()).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        error!(error = %e, "cannot start the stdout writer");
    }
    tx
}

/// Asks the kernel to send SIGTERM when the parent dies, and checks that the
/// parent did not already die before that (the classic race).
fn arm_parent_death_signal(expected_parent: Option<i32>) -> bool {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "PR_SET_PDEATHSIG failed");
    }
    // SAFETY: getppid cannot fail.
    let ppid = unsafe { libc::getppid() };
    match expected_parent {
        Some(p) => ppid == p,
        // Without an expected pid, being adopted by init means the parent died.
        None => ppid != 1,
    }
}

/// Entry point of the guardian subcommand: parses `args` (those after the
/// subcommand name), runs the guardian, and returns the process exit code.
/// Logging must be set up by the caller (tracing to stderr).
pub fn guardian_main<I>(args: I) -> ExitCode
where
    I: IntoIterator<Item = OsString>,
{
    let (cfg, parent_pid) = match GuardianConfig::from_args(args) {
        Ok(v) => v,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    // One thread is plenty and keeps the guardian light.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(run_guardian(cfg, parent_pid));
    // Do not wait for the stdin thread (blocked in read) at runtime drop.
    rt.shutdown_background();
    code
}

/// The guardian itself, for [`guardian_main`].
async fn run_guardian(cfg: GuardianConfig, parent_pid: Option<i32>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};

    let vip = match cfg.parsed_vip() {
        Ok(v) => v,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Signals that mean "stop": drop first, then exit. SIGINT/SIGHUP too, in
    // case someone runs it by hand in a terminal.
    let mut signals = Vec::new();
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        match signal(kind) {
            Ok(s) => signals.push(s),
            Err(e) => {
                error!(error = %e, "cannot install signal handler");
                return ExitCode::FAILURE;
            }
        }
    }
    let [mut sigterm, mut sigint, mut sighup] = match <[_; 3]>::try_from(signals) {
        Ok(a) => a,
        Err(_) => return ExitCode::FAILURE,
    };
    // Only now that SIGTERM is caught: a parent-death SIGTERM arriving
    // earlier would kill us without the drop.
    let parent_alive = arm_parent_death_signal(parent_pid);

    let mut g = GuardianLoop {
        cfg,
        vip,
        // Assume the worst so the stale-address check below really drops.
        held: Held::Unknown,
        deadline_ns: None,
        arping: None,
        next_up_attempt: Instant::now(),
        out: spawn_stdout_writer(),
        reported: None,
    };
    info!(vip = %g.vip, interface = %g.cfg.interface, pid = std::process::id(), "VIP guardian started");

    // A previous guardian may have died with the address up (SIGKILL, power
    // loss of the process, ...). Remove it before anything else.
    if g.verified_absent() {
        g.held = Held::Down;
        g.emit("down");
    } else {
        warn!(vip = %g.vip, "VIP present at start (stale); removing it");
        g.drop_vip("stale address at start").await;
    }
    if !parent_alive {
        warn!("parent already gone at start");
        return g.drop_for_exit("parent gone").await;
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    spawn_stdin_reader(tx);

    loop {
        let wake = g.next_wake();
        tokio::select! {
            // Signals and timers first: dropping is never delayed by a flood
            // of input.
            biased;
            _ = sigterm.recv() => return g.drop_for_exit("SIGTERM").await,
            _ = sigint.recv() => return g.drop_for_exit("SIGINT").await,
            _ = sighup.recv() => return g.drop_for_exit("SIGHUP").await,
            _ = sleep_until_opt(wake), if wake.is_some() => {
                match g.held {
                    Held::Up if !g.lease_valid() => g.drop_vip("lease expired").await,
                    Held::Unknown => g.drop_vip("retrying failed drop").await,
                    // Woke a hair early (timer rounding): loop recomputes.
                    _ => {}
                }
            }
            input = rx.recv() => match input {
                Some(Input::Request(Request::Renew(deadline))) => {
                    let now = monotonic_ns();
                    debug!(deadline, remaining_ms = deadline.saturating_sub(now) / 1_000_000, "renew");
                    // The latest renewal is authoritative, even if shorter:
                    // the proxy knows its lease, we do not.
                    g.deadline_ns = Some(deadline);
                    if now < deadline {
                        g.bring_up().await;
                        // if_up took time; the deadline may have passed
                        // meanwhile, the next loop turn's timer handles it.
                    } else {
                        g.drop_vip("renewal with a past deadline").await;
                    }
                }
                Some(Input::Request(Request::Release)) => {
                    g.deadline_ns = None;
                    g.drop_vip("release requested").await;
                }
                Some(Input::Eof) | None => return g.drop_for_exit("stdin closed").await,
            },
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------
// Client (proxy) side
// ---------------------------------------------------------------------------

/// The VIP state as reported by the guardian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipState {
    /// The guardian has not reported yet (it is removing a stale address).
    Starting,
    /// The guardian reported the address down.
    Down,
    /// The guardian reported the address up.
    Up,
    /// The guardian's stdout closed: it exited (normally after dropping the
    /// address; if it was SIGKILLed the address may remain).
    Exited,
}

/// Handle to a running guardian process, held by the proxy.
///
/// Dropping it closes the guardian's stdin, which makes the guardian drop
/// the address and exit. It never kills the guardian with SIGKILL on drop:
/// that would leave the address behind.
pub struct Guardian {
    child: Child,
    stdin: Option<ChildStdin>,
    state: watch::Receiver<VipState>,
    write_timeout: Duration,
}

impl Guardian {
    /// Spawns `exe args... <config args> --parent-pid <our pid>`, e.g.
    /// `exe = /proc/self/exe, args = ["vip-guardian"]`.
    ///
    /// Spawn from a thread that lives as long as the guardian should (a
    /// tokio worker or the main thread, not a `spawn_blocking` thread): the
    /// parent-death signal fires when the *thread* that forked exits.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        exe: &Path,
        args: &[S],
        config: &GuardianConfig,
    ) -> Result<Guardian, GuardianError> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .args(config.to_args())
            .args(["--parent-pid".to_string(), std::process::id().to_string()]);
        Guardian::spawn_command(cmd, config.command_timeout)
    }

    /// Spawns a prepared command (for wrappers such as `ip netns exec` or a
    /// test's intermediate shell). Sets up the pipes and puts the child in
    /// its own process group, so stopping or signalling the proxy's group
    /// (`kill -STOP -PGID`, Ctrl-Z, Ctrl-C) does not reach the guardian.
    /// `write_timeout` bounds each write to the guardian's stdin.
    pub fn spawn_command(
        mut cmd: Command,
        write_timeout: Duration,
    ) -> Result<Guardian, GuardianError> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(GuardianError::Spawn)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = watch::channel(VipState::Starting);
        if let Some(stdout) = stdout {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    match lines.next_line().await {
                        Ok(Some(line)) => {
                            let s = match line.trim() {
                                "up" => VipState::Up,
                                "down" => VipState::Down,
                                other => {
                                    warn!(line = other, "unexpected line from VIP guardian");
                                    continue;
                                }
                            };
                            let _ = tx.send(s);
                        }
                        Ok(None) | Err(_) => {
                            let _ = tx.send(VipState::Exited);
                            return;
                        }
                    }
                }
            });
        }
        Ok(Guardian {
            child,
            stdin,
            state: rx,
            write_timeout,
        })
    }

    /// The guardian's pid, if it is still known.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// A receiver of the VIP state reported by the guardian.
    pub fn state(&self) -> watch::Receiver<VipState> {
        self.state.clone()
    }

    async fn send(&mut self, line: String) -> Result<(), GuardianError> {
        let stdin = self.stdin.as_mut().ok_or(GuardianError::Closed)?;
        let limit = self.write_timeout;
        let write = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(r) => r.map_err(GuardianError::Pipe),
            Err(_) => Err(GuardianError::Timeout(limit)),
        }
    }

    /// Extends the lease to the absolute CLOCK_MONOTONIC time `deadline_ns`
    /// (see [`monotonic_ns`]); brings the address up if it is not.
    pub async fn renew(&mut self, deadline_ns: u64) -> Result<(), GuardianError> {
        self.send(format!("renew {deadline_ns}\n")).await
    }

    /// Asks the guardian to drop the address now (it keeps running).
    pub async fn release(&mut self) -> Result<(), GuardianError> {
        self.send("release\n".to_string()).await
    }

    /// Closes the guardian's stdin: it drops the address and exits.
    pub fn close(&mut self) {
        self.stdin = None;
    }

    /// Closes stdin and waits up to `limit` for the guardian to exit; then
    /// sends SIGTERM (which also drops) and waits again as long.
    pub async fn shutdown(mut self, limit: Duration) -> std::io::Result<ExitStatus> {
        self.close();
        if let Ok(r) = tokio::time::timeout(limit, self.child.wait()).await {
            return r;
        }
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: plain kill(2) of our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "VIP guardian did not exit",
            )),
        }
    }

    /// Waits for the guardian process to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vips() {
        let v: Vip = "198.18.0.100/24".parse().expect("valid");
        assert_eq!(v.prefix_len, 24);
        assert_eq!(v.host_prefix(), "198.18.0.100/32");
        let v: Vip = "198.18.0.100".parse().expect("valid");
        assert_eq!(v.prefix_len, 32);
        assert!("198.18.0.100/33".parse::<Vip>().is_err());
        assert!("nope".parse::<Vip>().is_err());
        let v: Vip = "2001:db8::1/64".parse().expect("valid");
        assert_eq!(v.host_prefix(), "2001:db8::1/128");
    }

    #[test]
    fn default_commands() {
        let v: Vip = "198.18.0.100/24".parse().expect("valid");
        assert_eq!(
            expand_template(&GuardianConfig::default_if_up_cmd(&v, "eth0"), &v),
            "/usr/sbin/ip addr add 198.18.0.100/24 dev eth0 label eth0:0"
        );
        assert_eq!(
            expand_template(&GuardianConfig::default_if_down_cmd(&v, "eth0"), &v),
            "/usr/sbin/ip addr del 198.18.0.100/24 dev eth0"
        );
        // Label would be 16 chars: left out.
        assert!(!GuardianConfig::default_if_up_cmd(&v, "abcdefghijklmn").contains("label"));
        assert!(GuardianConfig::new("198.18.0.1/24", "eth0; rm -rf /").is_err());
    }

    #[test]
    fn args_round_trip() {
        let mut cfg = GuardianConfig::new("198.18.0.100/24", "eth0").expect("valid");
        cfg.command_timeout = Duration::from_millis(1500);
        cfg.if_up_cmd = "echo up $_IP_$".into();
        let mut args: Vec<OsString> = cfg.to_args().into_iter().map(OsString::from).collect();
        args.push("--parent-pid".into());
        args.push("42".into());
        let (back, ppid) = GuardianConfig::from_args(args).expect("parses");
        assert_eq!(back, cfg);
        assert_eq!(ppid, Some(42));
        assert!(GuardianConfig::from_args(vec![OsString::from("--vip")]).is_err());
    }

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request("renew 123"), Ok(Request::Renew(123)));
        assert_eq!(parse_request("release"), Ok(Request::Release));
        assert!(parse_request("renew").is_err());
        assert!(parse_request("renew -1").is_err());
        assert!(parse_request("renew 1 2").is_err());
    }

    #[test]
    fn monotonic_matches_instant_clock() {
        // Instant is CLOCK_MONOTONIC on Linux: ns_to_instant must agree.
        let target = monotonic_ns() + 50_000_000;
        let inst = ns_to_instant(target);
        let d = inst.saturating_duration_since(Instant::now());
        assert!(
            d <= Duration::from_millis(50) && d >= Duration::from_millis(45),
            "{d:?}"
        );
    }
}
