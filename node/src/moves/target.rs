//! The target's side of a move: prepare, receive the copy and the tapped
//! writes, commit (see the module above for the whole protocol).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::source::{delete_span, read_page};
use super::{
    Batch, BatchKind, COMMITTED_KEPT, COMMITTED_RECORD, CommitRequest, INCOMING_RECORD, MoveSpec,
    MoveStatus, Outcome, Phase, Progress, Role,
};
use crate::crash::crash_point;
use crate::error::ApiError;
use crate::keyspace::Span;
use crate::node::Node;
use crate::store::WriteOp;

/// What a durable target records while it receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: MoveSpec,
}

/// A copied page is applied a slice at a time, yielding in between, so
/// the writes that share the engine's lock wait for one slice at most:
/// this many entries, or this many bytes of them. A yield on a busy node
/// waits for a round of the other requests (about 0.5 ms under 64
/// connections here) while a slice of 64 KiB takes about 0.1 ms, so a
/// page of the copy yields once, not after every 32 KiB.
const APPLY_SLICE_KEYS: usize = 128;
const APPLY_SLICE_BYTES: usize = 64 << 10;

/// What arrived so far; batches are applied one at a time under it.
struct Receive {
    /// Number of the next tapped write expected.
    next_seq: u64,
    /// Keys a tapped write touched: the copy must not overwrite them.
    touched: HashSet<String>,
}

/// A range this node is taking.
pub struct Incoming {
    pub(crate) spec: MoveSpec,
    span: Span,
    receive: tokio::sync::Mutex<Receive>,
    phase: Mutex<Phase>,
    progress: Progress,
}

