//! The durable engine: fjall (a pure-Rust LSM tree) with group commit.
//!
//! Every write goes to one writer thread. It takes whatever writes are
//! queued (up to `max_batch`), applies them as one atomic fjall batch whose
//! journal is synced before the batch becomes visible, then acknowledges
//! all of them. While one sync runs, the next writers queue up, so under
//! load many requests share one sync and an idle node still syncs each
//! write alone: a 2xx always means the write is on disk.
//!
//! The queue is bounded in writes and bytes: when the disk cannot keep
//! up, a writer waits for room up to `queue_timeout` and then fails with
//! [`StoreError::Overloaded`], so a flood cannot grow memory without limit.
//!
//! A failed commit (a full disk, an I/O error) leaves fjall refusing every
//! later write. The writer then marks the store faulted (writes fail at
//! once with the reason, `/readyz` reports it), drops the database and
//! reopens it with backoff, probing with a synced write; once that works
//! the fault clears. Everything committed before the fault was synced and
//! is read back by the reopen.
//!
//! Key and byte counts are exact: the writer knows each key's previous
//! size, and the counts are committed in the same batch as the writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{
    CommitObserver, NodeState, Page, ScanRequest, Store, StoreError, Tap, WriteAck, WriteOp,
    scan_done, scan_start,
};
use crate::keyspace::Span;
use crate::store::Entry;

const DATA: &str = "kv";
const META: &str = "meta";
/// Meta record holding the exact key and byte counts.
const COUNTS: &str = "counts";
/// Meta record written by a recovery probe.
const PROBE: &str = "probe";

#[derive(Clone)]
pub struct DiskOptions {
    /// Directory of this shard's database (created if missing).
    pub dir: PathBuf,
    /// Most writes committed under one sync.
    pub max_batch: usize,
    /// Most writes waiting for the writer.
    pub max_queued_writes: usize,
    /// Most key and value bytes waiting for the writer.
    pub max_queued_bytes: usize,
    /// How long a writer waits for room in a full queue.
    pub queue_timeout: Duration,
    /// Faults to inject, for tests of the fault handling.
    pub faults: Arc<Faults>,
    /// Told of each commit (the node's metrics).
    pub commits: Option<Arc<dyn CommitObserver>>,
}

impl std::fmt::Debug for DiskOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskOptions")
            .field("dir", &self.dir)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl DiskOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_batch: 1024,
            max_queued_writes: 16 * 1024,
            max_queued_bytes: 64 * 1024 * 1024,
            queue_timeout: Duration::from_secs(5),
            faults: Arc::default(),
            commits: None,
        }
    }
}

/// Injected faults: a delay before every commit (a slow disk) and a number
/// of commits to fail as if the disk were full. Zero by default.
#[derive(Debug, Default)]
pub struct Faults {
    pub commit_delay_ms: AtomicU64,
    pub failing_commits: AtomicU64,
}

