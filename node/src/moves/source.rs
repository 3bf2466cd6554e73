//! The source's side of a move: tap, copy, catch up, fence, commit, clean
//! up (see the module above for the whole protocol). The move's state and
//! the gate that requests for the range pass are in `outgoing`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{Instrument, info, info_span, warn};

use super::outgoing::{Outgoing, Record, lock, until};
use super::{
    Batch, BatchEntry, BatchKind, CommitRequest, MoveSpec, MoveStatus, OUTGOING_RECORD, Outcome,
    Phase,
};
use crate::crash::crash_point;
use crate::error::ApiError;
use crate::keyspace::Span;
use crate::node::Node;
use crate::store::{Page, ScanRequest, Store, WriteOp, read_off_workers};

/// Entries and bytes per page of the copy: small enough that applying one
/// does not hold up the requests around it for long.
const COPY_PAGE_KEYS: usize = 1024;
const COPY_PAGE_BYTES: usize = 128 << 10;
/// Copy pages sent and not yet acknowledged by the target. On a loaded
/// node each page waits a few turns of the busy worker on its way (the
/// source's send, the target's read, its answer); with four under way a
/// copy that fell behind its pace can catch up, and the target, which
/// applies one page at a time, always has the next one waiting.
const COPY_PAGES_IN_FLIGHT: usize = 4;
/// Keys per page of the clean-up after a move: listed, then deleted.
const DELETE_PAGE_KEYS: usize = 512;
/// Keys per page when the engine drops a range in place: whole blocks go
/// at once, so a page four times larger holds the lock no longer, and
/// costs a quarter of the yields to a busy worker.
const REMOVE_PAGE_KEYS: usize = 2048;
/// Tapped writes and bytes per batch of the catch-up.
const WRITES_PAGE_KEYS: usize = 1024;
const WRITES_PAGE_BYTES: usize = 1 << 20;
/// A copying move nobody asked about for this long is abandoned.
const IDLE_ABORT: Duration = Duration::from_secs(60);

fn target_addr(spec: &MoveSpec) -> Result<String, ApiError> {
    spec.target_shard().map(|s| s.addr.clone()).ok_or_else(|| {
        ApiError::MoveRefused(format!(
            "move {}: the new map lists no address for target shard {}",
            spec.id, spec.target
        ))
    })
}

/// `POST /internal/v1/outgoing/start`: begins (or, for the same id, reports)
/// a move away from this node.
pub async fn start(node: &Arc<Node>, spec: MoveSpec) -> Result<MoveStatus, ApiError> {
    if let Some(out) = node.outgoing.load_full() {
        if out.spec.id == spec.id {
            out.touch();
            return Ok(out.status());
        }
        if !out.phase().is_final() {
            return Err(ApiError::MoveRefused(format!(
                "shard {} is already giving away {} (move {}, {}); one move at a time",
                node.id(),
                out.spec.range(),
                out.spec.id,
                out.phase().as_str()
            )));
        }
    }
    if spec.source != node.id() {
        return Err(ApiError::MoveRefused(format!(
            "move {} gives a range away from shard {}, but this is shard {}",
            spec.id,
            spec.source,
            node.id()
        )));
    }
    spec.check(&node.map_snapshot())
        .map_err(ApiError::MoveRefused)?;
    target_addr(&spec)?;
    let store = node.store()?.clone();
    let out = Arc::new(Outgoing::new(spec, Phase::Copying));
    if let Some(state) = store.state() {
        state.save(&[(OUTGOING_RECORD, Some(out.record(Phase::Copying)?))])?;
    }
    node.outgoing.store(Some(out.clone()));
    // Writes applied before the tap are in the engine before the copy
    // starts; every later one is tapped.
    store.set_tap(Some(out.clone())).await?;
    let span =
        info_span!("move", id = %out.spec.id, range = %out.spec.range(), target = out.spec.target);
    span.in_scope(|| info!("move started: copying"));
    node.metrics.move_started();
    tokio::spawn(run(node.clone(), out.clone()).instrument(span));
    Ok(out.status())
}

