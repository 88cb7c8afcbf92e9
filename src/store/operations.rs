//! Operations in Postgres: creating one with all its tasks, moving it along
//! as steps finish, resuming and cancelling it, and the outbox that carries
//! each next step to Kafka.
//!
//! Every state change that calls for a message writes that message to
//! `kser.outbox` in the same transaction; a worker's relay publishes it and
//! deletes it once the broker has it. A crash anywhere leaves either both
//! the change and the message, or neither.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;

use super::minutes::{Ended, count_ended};
use super::models::{
    NewOperation, NewOutbox, NewTask, OperationRow, OutboxRow, StepRow, TaskRow, TaskStatus,
};
use super::schema::kser::{operations, outbox, steps, tasks};
use super::steps::{
    FinishedOperation, Resumed, empty_result, message_uuid, parse_result, pending_row, step_message,
};
use super::{INSERT_CHUNK, Store, StoreError, TaskFilter};
use crate::message::{ErrorKind, TaskResult};

/// An operation to record: the row, its tasks and its first step message.
/// A build that failed has a FAILED row and no tasks.
#[derive(Debug, Clone)]
pub struct OperationStart {
    /// The operation's row.
    pub operation: NewOperation,
    /// Its steps, in order, as tasks.
    pub tasks: Vec<NewTask>,
    /// For a graph operation, each task's place in the graph (empty for a
    /// list). Its steps without dependencies are PENDING and start at
    /// once, the others WAITING.
    pub graph: Vec<StepRow>,
}

/// A step of a cancelled operation still running: it finishes.
#[derive(Debug, Clone)]
pub struct RunningStep {
    /// 1-based step number.
    pub step: i32,
    /// The step's entrypoint.
    pub entrypoint: String,
}

