//! The worker: consume, record, run, record, commit.
//!
//! Records flow through three stages joined by bounded channels, so memory
//! stays bounded and a slow stage slows the consumer instead of piling up.
//! Read the files in the order a record travels:
//!
//! 1. `intake.rs` reads records from Kafka and tracks their offsets;
//! 2. `start.rs` decodes a batch, records what cannot run, waits for each
//!    record's turn in its lane (`ordering.rs`), and claims the tasks that
//!    got a concurrency slot in one read (skipping those already final:
//!    redeliveries and duplicates); its marker writes RUNNING the tasks still
//!    running after `running_after`, so a short task is written once;
//! 3. `execute.rs` runs a task and builds the row of its attempt;
//! 4. `finish.rs` writes a batch of final states in one statement, then
//!    releases their offsets; `dead_letter.rs` writes failures to the
//!    dead-letter topic, `operations.rs` moves operations along and runs the
//!    outbox relay.
//!
//! This file holds the configuration, the types handed from stage to stage
//! and [`Worker::run`], which wires the stages and shuts them down.
//!
//! An offset is stored for commit only once its task's final state is
//! committed in Postgres and every earlier offset of the partition is too
//! (`offsets.rs`), so a crash at any point loses nothing: the
//! uncommitted records are delivered again and whatever had not finished
//! runs again. A database outage pauses the pipeline; nothing is marked
//! FAILED because Postgres blinked.

