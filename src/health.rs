//! Health checks: one task per node logs in with the health user and asks
//! `pg_is_in_recovery()` (plus its WAL position and timeline) every period, retrying before it
//! reports a failure. Reports go to the failover manager, which alone changes node states.
//!
//! A check that times out is retried `max_retries` times, `retry_delay` apart, so a primary
//! that is merely slow under load is not failed over. A refused connection or a shutdown
//! error (57P01-57P03) is retried only `max_retries_refused` times after a short pause: that
//! server is gone, and waiting longer only prolongs the outage. Data connections that fail
//! wake a node's checker at once ([`crate::app::App::suspect`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::app::App;
use crate::auth::BackendCredential;
use crate::backend::{BackendConn, BackendError, ConnectSpec};
use crate::cluster::{Observed, Role};

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    /// The server refused or dropped the connection, or said it is shutting down.
    Gone(String),
    /// No answer within the timeout.
    Timeout,
    /// Any other failure (authentication, unexpected answer).
    Other(String),
}

impl CheckFailure {
    fn is_gone(&self) -> bool {
        matches!(self, CheckFailure::Gone(_))
    }
}

/// A check result for one node, sent to the failover manager.
#[derive(Debug, Clone)]
pub struct Report {
    /// The node.
    pub node: usize,
    /// What the check found.
    pub result: Result<Observed, CheckFailure>,
    /// When the check started: a report that queued up while the manager was busy can be
    /// older than what the manager has since seen for itself.
    pub started: Instant,
}

const QUERY: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
     CASE WHEN pg_is_in_recovery() THEN 0 \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END";

/// Checks one node once, within the configured timeout.
pub async fn check_once(app: &App, node: usize) -> Result<Observed, CheckFailure> {
    let started = Instant::now();
    let result = query(app, node, QUERY).await.and_then(|rows| parse_row(rows.first()));
    app.metrics.health_check_seconds.observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        app.metrics.health_check_failures.with_label_values(&[&app.node_name(node)]).inc();
    }
    result
}

/// Runs one statement on a node as the health check user, in a connection of its own, within
/// the health check timeout. Used by checks and by the failover manager's own questions.
pub async fn query(app: &App, node: usize, sql: &str) -> Result<Vec<Vec<Option<String>>>, CheckFailure> {
    let config = app.config.load_full();
    let check = &config.health_check;
    let Some(addr) = app.cluster.load().nodes.get(node).map(|n| n.addr()) else {
        return Err(CheckFailure::Other("no such node".into()));
    };
    let credential = match &check.password {
        Some(p) => BackendCredential::Password(p.clone()),
        None => app.users.load().backend_credential(&check.user),
    };
    let mut params = BTreeMap::new();
    params.insert("application_name".to_owned(), "pglifeguard health check".to_owned());
    let spec = ConnectSpec {
        node,
        addr,
        user: check.user.clone(),
        database: check.database.clone(),
        params: Arc::new(params),
        credential,
    };
    let attempt = async {
        let mut conn = BackendConn::connect(&spec, 0, check.timeout).await?;
        let rows = conn.simple_query(sql).await;
        conn.close().await;
        rows
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Err(_) => Err(CheckFailure::Timeout),
        Ok(Err(e)) => Err(classify(&e)),
        Ok(Ok(rows)) => Ok(rows),
    }
}

fn classify(e: &BackendError) -> CheckFailure {
    match e {
        BackendError::Timeout { .. } => CheckFailure::Timeout,
        BackendError::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe => CheckFailure::Gone(e.to_string()),
            _ => CheckFailure::Other(e.to_string()),
        },
        BackendError::Server { error, .. } if matches!(error.code(), "57P01" | "57P02" | "57P03") => {
            CheckFailure::Gone(e.to_string())
        }
        other => CheckFailure::Other(other.to_string()),
    }
}

fn parse_row(row: Option<&Vec<Option<String>>>) -> Result<Observed, CheckFailure> {
    let bad = || CheckFailure::Other(format!("unexpected health check answer {row:?}"));
    let row = row.ok_or_else(bad)?;
    let role = match row.first().and_then(|v| v.as_deref()) {
        Some("f") => Role::Primary,
        Some("t") => Role::Standby,
        _ => return Err(bad()),
    };
    let lsn = row.get(1).and_then(|v| v.as_deref()).and_then(parse_lsn).unwrap_or(0);
    let timeline = row.get(2).and_then(|v| v.as_deref()).and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Observed { role, lsn, timeline })
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Checks with retries: returns the first success, or the last failure once the retries
/// allowed for that kind of failure are used up.
pub async fn check_with_retries(app: &App, node: usize) -> Result<Observed, CheckFailure> {
    let mut attempt = 0u32;
    loop {
        let result = check_once(app, node).await;
        let Err(failure) = &result else { return result };
        let config = app.config.load();
        let (allowed, delay) = if failure.is_gone() {
            // A refused connection is answered instantly; one quick re-check guards against
            // a restart racing the check without delaying a real failover.
            (config.health_check.max_retries_refused, config.health_check.retry_delay.min(Duration::from_millis(100)))
        } else {
            (config.health_check.max_retries, config.health_check.retry_delay)
        };
        if attempt >= allowed || app.shutdown.is_cancelled() {
            return result;
        }
        attempt += 1;
        tracing::debug!(node = app.node_name(node), attempt, error = ?failure, "health check failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Runs the checker of one node until shutdown, sending every result to `reports`.
pub async fn run_checker(app: Arc<App>, node: usize, reports: mpsc::Sender<Report>) {
    let suspect = app.suspect_signal(node);
    loop {
        let started = Instant::now();
        let result = check_with_retries(&app, node).await;
        if reports.send(Report { node, result, started }).await.is_err() {
            return;
        }
        let period = app.config.load().health_check.period;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = suspect.notified() => tracing::debug!(node = app.node_name(node), "data connection failed, checking now"),
            _ = app.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("bogus"), None);
    }

    #[test]
    fn answers_parse() {
        let row = vec![Some("f".into()), Some("0/10".into()), Some("3".into())];
        assert_eq!(parse_row(Some(&row)), Ok(Observed { role: Role::Primary, lsn: 16, timeline: 3 }));
        let row = vec![Some("t".into()), Some("0/20".into()), Some("0".into())];
        assert_eq!(parse_row(Some(&row)).map(|o| o.role), Ok(Role::Standby));
        assert!(parse_row(None).is_err());
    }
}
