//! The `cavi-operator` binary's offline subcommands, and the committed CRD.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use cavi_node::config::ClusterConfig;
use cavi_operator::crd::{CRD_PATH, crd_yaml};

const REGENERATE: &str =
    "regenerate it with: cargo run -q -p cavi-operator -- crd > deploy/crds/cavicluster.yaml";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn committed_crd() -> String {
    let path = repo_root().join(CRD_PATH);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; {REGENERATE}", path.display()))
}

fn operator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cavi-operator"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn committed_crd_matches_the_rust_types() {
    assert!(
        crd_yaml().unwrap() == committed_crd(),
        "{CRD_PATH} is out of date with the CaviCluster type; {REGENERATE}"
    );
}

#[test]
fn crd_subcommand_prints_exactly_the_committed_crd() {
    let out = operator(&["crd"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8(out.stdout).unwrap() == committed_crd(),
        "`cavi-operator crd` differs from {CRD_PATH}; {REGENERATE}"
    );
}

#[test]
fn crd_declares_names_columns_status_and_cel_rules() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&crd_yaml().unwrap()).unwrap();
    assert_eq!(crd["metadata"]["name"], "caviclusters.cavi.dev");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "cavi.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "CaviCluster");
    assert_eq!(spec["names"]["shortNames"][0], "cavi");
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_mapping());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        vec!["Shards", "Ready", "Phase", "Rebalance", "Storage", "Age"]
    );
    // The name rule sits on the root, where metadata is visible.
    let root_rules =
        serde_yaml::to_string(&version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"])
            .unwrap();
    assert!(
        root_rules.contains("size(self.metadata.name) <= 52"),
        "{root_rules}"
    );
    assert_eq!(
        cavi_spec_enum(&version["schema"]["openAPIV3Schema"]["properties"]["spec"]),
        serde_yaml::from_str::<serde_yaml::Value>("[Always, IfNotPresent, Never]").unwrap()
    );

    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let cavi_spec = &schema["spec"];
    let rules = serde_yaml::to_string(&cavi_spec["x-kubernetes-validations"]).unwrap();
    assert!(rules.contains("size(self.shards) >= 1"), "{rules}");
    assert!(rules.contains("size(self.shards) <= 64"), "{rules}");
    let shards = &cavi_spec["properties"]["shards"];
    assert_eq!(shards["maxItems"], 64);
    let item_rule = shards["items"]["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap();
    assert_eq!(
        item_rule,
        "!has(self.rangeEnd) || (has(self.rangeStart) ? self.rangeStart : '') <= self.rangeEnd"
    );
    // Every spec field is documented.
    for (field, prop) in cavi_spec["properties"].as_mapping().unwrap() {
        assert!(
            prop["description"].as_str().is_some_and(|d| !d.is_empty()),
            "spec.{field:?} has no description"
        );
    }
    let storage = &cavi_spec["properties"]["storage"];
    assert_eq!(
        storage["properties"]["type"]["enum"],
        serde_yaml::from_str::<serde_yaml::Value>("[Memory, Persistent]").unwrap()
    );
    assert_eq!(storage["default"]["type"], "Persistent");
    let storage_rules = serde_yaml::to_string(&storage["x-kubernetes-validations"]).unwrap();
    assert!(
        storage_rules.contains("has(self.persistent)") && storage_rules.contains("oldSelf.type"),
        "{storage_rules}"
    );
    let persistent = &storage["properties"]["persistent"];
    assert_eq!(persistent["properties"]["size"]["default"], "1Gi");
    assert_eq!(
        persistent["properties"]["size"]["x-kubernetes-int-or-string"],
        true
    );
    let retention = &persistent["properties"]["retentionPolicy"]["properties"];
    for field in ["whenDeleted", "whenScaled"] {
        assert_eq!(retention[field]["default"], "Retain", "{field}");
    }
    assert!(
        cavi_spec["properties"]["image"]["default"].is_null(),
        "no default image in the CRD: the operator's own is the default"
    );
    let status = &schema["status"]["properties"];
    for field in [
        "observedGeneration",
        "readyShards",
        "shards",
        "phase",
        "conditions",
        "layout",
        "targetLayout",
        "migrations",
        "rebalance",
        "epoch",
        "rollout",
    ] {
        assert!(status[field].is_mapping(), "status.{field} missing");
    }
}

#[test]
fn render_prints_the_children_of_a_file_in_the_default_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.yaml");
    std::fs::write(
        &file,
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata:\n  name: demo\nspec:\n  shards:\n    - {rangeStart: a, rangeEnd: m}\n    - {rangeStart: n, rangeEnd: z}\n",
    )
    .unwrap();
    let out = operator(&["render", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            "ConfigMap",
            "Service",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget"
        ]
    );
    for doc in &docs {
        assert_eq!(doc["metadata"]["namespace"], "default");
    }
    let config =
        ClusterConfig::from_yaml(docs[0]["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        config.shards[1].addr,
        "demo-1.demo-headless.default.svc.cluster.local:3100"
    );
}

#[test]
fn render_refuses_other_kinds_invalid_layouts_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap();
    let out = operator(&["render", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a Pod, not a CaviCluster"), "{err}");

    let overlap = dir.path().join("overlap.yaml");
    std::fs::write(
        &overlap,
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {name: bad}\nspec:\n  shards: [{rangeStart: a, rangeEnd: m}, {rangeStart: k}]\n",
    )
    .unwrap();
    let out = operator(&["render", "-f", overlap.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing is rendered for a refused spec"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CaviCluster bad would be refused (InvalidLayout)") && err.contains("overlap"),
        "{err}"
    );

    let bad_size = dir.path().join("bad-size.yaml");
    std::fs::write(
        &bad_size,
        "apiVersion: cavi.dev/v1alpha1\nkind: CaviCluster\nmetadata: {name: disk}\nspec:\n  shards: [{rangeEnd: m}]\n  storage: {type: Persistent, persistent: {size: 10GB}}\n",
    )
    .unwrap();
    let out = operator(&["render", "-f", bad_size.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CaviCluster disk would be refused (InvalidStorage)")
            && err.contains("\"10GB\" is not a Kubernetes quantity"),
        "{err}"
    );

    let out = operator(&["render", "-f", "/nonexistent/cluster.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read /nonexistent/cluster.yaml"),
        "{err}"
    );
}

/// A stand-in API server that knows no CaviCluster: every request is 404.
async fn api_server_without_the_crd() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::NOT_FOUND,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn run_without_the_crd_exits_with_the_install_hint() {
    let addr = api_server_without_the_crd().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{addr}'}}\n\
             users:\n- name: fake\n  user: {{token: not-a-secret}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: ops}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    // The stand-in server and nothing else: never the developer's cluster.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi-operator"))
        .args(["run", "--admin-addr", "127.0.0.1:0", "--no-leader-election"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("CAVI_OPERATOR_ADMIN_ADDR")
        .env_remove("CAVI_OPERATOR_NO_LEADER_ELECTION")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .expect("`cavi-operator run` did not exit without its CRD")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "CRD caviclusters.cavi.dev is not installed: kubectl apply -f deploy/crds/cavicluster.yaml"
        ),
        "{err}"
    );
}

/// The `enum` of `spec.imagePullPolicy`.
fn cavi_spec_enum(spec: &serde_yaml::Value) -> serde_yaml::Value {
    spec["properties"]["imagePullPolicy"]["enum"].clone()
}

#[test]
fn rbac_prints_the_rules_the_code_uses() {
    let out = operator(&["rbac"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let rules = table["clusterRules"].as_sequence().unwrap();
    let grants = |group: &str, resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r["apiGroups"][0] == group
                    && r["resources"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
            })
            .flat_map(|r| {
                r["verbs"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
            })
            .collect()
    };
    assert_eq!(grants("cavi.dev", "caviclusters/status"), ["patch"]);
    assert_eq!(grants("", "pods"), ["list", "watch"]);
    assert!(grants("apps", "statefulsets").contains(&"create".to_owned()));
    assert!(
        !grants("apps", "statefulsets").contains(&"get".to_owned()),
        "stores, not GETs"
    );
    assert_eq!(
        table["leaseRules"][0]["verbs"].as_sequence().unwrap().len(),
        3
    );
}
