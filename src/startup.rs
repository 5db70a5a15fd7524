//! The untagged packets a client sends before its session starts: SSLRequest, GSSENCRequest,
//! CancelRequest and the StartupMessage with its parameters.

use std::collections::BTreeMap;

use bytes::BytesMut;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest startup-phase packet PostgreSQL accepts (pqcomm.h `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: u32 = 10_000;
const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;
const PROTOCOL_3: i32 = 3;

/// Why a startup packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The socket failed or closed.
    #[error("client connection failed during startup: {0}")]
    Io(#[from] std::io::Error),
    /// The length field is impossible.
    #[error("invalid startup packet length {0}")]
    BadLength(u32),
    /// A protocol other than 3.x was asked for.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Major version asked for.
        major: u16,
        /// Minor version asked for.
        minor: u16,
    },
    /// The packet could not be decoded.
    #[error("malformed startup packet: {0}")]
    Malformed(String),
    /// The startup message has no `user`.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

/// A client's first meaningful packet.
#[derive(Debug)]
pub enum FirstPacket {
    /// A request to cancel the query of another session.
    Cancel {
        /// Process id from the key the proxy handed out.
        pid: i32,
        /// Secret from that key.
        secret: i32,
    },
    /// A session start.
    Startup(StartupParams),
}

/// What a client asked for in its StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    /// Login user.
    pub user: String,
    /// Database; defaults to the user name as in PostgreSQL.
    pub database: String,
    /// Every other parameter (application_name, options, client_encoding, …), sorted by name.
    pub options: BTreeMap<String, String>,
    /// Minor protocol version asked for (3.x).
    pub minor_version: u16,
    /// Protocol options (`_pq_.*`) the client asked for; the proxy supports none.
    pub protocol_options: Vec<String>,
}

/// Reads packets until a StartupMessage or CancelRequest arrives, refusing encryption requests
/// with 'N' (the client may then continue in plain text, as libpq and pgjdbc do).
pub async fn read_first_packet<S>(sock: &mut S) -> Result<FirstPacket, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let len = sock.read_u32().await?;
        if !(8..=MAX_STARTUP_PACKET).contains(&len) {
            return Err(StartupError::BadLength(len));
        }
        let mut buf = BytesMut::zeroed(len as usize);
        buf[..4].copy_from_slice(&len.to_be_bytes());
        sock.read_exact(&mut buf[4..]).await?;
        let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
                sock.write_all(b"N").await?;
            }
            CANCEL_REQUEST_CODE => {
                if len != 16 {
                    return Err(StartupError::BadLength(len));
                }
                let pid = i32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                let secret = i32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
                return Ok(FirstPacket::Cancel { pid, secret });
            }
            _ => return parse_startup(buf, code).map(FirstPacket::Startup),
        }
    }
}

fn parse_startup(mut buf: BytesMut, code: i32) -> Result<StartupParams, StartupError> {
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major as i32 != PROTOCOL_3 {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    let ctx = DecodeContext::default();
    let startup = Startup::decode(&mut buf, &ctx)
        .map_err(|e| StartupError::Malformed(e.to_string()))?
        .ok_or_else(|| StartupError::Malformed("truncated".into()))?;
    let mut options = startup.parameters;
    let user = options.remove("user").filter(|u| !u.is_empty()).ok_or(StartupError::NoUser)?;
    let database = options
        .remove("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let protocol_options: Vec<String> =
        options.keys().filter(|k| k.starts_with("_pq_.")).cloned().collect();
    options.retain(|k, _| !k.starts_with("_pq_."));
    Ok(StartupParams { user, database, options, minor_version: minor, protocol_options })
}

impl StartupParams {
    /// The session settings this client asked for, as (name, value) pairs: plain startup
    /// parameters plus every `-c name=value` / `--name=value` inside `options`.
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in &self.options {
            if k == "options" {
                out.extend(parse_options(v));
            } else if k != "replication" {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }
}

/// Splits a libpq `options` string into settings, honouring backslash escapes of spaces.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let setting = if w == "-c" {
            iter.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("--").map(str::to_owned)
        };
        if let Some((k, v)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(params: &[(&str, &str)]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut out).expect("encode");
        out.to_vec()
    }

    #[tokio::test]
    async fn ssl_refused_then_startup() {
        let mut input = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        input.extend(packet(&[("user", "alice"), ("application_name", "app")]));
        let (mut a, mut b) = tokio::io::duplex(4096);
        b.write_all(&input).await.expect("write");
        let first = read_first_packet(&mut a).await.expect("ok");
        let FirstPacket::Startup(p) = first else { panic!("expected startup") };
        assert_eq!(p.user, "alice");
        assert_eq!(p.database, "alice");
        assert_eq!(p.options.get("application_name").map(String::as_str), Some("app"));
        let mut reply = [0u8; 1];
        b.read_exact(&mut reply).await.expect("reply");
        assert_eq!(&reply, b"N");
    }

    #[tokio::test]
    async fn huge_length_rejected() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(&[0x7f, 0xff, 0xff, 0xff]).await.expect("write");
        assert!(matches!(read_first_packet(&mut a).await, Err(StartupError::BadLength(_))));
    }

    #[test]
    fn options_are_split() {
        let got = parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x=a\\ b");
        assert_eq!(
            got,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
    }
}
