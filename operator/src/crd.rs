//! The `CaviCluster` custom resource (`cavi.dev/v1alpha1`), declared once in
//! Rust. The CRD YAML in `deploy/crds/` is generated from these types by
//! `cavi-operator crd`; a test fails when the two drift.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// Name of the CRD object, as `kubectl get crd` shows it.
pub const CRD_NAME: &str = "caviclusters.cavi.dev";
/// Where the generated CRD is committed, relative to the repository root.
pub const CRD_PATH: &str = "deploy/crds/cavicluster.yaml";
/// The most shards one cluster may declare.
pub const MAX_SHARDS: usize = 64;
/// The image a node runs when neither the spec nor the operator's
/// `--default-node-image` says: the tag of a local build (`docker build -t
/// cavi:dev .`, `kind load docker-image cavi:dev`). The chart passes the
/// operator its own image, which nodes then run.
pub const DEFAULT_IMAGE: &str = "cavi:dev";
/// Size of each shard's volume when Persistent storage does not say.
pub const DEFAULT_VOLUME_SIZE: &str = "1Gi";
/// Longest name a CaviCluster may have: its pods' `controller-revision-hash`
/// label is `<name>-<10 characters>`, and a label value has at most 63.
pub const MAX_NAME_LENGTH: usize = 52;
/// The port a node listens on when the spec does not say.
pub const DEFAULT_PORT: i32 = 3100;

/// The desired state of a CAVI cluster: its shard layout and how its pods run.
// Each printer column repeats keys such as `type_ = "integer"`, which this
// lint mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cavi.dev",
    version = "v1alpha1",
    kind = "CaviCluster",
    namespaced,
    shortname = "cavi",
    status = "CaviClusterStatus",
    derive = "PartialEq",
    doc = "A sharded CAVI key-value store: one pod per key range, run by the CAVI operator.",
    printcolumn(
        name = "Shards",
        type_ = "integer",
        description = "Number of shards in the layout the pods serve",
        json_path = ".status.shardCount"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Number of shards whose pod is ready",
        json_path = ".status.readyShards"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Summary of the cluster's state",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Rebalance",
        type_ = "string",
        description = "Progress of a layout change being carried out",
        json_path = ".status.rebalance"
    ),
    printcolumn(
        name = "Storage",
        type_ = "string",
        description = "Where the shards keep their data: Memory or Persistent",
        json_path = ".spec.storage.type"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new("size(self.metadata.name) <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be at most 52 characters of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (it names the pods, their labels and the Services)"))]
#[x_kube(validation = Rule::new("size(self.shards) >= 1").message("at least one shard is required"))]
#[x_kube(validation = Rule::new("size(self.shards) <= 64").message("at most 64 shards are supported"))]
#[serde(rename_all = "camelCase")]
pub struct CaviClusterSpec {
    /// The key ranges, one per shard, listed in key order. Ranges must not
    /// overlap; gaps are allowed. Any edit that keeps those rules is carried
    /// out online: split a range, merge neighbours, move a boundary, add or
    /// remove shards. The operator moves the keys between the running pods,
    /// restarts none, and keeps which pod serves which range in
    /// `status.layout` (a pod's ordinal is its shard id).
    #[schemars(length(min = 1, max = 64))]
    pub shards: Vec<ShardRange>,

    /// Container image that runs `kvstore-api`. Unset: the image the
    /// operator was installed with (its `--default-node-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), transform = not_nullable)]
    pub image: Option<String>,

    /// When the kubelet pulls the image. Unset follows the Kubernetes
    /// default for the image's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub image_pull_policy: Option<PullPolicy>,

    /// Secrets for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// TCP port every node serves HTTP on (API, probes and metrics).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// CPU and memory requests and limits of each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where shards keep their data. Default: Persistent, 1Gi per shard.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Where the pods may be scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// How pod-template changes (image, resources, placement, env...) roll
    /// out: one pod at a time, each ready before the next.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Voluntary disruptions (node drains, evictions) the cluster accepts:
    /// a PodDisruptionBudget.
    #[serde(default)]
    pub disruption: DisruptionSpec,

    /// An optional NetworkPolicy letting in only the cluster's own pods and
    /// pods labelled `cavi.dev/client: "true"`.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Extra environment variables of the node container (`CAVI_*` tune
    /// the node: see its `--help`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Extra annotations of every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Extra labels of every pod (the operator's own labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub priority_class_name: Option<String>,

    /// ServiceAccount the pods run as (nodes call no Kubernetes API; the
    /// token is not mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub service_account_name: Option<String>,

    /// How long a stopping pod gets. A node keeps serving for 5 s after
    /// SIGTERM (while endpoints forget it), then drains for up to 10 s: the
    /// default of 30 leaves room for both.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 20, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

/// When the kubelet pulls the image.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Rollouts of pod-template changes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Memory storage only: restart a pod even when its range cannot be
    /// handed to another shard first (a one-shard cluster), losing that
    /// shard's keys. Without it such a rollout waits, with
    /// `Progressing=False` and reason `RolloutHeld`.
    #[serde(default)]
    pub allow_data_loss: bool,

