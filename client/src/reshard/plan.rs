//! The planner: pure functions from (live map, desired layout) to the
//! moves that get there, shared by `cavi reshard` and the operator.
//!
//! The two layouts cut the key space into pieces: every non-empty
//! intersection of a live range with a desired range. A piece whose owner
//! differs between the two is one move, from its live owner straight to
//! its desired owner, so every key moves at most once and only keys whose
//! owner changes move: no plan for these two layouts moves fewer. Pieces
//! are intersections of ranges in the config's notation, so each is one
//! too, and so is every map on the way (pieces, owners updated as moves
//! commit, neighbours of one owner joined).
//!
//! Keys the live map gives a shard and the desired layout gives nobody
//! would be lost: such a layout is refused. Key space nobody owned that
//! the layout gives a shard holds no data; it is handed out by the final
//! map, after the moves.

use std::collections::BTreeMap;

use cavi_node::config::{ClusterConfig, ShardConfig};
use cavi_node::keyspace::{KeyRange, Span};
use cavi_node::shard_map::ShardMap;

/// One range changing owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    pub range: KeyRange,
    pub from: u32,
    pub to: u32,
}

/// Everything between the live map and the desired layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// In the order they will run.
    pub moves: Vec<PlannedMove>,
    /// The map once every move committed and the layout is published: the
    /// desired layout exactly.
    pub target: ShardMap,
}

/// Why a layout cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the layout is not valid: {0}")]
    Invalid(String),
    #[error(
        "the layout gives no shard the keys in {range} that shard {owner} holds now; they would be lost. \
         Give that range to a shard (a neighbour, say) in the layout"
    )]
    Orphaned { range: String, owner: u32 },
}

/// One piece of the key space with its live and desired owner.
#[derive(Debug, Clone)]
struct Piece {
    range: KeyRange,
    from: u32,
    to: u32,
}

fn pieces(live: &ShardMap, target: &ClusterConfig) -> Vec<Piece> {
    let mut out = Vec::new();
    for l in &live.shards {
        for t in &target.shards {
            if let Some(range) = l.range().intersect(&t.range()) {
                out.push(Piece {
                    range,
                    from: l.id,
                    to: t.id,
                });
            }
        }
    }
    out.sort_by(|a, b| Span::from(&a.range).start.cmp(&Span::from(&b.range).start));
    out
}

/// Plans the moves from `live` to `target`.
pub fn plan(live: &ShardMap, target: &ClusterConfig) -> Result<Plan, PlanError> {
    target
        .validate()
        .map_err(|e| PlanError::Invalid(e.to_string()))?;
    let desired = ShardMap::from_config(target);
    if let Some(lost) = live
        .changes_to(&desired)
        .into_iter()
        .find(|c| c.from.is_some() && c.to.is_none())
    {
        let owner = lost.from.unwrap_or_default();
        let range = live
            .ranges_of(owner)
            .filter_map(|s| {
                let r = s.range();
                (!Span::from(&r).intersect(&lost.span).is_empty()).then(|| r.to_string())
            })
            .next()
            .unwrap_or_default();
        return Err(PlanError::Orphaned { range, owner });
    }
    let moves = pieces(live, target)
        .into_iter()
        .filter(|p| p.from != p.to)
        .map(|p| PlannedMove {
            range: p.range,
            from: p.from,
            to: p.to,
        })
        .collect();
    Ok(Plan {
        moves,
        target: desired,
    })
}

/// The addresses maps on the way use: a shard of the live map keeps its
/// live address until the final map; a new shard has its desired one.
fn addresses(live: &ShardMap, target: &ClusterConfig) -> BTreeMap<u32, String> {
    let mut addrs: BTreeMap<u32, String> = target
        .shards
        .iter()
        .map(|s| (s.id, s.addr.clone()))
        .collect();
    for (id, addr) in live.members() {
        addrs.insert(id, addr.to_owned());
    }
    addrs
}

