//! The ordered map behind the memory engine: entries packed back to back
//! into blocks of a few kilobytes, the blocks in a B-tree by a lower bound
//! of their keys.
//!
//! Why not a `BTreeMap` of boxed entries: every entry would be its own
//! allocation (rounded up to the allocator's size class) plus a 16-byte
//! pointer in a B-tree node that is on average a third empty, about 40
//! bytes on top of a 116-byte entry. Packed, an entry costs its bytes and
//! two length bytes; a block's spare room is at most its allocator slack,
//! because its buffer grows and shrinks exactly with its contents.
//!
//! An entry is `varint(key length) varint(value length) key value`. The
//! tree's key for a block is a lower bound of the keys in it (the first
//! block's is empty), so every key has exactly one block that would hold
//! it: the one with the greatest bound not above it. A lookup is a tree
//! search and then a walk over at most one block's entries.

use std::collections::BTreeMap;
use std::ops::Bound;

/// A block that grows past this splits in two (unless it holds a single
/// entry, which may be of any size).
const MAX_BLOCK: usize = 4096;
/// A block that shrinks below this after a removal takes in its right
/// neighbour when both fit in one.
const MIN_BLOCK: usize = MAX_BLOCK / 4;

#[derive(Default)]
pub struct Blocks {
    /// Blocks by the lower bound of their keys; the first is always `""`.
    tree: BTreeMap<Box<[u8]>, Vec<u8>>,
    len: usize,
}

/// One entry inside a block: where it lies and what it holds.
struct Slot<'a> {
    start: usize,
    end: usize,
    key: &'a [u8],
    value: &'a [u8],
}

fn put_varint(out: &mut Vec<u8>, n: usize) {
    let mut bytes = [0; 10];
    let len = write_varint(&mut bytes, n);
    out.extend_from_slice(&bytes[..len]);
}

/// Appends the entry `key` → `value` in the block format.
fn put_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    put_varint(out, key.len());
    put_varint(out, value.len());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Puts the entry `key` → `value` (`len` bytes) where `bytes` of `block`
/// were, moving the rest of the block with one copy. (`Vec::splice` moves
/// the new bytes in one at a time, about ten instructions a byte.)
fn replace(
    block: &mut Vec<u8>,
    bytes: std::ops::Range<usize>,
    key: &[u8],
    value: &[u8],
    len: usize,
) {
    let (start, end, old_end) = (bytes.start, bytes.start + len, block.len());
    let new_end = old_end - bytes.end + end;
    if new_end > old_end {
        block.resize(new_end, 0);
    }
    block.copy_within(bytes.end..old_end, end);
    block.truncate(new_end);
    let mut at = start + write_varint(&mut block[start..], key.len());
    at += write_varint(&mut block[at..], value.len());
    block[at..at + key.len()].copy_from_slice(key);
    block[at + key.len()..end].copy_from_slice(value);
}

/// Writes `n` as a varint at the start of `out`; its length.
fn write_varint(out: &mut [u8], mut n: usize) -> usize {
    let mut i = 0;
    while n >= 0x80 {
        out[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    out[i] = n as u8;
    i + 1
}

/// The entry `key` → `value` in a buffer of its size (`len` bytes).
fn entry(key: &[u8], value: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    put_entry(&mut out, key, value);
    out
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

#[inline]
fn get_varint(bytes: &[u8], at: &mut usize) -> usize {
    // Keys and small values: one byte.
    let first = bytes[*at];
    if first < 0x80 {
        *at += 1;
        return usize::from(first);
    }
    let mut n = 0usize;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        n |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            return n;
        }
        shift += 7;
    }
}

/// The entry that starts at `start` (a boundary of `block`).
#[inline]
fn slot_at(block: &[u8], start: usize) -> Slot<'_> {
    let mut at = start;
    let key_len = get_varint(block, &mut at);
    let value_len = get_varint(block, &mut at);
    let key = &block[at..at + key_len];
    let value = &block[at + key_len..at + key_len + value_len];
    Slot {
        start,
        end: at + key_len + value_len,
        key,
        value,
    }
}

/// The entries of a block from `start` on, in key order.
fn slots(block: &[u8], start: usize) -> impl Iterator<Item = Slot<'_>> {
    let mut at = start;
    std::iter::from_fn(move || {
        (at < block.len()).then(|| {
            let slot = slot_at(block, at);
            at = slot.end;
            slot
        })
    })
}

