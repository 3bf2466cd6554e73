//! Pure builders: a `CaviCluster` in, the child objects that run it out.
//! Nothing here talks to the API server, so the reconciler, `render` and the
//! tests all share one definition of "what the cluster should look like".
//!
//! This is the "build" step of a reconcile: validate → build → apply →
//! status. Every builder is a pure function of the cluster's names, its
//! owner reference, its spec, the operator's own [`BuildOptions`] and the
//! [`Shape`] the reconciler decided (the layout the ConfigMap carries, the
//! number of pods, how far a rollout may go). This module holds what every
//! child shares and [`Children::build`]; each child has its own module:
//!
//! - `config_map`: the ConfigMap holding the node config file;
//! - `services`: the headless Service and the client Service;
//! - `stateful_set`: the StatefulSet, its pod template, probes, spread and
//!   security context;
//! - `storage`: persistent storage, the StatefulSet's volume claim template;
//! - `disruption`: the PodDisruptionBudget;
//! - `network_policy`: the optional NetworkPolicy.

mod config_map;
mod disruption;
mod network_policy;
mod services;
mod stateful_set;
mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;

use cavi_node::config::{ClusterConfig, ShardConfig};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde::Serialize;

use crate::crd::{AssignedRange, CaviCluster, CaviClusterSpec, DEFAULT_IMAGE};

pub use config_map::config_map;
pub use disruption::disruption_budget;
pub use network_policy::network_policy;
pub use services::{client_service, headless_service};
pub use stateful_set::{
    CONFIG_DIR, CONTAINER_NAME, METRICS_PATH, NODE_COMMAND, PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_PORT_ANNOTATION, PROMETHEUS_SCRAPE_ANNOTATION, RUN_AS_USER,
    TEMPLATE_HASH_ANNOTATION, node_args, pod_annotations, stateful_set, template_hash,
};
pub use storage::{DATA_DIR, DATA_VOLUME, data_claim_template, persistent_storage};

/// Key of the node config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Annotation on every child: a hash of what the operator last applied, so
/// an unchanged intent is not applied again.
pub const APPLIED_HASH_ANNOTATION: &str = "cavi.dev/applied-hash";
/// Name of the node's HTTP port, in the pod and in both Services.
pub const PORT_NAME: &str = "http";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of `app.kubernetes.io/name` on every child.
pub const APP_NAME: &str = "cavi";
/// Value of `app.kubernetes.io/managed-by` on every child.
pub const MANAGER: &str = "cavi-operator";
/// The default Kubernetes cluster domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the CaviCluster has no metadata.name")]
    MissingName,
    #[error("cannot write the node config: {0}")]
    Config(#[from] cavi_node::config::ConfigError),
}

/// Where a shard's pod is reached: its advertised `host:port`.
pub trait ShardAddresses: Send + Sync + std::fmt::Debug {
    fn shard_addr(&self, names: &Names, ordinal: u32, port: i32) -> String;
}

/// The pod's DNS name under the headless Service, in `domain`:
/// `<name>-<i>.<name>-headless.<ns>.svc.<domain>:<port>`.
#[derive(Debug, Clone)]
pub struct DnsAddresses {
    pub domain: String,
}

impl ShardAddresses for DnsAddresses {
    fn shard_addr(&self, names: &Names, ordinal: u32, port: i32) -> String {
        format!(
            "{}.{}.{}.svc.{}:{port}",
            names.pod(ordinal),
            names.headless_service(),
            names.namespace,
            self.domain
        )
    }
}

/// What the operator itself decides for every cluster.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image nodes run when a spec names none: the operator's own,
    /// passed by the chart.
    pub default_image: String,
    /// How shards reach each other.
    pub addresses: Arc<dyn ShardAddresses>,
}

impl BuildOptions {
    pub fn new(default_image: impl Into<String>, cluster_domain: impl Into<String>) -> Self {
        Self {
            default_image: default_image.into(),
            addresses: Arc::new(DnsAddresses {
                domain: cluster_domain.into(),
            }),
        }
    }

    /// The image a cluster's nodes run.
    pub fn image<'a>(&'a self, spec: &'a CaviClusterSpec) -> &'a str {
        spec.image.as_deref().unwrap_or(&self.default_image)
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self::new(DEFAULT_IMAGE, DEFAULT_CLUSTER_DOMAIN)
    }
}

/// What the reconciler decided before building, from the cluster's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// The layout the ConfigMap carries: the one a restarting pod boots
    /// from (the live map, held by the nodes, may be newer).
    pub config: ClusterConfig,
    /// Pods: one per ordinal that owns keys now or will.
    pub replicas: i32,
    /// Pods with an ordinal below this keep their current template: the
    /// operator rolls a template change one ordinal at a time.
    pub partition: i32,
}

impl Shape {
    /// A cluster serving its spec as written: range `i` on ordinal `i`,
    /// every pod rolled (what `render` shows, and a new cluster's start).
    pub fn of_spec(names: &Names, spec: &CaviClusterSpec, opts: &BuildOptions) -> Self {
        let layout = spec_layout(spec);
        Self {
            config: config_for(names, spec, opts, &layout, 0),
            replicas: i32::try_from(layout.len()).unwrap_or(i32::MAX),
            partition: 0,
        }
    }
}

