//! Retention: deleting old finished work, a batch at a time.
//!
//! What goes, once its last change is older than the cutoff:
//! - standalone tasks in a finished state (SUCCESS, FAILED, CANCELLED), with
//!   their earlier attempts (`kser.task_attempts`);
//! - operations in a finished state, with all their steps and the steps'
//!   attempts, but only when no step is RUNNING, no step changed since the
//!   cutoff and no message of the operation waits in the outbox: a step of
//!   a live operation is never removed, alone or with its operation;
//! - the dashboard's counts of tasks that ended before the cutoff
//!   (`kser.task_minutes`), in one statement, not in a dry run.
//!
//! What stays: anything PENDING (a retry waiting for its backoff, a delayed
//! send) or RUNNING, steps outside their operation, and `kser.outbox`,
//! which holds only messages not yet published (the relay deletes a row
//! once the broker has it). Dead letters kept in Postgres
//! (`kser.dead_letters`) carry no mark of having been replayed or dealt
//! with, so they go only when asked ([`PruneRequest::dead_letters`]).
//!
//! Each batch is one statement: it reads up to `batch_size` rows in
//! `(created_at, uuid)` order from the index, locks those that qualify
//! (skipping any row another transaction holds), deletes them, and the next
//! batch starts after the last row read. No lock outlives a batch, and rows
//! that do not qualify are read once, not once per batch.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::database::{CONNECT_TIMEOUT, Store, StoreError};
use super::models::TaskStatus;

/// The advisory lock a pruning session holds, so that one worker of a fleet
/// (or one `kser prune`) prunes at a time. (Migrations use 7365723.)
pub const PRUNE_LOCK: i64 = 7_365_724;

/// The default number of rows read per batch: each batch holds its locks
/// for a fraction of a second.
pub const DEFAULT_PRUNE_BATCH: i64 = 5_000;

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneRequest {
    /// Rows whose last change is older than this go.
    pub older_than: Duration,
    /// The finished states to remove (tasks and operations); empty means
    /// all of them. An unfinished state here is an error.
    pub statuses: Vec<TaskStatus>,
    /// Also remove dead letters kept in `kser.dead_letters` older than the
    /// cutoff (by when they were kept).
    pub dead_letters: bool,
    /// Most rows read per statement.
    pub batch_size: i64,
    /// Count what would go, remove nothing.
    pub dry_run: bool,
}

impl PruneRequest {
    /// Prune finished tasks and operations older than `older_than`, in
    /// batches of [`DEFAULT_PRUNE_BATCH`], dead letters kept.
    pub fn older_than(older_than: Duration) -> Self {
        Self {
            older_than,
            statuses: Vec::new(),
            dead_letters: false,
            batch_size: DEFAULT_PRUNE_BATCH,
            dry_run: false,
        }
    }
}

/// What a prune removed (or, dry, would remove), per table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Everything older than this was considered (Postgres's clock).
    pub cutoff: DateTime<Utc>,
    /// Whether nothing was removed, only counted.
    pub dry_run: bool,
    /// Standalone tasks (`kser.tasks` rows outside operations).
    pub tasks: u64,
    /// Operations (`kser.operations`).
    pub operations: u64,
    /// The steps of those operations (`kser.tasks` rows too).
    pub steps: u64,
    /// Earlier attempts of the tasks and steps (`kser.task_attempts`).
    pub task_attempts: u64,
    /// Kept dead letters (`kser.dead_letters`); `None` when not asked.
    pub dead_letters: Option<u64>,
}

#[derive(QueryableByName)]
struct Batch {
    #[diesel(sql_type = BigInt)]
    scanned: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    last_uuid: Option<String>,
    #[diesel(sql_type = BigInt)]
    removed: i64,
    #[diesel(sql_type = BigInt)]
    children: i64,
    #[diesel(sql_type = BigInt)]
    attempts: i64,
}

/// Which rows of a batch go, as `doomed`: standalone finished tasks.
const TASKS_DOOMED: &str = "SELECT t.uuid FROM kser.tasks AS t WHERE t.uuid = batch.uuid \
     AND t.operation_uuid IS NULL AND t.status = ANY($5) \
     AND coalesce(t.finished_at, t.updated_at) < $1";

