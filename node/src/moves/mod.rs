//! Moving one range between two live nodes: the node's side of online
//! resharding.
//!
//! One move (range R, source to target, epoch E to E+1) is a small state
//! machine, each phase persisted before it is acted on (on a durable node)
//! and each request idempotent:
//!
//! 1. **prepare** (target): accepts R for E+1, refuses when it already
//!    holds keys in R, and keeps what arrives apart: it does not own R, so
//!    it neither serves nor lists those keys until commit.
//! 2. **copy** (source): a tap on the storage engine starts seeing every
//!    write, then a scan streams R to the target in pages, one page in
//!    flight (back pressure, bounded memory), off the async workers.
//! 3. **catch up** (source): the writes the tap saw go to the target in
//!    engine order, each numbered; the target applies them, and a copied
//!    entry never overwrites a key a tapped write touched.
//! 4. **fence** (source): requests for R wait (with a deadline, never
//!    refused), those already running finish, the tail is sent.
//! 5. **commit**: the target checks it has every numbered write and the
//!    whole copy, persists E+1 (now it owns R), then the source persists
//!    E+1 and lets the waiting requests go to the target. Before the
//!    target's commit any failure aborts (the target drops R, the source
//!    still owns it); after it the move only rolls forward, and a source
//!    that crashed in between asks the target how it ended.
//! 6. **clean up** (source): R's keys are deleted in the background; the
//!    driver publishes E+1 to every other node (421s fix any straggler).

mod lock;
mod outgoing;
pub(crate) mod source;
pub(crate) mod target;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::config::ShardConfig;
use crate::keyspace::KeyRange;
use crate::shard_map::ShardMap;
use crate::store::{Entry, WriteOp};
use crate::wire::write_json_string;

pub use lock::{LockRequest, LockState, MoveLock};
pub use outgoing::{Admission, Outgoing};
pub(crate) use source::read_page;
pub use target::Incoming;

/// Records a durable node keeps about its moves.
pub(crate) const OUTGOING_RECORD: &str = "move/outgoing";
pub(crate) const INCOMING_RECORD: &str = "move/incoming";
/// Ids of the moves this node committed as a target, newest last.
pub(crate) const COMMITTED_RECORD: &str = "move/committed";
/// How many committed ids a target remembers for late questions.
pub(crate) const COMMITTED_KEPT: usize = 64;

/// What a driver asks of the two nodes of one move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveSpec {
    /// Unique per attempt; logs and metrics carry it.
    pub id: String,
    /// The range that changes owner, in the config's notation.
    pub range_start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    pub source: u32,
    pub target: u32,
    /// The map epoch both nodes must be at when the move starts.
    pub base_epoch: u64,
    /// The map at `base_epoch + 1`: the base map with R given to the
    /// target. Both nodes persist it at commit; the driver publishes it.
    pub map: ShardMap,
}

impl MoveSpec {
    pub fn range(&self) -> KeyRange {
        KeyRange::new(self.range_start.clone(), self.range_end.clone())
    }

    /// The target's entry in the new map (its address).
    pub fn target_shard(&self) -> Option<&ShardConfig> {
        self.map.shards.iter().find(|s| s.id == self.target)
    }

    /// The checks both nodes make: the new map is the base map with R
    /// (and nothing else) given from the source to the target.
    pub fn check(&self, current: &ShardMap) -> Result<(), String> {
        if current.epoch != self.base_epoch {
            return Err(format!(
                "move {} is planned on map epoch {} but this node's map is at epoch {}",
                self.id, self.base_epoch, current.epoch
            ));
        }
        if self.map.epoch != self.base_epoch + 1 {
            return Err(format!(
                "move {}: the new map must have epoch {}, not {}",
                self.id,
                self.base_epoch + 1,
                self.map.epoch
            ));
        }
        self.map.validate().map_err(|e| e.to_string())?;
        let span = crate::keyspace::Span::from(&self.range());
        let changes = current.changes_to(&self.map);
        let expected = [crate::shard_map::Change {
            span,
            from: Some(self.source),
            to: Some(self.target),
        }];
        if changes != expected {
            return Err(format!(
                "move {}: the new map does not give exactly {} from shard {} to shard {}",
                self.id,
                self.range(),
                self.source,
                self.target
            ));
        }
        Ok(())
    }
}

