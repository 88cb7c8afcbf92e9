//! Tasks that succeed, fail, panic and take their time: what each outcome
//! looks like in `status`, and how hooks and typed parameters behave. The
//! integration tests run this binary as their worker.
//!
//! ```text
//! cargo run --example showcase -- worker
//! cargo run --example showcase -- send showcase.Fail --params '{"reason": "no"}'
//! cargo run --example showcase -- entrypoints
//! ```
//!
//! Entrypoints:
//! - `showcase.Echo {"text", "retval"?}`: prints `text`, returns `retval`, and
//!   reports the result it was forwarded in `retval.forwarded`.
//! - `showcase.Fail {"reason", "retcode"?}`: fails for good with that retcode.
//! - `showcase.Panic {}`: panics; the worker records it and carries on.
//! - `showcase.Sleep {"ms"}`: sleeps, for concurrency and shutdown tests.
//! - `showcase.Hooked {}`: fails in `before_run`, so `run` never runs.

use std::process::ExitCode;
use std::time::Duration;

use kser::{JsonObject, Registry, Task, TaskContext, TaskError, TaskResult};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct EchoParams {
    text: String,
    #[serde(default)]
    retval: JsonObject,
}

struct Echo;

impl Task for Echo {
    const ENTRYPOINT: &'static str = "showcase.Echo";
    const DESCRIPTION: &'static str = "Prints its text back";
    type Params = EchoParams;

    async fn run(&self, ctx: &TaskContext, params: EchoParams) -> Result<TaskResult, TaskError> {
        let mut result = TaskResult::ok().with_stdout(params.text);
        result.retval = params.retval;
        if let Some(forwarded) = &ctx.forwarded {
            let forwarded = serde_json::to_value(forwarded).unwrap_or_default();
            result.retval.insert("forwarded".into(), forwarded);
        }
        result.retval.insert("attempt".into(), ctx.attempt.into());
        Ok(result)
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct FailParams {
    reason: String,
    #[serde(default)]
    retcode: Option<i32>,
}

struct Fail;

impl Task for Fail {
    const ENTRYPOINT: &'static str = "showcase.Fail";
    const DESCRIPTION: &'static str = "Always fails with the given reason";
    type Params = FailParams;

    async fn run(&self, _ctx: &TaskContext, params: FailParams) -> Result<TaskResult, TaskError> {
        Err(TaskError::fatal(params.reason)
            .with_retcode(params.retcode.unwrap_or(500))
            .with_details(serde_json::json!({"hint": "this task always fails"})))
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

struct Panic;

impl Task for Panic {
    const ENTRYPOINT: &'static str = "showcase.Panic";
    const DESCRIPTION: &'static str = "Panics";
    type Params = Nothing;

    async fn run(&self, _ctx: &TaskContext, _params: Nothing) -> Result<TaskResult, TaskError> {
        panic!("the showcase task panicked on purpose")
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct SleepParams {
    ms: u64,
}

struct Sleep;

impl Task for Sleep {
    const ENTRYPOINT: &'static str = "showcase.Sleep";
    const DESCRIPTION: &'static str = "Sleeps for `ms` milliseconds";
    type Params = SleepParams;

    async fn run(&self, _ctx: &TaskContext, params: SleepParams) -> Result<TaskResult, TaskError> {
        tokio::time::sleep(Duration::from_millis(params.ms)).await;
        Ok(TaskResult::ok().with_value("slept_ms", params.ms))
    }
}

struct Hooked;

impl Task for Hooked {
    const ENTRYPOINT: &'static str = "showcase.Hooked";
    const DESCRIPTION: &'static str = "Refused by its before_run hook";
    type Params = Nothing;

    async fn before_run(&self, ctx: &TaskContext, _params: &Nothing) -> Result<(), TaskError> {
        Err(TaskError::fatal(format!("before_run refused {}", ctx.uuid)).with_retcode(403))
    }

    async fn run(&self, _ctx: &TaskContext, _params: Nothing) -> Result<TaskResult, TaskError> {
        Ok(TaskResult::ok().with_stdout("run should not have been called"))
    }

    async fn on_error(&self, ctx: &TaskContext, result: &TaskResult) {
        tracing::info!(task.uuid = %ctx.uuid, retcode = result.retcode, "on_error hook ran");
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    let registered = registry
        .register(Echo)
        .and_then(|r| r.register(Fail))
        .and_then(|r| r.register(Panic))
        .and_then(|r| r.register(Sleep))
        .and_then(|r| r.register(Hooked))
        .map(|_| ());
    if let Err(err) = registered {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    kser::cli::run(registry)
}
