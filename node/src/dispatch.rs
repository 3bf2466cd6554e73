//! The one place that decides "serve here or forward to the owner", between
//! the HTTP handlers and the store / peer client.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::metrics::status_label;
use crate::moves::Admission;
use crate::node::Node;
use crate::peers::{Caller, KvOp};
use crate::wire::{EPOCH_HEADER, Owner, json_string};

impl Node {
    /// Size limits on the key, enforced by the entry node before anything
    /// else happens.
    pub fn check_key(&self, key: &str) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::InvalidKey("key must not be empty".into()));
        }
        let limit = self.settings.max_key_bytes;
        if key.len() > limit {
            return Err(ApiError::KeyTooLarge {
                len: key.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Serves a key operation here if this shard owns the key, otherwise
    /// proxies it to the owner, unless it was already proxied once. An
    /// owner that answers 421 with a newer map makes this node refresh its
    /// map from it and try once more.
    pub async fn execute(
        self: &Arc<Self>,
        key: &str,
        op: KvOp,
        caller: &Caller,
    ) -> Result<Response, ApiError> {
        self.check_key(key)?;
        if let KvOp::Put { value, .. } = &op {
            let limit = self.settings.max_value_bytes;
            if value.len() > limit {
                return Err(ApiError::ValueTooLarge {
                    len: value.len(),
                    limit,
                });
            }
        }
        let deadline = Instant::now() + self.settings.request_timeout;
        let mut refreshed = false;
        loop {
            let map = self.map();
            let (owner_id, owner_addr, epoch) = match map.owner_of(key) {
                Some(owner) => (owner.id, owner.addr.clone(), map.epoch),
                None if caller.forwarded_by.is_some() => {
                    return Err(self.misdirected(key, caller, None));
                }
                None => return Err(ApiError::KeyOutOfRange(key.to_owned())),
            };
            drop(map);
            if owner_id == self.id() {
                match self.outgoing.load_full() {
                    Some(out) if out.span.contains(key.as_bytes()) && !out.phase().is_final() => {
                        let admitted = out
                            .admit(deadline, matches!(op, KvOp::Get))
                            .await
                            .map_err(|()| self.moving(key, deadline))?;
                        match admitted {
                            Admission::Serve(_running) => {
                                if !matches!(op, KvOp::Get) {
                                    out.throttle(deadline)
                                        .await
                                        .map_err(|()| self.moving(key, deadline))?;
                                }
                                return self.apply_local(key, op).await;
                            }
                            Admission::Reroute => continue,
                        }
                    }
                    _ => return self.apply_local(key, op).await,
                }
            }
            if caller.forwarded_by.is_some() {
                return Err(self.misdirected(
                    key,
                    caller,
                    Some(Owner {
                        id: owner_id,
                        addr: owner_addr,
                    }),
                ));
            }
            tracing::debug!(key, owner = owner_id, "forwarding");
            let answer = self
                .peers
                .forward(&owner_addr, key, &op, epoch, caller.request_id.as_ref())
                .await;
            let outcome = match &answer {
                Ok(response) => status_label(response.status().as_u16()),
                Err(e) => e.code(),
            };
            self.metrics.record_peer(owner_id, "kv", outcome);
            let mut response = answer.map_err(|source| ApiError::Peer {
                shard: owner_id,
                addr: owner_addr.clone(),
                source,
            })?;
            if response.status() == StatusCode::MISDIRECTED_REQUEST && !refreshed {
                refreshed = true;
                // The owner moved on: take its newer map (or notice ours
                // already is newer than the one this request went by).
                self.refresh_from(&owner_addr).await;
                if self.map().epoch > epoch {
                    continue;
                }
            }
            // A client routing by an older map learns it sent the key to
            // the wrong node.
            if !response.headers().contains_key(EPOCH_HEADER) {
                response
                    .headers_mut()
                    .insert(EPOCH_HEADER, HeaderValue::from(self.map().epoch));
            }
            return Ok(response);
        }
    }

    fn misdirected(&self, key: &str, caller: &Caller, owner: Option<Owner>) -> ApiError {
        ApiError::Misdirected {
            key: key.to_owned(),
            me: self.id(),
            by: caller.forwarded_by.clone().unwrap_or_default(),
            epoch: self.map().epoch,
            owner,
        }
    }

    fn moving(&self, key: &str, deadline: Instant) -> ApiError {
        ApiError::RangeMoving {
            key: key.to_owned(),
            waited: self
                .settings
                .request_timeout
                .saturating_sub(deadline.saturating_duration_since(Instant::now())),
        }
    }

    /// Takes the map of the node at `addr` if it is newer than ours;
    /// whether ours changed.
    pub async fn refresh_from(&self, addr: &str) -> bool {
        match self.peers.map(addr).await {
            Ok(map) => match self.install_map(map, false).await {
                Ok(changed) => changed,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "refused a peer's map");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot fetch a peer's map");
                false
            }
        }
    }

    async fn apply_local(&self, key: &str, op: KvOp) -> Result<Response, ApiError> {
        let store = self.serving_store()?;
        match op {
            KvOp::Get => {
                // Not `read_off_workers`: its closure owns the key, a copy
                // a memory GET, which reads in place, does not need.
                let body = match store.readers() {
                    None => read_json(store.as_ref(), key)?,
                    Some(readers) => {
                        let (store, key) = (store.clone(), key.to_owned());
                        readers
                            .run(move || read_json(store.as_ref(), &key))
                            .await??
                    }
                };
                match body {
                    Some(json) => Ok(json_response(json)),
                    None => Err(ApiError::KeyNotFound(key.to_owned())),
                }
            }
            KvOp::Put { value, .. } => {
                store.put(key, &value).await?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            KvOp::Delete => {
                store.delete(key).await?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
    }
}

/// The value of `key` as a JSON string, encoded straight from the engine.
fn read_json(store: &dyn crate::store::Store, key: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let mut body = None;
    store.read(key, &mut |value| body = Some(json_string(value)))?;
    Ok(body)
}

fn json_response(json: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
