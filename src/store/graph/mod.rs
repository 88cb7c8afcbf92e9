//! Graph operations in Postgres: releasing the steps whose dependencies
//! succeeded, stopping and compensating, and resuming.
//!
//! Every function here runs inside the transaction of the step that just
//! finished (or of `resume`), with the operation row locked `FOR UPDATE`:
//! the steps of one operation move along one at a time, each seeing what
//! the previous one committed. A step waiting for its dependencies is
//! WAITING and has no message; it is released by a conditional update
//! (WAITING -> PENDING) together with its message in the outbox, so a join
//! whose dependencies finish at the same moment, on two workers or in one
//! batch, is released exactly once.
//!
//! Locks: a finishing step holds its own task row, then waits for the
//! operation. Here, under the operation lock, only rows nobody else can
//! hold are waited for (WAITING steps have no message, compensations are
//! new rows); queued steps and outbox rows are taken with `SKIP LOCKED`, so
//! a step finishing at that moment is left to its own transaction, which
//! comes through here next.
//!
//! Here: [`Graph`] (the operation's steps as loaded) and the moves the others
//! share (`release`, `cancel_waiting`, `finish`). `advance.rs`: a step
//! finished; `compensation.rs`: the compensation chain; `resume.rs`:
//! resuming. They call into this file, never the reverse.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

pub(super) mod advance;
mod compensation;
pub(super) mod resume;

use super::database::StoreError;
use super::models::{NewOutbox, NewTask, OperationRow, StepRow, TaskRow, TaskStatus};
use super::schema::kser::{outbox, steps, tasks};
use super::steps::{
    FinishedOperation, empty_result, end_operation, parse_result, pending_row, step_message,
};
use crate::message::TaskResult;

/// A graph operation's tasks with their place in the graph, in position
/// order: the steps first, then the compensations once they exist.
pub(super) struct Graph {
    nodes: Vec<(TaskRow, StepRow)>,
}

impl Graph {
    pub(super) async fn load(conn: &mut AsyncPgConnection, uuid: &str) -> Result<Self, StoreError> {
        let nodes = tasks::table
            .inner_join(steps::table)
            .filter(tasks::operation_uuid.eq(uuid))
            .order(tasks::position.asc())
            .select((TaskRow::as_select(), StepRow::as_select()))
            .load(conn)
            .await?;
        Ok(Self { nodes })
    }

    fn status(&self, index: usize) -> &str {
        &self.nodes[index].0.status
    }

    fn set_status(&mut self, index: usize, status: TaskStatus) {
        self.nodes[index].0.status = status.as_str().to_owned();
    }

    /// The steps proper, without compensations.
    fn forward(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| !self.nodes[*i].1.compensates)
    }

    fn compensations(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].1.compensates)
    }

    fn named(&self, name: &str) -> Option<usize> {
        self.forward().find(|i| self.nodes[*i].1.name == name)
    }

    /// The WAITING steps that name step `index` in their `after`.
    fn waiting_on(&self, index: usize) -> Vec<usize> {
        let name = &self.nodes[index].1.name;
        self.forward()
            .filter(|i| self.status(*i) == TaskStatus::Waiting.as_str())
            .filter(|i| self.nodes[*i].1.after.contains(name))
            .collect()
    }

    /// Whether the steps after `index` may count on it.
    fn satisfied(&self, index: usize) -> bool {
        matches!(self.status(index), "SUCCESS" | "SKIPPED")
    }

    fn is_unfinished(&self, index: usize) -> bool {
        matches!(self.status(index), "PENDING" | "RUNNING" | "WAITING")
    }

    /// Whether step `index` has been sent and may be running: PENDING (a
    /// graph step is PENDING only with its message queued or out) or
    /// RUNNING. What [`stop`] left is out: it took back the rest.
    fn in_flight(&self, index: usize) -> bool {
        matches!(self.status(index), "PENDING" | "RUNNING")
    }

    /// Whether step `index` may start: every dependency satisfied, or for
    /// an `any` join, one of them.
    fn ready(&self, index: usize) -> bool {
        let step = &self.nodes[index].1;
        let mut deps = step.after.iter().filter_map(|name| self.named(name));
        if step.join_any {
            deps.any(|d| self.satisfied(d))
        } else {
            deps.all(|d| self.satisfied(d))
        }
    }

    /// The merged results of the succeeded dependencies of `index`, in
    /// their declared order; `None` for a step without dependencies.
    fn forwarded(&self, op_uuid: &str, index: usize) -> Option<TaskResult> {
        let step = &self.nodes[index].1;
        if step.after.is_empty() {
            return None;
        }
        let mut merged = empty_result(op_uuid);
        for dep in step.after.iter().filter_map(|name| self.named(name)) {
            if self.status(dep) == TaskStatus::Success.as_str() {
                merged.merge(&parse_result(self.nodes[dep].0.result.as_ref()));
            }
        }
        Some(merged)
    }

    /// The operation's result: the merged results of the steps that
    /// succeeded, in declared order, and with `failures` those of the steps
    /// whose failure ended it (not those that failed with `continue`).
    fn merged(&self, op_uuid: &str, failures: bool) -> TaskResult {
        let mut merged = empty_result(op_uuid);
        for index in self.forward() {
            let (task, step) = &self.nodes[index];
            let counts = task.status == TaskStatus::Success.as_str()
                || (failures
                    && task.status == TaskStatus::Failed.as_str()
                    && step.on_failure != "continue");
            if counts {
                merged.merge(&parse_result(task.result.as_ref()));
            }
        }
        merged
    }
}

