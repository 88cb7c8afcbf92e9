//! Where a task or an operation stands, by uuid, and waiting for it to end:
//! what `status`, `list`, `watch`, `send --wait`, the console and
//! `POST /api/v1/send?wait=` show.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::time::Instant;

use crate::message::Message;
use crate::producer::Producer;
use crate::store::{AttemptRow, OperationRow, StepRow, Store, StoreError, TaskRow, TaskStatus};

/// What a uuid names.
#[derive(Debug, Clone)]
pub enum Status {
    /// An operation and its tasks, in order, with their places in the
    /// graph for a graph operation (empty for a list).
    Operation(OperationRow, Vec<TaskRow>, Vec<StepRow>),
    /// A task and its earlier failed attempts.
    Task(TaskRow, Vec<AttemptRow>),
}

/// The operation or task with this uuid, operations first.
pub async fn lookup(store: &Store, uuid: &str) -> Result<Option<Status>, StoreError> {
    if let Some(operation) = store.operation(uuid).await? {
        let tasks = store.operation_tasks(uuid).await?;
        let graph = if operation.graph {
            store.operation_graph(uuid).await?
        } else {
            Vec::new()
        };
        return Ok(Some(Status::Operation(operation, tasks, graph)));
    }
    let Some(task) = store.task(uuid).await? else {
        return Ok(None);
    };
    let attempts = if task.attempts > 1 {
        store.task_attempts(uuid).await?
    } else {
        Vec::new()
    };
    Ok(Some(Status::Task(task, attempts)))
}

impl Status {
    /// The stored status: PENDING, RUNNING, SUCCESS, FAILED, CANCELLED, or
    /// for an operation COMPENSATING or COMPENSATED.
    pub fn status(&self) -> &str {
        match self {
            Self::Operation(op, ..) => &op.status,
            Self::Task(task, _) => &task.status,
        }
    }

    /// Whether it ended, and how; `None` while it is PENDING or RUNNING.
    pub fn outcome(&self) -> Option<TaskStatus> {
        self.status()
            .parse::<TaskStatus>()
            .ok()
            .filter(|status| status.is_final())
    }

    /// When it was recorded.
    pub fn created_at(&self) -> DateTime<Utc> {
        match self {
            Self::Operation(op, ..) => op.created_at,
            Self::Task(task, _) => task.created_at,
        }
    }

    /// The row as JSON with a `kind` field; an operation has a `tasks` array,
    /// a task an `attempt_history` array.
    pub fn to_json(&self) -> Value {
        let (kind, mut value) = match self {
            Self::Operation(op, tasks, graph) => {
                let mut value = serde_json::to_value(op).unwrap_or_default();
                value["tasks"] = serde_json::to_value(tasks).unwrap_or_default();
                if op.graph {
                    value["steps"] = serde_json::to_value(graph).unwrap_or_default();
                }
                ("operation", value)
            }
            Self::Task(task, attempts) => {
                let mut value = serde_json::to_value(task).unwrap_or_default();
                value["attempt_history"] = serde_json::to_value(attempts).unwrap_or_default();
                ("task", value)
            }
        };
        value["kind"] = Value::from(kind);
        value
    }
}

/// How [`wait`] ended.
#[derive(Debug, Clone)]
pub enum Waited {
    /// It ended (SUCCESS, FAILED or CANCELLED): [`Status::outcome`] says how.
    Ended(Status),
    /// The timeout passed first; the work goes on. The last status seen,
    /// `None` when no worker had recorded it yet.
    TimedOut(Option<Status>),
}

/// The first pause between two looks at the database in [`wait`].
const FIRST_LOOK: Duration = Duration::from_millis(20);
/// The longest pause between two looks: a task ending is seen within this.
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// Waits until the task or operation `uuid` ends, or `timeout` passes.
///
/// It looks up its row by primary key (two index lookups, and one more for
/// an operation's steps) after 20 ms, then half as long again each time up
/// to one look every 500 ms: a short task is answered within a few tens of
/// milliseconds, and a long wait costs two cheap queries a second. Waiting
/// is cancel-safe: drop the future to stop.
pub async fn wait(store: &Store, uuid: &str, timeout: Duration) -> Result<Waited, StoreError> {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_LOOK;
    loop {
        let found = lookup(store, uuid).await?;
        if let Some(status) = found.as_ref().filter(|s| s.outcome().is_some()) {
            return Ok(Waited::Ended(status.clone()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::TimedOut(found));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 3 / 2).min(LONGEST_PAUSE);
    }
}

/// Errors from [`send_and_wait`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The message could not be sent.
    #[error(transparent)]
    Send(#[from] crate::producer::ProducerError),
    /// The database could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Request/reply: publishes `message` to `topic` and waits, as [`wait`]
/// does, for its task or operation to end. A worker must be consuming
/// `topic` and writing to `store`'s database.
pub async fn send_and_wait(
    producer: &Producer,
    store: &Store,
    topic: &str,
    message: &Message,
    timeout: Duration,
) -> Result<Waited, WaitError> {
    producer.send(topic, message).await?;
    Ok(wait(store, &message.uuid, timeout).await?)
}
