//! What a user is told: the rollout as status reports it, a refused spec,
//! and the events both publish.

use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::apply::patch_status;
use super::decide::Plan;
use super::seen::Seen;
use super::{Context, Error};
use crate::build::{Names, TEMPLATE_HASH_ANNOTATION};
use crate::crd::{AssignedRange, CaviCluster, CaviClusterStatus, RolloutStatus};
use crate::rollout::Step;
use crate::status::{
    self, CONDITION_PROGRESSING, Observed, REASON_PROGRESS_DEADLINE, REASON_ROLLOUT_HELD,
    RolloutView,
};
use crate::validate::Invalid;

/// The rollout as status reports it, with the Warning events of a stuck
/// one (once, when it gets stuck).
#[allow(clippy::too_many_arguments)]
pub(super) async fn rollout_view(
    ctx: &Context,
    cluster: &CaviCluster,
    names: &Names,
    seen: &Seen,
    previous: &CaviClusterStatus,
    step: &Step,
    desired_hash: &str,
    replicas: i32,
) -> Option<RolloutView> {
    let ordinal = step.ordinal()?;
    let fresh: Vec<(i32, bool)> = (0..replicas)
        .filter_map(|o| {
            let p = seen.pod(names, o)?;
            let hash = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION));
            (hash.map(String::as_str) == Some(desired_hash)).then(|| (o, status::pod_is_ready(p)))
        })
        .collect();
    let updated = i32::try_from(fresh.len()).unwrap_or(0);
    let ready = i32::try_from(fresh.iter().filter(|(_, r)| *r).count()).unwrap_or(0);
    // The step ordinal, and pods just restarted that are not ready yet.
    let mut restarting: Vec<i32> = fresh.iter().filter(|(_, r)| !r).map(|(o, _)| *o).collect();
    restarting.push(ordinal);
    let now = Timestamp::now();
    // The deadline counts from the last progress: a pod updated or ready.
    let step_started = previous
        .rollout
        .as_ref()
        .filter(|r| r.updated == updated && r.ready == ready)
        .and_then(|r| r.step_started.clone())
        .unwrap_or_else(|| now.to_string());
    let elapsed = step_started
        .parse::<Timestamp>()
        .ok()
        .map(|t| now.duration_since(t).as_secs())
        .unwrap_or(0);
    let doing = match step {
        Step::Roll { ordinal } => format!(
            "restarting {}",
            names.pod(u32::try_from(*ordinal).unwrap_or(0))
        ),
        Step::Wait {
            ordinal,
            until_ready,
        } => format!(
            "waiting for {} to be ready before restarting {}",
            until_ready
                .iter()
                .map(|o| names.pod(u32::try_from(*o).unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", "),
            names.pod(u32::try_from(*ordinal).unwrap_or(0))
        ),
        Step::HandOff { ordinal, to } => format!(
            "handing the ranges of {} to {} before it restarts (Memory storage)",
            names.pod(u32::try_from(*ordinal).unwrap_or(0)),
            names.pod(u32::try_from(*to).unwrap_or(0))
        ),
        Step::Held { why, .. } => why.clone(),
        Step::Settling { ordinal } => format!(
            "waiting for {} to be ready",
            names.pod(u32::try_from(*ordinal).unwrap_or(0))
        ),
        Step::Done => String::new(),
    };
    let stuck = match step {
        Step::Held { why, .. } => Some((REASON_ROLLOUT_HELD, why.clone())),
        _ if elapsed > cluster.spec.rollout.progress_deadline_seconds => Some((
            REASON_PROGRESS_DEADLINE,
            format!(
                "no progress in {elapsed}s (spec.rollout.progressDeadlineSeconds: {}): {doing}",
                cluster.spec.rollout.progress_deadline_seconds
            ),
        )),
        _ => None,
    };
    let was = previous
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_PROGRESSING)
        .map(|c| c.reason.as_str());
    if let Some((reason, message)) = &stuck
        && was != Some(*reason)
    {
        publish(ctx, cluster, EventType::Warning, reason, message).await;
    }
    Some(RolloutView {
        status: RolloutStatus {
            updated,
            ready,
            pods: replicas,
            ordinal: Some(ordinal),
            step_started: Some(step_started),
        },
        restarting,
        doing,
        stuck,
    })
}

