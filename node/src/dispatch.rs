//! The one place that decides "serve here or forward to the owner", between
//! the HTTP handlers and the store / peer client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::config::{ClusterConfig, ShardConfig};
use crate::error::ApiError;
use crate::metrics::{Metrics, status_label};
use crate::peers::{Caller, KvOp, PeerClient};
use crate::settings::Settings;
use crate::store::{Store, StoreError};

/// Everything a node serving one shard holds; shared by all requests.
pub struct Node {
    pub(crate) config: Arc<ClusterConfig>,
    pub(crate) me: ShardConfig,
    /// Set once storage is open; until then key requests and `/readyz`
    /// answer 503, while `/healthz` already answers.
    store: OnceLock<Arc<dyn Store>>,
    pub(crate) peers: PeerClient,
    pub(crate) settings: Settings,
    pub(crate) metrics: Metrics,
    ready: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("shard {0} is not in the config (known shards: {1})")]
    UnknownShard(u32, String),
    #[error("cannot build the peer HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Node {
    /// A node with its storage already open.
    pub fn new(
        config: Arc<ClusterConfig>,
        shard_id: u32,
        store: Arc<dyn Store>,
        settings: Settings,
    ) -> Result<Self, NodeError> {
        let node = Self::starting(config, shard_id, settings)?;
        node.attach_store(store);
        Ok(node)
    }

    /// A node whose storage is still being opened (recovery can take a
    /// while); it can serve `/healthz` in the meantime.
    pub fn starting(
        config: Arc<ClusterConfig>,
        shard_id: u32,
        settings: Settings,
    ) -> Result<Self, NodeError> {
        let me = config.shard(shard_id).cloned().ok_or_else(|| {
            let known: Vec<String> = config.shards.iter().map(|s| s.id.to_string()).collect();
            NodeError::UnknownShard(shard_id, known.join(", "))
        })?;
        let peers = PeerClient::new(
            shard_id,
            settings.peer_connect_timeout,
            settings.peer_request_timeout,
        )?;
        Ok(Self {
            config,
            me,
            store: OnceLock::new(),
            peers,
            settings,
            metrics: Metrics::new(),
            ready: AtomicBool::new(true),
        })
    }

    /// Makes the node ready to serve keys. Only the first call counts.
    pub fn attach_store(&self, store: Arc<dyn Store>) {
        let _ = self.store.set(store);
    }

    pub fn shard(&self) -> &ShardConfig {
        &self.me
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn store(&self) -> Result<&dyn Store, ApiError> {
        self.store
            .get()
            .map(|s| s.as_ref())
            .ok_or(ApiError::NotReady("storage is still opening"))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.store.get().is_some()
    }

    /// Called when shutdown starts, so `/readyz` turns load balancers away
    /// while in-flight requests finish.
    pub fn mark_not_ready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Size limits on the key, enforced by the entry node before anything
    /// else happens.
    pub fn check_key(&self, key: &str) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::InvalidKey("key must not be empty".into()));
        }
        let limit = self.settings.max_key_bytes;
        if key.len() > limit {
            return Err(ApiError::KeyTooLarge {
                len: key.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Serves a key operation here if this shard owns the key, otherwise
    /// proxies it to the owner, unless it was already proxied once.
    pub async fn execute(
        &self,
        key: &str,
        op: KvOp,
        caller: &Caller,
    ) -> Result<Response, ApiError> {
        self.check_key(key)?;
        if let KvOp::Put(value) = &op {
            let limit = self.settings.max_value_bytes;
            if value.len() > limit {
                return Err(ApiError::ValueTooLarge {
                    len: value.len(),
                    limit,
                });
            }
        }
        if self.me.owns(key) {
            return self.apply_local(key, op).await;
        }
        if let Some(by) = &caller.forwarded_by {
            return Err(ApiError::Misdirected {
                key: key.to_owned(),
                me: self.me.id,
                by: by.clone(),
            });
        }
        let owner = self
            .config
            .owner_of(key)
            .ok_or_else(|| ApiError::KeyOutOfRange(key.to_owned()))?;
        tracing::debug!(key, owner = owner.id, "forwarding");
        let answer = self
            .peers
            .forward(owner, key, &op, caller.request_id.as_ref())
            .await;
        let outcome = match &answer {
            Ok(response) => status_label(response.status().as_u16()),
            Err(e) => e.code(),
        };
        self.metrics.record_peer(owner.id, "kv", outcome);
        answer.map_err(|source| ApiError::Peer {
            shard: owner.id,
            addr: owner.addr.clone(),
            source,
        })
    }

    async fn apply_local(&self, key: &str, op: KvOp) -> Result<Response, ApiError> {
        let store = self.store()?;
        match op {
            KvOp::Get => match store.get(key).map_err(storage)? {
                Some(value) => Ok(Json(value).into_response()),
                None => Err(ApiError::KeyNotFound(key.to_owned())),
            },
            KvOp::Put(value) => {
                store.put(key, &value).await.map_err(storage)?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            KvOp::Delete => {
                store.delete(key).await.map_err(storage)?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
    }
}

pub(crate) fn storage(e: StoreError) -> ApiError {
    ApiError::Storage(e.0)
}
