//! Writing dead letters from the worker: the original record, with headers
//! saying where it came from and why, acknowledged before its offset moves.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::offsets::Position;
use super::{Original, Shared};
use crate::dead_letter::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_TIMESTAMP, HEADER_TOPIC, HEADER_UUID, default_topic,
};

/// A record to dead-letter.
pub(super) struct DeadLetter {
    pub(super) position: Position,
    pub(super) original: Arc<Original>,
    pub(super) kind: &'static str,
    pub(super) error: String,
    pub(super) attempts: i32,
    pub(super) uuid: Option<String>,
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
        let shared = Arc::clone(self);
        self.dead_letter_tasks.spawn(async move {
            if shared.dead_letter(&letters).await {
                let positions: Vec<Position> = letters.into_iter().map(|l| l.position).collect();
                shared.release(&positions);
            }
        });
    }

    /// Publishes dead letters and waits for the broker's acknowledgement,
    /// retrying until every one is written: their offsets must not move
    /// before. While a dead letter cannot be written its partition is paused.
    /// `false` when the shutdown deadline passed first.
    async fn dead_letter(&self, letters: &[DeadLetter]) -> bool {
        let mut pending: Vec<&DeadLetter> = letters.iter().collect();
        let mut delay = Duration::from_millis(200);
        let mut paused = rdkafka::TopicPartitionList::new();
        loop {
            let sends = pending.iter().copied().filter_map(|letter| {
                let topic = self.dead_letter_topic(&letter.position.topic)?;
                Some(async move {
                    let headers = headers(letter);
                    let original = &letter.original;
                    let sent = self
                        .producer
                        .send_with_headers(
                            &topic,
                            original.key.as_deref(),
                            original.payload.as_deref(),
                            &headers,
                        )
                        .await;
                    (letter, topic, sent)
                })
            });
            let outcomes = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            for (letter, topic, sent) in outcomes {
                match sent {
                    Ok(_) => tracing::warn!(
                        topic = %letter.position.topic, partition = letter.position.partition,
                        offset = letter.position.offset, dead_letter_topic = %topic,
                        error_kind = letter.kind, "dead-lettered"
                    ),
                    Err(err) => {
                        tracing::warn!(dead_letter_topic = %topic, error = %err, "could not write a dead letter; its partition holds its offset until it can");
                        failed.push(letter);
                    }
                }
            }
            if failed.is_empty() {
                if paused.count() > 0 {
                    tracing::info!("dead letters written; resuming the paused partitions");
                    let _ = self.consumer().resume(&paused);
                }
                return true;
            }
            // Paused again every round: another dead letter of the same
            // partition may have resumed it meanwhile.
            for letter in &failed {
                let (topic, partition) = (&letter.position.topic, letter.position.partition);
                if paused.find_partition(topic, partition).is_none() {
                    paused.add_partition(topic, partition);
                    tracing::warn!(topic = %topic, partition, "pausing the partition until its dead letters can be written");
                }
            }
            let _ = self.consumer().pause(&paused);
            pending = failed;
            tokio::select! {
                () = self.abandon.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// Where dead letters go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeadLetters {
    /// Not written anywhere (failures are only in Postgres and the logs).
    Disabled,
    /// `<topic>.dlq` for each consumed topic.
    #[default]
    Suffix,
    /// One topic for all.
    Topic(String),
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
    headers
}
