//! The config the operator renders is one the node runs: a 3-shard
//! CaviCluster's ConfigMap, with its DNS addresses moved to loopback ports,
//! starts three real `kvstore-api` processes that take their shard id from
//! a StatefulSet-style hostname, forward to each other and fan out search.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cavi_node::config::ClusterConfig;
use cavi_node::testkit::process::free_port;
use cavi_operator::build::{BuildOptions, CONFIG_KEY, Children};
use cavi_operator::crd::CaviCluster;
use serde_json::{Value, json};

/// The node binary beside this test (the testkit finds it), which must be built.
fn node_binary() -> PathBuf {
    let bin = cavi_node::testkit::process::node_binary();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p cavi-node` first (`cargo test --workspace` builds it)",
        bin.display()
    );
    bin
}

/// A node process, killed when dropped.
struct Node {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts `kvstore-api` with `args` as the pod `hostname` would, with
    /// none of the node's environment variables leaking in from the test.
    fn spawn(binary: &Path, args: &[String], hostname: &str, log: &Path, base: String) -> Node {
        let child = Command::new(binary)
            .args(args)
            .env("HOSTNAME", hostname)
            .env_remove("CAVI_LISTEN")
            .env_remove("CAVI_SHARD")
            .env_remove("CAVI_CONFIG")
            .env_remove("CAVI_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap();
        Node {
            child,
            base,
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/readyz` until it answers 200; fails at the deadline or when
    /// the process exits.
    async fn wait_ready(&mut self, http: &reqwest::Client, deadline: Instant) {
        let url = format!("{}/readyz", self.base);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("node {} exited with {status}:\n{}", self.base, self.log());
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready in time:\n{}",
                self.base,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn three_shard_cluster() -> CaviCluster {
    serde_yaml::from_str(
        r#"
apiVersion: cavi.dev/v1alpha1
kind: CaviCluster
metadata: {name: demo, namespace: shop}
spec:
  shards:
    - {rangeEnd: "h"}
    - {rangeStart: "i", rangeEnd: "p"}
    - {rangeStart: "q"}
"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendered_config_runs_a_three_node_cluster() {
    let binary = node_binary();
    let children =
        Children::of_spec(&three_shard_cluster(), "shop", &BuildOptions::default()).unwrap();
    let rendered = &children.config_map.data.as_ref().unwrap()[CONFIG_KEY];

    // What the pods would read, with each headless DNS name moved to a
    // loopback port so this machine can run all three.
    let mut config = ClusterConfig::from_yaml(rendered).unwrap();
    for (i, shard) in config.shards.iter_mut().enumerate() {
        assert_eq!(
            shard.addr,
            format!("demo-{i}.demo-headless.shop.svc.cluster.local:3100")
        );
        shard.addr = format!("127.0.0.1:{}", free_port());
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config.to_yaml().unwrap()).unwrap();

    let mut nodes: Vec<Node> = config
        .shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let args = vec![
                "from-hostname".to_owned(),
                config_path.display().to_string(),
            ];
            Node::spawn(
                &binary,
                &args,
                &format!("demo-{i}"),
                &dir.path().join(format!("demo-{i}.log")),
                format!("http://{}", shard.addr),
            )
        })
        .collect();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &mut nodes {
        node.wait_ready(&http, deadline).await;
    }

    // One key per shard: written through one node, read through another.
    let keys = [("apple", 0), ("kiwi", 1), ("tomato", 2)];
    for (key, owner) in keys {
        assert_eq!(config.owner_of(key).map(|s| s.id), Some(owner));
        let writer = &nodes[(owner as usize + 1) % 3];
        let reader = &nodes[(owner as usize + 2) % 3];
        let put = http
            .put(format!("{}/kv/{key}", writer.base))
            .json(&json!({"value": format!("{key}-value")}))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 204, "PUT {key} via {}", writer.base);
        for node in [reader, &nodes[owner as usize]] {
            let get = http
                .get(format!("{}/kv/{key}", node.base))
                .send()
                .await
                .unwrap();
            assert_eq!(get.status(), 200, "GET {key} via {}", node.base);
            assert_eq!(
                get.json::<Value>().await.unwrap(),
                json!(format!("{key}-value"))
            );
        }
    }

    // Search fans out over every shard and comes back sorted.
    let everything = json!([
        {"key": "apple", "value": "apple-value"},
        {"key": "kiwi", "value": "kiwi-value"},
        {"key": "tomato", "value": "tomato-value"},
    ]);
    for node in &nodes {
        let search = http
            .get(format!("{}/search?prefix=", node.base))
            .send()
            .await
            .unwrap();
        assert_eq!(search.status(), 200);
        assert_eq!(search.json::<Value>().await.unwrap(), everything);
    }
    let search = http
        .get(format!("{}/search?prefix=ki", nodes[0].base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        search.json::<Value>().await.unwrap(),
        json!([{"key": "kiwi", "value": "kiwi-value"}])
    );
}

/// Starts the node command line of a rendered pod, with the pod's paths
/// (`/etc/cavi/...`, `/var/lib/cavi`) moved under `root`.
fn start_pod(binary: &Path, argv: &[String], pod: &str, root: &Path, base: String) -> Node {
    assert_eq!(argv.first().map(String::as_str), Some("kvstore-api"));
    let data_dir = root.join(pod).join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| match a.as_str() {
            "/etc/cavi/config.yaml" => root.join("config.yaml").display().to_string(),
            "/var/lib/cavi" => data_dir.display().to_string(),
            other => other.to_owned(),
        })
        .collect();
    Node::spawn(binary, &args, pod, &root.join(format!("{pod}.log")), base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendered_persistent_pod_keeps_its_data_across_a_restart() {
    let binary = node_binary();
    let cluster: CaviCluster = serde_yaml::from_str(
        r#"
apiVersion: cavi.dev/v1alpha1
kind: CaviCluster
metadata: {name: durable, namespace: shop}
spec:
  shards:
    - {rangeEnd: "m"}
    - {rangeStart: "n"}
  storage: {type: Persistent, persistent: {size: 1Gi}}
"#,
    )
    .unwrap();
    let children = Children::of_spec(&cluster, "shop", &BuildOptions::default()).unwrap();
    let container = children
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .clone();
    // The command line exactly as the pods run it.
    let argv: Vec<String> = container
        .command
        .unwrap()
        .into_iter()
        .chain(container.args.unwrap())
        .collect();
    assert!(argv.contains(&"--data-dir".to_owned()), "{argv:?}");

    let mut config =
        ClusterConfig::from_yaml(&children.config_map.data.as_ref().unwrap()[CONFIG_KEY]).unwrap();
    for shard in &mut config.shards {
        shard.addr = format!("127.0.0.1:{}", free_port());
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("config.yaml"), config.to_yaml().unwrap()).unwrap();
    let bases: Vec<String> = config
        .shards
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| {
            start_pod(
                &binary,
                &argv,
                &format!("durable-{i}"),
                root.path(),
                bases[i].clone(),
            )
        })
        .collect();
    for node in &mut nodes {
        node.wait_ready(&http, deadline).await;
    }
    // Written through shard 1, owned by shard 0.
    let put = http
        .put(format!("{}/kv/apple", bases[1]))
        .json(&json!({"value": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    // Shard 0's data lives in its own volume, in the node's layout.
    assert!(
        root.path().join("durable-0/data/shard-0").is_dir(),
        "{}",
        nodes[0].log()
    );

    // The pod dies without a goodbye and comes back on the same volume.
    let mut dead = nodes.remove(0);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    drop(dead);
    let mut back = start_pod(&binary, &argv, "durable-0", root.path(), bases[0].clone());
    back.wait_ready(&http, Instant::now() + Duration::from_secs(30))
        .await;
    for base in [&bases[0], &bases[1]] {
        let get = http.get(format!("{base}/kv/apple")).send().await.unwrap();
        assert_eq!(get.status(), 200, "GET apple via {base}:\n{}", back.log());
        assert_eq!(get.json::<Value>().await.unwrap(), json!("kept"));
    }
}
