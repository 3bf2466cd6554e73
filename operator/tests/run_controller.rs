//! `cavi-operator run` as a process, against a stand-in API server on
//! loopback that serves one CaviCluster: the binary elects itself leader,
//! watches the CaviCluster and its children (filtered by label), applies
//! every child under its field manager, patches the status, reports it on
//! `/metrics`, and on SIGTERM stops and gives the lease up.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cavi_node::testkit::process::free_port;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    lease: Arc<Mutex<Option<Value>>>,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn cluster() -> Value {
    json!({
        "apiVersion": "cavi.dev/v1alpha1", "kind": "CaviCluster",
        "metadata": {"name": "demo", "namespace": "shop", "uid": "11111111-2222-4333-8444-555555555555",
                     "generation": 1, "resourceVersion": "5"},
        "spec": {"image": "cavi:test", "shards": [{"rangeEnd": "m"}, {"rangeStart": "n"}]}
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

fn list(kind: &str, items: Vec<Value>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items}),
    )
}

/// A watch that never reports anything (and never ends).
fn silent_watch() -> Response {
    let stream = futures::stream::pending::<Result<Bytes, std::io::Error>>();
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Echoes a written object back with the fields the server sets.
fn stored(mut body: Value) -> Response {
    body["metadata"]["uid"] = json!("child-uid");
    body["metadata"]["resourceVersion"] = json!("11");
    json_response(StatusCode::OK, &body)
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
/// What the operator lists and watches besides CaviClusters.
const CHILDREN: [&str; 6] = [
    "/api/v1/configmaps",
    "/api/v1/services",
    "/apis/apps/v1/statefulsets",
    "/apis/policy/v1/poddisruptionbudgets",
    "/apis/networking.k8s.io/v1/networkpolicies",
    "/api/v1/pods",
];
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/cavi-operator";

async fn api(State(fake): State<Fake>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    fake.seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    let watch = query.contains("watch=true");
    match (parts.method, path.as_str()) {
        (Method::GET, "/apis/cavi.dev/v1alpha1/caviclusters") if watch => silent_watch(),
        (Method::GET, "/apis/cavi.dev/v1alpha1/caviclusters") => {
            list("CaviClusterList", vec![cluster()])
        }
        (Method::GET, p) if CHILDREN.contains(&p) && watch => silent_watch(),
        (Method::GET, p) if CHILDREN.contains(&p) => list("List", vec![]),
        (Method::PATCH, "/apis/cavi.dev/v1alpha1/namespaces/shop/caviclusters/demo/status") => {
            let mut c = cluster();
            c["status"] = body["status"].clone();
            json_response(StatusCode::OK, &c)
        }
        (Method::PATCH, _) => stored(body),
        (Method::GET, LEASE) => match fake.lease.lock().unwrap().clone() {
            Some(lease) => json_response(StatusCode::OK, &lease),
            None => not_found(),
        },
        (Method::POST, LEASES) => {
            let mut created = body;
            created["metadata"]["resourceVersion"] = json!("1");
            *fake.lease.lock().unwrap() = Some(created.clone());
            json_response(StatusCode::CREATED, &created)
        }
        (Method::PUT, LEASE) => {
            *fake.lease.lock().unwrap() = Some(body.clone());
            json_response(StatusCode::OK, &body)
        }
        _ => not_found(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reconciles_a_cluster_and_releases_the_lease_on_sigterm() {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(api).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{api_addr}'}}\n\
             users:\n- name: fake\n  user: {{token: not-a-secret}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: ops}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("operator.log");
    // Only the stand-in server is reachable: never the developer's cluster.
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi-operator"))
        .args(["run", "--admin-addr", &admin, "--identity", "op-test"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .env("RUST_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env_remove("CAVI_OPERATOR_WATCH_NAMESPACE")
        .env_remove("CAVI_OPERATOR_NO_LEADER_ELECTION")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Poll /metrics until one reconcile is counted.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Some(status) = operator.try_wait().unwrap() {
            panic!(
                "operator exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Ok(r) = http.get(format!("http://{admin}/metrics")).send().await {
            let text = r.text().await.unwrap();
            if text
                .lines()
                .any(|l| l == "cavi_operator_reconciles_total 1")
            {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no reconcile within 30 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metrics.lines().any(|l| l == "cavi_operator_leader 1"),
        "{metrics}"
    );
    assert_eq!(
        http.get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let seen = fake.seen();
    // Leader first: the Lease is created in the client's namespace.
    let lease = seen
        .iter()
        .position(|s| s.method == Method::POST && s.path == LEASES)
        .expect("the lease was never created");
    assert_eq!(seen[lease].body["spec"]["holderIdentity"], "op-test");
    // Children are watched by the operator's label, pods by the node
    // label: the reconciler reads the reflector stores, never GETs.
    for path in CHILDREN {
        let watch = seen
            .iter()
            .find(|s| s.path == path && s.query.contains("watch=true"))
            .unwrap_or_else(|| panic!("no watch on {path}"));
        let label = if path.ends_with("/pods") {
            "labelSelector=app.kubernetes.io%2Fname%3Dcavi"
        } else {
            "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dcavi-operator"
        };
        assert!(watch.query.contains(label), "{path}: {}", watch.query);
    }
    assert!(
        !seen
            .iter()
            .any(|s| s.method == Method::GET && s.path.starts_with("/api/v1/namespaces/shop/")),
        "no reads beyond the watches"
    );
    // Every child applied under the one field manager, in order, after
    // leadership was won.
    let applies: Vec<(usize, &Seen)> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.method == Method::PATCH && !s.path.ends_with("/status"))
        .collect();
    let paths: Vec<&str> = applies.iter().map(|(_, s)| s.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/api/v1/namespaces/shop/configmaps/demo-config",
            "/api/v1/namespaces/shop/services/demo-headless",
            "/api/v1/namespaces/shop/services/demo",
            "/apis/apps/v1/namespaces/shop/statefulsets/demo",
            "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/demo",
        ]
    );
    for (i, s) in &applies {
        assert!(*i > lease, "{} applied before the lease was held", s.path);
        assert!(
            s.query.contains("fieldManager=cavi-operator"),
            "{}",
            s.query
        );
        assert_eq!(
            s.body["metadata"]["ownerReferences"][0]["uid"],
            "11111111-2222-4333-8444-555555555555"
        );
    }
    let status = seen
        .iter()
        .find(|s| s.path.ends_with("/caviclusters/demo/status"))
        .expect("no status patch");
    assert_eq!(status.body["kind"], "CaviCluster");
    assert_eq!(status.body["status"]["shardCount"], 2);
    assert_eq!(status.body["status"]["phase"], "Progressing");

    // SIGTERM: the operator stops and hands the lease back.
    let pid = operator.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), operator.wait())
        .await
        .expect("the operator did not stop on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");
    let released = fake
        .seen()
        .into_iter()
        .rev()
        .find(|s| s.method == Method::PUT && s.path == LEASE)
        .expect("the lease was not released");
    assert!(
        released.body["spec"]
            .get("holderIdentity")
            .is_none_or(Value::is_null)
    );
}
