//! How a worker runs: [`WorkerConfig`], its checks (`validate`, refusing
//! settings that could not work), and the share of the byte budget each
//! part of the pipeline gets.

use super::consumer::GroupProtocol;
use super::error::WorkerError;
use super::fleet;
use super::fleet::FleetConfig;
use super::http::HttpRoutes;
use super::ordering::Ordering;
use super::retention::Retention;
use crate::admin::TopicLayout;
use crate::config::KafkaConfig;
use crate::retry::RetryPolicy;
use std::time::Duration;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The Kafka client settings.
    pub kafka: KafkaConfig,
    /// Topics to consume; missing ones are created with `layout`. May be
    /// empty when `topic_pattern` is set.
    pub topics: Vec<String>,
    /// Also consume every existing topic whose whole name this matches,
    /// except dead-letter and internal topics ([`TopicPattern`]); topics
    /// created later are picked up within `topic_refresh`.
    pub topic_pattern: Option<TopicPattern>,
    /// How often the cluster's topics are listed again for `topic_pattern`.
    pub topic_refresh: Duration,
    /// The consumer group; workers of one group share the partitions.
    pub group: String,
    /// How many tasks run at once.
    pub concurrency: usize,
    /// The most rows written to Postgres in one statement.
    pub batch_size: usize,
    /// How long in-flight work may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// How topics the worker creates are laid out.
    pub layout: TopicLayout,
    /// This worker's name in the `worker` column (default `host:pid`).
    pub worker_id: String,
    /// Retries and timeouts of tasks that declare no policy of their own.
    pub retry: RetryPolicy,
    /// Where records that cannot be processed go.
    pub dead_letters: DeadLetters,
    /// The consumer group protocol: classic, or KIP-848's `consumer`.
    pub group_protocol: GroupProtocol,
    /// Static membership (KIP-345): a name for this worker that stays the
    /// same across its restarts (`group.instance.id`). A restart within the
    /// group's session timeout gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// In what order the records of a partition run.
    pub ordering: Ordering,
    /// How long a task runs before it is written RUNNING. A task that ends
    /// sooner is written once, with its outcome, which is what makes short
    /// tasks cheap; `status` shows a longer one as RUNNING from then on.
    pub running_after: Duration,
    /// The largest task result kept, in bytes of JSON: a task returning more
    /// ends FAILED "result too large" (Postgres could not hold it anyway
    /// past 255 MiB, and memory would suffer long before).
    pub max_result_bytes: usize,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (off when `None`).
    pub http: Option<std::net::SocketAddr>,
    /// More to serve there: wraps the worker's routes (the CLI puts the
    /// web console around them).
    pub http_routes: Option<HttpRoutes>,
    /// The most bytes of records the worker holds: an eighth for
    /// librdkafka's prefetch queue, a thirty-second for a fetch in flight
    /// (at least 1 MiB), half for records in the pipeline until their
    /// outcome is durable, the rest headroom. Counts bytes, not records, so large records
    /// cannot take a worker past it.
    pub max_buffered_bytes: u64,
    /// Prune old finished work periodically ([`Retention`]); off when
    /// `None`, the default.
    pub retention: Option<Retention>,
    /// Heartbeats, the LOST threshold, the pause lock file, the scaling
    /// hint's drain target.
    pub fleet: FleetConfig,
    /// Where to publish one JSON record per finished task (off when
    /// `None`); records the broker cannot take fast enough are dropped and
    /// counted, never waited for.
    pub metrics_topic: Option<String>,
}

/// The default of [`WorkerConfig::max_buffered_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 64 << 20;
/// The least [`WorkerConfig::max_buffered_bytes`]: librdkafka's fetch must
/// hold one 1 MB record.
pub const MIN_BUFFERED_BYTES: u64 = 8 << 20;
/// The most [`WorkerConfig::max_buffered_bytes`].
pub const MAX_BUFFERED_BYTES: u64 = 8 << 30;

/// How [`WorkerConfig::max_buffered_bytes`] is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferBudget {
    /// librdkafka's prefetch queue (`queued.max.messages.kbytes`).
    pub(crate) queue_kbytes: u64,
    /// One fetch response (`fetch.max.bytes`; per broker).
    pub(crate) fetch_bytes: u64,
    /// One partition's share of a fetch (`max.partition.fetch.bytes`).
    pub(crate) partition_fetch_bytes: u64,
    /// What the pipeline holds, records counted twice: their bytes, kept
    /// to dead-letter them, and their decoded message.
    pub(crate) pipeline_bytes: u64,
}

