//! The `cavi` command line: arguments, and each command from request to
//! printed output.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cluster::{self, PROBE_TIMEOUT};
use crate::load::{self, DEFAULT_CONCURRENCY, Format, Progress, Records};
use crate::table::Table;
use crate::{Client, ClientError, DEFAULT_ENDPOINT};
use cavi_node::settings::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "cavi",
    version,
    about = "Command-line client of a CAVI cluster: get, put, delete, search and bulk-load keys, \
             and show the shards",
    after_help = "Any node will do as the endpoint: it forwards every key to its owner. \
                  Exit codes: 0 success, 1 the server answered an error (including a missing \
                  key) or the input is malformed, 2 wrong usage, 3 the endpoint cannot be reached."
)]
pub struct Cli {
    /// Base URL of any node of the cluster (plain http).
    #[arg(
        long,
        short = 'e',
        global = true,
        env = "CAVI_ENDPOINT",
        default_value = DEFAULT_ENDPOINT
    )]
    pub endpoint: String,

    /// Output format: `table` for humans, `json` for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Longest wait for any one answer (e.g. `500ms`, `30s`, `1m`).
    #[arg(long, global = true, env = "CAVI_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the value of KEY (the bare value; a JSON string with `-o json`).
    Get { key: String },
    /// Store VALUE under KEY. Put `--` before a value that starts with `-`.
    Put { key: String, value: String },
    /// Delete KEY; deleting a missing key succeeds.
    #[command(visible_alias = "delete")]
    Del { key: String },
    /// List the keys starting with PREFIX, sorted, from every shard.
    Search {
        /// Empty or omitted: every key.
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<usize>,
        /// Answer with the shards that respond instead of failing when one
        /// does not; the missing shards are named on stderr.
        #[arg(long)]
        partial: bool,
    },
    /// Show every shard: range, address, health and key count.
    #[command(
        long_about = "Show every shard: range, address, health and key count.\n\n\
        The shard map comes from the endpoint; then each shard is asked directly, at the address \
        the cluster advertises, for its health (/readyz) and key count (/cluster), all at once, \
        with a 2 s limit. A shard that does not answer is shown as `unreachable` with keys `-`.\n\n\
        When the endpoint is a `kubectl port-forward` into Kubernetes, the advertised addresses \
        are usually cluster-internal DNS names (demo-1.demo-headless:3100) that do not resolve \
        outside the cluster, so those shards show as unreachable: run cavi inside the cluster \
        (kubectl run / exec) to probe them, or port-forward to each shard in turn."
    )]
    Cluster,
    /// Store every pair of a JSON-lines or CSV file, many requests at once.
    #[command(
        long_about = "Store every pair of a JSON-lines or CSV file, many requests at once.\n\n\
        JSON lines: one object per line, {\"key\": \"...\", \"value\": \"...\"}; blank lines are \
        skipped. CSV: key,value per record, RFC 4180 quoting (\"a, b\"); a first line key,value \
        is a header and skipped. The format comes from the extension (.jsonl, .json, .ndjson, \
        .csv) or --format; FILE `-` reads standard input and needs --format.\n\n\
        The first malformed line, or the first key the server refuses, stops the load: the \
        requests already sent finish, what the server acknowledged stays stored, the summary \
        says how many keys were loaded, the error names the line, and the exit code is not 0."
    )]
    Load {
        /// A file, or `-` for standard input.
        file: String,
        /// Input format; default: from the file's extension.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Requests in flight at once.
        #[arg(long, default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=1024))]
        concurrency: u16,
    },
}

/// Runs one command, printing its output to stdout and notes to stderr.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let client = Client::new(&cli.endpoint, cli.timeout)?;
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Get { key } => {
            let value = client.get(&key).await?;
            if json {
                print(&format!("{}\n", to_json(&value)?))
            } else {
                print(&format!("{value}\n"))
            }
        }
        Command::Put { key, value } => client.put(&key, &value).await,
        Command::Del { key } => client.delete(&key).await,
        Command::Search {
            prefix,
            limit,
            partial,
        } => {
            let answer = client.search(&prefix, limit, partial).await?;
            if let Some(missing) = &answer.missing {
                note(&format!(
                    "partial answer: shard(s) {missing} did not answer, their keys are missing"
                ));
            }
            if json {
                print(&format!("{}\n", to_json(&answer.entries)?))
            } else {
                let mut table = Table::new(["KEY", "VALUE"]);
                for e in &answer.entries {
                    table.push([&e.key, &e.value]);
                }
                print(&table.render())
            }
        }
        Command::Cluster => {
            let statuses = cluster::cluster_status(&client, PROBE_TIMEOUT).await?;
            if json {
                print(&format!("{}\n", cluster::render_json(&statuses)?))?;
            } else {
                print(&cluster::render_table(&statuses))?;
                for line in cluster::notes(&statuses) {
                    note(&line);
                }
            }
            Ok(())
        }
        Command::Load {
            file,
            format,
            concurrency,
        } => {
            let records = Records::open(&file, format)?;
            let progress = if std::io::stderr().is_terminal() {
                Progress::Terminal
            } else {
                Progress::Plain(Duration::from_secs(10))
            };
            let report = load::load(&client, records, usize::from(concurrency), progress).await;
            if json {
                print(&format!("{}\n", report.summary_json()?))?;
            } else {
                print(&format!("{}\n", report.summary()))?;
            }
            match report.error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, ClientError> {
    serde_json::to_string_pretty(value).map_err(|e| ClientError::Output(e.to_string()))
}

/// Writes to stdout; a closed pipe (`cavi search | head`) is not an error.
fn print(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ClientError::Output(e.to_string()))
        }
        _ => Ok(()),
    }
}

/// A line on stderr, `cavi: ` first.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "cavi: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from(["cavi", "search", "ap", "-o", "json", "--limit", "2"])
            .expect("parses");
        assert_eq!(cli.output, Output::Json);
        assert!(matches!(
            cli.command,
            Command::Search { ref prefix, limit: Some(2), partial: false } if prefix == "ap"
        ));
        let cli = Cli::try_parse_from(["cavi", "put", "k", "--", "-1"]).expect("parses");
        assert!(matches!(cli.command, Command::Put { ref value, .. } if value == "-1"));
        let e = Cli::try_parse_from(["cavi", "load", "x.csv", "--concurrency", "0"])
            .expect_err("zero in flight");
        assert_eq!(e.exit_code(), 2);
    }
}
