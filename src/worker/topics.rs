//! Topics chosen by a pattern (`--topic-pattern`): which topics of the
//! cluster a worker consumes, found again as topics come and go.
//!
//! librdkafka takes a topic name starting with `^` for a regular expression
//! and subscribes to whatever it matches, kser's dead-letter topics included
//! (their records would run again as tasks). kser never hands it one: the
//! worker lists the cluster's topics, keeps those the pattern matches whole
//! (as Kafka's Java client does), leaves out dead-letter topics and Kafka's
//! internal ones, and subscribes to the names; every `--topic-refresh` it
//! looks again and subscribes anew when the set changed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use tokio_util::sync::CancellationToken;

use super::settings::{DeadLetters, TopicPattern};
use super::shared::Shared;
use crate::admin::{self, TopicLayout};

/// How long one listing of the cluster's topics may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a worker never consumes `topic` through a pattern: a dead-letter
/// topic (named `<topic>.dlq`, or the `--dlq-topic`), or one of Kafka's
/// internal topics (`__consumer_offsets`...).
fn left_out(topic: &str, dead_letters: &DeadLetters) -> bool {
    let dead_letter_suffix = crate::dead_letter::default_topic("");
    topic.starts_with("__")
        || topic.ends_with(&dead_letter_suffix)
        || matches!(dead_letters, DeadLetters::Topic(dlq) if dlq == topic)
}

/// The topics to consume: those named, and those of `existing` that
/// `pattern` matches and that are no dead-letter or internal topic nor one
/// of `excluded` (the metrics topic); sorted, each once.
pub(crate) fn select<'a>(
    named: &[String],
    pattern: &TopicPattern,
    existing: impl IntoIterator<Item = &'a str>,
    dead_letters: &DeadLetters,
    excluded: &[String],
) -> Vec<String> {
    let mut topics: Vec<String> = existing
        .into_iter()
        .filter(|topic| {
            pattern.matches(topic)
                && !left_out(topic, dead_letters)
                && !excluded.iter().any(|e| e == topic)
        })
        .map(str::to_owned)
        .chain(named.iter().cloned())
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

/// What the topic watcher needs besides the worker's shared state.
pub(crate) struct Watch {
    pub(crate) pattern: TopicPattern,
    pub(crate) named: Vec<String>,
    pub(crate) every: Duration,
    pub(crate) layout: TopicLayout,
    /// Never consumed, whatever the pattern: the `--metrics-topic`.
    pub(crate) excluded: Vec<String>,
}

impl Shared {
    /// Lists the cluster's topics now and every `watch.every`, and
    /// subscribes the consumer to the selection whenever it changes (the
    /// group rebalances then, as for any new subscription), after creating
    /// the dead-letter topics of the new ones. A listing that fails is
    /// logged and tried again at the next turn; the subscription stays.
    pub(super) async fn watch_topics(self: Arc<Self>, watch: Watch, stop: CancellationToken) {
        let mut announced_none = false;
        loop {
            let consumer = self.consumer();
            let listed = tokio::task::spawn_blocking(move || {
                consumer.fetch_metadata(None, METADATA_TIMEOUT).map(|m| {
                    m.topics()
                        .iter()
                        .map(|t| t.name().to_owned())
                        .collect::<Vec<_>>()
                })
            })
            .await;
            match listed {
                Ok(Ok(existing)) => {
                    let wanted = select(
                        &watch.named,
                        &watch.pattern,
                        existing.iter().map(String::as_str),
                        &self.dead_letters,
                        &watch.excluded,
                    );
                    if wanted.is_empty() && !announced_none {
                        tracing::warn!(pattern = %watch.pattern, "no topic matches the pattern yet; looking again every {:?}", watch.every);
                        announced_none = true;
                    }
                    self.subscribe(&watch, wanted).await;
                }
                Ok(Err(err)) => {
                    tracing::warn!(pattern = %watch.pattern, error = %err, "could not list the topics; the subscription stays as it is")
                }
                Err(err) => tracing::warn!(error = %err, "topic listing task failed"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(watch.every) => {}
            }
        }
    }

    /// Subscribes to `wanted` if it is not the subscription already.
    async fn subscribe(&self, watch: &Watch, wanted: Vec<String>) {
        let added: Vec<String> = {
            let current = self
                .spec
                .topics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *current == wanted {
                return;
            }
            wanted
                .iter()
                .filter(|t| !current.contains(t))
                .cloned()
                .collect()
        };
        if self.dead_letters == DeadLetters::Suffix && !added.is_empty() {
            let dead_letter_topics: Vec<String> = added
                .iter()
                .map(|t| crate::dead_letter::default_topic(t))
                .collect();
            if let Err(err) =
                admin::ensure_topics(&self.spec.kafka, &dead_letter_topics, watch.layout).await
            {
                tracing::warn!(error = %err, "could not create the dead-letter topics of new topics; trying again at the next turn");
                return;
            }
        }
        let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let subscribed = if names.is_empty() {
            self.consumer().unsubscribe();
            Ok(())
        } else {
            self.consumer().subscribe(&names)
        };
        match subscribed {
            Ok(()) => {
                tracing::info!(pattern = %watch.pattern, topics = %wanted.join(","), "subscribed to the topics the pattern matches");
                *self
                    .spec
                    .topics
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not subscribe; trying again at the next turn")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names() {
        let pattern = TopicPattern::new(r"jobs\..*").expect("valid");
        assert!(pattern.matches("jobs.a"));
        assert!(!pattern.matches("myjobs.a"));
        assert!(!pattern.matches("jobs"));
        let alternatives = TopicPattern::new("a|b").expect("valid");
        assert!(alternatives.matches("a") && alternatives.matches("b"));
        assert!(!alternatives.matches("ab"));
        assert!(
            TopicPattern::new("(")
                .unwrap_err()
                .contains("not a valid regular expression")
        );
        assert!(TopicPattern::new(" ").unwrap_err().contains("empty"));
    }

    #[test]
    fn dead_letter_and_internal_topics_are_never_selected() {
        let everything = TopicPattern::new(".*").expect("valid");
        let existing = ["jobs", "jobs.dlq", "mail", "__consumer_offsets", "failed"];
        assert_eq!(
            select(&[], &everything, existing, &DeadLetters::Suffix, &[]),
            ["failed", "jobs", "mail"]
        );
        assert_eq!(
            select(
                &["extra".to_owned()],
                &everything,
                existing,
                &DeadLetters::Topic("failed".into()),
                &["mail".to_owned()]
            ),
            ["extra", "jobs"]
        );
    }
}
