//! Pod-template rollouts, one ordinal at a time. The StatefulSet's
//! `RollingUpdate` partition says which ordinals may run the new template;
//! the operator lowers it one step at a time, from the highest ordinal
//! down, each step once every other pod is ready. A Memory pod first hands
//! its ranges to a neighbour (a range move), so its restart loses nothing;
//! they move back once it is ready again. Pure: the reconciler passes what
//! it observed.

use crate::crd::AssignedRange;

/// One pod as the rollout sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub ordinal: i32,
    pub ready: bool,
    /// The template hash the pod was created from.
    pub template_hash: Option<String>,
}

/// What the rollout does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every pod runs the current template.
    Done,
    /// Every pod was created from the current template; `ordinal` is not
    /// ready yet.
    Settling { ordinal: i32 },
    /// `ordinal` restarts with the new template now.
    Roll { ordinal: i32 },
    /// `ordinal` is next, once the pods `until_ready` are ready.
    Wait { ordinal: i32, until_ready: Vec<i32> },
    /// `ordinal` (Memory storage) first hands its ranges to `to`.
    HandOff { ordinal: i32, to: i32 },
    /// `ordinal` (Memory storage) cannot hand its ranges to anyone, and
    /// losing them is not allowed.
    Held { ordinal: i32, why: String },
}

impl Step {
    /// The StatefulSet partition for this step: pods at or above it run
    /// the new template.
    pub fn partition(&self, replicas: i32) -> i32 {
        match self {
            Step::Done | Step::Settling { .. } => 0,
            Step::Roll { ordinal } => *ordinal,
            Step::Wait { ordinal, .. }
            | Step::HandOff { ordinal, .. }
            | Step::Held { ordinal, .. } => (*ordinal + 1).min(replicas),
        }
    }

    /// The ordinal this step is about.
    pub fn ordinal(&self) -> Option<i32> {
        match self {
            Step::Done => None,
            Step::Settling { ordinal }
            | Step::Roll { ordinal }
            | Step::Wait { ordinal, .. }
            | Step::HandOff { ordinal, .. }
            | Step::Held { ordinal, .. } => Some(*ordinal),
        }
    }
}

/// What decides a Memory cluster's next step.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRules<'a> {
    /// The assignment the cluster converges to (neighbours come from it).
    pub layout: &'a [AssignedRange],
    /// Whether a restart may lose a shard's keys.
    pub allow_data_loss: bool,
}

/// The next step of the rollout to `desired_hash` over `pods` (of
/// `replicas` in all). `previous_rollout_active`: whether a rollout was
/// under way (a pod not ready after one is then its last step, not a
/// fault); `owns(o)`: whether ordinal `o` owns keys in the live map right
/// now; `memory`: the rules when storage is Memory.
pub fn next_step(
    pods: &[PodView],
    replicas: i32,
    desired_hash: &str,
    previous_rollout_active: bool,
    memory: Option<MemoryRules<'_>>,
    owns: impl Fn(i32) -> bool,
) -> Step {
    let mut outdated: Vec<i32> = pods
        .iter()
        .filter(|p| p.ordinal < replicas && p.template_hash.as_deref() != Some(desired_hash))
        .map(|p| p.ordinal)
        .collect();
    outdated.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&next) = outdated.first() else {
        // All created from the template: done once they are all ready.
        let settling = pods
            .iter()
            .filter(|p| p.ordinal < replicas && !p.ready)
            .map(|p| p.ordinal)
            .min();
        return match settling {
            Some(ordinal) if previous_rollout_active => Step::Settling { ordinal },
            _ => Step::Done,
        };
    };
    let waiting: Vec<i32> = (0..replicas)
        .filter(|o| *o != next)
        .filter(|o| !pods.iter().any(|p| p.ordinal == *o && p.ready))
        .collect();
    if !waiting.is_empty() {
        return Step::Wait {
            ordinal: next,
            until_ready: waiting,
        };
    }
    let Some(rules) = memory else {
        return Step::Roll { ordinal: next };
    };
    if rules.allow_data_loss || !owns(next) {
        return Step::Roll { ordinal: next };
    }
    match neighbour(rules.layout, next) {
        Some(to) => Step::HandOff { ordinal: next, to },
        None => Step::Held {
            ordinal: next,
            why: format!(
                "ordinal {next} keeps its keys in memory and no other shard can hold them while it restarts; \
                 set spec.rollout.allowDataLoss: true to restart it anyway (its keys are lost)"
            ),
        },
    }
}

