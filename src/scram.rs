//! Server side of SCRAM-SHA-256 (RFC 5802 / 7677) as PostgreSQL runs it, checking a client's
//! proof against a stored verifier so the proxy never needs plaintext passwords.
//!
//! pgwire has this logic too, but only behind its `server-api` feature, which builds a C crypto
//! library; the math is a few HMACs, so it is done here with the RustCrypto crates that
//! postgres-protocol already depends on.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A PostgreSQL SCRAM verifier: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt as raw bytes.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl Verifier {
    /// Parses the text form stored in `pg_authid` and in auth files.
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Builds a verifier from a plaintext password, with a fresh random salt.
    pub fn from_password(password: &str) -> Option<Verifier> {
        Verifier::parse(&postgres_protocol::password::scram_sha_256(password.as_bytes()))
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// A message did not follow the SCRAM grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding, which needs TLS.
    #[error("channel binding is not supported without TLS")]
    ChannelBinding,
    /// The proof does not match the verifier: wrong password.
    #[error("password authentication failed")]
    BadProof,
}

/// State between the server-first and client-final messages.
#[derive(Debug)]
pub struct Exchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

/// Handles client-first-message; returns the state and the server-first-message to send.
pub fn server_first(verifier: &Verifier, client_first: &[u8]) -> Result<(Exchange, String), ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (gs2_flag, rest) = text.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
    match gs2_flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad gs2 flag")),
    }
    let (_authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no authzid"))?;
    let client_nonce = bare
        .split(',')
        .find_map(|attr| attr.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("no client nonce"))?;
    let server_part: [u8; 18] = rand::random();
    let nonce = format!("{client_nonce}{}", B64.encode(server_part));
    let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
    let gs2_header = format!("{gs2_flag},{_authzid},");
    let exchange = Exchange { client_first_bare: bare.to_owned(), server_first: server_first.clone(), nonce, gs2_header };
    Ok((exchange, server_first))
}

/// Checks client-final-message; on success returns the server-final-message (`v=...`) and
/// the client key recovered from the proof.
pub fn server_final(
    verifier: &Verifier,
    exchange: &Exchange,
    client_final: &[u8],
) -> Result<(String, [u8; 32]), ScramError> {
    let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
    let mut binding = None;
    let mut nonce = None;
    for attr in without_proof.split(',') {
        if let Some(v) = attr.strip_prefix("c=") {
            binding = Some(v);
        } else if let Some(v) = attr.strip_prefix("r=") {
            nonce = Some(v);
        }
    }
    let binding = binding.ok_or(ScramError::Malformed("no channel binding attribute"))?;
    if B64.decode(binding).ok().as_deref() != Some(exchange.gs2_header.as_bytes()) {
        return Err(ScramError::Malformed("channel binding does not match"));
    }
    if nonce != Some(exchange.nonce.as_str()) {
        return Err(ScramError::Malformed("nonce does not match"));
    }
    let proof: [u8; 32] = B64
        .decode(proof)
        .ok()
        .and_then(|p| p.try_into().ok())
        .ok_or(ScramError::Malformed("bad proof encoding"))?;
    let auth_message = format!("{},{},{}", exchange.client_first_bare, exchange.server_first, without_proof);
    let client_signature = hmac(&verifier.stored_key, auth_message.as_bytes());
    let mut client_key = [0u8; 32];
    for i in 0..32 {
        client_key[i] = proof[i] ^ client_signature[i];
    }
    let stored: [u8; 32] = Sha256::digest(client_key).into();
    // Constant-time comparison is not needed for a hash of attacker-chosen input, but costs
    // nothing: fold the difference.
    let diff = stored.iter().zip(verifier.stored_key.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(ScramError::BadProof);
    }
    let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
    Ok((format!("v={}", B64.encode(server_signature)), client_key))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(password: &str, verifier: &Verifier) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (ex, first) = server_first(verifier, client.message())?;
        client.update(first.as_bytes()).map_err(|_| ScramError::Malformed("client update"))?;
        let (fin, _) = server_final(verifier, &ex, client.message())?;
        client.finish(fin.as_bytes()).map_err(|_| ScramError::Malformed("client finish"))?;
        Ok(())
    }

    #[test]
    fn right_password_passes_wrong_fails() {
        let v = Verifier::from_password("s3cret").expect("verifier");
        assert_eq!(run("s3cret", &v), Ok(()));
        assert_eq!(run("nope", &v), Err(ScramError::BadProof));
    }

    #[test]
    fn parses_postgres_verifier() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = Verifier::parse(&text).expect("parse");
        assert_eq!(v.iterations, 4096);
        assert!(Verifier::parse("md5abc").is_none());
    }
}