/// Which rows of a batch go, as `doomed`: finished operations, old as a
/// whole, with no running step and no message waiting. (`OFFSET 0` keeps
/// each `NOT EXISTS` a lookup per operation, by index, where the planner
/// could otherwise join all steps or all of the outbox.)
const OPERATIONS_DOOMED: &str = "SELECT o.uuid FROM kser.operations AS o WHERE o.uuid = batch.uuid \
     AND o.status = ANY($5) AND coalesce(o.finished_at, o.updated_at) < $1 \
     AND NOT EXISTS (SELECT 1 FROM kser.tasks AS s WHERE s.operation_uuid = o.uuid \
                     AND (s.status = 'RUNNING' OR s.updated_at >= $1) OFFSET 0) \
     AND NOT EXISTS (SELECT 1 FROM kser.outbox AS m WHERE m.operation_uuid = o.uuid OFFSET 0)";

/// One batch over `kser.operations` (`operations`) or `kser.tasks`: the
/// next `$4` rows created before the cutoff `$1`, after `($2, $3)` (from
/// the first when `$2` is null), read in index order; of those, the rows
/// that go (`doomed`), each looked up by its key (the lateral `OFFSET 0`
/// keeps it a lookup per row). Deletes them, their steps and their
/// attempts by key (or only counts them, `dry`), and returns how many rows
/// were read, the last one, and what went.
fn batch_sql(operations: bool, dry: bool) -> String {
    let (table, doomed) = if operations {
        ("kser.operations", OPERATIONS_DOOMED)
    } else {
        ("kser.tasks", TASKS_DOOMED)
    };
    let lock = if dry { "" } else { " FOR UPDATE SKIP LOCKED" };
    // The tasks whose attempts go: the doomed tasks, or the doomed
    // operations' steps.
    let owners = if operations {
        "SELECT s.uuid FROM kser.tasks AS s \
         WHERE s.operation_uuid = ANY (ARRAY(SELECT uuid FROM doomed))"
    } else {
        "SELECT uuid FROM doomed"
    };
    let (verb, returning) = if dry {
        ("SELECT 1 FROM", "")
    } else {
        ("DELETE FROM", " RETURNING 1")
    };
    let children = if operations {
        format!(
            "{verb} kser.tasks AS s \
             WHERE s.operation_uuid = ANY (ARRAY(SELECT uuid FROM doomed)){returning}"
        )
    } else {
        "SELECT 1 WHERE false".to_owned()
    };
    format!(
        "WITH batch AS MATERIALIZED ( \
             SELECT created_at, uuid FROM {table} \
             WHERE created_at < $1 \
               AND (created_at, uuid) > (coalesce($2, '-infinity'::timestamptz), $3) \
             ORDER BY created_at, uuid LIMIT $4), \
         doomed AS MATERIALIZED ( \
             SELECT d.uuid FROM batch, LATERAL ({doomed} OFFSET 0{lock}) AS d), \
         attempts AS ({verb} kser.task_attempts AS a \
             WHERE a.task_uuid = ANY (ARRAY({owners})){returning}), \
         children AS ({children}), \
         removed AS ({verb} {table} AS x \
             WHERE x.uuid = ANY (ARRAY(SELECT uuid FROM doomed)){returning}) \
         SELECT (SELECT count(*) FROM batch) AS scanned, \
             last.created_at AS last_created_at, last.uuid AS last_uuid, \
             (SELECT count(*) FROM removed) AS removed, \
             (SELECT count(*) FROM children) AS children, \
             (SELECT count(*) FROM attempts) AS attempts \
         FROM (SELECT NULL) AS one \
         LEFT JOIN (SELECT created_at, uuid FROM batch ORDER BY created_at DESC, uuid DESC LIMIT 1) \
             AS last ON true"
    )
}

