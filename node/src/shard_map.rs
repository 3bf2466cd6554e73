//! The live shard map: which shard owns which keys, at which epoch.
//!
//! The config file is the bootstrap and the desired layout, one range per
//! shard. The truth is the live map the nodes hold: `{epoch, shards}`,
//! where every committed change makes a new epoch. Mid-reshard one shard
//! may own several ranges (a range it is giving away piece by piece, or a
//! neighbour's range it holds during a rollout), so unlike a config file a
//! map may list a shard id more than once, always with the same address.
//!
//! Ownership questions between two maps ("what moved?") are answered on
//! [`Span`]s, the half-open byte form of a range.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, ConfigError, ShardConfig, split_addr};
use crate::keyspace::{Span, Upper, owns};

/// The live map a node routes by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMap {
    /// Grows with every committed change of ownership or membership.
    pub epoch: u64,
    /// Owned ranges in key order, never overlapping.
    pub shards: Vec<ShardConfig>,
}

/// One slice of the key space whose owner differs between two maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub span: Span,
    pub from: Option<u32>,
    pub to: Option<u32>,
}

impl ShardMap {
    /// The map a config file describes.
    pub fn from_config(config: &ClusterConfig) -> Self {
        Self {
            epoch: config.epoch,
            shards: config.shards.clone(),
        }
    }

