//! Limits and timeouts of a node, with the documented defaults.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest key accepted, in bytes (UTF-8).
    pub max_key_bytes: usize,
    /// Longest value accepted, in bytes (UTF-8, after JSON unescaping).
    pub max_value_bytes: usize,
    /// Time to establish a connection to a peer before it counts as down.
    pub peer_connect_timeout: Duration,
    /// Time a peer has to answer a forwarded request or a search.
    pub peer_request_timeout: Duration,
    /// Time any request may take end to end on this node.
    pub request_timeout: Duration,
    /// Longest a move may hold requests for its range while the tail of
    /// its writes reaches the target; past it the fence is lifted.
    pub fence_timeout: Duration,
    /// Entries and key+value bytes of one search page: what a search
    /// holds per shard at a time.
    pub search_page_keys: usize,
    pub search_page_bytes: usize,
    /// An answer smaller than this is sent whole, its status decided after
    /// every shard answered; past it an answer without `limit` streams,
    /// and one with `limit` stops with a cursor.
    pub search_buffer_bytes: usize,
    /// Key and value bytes per second a move copies out of this node; 0
    /// for no limit. The copy competes with foreground requests for the
    /// same cores, and the catch-up after it is not limited.
    pub move_rate: u64,
}

/// 56 MiB/s: in bench/run.sh, with both nodes, the copy and the load on one
/// core, a move of 102 MB took 1.8-2.0 s in all, foreground requests kept
/// 0.80-0.94x of their throughput and their p99 was 1.0-1.8x of before in
/// most runs. At 64 MiB/s the moves took 1.6-1.7 s and the p99 was 1.3-2.4x.
pub const DEFAULT_MOVE_RATE: u64 = 56 << 20;

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            peer_connect_timeout: Duration::from_secs(1),
            peer_request_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            fence_timeout: Duration::from_secs(5),
            search_page_keys: 1000,
            search_page_bytes: 4 << 20,
            search_buffer_bytes: 1 << 20,
            move_rate: DEFAULT_MOVE_RATE,
        }
    }
}

impl Settings {
    /// Largest request body accepted: room for a value at the limit even
    /// when every character is JSON-escaped as `\uXXXX`.
    pub fn max_body_bytes(&self) -> usize {
        self.max_value_bytes
            .saturating_mul(6)
            .saturating_add(self.max_key_bytes)
            .saturating_add(1024)
    }
}

/// Accepts `250ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} needs a unit: ms, s or m"))?;
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?} has an unknown unit (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