/// The map after `moved` (moves of a plan, in any order) committed on top
/// of `live`, at epoch `live.epoch + 1`: every live piece owned by its
/// desired owner if it moved, by its live owner otherwise.
pub fn map_after(live: &ShardMap, target: &ClusterConfig, moved: &[PlannedMove]) -> ShardMap {
    let addrs = addresses(live, target);
    let shards = pieces(live, target)
        .into_iter()
        .map(|p| {
            let owner = if moved.iter().any(|m| m.range == p.range && m.from == p.from) {
                p.to
            } else {
                p.from
            };
            ShardConfig {
                id: owner,
                addr: addrs.get(&owner).cloned().unwrap_or_default(),
                range_start: p.range.start,
                range_end: p.range.end,
            }
        })
        .collect();
    ShardMap {
        epoch: live.epoch + 1,
        shards,
    }
    .normalized()
}

/// The map one move commits: `live` with `step`'s range given to its new
/// owner, at the next epoch.
pub fn map_with_move(live: &ShardMap, target: &ClusterConfig, step: &PlannedMove) -> ShardMap {
    map_after(live, target, std::slice::from_ref(step))
}

/// The final map: the desired layout at the epoch after `live`'s.
pub fn final_map(live: &ShardMap, target: &ClusterConfig) -> ShardMap {
    ShardMap {
        epoch: live.epoch + 1,
        shards: target.shards.clone(),
    }
}

/// Whether `live` serves exactly the desired layout (epochs aside).
pub fn is_done(live: &ShardMap, target: &ClusterConfig) -> bool {
    live.normalized().shards == target.shards
}

/// Assigns each desired range (in key order) to a shard id in
/// `0..desired.len()`, keeping as many keys as possible where they are:
/// `held(id, range)` says how many keys shard `id` holds in `range` now.
/// Ties keep a range with the shard it overlaps, then with the shard
/// whose range starts where it starts. (StatefulSet ordinals: the cluster
/// can then shrink to `desired.len()` pods.)
pub fn assign(
    live: &ShardMap,
    desired: &[KeyRange],
    held: impl Fn(u32, &KeyRange) -> u64,
) -> Vec<u32> {
    let n = desired.len();
    let mut weight = vec![vec![0i128; n]; n];
    for (i, want) in desired.iter().enumerate() {
        for (ordinal, w) in weight[i].iter_mut().enumerate() {
            let id = u32::try_from(ordinal).unwrap_or(u32::MAX);
            for have in live.ranges_of(id) {
                if let Some(common) = have.range().intersect(want) {
                    *w += i128::from(held(id, &common)) * 4 + 2;
                    if have.range_start == want.start {
                        *w += 1;
                    }
                }
            }
        }
    }
    hungarian_max(&weight)
}

