//! The writer thread: it takes whatever writes are queued, commits them as
//! one synced fjall batch with the counts, answers every one of them, and
//! after a failed commit reopens the database until a probe write works.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::PersistMode;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::engine::{COUNTS, Counts, Engine, PROBE, io_error, load_counts, open_engine};
use super::sizes::RecentSizes;
use super::{DiskOptions, Faults, Shared};
use crate::store::sched::schedule_as_batch;
use crate::store::{CommitObserver, Readers, StoreError, Tap, WriteOp};

/// A lookup of a previous size that takes this long read the disk: the
/// memtable or a bloom filter answers in a few microseconds.
const SLOW_LOOKUP: Duration = Duration::from_micros(50);

/// Slow lookups a batch makes one after another before the rest of its
/// unknown keys are looked up on the readers at once. More than one, so
/// that a writer descheduled during a single lookup does not count as a
/// slow disk.
const LOOK_AHEAD_AFTER: u32 = 2;

/// A queued write's answer, and its room in the queue (given back once
/// the write is committed, not when the writer picks it up).
pub(super) struct Waiter {
    pub(super) done: oneshot::Sender<Result<(), StoreError>>,
    pub(super) _room: OwnedSemaphorePermit,
    pub(super) _bytes: OwnedSemaphorePermit,
}

