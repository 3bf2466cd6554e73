//! Prefix search over the shards whose ranges can hold the prefix (and only
//! those), read a bounded page at a time.
//!
//! The ranges of a map never overlap, so the answer is the pages of each
//! range in key order, one after the other: the merge of the shards'
//! sorted streams never has to compare across shards, and holds at most
//! one page per range. The first page of every range is asked for at once;
//! the rest as the answer is written.
//!
//! - With `limit`, an answer is at most `limit` entries and at most a
//!   page budget of bytes; one that stops early names a cursor
//!   (`x-cavi-next-cursor`) to continue from.
//! - Without `limit`, the answer is the whole result. When it fits a
//!   buffer budget it is sent whole, its status decided after every shard
//!   answered; otherwise it streams, and a failure after the first bytes
//!   aborts the transfer, so an incomplete answer never looks complete.
//! - A shard that answers 421 (the range moved on) makes the search take
//!   the newer map and ask the new owners, once.
//! - A shard that fails fails the search with a 5xx naming it, unless the
//!   caller asked for a partial answer: then shards that fail their first
//!   page are left out and named in `x-cavi-partial`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use percent_encoding::utf8_percent_encode;

use crate::config::ShardConfig;
use crate::error::ApiError;
use crate::keyspace::{Span, prefix_upper_bound};
use crate::node::Node;
use crate::peers::{Caller, PageAnswer, PageQuery, PeerError};
use crate::store::{Entry, Page, ScanRequest, Store, read_off_workers};
use crate::wire::{DecodeError, URL_ESCAPE, decode_cursor, encode_cursor, parse_query};

/// Query parameters of `GET /search`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchParams {
    /// Keys starting with this; empty (the default) matches every key.
    pub prefix: String,
    /// `cluster` (default) asks every shard that can hold the prefix,
    /// `local` only this node.
    pub scope: Scope,
    /// Caps the number of entries returned.
    pub limit: Option<usize>,
    /// Accept an answer with some shards missing (named in a header).
    pub partial: bool,
    /// Continue after the answer that named this cursor.
    pub cursor: Option<String>,
}

/// Which shards a search asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Cluster,
    Local,
}

impl SearchParams {
    /// Reads a query string: percent-decoding only, unknown parameters
    /// refused.
    pub fn from_query(query: &str) -> Result<Self, ApiError> {
        let pairs = parse_query(query).map_err(|DecodeError(e)| ApiError::InvalidQuery(e))?;
        let mut params = SearchParams::default();
        for (name, value) in pairs {
            match name.as_str() {
                "prefix" => params.prefix = value,
                "scope" => {
                    params.scope = match value.as_str() {
                        "cluster" => Scope::Cluster,
                        "local" => Scope::Local,
                        other => {
                            return Err(ApiError::InvalidQuery(format!(
                                "scope {other:?} is neither cluster nor local"
                            )));
                        }
                    }
                }
                "limit" => {
                    // As the API document says: a signed 64-bit count.
                    let limit = value
                        .parse::<i64>()
                        .ok()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            ApiError::InvalidQuery(format!(
                                "limit {value:?} is not a whole number from 0 to {}",
                                i64::MAX
                            ))
                        })?;
                    params.limit = Some(limit);
                }
                "partial" => {
                    params.partial = match value.as_str() {
                        "true" | "" => true,
                        "false" => false,
                        other => {
                            return Err(ApiError::InvalidQuery(format!(
                                "partial {other:?} is neither true nor false"
                            )));
                        }
                    }
                }
                // Empty: no cursor, the first page.
                "cursor" if value.is_empty() => params.cursor = None,
                "cursor" => {
                    decode_cursor(&value).ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "cursor {value:?} is not one this cluster wrote"
                        ))
                    })?;
                    params.cursor = Some(value);
                }
                other => {
                    return Err(ApiError::InvalidQuery(format!(
                        "unknown parameter {other:?} (expected prefix, scope, limit, partial, cursor)"
                    )));
                }
            }
        }
        Ok(params)
    }

    /// The query string that asks for these parameters: the one writer of
    /// what [`SearchParams::from_query`] reads, for nodes and clients
    /// alike. Defaults are left out.
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
        if let Some(cursor) = &self.cursor {
            query.push_str("&cursor=");
            query.extend(utf8_percent_encode(cursor, URL_ESCAPE));
        }
        query
    }
}

