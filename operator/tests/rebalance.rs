//! Layout changes and Memory rollouts driven by the reconciler against real
//! nodes (in-process, on loopback ports) and a mocked API server: the
//! StatefulSet grows before keys move into a new ordinal and shrinks only
//! after its ordinal holds nothing, status and events follow each step, an
//! operator that restarts mid-move finishes it, a move that cannot progress
//! is reported stalled, and a Memory rollout hands each pod's ranges to a
//! neighbour before the pod restarts and takes them back afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cavi_node::settings::Settings;
use cavi_node::testkit::{Client, TestNode, bind, spawn_node_booted};
use cavi_operator::build::{BuildOptions, config_for, spec_layout};
use cavi_operator::crd::{CaviCluster, CaviClusterStatus};
use cavi_operator::reconcile::{Context, Timings, reconcile};
use cavi_operator::status::find_condition;
use common::world::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use reqwest::StatusCode;

/// A cluster of in-process nodes the operator reaches at loopback
/// addresses, and the operator's side: context, stores, mocked API server.
struct Rig {
    addresses: Arc<Loopback>,
    nodes: BTreeMap<u32, TestNode>,
    ctx: Arc<Context>,
    writers: Writers,
    seen: Arc<Mutex<Vec<Seen>>>,
    cluster: CaviCluster,
    client: Client,
    /// Listeners reserved for ordinals that have no pod yet, so their
    /// addresses are known (and stable) before they start.
    spare: BTreeMap<u32, tokio::net::TcpListener>,
}

/// Ordinals with an address from the start: room for a split to grow.
const SPARE_ORDINALS: u32 = 4;

fn settings() -> Settings {
    Settings {
        peer_connect_timeout: Duration::from_millis(500),
        peer_request_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..Settings::default()
    }
}

fn timings(stall: Duration) -> Timings {
    Timings {
        node_timeout: Duration::from_secs(5),
        rebalance_stall: stall,
        lock_ttl: Duration::from_secs(30),
    }
}

impl Rig {
    /// Nodes for the spec's ordinals, started from the config the operator
    /// writes; the cluster settled (children applied, pods ready, status).
    async fn start(spec: &str, stall: Duration) -> Self {
        let addresses = Arc::new(Loopback::default());
        let opts = BuildOptions {
            default_image: "cavi:test".into(),
            addresses: addresses.clone(),
        };
        let cluster = cluster_with("demo", spec);
        let mut listeners = Vec::new();
        let mut spare = BTreeMap::new();
        for o in 0..SPARE_ORDINALS {
            let (l, a) = bind().await;
            addresses.0.lock().unwrap().insert(o, a.to_string());
            if o < cluster.spec.shards.len() as u32 {
                listeners.push(l);
            } else {
                spare.insert(o, l);
            }
        }
        let config = config_for(
            &names("demo"),
            &cluster.spec,
            &opts,
            &spec_layout(&cluster.spec),
            0,
        );
        let mut nodes = BTreeMap::new();
        for (o, l) in listeners.into_iter().enumerate() {
            let o = o as u32;
            nodes.insert(o, spawn_node_booted(l, config.clone(), o, settings()).await);
        }
        let (ctx, server, writers, _) = context_with(opts, timings(stall));
        let seen = answer_everything(server, &cluster);
        let mut rig = Self {
            addresses,
            nodes,
            ctx,
            writers,
            seen,
            cluster,
            client: Client::new(),
            spare,
        };
        rig.reconcile_until(|s| s.phase.as_deref() == Some("Running"), 10)
            .await;
        rig
    }

    fn url(&self, o: u32) -> String {
        self.nodes[&o].url()
    }

    /// One reconcile, its requests fed back into the stores; the pods the
    /// StatefulSet now wants are ready, running the template the partition
    /// gives them (as the StatefulSet controller would, restarts aside).
    async fn reconcile(&mut self) -> Vec<Seen> {
        let before = self.seen.lock().unwrap().len();
        let result = reconcile(Arc::new(self.cluster.clone()), self.ctx.clone()).await;
        let log = self.seen.lock().unwrap()[before..].to_vec();
        self.writers.sync(&log);
        if let Some(status) = last_status(&log) {
            self.cluster = with_status(&self.cluster, Some(status));
        }
        if let Err(e) = result {
            assert!(!e.is_permanent(), "{e}");
        }
        log
    }

    fn status(&self) -> CaviClusterStatus {
        self.cluster.status.clone().unwrap()
    }

