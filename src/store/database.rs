//! The database: [`Store`], a pool of connections to Postgres, with its
//! errors ([`StoreError`]), connecting, migrations and health checks. Every
//! other file of `store/` adds the queries of one concern to `Store`.

use std::time::Duration;

use diesel::prelude::*;
use diesel::result::DatabaseErrorKind;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// What a worker's database role needs, as the errors say it.
pub(crate) const WORKER_PRIVILEGES: &str = "a worker's role needs USAGE on schema kser, SELECT, INSERT, UPDATE, DELETE on every table of schema kser, USAGE on its sequences, and SELECT on public.__diesel_schema_migrations";

/// The migrations in `migrations/`, compiled into the binary.
pub(crate) const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The most bind parameters Postgres takes in one statement (the protocol
/// counts them in 16 bits).
const MAX_BIND_PARAMS: usize = 65_535;

/// The most rows in one multi-row `INSERT` built by diesel, which binds one
/// parameter per column and row: no kser table has more than 32 columns
/// (diesel's `32-column-tables`), so this many rows always fit under
/// [`MAX_BIND_PARAMS`], however many rows a batch brings. (The `unnest`
/// statements bind one array per column and need no chunks.)
pub(crate) const INSERT_CHUNK: usize = MAX_BIND_PARAMS / 32;

/// How long to wait for a connection before calling the database unreachable.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// worker's role needs them all; see `Store::check_privileges`.
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

/// A pool of connections to the kser database.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
    /// The URL it connects to, for a connection outside the pool (prune).
    pub(super) url: String,
}

impl Store {
    /// Connects to `url` and checks that one connection can be made, so a
    /// wrong URL or a stopped server fails here with a clear message.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        // A connection is checked when it is used, not with a query of
        // its own each time it leaves the pool (diesel-async's default, a
        // round trip per checkout): one Postgres closed is dropped when
        // taken (`is_broken`), and a statement failing on one that broke
        // meanwhile is retried like any lost connection (`recovery`).
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
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
    pub(crate) fn max_connections(&self) -> usize {
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
    pub(crate) async fn probe_write(&self) -> Result<(), StoreError> {
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

    /// Whether the database answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    /// Messages waiting in the outbox, and the age of the oldest in seconds
    /// (0 when it is empty).
    pub(crate) async fn outbox_backlog(&self) -> Result<(i64, f64), StoreError> {
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
}
