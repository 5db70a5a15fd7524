//! The failover manager: the one task that changes node states. It takes health reports and
//! operator commands in order, decides what they mean (node up, node down, primary lost,
//! split brain), runs the hooks, searches for the new primary, switches routing atomically by
//! publishing a new cluster snapshot, and keeps the state in the status file.
//!
//! Rules that keep writes on exactly one node:
//! - A node that went down stays down until an operator attaches it; a former primary that
//!   comes back is never put back in service on its own.
//! - While a primary is recorded, any other node claiming to be primary is taken out of
//!   service (and fenced by `fence_command`); sessions never follow a claim alone.
//! - With no primary recorded, sessions wait (`hold_timeout`) instead of going anywhere.
//!
//! With a watchdog, the peers' agreed state decides instead ([`agreement`]): each peer reports
//! what its own checks see, and only the leader, once a quorum of peers reports the same
//! failure, runs the failover and its hooks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::cluster::{ClusterState, NodeStatus, Observed, Role};
use crate::health::{self, CheckFailure, Report};
use crate::hooks::{self, HookNodes, HookOutcome};
use crate::status_file;

mod agreement;
use agreement::Agreement;

/// Something the manager must act on.
#[derive(Debug)]
pub enum Event {
    /// A health check result.
    Report(Report),
    /// Operator: take a node out of service.
    Detach(usize, oneshot::Sender<Result<(), String>>),
    /// Operator: put a node back in service (it is checked first).
    Attach(usize, oneshot::Sender<Result<(), String>>),
    /// Operator: make this standby the primary (pgpool's `pcp_promote_node`): the current
    /// primary is taken out of service and the failover runs with this node as `%m`.
    Promote(usize, oneshot::Sender<Result<(), String>>),
    /// The watchdog peers' agreed state changed, or this node's leadership did.
    Agreed(crate::watchdog::SharedState),
    /// Operator: hand the primary role to this standby without losing sessions or commits:
    /// hold new transactions, let open ones finish, wait until the standby has replayed
    /// everything, promote it, and make the old primary follow it.
    Switchover(usize, oneshot::Sender<Result<String, String>>),
}

/// Runs the manager until shutdown. Spawns the per-node health checkers.
pub async fn run(app: Arc<App>, mut events: mpsc::Receiver<Event>) {
    let agreement = app.watchdog.as_ref().map(|wd| Agreement::new(Arc::clone(wd), &app));
    let mut manager =
        Manager { app: Arc::clone(&app), fenced: HashSet::new(), no_failback: HashSet::new(), settled: HashMap::new(), agreement };
    manager.initial_discovery().await;
    if let Some(wd) = &app.watchdog {
        tokio::spawn(agreement::watch(Arc::clone(wd), Arc::clone(&app)));
    }
    let nodes = app.cluster.load().nodes.len();
    for node in 0..nodes {
        let tx = app.events.clone();
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let (rtx, mut rrx) = mpsc::channel(1);
            let checker = tokio::spawn(health::run_checker(Arc::clone(&app), node, rtx));
            while let Some(report) = rrx.recv().await {
                if tx.send(Event::Report(report)).await.is_err() {
                    break;
                }
            }
            checker.abort();
        });
    }
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(e) => manager.handle(e).await,
                None => return,
            },
            _ = app.shutdown.cancelled() => return,
        }
    }
}

struct Manager {
    app: Arc<App>,
    /// Nodes already fenced for their current false claim, so the hook runs once per claim.
    fenced: HashSet<usize>,
    /// Down nodes that `auto_failback` must leave alone: detached by an operator, restored as
    /// down from the status file, or caught claiming to be primary.
    no_failback: HashSet<usize>,
    /// Per node, when the manager last set its state from a check of its own: health reports
    /// started before that are stale and dropped.
    settled: HashMap<usize, Instant>,
    /// With a watchdog: what the peers agreed and what this peer reported.
    agreement: Option<Agreement>,
}

impl Manager {
    fn snapshot(&self) -> ClusterState {
        (*self.app.cluster.load_full()).clone()
    }

