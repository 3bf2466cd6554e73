//! A range this node is giving away, as the requests for it see it: the
//! move's phase, the gate that admits requests for the range (all while
//! copying, reads only while fenced, none while the target commits), and
//! the log of tapped writes the catch-up sends on.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::{MoveSpec, MoveStatus, Phase, Progress, Role};
use crate::error::ApiError;
use crate::keyspace::Span;
use crate::store::{Tap, WriteOp};

/// Tapped writes held for the target before writers to the range wait.
const LOG_SOFT_BYTES: usize = 16 << 20;
/// Tapped writes held before the move gives up (the target cannot keep up).
const LOG_HARD_BYTES: usize = 64 << 20;

/// What a durable source records, before it acts on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub spec: MoveSpec,
    pub phase: Phase,
}

struct Gate {
    phase: Phase,
    /// Requests for the range running now (admitted while not fenced).
    inflight: usize,
    /// Whether reads of the range are served while it is fenced: from the
    /// fence until just before the target is asked to commit. Writes are
    /// held then, so the source's data is the range's last word.
    reads_open: bool,
    /// Reads admitted through the fence and running now; the target is
    /// asked to commit only once they are done.
    reads: usize,
}

#[derive(Default)]
pub(super) struct Log {
    pub(super) ops: VecDeque<WriteOp>,
    pub(super) bytes: usize,
    /// Number of `ops[0]`; tapped writes are numbered from 0.
    pub(super) first_seq: u64,
    /// The log outgrew its hard bound: the move must give up.
    pub(super) overflow: bool,
}

/// A range this node is giving away.
pub struct Outgoing {
    pub(crate) spec: MoveSpec,
    pub(crate) span: Span,
    gate: Mutex<Gate>,
    pub(super) phase_tx: watch::Sender<Phase>,
    /// Wakes the fence when the last admitted request finishes.
    idle: Notify,
    pub(super) log: Mutex<Log>,
    /// Wakes the sender when writes are tapped, and writers and the fence
    /// when the log shrinks.
    pub(super) log_changed: Notify,
    pub(super) progress: Progress,
    pub(super) last_touch: Mutex<Instant>,
}

/// Holds a request's place in the range while it runs; the fence waits
/// for every one to be dropped.
pub struct Admitted<'a> {
    out: &'a Outgoing,
    /// Admitted through the fence (a read), not before it.
    fenced: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut gate = self.out.gate();
        let left = if self.fenced {
            gate.reads -= 1;
            gate.reads
        } else {
            gate.inflight -= 1;
            gate.inflight
        };
        if left == 0 {
            self.out.idle.notify_waiters();
        }
    }
}

/// What a request for a key in the moving range may do.
pub enum Admission<'a> {
    /// Serve it here; the guard holds its place until it is done.
    Serve(Admitted<'a>),
    /// The range changed hands (or the move ended): route again.
    Reroute,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Returns once `done` holds, checking it again each time `notify` wakes
/// its waiters. The wake-up is registered before each check, so a change
/// between the check and the wait is not missed.
pub(super) async fn until(notify: &Notify, mut done: impl FnMut() -> bool) {
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if done() {
            return;
        }
        woken.await;
    }
}

impl Tap for Outgoing {
    fn applied(&self, op: &WriteOp) {
        if !self.span.contains(op.key().as_bytes()) {
            return;
        }
        {
            let mut log = lock(&self.log);
            if log.bytes > LOG_HARD_BYTES {
                log.overflow = true;
            } else {
                log.bytes += op.size();
                log.ops.push_back(op.clone());
            }
        }
        self.log_changed.notify_waiters();
    }
}

