//! The optional NetworkPolicy: only the cluster's own pods (peers forward
//! to each other) and pods labelled `cavi.dev/client: "true"`, in any
//! namespace, reach the nodes, and only on their port.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, metadata, selector_labels};
use crate::crd::{CLIENT_LABEL, CaviClusterSpec};

/// NetworkPolicy `<name>` over the cluster's pods.
pub fn network_policy(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
) -> NetworkPolicy {
    let pods = |labels: BTreeMap<String, String>| LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    };
    NetworkPolicy {
        metadata: metadata(names, names.network_policy(), owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods(selector_labels(names))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    NetworkPolicyPeer {
                        pod_selector: Some(pods(selector_labels(names))),
                        ..NetworkPolicyPeer::default()
                    },
                    NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector::default()),
                        pod_selector: Some(pods(BTreeMap::from([(
                            CLIENT_LABEL.to_owned(),
                            "true".to_owned(),
                        )]))),
                        ..NetworkPolicyPeer::default()
                    },
                ]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(spec.port)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::build::fixtures::*;

    #[test]
    fn off_by_default_and_when_on_lets_in_peers_and_labelled_clients_only() {
        assert!(children(&demo()).network_policy.is_none());
        let mut on = demo();
        on.spec.network_policy.enabled = true;
        let np = children(&on).network_policy.unwrap();
        assert_common_metadata(&np.metadata, "demo");
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels,
            Some(expected_selector())
        );
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 1);
        let from = rules[0].from.as_ref().unwrap();
        assert_eq!(
            from[0].pod_selector.as_ref().unwrap().match_labels,
            Some(expected_selector())
        );
        assert!(
            from[0].namespace_selector.is_none(),
            "peers: same namespace"
        );
        let client = from[1]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(
            client.get("cavi.dev/client").map(String::as_str),
            Some("true")
        );
        assert!(
            from[1].namespace_selector.is_some(),
            "clients: any namespace"
        );
        let ports = rules[0].ports.as_ref().unwrap();
        assert_eq!(
            ports[0].port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4000))
        );
    }
}
