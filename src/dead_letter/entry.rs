//! One dead letter as read back ([`DeadLetterEntry`]): from a record's
//! headers, from a row of `kser.dead_letters`, or both.

use std::collections::HashMap;

use rdkafka::Message as _;
use rdkafka::message::Headers;
use serde::{Serialize, Serializer};

use super::headers::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_PRODUCER_ERROR, HEADER_STORED, HEADER_STORED_ID, HEADER_TIMESTAMP, HEADER_TOPIC,
    HEADER_UUID, STORED_IN_POSTGRES,
};
use crate::store::StoredDeadLetter;

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
    pub(super) fn from_record(record: &rdkafka::message::BorrowedMessage<'_>) -> Self {
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
    pub(super) fn from_kept(row: &StoredDeadLetter) -> Self {
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
    pub(super) fn add_kept(&mut self, row: &StoredDeadLetter) {
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
