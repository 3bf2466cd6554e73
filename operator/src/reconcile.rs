//! The reconciler: validate → decide (layout, rollout step) → build →
//! apply → drive (range moves) → status. Validation, the decisions,
//! building and the status are pure functions in their own modules; what is
//! here reads the reflector stores (no API reads of its own), writes
//! children, events and status, and asks the nodes through the resharding
//! driver.
//!
//! A reconcile of an unchanged, balanced cluster writes nothing and reads
//! nothing: children are applied only when their intent changed (a hash of
//! what was last applied, on the child) or someone changed a field the
//! operator owns, and the status only when it changed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cavi_client::reshard::{DriveError, Driver, Report};
use cavi_node::config::ClusterConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, instrument, warn};

use crate::admin::Metrics;
use crate::build::{
    APPLIED_HASH_ANNOTATION, BuildError, BuildOptions, CONFIG_KEY, Children, LABEL_INSTANCE, Names,
    Shape, TEMPLATE_HASH_ANNOTATION, config_for, spec_layout, stable_hash,
};
use crate::crd::{
    AssignedRange, CaviCluster, CaviClusterStatus, Migration, RolloutStatus, StorageType,
};
use crate::layout;
use crate::rollout::{self, MemoryRules, PodView, Step};
use crate::status::{
    self, CONDITION_PROGRESSING, Observed, REASON_PROGRESS_DEADLINE, REASON_ROLLOUT_HELD,
    RebalanceView, RolloutView,
};
use crate::validate::{AppliedStorage, Invalid, check_storage_unchanged, validate};

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

/// The children and pods of one cluster, as the stores hold them now.
struct Seen {
    config_map: Option<Arc<ConfigMap>>,
    headless_service: Option<Arc<Service>>,
    client_service: Option<Arc<Service>>,
    stateful_set: Option<Arc<StatefulSet>>,
    disruption_budget: Option<Arc<PodDisruptionBudget>>,
    network_policy: Option<Arc<NetworkPolicy>>,
    pods: Vec<Pod>,
}

