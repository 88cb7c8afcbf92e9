//! `send`: publish one message, or many newline-delimited ones with `--batch`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::batch::{BOM, DEFAULT_MAX_MESSAGE_BYTES, check_batch_size, send_batch};
use crate::admin::{self, TopicLayout};
use crate::config::KafkaConfig;
use crate::message::{JsonObject, Message};
use crate::producer::Producer;
use crate::publish::{Outgoing, Target, publish};
use crate::store::{Store, TaskStatus};
use chrono::{DateTime, Utc};

/// The most bytes a `--batch` input may hold unless `--max-input-bytes`
/// says otherwise.
const DEFAULT_MAX_BATCH_BYTES: u64 = 1 << 30;
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

pub(super) fn parse_object(text: &str) -> anyhow::Result<JsonObject> {
    match serde_json::from_str(text).context("not valid JSON")? {
        serde_json::Value::Object(object) => Ok(object),
        _ => bail!("expected a JSON object, like {{\"sides\": 6}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_must_be_an_object() {
        assert!(parse_object("[1]").is_err());
        assert_eq!(parse_object(r#"{"a":1}"#).expect("an object")["a"], 1);
    }
}
