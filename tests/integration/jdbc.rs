//! pgjdbc through the proxy, used the way a ThingWorx application server uses it:
//! server-side prepared statements after `prepareThreshold` uses, fetch-size cursors,
//! transactions, COPY through `CopyManager`, `Statement.cancel()` and query timeouts,
//! batches, many concurrent connections, and errors in the middle of a session.
//!
//! The checks live in `tests/jdbc/JdbcCheck.java`, compiled here with `javac` against
//! Debian's pgjdbc jar (`apt-get install default-jdk-headless libpostgresql-jdbc-java`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{wait_until, Env};

/// The pgjdbc jar installed by Debian's `libpostgresql-jdbc-java`.
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";
/// Upper bound for the Java program; it has its own, shorter watchdog.
const JAVA_TIMEOUT: Duration = Duration::from_secs(300);
const INSTALL_HINT: &str = "install a JDK and pgjdbc: apt-get install default-jdk-headless libpostgresql-jdbc-java";

fn java_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jdbc/JdbcCheck.java")
}

/// Runs a command to completion with a deadline; returns (success, stdout, stderr).
async fn run(cmd: &mut tokio::process::Command, what: &str) -> (bool, String, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {what}: {e} ({INSTALL_HINT})"));
    let out = tokio::time::timeout(JAVA_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} still running after {JAVA_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fails the test (never skips it) when the JDK or pgjdbc is missing.
async fn require_java_and_pgjdbc() {
    assert!(Path::new(PGJDBC_JAR).is_file(), "{PGJDBC_JAR} not found; {INSTALL_HINT}");
    for tool in ["javac", "java"] {
        let status = tokio::process::Command::new(tool)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        assert!(
            matches!(status, Ok(s) if s.success()),
            "`{tool} -version` failed ({status:?}); {INSTALL_HINT}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_through_the_proxy() {
    require_java_and_pgjdbc().await;
    let env = Env::start_default().await;

    let classes = env.dir.path().join("jdbc-classes");
    let started = Instant::now();
    let (ok, out, err) = run(
        tokio::process::Command::new("javac")
            .arg("-cp")
            .arg(PGJDBC_JAR)
            .arg("-d")
            .arg(&classes)
            .arg(java_source()),
        "javac",
    )
    .await;
    assert!(ok, "javac failed:\n{out}{err}");
    let compiled = started.elapsed();

    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/postgres?user=postgres&prepareThreshold=5&ApplicationName=thingworx",
        env.port()
    );
    let started = Instant::now();
    let (ok, out, err) = run(
        tokio::process::Command::new("java")
            .arg("-cp")
            .arg(format!("{}:{PGJDBC_JAR}", classes.display()))
            .arg("JdbcCheck")
            .arg(&url),
        "java",
    )
    .await;
    let ran = started.elapsed();
    println!("javac {compiled:?}, JdbcCheck {ran:?}\n{out}{err}");
    assert!(ok, "JdbcCheck failed against {url}\n--- stdout\n{out}--- stderr\n{err}");
    assert!(
        out.lines().any(|l| l.starts_with("OK ")),
        "JdbcCheck exited 0 without its OK line\n--- stdout\n{out}--- stderr\n{err}"
    );

    // Every pgjdbc connection, including the cancelled and timed-out ones, gave its backend back.
    let pool = &env.proxy.app.pools.all()[0];
    let released = wait_until(Duration::from_secs(5), || async { pool.in_use() == 0 }).await;
    assert!(released, "{} backends still lent after the Java program exited", pool.in_use());
}
