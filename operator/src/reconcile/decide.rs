//! Step 2 of a reconcile, the decisions: the layout the pods serve, where
//! the spec's ranges go, and what the rollout compares pods against.

use kube::runtime::events::EventType;

use super::report::publish;
use super::seen::Seen;
use super::{Context, Error, applied_config};
use crate::build::{Children, Names, Shape, TEMPLATE_HASH_ANNOTATION};
use crate::crd::{AssignedRange, CaviCluster, CaviClusterStatus};
use crate::layout;
use crate::rollout::PodView;
use crate::status;

/// What step 2 decided, for the steps after it.
pub(super) struct Plan {
    /// The layout the pods serve now.
    pub(super) applied: Vec<AssignedRange>,
    /// The layout the spec's ranges go to.
    pub(super) target: Vec<AssignedRange>,
    /// A Memory rollout's hand-off: from which ordinal to which. The
    /// driver then moves keys to the target with that pod's ranges handed
    /// to the other.
    pub(super) handoff: Option<(i32, i32)>,
    /// The target differs from what is served.
    pub(super) moving: bool,
    /// Keys move (or may still) this reconcile.
    pub(super) driving: bool,
}

/// The layout the pods serve: as recorded in status; for a cluster an
/// older operator made, as its ConfigMap says; none for a new cluster.
pub(super) fn recorded_layout(
    previous: &CaviClusterStatus,
    seen: &Seen,
) -> Option<Vec<AssignedRange>> {
    if !previous.layout.is_empty() {
        return Some(previous.layout.clone());
    }
    seen.stateful_set
        .as_ref()
        .and(seen.config_map.as_ref())
        .and_then(|cm| applied_config(cm))
        .map(|c| layout::from_config(&c))
}

/// Where the spec's ranges go: the target already under way if the spec
/// still asks for it, the layout served if it already matches, otherwise a
/// new plan (announced in an event).
pub(super) async fn plan_target(
    ctx: &Context,
    cluster: &CaviCluster,
    entry: Option<&cavi_client::Client>,
    previous: &CaviClusterStatus,
    applied: &[AssignedRange],
) -> Result<Vec<AssignedRange>, Error> {
    let wanted = layout::spec_ranges(&cluster.spec);
    if !previous.target_layout.is_empty() && layout::ranges(&previous.target_layout) == wanted {
        return Ok(previous.target_layout.clone());
    }
    if layout::ranges(applied) == wanted {
        return Ok(applied.to_vec());
    }
    let planned = layout::assign(entry, &cluster.spec)
        .await
        .map_err(|e| Error::Nodes(e.to_string()))?;
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "RebalancePlanned",
        &format!(
            "layout change planned: {} range(s) on ordinals {}",
            planned.len(),
            planned
                .iter()
                .map(|r| r.ordinal.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    Ok(planned)
}

/// The pod template hash the spec asks for, as the StatefulSet built from
/// it would carry it.
pub(super) fn template_hash(
    cluster: &CaviCluster,
    namespace: &str,
    ctx: &Context,
    names: &Names,
) -> Result<String, Error> {
    let shape = Shape::of_spec(names, &cluster.spec, &ctx.opts);
    Ok(Children::build(cluster, namespace, &ctx.opts, &shape)?
        .stateful_set
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|mut a| a.remove(TEMPLATE_HASH_ANNOTATION))
        .unwrap_or_default())
}

/// The pods of the StatefulSet's ordinals that exist, as the rollout
/// decision sees them.
pub(super) fn pod_views(seen: &Seen, names: &Names, replicas: i32) -> Vec<PodView> {
    (0..replicas)
        .filter_map(|o| {
            seen.pod(names, o).map(|p| PodView {
                ordinal: o,
                ready: status::pod_is_ready(p),
                template_hash: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION).cloned()),
            })
        })
        .collect()
}
