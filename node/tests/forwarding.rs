//! Forwarding to the owner: exact key round trips, loop prevention, and
//! bounded failure when a peer is dead or hung.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::time::{Duration, Instant};

use cavi_node::wire::FORWARDED_HEADER;
use common::{Cluster, Member, SEED, bind, fast_settings, layout, spawn_node};
use reqwest::StatusCode;

#[tokio::test]
async fn awkward_keys_round_trip_exactly_through_a_non_owner() {
    // One shard owns everything below "n", the other the rest, so every
    // key below is forwarded by one of the two entry points.
    let c = Cluster::start(&[("", Some("m")), ("n", None)]).await;
    let keys = [
        "p?q",
        "p/q",
        "a+b",
        "n#1",
        "q%20x",
        "r&s=t",
        "a b",
        "..",
        ".",
        "./x",
        "k/../k",
        "ünïcödé",
        "日本語",
        "emoji😀",
        "x=y;z",
        "tab\there",
        "back\\slash",
        "%",
        "%%2F",
        "/leading",
        "trailing/",
        "mid//double",
    ];
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value of {key}");
        for entry in 0..2 {
            let v = format!("{value} via {entry}");
            let put = c.client.put(&c.url(entry), key, &v).await;
            assert_eq!(
                put.status,
                StatusCode::NO_CONTENT,
                "PUT {key:?} via {entry}: {put:?}"
            );
            for reader in 0..2 {
                let got = c.client.get(&c.url(reader), key).await;
                assert_eq!(
                    got.status,
                    StatusCode::OK,
                    "GET {key:?} via {reader}: {got:?}"
                );
                assert_eq!(got.body, serde_json::json!(v), "key #{i} {key:?}");
            }
        }
        let owner = c.config.owner_of(key).unwrap().id as usize;
        assert_eq!(
            c.node(owner).stored(key).as_deref(),
            Some(format!("{value} via 1").as_str()),
            "{key:?} is stored under its exact name on its owner"
        );
    }
    // An unescaped slash in the path is part of the key, too.
    let raw = c
        .client
        .send(c.client.http.get(format!("{}/kv/p/q", c.url(1))))
        .await;
    assert_eq!(raw.body, "value of p/q via 1");
    let searched = c.client.search(&c.url(1), "prefix=p").await;
    assert_eq!(searched.keys(), ["p/q", "p?q"]);
}

/// Forwarded GETs share pipelined connections to the owner: many at once
/// must each get the answer to their own key, including misses and values
/// of very different sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_forwarded_reads_each_get_their_own_answer() {
    let c = Cluster::start(&SEED).await;
    let value = |i: usize| format!("{i}:{}", "x".repeat((i * 7919) % 20_000));
    for i in (0..300).filter(|i| i % 10 != 0) {
        let put = c
            .client
            .put(&c.url(1), &format!("apple{i:03}"), &value(i))
            .await;
        assert_eq!(put.status, StatusCode::NO_CONTENT, "{put:?}");
    }
    // Every key is owned by shard 0 and read through shard 1.
    let reads = (0..300).map(|i| {
        let (client, url) = (c.client.clone(), c.url(1));
        tokio::spawn(async move { (i, client.get(&url, &format!("apple{i:03}")).await) })
    });
    for read in futures::future::join_all(reads).await {
        let (i, got) = read.unwrap();
        if i % 10 == 0 {
            assert_eq!(got.status, StatusCode::NOT_FOUND, "apple{i:03}: {got:?}");
        } else {
            assert_eq!(got.status, StatusCode::OK, "apple{i:03}: {got:?}");
            assert_eq!(got.body, serde_json::json!(value(i)), "apple{i:03}");
        }
    }
}

#[tokio::test]
async fn nodes_whose_configs_disagree_answer_421_after_one_hop() {
    // Node A thinks B owns n..z; B thinks A does. Without loop prevention
    // a request for "nut" would bounce between them forever.
    let (la, a) = bind().await;
    let (lb, b) = bind().await;
    let view_a = layout(&[("a", Some("m")), ("n", Some("z"))], &[a, b]);
    let view_b = layout(&[("a", Some("z")), ("{", None)], &[a, b]);
    let node_a = spawn_node(la, view_a, 0, fast_settings());
    let node_b = spawn_node(lb, view_b, 1, fast_settings());
    let client = common::Client::new();

    for answer in [
        client.get(&node_a.url(), "nut").await,
        client.put(&node_a.url(), "nut", "1").await,
        client.delete(&node_a.url(), "nut").await,
    ] {
        assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST, "{answer:?}");
        assert_eq!(answer.code(), "misdirected");
        assert!(answer.error().contains("shard 1"), "{answer:?}");
    }
    assert!(node_a.node.store().unwrap().is_empty() && node_b.node.store().unwrap().is_empty());

    // A forwarded request for a key the receiver owns is served normally.
    let direct = client
        .send(
            client
                .http
                .put(common::Client::kv(&node_a.url(), "apple"))
                .header(FORWARDED_HEADER, "1")
                .header("content-type", "application/json")
                .body(r#"{"value":"x"}"#),
        )
        .await;
    assert_eq!(direct.status, StatusCode::NO_CONTENT);
    // And a forwarded request it does not own is never forwarded again.
    let refused = client
        .send(
            client
                .http
                .get(common::Client::kv(&node_b.url(), "nut"))
                .header(FORWARDED_HEADER, "0"),
        )
        .await;
    assert_eq!(refused.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(
        refused.error().contains("forwarded by shard 0"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_dead_or_restarting_peer_is_a_fast_503_with_retry_after() {
    let c = Cluster::start_with(&SEED, &[Member::Node, Member::Dead], fast_settings()).await;
    let started = Instant::now();
    let answer = c.client.get(&c.url(0), "zebra").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    assert_eq!(answer.code(), "peer_unavailable");
    assert_eq!(
        answer
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1"),
        "{answer:?}"
    );
    assert!(answer.error().contains("shard 1"), "{answer:?}");
    assert!(took < Duration::from_secs(2), "dead peer took {took:?}");
    // The live shard keeps serving its own keys.
    assert_eq!(
        c.client.put(&c.url(0), "apple", "1").await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn hung_peer_is_a_504_after_the_peer_timeout() {
    let c = Cluster::start_with(&SEED, &[Member::Node, Member::Hung], fast_settings()).await;
    let started = Instant::now();
    let answer = c.client.put(&c.url(0), "zebra", "z").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert_eq!(answer.code(), "peer_timeout");
    assert!(answer.error().contains("shard 1"));
    // Bounded by the peer timeout (800 ms), not the client's 30 s.
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A read takes the pipelined path: bounded the same way.
    let started = Instant::now();
    let answer = c.client.get(&c.url(0), "zebra").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        c.client.get(&c.url(0), "apple").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_peer_that_closes_the_connection_under_a_request_is_a_503_with_retry_after() {
    // Shard 1 reads each request and hangs up without an answer, as a
    // process going down mid-request does.
    let (listener, peer) = bind().await;
    let closer = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            drop(socket);
        }
    });
    let (l0, a0) = bind().await;
    let config = layout(&SEED, &[a0, peer]);
    let node = spawn_node(l0, config, 0, fast_settings());
    let client = common::Client::new();
    for answer in [
        client.get(&node.url(), "zebra").await,
        client.put(&node.url(), "zebra", "z").await,
    ] {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert_eq!(answer.code(), "peer_unavailable");
        assert!(answer.headers.get("retry-after").is_some(), "{answer:?}");
    }
    closer.abort();
}