impl Seen {
    fn read(stores: &Stores, names: &Names) -> Self {
        let ns = names.namespace.as_str();
        let pods = stores
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                p.namespace().as_deref() == Some(ns)
                    && p.labels().get(LABEL_INSTANCE) == Some(&names.cluster)
            })
            .map(|p| (*p).clone())
            .collect();
        Self {
            config_map: stores
                .config_maps
                .get(&ObjectRef::new(&names.config_map()).within(ns)),
            headless_service: stores
                .services
                .get(&ObjectRef::new(&names.headless_service()).within(ns)),
            client_service: stores
                .services
                .get(&ObjectRef::new(&names.client_service()).within(ns)),
            stateful_set: stores
                .stateful_sets
                .get(&ObjectRef::new(&names.stateful_set()).within(ns)),
            disruption_budget: stores
                .disruption_budgets
                .get(&ObjectRef::new(&names.disruption_budget()).within(ns)),
            network_policy: stores
                .network_policies
                .get(&ObjectRef::new(&names.network_policy()).within(ns)),
            pods,
        }
    }

    fn pod(&self, names: &Names, ordinal: i32) -> Option<&Pod> {
        let name = names.pod(u32::try_from(ordinal).unwrap_or(0));
        self.pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
    }

    fn ready(&self, names: &Names, ordinal: i32) -> bool {
        self.pod(names, ordinal).is_some_and(status::pod_is_ready)
    }
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
    let cluster_key = key(cluster);

    // The layout the pods serve: as recorded in status; for a cluster an
    // older operator made, as its ConfigMap says; none for a new cluster.
    let recorded: Option<Vec<AssignedRange>> = if !previous.layout.is_empty() {
        Some(previous.layout.clone())
    } else {
        seen.stateful_set
            .as_ref()
            .and(seen.config_map.as_ref())
            .and_then(|cm| applied_config(cm))
            .map(|c| layout::from_config(&c))
    };

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
    let wanted = layout::spec_ranges(spec);
    let target = if !previous.target_layout.is_empty()
        && layout::ranges(&previous.target_layout) == wanted
    {
        previous.target_layout.clone()
    } else if layout::ranges(&applied) == wanted {
        applied.clone()
    } else {
        let planned = layout::assign(entry.as_ref(), spec)
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
        planned
    };
    let moving = !same_layout(&target, &applied);

    let probe_shape = Shape::of_spec(&names, spec, &ctx.opts);
    let desired_hash = Children::build(cluster, &namespace, &ctx.opts, &probe_shape)?
        .stateful_set
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|mut a| a.remove(TEMPLATE_HASH_ANNOTATION))
        .unwrap_or_default();
    let replicas_now = seen
        .stateful_set
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let pods: Vec<PodView> = (0..replicas_now)
        .filter_map(|o| {
            seen.pod(&names, o).map(|p| PodView {
                ordinal: o,
                ready: status::pod_is_ready(p),
                template_hash: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION).cloned()),
            })
        })
        .collect();
    let memory = spec.storage.type_ == StorageType::Memory;
    let outdated = pods
        .iter()
        .any(|p| p.template_hash.as_deref() != Some(desired_hash.as_str()));
    // Who owns keys right now matters only to a Memory rollout.
    let live = if memory && outdated {
        match &entry {
            Some(e) => e.cluster().await.ok(),
            None => None,
        }
    } else {
        None
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
    let driver_target = match handoff {
        Some((from, to)) => layout::handed_over(&target, from, to),
        None => target.clone(),
    };
    // Keys move until the driver says every node serves the target; after
    // a Memory rollout, the last restarted pod's ranges come back.
    let driving = moving
        || handoff.is_some()
        || previous.rebalance.is_some()
        || (memory
            && previous.rollout.is_some()
            && matches!(step, Step::Done | Step::Settling { .. }));

    // 3. build and apply.
    let replicas = if driving {
        layout::pods_needed(&applied).max(layout::pods_needed(&target))
    } else {
        scale_down_to(ctx, &names, spec, &target, replicas_now, &entry).await
    };
    let shape = Shape {
        config: config_for(
            &names,
            spec,
            &ctx.opts,
            if moving { &applied } else { &target },
            previous.epoch.unwrap_or(0),
        ),
        replicas,
        partition: step.partition(replicas.max(replicas_now)),
    };
    let children = Children::build(cluster, &namespace, &ctx.opts, &shape)?;
    if let Err(e) = apply_children(ctx, &names, &children, &seen).await {
        if let Error::ApplyFailed { message, .. } = &e {
            publish(
                ctx,
                cluster,
                EventType::Warning,
                status::REASON_APPLY_FAILED,
                message,
            )
            .await;
            let status = status::compute(
                &names,
                &Observed {
                    generation: cluster.metadata.generation,
                    previous: Some(&previous),
                    layout: &applied,
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
            patch_status(cluster, &names, &status, &ctx.client).await?;
        }
        return Err(e);
    }

    // 4. drive the keys, once every pod that takes part is up.
    let mut served = applied.clone();
    let mut target_layout = if moving { target.clone() } else { Vec::new() };
    let mut epoch = previous.epoch;
    let mut rebalance = None;
    if driving {
        let needed = layout::pods_needed(&applied).max(layout::pods_needed(&target));
        let waiting: Vec<i32> = (0..needed).filter(|o| !seen.ready(&names, *o)).collect();
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
            let goal = config_for(&names, spec, &ctx.opts, &driver_target, 0);
            drive(ctx, cluster, entry.as_ref(), &goal, &cluster_key).await?
        };
        match view {
            Some(view) => rebalance = Some(view),
            None => {
                // Done: the nodes serve the goal.
                if handoff.is_none() {
                    served = target.clone();
                    target_layout = Vec::new();
                }
                epoch = Some(live_epoch(&entry).await.unwrap_or(epoch.unwrap_or(0)));
                ctx.forget_progress(&cluster_key);
                if handoff.is_none() && previous.rebalance.is_some() {
                    publish(
                        ctx,
                        cluster,
                        EventType::Normal,
                        "RebalanceComplete",
                        &format!(
                            "every shard serves the layout of the spec (map epoch {})",
                            epoch.unwrap_or(0)
                        ),
                    )
                    .await;
                }
            }
        }
    }
    ctx.metrics.set_stalled(
        &names.namespace,
        &names.cluster,
        rebalance.as_ref().is_some_and(|r| r.stalled.is_some()),
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
            layout: &served,
            target_layout: &target_layout,
            epoch,
            invalid: None,
            apply_failed: None,
            pods: &seen.pods,
            pods_missing: i32::try_from(pods_missing).unwrap_or(i32::MAX),
            rollout: rollout_view.as_ref(),
            rebalance: rebalance.as_ref(),
        },
        Timestamp::now(),
    );
    patch_status(cluster, &names, &status, &ctx.client).await?;
    let busy = rebalance.is_some()
        || rollout_view.is_some()
        || pods_missing > 0
        || replicas != replicas_now;
    Ok(Action::requeue(if busy { BUSY } else { RESYNC }))
}

