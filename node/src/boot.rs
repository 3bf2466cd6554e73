//! Which map a starting node serves: the config file is the bootstrap and
//! the desired layout, not the truth. A durable node's persisted map wins
//! when it is newer than the file, and any node takes a newer map from its
//! peers before it turns ready, so a restarted node never falls back to a
//! stale file and serves keys it gave away.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::node::{MAP_RECORD, Node, SHARD_RECORD};
use crate::shard_map::ShardMap;
use crate::store::NodeState;

/// Record written by nodes before the live map existed: the shard and the
/// single range a data directory was written for.
const LEGACY_RANGE_RECORD: &str = "range";

#[derive(Debug, serde::Deserialize)]
struct LegacyOwner {
    shard: u32,
    range_start: String,
    range_end: Option<String>,
}

/// What a data directory says about the node that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Persisted {
    pub shard: u32,
    pub map: ShardMap,
}

/// Reads what a durable node persisted, if anything.
pub fn load_persisted(state: &dyn NodeState) -> Result<Option<Persisted>, String> {
    if let Some(raw) = state.load(MAP_RECORD).map_err(|e| e.to_string())? {
        let map =
            ShardMap::from_json(&raw).map_err(|e| format!("the persisted map is corrupt: {e}"))?;
        let shard = state
            .load(SHARD_RECORD)
            .map_err(|e| e.to_string())?
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| s.parse().ok())
            .ok_or("the persisted map has no shard id beside it")?;
        return Ok(Some(Persisted { shard, map }));
    }
    // A data directory of an older node: one range, epoch 0.
    if let Some(raw) = state.load(LEGACY_RANGE_RECORD).map_err(|e| e.to_string())? {
        let owner: LegacyOwner = serde_json::from_slice(&raw)
            .map_err(|e| format!("the recorded range is corrupt: {e}"))?;
        return Ok(Some(Persisted {
            shard: owner.shard,
            map: ShardMap {
                epoch: 0,
                shards: vec![crate::config::ShardConfig {
                    id: owner.shard,
                    addr: "0.0.0.0:0".into(),
                    range_start: owner.range_start,
                    range_end: owner.range_end,
                }],
            },
        }));
    }
    Ok(None)
}

/// The map a node starts with, from its config file and what its data
/// directory holds.
///
/// - A directory written by another shard is refused.
/// - A persisted map newer than the file wins.
/// - Otherwise the file wins, provided it gives this shard every key the
///   directory was written for (a shard may grow into key space nobody
///   owned, never lose keys it holds by a file edit).
pub fn choose_map(
    file: &ClusterConfig,
    me: u32,
    persisted: Option<&Persisted>,
    dir: &str,
) -> Result<ShardMap, String> {
    let from_file = ShardMap::from_config(file);
    let Some(persisted) = persisted else {
        return Ok(from_file);
    };
    if persisted.shard != me {
        return Err(format!(
            "data directory {dir} was written by shard {}, but this node is shard {me}; point --data-dir elsewhere",
            persisted.shard
        ));
    }
    if persisted.map.epoch > file.epoch {
        tracing::info!(
            persisted = persisted.map.epoch,
            file = file.epoch,
            "the persisted map is newer than the config file: using it"
        );
        return Ok(persisted.map.clone());
    }
    for held in persisted.map.ranges_of(me) {
        let span = crate::keyspace::Span::from(&held.range());
        if !from_file.covers(me, &span) {
            let configured: Vec<String> = from_file
                .ranges_of(me)
                .map(|s| s.range().to_string())
                .collect();
            return Err(format!(
                "data directory {dir} holds shard {me}'s keys in {}, but the config gives shard {me} {}; \
                 it would serve keys it no longer owns. Point --data-dir elsewhere, or change the layout \
                 with `cavi reshard`, which moves the keys",
                held.range(),
                if configured.is_empty() {
                    "nothing".to_owned()
                } else {
                    configured.join(", ")
                }
            ));
        }
    }
    Ok(from_file)
}

/// Asks every other member of `map` for its map, at once, and takes the
/// newest if it is newer than ours. Peers that do not answer within
/// `wait` are skipped: a cluster starting cold has nobody to ask.
pub async fn catch_up(node: &Arc<Node>, wait: Duration) {
    let map = node.map_snapshot();
    let asks = map
        .members()
        .into_iter()
        .filter(|(id, _)| *id != node.id())
        .map(|(_, addr)| {
            let (peers, addr) = (node.peers().clone(), addr.to_owned());
            async move {
                tokio::time::timeout(wait, peers.map(&addr))
                    .await
                    .ok()?
                    .ok()
            }
        })
        .collect::<Vec<_>>();
    let newest = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .max_by_key(|m| m.epoch);
    if let Some(newest) = newest
        && newest.epoch > map.epoch
    {
        let epoch = newest.epoch;
        match node.install_map(newest, false).await {
            Ok(_) => tracing::info!(epoch, "took a newer map from a peer"),
            Err(e) => tracing::warn!(error = %e, "a peer's newer map was refused"),
        }
    }
}

/// Picks up what a durable node recorded about its moves.
pub async fn resume_moves(node: &Arc<Node>) -> Result<(), String> {
    crate::moves::target::resume(node)
        .await
        .map_err(|e| e.to_string())?;
    crate::moves::source::resume(node)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::ShardConfig;

    fn config(epoch: u64, ranges: &[(u32, &str, Option<&str>)]) -> ClusterConfig {
        ClusterConfig {
            epoch,
            shards: ranges
                .iter()
                .map(|(id, s, e)| ShardConfig {
                    id: *id,
                    addr: format!("127.0.0.1:{}", 3100 + id),
                    range_start: (*s).into(),
                    range_end: e.map(str::to_owned),
                })
                .collect(),
        }
    }

    fn persisted(shard: u32, epoch: u64, ranges: &[(u32, &str, Option<&str>)]) -> Persisted {
        Persisted {
            shard,
            map: ShardMap::from_config(&config(epoch, ranges)),
        }
    }

    #[test]
    fn a_newer_persisted_map_wins_over_the_file() {
        let file = config(0, &[(0, "a", Some("m")), (1, "n", Some("z"))]);
        let moved = persisted(
            0,
            3,
            &[
                (0, "a", Some("f")),
                (2, "g", Some("m")),
                (1, "n", Some("z")),
            ],
        );
        let map = choose_map(&file, 0, Some(&moved), "d").unwrap();
        assert_eq!(map.epoch, 3);
        assert!(!map.owns(0, "h"), "never serves a range it gave away");
    }

    #[test]
    fn the_file_wins_when_it_is_as_new_and_keeps_what_the_directory_holds() {
        let file = config(3, &[(0, "", Some("m")), (1, "n", Some("z"))]);
        let same = persisted(0, 3, &[(0, "a", Some("m")), (1, "n", Some("z"))]);
        assert_eq!(choose_map(&file, 0, Some(&same), "d").unwrap().epoch, 3);
        let shrunk = config(3, &[(0, "a", Some("f")), (1, "n", Some("z"))]);
        let e = choose_map(&shrunk, 0, Some(&same), "d").unwrap_err();
        assert!(
            e.contains("no longer owns") && e.contains("cavi reshard"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_of_another_shard_is_refused() {
        let file = config(0, &[(0, "a", Some("m")), (1, "n", Some("z"))]);
        let other = persisted(1, 0, &[(1, "n", Some("z"))]);
        let e = choose_map(&file, 0, Some(&other), "d").unwrap_err();
        assert!(e.contains("written by shard 1"), "{e}");
    }
}
