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

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinSet;

use cavi_node::pipe::{self, Pipes};
use reqwest::header::{CONTENT_TYPE, HeaderValue};

use crate::ClientError;
use crate::client::{PutRequest, key_path};
use crate::routing::Router;

/// Records handed from the reading thread to the runtime at once.
const CHUNK: usize = 256;

/// Default number of PUT requests in flight.
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: `{"key": "...", "value": "..."}`.
    #[value(alias = "json", alias = "ndjson")]
    Jsonl,
    /// `key,value` records; quote a field holding a comma, a quote or a
    /// newline (`"a, b"`, `"say ""hi"""`). A first line `key,value` is a
    /// header and skipped.
    Csv,
}

impl Format {
    /// The format a file name implies: `.jsonl`, `.json`, `.ndjson` or
    /// `.csv`, in any letter case.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// One pair to store, with the line of the input it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub line: u64,
    pub key: String,
    pub value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    key: String,
    value: String,
}

/// The records of an input, read lazily; the first error ends them.
pub struct Records {
    inner: Inner,
    done: bool,
}

enum Inner {
    Jsonl {
        reader: Box<dyn BufRead + Send>,
        line: u64,
    },
    Csv(Box<CsvRecords>),
}

impl Records {
    pub fn new(reader: Box<dyn Read + Send>, format: Format) -> Self {
        let inner = match format {
            Format::Jsonl => Inner::Jsonl {
                reader: Box::new(BufReader::new(reader)),
                line: 0,
            },
            Format::Csv => Inner::Csv(Box::new(CsvRecords::new(reader))),
        };
        Self { inner, done: false }
    }

    /// Opens `path` (or stdin for `-`) in the format `format` names, else the one
    /// its extension implies.
    pub fn open(path: &str, format: Option<Format>) -> Result<Self, ClientError> {
        if path == "-" {
            let format = format.ok_or_else(|| {
                ClientError::Usage(
                    "reading standard input (`-`) needs --format jsonl or --format csv".into(),
                )
            })?;
            return Ok(Self::new(Box::new(std::io::stdin()), format));
        }
        let format = match format.or_else(|| Format::from_path(Path::new(path))) {
            Some(f) => f,
            None => {
                return Err(ClientError::Usage(format!(
                    "cannot tell the format of {path}: name it .jsonl, .json, .ndjson or .csv, or pass --format"
                )));
            }
        };
        let file = std::fs::File::open(path)
            .map_err(|e| ClientError::Input(format!("cannot open {path}: {e}")))?;
        Ok(Self::new(Box::new(file), format))
    }

    fn next_jsonl(reader: &mut dyn BufRead, line: &mut u64) -> Option<Result<Record, ClientError>> {
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            *line += 1;
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(Err(
                        ClientError::Input(format!("cannot read: {e}")).at_line(*line)
                    ));
                }
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Some(Err(
                    ClientError::Input("not valid UTF-8".into()).at_line(*line)
                ));
            };
            let text = text.trim_start_matches('\u{feff}').trim();
            if text.is_empty() {
                continue;
            }
            return Some(
                serde_json::from_str::<JsonRecord>(text)
                    .map(|r| Record {
                        line: *line,
                        key: r.key,
                        value: r.value,
                    })
                    .map_err(|e| {
                        ClientError::Input(format!(
                            "not a JSON object {{\"key\": \"<string>\", \"value\": \"<string>\"}}: {}",
                            json_reason(&e)
                        ))
                        .at_line(*line)
                    }),
            );
        }
    }
}

impl Iterator for Records {
    type Item = Result<Record, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match &mut self.inner {
            Inner::Jsonl { reader, line } => Self::next_jsonl(reader.as_mut(), line),
            Inner::Csv(records) => records.next_record(),
        };
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}

/// Where the `"` bytes of a CSV input are, by offset: the CSV reader is
/// lenient about quotes (an unclosed quote silently swallows the rest of
/// the input into one field), so each record's raw bytes are checked for
/// an even number of quotes, which every well-formed record has.
#[derive(Default)]
struct QuoteLog {
    offsets: VecDeque<u64>,
    read: u64,
}

