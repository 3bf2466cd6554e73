//! The reconciler against a mocked API server and reflector stores the
//! test fills as the watches would: what it writes (and that it reads
//! nothing from the API server), exact apply, visible refusals, and
//! pod-template rollouts one ordinal at a time.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use cavi_node::config::ClusterConfig;
use cavi_operator::crd::{CaviCluster, CaviClusterStatus};
use cavi_operator::reconcile::{Context, Error, error_policy, reconcile};
use cavi_operator::status::find_condition;
use common::world::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Action;

const THREE: &str = r#"  image: cavi:test
  storage: {type: Persistent}
  shards: [{rangeStart: "a", rangeEnd: "h"}, {rangeStart: "i", rangeEnd: "p"}, {rangeStart: "q", rangeEnd: "z"}]
"#;

const CM: &str = "/api/v1/namespaces/shop/configmaps/demo-config";
const HEADLESS: &str = "/api/v1/namespaces/shop/services/demo-headless";
const SVC: &str = "/api/v1/namespaces/shop/services/demo";
const STS: &str = "/apis/apps/v1/namespaces/shop/statefulsets/demo";
const PDB: &str = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/demo";
const STATUS: &str = "/apis/cavi.dev/v1alpha1/namespaces/shop/caviclusters/demo/status";

fn cond(s: &CaviClusterStatus, t: &str) -> (String, String, String) {
    let c = find_condition(s, t).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// Runs reconciles until the cluster is settled: children applied and
/// synced back into the stores, every pod ready with the template, the
/// status stored. Returns the cluster as the API server holds it.
async fn settle(
    ctx: &Arc<Context>,
    writers: &mut Writers,
    seen: &Arc<std::sync::Mutex<Vec<Seen>>>,
    cluster: &CaviCluster,
) -> CaviCluster {
    let mut cluster = cluster.clone();
    for _ in 0..5 {
        let done = seen.lock().unwrap().len();
        let _ = reconcile(Arc::new(cluster.clone()), ctx.clone()).await;
        let log = seen.lock().unwrap()[done..].to_vec();
        writers.sync(&log);
        if let Some(status) = last_status(&log) {
            cluster = with_status(&cluster, Some(status));
        }
        let sts: Option<StatefulSet> = last_applied(&log, "/statefulsets/");
        if let Some(sts) = sts {
            let hash = template_hash(&sts);
            for o in 0..u32::try_from(sts.spec.unwrap().replicas.unwrap()).unwrap() {
                put(
                    &mut writers.pods,
                    pod(&cluster.metadata.name.clone().unwrap(), o, &hash, true),
                );
            }
        }
        if log.is_empty() {
            return cluster;
        }
    }
    panic!("the cluster never settled: {:#?}", seen.lock().unwrap());
}

#[tokio::test]
async fn first_reconcile_applies_every_child_then_the_status_and_reads_nothing() {
    let (ctx, server, _writers, metrics) = context();
    let cluster = cluster_with("demo", THREE);
    let seen = answer_everything(server, &cluster);
    let action = reconcile(Arc::new(cluster.clone()), ctx).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(2)),
        "pods are being created"
    );
    let log = seen.lock().unwrap().clone();
    let calls: Vec<(&str, &str)> = log
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("PATCH", CM),
            ("PATCH", HEADLESS),
            ("PATCH", SVC),
            ("PATCH", STS),
            ("PATCH", PDB),
            ("PATCH", STATUS)
        ],
        "children in dependency order, no GET or LIST"
    );
    let cm: ConfigMap = last_applied(&log, "/configmaps/").unwrap();
    assert_eq!(owner_uid(&cm), UID);
    assert!(
        cm.metadata
            .annotations
            .unwrap()
            .contains_key("cavi.dev/applied-hash")
    );
    let config = ClusterConfig::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
    assert_eq!(config.shards.len(), 3);
    assert_eq!(
        config.shards[2].addr,
        "demo-2.demo-headless.shop.svc.cluster.local:3100"
    );
    let sts: StatefulSet = last_applied(&log, "/statefulsets/").unwrap();
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(rolling.partition, Some(0));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    assert_eq!(pod.topology_spread_constraints.unwrap().len(), 2);
    let pdb: PodDisruptionBudget = last_applied(&log, "/poddisruptionbudgets/").unwrap();
    assert_eq!(
        pdb.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let status = last_status(&log).unwrap();
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(
        status.layout.len(),
        3,
        "the applied layout is recorded in status"
    );
    assert_eq!(status.phase.as_deref(), Some("Progressing"));
    assert_eq!(cond(&status, "Progressing").1, "CreatingPods");
    assert_eq!(metrics.reconciles(), 1);
}

