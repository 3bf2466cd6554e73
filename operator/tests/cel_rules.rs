//! The CRD's CEL rules, evaluated client-side the way the API server does
//! on create, so a rule that does not say what it means fails here rather
//! than on a cluster.
#![allow(clippy::unwrap_used)]

use cavi_operator::crd::{CaviCluster, ShardRange, StorageSpec};
use kube::core::cel::{validate_cel, validate_cel_schema};
use serde_json::json;

fn cluster(shards: &str) -> CaviCluster {
    serde_yaml::from_str(&format!(
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {{name: demo, namespace: ns}}\nspec:\n  shards: {shards}\n"
    ))
    .unwrap()
}

#[test]
fn a_valid_cluster_passes_every_rule() {
    let c = cluster(r#"[{rangeEnd: "h"}, {rangeStart: "i", rangeEnd: "q"}, {rangeStart: "r"}]"#);
    validate_cel(&c).unwrap();
    // A single-key shard: start == end.
    validate_cel(&cluster(r#"[{rangeStart: "m", rangeEnd: "m"}]"#)).unwrap();
}

#[test]
fn range_start_after_range_end_is_refused() {
    let err = validate_cel(&cluster(r#"[{rangeStart: "n", rangeEnd: "m"}]"#)).unwrap_err();
    assert!(
        err.to_string()
            .contains("rangeStart must not sort after rangeEnd"),
        "{err}"
    );
}

#[test]
fn range_rule_holds_when_either_bound_is_omitted() {
    // As sent by a client, before defaulting fills rangeStart.
    validate_cel_schema::<ShardRange>(&json!({"rangeEnd": "m"}), None).unwrap();
    validate_cel_schema::<ShardRange>(&json!({"rangeStart": "m"}), None).unwrap();
    validate_cel_schema::<ShardRange>(&json!({}), None).unwrap();
    assert!(
        validate_cel_schema::<ShardRange>(&json!({"rangeStart": "z", "rangeEnd": "a"}), None)
            .is_err()
    );
}

#[test]
fn shard_count_is_bounded() {
    let err = validate_cel(&cluster("[]")).unwrap_err();
    assert!(err.to_string().contains("at least one shard"), "{err}");
    let many: Vec<String> = (0..65)
        .map(|i| format!("{{rangeStart: k{i:03}, rangeEnd: k{i:03}}}"))
        .collect();
    let err = validate_cel(&cluster(&format!("[{}]", many.join(", ")))).unwrap_err();
    assert!(err.to_string().contains("at most 64 shards"), "{err}");
}

fn with_storage(storage: &str) -> CaviCluster {
    serde_yaml::from_str(&format!(
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {{name: demo, namespace: ns}}\n\
         spec:\n  shards: [{{rangeEnd: m}}]\n  storage: {storage}\n"
    ))
    .unwrap()
}

#[test]
fn persistent_storage_is_the_default_and_memory_has_no_member() {
    validate_cel(&with_storage("{type: Memory}")).unwrap();
    validate_cel(&with_storage("{type: Persistent}")).unwrap();
    validate_cel(&with_storage("{type: Persistent, persistent: {size: 1Gi}}")).unwrap();
    validate_cel(&with_storage(
        "{type: Persistent, persistent: {size: 1Gi, storageClassName: fast, retentionPolicy: {whenDeleted: Delete}}}",
    ))
    .unwrap();
    let err = validate_cel(&with_storage("{type: Memory, persistent: {size: 1Gi}}")).unwrap_err();
    assert!(
        err.to_string()
            .contains("storage.persistent is only allowed when storage.type is Persistent"),
        "{err}"
    );
    // As sent by a client, before defaulting: `type` omitted is Persistent.
    validate_cel_schema::<StorageSpec>(&json!({}), None).unwrap();
    validate_cel_schema::<StorageSpec>(&json!({"persistent": {"size": "1Gi"}}), None).unwrap();
}

#[test]
fn sizes_must_be_positive_quantities() {
    for bad in ["lots", "-1Gi", "0"] {
        let err = validate_cel_schema::<StorageSpec>(
            &json!({"type": "Persistent", "persistent": {"size": bad}}),
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("positive Kubernetes quantity"),
            "{bad}: {err}"
        );
    }
    validate_cel_schema::<StorageSpec>(
        &json!({"type": "Persistent", "persistent": {"size": "500Mi"}}),
        None,
    )
    .unwrap();
}

#[test]
fn storage_that_cannot_change_is_refused_at_admission() {
    let old =
        json!({"type": "Persistent", "persistent": {"size": "1Gi", "storageClassName": "fast"}});
    let same = old.clone();
    validate_cel_schema::<StorageSpec>(&same, Some(&old)).unwrap();
    let retention = json!({"type": "Persistent", "persistent": {"size": "1Gi", "storageClassName": "fast",
        "retentionPolicy": {"whenDeleted": "Delete"}}});
    validate_cel_schema::<StorageSpec>(&retention, Some(&old)).unwrap();
    for (edit, says) in [
        (json!({"type": "Memory"}), "storage.type cannot change"),
        (
            json!({"type": "Persistent", "persistent": {"size": "2Gi", "storageClassName": "fast"}}),
            "size cannot change",
        ),
        (
            json!({"type": "Persistent", "persistent": {"size": "1Gi", "storageClassName": "slow"}}),
            "storageClassName cannot change",
        ),
        (
            json!({"type": "Persistent", "persistent": {"size": "1Gi"}}),
            "storageClassName cannot change",
        ),
    ] {
        let err = validate_cel_schema::<StorageSpec>(&edit, Some(&old)).unwrap_err();
        assert!(err.to_string().contains(says), "{edit}: {err}");
    }
}

#[test]
fn names_must_fit_the_pod_labels_and_service_names() {
    let named = |name: &str| -> CaviCluster {
        serde_yaml::from_str(&format!(
            "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {{name: '{name}', namespace: ns}}\nspec:\n  shards: [{{rangeEnd: m}}]\n"
        ))
        .unwrap()
    };
    validate_cel(&named("demo")).unwrap();
    validate_cel(&named(&"a".repeat(52))).unwrap();
    for bad in [
        "a".repeat(53),
        "my.db".into(),
        "9lives".into(),
        "Demo".into(),
        "demo-".into(),
    ] {
        let err = validate_cel(&named(&bad)).unwrap_err();
        assert!(
            err.to_string().contains("metadata.name must be at most 52"),
            "{bad}: {err}"
        );
    }
}