struct QuoteTracker {
    inner: Box<dyn Read + Send>,
    log: Arc<Mutex<QuoteLog>>,
}

impl Read for QuoteTracker {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let base = log.read;
        for (i, _) in buf[..n].iter().enumerate().filter(|(_, b)| **b == b'"') {
            log.offsets.push_back(base + i as u64);
        }
        log.read += n as u64;
        Ok(n)
    }
}

/// CSV records, each held back until the next one starts so its raw bytes
/// (from its start to the next record's) can be checked for quotes.
struct CsvRecords {
    records: csv::StringRecordsIntoIter<QuoteTracker>,
    log: Arc<Mutex<QuoteLog>>,
    held: Option<csv::StringRecord>,
    first: bool,
    out: VecDeque<Result<Record, ClientError>>,
    finished: bool,
}

impl CsvRecords {
    fn new(reader: Box<dyn Read + Send>) -> Self {
        let log = Arc::new(Mutex::new(QuoteLog::default()));
        let tracker = QuoteTracker {
            inner: reader,
            log: log.clone(),
        };
        Self {
            records: csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(tracker)
                .into_records(),
            log,
            held: None,
            first: true,
            out: VecDeque::new(),
            finished: false,
        }
    }

    fn next_record(&mut self) -> Option<Result<Record, ClientError>> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some(item);
            }
            if self.finished {
                return None;
            }
            let next = self.records.next();
            let boundary = match &next {
                Some(Ok(r)) => r.position().map(csv::Position::byte),
                Some(Err(e)) => e.position().map(csv::Position::byte),
                None => None,
            }
            .unwrap_or_else(|| self.log.lock().unwrap_or_else(PoisonError::into_inner).read);
            if let Some(held) = self.held.take()
                && let Some(item) = self.finish(&held, boundary)
            {
                self.out.push_back(item);
            }
            match next {
                Some(Ok(record)) => self.held = Some(record),
                Some(Err(e)) => {
                    self.out.push_back(Err(csv_error(&e)));
                    self.finished = true;
                }
                None => self.finished = true,
            }
        }
    }

    /// `record`, whose raw bytes end at `end`, as a pair; `None` for the
    /// header.
    fn finish(
        &mut self,
        record: &csv::StringRecord,
        end: u64,
    ) -> Option<Result<Record, ClientError>> {
        let (line, start) = record.position().map_or((0, 0), |p| (p.line(), p.byte()));
        let quotes = {
            let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
            while log.offsets.front().is_some_and(|&o| o < start) {
                log.offsets.pop_front();
            }
            log.offsets.iter().take_while(|&&o| o < end).count()
        };
        if quotes % 2 == 1 {
            return Some(Err(ClientError::Input(
                "unbalanced quotes: a quoted field is not closed, or a field that is not \
                 quoted holds a `\"` (quote the field and double the quote: \"5\"\" tall\")"
                    .into(),
            )
            .at_line(line)));
        }
        let fields: Vec<&str> = record.iter().collect();
        let is_first = std::mem::replace(&mut self.first, false);
        let fields: Vec<&str> = match fields.as_slice() {
            [key, rest @ ..] if is_first => std::iter::once(key.trim_start_matches('\u{feff}'))
                .chain(rest.iter().copied())
                .collect(),
            _ => fields,
        };
        match fields.as_slice() {
            ["key", "value"] if is_first => None,
            [key, value] => Some(Ok(Record {
                line,
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })),
            _ => Some(Err(ClientError::Input(format!(
                "expected 2 fields, key,value, found {} (quote a field that holds a comma: \"a, b\")",
                fields.len()
            ))
            .at_line(line))),
        }
    }
}

/// serde_json's message without its " at line 1 column N" (the input line
/// is named separately).
fn json_reason(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&suffix) {
        Some(reason) => format!("{reason} (column {})", e.column()),
        None => message,
    }
}