#[tokio::test]
async fn a_steady_state_of_fifty_clusters_makes_no_request() {
    let (ctx, server, mut writers, _) = context();
    let template = cluster_with("c0", THREE);
    let seen = answer_everything(server, &template);
    let mut clusters = Vec::new();
    for i in 0..50 {
        let cluster = cluster_with(&format!("c{i}"), THREE);
        clusters.push(settle(&ctx, &mut writers, &seen, &cluster).await);
    }
    let before = seen.lock().unwrap().len();
    for cluster in &clusters {
        let action = reconcile(Arc::new(cluster.clone()), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }
    let after = seen.lock().unwrap()[before..].to_vec();
    assert!(
        after.is_empty(),
        "a settled cluster is neither read nor written: {after:#?}"
    );
    let status = clusters[7].status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(cond(status, "Ready").0, "True");
}

#[tokio::test]
async fn a_deleted_child_comes_back_and_a_hand_edit_is_set_back() {
    let (ctx, server, mut writers, _) = context();
    let cluster = cluster_with("demo", THREE);
    let seen = answer_everything(server, &cluster);
    let cluster = settle(&ctx, &mut writers, &seen, &cluster).await;

    let cm = ctx.stores.config_maps.state()[0].as_ref().clone();
    remove(&mut writers.config_maps, cm);
    let mut sts = ctx.stores.stateful_sets.state()[0].as_ref().clone();
    sts.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("evil:latest".into());
    put(&mut writers.stateful_sets, sts);

    let before = seen.lock().unwrap().len();
    reconcile(Arc::new(cluster), ctx).await.unwrap();
    let log = seen.lock().unwrap()[before..].to_vec();
    let calls: Vec<&str> = log.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(calls, [CM, STS]);
    let sts: StatefulSet = last_applied(&log, "/statefulsets/").unwrap();
    let image = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("cavi:test"));
}

#[tokio::test]
async fn a_field_removed_from_the_spec_is_removed_from_the_child() {
    let (ctx, server, mut writers, _) = context();
    let with = cluster_with(
        "demo",
        &format!(
            "{THREE}  resources: {{requests: {{cpu: 100m}}}}\n  placement: {{nodeSelector: {{disk: ssd}}}}\n"
        ),
    );
    let seen = answer_everything(server, &with);
    let running = settle(&ctx, &mut writers, &seen, &with).await;
    let mut without = cluster_with("demo", THREE);
    without.status = running.status.clone();
    let before = seen.lock().unwrap().len();
    reconcile(Arc::new(without), ctx).await.unwrap();
    let log = seen.lock().unwrap()[before..].to_vec();
    let sts: StatefulSet =
        last_applied(&log, "/statefulsets/").expect("the intent changed: applied again");
    let pod = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.node_selector, None,
        "the whole object is applied, so the server drops the field"
    );
    assert_eq!(pod.containers[0].resources, None);
}

