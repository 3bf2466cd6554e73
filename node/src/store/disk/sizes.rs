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
//! bookkeeping of recency.

use std::collections::HashMap;

/// What one entry costs besides its key's bytes: the map's slot (the
/// boxed key's pointer and length, the size), its control byte and the
/// allocator's rounding of the key.
const ENTRY_OVERHEAD: usize = 48;

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

    /// The key's size (key and value bytes; `None`: absent) as last
    /// written, if it was written recently.
    pub(super) fn get(&self, key: &str) -> Option<Option<u64>> {
        self.newer.get(key).or_else(|| self.older.get(key)).copied()
    }

    /// Records what a write leaves: `size` is `None` after a delete.
    pub(super) fn record(&mut self, key: &str, size: Option<u64>) {
        if let Some(slot) = self.newer.get_mut(key) {
            *slot = size;
            return;
        }
        let cost = key.len() + ENTRY_OVERHEAD;
        if self.newer_bytes + cost > self.generation_bytes {
            self.older = std::mem::take(&mut self.newer);
            self.newer_bytes = 0;
        }
        self.newer.insert(key.into(), size);
        self.newer_bytes += cost;
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

    #[test]
    fn a_recorded_size_is_known_until_two_generations_have_filled_after_it() {
        // Room for two keys of one byte a generation.
        let mut recent = RecentSizes::new(2 * (1 + ENTRY_OVERHEAD));
        assert_eq!(recent.get("a"), None, "never written: unknown");
        recent.record("a", Some(5));
        recent.record("b", None);
        assert_eq!(recent.get("a"), Some(Some(5)));
        assert_eq!(recent.get("b"), Some(None), "deleted: known absent");
        // A rewrite takes no room; its new size wins.
        recent.record("a", Some(7));
        assert_eq!(recent.get("a"), Some(Some(7)));
        // The third key starts a generation; the first two are older.
        recent.record("c", Some(1));
        assert_eq!(recent.get("a"), Some(Some(7)));
        recent.record("d", Some(1));
        // Rewritten while older: the newer generation's size wins.
        recent.record("a", Some(9));
        assert_eq!(recent.get("a"), Some(Some(9)));
        // The next generation drops the one that held `b` (and the
        // stale `a`), and keeps `a`'s latest size.
        recent.record("e", Some(1));
        assert_eq!(recent.get("b"), None);
        assert_eq!(recent.get("a"), Some(Some(9)));
        assert_eq!(recent.get("e"), Some(Some(1)));
    }

    #[test]
    fn clearing_forgets_every_size() {
        let mut recent = RecentSizes::new(1 << 10);
        recent.record("a", Some(5));
        recent.record("b", None);
        recent.clear();
        assert_eq!((recent.get("a"), recent.get("b")), (None, None));
    }

    #[test]
    fn a_generation_holds_about_its_budget_in_keys() {
        let mut recent = RecentSizes::new(100 * (16 + ENTRY_OVERHEAD));
        for i in 0..1000 {
            recent.record(&format!("key-{i:012}"), Some(1));
        }
        assert!(recent.newer.len() <= 100, "{}", recent.newer.len());
        assert!(recent.older.len() == 100, "{}", recent.older.len());
    }
}
