//! The last stage of the reconcile pipeline: what the cluster looks like,
//! computed from the StatefulSet and its pods. Pure: the caller passes the
//! observed objects and the clock, and patches the result only when it
//! differs from the status already stored.

use cavi_node::config::ClusterConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::build::Names;
use crate::crd::{CaviClusterStatus, ShardStatus};
use crate::validate::Invalid;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_DEGRADED: &str = "Degraded";

pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_PROGRESSING: &str = "Progressing";
pub const PHASE_DEGRADED: &str = "Degraded";
pub const PHASE_INVALID: &str = "Invalid";

/// Everything the status is computed from.
pub struct Observed<'a> {
    /// `metadata.generation` of the CaviCluster.
    pub generation: Option<i64>,
    /// The status stored now (its transition times are kept when a
    /// condition does not change).
    pub previous: Option<&'a CaviClusterStatus>,
    /// The layout the pods serve: the new one when the spec was accepted,
    /// the applied one when it was refused.
    pub layout: &'a ClusterConfig,
    /// Why the spec was refused, if it was.
    pub invalid: Option<&'a Invalid>,
    pub stateful_set: Option<&'a StatefulSet>,
    pub pods: &'a [Pod],
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

/// Why the StatefulSet's rollout is not finished, or `None` when it is.
pub fn rollout_pending(sts: Option<&StatefulSet>) -> Option<String> {
    let Some(sts) = sts else {
        return Some("the StatefulSet does not exist yet".into());
    };
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = sts.status.as_ref() else {
        return Some("the StatefulSet has no status yet".into());
    };
    if status.observed_generation.unwrap_or(0) < sts.metadata.generation.unwrap_or(0) {
        return Some("the StatefulSet controller has not seen the latest spec yet".into());
    }
    let updated = status.updated_replicas.unwrap_or(0);
    if updated < want {
        return Some(format!("{updated} of {want} pods run the latest template"));
    }
    match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) if current != update => {
            Some(format!("rolling from revision {current} to {update}"))
        }
        _ => None,
    }
}

