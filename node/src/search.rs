//! Prefix search: fanned out concurrently to the shards whose range can hold
//! the prefix (and only those), merged in key order. A shard that fails
//! fails the search unless the caller accepted a partial answer, which is
//! then marked as such; never a silent partial result.

use percent_encoding::utf8_percent_encode;
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::dispatch::{Node, storage};
use crate::error::ApiError;
use crate::peers::{Caller, PeerError, URL_ESCAPE};
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

impl SearchParams {
    /// The query string that asks for these parameters: the one writer of
    /// what the `Deserialize` above reads, for nodes and the client alike.
    /// Defaults are left out.
    pub fn to_query(&self) -> String {
        let mut query = format!("prefix={}", utf8_percent_encode(&self.prefix, URL_ESCAPE));
        if self.scope == Scope::Local {
            query.push_str("&scope=local");
        }
        if let Some(limit) = self.limit {
            query.push_str(&format!("&limit={limit}"));
        }
        if self.partial {
            query.push_str("&partial=true");
        }
        query
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_reads_back_as_the_same_parameters() {
        let params = SearchParams {
            prefix: "a+b&c=d/é".into(),
            scope: Scope::Local,
            limit: Some(7),
            partial: true,
        };
        let query = params.to_query();
        assert_eq!(
            query,
            "prefix=a%2Bb%26c%3Dd%2F%C3%A9&scope=local&limit=7&partial=true"
        );
        let back: SearchParams = parse_query(&query);
        assert_eq!(back.prefix, params.prefix);
        assert_eq!(back.scope, Scope::Local);
        assert_eq!(back.limit, Some(7));
        assert!(back.partial);
        assert_eq!(SearchParams::default().to_query(), "prefix=");
    }

    /// Parses a query the way the router's `Query` extractor does.
    fn parse_query(query: &str) -> SearchParams {
        let uri: axum::http::Uri = format!("/search?{query}").parse().expect("uri");
        axum::extract::Query::try_from_uri(&uri).expect("parses").0
    }
}
