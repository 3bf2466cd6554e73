//! Routing by the live map, as Redis Cluster and TiKV clients do: the map
//! (with its epoch) comes from any node, each key goes straight to its
//! owner, and the map is fetched again when a node answers `421` or names
//! a newer epoch. Without direct routing (a `kubectl port-forward`, where
//! the shards' addresses do not resolve) every request goes to the entry
//! node, which forwards it. A shard that cannot be reached at its address
//! is asked through the entry node instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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

/// Sends each key to its owner. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Router {
    entry: Client,
    direct: bool,
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
            map: RwLock::new(None),
            clients: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
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

    /// The node to ask for `key`: its owner by the map, or the entry node.
    async fn node_for(&self, key: &str) -> Client {
        if !self.direct {
            return self.entry.clone();
        }
        if self.map().is_none() {
            self.refresh(&self.entry, None).await;
        }
        let Some(map) = self.map() else {
            return self.entry.clone();
        };
        let Some(owner) = map.owner_of(key) else {
            return self.entry.clone();
        };
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry(owner.addr.clone())
            .or_insert_with(|| self.entry.for_addr(&owner.addr, self.entry.timeout()))
            .clone()
    }

    /// Runs `op` on `key` at its owner: once more after a `421` (with the
    /// newer map), through the entry node when the owner cannot be reached.
    pub async fn call(&self, key: &str, op: Op<'_>) -> Result<Vec<u8>, ClientError> {
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
