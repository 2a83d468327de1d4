//! The announce stream: the guest→host connection on [`HOST_ANNOUNCE_PORT`].
//!
//! Readiness is an event: the host listens before the VM starts, the agent connects as soon as
//! its ttrpc listener is bound and writes one ready line, e.g.
//!
//! ```text
//! UVM-AGENT READY v1 agent=0.1.0 port=1024
//! ```
//!
//! (`v<PROTOCOL_VERSION>` then optional space-separated `key=value` fields), after which every
//! line is one agent log line. Text is UTF-8 (the reader replaces anything else), lines end with
//! `\n`, and no line is longer than [`MAX_LOG_LINE`] bytes — the reader enforces that bound
//! whatever the guest sends, because the guest is untrusted. Do not rely on EOF: a half-close is
//! not propagated by every vsock proxy.
//!
//! [`HOST_ANNOUNCE_PORT`]: crate::HOST_ANNOUNCE_PORT

use std::collections::BTreeMap;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

use crate::{AGENT_VSOCK_PORT, MAX_LOG_LINE, PROTOCOL_VERSION};

/// The fixed start of the ready line, before ` v<version>`.
pub const READY_PREFIX: &str = "UVM-AGENT READY";

/// Why a line is not an acceptable ready line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnounceError {
    /// The line does not start with [`READY_PREFIX`].
    #[error("not a ready line (expected it to start with {READY_PREFIX:?})")]
    NotReadyLine,
    /// The version token after the prefix is missing or not `v<number>`.
    #[error("malformed protocol version token {token:?} in the ready line")]
    BadVersion {
        /// The offending token (lossily decoded, truncated).
        token: String,
    },
    /// The line is longer than [`MAX_LOG_LINE`].
    #[error("ready line is {len} bytes long, more than the {MAX_LOG_LINE}-byte bound")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The line is not UTF-8.
    #[error("ready line is not valid UTF-8")]
    NotUtf8,
}

/// Why the announce stream did not begin with a ready line the host can accept
/// ([`read_ready_line`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// Reading the stream failed.
    #[error("the announce stream could not be read")]
    Io(#[source] std::io::Error),
    /// The stream ended before the first byte of the ready line.
    #[error("the announce stream ended before the ready line")]
    Ended,
    /// The stream ended after part of the ready line.
    #[error("the announce stream ended inside the ready line")]
    EndedInside,
    /// No `\n` within [`MAX_LOG_LINE`] bytes.
    #[error("the ready line is longer than {MAX_LOG_LINE} bytes")]
    TooLong,
    /// The line is not a ready line.
    #[error(transparent)]
    Malformed(#[from] AnnounceError),
    /// The agent speaks another protocol version than ours.
    #[error("the agent speaks protocol v{agent}, we speak v{PROTOCOL_VERSION}")]
    Incompatible {
        /// The version the agent announced.
        agent: u32,
    },
}

/// A parsed ready line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// The protocol version the agent speaks (`v1` → 1). The caller decides whether it is
    /// acceptable; [`ReadyLine::is_compatible`] compares it with ours.
    pub protocol_version: u32,
    /// The optional fields: `key=value` tokens, and bare `flag` tokens with an empty value.
    pub fields: BTreeMap<String, String>,
}

impl ReadyLine {
    /// Whether the agent speaks our [`PROTOCOL_VERSION`].
    pub fn is_compatible(&self) -> bool {
        self.protocol_version == PROTOCOL_VERSION
    }

    /// The agent's version (`agent=` field), if it sent one.
    pub fn agent_version(&self) -> Option<&str> {
        self.fields.get("agent").map(String::as_str)
    }

    /// The vsock port of the agent's ttrpc listener (`port=` field), if it sent a valid one.
    pub fn agent_port(&self) -> Option<u32> {
        self.fields.get("port").and_then(|p| p.parse().ok())
    }
}

/// The ready line this crate's agent sends, with its `\n`.
pub fn ready_line() -> String {
    ready_line_with(&[])
}

