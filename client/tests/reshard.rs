//! Online resharding with real processes: three disk-backed nodes under a
//! steady load of 16 writers and readers, `cavi reshard` splitting a
//! range, moving a boundary and merging; then the target, the source and
//! the driver killed with SIGKILL in the middle of a move, restarted, and
//! the command run again; layouts that cannot be reached refused up front.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cavi_node::testkit::process::NodeProc;
use cavi_node::testkit::workload::Workload;
use cavi_node::testkit::{Client, metric_value, seed};
use reqwest::StatusCode;
use serde_json::Value;

/// Writes a layout: (shard, node, range_start, range_end).
fn layout(path: &Path, shards: &[(u32, &NodeProc, &str, Option<&str>)]) {
    let at: Vec<_> = shards
        .iter()
        .map(|&(id, node, start, end)| (id, node.addr.as_str(), start, end))
        .collect();
    layout_at(path, &at);
}

/// Writes a layout by address, in the order given (valid or not):
/// (shard, address, range_start, range_end).
fn layout_at(path: &Path, shards: &[(u32, &str, &str, Option<&str>)]) {
    let mut text = String::from("shards:\n");
    for (id, addr, start, end) in shards {
        text.push_str(&format!(
            "  - id: {id}\n    addr: {addr}\n    range_start: {start:?}\n"
        ));
        if let Some(end) = end {
            text.push_str(&format!("    range_end: {end:?}\n"));
        }
    }
    std::fs::write(path, text).unwrap();
}

/// What one `cavi` run did.
struct Run {
    code: i32,
    stderr: String,
}

async fn cavi_reshard(entry: &NodeProc, file: &Path, extra: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"))
        .args(["-e", &entry.url(), "reshard", "-f", file.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "cavi reshard -f {} -> {}\n{}",
        file.display(),
        run.code,
        run.stderr
    );
    run
}

async fn cluster(client: &Client, node: &NodeProc) -> Value {
    let answer = client
        .send(client.http.get(format!("{}/cluster", node.url())))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer);
    answer.body
}

/// Every key a node lists for itself (`scope=local`) is one it owns in
/// its own map, and all nodes report one epoch; returns it.
async fn check_ownership(client: &Client, nodes: &[&NodeProc]) -> u64 {
    let mut epochs = Vec::new();
    for node in nodes {
        let view = cluster(client, node).await;
        let id = view["shard_id"].as_u64().unwrap();
        let owned: Vec<(String, Option<String>)> = view["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"].as_u64() == Some(id))
            .map(|s| {
                (
                    s["range_start"].as_str().unwrap_or_default().to_owned(),
                    s["range_end"].as_str().map(str::to_owned),
                )
            })
            .collect();
        let local = client.search(&node.url(), "prefix=&scope=local").await;
        assert_eq!(local.status, StatusCode::OK);
        for key in local.keys() {
            let owns = owned.iter().any(|(start, end)| {
                start.as_str() <= key.as_str()
                    && end
                        .as_ref()
                        .is_none_or(|e| key.as_str() <= e.as_str() || key.starts_with(e.as_str()))
            });
            assert!(
                owns,
                "shard {id} lists {key:?}, which it does not own ({owned:?})"
            );
        }
        epochs.push(view["epoch"].as_u64().unwrap());
    }
    assert!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "epochs differ: {epochs:?}"
    );
    epochs[0]
}

