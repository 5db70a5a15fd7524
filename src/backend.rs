//! One connection from the proxy to a PostgreSQL server: connect, log in, run the proxy's own
//! simple queries (reset, rollback, `SET`, `pg_is_in_recovery()`), and hold the socket while a
//! client session uses it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{md5_response, BackendCredential};
use crate::net;
use crate::protocol::error_field;

/// An error reported by a PostgreSQL server, kept whole so it can be relayed to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Every field of the ErrorResponse.
    pub fields: Vec<(u8, String)>,
}

impl ServerError {
    /// The SQLSTATE code.
    pub fn code(&self) -> &str {
        error_field(&self.fields, b'C').unwrap_or("XX000")
    }

    /// The primary message.
    pub fn message(&self) -> &str {
        error_field(&self.fields, b'M').unwrap_or("unknown server error")
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message(), self.code())
    }
}

/// Why talking to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect or I/O failed.
    #[error("{addr}: {source}")]
    Io {
        /// The server address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{addr}: {error}")]
    Server {
        /// The server address.
        addr: String,
        /// What the server said.
        error: ServerError,
    },
    /// The server asked for a login method the proxy cannot answer.
    #[error("{addr}: {reason}")]
    Auth {
        /// The server address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server sent something the proxy did not expect.
    #[error("{addr}: protocol error: {reason}")]
    Protocol {
        /// The server address.
        addr: String,
        /// What was wrong.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("{addr}: timed out after {after:?}")]
    Timeout {
        /// The server address.
        addr: String,
        /// The deadline that passed.
        after: Duration,
    },
}

impl BackendError {
    /// The server's own error, if the failure came from one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            BackendError::Server { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    /// Index of the node in the cluster.
    pub node: usize,
    /// `host:port`.
    pub addr: String,
    /// Login user.
    pub user: String,
    /// Database.
    pub database: String,
    /// Extra startup parameters (application_name, options, client_encoding, …).
    pub params: Arc<BTreeMap<String, String>>,
    /// Secret for the login.
    pub credential: BackendCredential,
}

/// A logged-in backend connection.
///
/// `repr(C)` with the socket first, then the epoch: the relay reads the socket on every
/// wake-up and the epoch at every transaction boundary, and keeps the connection at a
/// cache-line boundary, so those two share a line with nothing cold.
#[derive(Debug)]
#[repr(C)]
pub struct BackendConn {
    /// The socket.
    pub stream: TcpStream,
    /// Cluster epoch (primary assignment) it was opened under; next to the socket because the
    /// relay compares it with the current epoch at every transaction boundary.
    pub epoch: u64,
    /// Index of the node it is connected to.
    pub node: usize,
    /// `host:port`, for logs.
    pub addr: String,
    /// Backend process id, for cancel requests.
    pub pid: i32,
    /// Backend secret key, for cancel requests.
    pub secret: i32,
    /// Startup parameters it was opened with: its session defaults, restored by the reset.
    pub startup: Arc<BTreeMap<String, String>>,
    /// Latest ParameterStatus values the server reported.
    pub reported: BTreeMap<String, String>,
    /// When it was opened.
    pub created: Instant,
    /// When it was last released to the pool.
    pub released: Instant,
    buf: BytesMut,
}

/// Rows of text values returned by [`BackendConn::simple_query`].
pub type Rows = Vec<Vec<Option<String>>>;

impl BackendConn {
    /// Opens a connection and logs in, all within `timeout`.
    pub async fn connect(spec: &ConnectSpec, epoch: u64, timeout: Duration) -> Result<BackendConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(spec, epoch)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout { addr: spec.addr.clone(), after: timeout }),
        }
    }

    async fn connect_inner(spec: &ConnectSpec, epoch: u64) -> Result<BackendConn, BackendError> {
        let io = |source| BackendError::Io { addr: spec.addr.clone(), source };
        let stream = TcpStream::connect(&spec.addr).await.map_err(io)?;
        net::tune_backend(&stream);
        let now = Instant::now();
        let mut conn = BackendConn {
            stream,
            node: spec.node,
            addr: spec.addr.clone(),
            pid: 0,
            secret: 0,
            startup: spec.params.clone(),
            reported: BTreeMap::new(),
            created: now,
            released: now,
            epoch,
            buf: BytesMut::with_capacity(4096),
        };
        let mut out = BytesMut::new();
        let mut params: Vec<(&str, &str)> = vec![("user", &spec.user), ("database", &spec.database)];
        params.extend(spec.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(params.iter().copied(), &mut out).map_err(io)?;
        conn.stream.write_all(&out).await.map_err(io)?;
        conn.login(spec).await?;
        Ok(conn)
    }

    async fn login(&mut self, spec: &ConnectSpec) -> Result<(), BackendError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.read_message().await?;
            let mut out = BytesMut::new();
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = self.plain_password(spec, "password")?;
                    frontend::password_message(password.as_bytes(), &mut out).map_err(|e| self.io(e))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = match &spec.credential {
                        BackendCredential::Password(p) => crate::auth::md5_user_hash(p, &spec.user),
                        BackendCredential::Md5Hash(h) => h.clone(),
                        BackendCredential::None => return Err(self.auth_err("the server asks for an md5 password and the auth file has none for this user")),
                    };
                    let response = md5_response(&hash, body.salt());
                    frontend::password_message(response.as_bytes(), &mut out).map_err(|e| self.io(e))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut found = false;
                    while let Ok(Some(m)) = fallible_iterator::FallibleIterator::next(&mut mechs) {
                        found |= m == "SCRAM-SHA-256";
                    }
                    if !found {
                        return Err(self.auth_err("the server offers no SASL mechanism the proxy supports"));
                    }
                    let password = self.plain_password(spec, "SCRAM-SHA-256")?;
                    let client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", client.message(), &mut out).map_err(|e| self.io(e))?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram.as_mut().ok_or_else(|| self.protocol("unexpected SASL continue"))?;
                    client.update(body.data()).map_err(|e| self.auth_err(&e.to_string()))?;
                    frontend::sasl_response(client.message(), &mut out).map_err(|e| self.io(e))?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram.as_mut().ok_or_else(|| self.protocol("unexpected SASL final"))?;
                    client.finish(body.data()).map_err(|e| self.auth_err(&e.to_string()))?;
                }
                Message::ParameterStatus(body) => {
                    if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                        self.reported.insert(k.to_owned(), v.to_owned());
                    }
                }
                Message::BackendKeyData(body) => {
                    self.pid = body.process_id();
                    self.secret = body.secret_key();
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(self.server_err(&body)),
                Message::NoticeResponse(_) => {}
                _ => return Err(self.protocol("unexpected message during login")),
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await.map_err(|e| self.io(e))?;
            }
        }
    }

    fn plain_password<'a>(&self, spec: &'a ConnectSpec, method: &str) -> Result<&'a str, BackendError> {
        match &spec.credential {
            BackendCredential::Password(p) => Ok(p),
            _ => Err(self.auth_err(&format!(
                "the server asks for {method} and the auth file has no plaintext password for user \"{}\"",
                spec.user
            ))),
        }
    }

    /// Runs one simple query and returns its rows as text. Records ParameterStatus updates.
    /// Fails with the server's error if the statement failed (the connection stays usable).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, BackendError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io(e))?;
        self.stream.write_all(&out).await.map_err(|e| self.io(e))?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Ok(Some(r)) = fallible_iterator::FallibleIterator::next(&mut ranges) {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(self.server_err(&body)),
                Message::ParameterStatus(body) => {
                    if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                        self.reported.insert(k.to_owned(), v.to_owned());
                    }
                }
                Message::ReadyForQuery(_) => break,
                Message::CopyInResponse(_) => {
                    let mut out = BytesMut::new();
                    frontend::copy_fail("COPY is not supported here", &mut out).map_err(|e| self.io(e))?;
                    self.stream.write_all(&out).await.map_err(|e| self.io(e))?;
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Gives a fresh connection the state a client built on its previous one: the settings
    /// the server reported to it (those a client can change with SET) and its named prepared
    /// statements, re-parsed from the client's own Parse messages.
    pub async fn restore(&mut self, session: &crate::relay::SessionState) -> Result<(), BackendError> {
        const SETTABLE: [&str; 7] = [
            "application_name",
            "client_encoding",
            "DateStyle",
            "IntervalStyle",
            "TimeZone",
            "standard_conforming_strings",
            "search_path",
        ];
        let mut sql = String::new();
        for name in SETTABLE {
            if let Some(v) = session.param(name) {
                if self.reported.get(name).map(String::as_str) != Some(v) {
                    sql.push_str(&format!(
                        "SET {} = {};",
                        postgres_protocol::escape::escape_identifier(name),
                        postgres_protocol::escape::escape_literal(v)
                    ));
                }
            }
        }
        if !sql.is_empty() {
            self.simple_query(&sql).await?;
        }
        if session.prepared.is_empty() {
            return Ok(());
        }
        let mut out = BytesMut::new();
        for parse in session.prepared.values() {
            out.extend_from_slice(parse);
        }
        frontend::sync(&mut out);
        self.stream.write_all(&out).await.map_err(|e| self.io(e))?;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::ErrorResponse(body) => error = Some(self.server_err(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Whether the idle socket has turned readable: an idle backend only sends when it is
    /// about to go away (admin shutdown, idle timeout), so any byte or EOF means discard it.
    pub fn is_broken(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Ok(_) => true, // data or EOF on an idle connection
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Sends Terminate and drops the socket.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(200), self.stream.write_all(&out)).await;
    }

    async fn read_message(&mut self) -> Result<Message, BackendError> {
        loop {
            match Message::parse(&mut self.buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(&e.to_string())),
            }
            self.buf.reserve(4096);
            let n = self.stream.read_buf(&mut self.buf).await.map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    fn io(&self, source: std::io::Error) -> BackendError {
        BackendError::Io { addr: self.addr.clone(), source }
    }

    fn auth_err(&self, reason: &str) -> BackendError {
        BackendError::Auth { addr: self.addr.clone(), reason: reason.to_owned() }
    }

    fn protocol(&self, reason: &str) -> BackendError {
        BackendError::Protocol { addr: self.addr.clone(), reason: reason.to_owned() }
    }

    fn server_err(&self, body: &postgres_protocol::message::backend::ErrorResponseBody) -> BackendError {
        BackendError::Server {
            addr: self.addr.clone(),
            error: ServerError { fields: error_fields(body) },
        }
    }
}

fn error_fields(body: &postgres_protocol::message::backend::ErrorResponseBody) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        out.push((f.type_(), String::from_utf8_lossy(f.value_bytes()).into_owned()));
    }
    out
}

/// Sends a CancelRequest for a backend process on a fresh connection, as PostgreSQL requires.
pub async fn send_cancel(addr: &str, pid: i32, secret: i32, timeout: Duration) -> Result<(), BackendError> {
    let io = |source| BackendError::Io { addr: addr.to_owned(), source };
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let mut out = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut out);
        stream.write_all(&out).await.map_err(io)?;
        // The server closes the connection once it has read the request; waiting for that keeps
        // the cancel from racing the client's next statement.
        let mut sink = [0u8; 16];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(BackendError::Timeout { addr: addr.to_owned(), after: timeout }))
}