/// The keys a prefix names, as a span.
pub fn prefix_span(prefix: &str) -> Span {
    Span {
        start: prefix.as_bytes().to_vec(),
        upper: prefix_upper_bound(prefix.as_bytes()),
    }
}

/// One range of the map and what is left to read of it.
struct Source {
    shard: ShardConfig,
    /// The last key read from it.
    after: Option<String>,
    /// Entries read and not yet written out.
    buffered: VecDeque<Entry>,
    /// Whether the shard said more follow.
    more: bool,
    /// The epoch of the map the range came from.
    epoch: u64,
    /// Whether a page of it has been read.
    read: bool,
}

/// What a search answers with.
pub struct SearchResult {
    /// The start of the answer (the whole answer unless `rest` streams on).
    pub entries: Vec<Entry>,
    /// Shards left out of a partial answer.
    pub missing: Vec<u32>,
    /// Where to continue, for an answer that stopped at `limit` or its
    /// byte budget.
    pub next_cursor: Option<String>,
    /// The rest of an answer too large to buffer, read as it is written.
    pub rest: Option<Rest>,
}

/// The remaining pages of a streaming answer.
pub struct Rest {
    node: Arc<Node>,
    request_id: Option<axum::http::HeaderValue>,
    prefix: String,
    sources: VecDeque<Source>,
}

