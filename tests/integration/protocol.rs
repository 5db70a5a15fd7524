//! Wire-protocol features relayed through the proxy: simple and extended queries, COPY,
//! portals, cancel, LISTEN/NOTIFY, multi-statement psql scripts.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::common::{connect, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_multi_statement_and_script() {
    let env = Env::start_default().await;
    let (ok, out, err) = env
        .psql(&["-c", "create table m(a int); insert into m values (1),(2),(3); select sum(a) from m"])
        .await;
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "6");

    // A script mixing a transaction, a rolled-back transaction and client-side COPY.
    let script = env.dir.path().join("script.sql");
    let csv = env.dir.path().join("rows.csv");
    std::fs::write(&csv, "10\n20\n").expect("write csv");
    std::fs::write(
        &script,
        format!(
            "begin;\ninsert into m values (100);\ncommit;\nbegin;\ninsert into m values (1000);\nrollback;\n\\copy m from '{}'\nselect sum(a) from m;\n",
            csv.display()
        ),
    )
    .expect("write script");
    let (ok, out, err) = env.psql(&["-f", &script.display().to_string()]).await;
    assert!(ok, "psql script failed: {err}");
    assert_eq!(out.trim(), "136", "6 + 100 + 10 + 20, the rolled-back 1000 excluded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_protocol_with_many_types() {
    let env = Env::start_default().await;
    let client = env.client().await;

    let msgs = client.simple_query("select 1 as a; select 'x' as b, null as c").await.expect("simple query");
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get(0), Some("1"));
    assert_eq!(rows[1].get("b"), Some("x"));
    assert_eq!(rows[1].get("c"), None);

    let row = client
        .query_one(
            "select $1::int2, $2::int4, $3::int8, $4::float4, $5::float8, $6::bool, $7::text, $8::bytea, $9::int4[], $10::int4, $11::varchar",
            &[
                &-7i16,
                &123_456i32,
                &9_000_000_000i64,
                &1.5f32,
                &-2.25f64,
                &true,
                &"héllo wörld",
                &vec![0u8, 1, 2, 255],
                &vec![1i32, 2, 3],
                &None::<i32>,
                &"x".repeat(100_000),
            ],
        )
        .await
        .expect("extended query");
    assert_eq!(row.get::<_, i16>(0), -7);
    assert_eq!(row.get::<_, i32>(1), 123_456);
    assert_eq!(row.get::<_, i64>(2), 9_000_000_000);
    assert_eq!(row.get::<_, f32>(3), 1.5);
    assert_eq!(row.get::<_, f64>(4), -2.25);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, String>(6), "héllo wörld");
    assert_eq!(row.get::<_, Vec<u8>>(7), vec![0u8, 1, 2, 255]);
    assert_eq!(row.get::<_, Vec<i32>>(8), vec![1, 2, 3]);
    assert_eq!(row.get::<_, Option<i32>>(9), None);
    assert_eq!(row.get::<_, String>(10).len(), 100_000);

    // A named prepared statement reused many times (pgjdbc switches to these after 5 uses),
    // and an error in the middle that must not desynchronise the session.
    let stmt = client.prepare("select $1::int4 * 2").await.expect("prepare");
    for i in 0..20 {
        let v: i32 = client.query_one(&stmt, &[&i]).await.expect("execute").get(0);
        assert_eq!(v, i * 2);
    }
    let err = client.query_one("select 1/0", &[]).await.expect_err("division by zero");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO));
    let v: i32 = client.query_one(&stmt, &[&21]).await.expect("after error").get(0);
    assert_eq!(v, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let env = Env::start_default().await;
    let client = env.client().await;
    client.batch_execute("create table c(id int, name text)").await.expect("create");
    let sink = client.copy_in("copy c from stdin").await.expect("copy in");
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..50_000 {
        data.push_str(&format!("{i}\tname-{i}\n"));
    }
    // Several chunks, one larger than any read buffer.
    let bytes = data.into_bytes();
    let (a, b) = bytes.split_at(100);
    sink.send(Bytes::copy_from_slice(a)).await.expect("send");
    sink.send(Bytes::copy_from_slice(b)).await.expect("send");
    let n = sink.finish().await.expect("finish");
    assert_eq!(n, 50_000);

    let stream = client.copy_out("copy (select * from c order by id) to stdout").await.expect("copy out");
    let chunks: Vec<Bytes> = stream.try_collect().await.expect("read copy");
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text, bytes, "COPY OUT returns exactly what COPY IN loaded");

    // The session is still in sync afterwards.
    let count: i64 = client.query_one("select count(*) from c", &[]).await.expect("count").get(0);
    assert_eq!(count, 50_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_read_with_fetch_size() {
    let env = Env::start_default().await;
    let mut client = env.client().await;
    let tx = client.transaction().await.expect("begin");
    let stmt = tx.prepare("select g, repeat('x', 50) from generate_series(1, 100000) g").await.expect("prepare");
    let portal = tx.bind(&stmt, &[]).await.expect("bind");
    let mut seen = 0i32;
    let mut batches = 0;
    loop {
        let rows = tx.query_portal(&portal, 1000).await.expect("fetch");
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            seen += 1;
            assert_eq!(r.get::<_, i32>(0), seen, "rows arrive in order, none lost");
        }
        batches += 1;
    }
    assert_eq!(seen, 100_000);
    assert_eq!(batches, 100, "portal suspended every 1000 rows");
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() {
    let env = Env::start_default().await;
    let victim = env.client().await;
    let bystander = env.client().await;
    let token = victim.cancel_token();
    let victim_pid: i32 = victim.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0);

    let sleeping = tokio::spawn(async move { victim.simple_query("select pg_sleep(60)").await.map(|_| victim) });
    let bystander_sleep = tokio::spawn(async move {
        let r = bystander.simple_query("select pg_sleep(2)").await;
        (r.is_ok(), bystander)
    });
    // Wait until the server really runs the victim's sleep before cancelling it.
    let probe = env.client().await;
    let running = crate::common::wait_until(Duration::from_secs(10), || {
        let probe = &probe;
        async move {
            probe
                .query_one("select count(*) from pg_stat_activity where pid = $1 and query like '%pg_sleep(60)%' and state = 'active'", &[&victim_pid])
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(running, "victim query never started");
    token.cancel_query(NoTls).await.expect("send cancel");
    let result = tokio::time::timeout(Duration::from_secs(30), sleeping).await.expect("cancel took effect").expect("join");
    let err = result.expect_err("query was cancelled");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    let (bystander_ok, _) = bystander_sleep.await.expect("join");
    assert!(bystander_ok, "the other session's query was not cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify() {
    let env = Env::start_default().await;
    let (listener, mut conn) = tokio_postgres::connect(&env.url("postgres", None), NoTls).await.expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("listen jobs").await.expect("listen");
    let sender = connect(&env.url("postgres", None)).await.expect("connect sender");
    sender.batch_execute("notify jobs, 'first'; select pg_notify('jobs', 'second')").await.expect("notify");
    for expected in ["first", "second"] {
        let (channel, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification arrived")
            .expect("channel open");
        assert_eq!(channel, "jobs");
        assert_eq!(payload, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipeline_with_large_results_does_not_stall() {
    // tokio-postgres writes requests while it reads results. With megabytes in flight both
    // ways, a relay that stops reading results while its write to the server is blocked
    // would deadlock; a direct connection would not.
    let env = Env::start_default().await;
    let client = env.client().await;
    let padding = "p".repeat(20_000);
    let stmt = client.prepare("select repeat('x', 50000), length($1::text)").await.expect("prepare");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&padding];
    let queries = (0..600).map(|_| client.query_one(&stmt, &params));
    let rows = tokio::time::timeout(Duration::from_secs(60), futures_util::future::join_all(queries))
        .await
        .expect("pipeline finished without stalling");
    assert_eq!(rows.len(), 600);
    for r in rows {
        assert_eq!(r.expect("row").get::<_, String>(0).len(), 50_000);
    }
}
