//! `send --batch`: newline-delimited messages from a file or standard input,
//! read with every line and the whole input capped, recorded and sent a
//! chunk at a time, each line's failure reported with its line number.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use tokio::io::BufReader;
use tokio_util::sync::CancellationToken;

use crate::message::{JsonObject, Message, TaskResult};
use crate::publish::{Outgoing, Target, publish};

/// A UTF-8 byte-order mark, accepted at the start of a file.
pub(super) const BOM: char = '\u{feff}';
/// The most bytes a `--params-file` may hold unless `--max-input-bytes`
/// says otherwise; also the longest line of a batch. Kafka takes 1 MB
/// records by default: a message this large is already far too large.
pub(super) const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 << 20;

/// Messages recorded and sent together in batch mode.
const CHUNK: usize = 1000;
/// How long a chunk waits for more lines once it has one.
const CHUNK_WAIT: Duration = Duration::from_millis(50);
/// One line of `--batch` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    #[serde(default)]
    uuid: Option<String>,
    entrypoint: String,
    #[serde(default)]
    params: JsonObject,
    #[serde(default)]
    metadata: JsonObject,
    #[serde(default)]
    result: Option<TaskResult>,
    #[serde(default)]
    key: Option<String>,
}

/// Refuses a `--batch` file larger than `cap` before anything is sent.
/// Standard input and pipes have no size yet: they are counted as read.
pub(super) fn check_batch_size(source: &str, cap: u64) -> anyhow::Result<()> {
    if source == "-" {
        return Ok(());
    }
    let metadata = std::fs::metadata(source).with_context(|| format!("opening {source}"))?;
    if metadata.is_file() && metadata.len() > cap {
        bail!(
            "--batch {source} is {} bytes, more than the {cap} bytes allowed (--max-input-bytes): nothing sent",
            metadata.len()
        );
    }
    Ok(())
}

/// A line of `--batch` input, as [`CappedLines`] reads it.
enum Line {
    Text(String),
    /// Longer than the longest line allowed: skipped, never held whole.
    TooLong,
    NotUtf8,
}

/// Lines of at most `max_line` bytes, counting the bytes read. Its state
/// lives in the struct, between awaits of a cancel-safe `fill_buf`, so a
/// read abandoned at the chunk deadline loses nothing.
struct CappedLines<R> {
    reader: BufReader<R>,
    line: Vec<u8>,
    too_long: bool,
    max_line: usize,
    /// Bytes read so far.
    read: u64,
}

impl<R: tokio::io::AsyncRead + Unpin> CappedLines<R> {
    async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        use tokio::io::AsyncBufReadExt as _;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if self.line.is_empty() && !self.too_long {
                    return Ok(None);
                }
                return Ok(Some(self.take_line()));
            }
            let (chunk, ends_line) = match available.iter().position(|b| *b == b'\n') {
                Some(end) => (&available[..end], true),
                None => (available, false),
            };
            let used = chunk.len() + usize::from(ends_line);
            if !self.too_long {
                if self.line.len() + chunk.len() > self.max_line {
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.reader.consume(used);
            self.read += used as u64;
            if ends_line {
                return Ok(Some(self.take_line()));
            }
        }
    }

    fn take_line(&mut self) -> Line {
        let mut line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.too_long) {
            return Line::TooLong;
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        match String::from_utf8(line) {
            Ok(text) => Line::Text(text),
            Err(_) => Line::NotUtf8,
        }
    }
}

fn parse_line(line: &str) -> anyhow::Result<Outgoing> {
    let line: BatchLine = serde_json::from_str(line)?;
    if line.entrypoint.trim().is_empty() {
        bail!("entrypoint is empty");
    }
    let mut message = Message::new(line.entrypoint, line.params);
    let explicit_uuid = match line.uuid.filter(|u| !u.trim().is_empty()) {
        Some(uuid) => {
            message.uuid = uuid;
            true
        }
        None => false,
    };
    message.metadata = line.metadata;
    message.result = line.result;
    let key = line.key.filter(|key| !key.is_empty());
    Ok(Outgoing {
        message,
        key,
        explicit_uuid,
    })
}

