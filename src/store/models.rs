//! Rows of `kser.tasks` as Rust types: [`TaskRow`] to read, [`NewTask`] to write.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::schema::kser::{operations, outbox, steps, task_attempts, tasks};

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    /// Sent, not yet picked up by a worker.
    Pending,
    /// A worker started it.
    Running,
    /// It returned a result with retcode 0.
    Success,
    /// It failed; `error` says why.
    Failed,
    /// Its operation was cancelled before it ran (or, for an operation,
    /// between two steps); or, for a graph step, it will not run because a
    /// step it needed failed or did not run.
    Cancelled,
    /// A graph step waiting for its dependencies: no message yet.
    Waiting,
    /// A graph step `resume` did not run again (its recovery policy is
    /// `skip`); the steps after it ran as if it had succeeded.
    Skipped,
    /// A graph operation undoing the steps that succeeded.
    Compensating,
    /// A graph operation that failed and whose compensations all succeeded.
    Compensated,
}

impl TaskStatus {
    /// The states a task can still leave.
    pub const UNFINISHED: [&'static str; 2] = ["PENDING", "RUNNING"];

    /// The name stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Success => "SUCCESS",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Waiting => "WAITING",
            Self::Skipped => "SKIPPED",
            Self::Compensating => "COMPENSATING",
            Self::Compensated => "COMPENSATED",
        }
    }

    /// Whether the task or operation is over (SUCCESS, FAILED, CANCELLED,
    /// SKIPPED or COMPENSATED).
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            Self::Pending | Self::Running | Self::Waiting | Self::Compensating
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PENDING" => Ok(Self::Pending),
            "RUNNING" => Ok(Self::Running),
            "SUCCESS" => Ok(Self::Success),
            "FAILED" => Ok(Self::Failed),
            "CANCELLED" => Ok(Self::Cancelled),
            "WAITING" => Ok(Self::Waiting),
            "SKIPPED" => Ok(Self::Skipped),
            "COMPENSATING" => Ok(Self::Compensating),
            "COMPENSATED" => Ok(Self::Compensated),
            _ => Err(format!(
                "unknown status '{s}' (expected PENDING, RUNNING, SUCCESS, FAILED, CANCELLED, \
                 WAITING, SKIPPED, COMPENSATING or COMPENSATED)"
            )),
        }
    }
}

/// One row of `kser.tasks`, as `status` and `list` show it.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, utoipa::ToSchema)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct TaskRow {
    /// The message uuid: the task (or operation) it names.
    pub uuid: String,
    /// The entrypoint the message is routed by.
    pub entrypoint: String,
    /// PENDING, RUNNING, SUCCESS, FAILED... ([`TaskStatus`]).
    pub status: String,
    /// The parameters, a JSON object.
    pub params: Value,
    /// The message's free-form metadata, a JSON object.
    pub metadata: Value,
    /// The result in the kser wire format (uuid, retcode, stdout, stderr, retval).
    pub result: Option<Value>,
    /// Why it failed; `None` unless it failed.
    pub error: Option<String>,
    /// How many runs were recorded (retries and redeliveries count).
    pub attempts: i32,
    /// The worker (`host:pid`) that ran it last.
    pub worker: Option<String>,
    /// The Kafka topic of its message.
    pub topic: Option<String>,
    /// The partition of its message.
    pub kafka_partition: Option<i32>,
    /// The offset of its message.
    pub kafka_offset: Option<i64>,
    /// The Kafka record timestamp: when its message was produced.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When the row was written first.
    pub created_at: DateTime<Utc>,
    /// When a worker started it (the last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// The operation it is a step of, if any.
    pub operation_uuid: Option<String>,
    /// Its place in its operation, from 0.
    pub position: Option<i32>,
    /// When a retry is due; `None` unless one is scheduled.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// A row to insert or upsert: a sent message, a started task or a finished one.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct NewTask {
    /// The message uuid: the task (or operation) it names.
    pub uuid: String,
    /// The entrypoint the message is routed by.
    pub entrypoint: String,
    /// PENDING, RUNNING, SUCCESS, FAILED... ([`TaskStatus`]).
    pub status: &'static str,
    /// The parameters, a JSON object.
    pub params: Value,
    /// The message's free-form metadata, a JSON object.
    pub metadata: Value,
    /// The result in the kser wire format (uuid, retcode, stdout, stderr, retval).
    pub result: Option<Value>,
    /// Why it failed; `None` unless it failed.
    pub error: Option<String>,
    /// How many runs were recorded (retries and redeliveries count).
    pub attempts: i32,
    /// The worker (`host:pid`) that ran it last.
    pub worker: Option<String>,
    /// The Kafka topic of its message.
    pub topic: Option<String>,
    /// The partition of its message.
    pub kafka_partition: Option<i32>,
    /// The offset of its message.
    pub kafka_offset: Option<i64>,
    /// The Kafka record timestamp: when its message was produced.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When a worker started it (the last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// The operation it is a step of, if any.
    pub operation_uuid: Option<String>,
    /// Its place in its operation, from 0.
    pub position: Option<i32>,
    /// When a retry is due; `None` unless one is scheduled.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The trace of the attempt that produced this row, if its message
    /// carried one (or its operation started one): the parent of the next
    /// step's message. Not a column.
    #[diesel(skip_insertion)]
    pub trace: Option<crate::trace::TaskTrace>,
}

