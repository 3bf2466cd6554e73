//! The StatefulSet: one pod per shard, with its container, probes,
//! security context and pod annotations. What persistent storage adds is
//! in `storage`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy,
    StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::storage::{DATA_DIR, DATA_VOLUME, data_claim_template, persistent_storage};
use super::{
    BuildOptions, CONFIG_KEY, Names, PORT_NAME, Shape, labels, metadata, selector_labels,
    stable_hash,
};
use crate::crd::CaviClusterSpec;

/// Where the ConfigMap is mounted in each pod.
pub const CONFIG_DIR: &str = "/etc/cavi";
/// Name of the node container.
pub const CONTAINER_NAME: &str = "kvstore";
/// The node binary the container runs (set as `command`, so the pods do not
/// depend on the image's entrypoint).
pub const NODE_COMMAND: &str = "kvstore-api";
/// The standard annotations that tell a Prometheus configured for them to
/// scrape a pod, on which port and at which path.
pub const PROMETHEUS_SCRAPE_ANNOTATION: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT_ANNOTATION: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH_ANNOTATION: &str = "prometheus.io/path";
/// Where a node serves its Prometheus metrics (OpenMetrics text).
pub const METRICS_PATH: &str = "/metrics";
/// The uid and gid the node runs as (the conventional non-root "nonroot").
pub const RUN_AS_USER: i64 = 65532;
/// Pod-template annotation: a hash of the rest of the template. A pod
/// whose value differs from the StatefulSet's runs an older template; the
/// operator rolls such pods one ordinal at a time.
pub const TEMPLATE_HASH_ANNOTATION: &str = "cavi.dev/template-hash";

fn probe(path: &str, port: i32, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

/// The node's command line: its shard from the hostname, the mounted
/// config, and the data directory when storage is persistent. The node's
/// own defaults do the drain: 5 s of serving with `/readyz` at 503 after
/// SIGTERM, then up to 10 s for requests in flight, within the pod's
/// termination grace period (30 s by default).
pub fn node_args(spec: &CaviClusterSpec) -> Vec<String> {
    let mut args = vec![
        "from-hostname".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
    ];
    if persistent_storage(&spec.storage).is_some() {
        args.extend(["--data-dir".to_owned(), DATA_DIR.to_owned()]);
    }
    args
}

/// Pod-template annotations: the user's, then the Prometheus scrape
/// hints. No hash of the layout: a new layout restarts nothing.
pub fn pod_annotations(spec: &CaviClusterSpec) -> BTreeMap<String, String> {
    let mut annotations = spec.pod_annotations.clone();
    annotations.extend([
        (PROMETHEUS_SCRAPE_ANNOTATION.to_owned(), "true".to_owned()),
        (PROMETHEUS_PORT_ANNOTATION.to_owned(), spec.port.to_string()),
        (
            PROMETHEUS_PATH_ANNOTATION.to_owned(),
            METRICS_PATH.to_owned(),
        ),
    ]);
    annotations
}

/// Spread the pods over hosts, then zones, as far as the scheduler can
/// (preferred, so a small cluster still schedules).
fn default_spread(names: &Names) -> Vec<TopologySpreadConstraint> {
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(names)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

/// The template hash of `template` (its own annotation left out).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let mut template = template.clone();
    if let Some(a) = template
        .metadata
        .as_mut()
        .and_then(|m| m.annotations.as_mut())
    {
        a.remove(TEMPLATE_HASH_ANNOTATION);
    }
    stable_hash(&serde_json::to_vec(&template).unwrap_or_default())
}

fn pod_template(names: &Names, spec: &CaviClusterSpec, opts: &BuildOptions) -> PodTemplateSpec {
    let persistent = persistent_storage(&spec.storage);
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if persistent.is_some() {
        // The volume itself comes from the claim template of the same name.
        mounts.push(VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        });
    }
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(opts.image(spec).to_owned()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec![NODE_COMMAND.into()]),
        args: Some(node_args(spec)),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.into()),
            container_port: spec.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", spec.port, 10, 3)),
        // Quick to notice a draining node: endpoints drop it within ~4 s
        // of its SIGTERM, inside the node's 5 s shutdown delay.
        readiness_probe: Some(probe("/readyz", spec.port, 2, 2)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.config_map(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let placement = spec.placement.clone().unwrap_or_default();
    let mut pod_labels = spec.pod_labels.clone();
    pod_labels.extend(labels(names));
    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            // The kubelet makes the volume group-writable for this gid;
            // only when the root's group differs, so a large volume is not
            // walked on every start.
            fs_group: persistent.as_ref().map(|_| RUN_AS_USER),
            fs_group_change_policy: persistent.as_ref().map(|_| "OnRootMismatch".into()),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        service_account_name: spec.service_account_name.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty())
            .then(|| spec.image_pull_secrets.clone()),
        termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
        node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
        tolerations: (!placement.tolerations.is_empty()).then_some(placement.tolerations),
        affinity: placement.affinity,
        topology_spread_constraints: Some(
            placement
                .topology_spread_constraints
                .unwrap_or_else(|| default_spread(names)),
        ),
        ..PodSpec::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(pod_annotations(spec)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec),
    };
    let hash = template_hash(&template);
    if let Some(a) = template
        .metadata
        .as_mut()
        .and_then(|m| m.annotations.as_mut())
    {
        a.insert(TEMPLATE_HASH_ANNOTATION.to_owned(), hash);
    }
    template
}

