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

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::{Value, json};

use super::StoreError;
use super::models::{NewOutbox, NewTask, OperationRow, StepRow, TaskRow, TaskStatus};
use super::schema::kser::{operations, outbox, steps, tasks};
use super::steps::{
    FinishedOperation, OPERATION_METADATA_KEY, Resumed, empty_result, message_uuid, parse_result,
    pending_row, step_message,
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

/// Moves a graph operation along after step `step` finished; `op` is
/// locked.
pub(super) async fn advance(
    conn: &mut AsyncPgConnection,
    op: OperationRow,
    step: &NewTask,
) -> Result<Option<FinishedOperation>, StoreError> {
    let mut graph = Graph::load(conn, &op.uuid).await?;
    let Some(me) = graph.nodes.iter().position(|(t, _)| t.uuid == step.uuid) else {
        return Ok(None);
    };
    if graph.nodes[me].1.compensates {
        return compensation_finished(conn, &op, &mut graph, me).await;
    }
    if op.status == TaskStatus::Compensating.as_str() {
        // A step that was running when the operation began compensating:
        // the compensations start once nothing runs any more.
        return compensate(conn, &op, &mut graph).await;
    }
    if op.status != TaskStatus::Running.as_str() {
        return Ok(None);
    }
    if step.status == TaskStatus::Success.as_str() {
        release_dependents(conn, &op, &mut graph, me).await?;
    } else {
        let (task, node) = &graph.nodes[me];
        let reason = step.error.as_deref().unwrap_or("failed");
        let error = format!(
            "step '{}' ({}) failed: {reason}",
            node.name, task.entrypoint
        );
        match node.on_failure.as_str() {
            "continue" => cancel_unreachable(conn, &mut graph, me).await?,
            "compensate" => {
                stop(conn, &op, &mut graph).await?;
                let now = Utc::now();
                diesel::update(operations::table.find(&op.uuid))
                    .set((
                        operations::status.eq(TaskStatus::Compensating.as_str()),
                        operations::error.eq(format!("{error}; compensating")),
                        operations::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                let mut op = op;
                op.status = TaskStatus::Compensating.as_str().to_owned();
                op.error = Some(error);
                return compensate(conn, &op, &mut graph).await;
            }
            _ => {
                stop(conn, &op, &mut graph).await?;
                return finish(conn, &op, &graph, TaskStatus::Failed, Some(error)).await;
            }
        }
    }
    if graph.forward().any(|i| graph.is_unfinished(i)) {
        return Ok(None);
    }
    finish(conn, &op, &graph, TaskStatus::Success, None).await
}

/// Releases the WAITING steps after `me` (which succeeded) that may start.
async fn release_dependents(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    me: usize,
) -> Result<(), StoreError> {
    let name = graph.nodes[me].1.name.clone();
    let dependents: Vec<usize> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str())
        .filter(|i| graph.nodes[*i].1.after.contains(&name))
        .collect();
    for index in dependents {
        if graph.ready(index) {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
        }
    }
    Ok(())
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

/// After `failed` failed with `continue`: the WAITING steps that can no
/// longer start, and the steps after them, are CANCELLED.
async fn cancel_unreachable(
    conn: &mut AsyncPgConnection,
    graph: &mut Graph,
    failed: usize,
) -> Result<(), StoreError> {
    let mut work = vec![failed];
    while let Some(gone) = work.pop() {
        let name = graph.nodes[gone].1.name.clone();
        let dependents: Vec<usize> = graph
            .forward()
            .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str())
            .filter(|i| graph.nodes[*i].1.after.contains(&name))
            .collect();
        for index in dependents {
            let step = &graph.nodes[index].1;
            let deps: Vec<usize> = step.after.iter().filter_map(|n| graph.named(n)).collect();
            let unreachable = !step.join_any
                || deps
                    .iter()
                    .all(|d| !graph.is_unfinished(*d) && !graph.satisfied(*d));
            if !unreachable {
                continue;
            }
            let why = if graph.status(gone) == TaskStatus::Failed.as_str() {
                "failed"
            } else {
                "did not run"
            };
            let error = format!("not run: it needs step '{name}', which {why}");
            cancel_waiting(conn, graph, &[index], &error).await?;
            work.push(index);
        }
    }
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

/// Stops what has not been sent: the WAITING steps become CANCELLED, and
/// so do the PENDING steps whose message it takes back from the outbox
/// (one no relay holds). A step whose message is out (published, or
/// claimed by a relay that is publishing it) may be running already: it is
/// left PENDING or RUNNING, runs to its end and its outcome is recorded,
/// but it starts nothing while the operation is not RUNNING. A step
/// finishing at this moment (its row locked) is left alone too: it
/// finishes, and starts nothing.
async fn stop(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, Text};

    let withdrawn: Vec<Withdrawn> = diesel::sql_query(
        "DELETE FROM kser.outbox WHERE id IN (SELECT id FROM kser.outbox \
         WHERE operation_uuid = $1 AND (claimed_until IS NULL OR claimed_until < now()) \
         FOR UPDATE SKIP LOCKED) \
         RETURNING payload",
    )
    .bind::<Text, _>(&op.uuid)
    .load(conn)
    .await?;
    let withdrawn: HashSet<String> = withdrawn
        .iter()
        .filter_map(|row| message_uuid(&row.payload))
        .collect();
    let error = "not run: the operation failed";
    let waiting: Vec<usize> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str())
        .collect();
    cancel_waiting(conn, graph, &waiting, error).await?;
    let unsent: Vec<String> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Pending.as_str())
        .map(|i| graph.nodes[i].0.uuid.clone())
        .filter(|uuid| withdrawn.contains(uuid))
        .collect();
    if unsent.is_empty() {
        return Ok(());
    }
    let cancelled: Vec<Completed> = diesel::sql_query(
        "UPDATE kser.tasks SET status = 'CANCELLED', error = $2, finished_at = now(), \
             updated_at = now() \
         WHERE uuid IN (SELECT uuid FROM kser.tasks WHERE uuid = ANY($1) \
             AND status = 'PENDING' FOR UPDATE SKIP LOCKED) \
         RETURNING uuid",
    )
    .bind::<Array<Text>, _>(unsent)
    .bind::<Text, _>(error)
    .load(conn)
    .await?;
    for done in cancelled {
        if let Some(index) = graph.nodes.iter().position(|(t, _)| t.uuid == done.uuid) {
            graph.set_status(index, TaskStatus::Cancelled);
        }
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Withdrawn {
    #[diesel(sql_type = diesel::sql_types::Text)]
    payload: String,
}

#[derive(QueryableByName)]
struct Completed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    uuid: String,
}

/// Starts the compensations of a COMPENSATING operation once none of its
/// steps runs any more: one task per succeeded step that declared one, in
/// the reverse order of their success, the first queued, the others
/// WAITING. With nothing to undo, the operation is COMPENSATED at once.
async fn compensate(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
) -> Result<Option<FinishedOperation>, StoreError> {
    if graph.forward().any(|i| graph.is_unfinished(i)) || graph.compensations().next().is_some() {
        return Ok(None);
    }
    let mut undo: Vec<usize> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Success.as_str())
        .filter(|i| graph.nodes[*i].1.compensation.is_some())
        .collect();
    undo.sort_by_key(|i| {
        let task = &graph.nodes[*i].0;
        std::cmp::Reverse((task.finished_at, task.position))
    });
    if undo.is_empty() {
        let error = op.error.clone();
        return finish(conn, op, graph, TaskStatus::Compensated, error).await;
    }
    let now = Utc::now();
    let mut metadata = op.metadata.as_object().cloned().unwrap_or_default();
    metadata.insert(OPERATION_METADATA_KEY.into(), Value::from(op.uuid.clone()));
    let base = graph
        .nodes
        .iter()
        .filter_map(|(t, _)| t.position)
        .max()
        .unwrap_or(0)
        + 1;
    let mut rows = Vec::with_capacity(undo.len());
    let mut places = Vec::with_capacity(undo.len());
    for (n, &index) in undo.iter().enumerate() {
        let (task, step) = &graph.nodes[index];
        let spec = step.compensation.clone().unwrap_or(Value::Null);
        let entrypoint = spec["entrypoint"].as_str().unwrap_or_default().to_owned();
        let status = if n == 0 {
            TaskStatus::Pending
        } else {
            TaskStatus::Waiting
        };
        let mut row = NewTask::new(uuid::Uuid::new_v4().to_string(), entrypoint, status);
        row.params = spec.get("params").cloned().unwrap_or_else(|| json!({}));
        row.metadata = Value::Object(metadata.clone());
        row.topic = op.topic.clone();
        row.operation_uuid = Some(op.uuid.clone());
        row.position = i32::try_from(n).ok().map(|n| base + n);
        row.updated_at = now;
        places.push(StepRow {
            task_uuid: row.uuid.clone(),
            operation_uuid: op.uuid.clone(),
            name: step.name.clone(),
            after: Vec::new(),
            join_any: false,
            on_failure: "fail".to_owned(),
            delay_ms: 0,
            recovery: "resume".to_owned(),
            compensation: None,
            compensates: true,
        });
        if n == 0 {
            let forwarded = parse_result(task.result.as_ref());
            let message = graph_message(op, &row, Some(&forwarded), 0, now);
            rows.push((row, Some(message)));
        } else {
            rows.push((row, None));
        }
    }
    let (task_rows, messages): (Vec<NewTask>, Vec<Option<NewOutbox>>) = rows.into_iter().unzip();
    diesel::insert_into(tasks::table)
        .values(&task_rows)
        .execute(conn)
        .await?;
    diesel::insert_into(steps::table)
        .values(&places)
        .execute(conn)
        .await?;
    let messages: Vec<NewOutbox> = messages.into_iter().flatten().collect();
    diesel::insert_into(outbox::table)
        .values(&messages)
        .execute(conn)
        .await?;
    Ok(None)
}