impl Faults {
    /// In debug builds, `CAVI_DEBUG_COMMIT_DELAY_MS` slows every commit,
    /// so tests of real processes can stand in for a slow disk.
    pub fn from_env() -> Arc<Self> {
        let faults = Faults::default();
        if cfg!(debug_assertions)
            && let Some(ms) = std::env::var("CAVI_DEBUG_COMMIT_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
        {
            faults.commit_delay_ms.store(ms, Ordering::Relaxed);
        }
        Arc::new(faults)
    }
}

/// A queued write's answer, and its room in the queue (given back once
/// the write is committed, not when the writer picks it up).
struct Waiter {
    done: oneshot::Sender<Result<(), StoreError>>,
    _room: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

enum Msg {
    Write {
        ops: Vec<WriteOp>,
        waiter: Waiter,
    },
    SetTap {
        tap: Option<Arc<dyn Tap>>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// The open database.
struct Engine {
    db: Database,
    data: Keyspace,
    meta: Keyspace,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Counts {
    keys: u64,
    bytes: u64,
}

struct Shared {
    dir: PathBuf,
    /// `None` while the writer reopens the database.
    engine: RwLock<Option<Arc<Engine>>>,
    fault: Mutex<Option<StoreError>>,
    keys: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    faults: Arc<Faults>,
}

impl Shared {
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.engine
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the storage engine is being reopened".into()))
    }

    fn fault(&self) -> Option<StoreError> {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_fault(&self, fault: Option<StoreError>) {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner) = fault;
    }
}

pub struct DiskStore {
    shared: Arc<Shared>,
    writes: Option<mpsc::Sender<Msg>>,
    writer: Option<JoinHandle<()>>,
    room: Arc<Semaphore>,
    room_bytes: Arc<Semaphore>,
    max_queued_bytes: usize,
    queue_timeout: Duration,
}

fn io_error(context: &str, dir: &Path, e: &fjall::Error) -> StoreError {
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

fn open_engine(dir: &Path) -> Result<Engine, StoreError> {
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
fn load_counts(engine: &Engine, dir: &Path) -> Result<Counts, StoreError> {
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

impl DiskStore {
    /// Opens (recovering from the journal) or creates a database.
    /// Blocking: call it off the async runtime.
    pub fn open(options: &DiskOptions) -> Result<Self, StoreError> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let engine = open_engine(dir)?;
        let counts = load_counts(&engine, dir)?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            fault: Mutex::new(None),
            keys: AtomicU64::new(counts.keys),
            bytes: AtomicU64::new(counts.bytes),
            syncs: AtomicU64::new(0),
            faults: options.faults.clone(),
        });
        let (tx, rx) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("cavi-writer".into())
            .spawn({
                let shared = shared.clone();
                let commits = options.commits.clone();
                move || {
                    if let Err(e) = schedule_as_batch() {
                        tracing::info!("the storage writer keeps the default scheduling: {e}");
                    }
                    Writer::new(shared, max_batch, counts, commits).run(&rx)
                }
            })
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the storage writer: {e}"))
            })?;
        Ok(Self {
            shared,
            writes: Some(tx),
            writer: Some(writer),
            room: Arc::new(Semaphore::new(options.max_queued_writes.max(1))),
            room_bytes: Arc::new(Semaphore::new(options.max_queued_bytes.max(1))),
            max_queued_bytes: options.max_queued_bytes.max(1),
            queue_timeout: options.queue_timeout,
        })
    }

    /// Synced commits since the store was opened.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    fn send(&self, msg: Msg) -> bool {
        self.writes.as_ref().is_some_and(|w| w.send(msg).is_ok())
    }

