//! The operator's admin HTTP port: `/healthz`, `/readyz` and `/metrics`
//! (Prometheus text exposition, written by hand: three metric families do
//! not need a metrics framework).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Upper bounds (seconds) of the reconcile duration histogram's buckets.
const BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative-free counts per bucket; the last slot is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// Counters the reconciler updates and `/metrics` prints.
#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    duration: Mutex<Histogram>,
    leader: AtomicBool,
}

impl Metrics {
    /// Records one reconcile: its duration and, if it failed, why.
    pub fn observe(&self, elapsed: Duration, failure: Option<&str>) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = failure {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            *failures.entry(reason.to_owned()).or_default() += 1;
        }
        let secs = elapsed.as_secs_f64();
        let mut h = self.duration.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        h.counts[slot] += 1;
        h.sum += secs;
        h.count += 1;
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    pub fn failures(&self, reason: &str) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP cavi_operator_reconciles_total Reconciliations run.\n\
             # TYPE cavi_operator_reconciles_total counter\n\
             cavi_operator_reconciles_total {}",
            self.reconciles()
        );
        let _ = writeln!(
            out,
            "# HELP cavi_operator_reconcile_failures_total Failed reconciliations, by reason.\n\
             # TYPE cavi_operator_reconcile_failures_total counter"
        );
        for (reason, n) in self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "cavi_operator_reconcile_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP cavi_operator_reconcile_duration_seconds Time spent in one reconciliation.\n\
             # TYPE cavi_operator_reconcile_duration_seconds histogram"
        );
        let h = self.duration.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
            cumulative += n;
            let _ = writeln!(
                out,
                "cavi_operator_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "cavi_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}\n\
             cavi_operator_reconcile_duration_seconds_sum {}\n\
             cavi_operator_reconcile_duration_seconds_count {}",
            h.count, h.sum, h.count
        );
        let _ = writeln!(
            out,
            "# HELP cavi_operator_leader Whether this replica holds the leader lease.\n\
             # TYPE cavi_operator_leader gauge\n\
             cavi_operator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
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
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
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
