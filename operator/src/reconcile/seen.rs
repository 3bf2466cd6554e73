//! The children and pods of one cluster as the reflector stores hold them:
//! what a reconcile reads instead of asking the API server.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Stores;
use crate::build::{LABEL_INSTANCE, Names};
use crate::status;

/// The children and pods of one cluster, as the stores hold them now.
pub(super) struct Seen {
    pub(super) config_map: Option<Arc<ConfigMap>>,
    pub(super) headless_service: Option<Arc<Service>>,
    pub(super) client_service: Option<Arc<Service>>,
    pub(super) stateful_set: Option<Arc<StatefulSet>>,
    pub(super) disruption_budget: Option<Arc<PodDisruptionBudget>>,
    pub(super) network_policy: Option<Arc<NetworkPolicy>>,
    pub(super) pods: Vec<Pod>,
}

impl Seen {
    pub(super) fn read(stores: &Stores, names: &Names) -> Self {
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

    pub(super) fn pod(&self, names: &Names, ordinal: i32) -> Option<&Pod> {
        let name = names.pod(u32::try_from(ordinal).unwrap_or(0));
        self.pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
    }

    pub(super) fn ready(&self, names: &Names, ordinal: i32) -> bool {
        self.pod(names, ordinal).is_some_and(status::pod_is_ready)
    }
}