pub(super) enum Msg {
    Write {
        ops: Vec<WriteOp>,
        waiter: Waiter,
    },
    SetTap {
        tap: Option<Arc<dyn Tap>>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Starts the writer thread on `queue`.
pub(super) fn spawn(
    shared: Arc<Shared>,
    options: &DiskOptions,
    counts: Counts,
    readers: Readers,
    queue: mpsc::Receiver<Msg>,
) -> Result<JoinHandle<()>, StoreError> {
    let writer = Writer {
        shared,
        max_batch: options.max_batch.max(1),
        counts,
        tap: None,
        commits: options.commits.clone(),
        recent: RecentSizes::new(options.recent_sizes_bytes),
        readers,
    };
    std::thread::Builder::new()
        .name("cavi-writer".into())
        .spawn(move || {
            if let Err(e) = schedule_as_batch() {
                tracing::info!("the storage writer keeps the default scheduling: {e}");
            }
            writer.run(&queue)
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the storage writer: {e}")))
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    max_batch: usize,
    counts: Counts,
    tap: Option<Arc<dyn Tap>>,
    /// Told of each commit.
    commits: Option<Arc<dyn CommitObserver>>,
    /// Sizes the writer wrote last, for the exact counts.
    recent: RecentSizes,
    /// The store's reader threads, for lookups ahead.
    readers: Readers,
}

impl Writer {
    fn run(mut self, queue: &mpsc::Receiver<Msg>) {
        let mut next = queue.recv().ok();
        while let Some(first) = next.take() {
            let mut ops: Vec<WriteOp> = Vec::new();
            let mut waiting = Vec::new();
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    Msg::Write { ops: o, waiter } => {
                        ops.extend(o);
                        waiting.push(waiter);
                    }
                    Msg::SetTap { tap, done } => {
                        // Writes before the tap commit first, untapped.
                        self.commit_and_answer(&mut ops, &mut waiting);
                        self.tap = tap;
                        let _ = done.send(Ok(()));
                    }
                }
                if waiting.len() < self.max_batch {
                    msg = queue.try_recv().ok();
                }
            }
            self.commit_and_answer(&mut ops, &mut waiting);
            next = queue.recv().ok();
        }
    }

    fn commit_and_answer(&mut self, ops: &mut Vec<WriteOp>, waiting: &mut Vec<Waiter>) {
        if waiting.is_empty() {
            return;
        }
        let batch = std::mem::take(ops);
        let result = self.commit(&batch);
        match &result {
            Ok(()) => {
                if let Some(tap) = &self.tap {
                    for op in &batch {
                        tap.applied(op);
                    }
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                self.shared.set_fault(Some(e.clone()));
            }
        }
        tracing::trace!(writes = waiting.len(), "group commit");
        for waiter in waiting.drain(..) {
            let _ = waiter.done.send(result.clone());
        }
        if result.is_err() {
            self.recover();
        }
    }

    fn commit(&mut self, batch: &[WriteOp]) -> Result<(), StoreError> {
        let shared = &self.shared;
        let dir = &shared.dir;
        let delay = shared.faults.commit_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let engine = shared.engine()?;
        if batch.is_empty() {
            return Ok(());
        }
        // Exact counts: each key's size before this batch, then after.
        // What the batch records in `recent` before its commit is
        // forgotten if the commit fails (see `recover`).
        let mut counts = self.counts;
        self.recent.make_room();
        let mut fjall_batch = engine.db.batch().durability(Some(PersistMode::SyncData));
        // Sizes looked up ahead, once this batch's lookups have been slow.
        let mut ahead: Option<HashMap<String, Option<u64>>> = None;
        let mut slow_lookups = 0;
        for (i, op) in batch.iter().enumerate() {
            let key = op.key();
            let after = match op {
                WriteOp::Put(k, v) => {
                    fjall_batch.insert(&engine.data, k.as_str(), v.as_str());
                    Some((k.len() + v.len()) as u64)
                }
                WriteOp::Delete(k) => {
                    fjall_batch.remove(&engine.data, k.as_str());
                    None
                }
            };
            let before = self.recent.replace(key, after, || {
                if let Some(size) = ahead.as_ref().and_then(|a| a.get(key)) {
                    return Ok(*size);
                }
                let started = Instant::now();
                let size = previous_size(&engine, key, &shared.faults, dir);
                if started.elapsed() >= SLOW_LOOKUP {
                    slow_lookups += 1;
                }
                size
            })?;
            if ahead.is_none() && slow_lookups >= LOOK_AHEAD_AFTER {
                shared.looked_ahead.fetch_add(1, Ordering::Relaxed);
                ahead = Some(self.look_ahead(&engine, &batch[i + 1..])?);
            }
            if let Some(b) = before {
                counts.keys -= 1;
                counts.bytes -= b;
            }
            if let Some(a) = after {
                counts.keys += 1;
                counts.bytes += a;
            }
        }
        let record = serde_json::to_vec(&counts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        fjall_batch.insert(&engine.meta, COUNTS, record);
        let started = Instant::now();
        // An injected failure strikes where a full disk would: after the
        // batch is built, at its journal write.
        shared.faults.fail_one("write not persisted in", dir)?;
        fjall_batch
            .commit()
            .map_err(|e| io_error("write not persisted in", dir, &e))?;
        if let Some(commits) = &self.commits {
            commits.committed(batch.len(), started.elapsed());
        }
        self.counts = counts;
        shared.keys.store(counts.keys, Ordering::Relaxed);
        shared.bytes.store(counts.bytes, Ordering::Relaxed);
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The sizes before this batch of the keys in `rest` that `recent`
    /// does not know, looked up on the reader threads, as many at once as
    /// there are. One after another in the writer, a batch of keys that
    /// are only on disk waits for each read in turn: on a disk that takes
    /// a millisecond a read, a thousand writes a second.
    fn look_ahead(
        &self,
        engine: &Arc<Engine>,
        rest: &[WriteOp],
    ) -> Result<HashMap<String, Option<u64>>, StoreError> {
        let mut keys: Vec<&str> = rest
            .iter()
            .map(WriteOp::key)
            .filter(|k| !self.recent.knows(k))
            .collect();
        // In key order, so that each reader reads nearby keys.
        keys.sort_unstable();
        keys.dedup();
        let mut ahead = HashMap::with_capacity(keys.len());
        if keys.is_empty() {
            return Ok(ahead);
        }
        let per_reader = keys.len().div_ceil(self.readers.threads());
        let reads: Vec<_> = keys
            .chunks(per_reader)
            .map(|chunk| {
                let keys: Vec<String> = chunk.iter().map(|k| (*k).to_owned()).collect();
                let (engine, shared) = (engine.clone(), self.shared.clone());
                move || {
                    keys.into_iter()
                        .map(|k| {
                            let size = previous_size(&engine, &k, &shared.faults, &shared.dir)?;
                            Ok((k, size))
                        })
                        .collect::<Result<Vec<_>, StoreError>>()
                }
            })
            .collect();
        for found in self.readers.run_all_blocking(reads)? {
            ahead.extend(found?);
        }
        Ok(ahead)
    }

    /// After a failed commit: fail what is queued meanwhile (the store's
    /// `submit` already refuses new writes while faulted), drop the
    /// database, reopen it with backoff and probe it with a synced write.
    fn recover(&mut self) {
        // The failed batch recorded sizes it may not have written.
        self.recent.clear();
        let shared = self.shared.clone();
        let mut wait = Duration::from_millis(100);
        loop {
            // Readers finish with the old engine before it is dropped, so
            // its directory lock is free for the reopen.
            let old = shared
                .engine
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(old) = old {
                while Arc::strong_count(&old) > 1 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(old);
            }
            let attempt = open_engine(&shared.dir).and_then(|engine| {
                let counts = load_counts(&engine, &shared.dir)?;
                Ok((engine, counts))
            });
            match attempt {
                Ok((engine, counts)) => {
                    let probed = self.probe(&engine);
                    self.counts = counts;
                    shared.keys.store(counts.keys, Ordering::Relaxed);
                    shared.bytes.store(counts.bytes, Ordering::Relaxed);
                    // Reads work from the reopened engine even while writes
                    // still fail; the fault keeps writes away from it.
                    *shared
                        .engine
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(engine));
                    match probed {
                        Ok(()) => {
                            shared.set_fault(None);
                            tracing::info!(dir = %shared.dir.display(), "storage recovered: writes work again");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?wait, "storage still failing writes; reads are served");
                            shared.set_fault(Some(e));
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "storage still failing");
                    shared.set_fault(Some(e));
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn probe(&self, engine: &Engine) -> Result<(), StoreError> {
        let dir = &self.shared.dir;
        self.shared.faults.fail_one("probe write failed in", dir)?;
        let mut batch = engine.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&engine.meta, PROBE, "ok");
        batch
            .commit()
            .map_err(|e| io_error("probe write failed in", dir, &e))
    }
}

/// A key's size (key and value bytes) in the engine, `None` if absent.
fn previous_size(
    engine: &Engine,
    key: &str,
    faults: &Faults,
    dir: &Path,
) -> Result<Option<u64>, StoreError> {
    faults.slow_lookup();
    Ok(engine
        .data
        .size_of(key)
        .map_err(|e| io_error("cannot read", dir, &e))?
        .map(|v| u64::from(v) + key.len() as u64))
}