    fn submit(&self, ops: Vec<WriteOp>) -> WriteAck {
        if let Some(fault) = self.shared.fault() {
            return Box::pin(std::future::ready(Err(fault)));
        }
        let bytes: usize = ops.iter().map(WriteOp::size).sum();
        let bytes = u32::try_from(bytes.min(self.max_queued_bytes)).unwrap_or(u32::MAX);
        let (done, ack) = oneshot::channel();
        // Fast path: room now, so the write is queued in call order.
        if let (Ok(room), Ok(room_bytes)) = (
            self.room.clone().try_acquire_owned(),
            self.room_bytes.clone().try_acquire_many_owned(bytes),
        ) {
            let sent = self.send(Msg::Write {
                ops,
                waiter: Waiter {
                    done,
                    _room: room,
                    _bytes: room_bytes,
                },
            });
            return Box::pin(async move {
                if !sent {
                    return Err(stopped());
                }
                ack.await.map_err(|_| stopped())?
            });
        }
        // Slow path: wait, in arrival order, for room.
        let (room, room_bytes) = (self.room.clone(), self.room_bytes.clone());
        let writes = self.writes.clone();
        let wait = self.queue_timeout;
        Box::pin(async move {
            let admitted = tokio::time::timeout(wait, async {
                let r = room.acquire_owned().await.ok()?;
                let b = room_bytes.acquire_many_owned(bytes).await.ok()?;
                Some((r, b))
            })
            .await;
            let Ok(Some((r, b))) = admitted else {
                return Err(StoreError::Overloaded(format!(
                    "the write queue stayed full for {wait:?}: the disk cannot keep up"
                )));
            };
            let sent = writes.is_some_and(|w| {
                w.send(Msg::Write {
                    ops,
                    waiter: Waiter {
                        done,
                        _room: r,
                        _bytes: b,
                    },
                })
                .is_ok()
            });
            if !sent {
                return Err(stopped());
            }
            ack.await.map_err(|_| stopped())?
        })
    }
}

/// Puts the calling thread (the writer) under `SCHED_BATCH`, keeping its
/// nice value.
///
/// Why: a thread waking from a sync would otherwise preempt the request
/// handlers at once. Where the writer shares a core with them (a pod
/// limited to one CPU, the bench's pinned server), it then commits the
/// few writes queued during the sync while the handlers still hold more
/// in their sockets, and batches stay small: about 21 writes a commit at
/// 64 connections. A batch thread does not preempt on waking; it runs when
/// the handlers wait or their slice ends, and commits what they queued
/// meanwhile (about 28 a commit, measured). Its share of the CPU stays
/// what a normal thread's is, so writes are never starved. Where the
/// writer has a core of its own, nothing changes. Where the policy cannot
/// be set (another platform, a sandbox that forbids it), the writer runs
/// as before and the node logs why at start.
#[cfg(target_os = "linux")]
fn schedule_as_batch() -> Result<(), String> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    let nice = rustix::process::getpriority_process(None).map_err(|e| e.to_string())?;
    // The crate sets a normal policy's nice value from a point on its 0-99
    // scale: take the point that maps to this thread's own.
    let same = (0..=99u8)
        .filter_map(|v| ThreadPriorityValue::try_from(v).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|p| p.to_posix(policy).ok() == Some(nice))
        .ok_or_else(|| format!("no priority keeps the nice value {nice}"))?;
    set_thread_priority_and_policy(thread_native_id(), same, policy).map_err(|e| format!("{e:?}"))
}

#[cfg(not(target_os = "linux"))]
fn schedule_as_batch() -> Result<(), String> {
    Err("SCHED_BATCH is Linux's".into())
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the storage writer has stopped".into())
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    max_batch: usize,
    counts: Counts,
    tap: Option<Arc<dyn Tap>>,
    /// Told of each commit.
    commits: Option<Arc<dyn CommitObserver>>,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        max_batch: usize,
        counts: Counts,
        commits: Option<Arc<dyn CommitObserver>>,
    ) -> Self {
        Self {
            shared,
            max_batch,
            counts,
            tap: None,
            commits,
        }
    }

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
        if shared
            .faults
            .failing_commits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Full(format!(
                "write not persisted in {}: No space left on device (injected)",
                dir.display()
            )));
        }
        let engine = shared.engine()?;
        if batch.is_empty() {
            return Ok(());
        }
        // Exact counts: each key's size before this batch, then after.
        let mut sizes: HashMap<&str, Option<u64>> = HashMap::new();
        let mut counts = self.counts;
        let mut fjall_batch = engine.db.batch().durability(Some(PersistMode::SyncData));
        for op in batch {
            let key = op.key();
            let before = match sizes.get(key) {
                Some(size) => *size,
                None => engine
                    .data
                    .size_of(key)
                    .map_err(|e| io_error("cannot read", dir, &e))?
                    .map(|v| u64::from(v) + key.len() as u64),
            };
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
            if let Some(b) = before {
                counts.keys -= 1;
                counts.bytes -= b;
            }
            if let Some(a) = after {
                counts.keys += 1;
                counts.bytes += a;
            }
            sizes.insert(key, after);
        }
        let record = serde_json::to_vec(&counts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        fjall_batch.insert(&engine.meta, COUNTS, record);
        let started = Instant::now();
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

    /// After a failed commit: fail what is queued meanwhile (the store's
    /// `submit` already refuses new writes while faulted), drop the
    /// database, reopen it with backoff and probe it with a synced write.
    fn recover(&mut self) {
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
        if self
            .shared
            .faults
            .failing_commits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Full(format!(
                "probe write failed in {}: No space left on device (injected)",
                dir.display()
            )));
        }
        let mut batch = engine.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&engine.meta, PROBE, "ok");
        batch
            .commit()
            .map_err(|e| io_error("probe write failed in", dir, &e))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(bytes).map_err(|_| StoreError::Corrupt("stored data is not UTF-8".into()))
}

