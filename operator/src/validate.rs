//! The first stage of the reconcile pipeline: is the spec a layout the
//! operator may apply? Pure functions; the reconciler turns a refusal into a
//! `Ready=False` condition and a Warning event, and writes nothing else.

use cavi_node::config::ClusterConfig;

use crate::build::{Names, cluster_config};
use crate::crd::{CaviClusterSpec, MAX_SHARDS};

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
/// Reason of a layout change that would move keys between shards.
pub const REASON_KEYS_WOULD_MOVE: &str = "KeysWouldMove";

/// Validates `spec` on its own and against `applied`, the layout currently
/// in the cluster's ConfigMap (if any). Returns the layout to apply.
pub fn validate(
    names: &Names,
    spec: &CaviClusterSpec,
    applied: Option<&ClusterConfig>,
) -> Result<ClusterConfig, Invalid> {
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
    let config = cluster_config(names, spec);
    config.validate().map_err(|e| invalid(e.to_string()))?;
    if let Some(applied) = applied {
        check_no_keys_move(applied, &config)?;
    }
    Ok(config)
}

/// Every key an existing shard owns must still be owned by the same shard:
/// shards may grow into key space nobody owned and new shards may be
/// appended, but no shard may shrink or disappear (that needs resharding,
/// which does not exist yet).
pub fn check_no_keys_move(applied: &ClusterConfig, next: &ClusterConfig) -> Result<(), Invalid> {
    for old in &applied.shards {
        let moved = match next.shard(old.id) {
            None => format!(
                "shard {} ({}) would be removed, and its keys with it",
                old.id,
                old.range()
            ),
            Some(new) if !old.range().is_within(&new.range()) => format!(
                "shard {} would shrink from {} to {}, moving keys to another shard",
                old.id,
                old.range(),
                new.range()
            ),
            Some(_) => continue,
        };
        return Err(Invalid {
            reason: REASON_KEYS_WOULD_MOVE,
            message: format!("{moved}; resharding is not supported yet"),
        });
    }
    Ok(())
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

    fn applied(shards: Vec<ShardRange>) -> ClusterConfig {
        validate(&names(), &spec(shards), None).unwrap()
    }

    #[test]
    fn a_sorted_layout_without_overlap_is_accepted() {
        let config = validate(&names(), &spec(seed()), None).unwrap();
        assert_eq!(config.shards.len(), 2);
        assert_eq!(config.owner_of("zebra").map(|s| s.id), Some(1));
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
    fn the_same_layout_and_growth_into_unowned_space_are_accepted() {
        let old = applied(seed());
        assert!(validate(&names(), &spec(seed()), Some(&old)).is_ok());
        // Appending a shard for keys nobody owned.
        let mut appended = seed();
        appended.push(range("{", None));
        assert!(validate(&names(), &spec(appended), Some(&old)).is_ok());
        // Growing shard 1 up to the highest key (nobody owned "{"...).
        let grown = vec![range("a", Some("m")), range("n", None)];
        assert!(validate(&names(), &spec(grown), Some(&old)).is_ok());
        // Growing shard 0 down to the lowest key.
        let lower = vec![range("", Some("m")), range("n", Some("z"))];
        assert!(validate(&names(), &spec(lower), Some(&old)).is_ok());
    }

    #[test]
    fn changes_that_move_keys_are_refused() {
        let old = applied(seed());
        let shrink = vec![range("a", Some("f")), range("g", Some("z"))];
        let err = validate(&names(), &spec(shrink), Some(&old)).unwrap_err();
        assert_eq!(err.reason, REASON_KEYS_WOULD_MOVE);
        assert!(err.message.contains("shard 0"), "{}", err.message);

        let removed = vec![range("a", Some("m"))];
        let err = validate(&names(), &spec(removed), Some(&old)).unwrap_err();
        assert_eq!(err.reason, REASON_KEYS_WOULD_MOVE);
        assert!(err.message.contains("shard 1") && err.message.contains("removed"));

        // Inserting a shard in front renumbers every shard after it.
        let inserted = vec![
            range("", Some("0")),
            range("a", Some("m")),
            range("n", Some("z")),
        ];
        let err = validate(&names(), &spec(inserted), Some(&old)).unwrap_err();
        assert_eq!(err.reason, REASON_KEYS_WOULD_MOVE);
    }
}
