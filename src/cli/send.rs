//! `send`: publish one message, or many newline-delimited ones with `--batch`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use tokio::io::BufReader;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, TopicLayout};
use crate::config::KafkaConfig;
use crate::message::{JsonObject, Message, TaskResult};
use crate::producer::Producer;
use crate::publish::{Outgoing, Target, publish};
use crate::store::{Store, TaskStatus};
use chrono::{DateTime, Utc};

/// Messages recorded and sent together in batch mode.
const CHUNK: usize = 1000;
/// A UTF-8 byte-order mark, accepted at the start of a file.
const BOM: char = '\u{feff}';
/// How long a chunk waits for more lines once it has one.
const CHUNK_WAIT: Duration = Duration::from_millis(50);
/// The most bytes a `--batch` input may hold unless `--max-input-bytes`
/// says otherwise.
const DEFAULT_MAX_BATCH_BYTES: u64 = 1 << 30;
/// The most bytes a `--params-file` may hold unless `--max-input-bytes`
/// says otherwise; also the longest line of a batch. Kafka takes 1 MB
/// records by default: a message this large is already far too large.
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 << 20;

#[derive(Debug, Args)]
pub(super) struct SendArgs {
    /// The entrypoint to run, e.g. dice.DiceRoll (not with --batch).
    #[arg(required_unless_present = "batch", conflicts_with = "batch", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    entrypoint: Option<String>,
    /// Parameters as a JSON object.
    #[arg(long, conflicts_with = "params_file")]
    params: Option<String>,
    /// Read the parameters (a JSON object) from a file.
    #[arg(long, value_name = "FILE")]
    params_file: Option<PathBuf>,
    /// Metadata as a JSON object, passed through to the task.
    #[arg(long)]
    metadata: Option<String>,
    /// The message uuid (default: a new UUID4). With a database, a uuid
    /// whose task has another entrypoint, params or metadata is refused.
    #[arg(long, conflicts_with = "batch")]
    uuid: Option<String>,
    /// The record key (default: the uuid). Records with one key go to one
    /// partition and run one after the other, in the order sent.
    #[arg(long, conflicts_with = "batch")]
    key: Option<String>,
    /// Topic to publish to.
    #[arg(long, env = "KSER_TOPIC", default_value = "kser", value_parser = super::values::topic)]
    topic: String,
    /// Read newline-delimited JSON messages from FILE ("-" for stdin); each
    /// line is {"entrypoint": ..., "params": {...}} with optional "uuid",
    /// "key", "metadata" and "result". A UTF-8 byte-order mark is skipped; a
    /// uuid used on an earlier line is an error, as is, with a database, a
    /// uuid whose task has other content.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["params", "params_file", "metadata"])]
    batch: Option<String>,
    /// Run later: the message is published after this long (e.g. 30s, 5m;
    /// at most 10 years). It waits in Postgres meanwhile, so DATABASE_URL
    /// is needed, and a running worker publishes it when due.
    #[arg(long, conflicts_with = "at", value_parser = super::values::duration(Duration::ZERO, super::values::FURTHEST))]
    delay: Option<Duration>,
    /// Run at this time (RFC 3339, e.g. 2026-11-24T18:00:00Z; at most 10
    /// years ahead); like --delay.
    #[arg(long, value_parser = super::values::time)]
    at: Option<DateTime<Utc>>,
    /// Partitions of the topic if it has to be created (1 to 100000).
    #[arg(long, default_value = "6", value_parser = super::values::count::<i32>(1, 100_000))]
    partitions: i32,
    /// Encrypt the messages as Python kser-crypto does, with the key in
    /// KSER_SECRETBOX_KEY (the base64 of 32 bytes); workers need the same
    /// key. Without it, messages go in plain JSON.
    #[arg(long)]
    pub(super) encrypt: bool,
    /// Refuse input larger than this, with nothing sent (e.g. 64MiB): a
    /// --batch file (default 1GiB; standard input is counted as it is read
    /// and reading stops at the line that passes it) or a --params-file
    /// (default 16MiB). A batch line is at most 16MiB whatever the size.
    #[arg(long, value_name = "BYTES", value_parser = super::values::bytes(1, 1 << 40))]
    max_input_bytes: Option<u64>,
    /// Wait for the task or operation to end and print its result (needs
    /// DATABASE_URL). Exit code 0 on SUCCESS, 1 on FAILED or CANCELLED, 2
    /// when --timeout passes first (the work goes on).
    #[arg(long, conflicts_with_all = ["batch", "delay", "at"])]
    wait: bool,
    /// How long --wait waits (e.g. 15s, 2m; up to 1 day).
    #[arg(long, default_value = "15s", requires = "wait", value_parser = super::values::duration(Duration::ZERO, Duration::from_secs(86_400)))]
    timeout: Duration,
    /// With --wait: print the status object as JSON, as `status --json` does.
    #[arg(long, requires = "wait")]
    json: bool,
}

/// `send --wait`'s exit code when the task or operation FAILED or was
/// CANCELLED.
pub(super) const EXIT_FAILED: u8 = 1;
/// `send --wait`'s exit code when the timeout passed first.
pub(super) const EXIT_TIMEOUT: u8 = 2;

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