fn read_error(e: &fjall::Error) -> StoreError {
    StoreError::Unavailable(format!("read failed: {e}"))
}

impl Store for DiskStore {
    fn read(&self, key: &str, found: &mut dyn FnMut(&str)) -> Result<bool, StoreError> {
        let engine = self.shared.engine()?;
        match engine.data.get(key).map_err(|e| read_error(&e))? {
            Some(value) => {
                found(utf8(&value)?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&self, key: &str, value: &str) -> WriteAck {
        self.submit(vec![WriteOp::Put(key.to_owned(), value.to_owned())])
    }

    fn delete(&self, key: &str) -> WriteAck {
        self.submit(vec![WriteOp::Delete(key.to_owned())])
    }

    fn write(&self, ops: Vec<WriteOp>) -> WriteAck {
        self.submit(ops)
    }

    fn set_tap(&self, tap: Option<Arc<dyn Tap>>) -> WriteAck {
        let (done, ack) = oneshot::channel();
        let sent = self.send(Msg::SetTap { tap, done });
        Box::pin(async move {
            if !sent {
                return Err(stopped());
            }
            ack.await.map_err(|_| stopped())?
        })
    }

    fn scan(&self, req: &ScanRequest<'_>) -> Result<Page, StoreError> {
        let engine = self.shared.engine()?;
        let (from, _) = scan_start(req);
        let range = (
            from.map(<[u8]>::to_vec),
            std::ops::Bound::Unbounded::<Vec<u8>>,
        );
        let mut page = Page::default();
        let mut bytes = 0usize;
        for item in engine.data.range(range) {
            let (k, v) = item.into_inner().map_err(|e| read_error(&e))?;
            if scan_done(req, &k) {
                break;
            }
            if page.entries.len() >= req.limit
                || (!page.entries.is_empty() && bytes >= req.max_bytes)
            {
                page.more = true;
                break;
            }
            let entry = Entry {
                key: utf8(&k)?.to_owned(),
                value: utf8(&v)?.to_owned(),
            };
            bytes += entry.size();
            page.entries.push(entry);
        }
        Ok(page)
    }

    fn keys(&self, span: &Span, limit: usize) -> Result<Vec<String>, StoreError> {
        let engine = self.shared.engine()?;
        let range = (
            std::ops::Bound::Included(span.start.clone()),
            std::ops::Bound::Unbounded::<Vec<u8>>,
        );
        let mut keys = Vec::new();
        for item in engine.data.range(range).take(limit) {
            let k = item.key().map_err(|e| read_error(&e))?;
            if !span.contains(&k) {
                break;
            }
            keys.push(utf8(&k)?.to_owned());
        }
        Ok(keys)
    }

    fn count(&self, span: &Span) -> Result<u64, StoreError> {
        let engine = self.shared.engine()?;
        let range = (
            std::ops::Bound::Included(span.start.clone()),
            std::ops::Bound::Unbounded::<Vec<u8>>,
        );
        let mut n = 0;
        for item in engine.data.range(range) {
            let k = item.key().map_err(|e| read_error(&e))?;
            if !span.contains(&k) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.shared.keys.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    fn reads_block(&self) -> bool {
        true
    }

    fn fault(&self) -> Option<StoreError> {
        self.shared.fault()
    }

    fn state(&self) -> Option<&dyn NodeState> {
        Some(self)
    }
}

impl NodeState for DiskStore {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.shared.engine()?;
        Ok(engine
            .meta
            .get(name)
            .map_err(|e| read_error(&e))?
            .map(|v| v.to_vec()))
    }

    fn save(&self, records: &[(&str, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let engine = self.shared.engine()?;
        let mut batch = engine.db.batch().durability(Some(PersistMode::SyncAll));
        for (name, value) in records {
            match value {
                Some(v) => batch.insert(&engine.meta, *name, v.as_slice()),
                None => batch.remove(&engine.meta, *name),
            }
        }
        batch
            .commit()
            .map_err(|e| io_error("cannot save node state in", &self.shared.dir, &e))
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
    use crate::keyspace::KeyRange;

    fn open(dir: &Path) -> DiskStore {
        DiskStore::open(&DiskOptions::new(dir)).expect("open")
    }

    fn get(s: &DiskStore, k: &str) -> Option<String> {
        let mut out = None;
        s.read(k, &mut |v| out = Some(v.to_owned())).expect("read");
        out
    }

    /// Queues `n` puts (`k0000`...) before awaiting any, so they can share
    /// commits, then awaits them all.
    async fn put_at_once(s: &DiskStore, n: usize) {
        let acks: Vec<_> = (0..n).map(|i| s.put(&format!("k{i:04}"), "v")).collect();
        for ack in acks {
            ack.await.expect("put");
        }
    }

    fn all_keys(s: &DiskStore) -> Vec<String> {
        let span = Span::from(&KeyRange::new("", None::<&str>));
        s.scan(&ScanRequest {
            span: &span,
            prefix: "",
            after: None,
            limit: usize::MAX,
            max_bytes: usize::MAX,
        })
        .expect("scan")
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect()
    }

    /// The policy and nice value of every thread of this process named
    /// `name`, from `/proc/self/task/*/stat` (fields 41 and 19).
    #[cfg(target_os = "linux")]
    fn scheduling_of(name: &str) -> Vec<(u32, i32)> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let dir = task.expect("task").path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
            // Fields after the command's closing parenthesis start at 3.
            let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
                .split(' ')
                .collect();
            found.push((
                fields[41 - 3].parse().expect("policy"),
                fields[19 - 3].parse().expect("nice"),
            ));
        }
        found
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_writer_runs_as_a_batch_thread_with_its_nice_value() {
        const SCHED_BATCH: u32 = 3;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        // The writer sets its policy before it takes its first write.
        store.put("k", "v").await.expect("put");
        let nice = rustix::process::getpriority_process(None).expect("nice");
        let writers = scheduling_of("cavi-writer");
        assert!(!writers.is_empty(), "no writer thread found");
        for (policy, writer_nice) in writers {
            assert_eq!(policy, SCHED_BATCH, "the writer's scheduling policy");
            assert_eq!(writer_nice, nice, "the writer's nice value");
        }
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path());
            s.put("apple", "1").await.expect("put");
            s.put("avocado", "2").await.expect("put");
            s.put("banana", "3").await.expect("put");
            s.delete("avocado").await.expect("delete");
            s.delete("never-there").await.expect("delete");
        }
        let s = open(dir.path());
        assert_eq!(get(&s, "apple").as_deref(), Some("1"));
        assert_eq!(get(&s, "avocado"), None);
        assert_eq!(all_keys(&s), ["apple", "banana"]);
    }

    #[tokio::test]
    async fn keys_of_a_span_stop_at_its_end_and_at_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        for k in ["a", "fb", "fc", "fz", "g"] {
            s.put(k, "value").await.expect("put");
        }
        let span = Span::from(&KeyRange::new("fb", Some("fz")));
        assert_eq!(s.keys(&span, 10).expect("keys"), ["fb", "fc", "fz"]);
        assert_eq!(s.keys(&span, 2).expect("keys"), ["fb", "fc"]);
    }

    #[tokio::test]
    async fn counts_are_exact_after_overwrites_deletes_and_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path());
            for i in 0..150 {
                s.put(&format!("k{i:03}"), "vv").await.expect("put");
            }
            s.put("k000", "longer").await.expect("overwrite");
            assert_eq!((s.len(), s.bytes()), (150, 150 * 6 + 4));
            for i in 0..150 {
                s.delete(&format!("k{i:03}")).await.expect("delete");
            }
            // Several writes of one key in one batch count once.
            s.write(vec![
                WriteOp::Put("x".into(), "1".into()),
                WriteOp::Put("x".into(), "22".into()),
                WriteOp::Delete("gone".into()),
            ])
            .await
            .expect("batch");
            assert_eq!((s.len(), s.bytes()), (1, 3));
        }
        let s = open(dir.path());
        assert_eq!((s.len(), s.bytes()), (1, 3));
    }

