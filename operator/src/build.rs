//! Pure builders: a `CaviCluster` in, the child objects that run it out.
//! Nothing here talks to the API server, so the reconciler, `render` and the
//! tests all share one definition of "what the cluster should look like".

use std::collections::BTreeMap;

use cavi_node::config::{ClusterConfig, ShardConfig};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::{CaviCluster, CaviClusterSpec, PersistentStorage, StorageSpec, StorageType};

/// Key of the node config file in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the ConfigMap is mounted in each pod.
pub const CONFIG_DIR: &str = "/etc/cavi";
/// Pod-template annotation holding a hash of the config file, so a new
/// layout rolls the pods and nothing else does.
pub const CONFIG_HASH_ANNOTATION: &str = "cavi.dev/config-hash";
/// Name of the node container.
pub const CONTAINER_NAME: &str = "kvstore";
/// The node binary the container runs (set as `command`, so the pods do not
/// depend on the image's entrypoint).
pub const NODE_COMMAND: &str = "kvstore-api";
/// Name of the volume claim template of persistent storage, and of the
/// volume it mounts; the StatefulSet names each claim `data-<pod>`.
pub const DATA_VOLUME: &str = "data";
/// Where a persistent shard's volume is mounted and what `--data-dir` says.
pub const DATA_DIR: &str = "/var/lib/cavi";
/// The standard annotations that tell a Prometheus configured for them to
/// scrape a pod, on which port and at which path.
pub const PROMETHEUS_SCRAPE_ANNOTATION: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT_ANNOTATION: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH_ANNOTATION: &str = "prometheus.io/path";
/// Where a node serves its Prometheus metrics (OpenMetrics text).
pub const METRICS_PATH: &str = "/metrics";
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

/// The persistent storage a spec asks for, if it asks for any (a
/// `Persistent` type without its member is refused by the CRD and by
/// [`crate::validate`], and builds like `Memory`).
pub fn persistent_storage(storage: &StorageSpec) -> Option<&PersistentStorage> {
    match storage.type_ {
        StorageType::Memory => None,
        StorageType::Persistent => storage.persistent.as_ref(),
    }
}

/// The node's command line: its shard from the hostname, the mounted
/// config, and the data directory when storage is persistent.
pub fn node_args(spec: &CaviClusterSpec) -> Vec<String> {
    let mut args = vec![
        "from-hostname".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
    ];
    if persistent_storage(&spec.storage).is_some() {
        args.extend(["--data-dir".to_owned(), DATA_DIR.to_owned()]);
    }
    args
}

/// Pod-template annotations: the config hash (a new layout rolls the pods)
/// and the Prometheus scrape hints. Only the config feeds the hash.
pub fn pod_annotations(spec: &CaviClusterSpec, config_yaml: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            CONFIG_HASH_ANNOTATION.to_owned(),
            stable_hash(config_yaml.as_bytes()),
        ),
        (PROMETHEUS_SCRAPE_ANNOTATION.to_owned(), "true".to_owned()),
        (PROMETHEUS_PORT_ANNOTATION.to_owned(), spec.port.to_string()),
        (
            PROMETHEUS_PATH_ANNOTATION.to_owned(),
            METRICS_PATH.to_owned(),
        ),
    ])
}

