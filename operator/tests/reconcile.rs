//! The reconciler against a mocked API server: every request it makes is
//! asserted in order (method, path, field manager, body), and the test fails
//! on any request it did not expect, including a write in steady state.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use cavi_node::config::ClusterConfig;
use cavi_operator::admin::Metrics;
use cavi_operator::build::{CONFIG_KEY, Children, Names};
use cavi_operator::crd::{CaviCluster, CaviClusterStatus};
use cavi_operator::reconcile::{Context, Error, error_policy, reconcile};
use cavi_operator::status::{self, Observed, find_condition};
use common::{ApiServer, mock_client};
use http::{Method, StatusCode};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, PodStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use serde::Serialize;
use serde_json::{Value, json};

const NS: &str = "shop";
const UID: &str = "0b5e2c9a-1111-4222-8333-444455556666";

fn cluster(shards: &str) -> CaviCluster {
    serde_yaml::from_str(&format!(
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\n\
         metadata: {{name: demo, namespace: {NS}, uid: {UID}, generation: 3, resourceVersion: '7'}}\n\
         spec:\n  image: cavi:test\n  shards: {shards}\n"
    ))
    .unwrap()
}

fn three_shards() -> CaviCluster {
    cluster(
        r#"[{rangeStart: "a", rangeEnd: "h"}, {rangeStart: "i", rangeEnd: "p"}, {rangeStart: "q", rangeEnd: "z"}]"#,
    )
}

fn names() -> Names {
    Names {
        cluster: "demo".into(),
        namespace: NS.into(),
    }
}

fn context() -> (Arc<Context>, ApiServer, Arc<Metrics>) {
    let (client, server) = mock_client();
    let metrics = Arc::new(Metrics::default());
    let ctx = Context::new(
        client,
        Reporter {
            controller: "cavi-operator".into(),
            instance: Some("test".into()),
        },
        metrics.clone(),
    );
    (Arc::new(ctx), server, metrics)
}

const CM_PATH: &str = "/api/v1/namespaces/shop/configmaps/demo-config";
const HEADLESS_PATH: &str = "/api/v1/namespaces/shop/services/demo-headless";
const SVC_PATH: &str = "/api/v1/namespaces/shop/services/demo";
const STS_PATH: &str = "/apis/apps/v1/namespaces/shop/statefulsets/demo";
const PODS_PATH: &str = "/api/v1/namespaces/shop/pods";
const STATUS_PATH: &str = "/apis/cavi.dev/v1alpha1/namespaces/shop/caviclusters/demo/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

/// What the API server holds for a child once applied: the object plus
/// fields the server and other controllers add.
fn stored<K: Serialize>(obj: &K, extra: Value) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["metadata"]["resourceVersion"] = json!("42");
    v["metadata"]["uid"] = json!("child-uid");
    v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    merge(&mut v, extra);
    v
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// The CaviCluster the API server returns after a status apply.
fn stored_cluster(status_apply: &Value) -> CaviCluster {
    let mut cluster = three_shards();
    cluster.status = Some(serde_json::from_value(status_apply["status"].clone()).unwrap());
    cluster
}

/// A StatefulSet whose rollout is complete.
fn rolled_out(sts: &StatefulSet) -> StatefulSet {
    let mut sts = sts.clone();
    sts.metadata.generation = Some(1);
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    sts.status = Some(StatefulSetStatus {
        observed_generation: Some(1),
        replicas,
        ready_replicas: Some(replicas),
        updated_replicas: Some(replicas),
        current_revision: Some("demo-abc".into()),
        update_revision: Some("demo-abc".into()),
        ..StatefulSetStatus::default()
    });
    sts
}

fn pod(name: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

fn pod_list(pods: &[Pod]) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": pods})
}

/// The objects of a healthy, running cluster as the API server returns them.
struct World {
    config_map: Value,
    headless: Value,
    service: Value,
    stateful_set: StatefulSet,
    pods: Vec<Pod>,
}

impl World {
    fn running(cluster: &CaviCluster) -> Self {
        let children = Children::build(cluster, NS).unwrap();
        let n = children.config.shards.len();
        Self {
            config_map: stored(&children.config_map, json!({})),
            headless: stored(
                &children.headless_service,
                json!({"spec": {"clusterIPs": ["None"], "type": "ClusterIP", "sessionAffinity": "None"}}),
            ),
            service: stored(
                &children.client_service,
                json!({"spec": {"clusterIP": "10.96.0.17", "clusterIPs": ["10.96.0.17"], "sessionAffinity": "None"}}),
            ),
            stateful_set: rolled_out(&children.stateful_set),
            pods: (0..n).map(|i| pod(&format!("demo-{i}"), true)).collect(),
        }
    }

