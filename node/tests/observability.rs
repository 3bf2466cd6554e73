//! Metrics, request ids across hops, and structured logs.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::any;
use common::process::{Proc, free_port};
use common::{Client, Cluster, Member, SEED, bind, fast_settings, layout, spawn_node};
use reqwest::StatusCode;

async fn metrics_text(c: &Client, base: &str) -> String {
    let r = c.http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    r.text().await.unwrap()
}

fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing `{line}` in\n{text}"
    );
}

#[tokio::test]
async fn metrics_count_requests_peers_fan_out_and_storage() {
    let c = Cluster::start_with(
        &[("a", Some("m")), ("n", Some("z")), ("{", None)],
        &[Member::Node, Member::Node, Member::Dead],
        fast_settings(),
    )
    .await;
    let n0 = c.url(0);
    c.client.put(&n0, "apple", "12345").await;
    c.client.put(&n0, "nut", "1").await;
    c.client.get(&n0, "apple").await;
    c.client.get(&n0, "missing").await;
    assert_eq!(
        c.client.get(&n0, "{x").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    c.client.search(&n0, "prefix=").await;
    c.client.search(&n0, "prefix=a").await;

    let text = metrics_text(&c.client, &n0).await;
    has(
        &text,
        r#"cavi_http_requests_total{method="PUT",route="/kv/{*key}",status="204"} 2"#,
    );
    has(
        &text,
        r#"cavi_http_requests_total{method="GET",route="/kv/{*key}",status="200"} 1"#,
    );
    has(
        &text,
        r#"cavi_http_requests_total{method="GET",route="/kv/{*key}",status="404"} 1"#,
    );
    has(
        &text,
        r#"cavi_http_requests_total{method="GET",route="/kv/{*key}",status="503"} 1"#,
    );
    has(
        &text,
        r#"cavi_http_request_duration_seconds_count{method="GET",route="/kv/{*key}"} 3"#,
    );
    has(
        &text,
        r#"cavi_peer_requests_total{peer="1",kind="kv",outcome="204"} 1"#,
    );
    has(
        &text,
        r#"cavi_peer_requests_total{peer="2",kind="kv",outcome="peer_unavailable"} 1"#,
    );
    has(
        &text,
        r#"cavi_peer_requests_total{peer="2",kind="search",outcome="peer_unavailable"} 1"#,
    );
    // "" asks all three shards, "a" only this one.
    has(&text, "cavi_search_fan_out_shards_count 2");
    has(&text, "cavi_search_fan_out_shards_sum 4.0");
    has(&text, "cavi_stored_keys 1");
    has(&text, "cavi_stored_bytes 10");
    // Errors by the code of their body: the missing key and the dead owner
    // answered 404 and 503, and nothing that succeeded is counted.
    let mut key_errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(r#"cavi_http_errors_total{route="/kv/{*key}""#))
        .collect();
    key_errors.sort_unstable();
    assert_eq!(
        key_errors,
        [
            r#"cavi_http_errors_total{route="/kv/{*key}",code="key_not_found"} 1"#,
            r#"cavi_http_errors_total{route="/kv/{*key}",code="peer_unavailable"} 1"#,
        ],
        "{text}"
    );
}

#[tokio::test]
async fn request_ids_travel_with_forwarded_requests() {
    // Shard 1 is a stand-in that records what it receives.
    let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let (l0, a0) = bind().await;
    let (l1, a1) = bind().await;
    let recorder = Router::new().fallback(any({
        let seen = seen.clone();
        move |headers: HeaderMap| async move {
            seen.lock().unwrap().push(headers);
            AxumStatus::NO_CONTENT
        }
    }));
    let stand_in = tokio::spawn(async move { axum::serve(l1, recorder).await });
    let node = spawn_node(l0, layout(&SEED, &[a0, a1]), 0, fast_settings());
    let c = Client::new();

    let r = c
        .send(
            c.http
                .put(Client::kv(&node.url(), "nut"))
                .header("x-request-id", "trace-me-123")
                .header("content-type", "application/json")
                .body(r#"{"value":"v"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.headers["x-request-id"], "trace-me-123");
    c.search(&node.url(), "prefix=").await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one forwarded PUT, one search");
        for h in seen.iter() {
            assert_eq!(h["x-cavi-forwarded"], "0");
        }
        assert_eq!(seen[0]["x-request-id"], "trace-me-123");
        // The search got an id made up by node 0: the same one it answered with.
        assert_eq!(seen[1]["x-request-id"].len(), 16);
    }
    // Without one, the node makes one up and returns it.
    let r = c.get(&node.url(), "apple").await;
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert!(
        id.len() == 16 && id.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{id}"
    );
    // A key it forwards carries the id it made up, the one it answers with.
    let r = c.get(&node.url(), "nut").await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 16, "{id}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "the forwarded GET reached shard 1");
        assert_eq!(seen[2]["x-request-id"], id.as_str());
    }
    stand_in.abort();
}

#[tokio::test]
async fn json_logs_carry_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead = free_port();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("shards:\n  - {{id: 0, addr: '127.0.0.1:{port}', range_end: m}}\n  - {{id: 1, addr: '127.0.0.1:{dead}', range_start: n}}\n")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kvstore-api"))
        .args(["0", config.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut node = Proc(child);
    let url = format!("http://127.0.0.1:{port}");
    node.ready(&url).await;
    let c = Client::new();
    let r = c
        .send(
            c.http
                .get(Client::kv(&url, "nut"))
                .header("x-request-id", "follow-me"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

    let logs = node.0.stderr.take().unwrap();
    let found = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = BufReader::new(logs).lines();
        while Instant::now() < deadline {
            let line = lines.next()?.ok()?;
            let json: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            if line.contains("follow-me") {
                return Some(json);
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("a log line with the request id");
    assert_eq!(found["level"], "WARN");
    assert_eq!(found["span"]["request_id"], "follow-me");
    assert!(
        found["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("shard 1"),
        "{found}"
    );
}
