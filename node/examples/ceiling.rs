//! The HTTP ceiling of a machine for the benchmark: the same stack as a
//! node (tokio, hyper, axum) answering a constant, with no routing to
//! shards, no storage and no middleware. `ceiling <ADDR> [put]`.
//!
//! It answers any path, so the bench can send it the very requests of a
//! scenario: the load generator shares the machine, and its own cost per
//! request differs between request streams. By default it answers GETs
//! with a constant; with `put` it answers PUTs instead, reading the body
//! and answering 204 as a node's PUT does. Each mode has one handler, as
//! a second method costs the router's dispatch of the first.

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, put};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3999".into());
    let app = if args.next().as_deref() == Some("put") {
        Router::new().fallback(put(|_body: Bytes| async { StatusCode::NO_CONTENT }))
    } else {
        Router::new().fallback(get(|| async { "\"bar\"" }))
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
