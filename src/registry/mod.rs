//! Entrypoint name -> task or operation: the [`Registry`] erases each one's
//! types behind boxed handlers, so the worker can route any message by name.
//!
//! Here: the registry, registering and running tasks. Beside it:
//! `operations.rs` (operations: registering, building their steps),
//! `limits.rs` (pools and concurrency limits), `events.rs` (custom events),
//! `user_code.rs` (typed params, hooks, panics caught).

mod events;
mod limits;
mod operations;
#[cfg(test)]
mod tests;
mod user_code;

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;
use serde_json::{Value, json};

use crate::message::{ErrorKind, JsonObject, TaskResult};
use crate::operation::{OperationContext, Step};
use crate::retry::RetryPolicy;
use crate::task::{Event, Task, TaskContext, TaskError, TransactionalTask};
use diesel_async::AsyncPgConnection;
pub(crate) use user_code::panic_text;
use user_code::{deserialize_params, execute, panic_result};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(TaskContext, JsonObject) -> BoxFuture<TaskResult> + Send + Sync>;
/// Runs a transactional task with the connection of kser's transaction.
pub(crate) type TxHandler = Arc<
    dyn for<'c> Fn(
            TaskContext,
            JsonObject,
            &'c mut AsyncPgConnection,
        ) -> Pin<Box<dyn Future<Output = TaskResult> + Send + 'c>>
        + Send
        + Sync,
>;
type Validator = Arc<dyn Fn(&JsonObject) -> Result<(), TaskResult> + Send + Sync>;
type Builder = Arc<dyn Fn(JsonObject) -> Result<Vec<Step>, TaskResult> + Send + Sync>;
type FinishHook = Arc<dyn Fn(OperationContext, TaskResult) -> BoxFuture<()> + Send + Sync>;

/// The tasks and operations a worker can run, by entrypoint name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
    /// The custom events each task handles ([`Task::EVENTS`]).
    events: BTreeMap<&'static str, EventEntry>,
    /// The pools each limited task needs a lease on, with units.
    needs: BTreeMap<&'static str, Vec<(String, i32)>>,
    /// Every pool's capacity: those declared with [`Registry::pool`], and
    /// `entrypoint:NAME` for each task's [`Task::MAX_CONCURRENCY`].
    pools: BTreeMap<String, i32>,
}

/// Delivers a custom event to one task's [`Task::on_event`].
type EventHandler = Arc<dyn Fn(Event) -> BoxFuture<Result<(), TaskError>> + Send + Sync>;

#[derive(Clone)]
struct EventEntry {
    names: &'static [&'static str],
    handler: EventHandler,
}

#[derive(Clone)]
struct Entry {
    info: EntrypointInfo,
    kind: Kind,
    retry: Option<RetryPolicy>,
}

#[derive(Clone)]
enum Kind {
    Task {
        handler: Handler,
        validate: Validator,
    },
    Transactional {
        handler: TxHandler,
        validate: Validator,
    },
    Operation {
        build: Builder,
        finished: FinishHook,
    },
}

/// What `entrypoints` shows about one registered name.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct EntrypointInfo {
    /// The name messages use.
    pub name: &'static str,
    /// `task`, `transactional task` or `operation`.
    pub kind: &'static str,
    /// The one line it describes itself with.
    pub description: &'static str,
    /// The JSON schema of the parameters.
    pub params_schema: Value,
    /// How many runs of it may run at once across the fleet, if limited
    /// ([`Task::MAX_CONCURRENCY`]).
    pub max_concurrency: Option<u32>,
    /// The resource pools each run holds units of ([`Task::ACQUIRES`]).
    pub acquires: BTreeMap<&'static str, u32>,
}

