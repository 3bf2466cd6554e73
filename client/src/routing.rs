//! Routing by the live map, as Redis Cluster and TiKV clients do: the map
//! (with its epoch) comes from any node, each key goes straight to its
//! owner, and the map is fetched again when a node answers `421` or names
//! a newer epoch. Without direct routing (a `kubectl port-forward`, where
//! the shards' addresses do not resolve) every request goes to the entry
//! node, which forwards it. A shard that cannot be reached at its address
//! is asked through the entry node instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use cavi_node::shard_map::ShardMap;
use cavi_node::wire::EPOCH_HEADER;
use reqwest::header::HeaderMap;

use crate::{Client, ClientError};

/// A key operation.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    Get,
    Put(&'a str),
    Delete,
}

/// How a router retries a key operation the cluster could not serve just
/// then: a `503` (a shard restarting or draining, a range in the pause of
/// a move, a full write queue, a storage fault) or no answer at all. A
/// GET, PUT or DELETE of one key is idempotent, so a retry cannot apply a
/// change twice; as with any retrying client, a PUT whose answer was lost
/// and that is sent again may land after another client's later write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1: no retry).
    pub attempts: u32,
    /// The wait before the first retry; doubled for each next one.
    pub first_backoff: Duration,
    /// The longest wait, `Retry-After` included.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub const NONE: Self = Self {
        attempts: 1,
        first_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };

    /// Whether `e` is worth another try.
    fn retriable(e: &ClientError) -> bool {
        matches!(
            e,
            ClientError::Server { status: 503, .. } | ClientError::Unreachable { .. }
        )
    }

    /// The wait before retry number `n` (from 1) after `e`: the server's
    /// `Retry-After` or the doubled backoff, at most `max_backoff`, with
    /// jitter so that clients turned away together do not return together.
    fn wait(&self, n: u32, e: &ClientError) -> Duration {
        let base = match e {
            ClientError::Server {
                retry_after: Some(after),
                ..
            } => *after,
            _ => self.first_backoff.saturating_mul(1 << (n - 1).min(16)),
        };
        let base = base.min(self.max_backoff);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Between half and all of `base`.
        base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }
}