    fn publish(&self, next: ClusterState) {
        let current = self.app.cluster.load_full();
        if *current == next {
            return;
        }
        for (n, old) in next.nodes.iter().zip(&current.nodes) {
            if n.status.name() != old.status.name() {
                tracing::info!(node = n.name, addr = n.addr(), from = old.status.name(), to = n.status.name(), "node status changed");
            }
        }
        if next.primary != current.primary {
            match next.primary_addr() {
                Some((_, addr)) => tracing::info!(primary = addr, epoch = next.epoch, "routing sessions to new primary"),
                None => tracing::warn!(epoch = next.epoch, "no primary: sessions wait for one"),
            }
        }
        if let Some(path) = &self.app.config.load().failover.status_file {
            if let Err(e) = status_file::save(path, &next) {
                tracing::error!(error = %e, path = %path.display(), "cannot write status file");
            }
        }
        self.app.set_cluster(next);
    }

    /// First look at the cluster: restores the status file, checks every node once, and
    /// picks the primary.
    async fn initial_discovery(&mut self) {
        let mut next = self.snapshot();
        let config = self.app.config.load_full();
        let saved = config.failover.status_file.as_deref().and_then(|p| match status_file::load(p) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read status file; starting without it");
                None
            }
        });
        let mut preferred = None;
        if let Some(saved) = &saved {
            for (i, n) in next.nodes.iter_mut().enumerate() {
                if saved.down.contains(&n.name) {
                    n.status = NodeStatus::Down { since: Instant::now(), reason: "down in status file".into() };
                    self.no_failback.insert(i);
                }
                if saved.primary.as_deref() == Some(n.name.as_str()) {
                    preferred = Some(i);
                }
            }
            tracing::info!(primary = ?saved.primary, down = ?saved.down, "restored node states from the status file");
        }
        let checks = (0..next.nodes.len()).map(|i| health::check_once(&self.app, i));
        let results = futures_util::future::join_all(checks).await;
        next.primary = preferred;
        let mut claimants = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            if let Ok(o) = r {
                next.nodes[i].last_seen = Some(o);
                if next.nodes[i].status == NodeStatus::Unknown {
                    next.nodes[i].status = NodeStatus::Up(o.role);
                    if o.role == Role::Primary {
                        claimants.push((i, o));
                    }
                }
            }
        }
        let chosen = next.resolve_claimants(&claimants);
        next.primary = None;
        next.set_primary(chosen);
        self.publish(next);
        for (i, o) in claimants {
            if Some(i) != chosen {
                self.split_brain(i, o).await;
            }
        }
    }

    async fn handle(&mut self, event: Event) {
        let Some(event) = self.refuse_unless_leader(event) else { return };
        let before = self.snapshot();
        let operator = !matches!(event, Event::Report(_) | Event::Agreed(_));
        match event {
            Event::Report(r) if self.agreement.is_some() => self.on_report_agreed(r).await,
            Event::Report(r) => self.on_report(r).await,
            Event::Agreed(s) => self.on_agreed(s).await,
            Event::Detach(node, reply) => {
                let _ = reply.send(self.detach(node).await);
            }
            Event::Attach(node, reply) => {
                let _ = reply.send(self.attach(node).await);
            }
            Event::Promote(node, reply) => {
                let _ = reply.send(self.promote(node).await);
            }
            Event::Switchover(node, reply) => {
                let result = self.switchover(node).await;
                let outcome = if result.is_ok() { "done" } else { "aborted" };
                self.app.metrics.switchovers.with_label_values(&[outcome]).inc();
                let _ = reply.send(result);
            }
        }
        if operator {
            self.share_operator_change(&before).await;
        }
    }

    async fn on_report(&mut self, report: Report) {
        let node = report.node;
        if self.settled.get(&node).is_some_and(|&t| report.started < t) {
            return;
        }
        let mut next = self.snapshot();
        let status = next.nodes[node].status.clone();
        match (status, report.result) {
            (NodeStatus::Down { .. }, Ok(o)) => {
                next.nodes[node].last_seen = Some(o);
                self.publish(next);
                if o.role == Role::Primary && !self.fenced.contains(&node) {
                    tracing::warn!(node = self.app.node_name(node), "a node that is out of service claims to be primary; it gets no sessions");
                    self.no_failback.insert(node);
                    self.fence(node).await;
                } else if o.role == Role::Standby && self.app.config.load().failover.auto_failback {
                    self.try_failback(node).await;
                }
            }
            (NodeStatus::Down { .. }, Err(_)) => {
                self.fenced.remove(&node);
            }
            (_, Ok(o)) => {
                next.nodes[node].last_seen = Some(o);
                match (o.role, next.primary) {
                    (Role::Primary, Some(p)) if p != node => {
                        self.publish(next);
                        self.split_brain(node, o).await;
                        return;
                    }
                    (Role::Primary, None) => {
                        tracing::info!(node = self.app.node_name(node), "node reports it is primary; taking it as primary");
                        next.nodes[node].status = NodeStatus::Up(Role::Primary);
                        next.set_primary(Some(node));
                    }
                    (Role::Standby, Some(p)) if p == node => {
                        tracing::warn!(node = self.app.node_name(node), "the primary is in recovery now; sessions wait for a primary");
                        next.nodes[node].status = NodeStatus::Up(Role::Standby);
                        next.set_primary(None);
                    }
                    (role, _) => next.nodes[node].status = NodeStatus::Up(role),
                }
                self.publish(next);
            }
            (_, Err(failure)) => self.on_failure(next, node, failure).await,
        }
    }

    async fn on_failure(&mut self, mut next: ClusterState, node: usize, failure: CheckFailure) {
        let reason = match &failure {
            CheckFailure::Gone(e) | CheckFailure::Other(e) => format!("health check failed: {e}"),
            CheckFailure::Timeout => "health check timed out".to_owned(),
        };
        tracing::error!(node = self.app.node_name(node), reason, "node is down");
        let was_primary = next.primary == Some(node);
        next.nodes[node].status = NodeStatus::Down { since: Instant::now(), reason };
        if was_primary {
            next.set_primary(None);
            self.publish(next);
            self.fail_over(node, None).await;
        } else {
            let primary = next.primary;
            self.publish(next.clone());
            // pgpool runs failover_command for a failed standby too; routing is unaffected.
            let nodes = HookNodes { node, new_main: primary, old_main: primary, old_primary: primary };
            self.run_hook("failover_command", &self.app.config.load().failover.failover_command.clone(), &next, nodes).await;
        }
    }

    /// The primary failed: promote (through the hook), find the new primary, switch, re-point
    /// the other standbys.
    async fn fail_over(&mut self, failed: usize, chosen: Option<usize>) {
        let started = Instant::now();
        self.app.metrics.failovers.inc();
        let mut state = self.snapshot();
        if chosen.is_none() {
            // Positions from the last periodic check can be a second old under write load:
            // ask the standbys again so the one that really replayed the most is promoted.
            let standbys: Vec<usize> =
                (0..state.nodes.len()).filter(|&i| state.nodes[i].status == NodeStatus::Up(Role::Standby)).collect();
            let fresh = futures_util::future::join_all(standbys.iter().map(|&i| health::check_once(&self.app, i))).await;
            for (i, r) in standbys.into_iter().zip(fresh) {
                if let Ok(o) = r {
                    state.nodes[i].last_seen = Some(o);
                }
            }
        }
        let candidate = chosen.or_else(|| state.promotion_candidate(failed));
        tracing::warn!(
            failed = self.app.node_name(failed),
            candidate = candidate.map(|c| self.app.node_name(c)),
            "primary failed; failing over"
        );
        let config = self.app.config.load_full();
        let nodes = HookNodes { node: failed, new_main: candidate, old_main: Some(failed), old_primary: Some(failed) };
        self.run_hook("failover_command", &config.failover.failover_command, &state, nodes).await;

        let Some((chosen, observed)) = self.search_primary(candidate).await else {
            tracing::error!(
                timeout = ?config.failover.search_primary_timeout,
                "no node became primary; sessions keep waiting until a health check finds one"
            );
            return;
        };
        let mut next = self.snapshot();
        for (i, o) in &observed {
            next.nodes[*i].last_seen = Some(*o);
            if next.nodes[*i].status.is_up() || next.nodes[*i].status == NodeStatus::Unknown {
                next.nodes[*i].status = NodeStatus::Up(o.role);
            }
        }
        next.set_primary(Some(chosen));
        self.publish(next.clone());
        tracing::warn!(primary = self.app.node_name(chosen), elapsed = ?started.elapsed(), "failover complete: writes go to the new primary");
        for (i, o) in observed {
            if i != chosen && o.role == Role::Primary {
                self.split_brain(i, o).await;
            }
        }

        // Re-point every other standby that is in service.
        let standbys: Vec<usize> = next
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| *i != chosen && n.status == NodeStatus::Up(Role::Standby))
            .map(|(i, _)| i)
            .collect();
        for s in standbys {
            let nodes = HookNodes { node: s, new_main: Some(chosen), old_main: Some(failed), old_primary: Some(failed) };
            let state = self.snapshot();
            let outcome = self.run_hook("follow_primary_command", &config.failover.follow_primary_command, &state, nodes).await;
            if !matches!(outcome, None | Some(HookOutcome::Success)) {
                let mut next = self.snapshot();
                next.nodes[s].status = NodeStatus::Down { since: Instant::now(), reason: "follow_primary_command failed".into() };
                self.publish(next);
            }
        }
    }

    /// Polls every in-service node until one reports it is primary (preferring `candidate`).
    async fn search_primary(&mut self, candidate: Option<usize>) -> Option<(usize, Vec<(usize, Observed)>)> {
        let timeout = self.app.config.load().failover.search_primary_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.snapshot();
            let live: Vec<usize> = (0..state.nodes.len()).filter(|&i| !matches!(state.nodes[i].status, NodeStatus::Down { .. })).collect();
            let round = Instant::now();
            let results = futures_util::future::join_all(live.iter().map(|&i| health::check_once(&self.app, i))).await;
            let observed: Vec<(usize, Observed)> =
                live.iter().zip(results).filter_map(|(&i, r)| r.ok().map(|o| (i, o))).collect();
            let claimants: Vec<(usize, Observed)> = observed.iter().copied().filter(|(_, o)| o.role == Role::Primary).collect();
            let chosen = match candidate {
                Some(c) if claimants.iter().any(|(i, _)| *i == c) => Some(c),
                _ => state.resolve_claimants(&claimants),
            };
            if let Some(c) = chosen {
                // Reports queued while this ran predate the promotion; they must not undo it.
                for (i, _) in &observed {
                    self.settled.insert(*i, round);
                }
                return Some((c, observed));
            }
            if Instant::now() >= deadline || self.app.shutdown.is_cancelled() {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn split_brain(&mut self, node: usize, observed: Observed) {
        let mut next = self.snapshot();
        let primary = next.primary.map(|p| self.app.node_name(p)).unwrap_or_default();
        tracing::error!(
            node = self.app.node_name(node),
            primary,
            timeline = observed.timeline,
            "split brain: a second node claims to be primary; taking it out of service"
        );
        self.app.metrics.error("split_brain");
        next.nodes[node].last_seen = Some(observed);
        next.nodes[node].status =
            NodeStatus::Down { since: Instant::now(), reason: format!("claimed primary while {primary} is primary") };
        self.no_failback.insert(node);
        self.publish(next);
        self.fence(node).await;
    }

    async fn fence(&mut self, node: usize) {
        self.fenced.insert(node);
        let state = self.snapshot();
        let nodes = HookNodes { node, new_main: state.primary, old_main: state.primary, old_primary: state.primary };
        let cmd = self.app.config.load().failover.fence_command.clone();
        self.run_hook("fence_command", &cmd, &state, nodes).await;
    }

    async fn run_hook(&self, name: &str, template: &str, state: &ClusterState, nodes: HookNodes) -> Option<HookOutcome> {
        if template.trim().is_empty() {
            return None;
        }
        let command = hooks::expand(template, state, nodes);
        let timeout = self.app.config.load().failover.command_timeout;
        let (outcome, took) = hooks::run(name, &command, timeout).await;
        self.app.metrics.hook_runs.with_label_values(&[name, outcome.label()]).inc();
        self.app.metrics.hook_seconds.with_label_values(&[name]).observe(took.as_secs_f64());
        Some(outcome)
    }

    async fn detach(&mut self, node: usize) -> Result<(), String> {
        let mut next = self.snapshot();
        if node >= next.nodes.len() {
            return Err(format!("no node {node}"));
        }
        if matches!(next.nodes[node].status, NodeStatus::Down { .. }) {
            return Ok(());
        }
        let was_primary = next.primary == Some(node);
        next.nodes[node].status = NodeStatus::Down { since: Instant::now(), reason: "detached by operator".into() };
        self.no_failback.insert(node);
        if was_primary {
            next.set_primary(None);
            self.publish(next);
            self.fail_over(node, None).await;
        } else {
            self.publish(next);
        }
        Ok(())
    }

    async fn promote(&mut self, node: usize) -> Result<(), String> {
        let mut next = self.snapshot();
        if next.nodes.get(node).map(|n| &n.status) != Some(&NodeStatus::Up(Role::Standby)) {
            return Err(format!("node {node} is not an in-service standby"));
        }
        let Some(old) = next.primary else {
            return Err("no primary to replace".to_owned());
        };
        next.nodes[old].status = NodeStatus::Down { since: Instant::now(), reason: format!("replaced by node {node} (promote)") };
        next.set_primary(None);
        self.publish(next);
        self.fail_over(old, Some(node)).await;
        if self.app.cluster.load().primary == Some(node) {
            Ok(())
        } else {
            Err(format!("node {node} did not become primary; see the proxy log"))
        }
    }

    async fn attach(&mut self, node: usize) -> Result<(), String> {
        if node >= self.snapshot().nodes.len() {
            return Err(format!("no node {node}"));
        }
        let checked = Instant::now();
        let observed = health::check_once(&self.app, node).await.map_err(|e| format!("node does not answer: {e:?}"))?;
        self.settled.insert(node, checked);
        let mut next = self.snapshot();
        match (observed.role, next.primary) {
            (Role::Primary, Some(p)) if p != node => {
                return Err(format!("node claims to be primary while {} is primary; not attached", self.app.node_name(p)));
            }
            (Role::Primary, _) => next.set_primary(Some(node)),
            _ => {}
        }
        self.fenced.remove(&node);
        self.no_failback.remove(&node);
        next.nodes[node].last_seen = Some(observed);
        next.nodes[node].status = NodeStatus::Up(observed.role);
        self.publish(next);
        Ok(())
    }

    /// Graceful switchover to standby `node`; returns a summary for the operator.
    async fn switchover(&mut self, node: usize) -> Result<String, String> {
        let started = Instant::now();
        let state = self.snapshot();
        if state.nodes.get(node).map(|n| &n.status) != Some(&NodeStatus::Up(Role::Standby)) {
            return Err(format!("node {node} is not an in-service standby"));
        }
        let Some(old) = state.primary else {
            return Err("no primary to switch over from".to_owned());
        };
        let config = self.app.config.load_full();
        let timeout = config.failover.switchover_timeout;
        let (old_name, new_name) = (self.app.node_name(old), self.app.node_name(node));
        tracing::warn!(from = old_name, to = new_name, "switchover: holding new transactions");

        // 1. Pause. With no primary, checkouts wait (hold_timeout) and every session that is
        //    between transactions leaves its backend at its next request (the epoch moved).
        let mut paused = state.clone();
        paused.set_primary(None);
        self.publish(paused);

        // 2. Let transactions in progress finish, then end whatever is still there, so nothing
        //    can commit on the old primary once its WAL position is read.
        let busy = "SELECT count(*) FROM pg_stat_activity \
                    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state <> 'idle'";
        let deadline = Instant::now() + timeout;
        let drained = loop {
            match health::query(&self.app, old, busy).await {
                Ok(rows) if first_value(&rows) == Some("0") => break true,
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Ok(_) => break false,
                Err(e) => return self.resume(old, format!("cannot ask {old_name} about its sessions: {e:?}")),
            }
        };
        if !drained {
            tracing::warn!(?timeout, "switchover: transactions still open on the old primary are terminated");
        }
        let terminate = "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
        let terminated = match health::query(&self.app, old, terminate).await {
            Ok(rows) => first_value(&rows).unwrap_or("0").to_owned(),
            Err(e) => return self.resume(old, format!("cannot end the sessions on {old_name} (the health check user needs pg_signal_backend): {e:?}")),
        };

        // 3. Wait until the new primary has replayed everything the old one flushed.
        let target = match health::query(&self.app, old, "SELECT pg_current_wal_flush_lsn()::text").await {
            Ok(rows) => match first_value(&rows).and_then(health::parse_lsn) {
                Some(lsn) => lsn,
                None => return self.resume(old, format!("unexpected WAL position from {old_name}: {rows:?}")),
            },
            Err(e) => return self.resume(old, format!("cannot read the WAL position of {old_name}: {e:?}")),
        };
        let deadline = Instant::now() + timeout;
        loop {
            match health::check_once(&self.app, node).await {
                Ok(o) if o.role == Role::Standby && o.lsn >= target => break,
                Ok(o) if o.role == Role::Standby && Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Ok(o) => {
                    return self.resume(
                        old,
                        format!("{new_name} did not catch up in {timeout:?}: replayed {:X}, primary at {target:X}", o.lsn),
                    )
                }
                Err(e) => return self.resume(old, format!("{new_name} does not answer: {e:?}")),
            }
        }
        tracing::warn!(to = new_name, lsn = format!("{target:X}"), "switchover: standby caught up; promoting it");

        // 4. The old primary leaves service (it is expected to claim primary for a while, so
        //    it is not fenced), the standby is promoted, the other standbys follow it.
        let mut next = self.snapshot();
        next.nodes[old].status = NodeStatus::Down { since: Instant::now(), reason: format!("switched over to {new_name}") };
        self.fenced.insert(old);
        self.publish(next);
        if config.failover.failover_command.trim().is_empty() {
            // Without a hook the proxy promotes the node itself (needs EXECUTE on pg_promote).
            if let Err(e) = health::query(&self.app, node, "SELECT pg_promote(true, 60)").await {
                tracing::error!(node = new_name, error = ?e, "switchover: pg_promote failed");
            }
        }
        self.fail_over(old, Some(node)).await;
        if self.app.cluster.load().primary != Some(node) {
            return Err(format!("{new_name} did not become primary; sessions wait for a primary (see the proxy log)"));
        }

        // 5. The old primary follows the new one, like any standby; back in service if it works.
        let state = self.snapshot();
        let nodes = HookNodes { node: old, new_main: Some(node), old_main: Some(old), old_primary: Some(old) };
        let outcome = self.run_hook("follow_primary_command", &config.failover.follow_primary_command, &state, nodes).await;
        self.settled.insert(old, Instant::now());
        let old_state = match (outcome, health::check_once(&self.app, old).await) {
            (None | Some(HookOutcome::Success), Ok(o)) if o.role == Role::Standby => {
                let mut next = self.snapshot();
                next.nodes[old].status = NodeStatus::Up(Role::Standby);
                next.nodes[old].last_seen = Some(o);
                self.fenced.remove(&old);
                self.publish(next);
                "is a standby now"
            }
            _ => {
                self.no_failback.insert(old);
                "stays down (follow_primary_command did not make it a standby)"
            }
        };
        let summary = format!(
            "switched over from {old_name} to {new_name} in {:.2}s; {terminated} connection(s) left on {old_name} were closed; {old_name} {old_state}",
            started.elapsed().as_secs_f64()
        );
        tracing::warn!("{summary}");
        Ok(summary)
    }

    /// Calls a switchover off before anything changed: the old primary takes sessions again.
    fn resume(&mut self, old: usize, why: String) -> Result<String, String> {
        tracing::error!(reason = why, "switchover called off; the primary stays where it was");
        let mut next = self.snapshot();
        next.set_primary(Some(old));
        self.publish(next);
        Err(format!("switchover called off: {why}"))
    }

    /// `auto_failback`: a down standby that streams on the primary's timeline is back in service.
    async fn try_failback(&mut self, node: usize) {
        if self.no_failback.contains(&node) {
            return;
        }
        let state = self.snapshot();
        let Some(timeline) = state.primary.and_then(|p| state.nodes[p].last_seen).map(|o| o.timeline) else {
            return;
        };
        let sql = "SELECT status, received_tli FROM pg_stat_wal_receiver";
        let Ok(rows) = health::query(&self.app, node, sql).await else { return };
        let streaming = rows.first().is_some_and(|r| {
            r.first().and_then(|v| v.as_deref()) == Some("streaming")
                && r.get(1).and_then(|v| v.as_deref()).and_then(|t| t.parse::<u32>().ok()) == Some(timeline)
        });
        if streaming {
            let mut next = self.snapshot();
            if matches!(next.nodes[node].status, NodeStatus::Down { .. }) {
                tracing::warn!(node = self.app.node_name(node), timeline, "auto_failback: standby streams from the primary again; back in service");
                next.nodes[node].status = NodeStatus::Up(Role::Standby);
                self.publish(next);
            }
        }
    }
}

/// The first column of the first row, if any.
fn first_value(rows: &[Vec<Option<String>>]) -> Option<&str> {
    rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref())
}
