//! Config validation from the command line, and live reloads.

use std::process::Command;

use crate::common::{Env, Setup};

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pglifeguard")).arg("check-config").arg(&path).output().expect("run");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_config_accepts_good_and_names_the_bad_key() {
    let good = "listen: 127.0.0.1:6432\nbackends:\n  - {name: a, host: 127.0.0.1, port: 5432}\n";
    let (ok, out) = check_config(good);
    assert!(ok, "{out}");
    assert!(out.contains("ok"), "{out}");

    for (text, expected) in [
        (format!("{good}pool:\n  pool_sise: 3\n"), "pool.pool_sise"),
        (format!("{good}pool:\n  pool_size: 0\n"), "pool.pool_size"),
        (format!("{good}pool:\n  connect_timeout: forever\n"), "pool.connect_timeout"),
        ("listen: nowhere\nbackends: []\n".to_owned(), "listen"),
        ("listen: 127.0.0.1:1\nbackends: []\n".to_owned(), "backends"),
        (format!("{good}auth:\n  method: md5\n"), "auth.file"),
        (format!("{good}auth:\n  method: md5\n  file: /nonexistent/users.txt\n"), "/nonexistent/users.txt"),
        ("listen: [unclosed\n".to_owned(), "line"),
    ] {
        let (ok, out) = check_config(&text);
        assert!(!ok, "accepted a bad config:\n{text}");
        assert!(out.contains(expected), "error for\n{text}\nshould mention {expected}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_changes_and_keeps_the_old_config_otherwise() {
    let env = Env::start(Setup { pool: "  pool_size: 5\n", ..Setup::default() }).await;
    let session = env.client().await;
    session.batch_execute("select 1").await.expect("session works");
    let original = std::fs::read_to_string(&env.config_path).expect("read");

    // Broken YAML: refused, old config stays.
    std::fs::write(&env.config_path, format!("{original}\npool: [\n")).expect("write");
    let err = env.proxy.app.reload().expect_err("invalid file refused");
    assert!(!err.to_string().is_empty());
    assert_eq!(env.proxy.app.config.load().pool.pool_size, 5);

    // A listen address change needs a restart: refused and said so.
    std::fs::write(&env.config_path, original.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1")).expect("write");
    let err = env.proxy.app.reload().expect_err("listen change refused");
    assert!(err.to_string().contains("listen"), "{err}");

    // A valid change takes effect, and the open session is untouched.
    std::fs::write(&env.config_path, original.replace("pool_size: 5", "pool_size: 7")).expect("write");
    env.proxy.app.reload().expect("valid reload");
    assert_eq!(env.proxy.app.config.load().pool.pool_size, 7);
    session.batch_execute("select 1").await.expect("session survived the reload");
}

#[test]
fn the_annotated_example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/pglifeguard.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_pglifeguard")).arg("check-config").arg(&path).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
