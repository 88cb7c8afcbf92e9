//! Calling user code: parameters deserialized into the task's own type (a
//! bad payload is a failed result naming the field, before user code runs),
//! the hooks around a run, and panics turned into failed results.

use std::panic::AssertUnwindSafe;

use serde_json::{Value, json};

use crate::message::{ErrorKind, JsonObject, TaskResult};
use crate::task::{Task, TaskContext};

/// What a panic said, or "(no message)".
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

pub(super) fn panic_result(panic: &(dyn std::any::Any + Send)) -> TaskResult {
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
pub(super) fn catch_panic<T>(f: impl FnOnce() -> Result<T, TaskResult>) -> Result<T, TaskResult> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(panic_result(panic.as_ref())))
}

/// Parameters as the typed `P`, or a failed result naming the bad field.
pub(super) fn deserialize_params<P: serde::de::DeserializeOwned>(
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

/// Runs `task` with its hooks around it; an error is its failed result.
pub(super) async fn execute<T: Task>(task: &T, ctx: TaskContext, params: JsonObject) -> TaskResult {
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
