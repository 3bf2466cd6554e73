//! The ConfigMap: the node config file every pod mounts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{CONFIG_KEY, Names, metadata};

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::build::fixtures::*;
    use cavi_node::config::ClusterConfig;

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
}
