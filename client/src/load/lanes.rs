//! Where a load's PUTs go: straight to their owner, pipelined to a memory
//! owner and one to a connection to a durable one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    /// Whether each owner seen is durable, asked once.
    durable: Mutex<HashMap<String, Arc<OnceCell<bool>>>>,
}

impl Lanes {
    pub(super) fn new(timeout: Duration, concurrency: usize) -> Self {
        Self {
            pipelined: Pipes::new(timeout, timeout),
            parallel: Pipes::new(timeout, timeout).shaped(concurrency, 1),
            timeout,
            durable: Mutex::default(),
        }
    }

    /// The pool for `addr`. An owner that cannot say what it is (it is
    /// down, or older) gets pipelines: its PUTs fail over to the router
    /// either way.
    async fn to(&self, router: &Router, addr: &str) -> &Pipes {
        let known = {
            let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
            match durable.get(addr) {
                Some(known) => known.clone(),
                None => durable.entry(addr.to_owned()).or_default().clone(),
            }
        };
        let durable = *known
            .get_or_init(|| async {
                let owner = router.entry().for_addr(addr, self.timeout);
                owner.cluster().await.is_ok_and(|view| view.durable)
            })
            .await;
        if durable {
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
