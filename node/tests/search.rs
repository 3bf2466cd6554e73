//! Fanned-out prefix search: merged and sorted, scoped, limited, and never
//! silently partial; a range that moved during a search is asked of its
//! new owner.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::time::{Duration, Instant};

use cavi_node::wire::PARTIAL_HEADER;
use common::{Cluster, Member, Range, SEED, fast_settings};
use reqwest::StatusCode;

const THREE: [Range; 3] = [("", Some("h")), ("i", Some("q")), ("r", None)];

async fn load(c: &Cluster, keys: &[&str]) {
    for (i, key) in keys.iter().enumerate() {
        let put = c.client.put(&c.url(i % 2), key, &key.to_uppercase()).await;
        assert_eq!(put.status, StatusCode::NO_CONTENT, "{key}");
    }
}

#[tokio::test]
async fn search_merges_every_shard_in_key_order() {
    let c = Cluster::start(&SEED).await;
    load(&c, &["zebra", "fig", "mango", "apple", "nut", "m", "fog"]).await;
    for entry in 0..2 {
        let all = c.client.search(&c.url(entry), "prefix=").await;
        assert_eq!(all.status, StatusCode::OK);
        assert_eq!(
            all.keys(),
            ["apple", "fig", "fog", "m", "mango", "nut", "zebra"]
        );
        assert_eq!(
            all.body[1],
            serde_json::json!({"key": "fig", "value": "FIG"})
        );
        assert!(all.headers.get(PARTIAL_HEADER).is_none());
        let f = c.client.search(&c.url(entry), "prefix=f").await;
        assert_eq!(f.keys(), ["fig", "fog"]);
        let m = c.client.search(&c.url(entry), "prefix=m").await;
        assert_eq!(m.keys(), ["m", "mango"]);
    }
    let none = c.client.search(&c.url(0), "prefix=q").await;
    assert_eq!(none.body, serde_json::json!([]));
}

#[tokio::test]
async fn scope_local_and_limit() {
    let c = Cluster::start(&SEED).await;
    load(&c, &["apple", "avocado", "nut", "zebra", "banana"]).await;
    let local = c.client.search(&c.url(1), "prefix=&scope=local").await;
    assert_eq!(local.keys(), ["nut", "zebra"]);
    let limited = c.client.search(&c.url(1), "prefix=&limit=3").await;
    assert_eq!(limited.keys(), ["apple", "avocado", "banana"]);
    let limited = c.client.search(&c.url(0), "prefix=a&limit=1").await;
    assert_eq!(limited.keys(), ["apple"]);
    let bad = c.client.search(&c.url(0), "prefix=a&scope=galaxy").await;
    assert_eq!(bad.code(), "invalid_query");
}

#[tokio::test]
async fn search_asks_only_shards_that_can_hold_the_prefix() {
    // Shard 1 is dead; prefixes that only shard 0 or 2 can hold never
    // touch it, so they succeed without a partial marker.
    let c = Cluster::start_with(
        &THREE,
        &[Member::Node, Member::Dead, Member::Node],
        fast_settings(),
    )
    .await;
    c.client.put(&c.url(0), "apple", "1").await;
    c.client.put(&c.url(2), "tree", "2").await;
    let a = c.client.search(&c.url(2), "prefix=a").await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.keys(), ["apple"]);
    let t = c.client.search(&c.url(0), "prefix=t").await;
    assert_eq!(t.status, StatusCode::OK, "{t:?}");
    assert_eq!(t.keys(), ["tree"]);
    // A prefix shard 1 can hold does need it.
    let k = c.client.search(&c.url(0), "prefix=k").await;
    assert_eq!(k.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn failing_shard_fails_the_search_unless_partial_is_asked() {
    let c = Cluster::start_with(
        &THREE,
        &[Member::Node, Member::Dead, Member::Node],
        fast_settings(),
    )
    .await;
    c.client.put(&c.url(0), "apple", "1").await;
    c.client.put(&c.url(2), "tree", "2").await;

    let failed = c.client.search(&c.url(0), "prefix=").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE, "{failed:?}");
    assert_eq!(failed.code(), "search_incomplete");
    assert!(failed.error().contains("shard(s) 1"), "{failed:?}");

    let partial = c.client.search(&c.url(0), "prefix=&partial=true").await;
    assert_eq!(partial.status, StatusCode::OK);
    assert_eq!(partial.keys(), ["apple", "tree"]);
    assert_eq!(partial.headers[PARTIAL_HEADER], "1");
}