impl Store {
    /// Records operations whose message just arrived, each in full or not at
    /// all: the operation row, its tasks (PENDING) and the message of its
    /// first step, in one transaction. An operation that already exists (a
    /// redelivered or duplicate message) is left alone. Returns the uuids
    /// created.
    pub async fn create_operations(
        &self,
        starts: &[OperationStart],
    ) -> Result<Vec<String>, StoreError> {
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let rows: Vec<&NewOperation> = starts.iter().map(|s| &s.operation).collect();
            let mut created: Vec<String> = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(INSERT_CHUNK) {
                let uuids: Vec<String> = diesel::insert_into(operations::table)
                    .values(chunk.to_vec())
                    .on_conflict_do_nothing()
                    .returning(operations::uuid)
                    .get_results(conn)
                    .await?;
                created.extend(uuids);
            }
            let is_new: HashSet<&str> = created.iter().map(String::as_str).collect();
            // `send` cannot tell a task from an operation, so it may have
            // recorded the message as a PENDING task: the operation replaces it.
            let uuids: Vec<&String> = starts.iter().map(|s| &s.operation.uuid).collect();
            diesel::delete(
                tasks::table
                    .filter(tasks::uuid.eq_any(uuids))
                    .filter(tasks::status.eq(TaskStatus::Pending.as_str()))
                    .filter(tasks::operation_uuid.is_null()),
            )
            .execute(conn)
            .await?;
            let new: Vec<&OperationStart> = starts
                .iter()
                .filter(|s| is_new.contains(s.operation.uuid.as_str()))
                .collect();
            let task_rows: Vec<&NewTask> = new.iter().flat_map(|s| &s.tasks).collect();
            for chunk in task_rows.chunks(INSERT_CHUNK) {
                diesel::insert_into(tasks::table)
                    .values(chunk.to_vec())
                    .execute(conn)
                    .await?;
            }
            let places: Vec<&StepRow> = new.iter().flat_map(|s| &s.graph).collect();
            for chunk in places.chunks(INSERT_CHUNK) {
                diesel::insert_into(steps::table)
                    .values(chunk.to_vec())
                    .execute(conn)
                    .await?;
            }
            let now = Utc::now();
            let roots = new.iter().filter(|s| !s.graph.is_empty()).flat_map(|s| {
                s.tasks
                    .iter()
                    .zip(&s.graph)
                    .filter(|(task, _)| task.status == TaskStatus::Pending.as_str())
                    .map(move |(task, place)| {
                        let mut message = step_message(
                            &s.operation.uuid,
                            s.operation.topic.as_deref(),
                            task,
                            &s.operation.metadata,
                            None,
                            None,
                        );
                        message.message_key = Some(task.uuid.clone());
                        message.available_at = super::graph::due(place.delay_ms, now);
                        message
                    })
            });
            let messages: Vec<NewOutbox> = new
                .iter()
                .filter(|s| s.graph.is_empty())
                .filter_map(|s| {
                    let first = <[NewTask]>::first(&s.tasks)?;
                    Some(step_message(
                        &s.operation.uuid,
                        s.operation.topic.as_deref(),
                        first,
                        &s.operation.metadata,
                        None,
                        None,
                    ))
                })
                .chain(roots)
                .collect();
            for chunk in messages.chunks(INSERT_CHUNK) {
                diesel::insert_into(outbox::table)
                    .values(chunk)
                    .execute(conn)
                    .await?;
            }
            Ok(created)
        })
        .await
    }

    /// Records the final state of steps and moves their operations along, in
    /// one transaction: after a SUCCESS the next step's message is queued
    /// with the merged result (or the operation succeeds), after a failure
    /// the operation fails with that step's error. Only steps that were still
    /// unfinished move anything, so a duplicate completion does nothing.
    /// Returns the operations that finished.
    pub async fn complete_steps(
        &self,
        rows: &[NewTask],
    ) -> Result<Vec<FinishedOperation>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let updated = super::outcome_query(rows, true)
                .load::<Completed>(conn)
                .await?;
            let mut finished = Vec::new();
            for row in rows {
                if updated.iter().any(|u| u.uuid == row.uuid)
                    && let Some(done) = advance(conn, row).await?
                {
                    finished.push(done);
                }
            }
            let ended: Vec<Ended> = rows
                .iter()
                .filter(|row| updated.iter().any(|u| u.uuid == row.uuid))
                .map(Ended::from)
                .collect();
            count_ended(conn, &ended).await?;
            Ok(finished)
        })
        .await
    }

    /// Records the final state of one started task (or step, moving its
    /// operation along) on `conn`, inside the caller's transaction: what a
    /// transactional task's own writes commit with. `Ok(None)` when the
    /// write was fenced (the task is final, or a newer attempt runs): the
    /// caller must roll back. `Ok(Some(finished))` names the operation the
    /// step ended, if any.
    pub(crate) async fn complete_in(
        conn: &mut AsyncPgConnection,
        row: &NewTask,
    ) -> Result<Option<Option<FinishedOperation>>, StoreError> {
        let rows = std::slice::from_ref(row);
        let updated = super::outcome_query(rows, true)
            .load::<Completed>(conn)
            .await?;
        if updated.is_empty() {
            return Ok(None);
        }
        let finished = advance(conn, row).await?;
        count_ended(conn, &[Ended::from(row)]).await?;
        Ok(Some(finished))
    }

    /// One operation by uuid.
    pub async fn operation(&self, uuid: &str) -> Result<Option<OperationRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(operations::table
            .find(uuid)
            .select(OperationRow::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// The tasks of an operation, in order.
    pub async fn operation_tasks(&self, uuid: &str) -> Result<Vec<TaskRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(tasks::table
            .filter(tasks::operation_uuid.eq(uuid))
            .order(tasks::position.asc())
            .select(TaskRow::as_select())
            .load(&mut conn)
            .await?)
    }

    /// The places in the graph of a graph operation's tasks.
    pub async fn operation_graph(&self, uuid: &str) -> Result<Vec<StepRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(steps::table
            .filter(steps::operation_uuid.eq(uuid))
            .select(StepRow::as_select())
            .load(&mut conn)
            .await?)
    }

    /// The most recent operations matching `filter`, newest first.
    pub async fn list_operations(
        &self,
        filter: &TaskFilter,
    ) -> Result<Vec<OperationRow>, StoreError> {
        let mut conn = self.conn().await?;
        let mut query = operations::table
            .select(OperationRow::as_select())
            .order(operations::created_at.desc())
            .limit(filter.limit.max(1))
            .into_boxed();
        if let Some(status) = filter.status {
            query = query.filter(operations::status.eq(status.as_str()));
        }
        if let Some(entrypoint) = &filter.entrypoint {
            query = query.filter(operations::entrypoint.eq(entrypoint.clone()));
        }
        if let Some(since) = filter.since {
            query = query.filter(operations::created_at.ge(since));
        }
        if let Some(until) = filter.until {
            query = query.filter(operations::created_at.lt(until));
        }
        Ok(query.load(&mut conn).await?)
    }

    /// Runs a FAILED or CANCELLED operation again from its first unfinished
    /// step. Steps in SUCCESS keep their results and do not run again; the
    /// restarted step receives their merged result. A graph operation runs
    /// again the steps that did not succeed (and those declared `rerun`),
    /// or, when a compensation failed, the compensations left.
    ///
    /// A step still in flight is never sent again: a list's step written
    /// RUNNING (cancelled while it ran), a graph's step PENDING with its
    /// message out or RUNNING. It finishes once, and what comes after it
    /// starts when it succeeds, the operation running again; `running`
    /// names such steps.
    pub async fn resume_operation(&self, uuid: &str) -> Result<Resumed, StoreError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let op = lock_operation(conn, uuid).await?;
            let status = op.status.as_str();
            if status != TaskStatus::Failed.as_str() && status != TaskStatus::Cancelled.as_str() {
                return Err(StoreError::Conflict(format!(
                    "operation {uuid} is {status}; only FAILED or CANCELLED operations can be resumed"
                )));
            }
            if op.graph {
                return super::graph::resume(conn, &op).await;
            }
            let steps: Vec<TaskRow> = tasks::table
                .filter(tasks::operation_uuid.eq(uuid))
                .order(tasks::position.asc())
                .select(TaskRow::as_select())
                .load(conn)
                .await?;
            let Some(restart) = steps.iter().find(|t| t.status != TaskStatus::Success.as_str()) else {
                return Err(StoreError::Conflict(format!(
                    "operation {uuid} has no unfinished step to resume"
                )));
            };
            let position = restart.position.unwrap_or(0);
            let mut merged = empty_result(uuid);
            for step in steps.iter().take_while(|t| t.status == TaskStatus::Success.as_str()) {
                merged.merge(&parse_result(step.result.as_ref()));
            }
            // A step still running (the operation was cancelled while it
            // ran) is not sent again: it finishes once, and its end sends
            // the next step, the operation running again.
            let running = restart.status == TaskStatus::Running.as_str();
            let now = Utc::now();
            diesel::update(
                tasks::table
                    .filter(tasks::operation_uuid.eq(uuid))
                    .filter(tasks::position.ge(position))
                    .filter(tasks::status.ne(TaskStatus::Success.as_str()))
                    .filter(tasks::status.ne(TaskStatus::Running.as_str())),
            )
            .set((
                tasks::status.eq(TaskStatus::Pending.as_str()),
                tasks::error.eq(None::<String>),
                tasks::result.eq(None::<Value>),
                tasks::finished_at.eq(None::<chrono::DateTime<Utc>>),
                tasks::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
            if !running {
                let forwarded = (position > 0).then_some(&merged);
                let restart_row = pending_row(restart);
                let message = step_message(
                    uuid,
                    op.topic.as_deref(),
                    &restart_row,
                    &op.metadata,
                    forwarded,
                    None,
                );
                diesel::insert_into(outbox::table).values(message).execute(conn).await?;
            }
            diesel::update(operations::table.find(uuid))
                .set((
                    operations::status.eq(TaskStatus::Running.as_str()),
                    operations::error.eq(None::<String>),
                    operations::result.eq(serde_json::to_value(&merged).ok()),
                    operations::finished_at.eq(None::<chrono::DateTime<Utc>>),
                    operations::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
            let name = format!("step {} ({})", position + 1, restart.entrypoint);
            Ok(Resumed {
                step: position + 1,
                entrypoint: restart.entrypoint.clone(),
                started: Vec::new(),
                running: if running { vec![name] } else { Vec::new() },
            })
        })
        .await
    }

    /// Stops an operation between steps: it becomes CANCELLED, its pending
    /// steps too (a step running but not yet written RUNNING among them: its
    /// outcome will not be recorded), and a step written RUNNING finishes,
    /// its result joining the operation's, but starts no next one. Returns
    /// the steps still running.
    ///
    /// A cancel while the *last* step is written RUNNING comes too late: a
    /// [`StoreError::Conflict`] says so and the operation ends with that
    /// step's outcome (SUCCESS with its result, or FAILED), so an operation
    /// never ends CANCELLED with every step SUCCESS.
    pub async fn cancel_operation(&self, uuid: &str) -> Result<Vec<RunningStep>, StoreError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            // Its queued messages, the steps, then the operation: the order
            // the relay and a finishing step lock them in (so they never
            // deadlock), and no step is written RUNNING between this look
            // and the cancel. A refused cancel rolls the delete back.
            diesel::delete(outbox::table.filter(outbox::operation_uuid.eq(uuid)))
                .execute(conn)
                .await?;
            let steps: Vec<(Option<i32>, String, String)> = tasks::table
                .filter(tasks::operation_uuid.eq(uuid))
                .order(tasks::position.asc())
                .select((tasks::position, tasks::entrypoint, tasks::status))
                .for_update()
                .load(conn)
                .await?;
            let op = lock_operation(conn, uuid).await?;
            let status: TaskStatus = op.status.parse().map_err(StoreError::Conflict)?;
            if status.is_final() {
                return Err(StoreError::Conflict(format!(
                    "operation {uuid} is already {status}"
                )));
            }
            let unstarted = [TaskStatus::Pending.as_str(), TaskStatus::Waiting.as_str()];
            let any_unstarted = steps
                .iter()
                .any(|(_, _, status)| unstarted.contains(&status.as_str()));
            let running: Vec<RunningStep> = steps
                .into_iter()
                .filter(|(_, _, status)| status == TaskStatus::Running.as_str())
                .map(|(position, entrypoint, _)| RunningStep {
                    step: position.unwrap_or(0) + 1,
                    entrypoint,
                })
                .collect();
            if op.graph && !running.is_empty() && !any_unstarted {
                return Err(StoreError::Conflict(format!(
                    "operation {uuid} cannot be cancelled: every step left is running, \
                     so the cancel comes too late; the operation ends with their outcome"
                )));
            }
            if let Some(last) = running.iter().find(|r| !op.graph && r.step >= op.steps) {
                return Err(StoreError::Conflict(format!(
                    "operation {uuid} cannot be cancelled: its last step, {} ({}), is running, \
                     so the cancel comes too late; the operation ends with that step's outcome",
                    last.step, last.entrypoint
                )));
            }
            let now = Utc::now();
            diesel::update(operations::table.find(uuid))
                .set((
                    operations::status.eq(TaskStatus::Cancelled.as_str()),
                    operations::error.eq(Some("cancelled")),
                    operations::finished_at.eq(Some(now)),
                    operations::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
            diesel::update(
                tasks::table
                    .filter(tasks::operation_uuid.eq(uuid))
                    .filter(tasks::status.eq_any(unstarted)),
            )
            .set((
                tasks::status.eq(TaskStatus::Cancelled.as_str()),
                tasks::finished_at.eq(Some(now)),
                tasks::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
            Ok(running)
        })
        .await
    }

    /// Claims up to `limit` outbox messages for `lease`: no other relay
    /// takes them meanwhile, and if this one dies they are claimed again
    /// once the lease runs out.
    pub async fn claim_outbox(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "UPDATE kser.outbox SET claimed_until = now() + make_interval(secs => $2) \
             WHERE id IN (SELECT id FROM kser.outbox \
                 WHERE (claimed_until IS NULL OR claimed_until < now()) AND available_at <= now() \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, topic, message_key, payload",
        )
        .bind::<diesel::sql_types::BigInt, _>(limit)
        .bind::<diesel::sql_types::Double, _>(lease.as_secs_f64())
        .load(&mut conn)
        .await?)
    }

    /// Deletes published outbox messages.
    pub async fn delete_outbox(&self, ids: &[i64]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(diesel::delete(outbox::table.filter(outbox::id.eq_any(ids)))
            .execute(&mut conn)
            .await?)
    }

    /// Gives claimed messages back after a publish that may succeed later,
    /// each not before its own delay: a message the broker keeps refusing
    /// waits longer and longer, and never holds back the others.
    pub async fn defer_outbox(&self, deferred: &[(i64, Duration)]) -> Result<usize, StoreError> {
        use diesel::sql_types::{Array, BigInt, Double};

        if deferred.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = deferred.iter().map(|(id, _)| *id).collect();
        let delays: Vec<f64> = deferred.iter().map(|(_, d)| d.as_secs_f64()).collect();
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "UPDATE kser.outbox AS o SET claimed_until = NULL, \
                 available_at = now() + make_interval(secs => d.delay) \
             FROM unnest($1::int8[], $2::float8[]) AS d(id, delay) WHERE o.id = d.id",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Double>, _>(delays)
        .execute(&mut conn)
        .await?)
    }

    /// Settles an outbox message the broker refused for good (too large
    /// for it, an invalid record, no right to write the topic), in one
    /// transaction: the message is deleted and the task it would have run,
    /// if still PENDING, ends FAILED with `reason`; for a step, its
    /// operation moves on as after any failure of that step (by default it
    /// ends FAILED, and `kser resume` can run it again).
    ///
    /// The task is the one the message names: the uuid in the row's own
    /// payload, else `task_uuid` (what the caller read, after decrypting),
    /// else, for a step, the row's key when it is a task of the operation
    /// (a graph step's message is keyed by its own uuid). Only a list's
    /// step falls back to its operation's first PENDING step, the one step
    /// of a list with a message out; a graph's step that cannot be told is
    /// an error, and the row stays for the next attempt rather than failing
    /// a sibling. Returns the operation that ended, for its hook; nothing
    /// when the message was settled already.
    pub async fn fail_unpublishable(
        &self,
        id: i64,
        task_uuid: Option<&str>,
        reason: &str,
    ) -> Result<Option<FinishedOperation>, StoreError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let deleted: Option<(Option<String>, Option<String>, String)> =
                diesel::delete(outbox::table.find(id))
                    .returning((outbox::operation_uuid, outbox::message_key, outbox::payload))
                    .get_result(conn)
                    .await
                    .optional()?;
            let Some((op_uuid, key, payload)) = deleted else {
                return Ok(None);
            };
            let mut named = vec![message_uuid(&payload), task_uuid.map(str::to_owned)];
            if op_uuid.is_some() {
                named.push(key);
            }
            let mut task: Option<TaskRow> = None;
            for uuid in named.into_iter().flatten() {
                task = tasks::table
                    .find(&uuid)
                    .select(TaskRow::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .filter(|t| op_uuid.is_none() || t.operation_uuid == op_uuid);
                if task.is_some() {
                    break;
                }
            }
            if task.is_none()
                && let Some(op_uuid) = &op_uuid
            {
                let graph: bool = operations::table
                    .find(op_uuid)
                    .select(operations::graph)
                    .first(conn)
                    .await
                    .optional()?
                    .unwrap_or(false);
                if graph {
                    return Err(StoreError::Conflict(format!(
                        "outbox message {id} of graph operation {op_uuid} names no step \
                         of it, so the step whose message was refused is unknown"
                    )));
                }
                task = tasks::table
                    .filter(tasks::operation_uuid.eq(op_uuid))
                    .filter(tasks::status.eq(TaskStatus::Pending.as_str()))
                    .order(tasks::position.asc())
                    .select(TaskRow::as_select())
                    .first(conn)
                    .await
                    .optional()?;
            }
            // A task no longer PENDING was published before (the message is
            // a copy): only the message goes.
            let Some(task) = task.filter(|t| t.status == TaskStatus::Pending.as_str()) else {
                return Ok(None);
            };
            let now = Utc::now();
            let result = TaskResult::error(500, ErrorKind::Fatal, reason, Value::Null);
            let mut failed = pending_row(&task);
            failed.status = TaskStatus::Failed.as_str();
            failed.result = serde_json::to_value(&result).ok();
            failed.error = Some(reason.to_owned());
            failed.operation_uuid = task.operation_uuid.clone();
            failed.position = task.position;
            failed.finished_at = Some(now);
            let updated = diesel::update(
                tasks::table
                    .find(&task.uuid)
                    .filter(tasks::status.eq(TaskStatus::Pending.as_str())),
            )
            .set((
                tasks::status.eq(failed.status),
                tasks::result.eq(&failed.result),
                tasks::error.eq(&failed.error),
                tasks::next_attempt_at.eq(None::<chrono::DateTime<Utc>>),
                tasks::finished_at.eq(Some(now)),
                tasks::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
            // Ended meanwhile by a copy published before: that moved it on.
            if updated == 0 {
                return Ok(None);
            }
            count_ended(conn, &[Ended::from(&failed)]).await?;
            advance(conn, &failed).await
        })
        .await
    }
}

