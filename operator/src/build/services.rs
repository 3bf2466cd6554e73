//! The two Services: the headless one that names each pod, and the client
//! entry point.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, PORT_NAME, metadata, selector_labels};
use crate::crd::CaviClusterSpec;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::build::fixtures::*;

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
}
