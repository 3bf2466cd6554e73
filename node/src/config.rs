//! The cluster config file: the shard map every node loads, and the file the
//! operator writes into each cluster's ConfigMap (one type, one format).
//!
//! The format is the seed project's YAML. Unknown fields are rejected so a
//! typo such as `range_ends` fails loudly instead of silently widening a
//! shard to "the highest key".

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::keyspace::KeyRange;

/// The whole layout: one range per shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The live-map epoch this layout was written at (0 for a file written
    /// by hand). A node whose persisted or peers' map is newer than the file
    /// takes that map instead: the file is the bootstrap, not the truth.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    pub shards: Vec<ShardConfig>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One shard: who it is, where it listens, which keys it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub id: u32,
    /// Advertised address: `IP:port` or `dns-name:port`.
    pub addr: String,
    /// Lowest key owned, inclusive; empty or omitted means the lowest key.
    #[serde(default)]
    pub range_start: String,
    /// Inclusive prefix bound; omitted means the highest key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config is not valid: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("config is not valid: {0}")]
    Invalid(String),
}

impl ShardConfig {
    pub fn range(&self) -> KeyRange {
        KeyRange {
            start: self.range_start.clone(),
            end: self.range_end.clone(),
        }
    }

    pub fn owns(&self, key: &str) -> bool {
        crate::keyspace::owns(&self.range_start, self.range_end.as_deref(), key)
    }

    /// The port part of `addr`.
    pub fn port(&self) -> Result<u16, ConfigError> {
        split_addr(&self.addr).map(|(_, port)| port)
    }

    /// The socket a node serving this shard binds when `--listen` is not
    /// given: `addr` itself when it is an IP, all interfaces otherwise (a
    /// DNS name such as a StatefulSet pod's headless-service name).
    pub fn default_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let (host, port) = split_addr(&self.addr)?;
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Ok(SocketAddr::new(ip, port))
    }
}

/// Splits `HOST:PORT` and checks that a peer could dial it: the host is
/// an IP that is not unspecified (`0.0.0.0`, `::`), in brackets for IPv6,
/// or a DNS name; the port is not 0. A URL, a path or a bare port is not
/// an address.
pub fn split_addr(addr: &str) -> Result<(&str, u16), ConfigError> {
    let invalid = |why: &str| {
        ConfigError::Invalid(format!(
            "address {addr:?} is not HOST:PORT ({why}; for example 127.0.0.1:3100 or demo-0.demo-headless:3100)"
        ))
    };
    if addr.contains("://") {
        return Err(invalid("write it without a scheme such as http://"));
    }
    if addr.contains('/') {
        return Err(invalid("it holds a path"));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid("the port is not a number in 1..=65535"))?;
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .and_then(|v6| v6.parse::<std::net::Ipv6Addr>().ok())
            .ok_or_else(|| invalid("the bracketed host is not an IPv6 address"))?;
        if ip.is_unspecified() {
            return Err(invalid(
                "the unspecified address :: cannot be dialled by peers",
            ));
        }
        return Ok((host, port));
    }
    if host.contains(':') {
        return Err(invalid("an IPv6 address goes in brackets, like [::1]:3100"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(invalid(
                "the unspecified address 0.0.0.0 cannot be dialled by peers; name this node's own address and use --listen to bind all interfaces",
            ));
        }
        return Ok((host, port));
    }
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.len() > 253 || !host.trim_end_matches('.').split('.').all(dns_label) {
        return Err(invalid("the host is neither an IP address nor a DNS name"));
    }
    Ok((host, port))
}