mod consumer;
mod context;
mod dead_letter;
mod decode;
mod execute;
mod finish;
mod fleet;
mod intake;
mod limits;
mod metrics_topic;
mod offsets;
mod operations;
mod ordering;
mod retention;
mod schedules;
mod start;
mod telemetry;
mod topics;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{self, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admin::{self, AdminError, TopicLayout};
use crate::config::KafkaConfig;
use crate::message::{ErrorKind, Message, TaskResult};
use crate::producer::Producer;
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::store::{
    FinishedOperation, NewOutbox, NewTask, Recovery, Retry, StartedTask, Store, StoreError,
    TaskRow, TaskStatus,
};
use crate::task::TaskContext;
use consumer::ConsumerSpec;
pub use consumer::GroupProtocol;
use context::KserContext;
use dead_letter::DeadLetter;
pub use dead_letter::DeadLetters;
use decode::{Decoded, decode};
pub use fleet::{FleetConfig, pause_lock_file};
use offsets::{OffsetTracker, Position};
pub use ordering::Ordering;
use ordering::{Lane, Lanes};
pub use retention::{DEFAULT_RETENTION_EVERY, Retention};
pub use telemetry::HttpRoutes;
pub use topics::TopicPattern;

/// How long the pipeline may stay full before the worker pauses fetching.
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(5);

/// The wait before the first rebuild of a consumer that hit a fatal error,
/// doubled each time it happens again, up to the maximum.
const REBUILD_DELAY_MIN: Duration = Duration::from_millis(500);
const REBUILD_DELAY_MAX: Duration = Duration::from_secs(10);

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
    /// web console around them, [`crate::web::Console::around`]).
    pub http_routes: Option<HttpRoutes>,
    /// The most bytes of records the worker holds: an eighth for
    /// librdkafka's prefetch queue, an eighth for a fetch in flight, half
    /// for records in the pipeline until their outcome is durable, a
    /// quarter of headroom. Counts bytes, not records, so large records
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

/// An eighth of the bound to librdkafka's queue and an eighth to a fetch in
/// flight (librdkafka may pass its queue's limit by one fetch), half to the
/// pipeline; the last quarter is headroom for what counting bytes of
/// records does not see (the allocator's slack, bookkeeping).
pub(crate) fn buffer_budget(max_buffered_bytes: u64) -> BufferBudget {
    let bytes = max_buffered_bytes.clamp(MIN_BUFFERED_BYTES, MAX_BUFFERED_BYTES);
    let fetch_bytes = bytes / 8;
    BufferBudget {
        queue_kbytes: (bytes / 8 / 1024).min(2_097_151),
        fetch_bytes,
        partition_fetch_bytes: fetch_bytes.min(1 << 20),
        pipeline_bytes: bytes / 2,
    }
}

/// What a record costs of the pipeline's budget: twice its bytes (see
/// [`BufferBudget::pipeline_bytes`]) and a little for its bookkeeping; never
/// more than the whole budget, so a record larger than it still passes,
/// alone.
fn record_cost(key: usize, payload: usize, budget: u64) -> u32 {
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

fn default_worker_id() -> String {
    format!("{}:{}", fleet::host_name(), std::process::id())
}

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
    /// A setting of [`WorkerConfig`] that cannot work.
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

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn the_buffer_bound_is_shared_out_whole() {
        let budget = buffer_budget(DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(budget.queue_kbytes, 8 * 1024);
        assert_eq!(budget.fetch_bytes, 8 << 20);
        assert_eq!(budget.partition_fetch_bytes, 1 << 20);
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
        assert!(buffer_budget(MAX_BUFFERED_BYTES).queue_kbytes <= 2_097_151);
        // A record larger than the pipeline's share still passes, alone.
        assert_eq!(record_cost(10, 500_000, 32 << 20), 1_001_044);
        assert_eq!(record_cost(0, 900_000_000, 32 << 20), 32 << 20);
    }

    fn config() -> WorkerConfig {
        WorkerConfig::new(KafkaConfig::new("localhost:9092"), vec!["jobs".into()], "g")
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
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

/// What a worker did, counted since it started.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WorkerStats {
    /// Records read from Kafka.
    pub received: u64,
    /// Tasks recorded as SUCCESS.
    pub succeeded: u64,
    /// Tasks recorded as FAILED (including invalid messages with a uuid).
    pub failed: u64,
    /// Failed attempts that will be retried after their backoff.
    pub retried: u64,
    /// Messages not run because their task was already final or in flight.
    pub skipped: u64,
    /// Records that were not kser messages and had no uuid: logged, not stored.
    pub rejected: u64,
    /// Records received and left unfinished at shutdown: still running at
    /// the deadline, or fetched and not started. They will be delivered
    /// again.
    pub abandoned: u64,
    /// Tasks that found no room in their pools (`MAX_CONCURRENCY`,
    /// `ACQUIRES`) and were parked in Postgres; each runs when it is sent
    /// again.
    pub waited: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    skipped: AtomicU64,
    rejected: AtomicU64,
    waited: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            received: self.received.load(atomic::Ordering::Relaxed),
            succeeded: self.succeeded.load(atomic::Ordering::Relaxed),
            failed: self.failed.load(atomic::Ordering::Relaxed),
            retried: self.retried.load(atomic::Ordering::Relaxed),
            skipped: self.skipped.load(atomic::Ordering::Relaxed),
            rejected: self.rejected.load(atomic::Ordering::Relaxed),
            abandoned: 0,
            waited: self.waited.load(atomic::Ordering::Relaxed),
        }
    }
}

/// A record as read from Kafka, before decoding.
struct Received {
    position: Position,
    original: Arc<Original>,
    timestamp: Option<DateTime<Utc>>,
}

/// A record's key and value as read, kept until its outcome is durable so a
/// failure can be dead-lettered byte for byte.
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    /// The record timestamp, in milliseconds.
    pub(crate) timestamp: Option<i64>,
    /// Its share of the pipeline's byte budget, given back when the last
    /// copy of the record is dropped.
    pub(crate) budget: std::sync::OnceLock<tokio::sync::OwnedSemaphorePermit>,
    /// The record's `traceparent` header, if it had a valid one.
    pub(crate) trace: Option<crate::trace::TraceParent>,
}

/// A task's final state, ready to write.
struct Finished {
    position: Position,
    row: NewTask,
    kind: Outcome,
    /// For a retry: the message to send again when it is due.
    resend: Option<NewOutbox>,
    /// The record as read, to dead-letter if the task ends FAILED.
    original: Arc<Original>,
    /// The lane the record holds until its final state is written.
    lane: Option<Lane>,
}

/// How a final state is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A standalone task that ran: its RUNNING row exists, only the outcome
    /// columns are written.
    Ran,
    /// A step of an operation that ran: written with the follow-up (next
    /// step or end of the operation) in one transaction.
    Step,
    /// A message that did not run (invalid, refused): the row is upserted
    /// whole.
    Rejected,
    /// A record that is not a kser message but names a uuid: recorded
    /// FAILED only if that uuid has no task that ran, runs or is final
    /// ([`Store::record_invalid`]); otherwise only dead-lettered, as a
    /// duplicate.
    Invalid,
    /// A failed attempt that will be retried: back to PENDING, the attempt
    /// recorded, the message queued until its backoff has passed.
    Retry,
    /// A transactional task whose SUCCESS is committed already: nothing to
    /// write, only its offset to release.
    Committed,
}