/// The copy and the catch-up, side by side, until the move commits or
/// ends; plus the watch for an abandoned move. A failure aborts a copying
/// move; a fenced one is the commit's to decide (it lifts the fence when
/// the tail cannot reach the target, and then this aborts).
async fn run(node: Arc<Node>, out: Arc<Outgoing>) {
    let mut phase = out.phase_tx.subscribe();
    let copying = async {
        copy(&node, &out).await?;
        std::future::pending::<Result<(), String>>().await
    };
    let result = tokio::select! {
        r = copying => r,
        r = mirror(&node, &out) => r,
        r = watchdog(&out) => r,
        _ = phase.wait_for(|p| !matches!(p, Phase::Copying | Phase::Fenced)) => Ok(()),
    };
    if let Err(why) = result {
        out.progress.fail(&why);
        let _ = phase.wait_for(|p| *p != Phase::Fenced).await;
        if out.phase() == Phase::Copying {
            abort(&node, &out, &why).await;
        }
    }
}

async fn watchdog(out: &Outgoing) -> Result<(), String> {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if out.phase() == Phase::Copying && lock(&out.last_touch).elapsed() > IDLE_ABORT {
            return Err(format!(
                "no driver asked about the move for {}s",
                IDLE_ABORT.as_secs()
            ));
        }
    }
}

/// Reads one page of the range, off the async workers when reads block.
pub(crate) async fn read_page(
    store: &Arc<dyn Store>,
    span: &Span,
    after: Option<String>,
    limit: usize,
    max_bytes: usize,
) -> Result<Page, ApiError> {
    let span = span.clone();
    let page = read_off_workers(store, move |store| {
        store.scan(&ScanRequest {
            span: &span,
            prefix: "",
            after: after.as_deref(),
            limit,
            max_bytes,
        })
    })
    .await?;
    Ok(page)
}

/// A copy page in flight, cancelled if the copy is dropped (an abort, a
/// failed move) so that nothing keeps sending for it.
struct InFlight(tokio::task::JoinHandle<Result<(), String>>);

