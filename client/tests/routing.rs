//! The routing client against two live nodes: keys go straight to their
//! owners, `--no-routing` goes through the entry node, and a newer epoch
//! named by an answer makes the client take the newer map. Which node
//! forwarded what is read from each node's own metrics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cavi_client::Client;
use cavi_client::routing::Router;
use cavi_node::testkit::{Cluster, SEED};

/// Key operations node `i` forwarded to a peer, by its `/metrics`.
async fn forwarded(c: &Cluster, i: usize) -> u64 {
    c.client
        .metrics(&c.url(i))
        .await
        .lines()
        .filter(|l| l.starts_with("cavi_peer_requests_total{") && l.contains("kind=\"kv\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

fn client(url: &str) -> Client {
    Client::new(url, Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn keys_go_straight_to_their_owner_and_a_newer_epoch_is_followed() {
    let c = Cluster::start(&SEED).await;

    // Routed: shard 1's keys, asked of node 0, never pass through it.
    let routed = Router::new(client(&c.url(0)), true);
    routed.put("zebra", "1").await.unwrap();
    assert_eq!(routed.get("zebra").await.unwrap(), "1");
    routed.delete("zebra").await.unwrap();
    assert_eq!(
        forwarded(&c, 0).await,
        0,
        "node 0 forwarded a routed request"
    );
    let first = routed.map().expect("the router fetched the map");

    // Not routed: node 0 forwards them.
    let entry_only = Router::new(client(&c.url(0)), false);
    entry_only.put("zulu", "2").await.unwrap();
    assert_eq!(entry_only.get("zulu").await.unwrap(), "2");
    assert_eq!(forwarded(&c, 0).await, 2);
    assert!(
        entry_only.map().is_none(),
        "an entry-only router needs no map"
    );

    // A newer map gives n..s to shard 0. The router still holds the old
    // one: its first request for "pear" goes to node 1, which forwards it
    // and names the newer epoch; the router takes that map, and its next
    // request for a key of n..s goes to node 0 directly.
    let mut newer = client(&c.url(0)).map().await.unwrap();
    newer.epoch += 1;
    newer.shards[0].range_end = Some("s".into());
    newer.shards[1].range_start = "t".into();
    for i in 0..2 {
        client(&c.url(i)).publish(&newer).await.unwrap();
    }
    let before = forwarded(&c, 1).await;
    routed.put("pear", "3").await.unwrap();
    assert_eq!(forwarded(&c, 1).await, before + 1);
    assert_eq!(routed.map().unwrap().epoch, first.epoch + 1);
    routed.put("plum", "4").await.unwrap();
    assert_eq!(routed.get("pear").await.unwrap(), "3");
    assert_eq!(
        forwarded(&c, 1).await,
        before + 1,
        "the router kept sending n..s to its old owner"
    );
}
