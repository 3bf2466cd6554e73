//! The one error type of the HTTP API. Every failure a client can see is a
//! variant here, so each gets a status, a stable snake_case code and a
//! sentence, and nothing internal leaks into a response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::peers::PeerError;

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
        "shard {me} does not own key {key:?} and will not forward it again (request forwarded by shard {by}); the nodes' configs disagree"
    )]
    Misdirected { key: String, me: u32, by: String },
    #[error("shard {shard} at {addr}: {source}")]
    Peer {
        shard: u32,
        addr: String,
        source: PeerError,
    },
    #[error("search could not reach shard(s) {}: {}; pass partial=true to accept an incomplete answer", ids(.0), reasons(.0))]
    SearchIncomplete(Vec<(u32, PeerError)>),
    #[error("request did not finish within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("node is not ready: {0}")]
    NotReady(&'static str),
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

/// The body of every error response.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidKey(_) | InvalidQuery(_) | KeyOutOfRange(_) => {
                StatusCode::BAD_REQUEST
            }
            InvalidBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge { .. } | KeyTooLarge { .. } | ValueTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            KeyNotFound(_) | RouteNotFound(_) => StatusCode::NOT_FOUND,
            Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Peer { source, .. } => source.status(),
            SearchIncomplete(failures) => failures
                .first()
                .map(|(_, e)| e.status())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            Misdirected { .. } => "misdirected",
            Peer { source, .. } => source.code(),
            SearchIncomplete(_) => "search_incomplete",
            RequestTimeout(_) => "request_timeout",
            Storage(_) => "storage_error",
            NotReady(_) => "not_ready",
            RouteNotFound(_) => "route_not_found",
            MethodNotAllowed => "method_not_allowed",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), "{self}");
        }
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        };
        (status, Json(body)).into_response()
    }
}
