//! The HTTP surface: routes, thin handlers, and the tower layers that apply
//! to every request (body limit, request deadline, tracing).

mod extract;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use tower_http::trace::TraceLayer;

use crate::config::ShardConfig;
use crate::dispatch::Node;
use crate::error::ApiError;
use crate::peers::KvOp;
use crate::search::SearchParams;
pub use extract::PutBody;
use extract::{BodyLimit, ForwardedBy, Key, Params};

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
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(BodyLimit(body_limit)))
        .layer(middleware::from_fn_with_state(
            settings.request_timeout,
            deadline,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(node)
}

async fn get_key(
    State(node): State<AppState>,
    Key(key): Key,
    ForwardedBy(by): ForwardedBy,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Get, by).await
}

async fn put_key(
    State(node): State<AppState>,
    Key(key): Key,
    ForwardedBy(by): ForwardedBy,
    body: PutBody,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Put(body.value), by).await
}

async fn delete_key(
    State(node): State<AppState>,
    Key(key): Key,
    ForwardedBy(by): ForwardedBy,
) -> Result<Response, ApiError> {
    node.execute(&key, KvOp::Delete, by).await
}

async fn empty_key() -> ApiError {
    ApiError::InvalidKey("key must not be empty".into())
}

async fn search(
    State(node): State<AppState>,
    ForwardedBy(by): ForwardedBy,
    Params(params): Params<SearchParams>,
) -> Result<Response, ApiError> {
    let found = node.search(params, by.is_some()).await?;
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

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Bounds every request, forwarded ones included, so a stuck store or peer
/// can never hold a client forever.
async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(limit).into_response(),
    }
}
