//! The task queries of the hot path and of `status`: recording PENDING
//! rows on send, the claim (one read per batch), RUNNING marks, the final
//! states written in one statement per batch (`outcome_query`, the
//! attempt-fenced upsert they share), invalid records, and reading tasks
//! back.

use std::collections::HashMap;
use std::sync::LazyLock;

use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection as _, RunQueryDsl};

use super::database::{INSERT_CHUNK, Store, StoreError};
use super::minutes::{Ended, count_ended};
use super::models::{NewTask, TaskRow, TaskStatus};
use super::prepared::Prepared;
use super::schema::kser::tasks;

/// What an upsert of a final state sets on a row that exists: the outcome
/// columns, from the row it brings (`finish_tasks`, `record_invalid`). A
/// macro: diesel's `Excluded` type cannot be named outside diesel.
macro_rules! final_columns {
    () => {
        (
            tasks::status.eq(excluded(tasks::status)),
            tasks::result.eq(excluded(tasks::result)),
            tasks::error.eq(excluded(tasks::error)),
            tasks::finished_at.eq(excluded(tasks::finished_at)),
            tasks::updated_at.eq(excluded(tasks::updated_at)),
        )
    };
}

/// Which tasks `list` shows.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only those in this state.
    pub status: Option<TaskStatus>,
    /// Only those of this entrypoint.
    pub entrypoint: Option<String>,
    /// At most this many, the newest first.
    pub limit: i64,
    /// Leave out the tasks that are steps of an operation.
    pub standalone: bool,
    /// Only those recorded at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only those recorded before this time (the next page's cursor).
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// A task the worker may run, as [`Store::claim_tasks`] read it.
#[derive(Debug, Clone)]
pub struct StartedTask {
    /// The task's uuid.
    pub uuid: String,
    /// The attempt about to start: 1 for the first, more after
    /// redeliveries, retries and resumes.
    pub attempts: i32,
    /// The operation the task is a step of, if any.
    pub operation_uuid: Option<String>,
    /// Its place in that operation, from 0.
    pub position: Option<i32>,
    /// Whether Postgres had a row of the task when it was claimed. A task
    /// without one (a message no `send` recorded, on its first attempt) is
    /// recorded with a plain insert ([`Store::complete_new_tasks`]).
    pub stored: bool,
}

