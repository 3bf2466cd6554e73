//! The HTTP ceiling of a machine for the benchmark: the same stack as a
//! node (tokio, hyper, axum) answering a constant, with no routing to
//! shards, no storage and no middleware. `ceiling <ADDR>`.

use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3999".into());
    let app = Router::new().fallback(get(|| async { "\"bar\"" }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
