//! Writing dead letters from the worker: the original record, with headers
//! saying where it came from and why, acknowledged before its offset moves.
//!
//! A dead letter the dead-letter topic refuses for good (too large for it,
//! an invalid record, no right to write there: see
//! [`refused_for_good`](crate::dead_letter::refused_for_good)) is kept in
//! Postgres instead, byte for byte, and the topic gets a small record without
//! payload that points at the row. Only errors that can pass (a broker away,
//! a timeout) hold the partition.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::offsets::Position;
use super::pipeline::Original;
use super::settings::DeadLetters;
use super::shared::Shared;
use crate::dead_letter::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_PRODUCER_ERROR, HEADER_STORED, HEADER_STORED_ID, HEADER_TIMESTAMP, HEADER_TOPIC,
    HEADER_UUID, STORED_IN_POSTGRES, default_topic, refused_for_good,
};
use crate::producer::ProducerError;
use crate::store::NewDeadLetter;

/// A record to dead-letter.
pub(super) struct DeadLetter {
    pub(super) position: Position,
    pub(super) original: Arc<Original>,
    pub(super) kind: &'static str,
    pub(super) error: String,
    pub(super) attempts: i32,
    pub(super) uuid: Option<String>,
    /// The span of the task that failed, if it was traced: the dead letter
    /// carries it as its `traceparent` header.
    pub(super) trace: Option<crate::trace::TraceParent>,
}

/// A dead letter on its way to `topic`: the original record, or, once the
/// topic refused that for good, the small record pointing at its row in
/// `kser.dead_letters`.
struct Delivery<'a> {
    letter: &'a DeadLetter,
    topic: String,
    kept: Option<Kept>,
}

/// Where the original of a refused dead letter is kept.
struct Kept {
    id: i64,
    producer_error: String,
}

impl Shared {
    /// Where dead letters of `source` go, or `None` when they are disabled.
    pub(super) fn dead_letter_topic(&self, source: &str) -> Option<String> {
        match &self.dead_letters {
            DeadLetters::Disabled => None,
            DeadLetters::Suffix => Some(default_topic(source)),
            DeadLetters::Topic(topic) => Some(topic.clone()),
        }
    }

    /// Dead-letters records in the background and releases their offsets
    /// once the dead-letter topic has them. The rest of the pipeline goes on;
    /// only these records' offsets (and so their partitions' commits) wait.
    pub(super) fn dead_letter_later(self: &Arc<Self>, letters: Vec<DeadLetter>) {
        if letters.is_empty() {
            return;
        }
        for letter in &letters {
            super::telemetry::dead_lettered(letter.kind);
        }
        let shared = Arc::clone(self);
        self.dead_letter_tasks.spawn(async move {
            if shared.dead_letter(&letters).await {
                let positions: Vec<Position> = letters.into_iter().map(|l| l.position).collect();
                shared.release(&positions);
            }
        });
    }

