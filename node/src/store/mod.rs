//! Where a shard keeps its keys. The trait is the seam between the node and
//! its storage engines; every engine keeps keys ordered, so a prefix search
//! or a range copy is a range scan, never a full scan.

mod blocks;
mod disk;
mod memory;
mod readers;
pub(crate) mod sched;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use disk::{DiskOptions, DiskStore, Faults};
pub use memory::MemoryStore;
pub use readers::Readers;

use serde::{Deserialize, Serialize};

use crate::keyspace::Span;

/// One key and its value, as `/search` returns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

impl Entry {
    /// Key and value bytes: what a page budget counts.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// Why storage failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The disk is full: nothing more can be written until space is freed.
    #[error("the disk is full: {0}")]
    Full(String),
    /// Writes fail (I/O error, engine recovering); reads may still work.
    #[error("{0}")]
    Unavailable(String),
    /// The write queue is full: the disk cannot keep up with the writers.
    #[error("{0}")]
    Overloaded(String),
    /// Data or metadata that cannot be read back.
    #[error("{0}")]
    Corrupt(String),
}

/// Resolves once a write is applied and, for a durable engine, synced.
/// Boxed so the trait stays object-safe; writes are awaited rather than
/// blocking a runtime thread, which is what lets a disk engine gather
/// concurrent writers into one sync.
pub type WriteAck = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put(String, String),
    Delete(String),
}

impl WriteOp {
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put(k, _) | WriteOp::Delete(k) => k,
        }
    }

    /// Bytes this write holds while it waits in a queue.
    pub fn size(&self) -> usize {
        match self {
            WriteOp::Put(k, v) => k.len() + v.len(),
            WriteOp::Delete(k) => k.len(),
        }
    }
}

/// What a scan returns: keys in `span` that start with `prefix`, after
/// `after` (exclusive), at most `limit` entries and, past the first
/// entry, at most `max_bytes` of keys and values.
#[derive(Debug, Clone)]
pub struct ScanRequest<'a> {
    pub span: &'a Span,
    pub prefix: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
    pub max_bytes: usize,
}

/// One page of a scan: the entries in key order, and whether more follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Entry>,
    pub more: bool,
}

/// Where a scan starts: the greatest of the span's start, the prefix, and
/// just after `after`.
pub(crate) fn scan_start<'a>(req: &'a ScanRequest<'_>) -> (std::ops::Bound<&'a [u8]>, &'a [u8]) {
    use std::ops::Bound;
    let mut start: &[u8] = req.span.start.as_slice().max(req.prefix.as_bytes());
    match req.after {
        Some(after) if after.as_bytes() >= start => {
            start = after.as_bytes();
            (Bound::Excluded(start), start)
        }
        _ => (Bound::Included(start), start),
    }
}

/// Whether a scan that has reached `key` must stop: outside the span or
/// past the prefix.
fn scan_done(req: &ScanRequest<'_>, key: &[u8]) -> bool {
    !req.span.contains(key) || !key.starts_with(req.prefix.as_bytes())
}

/// One page of a scan, from a store's entries in key order from
/// [`scan_start`]: it ends where the scan does, and is full (`more` set)
/// at `limit` entries or at `max_bytes`, though never empty.
pub(crate) fn fill_page<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    req: &ScanRequest<'_>,
    entries: impl Iterator<Item = Result<(K, V), StoreError>>,
) -> Result<Page, StoreError> {
    let mut page = Page::default();
    let mut bytes = 0usize;
    for item in entries {
        let (key, value) = item?;
        if scan_done(req, key.as_ref()) {
            break;
        }
        if page.entries.len() >= req.limit || (!page.entries.is_empty() && bytes >= req.max_bytes) {
            page.more = true;
            break;
        }
        let entry = Entry {
            key: utf8(key.as_ref())?.to_owned(),
            value: utf8(value.as_ref())?.to_owned(),
        };
        bytes += entry.size();
        page.entries.push(entry);
    }
    Ok(page)
}