impl Store {
    /// Records messages a producer is about to send, as PENDING, and
    /// returns the uuids it inserted. A row that already exists (a duplicate
    /// send) is left alone.
    pub async fn record_pending(&self, rows: &[NewTask]) -> Result<Vec<String>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut inserted = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(INSERT_CHUNK) {
            let uuids: Vec<String> = diesel::insert_into(tasks::table)
                .values(chunk)
                .on_conflict_do_nothing()
                .returning(tasks::uuid)
                .get_results(&mut conn)
                .await?;
            inserted.extend(uuids);
        }
        Ok(inserted)
    }

    /// What was asked of existing tasks (uuid, entrypoint, params,
    /// metadata), so `send` can tell a resend of the same message from a
    /// different one that reuses a uuid.
    pub async fn task_contents(
        &self,
        uuids: &[String],
    ) -> Result<Vec<(String, String, serde_json::Value, serde_json::Value)>, StoreError> {
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        Ok(tasks::table
            .filter(tasks::uuid.eq_any(uuids))
            .select((
                tasks::uuid,
                tasks::entrypoint,
                tasks::params,
                tasks::metadata,
            ))
            .load(&mut conn)
            .await?)
    }

    /// Removes PENDING rows of messages that could not be sent after all.
    pub async fn forget_pending(&self, uuids: &[String]) -> Result<usize, StoreError> {
        if uuids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(diesel::delete(
            tasks::table
                .filter(tasks::uuid.eq_any(uuids))
                .filter(tasks::status.eq(TaskStatus::Pending.as_str()))
                .filter(tasks::operation_uuid.is_null()),
        )
        .execute(&mut conn)
        .await?)
    }

    /// Reads the tasks of a batch about to run and returns, for each one
    /// that may run, the number of the attempt it starts: one more than
    /// Postgres has counted (1 for a message it has no row of). Tasks already
    /// in a final state (a redelivery after their state was committed, a
    /// duplicate send, a step of a cancelled operation) are left out: they
    /// must not run again.
    ///
    /// Nothing is written: a task is recorded when it ends, or as RUNNING
    /// by [`mark_running`](Self::mark_running) if it runs long. Every later
    /// write of the attempt is fenced on the count read here, so if another
    /// worker starts the same message meanwhile, one outcome is recorded.
    pub async fn claim_tasks(
        &self,
        uuids: &[String],
    ) -> Result<HashMap<String, StartedTask>, StoreError> {
        use diesel::sql_types::{Array, Int4, Nullable, Text};

        /// A row the claim found.
        #[derive(QueryableByName)]
        struct Stored {
            #[diesel(sql_type = Text)]
            uuid: String,
            #[diesel(sql_type = Int4)]
            attempts: i32,
            #[diesel(sql_type = Nullable<Text>)]
            operation_uuid: Option<String>,
            #[diesel(sql_type = Nullable<Int4>)]
            position: Option<i32>,
            #[diesel(sql_type = Text)]
            status: String,
        }

        if uuids.is_empty() {
            return Ok(HashMap::new());
        }
        // Only the rows that exist: a message Postgres has no row of starts
        // its first attempt. One index scan of the primary key, and a plan
        // cheaper to make than a join with the uuids: planned each time,
        // not prepared, since a plan cached while the table was nearly
        // empty (a new database) could scan it whole, or scan another of
        // its indexes, and would stay in use as it grows.
        let query = diesel::sql_query(
            "SELECT uuid, attempts, operation_uuid, position, status FROM kser.tasks \
             WHERE uuid = ANY($1::text[])",
        )
        .bind::<Array<Text>, _>(uuids);
        let mut conn = self.conn().await?;
        let stored: Vec<Stored> = query.load(&mut conn).await?;
        drop(conn);
        let stored: HashMap<&str, &Stored> = stored.iter().map(|s| (s.uuid.as_str(), s)).collect();
        let mut started = HashMap::with_capacity(uuids.len());
        for uuid in uuids {
            let task = match stored.get(uuid.as_str()) {
                None => StartedTask {
                    uuid: uuid.clone(),
                    attempts: 1,
                    operation_uuid: None,
                    position: None,
                    stored: false,
                },
                Some(row) if TaskStatus::UNFINISHED.contains(&row.status.as_str()) => StartedTask {
                    uuid: uuid.clone(),
                    attempts: row.attempts + 1,
                    operation_uuid: row.operation_uuid.clone(),
                    position: row.position,
                    stored: true,
                },
                // Final already: it must not run again.
                Some(_) => continue,
            };
            started.insert(uuid.clone(), task);
        }
        Ok(started)
    }

    /// Records tasks that have been running for a while as RUNNING, so
    /// `status` shows them, and returns the uuids recorded. Each row carries
    /// the attempt [`claim_tasks`](Self::claim_tasks) gave it; a task that
    /// another worker started meanwhile, or that is final, is left alone
    /// (and left out of the result).
    pub async fn mark_running(&self, rows: &[NewTask]) -> Result<Vec<String>, StoreError> {
        use diesel::sql_types::{Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz};

        #[derive(QueryableByName)]
        struct Marked {
            #[diesel(sql_type = Text)]
            uuid: String,
        }

        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let query = Prepared::new(
            "INSERT INTO kser.tasks AS t (uuid, entrypoint, status, params, metadata, attempts, \
                 worker, topic, kafka_partition, kafka_offset, enqueued_at, started_at, updated_at) \
             SELECT v.uuid, v.entrypoint, 'RUNNING', v.params, v.metadata, v.attempts, \
                 v.worker, v.topic, v.kafka_partition, v.kafka_offset, v.enqueued_at, v.started_at, now() \
             FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::int4[], $6::text[], \
                 $7::text[], $8::int4[], $9::int8[], $10::timestamptz[], $11::timestamptz[]) \
                 AS v(uuid, entrypoint, params, metadata, attempts, worker, topic, kafka_partition, \
                      kafka_offset, enqueued_at, started_at) \
             ON CONFLICT (uuid) DO UPDATE SET status = 'RUNNING', attempts = excluded.attempts, \
                 worker = excluded.worker, topic = excluded.topic, \
                 kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset, \
                 enqueued_at = excluded.enqueued_at, started_at = excluded.started_at, \
                 updated_at = excluded.updated_at \
             WHERE t.status IN ('PENDING', 'RUNNING') AND t.attempts = excluded.attempts - 1 \
             RETURNING t.uuid",
        )
        .bind::<Array<Text>, _>(column(rows, |r| r.uuid.as_str()))
        .bind::<Array<Text>, _>(column(rows, |r| r.entrypoint.as_str()))
        .bind::<Array<Jsonb>, _>(column(rows, |r| &r.params))
        .bind::<Array<Jsonb>, _>(column(rows, |r| &r.metadata))
        .bind::<Array<Int4>, _>(column(rows, |r| r.attempts))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.worker.as_deref()))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.topic.as_deref()))
        .bind::<Array<Nullable<Int4>>, _>(column(rows, |r| r.kafka_partition))
        .bind::<Array<Nullable<Int8>>, _>(column(rows, |r| r.kafka_offset))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.enqueued_at))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.started_at));
        let mut conn = self.conn().await?;
        let marked: Vec<Marked> = query.load(&mut conn).await?;
        Ok(marked.into_iter().map(|m| m.uuid).collect())
    }

    /// Records the outcome of attempts that [`claim_tasks`](Self::claim_tasks)
    /// started: the whole row, inserted if Postgres has none yet. Fenced by
    /// attempt: rows already final, and tasks another worker started
    /// meanwhile, are not touched. Returns how many were recorded.
    ///
    /// Each uuid may appear only once in `rows`.
    pub async fn complete_tasks(&self, rows: &[NewTask]) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(outcome_query(rows, false).execute(&mut conn).await?)
    }

    /// Records the outcome of attempts like
    /// [`complete_tasks`](Self::complete_tasks), for tasks of which Postgres
    /// had no row when they were claimed: one plain insert, which spares
    /// Postgres the upsert's conflict check and speculative insertion
    /// (about a quarter of the cost of a row). If any of their rows appeared
    /// meanwhile (another worker recorded the task, or the marker its
    /// RUNNING mark), the insert fails whole and the rows go through the
    /// fenced upsert instead.
    ///
    /// Each uuid may appear only once in `rows`.
    pub async fn complete_new_tasks(&self, rows: &[NewTask]) -> Result<usize, StoreError> {
        use diesel::result::{DatabaseErrorKind, Error};

        if rows.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        match outcome_query_of(rows, Outcome::Insert)
            .execute(&mut conn)
            .await
        {
            Err(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                Ok(outcome_query(rows, false).execute(&mut conn).await?)
            }
            written => Ok(written?),
        }
    }

    /// Records the final state of tasks whose row may not exist yet (a
    /// message rejected before it started): rows are inserted whole, or
    /// updated if they exist and are not final yet.
    ///
    /// Each uuid may appear only once in `rows`.
    pub async fn finish_tasks(&self, rows: &[NewTask]) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        use diesel::query_dsl::methods::FilterDsl as _;
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let mut written: Vec<Ended> = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(INSERT_CHUNK) {
                let ended: Vec<Ended> = diesel::insert_into(tasks::table)
                    .values(chunk)
                    .on_conflict(tasks::uuid)
                    .do_update()
                    .set(final_columns!())
                    .filter(tasks::status.eq_any(TaskStatus::UNFINISHED))
                    .returning(ENDED)
                    .get_results(conn)
                    .await?;
                written.extend(ended);
            }
            count_ended(conn, &written).await?;
            Ok(written.len())
        })
        .await
    }

    /// Records messages that could not be decoded, FAILED, where their uuid
    /// names no task yet, or only a PENDING one no worker ever started (a
    /// standalone message `send` recorded): a uuid means one task, and a
    /// record that is not a message never changes a task that ran, runs,
    /// is a step of an operation, or is final. Returns the rows left
    /// alone, each with the task its uuid belongs to.
    ///
    /// Each uuid may appear only once in `rows`.
    pub async fn record_invalid(&self, rows: &[NewTask]) -> Result<Vec<TaskRow>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let written = conn
            .transaction(async |conn| record_invalid_in(conn, rows).await)
            .await?;
        let left: Vec<&str> = rows
            .iter()
            .map(|r| r.uuid.as_str())
            .filter(|uuid| !written.iter().any(|w| w == uuid))
            .collect();
        if left.is_empty() {
            return Ok(Vec::new());
        }
        Ok(
            diesel::QueryDsl::filter(tasks::table, tasks::uuid.eq_any(left))
                .select(TaskRow::as_select())
                .load(&mut conn)
                .await?,
        )
    }

    /// One task by uuid.
    pub async fn task(&self, uuid: &str) -> Result<Option<TaskRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(tasks::table
            .find(uuid)
            .select(TaskRow::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// The most recent tasks matching `filter`, newest first.
    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRow>, StoreError> {
        let mut conn = self.conn().await?;
        let mut query = tasks::table
            .select(TaskRow::as_select())
            .order(tasks::created_at.desc())
            .limit(filter.limit.max(1))
            .into_boxed();
        if let Some(status) = filter.status {
            query = query.filter(tasks::status.eq(status.as_str()));
        }
        if let Some(entrypoint) = &filter.entrypoint {
            query = query.filter(tasks::entrypoint.eq(entrypoint.clone()));
        }
        if filter.standalone {
            query = query.filter(tasks::operation_uuid.is_null());
        }
        if let Some(since) = filter.since {
            query = query.filter(tasks::created_at.ge(since));
        }
        if let Some(until) = filter.until {
            query = query.filter(tasks::created_at.lt(until));
        }
        Ok(query.load(&mut conn).await?)
    }
}

/// The writes of [`Store::record_invalid`], counted into
/// `kser.task_minutes` once they are all done; returns the uuids written.
async fn record_invalid_in(
    conn: &mut diesel_async::AsyncPgConnection,
    rows: &[NewTask],
) -> Result<Vec<String>, StoreError> {
    use diesel::query_dsl::methods::FilterDsl as _;
    let mut written: Vec<(String, Ended)> = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(INSERT_CHUNK) {
        let ended: Vec<(String, Ended)> = diesel::insert_into(tasks::table)
            .values(chunk)
            .on_conflict(tasks::uuid)
            .do_update()
            .set(final_columns!())
            .filter(tasks::status.eq(TaskStatus::Pending.as_str()))
            .filter(tasks::attempts.eq(0))
            .filter(tasks::operation_uuid.is_null())
            .returning((tasks::uuid, ENDED))
            .get_results(conn)
            .await?;
        written.extend(ended);
    }
    let (uuids, ended): (Vec<String>, Vec<Ended>) = written.into_iter().unzip();
    count_ended(conn, &ended).await?;
    Ok(uuids)
}

/// The columns of a written row that `kser.task_minutes` counts.
const ENDED: (
    tasks::entrypoint,
    tasks::status,
    tasks::error,
    tasks::finished_at,
) = (
    tasks::entrypoint,
    tasks::status,
    tasks::error,
    tasks::finished_at,
);

/// The upsert that records the outcome of attempts, one array per column;
/// with `returning`, it returns the uuids it recorded. The row's status says
/// which outcome: final (SUCCESS, FAILED), or PENDING for an attempt that
/// will be retried at `next_attempt_at`.
///
/// Without `returning` (a statement of its own), it also counts the final
/// rows it wrote into `kser.task_minutes` (`minutes.rs`). With `returning`
/// (inside a transaction), the caller counts them with
/// [`count_ended`](super::minutes::count_ended) at the end of that
/// transaction, so the summary rows, which every worker's writes share,
/// stay locked only until the commit that follows.
///
/// Fenced by attempt (see [`Store::claim_tasks`]): an attempt is recorded
/// only if no other attempt started since it was claimed, that is, the
/// stored count is still the one before it, or it is this attempt's own
/// RUNNING mark (same count, same worker).
pub(crate) fn outcome_query(rows: &[NewTask], returning: bool) -> Prepared<'_> {
    let statement = if returning {
        Outcome::UpsertReturning
    } else {
        Outcome::Upsert
    };
    outcome_query_of(rows, statement)
}

