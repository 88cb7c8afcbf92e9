//! Operations in Postgres: creating one with all its tasks, moving it along
//! as steps finish, and reading it. `operation_control.rs`
//! resumes and cancels one; `outbox.rs` carries each
//! next step to Kafka; `graph.rs` moves graph operations along.
//!
//! Every state change that calls for a message writes that message to
//! `kser.outbox` in the same transaction; a worker's relay publishes it and
//! deletes it once the broker has it. A crash anywhere leaves either both
//! the change and the message, or neither.

use std::collections::HashSet;

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::database::{INSERT_CHUNK, Store, StoreError};
use super::minutes::{Ended, count_ended};
use super::models::{NewOperation, NewOutbox, NewTask, OperationRow, StepRow, TaskRow, TaskStatus};
use super::schema::kser::{operations, outbox, steps, tasks};
use super::steps::{
    FinishedOperation, empty_result, end_operation, parse_result, pending_row, step_message,
};
use super::tasks::{TaskFilter, outcome_query};

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
    pub(crate) async fn complete_steps(
        &self,
        rows: &[NewTask],
    ) -> Result<Vec<FinishedOperation>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let updated = outcome_query(rows, true).load::<Completed>(conn).await?;
            let written: HashSet<&str> = updated.iter().map(|u| u.uuid.as_str()).collect();
            let mut rows: Vec<&NewTask> = rows
                .iter()
                .filter(|row| written.contains(row.uuid.as_str()))
                .collect();
            // Operations are locked in one order (by uuid) by every writer:
            // two batches finishing steps of the same operations never
            // deadlock. The sort is stable: steps of one operation keep
            // their order.
            rows.sort_by(|a, b| a.operation_uuid.cmp(&b.operation_uuid));
            let mut finished = Vec::new();
            for row in &rows {
                if let Some(done) = advance(conn, row).await? {
                    finished.push(done);
                }
            }
            let ended: Vec<Ended> = rows.iter().map(|row| Ended::from(*row)).collect();
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
        let updated = outcome_query(rows, true).load::<Completed>(conn).await?;
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
}

#[derive(QueryableByName)]
pub(super) struct Completed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    uuid: String,
}

/// The operation row, locked `FOR UPDATE`.
pub(super) async fn lock_operation(
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
pub(super) async fn advance(
    conn: &mut AsyncPgConnection,
    step: &NewTask,
) -> Result<Option<FinishedOperation>, StoreError> {
    let (Some(op_uuid), Some(position)) = (&step.operation_uuid, step.position) else {
        return Ok(None);
    };
    let op = lock_operation(conn, op_uuid).await?;
    if op.graph {
        return super::graph::advance::advance(conn, op, step).await;
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
    // Not the last step: keep the merged result; queue the next step
    // unless the operation was cancelled.
    if (cancelled || succeeded) && position + 1 < op.steps {
        let now = Utc::now();
        let merged_value = serde_json::to_value(&merged).ok();
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
    Ok(Some(end_operation(conn, &op, status, merged, error).await?))
}
