//! The sizes of the keys the writer wrote last. Exact counts need each
//! written key's previous size; looking it up in the engine searches the
//! memtable's skiplist, which holds every version written since the last
//! flush and took about 8% of a durable node's CPU under overwrites
//! (measured with `perf record` on the bench's PUT load). A key written
//! recently is answered from here instead.
//!
//! Two generations bounded in bytes: once the newer fills, it becomes the
//! older and the older is dropped, so a key rewritten within about one
//! generation's worth of distinct keys stays known without any per-key
//! bookkeeping of recency. The generations turn only between batches.

use std::collections::HashMap;

/// What one entry costs besides its key's bytes, at most: its slot in
/// the map (the boxed key's pointer and length, the size: 32 bytes) and
/// control byte, twice over for a table that has just doubled, and the
/// allocator's rounding of the key.
const ENTRY_OVERHEAD: usize = 80;

/// The bytes of one slot of the map and its control byte.
#[cfg(test)]
const SLOT_BYTES: usize = std::mem::size_of::<(Box<str>, Option<u64>)>() + 1;

pub(super) struct RecentSizes {
    newer: HashMap<Box<str>, Option<u64>>,
    older: HashMap<Box<str>, Option<u64>>,
    newer_bytes: usize,
    /// Most bytes one generation holds; both together hold twice this.
    generation_bytes: usize,
}

impl RecentSizes {
    pub(super) fn new(generation_bytes: usize) -> Self {
        Self {
            newer: HashMap::new(),
            older: HashMap::new(),
            newer_bytes: 0,
            generation_bytes,
        }
    }

    /// Records the size a write leaves (`None` after a delete) and returns
    /// the key's size before it: as last recorded, else from `engine`.
    /// A key rewritten within the newer generation costs one lookup.
    pub(super) fn replace<E>(
        &mut self,
        key: &str,
        size: Option<u64>,
        engine: impl FnOnce() -> Result<Option<u64>, E>,
    ) -> Result<Option<u64>, E> {
        if let Some(slot) = self.newer.get_mut(key) {
            return Ok(std::mem::replace(slot, size));
        }
        let before = match self.older.get(key) {
            Some(known) => *known,
            None => engine()?,
        };
        self.newer.insert(key.into(), size);
        self.newer_bytes += key.len() + ENTRY_OVERHEAD;
        Ok(before)
    }

    /// Whether the key's size is recorded.
    pub(super) fn knows(&self, key: &str) -> bool {
        self.newer.contains_key(key) || self.older.contains_key(key)
    }

    /// Called before each batch: a full newer generation becomes the older
    /// one. Never within a batch, so every key a batch wrote is known to
    /// its later writes of the same key (the newer generation can outgrow
    /// its budget by one batch's keys).
    pub(super) fn make_room(&mut self) {
        if self.newer_bytes >= self.generation_bytes {
            self.older = std::mem::take(&mut self.newer);
            self.newer_bytes = 0;
        }
    }

    /// Forgets everything: after a failed commit the engine is reopened
    /// and may not hold what was recorded.
    pub(super) fn clear(&mut self) {
        self.newer = HashMap::new();
        self.older = HashMap::new();
        self.newer_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records `size` for `key`; the size before it, or `None` if it had
    /// to be asked of the engine.
    fn replace(recent: &mut RecentSizes, key: &str, size: Option<u64>) -> Option<Option<u64>> {
        let mut asked = false;
        let before = recent
            .replace(key, size, || {
                asked = true;
                Ok::<_, ()>(Some(1000))
            })
            .expect("the engine answers");
        (!asked).then_some(before)
    }

    #[test]
    fn a_recorded_size_is_known_until_two_generations_have_filled_after_it() {
        // Room for two keys of one byte a generation.
        let mut recent = RecentSizes::new(2 * (1 + ENTRY_OVERHEAD));
        assert_eq!(
            replace(&mut recent, "a", Some(5)),
            None,
            "never written: asked"
        );
        assert_eq!(replace(&mut recent, "b", None), None);
        // A rewrite takes no room: the size before it is the one recorded.
        assert_eq!(replace(&mut recent, "a", Some(7)), Some(Some(5)));
        assert_eq!(
            replace(&mut recent, "b", None),
            Some(None),
            "deleted: known absent"
        );
        // The generation is full: the next batch starts another.
        recent.make_room();
        assert_eq!(replace(&mut recent, "c", Some(1)), None);
        assert_eq!(replace(&mut recent, "a", Some(9)), Some(Some(7)));
        // The newer generation holds `c` and `a`; the next batch drops the
        // one that held `b` (and the stale `a`).
        recent.make_room();
        assert_eq!(replace(&mut recent, "b", None), None, "forgotten: asked");
        assert_eq!(replace(&mut recent, "a", Some(3)), Some(Some(9)));
    }

    #[test]
    fn within_a_batch_every_key_stays_known_whatever_the_budget() {
        let mut recent = RecentSizes::new(0);
        recent.make_room();
        for key in ["x", "y", "z"] {
            assert_eq!(replace(&mut recent, key, Some(2)), None);
        }
        assert_eq!(replace(&mut recent, "x", Some(3)), Some(Some(2)));
        recent.make_room();
        recent.make_room();
        assert_eq!(
            replace(&mut recent, "x", Some(3)),
            None,
            "two batches later"
        );
    }

    #[test]
    fn a_failed_engine_lookup_records_nothing() {
        let mut recent = RecentSizes::new(1 << 10);
        let failed = recent.replace("a", Some(5), || Err("disk"));
        assert_eq!(failed, Err("disk"));
        assert_eq!(replace(&mut recent, "a", Some(5)), None, "still unknown");
    }

    #[test]
    fn clearing_forgets_every_size() {
        let mut recent = RecentSizes::new(1 << 10);
        replace(&mut recent, "a", Some(5));
        replace(&mut recent, "b", None);
        recent.clear();
        assert_eq!(replace(&mut recent, "a", Some(5)), None);
        assert_eq!(replace(&mut recent, "b", None), None);
    }

    #[test]
    fn a_generation_holds_about_its_budget_in_keys() {
        let mut recent = RecentSizes::new(100 * (16 + ENTRY_OVERHEAD));
        for i in 0..1000 {
            recent.make_room();
            replace(&mut recent, &format!("key-{i:012}"), Some(1));
        }
        assert!(recent.newer.len() <= 100, "{}", recent.newer.len());
        assert_eq!(recent.older.len(), 100);
    }

    #[test]
    fn a_generation_stays_within_its_budget_in_memory() {
        // The map's buckets (a power of two, at most 7/8 full) and the
        // keys' bytes, however many keys of 16 bytes have filled it.
        let budget = 4 << 20;
        let mut recent = RecentSizes::new(budget);
        let mut most = 0;
        for i in 0..300_000 {
            recent.make_room();
            replace(&mut recent, &format!("key-{i:012}"), Some(1));
            let buckets = (recent.newer.capacity() * 8 / 7).next_power_of_two();
            most = most.max(buckets * SLOT_BYTES + recent.newer.len() * 16);
        }
        assert!(most <= budget, "{most} bytes");
        // And it is not far below it: most of the budget holds keys.
        assert!(recent.older.len() > 40_000, "{}", recent.older.len());
    }
}
