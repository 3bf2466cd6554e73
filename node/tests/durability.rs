//! The disk engine through the real binary: acknowledged writes survive
//! SIGKILL at random points, a restarted cluster serves what it held, and a
//! data directory of another range is refused.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::process::{Proc, free_port, start};
use common::{Client, Rng};
use reqwest::StatusCode;

/// What is known of one key: its last acknowledged state and, if a write
/// was in flight when the node died, that write's state. After a crash the
/// key must hold one of the two. `None` means absent.
#[derive(Default, Clone)]
struct KeyState {
    acked: Option<String>,
    pending: Option<Option<String>>,
}

fn single_shard_config(dir: &Path, port: u16) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("shards:\n  - id: 0\n    addr: 127.0.0.1:{port}\n"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn start_disk_node(config: &str, data: &str, url: &str) -> Proc {
    let mut node = start(&["0", config, "--data-dir", data], &[]);
    node.ready(url).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_at_random_points() {
    let seed = std::env::var("CAVI_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash schedule seed (CAVI_CRASH_SEED): {seed}");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = single_shard_config(dir.path(), port);
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    let keys: Vec<String> = (0..64).map(|i| format!("key-{i:02}")).collect();
    let state: Arc<Mutex<HashMap<String, KeyState>>> = Arc::default();
    let mut acked_total = 0usize;

    for round in 0..8 {
        let mut node = start_disk_node(&config, data, &url).await;
        verify(&client, &url, &state, round).await;

        // 16 writers, each owning 4 keys, write until the node dies.
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16 {
            let (client, url, state) = (client.clone(), url.clone(), state.clone());
            let mine: Vec<String> = keys[w * 4..w * 4 + 4].to_vec();
            let mut local = Rng(rng.next_u64() | 1);
            writers.spawn(async move {
                let mut acked = 0usize;
                for n in 0.. {
                    let key = &mine[local.below(4) as usize];
                    let next = (local.below(4) != 0).then(|| format!("r{round}-w{w}-n{n}"));
                    state
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .pending = Some(next.clone());
                    let sent = match &next {
                        Some(v) => {
                            client
                                .http
                                .put(Client::kv(&url, key))
                                .header("content-type", "application/json")
                                .body(serde_json::json!({"value": v}).to_string())
                                .send()
                                .await
                        }
                        None => client.http.delete(Client::kv(&url, key)).send().await,
                    };
                    match sent {
                        Ok(r) if r.status() == StatusCode::NO_CONTENT => {
                            let mut s = state.lock().unwrap();
                            let k = s.get_mut(key).unwrap();
                            k.acked = next;
                            k.pending = None;
                            acked += 1;
                        }
                        // The node died mid-request: the write may or may not have landed.
                        _ => return acked,
                    }
                }
                acked
            });
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        node.signal("KILL");
        let _ = node.finish();
        while let Some(n) = writers.join_next().await {
            acked_total += n.unwrap();
        }
    }
    let node = start_disk_node(&config, data, &url).await;
    verify(&client, &url, &state, 8).await;
    drop(node);
    println!("{acked_total} acknowledged writes over 8 SIGKILLs");
    assert!(
        acked_total > 100,
        "the writers got too few acknowledgements to mean anything"
    );
}

/// Every key holds its last acknowledged state, or the state of the write
/// that was in flight when the node died. Then the in-flight write is
/// resolved to whatever the node actually has.
async fn verify(
    client: &Client,
    url: &str,
    state: &Mutex<HashMap<String, KeyState>>,
    round: usize,
) {
    let snapshot: Vec<(String, KeyState)> = state.lock().unwrap().clone().into_iter().collect();
    for (key, known) in snapshot {
        let got = client.get(url, &key).await;
        let actual = match got.status {
            StatusCode::OK => Some(got.body.as_str().unwrap().to_owned()),
            StatusCode::NOT_FOUND => None,
            other => panic!("round {round}: GET {key}: {other}"),
        };
        let ok = actual == known.acked || known.pending.as_ref() == Some(&actual);
        assert!(
            ok,
            "round {round}: {key} holds {actual:?}, but the last acknowledged state was {:?} (in flight: {:?})",
            known.acked, known.pending
        );
        let mut s = state.lock().unwrap();
        let k = s.get_mut(&key).unwrap();
        k.acked = actual;
        k.pending = None;
    }
}

#[tokio::test]
async fn a_restarted_disk_cluster_serves_forwarded_reads_and_searches() {
    let dir = tempfile::tempdir().unwrap();
    let (p0, p1) = (free_port(), free_port());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("shards:\n  - {{id: 0, addr: '127.0.0.1:{p0}', range_end: m}}\n  - {{id: 1, addr: '127.0.0.1:{p1}', range_start: n}}\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (u0, u1) = (
        format!("http://127.0.0.1:{p0}"),
        format!("http://127.0.0.1:{p1}"),
    );
    let client = Client::new();
    let start_both = || async {
        let mut n0 = start(&["0", config, "--data-dir", data], &[]);
        let mut n1 = start(&["1", config, "--data-dir", data], &[]);
        n0.ready(&u0).await;
        n1.ready(&u1).await;
        (n0, n1)
    };

    let (n0, n1) = start_both().await;
    for (key, via) in [
        ("apple", &u1),
        ("fig", &u1),
        ("nut", &u0),
        ("zebra", &u0),
        ("gone", &u0),
    ] {
        assert_eq!(
            client.put(via, key, &key.to_uppercase()).await.status,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(
        client.delete(&u1, "gone").await.status,
        StatusCode::NO_CONTENT
    );
    for mut n in [n0, n1] {
        n.signal("TERM");
        assert!(n.finish().0);
    }
    assert!(Path::new(data).join("shard-0").is_dir() && Path::new(data).join("shard-1").is_dir());

    let (_n0, _n1) = start_both().await;
    assert_eq!(client.get(&u1, "apple").await.body, "APPLE");
    assert_eq!(client.get(&u0, "zebra").await.body, "ZEBRA");
    assert_eq!(client.get(&u0, "gone").await.status, StatusCode::NOT_FOUND);
    let all = client.search(&u1, "prefix=").await;
    assert_eq!(all.keys(), ["apple", "fig", "nut", "zebra"]);
    assert_eq!(all.body[3]["value"], "ZEBRA");
}

#[tokio::test]
async fn a_data_directory_of_another_range_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let config = single_shard_config(dir.path(), port);
    let mut node = start_disk_node(&config, data, &url).await;
    assert_eq!(
        Client::new().put(&url, "zebra", "z").await.status,
        StatusCode::NO_CONTENT
    );
    node.signal("TERM");
    assert!(node.finish().0);

    // The same shard now claims only a..m: "zebra" would silently vanish.
    let narrower = dir.path().join("narrower.yaml");
    std::fs::write(
        &narrower,
        format!("shards:\n  - {{id: 0, addr: '127.0.0.1:{port}', range_start: a, range_end: m}}\n"),
    )
    .unwrap();
    let mut refused = start(&["0", narrower.to_str().unwrap(), "--data-dir", data], &[]);
    let (ok, stderr) = refused.finish();
    assert!(!ok);
    assert!(
        stderr.contains("no longer owns") && stderr.contains("shard 0"),
        "{stderr}"
    );
}
