//! The worker: consume, record, run, record, commit.
//!
//! Records flow through three stages joined by bounded channels, so memory
//! stays bounded and a slow stage slows the consumer instead of piling up:
//!
//! 1. **intake** reads records from Kafka and tracks their offsets;
//! 2. **starter** decodes a batch, marks all its tasks RUNNING in one
//!    statement (skipping those already final: redeliveries and duplicates),
//!    and spawns each task, at most `concurrency` at a time;
//! 3. **finisher** writes a batch of final states in one statement, then
//!    releases their offsets.
//!
//! An offset is stored for commit only once its task's final state is
//! committed in Postgres and every earlier offset of the partition is too
//! ([`offsets::OffsetTracker`]), so a crash at any point loses nothing: the
//! uncommitted records are delivered again and whatever had not finished
//! runs again. A database outage pauses the pipeline; nothing is marked
//! FAILED because Postgres blinked.

mod consumer;
mod context;
mod dead_letter;
mod decode;
mod offsets;
mod operations;
mod ordering;

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
    FinishedOperation, NewOutbox, NewTask, Retry, StartedTask, Store, StoreError, TaskStatus,
};
use crate::task::TaskContext;
use consumer::ConsumerSpec;
pub use consumer::GroupProtocol;
use context::KserContext;
use dead_letter::DeadLetter;
pub use dead_letter::DeadLetters;
use decode::{Decoded, decode};
use offsets::{OffsetTracker, Position};
pub use ordering::Ordering;
use ordering::{Lane, Lanes};

/// How long the pipeline may stay full before the worker pauses fetching.
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(5);

/// The wait before the first rebuild of a consumer that hit a fatal error,
/// doubled each time it happens again, up to the maximum.
const REBUILD_DELAY_MIN: Duration = Duration::from_millis(500);
const REBUILD_DELAY_MAX: Duration = Duration::from_secs(10);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub kafka: KafkaConfig,
    /// Topics to consume; missing ones are created with `layout`.
    pub topics: Vec<String>,
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
}

impl WorkerConfig {
    /// Defaults: concurrency 64, batches of 1000 rows, 30 s to shut down.
    pub fn new(kafka: KafkaConfig, topics: Vec<String>, group: impl Into<String>) -> Self {
        Self {
            kafka,
            topics,
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
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Errors that stop a worker from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("Kafka consumer error: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not create the Kafka producer: {0}")]
    Producer(String),
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
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    skipped: AtomicU64,
    rejected: AtomicU64,
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
    /// A failed attempt that will be retried: back to PENDING, the attempt
    /// recorded, the message queued until its backoff has passed.
    Retry,
    /// A transactional task whose SUCCESS is committed already: nothing to
    /// write, only its offset to release.
    Committed,
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
    in_flight: Mutex<HashSet<String>>,
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
        let mut topics = config.topics.clone();
        for topic in &config.topics {
            match &config.dead_letters {
                DeadLetters::Disabled => {}
                DeadLetters::Suffix => topics.push(crate::dead_letter::default_topic(topic)),
                DeadLetters::Topic(dlq) => topics.push(dlq.clone()),
            }
        }
        topics.dedup();
        admin::ensure_topics(&config.kafka, &topics, config.layout).await?;

        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let spec = ConsumerSpec {
            kafka: config.kafka.clone(),
            group: config.group.clone(),
            protocol: config.group_protocol,
            instance_id: config.instance_id.clone(),
            topics: config.topics.clone(),
        };
        let consumer = spec.create(&tracker)?;
        tracing::info!(
            worker = %config.worker_id,
            group = %config.group,
            group_protocol = %config.group_protocol,
            ordering = %config.ordering,
            instance_id = config.instance_id.as_deref().unwrap_or("-"),
            topics = %config.topics.join(","),
            concurrency = config.concurrency,
            "worker started"
        );

        let (lane_done, lane_done_rx) = mpsc::unbounded_channel();
        let transaction_slots = self.store.max_connections().saturating_sub(4).max(1);
        let shared = Arc::new(Shared {
            transactions: Semaphore::new(transaction_slots),
            ordering: config.ordering,
            lane_done,
            consumer: RwLock::new(Arc::new(consumer)),
            spec,
            tracker,
            store: self.store,
            registry: self.registry,
            counters: Counters::default(),
            in_flight: Mutex::new(HashSet::new()),
            worker_id: config.worker_id.clone(),
            batch_size: config.batch_size.max(1),
            abandon: CancellationToken::new(),
            producer: Producer::new(&config.kafka)
                .map_err(|err| WorkerError::Producer(err.to_string()))?,
            relay_wakeup: tokio::sync::Notify::new(),
            dead_letter_tasks: tokio_util::task::TaskTracker::new(),
            retry: config.retry,
            dead_letters: config.dead_letters.clone(),
        });

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
        ));
        let reporter = tokio::spawn(Arc::clone(&shared).reporter());
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(Arc::clone(&shared).relay(relay_stop.clone()));
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
        tracing::info!(?stats, "worker stopped");
        Ok(stats)
    }
}

