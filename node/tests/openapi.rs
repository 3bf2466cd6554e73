//! The API contract: the OpenAPI document the node serves is the one
//! committed in `node/openapi.json` (regenerate with
//! `CAVI_BLESS=1 cargo nextest run -p cavi-node --test openapi`), it is
//! OpenAPI 3.1, and it names every public route and error code.
#![allow(clippy::unwrap_used)]

use cavi_node::api::openapi::document_json;
use cavi_node::testkit::{Cluster, SEED};
use reqwest::StatusCode;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = document_json();
    if std::env::var_os("CAVI_BLESS").is_some() {
        std::fs::write(COMMITTED, generated).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "node/openapi.json is stale: run `CAVI_BLESS=1 cargo nextest run -p cavi-node --test openapi` and commit it"
    );
}

#[test]
fn the_document_is_openapi_3_1_and_covers_the_public_routes() {
    let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let mut routes: Vec<&str> = paths.keys().map(String::as_str).collect();
    routes.sort_unstable();
    assert_eq!(
        routes,
        [
            "/cluster",
            "/healthz",
            "/kv",
            "/kv/{key}",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/search"
        ]
    );
    for method in ["get", "put", "delete"] {
        assert!(
            paths["/kv/{key}"][method].is_object(),
            "{method} /kv/{{key}}"
        );
        let by_query = &paths["/kv"][method]["parameters"][0];
        assert_eq!(
            (by_query["name"].as_str(), by_query["in"].as_str()),
            (Some("key"), Some("query"))
        );
    }
    assert!(
        paths.keys().all(|p| !p.starts_with("/internal")),
        "peer routes stay out"
    );
    // The codes a client can meet on a key are all described.
    let text = paths["/kv/{key}"]["put"].to_string();
    for code in [
        "invalid_key",
        "value_too_large",
        "misdirected",
        "peer_unavailable",
        "overloaded",
        "storage_unavailable",
        "unsupported_media_type",
        "invalid_body",
    ] {
        assert!(text.contains(code), "{code} is not documented on PUT");
    }
}

#[tokio::test]
async fn the_node_serves_the_document() {
    let c = Cluster::start(&SEED).await;
    let served = c
        .client
        .http
        .get(format!("{}/openapi.json", c.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.headers()["content-type"], "application/json");
    assert_eq!(served.text().await.unwrap(), document_json());
}
