//! Test harness (feature `testkit`, for this workspace's tests only): real
//! nodes on `127.0.0.1:0` listeners inside the test process, peers that are
//! dead (refuse connections) or hung (accept and never answer), real
//! `kvstore-api` processes, and a small HTTP client speaking the wire
//! format. Panics are its error handling: it runs inside tests.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod fuzz;
pub mod process;
pub mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ClusterConfig, ShardConfig};
use crate::node::Node;
use crate::server::{ServeOptions, serve};
use crate::settings::Settings;
use crate::shard_map::ShardMap;
use crate::store::MemoryStore;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Path-segment escaping: `/` and everything else reserved is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub type Range = (&'static str, Option<&'static str>);

/// The seed's layout: a..m and n..z.
pub const SEED: [Range; 2] = [("a", Some("m")), ("n", Some("z"))];

/// Settings with short peer timeouts so fault tests stay quick.
pub fn fast_settings() -> Settings {
    Settings {
        peer_connect_timeout: Duration::from_millis(500),
        peer_request_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_secs(5),
        ..Settings::default()
    }
}

pub async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

pub fn layout(ranges: &[Range], addrs: &[SocketAddr]) -> ClusterConfig {
    let shards = ranges
        .iter()
        .zip(addrs)
        .enumerate()
        .map(|(i, ((start, end), addr))| ShardConfig {
            id: i as u32,
            addr: addr.to_string(),
            range_start: (*start).to_owned(),
            range_end: end.map(str::to_owned),
        })
        .collect();
    let config = ClusterConfig { epoch: 0, shards };
    config.validate().unwrap();
    config
}

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value this node's own store holds for `key`, read directly.
    pub fn stored(&self, key: &str) -> Option<String> {
        stored(&self.node, key)
    }

    /// Graceful stop: waits until in-flight requests have finished.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

pub fn spawn_node(
    listener: TcpListener,
    config: ClusterConfig,
    id: u32,
    settings: Settings,
) -> TestNode {
    let node = Arc::new(
        Node::new(
            ShardMap::from_config(&config),
            id,
            Arc::new(MemoryStore::new()),
            settings,
        )
        .unwrap(),
    );
    serving(listener, node)
}

/// Serves `node` on `listener` until the returned handle is stopped.
fn serving(listener: TcpListener, node: Arc<Node>) -> TestNode {
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(
        listener,
        node.clone(),
        async move {
            let _ = rx.await;
        },
        ServeOptions::default(),
    ));
    TestNode {
        addr,
        node,
        stop: Some(tx),
        handle: Some(handle),
    }
}

/// The value `node`'s own store holds for `key`, read directly.
pub fn stored(node: &Node, key: &str) -> Option<String> {
    let mut found = None;
    node.store()
        .unwrap()
        .read(key, &mut |v| found = Some(v.to_owned()))
        .unwrap();
    found
}

/// A node that starts as `kvstore-api` does: it takes a newer map from its
/// peers before it serves (a restarted pod of a running cluster).
pub async fn spawn_node_booted(
    listener: TcpListener,
    config: ClusterConfig,
    id: u32,
    settings: Settings,
) -> TestNode {
    let node = Arc::new(Node::starting(ShardMap::from_config(&config), id, settings).unwrap());
    node.attach_store(Arc::new(MemoryStore::new()));
    crate::boot::catch_up(&node, Duration::from_secs(1)).await;
    node.set_started();
    serving(listener, node)
}

/// What stands at a shard's address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Node,
    /// Nothing listens: connections are refused.
    Dead,
    /// Accepts connections and never answers.
    Hung,
}

pub struct Cluster {
    pub config: ClusterConfig,
    /// Running nodes, `None` where the member is dead or hung.
    pub nodes: Vec<Option<TestNode>>,
    pub client: Client,
    hung: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &self.hung {
            h.abort();
        }
    }
}

impl Cluster {
    pub async fn start(ranges: &[Range]) -> Self {
        let members = vec![Member::Node; ranges.len()];
        Self::start_with(ranges, &members, fast_settings()).await
    }