impl Incoming {
    fn new(spec: MoveSpec) -> Self {
        Self {
            span: Span::from(&spec.range()),
            spec,
            receive: tokio::sync::Mutex::new(Receive {
                next_seq: 0,
                touched: HashSet::new(),
            }),
            phase: Mutex::new(Phase::Receiving),
            progress: Progress::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }

    pub fn status(&self) -> MoveStatus {
        self.progress
            .status(&self.spec, Role::Target, self.phase(), 0)
    }
}

fn find(node: &Node, id: &str) -> Result<Arc<Incoming>, ApiError> {
    node.incoming
        .load_full()
        .filter(|i| i.spec.id == id)
        .ok_or_else(|| {
            ApiError::MoveNotFound(format!(
                "shard {} is not taking a range as move {id}",
                node.id()
            ))
        })
}

/// `POST /internal/v1/incoming/prepare`: accepts a range for the next epoch.
/// Refuses when this node already holds keys in it (only an empty range
/// can be filled without mixing two shards' data).
pub async fn prepare(node: &Arc<Node>, spec: MoveSpec) -> Result<MoveStatus, ApiError> {
    if let Some(inc) = node.incoming.load_full() {
        if inc.spec.id == spec.id {
            return Ok(inc.status());
        }
        if inc.phase() == Phase::Receiving {
            return Err(ApiError::MoveRefused(format!(
                "shard {} is already taking {} (move {}); one move at a time",
                node.id(),
                inc.spec.range(),
                inc.spec.id
            )));
        }
    }
    if spec.target != node.id() {
        return Err(ApiError::MoveRefused(format!(
            "move {} gives a range to shard {}, but this is shard {}",
            spec.id,
            spec.target,
            node.id()
        )));
    }
    spec.check(&node.map_snapshot())
        .map_err(ApiError::MoveRefused)?;
    let store = node.store()?.clone();
    let span = Span::from(&spec.range());
    let held = read_page(&store, &span, None, 1, 1).await?;
    if let Some(first) = held.entries.first() {
        return Err(ApiError::MoveRefused(format!(
            "shard {} already holds keys in {} (for example {:?}); it takes a range only where it holds nothing",
            node.id(),
            spec.range(),
            first.key
        )));
    }
    if let Some(state) = store.state() {
        let record = serde_json::to_vec(&Record { spec: spec.clone() })
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        state.save(&[(INCOMING_RECORD, Some(record))])?;
    }
    info!(id = %spec.id, range = %spec.range(), source = spec.source, "move prepared: receiving");
    let inc = Arc::new(Incoming::new(spec));
    node.incoming.store(Some(inc.clone()));
    Ok(inc.status())
}

/// `POST /internal/v1/incoming/{id}/batch`: applies one page from the
/// source. Tapped writes must come in order; a page sent again (after a
/// lost answer) is applied once.
pub async fn batch(node: &Arc<Node>, id: &str, batch: Batch) -> Result<(), ApiError> {
    let inc = find(node, id)?;
    let store = node.store()?.clone();
    let mut receive = inc.receive.lock().await;
    if inc.phase() != Phase::Receiving {
        return Err(ApiError::MoveRefused(format!(
            "move {id} is {}; it takes no more data",
            inc.phase().as_str()
        )));
    }
    if let Some(stray) = batch
        .entries
        .iter()
        .find(|e| !inc.span.contains(e.key.as_bytes()))
    {
        return Err(ApiError::MoveRefused(format!(
            "move {id}: key {:?} is outside the moving range {}",
            stray.key,
            inc.spec.range()
        )));
    }
    match batch.kind {
        BatchKind::Copy => {
            let mut keys = 0;
            let mut bytes = 0;
            let ops: Vec<WriteOp> = batch
                .entries
                .into_iter()
                .filter(|e| !receive.touched.contains(&e.key))
                .map(|e| {
                    keys += 1;
                    bytes += e.size() as u64;
                    e.into_op()
                })
                .collect();
            // A slice at a time, other requests running in between: a
            // whole page under the engine's write lock held up the
            // foreground writes for all of it. A page half applied is
            // applied again if the source sends it again.
            let mut ops = ops.into_iter().peekable();
            while ops.peek().is_some() {
                let (mut slice, mut size) = (Vec::new(), 0);
                while slice.len() < APPLY_SLICE_KEYS && size < APPLY_SLICE_BYTES {
                    let Some(op) = ops.next() else { break };
                    size += op.size();
                    slice.push(op);
                }
                store.write(slice).await?;
                if ops.peek().is_some() {
                    // After the last slice the answer goes out instead.
                    tokio::task::yield_now().await;
                }
            }
            inc.progress.keys_copied.fetch_add(keys, Ordering::Relaxed);
            inc.progress
                .bytes_copied
                .fetch_add(bytes, Ordering::Relaxed);
            if batch.last {
                inc.progress.copy_done.store(true, Ordering::Relaxed);
            }
        }
        BatchKind::Writes => {
            if batch.first_seq > receive.next_seq {
                return Err(ApiError::MoveRefused(format!(
                    "move {id}: tapped writes from {} arrived but {} is the next expected; some are missing",
                    batch.first_seq, receive.next_seq
                )));
            }
            let seen = usize::try_from(receive.next_seq - batch.first_seq).unwrap_or(usize::MAX);
            let fresh: Vec<WriteOp> = batch
                .entries
                .into_iter()
                .skip(seen)
                .map(|e| {
                    receive.touched.insert(e.key.clone());
                    e.into_op()
                })
                .collect();
            let n = fresh.len() as u64;
            store.write(fresh).await?;
            receive.next_seq += n;
            inc.progress.writes.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// `POST /internal/v1/incoming/{id}/commit`: when every tapped write and
/// the whole copy are here, persists the new map (this node owns the
/// range from now on) and remembers the move as committed.
pub async fn commit(node: &Arc<Node>, id: &str, req: CommitRequest) -> Result<(), ApiError> {
    if committed_here(node, id) {
        return Ok(());
    }
    let inc = find(node, id)?;
    let receive = inc.receive.lock().await;
    match inc.phase() {
        Phase::Receiving => {}
        p if p.is_committed() => return Ok(()),
        p => {
            return Err(ApiError::MoveRefused(format!(
                "move {id} is {}, it cannot commit",
                p.as_str()
            )));
        }
    }
    if !req.copy_done || !inc.progress.copy_done.load(Ordering::Relaxed) {
        return Err(ApiError::MoveRefused(format!(
            "move {id}: the copy is not complete here"
        )));
    }
    if receive.next_seq != req.writes {
        return Err(ApiError::MoveRefused(format!(
            "move {id}: {} tapped writes arrived here, the source sent {}",
            receive.next_seq, req.writes
        )));
    }
    let store = node.store()?.clone();
    crash_point("target-before-commit");
    // Written before anything is served from the range: the map, the end
    // of the receiving record and the committed id, as one synced write.
    let mut committed = node.committed_moves();
    committed.push(id.to_owned());
    let keep = committed.len().saturating_sub(COMMITTED_KEPT);
    committed.drain(..keep);
    let list = serde_json::to_vec(&committed).map_err(|e| ApiError::Internal(e.to_string()))?;
    let map = inc.spec.map.clone();
    if node.map().epoch < map.epoch {
        node.persist_map(
            &map,
            &[(INCOMING_RECORD, None), (COMMITTED_RECORD, Some(list))],
        )?;
        node.set_map(map);
    } else if let Some(state) = store.state() {
        state.save(&[(INCOMING_RECORD, None), (COMMITTED_RECORD, Some(list))])?;
    }
    node.set_committed_moves(committed);
    inc.set_phase(Phase::Committed);
    crash_point("target-after-commit");
    info!(id, epoch = inc.spec.map.epoch, range = %inc.spec.range(), "move committed: this shard owns the range");
    Ok(())
}

fn committed_here(node: &Node, id: &str) -> bool {
    node.committed_moves().iter().any(|c| c == id)
}

/// `GET /internal/v1/incoming/{id}/outcome`: whether this node committed the
/// move, for a source that does not know.
pub fn outcome(node: &Node, id: &str) -> Outcome {
    if committed_here(node, id) {
        return Outcome::Committed;
    }
    match find(node, id).map(|inc| inc.phase()) {
        Ok(Phase::Receiving) => Outcome::Receiving,
        Ok(p) if p.is_committed() => Outcome::Committed,
        _ => Outcome::Unknown,
    }
}

/// `POST /internal/v1/incoming/{id}/abort`: drops what arrived (in the
/// background). Aborting a committed move is refused; an unknown one is
/// already off.
pub async fn abort(node: &Arc<Node>, id: &str) -> Result<(), ApiError> {
    if committed_here(node, id) {
        return Err(ApiError::MoveRefused(format!(
            "move {id} has committed on shard {}; it can only finish",
            node.id()
        )));
    }
    let Ok(inc) = find(node, id) else {
        return Ok(());
    };
    let _receiving = inc.receive.lock().await;
    if inc.phase() != Phase::Receiving {
        return Ok(());
    }
    drop_received(node, &inc, "aborted by the source or the driver").await
}

async fn drop_received(node: &Arc<Node>, inc: &Arc<Incoming>, why: &str) -> Result<(), ApiError> {
    inc.set_phase(Phase::Aborted);
    inc.progress.fail(why);
    warn!(id = %inc.spec.id, reason = why, "move aborted; dropping what arrived");
    let store = node.store()?.clone();
    if let Some(state) = store.state() {
        state.save(&[(INCOMING_RECORD, None)])?;
    }
    let span = inc.span.clone();
    tokio::spawn(async move {
        if let Err(e) = delete_span(&store, &span).await {
            warn!(error = %e, "cannot drop the keys of an aborted move; a new move into the range will be refused until they are gone");
        }
    });
    Ok(())
}

/// On start: a range that was still arriving is dropped (the source aborts
/// when it next hears from this node); the committed ids are read back.
pub(crate) async fn resume(node: &Arc<Node>) -> Result<(), ApiError> {
    let store = node.store()?.clone();
    let Some(state) = store.state() else {
        return Ok(());
    };
    if let Some(raw) = state.load(COMMITTED_RECORD)? {
        let ids: Vec<String> = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::Internal(format!("the committed-move record is corrupt: {e}"))
        })?;
        node.set_committed_moves(ids);
    }
    if let Some(raw) = state.load(INCOMING_RECORD)? {
        let record: Record = serde_json::from_slice(&raw)
            .map_err(|e| ApiError::Internal(format!("the move record is corrupt: {e}")))?;
        let inc = Arc::new(Incoming::new(record.spec));
        node.incoming.store(Some(inc.clone()));
        drop_received(
            node,
            &inc,
            "this node restarted while the range was arriving",
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::ClusterConfig;
    use crate::settings::Settings;
    use crate::shard_map::ShardMap;
    use crate::store::MemoryStore;

    /// Shard 1 of `a..m, n..z`, and a move of `g..m` from shard 0 to it.
    fn shard_1_and_a_move() -> (Arc<Node>, MoveSpec) {
        let map = |yaml: &str| ShardMap::from_config(&ClusterConfig::from_yaml(yaml).unwrap());
        let now = map(r#"shards:
  - { id: 0, addr: "127.0.0.1:1", range_start: "a", range_end: "m" }
  - { id: 1, addr: "127.0.0.1:2", range_start: "n", range_end: "z" }"#);
        let mut next = map(r#"shards:
  - { id: 0, addr: "127.0.0.1:1", range_start: "a", range_end: "f" }
  - { id: 1, addr: "127.0.0.1:2", range_start: "g", range_end: "z" }"#);
        next.epoch = now.epoch + 1;
        let node = Arc::new(
            Node::new(
                now.clone(),
                1,
                Arc::new(MemoryStore::new()),
                Settings::default(),
            )
            .unwrap(),
        );
        let spec = MoveSpec {
            id: "m1".into(),
            range_start: "g".into(),
            range_end: Some("m".into()),
            source: 0,
            target: 1,
            base_epoch: now.epoch,
            map: next,
        };
        (node, spec)
    }

    /// A target takes a range only where it holds nothing: a key it holds
    /// in the range (left by whatever means) would mix with the source's.
    #[tokio::test]
    async fn a_target_holding_keys_in_the_range_refuses_it() {
        let (node, spec) = shard_1_and_a_move();
        node.store().unwrap().put("h-stray", "x").await.unwrap();
        let e = prepare(&node, spec).await.unwrap_err();
        assert_eq!(e.code(), "move_refused", "{e}");
        assert!(
            e.to_string().contains("already holds keys in") && e.to_string().contains("h-stray"),
            "{e}"
        );
        assert!(node.incoming.load_full().is_none(), "nothing was prepared");

        // The same move into an empty range is taken.
        let (node, spec) = shard_1_and_a_move();
        node.store().unwrap().put("p-own", "x").await.unwrap();
        let status = prepare(&node, spec).await.unwrap();
        assert_eq!(status.phase, Phase::Receiving);
    }
}