/// The statements that record outcomes, one array per column.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The fenced upsert, counting what it wrote.
    Upsert,
    /// The fenced upsert, returning the uuids it wrote.
    UpsertReturning,
    /// A plain insert, counting what it wrote: it fails if a row exists.
    Insert,
}

/// [`outcome_query`], or its plain insert.
fn outcome_query_of(rows: &[NewTask], statement: Outcome) -> Prepared<'_> {
    use diesel::sql_types::{Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz};

    static UPSERT: LazyLock<String> = LazyLock::new(|| outcome_sql(Outcome::Upsert));
    static RETURNING: LazyLock<String> = LazyLock::new(|| outcome_sql(Outcome::UpsertReturning));
    static INSERT: LazyLock<String> = LazyLock::new(|| outcome_sql(Outcome::Insert));
    let sql = match statement {
        Outcome::Upsert => &UPSERT,
        Outcome::UpsertReturning => &RETURNING,
        Outcome::Insert => &INSERT,
    };
    Prepared::new(sql.as_str())
        .bind::<Array<Text>, _>(column(rows, |r| r.uuid.as_str()))
        .bind::<Array<Text>, _>(column(rows, |r| r.entrypoint.as_str()))
        .bind::<Array<Text>, _>(column(rows, |r| r.status))
        .bind::<Array<Jsonb>, _>(column(rows, |r| &r.params))
        .bind::<Array<Jsonb>, _>(column(rows, |r| &r.metadata))
        .bind::<Array<Nullable<Jsonb>>, _>(column(rows, |r| r.result.as_ref()))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.error.as_deref()))
        .bind::<Array<Int4>, _>(column(rows, |r| r.attempts))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.worker.as_deref()))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.topic.as_deref()))
        .bind::<Array<Nullable<Int4>>, _>(column(rows, |r| r.kafka_partition))
        .bind::<Array<Nullable<Int8>>, _>(column(rows, |r| r.kafka_offset))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.enqueued_at))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.started_at))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.finished_at))
        .bind::<Array<Nullable<Timestamptz>>, _>(column(rows, |r| r.next_attempt_at))
}

