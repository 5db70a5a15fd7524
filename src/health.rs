//! Periodic checks of every backend: log in, ask `SELECT pg_is_in_recovery()`, and publish the
//! resulting roles (and the primary) as a new cluster snapshot. Also evicts stale idle
//! connections from the pools on the same beat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::app::App;
use crate::auth::BackendCredential;
use crate::backend::{BackendConn, ConnectSpec};
use crate::cluster::{NodeStatus, Role};

/// Checks one node once.
pub async fn check_node(app: &App, node: usize, addr: &str) -> NodeStatus {
    let config = app.config.load_full();
    let check = &config.primary_check;
    let credential = match &check.password {
        Some(p) => BackendCredential::Password(p.clone()),
        None => app.users.load().backend_credential(&check.user),
    };
    let mut params = BTreeMap::new();
    params.insert("application_name".to_owned(), "pglifeguard health check".to_owned());
    let spec = ConnectSpec {
        node,
        addr: addr.to_owned(),
        user: check.user.clone(),
        database: check.database.clone(),
        params: Arc::new(params),
        credential,
    };
    let attempt = async {
        let mut conn = BackendConn::connect(&spec, 0, check.timeout).await?;
        let rows = conn.simple_query("SELECT pg_is_in_recovery()").await;
        conn.close().await;
        rows
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(Ok(rows)) => match rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()) {
            Some("f") => NodeStatus::Up(Role::Primary),
            Some("t") => NodeStatus::Up(Role::Standby),
            other => {
                tracing::warn!(node = addr, answer = ?other, "unexpected answer to pg_is_in_recovery()");
                NodeStatus::Down { since: Instant::now() }
            }
        },
        Ok(Err(e)) => {
            tracing::debug!(node = addr, error = %e, "backend check failed");
            NodeStatus::Down { since: Instant::now() }
        }
        Err(_) => {
            tracing::debug!(node = addr, "backend check timed out");
            NodeStatus::Down { since: Instant::now() }
        }
    }
}

/// Checks every node concurrently and publishes the new view if anything changed.
pub async fn check_all(app: &App) {
    let current = app.cluster.load_full();
    let checks = current.nodes.iter().enumerate().map(|(i, n)| check_node(app, i, &n.addr));
    let observed: Vec<NodeStatus> = futures_util::future::join_all(checks).await;
    let next = current.with_observations(&observed);
    if next.primary != current.primary {
        match next.primary_addr() {
            Some((_, addr)) => tracing::info!(primary = addr, epoch = next.epoch, "primary found"),
            None => tracing::warn!(epoch = next.epoch, "no primary available"),
        }
    }
    let changed_status = next.nodes.iter().zip(&current.nodes).any(|(a, b)| a.status.name() != b.status.name());
    if changed_status || next.epoch != current.epoch {
        for (n, old) in next.nodes.iter().zip(&current.nodes) {
            if n.status.name() != old.status.name() {
                tracing::info!(node = n.name, addr = n.addr, from = old.status.name(), to = n.status.name(), "node status changed");
            }
        }
        app.set_cluster(next);
    }
}

/// Runs checks forever on the configured interval, until shutdown.
pub async fn run(app: Arc<App>) {
    loop {
        check_all(&app).await;
        let epoch = app.cluster.load().epoch;
        for pool in app.pools.all() {
            pool.evict(&app, epoch);
        }
        let interval = app.config.load().primary_check.interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}
