//! The consumer's [`ConsumerContext`]: logs rebalances, commits finished work
//! before partitions are taken away, and forgets revoked partitions.

use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;

use super::offsets::OffsetTracker;

pub(crate) struct KserContext {
    pub(crate) tracker: Arc<Mutex<OffsetTracker>>,
    /// Set at the first assignment (even an empty one): the consumer is in
    /// its group.
    pub(crate) joined: Arc<std::sync::atomic::AtomicBool>,
    /// Lag and partition count, for the scaling hint.
    pub(crate) backlog: Arc<super::scaling::Backlog>,
}

impl ClientContext for KserContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        super::telemetry::lag(&statistics);
        self.backlog.observe(&statistics);
    }
}

impl ConsumerContext for KserContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions revoked; committing finished work");
                if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
                    log_commit_error(&err);
                }
                let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
                for element in partitions.elements() {
                    tracker.revoke(element.topic(), element.partition());
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            self.joined
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(partitions = %describe(partitions), "partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = %describe(offsets), "committed offsets"),
            Err(err) => log_commit_error(&err),
        }
    }
}

fn log_commit_error(err: &KafkaError) {
    // Nothing stored since the last commit is not a failure.
    if err.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
        tracing::warn!(error = %err, "offset commit failed; it is retried with the next commit");
    }
}

/// `topic[0,1,2]`, for logs.
fn describe(partitions: &TopicPartitionList) -> String {
    let mut by_topic: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for element in partitions.elements() {
        let entry = by_topic.entry(element.topic().to_owned()).or_default();
        match element.offset().to_raw() {
            Some(offset) if offset >= 0 => entry.push(format!("{}@{offset}", element.partition())),
            _ => entry.push(element.partition().to_string()),
        }
    }
    by_topic
        .iter()
        .map(|(topic, parts)| format!("{topic}[{}]", parts.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}
