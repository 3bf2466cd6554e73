//! Step 4 of a reconcile, the keys: which node to ask, waiting for the pods
//! a move needs, one step of the resharding driver, and when a pod above
//! the layout may go.

use std::borrow::Cow;

use cavi_client::reshard::{DriveError, Report};
use cavi_node::config::ClusterConfig;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::decide::Plan;
use super::report::publish;
use super::seen::Seen;
use super::{Context, Error, key};
use crate::build::{Names, config_for};
use crate::crd::{AssignedRange, CaviCluster, CaviClusterSpec, CaviClusterStatus, Migration};
use crate::layout;
use crate::status::RebalanceView;

/// A client for a node to start the driver from: the lowest ordinal with a
/// ready pod in the layout served. `None` while no pod is ready.
pub(super) fn entry_client(
    ctx: &Context,
    names: &Names,
    spec: &CaviClusterSpec,
    applied: &[AssignedRange],
    seen: &Seen,
) -> Option<cavi_client::Client> {
    let mut ordinals: Vec<i32> = applied.iter().map(|r| r.ordinal).collect();
    ordinals.sort_unstable();
    let ordinal = ordinals.into_iter().find(|o| seen.ready(names, *o))?;
    let addr = ctx
        .opts
        .addresses
        .shard_addr(names, u32::try_from(ordinal).unwrap_or(0), spec.port);
    cavi_client::Client::new(&addr, ctx.timings.node_timeout).ok()
}

pub(super) async fn live_epoch(entry: Option<&cavi_client::Client>) -> Option<u64> {
    entry?.cluster().await.ok().map(|v| v.epoch)
}

/// One driver step towards `goal`; `None` once every node serves it.
pub(super) async fn drive(
    ctx: &Context,
    cluster: &CaviCluster,
    entry: Option<&cavi_client::Client>,
    goal: &ClusterConfig,
    cluster_key: &str,
) -> Result<Option<RebalanceView>, Error> {
    let Some(entry) = entry else {
        return Err(Error::Nodes("no pod of the layout is ready to ask".into()));
    };
    match ctx.driver.step(entry, goal).await {
        Ok(Report::Done { .. }) => {
            ctx.driver.release(entry, goal).await;
            Ok(None)
        }
        Ok(Report::Working(progress)) => {
            if progress.changed {
                publish(
                    ctx,
                    cluster,
                    EventType::Normal,
                    "Rebalancing",
                    &progress.summary,
                )
                .await;
                info!(summary = %progress.summary, "rebalancing");
            }
            let migrations = progress
                .moving
                .iter()
                .map(|m| Migration {
                    range: cavi_node::keyspace::KeyRange::new(
                        m.range_start.clone(),
                        m.range_end.clone(),
                    )
                    .to_string(),
                    from: i32::try_from(m.source).unwrap_or(-1),
                    to: i32::try_from(m.target).unwrap_or(-1),
                    phase: m.phase.as_str().to_owned(),
                    keys_copied: m.keys_copied,
                    bytes_copied: m.bytes_copied,
                    start_time: i64::try_from(m.started_at)
                        .ok()
                        .and_then(|s| Timestamp::from_second(s).ok())
                        .map(|t| t.to_string()),
                })
                .collect();
            let summary = match progress.moves_left {
                0 => progress.summary.clone(),
                n => format!("{} ({n} more move(s) to go)", progress.summary),
            };
            Ok(Some(RebalanceView {
                stalled: ctx.note_progress(cluster_key, &progress.summary),
                summary,
                migrations,
            }))
        }
        Err(e) => {
            let why = e.to_string();
            warn!(error = %why, "a rebalance step failed");
            if matches!(e, DriveError::Refused(_) | DriveError::Locked(_)) {
                publish(ctx, cluster, EventType::Warning, "RebalanceBlocked", &why).await;
            }
            Ok(Some(RebalanceView {
                stalled: ctx.note_progress(cluster_key, &why),
                summary: format!("retrying: {why}"),
                migrations: Vec::new(),
            }))
        }
    }
}

