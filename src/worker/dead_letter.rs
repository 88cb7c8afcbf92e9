//! Writing dead letters from the worker: the original record, with headers
//! saying where it came from and why, acknowledged before its offset moves.

use std::sync::Arc;
use std::time::Duration;

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

    /// Publishes dead letters and waits for the broker's acknowledgement,
    /// retrying until every one is written: their offsets must not move
    /// before. `false` when the shutdown deadline passed first.
    pub(super) async fn dead_letter(&self, letters: &[DeadLetter]) -> bool {
        let mut pending: Vec<&DeadLetter> = letters.iter().collect();
        let mut delay = Duration::from_millis(200);
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
                return true;
            }
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
