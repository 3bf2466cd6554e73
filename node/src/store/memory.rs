//! The default engine: an ordered map of packed blocks ([`Blocks`]) behind
//! a reader-writer lock, so concurrent readers share the lock and only
//! writers take it alone.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::blocks::Blocks;
use super::{
    Page, ScanRequest, Store, StoreError, Tap, WriteAck, WriteOp, fill_page, scan_start, utf8,
};
use crate::keyspace::Span;

#[derive(Default)]
pub struct MemoryStore {
    set: RwLock<Inner>,
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
    fn read_set(&self) -> RwLockReadGuard<'_, Inner> {
        self.set.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_set(&self) -> RwLockWriteGuard<'_, Inner> {
        self.set.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply(&self, inner: &mut Inner, op: &WriteOp) {
        match op {
            WriteOp::Put(k, v) => self.insert(inner, k, v),
            WriteOp::Delete(k) => self.remove(inner, k),
        }
        if let Some(tap) = &inner.tap {
            tap.applied(op);
        }
    }

    fn insert(&self, inner: &mut Inner, key: &str, value: &str) {
        let added = (key.len() + value.len()) as u64;
        if let Some(old) = inner.set.insert(key.as_bytes(), value.as_bytes()) {
            self.bytes.fetch_sub(old as u64, Ordering::Relaxed);
        }
        self.bytes.fetch_add(added, Ordering::Relaxed);
    }

    fn remove(&self, inner: &mut Inner, key: &str) {
        if let Some(old) = inner.set.remove(key.as_bytes()) {
            self.bytes.fetch_sub(old as u64, Ordering::Relaxed);
        }
    }
}

/// The set, and the tap that sees its writes (under the same lock, so in
/// their order).
#[derive(Default)]
struct Inner {
    set: Blocks,
    tap: Option<Arc<dyn Tap>>,
}

fn done() -> WriteAck {
    Box::pin(std::future::ready(Ok(())))
}

