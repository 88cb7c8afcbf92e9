//! Publishing kser messages, plain or encrypted (see [`crate::crypto`]).

use std::borrow::Cow;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use crate::config::{ClientRole, KafkaConfig};
use crate::crypto::{self, KeyError, SecretBox};
use crate::message::Message;

/// How long a message may wait in the local queue and for the broker's
/// acknowledgement before its send fails.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from sending.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// librdkafka could not create the producer.
    #[error("could not create the Kafka producer: {0}")]
    Create(KafkaError),
    /// `KSER_SECRETBOX_KEY` is set but is not a key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The broker did not take a message.
    #[error("could not send message {uuid} to topic '{topic}': {reason}")]
    Send {
        /// The message uuid.
        uuid: String,
        /// The topic.
        topic: String,
        /// What librdkafka said.
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
///
/// With a [`SecretBox`] key, messages are written encrypted as Python
/// kser-crypto writes them, and a worker built on this producer reads
/// encrypted messages too. Raw sends ([`send_raw`](Self::send_raw),
/// dead letters) are written as given.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    secretbox: Option<SecretBox>,
}

impl Producer {
    /// A producer for the cluster in `kafka`; no connection is made until
    /// the first send.
    ///
    /// When `KSER_SECRETBOX_KEY` is set (as for Python kser-crypto), the
    /// producer takes that key: it encrypts what it sends, and a worker
    /// decrypts what it reads with it. A value that is not the base64 of 32
    /// bytes is a [`ProducerError::Key`] naming the variable (never the
    /// value). [`with_secretbox`](Self::with_secretbox) and
    /// [`without_secretbox`](Self::without_secretbox) decide otherwise.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, ProducerError> {
        Self::lingering(kafka, "5")
    }

    /// The worker's producer: it sends next steps and retries as soon as
    /// they are committed (`linger.ms` 0, unless configured otherwise), since
    /// an operation's step latency waits on it; the relay hands it hundreds
    /// of messages at once, which librdkafka still batches.
    pub(crate) fn prompt(kafka: &KafkaConfig) -> Result<Self, ProducerError> {
        Self::lingering(kafka, "0")
    }

    fn lingering(kafka: &KafkaConfig, linger_ms: &str) -> Result<Self, ProducerError> {
        let secretbox = SecretBox::from_env()?;
        let inner = kafka
            .client_config(
                ClientRole::Producer,
                &[
                    ("acks", "all"),
                    ("enable.idempotence", "true"),
                    ("linger.ms", linger_ms),
                    ("message.timeout.ms", "30000"),
                ],
            )
            .create()
            .map_err(ProducerError::Create)?;
        Ok(Self { inner, secretbox })
    }

    /// Encrypts the messages this producer sends with `secretbox`.
    pub fn with_secretbox(mut self, secretbox: SecretBox) -> Self {
        self.secretbox = Some(secretbox);
        self
    }

    /// Sends messages in plain JSON, whatever `KSER_SECRETBOX_KEY` says.
    pub fn without_secretbox(mut self) -> Self {
        self.secretbox = None;
        self
    }

    /// The key messages are encrypted with, if any.
    pub fn secretbox(&self) -> Option<&SecretBox> {
        self.secretbox.as_ref()
    }

    /// The record value of `message` as this producer writes it: its JSON,
    /// encrypted when the producer has a key.
    pub fn payload(&self, message: &Message) -> Vec<u8> {
        let json = message.to_bytes();
        match &self.secretbox {
            Some(secretbox) => secretbox.seal(&json),
            None => json,
        }
    }

    /// A record value already serialized (an outbox row) as this producer
    /// writes it: encrypted when the producer has a key and the value is
    /// not encrypted yet; as given otherwise.
    pub fn seal<'a>(&self, payload: &'a [u8]) -> Cow<'a, [u8]> {
        match &self.secretbox {
            Some(secretbox) if !crypto::is_encrypted(payload) => {
                Cow::Owned(secretbox.seal(payload))
            }
            _ => Cow::Borrowed(payload),
        }
    }

    /// Publishes one message (encrypted when the producer has a key) and
    /// returns its partition and offset once the broker has it.
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
        let payload = self.payload(message);
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
