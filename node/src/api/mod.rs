//! The HTTP surface: routes, thin handlers, and the layer every request
//! goes through (request id, span, deadline, metrics).
//!
//! Public routes serve clients; `/internal/v1/...` serves peers and the
//! resharding driver (maps, search pages, moves, the move lock) and is
//! never reached by the public routes' own handling.

mod extract;
mod internal;
pub mod openapi;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::Request;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Incoming;
use serde::Serialize;
use tower::Service;
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode};
use crate::node::Node;
use crate::peers::{Caller, KvOp};
use crate::search::{SearchParams, entries_json_off_workers};
use crate::wire::{ClusterView, ErrorBody, NEXT_CURSOR_HEADER, PARTIAL_HEADER, REQUEST_ID_HEADER};
use extract::{Key, RawQuery, caller_of};
pub use extract::{PutBody, PutValue};

type AppState = Arc<Node>;

/// The node's complete HTTP application: the routes behind the edge
/// (request id, span, deadline, metrics). Cheap to clone.
#[derive(Clone)]
pub struct App {
    node: Arc<Node>,
    routes: Router,
}

impl App {
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            routes: router(node.clone()),
            node,
        }
    }

    /// Answers one request: what every request goes through first, called
    /// straight from the connection (a middleware layer would box a future
    /// and clone the router's service on every request):
    /// - keeps the caller's `x-request-id` (or makes one) so the logs of
    ///   every node a request touches share it, and the answer carries it
    ///   back;
    /// - runs the request inside a span naming that id;
    /// - bounds it by the request timeout, so a stuck store or peer can
    ///   never hold a client forever;
    /// - counts and times it by method, route and status, and counts the
    ///   errors it produced by their code.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response {
        let node = &self.node;
        let started = Instant::now();
        let method = method_label(req.method());
        let route = route_label(req.uri().path());
        let id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .cloned()
            .unwrap_or_else(new_request_id);
        let key_request = is_key_request(&req);
        if !key_request {
            // The routes' extractors read it from there; a key request is
            // handed it.
            req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
        }
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            request_id = %String::from_utf8_lossy(id.as_bytes()),
        );
        let limit = node.settings().request_timeout;
        let answered = async {
            if key_request {
                return self.key_request(req, id.clone()).await;
            }
            match self.routes.clone().call(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        };
        let mut response =
            match tokio::time::timeout(limit, answered.instrument(span.clone())).await {
                Ok(response) => response,
                Err(_) => span.in_scope(|| ApiError::RequestTimeout(limit).into_response()),
            };
        let status = response.status().as_u16();
        node.metrics()
            .record_request(method, route, status, started.elapsed());
        if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
            node.metrics().record_error(route, code);
        }
        tracing::debug!(parent: &span, status, "answered");
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
        if response.status() == StatusCode::SERVICE_UNAVAILABLE
            && !response.headers().contains_key(header::RETRY_AFTER)
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        }
        response
    }
}

impl App {
    /// `GET`, `PUT` or `DELETE` of one key, answered without the router:
    /// they are nearly every request, and routing them (matching, path
    /// parameters, extensions, boxed services) cost more than the rest of
    /// a GET. The same extractors and the same handlers as the routes
    /// `/kv/{key}` and `/kv`, which still serve anything else (`HEAD`, a
    /// refused method).
    async fn key_request(&self, req: Request<Incoming>, id: HeaderValue) -> Response {
        let (mut parts, body) = req.into_parts();
        let node = &self.node;
        let key = match Key::from_request_parts(&mut parts, node).await {
            Ok(key) => key,
            Err(e) => return e.into_response(),
        };
        let caller = Caller {
            request_id: Some(id),
            ..caller_of(&parts.headers)
        };
        let state = State(node.clone());
        let answer = match parts.method {
            Method::GET => get_key(state, key, caller).await,
            Method::DELETE => delete_key(state, key, caller).await,
            _ => {
                let req = Request::from_parts(parts, Body::new(body));
                match PutBody::from_request(req, node).await {
                    Ok(body) => put_key(state, key, caller, body).await,
                    Err(e) => Err(e),
                }
            }
        };
        answer.into_response()
    }
}

