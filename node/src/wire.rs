//! What travels between nodes and clients besides keys and values: header
//! names (as `HeaderName`s, so a lookup never parses the name), the error
//! body, the `/cluster` view, and the one way keys and
//! query parameters are decoded.

use axum::http::HeaderName;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str};
use serde::{Deserialize, Serialize};

use crate::config::ShardConfig;

/// Marks a request as proxied by another shard; the value is the sender's
/// shard id. A receiver that does not own the key answers 421 instead of
/// forwarding, so nodes whose maps disagree cannot bounce a request.
pub const FORWARDED_HEADER: HeaderName = HeaderName::from_static("x-cavi-forwarded");

/// Names one request across every node it touches; taken from the client
/// or made up by the first node, and passed along on every hop.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The epoch of the sender's shard map, on forwarded requests and on every
/// 421, so whoever is behind can tell and refresh.
pub const EPOCH_HEADER: HeaderName = HeaderName::from_static("x-cavi-epoch");

/// Header on a partial search answer, naming the shards that are missing.
pub const PARTIAL_HEADER: HeaderName = HeaderName::from_static("x-cavi-partial");

/// Header on a search answer that stopped early: pass its value back as
/// `cursor` to continue where it stopped.
pub const NEXT_CURSOR_HEADER: HeaderName = HeaderName::from_static("x-cavi-next-cursor");

/// Everything but unreserved characters is escaped, `/` and `+` included:
/// a key is then one path segment, and no decoder can mistake a `+` for a
/// space.
pub const URL_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A sentence for people.
    pub error: String,
    /// A stable snake_case code for programs.
    pub code: String,
    /// On `421 misdirected`: the epoch of the answering node's map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// On `421 misdirected`: who owns the key in the answering node's map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// A shard as an owner of a key: its id and address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Owner {
    pub id: u32,
    pub addr: String,
}

/// What `/cluster` reports: this node and the live map as it sees it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The shard this node serves.
    pub shard_id: u32,
    /// Whether the map gives this node any keys. A node started with an id
    /// its config does not list owns nothing until a range moves to it.
    #[serde(default = "yes")]
    pub assigned: bool,
    /// The map's epoch: grows with every committed change.
    #[serde(default)]
    pub epoch: u64,
    /// Keys held by this node (exact).
    pub keys: u64,
    /// Key and value bytes held by this node (exact).
    #[serde(default)]
    pub bytes: u64,
    /// Whether this node keeps its shard on disk and answers a PUT or
    /// DELETE once it is fsynced. Such a node serves the requests of one
    /// connection one commit after another, so a client with many writes
    /// in flight gives each its own connection rather than pipelining
    /// them on a few.
    #[serde(default)]
    pub durable: bool,
    /// The live map: owned ranges in key order. Mid-reshard a shard may
    /// appear more than once.
    pub shards: Vec<ShardConfig>,
    /// Range moves this node takes part in, as source or target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<crate::moves::MoveStatus>,
}

fn yes() -> bool {
    true
}

/// Why a key or a query parameter could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

/// Percent-decodes one URL component exactly once. `+` stays `+` (form
/// encoding is not spoken here), and bytes that are not UTF-8 once
/// decoded are refused rather than replaced, so two different encodings
/// can never name the same key.
pub fn decode_component(raw: &str) -> Result<String, DecodeError> {
    // A component with nothing escaped (most keys) is copied as it is: it
    // is UTF-8 already, and `memchr` finds no `%` faster than the decoder.
    if !raw.contains('%') {
        return Ok(raw.to_owned());
    }
    match percent_decode_str(raw).decode_utf8() {
        Ok(decoded) => Ok(decoded.into_owned()),
        Err(_) => Err(DecodeError(format!(
            "{raw:?} does not decode to UTF-8 (keys and parameters are UTF-8, percent-encoded)"
        ))),
    }
}

/// The parameters of a query string, each decoded by
/// [`decode_component`], in order.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, DecodeError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode_component(name)?, decode_component(value)?))
        })
        .collect()
}

