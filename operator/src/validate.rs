//! The first stage of the reconcile pipeline: is the spec a layout the
//! operator may apply? Pure functions; the reconciler turns a refusal into a
//! `Ready=False` condition and a Warning event, and writes nothing else.

use cavi_node::config::ClusterConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::build::{BuildOptions, DATA_VOLUME, Names, config_for, persistent_storage, spec_layout};
use crate::crd::{AssignedRange, CaviClusterSpec, MAX_SHARDS, StorageSpec, StorageType};
use crate::quantity::parse_millis;

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `PascalCase` reason, used in the condition, the event and metrics.
    pub reason: &'static str,
    /// A human sentence naming the shards at fault.
    pub message: String,
}

/// Reason of a layout that breaks the key-space rules.
pub const REASON_INVALID_LAYOUT: &str = "InvalidLayout";
/// Reason of a layout change that would leave keys with no shard.
pub const REASON_KEYS_WOULD_BE_LOST: &str = "KeysWouldBeLost";
/// Reason of a storage spec that is inconsistent or has a bad size.
pub const REASON_INVALID_STORAGE: &str = "InvalidStorage";
/// Reason of a storage change the running cluster cannot take.
pub const REASON_STORAGE_WOULD_CHANGE: &str = "StorageWouldChange";

/// Validates `spec` on its own and against `applied`, the layout the
/// cluster serves (from its status), if it runs. Any layout that keeps
/// every key with some shard is accepted: the keys move online.
pub fn validate(
    names: &Names,
    spec: &CaviClusterSpec,
    applied: Option<&[AssignedRange]>,
) -> Result<(), Invalid> {
    let invalid = |message: String| Invalid {
        reason: REASON_INVALID_LAYOUT,
        message,
    };
    if spec.shards.len() > MAX_SHARDS {
        return Err(invalid(format!(
            "{} shards declared; at most {MAX_SHARDS} are supported",
            spec.shards.len()
        )));
    }
    if !(1..=65535).contains(&spec.port) {
        return Err(invalid(format!("port {} is not in 1..=65535", spec.port)));
    }
    check_storage(&spec.storage)?;
    let config: ClusterConfig =
        config_for(names, spec, &BuildOptions::default(), &spec_layout(spec), 0);
    config.validate().map_err(|e| invalid(e.to_string()))?;
    if let Some(applied) = applied
        && let Some(lost) = crate::layout::orphaned(applied, spec)
    {
        return Err(Invalid {
            reason: REASON_KEYS_WOULD_BE_LOST,
            message: lost,
        });
    }
    Ok(())
}

/// The storage spec on its own: the union's member matches its `type`
/// (the CRD's CEL rules say the same) and the size is a positive quantity.
pub fn check_storage(storage: &StorageSpec) -> Result<(), Invalid> {
    let invalid = |message: String| {
        Err(Invalid {
            reason: REASON_INVALID_STORAGE,
            message,
        })
    };
    match (storage.type_, &storage.persistent) {
        (StorageType::Memory, None) => Ok(()),
        (StorageType::Memory, Some(_)) => invalid(
            "storage.persistent is set but storage.type is Memory; set type: Persistent or remove storage.persistent".into(),
        ),
        (StorageType::Persistent, None) => Ok(()),
        (StorageType::Persistent, Some(persistent)) => {
            let size = &persistent.size.0;
            match parse_millis(size) {
                None => invalid(format!(
                    "storage.persistent.size {size:?} is not a Kubernetes quantity (such as 1Gi or 500Mi)"
                )),
                Some(millis) if millis <= 0 => invalid(format!(
                    "storage.persistent.size {size:?} is not a positive size"
                )),
                Some(_) if persistent.storage_class_name.as_deref() == Some("") => invalid(
                    "storage.persistent.storageClassName is empty; omit it to use the default class".into(),
                ),
                Some(_) => Ok(()),
            }
        }
    }
}

