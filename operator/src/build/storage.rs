//! Persistent storage: what the spec asks for and the StatefulSet's volume
//! claim template. The StatefulSet mounts it (see `stateful_set`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Names, labels};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{
    DEFAULT_VOLUME_SIZE, PersistentStorage, RetentionPolicy, StorageSpec, StorageType,
};

/// Name of the volume claim template of persistent storage, and of the
/// volume it mounts; the StatefulSet names each claim `data-<pod>`.
pub const DATA_VOLUME: &str = "data";
/// Where a persistent shard's volume is mounted and what `--data-dir` says.
pub const DATA_DIR: &str = "/var/lib/cavi";

/// The persistent storage a spec asks for, if it asks for any, with the
/// defaults filled in (a `Persistent` type without its member is 1Gi of the
/// default class, retained).
pub fn persistent_storage(storage: &StorageSpec) -> Option<PersistentStorage> {
    match storage.type_ {
        StorageType::Memory => None,
        StorageType::Persistent => {
            Some(
                storage
                    .persistent
                    .clone()
                    .unwrap_or_else(|| PersistentStorage {
                        size: Quantity(DEFAULT_VOLUME_SIZE.to_owned()),
                        storage_class_name: None,
                        retention_policy: RetentionPolicy::default(),
                    }),
            )
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::build::fixtures::*;
    use crate::crd::CaviCluster;

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
        let pod = pod_spec(&persistent());
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
    fn persistent_storage_is_the_default_with_one_gibibyte() {
        let mut bare = persistent();
        bare.spec.storage = crate::crd::StorageSpec::default();
        let sts = children(&bare).stateful_set.spec.unwrap();
        let claim = &sts.volume_claim_templates.unwrap()[0];
        let requests = claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["storage"].0, "1Gi");
        assert_eq!(claim.spec.as_ref().unwrap().storage_class_name, None);
    }
}
