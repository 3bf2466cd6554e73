//! The reconciler: validate → decide (layout, rollout step) → build →
//! apply → drive (range moves) → status. Validation, the decisions,
//! building and the status are pure functions in their own modules; what is
//! here runs those steps in order. It reads the reflector stores ([`seen`],
//! no API reads of its own), writes children and status ([`apply`]), asks
//! the nodes through the resharding driver ([`drive`]) and tells the user
//! in events ([`report`]).
//!
//! A reconcile of an unchanged, balanced cluster writes nothing and reads
//! nothing: children are applied only when their intent changed (a hash of
//! what was last applied, on the child) or someone changed a field the
//! operator owns, and the status only when it changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cavi_client::reshard::Driver;
use cavi_node::config::ClusterConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tracing::{instrument, warn};

use crate::admin::Metrics;
use crate::build::{
    BuildError, BuildOptions, CONFIG_KEY, Children, Names, Shape, config_for, spec_layout,
};
use crate::crd::{AssignedRange, CaviCluster, StorageType};
use crate::layout;
use crate::rollout::{self, MemoryRules, Step};
use crate::status::{self, Observed};
use crate::validate::{AppliedStorage, Invalid, check_storage_unchanged, validate};

mod apply;
mod decide;
mod drive;
mod report;
mod seen;

pub use apply::{apply, is_subset};
use apply::{apply_children, patch_status};
use decide::{Plan, plan_target, pod_views, recorded_layout, template_hash};
use drive::{Keys, drive_keys, entry_client, scale_down_to};
use report::{refuse, report_apply_failure, rollout_view};
use seen::Seen;

/// The one field manager every server-side apply of this operator uses.
pub const FIELD_MANAGER: &str = "cavi-operator";
/// How often a settled cluster is looked at again without any event.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a cluster with work under way (keys moving, pods rolling) is
/// looked at again.
pub const BUSY: Duration = Duration::from_secs(2);
/// First and longest wait after a transient failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is refused; nothing will change until the user edits it.
    #[error("spec refused ({}): {}", .0.reason, .0.message)]
    InvalidSpec(Invalid),
    #[error("the CaviCluster has no namespace")]
    MissingNamespace,
    /// Children are owned through the cluster's uid, which every object
    /// read from the API server has.
    #[error("the CaviCluster has no metadata.uid")]
    MissingUid,
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The API server refused a child: a value it does not accept.
    #[error("the API server refused {what}: {message}")]
    ApplyFailed { what: String, message: String },
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot encode an object: {0}")]
    Encode(#[from] serde_json::Error),
    /// A node did not answer the operator (a layout change waits).
    #[error("cannot reach the cluster's nodes: {0}")]
    Nodes(String),
}

impl Error {
    /// A permanent error waits for a change of the object; any other is
    /// retried with backoff.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::InvalidSpec(_) | Error::MissingNamespace | Error::MissingUid | Error::Build(_)
        )
    }

    /// The `reason` label of the failure counter.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(invalid) => invalid.reason,
            Error::MissingNamespace => "MissingNamespace",
            Error::MissingUid => "MissingUid",
            Error::Build(_) => "BuildFailed",
            Error::ApplyFailed { .. } => status::REASON_APPLY_FAILED,
            Error::Kube(_) => "KubeApi",
            Error::Encode(_) => "Encode",
            Error::Nodes(_) => "NodesUnreachable",
        }
    }
}

/// The reflector stores the reconciler reads instead of the API server.
#[derive(Clone)]
pub struct Stores {
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub stateful_sets: Store<StatefulSet>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    pub pods: Store<Pod>,
}

