//! The default engine: an ordered map behind a reader-writer lock, so
//! concurrent readers share the lock and only writers take it alone.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{Entry, Store, StoreError, WriteAck};

/// `Box<str>` instead of `String` saves a capacity word per key and value.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: RwLock<BTreeMap<Box<str>, Box<str>>>,
    /// Key and value bytes, kept up to date under the write lock.
    bytes: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave the map memory-unsafe,
    // and the map's own operations do not panic half-way; keep serving.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<Box<str>, Box<str>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<Box<str>, Box<str>>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.read().get(key).map(|v| v.to_string()))
    }

    fn put(&self, key: &str, value: &str) -> WriteAck {
        let mut map = self.write();
        let added = (key.len() + value.len()) as u64;
        if let Some(old) = map.insert(key.into(), value.into()) {
            self.bytes
                .fetch_sub((key.len() + old.len()) as u64, Ordering::Relaxed);
        }
        self.bytes.fetch_add(added, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete(&self, key: &str) -> WriteAck {
        if let Some(old) = self.write().remove(key) {
            self.bytes
                .fetch_sub((key.len() + old.len()) as u64, Ordering::Relaxed);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let map = self.read();
        let entries = map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect();
        Ok(entries)
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