fn csv_error(e: &csv::Error) -> ClientError {
    let reason = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
        csv::ErrorKind::Io(io) => format!("cannot read: {io}"),
        _ => e.to_string(),
    };
    match e.position() {
        Some(pos) => ClientError::Input(reason).at_line(pos.line()),
        None => ClientError::Input(reason),
    }
}

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

/// The connections a load's PUTs take: pipelined to a memory owner, one
/// at a time on each of many to a durable one.
struct Lanes {
    pipelined: Pipes,
    parallel: Pipes,
    timeout: Duration,
    /// Whether each owner seen is durable, asked once.
    durable: Mutex<HashMap<String, Arc<OnceCell<bool>>>>,
}

impl Lanes {
    fn new(timeout: Duration, concurrency: usize) -> Self {
        Self {
            pipelined: Pipes::new(timeout, timeout),
            parallel: Pipes::new(timeout, timeout).shaped(concurrency, 1),
            timeout,
            durable: Mutex::default(),
        }
    }

    /// The pool for `addr`. An owner that cannot say what it is (it is
    /// down, or older) gets pipelines: its PUTs fail over to the router
    /// either way.
    async fn to(&self, router: &Router, addr: &str) -> &Pipes {
        let known = {
            let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
            match durable.get(addr) {
                Some(known) => known.clone(),
                None => durable.entry(addr.to_owned()).or_default().clone(),
            }
        };
        let durable = *known
            .get_or_init(|| async {
                let owner = router.entry().for_addr(addr, self.timeout);
                owner.cluster().await.is_ok_and(|view| view.durable)
            })
            .await;
        if durable {
            &self.parallel
        } else {
            &self.pipelined
        }
    }
}

