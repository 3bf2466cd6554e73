//! `cavi-operator run`: the controller, its leader election and its admin
//! port, wired together.

use cavi_node::server::shutdown_signal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::build::{APP_NAME, BuildOptions, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, MANAGER};
use crate::crd::{CRD_NAME, CRD_PATH, CaviCluster};
use crate::leader::{LeaderElector, LeaseTiming};
use crate::reconcile::{Context, Stores, Timings, error_policy, reconcile};

/// Options of `cavi-operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub admin_addr: SocketAddr,
    /// Watch one namespace only; `None` watches all.
    pub watch_namespace: Option<String>,
    /// Take part in leader election (off for a single local replica).
    pub leader_election: bool,
    pub lease_name: String,
    /// Namespace of the Lease; defaults to the client's namespace.
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in events.
    pub identity: String,
    /// The image nodes run when a CaviCluster names none.
    pub default_node_image: String,
    /// The cluster's DNS domain (pods' addresses end in `svc.<domain>`).
    pub cluster_domain: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("CRD {CRD_NAME} is not installed: kubectl apply -f {CRD_PATH}")]
    CrdMissing,
    #[error("cannot list CaviClusters: {0}")]
    CrdCheck(#[source] kube::Error),
    #[error("cannot serve the admin port on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("lost the leader lease; exiting so that only one replica reconciles")]
    LostLease,
}

fn clusters_api(client: &Client, namespace: Option<&str>) -> Api<CaviCluster> {
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn child_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector store of `K` (by `selector`) and the stream of changes that
/// feeds it and triggers reconciles (deletions included).
fn reflected<K>(
    client: &Client,
    namespace: Option<&str>,
    selector: &watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher(child_api::<K>(client, namespace), selector.clone())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}

/// Fails with an install hint when the CRD is missing.
pub async fn check_crd(api: &Api<CaviCluster>) -> Result<(), RunError> {
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(RunError::CrdMissing),
        Err(error) => Err(RunError::CrdCheck(error)),
    }
}

/// Runs the operator until SIGTERM / Ctrl-C.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let state = AdminState::default();

    let listener = tokio::net::TcpListener::bind(options.admin_addr)
        .await
        .map_err(|source| RunError::Admin {
            addr: options.admin_addr,
            source,
        })?;
    info!(addr = %options.admin_addr, "admin endpoints listening");
    let admin_state = state.clone();
    tokio::spawn(async move {
        if let Err(error) = admin::serve(listener, admin_state, async {
            shutdown_signal().await;
        })
        .await
        {
            error!(%error, "admin server failed");
        }
    });

    let ns = options.watch_namespace.as_deref();
    let clusters = clusters_api(&client, ns);
    check_crd(&clusters).await?;
    state.ready.store(true, Ordering::Relaxed);

    let elector = options.leader_election.then(|| {
        let lease_ns = options
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &lease_ns),
            &options.lease_name,
            &options.identity,
            LeaseTiming::default(),
        )
    });
    if let Some(elector) = &elector {
        info!(
            identity = elector.identity(),
            "waiting for the leader lease"
        );
        tokio::select! {
            () = elector.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }
    state.metrics.set_leader(true);

    let reporter = Reporter {
        controller: crate::build::MANAGER.into(),
        instance: Some(options.identity.clone()),
    };
    let children = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let node_pods = watcher::Config::default().labels(&format!("{LABEL_NAME}={APP_NAME}"));
    let (config_maps, config_map_events) = reflected::<ConfigMap>(&client, ns, &children);
    let (services, service_events) = reflected::<Service>(&client, ns, &children);
    let (stateful_sets, stateful_set_events) = reflected::<StatefulSet>(&client, ns, &children);
    let (budgets, budget_events) = reflected::<PodDisruptionBudget>(&client, ns, &children);
    let (policies, policy_events) = reflected::<NetworkPolicy>(&client, ns, &children);
    let (pods, pod_events) = reflected::<Pod>(&client, ns, &node_pods);
    let stores = Stores {
        config_maps,
        services,
        stateful_sets,
        disruption_budgets: budgets,
        network_policies: policies,
        pods,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        reporter,
        state.metrics.clone(),
        BuildOptions::new(
            options.default_node_image.clone(),
            options.cluster_domain.clone(),
        ),
        stores,
        Timings::default(),
    ));
    let controller = Controller::new(clusters, watcher::Config::default().any_semantic())
        .owns_stream(config_map_events)
        .owns_stream(service_events)
        .owns_stream(stateful_set_events)
        .owns_stream(budget_events)
        .owns_stream(policy_events)
        // Pods belong to the StatefulSet: they name their cluster by label.
        .watches_stream(pod_events, |pod: Pod| {
            let namespace = pod.namespace()?;
            let cluster = pod.labels().get(LABEL_INSTANCE)?;
            Some(ObjectRef::<CaviCluster>::new(cluster).within(&namespace))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                Err(error) => warn!(%error, "reconcile failed"),
            }
        });

    let outcome = match &elector {
        Some(elector) => tokio::select! {
            () = controller => Ok(()),
            () = elector.hold() => Err(RunError::LostLease),
        },
        None => {
            controller.await;
            Ok(())
        }
    };
    state.metrics.set_leader(false);
    if let Some(elector) = &elector {
        elector.release().await;
    }
    info!("operator stopped");
    outcome
}
