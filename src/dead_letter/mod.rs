//! Dead letters: records kser could not process, kept in a dead-letter topic
//! (by default `<topic>.dlq`) with their original key and bytes untouched and
//! headers saying where they came from and why they failed.
//!
//! A worker dead-letters every record that is not a kser message and every
//! message whose task ends FAILED (steps of operations excepted: `resume`
//! runs those again). The record's offset moves only once the dead-letter
//! topic has acknowledged it, or, when the topic refuses it for good (see
//! `refused_for_good`: too large for it, an invalid record, no right to
//! write there), once the original is kept in Postgres (`kser.dead_letters`)
//! and a small record without payload, pointing at the row, is in the topic.
//! `kser dlq list` shows both kinds; `kser dlq replay` sends chosen ones back
//! to where they came from, byte for byte.
//!
//! Here: the headers, what the broker refuses for good, [`DeadLetterEntry`]
//! (one dead letter as read back). `read.rs`: reading a topic back ([`stream`]).

mod read;

pub use read::{DeadLetterStream, PAGE, PAGE_BYTES, list, read_all, stream, stream_newest};

use std::collections::HashMap;

use rdkafka::Message as _;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Headers;
use serde::{Serialize, Serializer};

use crate::producer::ProducerError;
use crate::store::{StoreError, StoredDeadLetter};

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
/// Header: where the original record is kept when the dead-letter topic
/// refused it ([`STORED_IN_POSTGRES`]); the record itself has no payload.
pub const HEADER_STORED: &str = "kser-dlq-stored";
/// Header: the id of its row in `kser.dead_letters`.
pub const HEADER_STORED_ID: &str = "kser-dlq-stored-id";
/// Header: why the dead-letter topic refused the original.
pub const HEADER_PRODUCER_ERROR: &str = "kser-dlq-producer-error";
/// The value of [`HEADER_STORED`]: in the `kser.dead_letters` table.
pub const STORED_IN_POSTGRES: &str = "postgres";

/// Producer errors that no retry can fix: the record itself, or the right to
/// write it, is refused. A dead letter that fails with one is kept in
/// Postgres instead; any other error (a broker away, a timeout, a full
/// queue) is waited out.
const REFUSED_FOR_GOOD: &[RDKafkaErrorCode] = &[
    RDKafkaErrorCode::MessageSizeTooLarge,
    RDKafkaErrorCode::MessageBatchTooLarge,
    RDKafkaErrorCode::InvalidMessageSize,
    RDKafkaErrorCode::InvalidMessage,
    RDKafkaErrorCode::InvalidRecord,
    RDKafkaErrorCode::InvalidTimestamp,
    RDKafkaErrorCode::UnsupportedForMessageFormat,
    RDKafkaErrorCode::PolicyViolation,
    RDKafkaErrorCode::InvalidRequest,
    RDKafkaErrorCode::InvalidTopic,
    RDKafkaErrorCode::InvalidArgument,
    RDKafkaErrorCode::TopicAuthorizationFailed,
    RDKafkaErrorCode::ClusterAuthorizationFailed,
];

/// Whether a send failed in a way no retry can fix (see
/// `REFUSED_FOR_GOOD`): the record is too large for the producer or the
/// topic, invalid, or the topic may not be written.
///
/// Decided by librdkafka's error code; an error without one is transient.
pub(crate) fn refused_for_good(err: &ProducerError) -> bool {
    match err {
        ProducerError::Send {
            code: Some(code), ..
        } => REFUSED_FOR_GOOD.contains(code),
        _ => false,
    }
}

/// The dead-letter topic of `source` unless one is configured.
pub fn default_topic(source: &str) -> String {
    format!("{source}.dlq")
}

/// Errors reading a dead-letter topic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The broker could not be read.
    #[error("could not read dead-letter topic '{topic}': {reason}")]
    Read {
        /// The dead-letter topic.
        topic: String,
        /// What librdkafka said.
        reason: String,
    },
    /// The rows of `kser.dead_letters` could not be read.
    #[error("could not read the dead letters kept in Postgres: {0}")]
    Store(StoreError),
}

