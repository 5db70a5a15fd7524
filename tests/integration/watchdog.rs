//! Watchdog: pglifeguard peers as real processes on loopback elect one leader, survive the
//! leader's death, take a witness's vote, and fail a backend over only when a quorum of them
//! sees it failed, running the hook once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pglifeguard::localcluster::{ClusterOptions, LocalCluster};

use crate::common::{connect, pg_tool, wait_until};

/// A port for a peer process to bind; never one handed to another test of this process.
fn free_port() -> u16 {
    pglifeguard::localcluster::free_port().expect("free port")
}

/// One voter: a proxy (`run`) or a witness, as a child process stopped by PID on drop.
struct Peer {
    id: u64,
    child: tokio::process::Child,
    /// Client port (proxies only).
    port: u16,
    /// Admin HTTP address (proxies only).
    admin: Option<std::net::SocketAddr>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Peer {
    async fn watchdog(&self) -> String {
        match self.admin {
            Some(a) => watchdog_text(a).await,
            None => String::new(),
        }
    }

    async fn view(&self) -> (u64, Option<u64>, bool) {
        parse_view(&self.watchdog().await)
    }
}

/// `/watchdog` of a proxy; empty while it is not listening yet.
async fn watchdog_text(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let mut out = String::new();
    if s.write_all(b"GET /watchdog HTTP/1.0\r\n\r\n").await.is_err() || s.read_to_string(&mut out).await.is_err() {
        return String::new();
    }
    out
}

/// (term, leader id, lease valid) from a `/watchdog` answer.
fn parse_view(text: &str) -> (u64, Option<u64>, bool) {
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}\t")).map(str::to_owned)).unwrap_or_default()
    };
    (field("term").parse().unwrap_or(0), field("leader").parse().ok(), field("lease").starts_with("valid"))
}

/// A set of voters sharing one throwaway directory.
struct Peers {
    dir: tempfile::TempDir,
    raft_ports: Vec<(u64, u16, bool)>,
}

impl Peers {
    /// `voters`: (id, witness) for every voter.
    fn new(voters: &[(u64, bool)]) -> Peers {
        let dir = tempfile::tempdir().expect("tempdir");
        let raft_ports = voters.iter().map(|&(id, witness)| (id, free_port(), witness)).collect();
        Peers { dir, raft_ports }
    }

    fn watchdog_yaml(&self, id: u64) -> String {
        let (_, port, _) = self.raft_ports.iter().find(|(i, _, _)| *i == id).expect("voter");
        let mut peers = String::new();
        for (other, p, witness) in &self.raft_ports {
            if *other != id {
                peers.push_str(&format!("    - {{ id: {other}, addr: \"127.0.0.1:{p}\", witness: {witness} }}\n"));
            }
        }
        format!(
            "watchdog:\n  node_id: {id}\n  listen: 127.0.0.1:{port}\n  state_dir: raft{id}\n  peers:\n{peers}\
             \x20 heartbeat_interval: 100ms\n  election_timeout_min: 400ms\n  election_timeout_max: 700ms\n  lease: 600ms\n"
        )
    }

    fn spawn(&self, args: &[&str], id: u64) -> tokio::process::Child {
        let log = std::fs::File::create(self.dir.path().join(format!("peer{id}.log"))).expect("log file");
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"))
            .args(args)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start peer")
    }

    /// Starts proxy `id` in front of `cluster`; `extra` is appended to its config.
    fn proxy(&self, id: u64, cluster: &LocalCluster, extra: &str) -> Peer {
        self.proxy_checking(id, cluster, extra, "postgres")
    }