impl Outcome {
    /// How the final state of a task that ran is written: with its
    /// operation's follow-up for a step, alone otherwise.
    fn of_run(row: &NewTask) -> Self {
        if row.operation_uuid.is_some() {
            Self::Step
        } else {
            Self::Ran
        }
    }
}

/// A decoded message of a registered task, waiting for its turn and a
/// concurrency slot.
struct Candidate {
    position: Position,
    message: Message,
    enqueued_at: Option<DateTime<Utc>>,
    original: Arc<Original>,
    lane: Option<Lane>,
}

/// A task cleared to run.
#[derive(Clone)]
struct Ready {
    position: Position,
    message: Message,
    started: StartedTask,
    enqueued_at: Option<DateTime<Utc>>,
    original: Arc<Original>,
    lane: Option<Lane>,
}

/// Consumes the configured topics and runs each message's task.
pub struct Worker {
    config: WorkerConfig,
    registry: Arc<Registry>,
    store: Store,
}

struct Shared {
    /// The consumer; replaced when it hits a fatal error.
    consumer: RwLock<Arc<StreamConsumer<KserContext>>>,
    /// How to build the consumer again.
    spec: ConsumerSpec,
    tracker: Arc<Mutex<OffsetTracker>>,
    store: Store,
    registry: Arc<Registry>,
    counters: Counters,
    /// Tasks started and not yet recorded final, by uuid.
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// How long a task runs before the marker writes it RUNNING.
    running_after: Duration,
    /// The largest task result kept, in bytes of JSON.
    max_result_bytes: usize,
    worker_id: String,
    batch_size: usize,
    /// Cancelled when the shutdown deadline passes: stop waiting for the
    /// database.
    abandon: CancellationToken,
    /// Publishes the outbox: next steps of operations.
    producer: Producer,
    /// For tasks that declare no policy of their own.
    retry: RetryPolicy,
    dead_letters: DeadLetters,
    /// Wakes the outbox relay when this worker has just queued messages.
    relay_wakeup: tokio::sync::Notify,
    /// Dead letters being written; shutdown waits for them.
    dead_letter_tasks: tokio_util::task::TaskTracker,
    /// In what order records run.
    ordering: Ordering,
    /// Tells the starter that a lane's record reached a final state.
    lane_done: mpsc::UnboundedSender<Lane>,
    /// Transactional tasks running at once, each holding a connection: the
    /// pool's size less what the pipeline's own writes need.
    transactions: Semaphore,
    /// Bytes of records the pipeline may still take in
    /// ([`BufferBudget::pipeline_bytes`]), one permit per byte.
    buffered: Arc<Semaphore>,
    buffered_budget: u64,
    /// `--metrics-topic`: a record per finished task.
    metrics_topic: Option<metrics_topic::MetricsTopic>,
    /// Tasks holding leases on pools (limits across the fleet), until
    /// their outcome is written.
    leased: Mutex<HashSet<String>>,
    /// How long a lease lasts unless renewed: the fleet's `lost_after`.
    lease_ttl: Duration,
}

impl Worker {
    /// A worker for `registry`'s tasks, recording state in `store`.
    pub fn new(config: WorkerConfig, registry: Registry, store: Store) -> Self {
        Self {
            config,
            registry: Arc::new(registry),
            store,
        }
    }