/// After compensation `me` finished: the next one is queued, or the
/// operation ends COMPENSATED; a failed compensation ends it FAILED.
async fn compensation_finished(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    me: usize,
) -> Result<Option<FinishedOperation>, StoreError> {
    if op.status != TaskStatus::Compensating.as_str() {
        return Ok(None);
    }
    let (task, step) = &graph.nodes[me];
    if task.status != TaskStatus::Success.as_str() {
        let reason = task.error.as_deref().unwrap_or("failed");
        let error = format!(
            "the compensation of step '{}' ({}) failed: {reason}",
            step.name, task.entrypoint
        );
        return finish(conn, op, graph, TaskStatus::Failed, Some(error)).await;
    }
    let position = task.position;
    let next = graph.compensations().find(|i| {
        graph.nodes[*i].0.position > position && graph.status(*i) != TaskStatus::Success.as_str()
    });
    match next {
        Some(index) => {
            let compensated = graph
                .named(&graph.nodes[index].1.name)
                .map(|i| parse_result(graph.nodes[i].0.result.as_ref()));
            release(conn, op, graph, index, compensated.as_ref()).await?;
            Ok(None)
        }
        None => {
            let error = op
                .error
                .as_deref()
                .map(|e| e.trim_end_matches("; compensating").to_owned());
            finish(conn, op, graph, TaskStatus::Compensated, error).await
        }
    }
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
    Ok(Some(FinishedOperation {
        uuid: op.uuid.clone(),
        entrypoint: op.entrypoint.clone(),
        metadata: op.metadata.as_object().cloned().unwrap_or_default(),
        result: merged,
    }))
}