/// The storage a running cluster has, as its StatefulSet says.
///
/// The StatefulSet is the record to compare a new spec against, rather
/// than a copy in the ConfigMap or an annotation: its volume claim
/// templates are exactly what the API server refuses to change, they
/// cannot drift from what runs (nobody can edit them, not even by hand),
/// and a cluster created by an older operator needs no migration. Without
/// a StatefulSet (a new cluster, or one whose StatefulSet was deleted) any
/// storage is accepted: the StatefulSet is created from the spec, and
/// claims retained from an earlier one are bound again by name.
#[derive(Debug, Clone, PartialEq)]
pub enum AppliedStorage {
    /// No claim template: data in memory.
    Memory,
    /// A claim template named [`DATA_VOLUME`], with what it requests.
    Persistent {
        size: Option<Quantity>,
        storage_class_name: Option<String>,
    },
}

impl AppliedStorage {
    /// Reads the storage of an applied StatefulSet.
    pub fn of(stateful_set: &StatefulSet) -> Self {
        let template = stateful_set
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .and_then(|ts| {
                ts.iter()
                    .find(|t| t.metadata.name.as_deref() == Some(DATA_VOLUME))
            });
        let Some(template) = template else {
            return AppliedStorage::Memory;
        };
        let spec = template.spec.as_ref();
        AppliedStorage::Persistent {
            size: spec
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .cloned(),
            storage_class_name: spec.and_then(|s| s.storage_class_name.clone()),
        }
    }
}

