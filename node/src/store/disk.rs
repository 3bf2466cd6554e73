//! The durable engine: fjall (a pure-Rust LSM tree) with group commit.
//!
//! Every write goes to one writer thread. It takes whatever writes are
//! queued (up to `max_batch`), applies them as one atomic fjall batch whose
//! journal is fsynced before the batch becomes visible, then acknowledges
//! all of them. While one sync runs, the next writers queue up, so under
//! load many requests share one sync and an idle node still syncs each
//! write alone: a 2xx always means the write is on disk.
//!
//! The directory remembers which key range it was written for. Opening it
//! for a range that does not contain that one is refused, so a node never
//! silently serves (or hides) keys that another shard now owns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Entry, Store, StoreError, WriteAck};
use crate::keyspace::KeyRange;

const DATA: &str = "kv";
const META: &str = "meta";
const META_RANGE: &str = "range";

#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Directory of this shard's database (created if missing).
    pub dir: PathBuf,
    /// Most writes committed under one sync.
    pub max_batch: usize,
}

impl DiskOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_batch: 1024,
        }
    }
}

enum Op {
    Put(String, String),
    Delete(String),
}

struct Write {
    op: Op,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the directory records about the shard that wrote it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Owner {
    shard: u32,
    range_start: String,
    range_end: Option<String>,
}

impl Owner {
    fn range(&self) -> KeyRange {
        KeyRange::new(self.range_start.clone(), self.range_end.clone())
    }
}

pub struct DiskStore {
    data: Keyspace,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
    /// Synced commits so far; fewer than writes when writers share syncs.
    syncs: Arc<AtomicU64>,
}

fn err(context: &str, dir: &Path) -> impl FnOnce(fjall::Error) -> StoreError {
    let dir = dir.display().to_string();
    let context = context.to_owned();
    move |e| StoreError(format!("{context} {dir}: {e}"))
}

impl DiskStore {
    /// Opens (recovering from the journal) or creates the database of
    /// `shard` serving `range`. Blocking: call it off the async runtime.
    pub fn open(options: &DiskOptions, shard: u32, range: &KeyRange) -> Result<Self, StoreError> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let db = Database::builder(dir)
            .manual_journal_persist(true)
            .open()
            .map_err(err("cannot open data directory", dir))?;
        let data = db
            .keyspace(DATA, KeyspaceCreateOptions::default)
            .map_err(err("cannot open keyspace in", dir))?;
        let meta = db
            .keyspace(META, KeyspaceCreateOptions::default)
            .map_err(err("cannot open keyspace in", dir))?;
        check_owner(&db, &meta, dir, shard, range)?;

        let (tx, rx) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = std::thread::Builder::new()
            .name(format!("cavi-writer-{shard}"))
            .spawn({
                let (data, syncs) = (data.clone(), syncs.clone());
                move || write_loop(&db, &data, &rx, max_batch, &syncs)
            })
            .map_err(|e| StoreError(format!("cannot start the storage writer: {e}")))?;
        Ok(Self {
            data,
            writes: Some(tx),
            writer: Some(writer),
            syncs,
        })
    }

    /// Synced commits since the store was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn submit(&self, op: Op) -> WriteAck {
        let (done, ack) = oneshot::channel();
        let queued = self
            .writes
            .as_ref()
            .is_some_and(|w| w.send(Write { op, done }).is_ok());
        Box::pin(async move {
            if !queued {
                return Err(StoreError("the storage writer has stopped".into()));
            }
            ack.await
                .map_err(|_| StoreError("the storage writer stopped before syncing".into()))?
        })
    }
}

/// Records the range on first use; afterwards accepts only a range that
/// contains the recorded one (a shard may grow into unowned key space).
fn check_owner(
    db: &Database,
    meta: &Keyspace,
    dir: &Path,
    shard: u32,
    range: &KeyRange,
) -> Result<(), StoreError> {
    let wanted = Owner {
        shard,
        range_start: range.start.clone(),
        range_end: range.end.clone(),
    };
    let stored = meta
        .get(META_RANGE)
        .map_err(err("cannot read metadata in", dir))?
        .map(|raw| serde_json::from_slice::<Owner>(&raw))
        .transpose()
        .map_err(|e| StoreError(format!("metadata in {} is corrupt: {e}", dir.display())))?;
    if let Some(stored) = &stored {
        if stored == &wanted {
            return Ok(());
        }
        if stored.shard != shard || !stored.range().is_within(range) {
            return Err(StoreError(format!(
                "data directory {} was written by shard {} for range {}, but this node is shard {} serving {}; \
                 it would serve keys it no longer owns. Point --data-dir elsewhere or move the data first",
                dir.display(),
                stored.shard,
                stored.range(),
                shard,
                range
            )));
        }
    }
    let record = serde_json::to_vec(&wanted).map_err(|e| StoreError(e.to_string()))?;
    meta.insert(META_RANGE, record)
        .map_err(err("cannot write metadata in", dir))?;
    db.persist(PersistMode::SyncAll)
        .map_err(err("cannot sync metadata in", dir))?;
    Ok(())
}