    /// Publishes dead letters and waits for the broker's acknowledgement:
    /// their offsets must not move before. A send that failed for a reason
    /// that can pass is retried, its partition paused meanwhile; one the
    /// topic refused for good is kept in Postgres and replaced by a small
    /// record pointing at the row, and if the topic refuses that too, the row
    /// is enough. `false` when the shutdown deadline passed first.
    async fn dead_letter(&self, letters: &[DeadLetter]) -> bool {
        let mut pending: Vec<Delivery<'_>> = letters
            .iter()
            .filter_map(|letter| {
                let topic = self.dead_letter_topic(&letter.position.topic)?;
                Some(Delivery {
                    letter,
                    topic,
                    kept: None,
                })
            })
            .collect();
        let mut delay = Duration::from_millis(200);
        let mut paused = rdkafka::TopicPartitionList::new();
        while !pending.is_empty() {
            let sends = pending.into_iter().map(|delivery| async move {
                let sent = self.send_dead_letter(&delivery).await;
                (delivery, sent)
            });
            let outcomes = futures::future::join_all(sends).await;
            let mut waiting = Vec::new();
            let mut refused = Vec::new();
            for (delivery, sent) in outcomes {
                let letter = delivery.letter;
                let (topic, partition, offset) = (
                    &letter.position.topic,
                    letter.position.partition,
                    letter.position.offset,
                );
                match (sent, &delivery.kept) {
                    (Ok(_), None) => tracing::warn!(
                        topic = %topic, partition, offset, dead_letter_topic = %delivery.topic,
                        error_kind = letter.kind, "dead-lettered"
                    ),
                    (Ok(_), Some(kept)) => tracing::warn!(
                        topic = %topic, partition, offset, dead_letter_topic = %delivery.topic,
                        error_kind = letter.kind, dead_letter_id = kept.id,
                        "dead-lettered; the original is kept in kser.dead_letters"
                    ),
                    (Err(err), None) if refused_for_good(&err) => refused.push((delivery, err)),
                    (Err(err), Some(kept)) if refused_for_good(&err) => tracing::error!(
                        topic = %topic, partition, offset, dead_letter_topic = %delivery.topic,
                        dead_letter_id = kept.id, error = %err,
                        "the dead-letter topic refused even the record pointing at the kept original; \
                         it stays in kser.dead_letters only (kser dlq list shows it)"
                    ),
                    (Err(err), _) => {
                        tracing::warn!(
                            dead_letter_topic = %delivery.topic, error = %err,
                            "could not write a dead letter; its partition holds its offset until it can"
                        );
                        waiting.push(delivery);
                    }
                }
            }
            // Refused for good: kept in Postgres, then pointed at at once.
            let mut next = Vec::new();
            for (mut delivery, err) in refused {
                match self.keep_dead_letter(&delivery, &err).await {
                    None => return false,
                    Some(Some(kept)) => {
                        delivery.kept = Some(kept);
                        next.push(delivery);
                    }
                    Some(None) => {}
                }
            }
            if !waiting.is_empty() {
                // Paused again every round: another dead letter of the same
                // partition may have resumed it meanwhile.
                for delivery in &waiting {
                    let position = &delivery.letter.position;
                    let (topic, partition) = (&position.topic, position.partition);
                    if paused.find_partition(topic, partition).is_none() {
                        paused.add_partition(topic, partition);
                        tracing::warn!(topic = %topic, partition, "pausing the partition until its dead letters can be written");
                    }
                }
                let _ = self.consumer().pause(&paused);
                tokio::select! {
                    () = self.abandon.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            next.append(&mut waiting);
            pending = next;
        }
        if paused.count() > 0 {
            tracing::info!("dead letters written; resuming the paused partitions");
            let _ = self.consumer().resume(&paused);
        }
        true
    }

    /// Sends the original record, or the small record pointing at its row.
    async fn send_dead_letter(&self, delivery: &Delivery<'_>) -> Result<(i32, i64), ProducerError> {
        let mut headers = headers(delivery.letter);
        let original = &delivery.letter.original;
        match &delivery.kept {
            None => {
                self.producer
                    .send_with_headers(
                        &delivery.topic,
                        original.key.as_deref(),
                        original.payload.as_deref(),
                        &headers,
                    )
                    .await
            }
            Some(kept) => {
                headers.extend([
                    (HEADER_STORED, STORED_IN_POSTGRES.to_owned()),
                    (HEADER_STORED_ID, kept.id.to_string()),
                    (HEADER_PRODUCER_ERROR, kept.producer_error.clone()),
                ]);
                self.producer
                    .send_with_headers(&delivery.topic, None, None, &headers)
                    .await
            }
        }
    }

    /// Keeps the original of a dead letter the topic refused in
    /// `kser.dead_letters`, waiting out database outages. `Some(None)` when
    /// Postgres refuses the row itself: logged, and the record is left
    /// behind, since no retry can help. `None` when the shutdown deadline
    /// passed first.
    async fn keep_dead_letter(
        &self,
        delivery: &Delivery<'_>,
        err: &ProducerError,
    ) -> Option<Option<Kept>> {
        let letter = delivery.letter;
        let position = &letter.position;
        // Postgres text cannot hold NUL; the bytes go to bytea columns as they are.
        let clean = |text: &str| text.replace('\0', "");
        // librdkafka's own words; the topic is in `dlq_topic`.
        let producer_error = clean(&match err {
            ProducerError::Send { reason, .. } => reason.clone(),
            other => other.to_string(),
        });
        let row = NewDeadLetter {
            dlq_topic: delivery.topic.clone(),
            topic: clean(&position.topic),
            kafka_partition: position.partition,
            kafka_offset: position.offset,
            kafka_timestamp: letter.original.timestamp,
            error_kind: letter.kind.to_owned(),
            error: clean(&letter.error),
            attempts: letter.attempts,
            uuid: letter.uuid.as_deref().map(clean),
            producer_error: producer_error.clone(),
            key: letter.original.key.clone(),
            value: letter.original.payload.clone(),
        };
        let (topic, partition, offset) = (&position.topic, position.partition, position.offset);
        match self
            .retry_db("keep a refused dead letter", || {
                self.store.keep_dead_letter(&row)
            })
            .await?
        {
            Ok(id) => {
                tracing::warn!(
                    topic = %topic, partition, offset, dead_letter_topic = %delivery.topic,
                    dead_letter_id = id, error = %err,
                    "the dead-letter topic refused the record for good; kept it in kser.dead_letters"
                );
                Some(Some(Kept { id, producer_error }))
            }
            Err(store_err) => {
                tracing::error!(
                    topic = %topic, partition, offset, dead_letter_topic = %delivery.topic,
                    error = %err, store_error = %store_err,
                    "the dead-letter topic refused the record for good and Postgres refused to keep it; \
                     moving on: the record is only in its source topic now"
                );
                Some(None)
            }
        }
    }
}

fn headers(letter: &DeadLetter) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        (HEADER_TOPIC, letter.position.topic.to_string()),
        (HEADER_PARTITION, letter.position.partition.to_string()),
        (HEADER_OFFSET, letter.position.offset.to_string()),
        (HEADER_ERROR_KIND, letter.kind.to_owned()),
        (HEADER_ERROR, letter.error.clone()),
        (HEADER_ATTEMPTS, letter.attempts.to_string()),
    ];
    if let Some(timestamp) = letter.original.timestamp {
        headers.push((HEADER_TIMESTAMP, timestamp.to_string()));
    }
    if let Some(uuid) = &letter.uuid {
        headers.push((HEADER_UUID, uuid.clone()));
    }
    // A record that never ran keeps the trace it came with.
    if let Some(trace) = letter.trace.or(letter.original.trace) {
        headers.push((crate::trace::TRACEPARENT, trace.to_string()));
    }
    headers
}
