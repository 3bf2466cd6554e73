//! The permissions the operator's code uses, in one table: `cavi-operator
//! rbac` prints it, the chart's ClusterRole and Role and
//! `deploy/operator.yaml` grant exactly it (a check compares them), and
//! the operator's README lists it.

use serde::Serialize;

/// One RBAC rule: what the code calls, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub api_groups: &'static [&'static str],
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    #[serde(skip)]
    pub why: &'static str,
}

/// Cluster-wide: CaviClusters and their children in every namespace.
pub const CLUSTER_RULES: &[Rule] = &[
    Rule {
        api_groups: &["cavi.dev"],
        resources: &["caviclusters"],
        verbs: &["list", "watch"],
        why: "the controller's watch (and the CRD check at start)",
    },
    Rule {
        api_groups: &["cavi.dev"],
        resources: &["caviclusters/status"],
        verbs: &["patch"],
        why: "status, by server-side apply",
    },
    Rule {
        api_groups: &[""],
        resources: &["configmaps", "services"],
        verbs: &["list", "watch", "create", "patch"],
        why: "children: reflector watches; server-side apply (a PATCH that may create)",
    },
    Rule {
        api_groups: &["apps"],
        resources: &["statefulsets"],
        verbs: &["list", "watch", "create", "patch"],
        why: "the StatefulSet: as above",
    },
    Rule {
        api_groups: &["policy"],
        resources: &["poddisruptionbudgets"],
        verbs: &["list", "watch", "create", "patch"],
        why: "the PodDisruptionBudget: as above",
    },
    Rule {
        api_groups: &["networking.k8s.io"],
        resources: &["networkpolicies"],
        verbs: &["list", "watch", "create", "patch", "delete"],
        why: "the optional NetworkPolicy: as above, and deleted when turned off",
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["list", "watch"],
        why: "pod readiness and template hashes for status and rollouts",
    },
    Rule {
        api_groups: &["events.k8s.io"],
        resources: &["events"],
        verbs: &["create", "patch"],
        why: "events on a CaviCluster (a repeated one is patched)",
    },
];

/// In the operator's own namespace: the leader-election Lease.
pub const LEASE_RULES: &[Rule] = &[Rule {
    api_groups: &["coordination.k8s.io"],
    resources: &["leases"],
    verbs: &["get", "create", "update"],
    why: "leader election: read, create, and renew or take over with the read resourceVersion",
}];

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Table {
    cluster_rules: &'static [Rule],
    lease_rules: &'static [Rule],
}

/// The table as YAML: what `cavi-operator rbac` prints.
pub fn rbac_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&Table {
        cluster_rules: CLUSTER_RULES,
        lease_rules: LEASE_RULES,
    })
}

/// The table as Markdown rows, for the README.
pub fn rbac_markdown() -> String {
    let mut out = String::from("| API group | resources | verbs | why |\n|---|---|---|---|\n");
    for r in CLUSTER_RULES.iter().chain(LEASE_RULES) {
        let group = match r.api_groups {
            [""] => "(core)".to_owned(),
            groups => groups.join(", "),
        };
        out.push_str(&format!(
            "| {group} | {} | {} | {} |\n",
            r.resources.join(", "),
            r.verbs.join(", "),
            r.why
        ));
    }
    out
}
