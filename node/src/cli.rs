//! Command line of `kvstore-api`: the seed's `<SHARD_ID> <CONFIG>` plus
//! flags (each with an env var) for Kubernetes and for the limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::boot;
use crate::config::ClusterConfig;
use crate::node::Node;
use crate::server::{ServeOptions, Signal, serve, shutdown_signal};
use crate::settings::{Settings, parse_duration};
use crate::shard_map::ShardMap;
use crate::store::{CommitObserver, DiskOptions, DiskStore, Faults, MemoryStore, Store};

#[derive(Debug, Parser)]
#[command(
    name = "kvstore-api",
    version,
    about = "A CAVI node: serves one shard of the key space and forwards the rest"
)]
pub struct Args {
    /// Which shard to serve: its id, `all` (every shard of the config in
    /// this one process, for a laptop), or `from-hostname` (the trailing
    /// ordinal of the host name, `demo-2` → 2, for StatefulSet pods). An id
    /// the config does not list starts a node that owns nothing and
    /// forwards every key, until a range moves to it.
    #[arg(env = "CAVI_SHARD")]
    pub shard: ShardSelector,

    /// Path of the cluster config file (YAML): the bootstrap layout.
    #[arg(env = "CAVI_CONFIG")]
    pub config: PathBuf,

    /// Address to listen on. Default: the shard's `addr` when it is an IP,
    /// `0.0.0.0:<port>` when it is a DNS name. Required for a shard the
    /// config does not list (except with `from-hostname`, which takes the
    /// config's port on all interfaces).
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

    /// Time a peer shard has to answer a forwarded request or a search page.
    #[arg(long, env = "CAVI_PEER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// Time any request may take on this node, end to end.
    #[arg(long, env = "CAVI_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most client connections open at once (lowered to fit the open-file
    /// limit). At the cap, idle connections are closed to make room.
    #[arg(long, env = "CAVI_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Longest wait for a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[arg(long, env = "CAVI_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// On SIGTERM, how long the node keeps serving with /readyz at 503 so
    /// endpoints and load balancers stop sending to it (Ctrl-C skips it).
    #[arg(long, env = "CAVI_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Then, how long requests in flight get to finish.
    #[arg(long, env = "CAVI_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Longest a range move holds requests for its range while its last
    /// writes reach the new owner.
    #[arg(long, env = "CAVI_FENCE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub fence_timeout: Duration,

    /// Key and value bytes per second a move copies out of this node (0:
    /// no limit); the catch-up of writes taken during the copy is not
    /// limited.
    #[arg(long, env = "CAVI_MOVE_RATE", default_value_t = crate::settings::DEFAULT_MOVE_RATE)]
    pub move_rate: u64,

    /// Most writes waiting for the disk (durable storage); when full,
    /// writers wait up to half the request timeout, then get 503 overloaded
    /// (the other half is left for the write itself).
    #[arg(long, env = "CAVI_MAX_QUEUED_WRITES", default_value_t = 16 * 1024)]
    pub max_queued_writes: usize,

    /// Most key and value bytes waiting for the disk.
    #[arg(long, env = "CAVI_MAX_QUEUED_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_queued_bytes: usize,

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
            fence_timeout: self.fence_timeout,
            move_rate: self.move_rate,
            ..Settings::default()
        }
    }

    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            shutdown_delay: self.shutdown_delay,
            drain_timeout: self.drain_timeout,
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
                // A shard may serve several ranges: one process each.
                let mut ids: Vec<u32> = config.shards.iter().map(|s| s.id).collect();
                ids.sort_unstable();
                ids.dedup();
                Ok(ids)
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

    /// Where shard `id` listens.
    fn listen_addr(&self, config: &ClusterConfig, id: u32) -> Result<SocketAddr, String> {
        if let Some(addr) = self.listen {
            return Ok(addr);
        }
        if let Some(shard) = config.shard(id) {
            return shard.default_listen_addr().map_err(|e| e.to_string());
        }
        let known: Vec<String> = config.shards.iter().map(|s| s.id.to_string()).collect();
        match self.shard {
            // A new pod of a StatefulSet: every pod uses the same port.
            ShardSelector::FromHostname => {
                let port = config.shards[0].port().map_err(|e| e.to_string())?;
                Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            }
            _ => Err(format!(
                "shard {id} is not in the config (it lists {}); to start it unassigned (owning no keys until a range moves to it), pass --listen ADDR",
                known.join(", ")
            )),
        }
    }
}

/// Turns transparent huge pages off for this process, as Redis does at
/// start-up. With the kernel's `always` setting, the allocator's first touch
/// of a fresh 2 MiB region faults in and zeroes a whole huge page on a
/// request's path: in the resharding bench that was a tenth of the node's
/// time while a range moved in, and put the foreground p99 at 3-5x of
/// before (0.9x with them off). Small pages also keep the resident size
/// close to what the store holds.
pub fn avoid_huge_pages() -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr, as diagnostics do; a container runtime collects
    // both streams.
    let colors = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colors);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Opens the storage of shard `id`. Blocking (disk recovery).