/// StatefulSet `<name>`: one pod per ordinal, each taking its shard id from
/// its ordinal (`from-hostname`), with the config mounted at `/etc/cavi`.
/// Persistent storage adds a claim template mounted at [`DATA_DIR`], the
/// `--data-dir` flag, an `fsGroup` so the non-root node can write the
/// volume, and the claims' retention policy. The root filesystem stays
/// read-only either way. Template changes roll from the highest ordinal
/// down, as far as `shape.partition` allows.
pub fn stateful_set(
    names: &Names,
    owner: Option<OwnerReference>,
    spec: &CaviClusterSpec,
    opts: &BuildOptions,
    shape: &Shape,
) -> StatefulSet {
    let persistent = persistent_storage(&spec.storage);
    StatefulSet {
        metadata: metadata(names, names.stateful_set(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(shape.replicas),
            service_name: Some(names.headless_service()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(names)),
                ..LabelSelector::default()
            },
            template: pod_template(names, spec, opts),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(shape.partition),
                    ..RollingUpdateStatefulSetStrategy::default()
                }),
            }),
            volume_claim_templates: persistent
                .as_ref()
                .map(|p| vec![data_claim_template(names, p)]),
            persistent_volume_claim_retention_policy: persistent.map(|p| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(p.retention_policy.when_deleted.as_str().into()),
                    when_scaled: Some(p.retention_policy.when_scaled.as_str().into()),
                }
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn stateful_set_runs_one_pod_per_shard() {
        let c = children(&demo());
        let sts = &c.stateful_set;
        assert_common_metadata(&sts.metadata, "demo");
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-headless"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&expected_selector())
        );
        assert_eq!(spec.selector.match_expressions, None);
        let template_meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(template_meta.labels.as_ref(), Some(&expected_labels()));
        // The selector must select the pods it creates.
        for (k, v) in &expected_selector() {
            assert_eq!(template_meta.labels.as_ref().unwrap().get(k), Some(v));
        }
        let annotations = template_meta.annotations.as_ref().unwrap();
        assert_eq!(
            annotations.get(TEMPLATE_HASH_ANNOTATION),
            Some(&template_hash(&spec.template))
        );
        let rolling = spec.update_strategy.as_ref().unwrap();
        assert_eq!(rolling.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(rolling.rolling_update.as_ref().unwrap().partition, Some(0));
    }

    #[test]
    fn pod_knobs_are_copied_and_the_spread_defaults_to_hosts_then_zones() {
        let mut c = demo();
        c.spec.env = vec![k8s_openapi::api::core::v1::EnvVar {
            name: "CAVI_PEER_TIMEOUT".into(),
            value: Some("3s".into()),
            ..Default::default()
        }];
        c.spec.pod_labels = BTreeMap::from([
            ("team".into(), "kv".into()),
            ("app.kubernetes.io/name".into(), "mine".into()),
        ]);
        c.spec.pod_annotations = BTreeMap::from([("note".into(), "x".into())]);
        c.spec.priority_class_name = Some("high".into());
        c.spec.service_account_name = Some("cavi-nodes".into());
        c.spec.termination_grace_period_seconds = 45;
        c.spec.image_pull_secrets = vec![k8s_openapi::api::core::v1::LocalObjectReference {
            name: "regcred".into(),
        }];
        c.spec.image_pull_policy = Some(crate::crd::PullPolicy::Always);
        let template = children(&c).stateful_set.spec.unwrap().template;
        let meta = template.metadata.unwrap();
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "kv");
        assert_eq!(
            labels["app.kubernetes.io/name"], "cavi",
            "the selector's labels win"
        );
        assert_eq!(meta.annotations.unwrap()["note"], "x");
        let pod = template.spec.unwrap();
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.service_account_name.as_deref(), Some("cavi-nodes"));
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        let container = &pod.containers[0];
        assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(container.env.as_ref().unwrap()[0].name, "CAVI_PEER_TIMEOUT");
        let spread = pod.topology_spread_constraints.unwrap();
        let keys: Vec<&str> = spread.iter().map(|t| t.topology_key.as_str()).collect();
        assert_eq!(
            keys,
            ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        );
        assert!(
            spread
                .iter()
                .all(|t| t.when_unsatisfiable == "ScheduleAnyway" && t.max_skew == 1)
        );

        // A placement of one's own replaces the default spread.
        let mut own = demo();
        own.spec
            .placement
            .as_mut()
            .unwrap()
            .topology_spread_constraints = Some(vec![]);
        let pod = pod_spec(&own);
        assert_eq!(pod.topology_spread_constraints, Some(vec![]));
    }

    #[test]
    fn container_takes_its_shard_from_the_hostname_and_mounts_the_config() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        let container = &pod.containers[0];
        assert_eq!(container.name, "kvstore");
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/cavi:1.2.3")
        );
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "from-hostname".to_owned(),
                    "/etc/cavi/config.yaml".to_owned()
                ][..]
            )
        );
        assert_eq!(
            container.command.as_deref(),
            Some(&["kvstore-api".to_owned()][..]),
            "the node binary is named, not left to the image's entrypoint"
        );
        let ports = container.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].container_port, 4000);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        let mounts = container.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_path, "/etc/cavi");
        assert_eq!(mounts[0].read_only, Some(true));
        let volumes = pod.volumes.as_ref().unwrap();
        let volume = volumes.iter().find(|v| v.name == mounts[0].name).unwrap();
        assert_eq!(volume.config_map.as_ref().unwrap().name, "demo-config");
        let requests = container
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["cpu"].0, "100m");
        assert_eq!(requests["memory"].0, "64Mi");
    }

    #[test]
    fn probes_hit_healthz_and_readyz_on_the_port() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let live = container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(live.port, IntOrString::Int(4000));
        let ready = container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::Int(4000));
    }

    #[test]
    fn security_context_is_restricted() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.privileged, None);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
    }

    #[test]
    fn placement_is_copied_and_absent_placement_sets_nothing() {
        let c = children(&demo());
        let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "ssd");
        let tolerations = pod.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
        assert_eq!(pod.affinity, None);

        let mut bare = demo();
        bare.spec.placement = None;
        let pod = pod_spec(&bare);
        // Empty lists and maps are left out, so the API server's copy
        // (which drops them) still matches.
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.affinity, None);
    }

    #[test]
    fn pods_carry_prometheus_annotations_and_the_template_hash() {
        let c = children(&demo());
        let template = c.stateful_set.spec.unwrap().template;
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "4000");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        assert_eq!(annotations.len(), 4, "{annotations:?}");
        // The annotated port is the container's named HTTP port.
        let ports = template.spec.unwrap().containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(
            ports[0].container_port.to_string(),
            annotations["prometheus.io/port"]
        );
        // The hash covers the template, not the layout in the ConfigMap.
        assert_eq!(annotations[TEMPLATE_HASH_ANNOTATION].len(), 16);
    }
}