impl Rest {
    /// The next chunk of entries, `None` at the end. An error means the
    /// answer cannot be completed: the transfer must be aborted.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<Entry>, ApiError>> {
        loop {
            let source = self.sources.front_mut()?;
            if !source.buffered.is_empty() {
                return Some(Ok(source.buffered.drain(..).collect()));
            }
            if !source.more {
                self.sources.pop_front();
                continue;
            }
            let page = self
                .node
                .read_page(source, &self.prefix, usize::MAX, self.request_id.as_ref())
                .await;
            match page {
                Ok(replacement) => {
                    if let Some(split) = replacement {
                        self.sources.pop_front();
                        for s in split.into_iter().rev() {
                            self.sources.push_front(s);
                        }
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Node {
    /// Runs a search as the entry node (`scope=cluster`) or for this
    /// node's own keys (`scope=local`).
    pub async fn search(
        self: &Arc<Self>,
        params: SearchParams,
        caller: &Caller,
    ) -> Result<SearchResult, ApiError> {
        let map = self.map_snapshot();
        let after = params.cursor.as_deref().and_then(decode_cursor);
        let wanted = prefix_span(&params.prefix);
        let mut sources: VecDeque<Source> = map
            .shards_for_prefix(&params.prefix)
            .filter(|s| params.scope == Scope::Cluster || s.id == self.id())
            .filter(|s| {
                // Ranges wholly before the cursor have nothing left.
                let span = Span::from(&s.range()).intersect(&wanted);
                after.as_ref().is_none_or(|a| match &span.upper {
                    None => true,
                    Some(upper) => upper.as_slice() > a.as_bytes(),
                })
            })
            .map(|s| Source {
                shard: s.clone(),
                after: after.clone(),
                buffered: VecDeque::new(),
                more: true,
                epoch: map.epoch,
                read: false,
            })
            .collect();
        if params.scope == Scope::Cluster {
            self.metrics.record_fan_out(sources.len());
        }
        let limit = params.limit.unwrap_or(usize::MAX);
        let page_keys = self.settings.search_page_keys.min(limit.max(1));

        // First pages. Without a limit, of every range at once. With one,
        // of the first range alone: ranges are read in key order, so one
        // that holds `limit` matches is the whole answer and the others
        // need not be asked (a page of 10 over 8 shards asks one). Only if
        // it falls short are the rest asked, at once.
        let mut expanded = VecDeque::with_capacity(sources.len());
        let mut failures: Vec<(u32, PeerError)> = Vec::new();
        let mut wave = if params.limit.is_some() {
            1
        } else {
            sources.len()
        };
        while !sources.is_empty() {
            let mut batch: Vec<Source> = sources.drain(..wave.min(sources.len())).collect();
            let firsts = futures::future::join_all(batch.iter_mut().map(|source| {
                let node = self.clone();
                let prefix = params.prefix.clone();
                let request_id = caller.request_id.clone();
                async move {
                    node.read_page(source, &prefix, page_keys, request_id.as_ref())
                        .await
                }
            }))
            .await;
            for (source, first) in batch.into_iter().zip(firsts) {
                match first {
                    Ok(None) => expanded.push_back(source),
                    Ok(Some(split)) => expanded.extend(split),
                    Err(ApiError::Peer {
                        shard, source: e, ..
                    }) => failures.push((shard, e)),
                    Err(e) => return Err(e),
                }
            }
            let buffered: usize = expanded.iter().map(|s| s.buffered.len()).sum();
            if expanded.iter().any(|s| s.more) || buffered >= limit {
                break;
            }
            wave = sources.len();
        }
        failures.sort_by_key(|(id, _)| *id);
        if !failures.is_empty() && !params.partial {
            return Err(ApiError::SearchIncomplete(failures));
        }
        for (id, e) in &failures {
            tracing::warn!(shard = id, error = %e, "partial search: shard missing");
        }
        let mut missing: Vec<u32> = failures.iter().map(|(id, _)| *id).collect();
        // Ranges not asked yet, read only if the answer gets to them.
        expanded.extend(sources.drain(..));
        let mut sources = expanded;

        let budget = self.settings.search_buffer_bytes;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        loop {
            let Some(source) = sources.front_mut() else {
                // Everything read: a complete, buffered answer.
                return Ok(SearchResult {
                    entries,
                    missing,
                    next_cursor: None,
                    rest: None,
                });
            };
            if source.buffered.is_empty() && !source.more {
                sources.pop_front();
                continue;
            }
            // Something may be left: a page that is full stops here with a
            // cursor, before reading a page it would not use.
            if entries.len() >= limit
                || (params.limit.is_some() && !entries.is_empty() && bytes >= budget)
            {
                let next_cursor = entries.last().map(|e: &Entry| encode_cursor(&e.key));
                return Ok(SearchResult {
                    entries,
                    missing,
                    next_cursor,
                    rest: None,
                });
            }
            if let Some(entry) = source.buffered.pop_front() {
                bytes += entry.size();
                entries.push(entry);
                if params.limit.is_none() && bytes >= budget {
                    // Too large to hold: stream the rest.
                    return Ok(SearchResult {
                        entries,
                        missing,
                        next_cursor: None,
                        rest: Some(Rest {
                            node: self.clone(),
                            request_id: caller.request_id.clone(),
                            prefix: params.prefix.clone(),
                            sources,
                        }),
                    });
                }
                continue;
            }
            let first = !source.read;
            let page = self
                .read_page(
                    source,
                    &params.prefix,
                    page_keys,
                    caller.request_id.as_ref(),
                )
                .await;
            let page = match page {
                // A range asked for the first time fails like the first
                // pages above: the search, or only that shard when a
                // partial answer was asked for.
                Err(ApiError::Peer {
                    shard, source: e, ..
                }) if first => {
                    if !params.partial {
                        return Err(ApiError::SearchIncomplete(vec![(shard, e)]));
                    }
                    tracing::warn!(shard, error = %e, "partial search: shard missing");
                    missing.push(shard);
                    sources.pop_front();
                    continue;
                }
                other => other?,
            };
            if let Some(split) = page {
                sources.pop_front();
                for s in split.into_iter().rev() {
                    sources.push_front(s);
                }
            }
        }
    }

    /// Reads the next page of `source` into its buffer. When its shard no
    /// longer owns the range (a 421 from a newer map), takes that map and
    /// returns the sources that replace it, their first pages read.
    fn read_page<'a>(
        self: &'a Arc<Self>,
        source: &'a mut Source,
        prefix: &'a str,
        limit: usize,
        request_id: Option<&'a axum::http::HeaderValue>,
    ) -> futures::future::BoxFuture<'a, Result<Option<Vec<Source>>, ApiError>> {
        Box::pin(async move {
            let range = source.shard.range();
            let q = PageQuery {
                range: &range,
                prefix,
                after: source.after.as_deref(),
                limit: limit.min(self.settings.search_page_keys).max(1),
                max_bytes: self.settings.search_page_bytes,
            };
            let answer = if source.shard.id == self.id() {
                match self.local_page(&q).await {
                    Ok(page) => PageAnswer::Page(page),
                    Err(ApiError::NotOwner { epoch, .. }) => PageAnswer::Misdirected(epoch),
                    Err(e) => return Err(e),
                }
            } else {
                let epoch = self.map().epoch;
                let asked = self
                    .peers
                    .search_page(&source.shard.addr, &q, epoch, request_id)
                    .await;
                self.metrics.record_peer(
                    source.shard.id,
                    "search",
                    match &asked {
                        Ok(PageAnswer::Page(_)) => "200",
                        Ok(PageAnswer::Misdirected(_)) => "421",
                        Err(e) => e.code(),
                    },
                );
                asked.map_err(|e| ApiError::Peer {
                    shard: source.shard.id,
                    addr: source.shard.addr.clone(),
                    source: e,
                })?
            };
            match answer {
                PageAnswer::Page(Page { entries, more }) => {
                    source.after = entries
                        .last()
                        .map(|e| e.key.clone())
                        .or(source.after.take());
                    source.more = more;
                    source.read = true;
                    source.buffered.extend(entries);
                    Ok(None)
                }
                PageAnswer::Misdirected(theirs) => {
                    if source.shard.id != self.id() {
                        self.refresh_from(&source.shard.addr).await;
                    }
                    let map = self.map_snapshot();
                    if map.epoch <= source.epoch {
                        return Err(ApiError::Peer {
                            shard: source.shard.id,
                            addr: source.shard.addr.clone(),
                            source: PeerError::BadResponse(format!(
                                "it does not own {range} at map epoch {theirs}, and no newer map says who does"
                            )),
                        });
                    }
                    // The rest of the range, by the newer map.
                    let rest = Span::from(&range);
                    let mut split = Vec::new();
                    for shard in map.shards.iter() {
                        let Some(piece) = shard.range().intersect(&range) else {
                            continue;
                        };
                        if Span::from(&piece).intersect(&rest).is_empty() {
                            continue;
                        }
                        split.push(Source {
                            shard: ShardConfig {
                                range_start: piece.start,
                                range_end: piece.end,
                                ..shard.clone()
                            },
                            after: source.after.clone(),
                            buffered: VecDeque::new(),
                            more: true,
                            epoch: map.epoch,
                            read: false,
                        });
                    }
                    for s in &mut split {
                        // A second move during one search fails it.
                        if let Some(again) = self.read_page(s, prefix, limit, request_id).await? {
                            return Err(ApiError::Internal(format!(
                                "the range {} moved twice during one search ({} pieces)",
                                range,
                                again.len()
                            )));
                        }
                    }
                    Ok(Some(split))
                }
            }
        })
    }

    /// A page of this node's own keys in `q.range`: refused (421) unless
    /// this node owns all of it, held while the range is fenced, read off
    /// the async workers when reads block.
    pub async fn local_page(self: &Arc<Self>, q: &PageQuery<'_>) -> Result<Page, ApiError> {
        let mut span = Span::from(q.range).intersect(&prefix_span(q.prefix));
        if let Some(after) = q.after
            && after.as_bytes() >= span.start.as_slice()
        {
            // Keys after `after`: the smallest such key is `after` + NUL.
            let mut start = after.as_bytes().to_vec();
            start.push(0);
            span.start = start;
        }
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout;
        loop {
            let map = self.map_snapshot();
            if !map.covers(self.id(), &span) {
                return Err(ApiError::NotOwner {
                    me: self.id(),
                    what: q.range.to_string(),
                    epoch: map.epoch,
                });
            }
            let out = self
                .outgoing
                .load_full()
                .filter(|o| !o.phase().is_final() && !o.span.intersect(&span).is_empty());
            let store = self.serving_store()?.clone();
            let Some(out) = out else {
                return scan(store, q, span).await;
            };
            let admitted = out
                .admit(deadline, true)
                .await
                .map_err(|()| ApiError::RangeMoving {
                    key: q.range.to_string(),
                    waited: self.settings.request_timeout,
                })?;
            if let crate::moves::Admission::Serve(_running) = admitted {
                return scan(store, q, span).await;
            }
        }
    }
}

async fn scan(store: Arc<dyn Store>, q: &PageQuery<'_>, span: Span) -> Result<Page, ApiError> {
    let (prefix, limit, max_bytes) = (q.prefix.to_owned(), q.limit, q.max_bytes);
    Ok(read_off_workers(&store, move |store| {
        store.scan(&ScanRequest {
            span: &span,
            prefix: &prefix,
            after: None,
            limit,
            max_bytes,
        })
    })
    .await?)
}

/// [`entries_json`], on the blocking pool when the chunk is large: escaping
/// megabytes of values is long enough to keep a worker from the requests
/// (and the I/O events) queued behind it.
///
/// At most one such encoding per core but one runs at a time, whatever the
/// number of searches: the rest wait their turn, so a burst of huge
/// searches shares the node with every other request instead of taking
/// all its cores.
pub async fn entries_json_off_workers(entries: Vec<Entry>, first: bool) -> Result<Bytes, ApiError> {
    const INLINE_BYTES: usize = 64 << 10;
    if entries.iter().map(Entry::size).sum::<usize>() <= INLINE_BYTES {
        return Ok(entries_json(&entries, first));
    }
    static ENCODERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let encoders = ENCODERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
    });
    let _turn = encoders
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(format!("encoding a search page failed: {e}")))?;
    tokio::task::spawn_blocking(move || entries_json(&entries, first))
        .await
        .map_err(|e| ApiError::Internal(format!("encoding a search page failed: {e}")))
}

