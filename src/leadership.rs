//! What being the watchdog leader means on this node: the escalation hook runs, and the
//! virtual IP is held through the guardian process ([`crate::vip`]) exactly while the leader
//! lease is valid.
//!
//! Two rules keep the VIP on one node at a time:
//! - The guardian is renewed with the lease deadline, which counts from the send time of the
//!   last heartbeat a quorum acknowledged ([`crate::watchdog`]). A leader that loses its
//!   majority, freezes or dies stops renewing, and the guardian drops the address by then.
//! - A new leader waits one full lease after its election before it brings the VIP up: any
//!   older leader's deadline was set from a heartbeat acknowledged before that election, so
//!   it has run out by then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::vip::{monotonic_ns, Guardian, GuardianConfig, VipState};
use crate::watchdog::{VipConfig, Watchdog, WatchdogConfig};

/// Builds the guardian settings from the `watchdog.vip` section.
pub fn guardian_config(vip: &VipConfig) -> Result<GuardianConfig, crate::vip::GuardianError> {
    let mut g = GuardianConfig::new(&vip.address, &vip.interface)?;
    if !vip.if_up_cmd.trim().is_empty() {
        g.if_up_cmd = vip.if_up_cmd.clone();
    }
    if !vip.if_down_cmd.trim().is_empty() {
        g.if_down_cmd = vip.if_down_cmd.clone();
    }
    if !vip.arping_cmd.trim().is_empty() {
        g.arping_cmd = vip.arping_cmd.clone();
    }
    Ok(g)
}

/// Runs until shutdown: escalates when this node may act as leader, renews the VIP, and
/// de-escalates (VIP first) when it may not. On shutdown the VIP is dropped.
pub async fn run(app: Arc<App>, wd: Arc<Watchdog>, config: WatchdogConfig) {
    let mut guardian = match config.vip.as_ref().map(guardian_config) {
        None => None,
        Some(Err(e)) => {
            tracing::error!(error = %e, "invalid watchdog.vip; running without a virtual IP");
            None
        }
        Some(Ok(g)) => match spawn_guardian(&g) {
            Ok(guardian) => Some(guardian),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the VIP guardian; running without a virtual IP");
                None
            }
        },
    };
    if let Some(g) = &guardian {
        let mut state = g.state();
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let s = *state.borrow_and_update();
                app.metrics.vip_held.set(i64::from(s == VipState::Up));
                tracing::info!(state = ?s, "virtual IP");
            }
        });
    }
    let clock = ClockPair::capture();
    let mut lease = wd.lease();
    let mut tick = tokio::time::interval(config.heartbeat_interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut escalated = false;
    let hook_timeout = app.config.load().failover.command_timeout;
    loop {
        tokio::select! {
            _ = lease.changed() => {}
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => break,
        }
        let deadline = *lease.borrow_and_update();
        let now = Instant::now();
        let waited_out = wd.became_leader_at().is_some_and(|since| now >= since + config.lease);
        match deadline {
            Some(deadline) if deadline > now && waited_out => {
                if !escalated {
                    escalated = true;
                    app.metrics.watchdog_escalations.inc();
                    tracing::warn!(node = wd.id(), "this proxy is the watchdog leader; escalating");
                    if !config.escalation_command.trim().is_empty() {
                        crate::hooks::run("escalation_command", &config.escalation_command, hook_timeout).await;
                        // The hook took time: look at the lease again before using it.
                        continue;
                    }
                }
                if let Some(g) = guardian.as_mut() {
                    if let Err(e) = g.renew(clock.to_monotonic_ns(deadline)).await {
                        tracing::error!(error = %e, "cannot renew the VIP lease with the guardian");
                    }
                }
            }
            _ if escalated => {
                escalated = false;
                tracing::warn!(node = wd.id(), "no longer the watchdog leader (or lease lost); dropping the VIP");
                if let Some(g) = guardian.as_mut() {
                    if let Err(e) = g.release().await {
                        tracing::error!(error = %e, "cannot tell the guardian to drop the VIP");
                    }
                }
                if !config.de_escalation_command.trim().is_empty() {
                    crate::hooks::run("de_escalation_command", &config.de_escalation_command, hook_timeout).await;
                }
            }
            _ => {}
        }
        app.metrics.watchdog_leader.set(i64::from(escalated));
    }
    if let Some(g) = guardian {
        // Closing the pipe drops the address; wait for it so a restart finds it gone.
        let _ = g.shutdown(Duration::from_secs(5)).await;
        app.metrics.vip_held.set(0);
    }
    if escalated && !config.de_escalation_command.trim().is_empty() {
        crate::hooks::run("de_escalation_command", &config.de_escalation_command, hook_timeout).await;
    }
}

fn spawn_guardian(config: &GuardianConfig) -> Result<Guardian, crate::vip::GuardianError> {
    let exe = std::env::current_exe().map_err(crate::vip::GuardianError::Spawn)?;
    Guardian::spawn(&exe, &["vip-guardian"], config)
}

/// Maps `Instant`s to absolute CLOCK_MONOTONIC nanoseconds for the guardian. On Linux both are
/// the same clock, so the offset between them is constant: it is measured once, with both
/// readings taken back to back. Mapping each deadline through "now" instead would be wrong for
/// a process frozen between reading the lease and writing to the guardian: the deadline
/// would move forward by the length of the freeze.
struct ClockPair {
    instant: Instant,
    monotonic_ns: u64,
}

impl ClockPair {
    fn capture() -> ClockPair {
        loop {
            let before = monotonic_ns();
            let instant = Instant::now();
            let after = monotonic_ns();
            // Using the earlier reading errs towards an earlier deadline.
            if after.saturating_sub(before) < 1_000_000 {
                return ClockPair { instant, monotonic_ns: before };
            }
        }
    }

    fn to_monotonic_ns(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.instant);
        self.monotonic_ns.saturating_add(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }
}