#[tokio::test]
async fn an_apply_the_api_server_refuses_is_a_condition_an_event_and_a_metric() {
    let (ctx, mut server, _writers, metrics) = context();
    let cluster = cluster_with("demo", THREE);
    let run = tokio::spawn(reconcile(Arc::new(cluster.clone()), ctx.clone()));
    for path in [CM, HEADLESS, SVC] {
        let call = server.next().await;
        call.assert_apply(path);
        call.echo_applied();
    }
    let call = server.next().await;
    call.assert_apply(STS);
    call.respond(
        http::StatusCode::UNPROCESSABLE_ENTITY,
        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
            "message": "StatefulSet.apps \"demo\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit"}),
    );
    let call = server.next().await;
    call.assert(
        http::Method::POST,
        "/apis/events.k8s.io/v1/namespaces/shop/events",
    );
    let event: serde_json::Value = call.json();
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("ApplyFailed"))
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("must be less than or equal to cpu limit")
    );
    call.respond(http::StatusCode::CREATED, &event);
    let call = server.next().await;
    call.assert_apply(STATUS);
    let body: serde_json::Value = call.json();
    let status: CaviClusterStatus = serde_json::from_value(body["status"].clone()).unwrap();
    let (ready, reason, message) = cond(&status, "Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "ApplyFailed"));
    assert!(
        message.contains("StatefulSet demo") && message.contains("cpu limit"),
        "{message}"
    );
    assert_eq!(cond(&status, "Degraded").1, "ApplyFailed");
    call.ok(&with_status(&cluster, Some(status)));
    let error = run.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::ApplyFailed { .. }), "{error}");
    assert_eq!(metrics.failures("ApplyFailed"), 1);
    // Not permanent: retried with capped backoff.
    let action = error_policy(Arc::new(cluster), &error, ctx);
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn invalid_layouts_lost_keys_and_storage_changes_are_refused_without_writing_children() {
    let (ctx, server, mut writers, _) = context();
    let cluster = cluster_with("demo", THREE);
    let seen = answer_everything(server, &cluster);
    let running = settle(&ctx, &mut writers, &seen, &cluster).await;
    for (spec, reason) in [
        (
            r#"  image: cavi:test
  storage: {type: Persistent}
  shards: [{rangeStart: "a", rangeEnd: "m"}, {rangeStart: "h", rangeEnd: "z"}]
"#,
            "InvalidLayout",
        ),
        (
            r#"  image: cavi:test
  storage: {type: Persistent}
  shards: [{rangeStart: "a", rangeEnd: "h"}]
"#,
            "KeysWouldBeLost",
        ),
        (
            r#"  image: cavi:test
  storage: {type: Memory}
  shards: [{rangeStart: "a", rangeEnd: "h"}, {rangeStart: "i", rangeEnd: "p"}, {rangeStart: "q", rangeEnd: "z"}]
"#,
            "StorageWouldChange",
        ),
    ] {
        let mut edited = cluster_with("demo", spec);
        edited.status = running.status.clone();
        let before = seen.lock().unwrap().len();
        let error = reconcile(Arc::new(edited.clone()), ctx.clone())
            .await
            .unwrap_err();
        assert!(error.is_permanent(), "{error}");
        let log = seen.lock().unwrap()[before..].to_vec();
        assert!(
            log.iter()
                .all(|s| s.path.ends_with("/status") || s.path.contains("/events")),
            "{reason}: nothing but the status and an event: {log:#?}"
        );
        let status = last_status(&log).unwrap();
        assert_eq!(cond(&status, "Ready").1, reason);
        assert_eq!(status.phase.as_deref(), Some("Invalid"));
        assert_eq!(
            status.layout.len(),
            3,
            "the running layout is still reported"
        );
        let events = events(&log);
        assert_eq!(events[0].0, "Warning");
        assert_eq!(events[0].1, reason);
        assert_eq!(
            error_policy(Arc::new(edited), &error, ctx.clone()),
            Action::await_change()
        );
    }
}