    /// Runs until `shutdown` is cancelled, then stops fetching, lets in-flight
    /// work finish within the shutdown timeout, commits what is done and
    /// returns what it counted.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerStats, WorkerError> {
        let config = self.config;
        config.validate()?;
        self.registry
            .check_limits()
            .map_err(|err| WorkerError::Config(err.to_string()))?;
        // Capacities as this worker's code declares them.
        self.store.declare_pools(self.registry.pools()).await?;
        // A drain (`kser control drain`) stops this worker as a signal would.
        let shutdown = shutdown.child_token();
        let mut topics = config.topics.clone();
        for topic in &config.topics {
            match &config.dead_letters {
                DeadLetters::Disabled => {}
                DeadLetters::Suffix => topics.push(crate::dead_letter::default_topic(topic)),
                DeadLetters::Topic(dlq) => topics.push(dlq.clone()),
            }
        }
        topics.extend(config.metrics_topic.iter().cloned());
        topics.sort();
        topics.dedup();
        // A port in use stops the worker before it joins anything.
        let listener = match config.http {
            Some(address) => Some(telemetry::listen(address).await?),
            None => None,
        };
        if !topics.is_empty() {
            admin::ensure_topics(&config.kafka, &topics, config.layout).await?;
        }

        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let budget = buffer_budget(config.max_buffered_bytes);
        let spec = ConsumerSpec {
            budget,
            kafka: config.kafka.clone(),
            group: config.group.clone(),
            protocol: config.group_protocol,
            instance_id: config.instance_id.clone(),
            topics: Arc::new(Mutex::new(config.topics.clone())),
            // Every 5 s: consumer lag for `/metrics` and the scaling hint.
            statistics: true,
            joined: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            backlog: Arc::default(),
        };
        let consumer = spec.create(&tracker)?;
        tracing::info!(
            worker = %config.worker_id,
            group = %config.group,
            group_protocol = %config.group_protocol,
            ordering = %config.ordering,
            instance_id = config.instance_id.as_deref().unwrap_or("-"),
            topics = %config.topics.join(","),
            topic_pattern = config.topic_pattern.as_ref().map_or("-", TopicPattern::as_str),
            concurrency = config.concurrency,
            max_buffered_bytes = config.max_buffered_bytes,
            "worker started"
        );

        let (metrics_topic, metric_records) = match &config.metrics_topic {
            Some(topic) => {
                let (topic, publisher) =
                    metrics_topic::MetricsTopic::start(&config.kafka, topic, &config.worker_id)
                        .map_err(WorkerError::Producer)?;
                (Some(topic), Some(publisher))
            }
            None => (None, None),
        };
        let (lane_done, lane_done_rx) = mpsc::unbounded_channel();
        let transaction_slots = self.store.max_connections().saturating_sub(4).max(1);
        let shared = Arc::new(Shared {
            transactions: Semaphore::new(transaction_slots),
            ordering: config.ordering,
            running_after: config.running_after,
            max_result_bytes: config.max_result_bytes,
            lane_done,
            consumer: RwLock::new(Arc::new(consumer)),
            spec,
            tracker,
            store: self.store,
            registry: self.registry,
            counters: Counters::default(),
            in_flight: Mutex::new(HashMap::new()),
            worker_id: config.worker_id.clone(),
            batch_size: config.batch_size.max(1),
            abandon: CancellationToken::new(),
            producer: Producer::prompt(&config.kafka).map_err(WorkerError::Producer)?,
            relay_wakeup: tokio::sync::Notify::new(),
            dead_letter_tasks: tokio_util::task::TaskTracker::new(),
            retry: config.retry,
            dead_letters: config.dead_letters.clone(),
            buffered: Arc::new(Semaphore::new(
                usize::try_from(budget.pipeline_bytes).unwrap_or(usize::MAX >> 4),
            )),
            buffered_budget: budget.pipeline_bytes,
            metrics_topic,
            leased: Mutex::new(HashSet::new()),
            lease_ttl: config.fleet.lost_after,
        });

        // Pauses in force when the worker starts apply to its first record.
        let hold = fleet::initial_hold(&shared.store, &config.worker_id, &config.fleet).await;
        let (hold_tx, hold_rx) = tokio::sync::watch::channel(hold);
        let fleet = tokio::spawn(Arc::clone(&shared).fleet(fleet::Fleet {
            config: config.fleet.clone(),
            me: crate::store::NewWorker {
                id: config.worker_id.clone(),
                host: fleet::host_name(),
                pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                group: config.group.clone(),
                topics: config.topics.clone(),
                entrypoints: fleet::entrypoints_json(&shared.registry),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                lost_after_ms:
                    i64::try_from(config.fleet.lost_after.as_millis()).unwrap_or(i64::MAX),
            },
            hold: hold_tx,
            joined: Arc::clone(&shared.spec.joined),
            backlog: Arc::clone(&shared.spec.backlog),
            shutdown: shutdown.clone(),
        }));

        let capacity = shared.batch_size * 2;
        let (intake_tx, intake_rx) = mpsc::channel::<Received>(capacity);
        let (finish_tx, finish_rx) = mpsc::channel::<Finished>(capacity);
        let semaphore = Arc::new(Semaphore::new(config.concurrency.max(1)));

