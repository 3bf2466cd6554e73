//! Running a node: the caller binds the socket (tests bind `127.0.0.1:0`
//! and run many nodes in one process), `serve` runs it until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api;
use crate::dispatch::Node;

/// Serves `node` on `listener` until `shutdown` resolves, then stops
/// accepting, marks the node not ready and lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = api::router(node.clone());
    let drain = async move {
        shutdown.await;
        node.mark_not_ready();
        tracing::info!(
            shard = node.shard().id,
            "shutting down: draining in-flight requests"
        );
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(drain)
        .await
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
