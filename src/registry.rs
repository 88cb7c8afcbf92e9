//! Entrypoint name -> task: the [`Registry`] erases each task's types behind
//! one boxed handler, so the worker can route any message by name.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;
use serde_json::{Value, json};

use crate::message::{ErrorKind, JsonObject, TaskResult};
use crate::task::{Task, TaskContext};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(TaskContext, JsonObject) -> BoxFuture<TaskResult> + Send + Sync>;

/// The tasks a worker can run, by entrypoint name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, Entry>,
}

#[derive(Clone)]
struct Entry {
    info: EntrypointInfo,
    handler: Handler,
}

/// What `entrypoints` shows about one registered name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntrypointInfo {
    pub name: &'static str,
    pub kind: &'static str,
    pub description: &'static str,
    /// The JSON schema of the parameters.
    pub params_schema: Value,
}

/// Errors from building or using a [`Registry`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("entrypoint '{0}' is registered twice")]
    Duplicate(&'static str),
    #[error("unknown entrypoint '{name}'; registered entrypoints: {}", list_or_none(.known))]
    UnknownEntrypoint { name: String, known: Vec<String> },
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
        let task = Arc::new(task);
        let handler: Handler = Arc::new(move |ctx, params| {
            let task = Arc::clone(&task);
            Box::pin(async move { execute(&*task, ctx, params).await })
        });
        let info = EntrypointInfo {
            name: T::ENTRYPOINT,
            kind: "task",
            description: T::DESCRIPTION,
            params_schema: schemars::schema_for!(T::Params).to_value(),
        };
        self.entries.insert(T::ENTRYPOINT, Entry { info, handler });
        Ok(self)
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
        let Some(entry) = self.entries.get(ctx.entrypoint.as_str()) else {
            let err = self.check(&ctx.entrypoint).err();
            let message = err.map(|e| e.to_string()).unwrap_or_default();
            let known: Vec<_> = self.entries.keys().collect();
            return TaskResult::error(
                400,
                ErrorKind::UnknownEntrypoint,
                message,
                json!({ "entrypoint": ctx.entrypoint, "registered": known }),
            );
        };
        let future = (entry.handler)(ctx, params);
        match AssertUnwindSafe(future).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                TaskResult::error(
                    500,
                    ErrorKind::Panic,
                    format!("task panicked: {text}"),
                    Value::Null,
                )
            }
        }
    }
}

async fn execute<T: Task>(task: &T, ctx: TaskContext, params: JsonObject) -> TaskResult {
    let params: T::Params = match serde_path_to_error::deserialize(Value::Object(params)) {
        Ok(params) => params,
        Err(err) => {
            let path = err.path().to_string();
            let message = if path == "." {
                format!("invalid params for {}: {}", T::ENTRYPOINT, err.inner())
            } else {
                format!(
                    "invalid params for {}: {path}: {}",
                    T::ENTRYPOINT,
                    err.inner()
                )
            };
            return TaskResult::error(
                400,
                ErrorKind::InvalidParams,
                message,
                json!({ "field": path }),
            );
        }
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
}
