//! Publishing kser messages.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use crate::config::{ClientRole, KafkaConfig};
use crate::message::Message;

/// How long a message may wait in the local queue and for the broker's
/// acknowledgement before its send fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from sending.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    #[error("could not create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
    #[error("could not send message {uuid} to topic '{topic}': {reason}")]
    Send {
        uuid: String,
        topic: String,
        reason: String,
        /// librdkafka's error code, to tell a refusal for good from an
        /// outage.
        code: Option<rdkafka::types::RDKafkaErrorCode>,
    },
}

/// Sends kser messages, keyed by their uuid, and waits for the broker's
/// acknowledgement.
///
/// The producer is idempotent with `acks=all`: a record is acknowledged once
/// every in-sync replica has it, and librdkafka's own retries (a leader that
/// moved, a broker restarted) neither lose, duplicate nor reorder records of
/// a partition. Every record kser writes goes through it: `send`, the outbox
/// relay (next steps, retries, delayed sends) and dead letters.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    /// A producer for the cluster in `kafka`; no connection is made until
    /// the first send.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, ProducerError> {
        let inner = kafka
            .client_config(
                ClientRole::Producer,
                &[
                    ("acks", "all"),
                    ("enable.idempotence", "true"),
                    ("linger.ms", "5"),
                    ("message.timeout.ms", "30000"),
                ],
            )
            .create()
            .map_err(ProducerError::Create)?;
        Ok(Self { inner })
    }

    /// Publishes one message and returns its partition and offset once the
    /// broker has it.
    pub async fn send(&self, topic: &str, message: &Message) -> Result<(i32, i64), ProducerError> {
        self.send_keyed(topic, message.uuid.as_bytes(), message)
            .await
    }

    /// Publishes one message under a record key of the caller's: records of
    /// one key go to one partition, and a worker runs them in order (see
    /// `Ordering`).
    pub async fn send_keyed(
        &self,
        topic: &str,
        key: &[u8],
        message: &Message,
    ) -> Result<(i32, i64), ProducerError> {
        let payload = message.to_bytes();
        let record = FutureRecord::to(topic).key(key).payload(&payload);
        match self.inner.send(record, DELIVERY_TIMEOUT).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((err, _)) => Err(ProducerError::Send {
                uuid: message.uuid.clone(),
                topic: topic.to_owned(),
                reason: err.to_string(),
                code: err.rdkafka_error_code(),
            }),
        }
    }

    /// Publishes raw bytes (tests and tools that must send what is not a
    /// valid message).
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<(i32, i64), ProducerError> {
        self.send_with_headers(topic, key, payload, &[]).await
    }

    /// Publishes raw bytes with headers (dead letters).
    pub async fn send_with_headers(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, String)],
    ) -> Result<(i32, i64), ProducerError> {
        let mut owned = rdkafka::message::OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        match self.inner.send(record, DELIVERY_TIMEOUT).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((err, _)) => Err(ProducerError::Send {
                uuid: String::new(),
                topic: topic.to_owned(),
                reason: err.to_string(),
                code: err.rdkafka_error_code(),
            }),
        }
    }

    /// Waits until every queued message is delivered or has failed.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}
