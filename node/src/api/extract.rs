//! Request extractors whose failures are `ApiError`s, so a malformed
//! request gets the same JSON error shape as everything else.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use crate::dispatch::Node;
use crate::error::ApiError;
use crate::peers::{Caller, FORWARDED_HEADER, REQUEST_ID_HEADER};

/// The key of `/kv/{*key}` (decoded once) or of `/kv?key=` — the form
/// nodes use between themselves and the one for keys like `..`.
pub struct Key(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    key: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.path().trim_end_matches('/') == "/kv" {
            let Query(q) = Query::<KeyQuery>::from_request_parts(parts, state)
                .await
                .map_err(|e| {
                    ApiError::InvalidKey(format!("{} (use /kv/{{key}})", e.body_text()))
                })?;
            return Ok(Key(q.key));
        }
        let Path(key) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidKey(e.body_text()))?;
        Ok(Key(key))
    }
}

/// Who sent the request: `x-cavi-forwarded` and `x-request-id`.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let forwarded_by = parts
            .headers
            .get(FORWARDED_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        Ok(Caller {
            forwarded_by,
            request_id: parts.headers.get(REQUEST_ID_HEADER).cloned(),
        })
    }
}

/// Query parameters with errors mapped to `invalid_query`.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(q) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
        Ok(Params(q))
    }
}

/// The body of `PUT /kv/{key}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    pub value: String,
}

impl FromRequest<Arc<Node>> for PutBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<Node>) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.settings().max_body_bytes();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge { limit }
            } else {
                ApiError::InvalidJson(e.body_text())
            }
        })?;
        let body: PutBody = serde_json::from_slice(&bytes).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::InvalidBody(e.to_string()),
                Category::Syntax | Category::Eof | Category::Io => {
                    ApiError::InvalidJson(e.to_string())
                }
            }
        })?;
        // serde also reads a struct from a list (`["x"]`); only an object
        // has the documented shape.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::InvalidBody(
                "the body is not a JSON object".into(),
            ));
        }
        Ok(body)
    }
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let yes = |s: &'static str| is_json(Some(&header::HeaderValue::from_static(s)));
        assert!(yes("application/json"));
        assert!(yes("application/json; charset=utf-8"));
        assert!(yes("Application/JSON"));
        assert!(yes("application/merge-patch+json"));
        assert!(!yes("text/plain"));
        assert!(!yes("application/x-www-form-urlencoded"));
        assert!(!is_json(None));
    }
}
