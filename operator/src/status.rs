//! The last stage of the reconcile pipeline: what the cluster looks like.
//! Pure: the caller passes what it observed and decided, and the clock,
//! and patches the result only when it differs from the status stored.
//!
//! The conditions tell the truth during changes:
//! - `Ready`: every shard of the layout the pods serve has a ready pod,
//!   now. Its `observedGeneration` is the newest generation that is fully
//!   live (nothing left to roll or move), so `kubectl wait
//!   --for=condition=Ready` after an edit returns once the edit is live.
//! - `Progressing`: a pod-template rollout (or pods being created); False
//!   with `ProgressDeadlineExceeded` or `RolloutHeld` when it is stuck.
//! - `Rebalancing`: keys are moving to a new layout.
//! - `Degraded`: a fault only: a shard down outside a rollout, an object the
//!   API server refused, a layout change that stopped making progress.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::build::Names;
use crate::crd::{AssignedRange, CaviClusterStatus, Migration, RolloutStatus, ShardStatus};
use crate::validate::Invalid;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_REBALANCING: &str = "Rebalancing";
pub const CONDITION_DEGRADED: &str = "Degraded";

pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_PROGRESSING: &str = "Progressing";
pub const PHASE_REBALANCING: &str = "Rebalancing";
pub const PHASE_DEGRADED: &str = "Degraded";
pub const PHASE_INVALID: &str = "Invalid";

pub const REASON_APPLY_FAILED: &str = "ApplyFailed";
pub const REASON_REBALANCE_STALLED: &str = "RebalanceStalled";
pub const REASON_PROGRESS_DEADLINE: &str = "ProgressDeadlineExceeded";
pub const REASON_ROLLOUT_HELD: &str = "RolloutHeld";

/// A pod-template rollout as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutView {
    pub status: RolloutStatus,
    /// Ordinals restarting as part of the rollout (down, but no fault).
    pub restarting: Vec<i32>,
    /// What it does or waits for, in words.
    pub doing: String,
    /// Why it is stuck, when it is: (reason, message).
    pub stuck: Option<(&'static str, String)>,
}

/// A layout change as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebalanceView {
    /// One line for `kubectl get cavi`.
    pub summary: String,
    pub migrations: Vec<Migration>,
    /// Why it stopped making progress, when it did.
    pub stalled: Option<String>,
}

/// Everything the status is computed from.
pub struct Observed<'a> {
    /// `metadata.generation` of the CaviCluster.
    pub generation: Option<i64>,
    /// The status stored now (its transition times are kept when a
    /// condition does not change).
    pub previous: Option<&'a CaviClusterStatus>,
    /// The layout the pods serve.
    pub layout: &'a [AssignedRange],
    /// Where the layout is going, while keys move.
    pub target_layout: &'a [AssignedRange],
    /// The epoch of the nodes' map, when known.
    pub epoch: Option<u64>,
    /// Why the spec was refused, if it was.
    pub invalid: Option<&'a Invalid>,
    /// The API server's refusal of a child, if it refused one.
    pub apply_failed: Option<&'a str>,
    pub pods: &'a [Pod],
    /// Pods the StatefulSet should have and does not have yet.
    pub pods_missing: i32,
    pub rollout: Option<&'a RolloutView>,
    pub rebalance: Option<&'a RebalanceView>,
}

