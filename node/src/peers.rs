//! The one client a node uses to talk to other shards: pooled keep-alive
//! connections, a connect timeout and a request timeout, and the
//! `x-cavi-forwarded` and `x-cavi-epoch` headers on every request, so a
//! receiver never forwards it again and whoever is behind can tell.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::utf8_percent_encode;
use serde::de::DeserializeOwned;

use crate::keyspace::KeyRange;
use crate::moves::{Batch, CommitRequest, Outcome};
use crate::pipe::{PipeError, Pipes};
use crate::settings::Settings;
use crate::shard_map::ShardMap;
use crate::store::Page;
use crate::wire::{EPOCH_HEADER, ErrorBody, FORWARDED_HEADER, REQUEST_ID_HEADER, URL_ESCAPE};

/// Who sent a request: the shard that proxied it (and its map epoch), and
/// the request id.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub forwarded_by: Option<String>,
    pub epoch: Option<u64>,
    pub request_id: Option<HeaderValue>,
}

/// Why a peer did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("connection refused or reset ({0}); the shard may be restarting")]
    Unavailable(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("bad answer: {0}")]
    BadResponse(String),
    /// The peer answered with an error of its own.
    #[error("{}", .1.error)]
    Refused(StatusCode, Box<ErrorBody>),
}

impl PeerError {
    pub fn status(&self) -> StatusCode {
        match self {
            PeerError::Unavailable(_) | PeerError::ConnectTimeout(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            PeerError::BadResponse(_) => StatusCode::BAD_GATEWAY,
            PeerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            PeerError::Refused(status, _) => *status,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            PeerError::Unavailable(_) => "peer_unavailable",
            PeerError::ConnectTimeout(_) => "peer_unreachable",
            PeerError::Timeout(_) => "peer_timeout",
            PeerError::BadResponse(_) => "peer_bad_response",
            PeerError::Refused(..) => "peer_refused",
        }
    }

    /// A peer that refuses connections is restarting (a rollout, a crash):
    /// worth a retry in a second.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(
            self,
            PeerError::Unavailable(_) | PeerError::ConnectTimeout(_)
        )
        .then_some(1)
    }

    /// Whether the peer itself said no (so the request reached it).
    pub fn is_refusal(&self) -> bool {
        matches!(self, PeerError::Refused(..))
    }
}

/// A key operation, as it travels from the entry node to the owner.
#[derive(Debug, Clone)]
pub enum KvOp {
    Get,
    /// The value, and the request body it came in (passed on as it is).
    Put {
        value: String,
        body: Bytes,
    },
    Delete,
}

/// The answer to a page of a peer's search.
#[derive(Debug)]
pub enum PageAnswer {
    Page(Page),
    /// The peer does not own the span at its epoch.
    Misdirected(u64),
}

