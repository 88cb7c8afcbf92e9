//! Entrypoint name -> task or operation: the [`Registry`] erases each one's
//! types behind boxed handlers, so the worker can route any message by name.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;
use serde_json::{Value, json};

use crate::message::{ErrorKind, JsonObject, TaskResult};
use crate::operation::{Operation, OperationContext, Step};
use crate::retry::RetryPolicy;
use crate::task::{Event, Task, TaskContext, TaskError, TransactionalTask};
use diesel_async::AsyncPgConnection;

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
    /// `task`, `transactional` or `operation`.
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
        let validate: Validator = Arc::new(|params| {
            deserialize_params::<T::Params>(T::ENTRYPOINT, params.clone()).map(drop)
        });
        let info = EntrypointInfo {
            name: T::ENTRYPOINT,
            kind: "task",
            description: T::DESCRIPTION,
            params_schema: schemars::schema_for!(T::Params).to_value(),
            max_concurrency: T::MAX_CONCURRENCY,
            acquires: T::ACQUIRES.iter().copied().collect(),
        };
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

    /// The custom events `entrypoint` handles (none for an unknown name).
    pub fn events_of(&self, entrypoint: &str) -> &'static [&'static str] {
        self.events.get(entrypoint).map_or(&[], |e| e.names)
    }

    /// The entrypoints that handle event `name`, restricted to
    /// `entrypoint` when given.
    pub(crate) fn handlers_of<'a>(
        &'a self,
        name: &'a str,
        entrypoint: Option<&'a str>,
    ) -> impl Iterator<Item = &'static str> + 'a {
        self.events
            .iter()
            .filter(move |(task, entry)| {
                entry.names.contains(&name) && entrypoint.is_none_or(|e| e == **task)
            })
            .map(|(task, _)| *task)
    }

    /// Delivers `event` to `entrypoint`'s handler within `limit`; a panic,
    /// an error or the time running out comes back as the error.
    pub(crate) async fn deliver(
        &self,
        entrypoint: &str,
        event: Event,
        limit: std::time::Duration,
    ) -> Result<(), String> {
        let Some(entry) = self.events.get(entrypoint) else {
            return Err(format!("{entrypoint} handles no events"));
        };
        let handled = AssertUnwindSafe((entry.handler)(event)).catch_unwind();
        match tokio::time::timeout(limit, handled).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(err))) => Err(err.to_string()),
            Ok(Err(panic)) => Err(format!("panicked: {}", panic_text(panic.as_ref()))),
            Err(_) => Err(format!("timed out after {:.1}s", limit.as_secs_f64())),
        }
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
        let validate: Validator = Arc::new(|params| {
            deserialize_params::<T::Params>(T::ENTRYPOINT, params.clone()).map(drop)
        });
        let info = EntrypointInfo {
            name: T::ENTRYPOINT,
            kind: "transactional task",
            description: T::DESCRIPTION,
            params_schema: schemars::schema_for!(T::Params).to_value(),
            max_concurrency: T::MAX_CONCURRENCY,
            acquires: T::ACQUIRES.iter().copied().collect(),
        };
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

    /// Registers `operation` under [`Operation::ENTRYPOINT`]. Its steps are
    /// checked against the tasks registered when a message starts it.
    pub fn register_operation<O: Operation>(
        &mut self,
        operation: O,
    ) -> Result<&mut Self, RegistryError> {
        if self.entries.contains_key(O::ENTRYPOINT) {
            return Err(RegistryError::Duplicate(O::ENTRYPOINT));
        }
        let operation = Arc::new(operation);
        let builder = Arc::clone(&operation);
        let build: Builder = Arc::new(move |params| {
            let params = deserialize_params::<O::Params>(O::ENTRYPOINT, params)?;
            let failed = |err: crate::task::TaskError| err.into_result();
            builder.check(&params).map_err(failed)?;
            builder.build(&params).map_err(failed)
        });
        let finished: FinishHook = Arc::new(move |ctx, result| {
            let operation = Arc::clone(&operation);
            Box::pin(async move {
                if result.is_success() {
                    operation.on_success(&ctx, &result).await;
                } else {
                    operation.on_error(&ctx, &result).await;
                }
            })
        });
        let info = EntrypointInfo {
            name: O::ENTRYPOINT,
            kind: "operation",
            description: O::DESCRIPTION,
            params_schema: schemars::schema_for!(O::Params).to_value(),
            max_concurrency: None,
            acquires: BTreeMap::new(),
        };
        let kind = Kind::Operation { build, finished };
        let entry = Entry {
            info,
            kind,
            retry: None,
        };
        self.entries.insert(O::ENTRYPOINT, entry);
        Ok(self)
    }

    /// Declares resource pool `name` with `capacity` units, shared by the
    /// whole fleet: a task that lists it in [`Task::ACQUIRES`] runs only
    /// while it holds its units. Every worker declaring a pool should give
    /// it the same capacity; the worker started last sets it in Postgres.
    ///
    /// ```
    /// let mut registry = kser::Registry::new();
    /// registry.pool("gpu", 2)?;
    /// # Ok::<(), kser::RegistryError>(())
    /// ```
    pub fn pool(&mut self, name: &str, capacity: u32) -> Result<&mut Self, RegistryError> {
        if name.is_empty() || name.starts_with("entrypoint:") {
            return Err(RegistryError::Limit(format!(
                "pool name '{name}' is not allowed: names starting with 'entrypoint:' hold MAX_CONCURRENCY limits"
            )));
        }
        if capacity == 0 {
            return Err(RegistryError::Limit(format!(
                "pool '{name}' has capacity 0: no task needing it could ever run"
            )));
        }
        let capacity = i32::try_from(capacity).unwrap_or(i32::MAX);
        match self.pools.get(name) {
            Some(declared) if *declared != capacity => Err(RegistryError::Limit(format!(
                "pool '{name}' is declared twice, with capacities {declared} and {capacity}"
            ))),
            _ => {
                self.pools.insert(name.to_owned(), capacity);
                Ok(self)
            }
        }
    }

    /// Records what task `entrypoint` needs a lease on before it runs.
    fn limit(
        &mut self,
        entrypoint: &'static str,
        max_concurrency: Option<u32>,
        acquires: &'static [(&'static str, u32)],
    ) -> Result<(), RegistryError> {
        let mut needs = Vec::new();
        if let Some(max) = max_concurrency {
            if max == 0 {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} has MAX_CONCURRENCY 0: it could never run"
                )));
            }
            let pool = crate::store::entrypoint_pool(entrypoint);
            self.pools
                .insert(pool.clone(), i32::try_from(max).unwrap_or(i32::MAX));
            needs.push((pool, 1));
        }
        for (pool, units) in acquires {
            if *units == 0 {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} acquires 0 units of '{pool}'"
                )));
            }
            if needs.iter().any(|(name, _)| name == pool) {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} acquires '{pool}' twice"
                )));
            }
            needs.push((
                (*pool).to_owned(),
                i32::try_from(*units).unwrap_or(i32::MAX),
            ));
        }
        if !needs.is_empty() {
            self.needs.insert(entrypoint, needs);
        }
        Ok(())
    }

    /// Checks that every pool a task acquires is declared with
    /// [`pool`](Self::pool) and has room for one run: a worker refuses to
    /// start otherwise, since such a task would wait forever.
    pub fn check_limits(&self) -> Result<(), RegistryError> {
        for (entrypoint, needs) in &self.needs {
            for (pool, units) in needs {
                match self.pools.get(pool) {
                    None => {
                        return Err(RegistryError::Limit(format!(
                            "{entrypoint} acquires pool '{pool}', which is not declared: add registry.pool(\"{pool}\", CAPACITY)"
                        )));
                    }
                    Some(capacity) if units > capacity => {
                        return Err(RegistryError::Limit(format!(
                            "{entrypoint} acquires {units} units of pool '{pool}', which has {capacity}: it could never run"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The pools task `entrypoint` needs a lease on, with units; empty for
    /// an unlimited or unknown one.
    pub(crate) fn needs(&self, entrypoint: &str) -> &[(String, i32)] {
        self.needs.get(entrypoint).map_or(&[], Vec::as_slice)
    }

    /// Whether any task has a limit.
    pub(crate) fn has_limits(&self) -> bool {
        !self.needs.is_empty()
    }

    /// Every pool this registry declares, with its capacity.
    pub(crate) fn pools(&self) -> &BTreeMap<String, i32> {
        &self.pools
    }

    /// The retry policy task `name` declared, if any.
    pub fn retry_policy(&self, name: &str) -> Option<RetryPolicy> {
        self.entries.get(name).and_then(|entry| entry.retry)
    }

    /// Whether `name` is a registered operation.
    pub fn is_operation(&self, name: &str) -> bool {
        matches!(
            self.entries.get(name),
            Some(Entry {
                kind: Kind::Operation { .. },
                ..
            })
        )
    }

    /// Builds the steps of operation `name` and checks each one: its
    /// entrypoint must be a registered task and its parameters must fit, and
    /// so must those of its compensation; a graph must have unique names,
    /// known dependencies and no cycle. Every error comes back as a failed
    /// result saying which step is wrong, before anything is recorded.
    pub fn build_operation(&self, name: &str, params: JsonObject) -> Result<Vec<Step>, TaskResult> {
        let Some(Entry {
            kind: Kind::Operation { build, .. },
            ..
        }) = self.entries.get(name)
        else {
            return Err(self.unknown(name));
        };
        let steps = catch_panic(|| build(params))?;
        if steps.is_empty() {
            return Err(TaskResult::error(
                400,
                ErrorKind::InvalidParams,
                format!("operation {name} built no steps"),
                Value::Null,
            ));
        }
        for (index, step) in steps.iter().enumerate() {
            let position = index + 1;
            let prefix = |mut result: TaskResult| {
                result.stderr = format!("step {position} ({}): {}", step.entrypoint, result.stderr);
                result
            };
            self.check_step(&step.entrypoint, &step.params)
                .map_err(prefix)?;
            if let Some(compensation) = &step.compensation {
                self.check_step(&compensation.entrypoint, &compensation.params)
                    .map_err(|mut result| {
                        result.stderr = format!(
                            "step {position} ({}): its compensation ({}): {}",
                            step.entrypoint, compensation.entrypoint, result.stderr
                        );
                        result
                    })?;
            }
        }
        crate::operation::check_shape(&steps).map_err(|message| {
            TaskResult::error(400, ErrorKind::InvalidParams, message, Value::Null)
        })?;
        Ok(steps)
    }

    /// Whether a step may run `entrypoint` with `params`: a registered task
    /// whose parameters fit.
    fn check_step(&self, entrypoint: &str, params: &Value) -> Result<(), TaskResult> {
        let validate = match self.entries.get(entrypoint) {
            Some(Entry {
                kind: Kind::Task { validate, .. } | Kind::Transactional { validate, .. },
                ..
            }) => validate,
            Some(_) => {
                return Err(TaskResult::error(
                    400,
                    ErrorKind::InvalidParams,
                    "an operation cannot be a step of another operation",
                    Value::Null,
                ));
            }
            None => return Err(self.unknown(entrypoint)),
        };
        let Value::Object(params) = params else {
            return Err(TaskResult::error(
                400,
                ErrorKind::InvalidParams,
                "step params must be a JSON object",
                Value::Null,
            ));
        };
        validate(params)
    }

    /// Runs the finish hook of operation `ctx.entrypoint`; a panic in it is
    /// logged, not propagated.
    pub async fn operation_finished(&self, ctx: OperationContext, result: TaskResult) {
        if let Some(Entry {
            kind: Kind::Operation { finished, .. },
            ..
        }) = self.entries.get(ctx.entrypoint.as_str())
        {
            let uuid = ctx.uuid.clone();
            if AssertUnwindSafe(finished(ctx, result))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(operation.uuid = %uuid, "an operation hook panicked");
            }
        }
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

/// What a panic said, or "(no message)".
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

fn panic_result(panic: &(dyn std::any::Any + Send)) -> TaskResult {
    let text = panic_text(panic);
    TaskResult::error(
        500,
        ErrorKind::Panic,
        format!("panicked: {text}"),
        Value::Null,
    )
}

/// Runs user code that may panic (an operation's build step) and turns a
/// panic into a failed result.
fn catch_panic<T>(f: impl FnOnce() -> Result<T, TaskResult>) -> Result<T, TaskResult> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(panic_result(panic.as_ref())))
}

/// Parameters as the typed `P`, or a failed result naming the bad field.
fn deserialize_params<P: serde::de::DeserializeOwned>(
    entrypoint: &str,
    params: JsonObject,
) -> Result<P, TaskResult> {
    serde_path_to_error::deserialize(Value::Object(params)).map_err(|err| {
        let path = err.path().to_string();
        let message = if path == "." {
            format!("invalid params for {entrypoint}: {}", err.inner())
        } else {
            format!("invalid params for {entrypoint}: {path}: {}", err.inner())
        };
        TaskResult::error(
            400,
            ErrorKind::InvalidParams,
            message,
            json!({ "field": path }),
        )
    })
}

async fn execute<T: Task>(task: &T, ctx: TaskContext, params: JsonObject) -> TaskResult {
    let params: T::Params = match deserialize_params(T::ENTRYPOINT, params) {
        Ok(params) => params,
        Err(result) => return result,
    };
    let outcome = match task.before_run(&ctx, &params).await {
        Ok(()) => task.run(&ctx, params).await,
        Err(err) => Err(err),
    };
    let result = outcome.unwrap_or_else(|err| err.into_result());
    if result.is_success() {
        task.on_success(&ctx, &result).await;
    } else {
        task.on_error(&ctx, &result).await;
    }
    task.after_run(&ctx, &result).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskError;
    use std::sync::Mutex;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct AddParams {
        a: i64,
        #[serde(default)]
        b: i64,
    }

    #[derive(Default)]
    struct Add {
        hooks: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Task for Add {
        const ENTRYPOINT: &'static str = "math.Add";
        type Params = AddParams;

        async fn before_run(&self, _: &TaskContext, _: &AddParams) -> Result<(), TaskError> {
            self.hooks.lock().expect("lock").push("before");
            Ok(())
        }

        async fn run(&self, _: &TaskContext, p: AddParams) -> Result<TaskResult, TaskError> {
            if p.a < 0 {
                return Err(TaskError::fatal("a must be positive").with_retcode(422));
            }
            if p.a == 13 {
                panic!("unlucky");
            }
            Ok(TaskResult::ok().with_value("sum", p.a + p.b))
        }

        async fn on_success(&self, _: &TaskContext, _: &TaskResult) {
            self.hooks.lock().expect("lock").push("success");
        }

        async fn on_error(&self, _: &TaskContext, _: &TaskResult) {
            self.hooks.lock().expect("lock").push("error");
        }

        async fn after_run(&self, _: &TaskContext, _: &TaskResult) {
            self.hooks.lock().expect("lock").push("after");
        }
    }

    fn ctx(entrypoint: &str) -> TaskContext {
        TaskContext {
            uuid: "u".into(),
            entrypoint: entrypoint.into(),
            attempt: 1,
            metadata: JsonObject::new(),
            forwarded: None,
            topic: "t".into(),
            partition: 0,
            offset: 0,
            worker: "w".into(),
            operation: None,
        }
    }

    fn params(value: Value) -> JsonObject {
        value.as_object().cloned().expect("object")
    }

    fn registry() -> (Registry, Arc<Mutex<Vec<&'static str>>>) {
        let task = Add::default();
        let hooks = Arc::clone(&task.hooks);
        let mut registry = Registry::new();
        registry.register(task).expect("register");
        (registry, hooks)
    }

    #[tokio::test]
    async fn runs_task_with_hooks_in_order() {
        let (registry, hooks) = registry();
        let result = registry
            .run(ctx("math.Add"), params(json!({"a": 2, "b": 3})))
            .await;
        assert!(result.is_success());
        assert_eq!(result.retval["sum"], json!(5));
        assert_eq!(*hooks.lock().expect("lock"), ["before", "success", "after"]);
    }

    #[tokio::test]
    async fn task_error_becomes_failed_result() {
        let (registry, hooks) = registry();
        let result = registry
            .run(ctx("math.Add"), params(json!({"a": -1})))
            .await;
        assert_eq!(result.retcode, 422);
        assert_eq!(result.stderr, "a must be positive");
        assert_eq!(result.error_kind(), Some("fatal"));
        assert_eq!(*hooks.lock().expect("lock"), ["before", "error", "after"]);
    }

    #[tokio::test]
    async fn unknown_entrypoint_lists_registered_names() {
        let (registry, _) = registry();
        let result = registry.run(ctx("math.Sub"), JsonObject::new()).await;
        assert_eq!(result.retcode, 400);
        assert_eq!(result.error_kind(), Some("unknown_entrypoint"));
        assert!(result.stderr.contains("math.Sub"), "{}", result.stderr);
        assert!(result.stderr.contains("math.Add"), "{}", result.stderr);
    }

    #[tokio::test]
    async fn invalid_params_name_the_field() {
        let (registry, hooks) = registry();
        let result = registry
            .run(ctx("math.Add"), params(json!({"a": 1, "b": "two"})))
            .await;
        assert_eq!(result.retcode, 400);
        assert_eq!(result.error_kind(), Some("invalid_params"));
        assert!(
            result.stderr.contains("b: invalid type"),
            "{}",
            result.stderr
        );
        let missing = registry.run(ctx("math.Add"), JsonObject::new()).await;
        assert!(
            missing.stderr.contains("missing field `a`"),
            "{}",
            missing.stderr
        );
        assert!(hooks.lock().expect("lock").is_empty(), "no hook runs");
    }

    #[tokio::test]
    async fn panic_becomes_failed_result() {
        let (registry, _) = registry();
        let result = registry
            .run(ctx("math.Add"), params(json!({"a": 13})))
            .await;
        assert_eq!(result.error_kind(), Some("panic"));
        assert!(result.stderr.contains("unlucky"), "{}", result.stderr);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let (mut registry, _) = registry();
        let err = registry.register(Add::default()).err().expect("duplicate");
        assert!(err.to_string().contains("math.Add"));
    }

    #[test]
    fn entrypoints_describe_params() {
        let (registry, _) = registry();
        let info: Vec<_> = registry.entrypoints().collect();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].params_schema["required"], json!(["a"]));
    }

    struct Gpu;

    impl Task for Gpu {
        const ENTRYPOINT: &'static str = "ml.Gpu";
        const MAX_CONCURRENCY: Option<u32> = Some(3);
        const ACQUIRES: &'static [(&'static str, u32)] = &[("gpu", 2)];
        type Params = JsonObject;

        async fn run(&self, _: &TaskContext, _: JsonObject) -> Result<TaskResult, TaskError> {
            Ok(TaskResult::ok())
        }
    }

    struct Never;

    impl Task for Never {
        const ENTRYPOINT: &'static str = "ml.Never";
        const MAX_CONCURRENCY: Option<u32> = Some(0);
        type Params = JsonObject;

        async fn run(&self, _: &TaskContext, _: JsonObject) -> Result<TaskResult, TaskError> {
            Ok(TaskResult::ok())
        }
    }

    #[test]
    fn limits_are_checked_before_a_worker_starts() {
        let mut registry = Registry::new();
        registry.register(Gpu).expect("register");
        assert!(registry.has_limits());
        let undeclared = registry.check_limits().unwrap_err().to_string();
        assert!(
            undeclared.contains("'gpu', which is not declared"),
            "{undeclared}"
        );

        registry.pool("gpu", 1).expect("pool");
        let too_small = registry.check_limits().unwrap_err().to_string();
        assert!(
            too_small.contains("2 units of pool 'gpu', which has 1"),
            "{too_small}"
        );

        let twice = registry
            .pool("gpu", 4)
            .err()
            .expect("two capacities")
            .to_string();
        assert!(twice.contains("declared twice"), "{twice}");

        let mut registry = Registry::new();
        registry.register(Gpu).expect("register");
        registry.pool("gpu", 2).expect("pool");
        registry.check_limits().expect("fits");
        assert_eq!(
            registry.needs("ml.Gpu"),
            [("entrypoint:ml.Gpu".to_owned(), 1), ("gpu".to_owned(), 2)]
        );
        assert_eq!(registry.pools().get("entrypoint:ml.Gpu"), Some(&3));
        assert!(registry.needs("ml.Other").is_empty());

        let never = Registry::new()
            .register(Never)
            .err()
            .expect("refused")
            .to_string();
        assert!(never.contains("MAX_CONCURRENCY 0"), "{never}");
        assert!(Registry::new().pool("entrypoint:x", 1).is_err());
        assert!(Registry::new().pool("gpu", 0).is_err());
    }
}