/// The claim template of persistent storage: one ReadWriteOnce volume of
/// `size` per pod. Its labels select the claims of one cluster
/// (`kubectl get pvc -l app.kubernetes.io/instance=<name>`); they derive
/// from the name alone, because a claim template never changes.
pub fn data_claim_template(names: &Names, storage: &PersistentStorage) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(labels(names)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// StatefulSet `<name>`: one pod per shard, each taking its shard id from
/// its ordinal (`from-hostname`), with the config mounted at `/etc/cavi`.
/// Persistent storage adds a claim template mounted at [`DATA_DIR`], the
/// `--data-dir` flag, an `fsGroup` so the non-root node can write the
/// volume, and the claims' retention policy. The root filesystem stays
/// read-only either way.
pub fn stateful_set(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
    config_yaml: &str,
) -> StatefulSet {
    let persistent = persistent_storage(&spec.storage);
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if persistent.is_some() {
        // The volume itself comes from the claim template of the same name.
        mounts.push(VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        });
    }
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: Some(vec![NODE_COMMAND.into()]),
        args: Some(node_args(spec)),
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
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.config_map(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let placement = spec.placement.clone().unwrap_or_default();
    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            // The kubelet makes the volume group-writable for this gid;
            // only when the root's group differs, so a large volume is not
            // walked on every start.
            fs_group: persistent.map(|_| RUN_AS_USER),
            fs_group_change_policy: persistent.map(|_| "OnRootMismatch".into()),
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
                    annotations: Some(pod_annotations(spec, config_yaml)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            volume_claim_templates: persistent.map(|p| vec![data_claim_template(names, p)]),
            persistent_volume_claim_retention_policy: persistent.map(|p| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(p.retention_policy.when_deleted.as_str().into()),
                    when_scaled: Some(p.retention_policy.when_scaled.as_str().into()),
                }
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use cavi_node::config::ClusterConfig;

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

    fn demo() -> CaviCluster {
        serde_yaml::from_str(DEMO).unwrap()
    }

    fn children(cluster: &CaviCluster) -> Children {
        Children::build(cluster, "shop").unwrap()
    }

    fn expected_labels() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "cavi".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "demo".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "cavi-operator".to_owned(),
            ),
        ])
    }

    fn expected_selector() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "cavi".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "demo".to_owned()),
        ])
    }

    fn assert_common_metadata(meta: &ObjectMeta, name: &str) {
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

    fn config_yaml(cm: &ConfigMap) -> &str {
        cm.data.as_ref().unwrap().get(CONFIG_KEY).unwrap()
    }

    #[test]
    fn config_map_holds_the_node_config_with_headless_dns_addresses() {
        let c = children(&demo());
        assert_common_metadata(&c.config_map.metadata, "demo-config");
        let data = c.config_map.data.as_ref().unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), vec!["config.yaml"]);
        let config = ClusterConfig::from_yaml(config_yaml(&c.config_map)).unwrap();
        assert_eq!(config, c.config);
        let addrs: Vec<&str> = config.shards.iter().map(|s| s.addr.as_str()).collect();
        assert_eq!(
            addrs,
            vec![
                "demo-0.demo-headless.shop.svc.cluster.local:4000",
                "demo-1.demo-headless.shop.svc.cluster.local:4000",
                "demo-2.demo-headless.shop.svc.cluster.local:4000",
            ]
        );
        let ids: Vec<u32> = config.shards.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(config.shards[0].range_start, "a");
        assert_eq!(config.shards[0].range_end.as_deref(), Some("m"));
        assert_eq!(config.shards[2].range_start, "{");
        assert_eq!(config.shards[2].range_end, None);
        assert_eq!(config.owner_of("mango").map(|s| s.id), Some(0));
        assert_eq!(config.owner_of("zebra").map(|s| s.id), Some(1));
        assert_eq!(config.owner_of("{x").map(|s| s.id), Some(2));
        // Each shard's DNS name is one a node binds 0.0.0.0 for.
        assert_eq!(
            config.shards[1].default_listen_addr().unwrap().to_string(),
            "0.0.0.0:4000"
        );
    }

    #[test]
    fn headless_service_publishes_unready_pods() {
        let c = children(&demo());
        let svc = &c.headless_service;
        assert_common_metadata(&svc.metadata, "demo-headless");
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.as_ref(), Some(&expected_selector()));
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].port, 4000);
        assert_eq!(ports[0].target_port, Some(IntOrString::Int(4000)));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    }

    #[test]
    fn client_service_is_a_cluster_ip_on_the_same_port() {
        let c = children(&demo());
        let svc = &c.client_service;
        assert_common_metadata(&svc.metadata, "demo");
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.cluster_ip, None, "the API server assigns it");
        assert_eq!(spec.publish_not_ready_addresses, None);
        assert_eq!(spec.selector.as_ref(), Some(&expected_selector()));
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!(ports[0].port, 4000);
        assert_eq!(ports[0].target_port, Some(IntOrString::Int(4000)));
    }

    #[test]
    fn stateful_set_runs_one_pod_per_shard() {
        let c = children(&demo());
        let sts = &c.stateful_set;
        assert_common_metadata(&sts.metadata, "demo");
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-headless"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&expected_selector())
        );
        assert_eq!(spec.selector.match_expressions, None);
        let template_meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(template_meta.labels.as_ref(), Some(&expected_labels()));
        // The selector must select the pods it creates.
        for (k, v) in &expected_selector() {
            assert_eq!(template_meta.labels.as_ref().unwrap().get(k), Some(v));
        }
        let annotations = template_meta.annotations.as_ref().unwrap();
        assert_eq!(
            annotations.get(CONFIG_HASH_ANNOTATION),
            Some(&stable_hash(config_yaml(&c.config_map).as_bytes()))
        );
    }

    #[test]
    fn container_takes_its_shard_from_the_hostname_and_mounts_the_config() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        let container = &pod.containers[0];
        assert_eq!(container.name, "kvstore");
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/cavi:1.2.3")
        );
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "from-hostname".to_owned(),
                    "/etc/cavi/config.yaml".to_owned()
                ][..]
            )
        );
        assert_eq!(
            container.command.as_deref(),
            Some(&["kvstore-api".to_owned()][..]),
            "the node binary is named, not left to the image's entrypoint"
        );
        let ports = container.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].container_port, 4000);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        let mounts = container.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_path, "/etc/cavi");
        assert_eq!(mounts[0].read_only, Some(true));
        let volumes = pod.volumes.as_ref().unwrap();
        let volume = volumes.iter().find(|v| v.name == mounts[0].name).unwrap();
        assert_eq!(volume.config_map.as_ref().unwrap().name, "demo-config");
        let requests = container
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["cpu"].0, "100m");
        assert_eq!(requests["memory"].0, "64Mi");
    }

    #[test]
    fn probes_hit_healthz_and_readyz_on_the_port() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let live = container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(live.port, IntOrString::Int(4000));
        let ready = container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::Int(4000));
    }

    #[test]
    fn security_context_is_restricted() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.privileged, None);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
    }

    #[test]
    fn placement_is_copied_and_absent_placement_sets_nothing() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "ssd");
        let tolerations = pod.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
        assert_eq!(pod.affinity, None);

        let mut bare = demo();
        bare.spec.placement = None;
        let pod = children(&bare)
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        // Empty lists and maps are left out, so the API server's copy
        // (which drops them) still matches.
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.affinity, None);
    }

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

    fn hash_of(cluster: &CaviCluster) -> String {
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
    fn pods_carry_prometheus_annotations_that_do_not_feed_the_hash() {
        let c = children(&demo());
        let template = c.stateful_set.spec.unwrap().template;
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "4000");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        assert_eq!(annotations.len(), 4, "{annotations:?}");
        // The annotated port is the container's named HTTP port.
        let ports = template.spec.unwrap().containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(
            ports[0].container_port.to_string(),
            annotations["prometheus.io/port"]
        );
        // The hash is the config's alone, whatever else is annotated.
        assert_eq!(
            annotations[CONFIG_HASH_ANNOTATION],
            stable_hash(config_yaml(&c.config_map).as_bytes())
        );
    }

    const PERSISTENT: &str = r#"
