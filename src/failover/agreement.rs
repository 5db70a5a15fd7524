//! Failover by agreement between watchdog peers (pgpool: `failover_require_consensus`).
//!
//! Every peer checks every backend itself and shares what it sees: a failed check adds a
//! failure report for that backend to the replicated state, a good one withdraws it. Routing on
//! every peer follows the agreed primary. Only the leader acts, and only while its lease is
//! valid: when a quorum of proxy peers report the primary failed it runs the failover (hooks
//! included) once and commits the new primary; a backend failed by a quorum is marked down for
//! everyone. A peer that alone loses sight of a backend (its own network trouble) makes its own
//! sessions wait and nothing else.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Event, Manager};
use crate::app::App;
use crate::cluster::{NodeStatus, Role};
use crate::health::{CheckFailure, Report};
use crate::hooks::HookNodes;
use crate::watchdog::{Command, SharedState, Watchdog};

/// Why a node is down when the peers agreed it is.
const AGREED_DOWN: &str = "down (agreed by the watchdog peers)";

/// The watchdog side of the failover manager.
pub(super) struct Agreement {
    wd: Arc<Watchdog>,
    /// Reports needed to fail a backend: a majority of the proxy peers.
    quorum: usize,
    /// The last agreed state seen.
    agreed: SharedState,
    /// Failures this leader already acted on, by backend and agreed epoch: a commit can lag
    /// behind, and a hook must not run twice for one failure.
    handled: HashSet<(String, u64)>,
}

impl Agreement {
    pub(super) fn new(wd: Arc<Watchdog>, app: &App) -> Agreement {
        let proxies = 1 + app
            .config
            .load()
            .watchdog
            .as_ref()
            .map_or(0, |w| w.peers.iter().filter(|p| !p.witness).count());
        Agreement { wd, quorum: proxies / 2 + 1, agreed: SharedState::default(), handled: HashSet::new() }
    }
}

/// Feeds the manager with the agreed state whenever it or the leadership changes, and once a
/// second (a new leader's lease becomes valid a heartbeat after its election).
pub(super) async fn watch(wd: Arc<Watchdog>, app: Arc<App>) {
    let mut state = wd.state();
    let mut leadership = wd.leadership();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = leadership.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        let agreed = state.borrow_and_update().clone();
        leadership.borrow_and_update();
        if app.events.send(Event::Agreed(agreed)).await.is_err() {
            return;
        }
    }
}

impl Manager {
    fn node_index(&self, name: &str) -> Option<usize> {
        self.app.cluster.load().nodes.iter().position(|n| n.name == name)
    }

    /// Commits a command in the background: the manager must keep taking reports meanwhile.
    fn propose(&self, cmd: Command) {
        let Some(ag) = &self.agreement else { return };
        let wd = Arc::clone(&ag.wd);
        tokio::spawn(async move {
            if let Err(e) = wd.propose(cmd.clone()).await {
                tracing::warn!(error = %e, ?cmd, "watchdog peers did not take the update");
            }
        });
    }

    /// Operator commands act on the shared state, so they run on the leader only.
    pub(super) fn refuse_unless_leader(&self, event: Event) -> Option<Event> {
        let Some(ag) = &self.agreement else { return Some(event) };
        if ag.wd.has_valid_lease() {
            return Some(event);
        }
        let why = format!(
            "this proxy is not the watchdog leader; run the command on the leader (node {})",
            ag.wd.status().leader.map_or_else(|| "unknown".to_owned(), |l| l.to_string())
        );
        match event {
            Event::Detach(_, reply) | Event::Attach(_, reply) | Event::Promote(_, reply) => {
                let _ = reply.send(Err(why));
                None
            }
            Event::Switchover(_, reply) => {
                let _ = reply.send(Err(why));
                None
            }
            other => Some(other),
        }
    }