#[tokio::test]
async fn a_template_change_rolls_one_ordinal_at_a_time_and_status_says_how_far() {
    let (ctx, server, mut writers, _) = context();
    let cluster = cluster_with("demo", THREE);
    let seen = answer_everything(server, &cluster);
    let mut running = settle(&ctx, &mut writers, &seen, &cluster).await;
    let old = template_hash(&ctx.stores.stateful_sets.state()[0]);
    let mut edited = cluster_with("demo", &THREE.replace("cavi:test", "cavi:next"));
    edited.metadata.generation = Some(4);

    // Each step: the partition the operator applies, what the status says.
    let mut partitions = Vec::new();
    for step in 0..7 {
        edited.status = running.status.clone();
        let before = seen.lock().unwrap().len();
        reconcile(Arc::new(edited.clone()), ctx.clone())
            .await
            .unwrap();
        let log = seen.lock().unwrap()[before..].to_vec();
        writers.sync(&log);
        let sts = ctx.stores.stateful_sets.state()[0].as_ref().clone();
        let new = template_hash(&sts);
        assert_ne!(new, old);
        let partition = sts
            .spec
            .as_ref()
            .unwrap()
            .update_strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap()
            .partition
            .unwrap();
        partitions.push(partition);
        let status = last_status(&log).unwrap_or_else(|| running.status.clone().unwrap());
        running = with_status(&running, Some(status.clone()));
        if partition == 0 && status.rollout.is_none() {
            assert_eq!(status.phase.as_deref(), Some("Running"), "step {step}");
            let ready = find_condition(&status, "Ready").unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.observed_generation),
                ("True", Some(4))
            );
            break;
        }
        let (progressing, _, message) = cond(&status, "Progressing");
        assert_eq!(progressing, "True", "step {step}: {message}");
        assert_eq!(
            cond(&status, "Degraded").0,
            "False",
            "a rolling pod is no fault"
        );
        assert_eq!(
            find_condition(&status, "Ready")
                .unwrap()
                .observed_generation,
            Some(3),
            "generation 4 is not live yet"
        );
        // The StatefulSet controller restarts what the partition allows:
        // first down (not ready), then up with the new template.
        for o in 0..3u32 {
            let hash = running_hash(&ctx, "demo", o);
            if i32::try_from(o).unwrap() >= partition && hash != new {
                put(&mut writers.pods, pod("demo", o, &new, false));
                assert!(
                    message.contains(&format!(
                        "{} of 3 pods updated",
                        3 - i32::try_from(o).unwrap() - 1
                    )),
                    "{message}"
                );
            } else if hash == new {
                put(&mut writers.pods, pod("demo", o, &new, true));
            }
        }
    }
    assert_eq!(
        partitions,
        [2, 2, 1, 1, 0, 0, 0],
        "ordinal 2, then 1, then 0, each once the others are ready"
    );
}

#[tokio::test]
async fn a_rollout_step_past_its_deadline_is_reported_once() {
    let (ctx, server, mut writers, _) = context();
    let cluster = cluster_with("demo", THREE);
    let seen = answer_everything(server, &cluster);
    let running = settle(&ctx, &mut writers, &seen, &cluster).await;
    let mut edited = cluster_with("demo", &THREE.replace("cavi:test", "cavi:next"));
    edited.status = running.status.clone();
    reconcile(Arc::new(edited.clone()), ctx.clone())
        .await
        .unwrap();
    let log = seen.lock().unwrap().clone();
    writers.sync(&log);
    // Ordinal 2 restarts and never comes back...
    let new = template_hash(&ctx.stores.stateful_sets.state()[0]);
    put(&mut writers.pods, pod("demo", 2, &new, false));
    edited.status = last_status(&log);
    let before = seen.lock().unwrap().len();
    reconcile(Arc::new(edited.clone()), ctx.clone())
        .await
        .unwrap();
    let log = seen.lock().unwrap()[before..].to_vec();
    let mut status = last_status(&log).unwrap();
    assert_eq!(cond(&status, "Progressing").1, "RollingOut");
    // ...for an hour.
    status.rollout.as_mut().unwrap().step_started = Some("2026-01-01T00:00:00Z".into());
    edited.status = Some(status);
    let before = seen.lock().unwrap().len();
    reconcile(Arc::new(edited.clone()), ctx.clone())
        .await
        .unwrap();
    let log = seen.lock().unwrap()[before..].to_vec();
    let status = last_status(&log).unwrap();
    let (progressing, reason, message) = cond(&status, "Progressing");
    assert_eq!(
        (progressing.as_str(), reason.as_str()),
        ("False", "ProgressDeadlineExceeded")
    );
    assert!(message.contains("demo-2"), "{message}");
    let warnings: Vec<_> = events(&log)
        .into_iter()
        .filter(|e| e.1 == "ProgressDeadlineExceeded")
        .collect();
    assert_eq!(warnings.len(), 1);
    // Reported once: the next reconcile adds no second event.
    edited.status = Some(status);
    let before = seen.lock().unwrap().len();
    reconcile(Arc::new(edited), ctx).await.unwrap();
    let log = seen.lock().unwrap()[before..].to_vec();
    assert!(events(&log).is_empty(), "{:?}", events(&log));
}
