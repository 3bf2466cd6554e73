//! The PodDisruptionBudget: a node drain or an eviction takes at most
//! `spec.disruption.maxUnavailable` pods (one by default) at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Names, metadata, selector_labels};
use crate::crd::CaviClusterSpec;

/// PodDisruptionBudget `<name>` over the cluster's pods.
pub fn disruption_budget(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(names, names.disruption_budget(), owner),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.disruption.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(names)),
                ..LabelSelector::default()
            }),
            // A pod that is not ready serves nothing: evicting it costs
            // nothing, and must not be blocked by the budget.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::build::fixtures::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn at_most_one_pod_down_by_default_and_overridable() {
        let c = children(&demo());
        assert_common_metadata(&c.disruption_budget.metadata, "demo");
        let spec = c.disruption_budget.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(expected_selector())
        );
        let mut two = demo();
        two.spec.disruption.max_unavailable = 2;
        let spec = children(&two).disruption_budget.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
    }
}
