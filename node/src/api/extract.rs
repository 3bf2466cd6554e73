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
    DecodeError, EPOCH_HEADER, FORWARDED_HEADER, REQUEST_ID_HEADER, decode_component, is_plain,
    parse_query,
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
        let value = match plain_put_value(&raw) {
            Some(value) => value,
            None => parse_json::<PutValue>(&raw)?.value,
        };
        Ok(PutBody { value, raw })
    }
}

/// The value of the body clients send, `{"value":"..."}` with nothing to
/// unescape, read without serde_json (callgrind: about 800 instructions a
/// PUT, most of them the value's allocation and UTF-8 check, against about
/// 1,200 for serde_json). Any other body (and any error) goes through
/// `parse_json`, which gives the same value for every body this accepts.
fn plain_put_value(raw: &[u8]) -> Option<String> {
    let rest = json_trim_start(raw).strip_prefix(b"{")?;
    let rest = json_trim_start(rest).strip_prefix(b"\"value\"")?;
    let rest = json_trim_start(rest).strip_prefix(b":")?;
    let rest = json_trim_start(rest).strip_prefix(b"\"")?;
    let rest = json_trim_end(rest).strip_suffix(b"}")?;
    let inner = json_trim_end(rest).strip_suffix(b"\"")?;
    // A quote inside would end the string early; plain bytes have none.
    if !is_plain(inner) {
        return None;
    }
    std::str::from_utf8(inner).ok().map(str::to_owned)
}

/// JSON's whitespace, which is not `trim_ascii`'s: no form feed.
fn is_json_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

fn json_trim_start(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.iter().take_while(|b| is_json_space(b)).count()..]
}

fn json_trim_end(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len() - bytes.iter().rev().take_while(|b| is_json_space(b)).count()]
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
    if content_type.is_some_and(|v| v.as_bytes() == b"application/json") {
        return true;
    }
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

    /// The fast path takes the bodies clients send and gives what
    /// serde_json gives; it leaves every other body to serde_json.
    #[test]
    fn plain_put_values_agree_with_serde_json() {
        let serde = |body: &[u8]| parse_json::<PutValue>(body).map(|v| v.value).ok();
        for (body, fast) in [
            (&br#"{"value":"v"}"#[..], true),
            (br#"{"value":""}"#, true),
            ("{\"value\":\"naïve ☃ 🦀\"}".as_bytes(), true),
            (br#"{"value":"</script>"}"#, true),
            (b"\r\n{ \"value\" :\t\"v\" }\n", true),
            (b"{\"value\":\"v\"}\x0c", false),
            (br#"{"value":"a\"b"}"#, false),
            (br#"{"value":"a\u0041"}"#, false),
            (b"{\"value\":\"tab\there\"}", false),
            (b"{\"value\":\"del\x7f\"}", false),
            (br#"{"value":"a","other":"b"}"#, false),
            (br#"{"value":"a"}x"#, false),
            (b"{\"value\":\"\xff\"}", false),
            (br#"{"value":1}"#, false),
        ] {
            let got = plain_put_value(body);
            assert_eq!(got.is_some(), fast, "{}", String::from_utf8_lossy(body));
            if got.is_some() {
                assert_eq!(got, serde(body), "{}", String::from_utf8_lossy(body));
            }
        }
        // Random bodies from the bytes that matter, around the expected
        // frame: whenever the fast path answers, serde_json agrees.
        let pieces: [&[u8]; 13] = [
            b"a",
            b"\"",
            b"\\",
            b"\n",
            b"\x7f",
            b"\x00",
            "é".as_bytes(),
            b"\xc3",
            b"}",
            b" ",
            b"u0041",
            b"{\"value\":\"",
            b"\t",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap()
        };
        let mut fast = 0;
        for _ in 0..20_000 {
            let mut body = b"{\"value\":\"".to_vec();
            for _ in 0..next(6) {
                body.extend_from_slice(pieces[next(pieces.len())]);
            }
            body.extend_from_slice(if next(4) == 0 { b"\" }" } else { b"\"}" });
            if let Some(value) = plain_put_value(&body) {
                fast += 1;
                assert_eq!(
                    Some(value),
                    serde(&body),
                    "{}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        assert!(fast > 1_000, "the fast path answered {fast} times");
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