/// Timings of the operator's work with the nodes.
#[derive(Debug, Clone)]
pub struct Timings {
    /// Longest wait for a node's answer.
    pub node_timeout: Duration,
    /// A layout change making no progress this long is `RebalanceStalled`.
    pub rebalance_stall: Duration,
    /// How long the move lock holds between two reconciles.
    pub lock_ttl: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(10),
            rebalance_stall: Duration::from_secs(300),
            lock_ttl: Duration::from_secs(60),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub opts: BuildOptions,
    pub stores: Stores,
    pub timings: Timings,
    driver: Driver,
    /// Consecutive transient failures per cluster, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last progress of each cluster's layout change, and when it was
    /// first seen: a change that stays put too long is stalled.
    progress: Mutex<HashMap<String, (String, Instant)>>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        opts: BuildOptions,
        stores: Stores,
        timings: Timings,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            opts,
            stores,
            driver: Driver::new(FIELD_MANAGER, timings.lock_ttl),
            timings,
            failures: Mutex::default(),
            progress: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records where a layout change stands; returns why it is stalled,
    /// once it has stood still for the stall deadline.
    fn note_progress(&self, key: &str, fingerprint: &str) -> Option<String> {
        let mut progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = progress
            .entry(key.to_owned())
            .or_insert_with(|| (fingerprint.to_owned(), Instant::now()));
        if entry.0 != fingerprint {
            *entry = (fingerprint.to_owned(), Instant::now());
        }
        let still = entry.1.elapsed();
        (still >= self.timings.rebalance_stall)
            .then(|| format!("no progress for {}s: {fingerprint}", still.as_secs()))
    }

    fn forget_progress(&self, key: &str) {
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

fn key(cluster: &CaviCluster) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

/// Reconciles one `CaviCluster`.
#[instrument(skip_all, fields(cluster = %key(&cluster)))]
pub async fn reconcile(cluster: Arc<CaviCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&cluster, &ctx).await;
    ctx.metrics.observe(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_reason),
    );
    if result.is_ok() {
        ctx.failures().remove(&key(&cluster));
    }
    result
}

