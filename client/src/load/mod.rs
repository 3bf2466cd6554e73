//! `cavi load`: a bulk import from JSON lines or CSV with a bounded number
//! of requests in flight.
//!
//! Input is parsed on its own thread and handed over through a bounded
//! channel, so a file of any size streams. The first malformed line stops
//! the reading; requests already sent finish, and everything the server
//! acknowledged stays stored. The same happens when the server refuses a
//! key. The report says how many keys were loaded and which line failed.
//!
//! Each PUT goes to its owner over pipelined connections
//! ([`cavi_node::pipe`]): the PUTs ready at one moment leave in one write.
//! A durable owner (its `/cluster` says so) answers a connection's PUTs
//! one commit after another, so its PUTs go one to a connection, as many
//! connections as PUTs in flight, and share its commits instead.
//! A PUT that does not come back `2xx` goes again the ordinary way, through
//! the router, which retries, follows a newer map and turns the answer into
//! a sentence. With `--concurrency 1` the records go one at a time, in order.
//!
//! `input` reads the records, `lanes` sends each to its owner, and this
//! module keeps the requests in flight and reports.

mod input;
mod lanes;

pub use input::{Format, Record, Records};

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ClientError;
use crate::routing::Router;
use lanes::{Lanes, put};

/// Records handed from the reading thread to the runtime at once.
const CHUNK: usize = 256;

/// Default number of PUT requests in flight.
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// How progress is shown while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// One line on stderr, redrawn in place (stderr is a terminal).
    Terminal,
    /// A plain line on stderr every so often (stderr is a file or pipe).
    Plain(Duration),
    Off,
}

/// What a load did.
#[derive(Debug)]
pub struct LoadReport {
    /// Keys the server acknowledged.
    pub loaded: u64,
    pub elapsed: Duration,
    /// Why the load stopped early, at the earliest failing line.
    pub error: Option<ClientError>,
}

#[derive(Serialize)]
struct SummaryJson {
    loaded: u64,
    seconds: f64,
    keys_per_second: f64,
    complete: bool,
}

impl LoadReport {
    pub fn keys_per_second(&self) -> f64 {
        rate(self.loaded, self.elapsed)
    }

    /// `loaded 1000 keys in 0.42 s (2381 keys/s)`.
    pub fn summary(&self) -> String {
        format!(
            "loaded {} in {:.2} s ({:.0} keys/s){}",
            keys(self.loaded),
            self.elapsed.as_secs_f64(),
            self.keys_per_second(),
            if self.error.is_some() {
                ", then stopped at the error below"
            } else {
                ""
            }
        )
    }

    pub fn summary_json(&self) -> Result<String, ClientError> {
        serde_json::to_string(&SummaryJson {
            loaded: self.loaded,
            seconds: self.elapsed.as_secs_f64(),
            keys_per_second: self.keys_per_second(),
            complete: self.error.is_none(),
        })
        .map_err(|e| ClientError::Output(e.to_string()))
    }
}

fn keys(n: u64) -> String {
    if n == 1 {
        "1 key".to_owned()
    } else {
        format!("{n} keys")
    }
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-3)
}

/// Stores every record with at most `concurrency` requests in flight.
pub async fn load(
    client: &Arc<Router>,
    records: Records,
    concurrency: usize,
    progress: Progress,
) -> LoadReport {
    let concurrency = concurrency.max(1);
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Vec<Result<Record, ClientError>>>(4);
    // A plain thread, not spawn_blocking: a reader stuck on a terminal's
    // stdin must not keep the runtime from shutting down. Records cross
    // in chunks: one wake-up of the runtime per record cost more than
    // the request itself. A chunk goes out early when the channel is
    // empty (the sender is starved, e.g. lines typed at a terminal).
    std::thread::spawn(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        for item in records {
            chunk.push(item);
            if chunk.len() >= CHUNK || tx.capacity() == tx.max_capacity() {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                if tx.blocking_send(full).is_err() {
                    return;
                }
            }
        }
        if !chunk.is_empty() {
            let _ = tx.blocking_send(chunk);
        }
    });
    let loaded = Arc::new(AtomicU64::new(0));
    let reporter = match progress {
        Progress::Off => None,
        mode => Some(tokio::spawn(report_progress(loaded.clone(), started, mode))),
    };

    let lanes = Arc::new(Lanes::new(client.entry().timeout(), concurrency));
    let mut in_flight = JoinSet::new();
    let mut error: Option<ClientError> = None;
    let mut reading = true;
    let mut pending = VecDeque::new();
    loop {
        while reading && in_flight.len() < concurrency {
            match pending.pop_front() {
                None => break,
                Some(Err(e)) => {
                    keep(e, &mut error);
                    reading = false;
                }
                Some(Ok(Record { line, key, value })) => {
                    let (client, lanes) = (client.clone(), lanes.clone());
                    in_flight
                        .spawn(async move { (line, put(&client, &lanes, &key, &value).await) });
                }
            }
        }
        tokio::select! {
            biased;
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => match done {
                Ok((_, Ok(()))) => {
                    loaded.fetch_add(1, Ordering::Relaxed);
                }
                Ok((line, Err(e))) => {
                    keep(ClientError::at_line(e, line), &mut error);
                    reading = false;
                }
                Err(e) => {
                    keep(ClientError::Input(format!("a request failed: {e}")), &mut error);
                    reading = false;
                }
            },
            chunk = rx.recv(), if reading && pending.is_empty() && in_flight.len() < concurrency => match chunk {
                None => reading = false,
                Some(items) => pending.extend(items),
            },
            else => break,
        }
    }
    drop(rx);
    if let Some(reporter) = reporter {
        reporter.abort();
        let _ = reporter.await;
        if progress == Progress::Terminal {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
    LoadReport {
        loaded: loaded.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        error,
    }
}

/// Keeps the error of the earliest line: the one a user fixes first.
fn keep(e: ClientError, error: &mut Option<ClientError>) {
    let earlier = match (&*error, e.line()) {
        (None, _) => true,
        (Some(old), Some(line)) => old.line().is_none_or(|l| line < l),
        (Some(_), None) => false,
    };
    if earlier {
        *error = Some(e);
    }
}

async fn report_progress(loaded: Arc<AtomicU64>, started: Instant, mode: Progress) {
    let period = match mode {
        Progress::Plain(period) => period,
        _ => Duration::from_millis(200),
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticks.tick().await;
        let n = loaded.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        let text = format!(
            "loaded {} ({:.0} keys/s, {:.0} s)",
            keys(n),
            rate(n, elapsed),
            elapsed.as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        let _ = match mode {
            Progress::Terminal => write!(err, "\r\x1b[2K{text}"),
            _ => writeln!(err, "cavi: {text}"),
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_count_and_rate() {
        let report = LoadReport {
            loaded: 1,
            elapsed: Duration::from_millis(500),
            error: None,
        };
        assert_eq!(report.summary(), "loaded 1 key in 0.50 s (2 keys/s)");
        let json: serde_json::Value =
            serde_json::from_str(&report.summary_json().expect("json")).expect("valid");
        assert_eq!(json["loaded"], 1);
        assert_eq!(json["complete"], true);
    }
}