/// A page with a limit asks the ranges in key order: the first alone when
/// it holds the whole page (a dead shard after it does not matter), the
/// others only when the answer gets to them, and a range first asked late
/// fails the search, or only itself when a partial answer is asked for.
#[tokio::test]
async fn a_limited_search_asks_later_shards_only_when_the_answer_reaches_them() {
    // Pages of two keys, so range 0 takes two reads and range 1 is first
    // asked after the first wave.
    let settings = cavi_node::settings::Settings {
        search_page_keys: 2,
        ..fast_settings()
    };
    let c = Cluster::start_with(
        &THREE,
        &[Member::Node, Member::Dead, Member::Node],
        settings,
    )
    .await;
    for key in ["apple", "banana", "cherry"] {
        c.client.put(&c.url(0), key, "1").await;
    }
    c.client.put(&c.url(2), "tree", "2").await;

    let page = c.client.search(&c.url(0), "prefix=&limit=2").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    assert_eq!(page.keys(), ["apple", "banana"]);
    assert!(!page.headers.contains_key(PARTIAL_HEADER));

    // The page reaches the dead shard's range: asked, it fails the search.
    let short = c.client.search(&c.url(0), "prefix=&limit=5").await;
    assert_eq!(short.status, StatusCode::SERVICE_UNAVAILABLE, "{short:?}");
    assert!(short.error().contains("shard(s) 1"), "{short:?}");
    let partial = c
        .client
        .search(&c.url(0), "prefix=&limit=5&partial=true")
        .await;
    assert_eq!(partial.status, StatusCode::OK, "{partial:?}");
    assert_eq!(partial.keys(), ["apple", "banana", "cherry", "tree"]);
    assert_eq!(partial.headers[PARTIAL_HEADER], "1");

    // A page that ends where range 0 ends stops there with a cursor,
    // without asking the next range; the continuation reaches it.
    let first = c.client.search(&c.url(0), "prefix=&limit=3").await;
    assert_eq!(first.keys(), ["apple", "banana", "cherry"]);
    let cursor = first.headers["x-cavi-next-cursor"]
        .to_str()
        .unwrap()
        .to_owned();
    let rest = c
        .client
        .search(
            &c.url(0),
            &format!("prefix=&limit=3&partial=true&cursor={cursor}"),
        )
        .await;
    assert_eq!(rest.status, StatusCode::OK, "{rest:?}");
    assert_eq!(rest.keys(), ["tree"]);
    assert_eq!(rest.headers[PARTIAL_HEADER], "1");
    let strict = c
        .client
        .search(&c.url(0), &format!("prefix=&limit=3&cursor={cursor}"))
        .await;
    assert_eq!(strict.status, StatusCode::SERVICE_UNAVAILABLE, "{strict:?}");
}

#[tokio::test]
async fn hung_shards_are_asked_concurrently_and_bounded_by_the_timeout() {
    let c = Cluster::start_with(
        &THREE,
        &[Member::Hung, Member::Node, Member::Hung],
        fast_settings(),
    )
    .await;
    let started = Instant::now();
    let failed = c.client.search(&c.url(1), "prefix=").await;
    let took = started.elapsed();
    assert_eq!(failed.status, StatusCode::GATEWAY_TIMEOUT, "{failed:?}");
    assert!(failed.error().contains("shard(s) 0, 2"), "{failed:?}");
    // Two hung shards asked one after the other would take two timeouts
    // (1.6 s); asked together they take one (0.8 s).
    assert!(took < Duration::from_millis(1500), "{took:?}");

    let partial = c.client.search(&c.url(1), "prefix=&partial=true").await;
    assert_eq!(partial.status, StatusCode::OK);
    assert_eq!(partial.headers[PARTIAL_HEADER], "0,2");
}

#[tokio::test]
async fn a_spoofed_forwarded_header_cannot_shrink_a_public_search() {
    let c = Cluster::start(&SEED).await;
    load(&c, &["apple", "nut"]).await;
    let r = c
        .client
        .send(
            c.client
                .http
                .get(format!("{}/search?prefix=", c.url(0)))
                .header(cavi_node::wire::FORWARDED_HEADER, "1"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.keys(), ["apple", "nut"]);
    assert!(!r.headers.contains_key(PARTIAL_HEADER));
}

/// A search runs against the map it started with. A shard that gave a
/// range away since answers 421 with its newer epoch; the search takes
/// the newer map from it and asks the range's new owner, so the answer is
/// whole and not marked partial.
#[tokio::test]
async fn a_search_follows_a_range_that_moved_to_its_new_owner() {
    use cavi_node::config::{ClusterConfig, ShardConfig};
    let shard = |id: u32, addr: std::net::SocketAddr, start: &str, end: &str| ShardConfig {
        id,
        addr: addr.to_string(),
        range_start: start.into(),
        range_end: Some(end.into()),
    };
    let ((la, a), (lb, b), (lc, c)) = (
        common::bind().await,
        common::bind().await,
        common::bind().await,
    );
    // Epoch 0, which the entry node still routes by: g..m on shard 2.
    let old = ClusterConfig {
        epoch: 0,
        shards: vec![
            shard(0, a, "a", "f"),
            shard(2, c, "g", "m"),
            shard(1, b, "n", "z"),
        ],
    };
    // Epoch 1: g..m moved to shard 1; shard 2 owns nothing.
    let new = ClusterConfig {
        epoch: 1,
        shards: vec![shard(0, a, "a", "f"), shard(1, b, "g", "z")],
    };
    let entry = common::spawn_node(la, old, 0, fast_settings());
    let owner = common::spawn_node(lb, new.clone(), 1, fast_settings());
    let _gave_away = common::spawn_node(lc, new, 2, fast_settings());
    entry.node.store().unwrap().put("apple", "A").await.unwrap();
    owner.node.store().unwrap().put("grape", "G").await.unwrap();
    owner.node.store().unwrap().put("nut", "N").await.unwrap();

    let client = common::Client::new();
    let all = client.search(&entry.url(), "prefix=").await;
    assert_eq!(all.status, StatusCode::OK, "{all:?}");
    assert_eq!(all.keys(), ["apple", "grape", "nut"]);
    assert!(all.headers.get(PARTIAL_HEADER).is_none());
    assert_eq!(
        entry.node.map().epoch,
        1,
        "the entry node took the newer map"
    );
}
