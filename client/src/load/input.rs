//! The records of a load's input, JSON lines or CSV, read lazily: the
//! first malformed line ends them, named by its number.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use clap::ValueEnum;
use serde::Deserialize;

use crate::ClientError;

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
}
