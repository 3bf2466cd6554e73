//! Pipelined HTTP/1.1 connections: a node's forwarded reads, and the PUTs
//! of `cavi load`.
//!
//! A forwarded GET over a pooled connection costs four system calls more
//! than a local one (a write and a read on each side of the hop), and on
//! this project's machines those calls cost more than the rest of the
//! request. Here the forwarded GETs that are ready at the same moment go
//! to the owner in one write, back to back on one connection; the owner
//! (hyper) reads them in one go and answers in order (RFC 9112, 9.3.2),
//! and their answers come back in as few reads.
//!
//! A connection carries requests one after another, so a slow answer
//! holds up the ones behind it: writes keep the pooled client, where a
//! durable owner's group commit sees every writer at once, and a peer gets
//! a few connections, the least busy taking the next request. (`cavi
//! load` sends its PUTs to a durable owner with a queue depth of one and
//! as many connections as PUTs in flight, for the same reason.) A request
//! that times out closes its connection (a hung peer); one whose
//! connection closed before its answer (a restart, or the peer closing an
//! idle connection as the request left) fails as `Closed`, which the
//! caller may retry: a GET is idempotent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc, oneshot};

/// Connections to one peer, at most, by default.
const PIPES_PER_PEER: usize = 4;
/// Requests waiting on every connection to a peer before another opens,
/// by default.
const OPEN_AT_BUSY: usize = 16;
/// Requests put in one write, at most.
const MAX_WRITE: usize = 64;
/// An answer head longer than this is not from a node.
const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 32;

/// A peer's answer: what a forwarding node relays.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub epoch: Option<HeaderValue>,
    pub body: Bytes,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PipeError {
    #[error("{0}")]
    Connect(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The connection ended before the answer (the request may or may
    /// not have been served).
    #[error("connection closed by the peer")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Bad(String),
}

type Reply = oneshot::Sender<Result<Answer, PipeError>>;

struct Job {
    request: Vec<u8>,
    reply: Reply,
}

/// One connection, as the pool sees it.
struct Pipe {
    jobs: mpsc::UnboundedSender<Job>,
    alive: Arc<AtomicBool>,
    /// Requests sent and not yet answered or given up.
    busy: AtomicUsize,
    kill: Arc<Notify>,
}

/// Marks one request of a pipe done, however its wait ends.
struct Busy<'a>(&'a Pipe);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pipelined connections of a node to its peers.
#[derive(Debug)]
pub struct Pipes {
    peers: Mutex<HashMap<String, Vec<Arc<Pipe>>>>,
    per_peer: usize,
    open_at_busy: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("busy", &self.busy.load(Ordering::Relaxed))
            .finish()
    }
}

impl Pipes {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Self {
        Self {
            peers: Mutex::default(),
            per_peer: PIPES_PER_PEER,
            open_at_busy: OPEN_AT_BUSY,
            connect_timeout,
            request_timeout,
        }
    }

    /// Up to `connections` connections to a peer, another opening once
    /// every one has `depth` requests waiting (4 and 16 by default). A
    /// depth of one gives each request in flight a connection of its own.
    #[must_use]
    pub fn shaped(mut self, connections: usize, depth: usize) -> Self {
        self.per_peer = connections.max(1);
        self.open_at_busy = depth.max(1);
        self
    }

    /// Sends `request` (a whole HTTP/1.1 request, see [`request`]) to
    /// `addr` and waits for its answer, at most the request timeout.
    pub async fn send(&self, addr: &str, request: Vec<u8>) -> Result<Answer, PipeError> {
        let pipe = self.pick(addr);
        pipe.busy.fetch_add(1, Ordering::Relaxed);
        let _busy = Busy(&pipe);
        let (reply, answer) = oneshot::channel();
        if pipe.jobs.send(Job { request, reply }).is_err() {
            return Err(PipeError::Closed);
        }
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(PipeError::Closed),
            Err(_) => {
                // A hung peer: what follows on this connection waits too.
                pipe.alive.store(false, Ordering::Relaxed);
                pipe.kill.notify_one();
                Err(PipeError::Timeout(self.request_timeout))
            }
        }
    }

    /// The least busy live connection to `addr`, or a new one while the
    /// peer has fewer than its share and every one is busy enough.
    fn pick(&self, addr: &str) -> Arc<Pipe> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let pipes = peers.entry(addr.to_owned()).or_default();
        pipes.retain(|p| p.alive.load(Ordering::Relaxed));
        let idlest = pipes
            .iter()
            .min_by_key(|p| p.busy.load(Ordering::Relaxed))
            .cloned();
        match idlest {
            Some(p)
                if p.busy.load(Ordering::Relaxed) < self.open_at_busy
                    || pipes.len() >= self.per_peer =>
            {
                p
            }
            _ => {
                let pipe = Arc::new(self.open(addr));
                pipes.push(pipe.clone());
                pipe
            }
        }
    }

    fn open(&self, addr: &str) -> Pipe {
        let (jobs, queue) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(true));
        let kill = Arc::new(Notify::new());
        tokio::spawn(run(
            addr.to_owned(),
            queue,
            alive.clone(),
            kill.clone(),
            self.connect_timeout,
        ));
        Pipe {
            jobs,
            alive,
            busy: AtomicUsize::new(0),
            kill,
        }
    }
}

