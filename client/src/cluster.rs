//! `cavi cluster`: the shard map from one node, then every shard asked
//! directly, all at once, for its health (`/readyz`) and key count
//! (`/cluster`). A shard that does not answer is reported, not fatal.

use std::time::Duration;

use serde::Serialize;

use crate::table::{Table, range_label};
use crate::{Client, ClientError};
use cavi_node::config::ShardConfig;
use cavi_node::moves::{MoveStatus, Role};

/// How long each shard has to answer its two probes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A shard's health as seen from this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// `/readyz` answered `200`.
    Ready,
    /// The node answered, but not ready (shutting down) or with an error.
    NotReady(String),
    /// No answer: refused, unresolvable name, timeout.
    Unreachable(String),
    /// The address answers for another shard id: the configs disagree.
    WrongShard(u32),
}

impl Health {
    /// The word shown in the table and in JSON.
    pub fn label(&self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::NotReady(_) => "not ready",
            Health::Unreachable(_) => "unreachable",
            Health::WrongShard(_) => "wrong shard",
        }
    }

    /// Why, when not ready.
    pub fn detail(&self) -> Option<String> {
        match self {
            Health::Ready => None,
            Health::NotReady(why) | Health::Unreachable(why) => Some(why.clone()),
            Health::WrongShard(id) => Some(format!("this address serves shard {id}")),
        }
    }
}

/// One row of `cavi cluster`.
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub shard: ShardConfig,
    pub health: Health,
    /// The shard's own key count; `None` when it did not say.
    pub keys: Option<u64>,
    /// Whether the shard keeps its keys on disk; `None` when it did not say.
    pub durable: Option<bool>,
}

/// The JSON form of one row.
#[derive(Debug, Serialize)]
struct ShardJson<'a> {
    id: u32,
    addr: &'a str,
    range_start: &'a str,
    range_end: Option<&'a str>,
    range: String,
    health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    keys: Option<u64>,
    durable: Option<bool>,
}

/// What `cavi cluster` shows: the map's epoch, every range with its shard
/// probed directly, and the range moves under way.
#[derive(Debug, Clone)]
pub struct ClusterReport {
    pub epoch: u64,
    pub shards: Vec<ShardStatus>,
    pub moves: Vec<MoveStatus>,
}

/// The shard map as `client`'s node sees it, each shard probed directly.
pub async fn cluster_status(
    client: &Client,
    probe_timeout: Duration,
) -> Result<ClusterReport, ClientError> {
    let view = client.cluster().await?;
    let probes: Vec<_> = view
        .shards
        .into_iter()
        .map(|shard| {
            let node = client.for_addr(&shard.addr, probe_timeout);
            tokio::spawn(probe(node, shard))
        })
        .collect();
    let mut shards = Vec::with_capacity(probes.len());
    let mut moves: Vec<MoveStatus> = Vec::new();
    for probe in probes {
        let (status, seen) = probe.await.map_err(|e| ClientError::BadResponse {
            endpoint: client.endpoint().to_owned(),
            detail: format!("a shard probe failed: {e}"),
        })?;
        for m in seen {
            if m.role == Role::Source && !m.phase.is_final() && !moves.iter().any(|k| k.id == m.id)
            {
                moves.push(m);
            }
        }
        shards.push(status);
    }
    Ok(ClusterReport {
        epoch: view.epoch,
        shards,
        moves,
    })
}

async fn probe(node: Client, shard: ShardConfig) -> (ShardStatus, Vec<MoveStatus>) {
    let (view, ready) = tokio::join!(node.cluster(), node.ready());
    let mut health = match ready {
        Ok(()) => Health::Ready,
        Err(ClientError::Unreachable { reason, .. }) => Health::Unreachable(reason),
        Err(e) => Health::NotReady(e.to_string()),
    };
    let (keys, durable, moves) = match view {
        Ok(view) if view.shard_id != shard.id => {
            health = Health::WrongShard(view.shard_id);
            (None, None, Vec::new())
        }
        Ok(view) => (Some(view.keys), Some(view.durable), view.moves),
        Err(_) => (None, None, Vec::new()),
    };
    (
        ShardStatus {
            shard,
            health,
            keys,
            durable,
        },
        moves,
    )
}

/// One line per move under way.
pub fn move_lines(report: &ClusterReport) -> Vec<String> {
    report
        .moves
        .iter()
        .map(|m| {
            format!(
                "moving {} from shard {} to shard {} (epoch {}): {}, {} keys ({}) copied",
                range_label(&m.range_start, m.range_end.as_deref()),
                m.source,
                m.target,
                m.epoch,
                m.phase.as_str(),
                m.keys_copied,
                crate::reshard::driver::bytes(m.bytes_copied)
            )
        })
        .collect()
}

