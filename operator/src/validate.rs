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
