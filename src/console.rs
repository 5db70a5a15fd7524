//! The SQL admin console: a client that logs in to the database named [`CONSOLE_DATABASE`]
//! talks to the proxy itself, not to PostgreSQL. `SHOW pool_nodes` answers with
//! pgpool-II's columns, so scripts written against pgpool keep working
//! (`psql -h proxy -d pglifeguard -c 'show pool_nodes'`).

use bytes::BytesMut;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::CommandComplete;
use pgwire::messages::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::App;
use crate::cluster::{NodeStatus, Role};
use crate::protocol::{self, Severity};

/// The database name that reaches the console.
pub const CONSOLE_DATABASE: &str = "pglifeguard";

const TEXT_OID: u32 = 25;
const MAX_CONSOLE_MESSAGE: u32 = 1 << 20;

/// Serves console commands until the client leaves. The client is already authenticated.
pub async fn serve(app: &App, sock: &mut TcpStream, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    protocol::put_auth_ok(&mut out);
    for (k, v) in [
        ("server_version", "15.0 (pglifeguard console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        protocol::put_parameter_status(&mut out, k, v);
    }
    protocol::put_backend_key(&mut out, pid, secret);
    protocol::put_ready_for_query(&mut out, b'I');
    sock.write_all(&out).await?;
    let mut failed_extended = false;
    loop {
        let tag = match sock.read_u8().await {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        let len = sock.read_u32().await?;
        if !(4..=MAX_CONSOLE_MESSAGE).contains(&len) {
            let mut out = BytesMut::new();
            protocol::put_error(&mut out, Severity::Fatal, protocol::sqlstate::PROTOCOL_VIOLATION, "invalid message length");
            return sock.write_all(&out).await;
        }
        let mut body = vec![0u8; len as usize - 4];
        sock.read_exact(&mut body).await?;
        let mut out = BytesMut::new();
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let text = String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
                for statement in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    if let Err(message) = run_command(app, statement, &mut out) {
                        protocol::put_error(&mut out, Severity::Error, "42601", &message);
                        break;
                    }
                }
                protocol::put_ready_for_query(&mut out, b'I');
            }
            b'S' => {
                if std::mem::take(&mut failed_extended) {
                    protocol::put_error(
                        &mut out,
                        Severity::Error,
                        protocol::sqlstate::FEATURE_NOT_SUPPORTED,
                        "the console accepts simple queries only",
                    );
                }
                protocol::put_ready_for_query(&mut out, b'I');
            }
            _ => failed_extended = true,
        }
        sock.write_all(&out).await?;
    }
}

fn run_command(app: &App, statement: &str, out: &mut BytesMut) -> Result<(), String> {
    let words: Vec<String> = statement.split_whitespace().map(|w| w.to_lowercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["show", "pool_nodes"] | ["show", "nodes"] => pool_nodes(app, out),
        ["show", "pools"] => pools(app, out),
        ["show", "version"] => table(out, &["version"], vec![vec![format!("pglifeguard {}", env!("CARGO_PKG_VERSION"))]]),
        _ => return Err(format!("unknown console command \"{statement}\"; try SHOW pool_nodes, SHOW pools, SHOW version")),
    }
    Ok(())
}

fn pool_nodes(app: &App, out: &mut BytesMut) {
    let cluster = app.cluster.load();
    let config = app.config.load();
    let total_weight: u32 = config.backends.iter().map(|b| b.weight).sum::<u32>().max(1);
    let primary_lsn = cluster.primary.and_then(|p| cluster.nodes[p].last_seen).map(|o| o.lsn);
    let mut rows = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let status = match n.status {
            NodeStatus::Up(_) => "up",
            NodeStatus::Down { .. } => "down",
            NodeStatus::Unknown => "waiting",
        };
        let role = |r: Option<Role>| match r {
            Some(Role::Primary) => "primary",
            Some(Role::Standby) => "standby",
            None => "unknown",
        };
        let managed_role = match &n.status {
            NodeStatus::Up(r) => Some(*r),
            _ => n.last_seen.map(|o| o.role),
        };
        let delay = match (primary_lsn, n.last_seen) {
            (Some(p), Some(o)) if o.role == Role::Standby => p.saturating_sub(o.lsn).to_string(),
            _ => "0".to_owned(),
        };
        let weight = config.backends.get(i).map(|b| b.weight).unwrap_or(0);
        rows.push(vec![
            i.to_string(),
            n.host.clone(),
            n.port.to_string(),
            status.to_owned(),
            if n.last_seen.is_some() && n.status.is_up() { "up" } else { status }.to_owned(),
            format!("{:.6}", weight as f64 / total_weight as f64),
            role(managed_role).to_owned(),
            role(n.last_seen.map(|o| o.role)).to_owned(),
            "0".to_owned(),
            (cluster.primary == Some(i)).to_string(),
            delay,
            String::new(),
            String::new(),
            match &n.status {
                NodeStatus::Down { reason, .. } => reason.clone(),
                _ => String::new(),
            },
        ]);
    }
    table(
        out,
        &[
            "node_id",
            "hostname",
            "port",
            "status",
            "pg_status",
            "lb_weight",
            "role",
            "pg_role",
            "select_cnt",
            "load_balance_node",
            "replication_delay",
            "replication_state",
            "replication_sync_state",
            "last_status_change",
        ],
        rows,
    );
}

fn pools(app: &App, out: &mut BytesMut) {
    let rows = app
        .pools
        .all()
        .iter()
        .map(|p| vec![p.key.user.clone(), p.key.database.clone(), p.in_use().to_string(), p.idle_count().to_string()])
        .collect();
    table(out, &["user", "database", "in_use", "idle"], rows);
}

fn table(out: &mut BytesMut, columns: &[&str], rows: Vec<Vec<String>>) {
    let fields =
        columns.iter().map(|c| FieldDescription::new((*c).to_owned(), 0, 0, TEXT_OID, -1, -1, 0)).collect();
    encode(&RowDescription::new(fields), out);
    let count = rows.len();
    for row in rows {
        let mut data = BytesMut::new();
        for value in &row {
            data.extend_from_slice(&(value.len() as i32).to_be_bytes());
            data.extend_from_slice(value.as_bytes());
        }
        encode(&DataRow::new(data, row.len() as i16), out);
    }
    encode(&CommandComplete::new(format!("SHOW {count}")), out);
}

fn encode<M: Message>(m: &M, out: &mut BytesMut) {
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "cannot encode console reply");
    }
}
