//! The reconciler: validate → build → apply → status. Only [`apply`] and
//! the status patch talk to the API server; validation, building and the
//! status itself are pure functions in their own modules.
//!
//! A reconcile of an unchanged cluster writes nothing: a child is applied
//! only when an owned field differs from what the API server holds (or the
//! child is missing), and the status only when it changed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cavi_node::config::ClusterConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, instrument, warn};

use crate::admin::Metrics;
use crate::build::{BuildError, CONFIG_KEY, Children, Names, cluster_config, selector_query};
use crate::crd::{CaviCluster, CaviClusterStatus};
use crate::status::{self, Observed};
use crate::validate::{AppliedStorage, Invalid, check_storage_unchanged, validate};

/// The one field manager every server-side apply of this operator uses.
pub const FIELD_MANAGER: &str = "cavi-operator";
/// How often a healthy cluster is looked at again without any event.
pub const RESYNC: Duration = Duration::from_secs(300);
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
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot encode an object: {0}")]
    Encode(#[from] serde_json::Error),
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
            Error::Kube(_) => "KubeApi",
            Error::Encode(_) => "Encode",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive transient failures per cluster, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
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

/// The children as the API server holds them now.
struct ObservedChildren {
    config_map: Option<ConfigMap>,
    headless_service: Option<Service>,
    client_service: Option<Service>,
    stateful_set: Option<StatefulSet>,
}

/// The layout in an applied ConfigMap, if it holds a readable one.
pub fn applied_layout(config_map: &ConfigMap) -> Option<ClusterConfig> {
    let text = config_map.data.as_ref()?.get(CONFIG_KEY)?;
    match ClusterConfig::from_yaml(text) {
        Ok(config) => Some(config),
        Err(error) => {
            warn!(%error, "the applied ConfigMap holds no readable layout; it will be replaced");
            None
        }
    }
}

async fn reconcile_inner(cluster: &CaviCluster, ctx: &Context) -> Result<Action, Error> {
    let namespace = cluster.namespace().ok_or(Error::MissingNamespace)?;
    if cluster.metadata.uid.is_none() {
        return Err(Error::MissingUid);
    }
    let names = Names::new(cluster, &namespace)?;
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);

    let observed = ObservedChildren {
        config_map: config_maps.get_opt(&names.config_map()).await?,
        headless_service: services.get_opt(&names.headless_service()).await?,
        client_service: services.get_opt(&names.client_service()).await?,
        stateful_set: stateful_sets.get_opt(&names.stateful_set()).await?,
    };
    let applied = observed.config_map.as_ref().and_then(applied_layout);
    let applied_storage = observed.stateful_set.as_ref().map(AppliedStorage::of);

    // 1. validate: the spec on its own, its layout against the ConfigMap's,
    // its storage against the StatefulSet's.
    let verdict = validate(&names, &cluster.spec, applied.as_ref()).and_then(|config| {
        match &applied_storage {
            Some(storage) => check_storage_unchanged(storage, &cluster.spec.storage),
            None => Ok(()),
        }
        .map(|()| config)
    });
    if let Err(invalid) = verdict {
        warn!(reason = invalid.reason, message = %invalid.message, "spec refused");
        let pod_list = pods
            .list(&ListParams::default().labels(&selector_query(&names)))
            .await?;
        let layout = applied.unwrap_or_else(|| cluster_config(&names, &cluster.spec));
        let status = status::compute(
            &names,
            &Observed {
                generation: cluster.metadata.generation,
                previous: cluster.status.as_ref(),
                layout: &layout,
                invalid: Some(&invalid),
                stateful_set: observed.stateful_set.as_ref(),
                pods: &pod_list.items,
            },
            Timestamp::now(),
        );
        let event = Event {
            type_: EventType::Warning,
            reason: invalid.reason.into(),
            note: Some(invalid.message.clone()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
            warn!(%error, "could not publish the Warning event");
        }
        patch_status(cluster, &names, &status, client).await?;
        return Err(Error::InvalidSpec(invalid));
    }

    // 2. build
    let children = Children::build(cluster, &namespace)?;

    // 3. apply, in dependency order: config and DNS before the pods.
    apply(&config_maps, &children.config_map, observed.config_map).await?;
    apply(
        &services,
        &children.headless_service,
        observed.headless_service,
    )
    .await?;
    apply(&services, &children.client_service, observed.client_service).await?;
    let stateful_set = apply(
        &stateful_sets,
        &children.stateful_set,
        observed.stateful_set,
    )
    .await?;

    // 4. status
    let pod_list = pods
        .list(&ListParams::default().labels(&selector_query(&names)))
        .await?;
    let status = status::compute(
        &names,
        &Observed {
            generation: cluster.metadata.generation,
            previous: cluster.status.as_ref(),
            layout: &children.config,
            invalid: None,
            stateful_set: Some(&stateful_set),
            pods: &pod_list.items,
        },
        Timestamp::now(),
    );
    patch_status(cluster, &names, &status, client).await?;
    Ok(Action::requeue(RESYNC))
}

/// Server-side applies `desired` unless `observed` already carries every
/// field of it; returns the object as the API server holds it afterwards.
pub async fn apply<K>(api: &Api<K>, desired: &K, observed: Option<K>) -> Result<K, Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    if let Some(observed) = observed
        && is_subset(
            &serde_json::to_value(desired)?,
            &serde_json::to_value(&observed)?,
        )
    {
        return Ok(observed);
    }
    let name = desired.meta().name.clone().unwrap_or_default();
    info!(kind = %K::kind(&Default::default()), %name, "applying");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(desired)).await?)
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