/// An eighth of the bound to librdkafka's queue, half to the pipeline, and
/// small fetches: a thirty-second of the bound to a fetch in flight
/// (librdkafka may pass its queue's limit by one fetch), at least 1 MiB, of
/// which a partition takes 1/256 of the bound, between 256 KiB and 1 MiB.
/// librdkafka keeps about 400 bytes of its own per queued record beside the
/// record's bytes, so for small records a large fetch costs more than its
/// size says: 1 MiB partition fetches of 150-byte records took a worker
/// draining a million of them to 78 MiB of RSS, 256 KiB ones to 58 MiB, no
/// slower. A record larger than a fetch still comes, alone. What is left is
/// headroom for what counting bytes of records does not see (the
/// allocator's slack, bookkeeping).
pub(crate) fn buffer_budget(max_buffered_bytes: u64) -> BufferBudget {
    let bytes = max_buffered_bytes.clamp(MIN_BUFFERED_BYTES, MAX_BUFFERED_BYTES);
    let fetch_bytes = (bytes / 32).max(1 << 20);
    BufferBudget {
        queue_kbytes: (bytes / 8 / 1024).min(2_097_151),
        fetch_bytes,
        partition_fetch_bytes: (bytes / 256).clamp(256 << 10, 1 << 20),
        pipeline_bytes: bytes / 2,
    }
}

/// What a record costs of the pipeline's budget: twice its bytes (see
/// [`BufferBudget::pipeline_bytes`]) and a little for its bookkeeping; never
/// more than the whole budget, so a record larger than it still passes,
/// alone.
pub(super) fn record_cost(key: usize, payload: usize, budget: u64) -> u32 {
    let cost = 2 * (key as u64 + payload as u64) + 1024;
    u32::try_from(cost.min(budget)).unwrap_or(u32::MAX)
}

impl WorkerConfig {
    /// Defaults: concurrency 64, batches of 1000 rows, 30 s to shut down.
    pub fn new(kafka: KafkaConfig, topics: Vec<String>, group: impl Into<String>) -> Self {
        Self {
            kafka,
            topics,
            topic_pattern: None,
            topic_refresh: Duration::from_secs(30),
            group: group.into(),
            concurrency: 64,
            batch_size: 1000,
            shutdown_timeout: Duration::from_secs(30),
            layout: TopicLayout::default(),
            worker_id: default_worker_id(),
            retry: RetryPolicy::NONE,
            dead_letters: DeadLetters::Suffix,
            group_protocol: GroupProtocol::default(),
            instance_id: None,
            ordering: Ordering::default(),
            running_after: Duration::from_secs(1),
            max_result_bytes: 16 << 20,
            http: None,
            http_routes: None,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            retention: None,
            fleet: FleetConfig::default(),
            metrics_topic: None,
        }
    }
}

pub(super) fn default_worker_id() -> String {
    format!("{}:{}", fleet::host_name(), std::process::id())
}

/// The most tasks a worker runs at once, and the most rows per statement:
/// beyond these a setting is a mistake, not a tuning.
const MAX_CONCURRENCY: usize = 100_000;
const MAX_BATCH_SIZE: usize = 100_000;