/// The message that runs a graph step: keyed by the step's own uuid, so
/// the parallel steps of one operation spread over partitions and workers,
/// and published no earlier than `delay_ms` from now.
pub(super) fn graph_message(
    op: &OperationRow,
    task: &NewTask,
    forwarded: Option<&TaskResult>,
    delay_ms: i64,
    now: DateTime<Utc>,
) -> NewOutbox {
    // Its parent span is the operation's (in `op.metadata`): the same trace.
    let mut message = step_message(
        &op.uuid,
        op.topic.as_deref(),
        task,
        &op.metadata,
        forwarded,
        None,
    );
    message.message_key = Some(task.uuid.clone());
    message.available_at = due(delay_ms, now);
    message
}

/// When a message delayed by `delay_ms` is due (`None`: at once).
pub(super) fn due(delay_ms: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (delay_ms > 0).then(|| now + chrono::Duration::milliseconds(delay_ms))
}

/// WAITING -> PENDING, with the step's message: only if still WAITING, so a
/// step is released once whoever tries.
async fn release(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    index: usize,
    forwarded: Option<&TaskResult>,
) -> Result<(), StoreError> {
    let now = Utc::now();
    let task = &graph.nodes[index].0;
    let released = diesel::update(
        tasks::table
            .find(&task.uuid)
            .filter(tasks::status.eq(TaskStatus::Waiting.as_str())),
    )
    .set((
        tasks::status.eq(TaskStatus::Pending.as_str()),
        tasks::updated_at.eq(now),
    ))
    .execute(conn)
    .await?;
    if released == 1 {
        let message = graph_message(
            op,
            &pending_row(task),
            forwarded,
            graph.nodes[index].1.delay_ms,
            now,
        );
        diesel::insert_into(outbox::table)
            .values(message)
            .execute(conn)
            .await?;
    }
    graph.set_status(index, TaskStatus::Pending);
    Ok(())
}

/// WAITING steps -> CANCELLED with `error`.
async fn cancel_waiting(
    conn: &mut AsyncPgConnection,
    graph: &mut Graph,
    indices: &[usize],
    error: &str,
) -> Result<(), StoreError> {
    if indices.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let uuids: Vec<&str> = indices
        .iter()
        .map(|i| graph.nodes[*i].0.uuid.as_str())
        .collect();
    diesel::update(
        tasks::table
            .filter(tasks::uuid.eq_any(uuids))
            .filter(tasks::status.eq(TaskStatus::Waiting.as_str())),
    )
    .set((
        tasks::status.eq(TaskStatus::Cancelled.as_str()),
        tasks::error.eq(error),
        tasks::finished_at.eq(Some(now)),
        tasks::updated_at.eq(now),
    ))
    .execute(conn)
    .await?;
    for &index in indices {
        graph.set_status(index, TaskStatus::Cancelled);
    }
    Ok(())
}

/// Ends the operation with `status`.
async fn finish(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &Graph,
    status: TaskStatus,
    error: Option<String>,
) -> Result<Option<FinishedOperation>, StoreError> {
    let merged = graph.merged(&op.uuid, status != TaskStatus::Success);
    Ok(Some(end_operation(conn, op, status, merged, error).await?))
}
