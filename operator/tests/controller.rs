//! The pieces `cavi-operator run` is made of: the CRD check, leader election
//! (against a mocked API server) and the admin endpoints (on a real socket).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cavi_operator::admin::{self, AdminState};
use cavi_operator::controller::{RunError, check_crd};
use cavi_operator::crd::CaviCluster;
use cavi_operator::leader::{LeaderElector, LeaseTiming};
use common::{ApiServer, mock_client};
use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use serde_json::json;

#[tokio::test]
async fn a_missing_crd_fails_with_an_install_hint() {
    let (client, mut server) = mock_client();
    let api: Api<CaviCluster> = Api::all(client);
    let check = tokio::spawn(async move { check_crd(&api).await });
    let call = server.next().await;
    call.assert(Method::GET, "/apis/cavi.dev/v1alpha1/caviclusters");
    assert!(call.query.contains("limit=1"), "{}", call.query);
    call.not_found();
    let error = check.await.unwrap().unwrap_err();
    assert!(matches!(error, RunError::CrdMissing));
    assert_eq!(
        error.to_string(),
        "CRD caviclusters.cavi.dev is not installed: kubectl apply -f deploy/crds/cavicluster.yaml"
    );
}

#[tokio::test]
async fn an_installed_crd_passes_the_check() {
    let (client, mut server) = mock_client();
    let api: Api<CaviCluster> = Api::namespaced(client, "shop");
    let check = tokio::spawn(async move { check_crd(&api).await });
    let call = server.next().await;
    call.assert(
        Method::GET,
        "/apis/cavi.dev/v1alpha1/namespaces/shop/caviclusters",
    );
    call.ok(
        &json!({"apiVersion": "cavi.dev/v1alpha1", "kind": "CaviClusterList",
                    "metadata": {"resourceVersion": "1"}, "items": []}),
    );
    assert!(check.await.unwrap().is_ok());
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/cavi-operator";

fn elector(server_client: kube::Client, identity: &str) -> Arc<LeaderElector> {
    Arc::new(LeaderElector::new(
        Api::namespaced(server_client, "ops"),
        "cavi-operator",
        identity,
        LeaseTiming::default(),
    ))
}

fn lease(holder: &str, transitions: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("cavi-operator".into()),
            namespace: Some("ops".into()),
            resource_version: Some("55".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(1_700_000_000).unwrap())),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}

async fn round(elector: &Arc<LeaderElector>) -> tokio::task::JoinHandle<bool> {
    let elector = elector.clone();
    tokio::spawn(async move { elector.try_acquire_or_renew().await.unwrap() })
}

async fn serve_get(server: &mut ApiServer, lease: &Lease) {
    let call = server.next().await;
    call.assert(Method::GET, LEASE_PATH);
    call.ok(lease);
}

#[tokio::test]
async fn the_first_candidate_creates_the_lease() {
    let (client, mut server) = mock_client();
    let me = elector(client, "op-a");
    let task = round(&me).await;
    let call = server.next().await;
    call.assert(Method::GET, LEASE_PATH);
    call.not_found();
    let call = server.next().await;
    call.assert(
        Method::POST,
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
    );
    let created: Lease = call.json();
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert!(spec.renew_time.is_some() && spec.acquire_time.is_some());
    call.respond(StatusCode::CREATED, &created);
    assert!(task.await.unwrap());
}

#[tokio::test]
async fn a_held_lease_is_left_alone_until_it_expires_then_taken_over() {
    tokio::time::pause();
    let (client, mut server) = mock_client();
    let me = elector(client, "op-b");
    let held = lease("op-a", 2);

    // Fresh in this candidate's eyes: not taken, no write.
    let task = round(&me).await;
    serve_get(&mut server, &held).await;
    assert!(!task.await.unwrap());

    // Still the same record, but less than a lease duration later.
    tokio::time::advance(Duration::from_secs(10)).await;
    let task = round(&me).await;
    serve_get(&mut server, &held).await;
    assert!(!task.await.unwrap());

    // Unchanged for a whole lease duration: the holder is gone.
    tokio::time::advance(Duration::from_secs(6)).await;
    let task = round(&me).await;
    serve_get(&mut server, &held).await;
    let call = server.next().await;
    call.assert(Method::PUT, LEASE_PATH);
    let taken: Lease = call.json();
    assert_eq!(
        taken.metadata.resource_version.as_deref(),
        Some("55"),
        "optimistic lock"
    );
    let spec = taken.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-b"));
    assert_eq!(spec.lease_transitions, Some(3));
    call.ok(&taken);
    assert!(task.await.unwrap());
}

#[tokio::test]
async fn a_renewing_holder_keeps_the_lease_and_a_lost_race_is_not_leadership() {
    tokio::time::pause();
    let (client, mut server) = mock_client();
    let me = elector(client, "op-b");

    // The holder renews between our looks: the record changes, never expires.
    let mut held = lease("op-a", 0);
    for i in 0..4 {
        held.spec.as_mut().unwrap().renew_time = Some(MicroTime(
            Timestamp::from_second(1_700_000_010 + i).unwrap(),
        ));
        let task = round(&me).await;
        serve_get(&mut server, &held).await;
        assert!(!task.await.unwrap());
        tokio::time::advance(Duration::from_secs(10)).await;
    }

    // Expired, but another candidate writes first: 409 means "not leader".
    tokio::time::advance(Duration::from_secs(20)).await;
    let task = round(&me).await;
    serve_get(&mut server, &held).await;
    let call = server.next().await;
    call.assert(Method::PUT, LEASE_PATH);
    call.respond(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the object has been modified", "reason": "Conflict", "code": 409}),
    );
    assert!(!task.await.unwrap());
}

#[tokio::test]
async fn the_holder_renews_its_own_lease() {
    let (client, mut server) = mock_client();
    let me = elector(client, "op-a");
    let task = round(&me).await;
    serve_get(&mut server, &lease("op-a", 1)).await;
    let call = server.next().await;
    call.assert(Method::PUT, LEASE_PATH);
    let renewed: Lease = call.json();
    let spec = renewed.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-a"));
    assert_eq!(
        spec.lease_transitions,
        Some(1),
        "a renewal is no transition"
    );
    assert_ne!(
        spec.renew_time,
        lease("op-a", 1).spec.unwrap().renew_time,
        "renewTime moves"
    );
    call.ok(&renewed);
    assert!(task.await.unwrap());
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AdminState::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(admin::serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    state.ready.store(true, Ordering::Relaxed);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    state.metrics.observe(Duration::from_millis(30), None);
    state
        .metrics
        .observe(Duration::from_millis(700), Some("InvalidLayout"));
    state.metrics.set_leader(true);
    let response = get("/metrics").await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for line in [
        "cavi_operator_reconciles_total 2",
        "cavi_operator_reconcile_failures_total{reason=\"InvalidLayout\"} 1",
        "cavi_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1",
        "cavi_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 1",
        "cavi_operator_reconcile_duration_seconds_bucket{le=\"1.0\"} 2",
        "cavi_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
        "cavi_operator_reconcile_duration_seconds_count 2",
        "# TYPE cavi_operator_reconcile_duration_seconds histogram",
        "cavi_operator_leader 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
