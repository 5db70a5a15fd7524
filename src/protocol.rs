//! Wire-protocol framing for the relay, and the few messages the proxy writes itself.
//!
//! After startup the proxy forwards bytes exactly as they arrive. It only needs to know where
//! each message starts, so [`Framer`] walks a buffer looking at 5-byte headers (tag + length)
//! and skips over bodies, even bodies that span many reads: a 1 GB COPY row is streamed, never
//! held whole. Messages whose body the proxy must read (ReadyForQuery's status byte, for
//! instance) are small and are waited for until complete.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

/// Frontend message tags the proxy reacts to.
pub mod frontend_tag {
    /// Simple query.
    pub const QUERY: u8 = b'Q';
    /// Extended-protocol Sync.
    pub const SYNC: u8 = b'S';
    /// Fast-path function call.
    pub const FUNCTION_CALL: u8 = b'F';
    /// Terminate: never forwarded, the backend outlives its client.
    pub const TERMINATE: u8 = b'X';
}

/// Backend message tags the proxy reacts to.
pub mod backend_tag {
    /// ReadyForQuery, carrying the transaction status byte.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// CopyInResponse.
    pub const COPY_IN: u8 = b'G';
    /// CopyOutResponse.
    pub const COPY_OUT: u8 = b'H';
    /// CopyBothResponse.
    pub const COPY_BOTH: u8 = b'W';
}

/// A message header that cannot be valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below the minimum of 4 or above the configured maximum.
    #[error("message '{tag}' declares length {len}, outside 4..={max}", tag = char::from(*.tag))]
    BadLength {
        /// The message tag.
        tag: u8,
        /// The declared length.
        len: u32,
        /// The largest accepted length.
        max: u32,
    },
}

/// What the caller of [`Framer::scan`] wants done with a message whose header was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forward it and keep scanning.
    Forward,
    /// Stop before it: it is neither forwarded nor consumed.
    StopBefore,
}

/// Result of one [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes from the start of the buffer that may be forwarded now.
    pub forward: usize,
    /// Whether scanning stopped at a message the callback refused.
    pub stopped: bool,
}

/// Tracks message boundaries across reads in one direction of a connection.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    /// Body bytes of the current message not yet seen: they pass through unexamined.
    remaining: usize,
}

impl Framer {
    /// A framer positioned at a message boundary.
    pub fn new() -> Self {
        Framer { remaining: 0 }
    }

    /// Whether the next byte starts a new message.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Walks `buf` from its start. For every message header found, calls `on_message` with the
    /// tag and, when `needs_body(tag)` is true, the whole body (waiting for it to be complete);
    /// otherwise with an empty body. Returns how many leading bytes can be forwarded: an
    /// incomplete header (or inspected body) at the end stays in the buffer for the next read.
    #[inline]
    pub fn scan(
        &mut self,
        buf: &[u8],
        max_len: u32,
        needs_body: impl Fn(u8) -> bool,
        mut on_message: impl FnMut(u8, &[u8]) -> Step,
    ) -> Result<Scan, FrameError> {
        let mut pos = 0usize;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                pos += take;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Ok(Scan { forward: pos, stopped: false });
                }
            }
            let rest = &buf[pos..];
            if rest.len() < 5 {
                return Ok(Scan { forward: pos, stopped: false });
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            if !(4..=max_len).contains(&len) {
                return Err(FrameError::BadLength { tag, len, max: max_len });
            }
            let body_len = (len - 4) as usize;
            if needs_body(tag) {
                if rest.len() < 5 + body_len {
                    return Ok(Scan { forward: pos, stopped: false });
                }
                if on_message(tag, &rest[5..5 + body_len]) == Step::StopBefore {
                    return Ok(Scan { forward: pos, stopped: true });
                }
                pos += 5 + body_len;
            } else {
                if on_message(tag, &[]) == Step::StopBefore {
                    return Ok(Scan { forward: pos, stopped: true });
                }
                pos += 5;
                self.remaining = body_len;
            }
        }
    }
}

/// SQLSTATE codes the proxy itself reports.
pub mod sqlstate {
    /// Protocol violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// Connection failure.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// Could not establish a connection.
    pub const CANNOT_CONNECT: &str = "08001";
    /// Password authentication failed.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// Invalid authorization specification (unknown user, bad method).
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// Too many connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// The proxy is shutting down.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// No server can take connections now (no primary known).
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// Idle session timeout.
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// Unsupported feature.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// Severity of an error the proxy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

/// Appends an ErrorResponse written by the proxy.
pub fn put_error(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let msg = ErrorResponse::new(vec![
        (b'S', sev.to_owned()),
        (b'V', sev.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ]);
    encode(&msg, buf);
}

/// Appends an ErrorResponse carrying fields a server sent, so a client sees the server's own
/// code and message.
pub fn put_error_fields(buf: &mut BytesMut, fields: &[(u8, String)]) {
    encode(&ErrorResponse::new(fields.to_vec()), buf);
}

/// Appends AuthenticationOk.
pub fn put_auth_ok(buf: &mut BytesMut) {
    encode(&Authentication::Ok, buf);
}

/// Appends one ParameterStatus.
pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    encode(&ParameterStatus::new(name.to_owned(), value.to_owned()), buf);
}

/// Appends BackendKeyData with a protocol 3.0 (32-bit) key.
pub fn put_backend_key(buf: &mut BytesMut, pid: i32, secret: i32) {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), buf);
}

