//! Postgres persistence: the `kser.tasks` table, its migrations, and the
//! batched writes the worker's hot path uses.
//!
//! Every write is one statement over many rows, so a batch of a thousand
//! messages costs one round trip. Writes never move a task out of a final
//! state (SUCCESS, FAILED): a redelivered or duplicate message cannot undo
//! or redo finished work.

mod console;
mod dead_letters;
mod events;
mod graph;
mod models;
mod operations;
mod pools;
mod prune;
mod recovery;
mod retries;
mod schedules;
mod schema;
mod workers;

use std::collections::HashMap;
use std::time::Duration;

use diesel::prelude::*;
use diesel::result::DatabaseErrorKind;
use diesel::upsert::excluded;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

pub use console::{EntrypointFailures, MinuteCount, StatusCount};
pub use dead_letters::{KeptRecord, NewDeadLetter, StoredDeadLetter};
pub use events::{Delivery, EventRow};
pub use models::{
    AttemptRow, NewOperation, NewOutbox, NewTask, OperationRow, OutboxRow, StepRow, TaskRow,
    TaskStatus,
};
pub use operations::{
    FinishedOperation, OPERATION_METADATA_KEY, OperationStart, Resumed, RunningStep,
};
#[doc(hidden)]
pub use pools::{Admission, LeaseRequest, PoolRow, entrypoint_pool};
pub use prune::prune_batch_statements;
pub use prune::{DEFAULT_PRUNE_BATCH, PRUNE_LOCK, PruneRequest, Pruned};
pub use recovery::{Recovery, client_recovery, guess_sqlstate, of_sqlstate};
pub use retries::Retry;
pub use schedules::{Fired, NewSchedule, ScheduleFiring, ScheduleRow};
use schema::kser::tasks;
pub use workers::{Beat, BeatReply, Control, ControlAction, NewWorker, WorkerRow, WorkerState};

/// The migrations in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The most bind parameters Postgres takes in one statement (the protocol
/// counts them in 16 bits).
const MAX_BIND_PARAMS: usize = 65_535;

/// The most rows in one multi-row `INSERT` built by diesel, which binds one
/// parameter per column and row: no kser table has more than 32 columns
/// (diesel's `32-column-tables`), so this many rows always fit under
/// [`MAX_BIND_PARAMS`], however many rows a batch brings. (The `unnest`
/// statements bind one array per column and need no chunks.)
pub(crate) const INSERT_CHUNK: usize = MAX_BIND_PARAMS / 32;

/// What a worker's database role needs, as the errors say it.
pub const WORKER_PRIVILEGES: &str = "a worker's role needs USAGE on schema kser, SELECT, INSERT, UPDATE, DELETE on every table of schema kser, USAGE on its sequences, and SELECT on public.__diesel_schema_migrations";

/// The tables of schema `kser` a worker reads and writes, and the
/// privileges it needs on each.
const WORKER_TABLES: &[&str] = &[
    "kser.tasks",
    "kser.operations",
    "kser.outbox",
    "kser.task_attempts",
    "kser.dead_letters",
    "kser.workers",
    "kser.controls",
    "kser.events",
    "kser.event_deliveries",
    "kser.schedules",
    "kser.steps",
    "kser.pools",
    "kser.leases",
    "kser.waiters",
];
const WORKER_TABLE_PRIVILEGES: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE"];
/// The sequences behind `bigserial` ids, which inserts advance.
const WORKER_SEQUENCES: &[&str] = &[
    "kser.outbox_id_seq",
    "kser.dead_letters_id_seq",
    "kser.waiters_seq_seq",
];

