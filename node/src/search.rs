//! Prefix search: fanned out concurrently to the shards whose range can hold
//! the prefix (and only those), merged in key order. A shard that fails
//! fails the search unless the caller accepted a partial answer, which is
//! then marked as such; never a silent partial result.

use serde::Deserialize;
use tokio::task::JoinSet;

use crate::dispatch::{Node, storage};
use crate::error::ApiError;
use crate::peers::{Caller, PeerError};
use crate::store::Entry;

/// Query parameters of `GET /search`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Keys starting with this; empty (the default) matches every key.
    #[serde(default)]
    pub prefix: String,
    /// `cluster` (default) asks every shard that can hold the prefix,
    /// `local` only this node.
    #[serde(default)]
    pub scope: Scope,
    /// Caps the number of entries returned.
    pub limit: Option<usize>,
    /// Accept an answer with some shards missing (named in a header).
    #[serde(default)]
    pub partial: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Cluster,
    Local,
}

/// Entries in key order, and the shards that did not answer (only ever
/// non-empty when the caller asked for a partial answer).
#[derive(Debug, Default)]
pub struct SearchResult {
    pub entries: Vec<Entry>,
    pub missing: Vec<u32>,
}

impl Node {
    pub async fn search(
        &self,
        params: SearchParams,
        caller: &Caller,
    ) -> Result<SearchResult, ApiError> {
        let limit = params.limit.unwrap_or(usize::MAX);
        if caller.forwarded_by.is_some() || params.scope == Scope::Local {
            let entries = self
                .store()?
                .scan_prefix(&params.prefix, limit)
                .map_err(storage)?;
            return Ok(SearchResult {
                entries,
                missing: Vec::new(),
            });
        }

        let mut asks = JoinSet::new();
        let mut entries = Vec::new();
        let mut width = 0;
        for shard in self.config().shards_for_prefix(&params.prefix) {
            width += 1;
            if shard.id == self.shard().id {
                continue;
            }
            let (peers, shard, prefix) = (self.peers.clone(), shard.clone(), params.prefix.clone());
            let request_id = caller.request_id.clone();
            asks.spawn(async move {
                let found = peers
                    .search(&shard, &prefix, params.limit, request_id.as_ref())
                    .await;
                (shard.id, found)
            });
        }
        self.metrics.record_fan_out(width);
        // Our own part runs while the peers are asked.
        if self.shard().range().may_hold_prefix(&params.prefix) {
            entries.extend(
                self.store()?
                    .scan_prefix(&params.prefix, limit)
                    .map_err(storage)?,
            );
        }

        let mut failures: Vec<(u32, PeerError)> = Vec::new();
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((id, Ok(found))) => {
                    self.metrics.record_peer(id, "search", "200");
                    entries.extend(found);
                }
                Ok((id, Err(e))) => {
                    self.metrics.record_peer(id, "search", e.code());
                    failures.push((id, e));
                }
                // A task only ends without a value if it panicked.
                Err(e) => {
                    return Err(ApiError::Storage(format!("search task failed: {e}")));
                }
            }
        }
        failures.sort_by_key(|(id, _)| *id);
        if !failures.is_empty() && !params.partial {
            return Err(ApiError::SearchIncomplete(failures));
        }
        for (id, e) in &failures {
            tracing::warn!(shard = id, error = %e, "partial search: shard missing");
        }
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        entries.truncate(limit);
        Ok(SearchResult {
            entries,
            missing: failures.into_iter().map(|(id, _)| id).collect(),
        })
    }
}