/// A refused spec: `Ready=False` with the reason, a Warning event, and
/// nothing else changes.
pub(super) async fn refuse(
    cluster: &CaviCluster,
    ctx: &Context,
    names: &Names,
    seen: &Seen,
    previous: &CaviClusterStatus,
    recorded: Option<&[AssignedRange]>,
    invalid: Invalid,
) -> Result<Action, Error> {
    warn!(reason = invalid.reason, message = %invalid.message, "spec refused");
    let layout = recorded.map(<[AssignedRange]>::to_vec).unwrap_or_default();
    let status = status::compute(
        names,
        &Observed {
            generation: cluster.metadata.generation,
            previous: Some(previous),
            layout: &layout,
            target_layout: &previous.target_layout,
            epoch: previous.epoch,
            invalid: Some(&invalid),
            apply_failed: None,
            pods: &seen.pods,
            pods_missing: 0,
            rollout: None,
            rebalance: None,
        },
        Timestamp::now(),
    );
    publish(
        ctx,
        cluster,
        EventType::Warning,
        invalid.reason,
        &invalid.message,
    )
    .await;
    patch_status(cluster, names, &status, &ctx.client).await?;
    Err(Error::InvalidSpec(invalid))
}

/// Publishes an event. The recorder folds an event into an earlier one
/// with the same type, reason and action (a series, keeping the earlier
/// note), so the action carries a fingerprint of the note: a repeat of
/// the same message counts up, a new message (the next move, a different
/// refusal) is its own event instead of vanishing into the old one.
pub(super) async fn publish(
    ctx: &Context,
    cluster: &CaviCluster,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: event_action(note),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(%error, "could not publish an event");
    }
}

/// `Reconcile/<fingerprint of the note>`: see [`publish`].
fn event_action(note: &str) -> String {
    // FNV-1a: stable across runs and processes, unlike the std hasher.
    let hash = note.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("Reconcile/{:08x}", hash as u32)
}

/// A child the API server refused: a Warning event and `Ready=False` with
/// its message, the layout left as it was.
pub(super) async fn report_apply_failure(
    ctx: &Context,
    cluster: &CaviCluster,
    names: &Names,
    seen: &Seen,
    previous: &CaviClusterStatus,
    plan: &Plan,
    message: &str,
) -> Result<(), Error> {
    publish(
        ctx,
        cluster,
        EventType::Warning,
        status::REASON_APPLY_FAILED,
        message,
    )
    .await;
    let status = status::compute(
        names,
        &Observed {
            generation: cluster.metadata.generation,
            previous: Some(previous),
            layout: &plan.applied,
            target_layout: &previous.target_layout,
            epoch: previous.epoch,
            invalid: None,
            apply_failed: Some(message),
            pods: &seen.pods,
            pods_missing: 0,
            rollout: None,
            rebalance: None,
        },
        Timestamp::now(),
    );
    patch_status(cluster, names, &status, &ctx.client).await
}

#[cfg(test)]
mod tests {
    use super::event_action;

    #[test]
    fn an_event_action_is_a_stable_fingerprint_of_its_note() {
        let a = event_action("moving [h, m) from 0 to 1");
        assert_eq!(a, event_action("moving [h, m) from 0 to 1"));
        assert_ne!(a, event_action("moving [m, s) from 0 to 1"));
        let hex = a.strip_prefix("Reconcile/").expect("a Reconcile/ action");
        assert_eq!(hex.len(), 8);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        // FNV-1a of the empty note is its offset basis, folded to 32 bits.
        assert_eq!(event_action(""), "Reconcile/84222325");
    }
}