        let finisher = tokio::spawn(Arc::clone(&shared).finisher(finish_rx));
        let starter = tokio::spawn(Arc::clone(&shared).starter(
            intake_rx,
            lane_done_rx,
            finish_tx,
            semaphore,
            shutdown.clone(),
            fleet::Holding::new(hold_rx),
        ));
        let reporter = tokio::spawn(Arc::clone(&shared).reporter());
        let marker = tokio::spawn(Arc::clone(&shared).marker());
        let http_stop = CancellationToken::new();
        let http = listener.map(|listener| {
            tokio::spawn(Arc::clone(&shared).serve_http(
                listener,
                config.http_routes.clone(),
                shutdown.clone(),
                http_stop.clone(),
            ))
        });
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(Arc::clone(&shared).relay(relay_stop.clone()));
        // Leases are renewed until the last running task has ended.
        let leases_stop = CancellationToken::new();
        let leases = shared
            .registry
            .has_limits()
            .then(|| tokio::spawn(Arc::clone(&shared).leases(leases_stop.clone())));
        let retention = config.retention.clone().map(|retention| {
            tokio::spawn(retention::run(
                shared.store.clone(),
                retention,
                shutdown.clone(),
            ))
        });
        let schedules = tokio::spawn(schedules::run(
            shared.store.clone(),
            shared.producer.clone(),
            shutdown.clone(),
        ));
        let watch_stop = CancellationToken::new();
        let watcher = config.topic_pattern.clone().map(|pattern| {
            let watch = topics::Watch {
                pattern,
                named: config.topics.clone(),
                every: config.topic_refresh,
                layout: config.layout,
                excluded: config.metrics_topic.iter().cloned().collect(),
            };
            tokio::spawn(Arc::clone(&shared).watch_topics(watch, watch_stop.clone()))
        });
        let stop_polling = CancellationToken::new();
        let intake = tokio::spawn(Arc::clone(&shared).intake(
            intake_tx,
            shutdown.clone(),
            stop_polling.clone(),
        ));

        shutdown.cancelled().await;
        tracing::info!(
            timeout_s = config.shutdown_timeout.as_secs_f64(),
            "stopping: nothing new starts; finishing the running tasks while the consumer keeps serving its group"
        );

        let stages = [
            starter.abort_handle(),
            finisher.abort_handle(),
            relay.abort_handle(),
        ];
        // Finish the running tasks, then publish the next steps they queued.
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            let _ = starter.await;
            let _ = finisher.await;
            shared.dead_letter_tasks.close();
            shared.dead_letter_tasks.wait().await;
            relay_stop.cancel();
            let _ = relay.await;
        })
        .await;
        reporter.abort();
        marker.abort();
        watch_stop.cancel();
        if let Some(watcher) = watcher {
            // A listing in progress is not waited for.
            watcher.abort();
        }
        if let Some(publisher) = metric_records {
            publisher.finish().await;
        }
        // It stops at the shutdown signal; a round in progress rolls back.
        let _ = schedules.await;
        if let Some(retention) = retention {
            // It stops at the shutdown signal, a batch cut short at most.
            let _ = retention.await;
        }
        leases_stop.cancel();
        if let Some(leases) = leases {
            let _ = leases.await;
        }
        let mut stats = shared.counters.snapshot();
        if drained.is_err() {
            shared.abandon.cancel();
            for stage in stages {
                stage.abort();
            }
        }
        stats.abandoned = shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unfinished() as u64;
        if drained.is_err() {
            tracing::warn!(
                abandoned = stats.abandoned,
                "shutdown timeout passed; abandoning unfinished work, which will be delivered again"
            );
        }
        stop_polling.cancel();
        let _ = intake.await;
        let consumer = shared.consumer();
        if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %err, "final commit");
        }
        // Leave the group now (the revoke commits once more); dropping the
        // consumer closes it.
        consumer.unsubscribe();
        drop(consumer);
        http_stop.cancel();
        if let Some(http) = http {
            let _ = http.await;
        }
        fleet.abort();
        shared.stopped(&config.worker_id, &stats).await;
        tracing::info!(?stats, "worker stopped");
        Ok(stats)
    }
}