fn open_store(
    args: &Args,
    id: u32,
    commits: Arc<dyn CommitObserver>,
) -> Result<Arc<dyn Store>, String> {
    let Some(root) = &args.data_dir else {
        return Ok(Arc::new(MemoryStore::new()));
    };
    let mut options = DiskOptions::new(root.join(format!("shard-{id}")));
    options.max_queued_writes = args.max_queued_writes;
    options.max_queued_bytes = args.max_queued_bytes;
    // Half the request timeout: a writer turned away gets its 503 before
    // the request as a whole would time out with a 504.
    options.queue_timeout = args.request_timeout / 2;
    options.faults = Faults::from_env();
    options.commits = Some(commits);
    let store = DiskStore::open(&options).map_err(|e| e.to_string())?;
    tracing::info!(shard = id, dir = %options.dir.display(), keys = store.len(), "storage open");
    Ok(Arc::new(store))
}

/// Brings a bound node up: storage, the map it serves (file, persisted,
/// peers), its moves; then it serves keys.
async fn start_node(
    node: &Arc<Node>,
    args: &Arc<Args>,
    config: &ClusterConfig,
) -> Result<(), String> {
    let id = node.id();
    let opening = args.clone();
    let commits = node.metrics().commit_observer();
    let store = tokio::task::spawn_blocking(move || open_store(&opening, id, commits))
        .await
        .map_err(|e| format!("opening storage failed: {e}"))??;
    let persisted = match store.state() {
        Some(state) => boot::load_persisted(state)?,
        None => None,
    };
    let dir = args
        .data_dir
        .as_ref()
        .map(|d| d.join(format!("shard-{id}")).display().to_string())
        .unwrap_or_default();
    let map = boot::choose_map(config, id, persisted.as_ref(), &dir)?;
    node.attach_store(store);
    // Recorded at once: the directory now says whose keys it holds.
    if persisted.as_ref().map(|p| &p.map) != Some(&map) {
        node.persist_map(&map, &[]).map_err(|e| e.to_string())?;
    }
    node.set_map(map);
    boot::resume_moves(node).await?;
    boot::catch_up(node, Duration::from_secs(1)).await;
    node.set_started();
    let map = node.map_snapshot();
    if map.is_owner(id) {
        let ranges: Vec<String> = map.ranges_of(id).map(|s| s.range().to_string()).collect();
        tracing::info!(shard = id, epoch = map.epoch, ranges = %ranges.join(", "), "ready");
    } else {
        tracing::info!(
            shard = id,
            epoch = map.epoch,
            "ready, unassigned: this shard owns no keys and forwards every key to its owner"
        );
    }
    Ok(())
}

/// Loads the config, binds every shard this process serves, opens their
/// storage and serves them until SIGTERM / Ctrl-C. The listener is bound
/// before storage opens, so `/healthz` answers during recovery and
/// `/readyz` turns ready after it. Errors are sentences for the operator.
pub async fn run(args: Args) -> Result<(), String> {
    let config = ClusterConfig::load(&args.config).map_err(|e| e.to_string())?;
    let args = Arc::new(args);
    let settings = args.settings();
    let (stop_tx, stop_rx) = watch::channel(None::<Signal>);
    let mut servers = tokio::task::JoinSet::new();
    let mut starting = Vec::new();
    for id in args.shard_ids(&config)? {
        let node = Arc::new(
            Node::starting(ShardMap::from_config(&config), id, settings.clone())
                .map_err(|e| e.to_string())?,
        );
        let addr = args.listen_addr(&config, id)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("shard {id}: cannot listen on {addr}: {e}"))?;
        tracing::info!(shard = id, %addr, "listening");
        let mut stop = stop_rx.clone();
        let mut options = args.serve_options();
        servers.spawn({
            let node = node.clone();
            let stopping = node.clone();
            let delay = options.shutdown_delay;
            options.shutdown_delay = Duration::ZERO;
            async move {
                let stopped = async move {
                    let signal = stop.wait_for(Option::is_some).await.ok().and_then(|s| *s);
                    // Ctrl-C is a person at a terminal: no need to wait
                    // for load balancers.
                    if signal == Some(Signal::Terminate) {
                        node_not_ready_then_wait(&stopping, delay).await;
                    }
                };
                serve(listener, node.clone(), stopped, options)
                    .await
                    .map_err(|e| format!("shard {id}: {e}"))
            }
        });
        starting.push(node);
    }
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        let _ = stop_tx.send(Some(signal));
    });
    for node in starting {
        start_node(&node, &args, &config).await?;
    }
    while let Some(done) = servers.join_next().await {
        done.map_err(|e| format!("server task failed: {e}"))??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The first step of a SIGTERM: `/readyz` says 503 while requests are
/// still served, for `delay`.
async fn node_not_ready_then_wait(node: &Node, delay: Duration) {
    node.mark_not_ready();
    tracing::info!(
        shard = node.id(),
        ?delay,
        "SIGTERM: not ready, still serving"
    );
    tokio::time::sleep(delay).await;
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
