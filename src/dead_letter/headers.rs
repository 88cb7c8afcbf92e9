//! What a dead letter carries and where it goes: the header names, the
//! dead-letter topic's default name, and which producer errors mean the
//! topic will never take a record.

use rdkafka::error::RDKafkaErrorCode;

use crate::producer::ProducerError;

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
