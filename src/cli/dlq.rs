//! `dlq list` and `dlq replay`: the dead-letter topic from the command line,
//! with the dead letters whose original is kept in Postgres
//! (`kser.dead_letters`) because the topic refused it.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output;
use crate::config::KafkaConfig;
use crate::dead_letter::{
    DeadLetterEntry, DeadLetterStream, PAGE, PAGE_BYTES, default_topic, stream,
};
use crate::replay::{Replayer, replay_named};
use crate::store::Store;

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
            let mut replayer = Replayer::new(kafka, store, &args.topic);
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
