//! The console's dashboard queries. What tasks ended, and their failures,
//! are read from `kser.task_minutes` (at most a day of minutes per
//! entrypoint, see `minutes.rs`), tasks in other states from the partial
//! index `tasks_not_success_idx`, and operations recorded within the last
//! day (their `created_at` index, or a scan when most are that recent). No
//! day of `kser.tasks` is read: the dashboard costs about the same with a
//! million task rows as with a thousand. `examples/console_plans.rs` prints
//! the plans of this SQL with a million tasks.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::database::{Store, StoreError};

/// Tasks that ended SUCCESS or FAILED within the last day (whole minutes).
const ENDED_BY_STATUS: &str = "SELECT 'task' AS kind, status, sum(tasks)::bigint AS count \
     FROM kser.task_minutes WHERE minute > now() - interval '1 day' GROUP BY status";

/// Tasks recorded within the last day and in another state than SUCCESS or
/// FAILED now: an index-only scan of `tasks_not_success_idx`.
const UNFINISHED_BY_STATUS: &str = "SELECT 'task', status, count(*) FROM kser.tasks \
     WHERE created_at > now() - interval '1 day' AND status NOT IN ('SUCCESS', 'FAILED') \
     GROUP BY status";

/// Operations recorded within the last day, by state.
const OPERATIONS_BY_STATUS: &str = "SELECT 'operation', status, count(*) \
     FROM kser.operations WHERE created_at > now() - interval '1 day' GROUP BY status";

/// Tasks ended per minute over the last hour.
const THROUGHPUT: &str = "SELECT minute, \
         coalesce(sum(tasks) FILTER (WHERE status = 'SUCCESS'), 0)::bigint AS succeeded, \
         coalesce(sum(tasks) FILTER (WHERE status = 'FAILED'), 0)::bigint AS failed \
     FROM kser.task_minutes WHERE minute > now() - interval '1 hour' \
     GROUP BY minute ORDER BY minute";

/// Failures by entrypoint over the last day, the most first, with the
/// latest error; `$1` is how many entrypoints.
const FAILURES: &str = "SELECT entrypoint, sum(tasks)::bigint AS failed, \
         (array_agg(last_error ORDER BY last_at DESC))[1] AS last_error \
     FROM kser.task_minutes WHERE status = 'FAILED' AND minute > now() - interval '1 day' \
     GROUP BY entrypoint ORDER BY failed DESC, entrypoint LIMIT $1";

/// How many tasks or operations are in one state.
#[derive(Debug, Clone, diesel::QueryableByName, Serialize, utoipa::ToSchema)]
pub struct StatusCount {
    /// `task` or `operation`.
    #[diesel(sql_type = Text)]
    pub kind: String,
    /// The state counted.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// How many are in it.
    #[diesel(sql_type = BigInt)]
    pub count: i64,
}

/// Tasks that ended within one minute.
#[derive(Debug, Clone, diesel::QueryableByName, Serialize, utoipa::ToSchema)]
pub struct MinuteCount {
    /// The minute's start.
    #[diesel(sql_type = Timestamptz)]
    pub minute: DateTime<Utc>,
    /// Tasks that ended SUCCESS in it.
    #[diesel(sql_type = BigInt)]
    pub succeeded: i64,
    /// Tasks that ended FAILED in it.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
}

/// Failed tasks of one entrypoint.
#[derive(Debug, Clone, diesel::QueryableByName, Serialize, utoipa::ToSchema)]
pub struct EntrypointFailures {
    /// The entrypoint.
    #[diesel(sql_type = Text)]
    pub entrypoint: String,
    /// How many of its tasks failed.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    /// The error of the latest one.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

impl Store {
    /// Tasks and operations of the last day, by state: tasks that ended
    /// SUCCESS or FAILED within the last day (`kser.task_minutes`, a task
    /// that ended twice counts in both), tasks recorded within the last day
    /// and now in another state (`tasks_not_success_idx`), and operations
    /// recorded within the last day.
    pub async fn status_counts(&self) -> Result<Vec<StatusCount>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(format!(
            "{ENDED_BY_STATUS} \
             UNION ALL {UNFINISHED_BY_STATUS} \
             UNION ALL {OPERATIONS_BY_STATUS} \
             ORDER BY 1, 2"
        ))
        .load(&mut conn)
        .await?)
    }

    /// Tasks that ended in each minute of the last hour, oldest first;
    /// minutes without any are left out.
    pub async fn throughput(&self) -> Result<Vec<MinuteCount>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(THROUGHPUT).load(&mut conn).await?)
    }

    /// The entrypoints with the most tasks that ended FAILED within the
    /// last day, with the latest error of each.
    pub async fn failures_by_entrypoint(
        &self,
        limit: i64,
    ) -> Result<Vec<EntrypointFailures>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(FAILURES)
            .bind::<BigInt, _>(limit)
            .load(&mut conn)
            .await?)
    }

    /// The plan Postgres chooses for `sql` (`EXPLAIN`), one line per row:
    /// for tests and benchmarks that show a query uses an index.
    #[doc(hidden)]
    pub async fn explain(&self, sql: &str) -> Result<Vec<String>, StoreError> {
        #[derive(diesel::QueryableByName)]
        struct Line {
            #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
            line: String,
        }
        let mut conn = self.conn().await?;
        let lines: Vec<Line> = diesel::sql_query(format!("EXPLAIN {sql}"))
            .load(&mut conn)
            .await?;
        Ok(lines.into_iter().map(|l| l.line).collect())
    }
}