fn write_loop(
    db: &Database,
    data: &Keyspace,
    queue: &mpsc::Receiver<Write>,
    max_batch: usize,
    syncs: &AtomicU64,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        let mut waiting = Vec::with_capacity(max_batch.min(64));
        let mut next = Some(first);
        while let Some(write) = next {
            match write.op {
                Op::Put(k, v) => batch.insert(data, k, v),
                Op::Delete(k) => batch.remove(data, k),
            }
            waiting.push(write.done);
            next = if waiting.len() < max_batch {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        let result = batch
            .commit()
            .map_err(|e| StoreError(format!("write not persisted: {e}")));
        match &result {
            Ok(()) => {
                syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!("{e}"),
        }
        tracing::trace!(writes = waiting.len(), "group commit");
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| StoreError("stored data is not UTF-8".into()))
}

impl Store for DiskStore {
    fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let value = self
            .data
            .get(key)
            .map_err(|e| StoreError(format!("read failed: {e}")))?;
        value.map(|v| utf8(&v)).transpose()
    }

    fn put(&self, key: &str, value: &str) -> WriteAck {
        self.submit(Op::Put(key.to_owned(), value.to_owned()))
    }

    fn delete(&self, key: &str) -> WriteAck {
        self.submit(Op::Delete(key.to_owned()))
    }

    fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.data
            .prefix(prefix)
            .take(limit)
            .map(|item| {
                let (k, v) = item
                    .into_inner()
                    .map_err(|e| StoreError(format!("scan failed: {e}")))?;
                Ok(Entry {
                    key: utf8(&k)?,
                    value: utf8(&v)?,
                })
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.data.approximate_len()
    }

    fn bytes(&self) -> u64 {
        self.data.disk_space()
    }
}

impl Drop for DiskStore {
    /// Closing the queue lets the writer finish what is queued and exit;
    /// joining it means a clean shutdown leaves nothing unsynced.
    fn drop(&mut self) {
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(
        dir: &Path,
        shard: u32,
        start: &str,
        end: Option<&str>,
    ) -> Result<DiskStore, StoreError> {
        DiskStore::open(&DiskOptions::new(dir), shard, &KeyRange::new(start, end))
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path(), 0, "a", Some("m")).expect("open");
            s.put("apple", "1").await.expect("put");
            s.put("avocado", "2").await.expect("put");
            s.put("banana", "3").await.expect("put");
            s.delete("avocado").await.expect("delete");
            s.delete("never-there").await.expect("delete");
        }
        let s = open(dir.path(), 0, "a", Some("m")).expect("reopen");
        assert_eq!(s.get("apple").expect("get").as_deref(), Some("1"));
        assert_eq!(s.get("avocado").expect("get"), None);
        let keys: Vec<String> = s
            .scan_prefix("a", 10)
            .expect("scan")
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["apple"]);
        assert_eq!(s.scan_prefix("", 1).expect("scan").len(), 1);
    }

    #[tokio::test]
    async fn concurrent_writers_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(open(dir.path(), 0, "", None).expect("open"));
        let acks: Vec<_> = (0..500).map(|i| s.put(&format!("k{i:04}"), "v")).collect();
        for ack in acks {
            ack.await.expect("put");
        }
        assert_eq!(s.scan_prefix("k", usize::MAX).expect("scan").len(), 500);
        // 500 writers queued at once: while one sync runs the rest queue up
        // and share the next ones.
        let syncs = s.syncs();
        assert!(
            (1..=50).contains(&syncs),
            "{syncs} syncs for 500 concurrent writes"
        );

        // A lone writer still gets a sync of its own before its answer.
        s.put("alone", "v").await.expect("put");
        assert_eq!(s.syncs(), syncs + 1);
    }

    #[test]
    fn a_directory_of_another_range_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path(), 0, "a", Some("m")).expect("open"));
        // Growing into unowned key space is fine.
        drop(open(dir.path(), 0, "", Some("m")).expect("wider range"));
        let shrunk = open(dir.path(), 0, "a", Some("f")).err().expect("refused");
        assert!(shrunk.0.contains("no longer owns"), "{shrunk}");
        let other = open(dir.path(), 1, "", Some("m")).err().expect("refused");
        assert!(other.0.contains("written by shard 0"), "{other}");
    }
}