/// How long to wait for a connection before calling the database unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the store.
///
/// Each says its cause in its own message and does not return it again as
/// its `source()`, so a printed chain names the cause once, and a log line
/// with `%err` still has it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No connection could be made.
    #[error("could not connect to Postgres at {url}: {reason}")]
    Connect {
        /// The database URL, without its password.
        url: String,
        /// What the driver or the pool said.
        reason: String,
    },
    /// A statement failed; [`StoreError::recovery`] says whether retrying
    /// it can help.
    #[error("database query failed: {0}")]
    Query(diesel::result::Error),
    /// `kser migrate` (or a worker's start) could not apply a migration.
    #[error("could not apply migrations: {0}")]
    Migration(String),
    /// The database lacks some of this binary's migrations (or all: it was
    /// never migrated), so kser's tables are missing or out of date.
    #[error(
        "the database at {url} is not migrated ({pending} of {total} kser migrations not applied): run `kser migrate` (a worker also migrates at start)"
    )]
    NotMigrated {
        /// The database URL, without its password.
        url: String,
        /// How many of this binary's migrations it lacks.
        pending: usize,
        /// How many this binary has.
        total: usize,
    },
    /// The connected role lacks a privilege kser needs on its tables. A
    /// worker's role needs them all; see [`Store::check_privileges`].
    #[error(
        "permission denied: the role '{role}' lacks {missing}; {WORKER_PRIVILEGES} (see README, \"Least privilege\")"
    )]
    Privileges {
        /// The role connected.
        role: String,
        /// The privileges it lacks, named.
        missing: String,
    },
    /// What a command asked for does not exist (a uuid, an operation).
    #[error("{0}")]
    NotFound(String),
    /// What a command asked for cannot be done in the state things are in
    /// (resuming an operation that succeeded...).
    #[error("{0}")]
    Conflict(String),
}

impl From<diesel::result::Error> for StoreError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Query(err)
    }
}

impl StoreError {
    /// Whether the database could not be reached or the connection was lost:
    /// worth waiting out, whatever the statement was.
    pub fn is_connection_error(&self) -> bool {
        use diesel::result::Error;
        match self {
            Self::Connect { .. } => true,
            Self::Query(Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _))
            | Self::Query(Error::BrokenTransactionManager) => true,
            Self::Query(Error::DatabaseError(_, info)) => {
                let message = info.message();
                message.contains("terminating connection")
                    || message.contains("connection closed")
                    || message.contains("server closed the connection")
            }
            _ => false,
        }
    }
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
#[derive(Debug, Clone, QueryableByName)]
pub struct StartedTask {
    /// The task's uuid.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub uuid: String,
    /// The attempt about to start: 1 for the first, more after
    /// redeliveries, retries and resumes.
    #[diesel(sql_type = diesel::sql_types::Int4)]
    pub attempts: i32,
    /// The operation the task is a step of, if any.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub operation_uuid: Option<String>,
    /// Its place in that operation, from 0.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Int4>)]
    pub position: Option<i32>,
}

/// A pool of connections to the kser database.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
    url: String,
}

