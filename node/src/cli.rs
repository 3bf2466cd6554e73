//! Command line of `kvstore-api`: the seed's `<SHARD_ID> <CONFIG>` plus
//! flags (each with an env var) for Kubernetes and for the limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::dispatch::Node;
use crate::server::{serve, shutdown_signal};
use crate::settings::{Settings, parse_duration};
use crate::store::{DiskOptions, DiskStore, MemoryStore, Store};

#[derive(Debug, Parser)]
#[command(
    name = "kvstore-api",
    version,
    about = "A CAVI node: serves one shard of the key space and forwards the rest"
)]
pub struct Args {
    /// Which shard to serve: its id, `all` (every shard of the config in
    /// this one process, for a laptop), or `from-hostname` (the trailing
    /// ordinal of the host name, `demo-2` → 2, for StatefulSet pods).
    #[arg(env = "CAVI_SHARD")]
    pub shard: ShardSelector,

    /// Path of the cluster config file (YAML).
    #[arg(env = "CAVI_CONFIG")]
    pub config: PathBuf,

    /// Address to listen on. Default: the shard's `addr` when it is an IP,
    /// `0.0.0.0:<port>` when it is a DNS name.
    #[arg(long, env = "CAVI_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Keep data on disk in this directory (one `shard-<id>` subdirectory
    /// per shard; every acknowledged write is synced). Without it, data
    /// lives in memory only.
    #[arg(long, env = "CAVI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Longest key accepted, in bytes.
    #[arg(long, env = "CAVI_MAX_KEY_BYTES", default_value_t = 1024)]
    pub max_key_bytes: usize,

    /// Longest value accepted, in bytes.
    #[arg(long, env = "CAVI_MAX_VALUE_BYTES", default_value_t = 1024 * 1024)]
    pub max_value_bytes: usize,

    /// Time to connect to a peer shard (e.g. `1s`, `500ms`).
    #[arg(long, env = "CAVI_PEER_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub peer_connect_timeout: Duration,

    /// Time a peer shard has to answer a forwarded request or a search.
    #[arg(long, env = "CAVI_PEER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// Time any request may take on this node, end to end.
    #[arg(long, env = "CAVI_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Log format.
    #[arg(long, env = "CAVI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSelector {
    Id(u32),
    All,
    FromHostname,
}

impl FromStr for ShardSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "from-hostname" => Ok(Self::FromHostname),
            _ => s
                .parse()
                .map(Self::Id)
                .map_err(|_| format!("{s:?} is not a shard id, `all` or `from-hostname`")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `demo-2` → 2, also for a fully qualified `demo-2.demo-headless.ns`.
pub fn ordinal_from_hostname(hostname: &str) -> Option<u32> {
    let host = hostname.trim().split('.').next()?;
    let (_, ordinal) = host.rsplit_once('-')?;
    ordinal.parse().ok()
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
}

impl Args {
    pub fn settings(&self) -> Settings {
        Settings {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
            peer_connect_timeout: self.peer_connect_timeout,
            peer_request_timeout: self.peer_timeout,
            request_timeout: self.request_timeout,
        }
    }

    /// The shard ids this process serves.
    fn shard_ids(&self, config: &ClusterConfig) -> Result<Vec<u32>, String> {
        match self.shard {
            ShardSelector::Id(id) => Ok(vec![id]),
            ShardSelector::All => {
                if self.listen.is_some() {
                    return Err("--listen names one socket; it cannot be used with `all`".into());
                }
                Ok(config.shards.iter().map(|s| s.id).collect())
            }
            ShardSelector::FromHostname => {
                let host = hostname().ok_or("cannot read the host name ($HOSTNAME is empty)")?;
                ordinal_from_hostname(&host)
                    .map(|id| vec![id])
                    .ok_or_else(|| {
                        format!("host name {host:?} does not end in -<ordinal> (like demo-2)")
                    })
            }
        }
    }
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colors = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colors);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Opens the storage a shard is configured with. Blocking (disk recovery).
fn open_store(data_dir: Option<&Path>, node: &Node) -> Result<Arc<dyn Store>, String> {
    let Some(root) = data_dir else {
        return Ok(Arc::new(MemoryStore::new()));
    };
    let shard = node.shard();
    let options = DiskOptions::new(root.join(format!("shard-{}", shard.id)));
    let store = DiskStore::open(&options, shard.id, &shard.range()).map_err(|e| e.to_string())?;
    tracing::info!(shard = shard.id, dir = %options.dir.display(), keys = store.len(), "storage open");
    Ok(Arc::new(store))
}

/// Loads the config, binds every shard this process serves, opens their
/// storage and serves them until SIGTERM / Ctrl-C. The listener is bound
/// before storage opens, so `/healthz` answers during recovery and
/// `/readyz` turns ready after it. Errors are sentences for the operator.
pub async fn run(args: Args) -> Result<(), String> {
    let config = Arc::new(ClusterConfig::load(&args.config).map_err(|e| e.to_string())?);
    let settings = args.settings();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut starting = Vec::new();
    for id in args.shard_ids(&config)? {
        let node = Arc::new(
            Node::starting(config.clone(), id, settings.clone()).map_err(|e| e.to_string())?,
        );
        let addr = match args.listen {
            Some(addr) => addr,
            None => node
                .shard()
                .default_listen_addr()
                .map_err(|e| e.to_string())?,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("shard {id}: cannot listen on {addr}: {e}"))?;
        tracing::info!(shard = id, %addr, range = %node.shard().range(), "listening");
        let mut stop = stop_rx.clone();
        servers.spawn({
            let node = node.clone();
            async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                serve(listener, node, stopped)
                    .await
                    .map_err(|e| format!("shard {id}: {e}"))
            }
        });
        starting.push(node);
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    for node in starting {
        let dir = args.data_dir.clone();
        let opening = node.clone();
        let store = tokio::task::spawn_blocking(move || open_store(dir.as_deref(), &opening))
            .await
            .map_err(|e| format!("opening storage failed: {e}"))??;
        node.attach_store(store);
        tracing::info!(shard = node.shard().id, "ready");
    }
    while let Some(done) = servers.join_next().await {
        done.map_err(|e| format!("server task failed: {e}"))??;
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_ordinals() {
        assert_eq!(ordinal_from_hostname("demo-2"), Some(2));
        assert_eq!(ordinal_from_hostname("my-cluster-10"), Some(10));
        assert_eq!(
            ordinal_from_hostname("demo-0.demo-headless.ns.svc"),
            Some(0)
        );
        assert_eq!(ordinal_from_hostname("demo"), None);
        assert_eq!(ordinal_from_hostname("demo-x"), None);
    }

    #[test]
    fn shard_selectors() {
        assert_eq!("3".parse(), Ok(ShardSelector::Id(3)));
        assert_eq!("all".parse(), Ok(ShardSelector::All));
        assert_eq!("from-hostname".parse(), Ok(ShardSelector::FromHostname));
        assert!("-1".parse::<ShardSelector>().is_err());
    }
}
