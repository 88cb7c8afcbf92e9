//! `dlq list` and `dlq replay`: the dead-letter topic from the command line,
//! with the dead letters whose original is kept in Postgres
//! (`kser.dead_letters`) because the topic refused it.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::output;
use crate::config::KafkaConfig;
use crate::dead_letter::{DeadLetterEntry, default_topic, list};
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
    let entries = list(kafka, &dlq_topic, store).await?;
    match args.command {
        DlqCommand::List { json } => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(ExitCode::SUCCESS);
            }
            let (in_topic, kept_only): (Vec<&DeadLetterEntry>, Vec<&DeadLetterEntry>) =
                entries.iter().partition(|e| e.in_topic());
            if !in_topic.is_empty() || kept_only.is_empty() {
                let in_topic: Vec<DeadLetterEntry> = in_topic.into_iter().cloned().collect();
                outln!("{}", output::dead_letter_table(&in_topic));
            }
            let kept: Vec<&DeadLetterEntry> =
                entries.iter().filter(|e| e.stored.is_some()).collect();
            if !kept.is_empty() {
                outln!(
                    "\nkept in Postgres (kser.dead_letters): the dead-letter topic refused them\n{}",
                    kept_table(&kept)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { ids, all } => {
            let chosen: Vec<&DeadLetterEntry> = if all {
                entries.iter().collect()
            } else {
                let mut chosen = Vec::new();
                for id in &ids {
                    // The latest dead letter of a uuid: it may have failed before.
                    let found = entries.iter().rev().find(|e| e.is_named(id));
                    match found {
                        Some(entry) => chosen.push(entry),
                        None => bail!(
                            "no dead letter {} in topic '{dlq_topic}'",
                            output::printable(id)
                        ),
                    }
                }
                chosen
            };
            if let Some(store) = store {
                let uuids: Vec<String> = chosen.iter().filter_map(|e| e.uuid.clone()).collect();
                store.reset_for_replay(&uuids).await?;
            }
            let producer = Producer::new(&replay_config(kafka, &chosen))?;
            for entry in &chosen {
                let topic = entry.topic.as_deref().unwrap_or(&args.topic);
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
            }
            outln!("replayed {} dead letters", chosen.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The producer settings for a replay: originals kept in Postgres may be
/// larger than a producer allows by default (the source topic took them), so
/// `message.max.bytes` grows to fit the largest chosen one.
fn replay_config(kafka: &KafkaConfig, chosen: &[&DeadLetterEntry]) -> KafkaConfig {
    let mut kafka = kafka.clone();
    let largest = chosen
        .iter()
        .filter(|e| e.stored_id.is_some())
        .map(|e| {
            let key = e.raw_key.as_ref().map_or(0, Vec::len) as i64;
            key + e.payload_bytes.unwrap_or(0) + RECORD_OVERHEAD
        })
        .max()
        .unwrap_or(0);
    if largest > DEFAULT_MESSAGE_MAX_BYTES {
        kafka.set(
            "message.max.bytes",
            largest.min(LARGEST_MESSAGE_MAX_BYTES).to_string(),
        );
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