/// Sends each key to its owner. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Router {
    entry: Client,
    direct: bool,
    retry: RetryPolicy,
    map: RwLock<Option<Arc<ShardMap>>>,
    /// One client per shard address (they share one connection pool).
    clients: Mutex<HashMap<String, Client>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Router {
    /// Routes through `entry` only (`direct = false`) or straight to the
    /// owners.
    pub fn new(entry: Client, direct: bool) -> Self {
        Self {
            entry,
            direct,
            retry: RetryPolicy::default(),
            map: RwLock::new(None),
            clients: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Retries as `policy` says instead of the default.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    pub fn entry(&self) -> &Client {
        &self.entry
    }

    /// The map this router holds, if it fetched one.
    pub fn map(&self) -> Option<Arc<ShardMap>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fetches the map from `from` and keeps it if it is newer.
    async fn refresh(&self, from: &Client, seen: Option<u64>) {
        let _one_at_a_time = self.refreshing.lock().await;
        let current = self.map().map(|m| m.epoch);
        if let (Some(cur), Some(seen)) = (current, seen)
            && cur >= seen
        {
            return;
        }
        let fetched = match from.map().await {
            Ok(map) => Some(map),
            Err(_) => self.entry.map().await.ok(),
        };
        if let Some(map) = fetched
            && current.is_none_or(|cur| map.epoch > cur)
        {
            *self.map.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(map));
        }
    }

    /// The `host:port` that `key` goes to: its owner's by the map, or the
    /// entry node's.
    pub async fn addr_for(&self, key: &str) -> String {
        if self.direct {
            if self.map().is_none() {
                self.refresh(&self.entry, None).await;
            }
            if let Some(owner) = self.map().as_deref().and_then(|m| m.owner_of(key)) {
                return owner.addr.clone();
            }
        }
        self.entry.addr().to_owned()
    }

    /// An answer named map epoch `epoch`: fetch the map if that is newer
    /// than the one held.
    pub async fn saw_epoch(&self, epoch: u64) {
        if self.direct && self.map().is_some_and(|m| m.epoch < epoch) {
            self.refresh(&self.entry, Some(epoch)).await;
        }
    }

    /// The node to ask for `key`: its owner by the map, or the entry node.
    async fn node_for(&self, key: &str) -> Client {
        let addr = self.addr_for(key).await;
        if addr == self.entry.addr() {
            return self.entry.clone();
        }
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry(addr)
            .or_insert_with_key(|addr| self.entry.for_addr(addr, self.entry.timeout()))
            .clone()
    }

    /// Runs `op` on `key` at its owner, retried as the policy says.
    pub async fn call(&self, key: &str, op: Op<'_>) -> Result<Vec<u8>, ClientError> {
        let mut n = 1;
        loop {
            match self.call_once(key, op).await {
                Err(e) if n < self.retry.attempts && RetryPolicy::retriable(&e) => {
                    tokio::time::sleep(self.retry.wait(n, &e)).await;
                    n += 1;
                }
                answer => return answer,
            }
        }
    }

    /// Runs `op` on `key` at its owner: once more after a `421` (with the
    /// newer map), through the entry node when the owner cannot be reached.
    async fn call_once(&self, key: &str, op: Op<'_>) -> Result<Vec<u8>, ClientError> {
        let node = self.node_for(key).await;
        let first = node.kv(key, op).await;
        let answer = match first {
            Err(ClientError::Server {
                status: 421, epoch, ..
            }) if self.direct => {
                self.refresh(&node, epoch.or(Some(u64::MAX))).await;
                self.node_for(key).await.kv(key, op).await
            }
            Err(ClientError::Unreachable { .. }) if node.endpoint() != self.entry.endpoint() => {
                self.entry.kv(key, op).await
            }
            other => other,
        };
        let (headers, body) = answer?;
        self.note_epoch(&node, &headers).await;
        Ok(body)
    }

    /// A forwarded answer names the entry's epoch: newer than ours means
    /// the map moved on.
    async fn note_epoch(&self, node: &Client, headers: &HeaderMap) {
        if !self.direct {
            return;
        }
        let seen = headers
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(seen) = seen
            && self.map().is_some_and(|m| m.epoch < seen)
        {
            self.refresh(node, Some(seen)).await;
        }
    }

    pub async fn get(&self, key: &str) -> Result<String, ClientError> {
        let body = self.call(key, Op::Get).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse {
            endpoint: self.entry.endpoint().to_owned(),
            detail: e.to_string(),
        })
    }

    pub async fn put(&self, key: &str, value: &str) -> Result<(), ClientError> {
        self.call(key, Op::Put(value)).await.map(drop)
    }

    pub async fn delete(&self, key: &str) -> Result<(), ClientError> {
        self.call(key, Op::Delete).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable(retry_after: Option<Duration>) -> ClientError {
        ClientError::Server {
            status: 503,
            code: "peer_unavailable".into(),
            sentence: "shard 1 is restarting".into(),
            epoch: None,
            retry_after,
        }
    }

    #[test]
    fn only_unavailable_and_unreachable_are_retried() {
        assert!(RetryPolicy::retriable(&unavailable(None)));
        assert!(RetryPolicy::retriable(&ClientError::Unreachable {
            endpoint: "http://x:1".into(),
            reason: "connection refused".into(),
        }));
        let missing = ClientError::Server {
            status: 404,
            code: "key_not_found".into(),
            sentence: "no".into(),
            epoch: None,
            retry_after: None,
        };
        assert!(!RetryPolicy::retriable(&missing));
        assert!(!RetryPolicy::retriable(&ClientError::Input("bad".into())));
    }

    #[test]
    fn waits_double_honour_retry_after_and_stay_capped() {
        let p = RetryPolicy::default();
        for n in 1..=8 {
            let full = (p.first_backoff * (1 << (n - 1))).min(p.max_backoff);
            let w = p.wait(n, &unavailable(None));
            assert!(w >= full / 2 && w <= full, "retry {n}: {w:?} vs {full:?}");
        }
        let w = p.wait(1, &unavailable(Some(Duration::from_secs(1))));
        assert!(
            w >= Duration::from_millis(500) && w <= Duration::from_secs(1),
            "{w:?}"
        );
        let w = p.wait(1, &unavailable(Some(Duration::from_secs(60))));
        assert!(w <= p.max_backoff, "{w:?}");
    }
}