/// The replicas a settled cluster keeps: the ordinals its layout uses. A
/// pod above them goes only once it owns nothing and holds no keys.
pub(super) async fn scale_down_to(
    ctx: &Context,
    names: &Names,
    spec: &CaviClusterSpec,
    target: &[AssignedRange],
    replicas_now: i32,
    entry: Option<&cavi_client::Client>,
) -> i32 {
    let needed = layout::pods_needed(target);
    if replicas_now <= needed {
        return needed;
    }
    let Some(entry) = entry else {
        return replicas_now;
    };
    for ordinal in needed..replicas_now {
        let addr =
            ctx.opts
                .addresses
                .shard_addr(names, u32::try_from(ordinal).unwrap_or(0), spec.port);
        let empty = match entry
            .for_addr(&addr, ctx.timings.node_timeout)
            .cluster()
            .await
        {
            Ok(view) => !view.assigned && view.keys == 0,
            Err(_) => false,
        };
        if !empty {
            info!(ordinal, "keeping a pod that still holds keys");
            return replicas_now;
        }
    }
    needed
}

/// Where the keys stand after step 4.
pub(super) struct Keys {
    pub(super) served: Vec<AssignedRange>,
    pub(super) target_layout: Vec<AssignedRange>,
    pub(super) epoch: Option<u64>,
    pub(super) rebalance: Option<RebalanceView>,
}

/// Step 4: waits for every pod the move needs, then takes one driver step.
/// Once the nodes serve the goal, the target becomes the layout served.
pub(super) async fn drive_keys(
    ctx: &Context,
    cluster: &CaviCluster,
    names: &Names,
    seen: &Seen,
    entry: Option<&cavi_client::Client>,
    previous: &CaviClusterStatus,
    plan: &Plan,
) -> Result<Keys, Error> {
    let cluster_key = key(cluster);
    let mut keys = Keys {
        served: plan.applied.clone(),
        target_layout: if plan.moving {
            plan.target.clone()
        } else {
            Vec::new()
        },
        epoch: previous.epoch,
        rebalance: None,
    };
    let needed = layout::pods_needed(&plan.applied).max(layout::pods_needed(&plan.target));
    let waiting: Vec<i32> = (0..needed).filter(|o| !seen.ready(names, *o)).collect();
    let view = if !waiting.is_empty() {
        let fingerprint = format!(
            "waiting for pod(s) {} to be ready",
            waiting
                .iter()
                .map(|o| names.pod(u32::try_from(*o).unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(RebalanceView {
            stalled: ctx.note_progress(&cluster_key, &fingerprint),
            summary: fingerprint,
            migrations: Vec::new(),
        })
    } else {
        let ranges = match plan.handoff {
            Some((from, to)) => Cow::Owned(layout::handed_over(&plan.target, from, to)),
            None => Cow::Borrowed(&plan.target[..]),
        };
        let goal = config_for(names, &cluster.spec, &ctx.opts, &ranges, 0);
        drive(ctx, cluster, entry, &goal, &cluster_key).await?
    };
    if let Some(view) = view {
        keys.rebalance = Some(view);
        return Ok(keys);
    }
    // Done: the nodes serve the goal.
    if plan.handoff.is_none() {
        keys.served = plan.target.clone();
        keys.target_layout = Vec::new();
    }
    keys.epoch = Some(live_epoch(entry).await.unwrap_or(keys.epoch.unwrap_or(0)));
    ctx.forget_progress(&cluster_key);
    if plan.handoff.is_none() && previous.rebalance.is_some() {
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "RebalanceComplete",
            &format!(
                "every shard serves the layout of the spec (map epoch {})",
                keys.epoch.unwrap_or(0)
            ),
        )
        .await;
    }
    Ok(keys)
}
