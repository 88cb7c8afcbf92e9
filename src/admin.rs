//! Broker checks and topic creation, shared by the worker and the producer.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::{ClientRole, KafkaConfig};

/// How long to wait for the brokers before calling them unreachable.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to the Kafka cluster itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No broker answered.
    #[error("could not reach Kafka at {brokers}: {reason}")]
    Unreachable {
        /// The bootstrap servers tried.
        brokers: String,
        /// What librdkafka said.
        reason: String,
    },
    /// The cluster refused to create a topic.
    #[error("could not create topic '{topic}': {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// What the broker said.
        reason: String,
    },
    /// The admin client could not be made.
    #[error("Kafka client error: {0}")]
    Client(KafkaError),
}

// By hand, not `#[from]`: that would also make the error its `source()`,
// and a printed chain would say it twice.
impl From<KafkaError> for AdminError {
    fn from(err: KafkaError) -> Self {
        Self::Client(err)
    }
}

/// How topics that kser creates are laid out.
#[derive(Debug, Clone, Copy)]
pub struct TopicLayout {
    /// How many partitions.
    pub partitions: i32,
    /// How many replicas of each partition.
    pub replication_factor: i32,
}

impl Default for TopicLayout {
    fn default() -> Self {
        Self {
            partitions: 6,
            replication_factor: 1,
        }
    }
}

/// Checks that the brokers answer, then creates those of `topics` that do
/// not exist yet. Topics that exist are left exactly as they are.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &[String],
    layout: TopicLayout,
) -> Result<(), AdminError> {
    let admin: AdminClient<DefaultClientContext> =
        kafka.client_config(ClientRole::Admin, &[]).create()?;
    let admin = std::sync::Arc::new(admin);
    let probe = std::sync::Arc::clone(&admin);
    let metadata =
        tokio::task::spawn_blocking(move || probe.inner().fetch_metadata(None, METADATA_TIMEOUT))
            .await
            .map_err(|err| AdminError::CreateTopic {
                topic: topics.join(","),
                reason: err.to_string(),
            })?
            .map_err(|err| AdminError::Unreachable {
                brokers: kafka.brokers.clone(),
                reason: match err.rdkafka_error_code() {
                    Some(code) => code.to_string(),
                    None => err.to_string(),
                },
            })?;
    let missing: Vec<&String> = topics
        .iter()
        .filter(|topic| {
            !metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic.as_str() && t.error().is_none())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|topic| {
            NewTopic::new(
                topic,
                layout.partitions,
                TopicReplication::Fixed(layout.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    for outcome in admin.create_topics(&new_topics, &options).await? {
        match outcome {
            Ok(topic) => {
                tracing::info!(topic = %topic, partitions = layout.partitions, "created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(AdminError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The longest topic name Kafka takes.
const TOPIC_MAX: usize = 249;

/// A Kafka topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
/// A name starting with `^` would be a regular expression to librdkafka and
/// subscribe to whatever it matches, kser's dead-letter topics included:
/// refused.
pub(crate) fn topic_name(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a topic name must not be empty".to_owned());
    }
    if text.starts_with('^') {
        return Err(format!(
            "'{text}' would be a regular expression to librdkafka; list topics by name, or give a pattern with --topic-pattern"
        ));
    }
    if text.len() > TOPIC_MAX {
        return Err(format!("a topic name has at most {TOPIC_MAX} characters"));
    }
    if text == "." || text == ".." {
        return Err(format!("'{text}' is not a valid topic name"));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{bad:?} is not allowed in a topic name (only a-z, A-Z, 0-9, '.', '_' and '-')"
        ));
    }
    Ok(text.to_owned())
}