apiVersion: cavi.dev/v1alpha1
kind: CaviCluster
metadata: {name: demo, namespace: shop, uid: 6f1c2d1e-0000-4000-8000-000000000001}
spec:
  shards:
    - { rangeStart: "a", rangeEnd: "m" }
    - { rangeStart: "n", rangeEnd: "z" }
  storage:
    type: Persistent
    persistent:
      size: 2Gi
      storageClassName: fast-ssd
"#;

    fn persistent() -> CaviCluster {
        serde_yaml::from_str(PERSISTENT).unwrap()
    }

    #[test]
    fn memory_storage_has_no_claim_template_and_no_data_dir() {
        let c = children(&demo());
        let spec = c.stateful_set.spec.unwrap();
        assert_eq!(spec.volume_claim_templates, None);
        assert_eq!(spec.persistent_volume_claim_retention_policy, None);
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "from-hostname".to_owned(),
                    "/etc/cavi/config.yaml".to_owned()
                ][..]
            )
        );
        let mounts = container.volume_mounts.as_ref().unwrap();
        assert_eq!(
            mounts.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            vec!["config"]
        );
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(
            volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec!["config"]
        );
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.fs_group, None);
        assert_eq!(psc.fs_group_change_policy, None);
        assert_eq!(
            container
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
    }

    #[test]
    fn persistent_storage_adds_a_claim_template() {
        let spec = children(&persistent()).stateful_set.spec.unwrap();
        let templates = spec.volume_claim_templates.as_ref().unwrap();
        assert_eq!(templates.len(), 1);
        let claim = &templates[0];
        assert_eq!(claim.metadata.name.as_deref(), Some("data"));
        assert_eq!(claim.metadata.labels.as_ref(), Some(&expected_labels()));
        assert_eq!(
            claim.metadata.owner_references, None,
            "the StatefulSet owns its claims"
        );
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(
            claim_spec.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_owned()][..])
        );
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast-ssd"));
        let requests = claim_spec
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests["storage"].0, "2Gi");
        assert_eq!(claim_spec.volume_mode, None);
        assert!(claim.status.is_none());

        // Without a class the cluster's default class provisions it.
        let mut default_class = persistent();
        default_class
            .spec
            .storage
            .persistent
            .as_mut()
            .unwrap()
            .storage_class_name = None;
        let spec = children(&default_class).stateful_set.spec.unwrap();
        let claim_spec = spec.volume_claim_templates.unwrap()[0]
            .spec
            .clone()
            .unwrap();
        assert_eq!(claim_spec.storage_class_name, None);
    }

    #[test]
    fn persistent_storage_mounts_the_volume_at_the_data_dir() {
        let pod = children(&persistent())
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "from-hostname".to_owned(),
                    "/etc/cavi/config.yaml".to_owned(),
                    "--data-dir".to_owned(),
                    "/var/lib/cavi".to_owned(),
                ][..]
            )
        );
        assert_eq!(
            container.command.as_deref(),
            Some(&["kvstore-api".to_owned()][..])
        );
        let mounts = container.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 2);
        let data = mounts.iter().find(|m| m.name == "data").unwrap();
        assert_eq!(data.mount_path, "/var/lib/cavi");
        assert_eq!(data.read_only, None, "the node writes its data there");
        let config = mounts.iter().find(|m| m.name == "config").unwrap();
        assert_eq!(config.read_only, Some(true));
        // The claim template supplies the data volume; the pod lists only
        // the config.
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(
            volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec!["config"]
        );
        // The non-root node can write the volume; the root fs stays read-only.
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.fs_group, Some(65532));
        assert_eq!(
            psc.fs_group_change_policy.as_deref(),
            Some("OnRootMismatch")
        );
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(psc.run_as_non_root, Some(true));
        let sc = container.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn retention_policy_defaults_to_retain_and_follows_the_spec() {
        let policy = |cluster: &CaviCluster| {
            let p = children(cluster)
                .stateful_set
                .spec
                .unwrap()
                .persistent_volume_claim_retention_policy
                .unwrap();
            (p.when_deleted.unwrap(), p.when_scaled.unwrap())
        };
        assert_eq!(policy(&persistent()), ("Retain".into(), "Retain".into()));

        let explicit: CaviCluster = serde_yaml::from_str(&PERSISTENT.replace(
            "storageClassName: fast-ssd",
            "storageClassName: fast-ssd\n      retentionPolicy: {whenDeleted: Delete, whenScaled: Retain}",
        ))
        .unwrap();
        assert_eq!(policy(&explicit), ("Delete".into(), "Retain".into()));
        let scaled: CaviCluster = serde_yaml::from_str(&PERSISTENT.replace(
            "storageClassName: fast-ssd",
            "storageClassName: fast-ssd\n      retentionPolicy: {whenScaled: Delete}",
        ))
        .unwrap();
        assert_eq!(policy(&scaled), ("Retain".into(), "Delete".into()));
    }

    #[test]
    fn storage_does_not_feed_the_config_hash() {
        // The hash rolls pods for a new layout; storage has its own rules.
        let mut memory = persistent();
        memory.spec.storage = crate::crd::StorageSpec::default();
        assert_eq!(hash_of(&memory), hash_of(&persistent()));
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