impl Store {
    /// Connects to `url` and checks that one connection can be made, so a
    /// wrong URL or a stopped server fails here with a clear message.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|err| StoreError::Connect {
                url: crate::redact::database_url(url),
                reason: err.to_string(),
            })?;
        let store = Self {
            pool,
            url: url.to_owned(),
        };
        drop(store.conn().await?);
        Ok(store)
    }

    /// How many connections the pool holds at most.
    pub fn max_connections(&self) -> usize {
        self.pool.status().max_size
    }

    /// A connection from the pool, or an error naming the database.
    pub(crate) async fn conn(&self) -> Result<Object<AsyncPgConnection>, StoreError> {
        let unreachable = |reason: String| StoreError::Connect {
            url: crate::redact::database_url(&self.url),
            reason,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(unreachable(crate::report::error_chain(&err))),
            Err(_) => Err(unreachable(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Writes a known-good row into `kser.tasks` and rolls it back: whether
    /// the database takes kser's writes now (it answers, the schema is
    /// there, the role may insert, the disk takes pages). Decides
    /// [`Recovery::Unclassified`] errors: if this succeeds, the statement
    /// that failed is at fault, not the database.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        use diesel_async::AsyncConnection as _;

        enum Probe {
            /// Ends the probe's transaction without keeping its row.
            RolledBack,
            Failed(StoreError),
        }
        impl From<diesel::result::Error> for Probe {
            fn from(err: diesel::result::Error) -> Self {
                Self::Failed(err.into())
            }
        }
        let mut conn = self.conn().await?;
        let probed = conn
            .transaction::<(), Probe, _>(async |conn| {
                diesel::sql_query(
                    "INSERT INTO kser.tasks (uuid, entrypoint, status) \
                     VALUES ('kser-probe-' || gen_random_uuid(), 'kser.probe', 'PENDING')",
                )
                .execute(conn)
                .await?;
                Err(Probe::RolledBack)
            })
            .await;
        match probed {
            Ok(()) | Err(Probe::RolledBack) => Ok(()),
            Err(Probe::Failed(err)) => Err(err),
        }
    }

    /// Applies the pending embedded migrations and returns their names.
    /// Concurrent callers (several workers starting at once) take turns on
    /// an advisory lock.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        use diesel::Connection as _;
        use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;

        let url = self.url.clone();
        let redacted = crate::redact::database_url(&self.url);
        let applied =
            tokio::task::spawn_blocking(move || {
                let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url)
                    .map_err(|err| StoreError::Connect {
                        url: redacted,
                        reason: err.to_string(),
                    })?;
                diesel::RunQueryDsl::execute(
                    diesel::sql_query("SELECT pg_advisory_lock(7365723)"),
                    &mut conn,
                )?;
                let applied = conn
                    .run_pending_migrations(MIGRATIONS)
                    .map(|versions| versions.iter().map(ToString::to_string).collect())
                    .map_err(|err| StoreError::Migration(err.to_string()));
                diesel::RunQueryDsl::execute(
                    diesel::sql_query("SELECT pg_advisory_unlock(7365723)"),
                    &mut conn,
                )?;
                applied
            })
            .await
            .map_err(|err| StoreError::Migration(err.to_string()))??;
        Ok(applied)
    }

    /// Fails with [`StoreError::NotMigrated`] unless every embedded migration
    /// is applied. Commands that read kser's tables call it first: diesel
    /// does not pass Postgres's SQLSTATE on, so a missing table (42P01)
    /// would otherwise surface as a bare "relation does not exist".
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        use diesel::migration::MigrationSource;
        use diesel::sql_types::{Bool, Text};

        #[derive(QueryableByName)]
        struct Applied {
            #[diesel(sql_type = Text)]
            version: String,
        }

        let embedded: Vec<String> = MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
            .map_err(|err| StoreError::Migration(err.to_string()))?
            .iter()
            .map(|m| m.name().version().to_string())
            .collect();
        let mut conn = self.conn().await?;
        let has_table: bool = diesel::select(diesel::dsl::sql::<Bool>(
            "to_regclass('__diesel_schema_migrations') IS NOT NULL",
        ))
        .get_result(&mut conn)
        .await?;
        if has_table {
            // Said plainly here, or it would be diesel's bare "permission
            // denied for table __diesel_schema_migrations".
            self.require(
                &mut conn,
                "has_table_privilege('__diesel_schema_migrations', 'SELECT')",
                "SELECT on public.__diesel_schema_migrations",
            )
            .await?;
        }
        let applied: Vec<String> = if has_table {
            diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
                .load::<Applied>(&mut conn)
                .await?
                .into_iter()
                .map(|a| a.version)
                .collect()
        } else {
            Vec::new()
        };
        let pending = embedded.iter().filter(|v| !applied.contains(v)).count();
        if pending == 0 {
            return Ok(());
        }
        Err(StoreError::NotMigrated {
            url: crate::redact::database_url(&self.url),
            pending,
            total: embedded.len(),
        })
    }

    /// Fails with [`StoreError::Privileges`], naming each one missing,
    /// unless the connected role has every privilege a worker needs on a
    /// migrated schema ([`WORKER_PRIVILEGES`]). A worker checks at start, so
    /// a role short of a grant stops it at once with one clear error instead
    /// of every write failing later. Asks Postgres (`has_*_privilege`), so
    /// it needs no right of its own and changes nothing.
    pub async fn check_privileges(&self) -> Result<(), StoreError> {
        use diesel::sql_types::{Array, Text};

        #[derive(QueryableByName)]
        struct Missing {
            #[diesel(sql_type = Text)]
            object: String,
            #[diesel(sql_type = Text)]
            privilege: String,
        }

        let mut conn = self.conn().await?;
        // Without USAGE on the schema, Postgres cannot even name its tables.
        self.require(
            &mut conn,
            "has_schema_privilege('kser', 'USAGE')",
            "USAGE on schema kser",
        )
        .await?;
        let (mut kinds, mut objects, mut privileges) = (Vec::new(), Vec::new(), Vec::new());
        for table in WORKER_TABLES {
            for privilege in WORKER_TABLE_PRIVILEGES {
                kinds.push("table");
                objects.push(*table);
                privileges.push(*privilege);
            }
        }
        for sequence in WORKER_SEQUENCES {
            kinds.push("sequence");
            objects.push(*sequence);
            privileges.push("USAGE");
        }
        let missing: Vec<Missing> = diesel::sql_query(
            "SELECT object, privilege \
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY \
                  AS wanted(kind, object, privilege, n) \
             WHERE NOT CASE kind WHEN 'table' THEN has_table_privilege(object, privilege) \
                                 ELSE has_sequence_privilege(object, privilege) END \
             ORDER BY n",
        )
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&objects)
        .bind::<Array<Text>, _>(&privileges)
        .load(&mut conn)
        .await?;
        if missing.is_empty() {
            return Ok(());
        }
        // "SELECT, UPDATE on kser.tasks; USAGE on kser.outbox_id_seq"
        let mut by_object: Vec<(String, Vec<String>)> = Vec::new();
        for Missing { object, privilege } in missing {
            match by_object.iter_mut().find(|(o, _)| *o == object) {
                Some((_, privileges)) => privileges.push(privilege),
                None => by_object.push((object, vec![privilege])),
            }
        }
        let missing = by_object
            .iter()
            .map(|(object, privileges)| format!("{} on {object}", privileges.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(StoreError::Privileges {
            role: self.role(&mut conn).await?,
            missing,
        })
    }

    /// The role this store's connections act as.
    /// Fails naming `missing` when `check`, an SQL test of a privilege, is
    /// false for the connection's role.
    async fn require(
        &self,
        conn: &mut AsyncPgConnection,
        check: &str,
        missing: &str,
    ) -> Result<(), StoreError> {
        let granted: bool = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(check))
            .get_result(conn)
            .await?;
        if granted {
            return Ok(());
        }
        Err(StoreError::Privileges {
            role: self.role(conn).await?,
            missing: missing.into(),
        })
    }

    async fn role(&self, conn: &mut AsyncPgConnection) -> Result<String, StoreError> {
        Ok(diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "current_user::text",
        ))
        .get_result(conn)
        .await?)
    }

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
        use diesel::sql_types::{Array, Text};

        if uuids.is_empty() {
            return Ok(HashMap::new());
        }
        let query = diesel::sql_query(
            "SELECT u.uuid, coalesce(t.attempts, 0) + 1 AS attempts, t.operation_uuid, t.position \
             FROM unnest($1::text[]) AS u(uuid) LEFT JOIN kser.tasks AS t ON t.uuid = u.uuid \
             WHERE t.uuid IS NULL OR t.status IN ('PENDING', 'RUNNING')",
        )
        .bind::<Array<Text>, _>(uuids);
        let mut conn = self.conn().await?;
        let started: Vec<StartedTask> = query.load(&mut conn).await?;
        Ok(started.into_iter().map(|s| (s.uuid.clone(), s)).collect())
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
        let query = diesel::sql_query(
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
        let mut written = 0;
        for chunk in rows.chunks(INSERT_CHUNK) {
            written += diesel::insert_into(tasks::table)
                .values(chunk)
                .on_conflict(tasks::uuid)
                .do_update()
                .set((
                    tasks::status.eq(excluded(tasks::status)),
                    tasks::result.eq(excluded(tasks::result)),
                    tasks::error.eq(excluded(tasks::error)),
                    tasks::finished_at.eq(excluded(tasks::finished_at)),
                    tasks::updated_at.eq(excluded(tasks::updated_at)),
                ))
                .filter(tasks::status.eq_any(TaskStatus::UNFINISHED))
                .execute(&mut conn)
                .await?;
        }
        Ok(written)
    }

    /// Whether the database answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    /// Messages waiting in the outbox, and the age of the oldest in seconds
    /// (0 when it is empty).
    pub async fn outbox_backlog(&self) -> Result<(i64, f64), StoreError> {
        #[derive(QueryableByName)]
        struct Backlog {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            rows: i64,
            #[diesel(sql_type = diesel::sql_types::Double)]
            oldest: f64,
        }
        let mut conn = self.conn().await?;
        let backlog: Backlog = diesel::sql_query(
            "SELECT count(*) AS rows, \
                 coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest \
             FROM kser.outbox",
        )
        .get_result(&mut conn)
        .await?;
        Ok((backlog.rows, backlog.oldest))
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
        use diesel::query_dsl::methods::FilterDsl as _;
        let mut conn = self.conn().await?;
        let mut written: Vec<String> = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(INSERT_CHUNK) {
            let uuids: Vec<String> = diesel::insert_into(tasks::table)
                .values(chunk)
                .on_conflict(tasks::uuid)
                .do_update()
                .set((
                    tasks::status.eq(excluded(tasks::status)),
                    tasks::result.eq(excluded(tasks::result)),
                    tasks::error.eq(excluded(tasks::error)),
                    tasks::finished_at.eq(excluded(tasks::finished_at)),
                    tasks::updated_at.eq(excluded(tasks::updated_at)),
                ))
                .filter(tasks::status.eq(TaskStatus::Pending.as_str()))
                .filter(tasks::attempts.eq(0))
                .filter(tasks::operation_uuid.is_null())
                .returning(tasks::uuid)
                .get_results(&mut conn)
                .await?;
            written.extend(uuids);
        }
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

/// The upsert that records the outcome of attempts, one array per column;
/// with `returning`, it returns the uuids it recorded. The row's status says
/// which outcome: final (SUCCESS, FAILED), or PENDING for an attempt that
/// will be retried at `next_attempt_at`.
///
/// Fenced by attempt (see [`Store::claim_tasks`]): an attempt is recorded
/// only if no other attempt started since it was claimed, that is, the
/// stored count is still the one before it, or it is this attempt's own
/// RUNNING mark (same count, same worker).
pub(crate) fn outcome_query(
    rows: &[NewTask],
    returning: bool,
) -> diesel::query_builder::BoxedSqlQuery<'_, diesel::pg::Pg, diesel::query_builder::SqlQuery> {
    use diesel::sql_types::{Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz};

    let sql = format!(
        "INSERT INTO kser.tasks AS t (uuid, entrypoint, status, params, metadata, result, error, \
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
                  next_attempt_at) \
         ON CONFLICT (uuid) DO UPDATE SET status = excluded.status, result = excluded.result, \
             error = excluded.error, attempts = excluded.attempts, worker = excluded.worker, \
             topic = excluded.topic, kafka_partition = excluded.kafka_partition, \
             kafka_offset = excluded.kafka_offset, enqueued_at = excluded.enqueued_at, \
             started_at = excluded.started_at, finished_at = excluded.finished_at, \
             next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at \
         WHERE t.status IN ('PENDING', 'RUNNING') AND (t.attempts = excluded.attempts - 1 \
             OR (t.attempts = excluded.attempts AND t.status = 'RUNNING' \
                 AND t.worker IS NOT DISTINCT FROM excluded.worker)){}",
        if returning { " RETURNING t.uuid" } else { "" }
    );
    diesel::sql_query(sql)
        .into_boxed()
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

/// One field of every row, to bind as a Postgres array.
fn column<'a, T>(rows: &'a [NewTask], field: impl Fn(&'a NewTask) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}
