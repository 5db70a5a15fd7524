//! Prometheus metrics. One [`Metrics`] per proxy (no global registry), so tests can run several
//! proxies in one process. The relay updates plain atomic counters; nothing here allocates
//! on the hot path.

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::cluster::{ClusterState, NodeStatus, Role};

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client connections open now (authenticated or not).
    pub clients: IntGauge,
    /// Clients waiting for a backend connection.
    pub clients_waiting: IntGauge,
    /// Backend connections open now, in use or idle.
    pub backends: IntGauge,
    /// Backend connections idle in a pool.
    pub backends_idle: IntGauge,
    /// Bytes relayed from clients to backends.
    pub bytes_to_backend: IntCounter,
    /// Bytes relayed from backends to clients.
    pub bytes_to_client: IntCounter,
    /// Transactions completed (ReadyForQuery with status idle).
    pub transactions: IntCounter,
    /// Seconds clients waited for a backend.
    pub wait_seconds: Histogram,
    /// Errors, by kind.
    pub errors: IntCounterVec,
    /// 1 when a backend answered its last check.
    pub backend_up: IntGaugeVec,
    /// 1 for the backend currently used as primary.
    pub backend_primary: IntGaugeVec,
    /// Failovers started.
    pub failovers: IntCounter,
    /// Seconds one health check took.
    pub health_check_seconds: Histogram,
    /// Failed health check attempts, by node.
    pub health_check_failures: IntCounterVec,
    /// Hook runs, by hook and outcome.
    pub hook_runs: IntCounterVec,
    /// Seconds hooks ran, by hook.
    pub hook_seconds: HistogramVec,
    /// Client sessions moved to a new backend after theirs was lost while idle.
    pub sessions_recovered: IntCounter,
    /// Idle client sessions moved to the new primary after a switchover or promotion.
    pub sessions_rerouted: IntCounter,
    /// Switchovers, by outcome (`done`, `aborted`).
    pub switchovers: IntCounterVec,
    /// 1 while this proxy is the watchdog leader (with a valid lease).
    pub watchdog_leader: IntGauge,
    /// Current watchdog (Raft) term.
    pub watchdog_term: IntGauge,
    /// Times this proxy became the acting watchdog leader.
    pub watchdog_escalations: IntCounter,
    /// 1 while the guardian reports the virtual IP up on this host.
    pub vip_held: IntGauge,
}

impl Metrics {
    /// Creates and registers all metrics under the `pglifeguard_` prefix.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("pglifeguard".into()), None).expect("valid prefix");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let m = Metrics {
            clients: gauge("client_connections", "Client connections open now"),
            clients_waiting: gauge("clients_waiting", "Clients waiting for a backend connection"),
            backends: gauge("backend_connections", "Backend connections open now"),
            backends_idle: gauge("backend_connections_idle", "Backend connections idle in a pool"),
            bytes_to_backend: counter("client_to_backend_bytes_total", "Bytes relayed from clients to backends"),
            bytes_to_client: counter("backend_to_client_bytes_total", "Bytes relayed from backends to clients"),
            transactions: counter("transactions_total", "Transactions completed through the proxy"),
            wait_seconds: Histogram::with_opts(
                HistogramOpts::new("pool_wait_seconds", "Time clients waited for a backend connection")
                    .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(Opts::new("errors_total", "Errors by kind"), &["kind"]).expect("valid metric"),
            backend_up: IntGaugeVec::new(Opts::new("backend_up", "1 when the backend answered its last check"), &["node"])
                .expect("valid metric"),
            backend_primary: IntGaugeVec::new(
                Opts::new("backend_primary", "1 for the backend that receives sessions"),
                &["node"],
            )
            .expect("valid metric"),
            failovers: counter("failovers_total", "Failovers started"),
            health_check_seconds: Histogram::with_opts(
                HistogramOpts::new("health_check_seconds", "Time one health check took")
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
            health_check_failures: IntCounterVec::new(
                Opts::new("health_check_failures_total", "Failed health check attempts"),
                &["node"],
            )
            .expect("valid metric"),
            hook_runs: IntCounterVec::new(Opts::new("hook_runs_total", "Hook runs by hook and outcome"), &["hook", "outcome"])
                .expect("valid metric"),
            hook_seconds: HistogramVec::new(
                HistogramOpts::new("hook_seconds", "Time hooks ran").buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
                &["hook"],
            )
            .expect("valid metric"),
            sessions_recovered: counter(
                "sessions_recovered_total",
                "Client sessions moved to a new backend after theirs was lost while idle",
            ),
            sessions_rerouted: counter(
                "sessions_rerouted_total",
                "Idle client sessions moved to the new primary after a switchover or promotion",
            ),
            watchdog_leader: IntGauge::new("watchdog_leader", "1 while this proxy is the watchdog leader with a valid lease")
                .expect("valid metric"),
            watchdog_term: IntGauge::new("watchdog_term", "Current watchdog term").expect("valid metric"),
            watchdog_escalations: counter("watchdog_escalations_total", "Times this proxy became the acting watchdog leader"),
            vip_held: IntGauge::new("vip_held", "1 while the virtual IP is up on this host").expect("valid metric"),
            switchovers: IntCounterVec::new(Opts::new("switchovers_total", "Switchovers by outcome"), &["outcome"])
                .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.clients.clone()),
            Box::new(m.clients_waiting.clone()),
            Box::new(m.backends.clone()),
            Box::new(m.backends_idle.clone()),
            Box::new(m.bytes_to_backend.clone()),
            Box::new(m.bytes_to_client.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.wait_seconds.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.backend_up.clone()),
            Box::new(m.backend_primary.clone()),
            Box::new(m.failovers.clone()),
            Box::new(m.health_check_seconds.clone()),
            Box::new(m.health_check_failures.clone()),
            Box::new(m.hook_runs.clone()),
            Box::new(m.hook_seconds.clone()),
            Box::new(m.sessions_recovered.clone()),
            Box::new(m.sessions_rerouted.clone()),
            Box::new(m.switchovers.clone()),
            Box::new(m.watchdog_leader.clone()),
            Box::new(m.watchdog_term.clone()),
            Box::new(m.watchdog_escalations.clone()),
            Box::new(m.vip_held.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Counts one error of the given kind.
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// Mirrors a cluster snapshot into the per-backend gauges.
    pub fn set_cluster(&self, state: &ClusterState) {
        for (i, node) in state.nodes.iter().enumerate() {
            let up = matches!(node.status, NodeStatus::Up(_));
            self.backend_up.with_label_values(&[&node.name]).set(up as i64);
            let primary = state.primary == Some(i) && node.status == NodeStatus::Up(Role::Primary);
            self.backend_primary.with_label_values(&[&node.name]).set(primary as i64);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
