//! `dlq list` and `dlq replay`: the dead-letter topic from the command line,
//! with the dead letters whose original is kept in Postgres
//! (`kser.dead_letters`) because the topic refused it.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::output;
use crate::config::KafkaConfig;
use crate::dead_letter::{
    DeadLetterEntry, DeadLetterStream, PAGE, PAGE_BYTES, default_topic, stream,
};
use crate::producer::Producer;
use crate::store::Store;

/// librdkafka's default `message.max.bytes`: a replay producer allows more
/// only for originals that need it.
const DEFAULT_MESSAGE_MAX_BYTES: i64 = 1_000_000;
/// Room for the record's overhead on top of its key and value.
const RECORD_OVERHEAD: i64 = 64 * 1024;
/// librdkafka's largest `message.max.bytes`.
const LARGEST_MESSAGE_MAX_BYTES: i64 = 1_000_000_000;

#[derive(Debug, Args)]
pub(super) struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    /// The topic whose dead letters to read.
    #[arg(long, env = "KSER_TOPIC", default_value = "kser", global = true, value_parser = super::values::topic)]
    topic: String,
    /// The dead-letter topic itself (default: <topic>.dlq).
    #[arg(long, env = "KSER_DLQ_TOPIC", global = true, value_parser = super::values::topic)]
    dlq_topic: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Show the dead letters: where each came from, why, and its bytes (or,
    /// for one the dead-letter topic refused, where in Postgres it is kept).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the topic they came from, after a fix.
    /// Their FAILED tasks become PENDING again, so they run.
    Replay {
        /// Which: message uuids, PARTITION:OFFSET in the dead-letter topic, or
        /// pg:ID for one kept in Postgres only.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// All of them.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

pub(super) async fn run(
    args: DlqArgs,
    kafka: &KafkaConfig,
    store: Option<&Store>,
) -> anyhow::Result<ExitCode> {
    let dlq_topic = args
        .dlq_topic
        .clone()
        .unwrap_or_else(|| default_topic(&args.topic));
    // Read a page at a time: a dead-letter topic can hold far more than
    // fits in memory.
    let mut entries = stream(kafka, &dlq_topic, store);
    match args.command {
        DlqCommand::List { json } => {
            if json {
                list_json(&mut entries).await?;
            } else {
                list_tables(&mut entries).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { ids, all } => {
            let mut replayer = Replayer {
                kafka,
                store,
                default_topic: &args.topic,
                producer: None,
                replayed: 0,
            };
            if all {
                let mut page = Vec::with_capacity(PAGE);
                let mut bytes = 0;
                loop {
                    let next = entries.next().await?;
                    let done = next.is_none();
                    if let Some(entry) = next {
                        bytes += entry.held_bytes();
                        page.push(entry);
                    }
                    if page.len() >= PAGE || bytes >= PAGE_BYTES || (done && !page.is_empty()) {
                        replayer.replay(&page).await?;
                        page.clear();
                        bytes = 0;
                    }
                    if done {
                        break;
                    }
                }
            } else {
                replay_named(&mut entries, &dlq_topic, &ids, &mut replayer).await?;
            }
            outln!("replayed {} dead letters", replayer.replayed);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Replays the dead letters named by `ids` (uuids, PARTITION:OFFSET or
/// pg:ID), the latest of each; any id not found refuses them all, with
/// nothing sent.
async fn replay_named(
    entries: &mut DeadLetterStream,
    dlq_topic: &str,
    ids: &[String],
    replayer: &mut Replayer<'_>,
) -> anyhow::Result<()> {
    // The latest dead letter of each id: a uuid may have failed before.
    // Only the chosen ones are kept while reading.
    let mut latest: Vec<Option<DeadLetterEntry>> = vec![None; ids.len()];
    while let Some(entry) = entries.next().await? {
        for (id, chosen) in ids.iter().zip(&mut latest) {
            if entry.is_named(id) {
                *chosen = Some(entry.clone());
            }
        }
    }
    let mut chosen = Vec::with_capacity(ids.len());
    for (id, entry) in ids.iter().zip(latest) {
        match entry {
            Some(entry) => chosen.push(entry),
            None => bail!(
                "no dead letter {} in topic '{dlq_topic}'",
                output::printable(id)
            ),
        }
    }
    replayer.replay(&chosen).await
}

/// What the console's replay does: sends the dead letters named by `ids`
/// from `dlq_topic` back to their topics (`default_topic` for those that do
/// not say), their FAILED tasks made PENDING again. Returns how many.
pub(crate) async fn replay_ids(
    kafka: &KafkaConfig,
    store: &Store,
    dlq_topic: &str,
    default_topic: &str,
    ids: &[String],
) -> anyhow::Result<usize> {
    let mut entries = stream(kafka, dlq_topic, Some(store));
    let mut replayer = Replayer {
        kafka,
        store: Some(store),
        default_topic,
        producer: None,
        replayed: 0,
    };
    replay_named(&mut entries, dlq_topic, ids, &mut replayer).await?;
    Ok(replayer.replayed)
}

/// `dlq list --json`: one JSON array, written as the entries are read.
async fn list_json(entries: &mut DeadLetterStream) -> anyhow::Result<()> {
    // Laid out as `serde_json::to_string_pretty` lays out the whole array.
    let mut previous: Option<String> = None;
    while let Some(entry) = entries.next().await? {
        let indented = serde_json::to_string_pretty(&entry)?.replace('\n', "\n  ");
        match previous.replace(indented) {
            Some(previous) => outln!("  {previous},"),
            None => outln!("["),
        }
    }
    match previous {
        Some(last) => outln!("  {last}\n]"),
        None => outln!("[]"),
    }
    Ok(())
}

/// `dlq list`: the records of the topic in tables of [`PAGE`] rows, as they
/// are read; then those whose original is kept in Postgres (the topic
/// refused them: few, and held without their bytes).
async fn list_tables(entries: &mut DeadLetterStream) -> anyhow::Result<()> {
    let mut page = Vec::with_capacity(PAGE);
    let mut kept = Vec::new();
    let mut in_topic = 0_usize;
    loop {
        let next = entries.next().await?;
        let done = next.is_none();
        if let Some(mut entry) = next {
            if entry.stored.is_some() {
                let mut summary = entry.clone();
                summary.raw_payload = None;
                summary.payload = None;
                summary.raw_key = None;
                kept.push(summary);
            }
            if entry.in_topic() {
                in_topic += 1;
                // The table shows the start of the value only.
                entry.raw_payload = None;
                entry.raw_key = None;
                if let Some(payload) = &mut entry.payload
                    && let Some((cut, _)) = payload.char_indices().nth(200)
                {
                    payload.truncate(cut);
                }
                page.push(entry);
            }
        }
        if page.len() >= PAGE || (done && !page.is_empty()) {
            outln!("{}", output::dead_letter_table(&page));
            page.clear();
        }
        if done {
            break;
        }
    }
    if in_topic == 0 && kept.is_empty() {
        outln!("{}", output::dead_letter_table(&[]));
    }
    if !kept.is_empty() {
        let kept: Vec<&DeadLetterEntry> = kept.iter().collect();
        outln!(
            "\nkept in Postgres (kser.dead_letters): the dead-letter topic refused them\n{}",
            kept_table(&kept)
        );
    }
    Ok(())
}

/// Sends dead letters back, a page at a time.
struct Replayer<'a> {
    kafka: &'a KafkaConfig,
    store: Option<&'a Store>,
    /// Where a dead letter without a source topic header goes.
    default_topic: &'a str,
    /// The producer, and the `message.max.bytes` it was built with.
    producer: Option<(Producer, i64)>,
    replayed: usize,
}

impl Replayer<'_> {
    /// Makes the tasks of `chosen` PENDING again, then sends each back to
    /// the topic it came from. (PENDING first: a worker quick to receive a
    /// replayed record must find its task runnable.) If a message cannot be
    /// sent, the rows of it and of those after it are put back as they
    /// were: a replay changes no row whose message did not go out.
    async fn replay(&mut self, chosen: &[DeadLetterEntry]) -> anyhow::Result<()> {
        let mut reset = Vec::new();
        if let Some(store) = self.store {
            let uuids: Vec<String> = chosen.iter().filter_map(|e| e.uuid.clone()).collect();
            reset = store.reset_for_replay(&uuids).await?;
        }
        let mut sent = std::collections::HashSet::new();
        let outcome = self.send_all(chosen, &mut sent).await;
        if outcome.is_err()
            && let Some(store) = self.store
        {
            let unsent: Vec<_> = reset
                .into_iter()
                .filter(|row| !sent.contains(&row.uuid))
                .collect();
            if let Err(err) = store.restore_after_replay(&unsent).await {
                eprintln!(
                    "warning: could not put back the tasks whose messages were not sent: {}",
                    crate::report::error_chain(&err)
                );
            }
        }
        outcome
    }

    /// Sends `chosen` back, noting the uuids sent.
    async fn send_all(
        &mut self,
        chosen: &[DeadLetterEntry],
        sent: &mut std::collections::HashSet<String>,
    ) -> anyhow::Result<()> {
        let store = self.store;
        let needed = message_max_bytes(chosen);
        if self
            .producer
            .as_ref()
            .is_none_or(|(_, built)| *built < needed)
        {
            if let Some((old, _)) = self.producer.take() {
                let _ = old.flush(std::time::Duration::from_secs(10));
            }
            let producer = Producer::new(&replay_config(self.kafka, needed))?;
            self.producer = Some((producer, needed));
        }
        let Some((producer, _)) = &self.producer else {
            bail!("no producer to replay with");
        };
        for entry in chosen {
            let topic = entry.topic.as_deref().unwrap_or(self.default_topic);
            match entry.stored_id {
                Some(id) => {
                    let store = store.with_context(|| {
                        format!(
                            "the original of dead letter {} is kept in Postgres: set DATABASE_URL",
                            entry.id()
                        )
                    })?;
                    let Some(original) = store.dead_letter_original(id).await? else {
                        bail!("dead letter pg:{id} is no longer in kser.dead_letters");
                    };
                    producer
                        .send_raw(topic, original.key.as_deref(), original.value.as_deref())
                        .await?;
                }
                None => {
                    producer
                        .send_raw(
                            topic,
                            entry.raw_key.as_deref(),
                            entry.raw_payload.as_deref(),
                        )
                        .await?;
                }
            }
            self.replayed += 1;
            if let Some(uuid) = &entry.uuid {
                sent.insert(uuid.clone());
            }
        }
        Ok(())
    }
}

/// The `message.max.bytes` a replay of `chosen` needs: originals kept in
/// Postgres may be larger than a producer allows by default (the source
/// topic took them).
fn message_max_bytes(chosen: &[DeadLetterEntry]) -> i64 {
    chosen
        .iter()
        .filter(|e| e.stored_id.is_some())
        .map(|e| {
            let key = e.raw_key.as_ref().map_or(0, Vec::len) as i64;
            key + e.payload_bytes.unwrap_or(0) + RECORD_OVERHEAD
        })
        .max()
        .unwrap_or(0)
        .clamp(DEFAULT_MESSAGE_MAX_BYTES, LARGEST_MESSAGE_MAX_BYTES)
}

/// The producer settings for a replay, allowing records of `largest` bytes.
fn replay_config(kafka: &KafkaConfig, largest: i64) -> KafkaConfig {
    let mut kafka = kafka.clone();
    if largest > DEFAULT_MESSAGE_MAX_BYTES {
        kafka.set("message.max.bytes", largest.to_string());
    }
    kafka
}

/// `dlq list`: the dead letters whose original is kept in Postgres.
fn kept_table(entries: &[&DeadLetterEntry]) -> String {
    let mut table = output::new_table(&["ID", "AT", "FROM", "UUID", "KIND", "BYTES", "REFUSED"]);
    for entry in entries {
        let from = match (&entry.topic, entry.partition, entry.offset) {
            (Some(topic), Some(partition), Some(offset)) => {
                format!("{topic}[{partition}]@{offset}")
            }
            _ => "-".to_owned(),
        };
        let at = if entry.in_topic() {
            format!("{}:{}", entry.dlq_partition, entry.dlq_offset)
        } else {
            "-".to_owned()
        };
        let refused = entry.producer_error.as_deref().unwrap_or_default();
        let refused = refused
            .strip_prefix("Message production error: ")
            .unwrap_or(refused);
        output::add_row(
            &mut table,
            vec![
                entry
                    .stored_id
                    .map(|id| format!("pg:{id}"))
                    .unwrap_or_default(),
                at,
                from,
                entry.uuid.clone().unwrap_or_else(|| "-".into()),
                entry.error_kind.clone().unwrap_or_default(),
                entry
                    .payload_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_default(),
                refused.chars().take(60).collect(),
            ],
        );
    }
    table.to_string()
}