impl Shared {
    /// The consumer as it is now (it is replaced after a fatal error).
    fn consumer(&self) -> Arc<StreamConsumer<KserContext>> {
        Arc::clone(&self.consumer.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Stage 1: feeds the pipeline with records until shutdown, then keeps
    /// serving the consumer (rebalances, heartbeats) until the worker closes
    /// it, so a stopping worker never holds up its group.
    async fn intake(
        self: Arc<Self>,
        intake_tx: mpsc::Sender<Received>,
        shutdown: CancellationToken,
        stop_polling: CancellationToken,
    ) {
        self.feed(intake_tx, &shutdown).await;
        let consumer = self.consumer();
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        let mut ignored = 0_u64;
        loop {
            tokio::select! {
                biased;
                () = stop_polling.cancelled() => break,
                record = consumer.recv() => match record {
                    // Not tracked: the partition's next owner reads it again.
                    Ok(_) => ignored += 1,
                    Err(_) if consumer.client().fatal_error().is_some() => break,
                    Err(err) => {
                        tracing::debug!(error = %err, "Kafka consumer error while stopping");
                        tokio::select! {
                            () = stop_polling.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                }
            }
        }
        if ignored > 0 {
            tracing::debug!(
                ignored,
                "records fetched while stopping were left for the next owner of their partitions"
            );
        }
    }

    /// Reads records into the pipeline until shutdown; rebuilds the consumer
    /// when it hits a fatal error.
    async fn feed(&self, intake_tx: mpsc::Sender<Received>, shutdown: &CancellationToken) {
        let mut consumer = self.consumer();
        let mut topic_names: Vec<Arc<str>> = Vec::new();
        // Records that arrived while fetching was paused (partitions
        // assigned meanwhile are not paused): handed over first.
        let mut stash: VecDeque<Received> = VecDeque::new();
        let mut rebuild_delay = REBUILD_DELAY_MIN;
        loop {
            let received = match stash.pop_front() {
                Some(received) => received,
                None => {
                    let record = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        record = consumer.recv() => record,
                    };
                    let error = match record {
                        Ok(record) => {
                            rebuild_delay = REBUILD_DELAY_MIN;
                            Ok(self.received(&record, &mut topic_names))
                        }
                        Err(err) => Err(err),
                    };
                    match error {
                        Ok(received) => received,
                        Err(_) if consumer.client().fatal_error().is_some() => {
                            let fatal = consumer.client().fatal_error();
                            let Some(fresh) =
                                self.rebuild(fatal, &mut rebuild_delay, shutdown).await
                            else {
                                return;
                            };
                            let old = std::mem::replace(&mut consumer, fresh);
                            // Closing a consumer blocks; keep it off the runtime.
                            tokio::task::spawn_blocking(move || drop(old));
                            continue;
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "Kafka consumer error; the client retries by itself");
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                            }
                        }
                    }
                }
            };
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = tokio::time::timeout(STALL_BEFORE_PAUSE, intake_tx.reserve()) => permit,
            };
            let permit = match permit {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return,
                // The pipeline stays full (the database is away, tasks are
                // slow): stop fetching, but keep polling so the consumer
                // group does not take this worker for dead.
                Err(_) => {
                    let paused = consumer.assignment().unwrap_or_default();
                    if consumer.pause(&paused).is_ok() {
                        tracing::warn!(
                            "the pipeline is full (is the database away?); pausing fetch until it drains"
                        );
                    }
                    let permit = loop {
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return,
                            permit = intake_tx.reserve() => break permit,
                            record = consumer.recv() => {
                                if let Ok(record) = record {
                                    stash.push_back(self.received(&record, &mut topic_names));
                                }
                            }
                        }
                    };
                    let Ok(permit) = permit else { return };
                    if consumer.resume(&paused).is_ok() {
                        tracing::info!("the pipeline drains again; resuming fetch");
                    }
                    permit
                }
            };
            permit.send(received);
        }
    }

    /// Replaces a consumer that hit a fatal error (librdkafka cannot go on
    /// with it) with a new one, after a backoff that grows while the error
    /// comes back. Everything the old one received is forgotten: it will be
    /// delivered again. `None` on shutdown.
    async fn rebuild(
        &self,
        fatal: Option<(RDKafkaErrorCode, String)>,
        delay: &mut Duration,
        shutdown: &CancellationToken,
    ) -> Option<Arc<StreamConsumer<KserContext>>> {
        let (code, reason) = fatal.unwrap_or((RDKafkaErrorCode::Fatal, String::new()));
        let hint = if code == RDKafkaErrorCode::UnreleasedInstanceId {
            "; its group.instance.id is still held by an earlier member (one killed before it \
             could leave?) until the broker's session timeout releases it"
        } else {
            ""
        };
        tracing::error!(
            error_code = ?code, error = %reason, retry_in_ms = delay.as_millis() as u64,
            "the Kafka consumer hit a fatal error and cannot go on; building a new one{hint}"
        );
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .revoke_all();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(*delay) => {}
            }
            *delay = (*delay * 2).min(REBUILD_DELAY_MAX);
            match self.spec.create(&self.tracker) {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    *self
                        .consumer
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
                    tracing::info!("new Kafka consumer created; joining the group again");
                    return Some(fresh);
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "could not create the Kafka consumer; retrying");
                }
            }
        }
    }

    /// Tracks a record's offset and copies what the pipeline needs of it.
    fn received(
        &self,
        record: &rdkafka::message::BorrowedMessage<'_>,
        topic_names: &mut Vec<Arc<str>>,
    ) -> Received {
        let topic = match topic_names.iter().find(|t| t.as_ref() == record.topic()) {
            Some(topic) => Arc::clone(topic),
            None => {
                let topic: Arc<str> = Arc::from(record.topic());
                topic_names.push(Arc::clone(&topic));
                topic
            }
        };
        let position = self
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .track(&topic, record.partition(), record.offset());
        Counters::add(&self.counters.received, 1);
        let millis = record.timestamp().to_millis();
        Received {
            position,
            original: Arc::new(Original {
                key: record.key().map(<[u8]>::to_vec),
                payload: record.payload().map(<[u8]>::to_vec),
                timestamp: millis,
            }),
            timestamp: millis.and_then(DateTime::from_timestamp_millis),
        }
    }

    /// Stage 2: decodes batches, then starts their tasks in order and as
    /// concurrency slots free up. A record waits while an earlier record of
    /// its lane (its key, or its partition, per [`Ordering`]) has no final
    /// state. Each group of tasks that got a slot is marked RUNNING, its
    /// attempt counted, in one statement, and only then runs. So `attempts` counts runs,
    /// and a task waiting for a slot or for its turn is not shown as RUNNING.
    ///
    /// Records of a partition revoked meanwhile, and every record not started
    /// once the worker is stopping, are dropped from the pipeline
    /// unfinished: their offsets are not committed, so they are delivered
    /// again to whoever owns the partition next.
    async fn starter(
        self: Arc<Self>,
        mut intake_rx: mpsc::Receiver<Received>,
        mut lane_done_rx: mpsc::UnboundedReceiver<Lane>,
        finish_tx: mpsc::Sender<Finished>,
        semaphore: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let mut running = JoinSet::new();
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut lanes: Lanes<Candidate> = Lanes::new();
        let mut ready: VecDeque<Candidate> = VecDeque::new();
        // Records waiting for their lane are held here, not in librdkafka:
        // past this many, stop reading until lanes move.
        let max_waiting = self.batch_size * 4;
        loop {
            while let Ok(lane) = lane_done_rx.try_recv() {
                ready.extend(lanes.release(&lane));
            }
            if shutdown.is_cancelled() {
                ready.clear();
                lanes.clear();
            }
            if ready.is_empty() {
                tokio::select! {
                    received = intake_rx.recv_many(&mut batch, self.batch_size),
                        if lanes.waiting() < max_waiting =>
                    {
                        if received == 0 {
                            break;
                        }
                        while running.try_join_next().is_some() {}
                        if shutdown.is_cancelled() {
                            batch.clear();
                            continue;
                        }
                        for candidate in self.prepare_batch(batch.drain(..), &finish_tx).await {
                            let lane = candidate.lane.clone();
                            ready.extend(lanes.admit(lane.as_ref(), candidate));
                        }
                    }
                    lane = lane_done_rx.recv() => match lane {
                        Some(lane) => ready.extend(lanes.release(&lane)),
                        None => break,
                    },
                    () = shutdown.cancelled(), if !lanes.is_empty() => {}
                }
                continue;
            }
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => continue,
                permit = Arc::clone(&semaphore).acquire_owned() => permit,
            };
            let Ok(first) = first else { return };
            let mut permits = vec![first];
            while permits.len() < ready.len() {
                match Arc::clone(&semaphore).try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let mut group = Vec::with_capacity(permits.len());
            for candidate in ready.drain(..permits.len()) {
                if self.is_current(&candidate.position) {
                    group.push(candidate);
                } else if let Some(lane) = candidate.lane {
                    // Its partition was revoked: the lane's next record
                    // (dropped in turn) may be of a partition still ours.
                    self.lane_done(lane);
                }
            }
            let started = self.start_group(group, &finish_tx).await;
            for (task, permit) in started.into_iter().zip(permits) {
                let shared = Arc::clone(&self);
                let finish_tx = finish_tx.clone();
                let semaphore = Arc::clone(&semaphore);
                let shutdown = shutdown.clone();
                running.spawn(async move {
                    shared
                        .run_task(task, permit, semaphore, finish_tx, shutdown)
                        .await;
                });
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Tells the starter that the record holding `lane` is done with it.
    fn lane_done(&self, lane: Lane) {
        let _ = self.lane_done.send(lane);
    }

    /// Runs a task and hands its outcome to the finisher. Under an ordering
    /// a failed attempt is retried here, in place, after its backoff: the
    /// records behind it in its lane wait, and its offset stays uncommitted.
    /// (Without one, retries go through the outbox and block nothing.)
    async fn run_task(
        self: Arc<Self>,
        mut task: Ready,
        permit: tokio::sync::OwnedSemaphorePermit,
        semaphore: Arc<Semaphore>,
        finish_tx: mpsc::Sender<Finished>,
        shutdown: CancellationToken,
    ) {
        let mut permit = Some(permit);
        loop {
            let position = task.position.clone();
            let original = Arc::clone(&task.original);
            let lane = task.lane.clone();
            let enqueued_at = task.enqueued_at;
            let (mut row, resend) = if self.registry.is_transactional(&task.message.entrypoint) {
                match self.execute_transactional(task).await {
                    Transacted::Ran(row, resend) => (row, resend),
                    Transacted::Committed(row, operation) => {
                        drop(permit.take());
                        if let Some(operation) = operation {
                            self.relay_wakeup.notify_one();
                            self.operation_finished(operation);
                        }
                        let finished = Finished {
                            position,
                            row,
                            kind: Outcome::Committed,
                            resend: None,
                            original,
                            lane,
                        };
                        let _ = finish_tx.send(finished).await;
                        return;
                    }
                    Transacted::Fenced(uuid) => {
                        tracing::info!(task.uuid = %uuid, "a newer attempt owns the task; this one rolled back");
                        Counters::add(&self.counters.skipped, 1);
                        self.lock_in_flight().remove(&uuid);
                        self.release(&[position]);
                        if let Some(lane) = lane {
                            self.lane_done(lane);
                        }
                        return;
                    }
                    Transacted::Stop => return,
                }
            } else {
                self.execute(task, None).await
            };
            drop(permit.take());
            let kind = match &resend {
                Some(_) if self.ordering == Ordering::None => Outcome::Retry,
                None if row.operation_uuid.is_some() => Outcome::Step,
                None => Outcome::Ran,
                Some(again) => {
                    match self.retry_in_place(&mut row, &shutdown).await {
                        InPlace::Due => {}
                        InPlace::Final => {
                            let kind = if row.operation_uuid.is_some() {
                                Outcome::Step
                            } else {
                                Outcome::Ran
                            };
                            let finished = Finished {
                                position,
                                row,
                                kind,
                                resend: None,
                                original,
                                lane,
                            };
                            let _ = finish_tx.send(finished).await;
                            return;
                        }
                        InPlace::Fenced => {
                            self.release(&[position]);
                            if let Some(lane) = lane {
                                self.lane_done(lane);
                            }
                            return;
                        }
                        InPlace::Stop => return,
                    }
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return,
                        permit = Arc::clone(&semaphore).acquire_owned() => permit,
                    };
                    let Ok(next) = next else { return };
                    permit = Some(next);
                    let Decoded::Message(message) =
                        decode(Some(again.payload.as_bytes()), self.producer.secretbox())
                    else {
                        return;
                    };
                    let candidate = Candidate {
                        position: position.clone(),
                        message,
                        enqueued_at,
                        original,
                        lane,
                    };
                    if !self.is_current(&position) {
                        if let Some(lane) = candidate.lane {
                            self.lane_done(lane);
                        }
                        return;
                    }
                    let mut started = self.start_group(vec![candidate], &finish_tx).await;
                    match started.pop() {
                        Some(next) => {
                            task = next;
                            continue;
                        }
                        None => return,
                    }
                }
            };
            let finished = Finished {
                position,
                row,
                kind,
                resend,
                original,
                lane,
            };
            let _ = finish_tx.send(finished).await;
            return;
        }
    }

    /// Runs a transactional task in a transaction on kser's database that
    /// also records its SUCCESS, fenced by its attempt: its writes and its
    /// final state commit together. A failed run rolls back and comes back
    /// to be recorded (or retried) like any task's; a lost connection runs
    /// the attempt again once the database is back.
    async fn execute_transactional(&self, task: Ready) -> Transacted {
        let mut delay = Duration::from_millis(100);
        let mut failures = 0;
        let Ok(_slot) = self.transactions.acquire().await else {
            return Transacted::Stop;
        };
        loop {
            let attempt = task.clone();
            let outcome = match self.store.conn().await {
                Ok(mut conn) => {
                    use diesel_async::AsyncConnection as _;
                    conn.transaction::<_, TxAbort, _>(async move |conn| {
                        let (row, resend) = self.execute(attempt, Some(&mut *conn)).await;
                        if resend.is_some() || row.status != TaskStatus::Success.as_str() {
                            return Err(TxAbort::Ran(Box::new(row), resend));
                        }
                        match Store::complete_in(conn, &row).await {
                            Ok(Some(operation)) => Ok((row, operation)),
                            Ok(None) => Err(TxAbort::Fenced),
                            Err(err) => Err(TxAbort::Store(err, Some(Box::new(row)))),
                        }
                    })
                    .await
                }
                Err(err) => Err(TxAbort::Store(err, None)),
            };
            let err = match outcome {
                Ok((row, operation)) => return Transacted::Committed(row, operation),
                Err(TxAbort::Ran(row, resend)) => return Transacted::Ran(*row, resend),
                Err(TxAbort::Fenced) => return Transacted::Fenced(task.message.uuid),
                Err(TxAbort::Store(err, Some(row))) if !err.is_connection_error() => {
                    // The run succeeded but its state could not be stored:
                    // its writes rolled back; record why, without them.
                    let mut row = *row;
                    unstorable(&mut row, &err);
                    return Transacted::Ran(row, None);
                }
                Err(TxAbort::Store(err, _)) => err,
            };
            failures += usize::from(!err.is_connection_error());
            if failures >= 5 {
                let mut row = NewTask::new(
                    task.message.uuid.clone(),
                    task.message.entrypoint.clone(),
                    TaskStatus::Failed,
                );
                row.attempts = task.started.attempts;
                row.operation_uuid = task.started.operation_uuid.clone();
                row.position = task.started.position;
                unstorable(&mut row, &err);
                return Transacted::Ran(row, None);
            }
            tracing::warn!(task.uuid = %task.message.uuid, error = %err, retry_in_ms = delay.as_millis() as u64, "the task's transaction failed; running it again");
            tokio::select! {
                () = self.abandon.cancelled() => return Transacted::Stop,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Records a failed attempt of an ordered task and waits out its
    /// backoff. `Final` when the task cannot be retried after all (the row
    /// then says FAILED, or the attempt was fenced), `Stop` on shutdown.
    async fn retry_in_place(&self, row: &mut NewTask, shutdown: &CancellationToken) -> InPlace {
        let retry = Retry {
            row: row.clone(),
            message: None,
        };
        let single = std::slice::from_ref(&retry);
        match self
            .retry_db("record a retry", || self.store.retry_tasks(single))
            .await
        {
            None => return InPlace::Stop,
            // A newer attempt runs elsewhere: this one has nothing to record.
            Some(Ok(0)) => return InPlace::Fenced,
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                tracing::warn!(task.uuid = %row.uuid, error = %err, "could not record the retry; the task fails");
                row.status = TaskStatus::Failed.as_str();
                row.next_attempt_at = None;
                return InPlace::Final;
            }
        }
        Counters::add(&self.counters.retried, 1);
        let wait = row
            .next_attempt_at
            .map(|due| (due - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or_default();
        tokio::select! {
            () = shutdown.cancelled() => InPlace::Stop,
            () = tokio::time::sleep(wait) => InPlace::Due,
        }
    }

    /// Whether a record's partition is still this worker's, as it was when
    /// the record arrived.
    fn is_current(&self, position: &Position) -> bool {
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_current(position)
    }

    /// Decodes a batch: records invalid messages, starts operations, skips
    /// duplicates, and returns the tasks that may run.
    async fn prepare_batch(
        self: &Arc<Self>,
        batch: impl Iterator<Item = Received>,
        finish_tx: &mpsc::Sender<Finished>,
    ) -> Vec<Candidate> {
        let now = Utc::now();
        let mut candidates = Vec::new();
        let mut release = Vec::new();
        let mut operations = Vec::new();
        let mut dead = Vec::new();
        let mut seen = HashSet::new();
        for received in batch {
            match decode(
                received.original.payload.as_deref(),
                self.producer.secretbox(),
            ) {
                Decoded::Message(message) => {
                    let duplicate = !seen.insert(message.uuid.clone())
                        || self.lock_in_flight().contains(&message.uuid);
                    if duplicate {
                        tracing::info!(task.uuid = %message.uuid, "duplicate of a message in flight; skipped");
                        Counters::add(&self.counters.skipped, 1);
                        release.push(received.position);
                        continue;
                    }
                    if self.registry.is_operation(&message.entrypoint) {
                        operations.push((received, message));
                        continue;
                    }
                    let lane = ordering::lane(
                        self.ordering,
                        &received.position,
                        received.original.key.as_deref(),
                    );
                    candidates.push(Candidate {
                        position: received.position,
                        message,
                        enqueued_at: received.timestamp,
                        original: received.original,
                        lane,
                    });
                }
                Decoded::Invalid {
                    uuid: Some(uuid),
                    entrypoint,
                    error,
                } => {
                    let position = &received.position;
                    tracing::warn!(
                        task.uuid = %uuid, topic = %position.topic, partition = position.partition,
                        offset = position.offset, error = %error, "invalid message"
                    );
                    let row = self.invalid_row(uuid, entrypoint, error, &received, now);
                    let finished = Finished {
                        position: received.position,
                        row,
                        kind: Outcome::Rejected,
                        resend: None,
                        original: received.original,
                        lane: None,
                    };
                    if finish_tx.send(finished).await.is_err() {
                        return Vec::new();
                    }
                }
                Decoded::Invalid {
                    uuid: None, error, ..
                } => {
                    let position = received.position;
                    tracing::warn!(
                        topic = %position.topic, partition = position.partition,
                        offset = position.offset, error = %error,
                        "rejected a record that is not a kser message and has no uuid"
                    );
                    Counters::add(&self.counters.rejected, 1);
                    dead.push(DeadLetter {
                        position,
                        original: received.original,
                        kind: ErrorKind::InvalidMessage.as_str(),
                        error,
                        attempts: 1,
                        uuid: None,
                    });
                }
            }
        }
        self.release(&release);
        // Records without a uuid exist nowhere but in the dead-letter topic:
        // their offsets move only once it has them.
        self.dead_letter_later(dead);
        if !operations.is_empty() && !self.start_operations(operations, now).await {
            return Vec::new();
        }
        candidates
    }

    /// Marks a group of tasks that got a concurrency slot RUNNING in one
    /// statement, and returns those to run: not those already final.
    async fn start_group(
        &self,
        group: Vec<Candidate>,
        finish_tx: &mpsc::Sender<Finished>,
    ) -> Vec<Ready> {
        if group.is_empty() {
            return Vec::new();
        }
        let now = Utc::now();
        let rows = group
            .iter()
            .map(|candidate| self.running_row(candidate, now))
            .collect();
        let Some(mut started) = self.write_started(rows).await else {
            return Vec::new();
        };
        let mut ready = Vec::with_capacity(started.len());
        let mut already_final = Vec::new();
        for Candidate {
            position,
            message,
            enqueued_at,
            original,
            lane,
        } in group
        {
            match started.remove(&message.uuid) {
                Some(Start::Run(started)) => {
                    self.lock_in_flight().insert(message.uuid.clone());
                    ready.push(Ready {
                        position,
                        message,
                        started: *started,
                        enqueued_at,
                        original,
                        lane,
                    });
                }
                Some(Start::Refused(row)) => {
                    let finished = Finished {
                        position,
                        row: *row,
                        kind: Outcome::Rejected,
                        resend: None,
                        original,
                        lane,
                    };
                    if finish_tx.send(finished).await.is_err() {
                        return Vec::new();
                    }
                }
                None => {
                    tracing::info!(task.uuid = %message.uuid, "task already finished; not run again");
                    already_final.push(position);
                    if let Some(lane) = lane {
                        self.lane_done(lane);
                    }
                }
            }
        }
        Counters::add(&self.counters.skipped, already_final.len());
        self.release(&already_final);
        ready
    }

    /// Writes RUNNING rows, waiting out database outages. A row Postgres
    /// refuses (a value it cannot store) comes back as a FAILED row to record
    /// instead of running. `None` when the shutdown deadline passed.
    async fn write_started(&self, rows: Vec<NewTask>) -> Option<HashMap<String, Start>> {
        let batch = self
            .retry_db("record started tasks", || self.store.start_tasks(&rows))
            .await?;
        let mut started = HashMap::new();
        match batch {
            Ok(attempts) => {
                started.extend(
                    attempts
                        .into_iter()
                        .map(|(uuid, n)| (uuid, Start::Run(Box::new(n)))),
                );
            }
            Err(_) => {
                for row in rows {
                    let single = std::slice::from_ref(&row);
                    match self
                        .retry_db("record a started task", || self.store.start_tasks(single))
                        .await?
                    {
                        Ok(attempts) => started.extend(
                            attempts
                                .into_iter()
                                .map(|(uuid, n)| (uuid, Start::Run(Box::new(n)))),
                        ),
                        Err(err) => {
                            tracing::warn!(task.uuid = %row.uuid, error = %err, "Postgres refused the task; recording it as FAILED");
                            let mut failed = row;
                            unstorable(&mut failed, &err);
                            started.insert(failed.uuid.clone(), Start::Refused(Box::new(failed)));
                        }
                    }
                }
            }
        }
        Some(started)
    }

    /// Runs one task and returns its row after the attempt, and the message
    /// to send again if the attempt failed and will be retried.
    async fn execute(
        &self,
        task: Ready,
        conn: Option<&mut diesel_async::AsyncPgConnection>,
    ) -> (NewTask, Option<NewOutbox>) {
        let Ready {
            position,
            mut message,
            started,
            enqueued_at,
            ..
        } = task;
        let position = &position;
        let attempt = started.attempts;
        let forwarded = message.result.clone();
        let span = tracing::info_span!("task", task.uuid = %message.uuid, entrypoint = %message.entrypoint, attempt);
        let started_at = Utc::now();
        let ctx = TaskContext {
            uuid: message.uuid.clone(),
            entrypoint: message.entrypoint.clone(),
            attempt: u32::try_from(attempt).unwrap_or(1),
            metadata: message.metadata.clone(),
            forwarded: forwarded.clone(),
            topic: position.topic.to_string(),
            partition: position.partition,
            offset: position.offset,
            worker: self.worker_id.clone(),
            operation: started.operation_uuid.clone().zip(started.position),
        };
        let params = Value::Object(message.params.clone());
        let policy = self
            .registry
            .retry_policy(&message.entrypoint)
            .unwrap_or(self.retry);
        let params_object = std::mem::take(&mut message.params);
        let run = async move {
            match conn {
                Some(conn) => self.registry.run_in(ctx, params_object, conn).await,
                None => self.registry.run(ctx, params_object).await,
            }
        }
        .instrument(span.clone());
        let result = match policy.timeout {
            None => run.await,
            Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                TaskResult::error(
                    504,
                    ErrorKind::Timeout,
                    format!("timed out after {:.3}s", limit.as_secs_f64()),
                    Value::Null,
                )
            }),
        };
        let status = if result.is_success() {
            TaskStatus::Success
        } else {
            TaskStatus::Failed
        };
        let mut row = NewTask::new(message.uuid, message.entrypoint, status);
        row.error = result.failure_message();
        match &row.error {
            None => tracing::debug!(parent: &span, "task succeeded"),
            Some(error) => tracing::warn!(parent: &span, error = %error, "task failed"),
        }
        row.params = params;
        row.metadata = Value::Object(message.metadata);
        row.result = serde_json::to_value(&result).ok();
        row.attempts = attempt;
        self.locate(&mut row, position, enqueued_at);
        row.started_at = Some(started_at);
        row.finished_at = Some(Utc::now());
        row.operation_uuid = started.operation_uuid;
        row.position = started.position;
        let attempt_number = u32::try_from(attempt).unwrap_or(u32::MAX);
        if !policy.should_retry(attempt_number, result.error_kind()) {
            return (row, None);
        }
        let wait = policy.backoff(attempt_number);
        let due = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        tracing::info!(parent: &span, retry_in_ms = wait.as_millis() as u64, "will retry");
        row.status = TaskStatus::Pending.as_str();
        row.next_attempt_at = Some(due);
        let again = Message {
            uuid: row.uuid.clone(),
            entrypoint: row.entrypoint.clone(),
            params: row.params.as_object().cloned().unwrap_or_default(),
            result: forwarded,
            metadata: row.metadata.as_object().cloned().unwrap_or_default(),
        };
        let resend = NewOutbox {
            topic: position.topic.to_string(),
            // Steps stay keyed by their operation, tasks by their uuid.
            message_key: Some(
                row.operation_uuid
                    .clone()
                    .unwrap_or_else(|| row.uuid.clone()),
            ),
            payload: String::from_utf8_lossy(&again.to_bytes()).into_owned(),
            operation_uuid: row.operation_uuid.clone(),
            available_at: Some(due),
        };
        (row, Some(resend))
    }

    fn locate(&self, row: &mut NewTask, position: &Position, enqueued_at: Option<DateTime<Utc>>) {
        row.worker = Some(self.worker_id.clone());
        row.topic = Some(position.topic.to_string());
        row.kafka_partition = Some(position.partition);
        row.kafka_offset = Some(position.offset);
        row.enqueued_at = enqueued_at;
    }

    fn running_row(&self, candidate: &Candidate, now: DateTime<Utc>) -> NewTask {
        let message = &candidate.message;
        let mut row = NewTask::new(
            message.uuid.clone(),
            message.entrypoint.clone(),
            TaskStatus::Running,
        );
        row.params = Value::Object(message.params.clone());
        row.metadata = Value::Object(message.metadata.clone());
        row.attempts = 1;
        self.locate(&mut row, &candidate.position, candidate.enqueued_at);
        row.started_at = Some(now);
        row.updated_at = now;
        row
    }

    fn invalid_row(
        &self,
        uuid: String,
        entrypoint: Option<String>,
        error: String,
        received: &Received,
        now: DateTime<Utc>,
    ) -> NewTask {
        let result = TaskResult::error(400, ErrorKind::InvalidMessage, error.clone(), Value::Null);
        let mut row = NewTask::new(uuid, entrypoint.unwrap_or_default(), TaskStatus::Failed);
        row.result = serde_json::to_value(&result).ok();
        row.error = Some(error);
        row.attempts = 1;
        self.locate(&mut row, &received.position, received.timestamp);
        row.started_at = Some(now);
        row.finished_at = Some(now);
        row
    }

    /// Stage 3: writes final states in batches, then releases their offsets.
    async fn finisher(self: Arc<Self>, mut finish_rx: mpsc::Receiver<Finished>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        while finish_rx.recv_many(&mut batch, self.batch_size).await > 0 {
            let mut seen = HashSet::new();
            let mut by_kind: [(Outcome, Vec<NewTask>); 3] = [
                (Outcome::Ran, Vec::new()),
                (Outcome::Step, Vec::new()),
                (Outcome::Rejected, Vec::new()),
            ];
            let mut retries = Vec::new();
            let mut positions = Vec::with_capacity(batch.len());
            let mut originals = HashMap::with_capacity(batch.len());
            let mut done_lanes = Vec::new();
            let mut committed = Vec::new();
            for Finished {
                position,
                row,
                kind,
                resend,
                original,
                lane,
            } in batch.drain(..)
            {
                done_lanes.extend(lane);
                // Only failures are dead-lettered; keep their records.
                if row.status == TaskStatus::Failed.as_str() || kind == Outcome::Retry {
                    originals
                        .entry(row.uuid.clone())
                        .or_insert_with(|| (position.clone(), original));
                }
                positions.push(position);
                // Two invalid records with one uuid: the first one wins.
                if !seen.insert(row.uuid.clone()) {
                    Counters::add(&self.counters.skipped, 1);
                } else if kind == Outcome::Committed {
                    committed.push(row);
                } else if let Some(message) = resend {
                    retries.push(Retry {
                        row,
                        message: Some(message),
                    });
                } else if let Some((_, rows)) = by_kind.iter_mut().find(|(k, _)| *k == kind) {
                    rows.push(row);
                }
            }
            // A retry Postgres refuses is recorded as a final failure instead.
            let Some(unretried) = self.write_retries(&retries).await else {
                return;
            };
            for mut row in unretried {
                row.status = TaskStatus::Failed.as_str();
                row.next_attempt_at = None;
                let kind = if row.operation_uuid.is_some() {
                    Outcome::Step
                } else {
                    Outcome::Ran
                };
                if let Some((_, rows)) = by_kind.iter_mut().find(|(k, _)| *k == kind) {
                    rows.push(row);
                }
            }
            let mut finished_operations = Vec::new();
            for (kind, rows) in &by_kind {
                let Some(finished) = self.write_finished(rows, *kind).await else {
                    return;
                };
                finished_operations.extend(finished);
            }
            if !by_kind[1].1.is_empty() {
                self.relay_wakeup.notify_one();
            }
            for operation in finished_operations {
                self.operation_finished(operation);
            }
            // FAILED messages go to the dead-letter topic, and their offsets
            // move only once it has them (steps excepted: `resume` runs those
            // again). The other offsets of the batch move now.
            let dead: Vec<DeadLetter> = [&by_kind[0].1, &by_kind[2].1]
                .into_iter()
                .flatten()
                .filter(|row| row.status == TaskStatus::Failed.as_str())
                .filter_map(|row| {
                    let (position, original) = originals.get(&row.uuid)?;
                    Some(DeadLetter {
                        position: position.clone(),
                        original: Arc::clone(original),
                        kind: failure_kind(row),
                        error: row.error.clone().unwrap_or_default(),
                        attempts: row.attempts,
                        uuid: Some(row.uuid.clone()),
                    })
                })
                .collect();
            positions.retain(|position| {
                !dead.iter().any(|d| {
                    d.position.offset == position.offset
                        && d.position.partition == position.partition
                        && d.position.topic == position.topic
                })
            });
            self.dead_letter_later(dead);
            let rows = by_kind.iter().flat_map(|(_, rows)| rows).chain(&committed);
            let succeeded = rows
                .clone()
                .filter(|row| row.status == TaskStatus::Success.as_str())
                .count();
            Counters::add(&self.counters.succeeded, succeeded);
            Counters::add(&self.counters.failed, rows.clone().count() - succeeded);
            {
                let mut in_flight = self.lock_in_flight();
                for row in rows.chain(retries.iter().map(|r| &r.row)) {
                    in_flight.remove(&row.uuid);
                }
            }
            self.release(&positions);
            for lane in done_lanes {
                self.lane_done(lane);
            }
        }
    }

    /// Records failed attempts that will be retried, waiting out database
    /// outages. Returns the rows Postgres refused (to record as final
    /// failures), or `None` when the shutdown deadline passed.
    async fn write_retries(&self, retries: &[Retry]) -> Option<Vec<NewTask>> {
        if retries.is_empty() {
            return Some(Vec::new());
        }
        let mut refused = Vec::new();
        match self
            .retry_db("record retries", || self.store.retry_tasks(retries))
            .await?
        {
            Ok(_) => {}
            Err(_) => {
                for retry in retries {
                    let single = std::slice::from_ref(retry);
                    if let Err(err) = self
                        .retry_db("record a retry", || self.store.retry_tasks(single))
                        .await?
                    {
                        tracing::warn!(task.uuid = %retry.row.uuid, error = %err, "could not record the retry; the task fails");
                        refused.push(retry.row.clone());
                    }
                }
            }
        }
        Counters::add(&self.counters.retried, retries.len() - refused.len());
        Some(refused)
    }

    /// Writes final rows, waiting out database outages; a row Postgres
    /// refuses is stored without the offending values. Returns the
    /// operations that finished, or `None` when the shutdown deadline passed
    /// before the write.
    async fn write_finished(
        &self,
        rows: &[NewTask],
        kind: Outcome,
    ) -> Option<Vec<FinishedOperation>> {
        if rows.is_empty() {
            return Some(Vec::new());
        }
        if let Ok(finished) = self
            .retry_db("record finished tasks", || self.write_outcomes(rows, kind))
            .await?
        {
            return Some(finished);
        }
        let mut finished = Vec::new();
        for row in rows {
            let single = std::slice::from_ref(row);
            let err = match self
                .retry_db("record a finished task", || {
                    self.write_outcomes(single, kind)
                })
                .await?
            {
                Ok(done) => {
                    finished.extend(done);
                    continue;
                }
                Err(err) => err,
            };
            let mut stripped = row.clone();
            unstorable(&mut stripped, &err);
            let single = std::slice::from_ref(&stripped);
            // A step still moves its operation along (to FAILED).
            let kind = if kind == Outcome::Step {
                Outcome::Step
            } else {
                Outcome::Rejected
            };
            match self
                .retry_db("record an unstorable task", || {
                    self.write_outcomes(single, kind)
                })
                .await?
            {
                Ok(done) => {
                    finished.extend(done);
                    tracing::warn!(task.uuid = %row.uuid, error = %err, "stored the task without values Postgres refused");
                }
                Err(err) => {
                    tracing::error!(task.uuid = %row.uuid, error = %err, "Postgres refused the task's state; it is only in this log");
                }
            }
        }
        Some(finished)
    }

    async fn write_outcomes(
        &self,
        rows: &[NewTask],
        kind: Outcome,
    ) -> Result<Vec<FinishedOperation>, StoreError> {
        match kind {
            Outcome::Ran => self.store.complete_tasks(rows).await.map(|_| Vec::new()),
            Outcome::Step => self.store.complete_steps(rows).await,
            Outcome::Rejected | Outcome::Retry => {
                self.store.finish_tasks(rows).await.map(|_| Vec::new())
            }
            Outcome::Committed => Ok(Vec::new()),
        }
    }

    /// Runs a database write until it succeeds or fails on its data. Outages
    /// are retried with backoff; `None` when the shutdown deadline passed.
    async fn retry_db<T, F, Fut>(&self, what: &str, mut write: F) -> Option<Result<T, StoreError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match write().await {
                Ok(value) => return Some(Ok(value)),
                Err(err) if err.is_data_error() => return Some(Err(err)),
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "could not {what}; retrying");
                    tokio::select! {
                        () = self.abandon.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
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

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
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

/// What became of a message the starter recorded.
enum Start {
    /// Run it: its attempt number and operation.
    Run(Box<StartedTask>),
    /// Postgres refused the row; record this FAILED row instead.
    Refused(Box<NewTask>),
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