/// Whether [`App::key_request`] answers `req`: a key method on `/kv/<key>`
/// or `/kv`.
fn is_key_request<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    matches!(*req.method(), Method::GET | Method::PUT | Method::DELETE)
        && (path == "/kv" || path.strip_prefix("/kv/").is_some_and(|k| !k.is_empty()))
}

/// The routes, without the edge [`App::handle`] puts in front of them.
fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/kv", get(get_key).put(put_key).delete(delete_key))
        .route("/kv/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/search", get(search))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .nest("/internal/v1", internal::routes())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(node)
}

/// The value of a key.
#[utoipa::path(
    get,
    path = "/kv/{key}",
    operation_id = "get_key",
    tag = "keys",
    params(("key" = KeyName, Path, description = "The key")),
    responses(
        (status = 200, description = "The value, as a JSON string", body = String, content_type = "application/json"),
        (status = 404, description = "`key_not_found`", body = ErrorBody),
        (status = 400, description = "`invalid_key` (empty, or not UTF-8 after decoding), `key_out_of_range` (no shard owns it)", body = ErrorBody),
        (status = 413, description = "`key_too_large`, `value_too_large` or `body_too_large`", body = ErrorBody),
        (status = 421, description = "`misdirected`: a forwarded request reached a node whose map gives the key elsewhere; `epoch` and `owner` say by which map", body = ErrorBody, headers(("x-cavi-epoch" = u64, description = "The answering node's map epoch"))),
        (status = 500, description = "`internal_error` or `storage_error`", body = ErrorBody),
        (status = 502, description = "`peer_bad_response`, or an error answer of the owner (`peer_refused`)", body = ErrorBody),
        (status = 503, description = "`peer_unavailable` (the owner is restarting), `peer_unreachable`, `range_moving` (a range move holds the key), `overloaded` (the write queue is full), `storage_unavailable`, `not_ready`", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "`peer_timeout` or `request_timeout`", body = ErrorBody),
        (status = 507, description = "`storage_unavailable`: the owner's disk is full", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
async fn get_key(
    State(node): State<AppState>,
    Key(key): Key,
    caller: Caller,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Get, &caller).await
}

/// Stores a value under a key; acknowledged once durable on its owner
/// (with a data directory) or stored in its memory.
#[utoipa::path(
    put,
    path = "/kv/{key}",
    operation_id = "put_key",
    tag = "keys",
    params(("key" = KeyName, Path, description = "The key")),
    request_body(content = PutValue, content_type = "application/json"),
    responses(
        (status = 204, description = "Stored"),
        (status = 415, description = "`unsupported_media_type`: the body is not `application/json`", body = ErrorBody),
        (status = 422, description = "`invalid_body`: JSON, but not `{\"value\": string}`", body = ErrorBody),
        (status = 400, description = "`invalid_key` (empty, or not UTF-8 after decoding), `key_out_of_range` (no shard owns it)", body = ErrorBody),
        (status = 413, description = "`key_too_large`, `value_too_large` or `body_too_large`", body = ErrorBody),
        (status = 421, description = "`misdirected`: a forwarded request reached a node whose map gives the key elsewhere; `epoch` and `owner` say by which map", body = ErrorBody, headers(("x-cavi-epoch" = u64, description = "The answering node's map epoch"))),
        (status = 500, description = "`internal_error` or `storage_error`", body = ErrorBody),
        (status = 502, description = "`peer_bad_response`, or an error answer of the owner (`peer_refused`)", body = ErrorBody),
        (status = 503, description = "`peer_unavailable` (the owner is restarting), `peer_unreachable`, `range_moving` (a range move holds the key), `overloaded` (the write queue is full), `storage_unavailable`, `not_ready`", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "`peer_timeout` or `request_timeout`", body = ErrorBody),
        (status = 507, description = "`storage_unavailable`: the owner's disk is full", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
async fn put_key(
    State(node): State<AppState>,
    Key(key): Key,
    caller: Caller,
    body: PutBody,
) -> Result<Response, ApiError> {
    let op = KvOp::Put {
        value: body.value,
        body: body.raw,
    };
    node.execute(&key, op, &caller).await
}

/// Deletes a key; deleting a missing key succeeds.
#[utoipa::path(
    delete,
    path = "/kv/{key}",
    operation_id = "delete_key",
    tag = "keys",
    params(("key" = KeyName, Path, description = "The key")),
    responses(
        (status = 204, description = "Deleted (or was not there)"),
        (status = 400, description = "`invalid_key` (empty, or not UTF-8 after decoding), `key_out_of_range` (no shard owns it)", body = ErrorBody),
        (status = 413, description = "`key_too_large`, `value_too_large` or `body_too_large`", body = ErrorBody),
        (status = 421, description = "`misdirected`: a forwarded request reached a node whose map gives the key elsewhere; `epoch` and `owner` say by which map", body = ErrorBody, headers(("x-cavi-epoch" = u64, description = "The answering node's map epoch"))),
        (status = 500, description = "`internal_error` or `storage_error`", body = ErrorBody),
        (status = 502, description = "`peer_bad_response`, or an error answer of the owner (`peer_refused`)", body = ErrorBody),
        (status = 503, description = "`peer_unavailable` (the owner is restarting), `peer_unreachable`, `range_moving` (a range move holds the key), `overloaded` (the write queue is full), `storage_unavailable`, `not_ready`", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "`peer_timeout` or `request_timeout`", body = ErrorBody),
        (status = 507, description = "`storage_unavailable`: the owner's disk is full", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
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

/// `GET /search`: see [`crate::search`]. The `x-cavi-forwarded` header
/// means nothing here: peers ask `/internal/v1/search`.
#[utoipa::path(
    get,
    path = "/search",
    operation_id = "search",
    tag = "search",
    description = "Every key starting with `prefix`, with its value, in key order, from every shard that can hold the prefix. Without `limit` the whole answer, streamed when large (a failure after the first bytes breaks the transfer: an answer that ends is complete). With `limit`, at most that many entries (and about 1 MiB); an answer that stopped early names where to continue in `x-cavi-next-cursor`.",
    params(
        ("prefix" = Option<String>, Query, description = "Keys starting with this; empty or omitted: every key"),
        ("limit" = Option<i64>, Query, minimum = 0, description = "At most this many entries"),
        ("cursor" = Option<String>, Query, pattern = "^(k1([0-9a-f]{2})*)?$", description = "Continue after the answer that named this cursor. Opaque: only cursors this cluster wrote are accepted (`invalid_query` otherwise); empty means the first page"),
        ("partial" = Option<bool>, Query, description = "Leave out shards that fail (named in `x-cavi-partial`) instead of failing"),
        ("scope" = Option<crate::search::Scope>, Query, description = "`cluster` (default): every shard; `local`: this node's own keys only")
    ),
    responses(
        (status = 200, description = "The entries, sorted by key", body = Vec<crate::store::Entry>, headers(
            ("x-cavi-next-cursor" = String, description = "Present when the answer stopped at `limit` or its size budget and more may follow (the next page can be empty): pass it as `cursor`"),
            ("x-cavi-partial" = String, description = "With `partial=true`: the ids of the shards left out, comma-separated")
        )),
        (status = 400, description = "`invalid_query`: an unknown parameter, a value that does not parse, a cursor this cluster did not write", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 502, description = "`search_incomplete` or a shard's bad answer", body = ErrorBody),
        (status = 503, description = "A shard is unavailable (`search_incomplete`), or this node's storage (`storage_unavailable`)", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "A shard did not answer in time, or `request_timeout`", body = ErrorBody)
    )
)]
async fn search(
    State(node): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = SearchParams::from_query(&query)?;
    let caller = Caller {
        forwarded_by: None,
        ..caller
    };
    let found = node.search(params, &caller).await?;
    let mut response = match found.rest {
        None => {
            let mut body = b"[".to_vec();
            body.extend_from_slice(&entries_json_off_workers(found.entries, true).await?);
            body.push(b']');
            Response::new(Body::from(body))
        }
        Some(mut rest) => {
            let head = entries_json_off_workers(found.entries, true).await?;
            let stream = async_stream(move |tx| async move {
                if tx.send(Ok(b"[".to_vec().into())).await.is_err()
                    || tx.send(Ok(head)).await.is_err()
                {
                    return;
                }
                while let Some(chunk) = rest.next_chunk().await {
                    let sent = match chunk {
                        Ok(entries) => match entries_json_off_workers(entries, false).await {
                            Ok(json) => tx.send(Ok(json)).await,
                            Err(e) => {
                                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                                return;
                            }
                        },
                        Err(e) => {
                            // Headers are gone: the only honest thing left
                            // is to break the transfer.
                            tracing::warn!(error = %e, "search failed after the answer started; aborting it");
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            return;
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(b"]".to_vec().into())).await;
            });
            Response::new(Body::from_stream(stream))
        }
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !found.missing.is_empty() {
        let ids: Vec<String> = found.missing.iter().map(u32::to_string).collect();
        if let Ok(v) = HeaderValue::from_str(&ids.join(",")) {
            response.headers_mut().insert(PARTIAL_HEADER, v);
        }
    }
    if let Some(cursor) = found.next_cursor
        && let Ok(v) = HeaderValue::from_str(&cursor)
    {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, v);
    }
    Ok(response)
}

type Chunk = Result<axum::body::Bytes, std::io::Error>;

/// A body stream fed by a task: one chunk in flight, so a slow reader
/// holds the producer (and its memory) back.
fn async_stream<F, Fut>(produce: F) -> impl futures::Stream<Item = Chunk>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Chunk>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk, rx))
    })
}

