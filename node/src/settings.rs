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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            peer_connect_timeout: Duration::from_secs(1),
            peer_request_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
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
