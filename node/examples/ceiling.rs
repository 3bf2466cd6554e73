//! The HTTP ceiling of a machine for the benchmark: the same stack as a
//! node (tokio, hyper, axum) answering a constant, with no routing to
//! shards, no storage and no middleware. `ceiling <ADDR>`.
//!
//! It answers any path, so the bench can send it the very requests of a
//! scenario: the load generator shares the machine, and its own cost per
//! request differs between request streams. A GET answers a constant; a PUT
//! reads its body and answers 204, as a node's PUT does.

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3999".into());
    let app = Router::new()
        .fallback(get(|| async { "\"bar\"" }).put(|_body: Bytes| async { StatusCode::NO_CONTENT }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
