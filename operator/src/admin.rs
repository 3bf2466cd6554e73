//! The operator's admin HTTP port: `/healthz`, `/readyz` and `/metrics`
//! (OpenMetrics text from `prometheus-client`, as on the nodes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the reconcile duration histogram's buckets.
const BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    namespace: String,
    cluster: String,
}

/// Counters the reconciler updates and `/metrics` prints.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<Reason, Counter>,
    duration: Histogram,
    leader: Gauge,
    stalled: Family<ClusterLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("reconciles", &self.reconciles.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cavi_operator");
        let reconciles = Counter::default();
        let failures = Family::<Reason, Counter>::default();
        let duration = Histogram::new(BUCKETS);
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciliations, by reason",
            failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconciliation",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica holds the leader lease",
            leader.clone(),
        );
        let stalled = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "rebalance_stalled",
            "1 while a cluster's layout change makes no progress (condition Degraded, reason RebalanceStalled)",
            stalled.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            stalled,
        }
    }
}

impl Metrics {
    /// Records one reconcile: its duration and, if it failed, why.
    pub fn observe(&self, elapsed: Duration, failure: Option<&str>) {
        self.reconciles.inc();
        if let Some(reason) = failure {
            self.failures
                .get_or_create(&Reason {
                    reason: reason.to_owned(),
                })
                .inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Whether `namespace/cluster`'s layout change is stalled.
    pub fn set_stalled(&self, namespace: &str, cluster: &str, stalled: bool) {
        let labels = ClusterLabels {
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
        };
        if stalled {
            self.stalled.get_or_create(&labels).set(1);
        } else if self.stalled.get(&labels).is_some() {
            self.stalled.get_or_create(&labels).set(0);
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    pub fn failures(&self, reason: &str) -> u64 {
        self.failures
            .get(&Reason {
                reason: reason.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Shared state of the admin endpoints.
#[derive(Debug, Clone, Default)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the operator has checked the API server and its CRD.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