/// A search cursor: the last key of a page, opaque to clients (hex).
pub fn encode_cursor(last_key: &str) -> String {
    let mut hex = String::with_capacity(2 + last_key.len() * 2);
    hex.push_str("k1");
    for b in last_key.as_bytes() {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    hex
}

/// The key a cursor continues after, if it is one this node wrote.
pub fn decode_cursor(cursor: &str) -> Option<String> {
    let hex = cursor.strip_prefix("k1")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Non-zero when a byte of `word` is a control character, a quote, a
/// backslash or DEL (the word-at-a-time tests of "Bit Twiddling Hacks":
/// exact about whether such a byte exists, which is all this asks).
fn needs_escape(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    control
        | zero_byte(word ^ (ONES * u64::from(b'"')))
        | zero_byte(word ^ (ONES * u64::from(b'\\')))
        | zero_byte(word ^ (ONES * 0x7f))
}

/// `value` as a JSON string.
pub fn json_string(value: &str) -> Vec<u8> {
    let mut json = Vec::with_capacity(value.len() + 2);
    write_json_string(&mut json, value);
    json
}

/// Whether `bytes` can stand between a JSON string's quotes as they are:
/// no control character, quote, backslash or DEL. Checked eight bytes to a
/// machine word, several times cheaper than byte by byte.
pub fn is_plain(bytes: &[u8]) -> bool {
    let (words, tail) = bytes.as_chunks::<8>();
    words.chunks(4).all(|four| {
        four.iter()
            .fold(0, |bad, w| bad | needs_escape(u64::from_le_bytes(*w)))
            == 0
    }) && tail
        .iter()
        .all(|&b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
}

/// Appends `value` to `out` as a JSON string, byte for byte what
/// serde_json writes. Most values need no escaping, and checking that
/// first is several times cheaper than escaping byte by byte: this is the
/// cost of every GET's body and of every page a move copies.
pub fn write_json_string(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    if is_plain(bytes) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The shortcut must give byte for byte what serde_json gives, for
    /// plain values and for every character that needs an escape, at
    /// every position of a sixteen-byte chunk.
    #[test]
    fn json_strings_agree_with_serde_json() {
        let samples = [
            "",
            "plain",
            "naïve ☃ 🦀",
            "quote \" inside",
            "back\\slash",
            "tab\tnew\nline\r",
            "\u{0}\u{1f}\u{7f}",
            "</script>",
        ];
        let long = [
            "☃é🦀\u{80}ÿ".repeat(9),
            "ÿ\u{9f}".repeat(20),
            "x".repeat(64) + "\"",
        ];
        for value in samples
            .iter()
            .copied()
            .chain(long.iter().map(String::as_str))
        {
            assert_eq!(
                json_string(value),
                serde_json::to_vec(value).expect("a string encodes"),
                "{value:?}"
            );
        }
        for b in 0u8..=0x7f {
            for at in [0, 7, 15, 16, 31, 40] {
                let mut value = "v".repeat(41);
                value.replace_range(at..=at, &(b as char).to_string());
                let mut out = b"[".to_vec();
                write_json_string(&mut out, &value);
                let mut want = b"[".to_vec();
                want.extend(serde_json::to_vec(&value).expect("a string encodes"));
                assert_eq!(out, want, "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn components_decode_once_and_plus_stays_plus() {
        assert_eq!(decode_component("é-plain").unwrap(), "é-plain");
        assert_eq!(decode_component("100%").unwrap(), "100%");
        assert_eq!(decode_component("a+b").unwrap(), "a+b");
        assert_eq!(decode_component("a%2Bb").unwrap(), "a+b");
        assert_eq!(decode_component("q%2520x").unwrap(), "q%20x");
        assert_eq!(decode_component("%C3%A9").unwrap(), "é");
        // Invalid UTF-8 is refused, so %FE and %FF cannot both become U+FFFD.
        assert!(decode_component("%FE").is_err());
        assert!(decode_component("%FF").is_err());
        assert!(decode_component("%C3").is_err());
    }

    #[test]
    fn queries_split_then_decode() {
        let q = parse_query("key=a%26b%3Dc&prefix=x+y&flag").unwrap();
        assert_eq!(
            q,
            vec![
                ("key".into(), "a&b=c".into()),
                ("prefix".into(), "x+y".into()),
                ("flag".into(), String::new())
            ]
        );
        assert!(parse_query("key=%FF").is_err());
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        for key in ["", "a", "é/ü?", "\u{10ffff}"] {
            assert_eq!(decode_cursor(&encode_cursor(key)).as_deref(), Some(key));
        }
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("k1f"), None);
        assert_eq!(decode_cursor("k1ff"), None);
        assert_eq!(decode_cursor("k1zz"), None);
    }
}
