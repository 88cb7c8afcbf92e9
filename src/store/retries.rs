//! Retries and delayed messages in Postgres: a failed attempt puts its task
//! back to PENDING, records the attempt and queues the message in the outbox
//! until its backoff has passed, all in one transaction.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::database::{INSERT_CHUNK, Store, StoreError};
use super::models::{AttemptRow, NewOutbox, NewTask, TaskRow};
use super::schema::kser::{outbox, task_attempts, tasks};
use super::tasks::outcome_query;

/// A failed attempt to retry: the task row as the attempt left it (its
/// `next_attempt_at` says when the next one is due) and the message to send
/// again then, if the retry goes through the outbox (without one, the worker
/// retries in place, as it does to keep records in order).
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    /// The task's row: PENDING, with its next attempt's due time.
    pub row: NewTask,
    /// The message that runs it again, through the outbox.
    pub message: Option<NewOutbox>,
}

impl Store {
    /// Records failed attempts that will be retried: each task goes back to
    /// PENDING with the error and `next_attempt_at`, the attempt is added to
    /// `kser.task_attempts`, and the message waits in the outbox until due.
    /// Fenced like completions (see [`Store::claim_tasks`]): an attempt
    /// that is no longer the task's latest changes nothing. Returns how many were recorded.
    pub(crate) async fn retry_tasks(&self, retries: &[Retry]) -> Result<usize, StoreError> {
        #[derive(QueryableByName)]
        struct Updated {
            #[diesel(sql_type = diesel::sql_types::Text)]
            uuid: String,
        }

        if retries.is_empty() {
            return Ok(0);
        }
        // The task row waits for its next attempt: not finished.
        let rows: Vec<NewTask> = retries
            .iter()
            .map(|r| NewTask {
                finished_at: None,
                ..r.row.clone()
            })
            .collect();
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let updated: Vec<Updated> = outcome_query(&rows, true).load(conn).await?;
            let kept: Vec<&Retry> = retries
                .iter()
                .filter(|r| updated.iter().any(|u| u.uuid == r.row.uuid))
                .collect();
            if kept.is_empty() {
                return Ok(0);
            }
            let attempts: Vec<AttemptRow> = kept
                .iter()
                .map(|r| AttemptRow {
                    task_uuid: r.row.uuid.clone(),
                    attempt: r.row.attempts,
                    worker: r.row.worker.clone(),
                    started_at: r.row.started_at,
                    finished_at: r.row.finished_at.unwrap_or_else(chrono::Utc::now),
                    retcode: r
                        .row
                        .result
                        .as_ref()
                        .and_then(|result| result.get("retcode"))
                        .and_then(serde_json::Value::as_i64)
                        .and_then(|code| i32::try_from(code).ok()),
                    error: r.row.error.clone(),
                })
                .collect();
            for chunk in attempts.chunks(INSERT_CHUNK) {
                diesel::insert_into(task_attempts::table)
                    .values(chunk)
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
            }
            let messages: Vec<&NewOutbox> =
                kept.iter().filter_map(|r| r.message.as_ref()).collect();
            for chunk in messages.chunks(INSERT_CHUNK) {
                diesel::insert_into(outbox::table)
                    .values(chunk.to_vec())
                    .execute(conn)
                    .await?;
            }
            Ok(kept.len())
        })
        .await
    }

    /// Records messages to send later (`send --delay`): PENDING rows and
    /// outbox messages due at their `available_at`, in one transaction.
    /// Returns the uuids scheduled; one that already exists is left alone.
    pub(crate) async fn schedule(
        &self,
        rows: &[NewTask],
        messages: &[NewOutbox],
    ) -> Result<Vec<String>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let mut inserted: Vec<String> = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(INSERT_CHUNK) {
                let uuids: Vec<String> = diesel::insert_into(tasks::table)
                    .values(chunk)
                    .on_conflict_do_nothing()
                    .returning(tasks::uuid)
                    .get_results(conn)
                    .await?;
                inserted.extend(uuids);
            }
            let is_new: std::collections::HashSet<&str> =
                inserted.iter().map(String::as_str).collect();
            let due: Vec<&NewOutbox> = rows
                .iter()
                .zip(messages)
                .filter(|(row, _)| is_new.contains(row.uuid.as_str()))
                .map(|(_, message)| message)
                .collect();
            for chunk in due.chunks(INSERT_CHUNK) {
                diesel::insert_into(outbox::table)
                    .values(chunk.to_vec())
                    .execute(conn)
                    .await?;
            }
            Ok(inserted)
        })
        .await
    }

    /// Makes FAILED standalone tasks runnable again, for `dlq replay`: they
    /// go back to PENDING (their attempt count goes on). Returns the rows as
    /// they were, for [`restore_after_replay`](Self::restore_after_replay)
    /// if their messages cannot be sent after all.
    pub(crate) async fn reset_for_replay(
        &self,
        uuids: &[String],
    ) -> Result<Vec<TaskRow>, StoreError> {
        use super::models::TaskStatus;
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let before: Vec<TaskRow> = tasks::table
                .filter(tasks::uuid.eq_any(uuids))
                .filter(tasks::status.eq(TaskStatus::Failed.as_str()))
                .filter(tasks::operation_uuid.is_null())
                .for_update()
                .select(TaskRow::as_select())
                .load(conn)
                .await?;
            let reset: Vec<&str> = before.iter().map(|row| row.uuid.as_str()).collect();
            diesel::update(tasks::table.filter(tasks::uuid.eq_any(&reset)))
                .set((
                    tasks::status.eq(TaskStatus::Pending.as_str()),
                    tasks::error.eq(None::<String>),
                    tasks::result.eq(None::<serde_json::Value>),
                    tasks::finished_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                    tasks::next_attempt_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                    tasks::updated_at.eq(chrono::Utc::now()),
                ))
                .execute(conn)
                .await?;
            Ok(before)
        })
        .await
    }

    /// Puts back rows [`reset_for_replay`](Self::reset_for_replay) changed
    /// whose messages could not be sent, unless a worker took them up since
    /// (they are PENDING no more). Returns how many were restored.
    pub(crate) async fn restore_after_replay(&self, rows: &[TaskRow]) -> Result<usize, StoreError> {
        use super::models::TaskStatus;
        let mut conn = self.conn().await?;
        let mut restored = 0;
        for row in rows {
            restored += diesel::update(
                tasks::table
                    .find(&row.uuid)
                    .filter(tasks::status.eq(TaskStatus::Pending.as_str())),
            )
            .set((
                tasks::status.eq(&row.status),
                tasks::error.eq(&row.error),
                tasks::result.eq(&row.result),
                tasks::finished_at.eq(row.finished_at),
                tasks::next_attempt_at.eq(row.next_attempt_at),
                tasks::updated_at.eq(chrono::Utc::now()),
            ))
            .execute(&mut conn)
            .await?;
        }
        Ok(restored)
    }

    /// The failed attempts of a task that were retried, oldest first.
    pub async fn task_attempts(&self, uuid: &str) -> Result<Vec<AttemptRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(task_attempts::table
            .filter(task_attempts::task_uuid.eq(uuid))
            .order(task_attempts::attempt.asc())
            .select(AttemptRow::as_select())
            .load(&mut conn)
            .await?)
    }
}