/// The statements of one batch (operations, then standalone tasks), with
/// the parameters `$1` cutoff, `$2`/`$3` the last row read, `$4` the batch
/// size, `$5` the states; for tests that check their query plans.
#[doc(hidden)]
pub fn prune_batch_statements() -> [String; 2] {
    [batch_sql(true, false), batch_sql(false, false)]
}

/// One batch of kept dead letters: the next `$3` after id `$2`, those kept
/// before `$1` removed (or counted).
fn dead_letters_sql(dry: bool) -> String {
    let removed = if dry {
        "SELECT 1 FROM doomed"
    } else {
        "DELETE FROM kser.dead_letters AS d USING doomed WHERE d.id = doomed.id RETURNING 1"
    };
    let lock = if dry {
        ""
    } else {
        " FOR UPDATE OF d SKIP LOCKED"
    };
    format!(
        "WITH batch AS MATERIALIZED ( \
             SELECT id FROM kser.dead_letters WHERE id > $2 ORDER BY id LIMIT $3), \
         doomed AS MATERIALIZED ( \
             SELECT d.id FROM kser.dead_letters AS d JOIN batch ON batch.id = d.id \
             WHERE d.created_at < $1{lock}), \
         removed AS ({removed}) \
         SELECT (SELECT count(*) FROM batch) AS scanned, \
             (SELECT max(id) FROM batch) AS last_id, \
             (SELECT count(*) FROM removed) AS removed"
    )
}

/// The finished states named by `statuses` (all when empty), or an error
/// naming an unfinished one.
fn finished_states(statuses: &[TaskStatus]) -> Result<Vec<&'static str>, StoreError> {
    if let Some(unfinished) = statuses.iter().find(|s| !s.is_final()) {
        return Err(StoreError::Conflict(format!(
            "prune removes finished work only: {unfinished} is not a finished state \
             (choose among SUCCESS, FAILED, CANCELLED, COMPENSATED)"
        )));
    }
    let mut states: Vec<&'static str> = if statuses.is_empty() {
        vec!["SUCCESS", "FAILED", "CANCELLED", "COMPENSATED"]
    } else {
        statuses.iter().map(|s| s.as_str()).collect()
    };
    states.sort_unstable();
    states.dedup();
    Ok(states)
}

impl Store {
    /// Removes (or, with [`PruneRequest::dry_run`], counts) old finished
    /// work as the module documentation says, and returns what went per
    /// table. `Ok(None)` when another session is pruning this database (the
    /// advisory lock [`PRUNE_LOCK`] is taken): a dry run does not take it.
    ///
    /// Runs on a connection of its own, outside the pool, so the session
    /// lock ends with it whatever happens.
    pub async fn prune(&self, request: &PruneRequest) -> Result<Option<Pruned>, StoreError> {
        let states = finished_states(&request.statuses)?;
        let batch_size = request.batch_size.max(1);
        let mut conn = self.dedicated().await?;
        // A lock another transaction holds for long is skipped, or waited
        // for briefly: pruning never makes the hot path queue behind it.
        diesel::sql_query("SET lock_timeout = '5s'")
            .execute(&mut conn)
            .await?;
        if !request.dry_run && !try_lock(&mut conn).await? {
            return Ok(None);
        }
        let cutoff = cutoff(&mut conn, request.older_than).await?;
        let mut pruned = Pruned {
            cutoff,
            dry_run: request.dry_run,
            ..Pruned::default()
        };
        // Operations first: a step goes with its operation or not at all.
        for operations in [true, false] {
            let sql = batch_sql(operations, request.dry_run);
            let mut after: (Option<DateTime<Utc>>, String) = (None, String::new());
            loop {
                let batch: Batch = diesel::sql_query(&sql)
                    .bind::<Timestamptz, _>(cutoff)
                    .bind::<Nullable<Timestamptz>, _>(after.0)
                    .bind::<Text, _>(&after.1)
                    .bind::<BigInt, _>(batch_size)
                    .bind::<Array<Text>, _>(&states)
                    .get_result(&mut conn)
                    .await?;
                let removed = u64::try_from(batch.removed).unwrap_or(0);
                let children = u64::try_from(batch.children).unwrap_or(0);
                if operations {
                    pruned.operations += removed;
                    pruned.steps += children;
                } else {
                    pruned.tasks += removed;
                }
                pruned.task_attempts += u64::try_from(batch.attempts).unwrap_or(0);
                match (batch.last_created_at, batch.last_uuid) {
                    (Some(created_at), Some(uuid)) if batch.scanned >= batch_size => {
                        after = (Some(created_at), uuid);
                    }
                    _ => break,
                }
            }
        }
        if !request.dry_run {
            // The dashboard's counts of the same past (`kser.task_minutes`).
            diesel::sql_query("DELETE FROM kser.task_minutes WHERE minute < $1")
                .bind::<Timestamptz, _>(cutoff)
                .execute(&mut conn)
                .await?;
        }
        if request.dead_letters {
            pruned.dead_letters =
                Some(prune_dead_letters(&mut conn, cutoff, batch_size, request.dry_run).await?);
        }
        Ok(Some(pruned))
    }

