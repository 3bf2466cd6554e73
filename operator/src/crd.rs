//! The `CaviCluster` custom resource (`cavi.dev/v1alpha1`), declared once in
//! Rust. The CRD YAML in `deploy/crds/` is generated from these types by
//! `cavi-operator crd`; a test fails when the two drift.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
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
/// The image a node runs when the spec does not say: the tag the
/// Dockerfile's build instructions, the chart's `image.tag` and the examples
/// use, so a cluster created without `image` runs the image a local build
/// (`docker build -t cavi:dev .`, `kind load docker-image cavi:dev`) made.
/// Clusters on a registry image set `spec.image`.
pub const DEFAULT_IMAGE: &str = "cavi:dev";
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
#[x_kube(validation = Rule::new("size(self.shards) >= 1").message("at least one shard is required"))]
#[x_kube(validation = Rule::new("size(self.shards) <= 64").message("at most 64 shards are supported"))]
#[serde(rename_all = "camelCase")]
pub struct CaviClusterSpec {
    /// The key ranges, one per shard, listed in key order. Shard `i` (pod
    /// `<name>-i`) owns the `i`-th range. Ranges must not overlap; gaps are
    /// allowed. Once running, a shard's range may only grow into key space no
    /// shard owned, and shards may only be appended: a change that would move
    /// existing keys to another shard is refused.
    #[schemars(length(min = 1, max = 64))]
    pub shards: Vec<ShardRange>,

    /// Container image that runs `kvstore-api`.
    #[serde(default = "default_image")]
    pub image: String,

    /// When the kubelet pulls the image: `Always`, `IfNotPresent` or `Never`.
    /// Unset follows the Kubernetes default for the image's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    /// TCP port every node serves HTTP on (API, probes and metrics).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// CPU and memory requests and limits of each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where shards keep their data.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Where the pods may be scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

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

/// Storage of the shards' data, a union keyed by `type`: `Memory` (the
/// default) has no member, `Persistent` requires the `persistent` member.
/// Fixed once the cluster runs: the operator refuses a change of `type`,
/// `persistent.size` or `persistent.storageClassName` (a StatefulSet's
/// volume claim templates cannot change); `persistent.retentionPolicy` may
/// change at any time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.type) || self.type != 'Persistent' || has(self.persistent)").message("storage.persistent (with a size) is required when storage.type is Persistent"))]
#[x_kube(validation = Rule::new("!has(self.persistent) || (has(self.type) && self.type == 'Persistent')").message("storage.persistent is only allowed when storage.type is Persistent"))]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Kind of storage. `Memory`: data lives in the node process and is
    /// lost when a pod restarts. `Persistent`: each shard keeps its data on
    /// its own PersistentVolumeClaim and every acknowledged write is synced
    /// to disk.
    #[serde(default, rename = "type")]
    pub type_: StorageType,

    /// The volume of each shard; required when `type` is `Persistent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_nullable)]
    pub persistent: Option<PersistentStorage>,
}

/// The kinds of storage a shard can use.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum StorageType {
    /// Data lives in the node process and is lost when a pod restarts.
    #[default]
    Memory,
    /// Data lives on a PersistentVolumeClaim per shard.
    Persistent,
}

/// One PersistentVolumeClaim per shard (`data-<name>-<i>`), created by the
/// StatefulSet from a volume claim template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistentStorage {
    /// Requested capacity of each shard's volume, as a Kubernetes quantity
    /// (`1Gi`, `500Mi`). Fixed once the cluster runs; grow a volume by
    /// expanding its claim, if its storage class allows that.
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

    /// What happens to the claims of shards removed from the layout. The
    /// operator refuses removing a shard until resharding exists, so today
    /// it matters only when someone scales the StatefulSet down by hand:
    /// the operator scales it back, and with `Delete` the shard comes back
    /// empty.
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

    /// One-word summary: `Progressing` (a rollout is under way), `Running`
    /// (every shard ready), `Degraded` (a shard is down outside a rollout)
    /// or `Invalid` (the spec was refused; the running cluster is untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// Per-shard state, in shard order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,

    /// `Ready` (every shard serves the declared layout), `Progressing` (a
    /// rollout is under way) and `Degraded` (a shard is down outside a
    /// rollout), with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
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
    }
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}

fn default_port() -> i32 {
    DEFAULT_PORT
}

/// The CRD as YAML, exactly what `cavi-operator crd` prints and what is
/// committed at [`CRD_PATH`].
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&CaviCluster::crd())
}
