//! Session pools of backend connections, one per (user, database).
//!
//! A pool lends a connection to one client for the whole session ([`Lease`]) and takes it back
//! only in a known-clean state: idle (ReadyForQuery 'I' after every request), rolled back if a
//! transaction was left open, and reset with the configured query. Anything else is closed.
//! At most `pool_size` connections of a pool are lent at once; further clients queue (FIFO,
//! tokio's fair semaphore) until `checkout_timeout`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::app::App;
use crate::backend::{BackendConn, BackendError, ConnectSpec};
use crate::startup::parse_options;

/// ParameterStatus name/value pairs a client is welcomed with, shared by a pool's clients.
pub type Welcome = Arc<Vec<(String, String)>>;

/// Identifies a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Login user.
    pub user: String,
    /// Database.
    pub database: String,
}

/// Startup parameters (besides user and database), shared between a client and its backend.
pub type Params = Arc<BTreeMap<String, String>>;

/// Why no connection could be lent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The queue wait exceeded `checkout_timeout`.
    #[error("no backend connection available within {0:?} (pool_size reached)")]
    Timeout(Duration),
    /// No node is known to be primary.
    #[error("no primary node is available")]
    NoPrimary,
    /// Opening a new connection failed.
    #[error("cannot connect to backend: {0}")]
    Connect(#[from] BackendError),
    /// The proxy is shutting down.
    #[error("the proxy is shutting down")]
    Shutdown,
}

/// How a client left its backend, as tracked by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Every request answered, no transaction open.
    Idle,
    /// Every request answered, but inside a transaction block (status 'T' or 'E').
    InTransaction,
    /// A request is still running, a COPY is open, or a message was cut in half.
    Busy,
    /// The backend connection itself failed.
    Broken,
}

/// One pool.
pub struct Pool {
    /// Which pool this is.
    pub key: PoolKey,
    permits: Arc<Semaphore>,
    size: AtomicUsize,
    /// Connections open (lent or idle); never above `size` except while shrinking.
    open: AtomicUsize,
    idle: Mutex<Vec<BackendConn>>,
    /// ParameterStatus values seen by a client with the given startup parameters, so later
    /// clients with the same parameters can be welcomed before a backend is assigned.
    welcomes: Mutex<HashMap<Params, Welcome>>,
}

