//! `kser.task_minutes`: tasks that ended SUCCESS or FAILED, counted per
//! minute, entrypoint and state as they end, so the console's dashboard
//! reads at most a row per minute, entrypoint and state (about 21,000 for a
//! day of 13 busy entrypoints) instead of a day of `kser.tasks`.
//!
//! Every write of a final state counts the rows it wrote, and only those:
//! `complete_tasks` (the finisher's batched upsert, `outcome_query`) in the
//! same statement, through [`count_sql`] over its `RETURNING` rows; the
//! writes inside a transaction (steps, transactional tasks, rejected and
//! undecodable messages) through [`count_ended`], last, just before their
//! commit. A write fenced out returns no row and counts nothing; a retry
//! (PENDING) is not an end.
//!
//! A writer holds the rows it adds to from its count to its commit: a
//! statement of its own, or the end of a transaction, never while it does
//! more work. So that concurrent writers (transactional tasks, each in a
//! transaction of its own; several workers) seldom wait for each other,
//! each count goes to one of [`SHARDS`] rows of its minute, entrypoint and
//! state, picked by the writer's backend (`pg_backend_pid()`); readers sum
//! them. Unsharded, every transactional task waited for the commit of the
//! one before it: 1,239 tasks/s instead of about 2,500. Each writer locks
//! its rows in key order, so two cannot deadlock over them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::database::StoreError;

/// How many rows share the count of one minute, entrypoint and state.
pub(crate) const SHARDS: i32 = 8;

/// A task row as a final-state write returned it: what the summary counts.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct Ended {
    pub entrypoint: String,
    pub status: String,
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<&super::NewTask> for Ended {
    fn from(row: &super::NewTask) -> Self {
        Self {
            entrypoint: row.entrypoint.clone(),
            status: row.status.to_owned(),
            error: row.error.clone(),
            finished_at: row.finished_at,
        }
    }
}

/// The summary upsert over `source`, a relation with the columns
/// `entrypoint, status, error, finished_at` (a CTE's `RETURNING` rows, or
/// arrays): one row per minute, entrypoint and final state, in key order so
/// that concurrent writers lock them in the same order. Only FAILED rows are
/// sorted for their latest error (the sort costs, and SUCCESS has none).
pub(crate) fn count_sql(source: &str) -> String {
    format!(
        "INSERT INTO kser.task_minutes AS m (minute, entrypoint, status, shard, tasks, last_error, \
             last_at) \
         SELECT date_trunc('minute', e.at), e.entrypoint, e.status, \
             (pg_backend_pid() % {SHARDS})::int2, count(*), \
             (array_agg(e.error ORDER BY e.at DESC) FILTER (WHERE e.status = 'FAILED'))[1], \
             max(e.at) \
         FROM (SELECT s.entrypoint, s.status, s.error, coalesce(s.finished_at, now()) AS at \
               FROM {source}) AS e \
         WHERE e.status IN ('SUCCESS', 'FAILED') \
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
         ON CONFLICT (minute, entrypoint, status, shard) DO UPDATE SET tasks = m.tasks + excluded.tasks, \
             last_error = CASE WHEN excluded.last_at >= m.last_at \
                 THEN excluded.last_error ELSE m.last_error END, \
             last_at = greatest(m.last_at, excluded.last_at)"
    )
}

/// Counts `ended` rows into the summary on `conn`, inside the caller's
/// transaction (the one that wrote them).
pub(crate) async fn count_ended(
    conn: &mut AsyncPgConnection,
    ended: &[Ended],
) -> Result<(), StoreError> {
    if !ended
        .iter()
        .any(|e| e.status == "SUCCESS" || e.status == "FAILED")
    {
        return Ok(());
    }
    let column = |f: fn(&Ended) -> Option<&str>| ended.iter().map(f).collect::<Vec<_>>();
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        count_sql(
            "unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) \
                 AS s(entrypoint, status, error, finished_at)",
        )
    });
    super::prepared::Prepared::new(SQL.as_str())
        .bind::<Array<Text>, _>(
            ended
                .iter()
                .map(|e| e.entrypoint.as_str())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Text>, _>(ended.iter().map(|e| e.status.as_str()).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(column(|e| e.error.as_deref()))
        .bind::<Array<Nullable<Timestamptz>>, _>(
            ended.iter().map(|e| e.finished_at).collect::<Vec<_>>(),
        )
        .execute(conn)
        .await?;
    Ok(())
}
