//! Sending dead letters back to the topics they came from, for `dlq replay`
//! and the web console: their FAILED tasks made PENDING again first, and put
//! back as they were when a message cannot be sent.

use anyhow::{Context as _, bail};

use crate::config::KafkaConfig;
use crate::dead_letter::{DeadLetterEntry, DeadLetterStream, stream};
use crate::producer::Producer;
use crate::report::printable;
use crate::store::Store;

/// librdkafka's default `message.max.bytes`: a replay producer allows more
/// only for originals that need it.
const DEFAULT_MESSAGE_MAX_BYTES: i64 = 1_000_000;
/// Room for the record's overhead on top of its key and value.
const RECORD_OVERHEAD: i64 = 64 * 1024;
/// librdkafka's largest `message.max.bytes`.
const LARGEST_MESSAGE_MAX_BYTES: i64 = 1_000_000_000;

/// Replays the dead letters named by `ids` (uuids, PARTITION:OFFSET or
/// pg:ID), the latest of each; any id not found refuses them all, with
/// nothing sent.
pub(crate) async fn replay_named(
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
            None => bail!("no dead letter {} in topic '{dlq_topic}'", printable(id)),
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
    let mut replayer = Replayer::new(kafka, Some(store), default_topic);
    replay_named(&mut entries, dlq_topic, ids, &mut replayer).await?;
    Ok(replayer.replayed)
}

/// Sends dead letters back, a page at a time.
pub(crate) struct Replayer<'a> {
    kafka: &'a KafkaConfig,
    store: Option<&'a Store>,
    /// Where a dead letter without a source topic header goes.
    default_topic: &'a str,
    /// The producer, and the `message.max.bytes` it was built with.
    producer: Option<(Producer, i64)>,
    /// How many were sent back.
    pub(crate) replayed: usize,
}

impl<'a> Replayer<'a> {
    /// A replayer sending to the topics the dead letters came from
    /// (`default_topic` for those that do not say).
    pub(crate) fn new(
        kafka: &'a KafkaConfig,
        store: Option<&'a Store>,
        default_topic: &'a str,
    ) -> Self {
        Self {
            kafka,
            store,
            default_topic,
            producer: None,
            replayed: 0,
        }
    }

    /// Makes the tasks of `chosen` PENDING again, then sends each back to
    /// the topic it came from. (PENDING first: a worker quick to receive a
    /// replayed record must find its task runnable.) If a message cannot be
    /// sent, the rows of it and of those after it are put back as they
    /// were: a replay changes no row whose message did not go out.
    pub(crate) async fn replay(&mut self, chosen: &[DeadLetterEntry]) -> anyhow::Result<()> {
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
