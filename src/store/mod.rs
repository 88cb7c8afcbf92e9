//! Postgres persistence: [`Store`] (a pool of connections), its errors and
//! the migrations are in `database.rs`; the task queries are in `tasks.rs`, the privilege check in
//! `privileges.rs`, statements prepared once per connection in `prepared.rs`,
//! and each other concern in a file of its own
//! (operations, graphs, retries, dead letters, workers, pools, schedules,
//! prune, the console's aggregates).
//!
//! Every write is one statement over many rows, so a batch of a thousand
//! messages costs one round trip. Writes never move a task out of a final
//! state (SUCCESS, FAILED): a redelivered or duplicate message cannot undo
//! or redo finished work.

mod console;
mod database;
mod dead_letters;
mod events;
mod graph;
mod minutes;
mod models;
mod operation_control;
mod operations;
mod outbox;
mod pools;
mod prepared;
mod privileges;
mod prune;
mod recovery;
mod retries;
mod schedules;
mod schema;
mod steps;
mod tasks;
mod workers;

pub use console::{EntrypointFailures, MinuteCount, StatusCount};
pub(crate) use database::WORKER_PRIVILEGES;
pub use database::{Store, StoreError};
pub(crate) use dead_letters::NewDeadLetter;
pub use dead_letters::StoredDeadLetter;
pub use events::EventRow;
pub use models::{AttemptRow, NewOperation, NewTask, OperationRow, StepRow, TaskRow, TaskStatus};
pub(crate) use models::{NewOutbox, OutboxRow};
pub use operation_control::RunningStep;
pub use operations::OperationStart;
pub use pools::PoolRow;
pub(crate) use pools::{Admission, LeaseRequest, entrypoint_pool};
pub use prune::prune_batch_statements;
pub use prune::{DEFAULT_PRUNE_BATCH, PRUNE_LOCK, PruneRequest, Pruned};
pub use recovery::Recovery;
pub(crate) use retries::Retry;
pub(crate) use schedules::ScheduleFiring;
pub use schedules::{NewSchedule, ScheduleRow};
pub use steps::{FinishedOperation, OPERATION_METADATA_KEY, Resumed};
pub use tasks::{StartedTask, TaskFilter};
pub(crate) use workers::{Beat, NewWorker};
pub use workers::{Control, ControlAction, WorkerRow, WorkerState};
