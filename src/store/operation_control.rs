//! What people do to an operation, by uuid: resume it (run its failed or
//! cancelled steps again from where it stopped) or cancel it (no further
//! step starts; running ones finish). Each is one transaction under the
//! operation's row lock, with any message it calls for in the outbox.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde_json::Value;

use super::database::{Store, StoreError};
use super::models::{TaskRow, TaskStatus};
use super::operations::lock_operation;
use super::schema::kser::{operations, outbox, tasks};
use super::steps::{Resumed, empty_result, parse_result, pending_row, step_message};

/// A step of a cancelled operation still running: it finishes.
#[derive(Debug, Clone)]
pub struct RunningStep {
    /// 1-based step number.
    pub step: i32,
    /// The step's entrypoint.
    pub entrypoint: String,
}

impl Store {
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
                return super::graph::resume::resume(conn, &op).await;
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
}
