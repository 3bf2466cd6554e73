//! Pure builders: a `CaviCluster` in, the child objects that run it out.
//! Nothing here talks to the API server, so the reconciler, `render` and the
//! tests all share one definition of "what the cluster should look like".

use std::collections::BTreeMap;

use cavi_node::config::{ClusterConfig, ShardConfig};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::{CaviCluster, CaviClusterSpec, StorageType};

/// Key of the node config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the ConfigMap is mounted in each pod.
pub const CONFIG_DIR: &str = "/etc/cavi";
/// Pod-template annotation holding a hash of the config file, so a new
/// layout rolls the pods and nothing else does.
pub const CONFIG_HASH_ANNOTATION: &str = "cavi.dev/config-hash";
/// Name of the node container.
pub const CONTAINER_NAME: &str = "kvstore";
/// Name of the node's HTTP port, in the pod and in both Services.
pub const PORT_NAME: &str = "http";
/// The uid and gid the node runs as (the conventional non-root "nonroot").
pub const RUN_AS_USER: i64 = 65532;

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
        let config_yaml = config.to_yaml();
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

/// ConfigMap `<name>-config` holding the node config file.
pub fn config_map(names: &Names, owner: Option<OwnerReference>, config_yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: metadata(names, names.config_map(), owner),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_owned(),
            config_yaml.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

fn service_ports(spec: &CaviClusterSpec) -> Vec<ServicePort> {
    vec![ServicePort {
        name: Some(PORT_NAME.into()),
        port: spec.port,
        target_port: Some(IntOrString::Int(spec.port)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }]
}

/// Headless Service `<name>-headless`: gives each pod a stable DNS name,
/// published before the pod is ready so peers can find each other.
pub fn headless_service(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
) -> Service {
    Service {
        metadata: metadata(names, names.headless_service(), owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(names)),
            ports: Some(service_ports(spec)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Service `<name>`: the client entry point; any pod forwards to the owner.
pub fn client_service(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
) -> Service {
    Service {
        metadata: metadata(names, names.client_service(), owner),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(names)),
            ports: Some(service_ports(spec)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn probe(path: &str, port: i32, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

/// StatefulSet `<name>`: one pod per shard, each taking its shard id from
/// its ordinal (`from-hostname`), with the config mounted at `/etc/cavi`.
pub fn stateful_set(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
    config_yaml: &str,
) -> StatefulSet {
    let config_path = format!("{CONFIG_DIR}/{CONFIG_KEY}");
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(vec!["from-hostname".into(), config_path]),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.into()),
            container_port: spec.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", spec.port, 10)),
        readiness_probe: Some(probe("/readyz", spec.port, 5)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let volumes = match spec.storage.type_ {
        // Memory storage needs no volume of its own.
        StorageType::Memory => vec![Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }],
    };
    let placement = spec.placement.clone().unwrap_or_default();
    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
        tolerations: (!placement.tolerations.is_empty()).then_some(placement.tolerations),
        affinity: placement.affinity,
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: metadata(names, names.stateful_set(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(spec.shards.len()).unwrap_or(i32::MAX)),
            service_name: Some(names.headless_service()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(names)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(names)),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        stable_hash(config_yaml.as_bytes()),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}