/// The ordinal owning the range next to one of `ordinal`'s, in key order
/// (the one before, else the one after).
fn neighbour(layout: &[AssignedRange], ordinal: i32) -> Option<i32> {
    let mut sorted: Vec<&AssignedRange> = layout.iter().collect();
    sorted.sort_by(|a, b| a.range_start.cmp(&b.range_start));
    let at = sorted.iter().position(|r| r.ordinal == ordinal)?;
    let before = at.checked_sub(1).map(|i| sorted[i].ordinal);
    let after = sorted.get(at + 1).map(|r| r.ordinal);
    before
        .filter(|o| *o != ordinal)
        .or(after.filter(|o| *o != ordinal))
        .or_else(|| sorted.iter().map(|r| r.ordinal).find(|o| *o != ordinal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ordinal: i32, ready: bool, hash: &str) -> PodView {
        PodView {
            ordinal,
            ready,
            template_hash: Some(hash.into()),
        }
    }

    fn at(ordinal: i32, start: &str) -> AssignedRange {
        AssignedRange {
            ordinal,
            range_start: start.into(),
            range_end: None,
        }
    }

    #[test]
    fn persistent_pods_roll_from_the_highest_ordinal_one_at_a_time() {
        let pods = [
            pod(0, true, "old"),
            pod(1, true, "old"),
            pod(2, true, "old"),
        ];
        let step = next_step(&pods, 3, "new", false, None, |_| true);
        assert_eq!(step, Step::Roll { ordinal: 2 });
        assert_eq!(step.partition(3), 2);
        // Ordinal 2 restarting: 1 waits for it.
        let pods = [
            pod(0, true, "old"),
            pod(1, true, "old"),
            pod(2, false, "new"),
        ];
        let step = next_step(&pods, 3, "new", false, None, |_| true);
        assert!(matches!(step, Step::Wait { ordinal: 1, .. }), "{step:?}");
        assert_eq!(step.partition(3), 2, "1 keeps its old template meanwhile");
        let pods = [
            pod(0, true, "old"),
            pod(1, true, "old"),
            pod(2, true, "new"),
        ];
        assert_eq!(
            next_step(&pods, 3, "new", false, None, |_| true),
            Step::Roll { ordinal: 1 }
        );
        // The last one restarted: settling until it is ready.
        let pods = [
            pod(0, false, "new"),
            pod(1, true, "new"),
            pod(2, true, "new"),
        ];
        let settling = next_step(&pods, 3, "new", true, None, |_| true);
        assert_eq!(settling, Step::Settling { ordinal: 0 });
        assert_eq!(settling.partition(3), 0);
        let pods = [
            pod(0, true, "new"),
            pod(1, true, "new"),
            pod(2, true, "new"),
        ];
        let done = next_step(&pods, 3, "new", true, None, |_| true);
        assert_eq!(done, Step::Done);
        assert_eq!(done.partition(3), 0);
    }

    #[test]
    fn memory_pods_hand_their_ranges_over_first_and_a_lone_one_is_held() {
        let layout = [at(0, "a"), at(1, "n")];
        let rules = MemoryRules {
            layout: &layout,
            allow_data_loss: false,
        };
        let pods = [pod(0, true, "old"), pod(1, true, "old")];
        let step = next_step(&pods, 2, "new", false, Some(rules), |_| true);
        assert_eq!(step, Step::HandOff { ordinal: 1, to: 0 });
        assert_eq!(step.partition(2), 2, "no restart before the handoff");
        // Once 1 owns nothing, it restarts.
        let step = next_step(&pods, 2, "new", false, Some(rules), |o| o != 1);
        assert_eq!(step, Step::Roll { ordinal: 1 });

        let lone = [at(0, "")];
        let rules = MemoryRules {
            layout: &lone,
            allow_data_loss: false,
        };
        let step = next_step(&[pod(0, true, "old")], 1, "new", false, Some(rules), |_| {
            true
        });
        assert!(matches!(step, Step::Held { ordinal: 0, .. }), "{step:?}");
        let rules = MemoryRules {
            layout: &lone,
            allow_data_loss: true,
        };
        let step = next_step(&[pod(0, true, "old")], 1, "new", false, Some(rules), |_| {
            true
        });
        assert_eq!(step, Step::Roll { ordinal: 0 });
    }
}
