//! A typed HTTP client for one node's API: keys, search, the shard map.

use std::time::Duration;

use percent_encoding::utf8_percent_encode;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Serialize;

use cavi_node::keyspace::KeyRange;
use cavi_node::moves::{LockRequest, LockState, MoveSpec, MoveStatus};
use cavi_node::peers::transport_cause;
use cavi_node::search::SearchParams;
use cavi_node::shard_map::ShardMap;
use cavi_node::wire::{ClusterView, ErrorBody, NEXT_CURSOR_HEADER, PARTIAL_HEADER, URL_ESCAPE};

use crate::error::ClientError;
use crate::routing::Op;

/// Where `cavi` looks for a node when neither `--endpoint` nor
/// `CAVI_ENDPOINT` says otherwise: the first shard of the local quick start.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:3100";

/// One stored pair, as `/search` lists them: the node's own type.
pub use cavi_node::store::Entry;

/// The answer to a search (one page of it, when it carries a cursor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchAnswer {
    pub entries: Vec<Entry>,
    /// The shards missing from a partial answer (`x-cavi-partial`), as the
    /// node named them; `None` when the answer is complete.
    pub missing: Option<String>,
    /// Where the next page starts (`x-cavi-next-cursor`), when the answer
    /// stopped early.
    pub next_cursor: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct PutRequest<'a> {
    pub value: &'a str,
}

