//! The default engine: an ordered set behind a reader-writer lock, so
//! concurrent readers share the lock and only writers take it alone.
//!
//! Each entry is one allocation, `[key length | key | value]`, ordered and
//! looked up by its key bytes (the set borrows them straight out of the
//! entry). One allocation instead of one per key and per value is what
//! keeps a small entry near the size of its bytes.

use std::borrow::Borrow;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{Entry, Store, StoreError, WriteAck};

const LEN: usize = std::mem::size_of::<u32>();

/// A key and its value in one boxed slice.
struct Packed(Box<[u8]>);

impl Packed {
    fn new(key: &str, value: &str) -> Self {
        let mut bytes = Vec::with_capacity(LEN + key.len() + value.len());
        // Keys are bounded far below 4 GiB by the node's key size limit.
        let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value.as_bytes());
        Self(bytes.into_boxed_slice())
    }

    fn key_len(&self) -> usize {
        let mut len = [0u8; LEN];
        len.copy_from_slice(&self.0[..LEN]);
        u32::from_le_bytes(len) as usize
    }

    fn key(&self) -> &[u8] {
        &self.0[LEN..LEN + self.key_len()]
    }

    fn value(&self) -> &[u8] {
        &self.0[LEN + self.key_len()..]
    }

    /// Key and value bytes, as counted in `bytes()`.
    fn size(&self) -> u64 {
        (self.0.len() - LEN) as u64
    }
}

impl Borrow<[u8]> for Packed {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

impl PartialEq for Packed {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Packed {}

impl PartialOrd for Packed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

/// By key only, exactly as the borrowed `[u8]` compares, which is what
/// lets the set be searched with a plain key.
impl Ord for Packed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.key().cmp(other.key())
    }
}

fn text(bytes: &[u8]) -> Result<String, StoreError> {
    // Everything stored came in as `&str`.
    String::from_utf8(bytes.to_vec()).map_err(|_| StoreError("stored data is not UTF-8".into()))
}

#[derive(Default)]
pub struct MemoryStore {
    set: RwLock<BTreeSet<Packed>>,
    /// Key and value bytes, kept up to date under the write lock.
    bytes: AtomicU64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .finish()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave the set memory-unsafe,
    // and the set's own operations do not panic half-way; keep serving.
    fn read(&self) -> RwLockReadGuard<'_, BTreeSet<Packed>> {
        self.set.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeSet<Packed>> {
        self.set.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read()
            .get(key.as_bytes())
            .map(|p| text(p.value()))
            .transpose()
    }

    fn put(&self, key: &str, value: &str) -> WriteAck {
        let entry = Packed::new(key, value);
        let added = entry.size();
        if let Some(old) = self.write().replace(entry) {
            self.bytes.fetch_sub(old.size(), Ordering::Relaxed);
        }
        self.bytes.fetch_add(added, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete(&self, key: &str) -> WriteAck {
        if let Some(old) = self.write().take(key.as_bytes()) {
            self.bytes.fetch_sub(old.size(), Ordering::Relaxed);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let set = self.read();
        set.range::<[u8], _>((Bound::Included(prefix.as_bytes()), Bound::Unbounded))
            .take_while(|p| p.key().starts_with(prefix.as_bytes()))
            .take(limit)
            .map(|p| {
                Ok(Entry {
                    key: text(p.key())?,
                    value: text(p.value())?,
                })
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.read().len()
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &MemoryStore, k: &str, v: &str) {
        // The memory engine acknowledges before returning.
        let ack = s.put(k, v);
        assert!(s.get(k).expect("get").is_some());
        drop(ack);
    }

    #[test]
    fn put_get_delete() {
        let s = MemoryStore::new();
        assert_eq!(s.get("a").expect("get"), None);
        put(&s, "a", "1");
        put(&s, "a", "2");
        assert_eq!(s.get("a").expect("get").as_deref(), Some("2"));
        assert_eq!(s.bytes(), 2);
        put(&s, "", "");
        put(&s, "ab", "");
        assert_eq!(s.get("").expect("get").as_deref(), Some(""));
        assert_eq!(s.get("ab").expect("get").as_deref(), Some(""));
        assert_eq!(s.bytes(), 4);
        drop(s.delete("ab"));
        drop(s.delete(""));
        drop(s.delete("a"));
        drop(s.delete("a"));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn prefix_scan_is_a_sorted_range_with_a_limit() {
        let s = MemoryStore::new();
        for k in ["fa", "f", "fz", "g", "e", "f\u{10ffff}", "fb"] {
            put(&s, k, &k.to_uppercase());
        }
        let keys: Vec<String> = s
            .scan_prefix("f", usize::MAX)
            .expect("scan")
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["f", "fa", "fb", "fz", "f\u{10ffff}"]);
        assert_eq!(s.scan_prefix("f", 2).expect("scan").len(), 2);
        assert_eq!(s.scan_prefix("", usize::MAX).expect("scan").len(), 7);
        assert!(s.scan_prefix("h", usize::MAX).expect("scan").is_empty());
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let s = std::sync::Arc::new(MemoryStore::new());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let k = format!("k{t}-{i}");
                        drop(s.put(&k, "v"));
                        assert_eq!(s.get(&k).expect("get").as_deref(), Some("v"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(s.len(), 4000);
    }
}