    /// A connection outside the pool, closed when dropped.
    async fn dedicated(&self) -> Result<AsyncPgConnection, StoreError> {
        let unreachable = |reason: String| StoreError::Connect {
            url: crate::redact::database_url(&self.url),
            reason,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, AsyncPgConnection::establish(&self.url)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(unreachable(err.to_string())),
            Err(_) => Err(unreachable(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Takes the session's prune lock if no other session holds it.
async fn try_lock(conn: &mut AsyncPgConnection) -> Result<bool, StoreError> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(PRUNE_LOCK)
        .get_result(conn)
        .await?;
    Ok(locked.locked)
}

/// Now less `older_than`, by Postgres's clock, which also set `created_at`.
async fn cutoff(
    conn: &mut AsyncPgConnection,
    older_than: Duration,
) -> Result<DateTime<Utc>, StoreError> {
    #[derive(QueryableByName)]
    struct Cutoff {
        #[diesel(sql_type = Timestamptz)]
        cutoff: DateTime<Utc>,
    }
    let micros = i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX);
    let cutoff: Cutoff =
        diesel::sql_query("SELECT now() - $1 * interval '1 microsecond' AS cutoff")
            .bind::<BigInt, _>(micros)
            .get_result(conn)
            .await?;
    Ok(cutoff.cutoff)
}

async fn prune_dead_letters(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
    batch_size: i64,
    dry: bool,
) -> Result<u64, StoreError> {
    #[derive(QueryableByName)]
    struct DeadBatch {
        #[diesel(sql_type = BigInt)]
        scanned: i64,
        #[diesel(sql_type = Nullable<BigInt>)]
        last_id: Option<i64>,
        #[diesel(sql_type = BigInt)]
        removed: i64,
    }
    let sql = dead_letters_sql(dry);
    let (mut after, mut total) = (0_i64, 0_u64);
    loop {
        let batch: DeadBatch = diesel::sql_query(&sql)
            .bind::<Timestamptz, _>(cutoff)
            .bind::<BigInt, _>(after)
            .bind::<BigInt, _>(batch_size)
            .get_result(conn)
            .await?;
        total += u64::try_from(batch.removed).unwrap_or(0);
        match batch.last_id {
            Some(id) if batch.scanned >= batch_size => after = id,
            _ => return Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finished_states_are_pruned() {
        assert_eq!(
            finished_states(&[]).expect("all"),
            ["CANCELLED", "COMPENSATED", "FAILED", "SUCCESS"]
        );
        assert_eq!(
            finished_states(&[TaskStatus::Failed]).expect("failed"),
            ["FAILED"]
        );
        let err = finished_states(&[TaskStatus::Success, TaskStatus::Pending])
            .expect_err("pending is not finished");
        assert!(
            err.to_string().contains("PENDING is not a finished state"),
            "{err}"
        );
    }

    #[test]
    fn a_dry_batch_deletes_nothing() {
        for operations in [true, false] {
            assert!(!batch_sql(operations, true).contains("DELETE"));
            assert!(batch_sql(operations, false).contains("DELETE"));
        }
        assert!(!dead_letters_sql(true).contains("DELETE"));
    }
}
