//! A minimal HTTP/1.0 endpoint for operators and probes: `/metrics` (Prometheus text format),
//! `/status` (nodes and pools), `/health`, and `POST /nodes/<id>/attach|detach|promote|switchover`. It reads snapshots only, never a pooled backend,
//! so it answers even when every pool is exhausted.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/status` and `/health` (and `/metrics` too, for convenience).
    Admin,
    /// `/metrics` only.
    Metrics,
}

/// Serves HTTP requests until shutdown.
pub async fn serve(app: Arc<App>, listener: TcpListener, endpoint: Endpoint) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    let app = Arc::clone(&app);
                    tokio::spawn(async move {
                        let _ = handle(&app, sock, endpoint).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = app.shutdown.cancelled() => return,
        }
    }
}

async fn handle(app: &App, mut sock: TcpStream, endpoint: Endpoint) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    // A silent client gets 10 s to send its request; node commands then take as long as the
    // failover manager needs (a switchover waits for transactions and replication).
    let read = async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            req.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("GET");
    let path = words.next().unwrap_or("/");
    if endpoint == Endpoint::Admin && method == "POST" {
        let (status, body) = node_command(app, path).await;
        let head = format!("HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body.as_bytes()).await?;
        return sock.shutdown().await;
    }
    let (status, ctype, body) = match (endpoint, path) {
        (_, "/metrics") => ("200 OK", "text/plain; version=0.0.4", app.metrics.render()),
        (Endpoint::Admin, "/status") => ("200 OK", "text/plain", status_text(app).into_bytes()),
        (Endpoint::Admin, "/watchdog") => match &app.watchdog {
            Some(wd) => ("200 OK", "text/plain", watchdog_text(app, wd).into_bytes()),
            None => ("404 Not Found", "text/plain", b"watchdog is not configured\n".to_vec()),
        },
        (Endpoint::Admin, "/health") => {
            if app.cluster.load().primary.is_some() {
                ("200 OK", "text/plain", b"ok\n".to_vec())
            } else {
                ("503 Service Unavailable", "text/plain", b"no primary\n".to_vec())
            }
        }
        _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let head = format!("HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(&body).await?;
    sock.shutdown().await
}

/// `POST /nodes/<id>/attach`, `detach`, `promote` and `switchover`, carried out by the
/// failover manager so they are ordered with health events.
async fn node_command(app: &App, path: &str) -> (&'static str, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (node, action) = match parts.as_slice() {
        ["nodes", id, action] => match id.parse::<usize>() {
            Ok(n) => (n, *action),
            Err(_) => return ("400 Bad Request", format!("bad node id {id}\n")),
        },
        _ => return ("404 Not Found", "not found\n".to_owned()),
    };
    let done = format!("node {node}: {action} done");
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
    let (unit_tx, unit_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let event = match action {
        "attach" => crate::failover::Event::Attach(node, unit_tx),
        "detach" => crate::failover::Event::Detach(node, unit_tx),
        "promote" => crate::failover::Event::Promote(node, unit_tx),
        "switchover" => crate::failover::Event::Switchover(node, tx),
        _ => return ("404 Not Found", format!("unknown action {action}\n")),
    };
    if app.events.send(event).await.is_err() {
        return ("503 Service Unavailable", "shutting down\n".to_owned());
    }
    let reply = async {
        tokio::select! {
            Ok(r) = rx => Some(r),
            Ok(r) = unit_rx => Some(r.map(|()| done)),
            else => None,
        }
    };
    match tokio::time::timeout(Duration::from_secs(300), reply).await {
        Ok(Some(Ok(text))) => ("200 OK", format!("{text}\n")),
        Ok(Some(Err(e))) => ("409 Conflict", format!("{e}\n")),
        _ => ("504 Gateway Timeout", "no answer from the failover manager\n".to_owned()),
    }
}

/// Human-readable state: nodes, then pools.
pub fn status_text(app: &App) -> String {
    let cluster = app.cluster.load();
    let mut out = String::new();
    let _ = writeln!(out, "epoch\t{}", cluster.epoch);
    let _ = writeln!(out, "clients\t{}", app.client_count());
    let _ = writeln!(out, "\nnode\tname\taddress\tstatus");
    let _ = write!(out, "{cluster}");
    let _ = writeln!(out, "\nuser\tdatabase\tin_use\tidle");
    for pool in app.pools.all() {
        let _ = writeln!(out, "{}\t{}\t{}\t{}", pool.key.user, pool.key.database, pool.in_use(), pool.idle_count());
    }
    out
}

/// Human-readable watchdog state: this node, leader, term, lease, VIP, peers; then the
/// agreed cluster state.
pub fn watchdog_text(app: &App, wd: &crate::watchdog::Watchdog) -> String {
    let st = wd.status();
    let agreed = wd.state().borrow().clone();
    let mut out = String::new();
    let _ = writeln!(out, "node\t{}", st.id);
    let _ = writeln!(out, "state\t{}", st.state);
    let _ = writeln!(out, "term\t{}", st.term);
    let _ = writeln!(out, "leader\t{}", st.leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()));
    let _ = writeln!(out, "lease\t{}", if st.lease_valid { format!("valid, {} ms left", st.lease_remaining_ms.unwrap_or(0)) } else { "none".into() });
    let vip = app.config.load().watchdog.as_ref().and_then(|w| w.vip.as_ref()).map(|v| v.address.clone());
    match vip {
        Some(addr) => {
            let held = if app.metrics.vip_held.get() == 1 { "held by this node" } else { "not held by this node" };
            let _ = writeln!(out, "vip\t{addr} {held}");
        }
        None => {
            let _ = writeln!(out, "vip\tnone configured");
        }
    }
    let _ = writeln!(out, "\npeer\taddress\twitness\treachable");
    for p in &st.peers {
        let _ = writeln!(out, "{}\t{}\t{}\t{}", p.id, p.addr, p.witness, p.reachable);
    }
    let _ = writeln!(out, "\nagreed primary\t{}", agreed.primary.as_deref().unwrap_or("none"));
    let _ = writeln!(out, "agreed down\t{}", agreed.down.iter().cloned().collect::<Vec<_>>().join(","));
    let _ = writeln!(out, "agreed epoch\t{}", agreed.epoch);
    for (node, peers) in &agreed.reports {
        let _ = writeln!(out, "failure reports\t{node}\t{}", peers.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
    }
    out
}