/// The table: shard, range, address, health, keys and storage (`-` when
/// unknown), then the epoch and the moves under way.
pub fn render_table(report: &ClusterReport) -> String {
    let mut table = Table::new(["SHARD", "RANGE", "ADDRESS", "HEALTH", "KEYS", "STORAGE"]);
    for s in &report.shards {
        let storage = match s.durable {
            Some(true) => "disk",
            Some(false) => "memory",
            None => "-",
        };
        table.push([
            s.shard.id.to_string(),
            range_label(&s.shard.range_start, s.shard.range_end.as_deref()),
            s.shard.addr.clone(),
            s.health.label().to_owned(),
            s.keys.map_or_else(|| "-".to_owned(), |k| k.to_string()),
            storage.to_owned(),
        ]);
    }
    let mut out = table.render();
    out.push_str(&format!("map epoch {}\n", report.epoch));
    for line in move_lines(report) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A JSON object: the epoch, one object per shard, the moves under way.
pub fn render_json(report: &ClusterReport) -> Result<String, ClientError> {
    let rows: Vec<ShardJson<'_>> = report
        .shards
        .iter()
        .map(|s| ShardJson {
            id: s.shard.id,
            addr: &s.shard.addr,
            range_start: &s.shard.range_start,
            range_end: s.shard.range_end.as_deref(),
            range: range_label(&s.shard.range_start, s.shard.range_end.as_deref()),
            health: s.health.label(),
            detail: s.health.detail(),
            keys: s.keys,
            durable: s.durable,
        })
        .collect();
    let json = serde_json::json!({
        "epoch": report.epoch,
        "shards": rows,
        "moves": report.moves,
    });
    serde_json::to_string_pretty(&json).map_err(|e| ClientError::Output(e.to_string()))
}

/// Lines for stderr explaining the shards that were not ready, and a hint
/// when some did not answer at all.
pub fn notes(report: &ClusterReport) -> Vec<String> {
    let statuses = &report.shards;
    let mut notes: Vec<String> = statuses
        .iter()
        .filter_map(|s| {
            s.health
                .detail()
                .map(|why| format!("shard {} at {}: {why}", s.shard.id, s.shard.addr))
        })
        .collect();
    if statuses
        .iter()
        .any(|s| matches!(s.health, Health::Unreachable(_)))
    {
        notes.push(
            "shards are probed at the addresses the cluster advertises; from outside \
             Kubernetes those may be cluster-internal names that only resolve inside it"
                .to_owned(),
        );
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u32, end: Option<&str>, health: Health, keys: Option<u64>) -> ShardStatus {
        ShardStatus {
            shard: ShardConfig {
                id,
                addr: format!("demo-{id}.demo:3100"),
                range_start: if id == 0 { String::new() } else { "n".into() },
                range_end: end.map(str::to_owned),
            },
            health,
            keys,
            durable: keys.map(|_| id == 0),
        }
    }

    #[test]
    fn table_shows_ranges_health_and_unknown_counts() {
        let rows = [
            status(0, Some("m"), Health::Ready, Some(12)),
            status(
                1,
                None,
                Health::Unreachable("connection refused".into()),
                None,
            ),
        ];
        let line = |a: &str, b: &str, c: &str, d: &str, e: &str, f: &str| {
            format!("{a:<5}  {b:<12}  {c:<16}  {d:<11}  {e:<4}  {f}\n")
        };
        let expected = line("SHARD", "RANGE", "ADDRESS", "HEALTH", "KEYS", "STORAGE")
            + &line(
                "0",
                "(lowest)..m*",
                "demo-0.demo:3100",
                "ready",
                "12",
                "disk",
            )
            + &line(
                "1",
                "n..(highest)",
                "demo-1.demo:3100",
                "unreachable",
                "-",
                "-",
            )
            + "map epoch 3\n"
            + "moving g..m* from shard 0 to shard 2 (epoch 4): copying, 10 keys (1 kB) copied\n";
        let report = ClusterReport {
            epoch: 3,
            shards: rows.to_vec(),
            moves: vec![MoveStatus {
                id: "m4".into(),
                role: Role::Source,
                range_start: "g".into(),
                range_end: Some("m".into()),
                source: 0,
                target: 2,
                epoch: 4,
                phase: cavi_node::moves::Phase::Copying,
                copy_done: false,
                keys_copied: 10,
                bytes_copied: 1000,
                writes_mirrored: 0,
                lag: 0,
                started_at: 0,
                error: None,
            }],
        };
        assert_eq!(render_table(&report), expected);
        let notes = notes(&report);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].contains("shard 1 at demo-1.demo:3100: connection refused"));
        assert!(notes[1].contains("cluster-internal"));
    }

    #[test]
    fn json_has_null_keys_and_storage_for_a_silent_shard() {
        let report = ClusterReport {
            epoch: 9,
            shards: vec![status(1, None, Health::WrongShard(4), None)],
            moves: Vec::new(),
        };
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&report).expect("json")).expect("valid json");
        assert_eq!(json["epoch"], 9);
        let shard = &json["shards"][0];
        assert_eq!(shard["health"], "wrong shard");
        assert_eq!(shard["keys"], serde_json::Value::Null);
        assert_eq!(shard["durable"], serde_json::Value::Null);
        assert_eq!(shard["range_end"], serde_json::Value::Null);
        assert_eq!(shard["range"], "n..(highest)");
        assert_eq!(shard["detail"], "this address serves shard 4");
    }
}
