//! `dlq list` and `dlq replay`: the dead-letter topic from the command line.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::output;
use crate::config::KafkaConfig;
use crate::dead_letter::{DeadLetterEntry, default_topic, read_all};
use crate::producer::Producer;
use crate::store::Store;

#[derive(Debug, Args)]
pub(super) struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    /// The topic whose dead letters to read.
    #[arg(long, env = "KSER_TOPIC", default_value = "kser", global = true)]
    topic: String,
    /// The dead-letter topic itself (default: <topic>.dlq).
    #[arg(long, env = "KSER_DLQ_TOPIC", global = true)]
    dlq_topic: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Show the dead letters: where each came from, why, and its bytes.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the topic they came from, after a fix.
    /// Their FAILED tasks become PENDING again, so they run.
    Replay {
        /// Which: message uuids, or PARTITION:OFFSET in the dead-letter topic.
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
    let entries = read_all(kafka, &dlq_topic).await?;
    match args.command {
        DlqCommand::List { json } => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                outln!("{}", output::dead_letter_table(&entries));
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
                    let found = entries.iter().rev().find(|e| {
                        e.uuid.as_deref() == Some(id.as_str())
                            || format!("{}:{}", e.dlq_partition, e.dlq_offset) == *id
                    });
                    match found {
                        Some(entry) => chosen.push(entry),
                        None => bail!("no dead letter {id} in topic '{dlq_topic}'"),
                    }
                }
                chosen
            };
            if let Some(store) = store {
                let uuids: Vec<String> = chosen.iter().filter_map(|e| e.uuid.clone()).collect();
                store.reset_for_replay(&uuids).await?;
            }
            let producer = Producer::new(kafka)?;
            for entry in &chosen {
                let topic = entry.topic.as_deref().unwrap_or(&args.topic);
                producer
                    .send_raw(
                        topic,
                        entry.raw_key.as_deref(),
                        entry.raw_payload.as_deref(),
                    )
                    .await?;
            }
            outln!("replayed {} dead letters", chosen.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}
