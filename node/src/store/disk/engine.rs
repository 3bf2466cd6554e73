//! The fjall database behind the store, and what the store keeps in it
//! besides the keys: the exact key and byte counts, and a recovery
//! probe's record. Opening it, counting what a data directory from before
//! the counts holds, and telling a full disk from another I/O error.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

const DATA: &str = "kv";
const META: &str = "meta";
/// Meta record holding the exact key and byte counts.
pub(super) const COUNTS: &str = "counts";
/// Meta record written by a recovery probe.
pub(super) const PROBE: &str = "probe";

/// The open database.
pub(super) struct Engine {
    pub(super) db: Database,
    pub(super) data: Keyspace,
    pub(super) meta: Keyspace,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Counts {
    pub(super) keys: u64,
    pub(super) bytes: u64,
}

pub(super) fn io_error(context: &str, dir: &Path, e: &fjall::Error) -> StoreError {
    let text = format!("{context} {}: {e}", dir.display());
    if is_disk_full(e) || nearly_full(dir) {
        StoreError::Full(text)
    } else {
        StoreError::Unavailable(text)
    }
}

/// Whether the filesystem of `dir` has less than 2% or 8 MiB free. The
/// engine's background flush can be the one that hits `ENOSPC`, and the
/// write that fails next only hears that the engine gave up; the free
/// space tells what happened.
fn nearly_full(dir: &Path) -> bool {
    let Some(existing) = dir.ancestors().find(|d| d.exists()) else {
        return false;
    };
    let Ok(fs) = rustix::fs::statvfs(existing) else {
        return false;
    };
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    free < (total / 50).max(8 << 20)
}

fn is_disk_full(e: &fjall::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
        {
            return true;
        }
        cause = c.source();
    }
    // fjall wraps some I/O errors in its own variants; the text still says.
    e.to_string().contains("No space left on device")
}

pub(super) fn open_engine(dir: &Path) -> Result<Engine, StoreError> {
    let db = Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .map_err(|e| io_error("cannot open data directory", dir, &e))?;
    let data = db
        .keyspace(DATA, KeyspaceCreateOptions::default)
        .map_err(|e| io_error("cannot open keyspace in", dir, &e))?;
    let meta = db
        .keyspace(META, KeyspaceCreateOptions::default)
        .map_err(|e| io_error("cannot open keyspace in", dir, &e))?;
    Ok(Engine { db, data, meta })
}

/// The exact counts: the committed record, or (a data directory from
/// before counts were kept) one pass over the keys, recorded at once.
pub(super) fn load_counts(engine: &Engine, dir: &Path) -> Result<Counts, StoreError> {
    if let Some(raw) = engine
        .meta
        .get(COUNTS)
        .map_err(|e| io_error("cannot read metadata in", dir, &e))?
    {
        return serde_json::from_slice(&raw).map_err(|e| {
            StoreError::Corrupt(format!("counts in {} are corrupt: {e}", dir.display()))
        });
    }
    let mut counts = Counts::default();
    for item in engine.data.iter() {
        let (k, v) = item
            .into_inner()
            .map_err(|e| io_error("cannot count the keys in", dir, &e))?;
        counts.keys += 1;
        counts.bytes += (k.len() + v.len()) as u64;
    }
    let record = serde_json::to_vec(&counts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    engine
        .meta
        .insert(COUNTS, record)
        .map_err(|e| io_error("cannot write metadata in", dir, &e))?;
    engine
        .db
        .persist(PersistMode::SyncAll)
        .map_err(|e| io_error("cannot sync metadata in", dir, &e))?;
    Ok(counts)
}
