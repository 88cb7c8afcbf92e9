//! The worker's Kafka consumer: how it joins its group (the classic protocol
//! or KIP-848's, static membership or not), and how it is rebuilt after a
//! fatal error.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;

use super::context::KserContext;
use super::offsets::OffsetTracker;
use crate::config::{ClientRole, KafkaConfig};

/// Which consumer group protocol a worker speaks.
///
/// Both are served by Apache Kafka 4.x. Under the classic protocol the group
/// leader computes assignments and every rebalance stops the whole group
/// (eager); the session timeout is the client's `session.timeout.ms`. Under
/// KIP-848's `consumer` protocol the broker computes assignments and moves
/// partitions one member at a time (incremental); the session timeout is the
/// broker's `group.consumer.session.timeout.ms`, and librdkafka refuses
/// `session.timeout.ms` and `heartbeat.interval.ms` beside it, so kser drops
/// those (with a warning) when this protocol is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupProtocol {
    /// The classic JoinGroup/SyncGroup protocol (every Kafka version).
    #[default]
    Classic,
    /// KIP-848, `group.protocol=consumer` (Kafka 4.0 and later).
    Consumer,
}

impl GroupProtocol {
    /// The value of librdkafka's `group.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Consumer => "consumer",
        }
    }
}

impl fmt::Display for GroupProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupProtocol {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "consumer" => Ok(Self::Consumer),
            other => Err(format!(
                "unknown group protocol '{other}': expected classic or consumer"
            )),
        }
    }
}

/// Client properties that only the classic protocol accepts.
const CLASSIC_ONLY: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
];

/// How to build the worker's consumer; kept to build it again.
#[derive(Clone)]
pub(crate) struct ConsumerSpec {
    pub(crate) kafka: KafkaConfig,
    pub(crate) group: String,
    pub(crate) protocol: GroupProtocol,
    pub(crate) instance_id: Option<String>,
    /// The topics subscribed to: those named, and with a pattern those it
    /// matches now (the topic watcher keeps it current).
    pub(crate) topics: Arc<Mutex<Vec<String>>>,
    /// Whether librdkafka reports statistics (consumer lag) for `/metrics`
    /// and the scaling hint.
    pub(crate) statistics: bool,
    /// What librdkafka may hold of the worker's byte bound.
    pub(crate) budget: super::BufferBudget,
    /// Set once a consumer built from this joined its group.
    pub(crate) joined: Arc<std::sync::atomic::AtomicBool>,
    /// What librdkafka's statistics say of lag and partitions.
    pub(crate) backlog: Arc<super::scaling::Backlog>,
}

impl ConsumerSpec {
    /// Creates the consumer and subscribes it to the topics.
    pub(crate) fn create(
        &self,
        tracker: &Arc<Mutex<OffsetTracker>>,
    ) -> Result<StreamConsumer<KserContext>, KafkaError> {
        use rdkafka::consumer::Consumer as _;

        // Bound what librdkafka prefetches and fetches in bytes (its
        // defaults allow 64 MB queued and 50 MB per fetch, per broker):
        // its share of `--max-buffered-bytes`. Properties set with -X win.
        let queue_kbytes = self.budget.queue_kbytes.to_string();
        let fetch_bytes = self.budget.fetch_bytes.to_string();
        let partition_fetch_bytes = self.budget.partition_fetch_bytes.to_string();
        let mut client = self.kafka.client_config(
            ClientRole::Consumer,
            &[
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "1000"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                ("queued.max.messages.kbytes", &queue_kbytes),
                ("queued.min.messages", "20000"),
                ("fetch.max.bytes", &fetch_bytes),
                ("max.partition.fetch.bytes", &partition_fetch_bytes),
                // A full queue postpones a partition's next fetch by this
                // (librdkafka's default, 1 s, starves a small queue).
                ("fetch.queue.backoff.ms", "50"),
            ],
        );
        client.set("group.id", &self.group);
        client.set("group.protocol", self.protocol.as_str());
        if self.protocol == GroupProtocol::Consumer {
            for key in CLASSIC_ONLY {
                if client.get(key).is_some() {
                    tracing::warn!(
                        property = key,
                        "ignored with the consumer group protocol: the broker's group.consumer.* settings apply"
                    );
                    client.remove(key);
                }
            }
        }
        match &self.instance_id {
            Some(id) => client.set("group.instance.id", id),
            None => client.remove("group.instance.id"),
        };
        if self.statistics && client.get("statistics.interval.ms").is_none() {
            client.set("statistics.interval.ms", "5000");
        }
        let consumer: StreamConsumer<KserContext> = client.create_with_context(KserContext {
            tracker: Arc::clone(tracker),
            joined: Arc::clone(&self.joined),
            backlog: Arc::clone(&self.backlog),
        })?;
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // None yet: a pattern that matched nothing so far.
        if !topics.is_empty() {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        Ok(consumer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_parse_from_their_librdkafka_names() {
        assert_eq!("classic".parse(), Ok(GroupProtocol::Classic));
        assert_eq!(" Consumer ".parse(), Ok(GroupProtocol::Consumer));
        let err = "eager".parse::<GroupProtocol>().unwrap_err();
        assert!(err.contains("classic or consumer"), "{err}");
    }
}
