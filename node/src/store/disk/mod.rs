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
//! size (from what it wrote last, else from the engine), and the counts
//! are committed in the same batch as the writes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use fjall::PersistMode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{
    CommitObserver, NodeState, Page, Readers, ScanRequest, Store, StoreError, Tap, WriteAck,
    WriteOp, fill_page, scan_start, utf8,
};
use crate::keyspace::Span;

mod engine;
mod sizes;
mod writer;

use engine::{Engine, io_error, load_counts, open_engine};
use writer::{Msg, Waiter};

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
    /// Bytes of one generation of the sizes the writer remembers of the
    /// keys it wrote last (two generations are kept): an overwrite of one
    /// of them needs no search of the engine for the exact counts.
    pub recent_sizes_bytes: usize,
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
            // About 43,000 keys of 16 bytes a generation; 8 MiB in all.
            recent_sizes_bytes: 4 << 20,
        }
    }
}

/// Injected faults: a delay before every commit (a slow disk), a number
/// of commits to fail as if the disk were full, and a delay for every
/// lookup of a written key's previous size (a disk slow to read). Zero by
/// default.
#[derive(Debug, Default)]
pub struct Faults {
    pub commit_delay_ms: AtomicU64,
    pub failing_commits: AtomicU64,
    pub lookup_delay_ms: AtomicU64,
    /// While lookups are delayed: how many ran at once, at most.
    pub most_lookups_at_once: AtomicU64,
    lookups_now: AtomicU64,
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

    /// Waits as a lookup on a slow disk would, if a delay is injected.
    fn slow_lookup(&self) {
        let delay = self.lookup_delay_ms.load(Ordering::Relaxed);
        if delay == 0 {
            return;
        }
        let now = self.lookups_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_lookups_at_once.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay));
        self.lookups_now.fetch_sub(1, Ordering::SeqCst);
    }

    /// Fails as a full disk would, if a failure is still to be injected.
    fn fail_one(&self, context: &str, dir: &std::path::Path) -> Result<(), StoreError> {
        match self
            .failing_commits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        {
            Ok(_) => Err(StoreError::Full(format!(
                "{context} {}: No space left on device (injected)",
                dir.display()
            ))),
            Err(_) => Ok(()),
        }
    }
}

struct Shared {
    dir: PathBuf,
    /// `None` while the writer reopens the database.
    engine: RwLock<Option<Arc<Engine>>>,
    fault: Mutex<Option<StoreError>>,
    keys: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    /// Batches whose unknown keys were looked up on the readers.
    looked_ahead: AtomicU64,
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
    readers: Readers,
    writes: Option<mpsc::Sender<Msg>>,
    writer: Option<JoinHandle<()>>,
    room: Arc<Semaphore>,
    room_bytes: Arc<Semaphore>,
    max_queued_bytes: usize,
    queue_timeout: Duration,
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
            looked_ahead: AtomicU64::new(0),
            faults: options.faults.clone(),
        });
        let (tx, rx) = mpsc::channel();
        let readers = Readers::start()?;
        let writer = writer::spawn(shared.clone(), options, counts, readers.clone(), rx)?;
        Ok(Self {
            shared,
            readers,
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

    /// Batches since the store was opened whose lookups of previous sizes
    /// were slow enough to go to the readers.
    pub fn looked_ahead(&self) -> u64 {
        self.shared.looked_ahead.load(Ordering::Relaxed)
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
            let sent = queue_write(self.writes.as_ref(), ops, done, room, room_bytes);
            return Box::pin(answer(sent, ack));
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
            answer(queue_write(writes.as_ref(), ops, done, r, b), ack).await
        })
    }
}

/// Queues a write with its room in the queue; false once the writer has
/// stopped.
fn queue_write(
    writes: Option<&mpsc::Sender<Msg>>,
    ops: Vec<WriteOp>,
    done: oneshot::Sender<Result<(), StoreError>>,
    room: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
) -> bool {
    let waiter = Waiter {
        done,
        _room: room,
        _bytes: bytes,
    };
    writes.is_some_and(|w| w.send(Msg::Write { ops, waiter }).is_ok())
}

