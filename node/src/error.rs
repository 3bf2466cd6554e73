//! The one error type of the HTTP API. Every failure a client can see is a
//! variant here, so each gets a status, a stable snake_case code and a
//! sentence, and nothing internal leaks into a response.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::peers::PeerError;
use crate::store::StoreError;
use crate::wire::{EPOCH_HEADER, ErrorBody, Owner};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body has the wrong shape: {0} (expected {{\"value\": \"<string>\"}})")]
    InvalidBody(String),
    #[error("request body must be JSON: send content-type: application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("key is {len} bytes, over the limit of {limit} bytes")]
    KeyTooLarge { len: usize, limit: usize },
    #[error("value is {len} bytes, over the limit of {limit} bytes")]
    ValueTooLarge { len: usize, limit: usize },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    #[error("no shard owns key {0:?}: it falls outside every shard's range")]
    KeyOutOfRange(String),
    #[error(
        "shard {me} does not own key {key:?} at map epoch {epoch} (request forwarded by shard {by}); {}",
        match owner { Some(o) => format!("shard {} at {} owns it", o.id, o.addr), None => "no shard owns it".into() }
    )]
    Misdirected {
        key: String,
        me: u32,
        by: String,
        epoch: u64,
        owner: Option<Owner>,
    },
    #[error("shard {me} does not own all of {what} at map epoch {epoch}")]
    NotOwner { me: u32, what: String, epoch: u64 },
    #[error("shard {shard} at {addr}: {source}")]
    Peer {
        shard: u32,
        addr: String,
        source: PeerError,
    },
    #[error("search could not reach shard(s) {}: {}; pass partial=true to accept an incomplete answer", ids(.0), reasons(.0))]
    SearchIncomplete(Vec<(u32, PeerError)>),
    #[error("request did not finish within {0:?}")]
    RequestTimeout(Duration),
    #[error("storage failure: {0}")]
    Storage(StoreError),
    #[error("node is not ready: {0}")]
    NotReady(String),
    #[error(
        "key {key:?} is in a range that is moving to another shard and did not become available within {waited:?}; retry"
    )]
    RangeMoving { key: String, waited: Duration },
    #[error("invalid shard map: {0}")]
    InvalidMap(String),
    #[error("{0}")]
    MapRefused(String),
    #[error("{0}")]
    MoveRefused(String),
    #[error("{0}")]
    MoveNotFound(String),
    #[error("the move lock is held by {owner} for {remaining_ms} more ms")]
    Locked { owner: String, remaining_ms: u64 },
    #[error("{0}")]
    Internal(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
}

fn ids(failures: &[(u32, PeerError)]) -> String {
    let ids: Vec<String> = failures.iter().map(|(id, _)| id.to_string()).collect();
    ids.join(", ")
}

fn reasons(failures: &[(u32, PeerError)]) -> String {
    let reasons: Vec<String> = failures
        .iter()
        .map(|(id, e)| format!("shard {id}: {e}"))
        .collect();
    reasons.join("; ")
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidKey(_) | InvalidQuery(_) | KeyOutOfRange(_) | InvalidMap(_) => {
                StatusCode::BAD_REQUEST
            }
            InvalidBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge { .. } | KeyTooLarge { .. } | ValueTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            KeyNotFound(_) | RouteNotFound(_) | MoveNotFound(_) => StatusCode::NOT_FOUND,
            Misdirected { .. } | NotOwner { .. } => StatusCode::MISDIRECTED_REQUEST,
            Peer { source, .. } => source.status(),
            SearchIncomplete(failures) => failures
                .first()
                .map(|(_, e)| e.status())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Storage(StoreError::Full(_)) => StatusCode::INSUFFICIENT_STORAGE,
            Storage(StoreError::Corrupt(_)) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Storage(_) | NotReady(_) | RangeMoving { .. } => StatusCode::SERVICE_UNAVAILABLE,
            MapRefused(_) | MoveRefused(_) | Locked { .. } => StatusCode::CONFLICT,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidBody(_) => "invalid_body",
            UnsupportedMediaType => "unsupported_media_type",
            BodyTooLarge { .. } => "body_too_large",
            KeyTooLarge { .. } => "key_too_large",
            ValueTooLarge { .. } => "value_too_large",
            InvalidKey(_) => "invalid_key",
            InvalidQuery(_) => "invalid_query",
            KeyNotFound(_) => "key_not_found",
            KeyOutOfRange(_) => "key_out_of_range",
            Misdirected { .. } | NotOwner { .. } => "misdirected",
            Peer { source, .. } => source.code(),
            SearchIncomplete(_) => "search_incomplete",
            RequestTimeout(_) => "request_timeout",
            Storage(StoreError::Overloaded(_)) => "overloaded",
            Storage(StoreError::Corrupt(_)) => "storage_error",
            Storage(_) => "storage_unavailable",
            NotReady(_) => "not_ready",
            RangeMoving { .. } => "range_moving",
            InvalidMap(_) => "invalid_map",
            MapRefused(_) => "map_refused",
            MoveRefused(_) => "move_refused",
            MoveNotFound(_) => "move_not_found",
            Locked { .. } => "locked",
            Internal(_) => "internal_error",
            RouteNotFound(_) => "route_not_found",
            MethodNotAllowed => "method_not_allowed",
        }
    }

    /// Seconds a client should wait before retrying, for the failures that
    /// pass (a restarting peer, a full queue, a moving range).
    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Peer { source, .. } => source.retry_after(),
            ApiError::Storage(StoreError::Overloaded(_) | StoreError::Unavailable(_))
            | ApiError::NotReady(_)
            | ApiError::RangeMoving { .. } => Some(1),
            ApiError::Storage(StoreError::Full(_)) => Some(10),
            _ => None,
        }
    }

    /// The map epoch a 421 names.
    fn epoch(&self) -> Option<u64> {
        match self {
            ApiError::Misdirected { epoch, .. } | ApiError::NotOwner { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
            epoch: self.epoch(),
            owner: match self {
                ApiError::Misdirected { owner, .. } => owner.clone(),
                _ => None,
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Storage(e)
    }
}

/// The code of an error answer, carried in the response's extensions so the
/// edge counts errors by code without reading the body back.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), "{self}");
        }
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(epoch) = self.epoch() {
            response
                .headers_mut()
                .insert(EPOCH_HEADER, HeaderValue::from(epoch));
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}
