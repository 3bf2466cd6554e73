//! Running a node: the caller binds the socket (tests bind `127.0.0.1:0`
//! and run many nodes in one process), [`serve`] runs it until shutdown.
//!
//! Connections are served by hyper directly (not `axum::serve`, which has
//! no timeouts or limits):
//! - a header-read timeout: a connection that has not sent a complete
//!   request head within it is closed. hyper runs the same timer from the
//!   end of one response to the next head, so it is also the keep-alive
//!   idle timeout;
//! - a cap on open connections (never above what the process's open-file
//!   limit allows). At the cap an idle or slow-header connection is closed
//!   to make room, so they can never lock a fresh client out;
//! - a drain on shutdown: `/readyz` turns 503 at once while requests keep
//!   being served for `shutdown_delay` (long enough for load balancers and
//!   endpoints to notice), then the listener closes, idle connections
//!   close, requests in flight finish, and whatever is left after
//!   `drain_timeout` is cut.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api;
use crate::node::Node;

/// Connection limits and shutdown timings, with the documented defaults.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Most connections open at once (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Longest wait for a request head, and for the next one on an idle
    /// keep-alive connection.
    pub header_read_timeout: Duration,
    /// How long a stopping node keeps serving with `/readyz` at 503.
    pub shutdown_delay: Duration,
    /// How long requests in flight get to finish once the listener closed.
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The open connections, so one can be asked to close.
#[derive(Default)]
struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Conn>>,
}

#[derive(Clone)]
struct Conn {
    /// Requests being served on it now.
    active: Arc<AtomicUsize>,
    close: Arc<CloseSignal>,
}

/// Asks one connection to close: when the cap needs its slot, or when the
/// node drains.
///
/// Why not a `Notify` (and a `watch` for the drain, as before): the
/// connection's task polls its close signals every time it runs, once or
/// twice a request, and a `Notified` takes its notifier's lock on every
/// poll. This is a flag and a waker slot, a load and two compare-and-swaps
/// a poll; the change saved about 380 of a local GET's 19,000
/// instructions (callgrind, three runs of each binary).
#[derive(Default)]
struct CloseSignal {
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl CloseSignal {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A close between the load and the registration woke no one.
        if self.closed.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Connections {
    fn add(&self) -> (u64, Conn) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            active: Arc::default(),
            close: Arc::default(),
        };
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Asks the oldest connection with nothing in flight (idle, or still
    /// sending its headers) to close; whether there was one.
    fn evict_one(&self) -> bool {
        let open = self.lock();
        let victim = open
            .iter()
            .filter(|(_, c)| c.active.load(Ordering::Relaxed) == 0)
            .min_by_key(|(id, _)| **id);
        match victim {
            Some((_, c)) => {
                c.close.close();
                true
            }
            None => false,
        }
    }

    /// Asks every open connection to close (the drain): idle ones close
    /// at once, busy ones after their request.
    fn close_all(&self) {
        for c in self.lock().values() {
            c.close.close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The soft open-file limit of this process, where the system says it.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `wanted`, lowered so connections leave room for the node's other files
/// (peer connections, storage) within the open-file limit.
pub fn connection_cap(wanted: usize) -> usize {
    match open_file_limit() {
        Some(files) => wanted
            .min((files / 2).max(files.saturating_sub(256)))
            .max(1),
        None => wanted.max(1),
    }
}

/// Serves `node` on `listener` until `shutdown` resolves, then drains as
/// the module describes.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> std::io::Result<()> {
    let app = api::App::new(node.clone());
    let cap = connection_cap(options.max_connections);
    let slots = Arc::new(Semaphore::new(cap));
    let connections = Arc::new(Connections::default());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true)
        // Answers to pipelined requests (forwarded reads) leave in one
        // write instead of one each.
        .pipeline_flush(true)
        .max_buf_size(256 * 1024);

    let stop = async {
        shutdown.await;
        node.mark_not_ready();
        tracing::info!(
            shard = node.id(),
            delay = ?options.shutdown_delay,
            "shutting down: not ready, still serving"
        );
        tokio::time::sleep(options.shutdown_delay).await;
    };
    tokio::pin!(stop);

    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                connections.evict_one();
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut stop => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait, not die.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let (id, conn) = connections.add();
        let service = {
            let app = app.clone();
            let active = conn.active.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let app = app.clone();
                active.fetch_add(1, Ordering::Relaxed);
                let active = active.clone();
                async move {
                    let response = app.handle(req).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let served = http.serve_connection(TokioIo::new(stream), service);
        let connections = connections.clone();
        tokio::spawn(async move {
            let _slot = permit;
            tokio::pin!(served);
            // The connection first: it is what wakes the task nearly
            // every time.
            let ended = std::future::poll_fn(|cx| {
                if let Poll::Ready(ended) = served.as_mut().poll(cx) {
                    return Poll::Ready(Some(ended));
                }
                conn.close.poll_closed(cx).map(|()| None)
            })
            .await;
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    // Idle: closes now; busy: finishes its request first.
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            connections.remove(id);
        });
    }

    drop(listener);
    // Connections accepted before the listener closed are all registered.
    connections.close_all();
    let open = cap - slots.available_permits();
    tracing::info!(shard = node.id(), open, "listener closed; draining");
    let cap = u32::try_from(cap).unwrap_or(u32::MAX);
    match tokio::time::timeout(options.drain_timeout, slots.acquire_many(cap)).await {
        Ok(_) => tracing::info!(shard = node.id(), "drained"),
        Err(_) => tracing::warn!(
            shard = node.id(),
            left = cap as usize - slots.available_permits(),
            "drain deadline passed; cutting the connections left"
        ),
    }
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Which signal asked a node to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: Kubernetes (or a supervisor) stops the pod.
    Terminate,
    /// Ctrl-C at a terminal.
    Interrupt,
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C, saying which.
pub async fn shutdown_signal() -> Signal {
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
        () = ctrl_c => Signal::Interrupt,
        () = terminate => Signal::Terminate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn closed(signal: &CloseSignal) {
        std::future::poll_fn(|cx| signal.poll_closed(cx)).await;
    }

    #[tokio::test]
    async fn a_close_before_the_first_poll_is_seen_at_once() {
        let signal = CloseSignal::default();
        signal.close();
        tokio::time::timeout(Duration::from_secs(5), closed(&signal))
            .await
            .expect("closed before it was polled");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_wakes_the_task_waiting_on_it() {
        let signal = Arc::new(CloseSignal::default());
        let (polled_tx, polled) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move {
                let mut polled_tx = Some(polled_tx);
                std::future::poll_fn(|cx| {
                    let p = signal.poll_closed(cx);
                    if let Some(tx) = polled_tx.take() {
                        let _ = tx.send(p.is_pending());
                    }
                    p
                })
                .await;
            }
        });
        assert!(
            polled.await.expect("the task polled the signal"),
            "pending before the close"
        );
        signal.close();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the close woke the waiting task")
            .expect("the waiting task ended");
    }
}