impl WorkerConfig {
    /// Checks the settings the command line checks too, so a worker built
    /// in code cannot start with values that would make it panic or stall.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let fail = |what: String| Err(WorkerError::Config(what));
        if self.topics.iter().any(|t| t.trim().is_empty()) {
            return fail("topics must be named (empty names are refused)".into());
        }
        if self.topics.is_empty() && self.topic_pattern.is_none() {
            return fail("no topic to consume: name topics or give a topic pattern".into());
        }
        if self.topic_pattern.is_some() && self.topic_refresh < Duration::from_secs(1) {
            return fail(format!(
                "the topic refresh interval must be at least 1s, not {:?}",
                self.topic_refresh
            ));
        }
        if self.group.trim().is_empty() {
            return fail("the consumer group must be named".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return fail(format!(
                "concurrency must be between 1 and {MAX_CONCURRENCY}, not {}",
                self.concurrency
            ));
        }
        if !(MIN_BUFFERED_BYTES..=MAX_BUFFERED_BYTES).contains(&self.max_buffered_bytes) {
            return fail(format!(
                "max buffered bytes must be between {MIN_BUFFERED_BYTES} and {MAX_BUFFERED_BYTES}, not {}",
                self.max_buffered_bytes
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return fail(format!(
                "batch size must be between 1 and {MAX_BATCH_SIZE}, not {}",
                self.batch_size
            ));
        }
        let fleet = &self.fleet;
        if fleet.heartbeat_interval < Duration::from_millis(100) {
            return fail("the heartbeat interval must be at least 100ms".into());
        }
        if fleet.lost_after < fleet.heartbeat_interval * 2 {
            return fail(format!(
                "the LOST threshold ({:?}) must be at least twice the heartbeat interval ({:?}), or a live worker could be taken for lost",
                fleet.lost_after, fleet.heartbeat_interval
            ));
        }
        if fleet.drain_target.is_zero() {
            return fail("the drain target must be longer than zero".into());
        }
        if let Some(metrics) = &self.metrics_topic
            && self.topics.contains(metrics)
        {
            return fail(format!(
                "topic '{metrics}' is both consumed and the metrics topic: its records would be \
                 read as tasks; choose another metrics topic"
            ));
        }
        for topic in &self.topics {
            let dlq = match &self.dead_letters {
                DeadLetters::Disabled => continue,
                DeadLetters::Suffix => crate::dead_letter::default_topic(topic),
                DeadLetters::Topic(dlq) => dlq.clone(),
            };
            if self.topics.contains(&dlq) {
                return fail(format!(
                    "topic '{dlq}' is both consumed and the dead-letter topic of '{topic}': \
                     its dead letters would run again as tasks; consume it with a worker of \
                     its own, or choose another dead-letter topic"
                ));
            }
        }
        Ok(())
    }
}

/// Where dead letters go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeadLetters {
    /// Not written anywhere (failures are only in Postgres and the logs).
    Disabled,
    /// `<topic>.dlq` for each consumed topic.
    #[default]
    Suffix,
    /// One topic for all.
    Topic(String),
}

/// A regular expression that a topic's whole name must match.
#[derive(Debug, Clone)]
pub struct TopicPattern {
    source: String,
    regex: regex::Regex,
}

impl TopicPattern {
    /// Compiles `pattern` (Rust `regex` syntax, matched against the whole
    /// name: `jobs\..*` takes `jobs.a`, not `myjobs.a`).
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.trim().is_empty() {
            return Err("a topic pattern must not be empty".to_owned());
        }
        let regex = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|err| format!("'{pattern}' is not a valid regular expression: {err}"))?;
        Ok(Self {
            source: pattern.to_owned(),
            regex,
        })
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches all of `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.regex.is_match(topic)
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    pub(super) fn the_buffer_bound_is_shared_out_whole() {
        let budget = buffer_budget(DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(budget.queue_kbytes, 8 * 1024);
        assert_eq!(budget.fetch_bytes, 2 << 20);
        assert_eq!(budget.partition_fetch_bytes, 256 << 10);
        assert_eq!(budget.pipeline_bytes, 32 << 20);
        // The queue, overshot by one fetch, one fetch in flight and the
        // pipeline fit in the bound.
        assert!(
            budget.queue_kbytes * 1024 + 2 * budget.fetch_bytes + budget.pipeline_bytes
                <= DEFAULT_MAX_BUFFERED_BYTES
        );
        // librdkafka takes a fetch of one whole record and a queue of 2 GiB
        // at most.
        assert!(buffer_budget(MIN_BUFFERED_BYTES).fetch_bytes >= 1_000_000);
        assert_eq!(buffer_budget(256 << 20).partition_fetch_bytes, 1 << 20);
        assert!(buffer_budget(MAX_BUFFERED_BYTES).queue_kbytes <= 2_097_151);
        // A record larger than the pipeline's share still passes, alone.
        assert_eq!(record_cost(10, 500_000, 32 << 20), 1_001_044);
        assert_eq!(record_cost(0, 900_000_000, 32 << 20), 32 << 20);
    }

    pub(super) fn config() -> WorkerConfig {
        WorkerConfig::new(KafkaConfig::new("localhost:9092"), vec!["jobs".into()], "g")
    }

    #[test]
    pub(super) fn settings_that_cannot_work_are_refused() {
        assert!(config().validate().is_ok());
        let refused = |change: fn(&mut WorkerConfig)| {
            let mut config = config();
            change(&mut config);
            config.validate().expect_err("refused").to_string()
        };
        assert!(refused(|c| c.concurrency = 0).contains("concurrency"));
        assert!(refused(|c| c.concurrency = usize::MAX).contains("concurrency"));
        assert!(refused(|c| c.batch_size = 0).contains("batch size"));
        assert!(refused(|c| c.max_buffered_bytes = 1024).contains("buffered bytes"));
        assert!(refused(|c| c.topics = vec![" ".into()]).contains("topics"));
        assert!(refused(|c| c.group = String::new()).contains("group"));
        assert!(refused(|c| c.fleet.lost_after = Duration::from_secs(1)).contains("LOST"));
        assert!(
            refused(|c| c.fleet.heartbeat_interval = Duration::from_millis(1))
                .contains("heartbeat")
        );
        assert!(refused(|c| c.topics.push("jobs.dlq".into())).contains("jobs.dlq"));
        assert!(refused(|c| c.dead_letters = DeadLetters::Topic("jobs".into())).contains("'jobs'"));
        assert!(refused(|c| c.metrics_topic = Some("jobs".into())).contains("metrics topic"));
    }
}
