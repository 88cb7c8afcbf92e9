//! Looking up a uuid as an operation or a task: what `status`, `list` and
//! `watch` show. Rendering it for people is `output.rs`'s job.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::store::{AttemptRow, OperationRow, StepRow, Store, StoreError, TaskRow};

/// What a uuid names.
pub(super) enum Found {
    /// An operation and its tasks, in order, with their places in the
    /// graph for a graph operation.
    Operation(OperationRow, Vec<TaskRow>, Vec<StepRow>),
    /// A task and its earlier failed attempts.
    Task(TaskRow, Vec<AttemptRow>),
}

/// The operation or task with this uuid, operations first.
pub(super) async fn lookup(store: &Store, uuid: &str) -> Result<Option<Found>, StoreError> {
    if let Some(operation) = store.operation(uuid).await? {
        let tasks = store.operation_tasks(uuid).await?;
        let graph = if operation.graph {
            store.operation_graph(uuid).await?
        } else {
            Vec::new()
        };
        return Ok(Some(Found::Operation(operation, tasks, graph)));
    }
    let Some(task) = store.task(uuid).await? else {
        return Ok(None);
    };
    let attempts = if task.attempts > 1 {
        store.task_attempts(uuid).await?
    } else {
        Vec::new()
    };
    Ok(Some(Found::Task(task, attempts)))
}

impl Found {
    pub(super) fn status(&self) -> &str {
        match self {
            Self::Operation(op, ..) => &op.status,
            Self::Task(task, _) => &task.status,
        }
    }

    pub(super) fn created_at(&self) -> DateTime<Utc> {
        match self {
            Self::Operation(op, ..) => op.created_at,
            Self::Task(task, _) => task.created_at,
        }
    }

    /// The row as JSON with a `kind` field; an operation has a `tasks` array.
    pub(super) fn to_json(&self) -> Value {
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