    /// Like [`Peers::proxy`], with the database its health checks log in to.
    fn proxy_checking(&self, id: u64, cluster: &LocalCluster, extra: &str, health_db: &str) -> Peer {
        let (port, admin) = (free_port(), free_port());
        let config = format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nbackends:\n{}\
             pool:\n  checkout_timeout: 30s\nhealth_check:\n  database: {health_db}\n  period: 300ms\n  timeout: 2s\n  max_retries: 1\n  retry_delay: 100ms\n\
             {}{extra}",
            cluster.backends_yaml(),
            self.watchdog_yaml(id)
        );
        let path = self.dir.path().join(format!("peer{id}.yaml"));
        std::fs::write(&path, config).expect("write config");
        let child = self.spawn(&["--log", "info,openraft=warn", "run", "--config", path.to_str().expect("utf-8")], id);
        Peer { id, child, port, admin: Some(([127, 0, 0, 1], admin).into()) }
    }

    fn witness(&self, id: u64) -> Peer {
        let path = self.dir.path().join(format!("witness{id}.yaml"));
        std::fs::write(&path, self.watchdog_yaml(id)).expect("write config");
        let child = self.spawn(&["--log", "info,openraft=warn", "witness", "--config", path.to_str().expect("utf-8")], id);
        Peer { id, child, port: 0, admin: None }
    }

    fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("peer{id}.log"))).unwrap_or_default()
    }

    /// Every voter's log, headed by its id: when no leader emerges, the peer that is missing
    /// (one that could not start, say) is the one to read.
    fn logs(&self) -> String {
        self.raft_ports.iter().map(|(id, _, _)| format!("--- peer {id} ---\n{}", self.log(*id))).collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Waits until every proxy in `peers` names the same leader, that leader has a valid lease
/// and no other proxy has one; returns (leader, term).
async fn agreed_leader(peers: &[&Peer], timeout: Duration) -> Option<(u64, u64)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut views = Vec::new();
        for p in peers {
            views.push((p.id, p.view().await));
        }
        let leader = views[0].1 .1;
        let all_agree = views.iter().all(|(_, (_, l, _))| *l == leader && leader.is_some());
        let holders: Vec<u64> = views.iter().filter(|(_, (_, _, lease))| *lease).map(|(id, _)| *id).collect();
        if let (true, Some(l)) = (all_agree, leader) {
            if holders == [l] {
                let term = views.iter().map(|(_, (t, _, _))| *t).max().unwrap_or(0);
                return Some((l, term));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cluster(standbys: usize) -> LocalCluster {
    crate::common::start_suite_watchdog();
    LocalCluster::start(&ClusterOptions { standbys, synchronous: standbys > 0, ..Default::default() }).expect("cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_elect_one_leader_and_replace_it_when_it_dies() {
    let cluster = cluster(0);
    let peers = Peers::new(&[(1, false), (2, false), (3, false)]);
    let mut procs: Vec<Peer> = (1..=3).map(|id| peers.proxy(id, &cluster, "")).collect();
    let all: Vec<&Peer> = procs.iter().collect();
    let (leader, term) = agreed_leader(&all, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no leader:\n{}", peers.logs()));
    for p in &procs {
        let agreed = wait_until(Duration::from_secs(10), || async { p.watchdog().await.contains("agreed primary\tnode0") }).await;
        assert!(agreed, "peer {} knows the agreed primary: {}", p.id, p.watchdog().await);
    }

    // SIGKILL the leader: the two others elect a new one in a later term.
    let victim = procs.iter().position(|p| p.id == leader).expect("leader is a proxy");
    let mut dead = procs.remove(victim);
    dead.child.kill().await.expect("kill leader");
    let rest: Vec<&Peer> = procs.iter().collect();
    let (new_leader, new_term) =
        agreed_leader(&rest, Duration::from_secs(15)).await.unwrap_or_else(|| panic!("no new leader:\n{}", peers.log(procs[0].id)));
    assert_ne!(new_leader, leader);
    assert!(new_term > term, "term {new_term} after {term}");
    // Sessions keep working through the survivors.
    for p in &procs {
        let c = connect(&format!("host=127.0.0.1 port={} user=postgres dbname=postgres", p.port)).await.expect("connect");
        assert_eq!(c.query_one("select 1", &[]).await.expect("query").get::<_, i32>(0), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_and_a_witness_keep_a_leader() {
    let cluster = cluster(0);
    let peers = Peers::new(&[(1, false), (2, false), (3, true)]);
    let _witness = peers.witness(3);
    let mut procs: Vec<Peer> = (1..=2).map(|id| peers.proxy(id, &cluster, "")).collect();
    let all: Vec<&Peer> = procs.iter().collect();
    let (leader, _) = agreed_leader(&all, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no leader:\n{}", peers.logs()));
    assert!(leader == 1 || leader == 2, "the witness never leads");
    let victim = procs.iter().position(|p| p.id == leader).expect("leader");
    let mut dead = procs.remove(victim);
    dead.child.kill().await.expect("kill leader");
    // One proxy plus the witness are a majority of three.
    let (new_leader, _) = agreed_leader(&[&procs[0]], Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("survivor did not take over:\n{}", peers.log(procs[0].id)));
    assert_eq!(new_leader, procs[0].id);
}

async fn primary_port_through(port: u16) -> Option<i32> {
    let c = connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5")).await.ok()?;
    let row = c.query_one("select current_setting('port')::int, pg_is_in_recovery()", &[]).await.ok()?;
    (!row.get::<_, bool>(1)).then(|| row.get(0))
}

fn marker_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_needs_a_quorum_of_peers_and_runs_the_hook_once() {
    let mut cluster = cluster(1);
    let peers = Peers::new(&[(1, false), (2, false), (3, false)]);
    let marker = peers.path("failover-ran");
    let ctl = pg_tool("pg_ctl").display().to_string();
    // SAFETY: geteuid has no preconditions.
    let ctl = if unsafe { libc::geteuid() } == 0 { format!("runuser -u postgres -- {ctl}") } else { ctl };
    let hooks = format!(
        "failover:\n  failover_command: \"echo %d >> {} && {ctl} promote -w -t 60 -D %R\"\n  command_timeout: 60s\n",
        marker.display()
    );
    // Peer 3 cannot log in to check (wrong database): it alone sees every backend failed.
    let procs: Vec<Peer> = vec![
        peers.proxy(1, &cluster, &hooks),
        peers.proxy(2, &cluster, &hooks),
        peers.proxy_checking(3, &cluster, &hooks, "no_such_database"),
    ];
    let all: Vec<&Peer> = procs.iter().collect();
    let (leader, _) = agreed_leader(&all, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("no leader:\n{}", peers.logs()));
    let leader_peer = procs.iter().find(|p| p.id == leader).expect("leader");
    let reported = wait_until(Duration::from_secs(15), || async {
        leader_peer.watchdog().await.lines().any(|l| l.starts_with("failure reports\tnode0\t") && l.ends_with("3"))
    })
    .await;
    assert!(reported, "peer 3's failure report is shared: {}", leader_peer.watchdog().await);
    // Several health periods later: one peer's view is not a quorum, nothing failed over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(marker_lines(&marker), 0, "a lone peer's failure report triggered a failover");
    let node0 = cluster.nodes[0].port as i32;
    assert_eq!(primary_port_through(procs[0].port).await, Some(node0));

    // The primary really dies: peers 1 and 2 see it too, the leader fails over once, and every
    // proxy routes to the promoted standby.
    cluster.node_mut(0).stop_immediate();
    let node1 = cluster.nodes[1].port as i32;
    for p in &procs[..2] {
        let moved = wait_until(Duration::from_secs(30), || async { primary_port_through(p.port).await == Some(node1) }).await;
        assert!(moved, "peer {} does not route to the new primary:\n{}", p.id, peers.log(p.id));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap_or_default(), "0\n", "failover_command ran exactly once");
    let status = leader_peer.watchdog().await;
    assert!(status.contains("agreed primary\tnode1") && status.contains("agreed down\tnode0"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_three_peers_elects_a_leader_and_cleans_up() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglifeguard"))
        .args(["--log", "warn,openraft=error", "demo", "--port", "0", "--peers", "3", "--standbys", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start demo");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut admins = Vec::new();
    let mut dir = None;
    let banner = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("ctl --admin ").nth(1) {
                admins.push(rest.split_whitespace().next().unwrap_or_default().parse::<std::net::SocketAddr>().expect("admin"));
                dir = rest.split("(config ").nth(1).map(|p| PathBuf::from(p.trim_end_matches(')')).parent().map(Path::to_owned));
            }
            if line.contains("Press Ctrl-C") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(banner, Ok(true), "demo banner");
    assert_eq!(admins.len(), 3);
    let views = || async {
        let mut leaders = Vec::new();
        for a in &admins {
            let text = watchdog_text(*a).await;
            leaders.push((parse_view(&text), text.contains("agreed primary\tnode0")));
        }
        leaders
    };
    let agreed = wait_until(Duration::from_secs(30), || async {
        let v = views().await;
        let leader = v[0].0 .1;
        leader.is_some() && v.iter().all(|((_, l, _), primary)| *l == leader && *primary) && v.iter().filter(|((_, _, lease), _)| *lease).count() == 1
    })
    .await;
    assert!(agreed, "demo peers did not agree on a leader and the primary");
    // SAFETY: plain kill(2) of the demo process this test started.
    unsafe {
        libc::kill(child.id().expect("pid") as i32, libc::SIGINT);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("demo exits").expect("wait");
    assert!(status.success());
    let dir = dir.flatten().expect("demo directory");
    assert!(!dir.exists(), "demo removed {}", dir.display());
}