    /// A rollout step (one pod) that does not finish within this many
    /// seconds gets `Progressing=False` with reason
    /// `ProgressDeadlineExceeded` and a Warning event.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 30))]
    pub progress_deadline_seconds: i64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            allow_data_loss: false,
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// The PodDisruptionBudget.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// Most pods a voluntary disruption may take at once.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 0))]
    pub max_unavailable: i32,
}

impl Default for DisruptionSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

/// The optional NetworkPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Let in only the cluster's own pods and pods (of any namespace)
    /// labelled `cavi.dev/client: "true"`, on the node port.
    #[serde(default)]
    pub enabled: bool,
}

/// The label a pod needs to reach a cluster behind its NetworkPolicy.
pub const CLIENT_LABEL: &str = "cavi.dev/client";

/// One shard's slice of the key space. A shard owns key `k` when
/// `rangeStart <= k` and (`k <= rangeEnd` or `k` starts with `rangeEnd`),
/// comparing bytes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!has(self.rangeEnd) || (has(self.rangeStart) ? self.rangeStart : '') <= self.rangeEnd").message("rangeStart must not sort after rangeEnd"))]
#[serde(rename_all = "camelCase")]
pub struct ShardRange {
    /// Lowest key owned, inclusive. Empty means the lowest key.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub range_start: String,

    /// Highest key owned, as an inclusive prefix bound (`m` owns `mango`).
    /// Omitted means the highest key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), transform = not_nullable)]
    pub range_end: Option<String>,
}

/// Storage of the shards' data, a union keyed by `type`: `Persistent` (the
/// default) may have the `persistent` member, `Memory` has none. Fixed once
/// the cluster runs: a change of `type`, `persistent.size` or
/// `persistent.storageClassName` is refused (at admission where the old
/// value was written, otherwise by the operator: a StatefulSet's volume
/// claim templates cannot change); `persistent.retentionPolicy` may change
/// at any time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.persistent) || !has(self.type) || self.type == 'Persistent'").message("storage.persistent is only allowed when storage.type is Persistent"))]
#[x_kube(validation = Rule::new("!has(oldSelf.type) || !has(self.type) || self.type == oldSelf.type").message("storage.type cannot change on a running cluster: create a new CaviCluster with the storage you want"))]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Kind of storage. `Persistent`: each shard keeps its data on its own
    /// PersistentVolumeClaim and every acknowledged write is synced to disk.
    /// `Memory`: a cache; data lives in the node process, and a pod that
    /// restarts outside a rollout (a crash, a node failure) loses its
    /// shard's keys.
    #[serde(default, rename = "type")]
    pub type_: StorageType,

    /// The volume of each shard (default: 1Gi of the default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub persistent: Option<PersistentStorage>,
}

/// The kinds of storage a shard can use.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum StorageType {
    /// Data lives in the node process: a cache.
    Memory,
    /// Data lives on a PersistentVolumeClaim per shard.
    #[default]
    Persistent,
}

/// One PersistentVolumeClaim per shard (`data-<name>-<i>`), created by the
/// StatefulSet from a volume claim template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(oldSelf.size) || !has(self.size) || self.size == oldSelf.size").message("storage.persistent.size cannot change on a running cluster: expand each data-<pod> claim instead, if its storage class allows it"))]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("storage.persistent.storageClassName cannot change on a running cluster"))]
#[serde(rename_all = "camelCase")]
pub struct PersistentStorage {
    /// Requested capacity of each shard's volume, as a Kubernetes quantity
    /// (`1Gi`, `500Mi`). Fixed once the cluster runs; grow a volume by
    /// expanding its claim, if its storage class allows that.
    #[serde(default = "default_size")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("storage.persistent.size must be a positive Kubernetes quantity such as 1Gi or 500Mi"))]
    pub size: Quantity,

    /// StorageClass of the volumes. Unset uses the cluster's default
    /// class. Fixed once the cluster runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), transform = not_nullable)]
    pub storage_class_name: Option<String>,

    /// What happens to the claims when the cluster is deleted or loses
    /// shards. Both default to `Retain`, which keeps the data.
    #[serde(default)]
    pub retention_policy: RetentionPolicy,
}

/// The StatefulSet's `persistentVolumeClaimRetentionPolicy`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    /// What happens to the claims when the CaviCluster (and so its
    /// StatefulSet) is deleted.
    #[serde(default)]
    pub when_deleted: RetentionAction,

    /// What happens to the claims of ordinals the StatefulSet scales away
    /// once a layout change has moved every key off them: with `Retain`
    /// the claim (empty of owned keys) stays for a later scale-up, with
    /// `Delete` it goes.
    #[serde(default)]
    pub when_scaled: RetentionAction,
}