impl Shared {
    /// The consumer as it is now (it is replaced after a fatal error).
    fn consumer(&self) -> Arc<StreamConsumer<KserContext>> {
        Arc::clone(&self.consumer.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs a database write until it succeeds or fails for good. Errors a
    /// retry can cure (an outage, a deadlock: [`Recovery::Transient`]) are
    /// retried with backoff; a permanent one is returned at once, never
    /// retried. An error kser cannot place ([`Recovery::Unclassified`]) is
    /// returned as permanent if a known-good write goes through meanwhile
    /// ([`Store::probe_write`]), and waited out as an outage if not. `None`
    /// when the shutdown deadline passed.
    async fn retry_db<T, F, Fut>(&self, what: &str, mut write: F) -> Option<Result<T, StoreError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            let written = write().await;
            telemetry::wrote(what, started.elapsed());
            let err = match written {
                Ok(value) => return Some(Ok(value)),
                Err(err) => err,
            };
            let retry_in_ms = delay.as_millis() as u64;
            match err.recovery() {
                Recovery::Permanent => return Some(Err(err)),
                Recovery::Unclassified => match self.store.probe_write().await {
                    Ok(()) => {
                        tracing::warn!(error = %err, "could not {what}: Postgres refused the statement with an error kser does not know, while it takes a known-good write; the statement is at fault, so it is not retried");
                        return Some(Err(err));
                    }
                    Err(probe) => {
                        tracing::warn!(error = %err, probe = %probe, retry_in_ms, "could not {what}, nor write a known-good row; retrying")
                    }
                },
                // A grant revoked while the worker runs: an operator's fix,
                // so waited out, but said as what it is.
                _ if err.to_string().contains("permission denied") => tracing::error!(
                    error = %err, retry_in_ms,
                    "could not {what}: the worker's role lacks a privilege; {}; retrying until it is granted (see README, \"Least privilege\")",
                    crate::store::WORKER_PRIVILEGES
                ),
                _ => tracing::warn!(error = %err, retry_in_ms, "could not {what}; retrying"),
            }
            tokio::select! {
                () = self.abandon.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes `items` in one statement, waiting out outages (see
    /// [`retry_db`](Self::retry_db)). If Postgres refuses the statement for
    /// good, the batch is halved and each half written the same way, down
    /// to single items: a batch of 1,000 with one bad item costs about 20
    /// statements, and every other item is written. Returns what each
    /// successful write returned and, for each item refused on its own, its
    /// index and the error; `None` when the shutdown deadline passed.
    async fn write_isolating<'a, T, R, F, Fut>(
        &self,
        what: &str,
        items: &'a [T],
        mut write: F,
    ) -> Option<Isolated<R>>
    where
        F: FnMut(&'a [T]) -> Fut,
        Fut: std::future::Future<Output = Result<R, StoreError>>,
    {
        let mut isolated = Isolated {
            written: Vec::new(),
            refused: Vec::new(),
        };
        // Ranges still to write, the next one last.
        let mut pending = Vec::with_capacity(64);
        pending.push(0..items.len());
        while let Some(range) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            let slice = &items[range.clone()];
            match self.retry_db(what, || write(slice)).await? {
                Ok(written) => isolated.written.push(written),
                Err(err) if range.len() == 1 => isolated.refused.push((range.start, err)),
                Err(err) => {
                    tracing::debug!(rows = range.len(), error = %err, "Postgres refused a batch for good; splitting it to find the rows at fault");
                    let middle = range.start + range.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
        }
        Some(isolated)
    }

    /// Marks records finished and stores the offsets that became safe.
    fn release(&self, positions: &[Position]) {
        if positions.is_empty() {
            return;
        }
        let mut safe = Vec::new();
        {
            let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            for position in positions {
                if let Some(offset) = tracker.complete(position) {
                    safe.push((Arc::clone(&position.topic), position.partition, offset));
                }
            }
        }
        let consumer = self.consumer();
        for (topic, partition, offset) in safe {
            // `store_offset(o)` commits o + 1: the next record to read.
            if let Err(err) = consumer.store_offset(&topic, partition, offset) {
                tracing::debug!(topic = %topic, partition, offset, error = %err, "offset not stored (partition revoked?)");
            }
        }
    }

    /// Logs the counters every 30 seconds while they move.
    async fn reporter(self: Arc<Self>) {
        let mut last = WorkerStats::default();
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let now = self.counters.snapshot();
            if now.received != last.received {
                tracing::info!(
                    received = now.received,
                    succeeded = now.succeeded,
                    failed = now.failed,
                    skipped = now.skipped,
                    rejected = now.rejected,
                    "worker progress"
                );
            }
            last = now;
        }
    }

    /// A task is no longer in flight: releases the copies of its message that
    /// arrived meanwhile (`release_copies`), or leaves them unreleased to be
    /// delivered again (at shutdown).
    fn forget_in_flight(&self, uuid: &str, release_copies: bool) {
        let copies = self
            .lock_in_flight()
            .remove(uuid)
            .map(|task| task.copies)
            .unwrap_or_default();
        if release_copies {
            self.release(&copies);
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`Shared::write_isolating`] wrote and what Postgres refused.
struct Isolated<R> {
    /// What each successful statement returned.
    written: Vec<R>,
    /// The items refused on their own: their index and why.
    refused: Vec<(usize, StoreError)>,
}

/// A task started and not yet recorded final.
#[derive(Default)]
struct InFlight {
    /// The positions of copies of its message that arrived meanwhile: they
    /// are released when it ends, never before, so a copy skipped now is not
    /// lost if this run is abandoned.
    copies: Vec<Position>,
    /// Its RUNNING row, until the marker writes it.
    mark: Option<Mark>,
    /// The attempt running, as claimed: what a panic in kser's own code
    /// records FAILED.
    attempt: Option<StartedTask>,
}

/// When and what to write for a task that runs long.
struct Mark {
    at: tokio::time::Instant,
    row: NewTask,
}

/// Who finishes a task once its run ends.
enum Handed {
    /// The finisher got its outcome.
    ToFinisher,
    /// Nothing to write: it is final, or a newer attempt runs elsewhere.
    Done,
    /// The worker is stopping; it will be delivered again.
    Abandoned,
}

/// What became of a transactional task.
enum Transacted {
    /// It failed (its writes rolled back): record this row, or retry.
    Ran(NewTask, Option<NewOutbox>),
    /// It succeeded: its writes and its SUCCESS are committed; the
    /// operation its step ended, if any.
    Committed(NewTask, Option<FinishedOperation>),
    /// A newer attempt owns the task (or it is final): rolled back.
    Fenced(String),
    /// The worker gave up waiting for the database at shutdown.
    Stop,
}

/// Why a transactional task's transaction rolled back.
enum TxAbort {
    Ran(Box<NewTask>, Option<NewOutbox>),
    Fenced,
    Store(StoreError, Option<Box<NewTask>>),
}

impl From<diesel::result::Error> for TxAbort {
    fn from(err: diesel::result::Error) -> Self {
        Self::Store(StoreError::Query(err), None)
    }
}

/// What became of an ordered task's failed attempt.
enum InPlace {
    /// Recorded, and its backoff has passed: run it again.
    Due,
    /// It cannot be retried after all: record the row as it is.
    Final,
    /// A newer attempt of the task runs elsewhere: record nothing.
    Fenced,
    /// The worker is stopping: leave it for redelivery.
    Stop,
}

/// The error kind of a failed row, as its result says.
fn failure_kind(row: &NewTask) -> &'static str {
    let kind = row
        .result
        .as_ref()
        .and_then(|result| result.get("retval")?.get("error")?.get("kind")?.as_str());
    [
        ErrorKind::InvalidMessage,
        ErrorKind::UnknownEntrypoint,
        ErrorKind::InvalidParams,
        ErrorKind::Retryable,
        ErrorKind::Fatal,
        ErrorKind::Panic,
        ErrorKind::Timeout,
    ]
    .into_iter()
    .map(ErrorKind::as_str)
    .find(|known| Some(*known) == kind)
    .unwrap_or("failed")
}

/// Strips a row of the values Postgres refused and records why.
fn unstorable(row: &mut NewTask, err: &StoreError) {
    let error = format!("could not store the task in Postgres: {err}").replace('\0', "");
    let result = TaskResult::error(500, ErrorKind::InvalidMessage, error.clone(), Value::Null);
    row.status = TaskStatus::Failed.as_str();
    row.params = Value::Object(Default::default());
    row.metadata = Value::Object(Default::default());
    row.result = serde_json::to_value(&result).ok();
    row.error = Some(error);
    row.entrypoint = row.entrypoint.replace('\0', "");
    row.finished_at = Some(Utc::now());
}
