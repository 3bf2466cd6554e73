//! Request extractors whose failures are `ApiError`s, so a malformed
//! request gets the same JSON error shape as everything else.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::internal::INTERNAL_BODY_LIMIT;
use crate::error::ApiError;
use crate::node::Node;
use crate::peers::Caller;
use crate::wire::{
    DecodeError, EPOCH_HEADER, FORWARDED_HEADER, REQUEST_ID_HEADER, decode_component, parse_query,
};

/// The key of `/kv/{key}` or of `/kv?key=` (the form nodes use between
/// themselves, and the one for keys like `..`), percent-decoded exactly
/// once with the same rules in both forms.
pub struct Key(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let invalid = |DecodeError(e)| ApiError::InvalidKey(e);
        if let Some(raw) = parts.uri.path().strip_prefix("/kv/") {
            return decode_component(raw).map(Key).map_err(invalid);
        }
        let query = parts.uri.query().unwrap_or_default();
        let mut key = None;
        for (name, value) in parse_query(query).map_err(invalid)? {
            match name.as_str() {
                "key" if key.is_none() => key = Some(value),
                "key" => {
                    return Err(ApiError::InvalidKey(
                        "the query names more than one key".into(),
                    ));
                }
                other => {
                    return Err(ApiError::InvalidKey(format!(
                        "unknown query parameter {other:?}: name the key as /kv/{{key}} or /kv?key="
                    )));
                }
            }
        }
        key.map(Key)
            .ok_or_else(|| ApiError::InvalidKey("no key: name it as /kv/{key} or /kv?key=".into()))
    }
}

/// Who sent the request: `x-cavi-forwarded`, `x-cavi-epoch`, `x-request-id`.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(caller_of(&parts.headers))
    }
}

/// The [`Caller`] a request's headers name, the first of each header
/// counting. One pass over a request's few headers costs less than hashing
/// each of the three names for a lookup, on every request.
pub fn caller_of(headers: &HeaderMap) -> Caller {
    let mut caller = Caller {
        forwarded_by: None,
        epoch: None,
        request_id: None,
    };
    let (mut forwarded, mut epoch) = (false, false);
    for (name, value) in headers {
        if *name == FORWARDED_HEADER && !forwarded {
            forwarded = true;
            caller.forwarded_by = Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
        } else if *name == EPOCH_HEADER && !epoch {
            epoch = true;
            caller.epoch = value.to_str().ok().and_then(|v| v.parse().ok());
        } else if *name == REQUEST_ID_HEADER && caller.request_id.is_none() {
            caller.request_id = Some(value.clone());
        }
    }
    caller
}

/// The raw query string, for handlers that parse it with the strict rules.
pub struct RawQuery(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RawQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RawQuery(parts.uri.query().unwrap_or_default().to_owned()))
    }
}

/// The body of `PUT /kv/{key}`: the value, and the body as it came, which
/// a forwarding node passes on without encoding it again.
#[derive(Debug)]
pub struct PutBody {
    pub value: String,
    pub raw: Bytes,
}

/// The JSON body of a PUT.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutValue {
    /// The value to store (UTF-8).
    pub value: String,
}

impl FromRequest<Arc<Node>> for PutBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<Node>) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.settings().max_body_bytes();
        let raw = read_body(req, limit).await?;
        let shape: PutValue = parse_json(&raw)?;
        Ok(PutBody {
            value: shape.value,
            raw,
        })
    }
}

/// A JSON body of the internal API.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Node>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &Arc<Node>) -> Result<Self, ApiError> {
        let raw = read_body(req, INTERNAL_BODY_LIMIT).await?;
        Ok(JsonBody(parse_json(&raw)?))
    }
}

/// The whole body, refused as soon as it passes `limit` bytes. The limit is
/// applied here rather than by a router layer so that the key fast path,
/// which bypasses the router, enforces the same bound.
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "failed to read the request body: {e}"
        ))),
    }
}

/// A JSON object of the expected shape: syntax errors are `invalid_json`,
/// shape errors (and a list where an object belongs) `invalid_body`.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: T = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::InvalidBody(e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(e.to_string()),
        }
    })?;
    // serde also reads a struct from a list (`["x"]`); only an object has
    // the documented shape.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::InvalidBody(
            "the body is not a JSON object".into(),
        ));
    }
    Ok(value)
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
    #![allow(clippy::unwrap_used)]

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

    async fn key(uri: &str) -> Result<String, ApiError> {
        let (mut parts, ()) = axum::http::Request::get(uri).body(()).unwrap().into_parts();
        Key::from_request_parts(&mut parts, &()).await.map(|k| k.0)
    }

    #[tokio::test]
    async fn path_and_query_decode_alike() {
        for (path, query, want) in [
            ("/kv/a+b", "/kv?key=a+b", "a+b"),
            ("/kv/a%2Bb", "/kv?key=a%2Bb", "a+b"),
            ("/kv/p%3Fq", "/kv?key=p%3Fq", "p?q"),
            ("/kv/q%2520x", "/kv?key=q%2520x", "q%20x"),
            ("/kv/a%2Fb", "/kv?key=a%2Fb", "a/b"),
            ("/kv/%C3%A9", "/kv?key=%C3%A9", "é"),
        ] {
            assert_eq!(key(path).await.unwrap(), want, "{path}");
            assert_eq!(key(query).await.unwrap(), want, "{query}");
        }
        for bad in ["/kv/%FE", "/kv/%FF", "/kv?key=%FE", "/kv?key=%C3"] {
            let e = key(bad).await.unwrap_err();
            assert_eq!(e.code(), "invalid_key", "{bad}");
        }
        assert!(key("/kv?k=1").await.is_err());
        assert!(key("/kv?key=a&key=b").await.is_err());
    }
}