    /// Parses and validates a map sent as JSON by a peer or the driver.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let map: ShardMap = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError::Invalid(format!("the shard map is not valid JSON: {e}")))?;
        map.validate()?;
        Ok(map)
    }

    /// The rules of a map: valid addresses, one address per shard id,
    /// non-empty ranges in key order that never share a key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut addrs: BTreeMap<u32, &str> = BTreeMap::new();
        for shard in &self.shards {
            split_addr(&shard.addr).map_err(|e| {
                ConfigError::Invalid(format!("shard {}: {}", shard.id, inner_message(&e)))
            })?;
            if let Some(other) = addrs.insert(shard.id, &shard.addr)
                && other != shard.addr
            {
                return Err(ConfigError::Invalid(format!(
                    "shard {} has two addresses, {other} and {}",
                    shard.id, shard.addr
                )));
            }
            if Span::from(&shard.range()).is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "shard {} has an empty range {}",
                    shard.id,
                    shard.range()
                )));
            }
        }
        for pair in self.shards.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.range_start < a.range_start || !a.range().ends_before(&b.range()) {
                return Err(ConfigError::Invalid(format!(
                    "shards {} ({}) and {} ({}) overlap or are out of key order",
                    a.id,
                    a.range(),
                    b.id,
                    b.range()
                )));
            }
        }
        Ok(())
    }

    /// The entry that owns `key`, if any (gaps are allowed): a binary
    /// search, and no allocation, for the request path.
    pub fn owner_of(&self, key: &str) -> Option<&ShardConfig> {
        let i = self
            .shards
            .partition_point(|s| s.range_start.as_str() <= key);
        let shard = self.shards.get(i.checked_sub(1)?)?;
        owns(&shard.range_start, shard.range_end.as_deref(), key).then_some(shard)
    }

    /// The owner of a key given as bytes (a span bound, not always UTF-8).
    fn owner_of_bytes(&self, key: &[u8]) -> Option<u32> {
        self.shards
            .iter()
            .find(|s| Span::from(&s.range()).contains(key))
            .map(|s| s.id)
    }

    /// Whether shard `id` owns `key`.
    pub fn owns(&self, id: u32, key: &str) -> bool {
        self.owner_of(key).is_some_and(|s| s.id == id)
    }

    /// The ranges shard `id` owns, in key order.
    pub fn ranges_of(&self, id: u32) -> impl Iterator<Item = &ShardConfig> + '_ {
        self.shards.iter().filter(move |s| s.id == id)
    }

    /// Whether shard `id` owns anything.
    pub fn is_owner(&self, id: u32) -> bool {
        self.shards.iter().any(|s| s.id == id)
    }

    /// The advertised address of shard `id`, if the map lists it.
    pub fn addr_of(&self, id: u32) -> Option<&str> {
        self.shards
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.addr.as_str())
    }

    /// Every shard id the map lists, with its address.
    pub fn members(&self) -> BTreeMap<u32, &str> {
        self.shards
            .iter()
            .map(|s| (s.id, s.addr.as_str()))
            .collect()
    }

    /// Whether shard `id` owns every key of `span`.
    pub fn covers(&self, id: u32, span: &Span) -> bool {
        if span.is_empty() {
            return true;
        }
        let mut need = span.clone();
        for shard in self.ranges_of(id) {
            let have = Span::from(&shard.range());
            if have.start <= need.start && !have.intersect(&need).is_empty() {
                match have.upper {
                    None => return true,
                    Some(upper) => {
                        need.start = upper;
                        if need.is_empty() {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }

    /// Entries a search for `prefix` has to ask, in key order.
    pub fn shards_for_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a ShardConfig> + 'a {
        self.shards
            .iter()
            .filter(move |s| s.range().may_hold_prefix(prefix))
    }

    /// The same ownership written with the fewest entries: neighbouring
    /// ranges of one shard become one range.
    pub fn normalized(&self) -> ShardMap {
        let mut shards: Vec<ShardConfig> = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            if let Some(last) = shards.last_mut()
                && last.id == shard.id
                && last.range().meets(&shard.range())
            {
                last.range_end = shard.range_end.clone();
                continue;
            }
            shards.push(shard.clone());
        }
        ShardMap {
            epoch: self.epoch,
            shards,
        }
    }

    /// The map as a config file, ranges of one shard that meet joined.
    pub fn to_config(&self) -> Result<ClusterConfig, ConfigError> {
        let normal = self.normalized();
        let config = ClusterConfig {
            epoch: normal.epoch,
            shards: normal.shards,
        };
        config.validate()?;
        Ok(config)
    }

    /// The owner of every slice of the key space, gaps included, in key
    /// order: the elementary pieces both maps' bounds cut the space into.
    fn cut(&self, other: &ShardMap) -> Vec<Span> {
        let mut bounds: Vec<Vec<u8>> = vec![Vec::new()];
        for shard in self.shards.iter().chain(&other.shards) {
            let span = Span::from(&shard.range());
            bounds.push(span.start);
            if let Some(upper) = span.upper {
                bounds.push(upper);
            }
        }
        bounds.sort();
        bounds.dedup();
        let mut spans = Vec::with_capacity(bounds.len());
        for (i, start) in bounds.iter().enumerate() {
            let upper: Upper = bounds.get(i + 1).cloned();
            spans.push(Span {
                start: start.clone(),
                upper,
            });
        }
        spans
    }

    /// Where the owners of `self` and `next` differ, as maximal spans with
    /// one (from, to) pair each, in key order.
    pub fn changes_to(&self, next: &ShardMap) -> Vec<Change> {
        let mut changes: Vec<Change> = Vec::new();
        for span in self.cut(next) {
            let (from, to) = (
                self.owner_of_bytes(&span.start),
                next.owner_of_bytes(&span.start),
            );
            if from == to {
                continue;
            }
            if let Some(last) = changes.last_mut()
                && last.from == from
                && last.to == to
                && last.span.upper.as_deref() == Some(span.start.as_slice())
            {
                last.span.upper = span.upper;
                continue;
            }
            changes.push(Change { span, from, to });
        }
        changes
    }
}

fn inner_message(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keyspace::KeyRange;

    fn shard(id: u32, start: &str, end: Option<&str>) -> ShardConfig {
        ShardConfig {
            id,
            addr: format!("127.0.0.1:{}", 3100 + id),
            range_start: start.into(),
            range_end: end.map(str::to_owned),
        }
    }

    fn map(epoch: u64, shards: Vec<ShardConfig>) -> ShardMap {
        let m = ShardMap { epoch, shards };
        m.validate().expect("valid map");
        m
    }

    #[test]
    fn owner_lookup_is_a_binary_search_over_gaps() {
        let m = map(
            1,
            vec![
                shard(0, "a", Some("f")),
                shard(2, "g", Some("m")),
                shard(1, "p", None),
            ],
        );
        let owner = |k: &str| m.owner_of(k).map(|s| s.id);
        assert_eq!(owner(""), None);
        assert_eq!(owner("a"), Some(0));
        assert_eq!(owner("fzz"), Some(0));
        assert_eq!(owner("g"), Some(2));
        assert_eq!(owner("mango"), Some(2));
        assert_eq!(owner("n"), None);
        assert_eq!(owner("p"), Some(1));
        assert_eq!(owner("\u{10ffff}"), Some(1));
    }

    #[test]
    fn a_shard_may_own_several_ranges_with_one_address() {
        let m = map(
            3,
            vec![
                shard(0, "a", Some("f")),
                shard(1, "g", Some("m")),
                shard(0, "n", Some("z")),
            ],
        );
        assert_eq!(m.ranges_of(0).count(), 2);
        assert!(m.owns(0, "zebra") && m.owns(1, "k") && !m.owns(0, "k"));
        let mut bad = m.clone();
        bad.shards[2].addr = "127.0.0.1:9".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("two addresses")
        );
        let mut overlap = m.clone();
        overlap.shards[1].range_start = "e".into();
        assert!(
            overlap
                .validate()
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
    }

    #[test]
    fn coverage_spans_neighbouring_ranges() {
        let m = map(
            1,
            vec![
                shard(0, "a", Some("f")),
                shard(0, "g", Some("m")),
                shard(1, "n", None),
            ],
        );
        let span = |s: &str, e: Option<&str>| Span::from(&KeyRange::new(s, e));
        assert!(m.covers(0, &span("b", Some("k"))));
        assert!(m.covers(0, &span("a", Some("m"))));
        assert!(!m.covers(0, &span("a", Some("n"))));
        assert!(m.covers(1, &span("q", None)));
        assert!(!m.covers(1, &span("m", None)));
    }

    #[test]
    fn normalizing_joins_neighbours_of_one_shard() {
        let m = map(
            4,
            vec![
                shard(0, "a", Some("f")),
                shard(0, "g", Some("m")),
                shard(1, "n", Some("s")),
                shard(0, "u", None),
            ],
        );
        let n = m.normalized();
        assert_eq!(n.shards.len(), 3);
        assert_eq!(n.shards[0].range(), KeyRange::new("a", Some("m")));
        // Shard 0 twice, apart: listed twice in the config file.
        let apart = n.to_config().expect("a shard may serve two ranges");
        assert_eq!(apart.shards.iter().filter(|s| s.id == 0).count(), 2);
        let joined = map(5, vec![shard(0, "a", Some("f")), shard(0, "g", None)]);
        let config = joined.to_config().expect("one range");
        assert_eq!(config.epoch, 5);
        assert_eq!(config.shards, vec![shard(0, "a", None)]);
    }

    #[test]
    fn changes_name_exactly_the_keys_that_change_owner() {
        let before = map(1, vec![shard(0, "a", Some("m")), shard(1, "n", Some("z"))]);
        let after = map(
            2,
            vec![
                shard(0, "a", Some("f")),
                shard(2, "g", Some("m")),
                shard(1, "n", Some("z")),
            ],
        );
        let changes = before.changes_to(&after);
        assert_eq!(
            changes,
            vec![Change {
                span: Span::from(&KeyRange::new("g", Some("m"))),
                from: Some(0),
                to: Some(2),
            }]
        );
        assert!(before.changes_to(&before).is_empty());
        // Growth into a gap is a change from nobody.
        let grown = map(3, vec![shard(0, "a", Some("m")), shard(1, "n", None)]);
        let changes = before.changes_to(&grown);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].from, None);
        assert_eq!(changes[0].to, Some(1));
    }
}
