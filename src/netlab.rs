//! A network-namespace lab for integration tests of a VIP that moves between
//! peers: hosts in their own namespaces, joined by a bridge that lives in a
//! "switch" namespace of its own, so nothing touches the root namespace's
//! network. Everything is named after a per-lab prefix (with the test
//! process id) and removed on drop, even when a test panics.
//!
//! Requires root and iproute2; partitions need `nft` (preferred) or
//! `iptables`.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vip::{try_vip_present, IP_BIN};

/// Default sampling period of a [`Sampler`].
pub const DEFAULT_SAMPLE_PERIOD: Duration = Duration::from_millis(50);

/// Name of the nftables tables that implement a partition; one name so heal
/// removes exactly what partition added.
const FAULT_TABLE: &str = "pglifeguard_fault";

/// Distinguishes labs created by the same process.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command exited with a failure.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A host name is empty, too long or has unusual characters.
    #[error("invalid host name {0:?} (1-8 chars of [a-z0-9])")]
    InvalidName(String),
    /// The lab cannot run here (not root, no network namespaces).
    #[error("network namespace lab unavailable: {0}")]
    Unavailable(String),
}

/// Runs a command to completion with stdin closed, failing on a non-zero
/// exit status.
fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let text = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: text.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Failed {
            cmd: text,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip ARGS...`.
fn ip(args: &[&str]) -> Result<Output, LabError> {
    run(Command::new(IP_BIN).args(args))
}

/// Runs a command with `input` on its stdin (for `nft -f -`).
fn run_with_input(cmd: &mut Command, input: &str) -> Result<(), LabError> {
    use std::io::Write;
    let text = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: text.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| LabError::Spawn {
                cmd: text.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        cmd: text.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Failed {
            cmd: text,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether a program is on `PATH` (tests of optional tools).
fn have_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(name).is_file())
}

/// A set of network namespaces on a private bridge.
pub struct Lab {
    prefix: String,
    switch_ns: String,
    /// First three octets of the lab's /24, e.g. `198.18.7`.
    net: String,
    /// Namespaces created so far, deleted in reverse order on drop.
    created: Mutex<Vec<String>>,
    next_index: AtomicU32,
}

/// One host of a [`Lab`]: a namespace with interface `eth0` on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// The short name given to [`Lab::add_host`].
    pub name: String,
    /// The network namespace name (usable with `ip -n` / `ip netns exec`).
    pub netns: String,
    /// The host's address (without prefix), e.g. `198.18.7.1`.
    pub addr: String,
}

impl Lab {
    /// Checks that labs can be created here: root, and `ip netns add` works
    /// (it fails in some sandboxes). Tests call this to skip politely.
    pub fn available() -> Result<(), LabError> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LabError::Unavailable("not running as root".into()));
        }
        // Unique per call: tests run in parallel threads of one process.
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let probe = format!("plgprobe{}x{n}", std::process::id());
        ip(&["netns", "add", &probe]).map_err(|e| LabError::Unavailable(e.to_string()))?;
        ip(&["netns", "del", &probe]).map_err(|e| LabError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Deletes namespaces left by labs of test processes that no longer exist
    /// (killed before their `Drop` ran). Only names of this module's form
    /// `vpl<pid>x<n>-...` whose pid is not a live process are touched.
    /// Called by [`Lab::new`]; returns how many were deleted.
    pub fn remove_leftovers() -> usize {
        let Ok(out) = ip(&["netns", "list"]) else {
            return 0;
        };
        let mut removed = 0;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // Lines look like "NAME" or "NAME (id: 3)".
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix("plg") else {
                continue;
            };
            let Some((pid, tail)) = rest.split_once('x') else {
                continue;
            };
            let Ok(pid) = pid.parse::<i32>() else {
                continue;
            };
            if !tail.contains('-') || std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if ip(&["netns", "del", name]).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Creates a lab: the switch namespace with bridge `br0`. The prefix is
    /// `vpl<pid>x<n>` and the subnet a /24 of 198.18.0.0/15 picked from the
    /// pid and the counter (the switch namespace isolates labs anyway; the
    /// distinct subnets only make captures and logs unambiguous).
    pub fn new() -> Result<Lab, LabError> {
        Lab::remove_leftovers();
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("plg{pid}x{n}");
        let k = (pid.wrapping_mul(7).wrapping_add(n.wrapping_mul(131))) % 512;
        let net = format!("198.{}.{}", 18 + k / 256, k % 256);
        let lab = Lab {
            switch_ns: format!("{prefix}-sw"),
            prefix,
            net,
            created: Mutex::new(Vec::new()),
            next_index: AtomicU32::new(1),
        };
        lab.add_netns(&lab.switch_ns)?;
        let sw = lab.switch_ns.as_str();
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// The lab's name prefix (all its namespaces start with it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An address of the lab's /24 (e.g. `lab.ip(100)` for a VIP).
    pub fn ip(&self, last_octet: u8) -> String {
        format!("{}.{last_octet}", self.net)
    }

    /// Creates a namespace, records it for deletion, and brings `lo` up.
    fn add_netns(&self, ns: &str) -> Result<(), LabError> {
        ip(&["netns", "add", ns])?;
        // Recorded right after creation so a later failure still cleans up.
        if let Ok(mut v) = self.created.lock() {
            v.push(ns.to_string());
        }
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Adds a host `name` (1-8 chars of `[a-z0-9]`): namespace
    /// `<prefix>-<name>`, interface `eth0` with address `198.x.y.N/24` (N =
    /// 1, 2, ... in creation order), its veth peer on the bridge.
    pub fn add_host(&self, name: &str) -> Result<Host, LabError> {
        let valid = !name.is_empty()
            && name.len() <= 8
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(LabError::InvalidName(name.to_string()));
        }
        let idx = self.next_index.fetch_add(1, Ordering::Relaxed);
        if idx > 99 {
            // .100 and up are left for VIPs.
            return Err(LabError::InvalidName(format!("{name}: too many hosts")));
        }
        let ns = format!("{}-{name}", self.prefix);
        self.add_netns(&ns)?;
        let sw = self.switch_ns.as_str();
        // The veth is created in the switch namespace and its peer moved
        // straight into the host: interface names only need to be unique
        // within each namespace, so short fixed names are safe.
        let port = format!("p{idx}");
        ip(&[
            "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", sw, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", sw, "link", "set", &port, "up"])?;
        let addr = self.ip(idx as u8);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(Host {
            name: name.to_string(),
            netns: ns,
            addr,
        })
    }

    /// Connects the root namespace to the bridge: a veth whose root end gets address `.254`
    /// of the lab's /24, so the hosts can reach services of the test process (which runs in
    /// the root namespace). Deleting the switch namespace deletes both ends.
    pub fn uplink(&self) -> Result<String, LabError> {
        let root_end = format!("plgu{}", self.prefix.trim_start_matches("plg"));
        if root_end.len() > 15 {
            return Err(LabError::InvalidName(root_end));
        }
        let sw = self.switch_ns.as_str();
        ip(&["link", "add", &root_end, "type", "veth", "peer", "name", "up0", "netns", sw])?;
        ip(&["-n", sw, "link", "set", "up0", "master", "br0"])?;
        ip(&["-n", sw, "link", "set", "up0", "up"])?;
        let addr = self.ip(254);
        ip(&["addr", "add", &format!("{addr}/24"), "dev", &root_end])?;
        ip(&["link", "set", &root_end, "up"])?;
        Ok(addr)
    }

    /// Starts sampling, every `period`, which of `hosts` have `vip` assigned.
    pub fn sampler(&self, vip: &str, hosts: &[&Host], period: Duration) -> Sampler {
        Sampler::start(vip, hosts, period)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let created = match self.created.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for ns in created.iter().rev() {
            // Processes left inside would keep the namespace (and its veth)
            // alive after the name is removed; they are ours, kill them.
            if let Ok(out) = ip(&["netns", "pids", ns]) {
                for pid in String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: plain kill(2).
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            // Deleting the namespace deletes its interfaces and their veth
            // peers; the bridge goes with the switch namespace.
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("lab cleanup: {e}");
            }
        }
    }
}

impl Host {
    /// A command that runs `program` inside this host's namespace
    /// (`ip netns exec NS program`). Convert with
    /// `tokio::process::Command::from` for async use.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new(IP_BIN);
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// The host's address (without prefix).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether `vip` is assigned to any interface in this host's namespace.
    pub fn has_vip(&self, vip: &str) -> bool {
        try_vip_present(Some(&self.netns), None, vip).unwrap_or(false)
    }

    /// Drops every packet (IPv4/IPv6 and ARP) in and out of this host
    /// except on loopback; links stay up, so processes see silence, not
    /// errors. Uses nftables, or iptables if nft is missing (then ARP is
    /// not blocked).
    pub fn partition(&self) -> Result<(), LabError> {
        if have_program("nft") {
            // Priority -400 is before conntrack (-200): established flows
            // are cut too. Table arp covers ARP, which inet does not see.
            let script = format!(
                "table inet {FAULT_TABLE} {{\n\
                 \tchain in {{ type filter hook input priority -400; policy drop; iifname \"lo\" accept; }}\n\
                 \tchain out {{ type filter hook output priority -400; policy drop; oifname \"lo\" accept; }}\n\
                 }}\n\
                 table arp {FAULT_TABLE} {{\n\
                 \tchain in {{ type filter hook input priority 0; policy drop; }}\n\
                 \tchain out {{ type filter hook output priority 0; policy drop; }}\n\
                 }}\n"
            );
            run_with_input(self.command("nft").args(["-f", "-"]), &script)
        } else {
            for (chain, flag) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
                run(self
                    .command("iptables")
                    .args(["-w", "-I", chain, "1", "!", flag, "lo", "-j", "DROP"]))?;
            }
            Ok(())
        }
    }

    /// Undoes [`Host::partition`]; harmless if not partitioned.
    pub fn heal(&self) -> Result<(), LabError> {
        if have_program("nft") {
            // "add" then "delete" in one batch: idempotent without needing
            // nft's newer "destroy" keyword (nft < 1.0.8).
            let script = format!(
                "add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n\
                 add table arp {FAULT_TABLE}\ndelete table arp {FAULT_TABLE}\n"
            );
            run_with_input(self.command("nft").args(["-f", "-"]), &script)
        } else {
            for (chain, flag) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
                // Delete until gone, in case partition was called twice.
                while run(self
                    .command("iptables")
                    .args(["-w", "-D", chain, "!", flag, "lo", "-j", "DROP"]))
                .is_ok()
                {}
            }
            Ok(())
        }
    }
}

/// One sampling round: which hosts held the VIP.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the round started (before the first host was checked).
    pub start: Instant,
    /// When the round ended (after the last host was checked). A host seen
    /// without the VIP lost it at or before `end`.
    pub end: Instant,
    /// Names of the hosts that had the address assigned.
    pub holders: Vec<String>,
}

struct SamplerShared {
    stop: AtomicBool,
    samples: Mutex<Vec<Sample>>,
    new_sample: Condvar,
}

/// Background sampler of VIP holders (see [`Lab::sampler`]). It checks
/// addresses, not processes: a namespace whose guardian is dead or frozen
/// but still has the address counts as a holder. Hosts of one round are
/// checked one after another (a few ms apart), not atomically.
pub struct Sampler {
    shared: Arc<SamplerShared>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(vip: &str, hosts: &[&Host], period: Duration) -> Sampler {
        let shared = Arc::new(SamplerShared {
            stop: AtomicBool::new(false),
            samples: Mutex::new(Vec::new()),
            new_sample: Condvar::new(),
        });
        let hosts: Vec<Host> = hosts.iter().map(|h| (*h).clone()).collect();
        let vip = vip.to_string();
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vip-sampler".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !s.stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let holders = hosts
                        .iter()
                        .filter(|h| h.has_vip(&vip))
                        .map(|h| h.name.clone())
                        .collect();
                    let sample = Sample {
                        start,
                        end: Instant::now(),
                        holders,
                    };
                    if let Ok(mut v) = s.samples.lock() {
                        v.push(sample);
                    }
                    s.new_sample.notify_all();
                    // Fixed schedule, no drift; skip missed slots if a round
                    // took longer than the period.
                    next += period;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    } else {
                        std::thread::sleep(next - now);
                    }
                }
            })
            .ok();
        Sampler { shared, thread }
    }

    /// A copy of all samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.shared
            .samples
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// The largest number of hosts that held the VIP in one round.
    pub fn max_simultaneous_holders(&self) -> usize {
        self.samples()
            .iter()
            .map(|s| s.holders.len())
            .max()
            .unwrap_or(0)
    }

    /// Waits up to `timeout` for the first sample started at or after
    /// `after` in which a host other than `host` holds the VIP: its end time
    /// and that host's name. Waiting matters: a client may reach the VIP's
    /// new holder before the sampling round that sees it has finished.
    pub fn wait_for_holder_other_than(
        &self,
        host: &str,
        after: Instant,
        timeout: Duration,
    ) -> Option<(Instant, String)> {
        let sample = self.wait_for_since(after, timeout, |holders| holders.iter().any(|h| h != host))?;
        let other = sample.holders.iter().find(|h| h.as_str() != host)?.clone();
        Some((sample.end, other))
    }

    /// Waits up to `timeout` for a sample, started after this call, whose
    /// holders satisfy `pred`; returns it, or None on timeout.
    pub fn wait_for<F>(&self, timeout: Duration, pred: F) -> Option<Sample>
    where
        F: Fn(&[String]) -> bool,
    {
        self.wait_for_since(Instant::now(), timeout, pred)
    }

    /// Waits up to `timeout` (counted from this call) for the first sample
    /// started at or after `after` whose holders satisfy `pred`; returns it,
    /// or None on timeout.
    pub fn wait_for_since<F>(&self, after: Instant, timeout: Duration, pred: F) -> Option<Sample>
    where
        F: Fn(&[String]) -> bool,
    {
        let limit = Instant::now() + timeout;
        let mut guard = self.shared.samples.lock().ok()?;
        loop {
            if let Some(s) = guard.iter().find(|s| s.start >= after && pred(&s.holders)) {
                return Some(s.clone());
            }
            let now = Instant::now();
            if now >= limit {
                return None;
            }
            guard = self
                .shared
                .new_sample
                .wait_timeout(guard, limit - now)
                .ok()?
                .0;
        }
    }

    /// Stops the sampling thread (also done on drop).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}