    /// The status the operator stored after seeing this world.
    fn status_of(&self, cluster: &CaviCluster) -> CaviClusterStatus {
        let children = Children::build(cluster, NS).unwrap();
        status::compute(
            &names(),
            &Observed {
                generation: cluster.metadata.generation,
                previous: None,
                layout: &children.config,
                invalid: None,
                stateful_set: Some(&self.stateful_set),
                pods: &self.pods,
            },
            Timestamp::from_second(1_700_000_000).unwrap(),
        )
    }

    /// Answers the four GETs every reconcile starts with.
    async fn serve_gets(&self, server: &mut ApiServer) {
        let call = server.next().await;
        call.assert(Method::GET, CM_PATH);
        call.ok(&self.config_map);
        let call = server.next().await;
        call.assert(Method::GET, HEADLESS_PATH);
        call.ok(&self.headless);
        let call = server.next().await;
        call.assert(Method::GET, SVC_PATH);
        call.ok(&self.service);
        let call = server.next().await;
        call.assert(Method::GET, STS_PATH);
        call.ok(&self.stateful_set);
    }

    async fn serve_pods(&self, server: &mut ApiServer) {
        let call = server.next().await;
        call.assert(Method::GET, PODS_PATH);
        assert!(
            call.query.contains("labelSelector=app.kubernetes.io%2Finstance%3Ddemo%2Capp.kubernetes.io%2Fname%3Dcavi"),
            "{}",
            call.query
        );
        call.ok(&pod_list(&self.pods));
    }
}

#[tokio::test]
async fn first_reconcile_applies_every_child_then_the_status() {
    let (ctx, mut server, metrics) = context();
    let cluster = three_shards();
    let expected = Children::build(&cluster, NS).unwrap();
    let run = tokio::spawn(reconcile(Arc::new(cluster.clone()), ctx));

    for path in [CM_PATH, HEADLESS_PATH, SVC_PATH, STS_PATH] {
        let call = server.next().await;
        call.assert(Method::GET, path);
        call.not_found();
    }

    let call = server.next().await;
    call.assert_apply(CM_PATH);
    let cm: ConfigMap = call.json();
    assert_eq!(cm, expected.config_map);
    let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.uid.as_str(), owner.controller), (UID, Some(true)));
    let config = ClusterConfig::from_yaml(&cm.data.as_ref().unwrap()[CONFIG_KEY]).unwrap();
    assert_eq!(config.shards.len(), 3);
    call.echo_applied();

    let call = server.next().await;
    call.assert_apply(HEADLESS_PATH);
    assert_eq!(call.json::<Service>(), expected.headless_service);
    call.echo_applied();

    let call = server.next().await;
    call.assert_apply(SVC_PATH);
    assert_eq!(call.json::<Service>(), expected.client_service);
    call.echo_applied();

    let call = server.next().await;
    call.assert_apply(STS_PATH);
    let sts: StatefulSet = call.json();
    assert_eq!(sts, expected.stateful_set);
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(3));
    call.echo_applied();

    let call = server.next().await;
    call.assert(Method::GET, PODS_PATH);
    call.ok(&pod_list(&[]));

    let call = server.next().await;
    call.assert_apply(STATUS_PATH);
    let body: Value = call.json();
    assert_eq!(body["apiVersion"], "cavi.dev/v1alpha1");
    assert_eq!(body["kind"], "CaviCluster");
    assert!(
        body.get("spec").is_none(),
        "a status apply must not claim spec fields"
    );
    let status: CaviClusterStatus = serde_json::from_value(body["status"].clone()).unwrap();
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(status.shard_count, 3);
    assert_eq!(status.ready_shards, 0);
    assert_eq!(status.phase.as_deref(), Some("Progressing"));
    assert_eq!(find_condition(&status, "Ready").unwrap().status, "False");
    assert_eq!(
        find_condition(&status, "Progressing").unwrap().status,
        "True"
    );
    let mut updated = cluster.clone();
    updated.status = Some(status);
    call.ok(&updated);

    let action = run.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    server.assert_done().await;
    assert_eq!(metrics.reconciles(), 1);
}