    fn stateful_set(&self) -> StatefulSet {
        self.ctx.stores.stateful_sets.state()[0].as_ref().clone()
    }

    fn replicas(&self) -> i32 {
        self.stateful_set().spec.unwrap().replicas.unwrap()
    }

    fn partition(&self) -> i32 {
        self.stateful_set()
            .spec
            .unwrap()
            .update_strategy
            .unwrap()
            .rolling_update
            .unwrap()
            .partition
            .unwrap()
    }

    /// Reconciles (pods kept ready with the template hash they already
    /// run, or the current one for new pods) until `done(status)`.
    async fn reconcile_until(
        &mut self,
        done: impl Fn(&CaviClusterStatus) -> bool,
        most: usize,
    ) -> Vec<Seen> {
        let mut all = Vec::new();
        for _ in 0..most {
            all.extend(self.reconcile().await);
            if let Some(sts) = self.ctx.stores.stateful_sets.state().first() {
                let hash = template_hash(sts);
                for o in 0..self.replicas() as u32 {
                    let known = self
                        .ctx
                        .stores
                        .pods
                        .state()
                        .into_iter()
                        .any(|p| p.metadata.name.as_deref() == Some(&format!("demo-{o}")));
                    if self.nodes.contains_key(&o) && !known {
                        put(&mut self.writers.pods, pod("demo", o, &hash, true));
                    }
                }
            }
            if self.cluster.status.as_ref().is_some_and(&done) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        panic!(
            "not done after {most} reconciles: {:#?}",
            self.cluster.status
        );
    }

    async fn start_node(&mut self, o: u32) {
        let listener = match self.spare.remove(&o) {
            Some(l) => l,
            None => {
                let addr: std::net::SocketAddr =
                    self.addresses.0.lock().unwrap()[&o].parse().unwrap();
                tokio::net::TcpListener::bind(addr).await.unwrap()
            }
        };
        let cm: ConfigMap = self.ctx.stores.config_maps.state()[0].as_ref().clone();
        let config =
            cavi_node::config::ClusterConfig::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
        self.nodes
            .insert(o, spawn_node_booted(listener, config, o, settings()).await);
    }

    async fn put_keys(&self, keys: &[String]) {
        for k in keys {
            assert_eq!(
                self.client
                    .put(&self.url(0), k, &format!("v-{k}"))
                    .await
                    .status,
                StatusCode::NO_CONTENT
            );
        }
    }

    async fn check_keys(&self, keys: &[String]) {
        for (o, _) in self.nodes.iter() {
            for k in keys {
                let got = self.client.get(&self.url(*o), k).await;
                assert_eq!(got.status, StatusCode::OK, "{k} via {o}: {got:?}");
                assert_eq!(got.body, format!("v-{k}"));
            }
        }
    }

    /// What node `o` says about itself.
    async fn view(&self, o: u32) -> serde_json::Value {
        self.client
            .send(self.client.http.get(format!("{}/cluster", self.url(o))))
            .await
            .body
    }
}

fn keys(letters: &str, n: usize) -> Vec<String> {
    letters
        .chars()
        .flat_map(|c| (0..n).map(move |i| format!("{c}{i:03}")))
        .collect()
}

const TWO: &str = r#"  storage: {type: Persistent}
  shards: [{rangeStart: "a", rangeEnd: "m"}, {rangeStart: "n", rangeEnd: "z"}]
"#;

const SPLIT: &str = r#"  storage: {type: Persistent}
  shards: [{rangeStart: "a", rangeEnd: "f"}, {rangeStart: "g", rangeEnd: "m"}, {rangeStart: "n", rangeEnd: "z"}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_scales_up_first_moves_online_and_a_merge_scales_down_after() {
    let mut rig = Rig::start(TWO, Duration::from_secs(300)).await;
    // More keys under a..f than g..m: shard 0 keeps a..f, g..m moves.
    let data = [keys("abcdef", 20), keys("gm", 5), keys("nz", 5)].concat();
    rig.put_keys(&data).await;

    let mut edited = cluster_with("demo", SPLIT);
    edited.metadata.generation = Some(4);
    edited.status = rig.cluster.status.clone();
    rig.cluster = edited;
    let log = rig.reconcile().await;
    // Scaled up before anything moves; the new pod is awaited.
    let sts: StatefulSet = last_applied(&log, "/statefulsets/").unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(3));
    let status = rig.status();
    assert_eq!(status.phase.as_deref(), Some("Rebalancing"));
    assert!(
        status.rebalance.as_deref().unwrap().contains("demo-2"),
        "{:?}",
        status.rebalance
    );
    let target: Vec<(i32, String)> = status
        .target_layout
        .iter()
        .map(|r| (r.ordinal, r.range_start.clone()))
        .collect();
    assert_eq!(target, [(0, "a".into()), (2, "g".into()), (1, "n".into())]);
    assert!(
        rig.view(0).await["moves"].as_array().is_none(),
        "nothing moves before the new pod is up"
    );
    assert_eq!(events(&log)[0].1, "RebalancePlanned");

    // The new pod comes up: unassigned, it owns nothing yet.
    rig.start_node(2).await;
    assert_eq!(rig.view(2).await["assigned"], false);
    let log = rig
        .reconcile_until(
            |s| s.rebalance.is_none() && s.phase.as_deref() == Some("Running"),
            200,
        )
        .await;
    let reasons: Vec<String> = events(&log)
        .into_iter()
        .map(|e| format!("{} {}", e.1, e.2))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("Rebalancing started moving \"g\"..=\"m\"*")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("Rebalancing committed")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("RebalanceComplete")),
        "{reasons:#?}"
    );
    let status = rig.status();
    let layout: Vec<(i32, String)> = status
        .layout
        .iter()
        .map(|r| (r.ordinal, r.range_start.clone()))
        .collect();
    assert_eq!(layout, [(0, "a".into()), (2, "g".into()), (1, "n".into())]);
    assert!(status.target_layout.is_empty());
    assert_eq!(
        find_condition(&status, "Rebalancing").unwrap().status,
        "False"
    );
    assert_eq!(
        find_condition(&status, "Ready")
            .unwrap()
            .observed_generation,
        Some(4)
    );
    // The ConfigMap follows, at the new epoch, once the move is done.
    rig.reconcile().await;
    let cm: ConfigMap = rig.ctx.stores.config_maps.state()[0].as_ref().clone();
    let config =
        cavi_node::config::ClusterConfig::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
    assert_eq!(config.shards.len(), 3);
    assert!(config.epoch >= 1);
    assert_eq!(Some(config.epoch), rig.status().epoch);
    rig.check_keys(&data).await;

    // Merge back: g..m returns to shard 0, then the StatefulSet shrinks.
    let mut merged = cluster_with("demo", TWO);
    merged.metadata.generation = Some(5);
    merged.status = rig.cluster.status.clone();
    rig.cluster = merged;
    let mut replicas_seen = Vec::new();
    for _ in 0..200 {
        rig.reconcile().await;
        replicas_seen.push(rig.replicas());
        let view2 = rig.view(2).await;
        if rig.replicas() == 2 {
            assert_eq!(
                view2["keys"], 0,
                "scaled down only once ordinal 2 holds nothing"
            );
            assert_eq!(view2["assigned"], false);
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(rig.replicas(), 2, "{replicas_seen:?}");
    rig.check_keys(&data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_mid_move_finishes_it() {
    let mut rig = Rig::start(TWO, Duration::from_secs(300)).await;
    let data = [keys("abcdef", 20), keys("gm", 200)].concat();
    rig.put_keys(&data).await;
    let mut edited = cluster_with("demo", SPLIT);
    edited.status = rig.cluster.status.clone();
    rig.cluster = edited;
    rig.reconcile().await;
    rig.start_node(2).await;
    // Until a move is under way.
    rig.reconcile_until(|s| !s.migrations.is_empty(), 50).await;

    // A new operator process: fresh context and stores, filled by its
    // watches from what the API server holds.
    let opts = BuildOptions {
        default_image: "cavi:test".into(),
        addresses: rig.addresses.clone(),
    };
    let (ctx, server, mut writers, _) = context_with(opts, timings(Duration::from_secs(300)));
    let everything = rig.seen.lock().unwrap().clone();
    writers.sync(&everything);
    for p in rig.ctx.stores.pods.state() {
        put(&mut writers.pods, p.as_ref().clone());
    }
    rig.seen = answer_everything(server, &rig.cluster);
    rig.ctx = ctx;
    rig.writers = writers;
    rig.reconcile_until(|s| s.rebalance.is_none() && s.target_layout.is_empty(), 200)
        .await;
    assert_eq!(rig.status().layout.len(), 3);
    rig.check_keys(&data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_cannot_progress_is_reported_stalled() {
    let mut rig = Rig::start(TWO, Duration::ZERO).await;
    let mut edited = cluster_with("demo", SPLIT);
    edited.status = rig.cluster.status.clone();
    rig.cluster = edited;
    rig.reconcile().await;
    // The pod of ordinal 2 reports ready, but nothing answers at its address.
    let hash = template_hash(&rig.stateful_set());
    put(&mut rig.writers.pods, pod("demo", 2, &hash, true));
    let log = rig.reconcile().await;
    let status = rig.status();
    let degraded = find_condition(&status, "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RebalanceStalled")
    );
    assert!(degraded.message.contains("shard 2"), "{}", degraded.message);
    assert_eq!(status.phase.as_deref(), Some("Degraded"));
    assert!(
        events(&log)
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "RebalanceBlocked")
    );
    assert!(
        rig.ctx
            .metrics
            .render()
            .contains("cavi_operator_rebalance_stalled{namespace=\"shop\",cluster=\"demo\"} 1")
    );
}

const MEMORY_TWO: &str = r#"  image: cavi:one
  storage: {type: Memory}
  shards: [{rangeStart: "a", rangeEnd: "m"}, {rangeStart: "n", rangeEnd: "z"}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_rollout_hands_each_pods_ranges_over_before_it_restarts() {
    let mut rig = Rig::start(MEMORY_TWO, Duration::from_secs(300)).await;
    let data = [keys("aem", 10), keys("nz", 10)].concat();
    rig.put_keys(&data).await;
    let mut edited = cluster_with("demo", &MEMORY_TWO.replace("cavi:one", "cavi:two"));
    edited.status = rig.cluster.status.clone();
    rig.cluster = edited;

    // (what happened, partition) in order.
    let mut story: Vec<String> = Vec::new();
    for _ in 0..400 {
        rig.reconcile().await;
        let new = template_hash(&rig.stateful_set());
        let partition = rig.partition();
        for o in [1u32, 0] {
            let hash = running_hash(&rig.ctx, "demo", o);
            if (o as i32) >= partition && hash != new {
                // The StatefulSet controller restarts it: a Memory pod comes
                // back empty. It must own nothing by now.
                let owned = rig.view(o).await["assigned"].as_bool().unwrap();
                story.push(format!("restart {o} (owned keys: {owned})"));
                assert!(!owned, "ordinal {o} restarted while it still owned keys");
                rig.nodes.remove(&o).unwrap().stop().await;
                rig.start_node(o).await;
                put(&mut rig.writers.pods, pod("demo", o, &new, true));
            }
        }
        let status = rig.status();
        if status.phase.as_deref() == Some("Running")
            && status.rollout.is_none()
            && status.rebalance.is_none()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        story,
        [
            "restart 1 (owned keys: false)",
            "restart 0 (owned keys: false)"
        ]
    );
    // Every key survived both restarts, and each shard got its range back.
    rig.check_keys(&data).await;
    assert_eq!(rig.view(0).await["shards"][0]["id"], 0);
    let owners: Vec<u64> = rig.view(1).await["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(owners, [0, 1]);
    let status = rig.status();
    assert_eq!(status.phase.as_deref(), Some("Running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_memory_shard_is_held_until_data_loss_is_allowed() {
    let one = r#"  image: cavi:one
  storage: {type: Memory}
  shards: [{rangeStart: ""}]
"#;
    let mut rig = Rig::start(one, Duration::from_secs(300)).await;
    let mut edited = cluster_with("demo", &one.replace("cavi:one", "cavi:two"));
    edited.status = rig.cluster.status.clone();
    rig.cluster = edited;
    let log = rig.reconcile().await;
    assert_eq!(rig.partition(), 1, "no restart");
    let status = rig.status();
    let progressing = find_condition(&status, "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "RolloutHeld")
    );
    assert!(
        progressing.message.contains("allowDataLoss"),
        "{}",
        progressing.message
    );
    assert!(
        events(&log)
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "RolloutHeld")
    );

    let mut allowed = cluster_with(
        "demo",
        &format!(
            "{}  rollout: {{allowDataLoss: true}}\n",
            one.replace("cavi:one", "cavi:two")
        ),
    );
    allowed.status = rig.cluster.status.clone();
    rig.cluster = allowed;
    rig.reconcile().await;
    assert_eq!(rig.partition(), 0, "restarted, as allowed");
}
