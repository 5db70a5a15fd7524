//! Session pooling: reuse, reset, limits, isolation between clients, routing to the primary.

use std::time::Duration;

use pglifeguard::localcluster::ClusterOptions;
use tokio_postgres::error::SqlState;

use crate::common::{connect, http_get, wait_until, Env, Setup};

fn small_pool(pool: &'static str) -> Setup {
    Setup { pool, ..Setup::default() }
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[]).await.expect("pid").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_small_pool_without_cross_talk() {
    let env = Env::start(small_pool("  pool_size: 20\n")).await;
    let mut tasks = Vec::new();
    for id in 0..200 {
        let url = env.url("postgres", None);
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.expect("connect");
            // A reused backend must come clean: no setting or temp table of an earlier client.
            let leftover: Option<String> =
                c.query_one("select current_setting('app.id', true)", &[]).await.expect("read").get(0);
            assert!(leftover.unwrap_or_default().is_empty(), "client {id} saw another client's setting");
            let temp: Option<String> =
                c.query_one("select to_regclass('pg_temp.mine')::text", &[]).await.expect("temp").get(0);
            assert_eq!(temp, None, "client {id} saw another client's temp table");
            c.batch_execute(&format!("set app.id = '{id}'; create temp table mine(v int); insert into mine values ({id})"))
                .await
                .expect("setup");
            for _ in 0..5 {
                let row = c
                    .query_one("select current_setting('app.id'), (select v from mine)", &[])
                    .await
                    .expect("query");
                assert_eq!(row.get::<_, String>(0), id.to_string());
                assert_eq!(row.get::<_, i32>(1), id);
            }
            backend_pid(&c).await
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for t in tasks {
        pids.insert(t.await.expect("client task"));
    }
    assert!(pids.len() <= 20, "{} distinct backends used for a pool of 20", pids.len());
    let pool = &env.proxy.app.pools.all()[0];
    assert!(pool.idle_count() <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_is_reset_and_rolled_back_before_reuse() {
    // pgpool's usual reset_query_list, statement by statement.
    let env = Env::start(small_pool("  pool_size: 1\n  reset_query: 'ABORT; DISCARD ALL'\n")).await;
    let a = env.client().await;
    a.batch_execute("create table locked(v int)").await.expect("create");
    let pid_a = backend_pid(&a).await;
    a.batch_execute("set work_mem = '77MB'; prepare s as select 1; create temp table t(v int); begin; lock table locked")
        .await
        .expect("dirty the session");
    drop(a);

    let b = env.client().await;
    assert_eq!(backend_pid(&b).await, pid_a, "pool of one reuses the same backend");
    let wm: String = b.query_one("show work_mem", &[]).await.expect("show").get(0);
    assert_ne!(wm, "77MB", "SET was reset");
    let err = b.batch_execute("execute s").await.expect_err("prepared statement was deallocated");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_PSTATEMENT));
    let err = b.batch_execute("select * from t").await.expect_err("temp table dropped");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    b.batch_execute("begin; lock table locked nowait; commit").await.expect("abandoned transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_follow_each_client() {
    let env = Env::start(small_pool("  pool_size: 1\n")).await;
    let with = |extra: &str| format!("{} {extra}", env.url("postgres", None));
    let settings = "select current_setting('application_name'), current_setting('search_path')";

    // Only application_name differs: the backend is reused and adjusted with SET.
    let a = connect(&with("application_name=alpha")).await.expect("a");
    let pid = backend_pid(&a).await;
    drop(a);
    let b = connect(&with("application_name=beta")).await.expect("b");
    assert_eq!(backend_pid(&b).await, pid, "same backend reused");
    let row = b.query_one(settings, &[]).await.expect("b");
    assert_eq!(row.get::<_, String>(0), "beta");
    drop(b);

    // A setting from `options` is honoured, and never leaks to a client that did not ask for
    // it (its server default is unknown, so that backend is replaced rather than reused).
    let c = connect(&with("application_name=gamma options='-c search_path=gamma_schema'")).await.expect("c");
    let row = c.query_one(settings, &[]).await.expect("c");
    assert_eq!((row.get::<_, String>(0).as_str(), row.get::<_, String>(1).as_str()), ("gamma", "gamma_schema"));
    drop(c);
    let d = connect(&with("application_name=delta")).await.expect("d");
    let row = d.query_one(settings, &[]).await.expect("d");
    assert_eq!(row.get::<_, String>(0), "delta");
    assert_eq!(row.get::<_, String>(1), "\"$user\", public", "the previous client's search_path is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_gives_a_clear_error_after_the_wait() {
    let env = Env::start(small_pool("  pool_size: 1\n  checkout_timeout: 300ms\n")).await;
    let holder = env.client().await;
    holder.batch_execute("select 1").await.expect("holder has the backend");
    let waiter = env.client().await; // welcomed without a backend
    let err = waiter.batch_execute("select 1").await.expect_err("no backend free");
    let db = err.as_db_error().expect("server-style error");
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS);
    assert!(db.message().contains("pool_size"), "{}", db.message());
    // The holder is unaffected.
    holder.batch_execute("select 1").await.expect("holder still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limit_refuses_extra_clients() {
    let env = Env::start(small_pool("  max_client_connections: 2\n")).await;
    let _a = env.client().await;
    let _b = env.client().await;
    let err = connect(&env.url("postgres", None)).await.expect_err("third client refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    drop(_a);
    assert!(
        wait_until(Duration::from_secs(5), || async { connect(&env.url("postgres", None)).await.is_ok() }).await,
        "a slot frees when a client leaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_to_the_primary_and_follow_a_promotion() {
    let mut env = Env::start(Setup { cluster: ClusterOptions { standbys: 2, ..Default::default() }, ..Setup::default() }).await;
    let primary_port = env.cluster.nodes[0].port as i32;
    let c = env.client().await;
    let row = c.query_one("select pg_is_in_recovery(), current_setting('port')::int", &[]).await.expect("query");
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), primary_port);
    c.batch_execute("create table w(v int); insert into w values (1)").await.expect("write through proxy");
    drop(c);

    let status = http_get(env.proxy.admin_addr.expect("admin"), "/status").await;
    assert!(status.contains("primary") && status.matches("standby").count() == 2, "{status}");
    let metrics = http_get(env.proxy.metrics_addr.expect("metrics"), "/metrics").await;
    assert!(metrics.contains("pglifeguard_backend_primary{node=\"node0\"} 1"), "{metrics}");
    assert!(metrics.contains("pglifeguard_transactions_total"), "{metrics}");

    // The primary goes away and node1 is promoted: new sessions land on node1.
    env.cluster.wait_replayed().expect("replayed");
    env.cluster.node_mut(0).stop_immediate();
    env.cluster.nodes[1].promote().expect("promote");
    let new_port = env.cluster.nodes[1].port as i32;
    let url = env.url("postgres", None);
    let moved = wait_until(Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            match connect(&url).await {
                Ok(c) => c
                    .query_one("select current_setting('port')::int", &[])
                    .await
                    .map(|r| r.get::<_, i32>(0) == new_port)
                    .unwrap_or(false),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(moved, "sessions never moved to the promoted node");
    let c = env.client().await;
    c.batch_execute("insert into w values (2)").await.expect("write on the new primary");
    let n: i64 = c.query_one("select count(*) from w", &[]).await.expect("count").get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_disconnected_after_client_idle_timeout() {
    let env = Env::start(small_pool("  pool_size: 2\n  client_idle_timeout: 300ms\n")).await;
    // One client idles inside a session (backend assigned), one before its first request.
    let (busy, mut busy_conn) =
        tokio_postgres::connect(&env.url("postgres", None), tokio_postgres::NoTls).await.expect("connect");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut messages = futures_util::stream::poll_fn(move |cx| busy_conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            if let Err(e) = m {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(e.code().cloned());
                }
            }
        }
    });
    busy.batch_execute("select 1").await.expect("first request");
    let code = tokio::time::timeout(Duration::from_secs(10), rx).await.expect("disconnected in time").expect("error sent");
    assert_eq!(code, Some(SqlState::IDLE_SESSION_TIMEOUT));
    assert!(busy.is_closed() || busy.batch_execute("select 1").await.is_err());
    // Its backend went back to the pool, clean.
    let pool = &env.proxy.app.pools.all()[0];
    assert!(wait_until(Duration::from_secs(5), || async { pool.in_use() == 0 && pool.idle_count() == 1 }).await);
}