/// Whether a pod is ready and not on its way out.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Computes the status to store.
pub fn compute(names: &Names, observed: &Observed<'_>, now: Timestamp) -> CaviClusterStatus {
    let mut layout: Vec<&AssignedRange> = observed.layout.iter().collect();
    layout.sort_by(|a, b| a.range_start.cmp(&b.range_start));
    let shards: Vec<ShardStatus> = layout
        .iter()
        .map(|r| {
            let pod = names.pod(u32::try_from(r.ordinal).unwrap_or(0));
            let ready = observed
                .pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(pod.as_str()) && pod_is_ready(p));
            ShardStatus {
                id: r.ordinal,
                range: cavi_node::keyspace::KeyRange::new(
                    r.range_start.clone(),
                    r.range_end.clone(),
                )
                .to_string(),
                pod,
                ready,
            }
        })
        .collect();
    let shard_count = i32::try_from(shards.len()).unwrap_or(i32::MAX);
    let ready_shards = i32::try_from(shards.iter().filter(|s| s.ready).count()).unwrap_or(0);
    let mut not_ready: Vec<&str> = shards
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.pod.as_str())
        .collect();
    not_ready.dedup();

    let previous = observed
        .previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let cond =
        |type_: &str, status: bool, reason: &str, message: String, generation: Option<i64>| {
            condition(previous, type_, status, reason, message, generation, now)
        };
    let generation = observed.generation;
    let rolling = observed.rollout.is_some() || observed.pods_missing > 0;
    let rebalancing = observed.rebalance.is_some();
    let settled =
        observed.invalid.is_none() && observed.apply_failed.is_none() && !rolling && !rebalancing;
    // The newest generation fully live: this one once settled, else the
    // one the previous Ready condition named.
    let live_generation = if settled {
        generation
    } else {
        previous
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .and_then(|c| c.observed_generation)
    };

    let ready = match (
        observed.invalid,
        observed.apply_failed,
        not_ready.is_empty(),
    ) {
        (Some(invalid), _, _) => cond(
            CONDITION_READY,
            false,
            invalid.reason,
            invalid.message.clone(),
            generation,
        ),
        (None, Some(refused), _) => cond(
            CONDITION_READY,
            false,
            REASON_APPLY_FAILED,
            refused.to_owned(),
            generation,
        ),
        (None, None, true) => cond(
            CONDITION_READY,
            true,
            "AllShardsReady",
            if settled {
                format!("all {shard_count} shards are ready")
            } else {
                format!(
                    "all {shard_count} shards are serving; the latest change is still being applied"
                )
            },
            live_generation,
        ),
        (None, None, false) => cond(
            CONDITION_READY,
            false,
            "ShardsNotReady",
            format!(
                "{ready_shards} of {shard_count} shards ready; not ready: {}",
                not_ready.join(", ")
            ),
            live_generation,
        ),
    };

    let progressing = match (observed.rollout, observed.pods_missing) {
        (Some(rollout), _) => match &rollout.stuck {
            Some((reason, message)) => cond(
                CONDITION_PROGRESSING,
                false,
                reason,
                message.clone(),
                generation,
            ),
            None => cond(
                CONDITION_PROGRESSING,
                true,
                "RollingOut",
                format!(
                    "{} of {} pods updated; {}",
                    rollout.status.updated, rollout.status.pods, rollout.doing
                ),
                generation,
            ),
        },
        (None, missing) if missing > 0 => cond(
            CONDITION_PROGRESSING,
            true,
            "CreatingPods",
            format!("{missing} pod(s) being created"),
            generation,
        ),
        _ => cond(
            CONDITION_PROGRESSING,
            false,
            "RolloutComplete",
            "every pod runs the latest template".into(),
            generation,
        ),
    };

    let rebalancing_cond = match observed.rebalance {
        Some(r) => cond(
            CONDITION_REBALANCING,
            true,
            "Moving",
            r.summary.clone(),
            generation,
        ),
        None => cond(
            CONDITION_REBALANCING,
            false,
            "Balanced",
            "every shard serves the layout of the spec".into(),
            generation,
        ),
    };

    // A pod may be down because the rollout restarts it: not a fault.
    let restarting: Vec<String> = observed
        .rollout
        .map(|r| {
            r.restarting
                .iter()
                .map(|o| names.pod(u32::try_from(*o).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let down: Vec<&str> = not_ready
        .iter()
        .copied()
        .filter(|p| !restarting.iter().any(|r| r == p) && observed.pods_missing == 0)
        .collect();
    let stalled = observed.rebalance.and_then(|r| r.stalled.as_deref());
    let degraded = match (observed.apply_failed, stalled, down.is_empty()) {
        (Some(refused), _, _) => cond(
            CONDITION_DEGRADED,
            true,
            REASON_APPLY_FAILED,
            refused.to_owned(),
            generation,
        ),
        (None, Some(why), _) => cond(
            CONDITION_DEGRADED,
            true,
            REASON_REBALANCE_STALLED,
            why.to_owned(),
            generation,
        ),
        (None, None, false) => cond(
            CONDITION_DEGRADED,
            true,
            "ShardsDown",
            format!(
                "not ready outside a rollout: {}; keys of those shards cannot be served",
                down.join(", ")
            ),
            generation,
        ),
        (None, None, true) => cond(
            CONDITION_DEGRADED,
            false,
            "NoFault",
            "no fault".into(),
            generation,
        ),
    };

    let phase = if observed.invalid.is_some() {
        PHASE_INVALID
    } else if degraded.status == "True" {
        PHASE_DEGRADED
    } else if rebalancing {
        PHASE_REBALANCING
    } else if rolling {
        PHASE_PROGRESSING
    } else {
        PHASE_RUNNING
    };

    CaviClusterStatus {
        observed_generation: generation,
        shard_count,
        ready_shards,
        phase: Some(phase.into()),
        epoch: observed.epoch,
        layout: observed.layout.to_vec(),
        target_layout: observed.target_layout.to_vec(),
        migrations: observed
            .rebalance
            .map(|r| r.migrations.clone())
            .unwrap_or_default(),
        rebalance: observed.rebalance.map(|r| r.summary.clone()),
        rollout: observed.rollout.map(|r| r.status.clone()),
        shards,
        conditions: vec![ready, progressing, rebalancing_cond, degraded],
    }
}

/// A condition; its `lastTransitionTime` is kept from `previous` when its
/// status did not change, so an unchanged cluster yields an unchanged status.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in `status`, if any.
pub fn find_condition<'a>(status: &'a CaviClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    fn layout(n: i32) -> Vec<AssignedRange> {
        (0..n)
            .map(|i| AssignedRange {
                ordinal: i,
                range_start: format!("k{i}"),
                range_end: Some(format!("k{i}")),
            })
            .collect()
    }

    pub(crate) fn pod(name: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn base<'a>(layout: &'a [AssignedRange], pods: &'a [Pod]) -> Observed<'a> {
        Observed {
            generation: Some(4),
            previous: None,
            layout,
            target_layout: &[],
            epoch: Some(2),
            invalid: None,
            apply_failed: None,
            pods,
            pods_missing: 0,
            rollout: None,
            rebalance: None,
        }
    }

    fn cond<'a>(s: &'a CaviClusterStatus, t: &str) -> &'a Condition {
        find_condition(s, t).unwrap()
    }

    #[test]
    fn all_pods_ready_is_running() {
        let pods = [pod("demo-0", true), pod("demo-1", true)];
        let l = layout(2);
        let s = compute(&names(), &base(&l, &pods), t(100));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!((s.shard_count, s.ready_shards), (2, 2));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.epoch, Some(2));
        assert_eq!(s.layout, l);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(4));
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Rebalancing").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(
            s.shards[1],
            ShardStatus {
                id: 1,
                range: "\"k1\"..=\"k1\"*".into(),
                pod: "demo-1".into(),
                ready: true
            }
        );
    }

    #[test]
    fn a_dead_pod_outside_a_rollout_is_degraded() {
        let pods = [
            pod("demo-0", true),
            pod("demo-1", false),
            pod("demo-2", true),
        ];
        let l = layout(3);
        let s = compute(&names(), &base(&l, &pods), t(100));
        assert_eq!(s.ready_shards, 2);
        assert_eq!(s.phase.as_deref(), Some("Degraded"));
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ShardsNotReady")
        );
        assert!(ready.message.contains("demo-1"), "{}", ready.message);
        assert_eq!(cond(&s, "Degraded").reason, "ShardsDown");
    }

    #[test]
    fn during_a_rollout_ready_tells_who_serves_and_names_the_last_live_generation() {
        let l = layout(3);
        let pods = [
            pod("demo-0", true),
            pod("demo-1", true),
            pod("demo-2", false),
        ];
        let all = [
            pod("demo-0", true),
            pod("demo-1", true),
            pod("demo-2", true),
        ];
        let live = compute(&names(), &base(&l, &all), t(50));
        // Generation 4 was live; the spec moved on to 5.
        let rollout = RolloutView {
            status: RolloutStatus {
                updated: 1,
                ready: 0,
                pods: 3,
                ordinal: Some(2),
                step_started: None,
            },
            restarting: vec![2],
            doing: "restarting ordinal 2".into(),
            stuck: None,
        };
        let mut o = base(&l, &pods);
        o.generation = Some(5);
        o.previous = Some(&live);
        o.rollout = Some(&rollout);
        let s = compute(&names(), &o, t(100));
        assert_eq!(s.phase.as_deref(), Some("Progressing"));
        let progressing = cond(&s, "Progressing");
        assert_eq!(progressing.status, "True");
        assert!(
            progressing.message.starts_with("1 of 3 pods updated"),
            "{}",
            progressing.message
        );
        assert_eq!(
            cond(&s, "Degraded").status,
            "False",
            "the restarting pod is no fault"
        );
        let ready = cond(&s, "Ready");
        assert_eq!(ready.status, "False", "demo-2 is not serving right now");
        assert_eq!(
            ready.observed_generation,
            Some(4),
            "generation 5 is not live yet"
        );

        // All serving again but one pod still to roll: Ready says so, and
        // still names generation 4.
        let rolling = s.clone();
        let mut o = base(&l, &all);
        o.generation = Some(5);
        o.previous = Some(&rolling);
        o.rollout = Some(&rollout);
        let s = compute(&names(), &o, t(110));
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.observed_generation),
            ("True", Some(4))
        );

        // Stuck past its deadline.
        let stuck = RolloutView {
            stuck: Some((
                REASON_PROGRESS_DEADLINE,
                "ordinal 2 not ready after 600s".into(),
            )),
            ..rollout.clone()
        };
        o.rollout = Some(&stuck);
        let s = compute(&names(), &o, t(700));
        let progressing = cond(&s, "Progressing");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", REASON_PROGRESS_DEADLINE)
        );

        // Done: generation 5 is live.
        o.rollout = None;
        let s = compute(&names(), &o, t(800));
        assert_eq!(cond(&s, "Ready").observed_generation, Some(5));
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn a_layout_change_is_rebalancing_and_a_stall_is_degraded() {
        let l = layout(2);
        let pods = [pod("demo-0", true), pod("demo-1", true)];
        let view = RebalanceView {
            summary: "moving \"g\"..=\"m\"* from shard 0 to shard 2".into(),
            migrations: vec![Migration {
                range: "\"g\"..=\"m\"*".into(),
                from: 0,
                to: 2,
                phase: "copying".into(),
                keys_copied: 10,
                bytes_copied: 100,
                start_time: None,
            }],
            stalled: None,
        };
        let mut o = base(&l, &pods);
        o.rebalance = Some(&view);
        let s = compute(&names(), &o, t(100));
        assert_eq!(s.phase.as_deref(), Some("Rebalancing"));
        assert_eq!(cond(&s, "Rebalancing").status, "True");
        assert_eq!(s.migrations.len(), 1);
        assert_eq!(s.rebalance.as_deref(), Some(view.summary.as_str()));
        let stalled = RebalanceView {
            stalled: Some("no progress for 300s: target shard 2 does not answer".into()),
            ..view.clone()
        };
        o.rebalance = Some(&stalled);
        let s = compute(&names(), &o, t(400));
        assert_eq!(s.phase.as_deref(), Some("Degraded"));
        let degraded = cond(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", REASON_REBALANCE_STALLED)
        );
    }

    #[test]
    fn refusals_set_ready_false_with_their_reason() {
        let l = layout(2);
        let pods = [pod("demo-0", true), pod("demo-1", true)];
        let invalid = Invalid {
            reason: "InvalidLayout",
            message: "shards 0 and 1 overlap".into(),
        };
        let mut o = base(&l, &pods);
        o.invalid = Some(&invalid);
        let s = compute(&names(), &o, t(100));
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
        assert_eq!(cond(&s, "Ready").reason, "InvalidLayout");
        assert_eq!(s.ready_shards, 2, "the running shards are still reported");

        let mut o = base(&l, &pods);
        o.apply_failed =
            Some("StatefulSet demo: spec.template...imagePullPolicy: Unsupported value");
        let s = compute(&names(), &o, t(100));
        assert_eq!(cond(&s, "Ready").reason, REASON_APPLY_FAILED);
        assert_eq!(cond(&s, "Degraded").reason, REASON_APPLY_FAILED);
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let l = layout(1);
        let ok = [pod("demo-0", true)];
        let first = compute(&names(), &base(&l, &ok), t(100));
        let mut o = base(&l, &ok);
        o.previous = Some(&first);
        let again = compute(&names(), &o, t(200));
        assert_eq!(again, first, "nothing changed, so nothing to patch");

        let down = [pod("demo-0", false)];
        let mut o = base(&l, &down);
        o.previous = Some(&first);
        let flipped = compute(&names(), &o, t(300));
        assert_eq!(cond(&flipped, "Ready").last_transition_time, Time(t(300)));
        assert_eq!(
            cond(&flipped, "Progressing").last_transition_time,
            Time(t(100))
        );
    }
}
