//! The engine's threads run as batch threads beside the request handlers.

/// Puts the calling thread (the writer, a reader) under `SCHED_BATCH`,
/// keeping its nice value.
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
/// writer has a core of its own, nothing changes. The readers
/// ([`super::Readers`]) gain the same way: they run when the handlers
/// wait and take every read queued meanwhile. Where the policy cannot be
/// set (another platform, a sandbox that forbids it), the thread runs as
/// before and the node logs why at start.
#[cfg(target_os = "linux")]
pub(crate) fn schedule_as_batch() -> Result<(), String> {
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
pub(crate) fn schedule_as_batch() -> Result<(), String> {
    Err("SCHED_BATCH is Linux's".into())
}