/// Computes the status to store.
pub fn compute(names: &Names, observed: &Observed<'_>, now: Timestamp) -> CaviClusterStatus {
    let shards: Vec<ShardStatus> = observed
        .layout
        .shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let pod = names.pod(i);
            let ready = observed
                .pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(pod.as_str()) && pod_is_ready(p));
            ShardStatus {
                id: i32::try_from(shard.id).unwrap_or(i32::MAX),
                range: shard.range().to_string(),
                pod,
                ready,
            }
        })
        .collect();
    let shard_count = i32::try_from(shards.len()).unwrap_or(i32::MAX);
    let ready_shards = i32::try_from(shards.iter().filter(|s| s.ready).count()).unwrap_or(0);
    let not_ready: Vec<&str> = shards
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.pod.as_str())
        .collect();
    let rollout = rollout_pending(observed.stateful_set);

    let previous = observed
        .previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let cond = |type_: &str, status: bool, reason: &str, message: String| {
        condition(
            previous,
            type_,
            status,
            reason,
            message,
            observed.generation,
            now,
        )
    };

    let ready = match (observed.invalid, not_ready.is_empty()) {
        (Some(invalid), _) => cond(
            CONDITION_READY,
            false,
            invalid.reason,
            invalid.message.clone(),
        ),
        (None, true) => cond(
            CONDITION_READY,
            true,
            "AllShardsReady",
            format!("all {shard_count} shards are ready"),
        ),
        (None, false) => cond(
            CONDITION_READY,
            false,
            "ShardsNotReady",
            format!(
                "{ready_shards} of {shard_count} shards ready; not ready: {}",
                not_ready.join(", ")
            ),
        ),
    };
    let progressing = match &rollout {
        Some(why) => cond(CONDITION_PROGRESSING, true, "RollingOut", why.clone()),
        None => cond(
            CONDITION_PROGRESSING,
            false,
            "RolloutComplete",
            "every pod runs the latest template".into(),
        ),
    };
    let degraded_now = rollout.is_none() && !not_ready.is_empty();
    let degraded = if degraded_now {
        cond(
            CONDITION_DEGRADED,
            true,
            "ShardsDown",
            format!(
                "not ready outside a rollout: {}; keys of those shards cannot be served",
                not_ready.join(", ")
            ),
        )
    } else {
        cond(
            CONDITION_DEGRADED,
            false,
            "NoShardDown",
            "no shard is down outside a rollout".into(),
        )
    };

    let phase = if observed.invalid.is_some() {
        PHASE_INVALID
    } else if rollout.is_some() {
        PHASE_PROGRESSING
    } else if degraded_now {
        PHASE_DEGRADED
    } else {
        PHASE_RUNNING
    };

    CaviClusterStatus {
        observed_generation: observed.generation,
        shard_count,
        ready_shards,
        phase: Some(phase.into()),
        shards,
        conditions: vec![ready, progressing, degraded],
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
    use cavi_node::config::ShardConfig;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    fn layout(n: u32) -> ClusterConfig {
        ClusterConfig {
            epoch: 0,
            shards: (0..n)
                .map(|i| ShardConfig {
                    id: i,
                    addr: format!("h{i}:1"),
                    range_start: format!("k{i}"),
                    range_end: Some(format!("k{i}")),
                })
                .collect(),
        }
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

    fn sts(replicas: i32, updated: i32, rolling: bool) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                ..StatefulSetSpec::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(2),
                replicas,
                updated_replicas: Some(updated),
                current_revision: Some("r1".into()),
                update_revision: Some(if rolling { "r2" } else { "r1" }.into()),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn compute_with(
        layout: &ClusterConfig,
        sts: Option<&StatefulSet>,
        pods: &[Pod],
        invalid: Option<&Invalid>,
        previous: Option<&CaviClusterStatus>,
        now: Timestamp,
    ) -> CaviClusterStatus {
        compute(
            &names(),
            &Observed {
                generation: Some(4),
                previous,
                layout,
                invalid,
                stateful_set: sts,
                pods,
            },
            now,
        )
    }

    fn cond<'a>(s: &'a CaviClusterStatus, t: &str) -> &'a Condition {
        find_condition(s, t).unwrap()
    }

    #[test]
    fn all_pods_ready_is_running() {
        let pods = [pod("demo-0", true), pod("demo-1", true)];
        let s = compute_with(
            &layout(2),
            Some(&sts(2, 2, false)),
            &pods,
            None,
            None,
            t(100),
        );
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.shard_count, 2);
        assert_eq!(s.ready_shards, 2);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").status, "False");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(4));
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
    fn a_dead_pod_makes_ready_false_and_degraded_true() {
        let pods = [
            pod("demo-0", true),
            pod("demo-1", false),
            pod("demo-2", true),
        ];
        let s = compute_with(
            &layout(3),
            Some(&sts(3, 3, false)),
            &pods,
            None,
            None,
            t(100),
        );
        assert_eq!(s.ready_shards, 2);
        assert_eq!(s.phase.as_deref(), Some("Degraded"));
        let ready = cond(&s, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "ShardsNotReady");
        assert!(ready.message.contains("demo-1"), "{}", ready.message);
        assert_eq!(cond(&s, "Degraded").status, "True");
        assert!(!s.shards[1].ready && s.shards[0].ready && s.shards[2].ready);

        // A missing pod and a terminating pod are not ready either.
        let mut terminating = pod("demo-1", true);
        terminating.metadata.deletion_timestamp = Some(Time(t(90)));
        let s = compute_with(
            &layout(3),
            Some(&sts(3, 3, false)),
            &[pod("demo-0", true), terminating],
            None,
            None,
            t(100),
        );
        assert_eq!(s.ready_shards, 1);
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn a_rollout_is_progressing_not_degraded() {
        let pods = [pod("demo-0", true), pod("demo-1", false)];
        let s = compute_with(
            &layout(2),
            Some(&sts(2, 1, true)),
            &pods,
            None,
            None,
            t(100),
        );
        assert_eq!(s.phase.as_deref(), Some("Progressing"));
        assert_eq!(cond(&s, "Progressing").status, "True");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "Ready").status, "False");

        let s = compute_with(&layout(2), None, &[], None, None, t(100));
        assert_eq!(s.phase.as_deref(), Some("Progressing"));
        assert!(cond(&s, "Progressing").message.contains("does not exist"));
    }

    #[test]
    fn a_refused_spec_is_invalid_with_its_reason() {
        let invalid = Invalid {
            reason: "InvalidLayout",
            message: "shards 0 and 1 overlap".into(),
        };
        let pods = [pod("demo-0", true), pod("demo-1", true)];
        let s = compute_with(
            &layout(2),
            Some(&sts(2, 2, false)),
            &pods,
            Some(&invalid),
            None,
            t(100),
        );
        assert_eq!(s.phase.as_deref(), Some("Invalid"));
        let ready = cond(&s, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "InvalidLayout");
        assert_eq!(ready.message, "shards 0 and 1 overlap");
        // The running shards are still reported truthfully.
        assert_eq!(s.ready_shards, 2);
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let ok = [pod("demo-0", true)];
        let first = compute_with(&layout(1), Some(&sts(1, 1, false)), &ok, None, None, t(100));
        let again = compute_with(
            &layout(1),
            Some(&sts(1, 1, false)),
            &ok,
            None,
            Some(&first),
            t(200),
        );
        assert_eq!(again, first, "nothing changed, so nothing to patch");

        let down = [pod("demo-0", false)];
        let flipped = compute_with(
            &layout(1),
            Some(&sts(1, 1, false)),
            &down,
            None,
            Some(&first),
            t(300),
        );
        assert_eq!(cond(&flipped, "Ready").last_transition_time, Time(t(300)));
        assert_eq!(
            cond(&flipped, "Progressing").last_transition_time,
            Time(t(100))
        );
    }
}