/// Names of the children of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn new(cluster: &CaviCluster, namespace: &str) -> Result<Self, BuildError> {
        let name = cluster
            .metadata
            .name
            .clone()
            .ok_or(BuildError::MissingName)?;
        Ok(Self {
            cluster: name,
            namespace: namespace.to_owned(),
        })
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }
    pub fn headless_service(&self) -> String {
        format!("{}-headless", self.cluster)
    }
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    pub fn stateful_set(&self) -> String {
        self.cluster.clone()
    }
    pub fn disruption_budget(&self) -> String {
        self.cluster.clone()
    }
    pub fn network_policy(&self) -> String {
        self.cluster.clone()
    }
    pub fn pod(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }
}

/// Every label a child carries.
pub fn labels(names: &Names) -> BTreeMap<String, String> {
    let mut labels = selector_labels(names);
    labels.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    labels
}

/// The stable subset of [`labels`] used in selectors (a StatefulSet's
/// selector is immutable, so it never includes anything that may change).
pub fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), names.cluster.clone()),
    ])
}

/// The spec's ranges on ordinals `0..n`, in key order: a new cluster's
/// layout.
pub fn spec_layout(spec: &CaviClusterSpec) -> Vec<AssignedRange> {
    spec.shards
        .iter()
        .enumerate()
        .map(|(i, r)| AssignedRange {
            ordinal: i32::try_from(i).unwrap_or(i32::MAX),
            range_start: r.range_start.clone(),
            range_end: r.range_end.clone(),
        })
        .collect()
}

/// The node config file of a layout (in key order) at `epoch`. Not
/// validated here: see [`crate::validate`].
pub fn config_for(
    names: &Names,
    spec: &CaviClusterSpec,
    opts: &BuildOptions,
    layout: &[AssignedRange],
    epoch: u64,
) -> ClusterConfig {
    let shards: Vec<ShardConfig> = layout
        .iter()
        .map(|r| {
            let ordinal = u32::try_from(r.ordinal).unwrap_or(u32::MAX);
            ShardConfig {
                id: ordinal,
                addr: opts.addresses.shard_addr(names, ordinal, spec.port),
                range_start: r.range_start.clone(),
                range_end: r.range_end.clone(),
            }
        })
        .collect();
    ClusterConfig { epoch, shards }
}

/// A stable 64-bit FNV-1a hash, hex-encoded. Stable across builds and Rust
/// versions (unlike `std`'s hasher), which matters because it is written to
/// the cluster and compared by a later operator version.
pub fn stable_hash(bytes: &[u8]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

/// Every child object of one cluster, in apply order.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The layout the ConfigMap carries.
    pub config: ClusterConfig,
    pub config_map: ConfigMap,
    pub headless_service: Service,
    pub client_service: Service,
    pub stateful_set: StatefulSet,
    pub disruption_budget: PodDisruptionBudget,
    /// `None` when `spec.networkPolicy.enabled` is off.
    pub network_policy: Option<NetworkPolicy>,
}

impl Children {
    /// Every child of `cluster` in `namespace`. Owner references are set
    /// when the cluster has a uid (it always does when read from the API
    /// server; a file given to `render` has none).
    pub fn build(
        cluster: &CaviCluster,
        namespace: &str,
        opts: &BuildOptions,
        shape: &Shape,
    ) -> Result<Self, BuildError> {
        let names = Names::new(cluster, namespace)?;
        let owner = cluster.controller_owner_ref(&());
        let spec = &cluster.spec;
        let config_yaml = shape.config.to_yaml()?;
        Ok(Self {
            config_map: config_map(&names, owner.clone(), &config_yaml),
            headless_service: headless_service(&names, owner.clone(), spec),
            client_service: client_service(&names, owner.clone(), spec),
            stateful_set: stateful_set(&names, owner.clone(), spec, opts, shape),
            disruption_budget: disruption_budget(&names, owner.clone(), spec),
            network_policy: spec
                .network_policy
                .enabled
                .then(|| network_policy(&names, owner, spec)),
            config: shape.config.clone(),
        })
    }

    /// A cluster's children as `render` prints them: its spec's layout.
    pub fn of_spec(
        cluster: &CaviCluster,
        namespace: &str,
        opts: &BuildOptions,
    ) -> Result<Self, BuildError> {
        let names = Names::new(cluster, namespace)?;
        Self::build(
            cluster,
            namespace,
            opts,
            &Shape::of_spec(&names, &cluster.spec, opts),
        )
    }

    /// The children as a multi-document YAML stream, as `render` prints it.
    pub fn to_yaml_stream(&self) -> Result<String, serde_yaml::Error> {
        fn doc(out: &mut String, obj: &impl Serialize) -> Result<(), serde_yaml::Error> {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(obj)?);
            Ok(())
        }
        let mut out = String::new();
        doc(&mut out, &self.config_map)?;
        doc(&mut out, &self.headless_service)?;
        doc(&mut out, &self.client_service)?;
        doc(&mut out, &self.stateful_set)?;
        doc(&mut out, &self.disruption_budget)?;
        if let Some(np) = &self.network_policy {
            doc(&mut out, np)?;
        }
        Ok(out)
    }
}

