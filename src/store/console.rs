//! The console's dashboard queries. Each reads a bounded range of the
//! `created_at` indexes (the last day at most), never the whole table, so
//! the dashboard costs the same with a million rows as with a thousand.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::{Store, StoreError};

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
    /// Tasks and operations recorded within the last day, by state.
    pub async fn status_counts(&self) -> Result<Vec<StatusCount>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT 'task' AS kind, status, count(*) AS count FROM kser.tasks \
                 WHERE created_at > now() - interval '1 day' GROUP BY status \
             UNION ALL \
             SELECT 'operation', status, count(*) FROM kser.operations \
                 WHERE created_at > now() - interval '1 day' GROUP BY status \
             ORDER BY 1, 2",
        )
        .load(&mut conn)
        .await?)
    }

    /// Tasks that ended in each minute of the last hour (of those recorded
    /// within the last day), oldest first; minutes without any are left out.
    pub async fn throughput(&self) -> Result<Vec<MinuteCount>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT date_trunc('minute', finished_at) AS minute, \
                 count(*) FILTER (WHERE status = 'SUCCESS') AS succeeded, \
                 count(*) FILTER (WHERE status = 'FAILED') AS failed \
             FROM kser.tasks \
             WHERE created_at > now() - interval '1 day' \
               AND finished_at > now() - interval '1 hour' \
             GROUP BY 1 ORDER BY 1",
        )
        .load(&mut conn)
        .await?)
    }

    /// The entrypoints with the most FAILED tasks recorded within the last
    /// day, with the latest error of each.
    pub async fn failures_by_entrypoint(
        &self,
        limit: i64,
    ) -> Result<Vec<EntrypointFailures>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT entrypoint, count(*) AS failed, \
                 (array_agg(error ORDER BY created_at DESC))[1] AS last_error \
             FROM kser.tasks \
             WHERE created_at > now() - interval '1 day' AND status = 'FAILED' \
             GROUP BY entrypoint ORDER BY failed DESC, entrypoint LIMIT $1",
        )
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
