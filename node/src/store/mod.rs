//! Where a shard keeps its keys. The trait is the seam between the HTTP
//! layer and storage engines; every implementation keeps keys ordered so a
//! prefix search is a range scan, not a full scan.

mod disk;
mod memory;

use std::future::Future;
use std::pin::Pin;

pub use disk::{DiskOptions, DiskStore};
pub use memory::MemoryStore;

use serde::{Deserialize, Serialize};

/// One key and its value, as `/search` returns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Resolves once a write is applied and, for a durable engine, synced.
/// Boxed so the trait stays object-safe; writes are awaited rather than
/// blocking a runtime thread, which is what lets a disk engine gather
/// concurrent writers into one sync.
pub type WriteAck = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A shard's ordered key-value storage.
///
/// Reads are synchronous: the memory engine never blocks and the disk
/// engine serves them from its memtable and caches.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<String>, StoreError>;
    fn put(&self, key: &str, value: &str) -> WriteAck;
    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> WriteAck;
    /// Up to `limit` entries whose key starts with `prefix`, sorted by key.
    fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// Number of keys stored; engines that cannot count cheaply estimate.
    fn len(&self) -> usize;
    /// Bytes held: key and value bytes in memory, the files on disk.
    fn bytes(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
