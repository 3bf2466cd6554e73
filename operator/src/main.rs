//! `cavi-operator`: parse arguments, set up tracing, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cavi_operator::build::{BuildOptions, DEFAULT_CLUSTER_DOMAIN};
use cavi_operator::controller::{self, RunOptions};
use cavi_operator::telemetry::{self, LogFormat};
use cavi_operator::{crd, rbac, render};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cavi-operator",
    version,
    about = "Runs CAVI clusters on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the current cluster.
    Run(RunArgs),
    /// Print the CaviCluster CRD as YAML.
    Crd,
    /// Print the RBAC rules the operator needs, as YAML.
    Rbac,
    /// Print the objects the operator would create for a CaviCluster file,
    /// as a multi-document YAML stream, without a cluster.
    Render {
        /// The CaviCluster manifest (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// The image nodes run when the file names none.
        #[arg(long, env = "CAVI_OPERATOR_NODE_IMAGE", default_value = crd::DEFAULT_IMAGE)]
        default_node_image: String,
        /// The cluster's DNS domain.
        #[arg(long, env = "CAVI_OPERATOR_CLUSTER_DOMAIN", default_value = DEFAULT_CLUSTER_DOMAIN)]
        cluster_domain: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "CAVI_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Watch this namespace only (default: all namespaces).
    #[arg(long, env = "CAVI_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Do not take part in leader election (for a single local replica).
    #[arg(long, env = "CAVI_OPERATOR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "CAVI_OPERATOR_LEASE_NAME",
        default_value = "cavi-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity of this replica (default: the pod name, then the hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "CAVI_OPERATOR_LOG_FORMAT", value_enum, default_value_t = Format::Text)]
    log_format: Format,
    /// The image nodes run when a CaviCluster names none (the chart passes
    /// the operator's own image).
    #[arg(long, env = "CAVI_OPERATOR_NODE_IMAGE", default_value = crd::DEFAULT_IMAGE)]
    default_node_image: String,
    /// The cluster's DNS domain: pods reach each other at
    /// `<pod>.<name>-headless.<namespace>.svc.<domain>`.
    #[arg(long, env = "CAVI_OPERATOR_CLUSTER_DOMAIN", default_value = DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => crd::crd_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| e.to_string()),
        Command::Rbac => rbac::rbac_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| e.to_string()),
        Command::Render {
            file,
            default_node_image,
            cluster_domain,
        } => read(&file)
            .and_then(|text| {
                let opts = BuildOptions::new(default_node_image, cluster_domain);
                render::render(&text, &opts).map_err(|e| format!("{}: {e}", file.display()))
            })
            .map(|yaml| print!("{yaml}")),
        Command::Run(args) => {
            telemetry::init(match args.log_format {
                Format::Text => LogFormat::Text,
                Format::Json => LogFormat::Json,
            });
            let identity = args
                .identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("cavi-operator-{}", std::process::id()));
            controller::run(RunOptions {
                admin_addr: args.admin_addr,
                watch_namespace: args.watch_namespace,
                leader_election: !args.no_leader_election,
                lease_name: args.lease_name,
                lease_namespace: args.lease_namespace,
                identity,
                default_node_image: args.default_node_image,
                cluster_domain: args.cluster_domain,
            })
            .await
            .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cavi-operator: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read(file: &PathBuf) -> Result<String, String> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}"))
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
    }
}