#[tokio::test]
async fn steady_state_writes_nothing() {
    let (ctx, mut server, metrics) = context();
    let mut cluster = three_shards();
    let world = World::running(&cluster);
    cluster.status = Some(world.status_of(&cluster));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    world.serve_pods(&mut server).await;

    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
    assert_eq!(metrics.reconciles(), 1);
}

#[tokio::test]
async fn a_deleted_child_is_recreated_and_nothing_else_is_written() {
    let (ctx, mut server, _) = context();
    let mut cluster = three_shards();
    let world = World::running(&cluster);
    cluster.status = Some(world.status_of(&cluster));
    let expected = Children::build(&cluster, NS).unwrap();
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    let call = server.next().await;
    call.assert(Method::GET, CM_PATH);
    call.not_found();
    let call = server.next().await;
    call.assert(Method::GET, HEADLESS_PATH);
    call.ok(&world.headless);
    let call = server.next().await;
    call.assert(Method::GET, SVC_PATH);
    call.ok(&world.service);
    let call = server.next().await;
    call.assert(Method::GET, STS_PATH);
    call.ok(&world.stateful_set);

    let call = server.next().await;
    call.assert_apply(CM_PATH);
    assert_eq!(call.json::<ConfigMap>(), expected.config_map);
    call.echo_applied();

    world.serve_pods(&mut server).await;
    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}

#[tokio::test]
async fn a_hand_edited_child_is_set_back() {
    let (ctx, mut server, _) = context();
    let mut cluster = three_shards();
    let mut world = World::running(&cluster);
    cluster.status = Some(world.status_of(&cluster));
    let expected = Children::build(&cluster, NS).unwrap();
    // Someone ran `kubectl edit` on the StatefulSet and the client Service.
    let pod_spec = world
        .stateful_set
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap();
    pod_spec.containers[0].image = Some("evil:latest".into());
    world.service["spec"]["ports"][0]["port"] = json!(80);
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    let call = server.next().await;
    call.assert_apply(SVC_PATH);
    assert_eq!(call.json::<Service>(), expected.client_service);
    call.echo_applied();
    let call = server.next().await;
    call.assert_apply(STS_PATH);
    let sts: StatefulSet = call.json();
    let image = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("cavi:test"));
    // The server answers with the rollout it starts.
    call.ok(&world.stateful_set);

    world.serve_pods(&mut server).await;
    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}

#[tokio::test]
async fn status_follows_pod_readiness() {
    let (ctx, mut server, _) = context();
    let mut cluster = three_shards();
    let mut world = World::running(&cluster);
    cluster.status = Some(world.status_of(&cluster));
    assert_eq!(cluster.status.as_ref().unwrap().ready_shards, 3);
    // Shard 1's pod died: its readiness probe fails.
    world.pods[1] = pod("demo-1", false);
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    world.serve_pods(&mut server).await;
    let call = server.next().await;
    call.assert_apply(STATUS_PATH);
    let body: Value = call.json();
    let status: CaviClusterStatus = serde_json::from_value(body["status"].clone()).unwrap();
    assert_eq!(status.ready_shards, 2);
    assert_eq!(status.phase.as_deref(), Some("Degraded"));
    let ready = find_condition(&status, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ShardsNotReady")
    );
    assert!(ready.message.contains("demo-1"), "{}", ready.message);
    assert_eq!(find_condition(&status, "Degraded").unwrap().status, "True");
    assert!(!status.shards[1].ready);
    assert_eq!(status.shards[1].pod, "demo-1");
    call.ok(&stored_cluster(&body));

    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}

/// Serves an invalid-spec reconcile: GETs, pods, the Warning event and the
/// status patch; returns the status and the event.
async fn serve_refusal(world: &World, server: &mut ApiServer) -> (CaviClusterStatus, Value) {
    world.serve_gets(server).await;
    world.serve_pods(server).await;
    let call = server.next().await;
    call.assert(Method::POST, EVENTS_PATH);
    let event: Value = call.json();
    call.ok(&event);
    let call = server.next().await;
    call.assert_apply(STATUS_PATH);
    let body: Value = call.json();
    call.ok(&stored_cluster(&body));
    (
        serde_json::from_value(body["status"].clone()).unwrap(),
        event,
    )
}

