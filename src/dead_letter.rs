//! Dead letters: records kser could not process, kept in a dead-letter topic
//! (by default `<topic>.dlq`) with their original key and bytes untouched and
//! headers saying where they came from and why they failed.
//!
//! A worker dead-letters every record that is not a kser message and every
//! message whose task ends FAILED (steps of operations excepted: `resume`
//! runs those again). The record's offset moves only once the dead-letter
//! topic has acknowledged it. `kser dlq list` shows them; `kser dlq replay`
//! sends chosen ones back to where they came from.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{ClientRole, KafkaConfig};

/// Header: the topic the record was read from.
pub const HEADER_TOPIC: &str = "kser-dlq-topic";
/// Header: its partition there.
pub const HEADER_PARTITION: &str = "kser-dlq-partition";
/// Header: its offset there.
pub const HEADER_OFFSET: &str = "kser-dlq-offset";
/// Header: its record timestamp (milliseconds since the epoch).
pub const HEADER_TIMESTAMP: &str = "kser-dlq-timestamp";
/// Header: why it failed, as `retval.error.kind` (`invalid_message`, `retryable`...).
pub const HEADER_ERROR_KIND: &str = "kser-dlq-error-kind";
/// Header: the error message.
pub const HEADER_ERROR: &str = "kser-dlq-error";
/// Header: how many attempts were made.
pub const HEADER_ATTEMPTS: &str = "kser-dlq-attempts";
/// Header: the message uuid, when it had one.
pub const HEADER_UUID: &str = "kser-dlq-uuid";

/// The dead-letter topic of `source` unless one is configured.
pub fn default_topic(source: &str) -> String {
    format!("{source}.dlq")
}

/// Errors reading a dead-letter topic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    #[error("could not read dead-letter topic '{topic}': {reason}")]
    Read { topic: String, reason: String },
}

/// One record of a dead-letter topic.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterEntry {
    /// Where it is in the dead-letter topic.
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// Where it came from.
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub timestamp: Option<i64>,
    /// Why.
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub attempts: Option<i32>,
    pub uuid: Option<String>,
    /// The original key and value, as text (lossy for bytes that are not UTF-8).
    pub key: Option<String>,
    pub payload: Option<String>,
    #[serde(skip)]
    pub raw_key: Option<Vec<u8>>,
    #[serde(skip)]
    pub raw_payload: Option<Vec<u8>>,
}

impl DeadLetterEntry {
    fn from_record(record: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let mut headers: HashMap<&str, String> = HashMap::new();
        if let Some(all) = record.headers() {
            for header in all.iter() {
                if let Some(value) = header.value {
                    headers.insert(header.key, String::from_utf8_lossy(value).into_owned());
                }
            }
        }
        let text = |bytes: Option<&[u8]>| bytes.map(|b| String::from_utf8_lossy(b).into_owned());
        Self {
            dlq_partition: record.partition(),
            dlq_offset: record.offset(),
            topic: headers.get(HEADER_TOPIC).cloned(),
            partition: headers.get(HEADER_PARTITION).and_then(|v| v.parse().ok()),
            offset: headers.get(HEADER_OFFSET).and_then(|v| v.parse().ok()),
            timestamp: headers.get(HEADER_TIMESTAMP).and_then(|v| v.parse().ok()),
            error_kind: headers.get(HEADER_ERROR_KIND).cloned(),
            error: headers.get(HEADER_ERROR).cloned(),
            attempts: headers.get(HEADER_ATTEMPTS).and_then(|v| v.parse().ok()),
            uuid: headers.get(HEADER_UUID).cloned(),
            key: text(record.key()),
            payload: text(record.payload()),
            raw_key: record.key().map(<[u8]>::to_vec),
            raw_payload: record.payload().map(<[u8]>::to_vec),
        }
    }
}

/// Every record of a dead-letter topic, oldest first per partition. Reads
/// the partitions directly, without joining a consumer group.
pub async fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Vec<DeadLetterEntry>, DeadLetterError> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_blocking(&kafka, &topic))
        .await
        .map_err(|err| DeadLetterError::Read {
            topic: String::new(),
            reason: err.to_string(),
        })?
}

fn read_blocking(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Vec<DeadLetterEntry>, DeadLetterError> {
    let failed = |reason: String| DeadLetterError::Read {
        topic: topic.to_owned(),
        reason,
    };
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", "kser-dlq-reader"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ],
        )
        .create()
        .map_err(|err| failed(err.to_string()))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| failed(err.to_string()))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, timeout)
            .map_err(|err| failed(err.to_string()))?;
        if high > low {
            ends.insert(*partition, high);
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(low))
                .map_err(|err| failed(err.to_string()))?;
        }
    }
    let mut entries = Vec::new();
    if ends.is_empty() {
        return Ok(entries);
    }
    consumer
        .assign(&assignment)
        .map_err(|err| failed(err.to_string()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(failed("timed out reading to the end".into()));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(record)) => {
                let partition = record.partition();
                if ends
                    .get(&partition)
                    .is_some_and(|end| record.offset() < *end)
                {
                    entries.push(DeadLetterEntry::from_record(&record));
                }
                if ends
                    .get(&partition)
                    .is_some_and(|end| record.offset() + 1 >= *end)
                {
                    ends.remove(&partition);
                }
            }
            Some(Err(err)) => return Err(failed(err.to_string())),
            None => {}
        }
    }
    Ok(entries)
}