#[derive(QueryableByName)]
pub(super) struct Completed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    uuid: String,
}

async fn lock_operation(
    conn: &mut AsyncPgConnection,
    uuid: &str,
) -> Result<OperationRow, StoreError> {
    operations::table
        .find(uuid)
        .for_update()
        .select(OperationRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no operation with uuid {uuid}")))
}

/// Moves an operation along after one of its steps finished.
async fn advance(
    conn: &mut AsyncPgConnection,
    step: &NewTask,
) -> Result<Option<FinishedOperation>, StoreError> {
    let (Some(op_uuid), Some(position)) = (&step.operation_uuid, step.position) else {
        return Ok(None);
    };
    let op = lock_operation(conn, op_uuid).await?;
    if op.graph {
        return super::graph::advance(conn, op, step).await;
    }
    let succeeded = step.status == TaskStatus::Success.as_str();
    let cancelled = op.status == TaskStatus::Cancelled.as_str();
    // Finished by a duplicate, or cancelled and this step failed: nothing
    // more to start. A step that succeeds after a cancel (it was running)
    // still counts: its result joins the operation's. (Were it the last,
    // every step would have succeeded and the operation ends SUCCESS; but
    // `cancel_operation` refuses while the last step runs.)
    if op.status != TaskStatus::Running.as_str() && !(cancelled && succeeded) {
        return Ok(None);
    }
    let mut merged = match &op.result {
        Some(result) => parse_result(Some(result)),
        None => empty_result(op_uuid),
    };
    merged.merge(&parse_result(step.result.as_ref()));
    let now = Utc::now();
    let merged_value = serde_json::to_value(&merged).ok();
    // Not the last step: keep the merged result; queue the next step
    // unless the operation was cancelled.
    if (cancelled || succeeded) && position + 1 < op.steps {
        if !cancelled {
            let next: TaskRow = tasks::table
                .filter(tasks::operation_uuid.eq(op_uuid))
                .filter(tasks::position.eq(position + 1))
                .select(TaskRow::as_select())
                .first(conn)
                .await?;
            let message = step_message(
                op_uuid,
                op.topic.as_deref(),
                &pending_row(&next),
                &op.metadata,
                Some(&merged),
                step.trace.as_ref(),
            );
            diesel::insert_into(outbox::table)
                .values(message)
                .execute(conn)
                .await?;
        }
        diesel::update(operations::table.find(op_uuid))
            .set((
                operations::result.eq(merged_value),
                operations::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        return Ok(None);
    }
    let (status, error) = if succeeded {
        (TaskStatus::Success, None)
    } else {
        let reason = step.error.as_deref().unwrap_or("failed");
        let error = format!(
            "step {} ({}) failed: {reason}",
            position + 1,
            step.entrypoint
        );
        (TaskStatus::Failed, Some(error))
    };
    diesel::update(operations::table.find(op_uuid))
        .set((
            operations::status.eq(status.as_str()),
            operations::result.eq(merged_value),
            operations::error.eq(error),
            operations::finished_at.eq(Some(now)),
            operations::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(Some(FinishedOperation {
        uuid: op.uuid,
        entrypoint: op.entrypoint,
        metadata: op.metadata.as_object().cloned().unwrap_or_default(),
        result: merged,
    }))
}