/// A connection lent to one client. Dropping it without [`Lease::release`] closes the
/// connection, so a panicking session never returns a backend in an unknown state.
pub struct Lease {
    /// `Some` until `release` takes it out, except while a relay task owns it.
    conn: Option<BackendConn>,
    pool: Arc<Pool>,
    metrics: crate::metrics::Metrics,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    fn new(key: PoolKey, size: usize) -> Pool {
        Pool {
            key,
            permits: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            open: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            welcomes: Mutex::new(HashMap::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<BackendConn>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The welcome parameters recorded for clients with these startup parameters.
    pub fn welcome(&self, params: &Params) -> Option<Welcome> {
        self.welcomes.lock().unwrap_or_else(|p| p.into_inner()).get(params).cloned()
    }

    fn record_welcome(&self, params: &Params, values: &BTreeMap<String, String>) {
        let list: Vec<(String, String)> = values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut w = self.welcomes.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a client population with endlessly varying parameters must not grow memory.
        if w.len() >= 256 && !w.contains_key(params) {
            w.clear();
        }
        w.insert(params.clone(), Arc::new(list));
    }

    /// Connections lent out now.
    pub fn in_use(&self) -> usize {
        self.size.load(Ordering::Relaxed).saturating_sub(self.permits.available_permits())
    }

    /// Connections idle now.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// Lends a connection to the current primary, waiting up to `checkout_timeout`.
    pub async fn checkout(self: &Arc<Self>, app: &App, params: &Params) -> Result<Lease, PoolError> {
        let config = app.config.load_full();
        let timeout = config.pool.checkout_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let started = Instant::now();
        app.metrics.clients_waiting.inc();
        let permit = tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned()).await;
        app.metrics.clients_waiting.dec();
        app.metrics.wait_seconds.observe(started.elapsed().as_secs_f64());
        let permit = match permit {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(PoolError::Shutdown),
            Err(_) => return Err(PoolError::Timeout(timeout)),
        };
        // During a failover no primary is known: wait for one up to hold_timeout rather than
        // fail the client.
        let hold = tokio::time::Instant::now() + config.failover.hold_timeout.max(timeout);
        let mut conn = loop {
            let (node, addr, epoch) = app.wait_for_primary(hold).await.ok_or(PoolError::NoPrimary)?;
            if let Some(conn) = self.take_idle(app, node, epoch, params, config.pool.server_lifetime) {
                break conn;
            }
            let spec = ConnectSpec {
                node,
                addr,
                user: self.key.user.clone(),
                database: self.key.database.clone(),
                params: params.clone(),
                credential: app.users.load().backend_credential(&self.key.user),
            };
            match BackendConn::connect(&spec, epoch, config.pool.connect_timeout).await {
                Ok(conn) => {
                    self.open.fetch_add(1, Ordering::Relaxed);
                    app.metrics.backends.inc();
                    tracing::debug!(pool = ?self.key, backend_pid = conn.pid, node = conn.addr, "opened backend connection");
                    break conn;
                }
                Err(e) if node_is_failing(&e) => {
                    // The primary looks gone: have it checked now, and wait (within the hold
                    // time) for the failover manager to decide, instead of failing the client.
                    tracing::info!(error = %e, "primary unreachable; waiting for the cluster to settle");
                    app.suspect(node);
                    if !app.wait_for_epoch_change(epoch, hold).await {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        if conn.startup != *params {
            if let Err(e) = apply_settings(&mut conn, params).await {
                self.close(app, conn);
                return Err(PoolError::Connect(e));
            }
        }
        self.record_welcome(params, &conn.reported);
        Ok(Lease { conn: Some(conn), pool: Arc::clone(self), metrics: app.metrics.clone(), _permit: permit })
    }

    /// Pops an idle connection usable now, preferring one opened with the same startup
    /// parameters, then one whose settings `SET` can turn into the client's. Stale
    /// connections met on the way are closed, and so is a connection that cannot be adjusted
    /// when the pool has no room for a new one: a new one is then opened in its place.
    fn take_idle(&self, app: &App, node: usize, epoch: u64, params: &Params, lifetime: Duration) -> Option<BackendConn> {
        let mut closing = Vec::new();
        let picked = {
            let mut idle = self.idle();
            let mut i = idle.len();
            while i > 0 {
                i -= 1;
                let c = &idle[i];
                let expired = !lifetime.is_zero() && c.created.elapsed() >= lifetime;
                if c.node != node || c.epoch != epoch || expired || c.is_broken() {
                    closing.push(idle.swap_remove(i));
                }
            }
            let room = self.open.load(Ordering::Relaxed) - closing.len() < self.size.load(Ordering::Relaxed);
            if let Some(pos) = idle.iter().rposition(|c| c.startup == *params) {
                Some(idle.remove(pos))
            } else if room {
                None
            } else if let Some(pos) = idle.iter().rposition(|c| adjustable(&c.startup, params)) {
                Some(idle.remove(pos))
            } else {
                // Full pool, nothing reusable for these parameters: retire the least recently
                // used idle connection so a fitting one can be opened.
                if !idle.is_empty() {
                    closing.push(idle.remove(0));
                }
                None
            }
        };
        app.metrics.backends_idle.sub(closing.len() as i64 + picked.is_some() as i64);
        for conn in closing {
            self.close(app, conn);
        }
        picked
    }

    fn close(&self, app: &App, conn: BackendConn) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        app.metrics.backends.dec();
        tokio::spawn(conn.close());
    }

    /// Closes idle connections that are too old, idle too long, broken, or opened under an
    /// older cluster epoch.
    pub fn evict(&self, app: &App, epoch: u64) {
        let config = app.config.load();
        let (idle_timeout, lifetime) = (config.pool.server_idle_timeout, config.pool.server_lifetime);
        let evicted: Vec<BackendConn> = {
            let mut idle = self.idle();
            let mut out = Vec::new();
            let mut i = 0;
            while i < idle.len() {
                let c = &idle[i];
                let too_idle = !idle_timeout.is_zero() && c.released.elapsed() >= idle_timeout;
                let too_old = !lifetime.is_zero() && c.created.elapsed() >= lifetime;
                if too_idle || too_old || c.epoch != epoch || c.is_broken() {
                    out.push(idle.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            out
        };
        app.metrics.backends_idle.sub(evicted.len() as i64);
        for conn in evicted {
            self.close(app, conn);
        }
    }

    /// Changes the number of connections that may be lent at once.
    pub fn resize(self: &Arc<Self>, size: usize) {
        let old = self.size.swap(size, Ordering::Relaxed);
        if size > old {
            self.permits.add_permits(size - old);
        } else if size < old {
            // Shrinking waits for lent connections to come back, then retires their permits.
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                if let Ok(p) = pool.permits.acquire_many((old - size) as u32).await {
                    p.forget();
                }
            });
        }
    }
}

/// Whether a connect error says the node itself is failing (as opposed to, say, a wrong
/// password): refused or reset connections, and PostgreSQL's shutdown/startup errors.
fn node_is_failing(e: &BackendError) -> bool {
    match e {
        BackendError::Io { .. } | BackendError::Timeout { .. } => true,
        BackendError::Server { error, .. } => matches!(error.code(), "57P01" | "57P02" | "57P03"),
        _ => false,
    }
}

/// Brings a reused connection's session settings in line with what this client asked for.
async fn apply_settings(conn: &mut BackendConn, params: &Params) -> Result<(), BackendError> {
    let wanted = settings(params);
    let current = settings(&conn.startup);
    let mut sql = String::new();
    for (k, v) in &wanted {
        if current.get(k) != Some(v) {
            sql.push_str(&format!(
                "SET {} = {};",
                postgres_protocol::escape::escape_identifier(k),
                postgres_protocol::escape::escape_literal(v)
            ));
        }
    }
    if current.contains_key("application_name") && !wanted.contains_key("application_name") {
        sql.push_str("SET application_name = '';");
    }
    if !sql.is_empty() {
        conn.simple_query(&sql).await?;
    }
    Ok(())
}

/// Whether `SET` alone can give a connection opened with `have` the settings of `want`: every
/// setting `have` was opened with must also be set by `want` (its server default is unknown
/// to the proxy, so it cannot be restored), except application_name, whose default is empty.
fn adjustable(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    let want = settings(want);
    settings(have).keys().all(|k| k == "application_name" || want.contains_key(k))
}

fn settings(params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in params {
        if k == "options" {
            out.extend(parse_options(v));
        } else {
            out.insert(k.to_lowercase(), v.clone());
        }
    }
    out
}

impl Lease {
    /// Moves the lent connection out, for the relay task to own while it runs; it comes back
    /// through [`Lease::put_conn`]. A lease released without it only frees its pool slot.
    pub fn take_conn(&mut self) -> BackendConn {
        self.conn.take().expect("present until released")
    }

    /// Puts back the connection taken by [`Lease::take_conn`].
    pub fn put_conn(&mut self, conn: BackendConn) {
        self.conn = Some(conn);
    }

    /// Ends a lease whose connection, taken by [`Lease::take_conn`], never came back (the
    /// relay task that owned it panicked and closed it): the pool stops counting it and the
    /// slot is freed.
    pub fn conn_lost(self) {
        // With the connection still here, dropping the lease closes and uncounts it.
        if self.conn.is_none() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
            self.metrics.backends.dec();
        }
    }

    /// The lent connection.
    pub fn conn(&mut self) -> &mut BackendConn {
        self.conn.as_mut().expect("present until released")
    }

    /// Returns the connection after the client left, cleaning it first; closes it when it
    /// cannot be made clean within `reset_timeout`.
    pub async fn release(mut self, app: &App, leftover: Leftover) {
        let Some(mut conn) = self.conn.take() else { return };
        let pool = Arc::clone(&self.pool);
        let config = app.config.load_full();
        let cleanup = async {
            match leftover {
                Leftover::Idle => {}
                Leftover::InTransaction => {
                    conn.simple_query("ROLLBACK").await?;
                }
                Leftover::Busy | Leftover::Broken => {
                    return Err(BackendError::Protocol { addr: conn.addr.clone(), reason: format!("left {leftover:?}") });
                }
            }
            // Run one statement at a time, as pgpool does with reset_query_list: DISCARD ALL
            // refuses to run inside the implicit transaction of a multi-statement query.
            for statement in config.pool.reset_query.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                conn.simple_query(statement).await?;
            }
            Ok::<(), BackendError>(())
        };
        let clean = match tokio::time::timeout(config.pool.reset_timeout, cleanup).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, backend_pid = conn.pid, "backend not reusable, closing it");
                false
            }
            Err(_) => {
                tracing::warn!(backend_pid = conn.pid, "reset of backend timed out, closing it");
                false
            }
        };
        if leftover == Leftover::Busy {
            // The server may still be running the client's statement: stop it so the
            // connection's slot on the server is freed promptly.
            let (addr, pid, secret) = (conn.addr.clone(), conn.pid, conn.secret);
            let timeout = config.pool.connect_timeout;
            tokio::spawn(async move {
                let _ = crate::backend::send_cancel(&addr, pid, secret, timeout).await;
            });
        }
        let lifetime = config.pool.server_lifetime;
        let expired = !lifetime.is_zero() && conn.created.elapsed() >= lifetime;
        let current_epoch = app.cluster.load().epoch;
        if clean && !expired && conn.epoch == current_epoch {
            conn.released = Instant::now();
            pool.idle().push(conn);
            app.metrics.backends_idle.inc();
        } else {
            pool.close(app, conn);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let n = self.idle.get_mut().map(|v| v.len()).unwrap_or(0);
        tracing::debug!(pool = ?self.key, idle = n, "pool dropped");
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Still holding the connection means release() never ran (a panic or a cancelled
        // task): its state is unknown, so it is closed with its socket, never pooled.
        if self.conn.take().is_some() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
            self.metrics.backends.dec();
        }
    }
}

/// All pools of a proxy.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    /// The pool for a (user, database), created on first use.
    pub fn get(&self, key: &PoolKey, size: usize) -> Arc<Pool> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(key) {
            return Arc::clone(p);
        }
        let pool = Arc::new(Pool::new(key.clone(), size));
        map.insert(key.clone(), Arc::clone(&pool));
        pool
    }

    /// Every pool, for maintenance and status output.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}