    pub async fn start_with(ranges: &[Range], members: &[Member], settings: Settings) -> Self {
        let mut listeners = Vec::new();
        for _ in ranges {
            listeners.push(bind().await);
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, a)| *a).collect();
        let config = layout(ranges, &addrs);
        let mut nodes = Vec::new();
        let mut hung = Vec::new();
        for (i, ((listener, _), member)) in listeners.into_iter().zip(members).enumerate() {
            match member {
                Member::Node => nodes.push(Some(spawn_node(
                    listener,
                    config.clone(),
                    i as u32,
                    settings.clone(),
                ))),
                Member::Dead => {
                    drop(listener);
                    nodes.push(None);
                }
                Member::Hung => {
                    hung.push(hang(listener));
                    nodes.push(None);
                }
            }
        }
        Self {
            config,
            nodes,
            client: Client::new(),
            hung,
        }
    }

    pub fn node(&self, i: usize) -> &TestNode {
        self.nodes[i]
            .as_ref()
            .expect("a running node at this index")
    }

    pub fn url(&self, i: usize) -> String {
        self.node(i).url()
    }
}

/// Accepts every connection and holds it open without reading or writing.
pub fn hang(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    })
}

/// xorshift64*: a reproducible schedule from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A seed from the environment variable `name` (to replay a run), else
/// from the clock; printed so a failure can be replayed.
pub fn seed(name: &str) -> u64 {
    let seed = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("{name}={seed}");
    seed
}

/// An answer: status, headers, and the body parsed as JSON (Null if empty).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The `code` of a JSON error body, asserting the error shape.
    pub fn code(&self) -> &str {
        let error = self.body["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "error body lacks a sentence: {self:?}");
        self.body["code"].as_str().expect("error body has a code")
    }

    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    pub fn keys(&self) -> Vec<String> {
        self.body
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {self:?}"))
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .unwrap(),
        }
    }

    /// The URL of a key: `/kv/{key}`, or `/kv?key=` for `.` and `..`,
    /// which URL libraries rewrite as path segments even when escaped.
    pub fn kv(base: &str, key: &str) -> String {
        if key == "." || key == ".." {
            return format!("{base}/kv?key={}", utf8_percent_encode(key, SEGMENT));
        }
        format!("{base}/kv/{}", utf8_percent_encode(key, SEGMENT))
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let r = req.send().await.expect("the node answers");
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("a complete body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("body is not JSON ({e}): {bytes:?}"))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A request that may fail in transport: `(status, JSON body)` or the
    /// transport error in words.
    pub async fn try_send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), String> {
        let r = req.send().await.map_err(|e| {
            if e.is_timeout() {
                "timeout".to_owned()
            } else if e.is_connect() {
                "connect".to_owned()
            } else {
                "transport".to_owned()
            }
        })?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|_| "body".to_owned())?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn try_put(
        &self,
        base: &str,
        key: &str,
        value: &str,
    ) -> Result<(StatusCode, Value), String> {
        let body = serde_json::json!({ "value": value }).to_string();
        self.try_send(
            self.http
                .put(Self::kv(base, key))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn try_get(&self, base: &str, key: &str) -> Result<(StatusCode, Value), String> {
        self.try_send(self.http.get(Self::kv(base, key))).await
    }

    pub async fn try_delete(&self, base: &str, key: &str) -> Result<(StatusCode, Value), String> {
        self.try_send(self.http.delete(Self::kv(base, key))).await
    }

    pub async fn put(&self, base: &str, key: &str, value: &str) -> Answer {
        let body = serde_json::json!({ "value": value }).to_string();
        self.send(
            self.http
                .put(Self::kv(base, key))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn get(&self, base: &str, key: &str) -> Answer {
        self.send(self.http.get(Self::kv(base, key))).await
    }

    pub async fn delete(&self, base: &str, key: &str) -> Answer {
        self.send(self.http.delete(Self::kv(base, key))).await
    }

    pub async fn search(&self, base: &str, query: &str) -> Answer {
        self.send(self.http.get(format!("{base}/search?{query}")))
            .await
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self, base: &str) -> String {
        let r = self
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap()
    }
}

/// The value of one series (its name with its labels, as the node writes
/// them) in a `/metrics` text, if it is there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
