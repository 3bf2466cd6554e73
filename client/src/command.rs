//! The `cavi` command line: arguments, and each command from request to
//! printed output.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use std::sync::Arc;

use cavi_node::config::ClusterConfig;
use cavi_node::settings::parse_duration;

use crate::cluster::{self, PROBE_TIMEOUT};
use crate::load::{self, DEFAULT_CONCURRENCY, Format, Progress, Records};
use crate::reshard::{self, Driver};
use crate::routing::{RetryPolicy, Router};
use crate::table::Table;
use crate::{Client, ClientError, DEFAULT_ENDPOINT};

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

    /// Send every request to the endpoint (which forwards it) instead of
    /// straight to the key's owner: for a `kubectl port-forward`, where the
    /// shards' own addresses do not resolve.
    #[arg(long, global = true, env = "CAVI_NO_ROUTING")]
    pub no_routing: bool,

    /// Retries of a get, put or delete the cluster could not serve just
    /// then (a 503 such as a restarting shard, or no answer), with backoff
    /// from 100ms doubling to 2s, or as the server's Retry-After says.
    #[arg(long, global = true, env = "CAVI_RETRIES", default_value_t = 4)]
    pub retries: u32,

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
    /// List the keys starting with PREFIX, sorted, from every shard, a page
    /// at a time (the output streams).
    Search {
        /// Empty or omitted: every key.
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<usize>,
        /// Entries asked for per page.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        page: u32,
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
        /// Requests in flight at once (pipelined over a few connections per
        /// shard).
        #[arg(long, default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=1024))]
        concurrency: u16,
    },
    /// Move keys between the running shards until the cluster serves
    /// exactly the layout in FILE (the config file format).
    #[command(
        long_about = "Move keys between the running shards until the cluster serves exactly the \
        layout in FILE (the config file format: every shard with its id, address and range).\n\n\
        Split a range, merge neighbours, move a boundary, add shards (start them first: \
        `kvstore-api <id> <config> --listen <addr>` for an id the config does not list) or remove \
        them (their keys go to whoever owns them in FILE; stop such a process only after this \
        command succeeded). Each range moves online: a consistent copy, the writes taken meanwhile, \
        a short pause of writes to that range, a commit. Progress goes to stderr.\n\n\
        Exit 0 once every node serves the layout. A layout that cannot be reached (overlapping \
        ranges, keys nobody would own, a shard that does not answer) is refused before anything \
        moves. After a failure, or if this command is killed, run it again: it finishes or rolls \
        back the interrupted move. One reshard runs at a time per cluster (a lock on every node)."
    )]
    Reshard {
        /// The layout to reach.
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
        /// How long the move lock holds if this command stops renewing it.
        #[arg(long, default_value = "15s", value_parser = parse_duration)]
        lock_ttl: Duration,
    },
}

/// Runs one command, printing its output to stdout and notes to stderr.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let client = Client::new(&cli.endpoint, cli.timeout)?;
    let json = cli.output == Output::Json;
    let retry = RetryPolicy {
        attempts: cli.retries.saturating_add(1),
        ..RetryPolicy::default()
    };
    let router = Arc::new(Router::new(client.clone(), !cli.no_routing).with_retry(retry));
    match cli.command {
        Command::Get { key } => {
            let value = router.get(&key).await?;
            if json {
                print(&format!("{}\n", to_json(&value)?))
            } else {
                print(&format!("{value}\n"))
            }
        }
        Command::Put { key, value } => router.put(&key, &value).await,
        Command::Del { key } => router.delete(&key).await,
        Command::Search {
            prefix,
            limit,
            page,
            partial,
        } => search(&client, &prefix, limit, page as usize, partial, json).await,
        Command::Cluster => {
            let report = cluster::cluster_status(&client, PROBE_TIMEOUT).await?;
            if json {
                print(&format!("{}\n", cluster::render_json(&report)?))?;
            } else {
                print(&cluster::render_table(&report))?;
                for line in cluster::notes(&report) {
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
            let report = load::load(&router, records, usize::from(concurrency), progress).await;
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
        Command::Reshard { file, lock_ttl } => reshard(&client, &file, lock_ttl).await,
    }
}

/// `cavi search`: follows the cursor page by page and prints as it goes:
/// a table (header first) or one JSON array.
async fn search(
    client: &Client,
    prefix: &str,
    limit: Option<usize>,
    page: usize,
    partial: bool,
    json: bool,
) -> Result<(), ClientError> {
    let mut cursor = None;
    let mut printed = 0usize;
    let mut table = Table::new(["KEY", "VALUE"]);
    let mut first_page = true;
    if json {
        print("[")?;
    }
    loop {
        let want = limit.map_or(page, |l| page.min(l - printed));
        if want == 0 {
            break;
        }
        let answer = client
            .search(prefix, Some(want), partial, cursor.take())
            .await?;
        if let Some(missing) = &answer.missing {
            note(&format!(
                "partial answer: shard(s) {missing} did not answer, their keys are missing"
            ));
        }
        printed += answer.entries.len();
        if json {
            let mut text = String::new();
            for e in &answer.entries {
                if printed - answer.entries.len() > 0 || !text.is_empty() {
                    text.push(',');
                }
                text.push_str("\n  ");
                text.push_str(
                    &serde_json::to_string(e).map_err(|e| ClientError::Output(e.to_string()))?,
                );
            }
            print(&text)?;
        } else {
            // Column widths come from the first page, so output streams.
            for e in &answer.entries {
                table.push([&e.key, &e.value]);
            }
            print(&table.render_from(first_page))?;
            table.clear_rows();
        }
        first_page = false;
        match answer.next_cursor {
            Some(next) if limit.is_none_or(|l| printed < l) => cursor = Some(next),
            _ => break,
        }
    }
    if json {
        print(if printed == 0 { "]\n" } else { "\n]\n" })?;
    }
    Ok(())
}

/// `cavi reshard`: drives the cluster to the layout in `file`.
async fn reshard(
    client: &Client,
    file: &std::path::Path,
    lock_ttl: Duration,
) -> Result<(), ClientError> {
    let target = ClusterConfig::load(file).map_err(|e| ClientError::Input(e.to_string()))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let driver = Driver::new(format!("cavi@{host}/{}", std::process::id()), lock_ttl);
    // A step that changed nothing is asked again soon: a poll is a few
    // small requests, and a move that finished waits at most this long
    // for its commit or for the end of its clean-up.
    let epoch = reshard::drive(client, &target, &driver, Duration::from_millis(50), note)
        .await
        .map_err(|e| ClientError::Reshard(e.to_string()))?;
    note(&format!(
        "done: every shard serves the layout of {} at map epoch {epoch}",
        file.display()
    ));
    Ok(())
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
            Command::Search { ref prefix, limit: Some(2), partial: false, .. } if prefix == "ap"
        ));
        let cli = Cli::try_parse_from(["cavi", "put", "k", "--", "-1"]).expect("parses");
        assert!(matches!(cli.command, Command::Put { ref value, .. } if value == "-1"));
        let e = Cli::try_parse_from(["cavi", "load", "x.csv", "--concurrency", "0"])
            .expect_err("zero in flight");
        assert_eq!(e.exit_code(), 2);
    }
}