/// Stored bytes as text: everything stored came in as `&str`.
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(bytes).map_err(|_| StoreError::Corrupt("stored data is not UTF-8".into()))
}

/// Runs `read` against `store`, on the engine's reader threads when its
/// reads may wait for a disk, else right here.
pub async fn read_off_workers<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    store: &Arc<dyn Store>,
    read: impl FnOnce(&dyn Store) -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    let Some(readers) = store.readers() else {
        return read(store.as_ref());
    };
    let engine = store.clone();
    readers.run(move || read(engine.as_ref())).await?
}

/// A shard's ordered key-value storage.
pub trait Store: Send + Sync + 'static {
    /// Calls `found` with the value of `key` while it is borrowed from the
    /// engine, so the caller encodes it without a copy; `Ok(false)` when
    /// the key is missing.
    fn read(&self, key: &str, found: &mut dyn FnMut(&str)) -> Result<bool, StoreError>;

    fn put(&self, key: &str, value: &str) -> WriteAck;

    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> WriteAck;

    /// Applies `ops` in order, atomically for a durable engine.
    fn write(&self, ops: Vec<WriteOp>) -> WriteAck;

    /// Resolves once every write submitted before it has been applied.
    fn barrier(&self) -> WriteAck {
        self.write(Vec::new())
    }

    /// Installs (or removes) a tap that sees every write applied from
    /// now on, in the order the engine applies them; resolves once the
    /// writes submitted before it are applied, untapped.
    fn set_tap(&self, tap: Option<Arc<dyn Tap>>) -> WriteAck;

    fn scan(&self, request: &ScanRequest<'_>) -> Result<Page, StoreError>;

    /// The first `limit` keys held in `span`, without their values: what
    /// deleting a range needs.
    fn keys(&self, span: &Span, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Deletes the first `limit` keys of `span` in place and says how
    /// many, when this engine can drop a range without listing it;
    /// `None` when it cannot (or a tap must see each delete): the caller
    /// then lists the keys and writes their deletes.
    fn remove_range(&self, span: &Span, limit: usize) -> Option<Result<usize, StoreError>> {
        let _ = (span, limit);
        None
    }
    /// Keys held in `span`.
    fn count(&self, span: &Span) -> Result<u64, StoreError>;

    /// Keys held, exactly.
    fn len(&self) -> u64;

    /// Key and value bytes held, exactly.
    fn bytes(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The threads that run this engine's reads, when they may wait for a
    /// disk and so stay off the async workers; `None` to read in place.
    fn readers(&self) -> Option<&Readers> {
        None
    }

    /// Why writes fail right now, if they do (a full disk, an engine being
    /// reopened): `/readyz` reports it.
    fn fault(&self) -> Option<StoreError> {
        None
    }

    /// Durable node state (the live map, moves in progress) kept beside
    /// the data; `None` for an engine that keeps nothing across restarts.
    fn state(&self) -> Option<&dyn NodeState> {
        None
    }
}

/// Sees the writes an engine applies, in its order, from inside the
/// engine's own serialization (the memory engine's write lock, the disk
/// engine's writer thread): so a copy of a range plus the writes a tap saw
/// after it was installed is exactly the range. Must be quick.
pub trait Tap: Send + Sync {
    fn applied(&self, op: &WriteOp);
}

/// Told of every group commit a durable engine makes: how many key writes
/// it carried and how long the engine took to write, sync and apply it.
/// The node's metrics implement it; the engine knows nothing of them.
pub trait CommitObserver: Send + Sync {
    fn committed(&self, writes: usize, took: std::time::Duration);
}

/// Small records a durable node keeps about itself, written atomically
/// and synced before `save` returns.
pub trait NodeState: Send + Sync {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets (`Some`) or removes (`None`) every record, as one synced write.
    fn save(&self, records: &[(&str, Option<Vec<u8>>)]) -> Result<(), StoreError>;
}
