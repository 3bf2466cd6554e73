//! Prometheus metrics of a node, exposed on `/metrics`.
//!
//! Labels are `&'static str` and integers so recording a request allocates
//! nothing; the route label is the matched route template, never the key.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::store::CommitObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: u32,
    kind: &'static str,
    outcome: &'static str,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    role: &'static str,
    phase: &'static str,
}

/// The methods and routes the request metrics are labelled with (what the
/// API layer passes), and the statuses whose series handles are kept.
const METHODS: [&str; 6] = ["GET", "PUT", "DELETE", "POST", "HEAD", "other"];
const ROUTES: [&str; 13] = [
    "/kv",
    "/kv/",
    "/kv/{*key}",
    "/search",
    "/healthz",
    "/readyz",
    "/cluster",
    "/metrics",
    "/openapi.json",
    "/internal/v1/search",
    "/internal/v1",
    "other",
    "",
];
const STATUSES: [u16; 18] = [
    200, 204, 400, 404, 405, 409, 413, 415, 421, 422, 500, 502, 503, 504, 507, 408, 429, 0,
];

/// Handles of the request series, resolved on first use: recording a
/// request is then two array lookups and two atomic updates, instead of
/// hashing a label set into each family.
struct RequestHandles {
    counts: Vec<OnceLock<Counter>>,
    latency: Vec<OnceLock<Histogram>>,
}