/// The ready line with extra `key=value` fields after the standard ones (`agent`, `port`).
///
/// Keys and values must not contain spaces or newlines; offending characters are replaced by `_`
/// so that the line stays parseable.
pub fn ready_line_with(extra: &[(&str, &str)]) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let port = AGENT_VSOCK_PORT.to_string();
    let mut line = format!("{READY_PREFIX} v{PROTOCOL_VERSION}");
    for (key, value) in [("agent", version), ("port", port.as_str())]
        .into_iter()
        .chain(extra.iter().copied())
    {
        line.push(' ');
        line.push_str(&sanitize_token(key));
        line.push('=');
        line.push_str(&sanitize_token(value));
    }
    line.truncate(floor_char_boundary(&line, MAX_LOG_LINE - 1));
    line.push('\n');
    line
}

fn sanitize_token(token: &str) -> String {
    token
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Parses a ready line (with or without its trailing `\n` / `\r\n`).
pub fn parse_ready_line(line: &[u8]) -> Result<ReadyLine, AnnounceError> {
    if line.len() > MAX_LOG_LINE {
        return Err(AnnounceError::TooLong { len: line.len() });
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line
        .strip_prefix(READY_PREFIX.as_bytes())
        .ok_or(AnnounceError::NotReadyLine)?;
    let text = std::str::from_utf8(rest).map_err(|_| AnnounceError::NotUtf8)?;
    // The prefix must be followed by a separator, not glued to another word.
    if !text.is_empty() && !text.starts_with(' ') {
        return Err(AnnounceError::NotReadyLine);
    }
    let mut tokens = text.split(' ').filter(|t| !t.is_empty());
    let version_token = tokens.next().unwrap_or_default();
    let protocol_version = version_token
        .strip_prefix('v')
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| AnnounceError::BadVersion {
            token: version_token.chars().take(32).collect(),
        })?;
    let fields = tokens
        .map(|token| match token.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (token.to_owned(), String::new()),
        })
        .collect();
    Ok(ReadyLine {
        protocol_version,
        fields,
    })
}

/// Reads the ready line that begins the announce stream, reading no more than [`MAX_LOG_LINE`]
/// bytes and a `\n`, and checks that the agent speaks our [`PROTOCOL_VERSION`]. What follows
/// (the agent's log lines) stays in `reader`. Bound the wait with a timeout: a guest may send
/// nothing at all.
pub async fn read_ready_line<R>(reader: &mut R) -> Result<ReadyLine, ReadyError>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let mut line = Vec::with_capacity(128);
    let limit = u64::try_from(MAX_LOG_LINE).unwrap_or(u64::MAX) + 1;
    reader
        .take(limit)
        .read_until(b'\n', &mut line)
        .await
        .map_err(ReadyError::Io)?;
    match line.last() {
        Some(b'\n') => {
            line.pop();
        }
        None => return Err(ReadyError::Ended),
        Some(_) if line.len() > MAX_LOG_LINE => return Err(ReadyError::TooLong),
        Some(_) => return Err(ReadyError::EndedInside),
    }
    let ready = parse_ready_line(&line)?;
    if !ready.is_compatible() {
        return Err(ReadyError::Incompatible {
            agent: ready.protocol_version,
        });
    }
    Ok(ready)
}

/// One line read by [`read_bounded_line`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedLine {
    /// The line without its `\n` (and without a `\r` before it), lossily decoded.
    pub text: String,
    /// Whether bytes past the bound were dropped.
    pub truncated: bool,
}

/// Reads one line of at most [`MAX_LOG_LINE`] bytes; see [`read_bounded_line_with_limit`].
pub async fn read_bounded_line<R>(reader: &mut R) -> std::io::Result<Option<BoundedLine>>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    read_bounded_line_with_limit(reader, MAX_LOG_LINE).await
}

