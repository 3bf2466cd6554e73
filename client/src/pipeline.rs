//! HTTP/1.1 pipelining for `cavi load`: a batch of PUTs written back to
//! back on one connection, their answers read in order (RFC 9112, 9.3.2),
//! as Redis Cluster clients pipeline commands to each shard.
//!
//! One request per round trip costs a write and a read system call on the
//! client and on the node for every key; on this project's machines those
//! calls cost more than the rest of the request. A batch of `n` PUTs costs
//! one write and a few reads. PUT is idempotent, so anything a batch could
//! not settle (an error answer, a closed connection, a timeout) is handed
//! back to the caller, who sends it again the ordinary way: that path
//! retries, follows a newer map and turns the answer into a sentence.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{PutRequest, key_path};
use crate::load::Record;

/// Answers this long (status line and headers) are not expected from a
/// node; a longer one ends the batch.
const MAX_HEAD: usize = 16 << 10;
/// Headers read per answer.
const MAX_HEADERS: usize = 32;

/// What a batch settled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// One per record, in order: whether the node answered `2xx`.
    pub stored: Vec<bool>,
    /// The highest `x-cavi-epoch` among the answers.
    pub epoch: Option<u64>,
}

/// One keep-alive connection to a node.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    host: String,
    /// Bytes read; answers before `taken` were handed out.
    read: Vec<u8>,
    taken: usize,
    out: Vec<u8>,
    body: Vec<u8>,
    /// Whether the connection can take another batch.
    open: bool,
}

impl Connection {
    /// Connects to `host` (`host:port`).
    pub async fn open(host: &str, timeout: Duration) -> std::io::Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(host))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            host: host.to_owned(),
            read: Vec::with_capacity(8 << 10),
            taken: 0,
            out: Vec::new(),
            body: Vec::new(),
            open: true,
        })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// PUTs every record, then reads the answers; records past a failure
    /// are reported not stored, and the connection is closed after one.
    pub async fn put_all(&mut self, records: &[Record], timeout: Duration) -> Answers {
        let mut answers = Answers {
            stored: Vec::with_capacity(records.len()),
            epoch: None,
        };
        let settled = tokio::time::timeout(timeout, self.exchange(records, &mut answers)).await;
        if !matches!(settled, Ok(Ok(()))) {
            self.open = false;
        }
        answers.stored.resize(records.len(), false);
        answers
    }

    async fn exchange(&mut self, records: &[Record], answers: &mut Answers) -> std::io::Result<()> {
        self.out.clear();
        for r in records {
            self.encode(r)?;
        }
        self.stream.write_all(&self.out).await?;
        for _ in records {
            let answer = self.next_answer().await?;
            answers.stored.push((200..300).contains(&answer.status));
            answers.epoch = answers.epoch.max(answer.epoch);
            if answer.close {
                self.open = false;
                return Ok(());
            }
        }
        Ok(())
    }

    fn encode(&mut self, r: &Record) -> std::io::Result<()> {
        self.body.clear();
        serde_json::to_writer(&mut self.body, &PutRequest { value: &r.value })?;
        write!(
            self.out,
            "PUT {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            key_path(&r.key),
            self.host,
            self.body.len()
        )?;
        self.out.extend_from_slice(&self.body);
        Ok(())
    }

    /// Reads one whole answer off the connection.
    async fn next_answer(&mut self) -> std::io::Result<Answer> {
        loop {
            if let Some((answer, used)) = parse(&self.read[self.taken..])? {
                self.taken += used;
                return Ok(answer);
            }
            self.read.drain(..self.taken);
            self.taken = 0;
            if self.read.len() > MAX_HEAD + (64 << 20) {
                return Err(invalid("an answer too large for a PUT"));
            }
            self.read.reserve(8 << 10);
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The parts of an answer a batch needs.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    epoch: Option<u64>,
    /// `connection: close`: no answer follows this one.
    close: bool,
}

fn invalid(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned())
}

/// The first answer in `buf` and the bytes it takes, once all of it
/// arrived. An answer without a length (chunked, or up to the close) is an
/// error: a node answers a PUT with a `content-length`.
fn parse(buf: &[u8]) -> std::io::Result<Option<(Answer, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(invalid("an answer's head is too long"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&e.to_string())),
    };
    let status = response.code.unwrap_or(0);
    let (mut length, mut epoch, mut close) = (None, None, false);
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid("a bad content-length"))?,
            );
        } else if h.name.eq_ignore_ascii_case("x-cavi-epoch") {
            epoch = value.parse().ok();
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("a PUT answered without a length"));
        }
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err(invalid("a PUT answered without a length")),
    };
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((
        Answer {
            status,
            epoch,
            close,
        },
        head + length,
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answers_are_taken_whole_in_order() {
        let two = b"HTTP/1.1 204 No Content\r\nx-cavi-epoch: 3\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        let (first, used) = parse(two).unwrap().unwrap();
        assert_eq!(
            first,
            Answer {
                status: 204,
                epoch: Some(3),
                close: false
            }
        );
        let (second, rest) = parse(&two[used..]).unwrap().unwrap();
        assert_eq!((second.status, used + rest), (400, two.len()));
        // Not all of the body yet: wait for more.
        assert_eq!(parse(&two[used..two.len() - 1]).unwrap(), None);
        assert_eq!(parse(b"HTTP/1.1 204 No").unwrap(), None);
    }

    /// A node that answers three PUTs of a batch and then closes the
    /// connection: those three are stored, the rest are handed back.
    #[tokio::test]
    async fn a_connection_closed_mid_batch_hands_back_what_it_did_not_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let node = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Wait until all five requests arrived, to answer a pipeline.
            while seen.windows(4).filter(|w| w == b"\r\n\r\n").count() < 5 {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed early");
                seen.extend_from_slice(&buf[..n]);
            }
            let answer = b"HTTP/1.1 204 No Content\r\nx-cavi-epoch: 7\r\n\r\n";
            for _ in 0..3 {
                socket.write_all(answer).await.unwrap();
            }
            String::from_utf8(seen).unwrap()
        });
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                line: i + 1,
                key: format!("k {i}"),
                value: format!("v\"{i}"),
            })
            .collect();
        let mut conn = Connection::open(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let answers = conn.put_all(&records, Duration::from_secs(5)).await;
        assert_eq!(answers.stored, [true, true, true, false, false]);
        assert_eq!(answers.epoch, Some(7));
        assert!(!conn.is_open());
        let sent = node.await.unwrap();
        assert!(sent.starts_with("PUT /kv/k%200 HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("{\"value\":\"v\\\"4\"}"), "{sent}");
    }

    #[test]
    fn answers_without_a_length_or_garbage_end_the_batch() {
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let close = parse(
            b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(close.0.close);
    }
}