/// PUTs one record, pipelined to its owner; anything but a `2xx` goes
/// again through the router.
async fn put(router: &Router, lanes: &Lanes, key: &str, value: &str) -> Result<(), ClientError> {
    let addr = router.addr_for(key).await;
    let pipes = lanes.to(router, &addr).await;
    let body = serde_json::to_vec(&PutRequest { value })
        .map_err(|e| ClientError::Input(format!("cannot encode the value of {key:?}: {e}")))?;
    let request = pipe::request(
        "PUT",
        &addr,
        &key_path(key),
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        &body,
    );
    match pipes.send(&addr, request).await {
        Ok(answer) if answer.status.is_success() => {
            let epoch = answer
                .epoch
                .as_ref()
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let Some(epoch) = epoch {
                router.saw_epoch(epoch).await;
            }
            Ok(())
        }
        _ => router.put(key, value).await,
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

    fn parse(text: &str, format: Format) -> Vec<Result<Record, String>> {
        Records::new(
            Box::new(std::io::Cursor::new(text.as_bytes().to_vec())),
            format,
        )
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
    }

    fn rec(line: u64, key: &str, value: &str) -> Result<Record, String> {
        Ok(Record {
            line,
            key: key.into(),
            value: value.into(),
        })
    }

    #[test]
    fn json_lines_skip_blank_lines_and_count_them() {
        let got = parse(
            "{\"key\": \"a\", \"value\": \"1\"}\r\n\n  \n{\"value\": \"x\\ny\", \"key\": \"b/c\"}",
            Format::Jsonl,
        );
        assert_eq!(got, vec![rec(1, "a", "1"), rec(4, "b/c", "x\ny")]);
    }

    #[test]
    fn a_bad_json_line_ends_the_records_with_its_number() {
        let got = parse(
            "{\"key\": \"a\", \"value\": \"1\"}\n{\"key\": \"b\", \"value\": \"2\"}\n{\"key\": \"c\"}\n{\"key\": \"d\", \"value\": \"4\"}\n",
            Format::Jsonl,
        );
        assert_eq!(got.len(), 3);
        let e = got[2].as_ref().expect_err("line 3 is bad");
        assert!(e.starts_with("line 3: not a JSON object"), "{e}");
        assert!(e.contains("missing field `value`"), "{e}");
        assert!(!e.contains("at line 1"), "{e}");
        for (bad, why) in [
            ("{\"key\": \"a\", \"value\": 5}", "invalid type"),
            (
                "{\"key\": \"a\", \"value\": \"1\", \"ttl\": 3}",
                "unknown field",
            ),
            ("key,value", "expected"),
        ] {
            let got = parse(bad, Format::Jsonl);
            let e = got[0].as_ref().expect_err(bad);
            assert!(e.starts_with("line 1: ") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn invalid_utf8_is_named_by_line() {
        let bytes: &'static [u8] = b"{\"key\": \"a\", \"value\": \"1\"}\n\xff\xfe\n";
        let got: Vec<_> = Records::new(Box::new(bytes), Format::Jsonl)
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(got[1], Err("line 2: not valid UTF-8".to_owned()));
    }

    #[test]
    fn csv_has_an_optional_header_and_quoted_fields() {
        let got = parse(
            "key,value\na,\"x, y\"\n\"multi\nline\",\"say \"\"hi\"\"\"\nkey,value\n",
            Format::Csv,
        );
        assert_eq!(
            got,
            vec![
                rec(2, "a", "x, y"),
                rec(3, "multi\nline", "say \"hi\""),
                rec(5, "key", "value"),
            ]
        );
        assert_eq!(parse("a,1\n", Format::Csv), vec![rec(1, "a", "1")]);
    }

    #[test]
    fn csv_with_the_wrong_number_of_fields_names_the_line() {
        let got = parse("a,1\nb,2\nc,3,4\nd,4\n", Format::Csv);
        assert_eq!(got.len(), 3);
        let e = got[2].as_ref().expect_err("line 3 is bad");
        assert!(e.starts_with("line 3: expected 2 fields"), "{e}");
        let got = parse("a,1\nlonely\n", Format::Csv);
        assert!(got[1].as_ref().is_err_and(|e| e.starts_with("line 2: ")));
    }

    #[test]
    fn csv_with_unbalanced_quotes_names_the_line() {
        // An unclosed quote would otherwise swallow the rest of the input.
        let got = parse("a,1\nb,\"x\nc,3\nd,4\n", Format::Csv);
        assert_eq!(got[0], rec(1, "a", "1"));
        let e = got[1].as_ref().expect_err("line 2 is bad");
        assert!(e.starts_with("line 2: unbalanced quotes"), "{e}");
        assert_eq!(got.len(), 2);
        // A stray quote in an unquoted field, in the middle and at the end.
        let got = parse("a,1\nb,5\" tall\nc,3\n", Format::Csv);
        assert!(
            got[1]
                .as_ref()
                .is_err_and(|e| e.starts_with("line 2: unbalanced"))
        );
        let got = parse("a,1\nb,5\"", Format::Csv);
        assert!(
            got[1]
                .as_ref()
                .is_err_and(|e| e.starts_with("line 2: unbalanced"))
        );
        // Balanced quotes across lines and doubled quotes are fine.
        let got = parse("\"x\"\"\ny\",\"\"\"\"\"\"\na,b", Format::Csv);
        assert_eq!(got, vec![rec(1, "x\"\ny", "\"\""), rec(3, "a", "b")]);
    }

    #[test]
    fn formats_come_from_extensions() {
        for (name, format) in [
            ("x.jsonl", Some(Format::Jsonl)),
            ("x.JSON", Some(Format::Jsonl)),
            ("dir.d/x.ndjson", Some(Format::Jsonl)),
            ("x.csv", Some(Format::Csv)),
            ("x.txt", None),
            ("x", None),
        ] {
            assert_eq!(Format::from_path(Path::new(name)), format, "{name}");
        }
        let e = Records::open("-", None)
            .err()
            .expect("stdin needs a format");
        assert_eq!(e.exit_code(), 2);
        let e = Records::open("data.txt", None)
            .err()
            .expect("unknown extension");
        assert_eq!(e.exit_code(), 2);
        let e = Records::open("/nonexistent/x.csv", None)
            .err()
            .expect("missing file");
        assert!(e.to_string().starts_with("cannot open /nonexistent/x.csv"));
        assert_eq!(e.exit_code(), 1);
    }

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
