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
mod error;
mod execute;
mod finish;
mod fleet;
mod holding;
mod http;
mod intake;
mod limits;
mod marker;
mod metrics_topic;
mod offsets;
mod operations;
mod ordering;
mod panicked;
mod pipeline;
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

pub use consumer::GroupProtocol;
pub use error::WorkerError;
pub use fleet::{FleetConfig, pause_lock_file};
pub use http::HttpRoutes;
pub use ordering::Ordering;
pub use retention::{DEFAULT_RETENTION_EVERY, Retention};
pub(crate) use run::PIPELINE_CONNECTIONS;
pub use run::Worker;
pub(crate) use settings::BufferBudget;
pub use settings::DeadLetters;
pub use settings::TopicPattern;
pub use settings::{
    DEFAULT_MAX_BUFFERED_BYTES, MAX_BUFFERED_BYTES, MIN_BUFFERED_BYTES, WorkerConfig,
};
pub use shared::WorkerStats;