/// Whether two sizes are equal, comparing values (`1Gi` equals `1024Mi`,
/// the form the API server may store), or the text when one is not a
/// quantity.
fn same_size(a: &Quantity, b: &Quantity) -> bool {
    match (parse_millis(&a.0), parse_millis(&b.0)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// A running cluster keeps its storage: the type, the size and the class
/// of its volumes are fixed (a StatefulSet's volume claim templates cannot
/// change, and moving data between memory and disk is not supported). The
/// retention policy may change.
pub fn check_storage_unchanged(
    applied: &AppliedStorage,
    next: &StorageSpec,
) -> Result<(), Invalid> {
    let refuse = |message: String| {
        Err(Invalid {
            reason: REASON_STORAGE_WOULD_CHANGE,
            message,
        })
    };
    let kind_change = |from: StorageType, to: StorageType| {
        format!(
            "storage.type would change from {} to {}; a running cluster keeps its storage type \
             (create a new CaviCluster with the storage you want and copy the data over)",
            from.as_str(),
            to.as_str()
        )
    };
    match (applied, persistent_storage(next)) {
        (AppliedStorage::Memory, None) => Ok(()),
        (AppliedStorage::Memory, Some(_)) => {
            refuse(kind_change(StorageType::Memory, StorageType::Persistent))
        }
        (AppliedStorage::Persistent { .. }, None) => {
            refuse(kind_change(StorageType::Persistent, StorageType::Memory))
        }
        (
            AppliedStorage::Persistent {
                size,
                storage_class_name,
            },
            Some(next),
        ) => {
            if let Some(size) = size
                && !same_size(size, &next.size)
            {
                return refuse(format!(
                    "storage.persistent.size would change from {} to {}; the volume claim template \
                     of a running cluster cannot change (expand each claim data-<pod> instead, if \
                     its storage class allows volume expansion)",
                    size.0, next.size.0
                ));
            }
            if storage_class_name != &next.storage_class_name {
                let show = |c: &Option<String>| c.clone().unwrap_or_else(|| "the default".into());
                return refuse(format!(
                    "storage.persistent.storageClassName would change from {} to {}; the volume \
                     claim template of a running cluster cannot change",
                    show(storage_class_name),
                    show(&next.storage_class_name)
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crd::{CaviCluster, ShardRange};

    fn range(start: &str, end: Option<&str>) -> ShardRange {
        ShardRange {
            range_start: start.into(),
            range_end: end.map(Into::into),
        }
    }

    fn spec(shards: Vec<ShardRange>) -> CaviClusterSpec {
        let mut cluster: CaviCluster = serde_yaml::from_str(
            "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {name: demo, namespace: ns}\nspec: {shards: []}\n",
        )
        .unwrap();
        cluster.spec.shards = shards;
        cluster.spec
    }

    fn names() -> Names {
        Names {
            cluster: "demo".into(),
            namespace: "ns".into(),
        }
    }

    fn seed() -> Vec<ShardRange> {
        vec![range("a", Some("m")), range("n", Some("z"))]
    }

    fn applied(shards: Vec<ShardRange>) -> Vec<AssignedRange> {
        let s = spec(shards);
        validate(&names(), &s, None).unwrap();
        spec_layout(&s)
    }

    #[test]
    fn a_sorted_layout_without_overlap_is_accepted() {
        assert!(validate(&names(), &spec(seed()), None).is_ok());
    }

    #[test]
    fn overlap_is_refused_naming_both_shards() {
        let err = validate(
            &names(),
            &spec(vec![range("a", Some("m")), range("ma", Some("z"))]),
            None,
        )
        .unwrap_err();
        assert_eq!(err.reason, REASON_INVALID_LAYOUT);
        assert!(err.message.contains("overlap"), "{}", err.message);
        assert!(err.message.contains("shards 0"), "{}", err.message);
    }

    #[test]
    fn unsorted_inverted_empty_and_too_many_are_refused() {
        let unsorted = validate(&names(), &spec(seed().into_iter().rev().collect()), None);
        assert!(unsorted.unwrap_err().message.contains("key order"));
        let inverted = validate(&names(), &spec(vec![range("n", Some("m"))]), None);
        assert!(inverted.unwrap_err().message.contains("after range_end"));
        let empty = validate(&names(), &spec(vec![]), None);
        assert!(empty.unwrap_err().message.contains("no shards"));
        let many: Vec<ShardRange> = (0..65)
            .map(|i| range(&format!("k{i:03}"), Some(&format!("k{i:03}"))))
            .collect();
        let err = validate(&names(), &spec(many), None).unwrap_err();
        assert!(err.message.contains("at most 64"), "{}", err.message);
        let mut bad_port = spec(seed());
        bad_port.port = 0;
        assert!(
            validate(&names(), &bad_port, None)
                .unwrap_err()
                .message
                .contains("port")
        );
    }

    #[test]
    fn splits_merges_boundary_moves_and_growth_are_accepted() {
        let old = applied(seed());
        for shards in [
            seed(),
            vec![
                range("a", Some("f")),
                range("g", Some("m")),
                range("n", Some("z")),
            ],
            vec![range("a", Some("p")), range("q", Some("z"))],
            vec![range("", None)],
            vec![
                range("", Some("0")),
                range("a", Some("m")),
                range("n", None),
            ],
        ] {
            let verdict = validate(&names(), &spec(shards.clone()), Some(&old));
            assert!(verdict.is_ok(), "{shards:?}: {verdict:?}");
        }
    }

    #[test]
    fn an_edit_that_leaves_keys_with_no_shard_is_refused() {
        let old = applied(seed());
        let err = validate(&names(), &spec(vec![range("a", Some("m"))]), Some(&old)).unwrap_err();
        assert_eq!(err.reason, REASON_KEYS_WOULD_BE_LOST);
        assert!(err.message.contains("shard 1"), "{}", err.message);
    }

    fn persistent(size: &str, class: Option<&str>) -> StorageSpec {
        StorageSpec {
            type_: StorageType::Persistent,
            persistent: Some(crate::crd::PersistentStorage {
                size: Quantity(size.into()),
                storage_class_name: class.map(Into::into),
                retention_policy: crate::crd::RetentionPolicy::default(),
            }),
        }
    }

    #[test]
    fn storage_must_match_its_type_and_have_a_positive_size() {
        assert!(check_storage(&StorageSpec::default()).is_ok());
        assert!(check_storage(&persistent("1Gi", None)).is_ok());
        assert!(check_storage(&persistent("1.5Gi", Some("fast"))).is_ok());

        // Persistent without a member: 1Gi of the default class.
        let mut no_member = persistent("1Gi", None);
        no_member.persistent = None;
        assert!(check_storage(&no_member).is_ok());

        let mut memory_with_member = persistent("1Gi", None);
        memory_with_member.type_ = StorageType::Memory;
        let err = check_storage(&memory_with_member).unwrap_err();
        assert_eq!(err.reason, REASON_INVALID_STORAGE);

        for bad in ["lots", "1GB", "", "0", "-1Gi"] {
            let err = check_storage(&persistent(bad, None)).unwrap_err();
            assert_eq!(err.reason, REASON_INVALID_STORAGE, "{bad:?}");
            assert!(
                err.message.contains("storage.persistent.size"),
                "{}",
                err.message
            );
        }
        let err = check_storage(&persistent("1Gi", Some(""))).unwrap_err();
        assert!(err.message.contains("storageClassName"), "{}", err.message);

        // The whole validation refuses it too, so `render` does.
        let mut s = spec(seed());
        s.storage = persistent("many", None);
        assert_eq!(
            validate(&names(), &s, None).unwrap_err().reason,
            REASON_INVALID_STORAGE
        );
    }

    fn applied_sts(storage: StorageSpec) -> StatefulSet {
        let mut s = spec(seed());
        s.storage = storage;
        let opts = crate::build::BuildOptions::default();
        let shape = crate::build::Shape::of_spec(&names(), &s, &opts);
        crate::build::stateful_set(&names(), None, &s, &opts, &shape)
    }

    #[test]
    fn applied_storage_is_read_from_the_claim_template() {
        let memory = StorageSpec {
            type_: StorageType::Memory,
            persistent: None,
        };
        assert_eq!(
            AppliedStorage::of(&applied_sts(memory)),
            AppliedStorage::Memory
        );
        assert_eq!(
            AppliedStorage::of(&applied_sts(persistent("2Gi", Some("fast")))),
            AppliedStorage::Persistent {
                size: Some(Quantity("2Gi".into())),
                storage_class_name: Some("fast".into()),
            }
        );
        // A StatefulSet without a spec (never from the API server) is memory.
        assert_eq!(
            AppliedStorage::of(&StatefulSet::default()),
            AppliedStorage::Memory
        );
    }

    #[test]
    fn a_storage_kind_change_is_refused_both_ways() {
        let memory_spec = StorageSpec {
            type_: StorageType::Memory,
            persistent: None,
        };
        let memory = AppliedStorage::of(&applied_sts(memory_spec.clone()));
        let err = check_storage_unchanged(&memory, &persistent("1Gi", None)).unwrap_err();
        assert_eq!(err.reason, REASON_STORAGE_WOULD_CHANGE);
        assert!(
            err.message.contains("from Memory to Persistent"),
            "{}",
            err.message
        );
        assert!(check_storage_unchanged(&memory, &memory_spec).is_ok());
        // The default is Persistent now: an old Memory cluster that never
        // said so is refused, not turned into a disk cluster.
        assert!(check_storage_unchanged(&memory, &StorageSpec::default()).is_err());

        let disk = AppliedStorage::of(&applied_sts(persistent("1Gi", None)));
        let err = check_storage_unchanged(&disk, &memory_spec).unwrap_err();
        assert_eq!(err.reason, REASON_STORAGE_WOULD_CHANGE);
        assert!(
            err.message.contains("from Persistent to Memory"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_size_or_class_change_is_refused_but_not_a_respelling_or_retention() {
        let disk = AppliedStorage::of(&applied_sts(persistent("1Gi", Some("fast"))));
        assert!(check_storage_unchanged(&disk, &persistent("1Gi", Some("fast"))).is_ok());
        // The API server may store 1Gi as 1024Mi, and a user may write it so.
        assert!(check_storage_unchanged(&disk, &persistent("1024Mi", Some("fast"))).is_ok());

        let err = check_storage_unchanged(&disk, &persistent("2Gi", Some("fast"))).unwrap_err();
        assert_eq!(err.reason, REASON_STORAGE_WOULD_CHANGE);
        assert!(
            err.message.contains("size would change from 1Gi to 2Gi"),
            "{}",
            err.message
        );

        let err = check_storage_unchanged(&disk, &persistent("1Gi", Some("slow"))).unwrap_err();
        assert_eq!(err.reason, REASON_STORAGE_WOULD_CHANGE);
        assert!(
            err.message
                .contains("storageClassName would change from fast to slow"),
            "{}",
            err.message
        );
        let err = check_storage_unchanged(&disk, &persistent("1Gi", None)).unwrap_err();
        assert!(err.message.contains("to the default"), "{}", err.message);

        let mut retention = persistent("1Gi", Some("fast"));
        if let Some(p) = retention.persistent.as_mut() {
            p.retention_policy.when_deleted = crate::crd::RetentionAction::Delete;
        }
        assert!(check_storage_unchanged(&disk, &retention).is_ok());
    }
}
