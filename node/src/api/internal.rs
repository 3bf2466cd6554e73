//! `/internal/v1/...`: what peers and the resharding driver ask of a node.
//! Nothing here is part of the public API, and no public route reaches it.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::extract::{JsonBody, RawQuery};
use crate::error::ApiError;
use crate::keyspace::{KeyRange, Span};
use crate::moves::{
    Batch, CommitRequest, LockRequest, LockState, MoveSpec, MoveStatus, Outcome, source, target,
};
use crate::node::Node;
use crate::peers::PageQuery;
use crate::search::entries_json_off_workers;
use crate::shard_map::ShardMap;
use crate::store::read_off_workers;
use crate::wire::{NEXT_CURSOR_HEADER, parse_query};

type AppState = Arc<Node>;

/// Largest internal request body: a page of a move (a megabyte of keys
/// and values, plus one value past it), JSON-escaped at worst.
pub(super) const INTERNAL_BODY_LIMIT: usize = 64 << 20;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/map", get(get_map).put(put_map))
        .route("/search", get(search_page))
        .route("/count", get(count))
        .route("/moves", get(moves))
        .route("/lock", post(take_lock).delete(release_lock))
        .route("/outgoing/start", post(outgoing_start))
        .route("/outgoing/{id}", get(outgoing_status))
        .route("/outgoing/{id}/commit", post(outgoing_commit))
        .route("/outgoing/{id}/abort", post(outgoing_abort))
        .route("/incoming/prepare", post(incoming_prepare))
        .route("/incoming/{id}", get(incoming_status))
        .route("/incoming/{id}/batch", post(incoming_batch))
        .route("/incoming/{id}/commit", post(incoming_commit))
        .route("/incoming/{id}/outcome", get(incoming_outcome))
        .route("/incoming/{id}/abort", post(incoming_abort))
}

async fn get_map(State(node): State<AppState>) -> Json<ShardMap> {
    Json((*node.map_snapshot()).clone())
}

/// Takes a newer map (the driver publishing a committed change); answers
/// with the map this node holds afterwards.
async fn put_map(
    State(node): State<AppState>,
    JsonBody(map): JsonBody<ShardMap>,
) -> Result<Json<ShardMap>, ApiError> {
    node.install_map(map, false).await?;
    Ok(Json((*node.map_snapshot()).clone()))
}

/// The parameters of a peer's search page, or of a count.
#[derive(Debug, Default)]
struct RangeQuery {
    range: KeyRange,
    prefix: String,
    after: Option<String>,
    limit: usize,
    max_bytes: usize,
}

fn range_query(query: &str) -> Result<RangeQuery, ApiError> {
    let mut q = RangeQuery {
        range: KeyRange::new("", None::<String>),
        limit: 1000,
        max_bytes: 1 << 20,
        ..RangeQuery::default()
    };
    let number = |name: &str, v: &str| {
        v.parse::<usize>()
            .map_err(|_| ApiError::InvalidQuery(format!("{name} {v:?} is not a whole number")))
    };
    for (name, value) in parse_query(query).map_err(|e| ApiError::InvalidQuery(e.0))? {
        match name.as_str() {
            "range_start" => q.range.start = value,
            "range_end" => q.range.end = Some(value),
            "prefix" => q.prefix = value,
            "after" => q.after = Some(value),
            "limit" => q.limit = number("limit", &value)?.max(1),
            "max_bytes" => q.max_bytes = number("max_bytes", &value)?.max(1),
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}"
                )));
            }
        }
    }
    Ok(q)
}

/// One page of this node's keys in a range it owns; 421 when it does not
/// own all of it at its epoch.
async fn search_page(
    State(node): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q = range_query(&query)?;
    let page = node
        .local_page(&PageQuery {
            range: &q.range,
            prefix: &q.prefix,
            after: q.after.as_deref(),
            limit: q.limit.min(node.settings().search_page_keys),
            max_bytes: q.max_bytes.min(node.settings().search_page_bytes),
        })
        .await?;
    let more = page.more;
    let mut body = b"[".to_vec();
    body.extend_from_slice(&entries_json_off_workers(page.entries, true).await?);
    body.push(b']');
    let mut response = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if more {
        response
            .headers_mut()
            .insert(NEXT_CURSOR_HEADER, HeaderValue::from_static("more"));
    }
    Ok(response)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Count {
    pub keys: u64,
}

/// How many keys this node holds in a range (owned or not): the planner's
/// weights, and the check that a shard leaving holds nothing.
async fn count(
    State(node): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Count>, ApiError> {
    let q = range_query(&query)?;
    let store = node.store()?.clone();
    let span = Span::from(&q.range);
    let keys = read_off_workers(&store, move |store| store.count(&span)).await?;
    Ok(Json(Count { keys }))
}

async fn moves(State(node): State<AppState>) -> Json<Vec<MoveStatus>> {
    Json(node.moves())
}

async fn take_lock(
    State(node): State<AppState>,
    JsonBody(req): JsonBody<LockRequest>,
) -> Result<Json<LockState>, ApiError> {
    node.lock
        .acquire(&req)
        .map(Json)
        .map_err(|held| ApiError::Locked {
            owner: held.owner,
            remaining_ms: held.remaining_ms,
        })
}

async fn release_lock(
    State(node): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let owner = parse_query(&query)
        .map_err(|e| ApiError::InvalidQuery(e.0))?
        .into_iter()
        .find(|(k, _)| k == "owner")
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::InvalidQuery("name the lock's owner: ?owner=".into()))?;
    node.lock.release(&owner);
    Ok(StatusCode::NO_CONTENT)
}

async fn outgoing_start(
    State(node): State<AppState>,
    JsonBody(spec): JsonBody<MoveSpec>,
) -> Result<Json<MoveStatus>, ApiError> {
    source::start(&node, spec).await.map(Json)
}

async fn outgoing_status(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MoveStatus>, ApiError> {
    source::status(&node, &id).map(Json)
}

async fn outgoing_commit(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MoveStatus>, ApiError> {
    source::commit(&node, &id).await.map(Json)
}

async fn outgoing_abort(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MoveStatus>, ApiError> {
    source::abort_by_driver(&node, &id).await.map(Json)
}

async fn incoming_prepare(
    State(node): State<AppState>,
    JsonBody(spec): JsonBody<MoveSpec>,
) -> Result<Json<MoveStatus>, ApiError> {
    target::prepare(&node, spec).await.map(Json)
}

async fn incoming_status(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MoveStatus>, ApiError> {
    node.incoming
        .load_full()
        .filter(|i| i.spec.id == id)
        .map(|i| Json(i.status()))
        .ok_or_else(|| {
            ApiError::MoveNotFound(format!(
                "shard {} is not taking a range as move {id}",
                node.id()
            ))
        })
}

async fn incoming_batch(
    State(node): State<AppState>,
    Path(id): Path<String>,
    JsonBody(batch): JsonBody<Batch>,
) -> Result<StatusCode, ApiError> {
    target::batch(&node, &id, batch).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn incoming_commit(
    State(node): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CommitRequest>,
) -> Result<StatusCode, ApiError> {
    target::commit(&node, &id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn incoming_outcome(State(node): State<AppState>, Path(id): Path<String>) -> Json<Outcome> {
    Json(target::outcome(&node, &id))
}

async fn incoming_abort(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    target::abort(&node, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
