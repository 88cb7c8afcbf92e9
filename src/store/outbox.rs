//! The outbox, `kser.outbox`: messages written in the transaction of the
//! state change that calls for them (a next step, a retry, a delayed send),
//! claimed by a worker's relay with a lease, published, then deleted. A
//! message the broker refuses for good fails its task and operation instead.

use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use serde_json::Value;

use super::database::{Store, StoreError};
use super::minutes::{Ended, count_ended};
use super::models::{OutboxRow, TaskRow, TaskStatus};
use super::operations::advance;
use super::schema::kser::{operations, outbox, tasks};
use super::steps::{FinishedOperation, message_uuid, pending_row};
use crate::message::{ErrorKind, TaskResult};

impl Store {
    /// Claims up to `limit` outbox messages for `lease`: no other relay
    /// takes them meanwhile, and if this one dies they are claimed again
    /// once the lease runs out.
    pub(crate) async fn claim_outbox(
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
    pub(crate) async fn delete_outbox(&self, ids: &[i64]) -> Result<usize, StoreError> {
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
    pub(crate) async fn defer_outbox(
        &self,
        deferred: &[(i64, Duration)],
    ) -> Result<usize, StoreError> {
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
