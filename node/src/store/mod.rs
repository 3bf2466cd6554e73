//! Where a shard keeps its keys. The trait is the seam between the HTTP
//! layer and storage engines; every implementation keeps keys ordered so a
//! prefix search is a range scan, not a full scan.

mod memory;

pub use memory::MemoryStore;

use serde::{Deserialize, Serialize};

/// One key and its value, as `/search` returns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// A shard's ordered key-value storage.
///
/// Methods are synchronous: the in-memory engine never blocks, and an engine
/// that does (disk) is expected to return only once the write is durable.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<String>, StoreError>;
    fn put(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Removes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Up to `limit` entries whose key starts with `prefix`, sorted by key.
    fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// Number of keys stored.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