/// Reads one `\n`-terminated line, keeping at most `limit` bytes of it.
///
/// Never buffers more than `limit` bytes of a line (beyond what the reader itself buffers): the
/// rest of a longer line is consumed and dropped, and the line is returned with
/// `truncated: true` — a long line is not an error. Invalid UTF-8 is replaced lossily. A last line
/// without `\n` before EOF is returned as a line; `Ok(None)` means EOF before any byte.
///
/// Cancel safety: bytes of a partially read line are lost if the future is dropped.
pub async fn read_bounded_line_with_limit<R>(
    reader: &mut R,
    limit: usize,
) -> std::io::Result<Option<BoundedLine>>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    let mut kept: Vec<u8> = Vec::new();
    let mut truncated = false;
    let mut saw_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // EOF.
            if !saw_any {
                return Ok(None);
            }
            break;
        }
        saw_any = true;
        let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        let room = limit.saturating_sub(kept.len());
        if chunk.len() > room {
            truncated = true;
        }
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            break;
        }
    }
    if kept.last() == Some(&b'\r') {
        kept.pop();
    }
    Ok(Some(BoundedLine {
        text: String::from_utf8_lossy(&kept).into_owned(),
        truncated,
    }))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn ready_line_is_one_line_that_parses_back() {
        let line = ready_line();
        assert!(line.starts_with("UVM-AGENT READY v1 "), "{line:?}");
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let parsed = parse_ready_line(line.as_bytes()).expect("our own line parses");
        assert_eq!(parsed.protocol_version, PROTOCOL_VERSION);
        assert!(parsed.is_compatible());
        assert_eq!(parsed.agent_version(), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(parsed.agent_port(), Some(AGENT_VSOCK_PORT));
    }

    #[test]
    fn extra_fields_are_sanitized_and_kept() {
        let line = ready_line_with(&[("boot ms", "12 34"), ("k", "a=b")]);
        let parsed = parse_ready_line(line.as_bytes()).expect("parses");
        assert_eq!(
            parsed.fields.get("boot_ms").map(String::as_str),
            Some("12_34")
        );
        assert_eq!(parsed.fields.get("k").map(String::as_str), Some("a_b"));
    }

    #[test]
    fn bare_ready_line_and_crlf_parse() {
        let parsed = parse_ready_line(b"UVM-AGENT READY v1\r\n").expect("parses");
        assert_eq!(parsed.protocol_version, 1);
        assert!(parsed.fields.is_empty());
        let parsed = parse_ready_line(b"UVM-AGENT READY v7 flag x=1").expect("parses");
        assert_eq!(parsed.protocol_version, 7);
        assert!(!parsed.is_compatible());
        assert_eq!(parsed.fields.get("flag").map(String::as_str), Some(""));
        assert_eq!(parsed.fields.get("x").map(String::as_str), Some("1"));
    }

    #[test]
    fn wrong_lines_are_rejected_with_the_exact_reason() {
        assert!(matches!(
            parse_ready_line(b"hello\n"),
            Err(AnnounceError::NotReadyLine)
        ));
        assert!(matches!(
            parse_ready_line(b"UVM-AGENT READYv1\n"),
            Err(AnnounceError::NotReadyLine)
        ));
        assert!(matches!(
            parse_ready_line(b"UVM-AGENT READY\n"),
            Err(AnnounceError::BadVersion { token }) if token.is_empty()
        ));
        assert!(matches!(
            parse_ready_line(b"UVM-AGENT READY 1\n"),
            Err(AnnounceError::BadVersion { token }) if token == "1"
        ));
        assert!(matches!(
            parse_ready_line(b"UVM-AGENT READY v1 \xff\n"),
            Err(AnnounceError::NotUtf8)
        ));
        let long = [b'x'; MAX_LOG_LINE + 1];
        assert!(matches!(
            parse_ready_line(&long),
            Err(AnnounceError::TooLong { len }) if len == MAX_LOG_LINE + 1
        ));
    }

    /// [`read_ready_line`] on `input`, and what it left unread.
    fn ready_of(input: &[u8]) -> (Result<ReadyLine, ReadyError>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut reader = tokio::io::BufReader::with_capacity(3, input);
            let ready = read_ready_line(&mut reader).await;
            let mut rest = Vec::new();
            reader
                .read_to_end(&mut rest)
                .await
                .expect("reading a slice cannot fail");
            (ready, rest)
        })
    }

    #[test]
    fn the_ready_line_is_read_and_the_log_lines_stay_in_the_stream() {
        let input = format!("{}log one\n", ready_line());
        let (ready, rest) = ready_of(input.as_bytes());
        let ready = ready.expect("our own ready line");
        assert_eq!(ready.agent_port(), Some(AGENT_VSOCK_PORT));
        assert_eq!(rest, b"log one\n");
    }

    #[test]
    fn a_missing_or_unacceptable_ready_line_says_why() {
        assert!(matches!(ready_of(b"").0, Err(ReadyError::Ended)));
        assert!(matches!(
            ready_of(b"UVM-AGENT READY v1").0,
            Err(ReadyError::EndedInside)
        ));
        assert!(matches!(
            ready_of(b"hello\n").0,
            Err(ReadyError::Malformed(AnnounceError::NotReadyLine))
        ));
        let (ready, rest) = ready_of(b"UVM-AGENT READY v7\nlog\n");
        assert!(matches!(ready, Err(ReadyError::Incompatible { agent: 7 })));
        assert_eq!(rest, b"log\n");
        // A line without its `\n` within the bound: no more than the bound and one byte is read.
        let long = vec![b'x'; MAX_LOG_LINE * 2];
        let (ready, rest) = ready_of(&long);
        assert!(matches!(ready, Err(ReadyError::TooLong)));
        assert_eq!(rest.len(), MAX_LOG_LINE - 1);
        // Exactly at the bound is still a line.
        let mut at_bound = b"UVM-AGENT READY v1 pad=".to_vec();
        at_bound.resize(MAX_LOG_LINE, b'p');
        at_bound.push(b'\n');
        assert!(ready_of(&at_bound).0.is_ok());
    }

    fn lines_of(input: &[u8], limit: usize) -> Vec<BoundedLine> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // A tiny buffer forces lines to span several fill_buf calls.
            let mut reader = tokio::io::BufReader::with_capacity(3, input);
            let mut out = Vec::new();
            while let Some(line) = read_bounded_line_with_limit(&mut reader, limit)
                .await
                .expect("reading a slice cannot fail")
            {
                out.push(line);
            }
            out
        })
    }

    fn line(text: &str, truncated: bool) -> BoundedLine {
        BoundedLine {
            text: text.to_owned(),
            truncated,
        }
    }

    #[test]
    fn bounded_reader_splits_lines_and_keeps_a_final_partial_line() {
        assert_eq!(
            lines_of(b"one\ntwo\r\n\nlast", 100),
            vec![
                line("one", false),
                line("two", false),
                line("", false),
                line("last", false)
            ]
        );
        assert!(lines_of(b"", 100).is_empty());
    }

    #[test]
    fn bounded_reader_truncates_long_lines_and_resyncs() {
        assert_eq!(
            lines_of(b"0123456789\nab\n0123456789", 4),
            vec![line("0123", true), line("ab", false), line("0123", true)]
        );
        // Exactly at the bound is not truncated.
        assert_eq!(lines_of(b"0123\n", 4), vec![line("0123", false)]);
    }

    #[test]
    fn bounded_reader_replaces_invalid_utf8() {
        assert_eq!(lines_of(b"a\xffb\n", 100), vec![line("a\u{fffd}b", false)]);
    }

    #[test]
    fn bounded_reader_uses_max_log_line_by_default() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut input = vec![b'y'; MAX_LOG_LINE * 3];
        input.push(b'\n');
        let got = rt.block_on(async {
            let mut reader = tokio::io::BufReader::new(input.as_slice());
            read_bounded_line(&mut reader).await.expect("slice")
        });
        let got = got.expect("one line");
        assert_eq!(got.text.len(), MAX_LOG_LINE);
        assert!(got.truncated);
    }
}
