//! The key-space rule shared by the node, its config validation and the
//! operator: which shard owns a key, and which shards can hold a prefix.
//!
//! A shard owns `k` when `range_start <= k` and (`k <= range_end` or `k`
//! starts with `range_end`). Both conditions together say the shard owns the
//! half-open byte interval `[range_start, upper(range_end))`, where
//! `upper(p)` is the smallest byte string greater than every string that
//! starts with `p`. Working with that interval makes ownership, overlap and
//! prefix fan-out one comparison each instead of a case analysis.

use std::cmp::Ordering;

/// One shard's slice of the key space, as written in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// Lowest key owned, inclusive; empty means "from the lowest key".
    pub start: String,
    /// Inclusive prefix bound; `None` means "to the highest key".
    pub end: Option<String>,
}

/// An exclusive upper bound in byte space; `None` is "no upper bound".
/// Kept as bytes because `upper("m\u{7f}")` is not always valid UTF-8.
pub type Upper = Option<Vec<u8>>;

/// The smallest byte string greater than every string that starts with
/// `prefix`, or `None` when no such string exists (empty or all `0xff`).
pub fn prefix_upper_bound(prefix: &[u8]) -> Upper {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

/// The ownership rule itself, written out so the request path checks it
/// without building a range or an upper bound (no allocation).
pub fn owns(start: &str, end: Option<&str>, key: &str) -> bool {
    start <= key
        && match end {
            None => true,
            Some(end) => key <= end || key.starts_with(end),
        }
}

/// `a < b` where `None` on either side is +infinity.
fn below(a: &[u8], b: &Upper) -> bool {
    match b {
        None => true,
        Some(b) => a < b.as_slice(),
    }
}

impl KeyRange {
    pub fn new(start: impl Into<String>, end: Option<impl Into<String>>) -> Self {
        Self {
            start: start.into(),
            end: end.map(Into::into),
        }
    }

    /// Exclusive upper end of the owned interval.
    pub fn upper(&self) -> Upper {
        self.end
            .as_deref()
            .and_then(|e| prefix_upper_bound(e.as_bytes()))
    }

    /// Whether this range owns `key`.
    pub fn contains(&self, key: &str) -> bool {
        owns(&self.start, self.end.as_deref(), key)
    }

    /// Whether some key starting with `prefix` falls in this range, i.e.
    /// whether a prefix search has to ask this shard.
    pub fn may_hold_prefix(&self, prefix: &str) -> bool {
        below(
            self.start.as_bytes(),
            &prefix_upper_bound(prefix.as_bytes()),
        ) && below(prefix.as_bytes(), &self.upper())
    }

    /// `range_start > range_end`: the config refuses this as inverted.
    pub fn is_inverted(&self) -> bool {
        matches!(&self.end, Some(end) if self.start.as_str() > end.as_str())
    }

    /// Whether every key of `self` sorts before every key of `next`.
    pub fn ends_before(&self, next: &KeyRange) -> bool {
        match self.upper() {
            None => false,
            Some(upper) => upper.as_slice().cmp(next.start.as_bytes()) != Ordering::Greater,
        }
    }

    /// Whether every key `self` owns is also owned by `other`.
    pub fn is_within(&self, other: &KeyRange) -> bool {
        Span::from(self).is_within(&Span::from(other))
    }

    /// The keys both ranges own, as a range in the config's notation (the
    /// greater start, the end whose bound is lower); `None` when they share
    /// no key.
    pub fn intersect(&self, other: &KeyRange) -> Option<KeyRange> {
        let start = self.start.clone().max(other.start.clone());
        let end = match (&self.end, &other.end) {
            (None, e) | (e, None) => e.clone(),
            (Some(a), Some(b)) => {
                if upper_le(&self.upper(), &other.upper()) {
                    Some(a.clone())
                } else {
                    Some(b.clone())
                }
            }
        };
        let range = KeyRange { start, end };
        // Not `is_inverted`: a piece such as "ma"..="m"* (keys from "ma"
        // that start with "m") is a real, non-empty range.
        (!Span::from(&range).is_empty()).then_some(range)
    }

    /// Whether the keys of `next` follow those of `self` with no key
    /// between them, so the two can be written as one range.
    pub fn meets(&self, next: &KeyRange) -> bool {
        self.upper().as_deref() == Some(next.start.as_bytes())
    }
}

/// A slice of the key space as half-open byte bounds `[start, upper)`:
/// the form in which ranges are intersected and compared. Every range of a
/// layout is one; the pieces two layouts cut each other into are too.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub start: Vec<u8>,
    /// Exclusive; `None` is "no upper bound".
    pub upper: Upper,
}

impl Span {
    pub fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && below(key, &self.upper)
    }

    pub fn is_empty(&self) -> bool {
        !below(&self.start, &self.upper)
    }

    /// The keys both spans hold (possibly an empty span).
    pub fn intersect(&self, other: &Span) -> Span {
        Span {
            start: self.start.clone().max(other.start.clone()),
            upper: min_upper(&self.upper, &other.upper),
        }
    }

    /// Whether every key of `self` is in `other`.
    pub fn is_within(&self, other: &Span) -> bool {
        self.is_empty() || (other.start <= self.start && upper_le(&self.upper, &other.upper))
    }
}

fn min_upper(a: &Upper, b: &Upper) -> Upper {
    match (a, b) {
        (None, x) | (x, None) => x.clone(),
        (Some(a), Some(b)) => Some(a.min(b).clone()),
    }
}

/// `a <= b` for exclusive upper bounds, `None` being +infinity.
pub fn upper_le(a: &Upper, b: &Upper) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a <= b,
    }
}

