//! Client authentication: the users file and the trust / md5 / SCRAM-SHA-256 exchanges.
//!
//! The users file accepts both formats operators already have: PgBouncer's `userlist.txt`
//! (`"user" "secret"`) and pgpool-II's `pool_passwd` (`user:secret`). A secret is a plaintext
//! password (pgpool's `TEXT` prefix is accepted), an `md5…` hash or a `SCRAM-SHA-256$…` verifier.

use std::collections::HashMap;
use std::path::Path;

use bytes::{Buf, BytesMut};
use md5::{Digest, Md5};
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::AuthMethod;
use crate::scram::{self, Verifier};

/// One user's stored secret.
#[derive(Debug, Clone)]
pub enum Secret {
    /// Plaintext password, with the SCRAM verifier derived from it at load time.
    Plain {
        /// The password.
        password: String,
        /// Verifier with a random salt, so SCRAM clients can be checked.
        verifier: Box<Verifier>,
    },
    /// `md5` + hex(md5(password + user)), as in `pg_authid`.
    Md5(String),
    /// A SCRAM-SHA-256 verifier.
    Scram(Box<Verifier>),
}

/// What the proxy can use to log in to a backend as a given user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCredential {
    /// No stored secret: works with backends that trust the proxy.
    None,
    /// A plaintext password: works with every method.
    Password(String),
    /// An md5 hash: works with md5 backends only.
    Md5Hash(String),
}

/// Why the users file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UserListError {
    /// The file could not be read.
    #[error("cannot read auth file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line could not be understood.
    #[error("auth file {path}, line {line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Users and their secrets.
#[derive(Debug, Clone, Default)]
pub struct UserList {
    users: HashMap<String, Secret>,
}

impl UserList {
    /// Loads a users file in either supported format.
    pub fn load(path: &Path) -> Result<UserList, UserListError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| UserListError::Read { path: name.clone(), source })?;
        UserList::parse(&text).map_err(|(line, reason)| UserListError::Line { path: name, line, reason })
    }

    /// Parses file contents; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<UserList, (usize, String)> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let (user, secret) = if line.starts_with('"') {
                parse_userlist_line(line).ok_or((i + 1, "expected \"user\" \"secret\"".to_owned()))?
            } else {
                let (u, s) = line.split_once(':').ok_or((i + 1, "expected user:secret".to_owned()))?;
                (u.to_owned(), s.to_owned())
            };
            let secret = parse_secret(&secret).map_err(|reason| (i + 1, reason))?;
            users.insert(user, secret);
        }
        Ok(UserList { users })
    }

    /// The secret of a user, if listed.
    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    /// Number of users listed.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user is listed.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// What the proxy can log in to backends with, for this user.
    pub fn backend_credential(&self, user: &str) -> BackendCredential {
        match self.users.get(user) {
            Some(Secret::Plain { password, .. }) => BackendCredential::Password(password.clone()),
            Some(Secret::Md5(hash)) => BackendCredential::Md5Hash(hash.clone()),
            Some(Secret::Scram(_)) | None => BackendCredential::None,
        }
    }
}

fn parse_userlist_line(line: &str) -> Option<(String, String)> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    while fields.len() < 2 {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut field = String::new();
        loop {
            match chars.next()? {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => break,
                c => field.push(c),
            }
        }
        fields.push(field);
    }
    let secret = fields.pop()?;
    let user = fields.pop()?;
    Some((user, secret))
}

fn parse_secret(secret: &str) -> Result<Secret, String> {
    if secret.starts_with("SCRAM-SHA-256$") {
        return Verifier::parse(secret)
            .map(|v| Secret::Scram(Box::new(v)))
            .ok_or_else(|| "malformed SCRAM-SHA-256 verifier".to_owned());
    }
    if secret.len() == 35 && secret.starts_with("md5") && secret[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Secret::Md5(secret.to_owned()));
    }
    if secret.starts_with("AES") {
        return Err("AES-encrypted pool_passwd entries are not supported; use plaintext, md5 or SCRAM".into());
    }
    let password = secret.strip_prefix("TEXT").unwrap_or(secret).to_owned();
    let verifier = Verifier::from_password(&password).ok_or("cannot derive a SCRAM verifier")?;
    Ok(Secret::Plain { password, verifier: Box::new(verifier) })
}