/// Sends every line of `source` (a file, or `-` for standard input) to
/// `target`, a chunk at a time; the exit code says whether any line failed.
pub(super) async fn send_batch(
    source: &str,
    cap: u64,
    target: &Target<'_>,
) -> anyhow::Result<ExitCode> {
    let (topic, producer) = (target.topic, target.producer);
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if source == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(source)
                .await
                .with_context(|| format!("opening {source}"))?,
        )
    };
    let mut lines = CappedLines {
        reader: BufReader::new(reader),
        line: Vec::new(),
        too_long: false,
        max_line: usize::try_from(DEFAULT_MAX_MESSAGE_BYTES.min(cap)).unwrap_or(usize::MAX),
        read: 0,
    };
    let mut over_cap = false;
    let progress = progress_bar();
    let (mut sent, mut rejected, mut failed) = (0u64, 0u64, 0u64);
    let mut line_number = 0u64;
    // The uuids the input named, with their line: generated ones are unique.
    let mut uuids: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut input_done = false;
    // SIGINT/SIGTERM: stop reading, finish the chunk in hand (its sends are
    // bounded by message.timeout.ms), and say what was sent. A second
    // signal exits at once.
    let interrupted = CancellationToken::new();
    let signals = tokio::spawn(super::signals::forward_signals(interrupted.clone()));
    // Why the rest of the input was left unread, if it was.
    let mut stopped: Option<String> = None;
    while !input_done && !over_cap && stopped.is_none() {
        // A chunk: up to CHUNK lines, or what arrives within CHUNK_WAIT of
        // the first one, so a slow producer of lines still gets sent.
        let mut chunk = Vec::new();
        let mut deadline = None;
        while chunk.len() < CHUNK {
            // Reading lines is cancel-safe: a signal loses no input.
            let next = tokio::select! {
                biased;
                () = interrupted.cancelled() => {
                    stopped = Some("interrupted".to_owned());
                    break;
                }
                next = async {
                    match deadline {
                        None => Some(lines.next_line().await),
                        Some(deadline) => tokio::time::timeout_at(deadline, lines.next_line()).await.ok(),
                    }
                } => next,
            };
            let Some(next) = next else { break };
            let Some(line) = next.context("reading messages")? else {
                input_done = true;
                break;
            };
            line_number += 1;
            if lines.read > cap {
                // Standard input passed the cap: what came before is sent,
                // nothing from this line on.
                over_cap = true;
                break;
            }
            let line = match line {
                Line::Text(line) => line,
                Line::TooLong | Line::NotUtf8 => {
                    rejected += 1;
                    let why = match line {
                        Line::TooLong => {
                            format!("longer than {} bytes", DEFAULT_MAX_MESSAGE_BYTES.min(cap))
                        }
                        _ => "not UTF-8".to_owned(),
                    };
                    progress.suspend(|| eprintln!("line {line_number}: not sent: {why}"));
                    continue;
                }
            };
            // Editors on Windows start UTF-8 files with a byte-order mark.
            let line = match line_number {
                1 => line.strip_prefix(BOM).unwrap_or(&line),
                _ => &line,
            };
            if line.trim().is_empty() {
                continue;
            }
            let parsed = parse_line(line).and_then(|message| {
                // Two lines with one uuid would be one task: the second
                // would never run, yet be printed as sent.
                if message.explicit_uuid {
                    let uuid = &message.message.uuid;
                    if let Some(first) = uuids.get(uuid) {
                        bail!("uuid {uuid} is already used on line {first}");
                    }
                    uuids.insert(uuid.clone(), line_number);
                }
                Ok(message)
            });
            match parsed {
                Ok(message) => {
                    chunk.push(message);
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + CHUNK_WAIT);
                }
                Err(err) => {
                    rejected += 1;
                    let err = crate::report::error_chain(err.as_ref());
                    progress.suspend(|| {
                        eprintln!(
                            "line {line_number}: not sent: {}",
                            super::output::printable(&err)
                        )
                    });
                }
            }
        }
        let attempted = chunk.len();
        let outcome = publish(chunk, target).await;
        // A broker that accepts nothing (gone, or refusing every message)
        // is not waited for chunk after chunk: give up after one.
        if attempted > 0 && outcome.sent.is_empty() && outcome.unreachable {
            stopped.get_or_insert_with(|| {
                format!(
                    "gave up: the broker accepted none of the last {attempted} messages ({})",
                    outcome
                        .failed
                        .first()
                        .map(|(_, err)| err.as_str())
                        .unwrap_or("")
                )
            });
        }
        sent += outcome.sent.len() as u64;
        progress.inc(outcome.sent.len() as u64);
        progress.suspend(|| {
            for uuid in &outcome.sent {
                outln!("{}", super::output::printable(uuid));
            }
        });
        for (uuid, err) in outcome.failed {
            failed += 1;
            progress.suspend(|| {
                eprintln!(
                    "{} not sent: {}",
                    super::output::printable(&uuid),
                    super::output::printable(&err)
                )
            });
        }
    }
    signals.abort();
    let _ = producer.flush(Duration::from_secs(10));
    progress.finish_and_clear();
    if let Some(why) = &stopped {
        eprintln!(
            "error: {}: nothing after line {line_number} was read or sent",
            super::output::printable(why)
        );
    }
    if over_cap {
        eprintln!(
            "error: the input passed the {cap} bytes allowed (--max-input-bytes) at line {line_number}: nothing from that line on was sent"
        );
    }
    eprintln!(
        "sent {sent} messages to topic '{topic}'; {rejected} invalid lines, {failed} failed sends"
    );
    Ok(if stopped.as_deref() == Some("interrupted") {
        ExitCode::from(130)
    } else if rejected + failed == 0 && !over_cap && stopped.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A counter on stderr when it is a terminal; nothing otherwise.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} sent {pos} messages ({per_sec})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_take_defaults() {
        let line = parse_line(r#"{"entrypoint":"dice.DiceRoll"}"#).expect("valid");
        assert!(uuid::Uuid::parse_str(&line.message.uuid).is_ok());
        assert_eq!(line.key(), line.message.uuid, "keyed by uuid by default");
        let line = parse_line(r#"{"entrypoint":"e","uuid":"u1","params":{"a":1},"key":"k"}"#)
            .expect("valid");
        assert_eq!(line.message.uuid, "u1");
        assert_eq!(line.message.params["a"], 1);
        assert_eq!(line.key(), "k");
    }

    #[test]
    fn bad_batch_lines_say_why() {
        let err = parse_line(r#"{"params":{}}"#).unwrap_err();
        assert!(err.to_string().contains("entrypoint"), "{err}");
        let err = parse_line(r#"{"entrypoint":"e","parms":{}}"#).unwrap_err();
        assert!(err.to_string().contains("parms"), "{err}");
    }
}