impl InFlight {
    async fn landed(mut self) -> Result<(), String> {
        (&mut self.0)
            .await
            .map_err(|e| format!("a page of the copy failed: {e}"))?
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `batch` to the move's target; `what` names it in the error.
async fn send_to_target(
    node: &Node,
    out: &Outgoing,
    addr: &str,
    batch: &Batch,
    what: &str,
) -> Result<(), String> {
    node.peers
        .send_batch(addr, &out.spec.id, batch)
        .await
        .map_err(|e| format!("target shard {} did not take {what}: {e}", out.spec.target))
}

/// Sends one page of the copy (`bytes` of keys and values) and counts it
/// once the target has it.
async fn send_page(
    node: Arc<Node>,
    out: Arc<Outgoing>,
    addr: String,
    batch: Batch,
    bytes: u64,
) -> Result<(), String> {
    send_to_target(&node, &out, &addr, &batch, "a page of the copy").await?;
    let keys = batch.entries.len() as u64;
    out.progress.keys_copied.fetch_add(keys, Ordering::Relaxed);
    out.progress
        .bytes_copied
        .fetch_add(bytes, Ordering::Relaxed);
    node.metrics.moved(keys, bytes);
    Ok(())
}

/// Streams the snapshot with up to `COPY_PAGES_IN_FLIGHT` pages in flight:
/// the target applies one while this node reads and sends the next, so
/// neither waits for the other's turn on a busy core. The last page leaves
/// only once every other has landed, so a target that has it has the whole
/// copy.
async fn copy(node: &Arc<Node>, out: &Arc<Outgoing>) -> Result<(), String> {
    let store = node.store().map_err(|e| e.to_string())?.clone();
    let addr = target_addr(&out.spec).map_err(|e| e.to_string())?;
    let mut after: Option<String> = None;
    let rate = node.settings().move_rate;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    loop {
        let page = read_page(
            &store,
            &out.span,
            after.clone(),
            COPY_PAGE_KEYS,
            COPY_PAGE_BYTES,
        )
        .await
        .map_err(|e| format!("cannot read the range: {e}"))?;
        let bytes: u64 = page.entries.iter().map(|e| e.size() as u64).sum();
        after = page.entries.last().map(|e| e.key.clone());
        let last = !page.more;
        let batch = Batch {
            kind: BatchKind::Copy,
            first_seq: 0,
            last,
            entries: page.entries.into_iter().map(BatchEntry::from).collect(),
        };
        crash_point("source-copy-page");
        if last {
            while let Some(before) = in_flight.pop_front() {
                before.landed().await?;
            }
            send_page(node.clone(), out.clone(), addr, batch, bytes).await?;
            out.progress.copy_done.store(true, Ordering::Relaxed);
            info!(
                keys = out.progress.keys_copied.load(Ordering::Relaxed),
                "copy done; catching up"
            );
            return Ok(());
        }
        let send = send_page(node.clone(), out.clone(), addr.clone(), batch, bytes);
        let this = InFlight(tokio::spawn(send.in_current_span()));
        in_flight.push_back(this);
        if in_flight.len() >= COPY_PAGES_IN_FLIGHT
            && let Some(oldest) = in_flight.pop_front()
        {
            oldest.landed().await?;
        }
        sent += bytes;
        if rate > 0 {
            // Paced: the next page leaves when the bytes so far are due.
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Sends tapped writes, in order, as they come; returns only on failure.
async fn mirror(node: &Arc<Node>, out: &Arc<Outgoing>) -> Result<(), String> {
    let addr = target_addr(&out.spec).map_err(|e| e.to_string())?;
    loop {
        let notified = out.log_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (first_seq, ops) = {
            let log = lock(&out.log);
            if log.overflow {
                return Err("the target fell too far behind the writes to the range".into());
            }
            let mut bytes = 0;
            let ops: Vec<BatchEntry> = log
                .ops
                .iter()
                .take_while(|op| {
                    bytes += op.size();
                    bytes <= WRITES_PAGE_BYTES
                })
                .take(WRITES_PAGE_KEYS)
                .map(BatchEntry::from)
                .collect();
            // One write larger than a page still goes, alone.
            let ops = if ops.is_empty() {
                log.ops.front().map(BatchEntry::from).into_iter().collect()
            } else {
                ops
            };
            (log.first_seq, ops)
        };
        if ops.is_empty() {
            notified.await;
            continue;
        }
        let n = ops.len();
        let batch = Batch {
            kind: BatchKind::Writes,
            first_seq,
            last: false,
            entries: ops,
        };
        send_to_target(node, out, &addr, &batch, "the writes to the range").await?;
        {
            let mut log = lock(&out.log);
            for _ in 0..n {
                if let Some(op) = log.ops.pop_front() {
                    log.bytes -= op.size();
                }
            }
            log.first_seq += n as u64;
        }
        out.progress.writes.fetch_add(n as u64, Ordering::Relaxed);
        out.log_changed.notify_waiters();
    }
}

/// Gives up a move before its commit: the source keeps the range.
pub(crate) async fn abort(node: &Arc<Node>, out: &Arc<Outgoing>, why: &str) {
    if !out.transition(&[Phase::Copying, Phase::Fenced], Phase::Aborted) {
        return;
    }
    warn!(id = %out.spec.id, reason = why, "move aborted; the range stays here");
    out.progress.fail(why);
    if let Ok(store) = node.store() {
        let _ = store.set_tap(None).await;
        if let Some(state) = store.state()
            && let Err(e) = state.save(&[(OUTGOING_RECORD, None)])
        {
            warn!(error = %e, "cannot clear the move record");
        }
    }
    node.metrics.move_ended("aborted", out.progress.elapsed());
    if let Ok(addr) = target_addr(&out.spec)
        && let Err(e) = node.peers.abort_target(&addr, &out.spec.id).await
    {
        warn!(error = %e, "could not tell the target the move is off");
    }
}

/// `POST /internal/v1/outgoing/{id}/abort`: the driver gives the move up.
pub async fn abort_by_driver(node: &Arc<Node>, id: &str) -> Result<MoveStatus, ApiError> {
    let out = find(node, id)?;
    if out.phase().is_committed() {
        return Err(ApiError::MoveRefused(format!(
            "move {id} has committed; it can only finish"
        )));
    }
    abort(node, &out, "aborted by the driver").await;
    Ok(out.status())
}

fn find(node: &Node, id: &str) -> Result<Arc<Outgoing>, ApiError> {
    node.outgoing
        .load_full()
        .filter(|o| o.spec.id == id)
        .ok_or_else(|| {
            ApiError::MoveNotFound(format!(
                "shard {} gives no range away as move {id}",
                node.id()
            ))
        })
}

/// `GET /internal/v1/outgoing/{id}`: the move as the source sees it.
pub fn status(node: &Node, id: &str) -> Result<MoveStatus, ApiError> {
    let out = find(node, id)?;
    out.touch();
    Ok(out.status())
}

/// `POST /internal/v1/outgoing/{id}/commit`: fence, send the tail, have the
/// target commit, then switch to the new map and let the held requests go.
/// Idempotent: a committed move answers at once.
pub async fn commit(node: &Arc<Node>, id: &str) -> Result<MoveStatus, ApiError> {
    let out = find(node, id)?;
    out.touch();
    match out.phase() {
        p if p.is_committed() => return Ok(out.status()),
        Phase::Aborted => {
            return Err(ApiError::MoveRefused(format!(
                "move {id} was aborted: {}",
                out.progress.error().unwrap_or_default()
            )));
        }
        Phase::Fenced => return resolve(node, &out).await.map(|()| out.status()),
        _ => {}
    }
    if !out.progress.copy_done.load(Ordering::Relaxed) {
        return Err(ApiError::MoveRefused(format!(
            "move {id} is still copying ({} keys so far); commit once the copy is done",
            out.progress.keys_copied.load(Ordering::Relaxed)
        )));
    }
    let store = node.store()?.clone();
    let fence_limit = node.settings.fence_timeout;
    // Persisted first: a source that restarts fenced asks the target.
    if let Some(state) = store.state() {
        state.save(&[(OUTGOING_RECORD, Some(out.record(Phase::Fenced)?))])?;
    }
    let fenced_at = Instant::now();
    if !out.fence() {
        return Err(ApiError::MoveRefused(format!(
            "move {id} is {}, it cannot commit",
            out.phase().as_str()
        )));
    }
    info!(id, "fenced: writes to the range wait");
    let drained = tokio::time::timeout(fence_limit, async {
        // Requests admitted before the fence finish...
        out.admitted_before_fence_done().await;
        // ...their writes are applied (and tapped)...
        store.barrier().await?;
        // ...and every tapped write reached the target.
        until(&out.log_changed, || lock(&out.log).ops.is_empty()).await;
        Ok::<(), crate::store::StoreError>(())
    })
    .await;
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            unfence(&store, &out)?;
            return Err(e.into());
        }
        Err(_) => {
            unfence(&store, &out)?;
            return Err(ApiError::MoveRefused(format!(
                "move {id}: the writes to the range did not reach the target within {fence_limit:?}; the fence is lifted, try again"
            )));
        }
    }
    if out.phase() != Phase::Fenced {
        return Err(ApiError::MoveRefused(format!(
            "move {id} ended while fencing: {}",
            out.progress.error().unwrap_or_default()
        )));
    }
    if !out.close_to_reads(fence_limit).await {
        unfence(&store, &out)?;
        return Err(ApiError::MoveRefused(format!(
            "move {id}: the reads of the range did not finish within {fence_limit:?}; the fence is lifted, try again"
        )));
    }
    let writes = lock(&out.log).first_seq;
    let addr = target_addr(&out.spec)?;
    crash_point("source-fenced");
    let asked = node
        .peers
        .commit_target(
            &addr,
            id,
            &CommitRequest {
                writes,
                copy_done: true,
            },
        )
        .await;
    match asked {
        Ok(()) => {
            crash_point("source-target-committed");
            finish(node, &out).await?;
        }
        Err(e) if e.is_refusal() => {
            let why = format!("the target refused to commit: {e}");
            abort(node, &out, &why).await;
            return Err(ApiError::MoveRefused(format!("move {id}: {why}")));
        }
        // No answer: the target may or may not have committed.
        Err(e) => {
            warn!(id, error = %e, "no answer to the commit; asking the target how it ended");
            if let Err(e) = resolve(node, &out).await {
                if out.phase() == Phase::Fenced {
                    spawn_resolver(node.clone(), out.clone());
                }
                return Err(e);
            }
        }
    }
    node.metrics.fence(fenced_at.elapsed());
    Ok(out.status())
}

fn unfence(store: &Arc<dyn Store>, out: &Outgoing) -> Result<(), ApiError> {
    if out.phase() != Phase::Fenced {
        return Ok(());
    }
    if let Some(state) = store.state() {
        state.save(&[(OUTGOING_RECORD, Some(out.record(Phase::Copying)?))])?;
    }
    out.transition(&[Phase::Fenced], Phase::Copying);
    Ok(())
}

/// A fenced source that does not know how the commit ended asks the
/// target: committed rolls forward, anything else aborts. Unreachable
/// keeps the fence (requests for the range wait, then get 503).
async fn resolve(node: &Arc<Node>, out: &Arc<Outgoing>) -> Result<(), ApiError> {
    let addr = target_addr(&out.spec)?;
    match node.peers.outcome(&addr, &out.spec.id).await {
        Ok(Outcome::Committed) => finish(node, out).await,
        Ok(Outcome::Receiving | Outcome::Unknown) => {
            abort(node, out, "the target did not commit").await;
            Err(ApiError::MoveRefused(format!(
                "move {}: the target did not commit; aborted, the range stays on shard {}",
                out.spec.id, out.spec.source
            )))
        }
        Err(e) => Err(ApiError::Peer {
            shard: out.spec.target,
            addr,
            source: e,
        }),
    }
}

/// Keeps asking the target how a fenced move ended until it knows (the
/// range stays fenced meanwhile: requests for it wait, then get 503).
fn spawn_resolver(node: Arc<Node>, out: Arc<Outgoing>) {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        while out.phase() == Phase::Fenced {
            match resolve(&node, &out).await {
                Ok(()) => break,
                Err(e) if out.phase() != Phase::Fenced => {
                    info!(error = %e, "move resolved");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "cannot resolve the move yet; the range stays fenced");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
}

/// After the target committed: persist and switch to the new map, let the
/// held requests go (to the target now), then clean up in the background.
async fn finish(node: &Arc<Node>, out: &Arc<Outgoing>) -> Result<(), ApiError> {
    let store = node.store()?.clone();
    let map = out.spec.map.clone();
    if node.map().epoch < map.epoch {
        node.persist_map(
            &map,
            &[(OUTGOING_RECORD, Some(out.record(Phase::Committed)?))],
        )?;
        node.set_map(map);
    }
    out.set_phase(Phase::Committed);
    info!(id = %out.spec.id, epoch = out.spec.map.epoch, "committed: the target owns the range");
    node.metrics.move_ended("committed", out.progress.elapsed());
    let _ = store.set_tap(None).await;
    tokio::spawn(clean_up(node.clone(), out.clone()));
    Ok(())
}

/// Deletes the range's keys here, then forgets the move.
async fn clean_up(node: Arc<Node>, out: Arc<Outgoing>) {
    out.set_phase(Phase::CleaningUp);
    crash_point("source-cleanup");
    let Ok(store) = node.store().cloned() else {
        return;
    };
    let mut wait = Duration::from_millis(100);
    loop {
        match delete_span(&store, &out.span).await {
            Ok(()) => break,
            Err(e) => {
                warn!(id = %out.spec.id, error = %e, "cleaning up the moved range failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    if let Some(state) = store.state()
        && let Err(e) = state.save(&[(OUTGOING_RECORD, None)])
    {
        warn!(error = %e, "cannot clear the move record");
    }
    out.set_phase(Phase::Done);
    info!(id = %out.spec.id, "moved range cleaned up");
}

/// Deletes every key of `span`, a page of keys at a time (values are not
/// read: a page of them cost as much as the delete).
///
/// Each page is listed from just after the last key deleted: an LSM
/// engine keeps a deleted key as a tombstone until compaction, and a
/// listing from the span's start would step over every tombstone of the
/// pages before it (a 100,000-key range took 5.5 s to clean up on a
/// durable node, most of it listing). Nothing is written behind the
/// cursor meanwhile (the range belongs to the target), but the last pass
/// lists from the start again, once, to be sure.
pub(crate) async fn delete_span(store: &Arc<dyn Store>, span: &Span) -> Result<(), ApiError> {
    let mut rest = span.clone();
    let mut from_start = false;
    loop {
        if let Some(removed) = store.remove_range(span, REMOVE_PAGE_KEYS) {
            if removed? == 0 {
                return Ok(());
            }
            tokio::task::yield_now().await;
            continue;
        }
        let page = rest.clone();
        let keys =
            read_off_workers(store, move |store| store.keys(&page, DELETE_PAGE_KEYS)).await?;
        let Some(last) = keys.last() else {
            if from_start {
                return Ok(());
            }
            (rest, from_start) = (span.clone(), true);
            continue;
        };
        // The least key after `last`.
        rest.start = [last.as_bytes(), &[0]].concat();
        from_start = false;
        store
            .write(keys.into_iter().map(WriteOp::Delete).collect())
            .await?;
        // The memory engine is never pending: without this, a range of a
        // million keys would be deleted without letting another request
        // run on this worker.
        tokio::task::yield_now().await;
    }
}

/// On start, what a durable source recorded: a copy in progress is
/// aborted, a fenced move asks its target, a committed one is cleaned up.
pub(crate) async fn resume(node: &Arc<Node>) -> Result<(), ApiError> {
    let store = node.store()?.clone();
    let Some(state) = store.state() else {
        return Ok(());
    };
    let Some(raw) = state.load(OUTGOING_RECORD)? else {
        return Ok(());
    };
    let record: Record = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::Internal(format!("the move record is corrupt: {e}")))?;
    let out = Arc::new(Outgoing::new(record.spec, record.phase));
    node.outgoing.store(Some(out.clone()));
    match record.phase {
        Phase::Copying => {
            info!(id = %out.spec.id, "restarted while copying: aborting the move");
            abort(node, &out, "the source restarted during the copy").await;
        }
        Phase::Fenced => {
            info!(id = %out.spec.id, "restarted fenced: asking the target how the move ended");
            spawn_resolver(node.clone(), out);
        }
        _ => {
            if node.map().epoch < out.spec.map.epoch {
                node.set_map(out.spec.map.clone());
            }
            tokio::spawn(clean_up(node.clone(), out));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keyspace::KeyRange;
    use crate::store::{DiskOptions, DiskStore, MemoryStore, Readers, StoreError, Tap, WriteAck};

    /// Every key of the span goes, page after page, and only those: on a
    /// durable store (listed and deleted a page at a time) and in memory
    /// (dropped in place).
    #[tokio::test]
    async fn deleting_a_span_removes_its_keys_and_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let stores: [Arc<dyn Store>; 2] = [
            Arc::new(DiskStore::open(&DiskOptions::new(dir.path())).unwrap()),
            Arc::new(MemoryStore::new()),
        ];
        for store in stores {
            let mut ops: Vec<WriteOp> = (0..1300)
                .map(|i| WriteOp::Put(format!("k{i:05}"), "value".into()))
                .collect();
            ops.extend(["a", "z"].map(|k| WriteOp::Put(k.into(), "outside".into())));
            store.write(ops).await.unwrap();
            // Three pages of the durable store's listing and then some.
            let span = Span::from(&KeyRange::new("k00100", Some("k01199")));
            delete_span(&store, &span).await.unwrap();
            let everything = Span::from(&KeyRange::new("", None::<String>));
            let left = store.keys(&everything, usize::MAX).unwrap();
            let mut expected = vec!["a".to_owned()];
            expected.extend((0..100).chain(1200..1300).map(|i| format!("k{i:05}")));
            expected.push("z".into());
            assert_eq!(left, expected);
            assert_eq!(store.len(), 202, "exact counts");
            assert_eq!(store.count(&span).unwrap(), 0);
        }
    }

    /// A store that, once, writes the span's first key again right after
    /// a page of deletes: a key behind the clean-up's cursor.
    struct WritesBehindTheCursor {
        inner: Arc<dyn Store>,
        done: std::sync::atomic::AtomicBool,
    }

    impl Store for WritesBehindTheCursor {
        fn read(&self, key: &str, found: &mut dyn FnMut(&str)) -> Result<bool, StoreError> {
            self.inner.read(key, found)
        }
        fn put(&self, key: &str, value: &str) -> WriteAck {
            self.inner.put(key, value)
        }
        fn delete(&self, key: &str) -> WriteAck {
            self.inner.delete(key)
        }
        fn write(&self, ops: Vec<WriteOp>) -> WriteAck {
            let deletes = ops.iter().all(|op| matches!(op, WriteOp::Delete(_)));
            let once = deletes && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst);
            let inner = self.inner.clone();
            Box::pin(async move {
                inner.write(ops).await?;
                if once {
                    inner.put("k00100", "behind").await?;
                }
                Ok(())
            })
        }
        fn set_tap(&self, tap: Option<Arc<dyn Tap>>) -> WriteAck {
            self.inner.set_tap(tap)
        }
        fn scan(&self, request: &ScanRequest<'_>) -> Result<Page, StoreError> {
            self.inner.scan(request)
        }
        fn keys(&self, span: &Span, limit: usize) -> Result<Vec<String>, StoreError> {
            self.inner.keys(span, limit)
        }
        fn count(&self, span: &Span) -> Result<u64, StoreError> {
            self.inner.count(span)
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn bytes(&self) -> u64 {
            self.inner.bytes()
        }
        fn readers(&self) -> Option<&Readers> {
            self.inner.readers()
        }
    }

    #[tokio::test]
    async fn a_key_written_behind_the_clean_up_is_deleted_by_its_last_pass() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(DiskStore::open(&DiskOptions::new(dir.path())).unwrap());
        let ops = (0..1300)
            .map(|i| WriteOp::Put(format!("k{i:05}"), "value".into()))
            .collect();
        inner.write(ops).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(WritesBehindTheCursor {
            inner: inner.clone(),
            done: Default::default(),
        });
        let span = Span::from(&KeyRange::new("k00100", Some("k01199")));
        delete_span(&store, &span).await.unwrap();
        assert!(
            store
                .as_ref()
                .read("k00100", &mut |_| ())
                .is_ok_and(|found| !found),
            "the key written behind the cursor is gone"
        );
        assert_eq!(inner.count(&span).unwrap(), 0);
        assert_eq!(inner.len(), 200);
    }
}