/// `md5` + hex(md5(password + user)): what PostgreSQL stores for md5 users.
pub fn md5_user_hash(password: &str, user: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

/// The response an md5 client sends for a stored md5 hash and salt.
pub fn md5_response(stored_hash: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored_hash.as_bytes()[3..]);
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The socket failed or closed.
    #[error("client connection failed during authentication: {0}")]
    Io(#[from] std::io::Error),
    /// Wrong password or proof.
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    /// The user is not in the auth file.
    #[error("password authentication failed for user \"{0}\"")]
    UnknownUser(String),
    /// The stored secret cannot serve the method.
    #[error("user \"{user}\" cannot use {method}: {reason}")]
    Unusable {
        /// The user.
        user: String,
        /// The method tried.
        method: &'static str,
        /// Why not.
        reason: &'static str,
    },
    /// The client broke the exchange.
    #[error("authentication protocol violation: {0}")]
    Protocol(String),
}

impl AuthError {
    /// SQLSTATE reported to the client.
    pub fn sqlstate(&self) -> &'static str {
        use crate::protocol::sqlstate;
        match self {
            AuthError::BadPassword(_) | AuthError::UnknownUser(_) => sqlstate::INVALID_PASSWORD,
            AuthError::Unusable { .. } => sqlstate::INVALID_AUTHORIZATION,
            AuthError::Io(_) | AuthError::Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Runs the configured exchange with a client. On success nothing is sent yet: the caller
/// sends AuthenticationOk with the rest of its welcome.
pub async fn authenticate<S>(sock: &mut S, method: AuthMethod, users: &UserList, user: &str) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if method == AuthMethod::Trust {
        return Ok(());
    }
    let secret = users.get(user).ok_or_else(|| AuthError::UnknownUser(user.to_owned()))?;
    match (method, secret) {
        (AuthMethod::Md5, Secret::Plain { password, .. }) => md5_exchange(sock, user, &md5_user_hash(password, user)).await,
        (AuthMethod::Md5, Secret::Md5(hash)) => md5_exchange(sock, user, hash).await,
        (_, Secret::Scram(v)) | (_, Secret::Plain { verifier: v, .. }) => scram_exchange(sock, user, v).await,
        (AuthMethod::ScramSha256, Secret::Md5(_)) => Err(AuthError::Unusable {
            user: user.to_owned(),
            method: "SCRAM-SHA-256",
            reason: "the auth file holds an md5 hash",
        }),
        (AuthMethod::Trust, _) => Ok(()),
    }
}

async fn md5_exchange<S>(sock: &mut S, user: &str, stored: &str) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let salt: [u8; 4] = rand::random();
    send(sock, &Authentication::MD5Password(salt.to_vec())).await?;
    let body = read_password_message(sock).await?;
    let got = body[..].split(|&b| b == 0).next().unwrap_or_default();
    if got == md5_response(stored, salt).as_bytes() {
        Ok(())
    } else {
        Err(AuthError::BadPassword(user.to_owned()))
    }
}

async fn scram_exchange<S>(sock: &mut S, user: &str, verifier: &Verifier) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(sock, &Authentication::SASL(vec!["SCRAM-SHA-256".to_owned()])).await?;
    let mut initial = read_password_message(sock).await?;
    let mech_end = initial.iter().position(|&b| b == 0).ok_or_else(|| AuthError::Protocol("no SASL mechanism".into()))?;
    if &initial[..mech_end] != b"SCRAM-SHA-256" {
        return Err(AuthError::Protocol(format!(
            "unsupported SASL mechanism {}",
            String::from_utf8_lossy(&initial[..mech_end])
        )));
    }
    initial.advance(mech_end + 1);
    if initial.len() < 4 {
        return Err(AuthError::Protocol("truncated SASLInitialResponse".into()));
    }
    let len = initial.get_i32();
    if len < 0 || len as usize != initial.len() {
        return Err(AuthError::Protocol("bad SASLInitialResponse length".into()));
    }
    let (exchange, first) = scram::server_first(verifier, &initial).map_err(|e| AuthError::Protocol(e.to_string()))?;
    send(sock, &Authentication::SASLContinue(first.into_bytes().into())).await?;
    let response = read_password_message(sock).await?;
    match scram::server_final(verifier, &exchange, &response) {
        Ok((fin, _client_key)) => {
            send(sock, &Authentication::SASLFinal(fin.into_bytes().into())).await?;
            Ok(())
        }
        Err(scram::ScramError::BadProof) => Err(AuthError::BadPassword(user.to_owned())),
        Err(e) => Err(AuthError::Protocol(e.to_string())),
    }
}

async fn send<S: AsyncWrite + Unpin>(sock: &mut S, msg: &Authentication) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf).map_err(|e| AuthError::Protocol(e.to_string()))?;
    sock.write_all(&buf).await?;
    Ok(())
}

/// Reads one PasswordMessage-family message ('p') and returns its body.
async fn read_password_message<S: AsyncRead + Unpin>(sock: &mut S) -> Result<BytesMut, AuthError> {
    let tag = sock.read_u8().await?;
    if tag != b'p' {
        return Err(AuthError::Protocol(format!("expected password message, got '{}'", char::from(tag))));
    }
    let len = sock.read_u32().await?;
    if !(4..=crate::startup::MAX_STARTUP_PACKET).contains(&len) {
        return Err(AuthError::Protocol(format!("invalid password message length {len}")));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    sock.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_file_formats_parse() {
        let text = "# comment\n\"alice\" \"pa\"\"ss\"\nbob:md5d41d8cd98f00b204e9800998ecf8427e\ncarol:TEXTplain\n";
        let list = UserList::parse(text).expect("parse");
        assert_eq!(list.len(), 3);
        assert_eq!(list.backend_credential("alice"), BackendCredential::Password("pa\"ss".into()));
        assert!(matches!(list.get("bob"), Some(Secret::Md5(_))));
        assert_eq!(list.backend_credential("carol"), BackendCredential::Password("plain".into()));
    }

    #[test]
    fn bad_line_reports_number() {
        let err = UserList::parse("\"a\" \"b\"\nnonsense\n").unwrap_err();
        assert_eq!(err.0, 2);
    }

    #[test]
    fn md5_response_matches_libpq() {
        let stored = md5_user_hash("secret", "alice");
        let salt = [1, 2, 3, 4];
        let expected = postgres_protocol::authentication::md5_hash(b"alice", b"secret", salt);
        assert_eq!(md5_response(&stored, salt), expected);
    }
}