/// A client for a node to start the driver from: the lowest ordinal with a
/// ready pod in the layout served. `None` while no pod is ready.
fn entry_client(
    ctx: &Context,
    names: &Names,
    spec: &crate::crd::CaviClusterSpec,
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

async fn live_epoch(entry: &Option<cavi_client::Client>) -> Option<u64> {
    entry.as_ref()?.cluster().await.ok().map(|v| v.epoch)
}

/// One driver step towards `goal`; `None` once every node serves it.
async fn drive(
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
async fn scale_down_to(
    ctx: &Context,
    names: &Names,
    spec: &crate::crd::CaviClusterSpec,
    target: &[AssignedRange],
    replicas_now: i32,
    entry: &Option<cavi_client::Client>,
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

/// The rollout as status reports it, with the Warning events of a stuck
/// one (once, when it gets stuck).
#[allow(clippy::too_many_arguments)]
async fn rollout_view(
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
async fn refuse(
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
async fn publish(ctx: &Context, cluster: &CaviCluster, type_: EventType, reason: &str, note: &str) {
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

/// Applies every child whose intent changed, in dependency order: config
/// and DNS before the pods. The NetworkPolicy goes when it is turned off.
async fn apply_children(
    ctx: &Context,
    names: &Names,
    children: &Children,
    seen: &Seen,
) -> Result<(), Error> {
    let client = &ctx.client;
    let ns = names.namespace.as_str();
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.config_map,
        seen.config_map.as_deref(),
    )
    .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply(
        &services,
        &children.headless_service,
        seen.headless_service.as_deref(),
    )
    .await?;
    apply(
        &services,
        &children.client_service,
        seen.client_service.as_deref(),
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.stateful_set,
        seen.stateful_set.as_deref(),
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), ns),
        &children.disruption_budget,
        seen.disruption_budget.as_deref(),
    )
    .await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    match (&children.network_policy, &seen.network_policy) {
        (Some(np), observed) => apply(&policies, np, observed.as_deref()).await?,
        (None, Some(_)) => {
            info!("removing the NetworkPolicy (spec.networkPolicy.enabled is off)");
            match policies
                .delete(&names.network_policy(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        (None, None) => {}
    }
    Ok(())
}

/// Server-side applies `desired` (the whole object, under one field
/// manager, so fields it no longer sets are removed) unless the child
/// already carries the hash of exactly this intent and every field the
/// operator sets still has its value (someone may have edited one).
pub async fn apply<K>(api: &Api<K>, desired: &K, observed: Option<&K>) -> Result<(), Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let hash = stable_hash(&serde_json::to_vec(desired)?);
    let mut desired = desired.clone();
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    if let Some(observed) = observed {
        let same_intent = observed
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
            == Some(&hash);
        if same_intent
            && is_subset(
                &serde_json::to_value(&desired)?,
                &serde_json::to_value(observed)?,
            )
        {
            return Ok(());
        }
    }
    let name = desired.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&Default::default()).into_owned();
    info!(%kind, %name, "applying");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(&desired)).await {
        Ok(_) => Ok(()),
        // The API server understood the request and refuses its content:
        // the spec must change, and the user must be told.
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => Err(Error::ApplyFailed {
            what: format!("{kind} {name}"),
            message: format!("{kind} {name}: {}", s.message),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Whether every field set in `desired` has the same value in `observed`.
/// Fields only in `observed` (defaults, status, other managers) are
/// ignored; lists must have the same length and match item by item.
pub fn is_subset(desired: &serde_json::Value, observed: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, observed) {
        (Value::Object(d), Value::Object(o)) => d
            .iter()
            .all(|(k, dv)| o.get(k).is_some_and(|ov| is_subset(dv, ov))),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(dv, ov)| is_subset(dv, ov))
        }
        (d, o) => d == o,
    }
}

/// The typed body of a status apply: `apiVersion`, `kind` and `status`
/// only, so the operator never claims ownership of spec fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    status: &'a CaviClusterStatus,
}

async fn patch_status(
    cluster: &CaviCluster,
    names: &Names,
    status: &CaviClusterStatus,
    client: &Client,
) -> Result<(), Error> {
    if cluster.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<CaviCluster> = Api::namespaced(client.clone(), &names.namespace);
    let body = StatusApply {
        api_version: CaviCluster::api_version(&()),
        kind: CaviCluster::kind(&()),
        status,
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&names.cluster, &params, &Patch::Apply(&body))
        .await?;
    Ok(())
}