/// Resumes a FAILED or CANCELLED graph operation (locked): a failed
/// compensation runs again and the ones after it follow; otherwise the
/// steps that did not succeed run again (those declared `rerun` too, those
/// declared `skip` are SKIPPED instead), each as soon as its dependencies
/// are satisfied. Steps that succeeded keep their results.
///
/// A step still in flight (PENDING with its message out, or RUNNING: a
/// sibling of the step that failed, sent before the failure) is not sent
/// again, whatever its recovery: it runs to its end, once, and the steps
/// after it start when it succeeds, since the operation runs again.
pub(super) async fn resume(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
) -> Result<Resumed, StoreError> {
    let mut graph = Graph::load(conn, &op.uuid).await?;
    let now = Utc::now();
    let compensations: Vec<usize> = graph.compensations().collect();
    let (status, restart) = if compensations.is_empty() {
        (
            TaskStatus::Running,
            resume_steps(conn, op, &mut graph, now).await?,
        )
    } else {
        // A compensation still in flight (the operation was cancelled
        // while it ran) would run twice if queued again.
        if let Some(busy) = compensations.iter().find(|i| graph.in_flight(**i)) {
            return Err(StoreError::Conflict(format!(
                "operation {}: the compensation of step '{}' is still {}; \
                 resume once it has ended",
                op.uuid,
                graph.nodes[*busy].1.name,
                graph.status(*busy)
            )));
        }
        let unfinished: Vec<usize> = compensations
            .into_iter()
            .filter(|i| graph.status(*i) != TaskStatus::Success.as_str())
            .collect();
        let Some((&first, rest)) = unfinished.split_first() else {
            return Err(StoreError::Conflict(format!(
                "operation {} has no unfinished compensation to resume",
                op.uuid
            )));
        };
        reset(conn, &mut graph, rest, TaskStatus::Waiting, now).await?;
        reset(conn, &mut graph, &[first], TaskStatus::Waiting, now).await?;
        let compensated = graph
            .named(&graph.nodes[first].1.name)
            .map(|i| parse_result(graph.nodes[i].0.result.as_ref()));
        release(conn, op, &mut graph, first, compensated.as_ref()).await?;
        let restart = Restart {
            first,
            started: vec![first],
            running: Vec::new(),
        };
        (TaskStatus::Compensating, restart)
    };
    diesel::update(operations::table.find(&op.uuid))
        .set((
            operations::status.eq(status.as_str()),
            operations::error.eq(None::<String>),
            operations::finished_at.eq(None::<DateTime<Utc>>),
            operations::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    let names = |indices: &[usize]| -> Vec<String> {
        indices
            .iter()
            .map(|i| graph.nodes[*i].1.name.clone())
            .collect()
    };
    Ok(Resumed {
        step: graph.nodes[restart.first].0.position.unwrap_or(0) + 1,
        entrypoint: graph.nodes[restart.first].0.entrypoint.clone(),
        started: names(&restart.started),
        running: names(&restart.running),
    })
}

/// What [`resume_steps`] did.
struct Restart {
    /// The first step put back (by position): queued, or waiting.
    first: usize,
    /// The steps queued at once.
    started: Vec<usize>,
    /// The steps still in flight, left to finish.
    running: Vec<usize>,
}

/// The forward part of [`resume`].
async fn resume_steps(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    now: DateTime<Utc>,
) -> Result<Restart, StoreError> {
    let mut skip = Vec::new();
    let mut again = Vec::new();
    let mut running = Vec::new();
    for index in graph.forward() {
        let (task, step) = &graph.nodes[index];
        let kept = task.status == TaskStatus::Success.as_str()
            || task.status == TaskStatus::Skipped.as_str();
        if graph.in_flight(index) {
            running.push(index);
            continue;
        }
        match step.recovery.as_str() {
            "rerun" => again.push(index),
            "skip" if !kept => skip.push(index),
            _ if !kept => again.push(index),
            _ => {}
        }
    }
    let still_running = || -> String {
        if running.is_empty() {
            return String::new();
        }
        let names: Vec<&str> = running
            .iter()
            .map(|i| graph.nodes[*i].1.name.as_str())
            .collect();
        format!(" (still running: {})", names.join(", "))
    };
    if again.is_empty() && skip.is_empty() {
        return Err(StoreError::Conflict(format!(
            "operation {} has no unfinished step to resume{}",
            op.uuid,
            still_running()
        )));
    }
    let first = again.iter().chain(&skip).copied().min().unwrap_or_default();
    if !skip.is_empty() {
        let uuids: Vec<&str> = skip
            .iter()
            .map(|i| graph.nodes[*i].0.uuid.as_str())
            .collect();
        diesel::update(tasks::table.filter(tasks::uuid.eq_any(uuids)))
            .set((
                tasks::status.eq(TaskStatus::Skipped.as_str()),
                tasks::error.eq(Some("skipped by resume")),
                tasks::finished_at.eq(Some(now)),
                tasks::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        for &index in &skip {
            graph.set_status(index, TaskStatus::Skipped);
        }
    }
    // Everything to run again waits first, so a dependency run again is not
    // counted as satisfied by what it did before.
    reset(conn, graph, &again, TaskStatus::Waiting, now).await?;
    let mut started = Vec::new();
    for &index in &again {
        if graph.ready(index) {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
            started.push(index);
        }
    }
    if started.is_empty() {
        // Only skips: what waited on them may go now, or it is all done.
        let ready: Vec<usize> = graph
            .forward()
            .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str() && graph.ready(*i))
            .collect();
        for index in ready {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
            started.push(index);
        }
    }
    // Nothing queued is fine while a step still in flight will release
    // what waits on it.
    if started.is_empty() && running.is_empty() {
        return Err(StoreError::Conflict(format!(
            "operation {}: no step could start again",
            op.uuid
        )));
    }
    Ok(Restart {
        first,
        started,
        running,
    })
}

/// Tasks back to `status`, their outcome cleared.
async fn reset(
    conn: &mut AsyncPgConnection,
    graph: &mut Graph,
    indices: &[usize],
    status: TaskStatus,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if indices.is_empty() {
        return Ok(());
    }
    let uuids: Vec<&str> = indices
        .iter()
        .map(|i| graph.nodes[*i].0.uuid.as_str())
        .collect();
    diesel::update(tasks::table.filter(tasks::uuid.eq_any(uuids)))
        .set((
            tasks::status.eq(status.as_str()),
            tasks::error.eq(None::<String>),
            tasks::result.eq(None::<Value>),
            tasks::finished_at.eq(None::<DateTime<Utc>>),
            tasks::next_attempt_at.eq(None::<DateTime<Utc>>),
            tasks::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    for &index in indices {
        graph.set_status(index, status);
        graph.nodes[index].0.result = None;
    }
    Ok(())
}