fn metadata(names: &Names, name: String, owner: Option<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(names)),
        owner_references: owner.map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::fixtures::*;
    use super::*;
    use crate::crd::StorageType;

    #[test]
    fn defaults_fill_image_port_and_storage() {
        let cluster: CaviCluster = serde_yaml::from_str(
            "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {name: d}\nspec:\n  shards: [{rangeEnd: m}]\n",
        )
        .unwrap();
        assert_eq!(cluster.spec.port, 3100);
        assert_eq!(cluster.spec.image, None);
        assert_eq!(cluster.spec.storage.type_, StorageType::Persistent);
        assert_eq!(cluster.spec.shards[0].range_start, "");
        let opts = BuildOptions::new("registry.example/cavi:7", "corp.internal");
        let c = Children::of_spec(&cluster, "default", &opts).unwrap();
        assert_eq!(
            c.config.shards[0].addr,
            "d-0.d-headless.default.svc.corp.internal:3100"
        );
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example/cavi:7")
        );
        // Without a uid (a file, not an API object) there is no owner.
        assert_eq!(c.config_map.metadata.owner_references, None);
    }

    #[test]
    fn a_layout_change_does_not_touch_the_pod_template() {
        let template = |c: &CaviCluster| children(c).stateful_set.spec.unwrap().template;
        let base = template(&demo());
        let mut split = demo();
        split.spec.shards[1].range_end = Some("s".into());
        split.spec.shards.insert(
            2,
            crate::crd::ShardRange {
                range_start: "t".into(),
                range_end: Some("z".into()),
            },
        );
        assert_eq!(template(&split), base, "no pod restarts for a new layout");
        let mut image = demo();
        image.spec.image = Some("registry.example/cavi:9.9.9".into());
        assert_ne!(template(&image), base);
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(stable_hash(b""), "cbf29ce484222325");
        assert_eq!(stable_hash(b"a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn render_stream_has_every_child_in_apply_order() {
        let yaml = children(&demo()).to_yaml_stream().unwrap();
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| {
                let v = <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap();
                format!(
                    "{}/{}",
                    v["kind"].as_str().unwrap(),
                    v["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "ConfigMap/demo-config",
                "Service/demo-headless",
                "Service/demo",
                "StatefulSet/demo",
                "PodDisruptionBudget/demo"
            ]
        );
    }
}

/// What the tests of every builder share: a demo cluster, its children,
/// and what their metadata must say.
#[cfg(test)]
mod fixtures {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DEMO: &str = r#"
apiVersion: cavi.dev/v1alpha1
kind: CaviCluster
metadata:
  name: demo
  namespace: shop
  uid: 6f1c2d1e-0000-4000-8000-000000000001
spec:
  image: registry.example/cavi:1.2.3
  port: 4000
  storage: { type: Memory }
  shards:
    - { rangeStart: "a", rangeEnd: "m" }
    - { rangeStart: "n", rangeEnd: "z" }
    - { rangeStart: "{" }
  resources:
    requests: { cpu: 100m, memory: 64Mi }
  placement:
    nodeSelector: { disk: ssd }
    tolerations:
      - { key: dedicated, operator: Equal, value: cavi, effect: NoSchedule }
"#;

    pub(super) fn demo() -> CaviCluster {
        serde_yaml::from_str(DEMO).unwrap()
    }

    pub(super) fn children(cluster: &CaviCluster) -> Children {
        Children::of_spec(cluster, "shop", &BuildOptions::default()).unwrap()
    }

    /// The pod template's spec of `cluster`'s StatefulSet.
    pub(super) fn pod_spec(cluster: &CaviCluster) -> k8s_openapi::api::core::v1::PodSpec {
        children(cluster)
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
    }

    pub(super) fn expected_labels() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "cavi".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "demo".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "cavi-operator".to_owned(),
            ),
        ])
    }

    pub(super) fn expected_selector() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "cavi".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "demo".to_owned()),
        ])
    }

    pub(super) fn assert_common_metadata(meta: &ObjectMeta, name: &str) {
        assert_eq!(meta.name.as_deref(), Some(name));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.labels.as_ref(), Some(&expected_labels()));
        let owners = meta.owner_references.as_ref().expect("owner reference");
        assert_eq!(owners.len(), 1);
        let owner = &owners[0];
        assert_eq!(owner.api_version, "cavi.dev/v1alpha1");
        assert_eq!(owner.kind, "CaviCluster");
        assert_eq!(owner.name, "demo");
        assert_eq!(owner.uid, "6f1c2d1e-0000-4000-8000-000000000001");
        assert_eq!(owner.controller, Some(true));
    }

    pub(super) fn config_yaml(cm: &ConfigMap) -> &str {
        cm.data.as_ref().unwrap().get(CONFIG_KEY).unwrap()
    }
}
