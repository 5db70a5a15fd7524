//! Malformed or hostile clients and vanishing peers: each gets a clear error (or is cut off),
//! and the proxy keeps serving everyone else without leaking backends.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{wait_until, Env, Setup};

fn setup() -> Setup {
    Setup { pool: "  pool_size: 1\n  client_login_timeout: 500ms\n  max_message_size: 1048576\n", ..Setup::default() }
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", user), ("database", "postgres")], &mut out)
        .expect("encode startup");
    out.to_vec()
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads messages until one with `tag` arrives; returns every (tag, body) seen.
async fn read_until(sock: &mut TcpStream, tag: u8) -> Vec<(u8, Vec<u8>)> {
    let mut seen = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if sock.read_exact(&mut head).await.is_err() {
            return seen;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        if sock.read_exact(&mut body).await.is_err() {
            return seen;
        }
        seen.push((head[0], body));
        if head[0] == tag {
            return seen;
        }
    }
}

/// Reads whatever the proxy says until it closes the connection.
async fn read_to_close(sock: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .expect("proxy closed the connection")
        .ok();
    out
}

fn sqlstate_of(error_message: &[u8]) -> String {
    let fields = pglifeguard::protocol::parse_error_fields(&error_message[5..]);
    pglifeguard::protocol::error_field(&fields, b'C').unwrap_or_default().to_owned()
}

async fn assert_still_serving(env: &Env) {
    let c = env.client().await;
    let v: i32 = c.query_one("select 41 + 1", &[]).await.expect("normal client works").get(0);
    assert_eq!(v, 42);
}

async fn logged_in(env: &Env) -> TcpStream {
    let mut sock = TcpStream::connect(env.proxy.addr).await.expect("connect");
    sock.write_all(&startup_packet("postgres")).await.expect("startup");
    let msgs = read_until(&mut sock, b'Z').await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "logged in");
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_startup_packets() {
    let env = Env::start(setup()).await;
    // Plain garbage (an HTTP request): its first 4 bytes read as a huge length.
    let mut s = TcpStream::connect(env.proxy.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let reply = read_to_close(&mut s).await;
    assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse, then close");
    assert_eq!(sqlstate_of(&reply), "08P01");

    // A startup packet longer than PostgreSQL allows.
    let mut s = TcpStream::connect(env.proxy.addr).await.expect("connect");
    s.write_all(&20_000u32.to_be_bytes()).await.expect("write");
    let reply = read_to_close(&mut s).await;
    assert_eq!(sqlstate_of(&reply), "08P01");

    // An unknown protocol version.
    let mut s = TcpStream::connect(env.proxy.addr).await.expect("connect");
    let mut pkt = startup_packet("postgres");
    pkt[4..8].copy_from_slice(&0x0002_0000i32.to_be_bytes());
    s.write_all(&pkt).await.expect("write");
    let reply = read_to_close(&mut s).await;
    assert_eq!(sqlstate_of(&reply), "0A000");

    // A truncated startup packet from a client that then goes silent: cut off by the login
    // timeout. Same for a client that never says anything.
    let mut truncated = TcpStream::connect(env.proxy.addr).await.expect("connect");
    truncated.write_all(&startup_packet("postgres")[..12]).await.expect("write");
    let mut silent = TcpStream::connect(env.proxy.addr).await.expect("connect");
    let reply = read_to_close(&mut truncated).await;
    assert_eq!(sqlstate_of(&reply), "08P01");
    let reply = read_to_close(&mut silent).await;
    assert_eq!(sqlstate_of(&reply), "08P01");

    // SSLRequest is refused with 'N' and the client may go on in plain text.
    let mut s = TcpStream::connect(env.proxy.addr).await.expect("connect");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.expect("ssl request");
    let mut n = [0u8; 1];
    s.read_exact(&mut n).await.expect("answer");
    assert_eq!(&n, b"N");
    s.write_all(&startup_packet("postgres")).await.expect("startup");
    let msgs = read_until(&mut s, b'Z').await;
    assert!(msgs.iter().any(|m| m.0 == b'K'), "BackendKeyData sent");
    drop(s);

    assert_still_serving(&env).await;
    let app = &env.proxy.app;
    assert!(wait_until(Duration::from_secs(5), || async { app.client_count() == 0 }).await, "bad clients do not linger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_message_length_after_startup() {
    let env = Env::start(setup()).await;
    let mut s = logged_in(&env).await;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.expect("write");
    let reply = read_to_close(&mut s).await;
    assert_eq!(reply.first(), Some(&b'E'));
    assert_eq!(sqlstate_of(&reply), "08P01");
    assert_still_serving(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_transaction_and_mid_copy() {
    let env = Env::start(setup()).await;
    let c = env.client().await;
    c.batch_execute("create table t(v int)").await.expect("create");
    drop(c);

    // Mid-transaction: the insert must never become visible.
    let mut s = logged_in(&env).await;
    s.write_all(&message(b'Q', b"begin; insert into t values (1)\0")).await.expect("query");
    read_until(&mut s, b'Z').await;
    drop(s);

    // Mid-COPY: the server is waiting for more data when the client disappears.
    let mut s = logged_in(&env).await;
    s.write_all(&message(b'Q', b"copy t from stdin\0")).await.expect("copy");
    let msgs = read_until(&mut s, b'G').await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'G'), "CopyInResponse");
    s.write_all(&message(b'd', b"2\n3\n")).await.expect("copy data");
    drop(s);

    // With a pool of one, a working backend must still be available, and nothing committed.
    let c = env.client().await;
    let n: i64 = c.query_one("select count(*) from t", &[]).await.expect("count").get(0);
    assert_eq!(n, 0, "neither the abandoned transaction nor the cut COPY committed");
    drop(c);
    let pool = &env.proxy.app.pools.all()[0];
    assert!(
        wait_until(Duration::from_secs(5), || async { pool.in_use() == 0 }).await,
        "no backend leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_query() {
    let env = Env::start(Setup { pool: "  pool_size: 2\n", ..Setup::default() }).await;
    let victim = env.client().await;
    let pid: i32 = victim.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);
    let running = tokio::spawn(async move { victim.simple_query("select pg_sleep(60)").await });
    let killer = env.cluster.primary();
    let sql = format!(
        "select pg_terminate_backend({pid}) from pg_stat_activity where pid = {pid} and query like '%pg_sleep(60)%'"
    );
    let killed = wait_until(Duration::from_secs(10), || {
        let r = killer.psql(&sql);
        async move { r.map(|out| out.trim() == "t").unwrap_or(false) }
    })
    .await;
    assert!(killed, "could not terminate the backend");
    let err = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("victim told promptly")
        .expect("join")
        .expect_err("query failed");
    let code = err.code().cloned();
    assert!(
        matches!(code, Some(tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)) || err.is_closed(),
        "unexpected error: {err:?}"
    );
    assert_still_serving(&env).await;
    let pool = &env.proxy.app.pools.all()[0];
    assert!(wait_until(Duration::from_secs(5), || async { pool.in_use() == 0 }).await);
    assert_eq!(pool.idle_count(), 1, "only the healthy backend went back to the pool");
}