async fn start_nodes(dir: &Path, ids: &[u32], config: &Path) -> Vec<NodeProc> {
    let mut nodes = Vec::new();
    for id in ids {
        let node_dir = dir.join(format!("n{id}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        nodes.push(NodeProc::new(*id, config, &node_dir, true));
    }
    nodes
}

/// Writes the layout `a..m` on node 0, `n..` on node 1 (any other node is
/// unassigned) and starts every node.
async fn start_in_two_ranges(config: &Path, nodes: &mut [NodeProc]) {
    layout(
        config,
        &[(0, &nodes[0], "", Some("m")), (1, &nodes[1], "n", None)],
    );
    for node in nodes {
        node.start().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_move_a_boundary_and_merge_under_load_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes = start_nodes(dir.path(), &[0, 1, 2], &config).await;
    start_in_two_ranges(&config, &mut nodes).await;
    let client = Client::new();
    // Shard 2 is not in the config: it owns nothing and forwards.
    let view = cluster(&client, &nodes[2]).await;
    assert_eq!(view["assigned"], false);

    let urls: Vec<String> = nodes.iter().map(NodeProc::url).collect();
    let load = Workload::start(urls.clone(), 16, seed("CAVI_RESHARD_SEED"));
    load.wait_for(2000).await;

    let split = dir.path().join("split.yaml");
    layout(
        &split,
        &[
            (0, &nodes[0], "", Some("f")),
            (2, &nodes[2], "g", Some("m")),
            (1, &nodes[1], "n", None),
        ],
    );
    let run = cavi_reshard(&nodes[0], &split, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("committed \"g\"..=\"m\"* from shard 0 to shard 2"),
        "{}",
        run.stderr
    );
    load.wait_for(2000).await;

    let boundary = dir.path().join("boundary.yaml");
    layout(
        &boundary,
        &[
            (0, &nodes[0], "", Some("f")),
            (2, &nodes[2], "g", Some("r")),
            (1, &nodes[1], "s", None),
        ],
    );
    let run = cavi_reshard(&nodes[1], &boundary, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    load.wait_for(2000).await;

    let merge = dir.path().join("merge.yaml");
    layout(
        &merge,
        &[(0, &nodes[0], "", Some("f")), (1, &nodes[1], "g", None)],
    );
    let run = cavi_reshard(&nodes[2], &merge, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    load.wait_for(2000).await;

    let ledger = load.stop().await;
    println!(
        "{} requests answered, {} failed {:?}, {} keys",
        ledger.total(),
        ledger.failures(),
        ledger.failed,
        ledger.keys.len()
    );
    assert!(ledger.violations.is_empty(), "{:#?}", ledger.violations);
    assert_eq!(
        ledger.failures(),
        0,
        "{:?} {:#?}",
        ledger.failed,
        ledger.samples
    );
    let wrong = ledger.check_all(&client, &urls).await;
    assert!(wrong.is_empty(), "{wrong:#?}");
    let epoch = check_ownership(&client, &[&nodes[0], &nodes[1], &nodes[2]]).await;
    assert!(epoch >= 3, "three committed moves, epoch {epoch}");
    // The shard that left holds nothing.
    assert_eq!(cluster(&client, &nodes[2]).await["keys"], 0);
    assert_eq!(cluster(&client, &nodes[2]).await["assigned"], false);
}

/// Waits until the move of `node` as source is copying (some keys sent).
async fn wait_copying(client: &Client, node: &NodeProc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = cluster(client, node).await;
        let copying = view["moves"].as_array().is_some_and(|moves| {
            moves.iter().any(|m| {
                m["role"] == "source"
                    && m["phase"] == "copying"
                    && m["keys_copied"].as_u64() > Some(0)
            })
        });
        if copying {
            return;
        }
        assert!(Instant::now() < deadline, "no move started copying: {view}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fills `letters` with `per_letter` keys of 2 KB each, concurrently.
async fn preload(client: &Client, url: &str, letters: &str, per_letter: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for letter in letters.chars() {
        for i in 0..per_letter {
            let key = format!("{letter}-bulk-{i:05}");
            keys.push(key.clone());
            let (client, url) = (client.clone(), url.to_owned());
            tasks.spawn(async move {
                let answer = client
                    .put(&url, &key, &format!("{key}:{}", "x".repeat(2000)))
                    .await;
                assert_eq!(answer.status, StatusCode::NO_CONTENT, "{answer:?}");
            });
            if tasks.len() >= 32 {
                tasks.join_next().await.unwrap().unwrap();
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    keys
}

async fn check_preloaded(client: &Client, url: &str, keys: &[String]) {
    for key in keys {
        let got = client.get(url, key).await;
        assert_eq!(got.status, StatusCode::OK, "{key}: {got:?}");
        assert!(
            got.body.as_str().unwrap().starts_with(&format!("{key}:")),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_target_the_source_or_the_driver_mid_move_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes = start_nodes(dir.path(), &[0, 1, 2], &config).await;
    // Every page the target writes takes a while: the copy lasts long
    // enough to be killed in the middle.
    for node in &mut nodes {
        node.env("CAVI_DEBUG_COMMIT_DELAY_MS", "150");
    }
    start_in_two_ranges(&config, &mut nodes).await;
    let client = Client::new();
    let keys = preload(&client, &nodes[0].url(), "ghknpqr", 300).await;
    let urls: Vec<String> = nodes.iter().map(NodeProc::url).collect();
    let load = Workload::start(urls.clone(), 4, seed("CAVI_RESHARD_KILL_SEED"));

    // 1. The target dies while the range streams to it.
    let split = dir.path().join("split.yaml");
    layout(
        &split,
        &[
            (0, &nodes[0], "", Some("f")),
            (2, &nodes[2], "g", Some("m")),
            (1, &nodes[1], "n", None),
        ],
    );
    let driver = tokio::spawn({
        let (url, split) = (nodes[0].addr.clone(), split.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"))
                .args(["-e", &url, "reshard", "-f", split.to_str().unwrap()])
                .output()
                .await
                .unwrap()
        }
    });
    wait_copying(&client, &nodes[0]).await;
    nodes[2].kill();
    let out = driver.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the reshard cannot finish without its target: {stderr}"
    );
    assert!(stderr.contains("shard 2"), "{stderr}");
    nodes[2].start().await;
    let run = cavi_reshard(&nodes[0], &split, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    check_preloaded(&client, &nodes[1].url(), &keys).await;

    // 2. The source dies while it streams a range away.
    let boundary = dir.path().join("boundary.yaml");
    layout(
        &boundary,
        &[
            (0, &nodes[0], "", Some("f")),
            (2, &nodes[2], "g", Some("r")),
            (1, &nodes[1], "s", None),
        ],
    );
    let driver = tokio::spawn({
        let (url, file) = (nodes[0].addr.clone(), boundary.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"))
                .args(["-e", &url, "reshard", "-f", file.to_str().unwrap()])
                .output()
                .await
                .unwrap()
        }
    });
    wait_copying(&client, &nodes[1]).await;
    nodes[1].kill();
    let out = driver.await.unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nodes[1].start().await;
    let run = cavi_reshard(&nodes[0], &boundary, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    check_preloaded(&client, &nodes[0].url(), &keys).await;

    // 3. The driver dies; a new one (once the lock expired) finishes.
    let merge = dir.path().join("merge.yaml");
    layout(
        &merge,
        &[(0, &nodes[0], "", Some("f")), (1, &nodes[1], "g", None)],
    );
    let mut killed = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"))
        .args([
            "-e",
            &nodes[0].url(),
            "reshard",
            "-f",
            merge.to_str().unwrap(),
            "--lock-ttl",
            "1s",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_copying(&client, &nodes[2]).await;
    killed.kill().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = cavi_reshard(&nodes[1], &merge, &[]).await;
        if run.code == 0 {
            break;
        }
        assert!(
            run.stderr.contains("lock"),
            "only the dead driver's lock may stop it: {}",
            run.stderr
        );
        assert!(Instant::now() < deadline, "the lock never expired");
        // The refusal says how long the lock still holds.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let ledger = load.stop().await;
    println!(
        "{} requests answered, {} failed {:?}",
        ledger.total(),
        ledger.failures(),
        ledger.failed
    );
    assert!(ledger.violations.is_empty(), "{:#?}", ledger.violations);
    let wrong = ledger.check_all(&client, &urls).await;
    assert!(wrong.is_empty(), "{wrong:#?}");
    check_preloaded(&client, &nodes[2].url(), &keys).await;
    check_ownership(&client, &[&nodes[0], &nodes[1], &nodes[2]]).await;
}

/// The copy of a move is paced by the source's `--move-rate`: 2 MiB at
/// 1 MiB/s cannot take less than about a second and a half (a lower bound,
/// which a slow machine cannot break), and every key arrives. The copy
/// keeps up to four of its 16 pages in flight; the move counts each page
/// once it has landed, so the commit reports the whole copy.
#[tokio::test]
async fn a_move_is_paced_by_the_sources_move_rate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes = start_nodes(dir.path(), &[0, 1], &config).await;
    nodes[0].arg("--move-rate").arg("1048576");
    start_in_two_ranges(&config, &mut nodes).await;
    let client = Client::new();
    let value = "v".repeat(32 << 10);
    for i in 0..64 {
        let put = client
            .put(&nodes[0].url(), &format!("h{i:03}"), &value)
            .await;
        assert_eq!(put.status, StatusCode::NO_CONTENT);
    }
    let target = dir.path().join("target.yaml");
    layout(
        &target,
        &[(0, &nodes[0], "", Some("g")), (1, &nodes[1], "h", None)],
    );
    let started = Instant::now();
    let run = cavi_reshard(&nodes[0], &target, &[]).await;
    let took = started.elapsed();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        took >= Duration::from_millis(1500),
        "2 MiB moved in {took:?} at 1 MiB/s"
    );
    assert!(
        run.stderr.contains("(64 keys, 2.1 MB)"),
        "the commit counts every page: {}",
        run.stderr
    );
    let view = cluster(&client, &nodes[1]).await;
    assert_eq!(view["keys"], 64);
}

/// Waits until `node`'s move as source is fenced; returns false if it got
/// past the fence (or never started) before `deadline`.
async fn wait_fenced(client: &Client, node: &NodeProc, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if source_phase(client, node).await.as_deref() == Some("fenced") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

async fn source_phase(client: &Client, node: &NodeProc) -> Option<String> {
    let view = cluster(client, node).await;
    view["moves"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "source")
        .and_then(|m| m["phase"].as_str().map(str::to_owned))
}

/// The fence holds writes to the moving range, not reads: while a slow
/// disk keeps the source fenced (every commit of node 0 takes 1.5 s, and
/// the fence waits for one), a GET of a key in the range is answered from
/// the source and the move is still fenced afterwards, while a PUT sent
/// before it is still waiting. Once the move commits, the PUT lands on the
/// new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_of_a_fenced_range_are_served_while_its_writes_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes = start_nodes(dir.path(), &[0, 1], &config).await;
    nodes[0].env("CAVI_DEBUG_COMMIT_DELAY_MS", "1500");
    start_in_two_ranges(&config, &mut nodes).await;
    let client = Client::new();
    let url0 = nodes[0].url();
    let puts = (0..20).map(|i| {
        let (client, url0) = (client.clone(), url0.clone());
        async move {
            let key = format!("h{i:03}");
            client.put(&url0, &key, &format!("v-{key}")).await.status
        }
    });
    for status in futures::future::join_all(puts).await {
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let target = dir.path().join("target.yaml");
    layout(
        &target,
        &[(0, &nodes[0], "", Some("g")), (1, &nodes[1], "h", None)],
    );

    let in_the_fence = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        assert!(
            wait_fenced(&client, &nodes[0], deadline).await,
            "the move never showed as fenced"
        );
        let held = {
            let (client, url0) = (client.clone(), url0.clone());
            tokio::spawn(async move { client.put(&url0, "h001", "written-in-the-fence").await })
        };
        let read = client.get(&url0, "h005").await;
        let held_done = held.is_finished();
        let phase = source_phase(&client, &nodes[0]).await;
        let gauge = metric_value(&client.metrics(&url0).await, SOURCE_FENCED);
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        assert_eq!(read.body, "v-h005");
        assert_eq!(
            phase.as_deref(),
            Some("fenced"),
            "the read waited for the fence to end"
        );
        assert!(!held_done, "a write to a fenced range was not held");
        assert_eq!(gauge, Some(1.0), "cavi_move_phase shows the fenced source");
        held.await.unwrap()
    };
    let (run, put) = tokio::join!(cavi_reshard(&nodes[0], &target, &[]), in_the_fence);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(put.status, StatusCode::NO_CONTENT, "{put:?}");
    let moved = client.get(&nodes[1].url(), "h001").await;
    assert_eq!(moved.body, "written-in-the-fence", "{moved:?}");
    let moved = client.get(&nodes[1].url(), "h005").await;
    assert_eq!(moved.body, "v-h005", "{moved:?}");
    let after = client.metrics(&url0).await;
    assert!(
        metric_value(&after, SOURCE_FENCED).unwrap_or(0.0) == 0.0,
        "no move is fenced any more:\n{after}"
    );
}

/// The series of a fenced move on its source.
const SOURCE_FENCED: &str = "cavi_move_phase{role=\"source\",phase=\"fenced\"}";

/// A layout that cannot be reached is refused before anything changes
/// hands, with a sentence naming the shard: overlapping or unsorted
/// ranges, an address nobody answers, an address that serves another
/// shard. The epoch, every key and every node's count stay as they were,
/// and no move lock is left behind: a valid layout runs right after, and
/// the source's metrics count that one move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_that_cannot_be_reached_is_refused_before_anything_moves() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.yaml");
    let mut nodes = start_nodes(dir.path(), &[0, 1], &config).await;
    start_in_two_ranges(&config, &mut nodes).await;
    let client = Client::new();
    let keys = preload(&client, &nodes[0].url(), "bhqx", 25).await;
    let before: Vec<Value> = vec![
        cluster(&client, &nodes[0]).await,
        cluster(&client, &nodes[1]).await,
    ];
    let (a0, a1) = (nodes[0].addr.as_str(), nodes[1].addr.as_str());
    let nobody = format!("127.0.0.1:{}", cavi_node::testkit::process::free_port());
    type Shard<'a> = (u32, &'a str, &'a str, Option<&'a str>);
    let cases: [(&str, Vec<Shard>, &[&str]); 4] = [
        (
            "overlap",
            vec![(0, a0, "", Some("m")), (1, a1, "k", None)],
            &["shards 0", "and 1", "overlap"],
        ),
        (
            "unsorted",
            vec![(1, a1, "n", None), (0, a0, "", Some("m"))],
            &["key order", "shard 0"],
        ),
        (
            "nobody answers",
            vec![
                (0, a0, "", Some("f")),
                (2, &nobody, "g", Some("m")),
                (1, a1, "n", None),
            ],
            &["shard 2", "does not answer", "start it first"],
        ),
        (
            "an address of another shard",
            vec![
                (0, a0, "", Some("f")),
                (2, a1, "g", Some("m")),
                (1, a1, "n", None),
            ],
            &["shard 2", "serves shard 1"],
        ),
    ];
    for (what, shards, sentence) in cases {
        let file = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        layout_at(&file, &shards);
        let run = cavi_reshard(&nodes[0], &file, &[]).await;
        assert_ne!(run.code, 0, "{what}: refused");
        for part in sentence {
            assert!(
                run.stderr.contains(part),
                "{what}: {:?} in {}",
                part,
                run.stderr
            );
        }
        for (node, was) in nodes.iter().zip(&before) {
            let now = cluster(&client, node).await;
            assert_eq!(now["epoch"], was["epoch"], "{what}: the epoch stayed");
            assert_eq!(now["keys"], was["keys"], "{what}: the keys stayed");
            assert_eq!(now["shards"], was["shards"], "{what}: the map stayed");
        }
    }
    check_preloaded(&client, &nodes[1].url(), &keys).await;

    // Nothing was locked: a layout that can be reached runs at once.
    let boundary = dir.path().join("boundary.yaml");
    layout(
        &boundary,
        &[(0, &nodes[0], "", Some("f")), (1, &nodes[1], "g", None)],
    );
    let run = cavi_reshard(&nodes[0], &boundary, &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(cluster(&client, &nodes[1]).await["keys"], 75);
    check_preloaded(&client, &nodes[0].url(), &keys).await;

    // The source's metrics count the one move, its keys and bytes, and
    // how long it took; both nodes route by the new epoch.
    let source = client.metrics(&nodes[0].url()).await;
    let value = |text: &str, series: &str| -> f64 {
        metric_value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value(&source, "cavi_moves_total{outcome=\"started\"}"), 1.0);
    assert_eq!(
        value(&source, "cavi_moves_total{outcome=\"committed\"}"),
        1.0
    );
    assert_eq!(value(&source, "cavi_move_keys_total"), 25.0);
    let bytes = value(&source, "cavi_move_bytes_total");
    assert!((25.0 * 2000.0..25.0 * 2100.0).contains(&bytes), "{bytes}");
    assert_eq!(value(&source, "cavi_move_duration_seconds_count"), 1.0);
    assert!(value(&source, "cavi_move_duration_seconds_sum") > 0.0);
    for node in &nodes {
        assert_eq!(
            value(&client.metrics(&node.url()).await, "cavi_shard_map_epoch"),
            1.0
        );
    }
}