impl ClusterConfig {
    /// Parses and validates a config; every node and the operator go
    /// through here, so a bad layout can never be half-accepted.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: ClusterConfig = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// The config file's text, exactly what [`ClusterConfig::from_yaml`]
    /// reads back.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// The layout rules of the key space: at least one shard, one valid
    /// address per id, each range `start <= end`, listed in key order, no
    /// two ranges sharing a key. Gaps are allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.is_empty() {
            return Err(ConfigError::Invalid("it lists no shards".into()));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            // A shard may serve several ranges (a merge of ranges that do
            // not meet, a hand-over): the same id again, at one address.
            if let Some(other) = self.shards[..i]
                .iter()
                .find(|s| s.id == shard.id && s.addr != shard.addr)
            {
                return Err(ConfigError::Invalid(format!(
                    "shard id {} is used twice with different addresses ({} and {})",
                    shard.id, other.addr, shard.addr
                )));
            }
            split_addr(&shard.addr)
                .map_err(|e| ConfigError::Invalid(format!("shard {}: {}", shard.id, inner(&e))))?;
            if shard.range().is_inverted() {
                return Err(ConfigError::Invalid(format!(
                    "shard {} has range_start {:?} after range_end {:?}",
                    shard.id,
                    shard.range_start,
                    shard.range_end.as_deref().unwrap_or_default()
                )));
            }
        }
        for pair in self.shards.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.range_start < a.range_start {
                return Err(ConfigError::Invalid(format!(
                    "shards must be listed in key order: shard {} (range_start {:?}) is listed after shard {} (range_start {:?})",
                    b.id, b.range_start, a.id, a.range_start
                )));
            }
            if !a.range().ends_before(&b.range()) {
                return Err(ConfigError::Invalid(format!(
                    "shards {} ({}) and {} ({}) overlap",
                    a.id,
                    a.range(),
                    b.id,
                    b.range()
                )));
            }
        }
        Ok(())
    }

    pub fn shard(&self, id: u32) -> Option<&ShardConfig> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The shard that owns `key`, if any (gaps are allowed).
    pub fn owner_of(&self, key: &str) -> Option<&ShardConfig> {
        self.shards.iter().find(|s| s.owns(key))
    }

    /// Shards a search for `prefix` has to ask, in key order.
    pub fn shards_for_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a ShardConfig> + 'a {
        self.shards
            .iter()
            .filter(move |s| s.range().may_hold_prefix(prefix))
    }
}

