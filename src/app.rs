//! The state one running proxy shares between its tasks. Passed around as `Arc<App>`; there is
//! no global state, so tests can run several proxies in one process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::auth::{UserList, UserListError};
use crate::cancel::CancelRegistry;
use crate::cluster::ClusterState;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pool::Pools;

/// Shared state of one proxy.
pub struct App {
    /// Current configuration; replaced whole on reload.
    pub config: ArcSwap<Config>,
    /// File the configuration came from, for reloads.
    pub config_path: Option<PathBuf>,
    /// Current users file.
    pub users: ArcSwap<UserList>,
    /// Current view of the cluster.
    pub cluster: ArcSwap<ClusterState>,
    /// Notified with the epoch whenever the cluster view changes.
    pub cluster_changed: watch::Sender<u64>,
    /// Backend connection pools.
    pub pools: Pools,
    /// Cancel keys of connected clients.
    pub cancels: Arc<CancelRegistry>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Cancelled when the proxy shuts down (through [`App::begin_shutdown`]).
    pub shutdown: CancellationToken,
    /// What relays read on every wake-up, as plain loads (see [`crate::relay`]).
    signals: RelaySignals,
    /// Events for the failover manager (health reports, operator commands).
    pub events: mpsc::Sender<crate::failover::Event>,
    /// The watchdog peer of this proxy, when `watchdog` is configured.
    pub watchdog: Option<Arc<crate::watchdog::Watchdog>>,
    /// Wakes a node's health checker at once when a data connection to it fails.
    suspects: Vec<Arc<Notify>>,
    clients: AtomicUsize,
    next_client_id: AtomicU64,
}

/// The flags relays poll, kept side by side so that they share one cache line, which
/// stays in every core's cache because it is written only on shutdown and failover.
#[derive(Debug, Default)]
struct RelaySignals {
    /// Set just before `shutdown` is cancelled: read for the price of a load instead of a
    /// walk through the token's waiter list.
    stopping: std::sync::atomic::AtomicBool,
    /// The epoch of the cluster view last published, equal to `cluster.load().epoch` without
    /// the cost of an `ArcSwap` load.
    epoch: AtomicU64,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No file to reload from.
    #[error("the proxy was not started from a config file")]
    NoFile,
    /// The new file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new users file is invalid.
    #[error(transparent)]
    Users(#[from] UserListError),
    /// A setting that needs a restart changed.
    #[error("changing {0} requires a restart")]
    NeedsRestart(String),
}

impl App {
    /// Builds the state for a validated config, loading its users file. Also returns the
    /// receiving end of [`App::events`], for the failover manager.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        watchdog: Option<Arc<crate::watchdog::Watchdog>>,
    ) -> Result<(Arc<App>, mpsc::Receiver<crate::failover::Event>), UserListError> {
        let users = load_users(&config)?;
        let cluster = ClusterState::new(&config.backends);
        let (cluster_changed, _) = watch::channel(0);
        let (events, events_rx) = mpsc::channel(64);
        let suspects = config.backends.iter().map(|_| Arc::new(Notify::new())).collect();
        let app = Arc::new(App {
            config: ArcSwap::from_pointee(config),
            config_path,
            users: ArcSwap::from_pointee(users),
            cluster: ArcSwap::from_pointee(cluster),
            cluster_changed,
            pools: Pools::default(),
            cancels: Arc::new(CancelRegistry::default()),
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            signals: RelaySignals::default(),
            events,
            watchdog,
            suspects,
            clients: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
        });
        Ok((app, events_rx))
    }

    /// Starts shutting the proxy down: every task watching [`App::shutdown`] winds down.
    pub fn begin_shutdown(&self) {
        self.signals.stopping.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    /// Whether [`App::begin_shutdown`] was called.
    pub fn is_stopping(&self) -> bool {
        self.signals.stopping.load(Ordering::Acquire)
    }

    /// The epoch of the current cluster view (see [`ClusterState::epoch`]); one atomic load.
    pub fn epoch(&self) -> u64 {
        self.signals.epoch.load(Ordering::Acquire)
    }

    /// Reports that a data connection to `node` failed, so its health is checked now rather
    /// than at the next period.
    pub fn suspect(&self, node: usize) {
        if let Some(n) = self.suspects.get(node) {
            n.notify_one();
        }
    }

    /// The signal [`App::suspect`] raises for `node`.
    pub fn suspect_signal(&self, node: usize) -> Arc<Notify> {
        self.suspects.get(node).cloned().unwrap_or_else(|| Arc::new(Notify::new()))
    }

    /// A node's configured name, for logs.
    pub fn node_name(&self, node: usize) -> String {
        self.cluster.load().nodes.get(node).map(|n| n.name.clone()).unwrap_or_else(|| format!("#{node}"))
    }

    /// Publishes a new cluster view.
    pub fn set_cluster(&self, state: ClusterState) {
        let epoch = state.epoch;
        self.metrics.set_cluster(&state);
        self.cluster.store(Arc::new(state));
        self.signals.epoch.store(epoch, Ordering::Release);
        self.cluster_changed.send_replace(epoch);
    }

    /// The primary's node id, address and epoch, waiting until `deadline` for one to be known.
    pub async fn wait_for_primary(&self, deadline: tokio::time::Instant) -> Option<(usize, String, u64)> {
        let mut changes = self.cluster_changed.subscribe();
        loop {
            {
                let state = self.cluster.load();
                if let Some((node, addr)) = state.primary_addr() {
                    return Some((node, addr, state.epoch));
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Waits until the cluster epoch differs from `epoch` (a failover decided something) or
    /// `deadline` passes; returns whether it changed.
    pub async fn wait_for_epoch_change(&self, epoch: u64, deadline: tokio::time::Instant) -> bool {
        let mut changes = self.cluster_changed.subscribe();
        loop {
            if self.cluster.load().epoch != epoch {
                return true;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = self.shutdown.cancelled() => return false,
            }
        }
    }

    /// Takes a client slot if `max_client_connections` allows; the guard gives it back.
    pub fn admit_client(self: &Arc<Self>) -> Option<ClientSlot> {
        let max = self.config.load().pool.max_client_connections;
        let prev = self.clients.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.clients.inc();
        Some(ClientSlot { app: Arc::clone(self), id: self.next_client_id.fetch_add(1, Ordering::Relaxed) })
    }

    /// Client connections open now.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Re-reads the config file (and users file) and swaps them in if valid; the old ones stay
    /// in force otherwise.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let next = Config::load(path)?;
        let current = self.config.load();
        let changed = current.restart_required_changes(&next);
        if !changed.is_empty() {
            return Err(ReloadError::NeedsRestart(changed.join(", ")));
        }
        let users = load_users(&next)?;
        for pool in self.pools.all() {
            pool.resize(next.pool.pool_size);
        }
        self.users.store(Arc::new(users));
        self.config.store(Arc::new(next));
        Ok(())
    }
}

fn load_users(config: &Config) -> Result<UserList, UserListError> {
    match &config.auth.file {
        Some(path) => UserList::load(path),
        None => Ok(UserList::default()),
    }
}

/// A client's place under `max_client_connections`; released on drop.
pub struct ClientSlot {
    app: Arc<App>,
    /// Connection id used in logs.
    pub id: u64,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.app.clients.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.clients.dec();
    }
}