/// A typed client for one node's HTTP API. Cheap to clone: clones share
/// one connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl Client {
    /// A client for the node at `endpoint` (`http://host:port`; a bare
    /// `host:port` means plain http), waiting at most `timeout` for any one
    /// answer.
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, ClientError> {
        let base = normalize_endpoint(endpoint)?;
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            timeout,
        })
    }

    /// The base URL this client talks to, without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// `host:port` of the endpoint.
    pub fn addr(&self) -> &str {
        self.base.strip_prefix("http://").unwrap_or(&self.base)
    }

    /// The longest wait for one answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client for another node, given its advertised `host:port`, sharing
    /// this client's connections and waiting at most `timeout`.
    pub fn for_addr(&self, addr: &str, timeout: Duration) -> Self {
        Self {
            http: self.http.clone(),
            base: format!("http://{addr}"),
            timeout,
        }
    }

    /// The URL of a key: `/kv/{key}` with the key escaped as one path
    /// segment, or `/kv?key=` for `.` and `..`, which URL libraries would
    /// otherwise rewrite as dot segments.
    pub fn key_url(&self, key: &str) -> String {
        format!("{}{}", self.base, key_path(key))
    }

    /// The value of `key`; a missing key is the server's `404` sentence.
    pub async fn get(&self, key: &str) -> Result<String, ClientError> {
        let (_, body) = self.kv(key, Op::Get).await?;
        self.parse(&body)
    }

    pub async fn put(&self, key: &str, value: &str) -> Result<(), ClientError> {
        self.kv(key, Op::Put(value)).await.map(drop)
    }

    /// Deletes `key`; deleting a missing key succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), ClientError> {
        self.kv(key, Op::Delete).await.map(drop)
    }

    /// One key operation; the answer's headers and body.
    pub(crate) async fn kv(
        &self,
        key: &str,
        op: Op<'_>,
    ) -> Result<(HeaderMap, Vec<u8>), ClientError> {
        let url = self.key_url(key);
        let request = match op {
            Op::Get => self.http.get(url),
            Op::Delete => self.http.delete(url),
            Op::Put(value) => {
                let body = serde_json::to_vec(&PutRequest { value }).map_err(|e| {
                    ClientError::Input(format!("cannot encode the value of {key:?} as JSON: {e}"))
                })?;
                self.http
                    .put(url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body)
            }
        };
        self.send(request).await
    }

    /// One page of the pairs whose key starts with `prefix`, sorted by
    /// key, from every shard: at most `limit` (and at most what the node's
    /// page budget holds), continuing after `cursor`. With `partial`,
    /// shards that fail are left out and named in [`SearchAnswer::missing`]
    /// instead of failing the search.
    pub async fn search(
        &self,
        prefix: &str,
        limit: Option<usize>,
        partial: bool,
        cursor: Option<String>,
    ) -> Result<SearchAnswer, ClientError> {
        let params = SearchParams {
            prefix: prefix.to_owned(),
            limit,
            partial,
            cursor,
            ..SearchParams::default()
        };
        let url = format!("{}/search?{}", self.base, params.to_query());
        let (headers, body) = self.send(self.http.get(url)).await?;
        let header = |name: reqwest::header::HeaderName| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        Ok(SearchAnswer {
            entries: self.parse(&body)?,
            missing: header(PARTIAL_HEADER),
            next_cursor: header(NEXT_CURSOR_HEADER),
        })
    }

    /// The shard map as this node sees it, and its own key count.
    pub async fn cluster(&self) -> Result<ClusterView, ClientError> {
        let (_, body) = self
            .send(self.http.get(format!("{}/cluster", self.base)))
            .await?;
        self.parse(&body)
    }

    /// The node's live map.
    pub async fn map(&self) -> Result<ShardMap, ClientError> {
        self.get_json("/internal/v1/map").await
    }

    /// Offers the node a newer map; answers with the map it holds after.
    pub async fn publish(&self, map: &ShardMap) -> Result<ShardMap, ClientError> {
        let request = json(self.http.put(format!("{}/internal/v1/map", self.base)), map)?;
        let (_, body) = self.send(request).await?;
        self.parse(&body)
    }

    /// The moves the node takes part in.
    pub async fn moves(&self) -> Result<Vec<MoveStatus>, ClientError> {
        self.get_json("/internal/v1/moves").await
    }

    /// How many keys the node holds in `range`, owned or not.
    pub async fn count(&self, range: &KeyRange) -> Result<u64, ClientError> {
        #[derive(serde::Deserialize)]
        struct Count {
            keys: u64,
        }
        let mut path = format!(
            "/internal/v1/count?range_start={}",
            utf8_percent_encode(&range.start, URL_ESCAPE)
        );
        if let Some(end) = &range.end {
            path.push_str("&range_end=");
            path.extend(utf8_percent_encode(end, URL_ESCAPE));
        }
        self.get_json::<Count>(&path).await.map(|c| c.keys)
    }

    /// Takes or renews the move lock for `owner`.
    pub async fn lock(&self, owner: &str, ttl: Duration) -> Result<LockState, ClientError> {
        let req = LockRequest {
            owner: owner.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        self.post_json("/internal/v1/lock", &req).await
    }

    /// Releases the move lock if `owner` holds it.
    pub async fn unlock(&self, owner: &str) -> Result<(), ClientError> {
        let url = format!(
            "{}/internal/v1/lock?owner={}",
            self.base,
            utf8_percent_encode(owner, URL_ESCAPE)
        );
        self.send(self.http.delete(url)).await.map(drop)
    }

    /// Asks a move's target to take the range.
    pub async fn prepare(&self, spec: &MoveSpec) -> Result<MoveStatus, ClientError> {
        self.post_json("/internal/v1/incoming/prepare", spec).await
    }

    /// Asks a move's source to start sending the range.
    pub async fn start_move(&self, spec: &MoveSpec) -> Result<MoveStatus, ClientError> {
        self.post_json("/internal/v1/outgoing/start", spec).await
    }

    /// The move as its source sees it.
    pub async fn outgoing(&self, id: &str) -> Result<MoveStatus, ClientError> {
        self.get_json(&format!("/internal/v1/outgoing/{id}")).await
    }

    /// Asks a move's source to fence and commit.
    pub async fn commit_move(&self, id: &str) -> Result<MoveStatus, ClientError> {
        self.post_json(&format!("/internal/v1/outgoing/{id}/commit"), &())
            .await
    }

    /// Gives a move up on its source.
    pub async fn abort_outgoing(&self, id: &str) -> Result<MoveStatus, ClientError> {
        self.post_json(&format!("/internal/v1/outgoing/{id}/abort"), &())
            .await
    }

    /// Gives a move up on its target.
    pub async fn abort_incoming(&self, id: &str) -> Result<(), ClientError> {
        let url = format!("{}/internal/v1/incoming/{id}/abort", self.base);
        self.send(self.http.post(url)).await.map(drop)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (_, body) = self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await?;
        self.parse(&body)
    }

    async fn post_json<T: serde::de::DeserializeOwned, B: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = json(self.http.post(format!("{}{path}", self.base)), body)?;
        let (_, body) = self.send(request).await?;
        self.parse(&body)
    }

    /// `Ok` when the node answers `/readyz` with `200`; a node that is
    /// shutting down answers `503 not_ready`, a [`ClientError::Server`].
    pub async fn ready(&self) -> Result<(), ClientError> {
        self.send(self.http.get(format!("{}/readyz", self.base)))
            .await
            .map(drop)
    }

    /// Sends `request`; a success is its headers and body, an error status
    /// is the server's sentence, a transport failure is `Unreachable`.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(HeaderMap, Vec<u8>), ClientError> {
        let response = request
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.transport(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport(&e))?
            .to_vec();
        if status.is_success() {
            Ok((headers, body))
        } else {
            Err(self.server_error(status, &headers, &body))
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::BadResponse {
            endpoint: self.base.clone(),
            detail: format!("{e} in {}", snippet(body)),
        })
    }

    fn server_error(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ClientError {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody {
                error, code, epoch, ..
            }) => ClientError::Server {
                status: status.as_u16(),
                code,
                sentence: error,
                epoch,
                retry_after,
            },
            Err(_) => ClientError::Server {
                status: status.as_u16(),
                code: String::new(),
                epoch: None,
                retry_after,
                sentence: if body.is_empty() {
                    format!("{} answered {status}", self.base)
                } else {
                    format!("{} answered {status}: {}", self.base, snippet(body))
                },
            },
        }
    }

    fn transport(&self, e: &reqwest::Error) -> ClientError {
        let reason = if e.is_timeout() {
            format!("no answer within {}", seconds(self.timeout))
        } else {
            transport_cause(e)
        };
        ClientError::Unreachable {
            endpoint: self.base.clone(),
            reason,
        }
    }
}