/// What a task of either kind says of itself, with its parameters' schema
/// and limits, and the check of its parameters run before it is queued.
fn described<P: serde::de::DeserializeOwned + schemars::JsonSchema>(
    name: &'static str,
    kind: &'static str,
    description: &'static str,
    max_concurrency: Option<u32>,
    acquires: &[(&'static str, u32)],
) -> (Validator, EntrypointInfo) {
    let validate: Validator =
        Arc::new(move |params| deserialize_params::<P>(name, params.clone()).map(drop));
    let info = EntrypointInfo {
        name,
        kind,
        description,
        params_schema: schemars::schema_for!(P).to_value(),
        max_concurrency,
        acquires: acquires.iter().copied().collect(),
    };
    (validate, info)
}

/// Errors from building or using a [`Registry`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two tasks or operations were registered under one name.
    #[error("entrypoint '{0}' is registered twice")]
    Duplicate(&'static str),
    /// An operation names a step no task is registered for.
    #[error("unknown entrypoint '{name}'; registered entrypoints: {}", list_or_none(.known))]
    UnknownEntrypoint {
        /// The name asked for.
        name: String,
        /// The names registered.
        known: Vec<String>,
    },
    /// A limit or a resource pool that cannot work: an undeclared pool, a
    /// capacity of 0, more units than the pool has, a pool declared twice
    /// with two capacities.
    #[error("{0}")]
    Limit(String),
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `task` under [`Task::ENTRYPOINT`]; a name taken twice is an
    /// error, since routing would be ambiguous.
    pub fn register<T: Task>(&mut self, task: T) -> Result<&mut Self, RegistryError> {
        if self.entries.contains_key(T::ENTRYPOINT) {
            return Err(RegistryError::Duplicate(T::ENTRYPOINT));
        }
        let retry = task.retry_policy();
        let task = Arc::new(task);
        let handler: Handler = {
            let task = Arc::clone(&task);
            Arc::new(move |ctx, params| {
                let task = Arc::clone(&task);
                Box::pin(async move { execute(&*task, ctx, params).await })
            })
        };
        let (validate, info) = described::<T::Params>(
            T::ENTRYPOINT,
            "task",
            T::DESCRIPTION,
            T::MAX_CONCURRENCY,
            T::ACQUIRES,
        );
        self.limit(T::ENTRYPOINT, T::MAX_CONCURRENCY, T::ACQUIRES)?;
        if !T::EVENTS.is_empty() {
            let handler: EventHandler = Arc::new(move |event| {
                let task = Arc::clone(&task);
                Box::pin(async move { task.on_event(&event).await })
            });
            let names = T::EVENTS;
            self.events
                .insert(T::ENTRYPOINT, EventEntry { names, handler });
        }
        let kind = Kind::Task { handler, validate };
        let entry = Entry { info, kind, retry };
        self.entries.insert(T::ENTRYPOINT, entry);
        Ok(self)
    }

    /// Registers a [`TransactionalTask`] under its entrypoint: its database
    /// writes commit with its final state.
    pub fn register_transactional<T: TransactionalTask>(
        &mut self,
        task: T,
    ) -> Result<&mut Self, RegistryError> {
        if self.entries.contains_key(T::ENTRYPOINT) {
            return Err(RegistryError::Duplicate(T::ENTRYPOINT));
        }
        let retry = task.retry_policy();
        let task = Arc::new(task);
        let handler: TxHandler = Arc::new(move |ctx, params, conn| {
            let task = Arc::clone(&task);
            Box::pin(async move {
                let params: T::Params = match deserialize_params(T::ENTRYPOINT, params) {
                    Ok(params) => params,
                    Err(result) => return result,
                };
                task.run(&ctx, params, conn)
                    .await
                    .unwrap_or_else(|err| err.into_result())
            })
        });
        let (validate, info) = described::<T::Params>(
            T::ENTRYPOINT,
            "transactional task",
            T::DESCRIPTION,
            T::MAX_CONCURRENCY,
            T::ACQUIRES,
        );
        self.limit(T::ENTRYPOINT, T::MAX_CONCURRENCY, T::ACQUIRES)?;
        let kind = Kind::Transactional { handler, validate };
        self.entries
            .insert(T::ENTRYPOINT, Entry { info, kind, retry });
        Ok(self)
    }

    /// Whether `name` is a transactional task.
    pub(crate) fn is_transactional(&self, name: &str) -> bool {
        matches!(
            self.entries.get(name),
            Some(Entry {
                kind: Kind::Transactional { .. },
                ..
            })
        )
    }

    /// Runs transactional task `ctx.entrypoint` with `conn`; failures and
    /// panics come back as a failed result.
    pub(crate) async fn run_in(
        &self,
        ctx: TaskContext,
        params: JsonObject,
        conn: &mut AsyncPgConnection,
    ) -> TaskResult {
        let Some(Entry {
            kind: Kind::Transactional { handler, .. },
            ..
        }) = self.entries.get(ctx.entrypoint.as_str())
        else {
            return self.run(ctx, params).await;
        };
        match AssertUnwindSafe(handler(ctx, params, conn))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => panic_result(panic.as_ref()),
        }
    }

    /// The retry policy task `name` declared, if any.
    pub fn retry_policy(&self, name: &str) -> Option<RetryPolicy> {
        self.entries.get(name).and_then(|entry| entry.retry)
    }

    fn unknown(&self, name: &str) -> TaskResult {
        let message = self
            .check(name)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let known: Vec<_> = self.entries.keys().collect();
        TaskResult::error(
            400,
            ErrorKind::UnknownEntrypoint,
            message,
            json!({ "entrypoint": name, "registered": known }),
        )
    }

    /// The registered entrypoints, sorted by name.
    pub fn entrypoints(&self) -> impl Iterator<Item = &EntrypointInfo> {
        self.entries.values().map(|entry| &entry.info)
    }

    /// Whether any task is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up a name; the error lists the registered names.
    pub fn check(&self, name: &str) -> Result<(), RegistryError> {
        if self.entries.contains_key(name) {
            Ok(())
        } else {
            Err(RegistryError::UnknownEntrypoint {
                name: name.to_owned(),
                known: self.entries.keys().map(|k| (*k).to_owned()).collect(),
            })
        }
    }

    /// Runs the task registered under `ctx.entrypoint` and returns its result.
    /// Every failure, including an unknown name, invalid parameters and a
    /// panic, comes back as a failed result rather than an `Err`.
    pub async fn run(&self, ctx: TaskContext, params: JsonObject) -> TaskResult {
        let handler = match self.entries.get(ctx.entrypoint.as_str()) {
            Some(Entry {
                kind: Kind::Task { handler, .. },
                ..
            }) => handler,
            Some(Entry {
                kind: Kind::Transactional { .. },
                ..
            }) => {
                return TaskResult::error(
                    500,
                    ErrorKind::Fatal,
                    format!("{} runs only in a transaction", ctx.entrypoint),
                    Value::Null,
                );
            }
            Some(_) => {
                return TaskResult::error(
                    400,
                    ErrorKind::InvalidMessage,
                    format!("{} is an operation, not a task", ctx.entrypoint),
                    Value::Null,
                );
            }
            None => return self.unknown(&ctx.entrypoint),
        };
        let future = handler(ctx, params);
        match AssertUnwindSafe(future).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => panic_result(panic.as_ref()),
        }
    }
}