    /// After an operator command on the leader: commits the resulting primary, and the nodes
    /// the command took out of or put back in service.
    pub(super) async fn share_operator_change(&mut self, before: &crate::cluster::ClusterState) {
        let Some(ag) = &self.agreement else { return };
        let after = self.snapshot();
        let mut down = ag.agreed.down.clone();
        for (old, new) in before.nodes.iter().zip(&after.nodes) {
            match (&old.status, &new.status) {
                (NodeStatus::Down { .. }, NodeStatus::Down { .. }) => {}
                (_, NodeStatus::Down { .. }) => {
                    down.insert(new.name.clone());
                }
                (NodeStatus::Down { .. }, _) => {
                    down.remove(&new.name);
                }
                _ => {}
            }
        }
        let primary = after.primary.map(|p| after.nodes[p].name.clone());
        if primary != ag.agreed.primary || down != ag.agreed.down {
            self.propose(Command::SetPrimary { primary, down });
        }
    }

    /// A health report, with a watchdog: shared as a failure report, applied locally only as
    /// far as the agreed state allows.
    pub(super) async fn on_report_agreed(&mut self, report: Report) {
        let node = report.node;
        if self.settled.get(&node).is_some_and(|&t| report.started < t) {
            return;
        }
        // The replicated state itself says whether this peer's report is in: a proposal that
        // failed (no leader yet, leader changing) is simply made again at the next check.
        let Some((me, agreed)) = self.agreement.as_ref().map(|a| (a.wd.id(), a.wd.state().borrow().clone())) else { return };
        let mut next = self.snapshot();
        let name = next.nodes[node].name.clone();
        let agreed_down = agreed.down.contains(&name);
        let my_report_in = agreed.reports.get(&name).is_some_and(|peers| peers.contains(&me));
        match report.result {
            Ok(o) => {
                next.nodes[node].last_seen = Some(o);
                if !agreed_down {
                    next.nodes[node].status = NodeStatus::Up(o.role);
                }
                if my_report_in {
                    self.propose(Command::ClearFailure { node: name.clone(), peer: me });
                }
                let claims = o.role == Role::Primary && !agreed_down;
                if claims && agreed.primary.as_ref().is_some_and(|p| *p != name) {
                    // Routing never follows the claim; the leader takes the node out and fences it.
                    next.nodes[node].status =
                        NodeStatus::Down { since: Instant::now(), reason: "claims to be primary while another is".into() };
                    if self.is_acting_leader() && !self.fenced.contains(&node) {
                        let mut down = agreed.down.clone();
                        down.insert(name.clone());
                        self.propose(Command::SetPrimary { primary: agreed.primary.clone(), down });
                        self.publish(next);
                        self.fence(node).await;
                        return;
                    }
                }
            }
            Err(failure) => {
                let reason = match &failure {
                    CheckFailure::Gone(e) | CheckFailure::Other(e) => format!("health check failed: {e}"),
                    CheckFailure::Timeout => "health check timed out".to_owned(),
                };
                if !matches!(next.nodes[node].status, NodeStatus::Down { .. }) {
                    tracing::error!(node = name, reason, "node failed its health check here; reporting it to the watchdog peers");
                }
                if !agreed_down {
                    next.nodes[node].status = NodeStatus::Down { since: Instant::now(), reason };
                }
                if !my_report_in {
                    self.propose(Command::ReportFailure { node: name, peer: me });
                }
            }
        }
        self.publish(next);
        self.follow_agreed();
    }