/// The JSON of a list of entries, without the brackets: a chunk of a
/// streamed answer.
pub fn entries_json(entries: &[Entry], first: bool) -> Bytes {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.size() + 24).sum());
    for (i, e) in entries.iter().enumerate() {
        if !(first && i == 0) {
            out.push(b',');
        }
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, e);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_query_reads_back_as_the_same_parameters() {
        let params = SearchParams {
            prefix: "a+b&c=d/é".into(),
            scope: Scope::Local,
            limit: Some(7),
            partial: true,
            cursor: Some(encode_cursor("a+b")),
        };
        let query = params.to_query();
        assert_eq!(
            query,
            "prefix=a%2Bb%26c%3Dd%2F%C3%A9&scope=local&limit=7&partial=true&cursor=k1612b62"
        );
        assert_eq!(SearchParams::from_query(&query).unwrap(), params);
        assert_eq!(SearchParams::default().to_query(), "prefix=");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (query, needle) in [
            ("limit=x", "limit"),
            ("scope=all", "scope"),
            ("partial=maybe", "partial"),
            ("cursor=zz", "cursor"),
            ("prefix=%FF", "UTF-8"),
            ("frobnicate=1", "unknown parameter"),
        ] {
            let e = SearchParams::from_query(query).unwrap_err();
            assert_eq!(e.code(), "invalid_query");
            assert!(e.to_string().contains(needle), "{query}: {e}");
        }
        // `+` is a plus, not a space.
        assert_eq!(
            SearchParams::from_query("prefix=a+b").unwrap().prefix,
            "a+b"
        );
    }

    #[test]
    fn chunks_join_into_a_json_list() {
        let e = |k: &str| Entry {
            key: k.into(),
            value: "v".into(),
        };
        let mut text = b"[".to_vec();
        text.extend_from_slice(&entries_json(&[e("a"), e("b")], true));
        text.extend_from_slice(&entries_json(&[e("c")], false));
        text.push(b']');
        let back: Vec<Entry> = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, vec![e("a"), e("b"), e("c")]);
    }
}
