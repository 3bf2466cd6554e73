//! The move lock: one driver (a `cavi reshard`, the operator) moves ranges
//! of a cluster at a time. A driver takes the lock on every node of the map
//! (in id order, giving up on the first refusal) and renews it while it
//! works; a lock that is not renewed expires, so a killed driver cannot
//! block the next one for longer than the time it asked for.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A driver's request to take or renew the lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Who drives: `cavi@host/pid`, `cavi-operator`.
    pub owner: String,
    /// How long the lock holds without a renewal, in milliseconds.
    pub ttl_ms: u64,
}

/// Who holds the lock and for how much longer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    pub owner: String,
    pub remaining_ms: u64,
}

struct Held {
    owner: String,
    until: Instant,
}

/// The lock as one node keeps it (in memory: it only has to outlive a
/// driver's pause between two renewals).
#[derive(Default)]
pub struct MoveLock {
    held: Mutex<Option<Held>>,
}

impl MoveLock {
    /// Takes or renews the lock for `req.owner`; `Err` names the holder
    /// when someone else holds it.
    pub fn acquire(&self, req: &LockRequest) -> Result<LockState, LockState> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(h) = held.as_ref()
            && h.owner != req.owner
            && h.until > now
        {
            return Err(LockState {
                owner: h.owner.clone(),
                remaining_ms: millis(h.until - now),
            });
        }
        let ttl = Duration::from_millis(req.ttl_ms.clamp(100, 10 * 60 * 1000));
        *held = Some(Held {
            owner: req.owner.clone(),
            until: now + ttl,
        });
        Ok(LockState {
            owner: req.owner.clone(),
            remaining_ms: millis(ttl),
        })
    }

    /// Releases the lock if `owner` holds it.
    pub fn release(&self, owner: &str) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.as_ref().is_some_and(|h| h.owner == owner) {
            *held = None;
        }
    }

    /// The holder, if the lock is held.
    pub fn state(&self) -> Option<LockState> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        held.as_ref().filter(|h| h.until > now).map(|h| LockState {
            owner: h.owner.clone(),
            remaining_ms: millis(h.until - now),
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(owner: &str, ttl_ms: u64) -> LockRequest {
        LockRequest {
            owner: owner.into(),
            ttl_ms,
        }
    }

    #[test]
    fn one_owner_at_a_time_until_release_or_expiry() {
        let lock = MoveLock::default();
        assert!(lock.acquire(&req("a", 60_000)).is_ok());
        assert!(lock.acquire(&req("a", 60_000)).is_ok(), "renewal");
        let refused = lock.acquire(&req("b", 60_000)).expect_err("held by a");
        assert_eq!(refused.owner, "a");
        assert!(refused.remaining_ms > 50_000);
        lock.release("b");
        assert!(
            lock.acquire(&req("b", 60_000)).is_err(),
            "b cannot release a's lock"
        );
        lock.release("a");
        assert!(lock.state().is_none());
        assert!(lock.acquire(&req("b", 100)).is_ok());
        std::thread::sleep(Duration::from_millis(150));
        assert!(lock.state().is_none(), "expired");
        assert!(lock.acquire(&req("a", 60_000)).is_ok());
    }
}
