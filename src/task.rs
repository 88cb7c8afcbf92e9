//! What users implement: the [`Task`] trait, the [`TaskContext`] a task runs
//! with, and the [`TaskError`] it fails with.

use std::future::Future;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::message::{ErrorKind, JsonObject, TaskResult};

/// A unit of work registered under an entrypoint name.
///
/// Parameters are typed: the worker deserializes the message's `params` into
/// [`Task::Params`] before anything runs, so a payload with a missing or
/// mistyped field becomes a FAILED task whose error names the field, and user
/// code never sees it. The JSON schema of `Params` is what `entrypoints`
/// shows.
///
/// Hooks run in this order: [`before_run`](Task::before_run), then
/// [`run`](Task::run), then [`on_success`](Task::on_success) or
/// [`on_error`](Task::on_error), then [`after_run`](Task::after_run). A task
/// succeeded when it returned `Ok` with `retcode == 0`.
///
/// ```
/// use kser::{Task, TaskContext, TaskError, TaskResult};
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Params {
///     name: String,
/// }
///
/// struct Greet;
///
/// impl Task for Greet {
///     const ENTRYPOINT: &'static str = "example.Greet";
///     type Params = Params;
///
///     async fn run(&self, _ctx: &TaskContext, params: Params) -> Result<TaskResult, TaskError> {
///         Ok(TaskResult::ok().with_stdout(format!("hello {}", params.name)))
///     }
/// }
/// ```
pub trait Task: Send + Sync + 'static {
    /// The name messages use to reach this task, e.g. `dice.DiceRoll`.
    const ENTRYPOINT: &'static str;
    /// One line for `entrypoints`.
    const DESCRIPTION: &'static str = "";

    /// How many runs of this task may run at once across the whole fleet
    /// (every worker sharing the database), whatever each worker's
    /// `--concurrency`; `None` (the default) is no limit. A task over the
    /// limit waits its turn in Postgres (`kser.waiters`), in arrival order,
    /// without holding its partition back.
    const MAX_CONCURRENCY: Option<u32> = None;

    /// Units of resource pools each run holds while it runs, e.g.
    /// `&[("gpu", 1)]`; each pool is declared with its capacity by
    /// [`Registry::pool`](crate::Registry::pool). A run starts only once it
    /// holds all of them; they are released when its outcome is recorded,
    /// or expire if its worker dies.
    const ACQUIRES: &'static [(&'static str, u32)] = &[];
    /// The task's parameters; use `#[serde(default)]` for optional ones.
    type Params: DeserializeOwned + JsonSchema + Send + 'static;

    /// How this task is retried; `None` (the default) takes the worker's
    /// policy.
    fn retry_policy(&self) -> Option<crate::RetryPolicy> {
        None
    }

    /// Does the work.
    fn run(
        &self,
        ctx: &TaskContext,
        params: Self::Params,
    ) -> impl Future<Output = Result<TaskResult, TaskError>> + Send;

    /// Runs before [`run`](Task::run); an error here fails the task without running it.
    fn before_run(
        &self,
        _ctx: &TaskContext,
        _params: &Self::Params,
    ) -> impl Future<Output = Result<(), TaskError>> + Send {
        async { Ok(()) }
    }

    /// Runs after a successful run, before the state is recorded.
    fn on_success(
        &self,
        _ctx: &TaskContext,
        _result: &TaskResult,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs after a failed run (an error or a non-zero retcode) with the
    /// failure as a result, before the state is recorded.
    fn on_error(
        &self,
        _ctx: &TaskContext,
        _result: &TaskResult,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs last, whatever the outcome.
    fn after_run(
        &self,
        _ctx: &TaskContext,
        _result: &TaskResult,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The custom events this task handles, by name: `kser control event
    /// NAME --params JSON` calls [`on_event`](Task::on_event) on the
    /// workers it targets. None by default.
    const EVENTS: &'static [&'static str] = &[];

    /// Handles one of [`EVENTS`](Task::EVENTS), on each worker the event
    /// targets, once per worker (a reload of its settings, a cache to
    /// drop...). Runs beside the worker's tasks, not in their place; an
    /// error is recorded as the event's delivery on this worker.
    ///
    /// ```
    /// use kser::{Event, Task, TaskContext, TaskError, TaskResult};
    ///
    /// struct Resize;
    ///
    /// impl Task for Resize {
    ///     const ENTRYPOINT: &'static str = "images.Resize";
    ///     const EVENTS: &'static [&'static str] = &["reload"];
    ///     type Params = serde_json::Map<String, serde_json::Value>;
    ///
    ///     async fn run(&self, _ctx: &TaskContext, _params: Self::Params) -> Result<TaskResult, TaskError> {
    ///         Ok(TaskResult::ok())
    ///     }
    ///
    ///     async fn on_event(&self, event: &Event) -> Result<(), TaskError> {
    ///         // event.name == "reload"; event.params holds its JSON parameters.
    ///         Ok(())
    ///     }
    /// }
    /// ```
    fn on_event(&self, _event: &Event) -> impl Future<Output = Result<(), TaskError>> + Send {
        async { Ok(()) }
    }
}

/// A custom event delivered to a task's [`on_event`](Task::on_event).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// Its id in `kser.events`.
    pub id: i64,
    /// Its name, one of the task's [`EVENTS`](Task::EVENTS).
    pub name: String,
    /// The JSON parameters it was sent with.
    pub params: JsonObject,
    /// The worker delivering it (`host:pid`).
    pub worker: String,
}