/// The first entry of `block` whose key is not below `key`, and whether
/// it is `key` itself; `None` when every key is below.
fn seek<'a>(block: &'a [u8], key: &[u8]) -> Option<(Slot<'a>, bool)> {
    // The hot loop of every read: entries are skipped without slicing
    // their values.
    let mut at = 0;
    while at < block.len() {
        let start = at;
        let key_len = get_varint(block, &mut at);
        let value_len = get_varint(block, &mut at);
        let here = &block[at..at + key_len];
        let order = here.cmp(key);
        if order != std::cmp::Ordering::Less {
            let end = at + key_len + value_len;
            let slot = Slot {
                start,
                end,
                key: here,
                value: &block[at + key_len..end],
            };
            return Some((slot, order == std::cmp::Ordering::Equal));
        }
        at += key_len + value_len;
    }
    None
}

impl Blocks {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The block that holds (or would hold) `key`, with its bound.
    fn block_of(&self, key: &[u8]) -> Option<(&[u8], &[u8])> {
        self.tree
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(bound, block)| (&**bound, block.as_slice()))
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let (_, block) = self.block_of(key)?;
        match seek(block, key) {
            Some((slot, true)) => Some(slot.value),
            _ => None,
        }
    }

    /// Stores `value` under `key`; the key and value bytes of the entry it
    /// replaced, if any.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Option<usize> {
        if self.tree.is_empty() {
            self.tree.insert(Box::default(), Vec::new());
        }
        // The first block's bound is empty, so every key has a block.
        let (bound, block) = self
            .tree
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        let entry_len = varint_len(key.len()) + varint_len(value.len()) + key.len() + value.len();
        let found = seek(block, key).map(|(s, hit)| (s.start, s.end, hit, s.value.len()));
        let (at, replaced) = match found {
            Some((_, end, true, old)) if old == value.len() => {
                // Same size: only the value's bytes change, in place.
                block[end - old..end].copy_from_slice(value);
                return Some(key.len() + old);
            }
            Some((start, end, hit, old)) => {
                // A hit replaces its entry; a miss goes in before `start`.
                let gone = if hit { end } else { start };
                resize_exact(block, block.len() - (gone - start) + entry_len);
                replace(block, start..gone, key, value, entry_len);
                if !hit {
                    self.len += 1;
                }
                (start, hit.then_some(key.len() + old))
            }
            None if !block.is_empty() && block.len() + entry_len > MAX_BLOCK => {
                // The entry would go alone into a new block when this one
                // split (see `split`): start that block with it instead of
                // growing this one, cutting the entry back out and copying
                // the rest into a buffer of its size. Keys written in
                // order (a load, a move's copy) take this path once a
                // block.
                self.len += 1;
                self.tree.insert(key.into(), entry(key, value, entry_len));
                return None;
            }
            None => {
                let start = block.len();
                resize_exact(block, start + entry_len);
                put_entry(block, key, value);
                self.len += 1;
                (start, None)
            }
        };
        if block.len() > MAX_BLOCK {
            let bound = bound.clone();
            self.split(bound, Some(at));
        }
        replaced
    }

    /// Splits the block under `bound` until no part is over the limit
    /// (unless it is a single entry). When the block has just taken an
    /// entry at its end (`appended` is its offset), that entry goes alone
    /// into the new block, so keys written in order leave full blocks
    /// behind; otherwise the block splits at its middle.
    fn split(&mut self, bound: Box<[u8]>, appended: Option<usize>) {
        let Some(block) = self.tree.get_mut(&bound) else {
            return;
        };
        let cut = if let Some(at) = appended
            && at > 0
            && slot_at(block, at).end == block.len()
        {
            at
        } else {
            // The entry boundary nearest the middle that leaves something
            // on both sides.
            let middle = block.len() / 2;
            match slots(block, 0)
                .map(|s| s.end)
                .filter(|&end| end < block.len())
                .min_by_key(|&end| end.abs_diff(middle))
            {
                Some(end) => end,
                None => return,
            }
        };
        let right = block[cut..].to_vec();
        block.truncate(cut);
        compact(block);
        let left_over = block.len() > MAX_BLOCK;
        let right_over = right.len() > MAX_BLOCK;
        let right_bound: Box<[u8]> = slot_at(&right, 0).key.into();
        self.tree.insert(right_bound.clone(), right);
        if left_over {
            self.split(bound, None);
        }
        if right_over {
            self.split(right_bound, None);
        }
    }

    /// Removes `key`; the key and value bytes of what it held, if any.
    pub fn remove(&mut self, key: &[u8]) -> Option<usize> {
        let (bound, block) = self
            .tree
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        let (start, end, size) = match seek(block, key)? {
            (slot, true) => (slot.start, slot.end, slot.key.len() + slot.value.len()),
            (_, false) => return None,
        };
        cut(block, start..end);
        self.len -= 1;
        if block.len() < MIN_BLOCK {
            let bound = bound.clone();
            self.absorb(&bound);
        }
        Some(size)
    }

    /// Removes the first `limit` entries whose keys lie in `from..to`
    /// (`to` `None`: to the end); how many it removed and their key and
    /// value bytes. A block wholly inside the range goes at once, so a
    /// range costs a tree search per block rather than several per key:
    /// what dropping a moved range needs.
    pub fn remove_range(&mut self, from: &[u8], to: Option<&[u8]>, limit: usize) -> (usize, usize) {
        let (mut removed, mut bytes) = (0, 0);
        let mut at: Box<[u8]> = from.into();
        // Blocks left partly filled: they may merge with a neighbour once
        // the range is gone.
        let mut trimmed: Vec<Box<[u8]>> = Vec::new();
        while removed < limit {
            let Some((bound, block)) = self
                .tree
                .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(&*at)))
                .next_back()
            else {
                break;
            };
            let bound = bound.clone();
            let start = seek(block, &at).map_or(block.len(), |(slot, _)| slot.start);
            let mut end = start;
            let mut reached_end = false;
            while end < block.len() && removed < limit {
                let slot = slot_at(block, end);
                if to.is_some_and(|to| slot.key >= to) {
                    reached_end = true;
                    break;
                }
                removed += 1;
                bytes += slot.key.len() + slot.value.len();
                end = slot.end;
            }
            let rest = block.len() - end;
            if start == 0 && rest == 0 && !bound.is_empty() {
                self.tree.remove(&bound);
            } else if end > start {
                cut(block, start..end);
                trimmed.push(bound.clone());
            }
            if reached_end || rest > 0 {
                break;
            }
            match self
                .tree
                .range::<[u8], _>((Bound::Excluded(&*bound), Bound::Unbounded))
                .next()
            {
                Some((next, _)) if to.is_none_or(|to| &**next < to) => at = next.clone(),
                _ => break,
            }
        }
        self.len -= removed;
        for bound in trimmed {
            if self.tree.get(&bound).is_some_and(|b| b.len() < MIN_BLOCK) {
                self.absorb(&bound);
            }
        }
        (removed, bytes)
    }

    /// Merges the small block under `bound` with a neighbour (the one
    /// before it, else the one after) when both fit in one block.
    fn absorb(&mut self, bound: &[u8]) {
        let here = self.tree.get(bound).map_or(0, Vec::len);
        let before = self
            .tree
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(bound)))
            .next_back()
            .map(|(b, block)| (b.clone(), block.len()));
        let after = self
            .tree
            .range::<[u8], _>((Bound::Excluded(bound), Bound::Unbounded))
            .next()
            .map(|(b, block)| (b.clone(), block.len()));
        let (into, from) = match (before, after) {
            (Some((b, len)), _) if len + here <= MAX_BLOCK => (b, Box::from(bound)),
            (_, Some((a, len))) if len + here <= MAX_BLOCK => (Box::from(bound), a),
            _ => return,
        };
        if let Some(taken) = self.tree.remove(&from)
            && let Some(block) = self.tree.get_mut(&into)
        {
            resize_exact(block, block.len() + taken.len());
            block.extend_from_slice(&taken);
        }
    }

    /// Entries from `from` on, in key order.
    pub fn range<'a>(
        &'a self,
        from: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let start = match from {
            Bound::Included(k) | Bound::Excluded(k) => k,
            Bound::Unbounded => &[],
        };
        let first = self.block_of(start).map_or(&[][..], |(bound, _)| bound);
        self.tree
            .range::<[u8], _>((Bound::Included(first), Bound::Unbounded))
            .flat_map(|(_, block)| slots(block, 0))
            .skip_while(move |s| match from {
                Bound::Included(k) => s.key < k,
                Bound::Excluded(k) => s.key <= k,
                Bound::Unbounded => false,
            })
            .map(|s| (s.key, s.value))
    }
}