/// One page of a search, asked of the shard that owns `range`.
#[derive(Debug, Clone)]
pub struct PageQuery<'a> {
    pub range: &'a KeyRange,
    pub prefix: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct PeerClient {
    /// Forwarded reads: pipelined connections ([`crate::pipe`]).
    reads: Arc<Pipes>,
    /// Forwarded writes and search pages: hyper's pooled client with no
    /// URL parsing, redirect or retry layers.
    hop: HyperClient<HttpConnector, Full<Bytes>>,
    /// Everything else (maps, moves): the rare calls, where reqwest's
    /// conveniences cost nothing that matters.
    http: reqwest::Client,
    sender: HeaderValue,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl PeerClient {
    pub fn new(sender_shard: u32, settings: &Settings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.peer_connect_timeout)
            .timeout(settings.peer_request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.peer_connect_timeout));
        connector.set_nodelay(true);
        let hop = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Ok(Self {
            reads: Arc::new(Pipes::new(
                settings.peer_connect_timeout,
                settings.peer_request_timeout,
            )),
            hop,
            http,
            sender: HeaderValue::from(sender_shard),
            connect_timeout: settings.peer_connect_timeout,
            request_timeout: settings.peer_request_timeout,
        })
    }

    /// Proxies a key operation to its owner and relays the owner's answer
    /// (status, content type, epoch header and body) unchanged; a PUT's
    /// body goes on as it came.
    ///
    /// The key travels in the query (`/kv?key=`), not the path: URL
    /// libraries rewrite the path segments `.` and `..` (even escaped), and
    /// both are valid keys.
    pub async fn forward(
        &self,
        addr: &str,
        key: &str,
        op: &KvOp,
        epoch: u64,
        request_id: Option<&HeaderValue>,
    ) -> Result<Response, PeerError> {
        let (method, body) = match op {
            KvOp::Get => return self.forward_read(addr, key, epoch, request_id).await,
            KvOp::Delete => (Method::DELETE, Bytes::new()),
            KvOp::Put { body, .. } => (Method::PUT, body.clone()),
        };
        let path = format!("/kv?key={}", utf8_percent_encode(key, URL_ESCAPE));
        let (parts, body) = self
            .exchange(method, addr, path, body, epoch, request_id)
            .await?;
        Ok(relay(
            parts.status,
            parts.headers.get(header::CONTENT_TYPE).cloned(),
            parts.headers.get(EPOCH_HEADER).cloned(),
            body,
        ))
    }

    /// The headers every proxied request carries: who sent it, by which
    /// map epoch, and the request id.
    fn proxy_headers(
        &self,
        epoch: u64,
        request_id: Option<&HeaderValue>,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        [
            Some((FORWARDED_HEADER, self.sender.clone())),
            Some((EPOCH_HEADER, HeaderValue::from(epoch))),
            request_id.map(|id| (REQUEST_ID_HEADER, id.clone())),
        ]
        .into_iter()
        .flatten()
    }

    /// A forwarded GET, pipelined; once more on a fresh connection when
    /// the connection closed under it (a GET is idempotent, and a peer may
    /// close an idle connection just as a request leaves).
    async fn forward_read(
        &self,
        addr: &str,
        key: &str,
        epoch: u64,
        request_id: Option<&HeaderValue>,
    ) -> Result<Response, PeerError> {
        let target = format!("/kv?key={}", utf8_percent_encode(key, URL_ESCAPE));
        let request = || {
            let headers = self.proxy_headers(epoch, request_id);
            crate::pipe::request("GET", addr, &target, headers, &[])
        };
        let answer = match self.reads.send(addr, request()).await {
            Err(PipeError::Closed) => self.reads.send(addr, request()).await,
            answer => answer,
        };
        let answer = answer.map_err(|e| match e {
            PipeError::Connect(why) => PeerError::Unavailable(why),
            PipeError::ConnectTimeout(t) => PeerError::ConnectTimeout(t),
            PipeError::Closed => PeerError::Unavailable(e.to_string()),
            PipeError::Timeout(t) => PeerError::Timeout(t),
            PipeError::Bad(why) => PeerError::BadResponse(why),
        })?;
        Ok(relay(
            answer.status,
            answer.content_type,
            answer.epoch,
            answer.body,
        ))
    }

    /// One request to a peer over the pooled hop client, with the headers
    /// every proxied request carries, bounded by the peer request timeout
    /// from sending to the last byte of the answer.
    async fn exchange(
        &self,
        method: Method,
        addr: &str,
        path_and_query: String,
        body: Bytes,
        epoch: u64,
        request_id: Option<&HeaderValue>,
    ) -> Result<(axum::http::response::Parts, Bytes), PeerError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(addr)
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| PeerError::BadResponse(format!("cannot address {addr}: {e}")))?;
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in self.proxy_headers(epoch, request_id) {
            request = request.header(name, value);
        }
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| PeerError::BadResponse(e.to_string()))?;
        let exchange = async {
            let answer = self
                .hop
                .request(request)
                .await
                .map_err(|e| classify_hop(&e, self.connect_timeout))?;
            let (parts, body) = answer.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| classify_hop(&e, self.connect_timeout))?
                .to_bytes();
            Ok::<_, PeerError>((parts, body))
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| PeerError::Timeout(self.request_timeout))?
    }

    /// The live map of the node at `addr`.
    pub async fn map(&self, addr: &str) -> Result<ShardMap, PeerError> {
        let answer = self
            .http
            .get(format!("http://{addr}/internal/v1/map"))
            .header(FORWARDED_HEADER, self.sender.clone())
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let body = self.body(answer).await?;
        ShardMap::from_json(&body).map_err(|e| PeerError::BadResponse(e.to_string()))
    }

    /// Asks the owner of `q.range` for a page of its keys.
    pub async fn search_page(
        &self,
        addr: &str,
        q: &PageQuery<'_>,
        epoch: u64,
        request_id: Option<&HeaderValue>,
    ) -> Result<PageAnswer, PeerError> {
        let mut path = format!(
            "/internal/v1/search?range_start={}&prefix={}&limit={}&max_bytes={}",
            utf8_percent_encode(&q.range.start, URL_ESCAPE),
            utf8_percent_encode(q.prefix, URL_ESCAPE),
            q.limit,
            q.max_bytes,
        );
        if let Some(end) = &q.range.end {
            path.push_str("&range_end=");
            path.extend(utf8_percent_encode(end, URL_ESCAPE));
        }
        if let Some(after) = q.after {
            path.push_str("&after=");
            path.extend(utf8_percent_encode(after, URL_ESCAPE));
        }
        let (parts, body) = self
            .exchange(Method::GET, addr, path, Bytes::new(), epoch, request_id)
            .await?;
        if parts.status == StatusCode::MISDIRECTED_REQUEST {
            let theirs = parts
                .headers
                .get(EPOCH_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return Ok(PageAnswer::Misdirected(theirs));
        }
        if !parts.status.is_success() {
            return Err(refusal(parts.status, &body));
        }
        let more = parts.headers.contains_key(crate::wire::NEXT_CURSOR_HEADER);
        let entries = serde_json::from_slice(&body)
            .map_err(|e| PeerError::BadResponse(format!("search page is not a list: {e}")))?;
        Ok(PageAnswer::Page(Page { entries, more }))
    }

    /// Sends one page of a move to its target.
    pub async fn send_batch(&self, addr: &str, id: &str, batch: &Batch) -> Result<(), PeerError> {
        let path = format!("/internal/v1/incoming/{id}/batch");
        self.post_json(addr, &path, batch.to_json()).await.map(drop)
    }

    /// Asks a move's target to commit.
    pub async fn commit_target(
        &self,
        addr: &str,
        id: &str,
        req: &CommitRequest,
    ) -> Result<(), PeerError> {
        self.post(addr, &format!("/internal/v1/incoming/{id}/commit"), req)
            .await
            .map(drop)
    }

    /// Asks a move's target how the move ended.
    pub async fn outcome(&self, addr: &str, id: &str) -> Result<Outcome, PeerError> {
        let answer = self
            .http
            .get(format!("http://{addr}/internal/v1/incoming/{id}/outcome"))
            .header(FORWARDED_HEADER, self.sender.clone())
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let body = self.body(answer).await?;
        serde_json::from_slice(&body).map_err(|e| PeerError::BadResponse(e.to_string()))
    }

    /// Tells a move's target the move is off.
    pub async fn abort_target(&self, addr: &str, id: &str) -> Result<(), PeerError> {
        self.post(addr, &format!("/internal/v1/incoming/{id}/abort"), &())
            .await
            .map(drop)
    }

    async fn post<T: serde::Serialize + ?Sized>(
        &self,
        addr: &str,
        path: &str,
        body: &T,
    ) -> Result<Bytes, PeerError> {
        let body = serde_json::to_vec(body).map_err(|e| PeerError::BadResponse(e.to_string()))?;
        self.post_json(addr, path, body).await
    }

    async fn post_json(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Bytes, PeerError> {
        let answer = self
            .http
            .post(format!("http://{addr}{path}"))
            .header(FORWARDED_HEADER, self.sender.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        self.body(answer).await
    }

    /// The body of a successful answer; an error answer as `Refused`.
    async fn body(&self, answer: reqwest::Response) -> Result<Bytes, PeerError> {
        let status = answer.status();
        let body = answer.bytes().await.map_err(|e| self.classify(e))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(refusal(status, &body))
    }

    fn classify(&self, e: reqwest::Error) -> PeerError {
        if e.is_connect() && e.is_timeout() {
            PeerError::ConnectTimeout(self.connect_timeout)
        } else if e.is_timeout() {
            PeerError::Timeout(self.request_timeout)
        } else if e.is_connect() || closed_by_peer(&e) {
            PeerError::Unavailable(transport_cause(&e))
        } else {
            PeerError::BadResponse(transport_cause(&e))
        }
    }
}

/// An owner's answer as the forwarding node relays it: status, content
/// type, epoch header and body, nothing else.
fn relay(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    epoch: Option<HeaderValue>,
    body: Bytes,
) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some(epoch) = epoch {
        response.headers_mut().insert(EPOCH_HEADER, epoch);
    }
    response
}

/// Whether the peer closed the connection under the request (it was
/// shutting down, or crashed): the sign of a restart, like a refused
/// connection, not of a peer that answers nonsense.
fn closed_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error answer as a [`PeerError::Refused`], keeping the peer's words.
pub fn refusal(status: StatusCode, body: &[u8]) -> PeerError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => PeerError::Refused(status, Box::new(error)),
        Err(_) => PeerError::BadResponse(format!(
            "status {status}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        )),
    }
}

/// Parses a JSON answer body.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, PeerError> {
    serde_json::from_slice(body).map_err(|e| PeerError::BadResponse(e.to_string()))
}

/// A failed exchange of the forwarding client, as [`PeerClient::classify`]
/// sorts reqwest's.
fn classify_hop(e: &(dyn std::error::Error + 'static), connect_timeout: Duration) -> PeerError {
    let connect = e
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(hyper_util::client::legacy::Error::is_connect);
    if connect && cause_kind(e) == Some(std::io::ErrorKind::TimedOut) {
        PeerError::ConnectTimeout(connect_timeout)
    } else if connect || closed_by_peer(e) {
        PeerError::Unavailable(error_cause(e))
    } else {
        PeerError::BadResponse(error_cause(e))
    }
}

/// The kind of the first I/O error in `e`'s chain.
fn cause_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
}

/// The innermost cause of a transport error, in words: for a refused
/// connection `connection refused`, not reqwest's chain of wrappers.
pub fn transport_cause(e: &reqwest::Error) -> String {
    error_cause(e)
}

fn error_cause(e: &(dyn std::error::Error + 'static)) -> String {
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
