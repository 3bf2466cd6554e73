//! The planner on random layouts: the plan reaches the target, moves
//! exactly the keys whose owner changes (each once), and every map on the
//! way is a valid map (no two owners for a key).
#![allow(clippy::unwrap_used)]

use cavi_client::reshard::plan::{self, PlanError};
use cavi_node::config::{ClusterConfig, ShardConfig};
use cavi_node::shard_map::ShardMap;
use proptest::prelude::*;

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// A layout over the letters: consecutive runs of letters, some left to
/// nobody, each run a range `first..=last*` given to a distinct shard id.
fn layout_strategy() -> impl Strategy<Value = ClusterConfig> {
    (
        proptest::collection::vec((1usize..6, prop::bool::weighted(0.85)), 1..10),
        proptest::sample::subsequence((0u32..12).collect::<Vec<_>>(), 9..=9),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(runs, ids, open_start, open_end)| {
            let mut shards = Vec::new();
            let mut at = 0usize;
            let mut ids = ids.into_iter();
            for (len, owned) in runs {
                if at >= LETTERS.len() {
                    break;
                }
                let end = (at + len).min(LETTERS.len()) - 1;
                if owned && let Some(id) = ids.next() {
                    shards.push(ShardConfig {
                        id,
                        addr: format!("10.0.0.{id}:3100"),
                        range_start: (LETTERS[at] as char).to_string(),
                        range_end: Some((LETTERS[end] as char).to_string()),
                    });
                }
                at = end + 1;
            }
            if shards.is_empty() {
                shards.push(ShardConfig {
                    id: 0,
                    addr: "10.0.0.0:3100".into(),
                    range_start: "a".into(),
                    range_end: Some("z".into()),
                });
            }
            if open_start {
                shards[0].range_start = String::new();
            }
            if open_end && let Some(last) = shards.last_mut() {
                last.range_end = None;
            }
            // Ids are not in key order: shuffle them by rotating.
            let n = shards.len();
            let ids: Vec<u32> = shards.iter().map(|s| s.id).collect();
            for (i, s) in shards.iter_mut().enumerate() {
                s.id = ids[(i + 1) % n];
                s.addr = format!("10.0.0.{}:3100", s.id);
            }
            ClusterConfig { epoch: 0, shards }
        })
}

/// Keys to check ownership on: every letter, and a key under each.
fn keys() -> Vec<String> {
    let mut keys = vec![String::new(), "~".into()];
    for l in LETTERS {
        let c = *l as char;
        keys.push(c.to_string());
        keys.push(format!("{c}zz"));
    }
    keys
}

fn owner(map: &ShardMap, key: &str) -> Option<u32> {
    map.owner_of(key).map(|s| s.id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plans_reach_the_target_moving_each_changed_key_once(live in layout_strategy(), target in layout_strategy()) {
        let start = ShardMap { epoch: 3, shards: live.shards.clone() };
        let planned = match plan::plan(&start, &target) {
            Ok(p) => p,
            Err(PlanError::Orphaned { .. }) => {
                // Refused only when some key owned now is owned by nobody after.
                prop_assert!(keys().iter().any(|k| owner(&start, k).is_some() && target.shards.iter().all(|s| !s.owns(k))));
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let desired = ShardMap::from_config(&target);
        // Run the plan the way the driver does: one move per step, the
        // plan recomputed from the live map each time.
        let mut map = start.clone();
        let mut moves_of: std::collections::HashMap<String, u32> = Default::default();
        let mut steps = 0;
        loop {
            let p = plan::plan(&map, &target).unwrap();
            let Some(next) = p.moves.first() else { break };
            let after = plan::map_with_move(&map, &target, next);
            after.validate().map_err(|e| TestCaseError::fail(format!("invalid map on the way: {e}")))?;
            prop_assert_eq!(after.epoch, map.epoch + 1);
            // Exactly the move's keys change owner, from its source to its target.
            for k in keys() {
                let (before, now) = (owner(&map, &k), owner(&after, &k));
                if before != now {
                    prop_assert!(next.range.contains(&k), "{k:?} changed owner outside the move");
                    prop_assert_eq!(before, Some(next.from));
                    prop_assert_eq!(now, Some(next.to));
                    *moves_of.entry(k.clone()).or_default() += 1;
                }
            }
            map = after;
            steps += 1;
            prop_assert!(steps <= planned.moves.len(), "more steps than planned moves");
        }
        prop_assert_eq!(steps, planned.moves.len());
        let last = plan::final_map(&map, &target);
        prop_assert!(plan::is_done(&last, &target));
        for k in keys() {
            let (was, want) = (owner(&start, &k), owner(&desired, &k));
            let moved = moves_of.get(&k).copied().unwrap_or(0);
            // The fewest moves: a key moves once if its owner changes, never otherwise.
            if was.is_some() && was != want {
                prop_assert_eq!(moved, 1, "{:?} should move once", k);
            } else {
                prop_assert_eq!(moved, 0, "{:?} should not move", k);
            }
        }
    }
}
