//! What list and graph operations share: the message that runs a step
//! (`step_message`), merged results, and the types their transactions
//! return. `operations.rs` and `graph/` both use it; neither imports the
//! other's helpers.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::Value;

use super::database::StoreError;
use super::models::{NewOutbox, NewTask, OperationRow, TaskRow, TaskStatus};
use super::schema::kser::operations;
use crate::message::{JsonObject, Message, TaskResult};
use crate::trace::TaskTrace;

/// Metadata key naming the operation a step message belongs to.
pub const OPERATION_METADATA_KEY: &str = "kser_operation";

/// An operation that reached SUCCESS or FAILED, for its finish hook.
#[derive(Debug, Clone)]
pub struct FinishedOperation {
    /// The operation's uuid.
    pub uuid: String,
    /// Its entrypoint.
    pub entrypoint: String,
    /// Its message's metadata.
    pub metadata: JsonObject,
    /// Its result: the merged results of its steps.
    pub result: TaskResult,
}

/// Ends operation `op` with `status`, its steps' `merged` result and
/// `error`, and says so for its finish hook. Called inside the transaction
/// that holds the operation's row.
pub(super) async fn end_operation(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    status: TaskStatus,
    merged: TaskResult,
    error: Option<String>,
) -> Result<FinishedOperation, StoreError> {
    let now = Utc::now();
    diesel::update(operations::table.find(&op.uuid))
        .set((
            operations::status.eq(status.as_str()),
            operations::result.eq(serde_json::to_value(&merged).ok()),
            operations::error.eq(error),
            operations::finished_at.eq(Some(now)),
            operations::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(FinishedOperation {
        uuid: op.uuid.clone(),
        entrypoint: op.entrypoint.clone(),
        metadata: op.metadata.as_object().cloned().unwrap_or_default(),
        result: merged,
    })
}

/// Where `resume` restarted an operation.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// 1-based step number (of the first step started again).
    pub step: i32,
    /// That step's entrypoint.
    pub entrypoint: String,
    /// For a graph operation: the names of the steps started again.
    pub started: Vec<String>,
    /// For a graph operation: the names of the steps still in flight (sent
    /// before it stopped), left to finish rather than sent again; the steps
    /// waiting on them start when they succeed.
    pub running: Vec<String>,
}

/// The message that runs `step`, keyed by the operation uuid so the steps
/// of one operation stay in one partition, in order. Its `traceparent` is
/// the operation's (whose span is the parent of its first step), or, after
/// a step ran, that step's: one operation is one trace.
pub(super) fn step_message(
    op_uuid: &str,
    topic: Option<&str>,
    step: &NewTask,
    op_metadata: &Value,
    forwarded: Option<&TaskResult>,
    previous: Option<&TaskTrace>,
) -> NewOutbox {
    let mut metadata = op_metadata.as_object().cloned().unwrap_or_default();
    metadata.insert(OPERATION_METADATA_KEY.into(), Value::from(op_uuid));
    if let Some(previous) = previous {
        previous.stamp(&mut metadata);
    }
    let message = Message {
        uuid: step.uuid.clone(),
        entrypoint: step.entrypoint.clone(),
        params: step.params.as_object().cloned().unwrap_or_default(),
        result: forwarded.cloned(),
        metadata,
    };
    NewOutbox {
        topic: topic.unwrap_or("kser").to_owned(),
        message_key: Some(op_uuid.to_owned()),
        payload: String::from_utf8_lossy(&message.to_bytes()).into_owned(),
        operation_uuid: Some(op_uuid.to_owned()),
        available_at: None,
    }
}

/// The uuid of the message in an outbox row's payload; `None` when the
/// payload is not a plain kser message (`send --delay --encrypt` queues
/// encrypted ones). Every operation's message is plain: the relay seals
/// messages as it publishes them.
pub(super) fn message_uuid(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        uuid: String,
    }
    serde_json::from_str::<Named>(payload)
        .ok()
        .map(|named| named.uuid)
}

pub(super) fn pending_row(task: &TaskRow) -> NewTask {
    let mut row = NewTask::new(
        task.uuid.clone(),
        task.entrypoint.clone(),
        TaskStatus::Pending,
    );
    row.params = task.params.clone();
    row
}

/// The starting point of an operation's merged result.
pub(super) fn empty_result(op_uuid: &str) -> TaskResult {
    TaskResult {
        uuid: op_uuid.to_owned(),
        ..TaskResult::ok()
    }
}

pub(super) fn parse_result(value: Option<&Value>) -> TaskResult {
    value
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}