/// Removes the entries in `bytes` from `block`, moving what is left into a
/// smaller allocation once a quarter of it would be spare.
fn cut(block: &mut Vec<u8>, bytes: std::ops::Range<usize>) {
    block.drain(bytes);
    if block.capacity() > block.len() + block.len() / 4 {
        compact(block);
    }
}

/// Moves `block` into an allocation of its size. (`shrink_to_fit` is not
/// enough: an allocator may keep a shrunk buffer where it was, in a size
/// class twice as large.)
fn compact(block: &mut Vec<u8>) {
    *block = block.as_slice().to_vec();
}

/// Makes room for `len` bytes in `block` with no spare capacity beyond
/// what the allocator rounds up to: a block's memory follows its size.
fn resize_exact(block: &mut Vec<u8>, len: usize) {
    if len > block.capacity() {
        block.reserve_exact(len - block.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random operations against a `BTreeMap`, with keys from a small
    /// alphabet (so they collide and share prefixes) and values of every
    /// size from empty to several blocks, so that splits, merges and
    /// single-entry oversized blocks all happen.
    #[test]
    fn behaves_like_a_btree_map() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for round in 0..20 {
            let mut blocks = Blocks::default();
            let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
            for _ in 0..3000 {
                let key: Vec<u8> = (0..next(6)).map(|_| b"abc\xff"[next(4) as usize]).collect();
                match next(10) {
                    0..=5 => {
                        let size = match next(20) {
                            0 => 2 * MAX_BLOCK + next(300) as usize,
                            _ => next(200) as usize,
                        };
                        // Values of one size differ in their bytes, so a
                        // rewrite in place that missed shows.
                        let value: Vec<u8> = (0..size)
                            .map(|i| b'0' + ((i as u64 + next(10) + round) % 10) as u8)
                            .collect();
                        let old = model.insert(key.clone(), value.clone());
                        assert_eq!(
                            blocks.insert(&key, &value),
                            old.map(|v| key.len() + v.len())
                        );
                    }
                    6..=7 => {
                        let old = model.remove(&key);
                        assert_eq!(blocks.remove(&key), old.map(|v| key.len() + v.len()));
                    }
                    8 => {
                        // A range from `key` up to a random end (or the
                        // end of the key space), a few entries at most.
                        let to: Option<Vec<u8>> = (next(4) > 0)
                            .then(|| (0..next(6)).map(|_| b"abc\xff"[next(4) as usize]).collect());
                        let limit = next(12) as usize;
                        let doomed: Vec<Vec<u8>> = model
                            .range::<[u8], _>((Bound::Included(&key[..]), Bound::Unbounded))
                            .map(|(k, _)| k.clone())
                            .take_while(|k| to.as_ref().is_none_or(|to| k < to))
                            .take(limit)
                            .collect();
                        let size: usize = doomed
                            .iter()
                            .map(|k| k.len() + model.remove(k).map_or(0, |v| v.len()))
                            .sum();
                        assert_eq!(
                            blocks.remove_range(&key, to.as_deref(), limit),
                            (doomed.len(), size)
                        );
                    }
                    _ => assert_eq!(blocks.get(&key), model.get(&key).map(Vec::as_slice)),
                }
                assert_eq!(blocks.len(), model.len());
            }
            let all: Vec<_> = blocks.range(Bound::Unbounded).collect();
            let expected: Vec<_> = model.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            assert_eq!(all, expected);
            for probe in [&b""[..], b"a", b"ab", b"b\xff", b"c", b"\xff\xff"] {
                for from in [Bound::Excluded(probe), Bound::Included(probe)] {
                    let got: Vec<_> = blocks.range(from).map(|(k, _)| k).collect();
                    let want: Vec<_> = model
                        .range::<[u8], _>((from, Bound::Unbounded))
                        .map(|(k, _)| &k[..])
                        .collect();
                    assert_eq!(got, want, "{from:?}");
                }
            }
            for (bound, block) in &blocks.tree {
                assert!(block.len() <= MAX_BLOCK || slots(block, 0).count() == 1);
                if let Some(first) = slots(block, 0).next() {
                    assert!(first.key >= &bound[..]);
                }
            }
        }
    }

    /// Dropping a large range, a page at a time, leaves the keys around
    /// it and merges what is left rather than keeping empty blocks.
    #[test]
    fn a_range_goes_a_page_at_a_time_and_leaves_its_neighbours() {
        let mut blocks = Blocks::default();
        let value = [b'v'; 1000];
        for i in 0..2_000 {
            blocks.insert(format!("k{i:05}").as_bytes(), &value);
        }
        let (from, to) = (b"k00100".as_slice(), b"k01900".as_slice());
        let mut pages = 0;
        loop {
            let (n, bytes) = blocks.remove_range(from, Some(to), 512);
            assert_eq!(bytes, n * 1006);
            if n == 0 {
                break;
            }
            pages += 1;
        }
        assert_eq!(pages, 4);
        assert_eq!(blocks.len(), 200);
        let left: Vec<_> = blocks
            .range(Bound::Unbounded)
            .map(|(k, _)| k.to_vec())
            .collect();
        let want: Vec<_> = (0..100)
            .chain(1900..2000)
            .map(|i| format!("k{i:05}").into_bytes())
            .collect();
        assert_eq!(left, want);
        assert!(
            blocks.tree.len() <= 200 / 4 + 2,
            "{} blocks",
            blocks.tree.len()
        );
        // To the end of the key space.
        assert_eq!(blocks.remove_range(b"k01950", None, usize::MAX).0, 50);
        assert_eq!(blocks.len(), 150);
    }

    #[test]
    fn keys_written_in_order_fill_their_blocks() {
        let mut blocks = Blocks::default();
        let value = [b'v'; 100];
        for i in 0..10_000 {
            blocks.insert(format!("k{i:015}").as_bytes(), &value);
        }
        let payload = 10_000 * 118;
        let held: usize = blocks.tree.values().map(Vec::capacity).sum();
        assert!(held < payload + payload / 20, "{held} bytes for {payload}");
        assert_eq!(blocks.len(), 10_000);
        // Deleting most of them merges blocks rather than keeping
        // thousands of near-empty ones.
        for i in (0..10_000).filter(|i| i % 10 != 0) {
            assert_eq!(blocks.remove(format!("k{i:015}").as_bytes()), Some(116));
        }
        assert_eq!(blocks.len(), 1_000);
        assert!(blocks.tree.len() < 100, "{} blocks", blocks.tree.len());
    }

    /// In order, 1,000-byte values fill each block with four entries of
    /// 1,019 bytes (a fifth starts the next block), buffers of exactly
    /// their size. Rewriting a value of the same size changes it in place;
    /// one of another size still lands, and the blocks stay within bounds.
    #[test]
    fn appends_start_full_blocks_and_same_size_rewrites_stay_in_place() {
        let mut blocks = Blocks::default();
        let key = |i: usize| format!("k{i:015}");
        for i in 0..20 {
            assert_eq!(blocks.insert(key(i).as_bytes(), &[b'v'; 1000]), None);
        }
        // Five blocks of four: the first (bound "") takes k0 to k3.
        let sizes: Vec<(usize, usize)> = blocks
            .tree
            .values()
            .map(|b| (b.len(), b.capacity()))
            .collect();
        assert_eq!(sizes, vec![(4076, 4076); 5], "{sizes:?}");
        for i in 0..20 {
            assert_eq!(blocks.insert(key(i).as_bytes(), &[b'w'; 1000]), Some(1016));
        }
        assert_eq!(blocks.tree.len(), 5);
        assert!((0..20).all(|i| blocks.get(key(i).as_bytes()) == Some(&[b'w'; 1000][..])));
        assert_eq!(blocks.insert(key(7).as_bytes(), &[b'x'; 3000]), Some(1016));
        assert_eq!(blocks.get(key(7).as_bytes()), Some(&[b'x'; 3000][..]));
        assert_eq!(blocks.get(key(8).as_bytes()), Some(&[b'w'; 1000][..]));
        assert_eq!(blocks.len(), 20);
        assert!(
            blocks
                .tree
                .values()
                .all(|b| b.len() <= MAX_BLOCK || slots(b, 0).count() == 1),
            "a block over the limit holds more than one entry"
        );
    }
}