/// A task whose writes to Postgres commit together with its final state:
/// exactly-once effects.
///
/// kser opens a transaction on its own database, runs [`run`](Self::run)
/// with that transaction's connection, and records the task SUCCESS in the
/// same transaction, fenced by the attempt number. So the task's writes and
/// its final state commit together or not at all: a record delivered again
/// after its task is final does not run, and an attempt that lost its record
/// to a newer one (a rebalance, a restart) rolls back. A failed run (an error,
/// a panic, a timeout, a non-zero retcode) rolls back its writes; it is then
/// retried or recorded FAILED like any task. If the database goes away during
/// the transaction, the attempt runs again once it is back.
///
/// The trade-off: one transaction (and one connection held while the task
/// runs) per task, instead of one statement per batch, so such tasks run
/// slower than plain ones; the benchmark measures both. Write only to the
/// database kser uses (`DATABASE_URL`), through `conn`, and keep other side
/// effects out of `run`: only the database writes are exactly-once.
///
/// ```
/// use diesel_async::{AsyncPgConnection, RunQueryDsl};
/// use kser::{TaskContext, TaskError, TaskResult, TransactionalTask};
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Params {
///     amount: i64,
/// }
///
/// struct Credit;
///
/// impl TransactionalTask for Credit {
///     const ENTRYPOINT: &'static str = "bank.Credit";
///     type Params = Params;
///
///     async fn run(
///         &self,
///         ctx: &TaskContext,
///         params: Params,
///         conn: &mut AsyncPgConnection,
///     ) -> Result<TaskResult, TaskError> {
///         diesel::sql_query("INSERT INTO ledger (uuid, amount) VALUES ($1, $2)")
///             .bind::<diesel::sql_types::Text, _>(&ctx.uuid)
///             .bind::<diesel::sql_types::BigInt, _>(params.amount)
///             .execute(conn)
///             .await
///             .map_err(|err| TaskError::retryable(err.to_string()))?;
///         Ok(TaskResult::ok())
///     }
/// }
/// ```
pub trait TransactionalTask: Send + Sync + 'static {
    /// The name messages use to reach this task.
    const ENTRYPOINT: &'static str;
    /// One line for `entrypoints`.
    const DESCRIPTION: &'static str = "";

    /// How many runs of this task may run at once across the whole fleet
    /// (every worker sharing the database), whatever each worker's
    /// `--concurrency`; `None` (the default) is no limit. A task over the
    /// limit waits its turn in Postgres (`kser.waiters`), in arrival order,
    /// without holding its partition back.
    const MAX_CONCURRENCY: Option<u32> = None;

    /// Units of resource pools each run holds while it runs, e.g.
    /// `&[("gpu", 1)]`; each pool is declared with its capacity by
    /// [`Registry::pool`](crate::Registry::pool). A run starts only once it
    /// holds all of them; they are released when its outcome is recorded,
    /// or expire if its worker dies.
    const ACQUIRES: &'static [(&'static str, u32)] = &[];
    /// The task's parameters.
    type Params: DeserializeOwned + JsonSchema + Send + 'static;

    /// How this task is retried; `None` (the default) takes the worker's
    /// policy.
    fn retry_policy(&self) -> Option<crate::RetryPolicy> {
        None
    }

    /// Does the work, writing through `conn`, inside kser's transaction.
    fn run(
        &self,
        ctx: &TaskContext,
        params: Self::Params,
        conn: &mut diesel_async::AsyncPgConnection,
    ) -> impl Future<Output = Result<TaskResult, TaskError>> + Send;
}

/// What a task knows about the message it runs for.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The message (and task) uuid.
    pub uuid: String,
    /// The entrypoint the message was routed by.
    pub entrypoint: String,
    /// 1 for the first run of this message, more after redeliveries.
    pub attempt: u32,
    /// The message's free-form metadata.
    pub metadata: JsonObject,
    /// The result forwarded from a previous task, if any.
    pub forwarded: Option<TaskResult>,
    /// Where the message came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Which worker runs it (`host:pid`).
    pub worker: String,
    /// The operation this task is a step of, and its place in it (from 0).
    pub operation: Option<(String, i32)>,
}

/// A task failure, and whether retrying may help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    kind: ErrorKind,
    retcode: i32,
    message: String,
    details: Value,
}

impl TaskError {
    /// A failure that may succeed if tried again (a network error, a busy
    /// service).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Retryable, 503, message)
    }

    /// A failure that will not go away by itself (invalid input, a missing
    /// record).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, 500, message)
    }

    fn new(kind: ErrorKind, retcode: i32, message: impl Into<String>) -> Self {
        Self {
            kind,
            retcode,
            message: message.into(),
            details: Value::Null,
        }
    }

    /// Sets the retcode carried in the result (HTTP-like: 400, 404, 500...).
    /// A zero retcode would read as success, so it is replaced by 500.
    pub fn with_retcode(mut self, retcode: i32) -> Self {
        self.retcode = if retcode == 0 { 500 } else { retcode };
        self
    }

    /// Attaches structured details, stored in `retval.error.extra`.
    pub fn with_details(mut self, details: impl Into<Value>) -> Self {
        self.details = details.into();
        self
    }

    /// Whether the task said a retry may help.
    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Retryable
    }

    /// The failure as a wire-format result.
    pub fn into_result(self) -> TaskResult {
        TaskResult::error(self.retcode, self.kind, self.message, self.details)
    }
}