/// The text of [`outcome_query_of`].
fn outcome_sql(statement: Outcome) -> String {
    let returning = matches!(statement, Outcome::UpsertReturning);
    let conflict = if matches!(statement, Outcome::Insert) {
        ""
    } else {
        " ON CONFLICT (uuid) DO UPDATE SET status = excluded.status, result = excluded.result, \
             error = excluded.error, attempts = excluded.attempts, worker = excluded.worker, \
             topic = excluded.topic, kafka_partition = excluded.kafka_partition, \
             kafka_offset = excluded.kafka_offset, enqueued_at = excluded.enqueued_at, \
             started_at = excluded.started_at, finished_at = excluded.finished_at, \
             next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at \
         WHERE t.status IN ('PENDING', 'RUNNING') AND (t.attempts = excluded.attempts - 1 \
             OR (t.attempts = excluded.attempts AND t.status = 'RUNNING' \
                 AND t.worker IS NOT DISTINCT FROM excluded.worker))"
    };
    format!(
        "{}INSERT INTO kser.tasks AS t (uuid, entrypoint, status, params, metadata, result, error, \
             attempts, worker, topic, kafka_partition, kafka_offset, enqueued_at, started_at, \
             finished_at, next_attempt_at, updated_at) \
         SELECT v.uuid, v.entrypoint, v.status, v.params, v.metadata, v.result, v.error, \
             v.attempts, v.worker, v.topic, v.kafka_partition, v.kafka_offset, v.enqueued_at, \
             v.started_at, v.finished_at, v.next_attempt_at, coalesce(v.finished_at, now()) \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[], \
             $7::text[], $8::int4[], $9::text[], $10::text[], $11::int4[], $12::int8[], \
             $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], $16::timestamptz[]) \
             AS v(uuid, entrypoint, status, params, metadata, result, error, attempts, worker, \
                  topic, kafka_partition, kafka_offset, enqueued_at, started_at, finished_at, \
                  next_attempt_at){conflict}{}",
        if returning { "" } else { "WITH written AS (" },
        if returning {
            " RETURNING t.uuid".to_owned()
        } else {
            // `execute` still answers how many were written: the count of
            // the SELECT.
            format!(
                " RETURNING t.entrypoint, t.status, t.error, t.finished_at), \
                 counted AS ({}) SELECT 1 FROM written",
                super::minutes::count_sql("written AS s")
            )
        }
    )
}

/// One field of every row, to bind as a Postgres array.
fn column<'a, T>(rows: &'a [NewTask], field: impl Fn(&'a NewTask) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}