impl RequestHandles {
    fn new() -> Self {
        Self {
            counts: (0..METHODS.len() * ROUTES.len() * STATUSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            latency: (0..METHODS.len() * ROUTES.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
    handles: RequestHandles,
    errors: Family<ErrorLabels, Counter>,
    forwarded: Family<PeerLabels, Counter>,
    fan_out: Histogram,
    keys: Gauge,
    bytes: Gauge,
    fault: Gauge,
    epoch: Gauge,
    moves: Family<OutcomeLabels, Counter>,
    moved_keys: Counter,
    moved_bytes: Counter,
    fence: Histogram,
    move_duration: Histogram,
    phase: Family<PhaseLabels, Gauge>,
    commits: CommitMetrics,
}

/// The durable engine's group commits: handles the engine's writer thread
/// records into (through [`CommitObserver`]) without the registry.
#[derive(Clone)]
struct CommitMetrics {
    commits: Counter,
    writes: Counter,
    duration: Histogram,
}

impl CommitObserver for CommitMetrics {
    fn committed(&self, writes: usize, took: Duration) {
        self.commits.inc();
        self.writes.inc_by(writes as u64);
        self.duration.observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cavi");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = LatencyFamily::new_with_constructor(latency_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let forwarded = Family::<PeerLabels, Counter>::default();
        let fan_out = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]);
        let keys = Gauge::default();
        let bytes = Gauge::default();
        let epoch = Gauge::default();
        let fault = Gauge::default();
        registry.register(
            "storage_fault",
            "1 while the storage refuses writes (a full disk, an I/O error; the node retries and /readyz says why)",
            fault.clone(),
        );
        let moves = Family::<OutcomeLabels, Counter>::default();
        let moved_keys = Counter::default();
        let moved_bytes = Counter::default();
        let fence = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        // 0.1 s to about 55 minutes.
        let move_duration = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        let phase = Family::<PhaseLabels, Gauge>::default();
        let commits = CommitMetrics {
            commits: Counter::default(),
            writes: Counter::default(),
            // 50 µs to about 1.6 s.
            duration: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
        };
        registry.register(
            "storage_commits",
            "Group commits of the durable engine, each one synced journal write (0 in memory)",
            commits.commits.clone(),
        );
        registry.register(
            "storage_committed_writes",
            "Key writes (puts and deletes) those commits carried: divided by the commits, the writes that shared a sync",
            commits.writes.clone(),
        );
        registry.register_with_unit(
            "storage_commit_duration",
            "Time of one group commit in the engine: the journal write, its sync and the memtable insert",
            Unit::Seconds,
            commits.duration.clone(),
        );
        registry.register(
            "shard_map_epoch",
            "Epoch of the live shard map this node routes by",
            epoch.clone(),
        );
        registry.register(
            "moves",
            "Range moves this node took part in as the source, by outcome (started, committed, aborted)",
            moves.clone(),
        );
        registry.register(
            "move_keys",
            "Keys this node copied to another shard in range moves",
            moved_keys.clone(),
        );
        registry.register_with_unit(
            "move",
            "Key and value bytes this node copied to another shard in range moves",
            Unit::Bytes,
            moved_bytes.clone(),
        );
        registry.register_with_unit(
            "move_fence_duration",
            "How long a range move held requests for its range (fence to commit)",
            Unit::Seconds,
            fence.clone(),
        );
        registry.register_with_unit(
            "move_duration",
            "How long range moves this node was the source of took, from start (or resume after a restart) to commit or abort",
            Unit::Seconds,
            move_duration.clone(),
        );
        registry.register(
            "move_phase",
            "Moves in progress on this node, by role (source, target) and phase",
            phase.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests served, by method, route and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request, by method and route",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "http_errors",
            "Error answers this node produced, by route and error code (the `code` of the JSON body); an owner's error relayed by a forwarding node is counted by the owner",
            errors.clone(),
        );
        registry.register(
            "peer_requests",
            "Requests sent to other shards, by peer shard, kind (kv or search) and outcome (status code or error code)",
            forwarded.clone(),
        );
        registry.register(
            "search_fan_out_shards",
            "Shards asked by one cluster-wide search",
            fan_out.clone(),
        );
        registry.register("stored_keys", "Keys held by this shard", keys.clone());
        registry.register_with_unit(
            "stored",
            "Key and value bytes held by this shard",
            Unit::Bytes,
            bytes.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            handles: RequestHandles::new(),
            errors,
            forwarded,
            fan_out,
            keys,
            bytes,
            fault,
            epoch,
            moves,
            moved_keys,
            moved_bytes,
            fence,
            move_duration,
            phase,
            commits,
        }
    }

    /// What the durable engine tells of its commits.
    pub fn commit_observer(&self) -> Arc<dyn CommitObserver> {
        Arc::new(self.commits.clone())
    }

    pub fn move_started(&self) {
        self.moves
            .get_or_create(&OutcomeLabels { outcome: "started" })
            .inc();
    }

    /// A move this node was the source of ended with `outcome` after
    /// `took`.
    pub fn move_ended(&self, outcome: &'static str, took: Duration) {
        self.moves.get_or_create(&OutcomeLabels { outcome }).inc();
        self.move_duration.observe(took.as_secs_f64());
    }

    pub fn moved(&self, keys: u64, bytes: u64) {
        self.moved_keys.inc_by(keys);
        self.moved_bytes.inc_by(bytes);
    }

    pub fn fence(&self, took: Duration) {
        self.fence.observe(took.as_secs_f64());
    }

    pub fn record_request(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        took: Duration,
    ) {
        let m = METHODS.iter().position(|x| *x == method);
        let r = ROUTES.iter().position(|x| *x == route);
        let s = STATUSES.iter().position(|x| *x == status);
        let (Some(m), Some(r)) = (m, r) else {
            // A label outside the tables: the family, hashed.
            self.requests
                .get_or_create(&RequestLabels {
                    method,
                    route,
                    status,
                })
                .inc();
            self.latency
                .get_or_create(&RouteLabels { method, route })
                .observe(took.as_secs_f64());
            return;
        };
        let labels = RequestLabels {
            method,
            route,
            status,
        };
        match s {
            Some(s) => {
                self.handles.counts[(m * ROUTES.len() + r) * STATUSES.len() + s]
                    .get_or_init(|| self.requests.get_or_create(&labels).clone())
                    .inc();
            }
            None => {
                self.requests.get_or_create(&labels).inc();
            }
        }
        self.handles.latency[m * ROUTES.len() + r]
            .get_or_init(|| {
                self.latency
                    .get_or_create(&RouteLabels { method, route })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }

    /// An error answer, by the code its JSON body carries: a 503 alone does
    /// not tell a full write queue from a dead owner or a reopening engine,
    /// nor a 404 a missing key from an unknown route.
    pub fn record_error(&self, route: &'static str, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { route, code })
            .inc();
    }

    pub fn record_peer(&self, peer: u32, kind: &'static str, outcome: &'static str) {
        self.forwarded
            .get_or_create(&PeerLabels {
                peer,
                kind,
                outcome,
            })
            .inc();
    }

    pub fn record_fan_out(&self, shards: usize) {
        self.fan_out.observe(shards as f64);
    }

    /// The exposition text, with the gauges read at scrape time.
    pub fn render(
        &self,
        keys: u64,
        bytes: u64,
        faulted: bool,
        epoch: u64,
        moves: &[crate::moves::MoveStatus],
    ) -> String {
        self.fault.set(i64::from(faulted));
        self.keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.phase.clear();
        for m in moves.iter().filter(|m| !m.phase.is_final()) {
            let role = match m.role {
                crate::moves::Role::Source => "source",
                crate::moves::Role::Target => "target",
            };
            self.phase
                .get_or_create(&PhaseLabels {
                    role,
                    phase: m.phase.as_str(),
                })
                .inc();
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// A status code as a `'static` label value.
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        204 => "204",
        400 => "400",
        404 => "404",
        413 => "413",
        415 => "415",
        421 => "421",
        422 => "422",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.record_request("GET", "/kv/{*key}", 200, Duration::from_millis(3));
        m.record_peer(1, "kv", "peer_timeout");
        m.record_error("/kv/{*key}", "overloaded");
        m.record_fan_out(2);
        m.moved(3, 300);
        let commits = m.commit_observer();
        commits.committed(28, Duration::from_micros(300));
        commits.committed(4, Duration::from_micros(90));
        let text = m.render(7, 1234, true, 5, &[]);
        for needle in [
            "cavi_http_requests_total{method=\"GET\",route=\"/kv/{*key}\",status=\"200\"} 1",
            "cavi_http_request_duration_seconds_bucket{le=\"0.0016\",method=\"GET\",route=\"/kv/{*key}\"} 0",
            "cavi_http_request_duration_seconds_bucket{le=\"0.0032\",method=\"GET\",route=\"/kv/{*key}\"} 1",
            "cavi_peer_requests_total{peer=\"1\",kind=\"kv\",outcome=\"peer_timeout\"} 1",
            "cavi_http_errors_total{route=\"/kv/{*key}\",code=\"overloaded\"} 1",
            "cavi_search_fan_out_shards_count 1",
            "cavi_stored_keys 7",
            "cavi_stored_bytes 1234",
            "cavi_shard_map_epoch 5",
            "cavi_storage_fault 1",
            "cavi_move_keys_total 3",
            "cavi_move_bytes_total 300",
            "cavi_storage_commits_total 2",
            "cavi_storage_committed_writes_total 32",
            "cavi_storage_commit_duration_seconds_bucket{le=\"0.0001\"} 1",
            "cavi_storage_commit_duration_seconds_bucket{le=\"0.0004\"} 2",
            "cavi_storage_commit_duration_seconds_count 2",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
