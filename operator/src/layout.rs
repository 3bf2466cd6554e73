//! Which pod serves which range. The spec lists ranges; pods are
//! StatefulSet ordinals. `status.layout` records the assignment the cluster
//! serves, and an edit of `spec.shards` gets a new assignment, chosen to
//! keep as many keys as possible where they are (the planner's
//! [`assign`](cavi_client::reshard::plan::assign)), kept in
//! `status.targetLayout` until every key has moved.

use cavi_client::Client;
use cavi_client::reshard::plan;
use cavi_node::config::{ClusterConfig, ShardConfig};
use cavi_node::keyspace::KeyRange;
use cavi_node::shard_map::ShardMap;

use crate::crd::{AssignedRange, CaviClusterSpec};

/// The ranges of a layout, in key order, without their ordinals.
pub fn ranges(layout: &[AssignedRange]) -> Vec<KeyRange> {
    let mut ranges: Vec<KeyRange> = layout
        .iter()
        .map(|r| KeyRange::new(r.range_start.clone(), r.range_end.clone()))
        .collect();
    ranges.sort_by(|a, b| a.start.cmp(&b.start));
    ranges
}

/// The ranges the spec asks for, in key order.
pub fn spec_ranges(spec: &CaviClusterSpec) -> Vec<KeyRange> {
    spec.shards
        .iter()
        .map(|r| KeyRange::new(r.range_start.clone(), r.range_end.clone()))
        .collect()
}

/// A layout in key order.
pub fn sorted(mut layout: Vec<AssignedRange>) -> Vec<AssignedRange> {
    layout.sort_by(|a, b| a.range_start.cmp(&b.range_start));
    layout
}

/// The layout a config file describes (ordinal = shard id): how a cluster
/// made by an operator that kept no layout in status is read.
pub fn from_config(config: &ClusterConfig) -> Vec<AssignedRange> {
    config
        .shards
        .iter()
        .map(|s| AssignedRange {
            ordinal: i32::try_from(s.id).unwrap_or(i32::MAX),
            range_start: s.range_start.clone(),
            range_end: s.range_end.clone(),
        })
        .collect()
}

/// The highest ordinal a layout uses, plus one: the pods it needs.
pub fn pods_needed(layout: &[AssignedRange]) -> i32 {
    layout.iter().map(|r| r.ordinal + 1).max().unwrap_or(0)
}

/// Keys the applied layout gives a shard that the spec gives nobody: such
/// an edit would lose them, and is refused. `None` when every key keeps an
/// owner.
pub fn orphaned(applied: &[AssignedRange], spec: &CaviClusterSpec) -> Option<String> {
    let live = ShardMap {
        epoch: 0,
        shards: applied
            .iter()
            .map(|r| ShardConfig {
                id: u32::try_from(r.ordinal).unwrap_or(u32::MAX),
                addr: "placeholder:1".into(),
                range_start: r.range_start.clone(),
                range_end: r.range_end.clone(),
            })
            .collect(),
    };
    let wanted = ClusterConfig {
        epoch: 0,
        shards: spec_ranges(spec)
            .into_iter()
            .enumerate()
            .map(|(i, r)| ShardConfig {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                addr: "placeholder:1".into(),
                range_start: r.start,
                range_end: r.end,
            })
            .collect(),
    };
    match plan::plan(&live, &wanted) {
        Err(e @ plan::PlanError::Orphaned { .. }) => Some(e.to_string()),
        _ => None,
    }
}

/// Assigns the spec's ranges to ordinals `0..n`, keeping the most keys in
/// place: the live map comes from `entry`, and each candidate's key count
/// from the shard that holds it now. Without an answer from the cluster
/// (nothing running yet), range `i` goes to ordinal `i`.
pub async fn assign(
    entry: Option<&Client>,
    spec: &CaviClusterSpec,
) -> Result<Vec<AssignedRange>, cavi_client::ClientError> {
    let desired = spec_ranges(spec);
    let Some(entry) = entry else {
        return Ok(in_order(&desired));
    };
    let view = entry.cluster().await?;
    let live = ShardMap {
        epoch: view.epoch,
        shards: view.shards,
    };
    // Key counts of every (owner, piece) the weights need, asked up front.
    let mut counts = std::collections::HashMap::new();
    for have in &live.shards {
        for want in &desired {
            if let Some(common) = have.range().intersect(want) {
                let node = entry.for_addr(&have.addr, entry.timeout());
                let n = node.count(&common).await?;
                counts.insert((have.id, common.to_string()), n);
            }
        }
    }
    let ordinals = plan::assign(&live, &desired, |id, range| {
        counts.get(&(id, range.to_string())).copied().unwrap_or(0)
    });
    Ok(sorted(
        desired
            .into_iter()
            .zip(ordinals)
            .map(|(r, ordinal)| AssignedRange {
                ordinal: i32::try_from(ordinal).unwrap_or(i32::MAX),
                range_start: r.start,
                range_end: r.end,
            })
            .collect(),
    ))
}

fn in_order(desired: &[KeyRange]) -> Vec<AssignedRange> {
    desired
        .iter()
        .enumerate()
        .map(|(i, r)| AssignedRange {
            ordinal: i32::try_from(i).unwrap_or(i32::MAX),
            range_start: r.start.clone(),
            range_end: r.end.clone(),
        })
        .collect()
}

/// `layout` with every range of `from` given to `to` (a Memory pod's
/// ranges held by a neighbour while it restarts).
pub fn handed_over(layout: &[AssignedRange], from: i32, to: i32) -> Vec<AssignedRange> {
    layout
        .iter()
        .map(|r| AssignedRange {
            ordinal: if r.ordinal == from { to } else { r.ordinal },
            ..r.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crd::ShardRange;

    fn spec(ranges: &[(&str, Option<&str>)]) -> CaviClusterSpec {
        serde_json::from_value(serde_json::json!({
            "shards": ranges.iter().map(|(s, e)| ShardRange { range_start: (*s).into(), range_end: e.map(str::to_owned) }).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    fn at(ordinal: i32, start: &str, end: Option<&str>) -> AssignedRange {
        AssignedRange {
            ordinal,
            range_start: start.into(),
            range_end: end.map(str::to_owned),
        }
    }

    #[test]
    fn an_edit_that_drops_keys_is_named() {
        let applied = [at(0, "a", Some("m")), at(1, "n", Some("z"))];
        assert_eq!(
            orphaned(&applied, &spec(&[("a", Some("f")), ("g", Some("z"))])),
            None
        );
        let lost = orphaned(&applied, &spec(&[("a", Some("m"))])).unwrap();
        assert!(lost.contains("shard 1"), "{lost}");
    }

    #[tokio::test]
    async fn without_a_running_cluster_ranges_go_in_order() {
        let s = spec(&[("a", Some("f")), ("g", None)]);
        let layout = assign(None, &s).await.unwrap();
        assert_eq!(layout, vec![at(0, "a", Some("f")), at(1, "g", None)]);
        assert_eq!(pods_needed(&layout), 2);
    }

    #[test]
    fn a_handover_gives_every_range_of_one_ordinal_to_another() {
        let layout = [
            at(0, "a", Some("f")),
            at(1, "g", Some("m")),
            at(0, "n", None),
        ];
        let moved = handed_over(&layout, 0, 1);
        assert!(moved.iter().all(|r| r.ordinal == 1));
    }
}
