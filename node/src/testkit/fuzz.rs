//! The properties the fuzz targets (`fuzz/`) check, one function per
//! target, shared with the test that replays their seed corpus
//! (`node/tests/fuzz_corpus.rs`) so every CI run checks the corpus on the
//! stable toolchain. Each takes arbitrary bytes and panics on a broken
//! property; none may panic on its own.

use percent_encoding::utf8_percent_encode;

use crate::config::{ClusterConfig, ShardConfig};
use crate::keyspace::{KeyRange, Span, prefix_upper_bound};
use crate::search::{SearchParams, prefix_span};
use crate::shard_map::ShardMap;
use crate::wire::{URL_ESCAPE, decode_component, decode_cursor, encode_cursor, parse_query};

/// Config parsing: any text parses or is refused with an error (never a
/// panic); what parses is valid, writes back to text that parses to the
/// same config, and its map answers ownership as the file reads.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = ClusterConfig::from_yaml(text) else {
        return;
    };
    config.validate().expect("a parsed config is valid");
    let again = ClusterConfig::from_yaml(&config.to_yaml().expect("writes back"))
        .expect("what it writes parses");
    assert_eq!(again, config, "round trip");
    let map = ShardMap::from_config(&config);
    map.validate().expect("its map is valid");
    let normal = map.normalized();
    for shard in &config.shards {
        for key in [
            shard.range_start.as_str(),
            shard.range_end.as_deref().unwrap_or("~"),
        ] {
            let by_file = config.shards.iter().find(|s| s.owns(key)).map(|s| s.id);
            assert_eq!(map.owner_of(key).map(|s| s.id), by_file, "{key:?}");
            assert_eq!(
                normal.owner_of(key).map(|s| s.id),
                by_file,
                "normalized, {key:?}"
            );
        }
    }
}

/// Key decoding: percent-decoding never panics, and what decodes is one
/// key that escapes and decodes back to itself; a query string parses or is
/// refused; cursors round-trip.
pub fn key_decode(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = decode_component(raw) {
        let escaped = utf8_percent_encode(&key, URL_ESCAPE).to_string();
        assert_eq!(decode_component(&escaped).as_deref(), Ok(key.as_str()));
        assert!(!replaced(raw, &key), "nothing is replaced: {raw:?}");
        assert_eq!(
            decode_cursor(&encode_cursor(&key)).as_deref(),
            Some(key.as_str())
        );
    }
    if let Ok(pairs) = parse_query(raw) {
        for (name, value) in &pairs {
            assert!(!replaced(raw, name) && !replaced(raw, value), "{raw:?}");
            assert!(
                !value.contains(' ') || raw.contains(' ') || raw.contains("%20"),
                "`+` stays `+`: {raw:?}"
            );
        }
    }
    if let Ok(params) = SearchParams::from_query(raw) {
        let again = SearchParams::from_query(&params.to_query()).expect("its own query parses");
        assert_eq!(again, params, "search parameters round trip");
    }
}

/// Whether decoding made up a U+FFFD that `raw` did not spell.
fn replaced(raw: &str, decoded: &str) -> bool {
    decoded.contains('\u{fffd}')
        && !raw.contains('\u{fffd}')
        && !raw.to_ascii_uppercase().contains("%EF%BF%BD")
}

/// The key-space rule: for ranges cut from the input and keys taken from
/// it, the map's binary-search owner is the one linear reading finds, a
/// range's span holds exactly the keys the range owns, and a prefix's
/// span holds exactly the keys that start with it.
pub fn key_space(data: &[u8]) {
    let mut parts = data
        .split(|b| *b == 0xff)
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(str::to_owned);
    let mut bounds: Vec<String> = parts.by_ref().take(8).collect();
    let keys: Vec<String> = parts.collect();
    bounds.sort();
    bounds.dedup();
    // Consecutive bounds as ranges, every other one left as a gap; the
    // end of a range is a prefix bound, so it must end before the next
    // range's start to be a valid layout.
    let mut shards: Vec<ShardConfig> = Vec::new();
    for (i, pair) in bounds.windows(2).enumerate().step_by(2) {
        let shard = ShardConfig {
            id: i as u32,
            addr: format!("127.0.0.1:{}", 1000 + i),
            range_start: pair[0].clone(),
            range_end: Some(pair[1].clone()),
        };
        let fits = shards
            .last()
            .is_none_or(|last| last.range().ends_before(&shard.range()));
        if !shard.range().is_inverted() && fits {
            shards.push(shard);
        }
    }
    if shards.is_empty() {
        return;
    }
    let map = ShardMap { epoch: 1, shards };
    map.validate().expect("built to be valid");
    for key in &keys {
        let linear = map.shards.iter().find(|s| s.owns(key)).map(|s| s.id);
        assert_eq!(map.owner_of(key).map(|s| s.id), linear, "owner of {key:?}");
        for shard in &map.shards {
            let range: KeyRange = shard.range();
            assert_eq!(
                Span::from(&range).contains(key.as_bytes()),
                range.contains(key),
                "{range} and {key:?}"
            );
        }
        for prefix in &keys {
            let span = prefix_span(prefix);
            assert_eq!(
                span.contains(key.as_bytes()),
                key.starts_with(prefix.as_str()),
                "prefix {prefix:?}, key {key:?}"
            );
            let upper = prefix_upper_bound(prefix.as_bytes());
            if let Some(upper) = upper {
                assert!(upper.as_slice() > prefix.as_bytes());
            }
        }
    }
}
