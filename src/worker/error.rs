//! Why a worker could not start.

use rdkafka::error::KafkaError;

use crate::admin::AdminError;
use crate::store::StoreError;

/// Errors that stop a worker from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A topic could not be checked or created.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The consumer could not be created or subscribed.
    #[error("Kafka consumer error: {0}")]
    Kafka(KafkaError),
    /// The database could not be reached, migrated or checked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The producer could not be created.
    #[error("could not create the Kafka producer: {0}")]
    Producer(#[source] crate::producer::ProducerError),
    /// A setting of [`WorkerConfig`](super::WorkerConfig) that cannot work.
    #[error("invalid worker setting: {0}")]
    Config(String),
}

// By hand, not `#[from]`: that would also make the error its `source()`,
// and a printed chain would say it twice.
impl From<KafkaError> for WorkerError {
    fn from(err: KafkaError) -> Self {
        Self::Kafka(err)
    }
}