/// The path of `key` under `/kv`: `.` and `..` go in the query, where no
/// URL normalisation removes them.
pub(crate) fn key_path(key: &str) -> String {
    let escaped = utf8_percent_encode(key, URL_ESCAPE);
    if key == "." || key == ".." {
        format!("/kv?key={escaped}")
    } else {
        format!("/kv/{escaped}")
    }
}

/// A request with a JSON body.
fn json<B: serde::Serialize + ?Sized>(
    request: reqwest::RequestBuilder,
    body: &B,
) -> Result<reqwest::RequestBuilder, ClientError> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ClientError::Input(format!("cannot encode a request as JSON: {e}")))?;
    Ok(request.header(CONTENT_TYPE, "application/json").body(bytes))
}

/// `http://host:port` without a trailing `/`; a bare `host:port` gets
/// `http://`. Only plain http is spoken.
pub fn normalize_endpoint(endpoint: &str) -> Result<String, ClientError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(ClientError::Usage(
            "the endpoint is empty: pass --endpoint http://HOST:PORT".into(),
        ));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| {
        ClientError::Usage(format!(
            "the endpoint {endpoint:?} is not a URL ({e}): pass e.g. http://127.0.0.1:3100"
        ))
    })?;
    if url.scheme() != "http" {
        return Err(ClientError::Usage(format!(
            "the endpoint {endpoint:?} uses {}: cavi speaks plain http to a node (e.g. through kubectl port-forward)",
            url.scheme()
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ClientError::Usage(format!(
            "the endpoint {endpoint:?} must not have a query or fragment"
        )));
    }
    Ok(with_scheme)
}

/// At most 200 characters of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "an empty body".into();
    }
    let mut short: String = text.chars().take(200).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// `2s`, `1.5s`, `250ms`.
pub fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EXIT_USAGE;

    fn client() -> Client {
        Client::new("127.0.0.1:3100/", Duration::from_secs(1)).expect("a client")
    }

    #[test]
    fn keys_are_one_escaped_path_segment() {
        let c = client();
        assert_eq!(c.endpoint(), "http://127.0.0.1:3100");
        assert_eq!(c.key_url("foo"), "http://127.0.0.1:3100/kv/foo");
        assert_eq!(
            c.key_url("a/b?c d%+é"),
            "http://127.0.0.1:3100/kv/a%2Fb%3Fc%20d%25%2B%C3%A9"
        );
        assert_eq!(c.key_url("A-z.0_~"), "http://127.0.0.1:3100/kv/A-z.0_~");
        assert_eq!(c.key_url("."), "http://127.0.0.1:3100/kv?key=.");
        assert_eq!(c.key_url(".."), "http://127.0.0.1:3100/kv?key=..");
        assert_eq!(c.key_url("..."), "http://127.0.0.1:3100/kv/...");
    }

    #[test]
    fn endpoints_are_plain_http_urls() {
        assert_eq!(
            normalize_endpoint("http://node:3100").ok().as_deref(),
            Some("http://node:3100")
        );
        assert_eq!(
            normalize_endpoint(" localhost:3101 ").ok().as_deref(),
            Some("http://localhost:3101")
        );
        for bad in [
            "",
            "https://node:3100",
            "http://node:3100/?x=1",
            "http://[::1",
        ] {
            let e = normalize_endpoint(bad).expect_err(bad);
            assert_eq!(e.exit_code(), EXIT_USAGE, "{bad}: {e}");
        }
    }

    #[test]
    fn put_bodies_are_json_encoded() {
        let body = serde_json::to_string(&PutRequest {
            value: "say \"hi\"\n",
        })
        .expect("json");
        assert_eq!(body, r#"{"value":"say \"hi\"\n"}"#);
    }

    #[test]
    fn snippets_are_short_and_quoted() {
        assert_eq!(snippet(b""), "an empty body");
        assert_eq!(snippet(b"404 page not found\n"), "\"404 page not found\"");
        assert_eq!(snippet("x".repeat(300).as_bytes()).chars().count(), 203);
    }
}