/// The writer's answer to what was sent to it.
async fn answer(
    sent: bool,
    ack: oneshot::Receiver<Result<(), StoreError>>,
) -> Result<(), StoreError> {
    if !sent {
        return Err(stopped());
    }
    ack.await.map_err(|_| stopped())?
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the storage writer has stopped".into())
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
        let sent = self
            .writes
            .as_ref()
            .is_some_and(|w| w.send(Msg::SetTap { tap, done }).is_ok());
        Box::pin(answer(sent, ack))
    }

    fn scan(&self, req: &ScanRequest<'_>) -> Result<Page, StoreError> {
        let engine = self.shared.engine()?;
        let (from, _) = scan_start(req);
        let range = (
            from.map(<[u8]>::to_vec),
            std::ops::Bound::Unbounded::<Vec<u8>>,
        );
        let entries = engine
            .data
            .range(range)
            .map(|item| item.into_inner().map_err(|e| read_error(&e)));
        fill_page(req, entries)
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

    fn readers(&self) -> Option<&Readers> {
        Some(&self.readers)
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
    use std::path::Path;

    use super::*;
    use crate::keyspace::KeyRange;

    fn open(dir: &Path) -> DiskStore {
        DiskStore::open(&DiskOptions::new(dir)).expect("open")
    }

    /// Options whose faults the test injects through the handle returned.
    fn options_with_faults(dir: &Path) -> (DiskOptions, Arc<Faults>) {
        let mut options = DiskOptions::new(dir);
        let faults = Arc::new(Faults::default());
        options.faults = faults.clone();
        (options, faults)
    }

    /// A store whose commits can be made to fail.
    fn open_with_faults(dir: &Path) -> (DiskStore, Arc<Faults>) {
        let (options, faults) = options_with_faults(dir);
        (DiskStore::open(&options).expect("open"), faults)
    }

    /// Waits (bounded) for the writer to clear its fault.
    async fn wait_until_recovered(s: &DiskStore) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.fault().is_some() {
            assert!(std::time::Instant::now() < deadline, "never recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    async fn the_writer_and_the_readers_run_as_batch_threads_with_their_nice_value() {
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
        // A read runs on a reader; each reader names itself and sets its
        // policy as it starts, so wait (bounded) for every one of them to
        // have started.
        let readers = store.readers().expect("a disk store has readers");
        let read = readers.run(|| std::thread::current().name().map(str::to_owned));
        assert_eq!(read.await.expect("read").as_deref(), Some("cavi-reader"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = scheduling_of("cavi-reader");
            if found.len() >= 2 && found.iter().all(|&(policy, _)| policy == SCHED_BATCH) {
                assert!(found.iter().all(|&(_, n)| n == nice), "{found:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{found:?}");
            tokio::task::yield_now().await;
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

    /// The counts test, with the writer remembering `recent_sizes_bytes`
    /// of recent sizes: none (every size from the engine), or the default.
    async fn counts_are_exact_after_overwrites_deletes_and_reopening(recent_sizes_bytes: usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = DiskOptions::new(dir.path());
        options.recent_sizes_bytes = recent_sizes_bytes;
        {
            let s = DiskStore::open(&options).expect("open");
            for i in 0..150 {
                s.put(&format!("k{i:03}"), "vv").await.expect("put");
            }
            s.put("k000", "longer").await.expect("overwrite");
            assert_eq!((s.len(), s.bytes()), (150, 150 * 6 + 4));
            for i in 0..150 {
                s.delete(&format!("k{i:03}")).await.expect("delete");
            }
            // Several writes of one key in one batch count once, however
            // many keys lie between them.
            s.write(vec![
                WriteOp::Put("x".into(), "1".into()),
                WriteOp::Put("y".into(), "1".into()),
                WriteOp::Put("z".into(), "1".into()),
                WriteOp::Put("x".into(), "22".into()),
                WriteOp::Delete("y".into()),
                WriteOp::Delete("z".into()),
                WriteOp::Delete("gone".into()),
            ])
            .await
            .expect("batch");
            assert_eq!((s.len(), s.bytes()), (1, 3));
        }
        let s = DiskStore::open(&options).expect("open");
        assert_eq!((s.len(), s.bytes()), (1, 3));
        s.put("x", "4444").await.expect("overwrite after reopening");
        assert_eq!((s.len(), s.bytes()), (1, 5));
    }

    #[tokio::test]
    async fn counts_are_exact_with_every_size_read_from_the_engine() {
        counts_are_exact_after_overwrites_deletes_and_reopening(0).await;
    }

    #[tokio::test]
    async fn counts_are_exact_with_the_sizes_written_last_remembered() {
        let default = DiskOptions::new(".").recent_sizes_bytes;
        counts_are_exact_after_overwrites_deletes_and_reopening(default).await;
    }

    #[tokio::test]
    async fn counts_are_exact_after_a_failed_commit_of_an_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, faults) = open_with_faults(dir.path());
        s.put("k", "1").await.expect("put");
        // The writer takes in the overwrite's size, then its commit fails.
        faults.failing_commits.store(1, Ordering::Relaxed);
        s.put("k", "a much longer value")
            .await
            .expect_err("the disk is full");
        wait_until_recovered(&s).await;
        // The previous size is the one on disk, not the failed write's.
        s.put("k", "22").await.expect("put after recovery");
        assert_eq!((s.len(), s.bytes()), (1, 3));
        assert_eq!(get(&s, "k").as_deref(), Some("22"));
    }

    /// Overwrites of keys only on disk, on a disk slow to read: after the
    /// first slow lookup, the batch's other keys are looked up on the
    /// readers several at once, and the counts stay exact.
    #[tokio::test]
    async fn slow_lookups_of_a_batch_run_on_the_readers_at_once_and_count_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (options, faults) = options_with_faults(dir.path());
        let keys: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
        {
            let s = DiskStore::open(&options).expect("open");
            for k in &keys {
                s.put(k, "v").await.expect("put");
            }
        }
        // Reopened, the writer knows no key's size: each is on disk only.
        let s = DiskStore::open(&options).expect("reopen");
        faults.lookup_delay_ms.store(20, Ordering::Relaxed);
        let mut ops: Vec<WriteOp> = keys
            .iter()
            .map(|k| WriteOp::Put(k.clone(), "vvv".into()))
            .collect();
        ops.extend([
            WriteOp::Put("k05".into(), "x".into()),
            WriteOp::Delete("k10".into()),
            WriteOp::Delete("absent".into()),
            WriteOp::Put("new".into(), "1".into()),
        ]);
        s.write(ops).await.expect("the batch");
        let at_once = faults.most_lookups_at_once.load(Ordering::SeqCst);
        assert!(at_once >= 2, "{at_once} lookups at once, at most");
        assert_eq!(s.looked_ahead(), 1);
        // 38 keys of 3 + 3 bytes, k05 of 3 + 1, `new` of 3 + 1.
        let exact = (40, 38 * 6 + 4 + 4);
        assert_eq!((s.len(), s.bytes()), exact);
        faults.lookup_delay_ms.store(0, Ordering::Relaxed);
        drop(s);
        let s = DiskStore::open(&options).expect("reopen");
        assert_eq!((s.len(), s.bytes()), exact);
        assert_eq!(all_keys(&s).len(), 40);
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
        let (mut options, faults) = options_with_faults(dir.path());
        options.commits = Some(recorded.clone());
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
        let (s, faults) = open_with_faults(dir.path());
        s.put("before", "1").await.expect("put");
        // The failing commit, then the first recovery probe, fail.
        faults.failing_commits.store(2, Ordering::Relaxed);
        let e = s.put("during", "2").await.expect_err("the disk is full");
        assert!(matches!(e, StoreError::Full(_)), "{e:?}");
        // Recovery retries until the probe works; then writes work again.
        wait_until_recovered(&s).await;
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