    #[tokio::test]
    async fn concurrent_writers_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        put_at_once(&s, 500).await;
        assert_eq!(s.len(), 500);
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

    /// Every commit the writer reports, in order.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(usize, Duration)>>);

    impl CommitObserver for Recorded {
        fn committed(&self, writes: usize, took: Duration) {
            self.0.lock().expect("lock").push((writes, took));
        }
    }

    #[tokio::test]
    async fn each_commit_is_reported_with_its_writes_and_a_failed_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recorded = Arc::new(Recorded::default());
        let faults = Arc::new(Faults::default());
        let mut options = DiskOptions::new(dir.path());
        options.commits = Some(recorded.clone());
        options.faults = faults.clone();
        let s = DiskStore::open(&options).expect("open");
        put_at_once(&s, 300).await;
        s.write(vec![
            WriteOp::Put("x".into(), "1".into()),
            WriteOp::Put("y".into(), "2".into()),
            WriteOp::Delete("k0000".into()),
        ])
        .await
        .expect("write");
        let commits = recorded.0.lock().expect("lock").clone();
        assert_eq!(commits.len() as u64, s.syncs(), "one report a sync");
        let writes: usize = commits.iter().map(|(w, _)| w).sum();
        assert_eq!(writes, 303, "the 300 puts and the write of three");
        assert_eq!(commits.last().map(|(w, _)| *w), Some(3));
        assert!(commits.iter().all(|(_, took)| !took.is_zero()));
        // A commit that fails is not reported as one.
        faults.failing_commits.store(1, Ordering::Relaxed);
        s.put("lost", "v").await.expect_err("the disk is full");
        assert_eq!(recorded.0.lock().expect("lock").len(), commits.len());
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_then_recovered_without_losing_acknowledged_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = DiskOptions::new(dir.path());
        let faults = Arc::new(Faults::default());
        options.faults = faults.clone();
        let s = DiskStore::open(&options).expect("open");
        s.put("before", "1").await.expect("put");
        // The failing commit, then the first recovery probe, fail.
        faults.failing_commits.store(2, Ordering::Relaxed);
        let e = s.put("during", "2").await.expect_err("the disk is full");
        assert!(matches!(e, StoreError::Full(_)), "{e:?}");
        // Recovery retries until the probe works; then writes work again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.fault().is_some() {
            assert!(std::time::Instant::now() < deadline, "never recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.put("after", "3").await.expect("put after recovery");
        assert_eq!(get(&s, "before").as_deref(), Some("1"));
        assert_eq!(get(&s, "during"), None);
        assert_eq!(get(&s, "after").as_deref(), Some("3"));
        assert_eq!(s.len(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_makes_writers_wait_then_fail_as_overloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = DiskOptions::new(dir.path());
        options.max_queued_writes = 2;
        options.queue_timeout = Duration::from_millis(200);
        options
            .faults
            .commit_delay_ms
            .store(1000, Ordering::Relaxed);
        let s = DiskStore::open(&options).expect("open");
        let first = s.put("a", "1");
        let second = s.put("b", "1");
        let third = s.put("c", "1");
        let third = third.await.expect_err("no room within the wait");
        assert!(matches!(third, StoreError::Overloaded(_)), "{third:?}");
        first.await.expect("queued write lands");
        second.await.expect("queued write lands");
    }

    #[tokio::test]
    async fn node_state_is_saved_atomically_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = open(dir.path());
            s.save(&[("a", Some(b"1".to_vec())), ("b", Some(b"2".to_vec()))])
                .expect("save");
            s.save(&[("a", None)]).expect("remove");
        }
        let s = open(dir.path());
        assert_eq!(s.load("a").expect("load"), None);
        assert_eq!(s.load("b").expect("load"), Some(b"2".to_vec()));
    }
}
