//! Starting and stopping one proxy: bind the listeners, spawn the accept loop, the health
//! task and the HTTP endpoints, and shut them all down together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Endpoint};
use crate::app::App;
use crate::config::Config;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The users file is invalid.
    #[error(transparent)]
    Users(#[from] crate::auth::UserListError),
    /// The watchdog could not start (state directory, peer port).
    #[error("watchdog: {0}")]
    Watchdog(#[from] crate::watchdog::WatchdogError),
}

/// A running proxy.
pub struct Proxy {
    /// Shared state.
    pub app: Arc<App>,
    /// Where clients connect (with the real port when 0 was configured).
    pub addr: SocketAddr,
    /// Where the admin HTTP endpoint listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Where the metrics HTTP endpoint listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    tasks: TaskTracker,
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::net::listen(addr).map_err(|source| StartError::Listen { addr, source })
}

impl Proxy {
    /// Binds every listener and starts serving. Must be called inside a tokio runtime.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Proxy, StartError> {
        let listener = bind(config.listen)?;
        let admin = config.admin_listen.map(bind).transpose()?;
        let metrics = config.metrics_listen.map(bind).transpose()?;
        let watchdog_config = config.watchdog.clone();
        let watchdog = match &watchdog_config {
            Some(w) => Some(Arc::new(crate::watchdog::Watchdog::start(w.clone(), crate::watchdog::PeerRole::Proxy).await?)),
            None => None,
        };
        let (app, events) = App::new(config, config_path, watchdog.clone())?;
        let tasks = TaskTracker::new();
        let local = |l: &TcpListener| l.local_addr().ok();
        let proxy = Proxy {
            addr: listener.local_addr().map_err(|source| StartError::Listen { addr: app.config.load().listen, source })?,
            admin_addr: admin.as_ref().and_then(local),
            metrics_addr: metrics.as_ref().and_then(local),
            app: Arc::clone(&app),
            tasks: tasks.clone(),
        };
        tasks.spawn(crate::failover::run(Arc::clone(&app), events));
        if let (Some(wd), Some(w)) = (watchdog, watchdog_config) {
            tasks.spawn(crate::leadership::run(Arc::clone(&app), wd, w));
        }
        tasks.spawn(evict_idle(Arc::clone(&app)));
        if let Some(l) = admin {
            tasks.spawn(admin::serve(Arc::clone(&app), l, Endpoint::Admin));
        }
        if let Some(l) = metrics {
            tasks.spawn(admin::serve(Arc::clone(&app), l, Endpoint::Metrics));
        }
        tasks.spawn(accept_loop(app, listener, tasks.clone()));
        tracing::info!(addr = %proxy.addr, "pglifeguard listening");
        Ok(proxy)
    }

    /// Waits until a primary is known, for callers that want to serve only once routing works.
    pub async fn wait_for_primary(&self, timeout: Duration) -> bool {
        self.app.wait_for_primary(tokio::time::Instant::now() + timeout).await.is_some()
    }

    /// Stops accepting, lets sessions finish their current transaction (up to `grace`), then
    /// drops everything.
    pub async fn shutdown(self, grace: Duration) {
        self.app.begin_shutdown();
        if let Some(wd) = &self.app.watchdog {
            // Withdraws the lease first, so another peer can take over as soon as possible.
            if let Err(e) = wd.shutdown().await {
                tracing::warn!(error = %e, "watchdog did not stop cleanly");
            }
        }
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(?grace, "sessions still open after the shutdown grace period; closing them");
        }
    }
}

/// Closes idle backend connections that aged out or belong to an older primary assignment.
async fn evict_idle(app: Arc<App>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let epoch = app.cluster.load().epoch;
        for pool in app.pools.all() {
            pool.evict(&app, epoch);
        }
    }
}

async fn accept_loop(app: Arc<App>, listener: TcpListener, tasks: TaskTracker) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    tasks.spawn(crate::client::serve(Arc::clone(&app), sock, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = app.shutdown.cancelled() => return,
        }
    }
}