/// The phases a move goes through, as both nodes report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Target: accepted, receiving the copy and the tapped writes.
    Receiving,
    /// Source: streaming the snapshot and the tapped writes.
    Copying,
    /// Source: holding requests for the range while the tail goes out and
    /// the target commits; also a source that restarted not knowing how
    /// its commit ended.
    Fenced,
    /// Committed: the target owns the range at the new epoch.
    Committed,
    /// Source: deleting the range's keys after the commit.
    CleaningUp,
    /// Finished; the record is kept a short while for the driver.
    Done,
    /// Given up before commit: the source still owns the range.
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Receiving => "receiving",
            Phase::Copying => "copying",
            Phase::Fenced => "fenced",
            Phase::Committed => "committed",
            Phase::CleaningUp => "cleaning_up",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }

    /// Whether the move is over (the driver may start the next one).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }

    /// Whether the target owns the range.
    pub fn is_committed(self) -> bool {
        matches!(self, Phase::Committed | Phase::CleaningUp | Phase::Done)
    }
}

/// Which end of a move this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

/// A move as one node sees it: `/cluster` and `/internal/v1/moves` list
/// these, and the driver follows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MoveStatus {
    pub id: String,
    pub role: Role,
    pub range_start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    pub source: u32,
    pub target: u32,
    /// The epoch the move commits.
    pub epoch: u64,
    pub phase: Phase,
    /// Whether the whole snapshot reached the target.
    pub copy_done: bool,
    /// Keys and key+value bytes copied from the snapshot.
    pub keys_copied: u64,
    pub bytes_copied: u64,
    /// Writes taken during the move and sent on to the target.
    pub writes_mirrored: u64,
    /// Tapped writes not yet acknowledged by the target.
    pub lag: u64,
    /// Unix seconds when this node started the move.
    pub started_at: u64,
    /// Why the move failed, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a move has done so far, kept the same way on both sides: counted
/// as it goes, read back by `/cluster` and the driver.
pub(crate) struct Progress {
    pub(crate) copy_done: AtomicBool,
    pub(crate) keys_copied: AtomicU64,
    pub(crate) bytes_copied: AtomicU64,
    /// Tapped writes sent on (source) or applied (target).
    pub(crate) writes: AtomicU64,
    started_at: u64,
    /// The same start, for durations (the clock above may step).
    started: std::time::Instant,
    error: Mutex<Option<String>>,
}

impl Progress {
    fn new() -> Self {
        Self {
            copy_done: AtomicBool::new(false),
            keys_copied: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            started_at: unix_now(),
            started: std::time::Instant::now(),
            error: Mutex::new(None),
        }
    }

    /// Time since this side started (or resumed) the move.
    pub(crate) fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub(crate) fn fail(&self, why: &str) {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.to_owned());
    }

    pub(crate) fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `spec`'s move as `role` sees it, `lag` tapped writes behind.
    fn status(&self, spec: &MoveSpec, role: Role, phase: Phase, lag: u64) -> MoveStatus {
        MoveStatus {
            id: spec.id.clone(),
            role,
            range_start: spec.range_start.clone(),
            range_end: spec.range_end.clone(),
            source: spec.source,
            target: spec.target,
            epoch: spec.map.epoch,
            phase,
            copy_done: self.copy_done.load(Ordering::Relaxed),
            keys_copied: self.keys_copied.load(Ordering::Relaxed),
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            writes_mirrored: self.writes.load(Ordering::Relaxed),
            lag,
            started_at: self.started_at,
            error: self.error(),
        }
    }
}

