//! The seed's wire format and the JSON errors, against real nodes.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use common::{Cluster, Member, SEED, fast_settings};
use reqwest::StatusCode;

#[tokio::test]
async fn seed_wire_format_put_get_delete() {
    let c = Cluster::start(&SEED).await;
    let (n0, n1) = (c.url(0), c.url(1));
    // Written through shard 1, owned by shard 0.
    let put = c.client.put(&n1, "foo", "bar").await;
    assert_eq!(put.status, StatusCode::NO_CONTENT);
    let got = c.client.get(&n0, "foo").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.body, serde_json::json!("bar"));
    assert_eq!(c.client.get(&n1, "foo").await.body, "bar");

    assert_eq!(
        c.client.delete(&n1, "foo").await.status,
        StatusCode::NO_CONTENT
    );
    let gone = c.client.get(&n0, "foo").await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.code(), "key_not_found");
    assert!(gone.error().contains("foo"));
    // DELETE of a missing key is still 204, locally and forwarded.
    assert_eq!(
        c.client.delete(&n0, "foo").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.client.delete(&n1, "foo").await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn key_space_edges_route_to_the_right_shard() {
    let c = Cluster::start(&SEED).await;
    for (key, owner) in [
        ("mango", 0),
        ("m", 0),
        ("a", 0),
        ("n", 1),
        ("zebra", 1),
        ("zzz", 1),
    ] {
        assert_eq!(
            c.client.put(&c.url(1 - owner), key, key).await.status,
            StatusCode::NO_CONTENT
        );
        let held = c.node(owner).stored(key);
        assert_eq!(
            held.as_deref(),
            Some(key),
            "{key} should be stored on shard {owner}"
        );
    }
}

#[tokio::test]
async fn unowned_key_is_a_json_4xx_naming_the_key() {
    let c = Cluster::start(&SEED).await;
    for key in ["{curly", "A", "0zero", "~tilde"] {
        for answer in [
            c.client.get(&c.url(0), key).await,
            c.client.put(&c.url(1), key, "v").await,
            c.client.delete(&c.url(0), key).await,
        ] {
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{key}");
            assert_eq!(answer.code(), "key_out_of_range");
            assert!(answer.error().contains(key), "{answer:?}");
        }
    }
}

#[tokio::test]
async fn body_errors_have_the_right_status_and_code() {
    let c = Cluster::start(&SEED).await;
    let url = common::Client::kv(&c.url(0), "k");
    let put = |body: &'static str, ct: Option<&'static str>| {
        let mut r = c.client.http.put(&url).body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        c.client.send(r)
    };
    let json = Some("application/json");
    let cases = [
        (put("{\"value\":", json).await, 400, "invalid_json"),
        (put("not json", json).await, 400, "invalid_json"),
        (put("{\"value\": 42}", json).await, 422, "invalid_body"),
        (put("{\"value\": null}", json).await, 422, "invalid_body"),
        (put("{\"val\": \"x\"}", json).await, 422, "invalid_body"),
        (
            put("{\"value\": \"x\", \"ttl\": 3}", json).await,
            422,
            "invalid_body",
        ),
        (put("[\"x\"]", json).await, 422, "invalid_body"),
        (
            put("{\"value\": \"x\"}", None).await,
            415,
            "unsupported_media_type",
        ),
        (
            put("{\"value\": \"x\"}", Some("text/plain")).await,
            415,
            "unsupported_media_type",
        ),
    ];
    for (answer, status, code) in cases {
        assert_eq!(answer.status.as_u16(), status, "{answer:?}");
        assert_eq!(answer.code(), code);
    }
    // A charset parameter is still JSON.
    let ok = put(
        "{\"value\": \"x\"}",
        Some("application/json; charset=utf-8"),
    )
    .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn size_limits_are_413_and_configurable() {
    let settings = cavi_node::settings::Settings {
        max_key_bytes: 8,
        max_value_bytes: 16,
        ..fast_settings()
    };
    let c = Cluster::start_with(&SEED, &[Member::Node, Member::Node], settings).await;
    let n0 = c.url(0);
    let long_key = c.client.get(&n0, "abcdefghi").await;
    assert_eq!(long_key.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(long_key.code(), "key_too_large");
    assert!(long_key.error().contains("limit of 8 bytes"));
    assert_eq!(
        c.client.put(&n0, "abcdefgh", "ok").await.status,
        StatusCode::NO_CONTENT
    );

    let big = c.client.put(&n0, "b", &"x".repeat(17)).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.code(), "value_too_large");
    // Checked at the entry node before forwarding, too.
    let big = c.client.put(&c.url(1), "b", &"x".repeat(17)).await;
    assert_eq!(big.code(), "value_too_large");
    assert_eq!(
        c.client.put(&n0, "b", &"x".repeat(16)).await.status,
        StatusCode::NO_CONTENT
    );

    // A body far beyond any valid value is cut off without buffering it.
    let huge = format!("{{\"value\": \"{}\"}}", "y".repeat(1 << 20));
    let answer = c
        .client
        .send(
            c.client
                .http
                .put(common::Client::kv(&n0, "b"))
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.code(), "body_too_large");
}

#[tokio::test]
async fn default_limits_take_a_one_mebibyte_value() {
    let c = Cluster::start(&SEED).await;
    let value = "v".repeat(1 << 20);
    assert_eq!(
        c.client.put(&c.url(1), "big", &value).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.client
            .get(&c.url(1), "big")
            .await
            .body
            .as_str()
            .map(str::len),
        Some(1 << 20)
    );
    let over = c.client.put(&c.url(0), "big", &(value + "v")).await;
    assert_eq!(over.code(), "value_too_large");
    let key = "k".repeat(1025);
    assert_eq!(c.client.get(&c.url(0), &key).await.code(), "key_too_large");
}

#[tokio::test]
async fn routing_errors_are_json() {
    let c = Cluster::start(&SEED).await;
    let n0 = c.url(0);
    let empty = c.client.send(c.client.http.get(format!("{n0}/kv/"))).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert_eq!(empty.code(), "invalid_key");
    let missing = c.client.send(c.client.http.get(format!("{n0}/nope"))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "route_not_found");
    let method = c
        .client
        .send(c.client.http.post(format!("{n0}/kv/a")))
        .await;
    assert_eq!(method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(method.code(), "method_not_allowed");
    let bad_utf8 = c
        .client
        .send(c.client.http.get(format!("{n0}/kv/%FF")))
        .await;
    assert_eq!(bad_utf8.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_utf8.code(), "invalid_key");
    // Percent-decoding only, exactly once, the same in both forms: bytes
    // that are not UTF-8 are refused, never replaced (so %FE and %FF
    // cannot both become U+FFFD and name one key), and `+` stays `+`.
    for (url, code) in [
        (format!("{n0}/kv?key=%FE"), "invalid_key"),
        (format!("{n0}/kv?key=%FF"), "invalid_key"),
        (format!("{n0}/kv/%FE"), "invalid_key"),
        (format!("{n0}/search?prefix=%FE"), "invalid_query"),
    ] {
        let bad = c.client.send(c.client.http.get(&url)).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(bad.code(), code, "{url}: {bad:?}");
    }
    let plus = c
        .client
        .send(
            c.client
                .http
                .put(format!("{n0}/kv?key=a+b"))
                .header("content-type", "application/json")
                .body(r#"{"value": "plus"}"#),
        )
        .await;
    assert_eq!(plus.status, StatusCode::NO_CONTENT);
    assert_eq!(c.client.get(&n0, "a+b").await.body, "plus");
    assert_eq!(c.client.get(&n0, "a b").await.status, StatusCode::NOT_FOUND);
    let twice = c
        .client
        .send(c.client.http.get(format!("{n0}/kv/a%252Bb")))
        .await;
    assert_eq!(
        twice.status,
        StatusCode::NOT_FOUND,
        "decoded once: the key is a%2Bb"
    );
    let bad_query = c.client.search(&n0, "prefix=a&limit=many").await;
    assert_eq!(bad_query.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_query.code(), "invalid_query");
}

#[tokio::test]
async fn operational_endpoints() {
    let c = Cluster::start(&SEED).await;
    let n1 = c.url(1);
    let health = c
        .client
        .send(c.client.http.get(format!("{n1}/healthz")))
        .await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = c
        .client
        .send(c.client.http.get(format!("{n1}/readyz")))
        .await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        c.client.put(&n1, "nut", "1").await.status,
        StatusCode::NO_CONTENT
    );
    let view = c
        .client
        .send(c.client.http.get(format!("{n1}/cluster")))
        .await;
    assert_eq!(view.status, StatusCode::OK);
    assert_eq!(view.body["shard_id"], 1);
    assert_eq!(view.body["keys"], 1);
    let shards = view.body["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(shards[0]["range_start"], "a");
    assert_eq!(shards[0]["range_end"], "m");
    assert_eq!(shards[1]["addr"], c.node(1).addr.to_string());
}