#[tokio::test]
async fn an_overlapping_spec_is_refused_without_touching_the_cluster() {
    let (ctx, mut server, metrics) = context();
    let running = three_shards();
    let world = World::running(&running);
    let mut cluster =
        cluster(r#"[{rangeStart: "a", rangeEnd: "m"}, {rangeStart: "k", rangeEnd: "z"}]"#);
    cluster.status = Some(world.status_of(&running));
    let run = tokio::spawn(reconcile(Arc::new(cluster.clone()), ctx.clone()));

    let (status, event) = serve_refusal(&world, &mut server).await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidLayout");
    assert_eq!(event["regarding"]["kind"], "CaviCluster");
    assert_eq!(event["regarding"]["uid"], UID);
    assert!(
        event["note"].as_str().unwrap().contains("overlap"),
        "{event}"
    );
    let ready = find_condition(&status, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidLayout")
    );
    assert!(ready.message.contains("overlap"), "{}", ready.message);
    assert_eq!(status.phase.as_deref(), Some("Invalid"));
    // The shards still running are reported from the applied layout.
    assert_eq!(status.shard_count, 3);
    assert_eq!(status.ready_shards, 3);

    let error = run.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::InvalidSpec(_)), "{error}");
    assert!(error.is_permanent());
    assert_eq!(
        error_policy(Arc::new(cluster), &error, ctx.clone()),
        Action::await_change()
    );
    drop(ctx);
    server.assert_done().await;
    assert_eq!(metrics.failures("InvalidLayout"), 1);
}

#[tokio::test]
async fn a_change_that_moves_keys_is_refused() {
    let (ctx, mut server, metrics) = context();
    let running = three_shards();
    let world = World::running(&running);
    // Shard 0 would give "e".."h" to shard 1.
    let mut cluster = cluster(
        r#"[{rangeStart: "a", rangeEnd: "d"}, {rangeStart: "e", rangeEnd: "p"}, {rangeStart: "q", rangeEnd: "z"}]"#,
    );
    cluster.status = Some(world.status_of(&running));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    let (status, event) = serve_refusal(&world, &mut server).await;
    assert_eq!(event["reason"], "KeysWouldMove");
    let ready = find_condition(&status, "Ready").unwrap();
    assert_eq!(ready.reason, "KeysWouldMove");
    assert!(ready.message.contains("shard 0"), "{}", ready.message);

    assert!(matches!(run.await.unwrap(), Err(Error::InvalidSpec(_))));
    server.assert_done().await;
    assert_eq!(metrics.failures("KeysWouldMove"), 1);
}

#[tokio::test]
async fn appending_a_shard_for_unowned_keys_is_applied() {
    let (ctx, mut server, _) = context();
    let running = three_shards();
    let world = World::running(&running);
    let mut cluster = cluster(
        r#"[{rangeStart: "a", rangeEnd: "h"}, {rangeStart: "i", rangeEnd: "p"}, {rangeStart: "q", rangeEnd: "z"}, {rangeStart: "{"}]"#,
    );
    cluster.status = Some(world.status_of(&running));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    let call = server.next().await;
    call.assert_apply(CM_PATH);
    call.echo_applied();
    let call = server.next().await;
    call.assert_apply(STS_PATH);
    let sts: StatefulSet = call.json();
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(4));
    let old_hash = &world
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["cavi.dev/config-hash"];
    let new_hash = &sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["cavi.dev/config-hash"];
    assert_ne!(old_hash, new_hash, "a new layout rolls the pods");
    call.echo_applied();
    world.serve_pods(&mut server).await;
    let call = server.next().await;
    call.assert_apply(STATUS_PATH);
    let body: Value = call.json();
    assert_eq!(body["status"]["shardCount"], 4);
    call.ok(&stored_cluster(&body));

    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}

#[tokio::test]
async fn a_transient_api_error_is_retried_with_backoff() {
    let (ctx, mut server, metrics) = context();
    let cluster = three_shards();
    let run = tokio::spawn(reconcile(Arc::new(cluster.clone()), ctx.clone()));

    let call = server.next().await;
    call.assert(Method::GET, CM_PATH);
    call.respond(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "etcd is sad", "reason": "InternalError", "code": 500}),
    );
    let error = run.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Kube(_)), "{error}");
    assert!(!error.is_permanent());
    let cluster = Arc::new(cluster);
    let first = error_policy(cluster.clone(), &error, ctx.clone());
    let second = error_policy(cluster.clone(), &error, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    drop(ctx);
    server.assert_done().await;
    assert_eq!(metrics.failures("KubeApi"), 1);
}

