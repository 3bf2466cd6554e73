//! The threads that run an engine's reads when they may wait for a disk.
//!
//! A read handed to tokio's blocking pool costs a wake-up of a pool thread
//! and a switch to it and back, each read on its own: on a core shared
//! with the request handlers, more than the read. Here a few threads take
//! reads from one queue, each running whatever is queued before it sleeps
//! again, and they run as batch threads ([`schedule_as_batch`]): on a
//! shared core they run when the handlers wait, and then take every read
//! the handlers queued meanwhile. Several threads, so that a read that
//! waits for the disk does not hold up the ones behind it.

use std::num::NonZero;
use std::panic::AssertUnwindSafe;

use tokio::sync::oneshot;

use super::StoreError;
use super::sched::schedule_as_batch;

type Job = Box<dyn FnOnce() + Send>;

/// Reader threads: they stop once this (and every clone) is dropped and
/// their queue is empty.
#[derive(Clone)]
pub struct Readers {
    jobs: flume::Sender<Job>,
    threads: usize,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("queued", &self.jobs.len())
            .finish()
    }
}

impl Readers {
    /// One thread per core this process may use, at least 2 and at most 8.
    pub fn start() -> Result<Self, StoreError> {
        let cores = std::thread::available_parallelism().map_or(2, NonZero::get);
        Self::with_threads(cores.clamp(2, 8))
    }

    pub fn with_threads(threads: usize) -> Result<Self, StoreError> {
        let threads = threads.max(1);
        let (jobs, queue) = flume::unbounded::<Job>();
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("cavi-reader".into())
                .spawn(move || {
                    if let Err(e) = schedule_as_batch()
                        && i == 0
                    {
                        tracing::info!("the storage readers keep the default scheduling: {e}");
                    }
                    for job in queue.iter() {
                        // A read that panics fails its request (its answer
                        // is dropped), not the reader.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the storage readers: {e}"))
                })?;
        }
        Ok(Self { jobs, threads })
    }

    /// How many reads run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `read` for a reader; its answer comes on the receiver. A
    /// read whose receiver is gone before a reader takes it (its request
    /// timed out behind reads stuck on the disk, or its client left) is
    /// dropped unread.
    fn queue<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, StoreError> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                if !done.is_closed() {
                    let _ = done.send(read());
                }
            }))
            .map_err(|_| StoreError::Unavailable("the storage readers have stopped".into()))?;
        Ok(answer)
    }

    /// Runs every read of `reads` on the reader threads, as many at once
    /// as there are threads, and blocks until all are done: for a thread
    /// outside the async runtime (the storage writer), never inside it.
    pub fn run_all_blocking<T: Send + 'static>(
        &self,
        reads: Vec<impl FnOnce() -> T + Send + 'static>,
    ) -> Result<Vec<T>, StoreError> {
        let answers: Vec<_> = reads.into_iter().map(|read| self.queue(read)).collect();
        answers
            .into_iter()
            .map(|answer| answer?.blocking_recv().map_err(|_| read_failed()))
            .collect()
    }

    /// Runs `read` on a reader thread and waits for what it returns (a
    /// read nobody waits for any more is dropped unread, see `queue`).
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(read)?.await.map_err(|_| read_failed())
    }
}

/// A read that panicked: its answer was dropped.
fn read_failed() -> StoreError {
    StoreError::Unavailable("a read failed on the storage reader".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reads_run_on_reader_threads_and_a_panicking_one_fails_alone() {
        let readers = Readers::with_threads(2).unwrap();
        let name = readers
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("cavi-reader"));
        let failed = readers.run(|| -> u32 { panic!("a broken read") }).await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        // Both threads still serve: many reads at once all come back.
        let sums = futures::future::join_all((0..100u64).map(|i| readers.run(move || i * 2))).await;
        let total: u64 = sums.into_iter().map(Result::unwrap).sum();
        assert_eq!(total, 9900);
    }

    #[test]
    fn reads_run_all_at_once_from_a_thread_outside_the_runtime() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let readers = Readers::with_threads(3).unwrap();
        assert_eq!(readers.threads(), 3);
        // Each read arrives, then waits (bounded) for the other two: all
        // three see the others only if they run at the same time.
        let arrived = Arc::new(AtomicUsize::new(0));
        let reads: Vec<_> = (0..3u32)
            .map(|i| {
                let arrived = arrived.clone();
                move || {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while arrived.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let together = arrived.load(Ordering::SeqCst) == 3;
                    (
                        i,
                        together,
                        std::thread::current().name().map(str::to_owned),
                    )
                }
            })
            .collect();
        let done = readers.run_all_blocking(reads).unwrap();
        for (i, (n, together, name)) in done.into_iter().enumerate() {
            assert_eq!(n as usize, i, "answers in the order of the reads");
            assert!(together, "read {i} ran alone");
            assert_eq!(name.as_deref(), Some("cavi-reader"));
        }
        let failed = readers.run_all_blocking(vec![|| -> u32 { panic!("a broken read") }]);
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
    }

    type Stuck<'a> = std::pin::Pin<Box<dyn Future<Output = Result<bool, StoreError>> + 'a>>;

    /// A read stuck on the disk until `release` is sent: polled once, so
    /// it is queued before any read the test queues next.
    async fn hang(readers: &Readers) -> (std::sync::mpsc::Sender<()>, Stuck<'_>) {
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let mut stuck: Stuck<'_> = Box::pin(readers.run(move || hung.recv().is_ok()));
        assert!(futures::poll!(&mut stuck).is_pending());
        (release, stuck)
    }

    /// A read stuck on the disk holds one reader; the others keep serving.
    #[tokio::test]
    async fn a_hung_read_does_not_hold_up_the_reads_behind_it() {
        let readers = Readers::with_threads(2).unwrap();
        let (release, mut stuck) = hang(&readers).await;
        for i in 0..10u32 {
            let read = tokio::time::timeout(Duration::from_secs(10), readers.run(move || i + 1));
            let read = read.await.expect("a read queued behind the hung one");
            assert_eq!(read.unwrap(), i + 1);
        }
        assert!(futures::poll!(&mut stuck).is_pending());
        release.send(()).unwrap();
        assert!(stuck.await.unwrap());
    }

    /// A read queued behind a hung one, whose caller gave up, never runs
    /// once the reader frees up: the disk is spared work nobody awaits.
    #[tokio::test]
    async fn a_read_nobody_waits_for_any_more_is_skipped() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let readers = Readers::with_threads(1).unwrap();
        let (release, stuck) = hang(&readers).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let count = |ran: &Arc<AtomicUsize>| {
            let ran = ran.clone();
            move || ran.fetch_add(1, Ordering::SeqCst)
        };
        // Queued behind the hung read, then abandoned (a timed-out request).
        let abandoned = tokio::time::timeout(Duration::from_millis(1), readers.run(count(&ran)));
        assert!(abandoned.await.is_err(), "the read cannot run yet");
        // Queued behind both and awaited: it runs, after the abandoned one
        // was taken off the queue (one reader, first in first out).
        let awaited = readers.run(count(&ran));
        tokio::pin!(awaited);
        assert!(futures::poll!(&mut awaited).is_pending());
        release.send(()).unwrap();
        assert!(stuck.await.unwrap());
        assert_eq!(awaited.await.unwrap(), 0, "the awaited read ran first");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "the abandoned read never ran"
        );
    }
}
