//! Multi-node tests on 127.0.0.1. All waits poll a condition with a deadline.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use openraft::storage::RaftLogStorage;
use openraft::Vote;
use tokio::net::TcpListener;

use super::*;

/// Generous deadline for conditions on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

struct Spec {
    id: u64,
    role: PeerRole,
    addr: SocketAddr,
    dir: PathBuf,
}

struct TestCluster {
    _tmp: tempfile::TempDir,
    tweak: fn(&mut openraft::Config),
    specs: Vec<Spec>,
    nodes: Vec<Option<Watchdog>>,
}

impl TestCluster {
    /// Starts one node per role; ids are 1..=n.
    async fn start(roles: &[PeerRole]) -> TestCluster {
        Self::start_with(roles, |_| {}).await
    }

    /// Like `start`, with an adjusted openraft config (used on restarts too).
    async fn start_with(roles: &[PeerRole], tweak: fn(&mut openraft::Config)) -> TestCluster {
        init_tracing();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut listeners = Vec::new();
        let mut specs = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let id = i as u64 + 1;
            specs.push(Spec {
                id,
                role: *role,
                addr: l.local_addr().expect("addr"),
                dir: tmp.path().join(format!("n{id}")),
            });
            listeners.push(l);
        }
        let mut c = TestCluster {
            _tmp: tmp,
            tweak,
            specs,
            nodes: Vec::new(),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            let wd = Watchdog::start_inner(c.config(i), c.specs[i].role, l, tweak)
                .await
                .expect("start");
            c.nodes.push(Some(wd));
        }
        c
    }

    fn config(&self, idx: usize) -> WatchdogConfig {
        let me = &self.specs[idx];
        let peers = self
            .specs
            .iter()
            .filter(|s| s.id != me.id)
            .map(|s| PeerConfig {
                id: s.id,
                addr: s.addr.to_string(),
                witness: s.role == PeerRole::Witness,
            })
            .collect();
        WatchdogConfig::new(me.id, me.addr, peers, me.dir.clone())
    }

    fn idx(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    fn node(&self, id: u64) -> &Watchdog {
        self.nodes[self.idx(id)].as_ref().expect("node is running")
    }

    fn live(&self) -> Vec<&Watchdog> {
        self.nodes.iter().flatten().collect()
    }

    async fn stop(&mut self, id: u64) {
        let i = self.idx(id);
        if let Some(wd) = self.nodes[i].take() {
            wd.shutdown().await.expect("shutdown");
        }
    }

    async fn restart(&mut self, id: u64) {
        let i = self.idx(id);
        assert!(self.nodes[i].is_none());
        let l = TcpListener::bind(self.specs[i].addr)
            .await
            .expect("rebind same port");
        let wd = Watchdog::start_inner(self.config(i), self.specs[i].role, l, self.tweak)
            .await
            .expect("restart");
        self.nodes[i] = Some(wd);
    }

    /// Waits until exactly one live node is leader and every live node agrees on it and on
    /// the term. Returns (leader id, term).
    async fn wait_agreed_leader(&self, what: &str) -> (u64, u64) {
        let mut found = None;
        wait_until(what, || {
            let sts: Vec<WatchdogStatus> = self.live().iter().map(|w| w.status()).collect();
            let leaders: Vec<&WatchdogStatus> = sts.iter().filter(|s| s.is_leader).collect();
            if leaders.len() != 1 {
                return false;
            }
            let (lid, term) = (leaders[0].id, leaders[0].term);
            let agreed = sts.iter().all(|s| s.leader == Some(lid) && s.term == term);
            if agreed {
                found = Some((lid, term));
            }
            agreed
        })
        .await;
        found.expect("leader found")
    }
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`].
async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    crate::test_support::wait_until(what, WAIT, Duration::from_millis(20), cond).await
}

fn set_primary(p: &str) -> Command {
    Command::SetPrimary {
        primary: Some(p.to_string()),
        down: BTreeSet::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader() {
    let c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (leader, term) = c.wait_agreed_leader("single agreed leader").await;
    assert!(term >= 1);
    // The lowest id bootstraps and normally wins the first election, but any node may lead.
    assert!((1..=3).contains(&leader));
    // The leader obtains a lease, followers never have one.
    wait_until("leader lease", || c.node(leader).has_valid_lease()).await;
    for w in c.live() {
        if w.id() != leader {
            assert!(w.lease().borrow().is_none());
            assert!(!w.leadership().borrow().is_leader());
        }
    }
    let st = c.node(leader).status();
    assert!(st.lease_valid);
    assert_eq!(st.peers.len(), 2);
    // Status JSON is serializable.
    let json = serde_json::to_string(&st).expect("serialize status");
    assert!(json.contains("\"lease_valid\":true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_to_higher_term() {
    let mut c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (old, term) = c.wait_agreed_leader("initial leader").await;
    let t0 = Instant::now();
    c.stop(old).await;
    let (new, new_term) = c
        .wait_agreed_leader("new leader after stopping the old one")
        .await;
    let took = t0.elapsed();
    assert_ne!(new, old);
    assert!(new_term > term, "term must increase: {term} -> {new_term}");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    wait_until("new leader lease", || c.node(new).has_valid_lease()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_never_leads_and_remaining_proxy_takes_over() {
    let mut c = TestCluster::start(&[PeerRole::Proxy, PeerRole::Proxy, PeerRole::Witness]).await;
    let (leader, term) = c.wait_agreed_leader("initial leader").await;
    assert_ne!(leader, 3, "witness must not lead");
    let other = if leader == 1 { 2 } else { 1 };
    c.stop(leader).await;
    let (new, new_term) = c.wait_agreed_leader("remaining proxy leads").await;
    assert_eq!(new, other);
    assert!(new_term > term);
    // Quorum = remaining proxy + witness, so the lease is valid.
    wait_until("lease with witness ack", || c.node(new).has_valid_lease()).await;
    assert!(!c.node(3).status().is_leader);

    // Killing a non-leader proxy keeps the leader: restart the old one, then stop it again.
    c.restart(leader).await;
    let (again, _) = c.wait_agreed_leader("leader after rejoin").await;
    assert_eq!(again, other);
    c.stop(leader).await;
    tokio::task::yield_now().await;
    let (still, _) = c.wait_agreed_leader("leader stays").await;
    assert_eq!(still, other);
    wait_until("lease kept", || c.node(other).has_valid_lease()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposal_applied_everywhere() {
    let c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (leader, _) = c.wait_agreed_leader("leader").await;
    let st = c
        .node(leader)
        .propose(set_primary("pg1"))
        .await
        .expect("propose");
    assert_eq!(st.primary.as_deref(), Some("pg1"));
    assert_eq!(st.epoch, 1);
    let st = c
        .node(leader)
        .propose(Command::ReportFailure {
            node: "pg2".into(),
            peer: 2,
        })
        .await
        .expect("report");
    assert_eq!(st.failure_reports("pg2"), 1);
    // Same primary again: no epoch bump.
    let st = c
        .node(leader)
        .propose(set_primary("pg1"))
        .await
        .expect("propose same");
    assert_eq!(st.epoch, 1);
    for w in c.live() {
        let mut rx = w.state();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|s| s.primary.as_deref() == Some("pg1") && s.failure_reports("pg2") == 1),
        )
        .await
        .expect("applied in time")
        .expect("state channel open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_forwards_proposal() {
    let c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (leader, _) = c.wait_agreed_leader("leader").await;
    let follower = (1..=3).find(|i| *i != leader).expect("follower");
    let st = c
        .node(follower)
        .propose(set_primary("pg9"))
        .await
        .expect("forwarded propose");
    assert_eq!(st.primary.as_deref(), Some("pg9"));
    assert_eq!(st.epoch, 1);
    for w in c.live() {
        let mut rx = w.state();
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.primary.as_deref() == Some("pg9")))
            .await
            .expect("applied in time")
            .expect("state channel open");
    }
    // Status over RPC works too.
    let remote = c
        .node(follower)
        .peer_status(leader)
        .await
        .expect("peer status");
    assert_eq!(remote.id, leader);
    assert!(remote.is_leader);
    let via_cli = fetch_status(
        &c.node(leader).local_addr().to_string(),
        Duration::from_secs(5),
    )
    .await
    .expect("fetch_status");
    assert_eq!(via_cli.id, leader);
    // Garbage on the wire gets an error response, not a crash.
    let mut s = tokio::net::TcpStream::connect(c.node(leader).local_addr())
        .await
        .expect("connect");
    network::write_frame(&mut s, &serde_json::json!({"Bogus": 1}))
        .await
        .expect("write");
    let resp: network::RpcResponse = network::read_frame(&mut s).await.expect("read");
    assert!(matches!(resp, network::RpcResponse::Error(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_log_and_term() {
    let mut c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (leader, _) = c.wait_agreed_leader("leader").await;
    c.node(leader)
        .propose(set_primary("pgA"))
        .await
        .expect("propose");
    let follower = (1..=3).find(|i| *i != leader).expect("follower");
    wait_until("follower applied", || {
        c.node(follower).state().borrow().primary.as_deref() == Some("pgA")
    })
    .await;
    let before = c.node(follower).status();
    c.stop(follower).await;
    c.restart(follower).await;
    // Straight after restart (before any catch-up) the log and term come from disk.
    let after = c.node(follower).status();
    assert!(
        after.term >= before.term,
        "term {} -> {}",
        before.term,
        after.term
    );
    assert!(
        after.last_log_index >= before.last_log_index,
        "{:?} -> {:?}",
        before.last_log_index,
        after.last_log_index
    );
    wait_until("restarted node re-applies the state", || {
        c.node(follower).state().borrow().primary.as_deref() == Some("pgA")
    })
    .await;
    let (l2, _) = c.wait_agreed_leader("leader after restart").await;
    let st = c
        .node(l2)
        .propose(set_primary("pgB"))
        .await
        .expect("propose after restart");
    assert_eq!(st.epoch, 2);
    wait_until("restarted node applies new entry", || {
        c.node(follower).state().borrow().primary.as_deref() == Some("pgB")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_loses_lease() {
    let mut c = TestCluster::start(&[PeerRole::Proxy; 3]).await;
    let (leader, _) = c.wait_agreed_leader("leader").await;
    wait_until("lease", || c.node(leader).has_valid_lease()).await;
    let lease = c.config(c.idx(leader)).lease;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    for o in &others {
        c.stop(*o).await;
    }
    let t_gone = Instant::now();
    // Any deadline published from now on can only be based on acks sent before t_gone.
    if let Some(d) = *c.node(leader).lease().borrow() {
        assert!(
            d <= t_gone + lease,
            "deadline beyond last possible ack + lease"
        );
    }
    let mut rx = c.node(leader).lease();
    tokio::time::timeout(lease + Duration::from_secs(2), rx.wait_for(|l| l.is_none()))
        .await
        .expect("lease withdrawn within lease + margin")
        .expect("lease channel open");
    let took = t_gone.elapsed();
    assert!(took <= lease + Duration::from_secs(2), "took {took:?}");
    let st = c.node(leader).status();
    assert!(!st.lease_valid);
    assert!(!c.node(leader).has_valid_lease());
    // Stays withdrawn.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.node(leader).lease().borrow().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_and_log_survive_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let mut s = store::LogStore::open(tmp.path()).expect("open");
        s.save_vote(&Vote::new(7, 2)).await.expect("save vote");
    }
    let mut s = store::LogStore::open(tmp.path()).expect("reopen");
    assert_eq!(s.read_vote().await.expect("read"), Some(Vote::new(7, 2)));
    // A torn trailing line is dropped on open.
    std::fs::write(tmp.path().join("raft-log.jsonl"), b"{\"Entry\":{\"log_id\"").expect("write");
    let mut s = store::LogStore::open(tmp.path()).expect("reopen with torn tail");
    let st = s.get_log_state().await.expect("state");
    assert_eq!(st.last_log_id, None);
}

#[test]
fn config_parsing_and_validation() {
    let json = r#"{"node_id":1,"listen":"127.0.0.1:7001","peers":[{"id":2,"addr":"h2:7001"},{"id":3,"addr":"w:7001","witness":true}],"heartbeat_interval":"50ms","state_dir":"/tmp/x"}"#;
    let cfg: WatchdogConfig = serde_json::from_str(json).expect("parse");
    assert_eq!(cfg.heartbeat_interval, Duration::from_millis(50));
    assert_eq!(cfg.election_timeout_min, Duration::from_millis(200));
    assert!(cfg.peers[1].witness);
    cfg.validate().expect("valid");
    let bad =
        r#"{"node_id":1,"listen":"127.0.0.1:7001","peers":[],"state_dir":"/tmp/x","bogus":1}"#;
    assert!(serde_json::from_str::<WatchdogConfig>(bad).is_err());
    let mut dup = cfg.clone();
    dup.peers[0].id = 1;
    assert!(dup.validate().is_err());
}

#[test]
fn shared_state_apply() {
    let mut s = SharedState::default();
    s.apply(&Command::ReportFailure {
        node: "a".into(),
        peer: 1,
    });
    s.apply(&Command::ReportFailure {
        node: "a".into(),
        peer: 2,
    });
    assert_eq!(s.failure_reports("a"), 2);
    s.apply(&Command::ClearFailure {
        node: "a".into(),
        peer: 1,
    });
    s.apply(&Command::ClearFailure {
        node: "a".into(),
        peer: 2,
    });
    assert!(s.reports.is_empty());
    s.apply(&set_primary("x"));
    s.apply(&set_primary("x"));
    assert_eq!(s.epoch, 1);
    s.apply(&Command::SetPrimary {
        primary: None,
        down: ["x".to_string()].into(),
    });
    assert_eq!(s.epoch, 2);
    assert!(s.down.contains("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_purge_and_catch_up() {
    // Snapshot every few entries and purge everything covered by the snapshot, so a node that
    // missed entries must receive an InstallSnapshot, and restarts must load snapshot.json.
    let mut c = TestCluster::start_with(&[PeerRole::Proxy; 3], |cfg| {
        cfg.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(3);
        cfg.max_in_snapshot_log_to_keep = 0;
        cfg.purge_batch_size = 1;
    })
    .await;
    let (leader, _) = c.wait_agreed_leader("leader").await;
    let lagging = (1..=3).find(|i| *i != leader).expect("follower");
    c.stop(lagging).await;
    for i in 0..12u64 {
        c.node(leader)
            .propose(Command::ReportFailure {
                node: "pg".into(),
                peer: 100 + i,
            })
            .await
            .expect("propose");
    }
    c.node(leader)
        .propose(set_primary("snap"))
        .await
        .expect("propose");
    let dir = &c.specs[c.idx(leader)].dir;
    wait_until("leader wrote a snapshot", || {
        dir.join("snapshot.json").exists()
    })
    .await;
    c.restart(lagging).await;
    wait_until("lagging node caught up via snapshot", || {
        let s = c.node(lagging).state().borrow().clone();
        s.primary.as_deref() == Some("snap") && s.failure_reports("pg") == 12
    })
    .await;
    // Restart the leader too: its state comes back from snapshot + remaining log.
    c.stop(leader).await;
    c.restart(leader).await;
    wait_until("restarted leader restores state", || {
        let s = c.node(leader).state().borrow().clone();
        s.primary.as_deref() == Some("snap") && s.failure_reports("pg") == 12 && s.epoch == 1
    })
    .await;
    let (l2, _) = c.wait_agreed_leader("leader after restarts").await;
    let st = c
        .node(l2)
        .propose(set_primary("after"))
        .await
        .expect("propose after");
    assert_eq!(st.epoch, 2);
}
