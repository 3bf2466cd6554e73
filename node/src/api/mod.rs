//! The HTTP surface: routes, thin handlers, and the layers that apply to
//! every request (request id, span, deadline, body limit, metrics).

mod extract;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tracing::Instrument;

use crate::config::ShardConfig;
use crate::dispatch::Node;
use crate::error::ApiError;
use crate::peers::{Caller, KvOp, REQUEST_ID_HEADER};
use crate::search::SearchParams;
pub use extract::PutBody;
use extract::{Key, Params};

/// Header on a partial search answer, naming the shards that are missing.
pub const PARTIAL_HEADER: &str = "x-cavi-partial";

type AppState = Arc<Node>;

/// The node's complete HTTP application.
pub fn router(node: Arc<Node>) -> Router {
    let settings = node.settings().clone();
    let body_limit = settings.max_body_bytes();
    Router::new()
        .route("/kv", get(get_key).put(put_key).delete(delete_key))
        .route("/kv/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/search", get(search))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(node.clone(), edge))
        .with_state(node)
}

async fn get_key(
    State(node): State<AppState>,
    Key(key): Key,
    caller: Caller,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Get, &caller).await
}

async fn put_key(
    State(node): State<AppState>,
    Key(key): Key,
    caller: Caller,
    body: PutBody,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Put(body.value), &caller).await
}

async fn delete_key(
    State(node): State<AppState>,
    Key(key): Key,
    caller: Caller,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Delete, &caller).await
}

async fn empty_key() -> ApiError {
    ApiError::InvalidKey("key must not be empty".into())
}

async fn search(
    State(node): State<AppState>,
    caller: Caller,
    Params(params): Params<SearchParams>,
) -> Result<Response, ApiError> {
    let found = node.search(params, &caller).await?;
    let mut response = Json(found.entries).into_response();
    if !found.missing.is_empty() {
        let ids: Vec<String> = found.missing.iter().map(u32::to_string).collect();
        if let Ok(v) = HeaderValue::from_str(&ids.join(",")) {
            response.headers_mut().insert(PARTIAL_HEADER, v);
        }
    }
    Ok(response)
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

async fn readyz(State(node): State<AppState>) -> Result<Json<Status>, ApiError> {
    node.store()?;
    if node.is_ready() {
        Ok(Json(Status { status: "ready" }))
    } else {
        Err(ApiError::NotReady("shutting down"))
    }
}

/// What `/cluster` reports: the shard map as this node sees it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// The shard this node serves.
    pub shard_id: u32,
    /// Keys held by this node.
    pub keys: usize,
    pub shards: Vec<ShardConfig>,
}

async fn cluster(State(node): State<AppState>) -> Result<Json<ClusterView>, ApiError> {
    Ok(Json(ClusterView {
        shard_id: node.shard().id,
        keys: node.store()?.len(),
        shards: node.config().shards.clone(),
    }))
}

async fn metrics(State(node): State<AppState>) -> Response {
    let (keys, bytes) = node
        .store()
        .map(|s| (s.len(), s.bytes()))
        .unwrap_or_default();
    let text = node.metrics().render(keys, bytes);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// What every request goes through first, in one layer because each layer
/// costs a boxed future on the hot path (a separate metrics layer cost 11%
/// of GET throughput):
/// - keeps the caller's `x-request-id` (or makes one) so the logs of every
///   node a request touches share it, and the answer carries it back;
/// - runs the request inside a span naming that id;
/// - bounds it by the request timeout, so a stuck store or peer can never
///   hold a client forever;
/// - counts and times it by method, route and status.
async fn edge(State(node): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = route_label(req.uri().path());
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_request_id);
    req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %String::from_utf8_lossy(id.as_bytes()),
    );
    let limit = node.settings().request_timeout;
    let mut response =
        match tokio::time::timeout(limit, next.run(req).instrument(span.clone())).await {
            Ok(response) => response,
            Err(_) => span.in_scope(|| ApiError::RequestTimeout(limit).into_response()),
        };
    let status = response.status().as_u16();
    node.metrics()
        .record_request(method, route, status, started.elapsed());
    tracing::debug!(parent: &span, status, "answered");
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

/// 16 hex digits, unique per process and unpredictable across processes.
fn new_request_id() -> HeaderValue {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(SEQUENCE.fetch_add(1, Ordering::Relaxed));
    let mut n = hasher.finish();
    let mut hex = [b'0'; 16];
    for digit in hex.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// The route template a path is served by, as the router matches it
/// (`other` for the fallback), without needing the router's match.
fn route_label(path: &str) -> &'static str {
    match path {
        "/kv" => "/kv",
        "/kv/" => "/kv/",
        p if p.starts_with("/kv/") => "/kv/{*key}",
        "/search" => "/search",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/cluster" => "/cluster",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn route_labels_follow_the_routes() {
        assert_eq!(route_label("/kv/a/b%2Fc"), "/kv/{*key}");
        assert_eq!(route_label("/kv"), "/kv");
        assert_eq!(route_label("/kv/"), "/kv/");
        assert_eq!(route_label("/kvx"), "other");
        assert_eq!(route_label("/search"), "/search");
        assert_eq!(route_label("/nope"), "other");
    }
}
