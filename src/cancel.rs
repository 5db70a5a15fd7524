//! Cancel keys. Each client gets a key issued by the proxy (never a backend's own, since the
//! backend changes between sessions); a CancelRequest carrying it is forwarded to whatever
//! backend process that client is using at the moment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where a cancel for one client must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// Backend `host:port`.
    pub addr: String,
    /// Backend process id.
    pub pid: i32,
    /// Backend secret key.
    pub secret: i32,
}

#[derive(Debug)]
struct Entry {
    secret: i32,
    target: Option<CancelTarget>,
}

/// All keys handed out to connected clients.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<i32, Entry>>,
}

/// A client's key; dropping it withdraws the key.
#[derive(Debug)]
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    /// Process id shown to the client.
    pub pid: i32,
    /// Secret shown to the client.
    pub secret: i32,
}

impl CancelRegistry {
    /// Issues a fresh random key.
    pub fn issue(self: &Arc<Self>) -> CancelKey {
        let mut keys = self.lock();
        loop {
            // Positive pids look like real PostgreSQL pids to tools that print them.
            let pid = (rand::random::<u32>() >> 1) as i32;
            if pid == 0 || keys.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            keys.insert(pid, Entry { secret, target: None });
            return CancelKey { registry: Arc::clone(self), pid, secret };
        }
    }

    /// The backend a cancel with this key should reach, if the key is valid and the client is
    /// using a backend now.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let keys = self.lock();
        let entry = keys.get(&pid)?;
        if entry.secret != secret {
            return None;
        }
        entry.target.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CancelKey {
    /// Points the key at the backend now serving the client (or at none).
    pub fn set_target(&self, target: Option<CancelTarget>) {
        if let Some(e) = self.registry.lock().get_mut(&self.pid) {
            e.target = target;
        }
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_routes_only_with_right_secret_and_dies_with_client() {
        let reg = Arc::new(CancelRegistry::default());
        let key = reg.issue();
        let target = CancelTarget { addr: "a:1".into(), pid: 42, secret: 7 };
        key.set_target(Some(target.clone()));
        assert_eq!(reg.target(key.pid, key.secret), Some(target));
        assert_eq!(reg.target(key.pid, key.secret.wrapping_add(1)), None);
        let pid = key.pid;
        let secret = key.secret;
        drop(key);
        assert_eq!(reg.target(pid, secret), None);
    }
}