/// Appends ReadyForQuery with the given status byte (`I`, `T` or `E`).
pub fn put_ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status), buf);
}

/// Appends NegotiateProtocolVersion: the newest minor version we speak, and the protocol
/// options (`_pq_.*`) we do not understand.
pub fn put_negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unknown: &[String]) {
    let body: usize = 8 + unknown.iter().map(|s| s.len() + 1).sum::<usize>();
    buf.put_u8(b'v');
    buf.put_u32((4 + body) as u32);
    buf.put_i32(minor);
    buf.put_i32(unknown.len() as i32);
    for name in unknown {
        buf.put_slice(name.as_bytes());
        buf.put_u8(0);
    }
}

fn encode<M: Message>(msg: &M, buf: &mut BytesMut) {
    // Encoding into a BytesMut only fails for messages over pgwire's size limits, which the
    // proxy never builds; a failure would be a bug, not bad input.
    if let Err(e) = msg.encode(buf) {
        tracing::error!(error = %e, "failed to encode a proxy-generated message");
    }
}

/// Reads the fields of an ErrorResponse or NoticeResponse body.
pub fn parse_error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        fields.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    fields
}

/// Finds one field of a parsed error, such as `b'C'` (SQLSTATE) or `b'M'` (message).
pub fn error_field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_str())
}

/// Splits a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = parts.next()?;
    let value = parts.next()?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn collect(framer: &mut Framer, buf: &[u8]) -> (Scan, Vec<(u8, Vec<u8>)>) {
        let mut seen = Vec::new();
        let scan = framer
            .scan(buf, 1 << 30, |t| t == b'Z', |t, b| {
                seen.push((t, b.to_vec()));
                Step::Forward
            })
            .expect("valid");
        (scan, seen)
    }

    #[test]
    fn whole_messages_are_forwarded() {
        let mut stream = msg(b'D', b"row");
        stream.extend(msg(b'Z', b"I"));
        let mut f = Framer::new();
        let (scan, seen) = collect(&mut f, &stream);
        assert_eq!(scan.forward, stream.len());
        assert_eq!(seen, vec![(b'D', vec![]), (b'Z', b"I".to_vec())]);
        assert!(f.at_boundary());
    }

    #[test]
    fn large_body_streams_across_reads() {
        let body = vec![7u8; 100];
        let stream = msg(b'd', &body);
        let mut f = Framer::new();
        let (scan, seen) = collect(&mut f, &stream[..10]);
        assert_eq!(scan.forward, 10, "header and partial body pass through");
        assert_eq!(seen.len(), 1);
        let (scan, seen) = collect(&mut f, &stream[10..]);
        assert_eq!(scan.forward, stream.len() - 10);
        assert!(seen.is_empty());
        assert!(f.at_boundary());
    }

    #[test]
    fn partial_header_and_inspected_body_wait() {
        let stream = msg(b'Z', b"T");
        let mut f = Framer::new();
        for cut in 0..stream.len() {
            let (scan, seen) = collect(&mut f, &stream[..cut]);
            assert_eq!(scan.forward, 0, "cut at {cut}");
            assert!(seen.is_empty());
        }
    }

    #[test]
    fn any_cut_point_yields_same_messages() {
        let mut stream = Vec::new();
        for i in 0..20u8 {
            stream.extend(msg(b'D', &vec![i; i as usize * 3]));
            stream.extend(msg(b'Z', b"I"));
        }
        for cut in 0..stream.len() {
            let mut f = Framer::new();
            let mut buf = stream[..cut].to_vec();
            let mut seen = Vec::new();
            let mut forwarded = 0;
            let feed = |buf: &mut Vec<u8>, seen: &mut Vec<(u8, Vec<u8>)>, f: &mut Framer| {
                let (scan, s) = collect(f, buf);
                seen.extend(s);
                buf.drain(..scan.forward);
                scan.forward
            };
            forwarded += feed(&mut buf, &mut seen, &mut f);
            buf.extend_from_slice(&stream[cut..]);
            forwarded += feed(&mut buf, &mut seen, &mut f);
            assert_eq!(forwarded, stream.len());
            assert_eq!(seen.iter().filter(|(t, _)| *t == b'Z').count(), 20);
        }
    }

    #[test]
    fn stop_before_terminate() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'X', b""));
        let mut f = Framer::new();
        let scan = f
            .scan(&stream, 1 << 30, |_| false, |t, _| if t == b'X' { Step::StopBefore } else { Step::Forward })
            .expect("valid");
        assert_eq!(scan, Scan { forward: stream.len() - 5, stopped: true });
    }

    #[test]
    fn absurd_length_rejected() {
        let mut f = Framer::new();
        let buf = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        let err = f.scan(&buf, 1 << 20, |_| false, |_, _| Step::Forward).unwrap_err();
        assert!(matches!(err, FrameError::BadLength { tag: b'Q', .. }));
        let buf = [b'Q', 0, 0, 0, 3];
        assert!(f.scan(&buf, 1 << 20, |_| false, |_, _| Step::Forward).is_err());
    }

    #[test]
    fn error_fields_roundtrip() {
        let mut buf = BytesMut::new();
        put_error(&mut buf, Severity::Fatal, "28P01", "bad password");
        let fields = parse_error_fields(&buf[5..]);
        assert_eq!(error_field(&fields, b'C'), Some("28P01"));
        assert_eq!(error_field(&fields, b'S'), Some("FATAL"));
    }
}
