//! Where a load's PUTs go: straight to their owner, pipelined to a memory
//! owner and one to a connection to a durable one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cavi_node::pipe::{self, Pipes};
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use tokio::sync::OnceCell;

use crate::ClientError;
use crate::client::{PutRequest, key_path};
use crate::routing::Router;

/// The connections a load's PUTs take: pipelined to a memory owner, one
/// at a time on each of many to a durable one.
pub(super) struct Lanes {
    pipelined: Pipes,
    parallel: Pipes,
    timeout: Duration,
    /// What each owner seen said of its storage.
    owners: Mutex<HashMap<String, Probe>>,
    /// How long an owner that did not say waits before it is asked again.
    retry_after: Duration,
}

/// One ask of an owner whether it is durable, shared by every PUT that
/// waits for its answer: whether it is, or when it did not answer.
type Probe = Arc<OnceCell<Result<bool, Instant>>>;

impl Lanes {
    pub(super) fn new(timeout: Duration, concurrency: usize) -> Self {
        Self {
            pipelined: Pipes::new(timeout, timeout),
            parallel: Pipes::new(timeout, timeout).shaped(concurrency, 1),
            timeout,
            owners: Mutex::default(),
            retry_after: Duration::from_secs(1),
        }
    }

    /// The pool for `addr`. An owner is asked once what it is; one that
    /// did not answer (not ready yet, restarting, unreachable) gets
    /// pipelines, which its PUTs fail over from to the router either way,
    /// and is asked again a second after it failed to answer. An older
    /// node, which answers without saying, is a memory owner.
    async fn to(&self, router: &Router, addr: &str) -> &Pipes {
        let due_again = |probe: &Probe| matches!(probe.get(), Some(Err(failed)) if failed.elapsed() >= self.retry_after);
        let answer = {
            let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
            match owners.get(addr) {
                Some(probe) if !due_again(probe) => probe.clone(),
                _ => {
                    let probe = Probe::default();
                    owners.insert(addr.to_owned(), probe.clone());
                    probe
                }
            }
        };
        let durable = *answer
            .get_or_init(|| async {
                let owner = router.entry().for_addr(addr, self.timeout);
                owner
                    .cluster()
                    .await
                    .map(|view| view.durable)
                    .map_err(|_| Instant::now())
            })
            .await;
        if durable == Ok(true) {
            &self.parallel
        } else {
            &self.pipelined
        }
    }
}

/// PUTs one record, pipelined to its owner; anything but a `2xx` goes
/// again through the router.
pub(super) async fn put(
    router: &Router,
    lanes: &Lanes,
    key: &str,
    value: &str,
) -> Result<(), ClientError> {
    let addr = router.addr_for(key).await;
    let pipes = lanes.to(router, &addr).await;
    let body = serde_json::to_vec(&PutRequest { value })
        .map_err(|e| ClientError::Input(format!("cannot encode the value of {key:?}: {e}")))?;
    let request = pipe::request(
        "PUT",
        &addr,
        &key_path(key),
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        &body,
    );
    match pipes.send(&addr, request).await {
        Ok(answer) if answer.status.is_success() => {
            let epoch = answer
                .epoch
                .as_ref()
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let Some(epoch) = epoch {
                router.saw_epoch(epoch).await;
            }
            Ok(())
        }
        _ => router.put(key, value).await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::client::Client;

    /// A durable owner whose `/cluster` fails its first `failing` times
    /// (as one not ready yet does); returns its address and how often it
    /// was asked.
    async fn owner(failing: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = if count.fetch_add(1, Ordering::SeqCst) < failing {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                } else {
                    let body = r#"{"shard_id":0,"keys":0,"durable":true,"shards":[]}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        (addr, asked)
    }

    fn router() -> Router {
        let entry = Client::new("http://127.0.0.1:9", Duration::from_secs(5)).expect("client");
        Router::new(entry, true)
    }

    #[tokio::test]
    async fn an_owner_is_asked_once_and_its_pool_kept() {
        let (addr, asked) = owner(0).await;
        let lanes = Lanes::new(Duration::from_secs(5), 8);
        let router = router();
        let pools = futures::future::join_all((0..20).map(|_| lanes.to(&router, &addr))).await;
        assert!(pools.iter().all(|p| std::ptr::eq(*p, &lanes.parallel)));
        assert_eq!(asked.load(Ordering::SeqCst), 1, "one ask, shared");
    }

    #[tokio::test]
    async fn an_owner_that_did_not_answer_is_asked_again_later() {
        let (addr, asked) = owner(1).await;
        let mut lanes = Lanes::new(Duration::from_secs(5), 8);
        lanes.retry_after = Duration::from_millis(50);
        let router = router();
        // Not answering: pipelines, and not asked again at once.
        for _ in 0..10 {
            assert!(std::ptr::eq(
                lanes.to(&router, &addr).await,
                &lanes.pipelined
            ));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Once the wait is over, the next PUT asks again and the owner,
        // ready now, gets its own connections.
        tokio::time::sleep(lanes.retry_after).await;
        assert!(std::ptr::eq(
            lanes.to(&router, &addr).await,
            &lanes.parallel
        ));
        assert!(std::ptr::eq(
            lanes.to(&router, &addr).await,
            &lanes.parallel
        ));
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }
}
