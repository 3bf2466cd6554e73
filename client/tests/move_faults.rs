//! One range move with a crash injected at each phase, in the source, the
//! target or the driver (`CAVI_CRASH_AT`, honoured by debug builds): the
//! crashed process is started again, `cavi reshard` is run again, and the
//! move finishes or rolls back with every key intact.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cavi_node::crash::CRASH_AT;
use cavi_node::testkit::Client;
use cavi_node::testkit::process::NodeProc;
use reqwest::StatusCode;
use serde_json::Value;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Source,
    Target,
    Driver,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

async fn reshard(entry: &NodeProc, file: &Path, crash: Option<&str>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"));
    cmd.args([
        "-e",
        &entry.url(),
        "reshard",
        "-f",
        file.to_str().unwrap(),
        "--lock-ttl",
        "1s",
    ])
    .stdin(Stdio::null())
    .env_remove(CRASH_AT);
    if let Some(point) = crash {
        cmd.env(CRASH_AT, point);
    }
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "cavi reshard ({crash:?}) -> {:?}\n{stderr}",
        out.status.code()
    );
    (out.status.success(), stderr)
}

async fn view(client: &Client, node: &NodeProc) -> Value {
    let answer = client
        .send(client.http.get(format!("{}/cluster", node.url())))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.body
}

/// Splits `g..m` off shard 0 to shard 2 with `point` crashing `who`, then
/// recovers and checks that every key is where the layout says.
async fn crash_once(who: Who, point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|id| {
            let d = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(&d).unwrap();
            NodeProc::new(id, &config, &d, true)
        })
        .collect();
    write(
        &config,
        &format!(
            "shards:\n  - {{id: 0, addr: '{}', range_start: '', range_end: m}}\n  - {{id: 1, addr: '{}', range_start: n}}\n",
            nodes[0].addr, nodes[1].addr
        ),
    );
    let split = dir.path().join("split.yaml");
    write(
        &split,
        &format!(
            "shards:\n  - {{id: 0, addr: '{}', range_start: '', range_end: f}}\n  - {{id: 2, addr: '{}', range_start: g, range_end: m}}\n  - {{id: 1, addr: '{}', range_start: n}}\n",
            nodes[0].addr, nodes[2].addr, nodes[1].addr
        ),
    );
    let crashing = match who {
        Who::Source => Some(0),
        Who::Target => Some(2),
        Who::Driver => None,
    };
    if let Some(i) = crashing {
        nodes[i].env(CRASH_AT, point);
    }
    for node in &mut nodes {
        node.start().await;
    }
    let client = Client::new();
    let mut keys = Vec::new();
    for letter in "abfghklmnz".chars() {
        for i in 0..40 {
            let key = format!("{letter}{i:03}");
            let put = client.put(&nodes[1].url(), &key, &format!("v-{key}")).await;
            assert_eq!(put.status, StatusCode::NO_CONTENT);
            keys.push(key);
        }
    }

    let (ok, stderr) = reshard(&nodes[0], &split, (who == Who::Driver).then_some(point)).await;
    assert!(!ok, "the crash at {point} must stop this run: {stderr}");
    if let Some(i) = crashing {
        nodes[i].wait_exit().await;
        assert!(
            nodes[i]
                .log_text()
                .contains(&format!("crash point {point}"))
        );
        nodes[i].clear_env();
        nodes[i].start().await;
    }
    // Run again until it finishes (a dead driver's lock expires first).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, stderr) = reshard(&nodes[0], &split, None).await;
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never finished after {point}: {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    for key in &keys {
        for node in &nodes {
            let got = client.get(&node.url(), key).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{key} via shard {} after {point}: {got:?}",
                node.id
            );
            assert_eq!(got.body, format!("v-{key}"), "{key} after {point}");
        }
    }
    let epochs: Vec<u64> = {
        let mut e = Vec::new();
        for node in &nodes {
            e.push(view(&client, node).await["epoch"].as_u64().unwrap());
        }
        e
    };
    assert!(epochs.iter().all(|e| *e == epochs[0]), "{epochs:?}");
    // Each shard holds exactly its keys: 0 a..f (120), 2 g..m (200), 1 the rest.
    let local = |i: usize| {
        let (client, url) = (client.clone(), nodes[i].url());
        async move { client.search(&url, "prefix=&scope=local").await.keys() }
    };
    assert!(local(0).await.iter().all(|k| k.as_str() < "g"));
    assert!(
        local(2)
            .await
            .iter()
            .all(|k| ("g".."n").contains(&k.as_str()))
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while view(&client, &nodes[0]).await["keys"] != 120 {
        assert!(
            Instant::now() < deadline,
            "shard 0 never cleaned up after {point}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view(&client, &nodes[2]).await["keys"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_crashes_during_the_copy() {
    crash_once(Who::Source, "source-copy-page").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_crashes_fenced_before_asking_the_target() {
    crash_once(Who::Source, "source-fenced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_crashes_after_the_target_committed() {
    crash_once(Who::Source, "source-target-committed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_crashes_while_cleaning_up() {
    crash_once(Who::Source, "source-cleanup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_crashes_before_it_commits() {
    crash_once(Who::Target, "target-before-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_crashes_after_it_committed() {
    crash_once(Who::Target, "target-after-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_crashes_after_the_prepare() {
    crash_once(Who::Driver, "driver-after-prepare").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_crashes_after_the_start() {
    crash_once(Who::Driver, "driver-after-start").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_crashes_before_the_commit() {
    crash_once(Who::Driver, "driver-before-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_crashes_after_the_commit() {
    crash_once(Who::Driver, "driver-after-commit").await;
}
