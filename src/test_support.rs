//! Helpers shared by the unit tests.

use std::time::Duration;

/// Polls `cond` every `every` until it holds; panics naming `what` once `timeout` has passed.
pub(crate) async fn wait_until(what: &str, timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(every).await;
    }
}