impl Outgoing {
    pub(super) fn new(spec: MoveSpec, phase: Phase) -> Self {
        let span = Span::from(&spec.range());
        Self {
            spec,
            span,
            gate: Mutex::new(Gate {
                phase,
                inflight: 0,
                reads_open: false,
                reads: 0,
            }),
            phase_tx: watch::Sender::new(phase),
            idle: Notify::new(),
            log: Mutex::new(Log::default()),
            log_changed: Notify::new(),
            progress: Progress::new(),
            last_touch: Mutex::new(Instant::now()),
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        lock(&self.gate)
    }

    pub fn phase(&self) -> Phase {
        self.gate().phase
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.gate().phase = phase;
        self.phase_tx.send_replace(phase);
    }

    /// Moves to `to` only from one of `from`; whether it did.
    pub(super) fn transition(&self, from: &[Phase], to: Phase) -> bool {
        // Only `fence` opens the fence to reads, and only until `commit`
        // closes it.
        self.shift(from, to, false)
    }

    /// Copying to fenced: writes to the range wait from now on, reads are
    /// still served here.
    pub(super) fn fence(&self) -> bool {
        self.shift(&[Phase::Copying], Phase::Fenced, true)
    }

    fn shift(&self, from: &[Phase], to: Phase, reads_open: bool) -> bool {
        let mut gate = self.gate();
        if !from.contains(&gate.phase) {
            return false;
        }
        gate.phase = to;
        gate.reads_open = reads_open;
        drop(gate);
        self.phase_tx.send_replace(to);
        true
    }

    /// Holds reads of the fenced range too and waits (up to `limit`) for
    /// those already admitted: once the target commits, a read here could
    /// miss a write the target took.
    pub(super) async fn close_to_reads(&self, limit: Duration) -> bool {
        self.gate().reads_open = false;
        tokio::time::timeout(limit, self.drained(|gate| gate.reads))
            .await
            .is_ok()
    }

    /// Waits for the requests admitted before the fence to finish.
    pub(super) async fn admitted_before_fence_done(&self) {
        self.drained(|gate| gate.inflight).await;
    }

    /// Waits until `running` (a count of the gate's) is zero; admitted
    /// requests wake it as they finish.
    async fn drained(&self, running: fn(&Gate) -> usize) {
        until(&self.idle, || running(&self.gate()) == 0).await;
    }

    /// Marks the move as looked after by its driver.
    pub fn touch(&self) {
        *lock(&self.last_touch) = Instant::now();
    }

    pub fn status(&self) -> MoveStatus {
        let lag = lock(&self.log).ops.len() as u64;
        self.progress
            .status(&self.spec, Role::Source, self.phase(), lag)
    }

    /// Admits a request for a key in the range: at once while copying,
    /// after the fence otherwise (waiting at most until `deadline`). A
    /// read goes through the fence while the fence is open to reads.
    pub async fn admit(
        &self,
        deadline: tokio::time::Instant,
        read: bool,
    ) -> Result<Admission<'_>, ()> {
        // Subscribed only once a request has to wait, then the gate is
        // checked again: a phase change after that check wakes the wait.
        let mut changes: Option<watch::Receiver<Phase>> = None;
        loop {
            {
                let mut gate = self.gate();
                match gate.phase {
                    Phase::Copying => {
                        gate.inflight += 1;
                        return Ok(Admission::Serve(Admitted {
                            out: self,
                            fenced: false,
                        }));
                    }
                    Phase::Fenced if read && gate.reads_open => {
                        gate.reads += 1;
                        return Ok(Admission::Serve(Admitted {
                            out: self,
                            fenced: true,
                        }));
                    }
                    Phase::Fenced => {}
                    _ => return Ok(Admission::Reroute),
                }
            }
            let Some(watching) = changes.as_mut() else {
                changes = Some(self.phase_tx.subscribe());
                continue;
            };
            if tokio::time::timeout_at(deadline, watching.changed())
                .await
                .is_err()
            {
                return Err(());
            }
        }
    }

    /// Writers to the range wait while the target lags far behind, so the
    /// tapped writes held here stay bounded.
    pub async fn throttle(&self, deadline: tokio::time::Instant) -> Result<(), ()> {
        let room = until(&self.log_changed, || {
            lock(&self.log).bytes <= LOG_SOFT_BYTES
        });
        tokio::time::timeout_at(deadline, room)
            .await
            .map_err(|_| ())
    }

    pub(super) fn record(&self, phase: Phase) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(&Record {
            spec: self.spec.clone(),
            phase,
        })
        .map_err(|e| ApiError::Internal(e.to_string()))
    }
}