/// Decides what happens after a failed reconcile.
pub fn error_policy(cluster: Arc<CaviCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_permanent() {
        warn!(cluster = %key(&cluster), %error, "waiting for the spec to change");
        return Action::await_change();
    }
    let attempt = {
        let mut failures = ctx.failures();
        let n = failures.entry(key(&cluster)).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let wait = backoff(attempt);
    warn!(cluster = %key(&cluster), %error, attempt, ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Exponential backoff: 5 s, 10 s, 20 s … capped at 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(10);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The layout in an applied ConfigMap, if it holds a readable one.
pub fn applied_config(config_map: &ConfigMap) -> Option<ClusterConfig> {
    let text = config_map.data.as_ref()?.get(CONFIG_KEY)?;
    match ClusterConfig::from_yaml(text) {
        Ok(config) => Some(config),
        Err(error) => {
            warn!(%error, "the applied ConfigMap holds no readable layout");
            None
        }
    }
}

fn same_layout(a: &[AssignedRange], b: &[AssignedRange]) -> bool {
    layout::sorted(a.to_vec()) == layout::sorted(b.to_vec())
}

async fn reconcile_inner(cluster: &CaviCluster, ctx: &Context) -> Result<Action, Error> {
    let namespace = cluster.namespace().ok_or(Error::MissingNamespace)?;
    if cluster.metadata.uid.is_none() {
        return Err(Error::MissingUid);
    }
    let names = Names::new(cluster, &namespace)?;
    let spec = &cluster.spec;
    let seen = Seen::read(&ctx.stores, &names);
    let previous = cluster.status.clone().unwrap_or_default();
    let recorded = recorded_layout(&previous, &seen);

    // 1. validate: the spec on its own, against the layout served, its
    // storage against the StatefulSet's.
    let verdict = validate(&names, spec, recorded.as_deref()).and_then(|()| {
        match seen.stateful_set.as_deref() {
            Some(sts) => check_storage_unchanged(&AppliedStorage::of(sts), &spec.storage),
            None => Ok(()),
        }
    });
    if let Err(invalid) = verdict {
        return refuse(
            cluster,
            ctx,
            &names,
            &seen,
            &previous,
            recorded.as_deref(),
            invalid,
        )
        .await;
    }
    let applied = recorded.unwrap_or_else(|| spec_layout(spec));

    // 2. decide: where the spec's ranges go, and the rollout's next step.
    let entry = entry_client(ctx, &names, spec, &applied, &seen);
    let target = plan_target(ctx, cluster, entry.as_ref(), &previous, &applied).await?;
    let moving = !same_layout(&target, &applied);
    let desired_hash = template_hash(cluster, &namespace, ctx, &names)?;
    let replicas_now = seen
        .stateful_set
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let pods = pod_views(&seen, &names, replicas_now);
    let memory = spec.storage.type_ == StorageType::Memory;
    let outdated = pods
        .iter()
        .any(|p| p.template_hash.as_deref() != Some(desired_hash.as_str()));
    // Who owns keys right now matters only to a Memory rollout.
    let live = match &entry {
        Some(e) if memory && outdated => e.cluster().await.ok(),
        _ => None,
    };
    let step = rollout::next_step(
        &pods,
        replicas_now,
        &desired_hash,
        previous.rollout.is_some(),
        memory.then_some(MemoryRules {
            layout: &target,
            allow_data_loss: spec.rollout.allow_data_loss,
        }),
        |o| {
            live.as_ref()
                .is_none_or(|v| v.shards.iter().any(|s| i64::from(s.id) == i64::from(o)))
        },
    );
    let handoff = match &step {
        Step::HandOff { ordinal, to } => Some((*ordinal, *to)),
        _ => None,
    };
    // Keys move until the driver says every node serves the target; after
    // a Memory rollout, the last restarted pod's ranges come back.
    let driving = moving
        || handoff.is_some()
        || previous.rebalance.is_some()
        || (memory
            && previous.rollout.is_some()
            && matches!(step, Step::Done | Step::Settling { .. }));
    let plan = Plan {
        applied,
        target,
        handoff,
        moving,
        driving,
    };

    // 3. build and apply.
    let replicas = if plan.driving {
        layout::pods_needed(&plan.applied).max(layout::pods_needed(&plan.target))
    } else {
        scale_down_to(
            ctx,
            &names,
            spec,
            &plan.target,
            replicas_now,
            entry.as_ref(),
        )
        .await
    };
    let shape = Shape {
        config: config_for(
            &names,
            spec,
            &ctx.opts,
            if plan.moving {
                &plan.applied
            } else {
                &plan.target
            },
            previous.epoch.unwrap_or(0),
        ),
        replicas,
        partition: step.partition(replicas.max(replicas_now)),
    };
    let children = Children::build(cluster, &namespace, &ctx.opts, &shape)?;
    if let Err(e) = apply_children(ctx, &names, &children, &seen).await {
        if let Error::ApplyFailed { message, .. } = &e {
            report_apply_failure(ctx, cluster, &names, &seen, &previous, &plan, message).await?;
        }
        return Err(e);
    }

    // 4. drive the keys, once every pod that takes part is up.
    let keys = if plan.driving {
        drive_keys(
            ctx,
            cluster,
            &names,
            &seen,
            entry.as_ref(),
            &previous,
            &plan,
        )
        .await?
    } else {
        Keys {
            served: plan.applied.clone(),
            target_layout: Vec::new(),
            epoch: previous.epoch,
            rebalance: None,
        }
    };
    ctx.metrics.set_stalled(
        &names.namespace,
        &names.cluster,
        keys.rebalance.as_ref().is_some_and(|r| r.stalled.is_some()),
    );

    // 5. status
    let rollout_view = rollout_view(
        ctx,
        cluster,
        &names,
        &seen,
        &previous,
        &step,
        &desired_hash,
        replicas_now,
    )
    .await;
    let pods_missing = (0..replicas)
        .filter(|o| seen.pod(&names, *o).is_none())
        .count();
    let status = status::compute(
        &names,
        &Observed {
            generation: cluster.metadata.generation,
            previous: Some(&previous),
            layout: &keys.served,
            target_layout: &keys.target_layout,
            epoch: keys.epoch,
            invalid: None,
            apply_failed: None,
            pods: &seen.pods,
            pods_missing: i32::try_from(pods_missing).unwrap_or(i32::MAX),
            rollout: rollout_view.as_ref(),
            rebalance: keys.rebalance.as_ref(),
        },
        Timestamp::now(),
    );
    patch_status(cluster, &names, &status, &ctx.client).await?;
    let busy = keys.rebalance.is_some()
        || rollout_view.is_some()
        || pods_missing > 0
        || replicas != replicas_now;
    Ok(Action::requeue(if busy { BUSY } else { RESYNC }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
        let waits: Vec<u64> = (0..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
