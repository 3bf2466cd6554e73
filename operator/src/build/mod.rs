//! Pure builders: a `CaviCluster` in, the child objects that run it out.
//! Nothing here talks to the API server, so the reconciler, `render` and the
//! tests all share one definition of "what the cluster should look like".
//!
//! This is the "build" step of a reconcile: validate → build → apply →
//! status. Every builder is a pure function of the cluster's names, its
//! owner reference and its spec. This module holds what every child
//! shares (names, labels and selectors, the owner reference, the node
//! config and its hash) and [`Children::build`], which builds them all;
//! each child has its own module:
//!
//! - `config_map`: the ConfigMap holding the node config file;
//! - `services`: the headless Service and the client Service;
//! - `stateful_set`: the StatefulSet, its pod template, probes and
//!   security context;
//! - `storage`: persistent storage, the StatefulSet's volume claim template.

mod config_map;
mod services;
mod stateful_set;
mod storage;

use std::collections::BTreeMap;

use cavi_node::config::{ClusterConfig, ShardConfig};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde::Serialize;

use crate::crd::{CaviCluster, CaviClusterSpec};

pub use config_map::config_map;
pub use services::{client_service, headless_service};
pub use stateful_set::{
    CONFIG_DIR, CONTAINER_NAME, METRICS_PATH, NODE_COMMAND, PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_PORT_ANNOTATION, PROMETHEUS_SCRAPE_ANNOTATION, RUN_AS_USER, node_args,
    pod_annotations, stateful_set,
};
pub use storage::{DATA_DIR, DATA_VOLUME, data_claim_template, persistent_storage};

/// Key of the node config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Pod-template annotation holding a hash of the config file, so a new
/// layout rolls the pods and nothing else does.
pub const CONFIG_HASH_ANNOTATION: &str = "cavi.dev/config-hash";
/// Name of the node's HTTP port, in the pod and in both Services.
pub const PORT_NAME: &str = "http";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of `app.kubernetes.io/name` on every child.
pub const APP_NAME: &str = "cavi";
/// Value of `app.kubernetes.io/managed-by` on every child.
pub const MANAGER: &str = "cavi-operator";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the CaviCluster has no metadata.name")]
    MissingName,
    #[error("cannot write the node config: {0}")]
    Config(#[from] cavi_node::config::ConfigError),
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
    pub fn pod(&self, shard: usize) -> String {
        format!("{}-{shard}", self.cluster)
    }
    /// The advertised address of shard `shard`: its pod's DNS name under
    /// the headless Service.
    pub fn shard_addr(&self, shard: usize, port: i32) -> String {
        format!(
            "{}.{}.{}.svc.cluster.local:{port}",
            self.pod(shard),
            self.headless_service(),
            self.namespace
        )
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

/// [`selector_labels`] as a `labelSelector` query string.
pub fn selector_query(names: &Names) -> String {
    selector_labels(names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The node config file the spec describes: shard `i` owns the `i`-th
/// range and is reached at pod `<name>-i`. Not validated here: see
/// [`crate::validate`].
pub fn cluster_config(names: &Names, spec: &CaviClusterSpec) -> ClusterConfig {
    ClusterConfig {
        epoch: 0,
        shards: spec
            .shards
            .iter()
            .enumerate()
            .map(|(i, range)| ShardConfig {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                addr: names.shard_addr(i, spec.port),
                range_start: range.range_start.clone(),
                range_end: range.range_end.clone(),
            })
            .collect(),
    }
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
}

impl Children {
    /// Builds every child of `cluster` in `namespace`. Owner references are
    /// set when the cluster has a uid (it always does when read from the API
    /// server; a file given to `render` has none).
    pub fn build(cluster: &CaviCluster, namespace: &str) -> Result<Self, BuildError> {
        let names = Names::new(cluster, namespace)?;
        let owner = cluster.controller_owner_ref(&());
        let config = cluster_config(&names, &cluster.spec);
        let config_yaml = config.to_yaml()?;
        Ok(Self {
            config_map: config_map(&names, owner.clone(), &config_yaml),
            headless_service: headless_service(&names, owner.clone(), &cluster.spec),
            client_service: client_service(&names, owner.clone(), &cluster.spec),
            stateful_set: stateful_set(&names, owner, &cluster.spec, &config_yaml),
            config,
        })
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
        assert_eq!(cluster.spec.image, "cavi:dev");
        assert_eq!(cluster.spec.storage.type_, StorageType::Memory);
        assert_eq!(cluster.spec.shards[0].range_start, "");
        let c = Children::build(&cluster, "default").unwrap();
        assert_eq!(
            c.config.shards[0].addr,
            "d-0.d-headless.default.svc.cluster.local:3100"
        );
        // Without a uid (a file, not an API object) there is no owner.
        assert_eq!(c.config_map.metadata.owner_references, None);
    }

    #[test]
    fn config_hash_changes_when_and_only_when_the_layout_changes() {
        let base = demo();
        let h0 = hash_of(&base);
        assert_eq!(h0.len(), 16);
        assert_eq!(h0, hash_of(&demo()), "deterministic");

        // Not the layout: image, resources, placement, labels of the CR.
        let mut other = demo();
        other.spec.image = "registry.example/cavi:9.9.9".into();
        other.spec.resources = None;
        other.spec.placement = None;
        other.metadata.generation = Some(7);
        assert_eq!(hash_of(&other), h0);

        // The layout: a range, a new shard, the port (it is in every addr).
        let mut range = demo();
        range.spec.shards[1].range_end = Some("y".into());
        assert_ne!(hash_of(&range), h0);
        let mut more = demo();
        more.spec.shards[2].range_end = Some("{z".into());
        more.spec.shards.push(crate::crd::ShardRange {
            range_start: "|".into(),
            range_end: None,
        });
        assert_ne!(hash_of(&more), h0);
        let mut port = demo();
        port.spec.port = 4001;
        assert_ne!(hash_of(&port), h0);
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(stable_hash(b""), "cbf29ce484222325");
        assert_eq!(stable_hash(b"a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn render_stream_has_four_documents_in_apply_order() {
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
                "StatefulSet/demo"
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
        Children::build(cluster, "shop").unwrap()
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

    pub(super) fn hash_of(cluster: &CaviCluster) -> String {
        children(cluster)
            .stateful_set
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()
            .remove(CONFIG_HASH_ANNOTATION)
            .unwrap()
    }
}