impl NewTask {
    /// A row with the given identity and status and every other field empty.
    pub fn new(uuid: String, entrypoint: String, status: TaskStatus) -> Self {
        Self {
            uuid,
            entrypoint,
            status: status.as_str(),
            params: Value::Object(Default::default()),
            metadata: Value::Object(Default::default()),
            result: None,
            error: None,
            attempts: 0,
            worker: None,
            topic: None,
            kafka_partition: None,
            kafka_offset: None,
            enqueued_at: None,
            started_at: None,
            finished_at: None,
            updated_at: Utc::now(),
            operation_uuid: None,
            position: None,
            next_attempt_at: None,
            trace: None,
        }
    }
}

/// One row of `kser.operations`.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, utoipa::ToSchema)]
#[diesel(table_name = operations, check_for_backend(diesel::pg::Pg))]
pub struct OperationRow {
    /// The message uuid: the task (or operation) it names.
    pub uuid: String,
    /// The entrypoint the message is routed by.
    pub entrypoint: String,
    /// PENDING, RUNNING, SUCCESS, FAILED... ([`TaskStatus`]).
    pub status: String,
    /// The parameters, a JSON object.
    pub params: Value,
    /// The message's free-form metadata, a JSON object.
    pub metadata: Value,
    /// The result in the kser wire format (uuid, retcode, stdout, stderr, retval).
    pub result: Option<Value>,
    /// Why it failed; `None` unless it failed.
    pub error: Option<String>,
    /// How many steps the operation has.
    pub steps: i32,
    /// The worker (`host:pid`) that ran it last.
    pub worker: Option<String>,
    /// The Kafka topic of its message.
    pub topic: Option<String>,
    /// The Kafka record timestamp: when its message was produced.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When the row was written first.
    pub created_at: DateTime<Utc>,
    /// When a worker started it (the last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// Whether its steps form a graph (`kser.steps`) rather than a list.
    pub graph: bool,
}

/// An operation to record when its message arrives.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = operations, check_for_backend(diesel::pg::Pg))]
pub struct NewOperation {
    /// The message uuid: the task (or operation) it names.
    pub uuid: String,
    /// The entrypoint the message is routed by.
    pub entrypoint: String,
    /// PENDING, RUNNING, SUCCESS, FAILED... ([`TaskStatus`]).
    pub status: &'static str,
    /// The parameters, a JSON object.
    pub params: Value,
    /// The message's free-form metadata, a JSON object.
    pub metadata: Value,
    /// The result in the kser wire format (uuid, retcode, stdout, stderr, retval).
    pub result: Option<Value>,
    /// Why it failed; `None` unless it failed.
    pub error: Option<String>,
    /// How many steps the operation has.
    pub steps: i32,
    /// The worker (`host:pid`) that ran it last.
    pub worker: Option<String>,
    /// The Kafka topic of its message.
    pub topic: Option<String>,
    /// The Kafka record timestamp: when its message was produced.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When a worker started it (the last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// Whether its steps form a graph (`kser.steps`) rather than a list.
    pub graph: bool,
}

/// A message waiting in `kser.outbox`.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub(crate) struct OutboxRow {
    /// The row id, in insertion order.
    pub id: i64,
    /// The Kafka topic of its message.
    pub topic: String,
    /// The Kafka record key.
    pub message_key: Option<String>,
    /// The message as it is published (JSON, or sealed when encrypted).
    pub payload: String,
}

/// A message to publish once the transaction that writes it commits.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub(crate) struct NewOutbox {
    /// The Kafka topic of its message.
    pub topic: String,
    /// The Kafka record key.
    pub message_key: Option<String>,
    /// The message as it is published (JSON, or sealed when encrypted).
    pub payload: String,
    /// The operation it is a step of, if any.
    pub operation_uuid: Option<String>,
    /// Not published before then (`None`: at once).
    pub available_at: Option<DateTime<Utc>>,
}

/// A failed attempt of a task that was retried.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, Serialize, utoipa::ToSchema)]
#[diesel(table_name = task_attempts, check_for_backend(diesel::pg::Pg))]
pub struct AttemptRow {
    /// The task this row belongs to.
    pub task_uuid: String,
    /// Which attempt failed, from 1.
    pub attempt: i32,
    /// The worker (`host:pid`) that ran it last.
    pub worker: Option<String>,
    /// When a worker started it (the last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// The retcode of its result.
    pub retcode: Option<i32>,
    /// Why it failed; `None` unless it failed.
    pub error: Option<String>,
}

/// A task's place in a graph operation: one row of `kser.steps`.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, Serialize)]
#[diesel(table_name = steps, check_for_backend(diesel::pg::Pg))]
pub struct StepRow {
    /// The task this row belongs to.
    pub task_uuid: String,
    /// The operation it is a step of, if any.
    pub operation_uuid: String,
    /// The step's name in the graph.
    pub name: String,
    /// The names of the steps it waits for.
    pub after: Vec<String>,
    /// Whether one dependency succeeding is enough (`.any()`), not all.
    pub join_any: bool,
    /// `fail`, `continue` or `compensate`.
    pub on_failure: String,
    /// How long to wait after its dependencies, in milliseconds.
    pub delay_ms: i64,
    /// `resume`, `rerun` or `skip`.
    pub recovery: String,
    /// The task that undoes this step: `{"entrypoint", "params"}`.
    pub compensation: Option<Value>,
    /// This task is the compensation of the step named `name`.
    pub compensates: bool,
}