    /// The agreed state changed (or leadership did): follow it, then act if leader.
    pub(super) async fn on_agreed(&mut self, _queued: SharedState) {
        let Some(ag) = self.agreement.as_mut() else { return };
        // Events can queue up behind a failover: the current state is what counts.
        let agreed = ag.wd.state().borrow().clone();
        ag.agreed = agreed.clone();
        self.app.metrics.watchdog_term.set(i64::try_from(ag.wd.status().term).unwrap_or(0));
        self.follow_agreed();
        if !self.is_acting_leader() {
            return;
        }
        let quorum = self.agreement.as_ref().map_or(usize::MAX, |a| a.quorum);
        let state = self.snapshot();
        let Some(primary_name) = agreed.primary.clone() else {
            // Nothing agreed yet: the leader shares what its own discovery found.
            if let Some(p) = state.primary {
                self.propose(Command::SetPrimary { primary: Some(state.nodes[p].name.clone()), down: BTreeSet::new() });
            }
            return;
        };
        // Backends a quorum of peers sees failed, and not yet handled.
        let failed: Vec<usize> = state
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !agreed.down.contains(&n.name) && agreed.failure_reports(&n.name) >= quorum)
            .map(|(i, _)| i)
            .collect();
        for node in failed {
            let name = state.nodes[node].name.clone();
            let first_time = self.agreement.as_mut().is_some_and(|a| a.handled.insert((name.clone(), agreed.epoch)));
            if !first_time {
                continue;
            }
            let mut down = agreed.down.clone();
            down.insert(name.clone());
            if name == primary_name {
                tracing::warn!(node = name, quorum, "a quorum of watchdog peers sees the primary failed; failing over");
                let mut next = self.snapshot();
                next.nodes[node].status = NodeStatus::Down { since: Instant::now(), reason: AGREED_DOWN.into() };
                next.set_primary(None);
                self.publish(next);
                self.fail_over(node, None).await;
                let new_primary = self.app.cluster.load().primary.map(|p| self.app.node_name(p));
                // Committed before anything else is looked at, so every peer follows at once.
                if let Some(wd) = self.agreement.as_ref().map(|a| Arc::clone(&a.wd)) {
                    if let Err(e) = wd.propose(Command::SetPrimary { primary: new_primary, down }).await {
                        tracing::error!(error = %e, "cannot commit the new primary to the watchdog peers");
                    }
                }
                return;
            }
            tracing::warn!(node = name, quorum, "a quorum of watchdog peers sees a standby failed; taking it out of service");
            self.propose(Command::SetPrimary { primary: Some(primary_name.clone()), down });
            let nodes = HookNodes { node, new_main: state.primary, old_main: state.primary, old_primary: state.primary };
            let cmd = self.app.config.load().failover.failover_command.clone();
            self.run_hook("failover_command", &cmd, &state, nodes).await;
        }
    }

    /// Whether this peer may act for the cluster now: leader with a valid lease.
    fn is_acting_leader(&self) -> bool {
        self.agreement.as_ref().is_some_and(|a| a.wd.has_valid_lease())
    }

    /// Makes the local view match the agreed state: agreed-down nodes are down, and sessions
    /// go to the agreed primary unless this peer cannot reach it.
    fn follow_agreed(&mut self) {
        let Some(ag) = &self.agreement else { return };
        let Some(primary_name) = ag.agreed.primary.clone() else { return };
        let down = ag.agreed.down.clone();
        let mut next = self.snapshot();
        for n in next.nodes.iter_mut() {
            let is_agreed_down = matches!(&n.status, NodeStatus::Down { reason, .. } if reason == AGREED_DOWN);
            if down.contains(&n.name) && !is_agreed_down {
                n.status = NodeStatus::Down { since: Instant::now(), reason: AGREED_DOWN.into() };
            } else if !down.contains(&n.name) && is_agreed_down {
                // Back in service by agreement; the next check says in which role.
                n.status = NodeStatus::Unknown;
            }
        }
        let primary = self
            .node_index(&primary_name)
            .filter(|&p| !down.contains(&primary_name) && !matches!(next.nodes[p].status, NodeStatus::Down { .. }));
        if let Some(p) = primary {
            next.nodes[p].status = NodeStatus::Up(Role::Primary);
        }
        next.set_primary(primary);
        self.publish(next);
    }
}
