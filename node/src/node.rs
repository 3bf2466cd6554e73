//! A node's state, shared by every request: who it is, the live map it
//! routes by, its storage, its peers, and the moves it takes part in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption, Guard};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::moves::{Incoming, MoveLock, Outgoing};
use crate::peers::PeerClient;
use crate::settings::Settings;
use crate::shard_map::ShardMap;
use crate::store::{Store, StoreError};

/// Record of the live map in a durable node's state.
pub(crate) const MAP_RECORD: &str = "map";
/// Record of the shard id a data directory belongs to.
pub(crate) const SHARD_RECORD: &str = "shard";

pub struct Node {
    id: u32,
    map: ArcSwap<ShardMap>,
    /// Serializes changes of the map (install and persist), never reads.
    map_changes: tokio::sync::Mutex<()>,
    /// Set once storage is open; until then key requests and `/readyz`
    /// answer 503, while `/healthz` already answers.
    store: OnceLock<Arc<dyn Store>>,
    pub(crate) peers: PeerClient,
    pub(crate) settings: Settings,
    pub(crate) metrics: Metrics,
    /// True once the node knows its map and its storage is open.
    started: AtomicBool,
    /// False once shutdown starts.
    serving: AtomicBool,
    /// The range this node is giving away, if any.
    pub(crate) outgoing: ArcSwapOption<Outgoing>,
    /// The range this node is taking, if any.
    pub(crate) incoming: ArcSwapOption<Incoming>,
    pub(crate) lock: MoveLock,
    /// Moves this node committed as a target, newest last.
    committed: std::sync::Mutex<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot build the peer HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Node {
    /// A node with its storage already open.
    pub fn new(
        map: ShardMap,
        id: u32,
        store: Arc<dyn Store>,
        settings: Settings,
    ) -> Result<Self, NodeError> {
        let node = Self::starting(map, id, settings)?;
        node.attach_store(store);
        node.set_started();
        Ok(node)
    }

    /// A node whose storage is still being opened (recovery can take a
    /// while); it can serve `/healthz` in the meantime.
    pub fn starting(map: ShardMap, id: u32, settings: Settings) -> Result<Self, NodeError> {
        let peers = PeerClient::new(id, &settings)?;
        Ok(Self {
            id,
            map: ArcSwap::from_pointee(map),
            map_changes: tokio::sync::Mutex::new(()),
            store: OnceLock::new(),
            peers,
            settings,
            metrics: Metrics::new(),
            started: AtomicBool::new(false),
            serving: AtomicBool::new(true),
            outgoing: ArcSwapOption::empty(),
            incoming: ArcSwapOption::empty(),
            lock: MoveLock::default(),
            committed: std::sync::Mutex::default(),
        })
    }

    /// Gives the node its storage (only the first call counts); keys are
    /// served once [`Node::set_started`] says the map is settled too.
    pub fn attach_store(&self, store: Arc<dyn Store>) {
        let _ = self.store.set(store);
    }

    /// The node knows its map and has resumed its moves: it serves keys.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// This node's shard id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The live map, for a quick look (no reference count).
    pub fn map(&self) -> Guard<Arc<ShardMap>> {
        self.map.load()
    }

    /// The live map, to keep across awaits.
    pub fn map_snapshot(&self) -> Arc<ShardMap> {
        self.map.load_full()
    }

    /// Whether the map gives this node any keys.
    pub fn is_assigned(&self) -> bool {
        self.map().is_owner(self.id)
    }

    /// The storage, once attached (moves and start-up use it before keys
    /// are served).
    pub fn store(&self) -> Result<&Arc<dyn Store>, ApiError> {
        self.store
            .get()
            .ok_or(ApiError::NotReady("storage is still opening".into()))
    }

    /// The storage, for serving keys: only once the node has started.
    pub fn serving_store(&self) -> Result<&Arc<dyn Store>, ApiError> {
        if !self.started.load(Ordering::Acquire) {
            return Err(ApiError::NotReady("the node is still starting".into()));
        }
        self.store()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn peers(&self) -> &PeerClient {
        &self.peers
    }

    /// Why the node should not get traffic now, if it should not: storage
    /// still opening or failing writes, shutdown under way.
    pub fn unready_reason(&self) -> Option<String> {
        if !self.serving.load(Ordering::Relaxed) {
            return Some("shutting down".into());
        }
        let store = match self.store.get() {
            None => return Some("storage is still opening".into()),
            Some(_) if !self.started.load(Ordering::Acquire) => {
                return Some("resuming moves and catching up with the peers' map".into());
            }
            Some(store) => store,
        };
        store.fault().map(|fault| match fault {
            StoreError::Full(_) => format!("storage is full: {fault}"),
            other => format!("storage is failing: {other}"),
        })
    }

    /// Called when shutdown starts, so `/readyz` turns load balancers away
    /// while requests keep being served.
    pub fn mark_not_ready(&self) {
        self.serving.store(false, Ordering::Relaxed);
    }

    /// Takes `next` as the live map if it is newer, persisting it first on
    /// a durable node (a restarted node must never fall back to an older
    /// map and serve keys it gave away). Returns whether it was taken.
    ///
    /// A map that would take keys away from this node is refused unless
    /// `handing_over` (a committing move) or this node holds no keys
    /// there: only a move hands data over.
    pub async fn install_map(&self, next: ShardMap, handing_over: bool) -> Result<bool, ApiError> {
        let _changing = self.map_changes.lock().await;
        let current = self.map_snapshot();
        if next.epoch <= current.epoch {
            return Ok(false);
        }
        next.validate()
            .map_err(|e| ApiError::InvalidMap(e.to_string()))?;
        if !handing_over {
            let store = self.store()?.clone();
            for change in current.changes_to(&next) {
                if change.from == Some(self.id) && change.to != Some(self.id) {
                    let held = crate::moves::read_page(&store, &change.span, None, 1, 1).await?;
                    if let Some(first) = held.entries.first() {
                        return Err(ApiError::MapRefused(format!(
                            "map epoch {} would take keys from shard {} that it still holds (for example {:?}); only a range move hands keys over",
                            next.epoch, self.id, first.key
                        )));
                    }
                }
            }
        }
        self.persist_map(&next, &[])?;
        tracing::info!(
            epoch = next.epoch,
            previous = current.epoch,
            assigned = next.is_owner(self.id),
            "new shard map"
        );
        self.map.store(Arc::new(next));
        Ok(true)
    }

    /// Saves `map` (and `extra` records, in the same synced write) on a
    /// durable node.
    pub(crate) fn persist_map(
        &self,
        map: &ShardMap,
        extra: &[(&str, Option<Vec<u8>>)],
    ) -> Result<(), ApiError> {
        let Some(state) = self.store()?.state() else {
            return Ok(());
        };
        let json = serde_json::to_vec(map).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut records: Vec<(&str, Option<Vec<u8>>)> = vec![
            (MAP_RECORD, Some(json)),
            (SHARD_RECORD, Some(self.id.to_string().into_bytes())),
        ];
        records.extend(extra.iter().cloned());
        state.save(&records).map_err(ApiError::Storage)
    }

    /// Swaps in a map this node has already persisted (a move's commit).
    pub(crate) fn set_map(&self, map: ShardMap) {
        self.map.store(Arc::new(map));
    }

    pub(crate) fn committed_moves(&self) -> Vec<String> {
        self.committed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_committed_moves(&self, ids: Vec<String>) {
        *self
            .committed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ids;
    }

    /// The moves this node takes part in.
    pub fn moves(&self) -> Vec<crate::moves::MoveStatus> {
        let mut moves = Vec::new();
        if let Some(out) = self.outgoing.load_full() {
            moves.push(out.status());
        }
        if let Some(inc) = self.incoming.load_full() {
            moves.push(inc.status());
        }
        moves
    }
}