/// A maximum-weight perfect matching of rows to columns of a square
/// matrix (the Hungarian method, O(n³)); `result[row] = column`.
fn hungarian_max(weight: &[Vec<i128>]) -> Vec<u32> {
    let n = weight.len();
    if n == 0 {
        return Vec::new();
    }
    let max = weight.iter().flatten().copied().max().unwrap_or(0);
    // Minimise cost = max - weight, 1-indexed as in the textbook method.
    let cost = |i: usize, j: usize| max - weight[i - 1][j - 1];
    let inf = i128::MAX / 4;
    let (mut u, mut v) = (vec![0i128; n + 1], vec![0i128; n + 1]);
    let (mut p, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0, j) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut result = vec![0u32; n];
    for j in 1..=n {
        if p[j] > 0 {
            result[p[j] - 1] = u32::try_from(j - 1).unwrap_or(u32::MAX);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shard(id: u32, start: &str, end: Option<&str>) -> ShardConfig {
        ShardConfig {
            id,
            addr: format!("127.0.0.1:{}", 4000 + id),
            range_start: start.into(),
            range_end: end.map(str::to_owned),
        }
    }

    fn live(shards: Vec<ShardConfig>) -> ShardMap {
        let m = ShardMap { epoch: 7, shards };
        m.validate().unwrap();
        m
    }

    fn layout(shards: Vec<ShardConfig>) -> ClusterConfig {
        ClusterConfig { epoch: 0, shards }
    }

    #[test]
    fn a_split_moves_only_the_new_half_to_the_new_shard() {
        let now = live(vec![shard(0, "a", Some("m")), shard(1, "n", Some("z"))]);
        let want = layout(vec![
            shard(0, "a", Some("f")),
            shard(2, "g", Some("m")),
            shard(1, "n", Some("z")),
        ]);
        let p = plan(&now, &want).unwrap();
        assert_eq!(
            p.moves,
            vec![PlannedMove {
                range: KeyRange::new("g", Some("m")),
                from: 0,
                to: 2
            }]
        );
        let after = map_with_move(&now, &want, &p.moves[0]);
        assert_eq!(after.epoch, 8);
        assert_eq!(after.shards, want.shards);
        assert!(is_done(&after, &want));
    }

    #[test]
    fn a_merge_and_a_boundary_move() {
        let now = live(vec![
            shard(0, "a", Some("f")),
            shard(1, "g", Some("m")),
            shard(2, "n", Some("z")),
        ]);
        // Merge 0 and 1, then move the 1/2 boundary from m to p.
        let want = layout(vec![shard(0, "a", Some("p")), shard(2, "q", Some("z"))]);
        let p = plan(&now, &want).unwrap();
        assert_eq!(
            p.moves,
            vec![
                PlannedMove {
                    range: KeyRange::new("g", Some("m")),
                    from: 1,
                    to: 0
                },
                PlannedMove {
                    range: KeyRange::new("n", Some("p")),
                    from: 2,
                    to: 0
                },
            ]
        );
        let first = map_with_move(&now, &want, &p.moves[0]);
        assert_eq!(first.shards[0], shard(0, "a", Some("m")));
        assert_eq!(first.shards.len(), 2);
    }

    #[test]
    fn keys_nobody_would_own_are_refused() {
        let now = live(vec![shard(0, "a", Some("m")), shard(1, "n", Some("z"))]);
        let want = layout(vec![shard(0, "a", Some("m"))]);
        let e = plan(&now, &want).unwrap_err();
        assert!(matches!(e, PlanError::Orphaned { owner: 1, .. }), "{e}");
        assert!(e.to_string().contains("\"n\"..=\"z\"*"), "{e}");
    }

    #[test]
    fn growth_into_a_gap_moves_nothing() {
        let now = live(vec![shard(0, "a", Some("m"))]);
        let want = layout(vec![shard(0, "", None)]);
        let p = plan(&now, &want).unwrap();
        assert!(p.moves.is_empty());
        assert!(!is_done(&now, &want));
        assert!(is_done(&final_map(&now, &want), &want));
    }

    #[test]
    fn assignment_keeps_the_most_keys_in_place() {
        let now = live(vec![shard(0, "a", Some("m")), shard(1, "n", Some("z"))]);
        let desired = [
            KeyRange::new("a", Some("f")),
            KeyRange::new("g", Some("m")),
            KeyRange::new("n", Some("z")),
        ];
        // Empty cluster: shard 0 keeps the half that starts where it starts.
        assert_eq!(assign(&now, &desired, |_, _| 0), vec![0, 2, 1]);
        // Most of shard 0's keys are in g..m: it keeps those instead.
        let held = |id: u32, r: &KeyRange| match (id, r.start.as_str()) {
            (0, "g") => 100,
            (0, "a") => 10,
            _ => 1,
        };
        assert_eq!(assign(&now, &desired, held), vec![2, 0, 1]);
    }

    #[test]
    fn hungarian_finds_the_best_matching() {
        let w = vec![vec![1, 9, 1], vec![9, 1, 1], vec![1, 1, 2]];
        assert_eq!(hungarian_max(&w), vec![1, 0, 2]);
        assert_eq!(hungarian_max(&[]), Vec::<u32>::new());
    }
}