/// One page a source sends its target.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub kind: BatchKind,
    /// For tapped writes: the number of the first one (they are numbered
    /// from 0 in the order the source's engine applied them).
    #[serde(default)]
    pub first_seq: u64,
    /// For the copy: whether this is its last page.
    #[serde(default)]
    pub last: bool,
    #[serde(default)]
    pub entries: Vec<BatchEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    /// Entries of the snapshot: written unless a tapped write touched the key.
    Copy,
    /// Tapped writes, in order.
    Writes,
}

/// A key with its value, or without one for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl From<&WriteOp> for BatchEntry {
    fn from(op: &WriteOp) -> Self {
        match op {
            WriteOp::Put(k, v) => BatchEntry {
                key: k.clone(),
                value: Some(v.clone()),
            },
            WriteOp::Delete(k) => BatchEntry {
                key: k.clone(),
                value: None,
            },
        }
    }
}

impl From<Entry> for BatchEntry {
    fn from(e: Entry) -> Self {
        BatchEntry {
            key: e.key,
            value: Some(e.value),
        }
    }
}

impl Batch {
    /// The batch as JSON, byte for byte what serde_json writes for it,
    /// with keys and values through the plain-string shortcut: escaping
    /// byte by byte was a sixth of the CPU a copy costs.
    pub fn to_json(&self) -> Vec<u8> {
        use std::io::Write as _;
        let size: usize = self.entries.iter().map(|e| e.size() + 24).sum();
        let mut out = Vec::with_capacity(64 + size);
        let kind = match self.kind {
            BatchKind::Copy => "copy",
            BatchKind::Writes => "writes",
        };
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            r#"{{"kind":"{kind}","first_seq":{},"last":{},"entries":["#,
            self.first_seq, self.last
        );
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"key":"#);
            write_json_string(&mut out, &entry.key);
            if let Some(value) = &entry.value {
                out.extend_from_slice(br#","value":"#);
                write_json_string(&mut out, value);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

impl BatchEntry {
    /// Key and value bytes, as a move counts them.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, String::len)
    }

    pub fn into_op(self) -> WriteOp {
        match self.value {
            Some(v) => WriteOp::Put(self.key, v),
            None => WriteOp::Delete(self.key),
        }
    }
}

/// The source's request to commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// How many tapped writes the source sent (numbered `0..writes`).
    pub writes: u64,
    /// Whether the source sent the whole copy.
    pub copy_done: bool,
}

/// A target's answer about a move it was asked to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still receiving: not committed.
    Receiving,
    /// Committed: the target owns the range.
    Committed,
    /// Never prepared, or aborted: not committed.
    Unknown,
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written encoding must read back as the batch it encodes
    /// and match serde_json byte for byte: deletes, escapes, both kinds,
    /// the first page and the last.
    #[test]
    fn a_batch_encodes_as_serde_json_does() {
        let samples = [
            "plain",
            "",
            "quote \" and back\\slash",
            "control \u{1} \u{7f}",
            "naïve ☃",
        ];
        for (i, kind) in [BatchKind::Copy, BatchKind::Writes].into_iter().enumerate() {
            for n in [0, 1, 5] {
                let batch = Batch {
                    kind,
                    first_seq: 7 * i as u64 * n as u64,
                    last: n == 5,
                    entries: (0..n)
                        .map(|j| BatchEntry {
                            key: format!("{}{j}", samples[j % samples.len()]),
                            value: (j % 3 != 2).then(|| samples[(j + i) % samples.len()].repeat(j)),
                        })
                        .collect(),
                };
                let json = batch.to_json();
                assert_eq!(
                    String::from_utf8_lossy(&json),
                    String::from_utf8_lossy(&serde_json::to_vec(&batch).expect("encodes"))
                );
                let back: Batch = serde_json::from_slice(&json).expect("decodes");
                assert_eq!(back.entries, batch.entries);
                assert_eq!(
                    (back.kind, back.first_seq, back.last),
                    (kind, batch.first_seq, batch.last)
                );
            }
        }
    }
}