/// Keep or delete a claim.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RetentionAction {
    /// The claim, and the data on it, stays; delete it by hand.
    #[default]
    Retain,
    /// The claim is deleted, and with it (depending on the volume's
    /// reclaim policy) the data.
    Delete,
}

impl RetentionAction {
    /// The value Kubernetes uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionAction::Retain => "Retain",
            RetentionAction::Delete => "Delete",
        }
    }
}

impl StorageType {
    /// The value the CRD uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageType::Memory => "Memory",
            StorageType::Persistent => "Persistent",
        }
    }
}

/// Pod placement constraints, copied into the StatefulSet's pod template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Replaces the default spread: at most one pod more on any host, then
    /// on any zone, than on another (preferred, not required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// Node labels a pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node and pod affinity and anti-affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// What the operator last observed of the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaviClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of shards in the layout the pods serve: the spec's once it is
    /// accepted, the previous one while a change is refused.
    #[serde(default)]
    pub shard_count: i32,

    /// Number of shards whose pod is ready.
    #[serde(default)]
    pub ready_shards: i32,

    /// One-word summary: `Running` (every shard serves the spec),
    /// `Rebalancing` (keys are moving to a new layout), `Progressing` (pods
    /// are being created or rolled), `Degraded` (a shard is down outside a
    /// rollout, or a change is stuck) or `Invalid` (the spec was refused;
    /// the running cluster is untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// The epoch of the shard map the nodes serve (grows with every
    /// committed range move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,

    /// The layout the cluster serves: each range with the ordinal (pod)
    /// that owns it. The baseline the next edit of `spec.shards` is planned
    /// from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layout: Vec<AssignedRange>,

    /// While a layout change is carried out: where each range of the spec
    /// goes (kept so the assignment does not change half-way).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_layout: Vec<AssignedRange>,

    /// The range moves under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<Migration>,

    /// A line on the layout change under way, for `kubectl get cavi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<String>,

    /// The pod-template rollout under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,

    /// Per-shard state, in shard order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,

    /// `Ready` (every shard serving now; its observedGeneration is the
    /// newest generation that is fully live, so `kubectl wait
    /// --for=condition=Ready` after an edit returns once the edit is live),
    /// `Progressing` (a rollout is under way, or stuck), `Rebalancing`
    /// (keys are moving) and `Degraded` (a fault: a shard down outside a
    /// rollout, an apply the API server refused, a stalled move).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A range and the ordinal that owns it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedRange {
    /// The pod's ordinal, the shard id.
    pub ordinal: i32,
    #[serde(default)]
    pub range_start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub range_end: Option<String>,
}

/// One range move.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// The range, as `start..=end*`.
    pub range: String,
    /// Ordinal giving it away.
    pub from: i32,
    /// Ordinal taking it.
    pub to: i32,
    /// copying, fenced, committed, cleaning_up.
    pub phase: String,
    pub keys_copied: u64,
    pub bytes_copied: u64,
    /// When the move started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub start_time: Option<String>,
}

/// The pod-template rollout under way.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Pods created from the current template.
    pub updated: i32,
    /// Of those, the ready ones.
    #[serde(default)]
    pub ready: i32,
    /// Pods in all.
    pub pods: i32,
    /// The ordinal being rolled now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub ordinal: Option<i32>,
    /// When the rollout last made progress (a pod updated, or ready), in
    /// RFC 3339: the progress deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub step_started: Option<String>,
}

/// The state of one shard.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard id, the pod's ordinal.
    pub id: i32,
    /// The shard's key range, as `start..=end*`.
    pub range: String,
    /// Name of the pod serving the shard.
    pub pod: String,
    /// Whether that pod is ready.
    pub ready: bool,
}

/// An optional field is absent, never `null`: keeps the schema simple
/// for CEL rules that test it with `has()`.
fn not_nullable(schema: &mut schemars::Schema) {
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("nullable");
        let single = match obj.get("type") {
            Some(serde_json::Value::Array(types)) => {
                let rest: Vec<_> = types.iter().filter(|t| *t != "null").cloned().collect();
                (rest.len() == 1).then(|| rest[0].clone())
            }
            _ => None,
        };
        if let Some(single) = single {
            obj.insert("type".into(), single);
        }
        if let Some(serde_json::Value::Array(values)) = obj.get_mut("enum") {
            values.retain(|v| !v.is_null());
        }
    }
}

fn default_size() -> Quantity {
    Quantity(DEFAULT_VOLUME_SIZE.to_owned())
}

fn default_grace() -> i64 {
    30
}

fn default_progress_deadline() -> i64 {
    600
}

fn default_max_unavailable() -> i32 {
    1
}

fn default_port() -> i32 {
    DEFAULT_PORT
}

/// The CRD as YAML, exactly what `cavi-operator crd` prints and what is
/// committed at [`CRD_PATH`].
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&CaviCluster::crd())
}