impl From<&KeyRange> for Span {
    fn from(range: &KeyRange) -> Self {
        Span {
            start: range.start.as_bytes().to_vec(),
            upper: range.upper(),
        }
    }
}

/// `"a"..="m"*` (the `*`: every key starting with the end), with open
/// ends written as bare `(lowest)` / `(highest)` so they cannot be read as
/// keys of those names.
impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.start.is_empty() {
            write!(f, "(lowest)")?;
        } else {
            write!(f, "{:?}", self.start)?;
        }
        match &self.end {
            Some(end) => write!(f, "..={end:?}*"),
            None => write!(f, "..(highest)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: &str, end: Option<&str>) -> KeyRange {
        KeyRange::new(start, end)
    }

    #[test]
    fn end_is_an_inclusive_prefix_bound() {
        let am = r("a", Some("m"));
        assert!(am.contains("a"));
        assert!(am.contains("apple"));
        assert!(am.contains("m"));
        assert!(am.contains("mango"));
        assert!(am.contains("m\u{10ffff}"));
        assert!(!am.contains("n"));
        assert!(!am.contains("A"));
        assert!(!am.contains(""));
        let nz = r("n", Some("z"));
        assert!(nz.contains("zebra"));
        assert!(nz.contains("zzzz"));
        assert!(!nz.contains("{"));
        assert!(!nz.contains("mango"));
    }

    #[test]
    fn the_written_out_rule_agrees_with_the_interval() {
        let ranges = [
            r("a", Some("m")),
            r("", Some("c")),
            r("x", None),
            r("m\u{7f}", Some("m\u{7f}")),
        ];
        let keys = [
            "",
            "a",
            "b",
            "c",
            "cz",
            "d",
            "m",
            "m\u{7f}",
            "m\u{7f}z",
            "m\u{80}",
            "n",
            "x",
            "\u{10ffff}",
        ];
        for range in &ranges {
            for key in keys {
                let by_interval =
                    range.start.as_str() <= key && below(key.as_bytes(), &range.upper());
                assert_eq!(range.contains(key), by_interval, "{range} {key:?}");
            }
        }
    }

    #[test]
    fn empty_start_and_missing_end_are_unbounded() {
        let all = r("", None);
        assert!(all.contains(""));
        assert!(all.contains("\u{0}"));
        assert!(all.contains("\u{10ffff}\u{10ffff}"));
        let low = r("", Some("c"));
        assert!(low.contains("!bang"));
        assert!(!low.contains("d"));
        let high = r("x", None);
        assert!(high.contains("~tilde"));
        assert!(!high.contains("w"));
    }

    #[test]
    fn upper_bound_skips_trailing_ff_bytes() {
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
        assert_eq!(prefix_upper_bound(b""), None);
    }

    #[test]
    fn prefix_fan_out_asks_only_shards_that_can_hold_the_prefix() {
        let am = r("a", Some("m"));
        let nz = r("n", Some("z"));
        assert!(am.may_hold_prefix("f"));
        assert!(!nz.may_hold_prefix("f"));
        assert!(am.may_hold_prefix("m"));
        assert!(!nz.may_hold_prefix("ma"));
        assert!(am.may_hold_prefix(""));
        assert!(nz.may_hold_prefix(""));
        // "zebra" lives in n..z, "{" sorts after every "z*" key.
        assert!(nz.may_hold_prefix("zeb"));
        assert!(!nz.may_hold_prefix("{"));
        // A prefix that straddles a range start still reaches the shard.
        let mid = r("mango", Some("p"));
        assert!(mid.may_hold_prefix("m"));
        assert!(!mid.may_hold_prefix("mam"));
    }

    #[test]
    fn intersections_stay_in_the_config_notation() {
        let am = r("a", Some("m"));
        assert_eq!(am.intersect(&r("g", Some("z"))), Some(r("g", Some("m"))));
        assert_eq!(am.intersect(&r("", Some("f"))), Some(r("a", Some("f"))));
        assert_eq!(am.intersect(&r("n", None)), None);
        assert_eq!(r("", None).intersect(&am), Some(am.clone()));
        // "m" (with every key under it) ends after "ma".
        assert_eq!(am.intersect(&r("ma", None)), Some(r("ma", Some("m"))));
        assert!(r("a", Some("f")).meets(&r("g", Some("m"))));
        assert!(!r("a", Some("f")).meets(&r("h", Some("m"))));
        assert!(!r("a", None).meets(&r("h", Some("m"))));
        let s = Span::from(&am);
        assert!(s.contains(b"mango") && !s.contains(b"n"));
        assert!(s.intersect(&Span::from(&r("n", None))).is_empty());
    }

    #[test]
    fn display_marks_open_ends_without_quotes() {
        assert_eq!(r("a", Some("m")).to_string(), r#""a"..="m"*"#);
        assert_eq!(r("", Some("m")).to_string(), r#"(lowest)..="m"*"#);
        assert_eq!(r("n", None).to_string(), r#""n"..(highest)"#);
        assert_eq!(r("(lowest)", None).to_string(), r#""(lowest)"..(highest)"#);
    }

    #[test]
    fn ordering_and_inversion() {
        assert!(r("a", Some("m")).ends_before(&r("n", Some("z"))));
        assert!(!r("a", Some("m")).ends_before(&r("ma", Some("z"))));
        assert!(!r("a", None).ends_before(&r("n", Some("z"))));
        assert!(r("n", Some("m")).is_inverted());
        assert!(!r("m", Some("m")).is_inverted());
        assert!(!r("m", None).is_inverted());
        assert!(r("b", Some("c")).is_within(&r("a", Some("m"))));
        assert!(!r("b", None).is_within(&r("a", Some("m"))));
        assert!(r("b", None).is_within(&r("", None)));
    }
}