fn inner(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
shards:
  - id: 0
    addr: 127.0.0.1:3100
    range_start: "a"
    range_end: "m"
  - id: 1
    addr: 127.0.0.1:3101
    range_start: "n"
    range_end: "z"
"#;

    fn err(text: &str) -> String {
        ClusterConfig::from_yaml(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn seed_config_loads_and_routes() {
        let c = ClusterConfig::from_yaml(SEED).expect("seed config is valid");
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.owner_of("mango").map(|s| s.id), Some(0));
        assert_eq!(c.owner_of("zebra").map(|s| s.id), Some(1));
        assert_eq!(c.owner_of("{curly"), None);
        assert_eq!(c.owner_of("A"), None);
        let ids: Vec<u32> = c.shards_for_prefix("f").map(|s| s.id).collect();
        assert_eq!(ids, vec![0]);
        let ids: Vec<u32> = c.shards_for_prefix("").map(|s| s.id).collect();
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn the_epoch_is_optional_and_written_only_when_set() {
        let c = ClusterConfig::from_yaml(SEED).expect("valid");
        assert_eq!(c.epoch, 0);
        assert!(!c.to_yaml().expect("yaml").contains("epoch"));
        let c = ClusterConfig { epoch: 7, ..c };
        let text = c.to_yaml().expect("yaml");
        assert!(text.starts_with("epoch: 7\n"), "{text}");
        assert_eq!(ClusterConfig::from_yaml(&text).expect("valid").epoch, 7);
    }

    #[test]
    fn round_trips_through_yaml() {
        let c = ClusterConfig::from_yaml(SEED).expect("valid");
        let again = ClusterConfig::from_yaml(&c.to_yaml().expect("serializes")).expect("valid");
        assert_eq!(c, again);
    }

    #[test]
    fn open_ends_are_optional() {
        let c = ClusterConfig::from_yaml(
            "shards:\n  - {id: 0, addr: 'h:1', range_end: m}\n  - {id: 1, addr: 'h:2', range_start: n}\n",
        )
        .expect("valid");
        assert_eq!(c.owner_of("").map(|s| s.id), Some(0));
        assert_eq!(c.owner_of("\u{10ffff}").map(|s| s.id), Some(1));
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let e = err("shards:\n  - {id: 0, addr: 'h:1', range_ends: m}\n");
        assert!(e.contains("unknown field `range_ends`"), "{e}");
    }

    #[test]
    fn overlap_names_both_shards() {
        let e = err(
            "shards:\n  - {id: 0, addr: 'h:1', range_start: a, range_end: m}\n  - {id: 1, addr: 'h:2', range_start: ma, range_end: z}\n",
        );
        assert!(
            e.contains("shards 0") && e.contains("and 1") && e.contains("overlap"),
            "{e}"
        );
        // An open end overlaps everything after it.
        let e = err(
            "shards:\n  - {id: 3, addr: 'h:1', range_start: a}\n  - {id: 4, addr: 'h:2', range_start: n}\n",
        );
        assert!(e.contains("shards 3") && e.contains("4"), "{e}");
    }

    #[test]
    fn unsorted_names_both_shards() {
        let e = err(
            "shards:\n  - {id: 0, addr: 'h:1', range_start: n, range_end: z}\n  - {id: 1, addr: 'h:2', range_start: a, range_end: m}\n",
        );
        assert!(
            e.contains("key order") && e.contains("shard 1") && e.contains("shard 0"),
            "{e}"
        );
    }

    #[test]
    fn inverted_names_the_shard() {
        let e = err("shards:\n  - {id: 7, addr: 'h:1', range_start: n, range_end: m}\n");
        assert!(
            e.contains("shard 7") && e.contains("after range_end"),
            "{e}"
        );
    }

    #[test]
    fn other_layout_errors() {
        assert!(err("shards: []\n").contains("no shards"));
        assert!(err("shards:\n  - {id: 0, addr: 'h:1', range_end: c}\n  - {id: 0, addr: 'h:2', range_start: d}\n").contains("used twice"));
        let two_ranges = ClusterConfig::from_yaml(
            "shards:\n  - {id: 0, addr: 'h:1', range_end: c}\n  - {id: 1, addr: 'h:2', range_start: d, range_end: f}\n  - {id: 0, addr: 'h:1', range_start: g}\n",
        );
        assert!(two_ranges.is_ok(), "one shard, two ranges: {two_ranges:?}");
        assert!(err("shards:\n  - {id: 0, addr: 'nohost'}\n").contains("HOST:PORT"));
        assert!(err("shards:\n  - {id: 0, addr: 'h:99999'}\n").contains("HOST:PORT"));
    }

    #[test]
    fn addresses_are_what_they_say() {
        for (addr, why) in [
            ("http://127.0.0.1:3906", "scheme"),
            ("127.0.0.1:3906/kv", "path"),
            ("0.0.0.0:3100", "unspecified"),
            ("[::]:3100", "unspecified"),
            ("::1:3100", "brackets"),
            (":3100", "no host"),
            ("h:0", "1..=65535"),
            ("under score!:1", "neither"),
        ] {
            let e = err(&format!("shards:\n  - {{id: 4, addr: '{addr}'}}\n"));
            assert!(e.contains("shard 4") && e.contains(why), "{addr}: {e}");
        }
        for good in [
            "127.0.0.1:1",
            "[::1]:3100",
            "demo-0.demo-headless.ns.svc:3100",
            "localhost:9",
        ] {
            ClusterConfig::from_yaml(&format!("shards:\n  - {{id: 0, addr: '{good}'}}\n"))
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn listen_address_follows_the_kind_of_addr() {
        let shard = |addr: &str| ShardConfig {
            id: 0,
            addr: addr.into(),
            range_start: String::new(),
            range_end: None,
        };
        let ip = shard("127.0.0.1:3100")
            .default_listen_addr()
            .expect("valid");
        assert_eq!(ip.to_string(), "127.0.0.1:3100");
        let dns = shard("demo-1.demo-headless.ns.svc.cluster.local:3100")
            .default_listen_addr()
            .expect("valid");
        assert_eq!(dns.to_string(), "0.0.0.0:3100");
        let v6 = shard("[::1]:3100").default_listen_addr().expect("valid");
        assert_eq!(v6.to_string(), "[::1]:3100");
    }
}