/// The schema of a key in a URL, for the API document.
pub struct KeyName;

impl utoipa::PartialSchema for KeyName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(1024))
            .description(Some(
                "A key: UTF-8, percent-encoded (decoded exactly once; `+` stays `+`), not \
                 empty, at most the node's key limit in bytes (1024 by default).",
            ))
            .into()
    }
}

impl utoipa::ToSchema for KeyName {}

/// The answer of `/healthz` and `/readyz`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok` (alive) or `ready`.
    status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Status))
)]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Readiness: storage open, the map known, not shutting down, writes
/// working.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "`not_ready`, with the reason", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before asking again")))
    )
)]
async fn readyz(State(node): State<AppState>) -> Result<Json<Status>, ApiError> {
    match node.unready_reason() {
        None => Ok(Json(Status { status: "ready" })),
        Some(why) => Err(ApiError::NotReady(why)),
    }
}

/// This node, the live shard map as it sees it, and the moves it takes
/// part in.
#[utoipa::path(
    get,
    path = "/cluster",
    operation_id = "cluster",
    tag = "operations",
    responses(
        (status = 200, description = "This node and its map", body = ClusterView),
        (status = 503, description = "`storage_unavailable` or `not_ready`: storage is not open yet", body = ErrorBody, headers(("Retry-After" = u32, description = "Seconds to wait before retrying")))
    )
)]
async fn cluster(State(node): State<AppState>) -> Result<Json<ClusterView>, ApiError> {
    let store = node.serving_store()?;
    let map = node.map_snapshot();
    Ok(Json(ClusterView {
        shard_id: node.id(),
        assigned: map.is_owner(node.id()),
        epoch: map.epoch,
        keys: store.len(),
        bytes: store.bytes(),
        // Only a store that persists (the disk store) keeps node state.
        durable: store.state().is_some(),
        shards: map.shards.clone(),
        moves: node.moves(),
    }))
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"))
)]
async fn metrics(State(node): State<AppState>) -> Response {
    let (keys, bytes, faulted) = node
        .store()
        .map(|s| (s.len(), s.bytes(), s.fault().is_some()))
        .unwrap_or_default();
    let text = node
        .metrics()
        .render(keys, bytes, faulted, node.map().epoch, &node.moves());
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

/// 16 hex digits, unique per process and unpredictable across processes:
/// a sequence number mixed (splitmix64) with a per-process random key.
fn new_request_id() -> HeaderValue {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let key = *KEY.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id().into());
        hasher.finish()
    });
    let mut n = SEQUENCE
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(key)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    n = (n ^ (n >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    n = (n ^ (n >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    n ^= n >> 31;
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
        "/openapi.json" => "/openapi.json",
        "/internal/v1/search" => "/internal/v1/search",
        p if p.starts_with("/internal/v1/") => "/internal/v1",
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
        assert_eq!(route_label("/internal/v1/moves"), "/internal/v1");
        assert_eq!(route_label("/nope"), "other");
    }
}