impl Store for MemoryStore {
    fn read(&self, key: &str, found: &mut dyn FnMut(&str)) -> Result<bool, StoreError> {
        let inner = self.read_set();
        match inner.set.get(key.as_bytes()) {
            Some(value) => {
                found(utf8(value)?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&self, key: &str, value: &str) -> WriteAck {
        let mut inner = self.write_set();
        if inner.tap.is_some() {
            self.apply(&mut inner, &WriteOp::Put(key.to_owned(), value.to_owned()));
        } else {
            self.insert(&mut inner, key, value);
        }
        done()
    }

    fn delete(&self, key: &str) -> WriteAck {
        let mut inner = self.write_set();
        if inner.tap.is_some() {
            self.apply(&mut inner, &WriteOp::Delete(key.to_owned()));
        } else {
            self.remove(&mut inner, key);
        }
        done()
    }

    fn write(&self, ops: Vec<WriteOp>) -> WriteAck {
        if !ops.is_empty() {
            let mut inner = self.write_set();
            for op in &ops {
                self.apply(&mut inner, op);
            }
        }
        done()
    }

    fn set_tap(&self, tap: Option<Arc<dyn Tap>>) -> WriteAck {
        self.write_set().tap = tap;
        done()
    }

    fn scan(&self, req: &ScanRequest<'_>) -> Result<Page, StoreError> {
        let inner = self.read_set();
        let (from, _) = scan_start(req);
        fill_page(req, inner.set.range(from).map(Ok))
    }

    fn keys(&self, span: &Span, limit: usize) -> Result<Vec<String>, StoreError> {
        let inner = self.read_set();
        inner
            .set
            .range(Bound::Included(span.start.as_slice()))
            .take_while(|(key, _)| span.contains(key))
            .take(limit)
            .map(|(key, _)| utf8(key).map(str::to_owned))
            .collect()
    }

    fn remove_range(&self, span: &Span, limit: usize) -> Option<Result<usize, StoreError>> {
        let mut inner = self.write_set();
        if inner.tap.is_some() {
            return None;
        }
        let (removed, bytes) = inner
            .set
            .remove_range(&span.start, span.upper.as_deref(), limit);
        self.bytes.fetch_sub(bytes as u64, Ordering::Relaxed);
        Some(Ok(removed))
    }

    fn count(&self, span: &Span) -> Result<u64, StoreError> {
        let inner = self.read_set();
        let n = inner
            .set
            .range(Bound::Included(span.start.as_slice()))
            .take_while(|(key, _)| span.contains(key))
            .count();
        Ok(n as u64)
    }

    fn len(&self) -> u64 {
        self.read_set().set.len() as u64
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::KeyRange;

    fn put(s: &MemoryStore, k: &str, v: &str) {
        // The memory engine applies a write before returning its ack.
        drop(s.put(k, v));
        assert!(get(s, k).is_some());
    }

    fn get(s: &MemoryStore, k: &str) -> Option<String> {
        let mut out = None;
        s.read(k, &mut |v| out = Some(v.to_owned())).expect("read");
        out
    }

    fn everything() -> Span {
        Span::from(&KeyRange::new("", None::<&str>))
    }

    fn keys(
        s: &MemoryStore,
        prefix: &str,
        span: &Span,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<String>, bool) {
        let page = s
            .scan(&ScanRequest {
                span,
                prefix,
                after,
                limit,
                max_bytes: usize::MAX,
            })
            .expect("scan");
        (page.entries.into_iter().map(|e| e.key).collect(), page.more)
    }

    #[test]
    fn put_get_delete() {
        let s = MemoryStore::new();
        assert_eq!(get(&s, "a"), None);
        put(&s, "a", "1");
        put(&s, "a", "2");
        assert_eq!(get(&s, "a").as_deref(), Some("2"));
        assert_eq!(s.bytes(), 2);
        put(&s, "", "");
        put(&s, "ab", "");
        assert_eq!(get(&s, "").as_deref(), Some(""));
        assert_eq!(s.bytes(), 4);
        drop(s.write(vec![
            WriteOp::Delete("ab".into()),
            WriteOp::Delete("".into()),
        ]));
        drop(s.delete("a"));
        drop(s.delete("a"));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn prefix_scan_is_a_sorted_range_with_a_limit_and_a_cursor() {
        let s = MemoryStore::new();
        for k in ["fa", "f", "fz", "g", "e", "f\u{10ffff}", "fb"] {
            put(&s, k, &k.to_uppercase());
        }
        let all = everything();
        assert_eq!(
            keys(&s, "f", &all, None, usize::MAX),
            (
                vec![
                    "f".into(),
                    "fa".into(),
                    "fb".into(),
                    "fz".into(),
                    "f\u{10ffff}".into()
                ],
                false
            )
        );
        assert_eq!(
            keys(&s, "f", &all, None, 2),
            (vec!["f".into(), "fa".into()], true)
        );
        assert_eq!(
            keys(&s, "f", &all, Some("fa"), 2),
            (vec!["fb".into(), "fz".into()], true)
        );
        assert_eq!(keys(&s, "", &all, None, usize::MAX).0.len(), 7);
        assert!(keys(&s, "h", &all, None, usize::MAX).0.is_empty());
        // A span clips the scan whatever the prefix says.
        let span = Span::from(&KeyRange::new("fb", Some("fz")));
        assert_eq!(keys(&s, "", &span, None, 10).0, ["fb", "fz"]);
        assert_eq!(s.count(&span).expect("count"), 2);
        assert_eq!(s.keys(&span, 10).expect("keys"), ["fb", "fz"]);
        assert_eq!(s.keys(&span, 1).expect("keys"), ["fb"]);
    }

    #[test]
    fn a_byte_budget_stops_a_page_after_at_least_one_entry() {
        let s = MemoryStore::new();
        for k in ["a", "b", "c"] {
            put(&s, k, "0123456789");
        }
        let all = everything();
        let page = s
            .scan(&ScanRequest {
                span: &all,
                prefix: "",
                after: None,
                limit: 10,
                max_bytes: 15,
            })
            .expect("scan");
        assert_eq!(page.entries.len(), 2);
        assert!(page.more);
        let page = s
            .scan(&ScanRequest {
                span: &all,
                prefix: "",
                after: None,
                limit: 10,
                max_bytes: 1,
            })
            .expect("scan");
        assert_eq!(page.entries.len(), 1);
    }

    /// A range dropped in place goes a page at a time, keeps the keys
    /// around it and the byte count exact; with a tap installed the
    /// engine declines, so the tap sees each delete.
    #[test]
    fn a_range_is_removed_in_place_unless_a_tap_must_see_it() {
        let s = MemoryStore::new();
        for k in ["a", "b1", "b2", "b3", "c"] {
            put(&s, k, "value");
        }
        let span = Span {
            start: b"b".to_vec(),
            upper: Some(b"c".to_vec()),
        };
        assert_eq!(s.remove_range(&span, 2), Some(Ok(2)));
        assert_eq!(keys(&s, "", &everything(), None, 10).0, ["a", "b3", "c"]);
        assert_eq!(s.remove_range(&span, 2), Some(Ok(1)));
        assert_eq!(s.remove_range(&span, 2), Some(Ok(0)));
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 2 * 6);

        struct Seen;
        impl Tap for Seen {
            fn applied(&self, _: &WriteOp) {}
        }
        drop(s.set_tap(Some(Arc::new(Seen))));
        assert!(s.remove_range(&everything(), 10).is_none());
        assert_eq!(s.len(), 2);
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
                        assert_eq!(get(&s, &k).as_deref(), Some("v"));
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
