//! Client authentication (md5, SCRAM-SHA-256) against a users file, and the proxy's own login
//! to password-protected backends with md5 and SCRAM.

use pglifeguard::auth::md5_user_hash;
use pglifeguard::localcluster::ClusterOptions;
use tokio_postgres::error::SqlState;

use crate::common::{connect, Env, Setup};

async fn login(env: &Env, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
    let c = connect(&env.url(user, Some(password))).await?;
    let row = c.query_one("select current_user::text", &[]).await?;
    Ok(row.get(0))
}

fn code(r: Result<String, tokio_postgres::Error>) -> Option<SqlState> {
    r.err().and_then(|e| e.code().cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_clients_and_password_protected_backends() {
    // The servers require passwords (SCRAM for scram_user, md5 for md5_user), so these logins
    // also prove the proxy logs in to backends with both methods.
    let users = format!(
        "\"scram_user\" \"pw-scram\"\nmd5_user:{}\n",
        md5_user_hash("pw-md5", "md5_user")
    );
    let env = Env::start(Setup {
        cluster: ClusterOptions { hba_password: true, ..Default::default() },
        auth: "  method: md5\n  file: users.txt\n".into(),
        users,
        ..Setup::default()
    })
    .await;
    env.cluster.add_user("scram_user", "pw-scram").expect("add scram user");
    env.cluster.add_user_md5("md5_user", "pw-md5").expect("add md5 user");

    assert_eq!(login(&env, "scram_user", "pw-scram").await.expect("plaintext entry, md5 exchange"), "scram_user");
    assert_eq!(login(&env, "md5_user", "pw-md5").await.expect("md5 entry"), "md5_user");
    assert_eq!(code(login(&env, "md5_user", "wrong").await), Some(SqlState::INVALID_PASSWORD));
    assert_eq!(code(login(&env, "nobody", "x").await), Some(SqlState::INVALID_PASSWORD));
    // A failed login costs nothing to others.
    assert_eq!(login(&env, "scram_user", "pw-scram").await.expect("still works"), "scram_user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_clients_with_verifiers_and_plaintext() {
    let verifier = postgres_protocol::password::scram_sha_256(b"carol-pw");
    let users = format!(
        "\"carol\" \"{verifier}\"\n\"postgres\" \"pg-pw\"\n\"dave\" \"{}\"\n",
        md5_user_hash("dave-pw", "dave")
    );
    let env = Env::start(Setup {
        auth: "  method: scram-sha-256\n  file: users.txt\n".into(),
        users,
        ..Setup::default()
    })
    .await;
    env.cluster.add_user("carol", "unused-by-trust-backend").expect("add carol");

    assert_eq!(login(&env, "carol", "carol-pw").await.expect("SCRAM verifier entry"), "carol");
    assert_eq!(login(&env, "postgres", "pg-pw").await.expect("plaintext entry"), "postgres");
    assert_eq!(code(login(&env, "carol", "nope").await), Some(SqlState::INVALID_PASSWORD));
    assert_eq!(
        code(login(&env, "dave", "dave-pw").await),
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "an md5 hash cannot serve SCRAM"
    );
    assert_eq!(login(&env, "carol", "carol-pw").await.expect("still works"), "carol");
}
