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
//! This file holds the types handed from stage to stage; `settings.rs` the
//! configuration, `shared.rs` the state every stage shares (`Shared`:
//! waiting out the database, storing offsets, counters), and `run.rs`
//! [`Worker::run`], which wires the stages and shuts them down.
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
mod holding;
mod intake;
mod limits;
mod marker;
mod metrics_topic;
mod offsets;
mod operations;
mod ordering;
mod panicked;
mod retention;
mod run;
mod scaling;
mod schedules;
mod settings;
mod shared;
mod start;
mod telemetry;
mod topics;
mod transactional;

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
use settings::record_cost;
pub(crate) use settings::{BufferBudget, buffer_budget};
pub use settings::{
    DEFAULT_MAX_BUFFERED_BYTES, MAX_BUFFERED_BYTES, MIN_BUFFERED_BYTES, WorkerConfig,
};
pub use shared::WorkerStats;
use shared::{Counters, InFlight, Mark, Shared, failure_kind, unstorable};
pub use telemetry::HttpRoutes;
pub use topics::TopicPattern;

/// How long the pipeline may stay full before the worker pauses fetching.
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(5);

/// The wait before the first rebuild of a consumer that hit a fatal error,
/// doubled each time it happens again, up to the maximum.
const REBUILD_DELAY_MIN: Duration = Duration::from_millis(500);
const REBUILD_DELAY_MAX: Duration = Duration::from_secs(10);

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
    pub(super) config: WorkerConfig,
    pub(super) registry: Arc<Registry>,
    pub(super) store: Store,
}