fn with_storage(mut cluster: CaviCluster, storage: &str) -> CaviCluster {
    cluster.spec.storage = serde_yaml::from_str(storage).unwrap();
    cluster
}

const DISK_1GI: &str = "{type: Persistent, persistent: {size: 1Gi, storageClassName: fast}}";

#[tokio::test]
async fn a_storage_kind_change_is_refused_without_touching_the_stateful_set() {
    let (ctx, mut server, metrics) = context();
    let running = three_shards();
    let world = World::running(&running);
    let mut cluster = with_storage(three_shards(), DISK_1GI);
    cluster.status = Some(world.status_of(&running));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    // GETs, pods, the event, the status: no apply of any child.
    let (status, event) = serve_refusal(&world, &mut server).await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "StorageWouldChange");
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("from Memory to Persistent"), "{note}");
    let ready = find_condition(&status, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "StorageWouldChange")
    );
    assert!(
        ready.message.contains("from Memory to Persistent"),
        "{}",
        ready.message
    );
    assert_eq!(status.phase.as_deref(), Some("Invalid"));
    assert_eq!(
        status.ready_shards, 3,
        "the running pods are still reported"
    );

    let error = run.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::InvalidSpec(_)), "{error}");
    server.assert_done().await;
    assert_eq!(metrics.failures("StorageWouldChange"), 1);
}

#[tokio::test]
async fn a_size_change_is_refused_without_touching_the_stateful_set() {
    let (ctx, mut server, metrics) = context();
    let running = with_storage(three_shards(), DISK_1GI);
    let world = World::running(&running);
    let mut cluster = with_storage(
        three_shards(),
        "{type: Persistent, persistent: {size: 2Gi, storageClassName: fast}}",
    );
    cluster.status = Some(world.status_of(&running));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    let (status, event) = serve_refusal(&world, &mut server).await;
    assert_eq!(event["reason"], "StorageWouldChange");
    let ready = find_condition(&status, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "StorageWouldChange")
    );
    assert!(
        ready.message.contains("size would change from 1Gi to 2Gi"),
        "{}",
        ready.message
    );

    assert!(matches!(run.await.unwrap(), Err(Error::InvalidSpec(_))));
    server.assert_done().await;
    assert_eq!(metrics.failures("StorageWouldChange"), 1);
}

#[tokio::test]
async fn a_persistent_cluster_whose_storage_is_unchanged_writes_nothing() {
    let (ctx, mut server, _) = context();
    let mut cluster = with_storage(three_shards(), DISK_1GI);
    let world = World::running(&cluster);
    cluster.status = Some(world.status_of(&cluster));
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    world.serve_pods(&mut server).await;

    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}

#[tokio::test]
async fn a_retention_policy_change_is_applied() {
    let (ctx, mut server, _) = context();
    let running = with_storage(three_shards(), DISK_1GI);
    let world = World::running(&running);
    let mut cluster = with_storage(
        three_shards(),
        "{type: Persistent, persistent: {size: 1Gi, storageClassName: fast, retentionPolicy: {whenDeleted: Delete}}}",
    );
    cluster.status = Some(world.status_of(&running));
    let expected = Children::build(&cluster, NS).unwrap();
    let run = tokio::spawn(reconcile(Arc::new(cluster), ctx));

    world.serve_gets(&mut server).await;
    let call = server.next().await;
    call.assert_apply(STS_PATH);
    let sts: StatefulSet = call.json();
    assert_eq!(sts, expected.stateful_set);
    let spec = sts.spec.as_ref().unwrap();
    let policy = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(policy.when_deleted.as_deref(), Some("Delete"));
    assert_eq!(policy.when_scaled.as_deref(), Some("Retain"));
    // The claim template the running StatefulSet has, unchanged.
    assert_eq!(
        spec.volume_claim_templates,
        world
            .stateful_set
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
    );
    call.ok(&rolled_out(&sts));

    world.serve_pods(&mut server).await;
    assert!(run.await.unwrap().is_ok());
    server.assert_done().await;
}