impl From<StoreError> for DeadLetterError {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

/// One dead letter: a record of a dead-letter topic, a row of
/// `kser.dead_letters`, or both (the record points at the row).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterEntry {
    /// Where it is in the dead-letter topic; -1 (`null` in JSON) for a dead
    /// letter kept in Postgres only, when the topic refused even the small
    /// record pointing at it.
    #[serde(serialize_with = "null_if_negative")]
    pub dlq_partition: i32,
    /// Its offset in the dead-letter topic; -1 as for `dlq_partition`.
    #[serde(serialize_with = "null_if_negative")]
    pub dlq_offset: i64,
    /// Where it came from: the source topic.
    pub topic: Option<String>,
    /// The source partition.
    pub partition: Option<i32>,
    /// The source offset.
    pub offset: Option<i64>,
    /// The original record's timestamp, in milliseconds.
    pub timestamp: Option<i64>,
    /// Why, as a kind: `invalid_message`, `unknown_entrypoint`, `fatal`...
    pub error_kind: Option<String>,
    /// Why, in words.
    pub error: Option<String>,
    /// How many attempts the task had.
    pub attempts: Option<i32>,
    /// The uuid the record named, if any.
    pub uuid: Option<String>,
    /// The original key, as text (lossy for bytes that are not UTF-8).
    pub key: Option<String>,
    /// The original value, as text (lossy for bytes that are not UTF-8).
    pub payload: Option<String>,
    /// The size of the original value in bytes.
    pub payload_bytes: Option<i64>,
    /// `postgres` when the dead-letter topic refused the original and it is
    /// kept in `kser.dead_letters`, row `stored_id`; `payload` is then left
    /// out (`replay` reads the bytes from there).
    pub stored: Option<String>,
    /// The row of `kser.dead_letters` that keeps it, if any.
    pub stored_id: Option<i64>,
    /// Why the dead-letter topic refused the original.
    pub producer_error: Option<String>,
    /// The original key's bytes (what `replay` sends).
    #[serde(skip)]
    pub raw_key: Option<Vec<u8>>,
    /// The original value's bytes (what `replay` sends).
    #[serde(skip)]
    pub raw_payload: Option<Vec<u8>>,
}

fn null_if_negative<S: Serializer, T: Copy + Into<i64>>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let value: i64 = (*value).into();
    if value < 0 {
        serializer.serialize_none()
    } else {
        serializer.serialize_i64(value)
    }
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
            payload_bytes: record.payload().map(|p| p.len() as i64),
            stored: headers.get(HEADER_STORED).cloned(),
            stored_id: headers.get(HEADER_STORED_ID).and_then(|v| v.parse().ok()),
            producer_error: headers.get(HEADER_PRODUCER_ERROR).cloned(),
            raw_key: record.key().map(<[u8]>::to_vec),
            raw_payload: record.payload().map(<[u8]>::to_vec),
        }
    }

    /// A dead letter kept in Postgres only: the topic has no record of it.
    fn from_kept(row: &StoredDeadLetter) -> Self {
        let mut entry = Self {
            dlq_partition: -1,
            dlq_offset: -1,
            topic: Some(row.topic.clone()),
            partition: Some(row.kafka_partition),
            offset: Some(row.kafka_offset),
            timestamp: row.kafka_timestamp,
            error_kind: Some(row.error_kind.clone()),
            error: Some(row.error.clone()),
            attempts: Some(row.attempts),
            uuid: row.uuid.clone(),
            key: None,
            payload: None,
            payload_bytes: None,
            stored: None,
            stored_id: None,
            producer_error: None,
            raw_key: None,
            raw_payload: None,
        };
        entry.add_kept(row);
        entry
    }

    /// Adds what only the row has: the key and the size of the value.
    fn add_kept(&mut self, row: &StoredDeadLetter) {
        self.stored = Some(STORED_IN_POSTGRES.to_owned());
        self.stored_id = Some(row.id);
        self.producer_error = Some(row.producer_error.clone());
        self.key = row
            .key
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        self.raw_key.clone_from(&row.key);
        self.payload = None;
        self.raw_payload = None;
        self.payload_bytes = row.value_bytes.map(i64::from);
    }

    /// About how many bytes it holds: its key and payload, as bytes and as
    /// text.
    pub(crate) fn held_bytes(&self) -> usize {
        let len = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, Vec::len);
        let text = |v: &Option<String>| v.as_ref().map_or(0, String::len);
        len(&self.raw_key) + len(&self.raw_payload) + text(&self.key) + text(&self.payload)
    }

    /// Whether the dead-letter topic has a record of it.
    pub fn in_topic(&self) -> bool {
        self.dlq_offset >= 0
    }

    /// How `dlq replay` names it: `PARTITION:OFFSET` in the dead-letter
    /// topic, or `pg:ID` for one kept in Postgres only.
    pub fn id(&self) -> String {
        match self.stored_id {
            Some(id) if !self.in_topic() => format!("pg:{id}"),
            _ => format!("{}:{}", self.dlq_partition, self.dlq_offset),
        }
    }

    /// Whether `id` (a uuid, `PARTITION:OFFSET` or `pg:ID`) names it.
    pub fn is_named(&self, id: &str) -> bool {
        self.uuid.as_deref() == Some(id)
            || (self.in_topic() && format!("{}:{}", self.dlq_partition, self.dlq_offset) == id)
            || self.stored_id.is_some_and(|row| format!("pg:{row}") == id)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::refused_for_good;
    use crate::producer::ProducerError;

    fn send_error(code: RDKafkaErrorCode) -> ProducerError {
        ProducerError::Send {
            uuid: String::new(),
            topic: "t.dlq".into(),
            reason: KafkaError::MessageProduction(code).to_string(),
            code: Some(code),
        }
    }

    #[test]
    fn records_the_broker_will_never_take_are_refused_for_good() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::InvalidMessage,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::PolicyViolation,
        ] {
            assert!(refused_for_good(&send_error(code)), "{code:?}");
        }
    }

    #[test]
    fn outages_are_waited_out() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert!(!refused_for_good(&send_error(code)), "{code:?}");
        }
    }
}