pub(super) async fn send(
    args: SendArgs,
    kafka: &KafkaConfig,
    store: Option<&Store>,
) -> anyhow::Result<ExitCode> {
    let layout = TopicLayout {
        partitions: args.partitions,
        ..TopicLayout::default()
    };
    let due = match (args.delay, args.at) {
        (Some(delay), _) => Some(Utc::now() + chrono::Duration::from_std(delay)?),
        (None, at) => at,
    };
    if args.wait && store.is_none() {
        bail!("--wait needs a database (DATABASE_URL): the result is read from there");
    }
    if due.is_some() && store.is_none() {
        bail!("--delay and --at need a database (DATABASE_URL): the message waits there until due");
    }
    // Input over its cap is refused before anything is built or sent.
    let single = match &args.batch {
        Some(source) => {
            check_batch_size(source, batch_cap(&args))?;
            None
        }
        None => Some(single_message(&args)?),
    };
    let producer = Producer::new(kafka)?;
    let producer = if !args.encrypt {
        producer.without_secretbox()
    } else if producer.secretbox().is_some() {
        producer
    } else {
        bail!(
            "--encrypt needs the key in {} (the base64 of 32 bytes)",
            crate::crypto::KEY_VARIABLE
        );
    };
    admin::ensure_topics(kafka, std::slice::from_ref(&args.topic), layout).await?;
    let target = Target {
        topic: &args.topic,
        producer: &producer,
        store,
        due,
    };
    match (&args.batch, single) {
        (Some(source), _) => send_batch(source, batch_cap(&args), &target).await,
        (None, None) => bail!("nothing to send"),
        (None, Some(message)) => {
            let uuid = message.uuid.clone();
            let key = args.key.clone().filter(|key| !key.is_empty());
            let outcome = publish(
                vec![Outgoing {
                    message,
                    key,
                    explicit_uuid: true,
                }],
                &target,
            )
            .await;
            if let Some((_, err)) = outcome.failed.into_iter().next() {
                bail!("message {uuid} not sent: {err}");
            }
            match store.filter(|_| args.wait) {
                Some(store) => wait_and_print(store, &uuid, args.timeout, args.json).await,
                None => {
                    outln!("{}", super::output::printable(&uuid));
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

/// `send --wait`: waits for `uuid` to end, prints its result and says how
/// it ended in the exit code.
async fn wait_and_print(
    store: &Store,
    uuid: &str,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use crate::status::{Waited, wait};
    let print = |status: &crate::status::Status| -> anyhow::Result<()> {
        if json {
            outln!("{}", serde_json::to_string_pretty(&status.to_json())?);
        } else {
            outln!("{}", super::output::details(status).trim_end());
        }
        Ok(())
    };
    match wait(store, uuid, timeout).await? {
        Waited::Ended(status) => {
            print(&status)?;
            Ok(match status.outcome() {
                Some(TaskStatus::Success) => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_FAILED),
            })
        }
        Waited::TimedOut(last) => {
            match &last {
                Some(status) => print(status)?,
                None if json => outln!(
                    "{}",
                    serde_json::json!({"uuid": uuid, "status": TaskStatus::Pending.as_str()})
                ),
                None => outln!("{}", super::output::printable(uuid)),
            }
            eprintln!(
                "error: {} did not end within {}; it goes on (see `status {}`)",
                super::output::printable(uuid),
                humantime::format_duration(timeout),
                super::output::printable(uuid)
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
    }
}

fn single_message(args: &SendArgs) -> anyhow::Result<Message> {
    let entrypoint = args
        .entrypoint
        .clone()
        .context("an entrypoint is required")?;
    let params = match (&args.params, &args.params_file) {
        (Some(text), _) => parse_object(text).context("--params")?,
        (None, Some(path)) => {
            let text = read_params_file(
                path,
                args.max_input_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            )?;
            let text = text.strip_prefix(BOM).unwrap_or(&text);
            parse_object(text).with_context(|| format!("--params-file {}", path.display()))?
        }
        (None, None) => JsonObject::new(),
    };
    let mut message = Message::new(entrypoint, params);
    if let Some(metadata) = &args.metadata {
        message.metadata = parse_object(metadata).context("--metadata")?;
    }
    if let Some(uuid) = &args.uuid {
        if uuid.trim().is_empty() {
            bail!("--uuid must not be empty");
        }
        message.uuid.clone_from(uuid);
    }
    Ok(message)
}

/// The most bytes a `--batch` input may hold.
fn batch_cap(args: &SendArgs) -> u64 {
    args.max_input_bytes.unwrap_or(DEFAULT_MAX_BATCH_BYTES)
}

/// Refuses a `--batch` file larger than `cap` before anything is sent.
/// Standard input and pipes have no size yet: they are counted as read.
fn check_batch_size(source: &str, cap: u64) -> anyhow::Result<()> {
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

/// Reads a `--params-file` of at most `cap` bytes: a larger one (or a pipe
/// that goes on) is refused without reading it whole.
fn read_params_file(path: &std::path::Path, cap: u64) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > cap {
        bail!(
            "--params-file {} is more than the {cap} bytes allowed (--max-input-bytes): nothing sent",
            path.display()
        );
    }
    String::from_utf8(bytes)
        .with_context(|| format!("--params-file {} is not UTF-8", path.display()))
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

pub(super) fn parse_object(text: &str) -> anyhow::Result<JsonObject> {
    match serde_json::from_str(text).context("not valid JSON")? {
        serde_json::Value::Object(object) => Ok(object),
        _ => bail!("expected a JSON object, like {{\"sides\": 6}}"),
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

async fn send_batch(source: &str, cap: u64, target: &Target<'_>) -> anyhow::Result<ExitCode> {
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
    let signals = tokio::spawn(super::forward_signals(interrupted.clone()));
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
        assert!(parse_object("[1]").is_err());
    }
}
