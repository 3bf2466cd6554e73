//! Many clients at once through both nodes: every acknowledged write is
//! readable afterwards with its last acknowledged value.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::collections::BTreeMap;

use common::{Cluster, SEED};
use reqwest::StatusCode;
use tokio::task::JoinSet;

enum Outcome {
    /// A writer's key and the value it last had acknowledged (None: deleted).
    Written(String, Option<String>, usize),
    Read,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_mixed_requests_lose_nothing() {
    let c = Cluster::start(&SEED).await;
    // 250 keys over both shards, each owned by one writer task so its last
    // acknowledged value is well defined: PUT, GET through the other node,
    // PUT again, and DELETE for one key in ten: 775 requests.
    let keys: Vec<String> = (0..250)
        .map(|i| format!("{}-key-{i:03}", if i % 2 == 0 { 'c' } else { 'q' }))
        .collect();
    let writer_requests: usize = keys
        .iter()
        .map(|k| if k.ends_with('0') { 4 } else { 3 })
        .sum();
    let mut tasks = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let client = c.client.clone();
        let (a, b) = (c.url(i % 2), c.url((i + 1) % 2));
        let key = key.clone();
        tasks.spawn(async move {
            assert_eq!(
                client.put(&a, &key, "v1").await.status,
                StatusCode::NO_CONTENT
            );
            assert_eq!(
                client.get(&b, &key).await.body,
                "v1",
                "read-your-write via the other node"
            );
            let v2 = format!("v2-{key}");
            assert_eq!(
                client.put(&b, &key, &v2).await.status,
                StatusCode::NO_CONTENT
            );
            if key.ends_with('0') {
                assert_eq!(client.delete(&a, &key).await.status, StatusCode::NO_CONTENT);
                return Outcome::Written(key, None, 4);
            }
            Outcome::Written(key, Some(v2), 3)
        });
    }
    // Readers and searches racing the writers make up the rest of the 1,000.
    for i in 0..(1000 - writer_requests) {
        let client = c.client.clone();
        let url = c.url(i % 2);
        let key = keys[i % keys.len()].clone();
        tasks.spawn(async move {
            let status = if i % 5 == 0 {
                client.search(&url, "prefix=q-key-1").await.status
            } else {
                client.get(&url, &key).await.status
            };
            assert!(
                status == StatusCode::OK || status == StatusCode::NOT_FOUND,
                "{status}"
            );
            Outcome::Read
        });
    }

    let mut expected = BTreeMap::new();
    let mut requests = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            Outcome::Written(key, last, n) => {
                requests += n;
                expected.insert(key, last);
            }
            Outcome::Read => requests += 1,
        }
    }
    assert_eq!(requests, 1000);

    for (key, last) in &expected {
        for entry in 0..2 {
            let got = c.client.get(&c.url(entry), key).await;
            match last {
                Some(v) => assert_eq!(got.body, serde_json::json!(v), "{key}"),
                None => assert_eq!(got.status, StatusCode::NOT_FOUND, "{key} was deleted"),
            }
        }
    }
    let stored = c.node(0).node.store().unwrap().len() + c.node(1).node.store().unwrap().len();
    assert_eq!(
        stored as usize,
        expected.values().filter(|v| v.is_some()).count()
    );
}