/// An HTTP/1.1 request as it goes on a pipelined connection: `target` is
/// the path and query, escaped; a body gets its `content-length`.
pub fn request(
    method: &str,
    host: &str,
    target: &str,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + target.len() + body.len());
    for part in [method, " ", target, " HTTP/1.1\r\nhost: ", host] {
        out.extend_from_slice(part.as_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
    if !body.is_empty() {
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// One connection's life: connect, then write what is queued and read the
/// answers in order, until either side fails or the pipe is killed.
/// Requests left unanswered see their reply dropped: `Closed`.
async fn run(
    addr: String,
    mut queue: mpsc::UnboundedReceiver<Job>,
    alive: Arc<AtomicBool>,
    kill: Arc<Notify>,
    connect_timeout: Duration,
) {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(&addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(PipeError::Connect(match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => e.to_string(),
        })),
        Err(_) => Err(PipeError::ConnectTimeout(connect_timeout)),
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(e) => {
            alive.store(false, Ordering::Relaxed);
            queue.close();
            while let Ok(job) = queue.try_recv() {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let (order, waiting) = mpsc::unbounded_channel::<Reply>();
    let writer = async {
        let mut out = Vec::new();
        while let Some(job) = queue.recv().await {
            out.clear();
            out.extend_from_slice(&job.request);
            let _ = order.send(job.reply);
            for _ in 1..MAX_WRITE {
                let Ok(job) = queue.try_recv() else { break };
                out.extend_from_slice(&job.request);
                let _ = order.send(job.reply);
            }
            if write.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = read_answers(read, waiting) => {}
        () = kill.notified() => {}
    }
    alive.store(false, Ordering::Relaxed);
    queue.close();
}

/// Hands each answer to the request it belongs to, in order.
async fn read_answers(mut read: OwnedReadHalf, mut waiting: mpsc::UnboundedReceiver<Reply>) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    loop {
        // Answers are taken from `taken` on, and the buffer compacted
        // once they are all out.
        let mut taken = 0;
        loop {
            match parse(&buf[taken..]) {
                Ok(None) => break,
                Ok(Some((answer, used, close))) => {
                    taken += used;
                    let Ok(reply) = waiting.try_recv() else {
                        // An answer nobody asked for: the stream is lost.
                        return;
                    };
                    let _ = reply.send(Ok(answer));
                    if close {
                        return;
                    }
                }
                Err(why) => {
                    if let Ok(reply) = waiting.try_recv() {
                        let _ = reply.send(Err(PipeError::Bad(why)));
                    }
                    return;
                }
            }
        }
        buf.drain(..taken);
        buf.reserve(16 << 10);
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The first answer in `buf`, the bytes it takes and whether the peer
/// closes after it, once all of it arrived. An answer without a length
/// (chunked, or up to the close) ends the connection: a node answers a
/// key's GET with a `content-length`.
fn parse(buf: &[u8]) -> Result<Option<(Answer, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("an answer's head is too long".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    let status = StatusCode::from_u16(response.code.unwrap_or(0))
        .map_err(|_| "an answer without a valid status".to_owned())?;
    let (mut length, mut close) = (None, false);
    let (mut content_type, mut epoch) = (None, None);
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("");
            length = Some(
                text.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("a bad content-length {text:?}"))?,
            );
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(h.value).ok();
        } else if h.name.eq_ignore_ascii_case("x-cavi-epoch") {
            epoch = HeaderValue::from_bytes(h.value).ok();
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("an answer without a length".into());
        }
    }
    let length = match length {
        Some(n) => n,
        None if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED => 0,
        None => return Err("an answer without a length".into()),
    };
    if buf.len() < head + length {
        return Ok(None);
    }
    let answer = Answer {
        status,
        content_type,
        epoch,
        body: Bytes::copy_from_slice(&buf[head..head + length]),
    };
    Ok(Some((answer, head + length, close)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answers_are_taken_whole_and_in_order() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-cavi-epoch: 4\r\ncontent-length: 5\r\n\r\n\"abc\"HTTP/1.1 421 Misdirected Request\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
        let (first, used, close) = parse(two).unwrap().unwrap();
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(first.body, Bytes::from_static(b"\"abc\""));
        assert_eq!(first.epoch.unwrap(), "4");
        assert!(!close);
        let (second, rest, close) = parse(&two[used..]).unwrap().unwrap();
        assert_eq!(second.status, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(used + rest, two.len());
        assert!(close);
        assert!(parse(&two[..used - 1]).unwrap().is_none());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }

    /// A peer on a fresh port that takes one connection, waits for `n`
    /// requests, writes what `answer` makes of them and hangs up; the task
    /// returns what it received.
    async fn peer(
        n: usize,
        answer: impl FnOnce(&str) -> Vec<u8> + Send + 'static,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while seen.windows(4).filter(|w| w == b"\r\n\r\n").count() < n {
                let read = socket.read(&mut buf).await.unwrap();
                assert!(read > 0, "the client closed early");
                seen.extend_from_slice(&buf[..read]);
            }
            let seen = String::from_utf8(seen).unwrap();
            socket.write_all(&answer(&seen)).await.unwrap();
            seen
        });
        (addr, task)
    }

    /// A peer that answers the first of three pipelined requests and hangs
    /// up: the other two fail as `Closed`, for the caller to send again.
    #[tokio::test]
    async fn requests_left_unanswered_by_a_closing_peer_fail_as_closed() {
        let (addr, peer) = peer(3, |_| b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()).await;
        let pipes = Pipes::new(Duration::from_secs(5), Duration::from_secs(5));
        let put = |k: &str| request("PUT", "x", &format!("/kv/{k}"), None, b"{}");
        let (a, b, c) = tokio::join!(
            pipes.send(&addr, put("a")),
            pipes.send(&addr, put("b")),
            pipes.send(&addr, put("c"))
        );
        assert_eq!(a.unwrap().status, StatusCode::NO_CONTENT);
        assert!(matches!(b, Err(PipeError::Closed)), "{b:?}");
        assert!(matches!(c, Err(PipeError::Closed)), "{c:?}");
        let sent = peer.await.unwrap();
        assert!(
            sent.starts_with(
                "PUT /kv/a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}PUT /kv/b"
            ),
            "{sent}"
        );
    }

    /// A peer on a fresh port that takes every connection it is given
    /// and answers each request 5 ms after the one before it on that
    /// connection (a durable node's commit); it counts the connections.
    async fn slow_peer() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                    loop {
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let answer = b"HTTP/1.1 204 No Content\r\n\r\n";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    /// Sends `n` GETs at once; every one must be answered.
    async fn at_once(pipes: &Pipes, addr: &str, n: usize) {
        let get = |i: usize| request("GET", "x", &format!("/{i}"), None, &[]);
        let sends = (0..n).map(|i| pipes.send(addr, get(i)));
        for answer in futures::future::join_all(sends).await {
            assert_eq!(answer.unwrap().status, StatusCode::NO_CONTENT);
        }
    }

    #[tokio::test]
    async fn a_pool_opens_connections_as_its_shape_says() {
        let timeout = Duration::from_secs(5);
        // By default 16 requests share a connection; the 17th opens another.
        let (addr, connections) = slow_peer().await;
        let pipes = Pipes::new(timeout, timeout);
        at_once(&pipes, &addr, 16).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        at_once(&pipes, &addr, 17).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        // At most 4 connections, however many wait.
        at_once(&pipes, &addr, 100).await;
        assert_eq!(connections.load(Ordering::SeqCst), 4);

        // A depth of one: a connection for each request in flight, up to
        // the limit, and the idle ones are used again.
        let (addr, connections) = slow_peer().await;
        let pipes = Pipes::new(timeout, timeout).shaped(8, 1);
        at_once(&pipes, &addr, 6).await;
        assert_eq!(connections.load(Ordering::SeqCst), 6);
        at_once(&pipes, &addr, 6).await;
        assert_eq!(connections.load(Ordering::SeqCst), 6);
        at_once(&pipes, &addr, 20).await;
        assert_eq!(connections.load(Ordering::SeqCst), 8);
    }

    /// A peer answering two pipelined GETs with one write, in order.
    #[tokio::test]
    async fn pipelined_requests_get_their_own_answers_in_order() {
        let (addr, peer) = peer(2, |seen| {
            let mut answers = Vec::new();
            for head in seen.split("\r\n\r\n") {
                if let Some(path) = head.split_whitespace().nth(1) {
                    answers.extend_from_slice(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                            path.len()
                        )
                        .as_bytes(),
                    );
                }
            }
            answers
        })
        .await;
        let pipes = Pipes::new(Duration::from_secs(5), Duration::from_secs(5));
        let get = |k: &str| request("GET", "x", &format!("/{k}"), None, &[]);
        let (a, b) = tokio::join!(pipes.send(&addr, get("a")), pipes.send(&addr, get("b")));
        assert_eq!(a.unwrap().body, Bytes::from_static(b"/a"));
        assert_eq!(b.unwrap().body, Bytes::from_static(b"/b"));
        // The peer hung up: a request now fails as closed or refused.
        peer.await.unwrap();
        let late = pipes.send(&addr, get("c")).await;
        assert!(late.is_err(), "{late:?}");
    }
}
