//! The one client a node uses to talk to other shards: pooled keep-alive
//! connections, a connect timeout and a request timeout, and the
//! `x-cavi-forwarded` header on every request so a receiver never forwards
//! it again.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::ShardConfig;
use crate::search::{Scope, SearchParams};
use crate::store::Entry;

/// Marks a request as proxied by another shard; the value is the sender's
/// shard id. A receiver that does not own the key answers 421 instead of
/// forwarding, so nodes whose configs disagree cannot bounce a request.
pub const FORWARDED_HEADER: &str = "x-cavi-forwarded";

/// Names one request across every node it touches; taken from the client
/// or made up by the first node, and passed along on every hop.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Who sent a request: the shard that proxied it, if any, and its id.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub forwarded_by: Option<String>,
    pub request_id: Option<HeaderValue>,
}

/// Everything but unreserved characters is escaped, `/` and `+` included:
/// a key is then one path segment, and a receiver decoding a query with
/// form rules does not turn a bare `+` into a space.
pub const URL_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a peer did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("connection refused or reset ({0})")]
    Unavailable(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("bad answer: {0}")]
    BadResponse(String),
}

impl PeerError {
    pub fn status(&self) -> StatusCode {
        match self {
            PeerError::Unavailable(_) | PeerError::BadResponse(_) => StatusCode::BAD_GATEWAY,
            PeerError::ConnectTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            PeerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            PeerError::Unavailable(_) => "peer_unavailable",
            PeerError::ConnectTimeout(_) => "peer_unreachable",
            PeerError::Timeout(_) => "peer_timeout",
            PeerError::BadResponse(_) => "peer_bad_response",
        }
    }
}

/// A key operation, as it travels from the entry node to the owner.
#[derive(Debug, Clone)]
pub enum KvOp {
    Get,
    Put(String),
    Delete,
}

#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    sender: HeaderValue,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl PeerClient {
    pub fn new(
        sender_shard: u32,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            sender: HeaderValue::from(sender_shard),
            connect_timeout,
            request_timeout,
        })
    }

    /// Proxies a key operation to its owner and relays the owner's answer
    /// (status, content type and body) unchanged.
    ///
    /// The key travels in the query (`/kv?key=`), not the path: URL
    /// libraries rewrite the path segments `.` and `..` (even escaped), and
    /// both are valid keys.
    pub async fn forward(
        &self,
        owner: &ShardConfig,
        key: &str,
        op: &KvOp,
        request_id: Option<&HeaderValue>,
    ) -> Result<Response, PeerError> {
        let url = format!(
            "http://{}/kv?key={}",
            owner.addr,
            utf8_percent_encode(key, URL_ESCAPE)
        );
        let request = match op {
            KvOp::Get => self.http.get(url),
            KvOp::Delete => self.http.delete(url),
            KvOp::Put(value) => {
                let body = serde_json::json!({ "value": value }).to_string();
                self.http
                    .put(url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body)
            }
        };
        let answer = self
            .hop(request, request_id)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = answer.status();
        let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
        let body = answer.bytes().await.map_err(|e| self.classify(e))?;
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        if let Some(ct) = content_type {
            response.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        Ok(response)
    }

    /// Asks `shard` for its own keys under `prefix`.
    pub async fn search(
        &self,
        shard: &ShardConfig,
        prefix: &str,
        limit: Option<usize>,
        request_id: Option<&HeaderValue>,
    ) -> Result<Vec<Entry>, PeerError> {
        let params = SearchParams {
            prefix: prefix.to_owned(),
            scope: Scope::Local,
            limit,
            partial: false,
        };
        let url = format!("http://{}/search?{}", shard.addr, params.to_query());
        let answer = self
            .hop(self.http.get(url), request_id)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|e| self.classify(e))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(PeerError::BadResponse(format!("status {status}: {text}")));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PeerError::BadResponse(format!("search result is not a list: {e}")))
    }

    /// The headers every proxied request carries.
    fn hop(
        &self,
        request: reqwest::RequestBuilder,
        request_id: Option<&HeaderValue>,
    ) -> reqwest::RequestBuilder {
        let request = request.header(FORWARDED_HEADER, self.sender.clone());
        match request_id {
            Some(id) => request.header(REQUEST_ID_HEADER, id.clone()),
            None => request,
        }
    }

    fn classify(&self, e: reqwest::Error) -> PeerError {
        if e.is_connect() && e.is_timeout() {
            PeerError::ConnectTimeout(self.connect_timeout)
        } else if e.is_timeout() {
            PeerError::Timeout(self.request_timeout)
        } else if e.is_connect() {
            PeerError::Unavailable(transport_cause(&e))
        } else {
            PeerError::BadResponse(transport_cause(&e))
        }
    }
}

/// The innermost cause of a transport error, in words: for a refused
/// connection `connection refused`, not reqwest's chain of wrappers.
pub fn transport_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                std::io::ErrorKind::TimedOut => "timed out".into(),
                _ => io.to_string(),
            };
        }
        cause = next;
    }
    cause.to_string()
}
