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
//! - `showcase.Limited {"ms"}`: sleeps; `MAX_CONCURRENCY` 2 across the fleet.
//! - `showcase.Render {"ms"}` / `showcase.Train {"ms"}`: sleep holding 1 / 2
//!   units of the `gpu` pool (capacity 2).
//! - `showcase.Hooked {}`: fails in `before_run`, so `run` never runs.
//! - `showcase.Flaky {"flag"}`: fails until the file `flag` exists.
//! - `showcase.FailTimes {"times"}`: fails (retryably) on its first `times`
//!   attempts, then succeeds; it declares its own retry policy: 4 attempts,
//!   300 ms, then 600 ms, then 1.2 s apart, no jitter.
//! - `showcase.Append {"item", "ms"?}`: appends `item` to the `items` list it
//!   was forwarded, after sleeping `ms`.
//! - `showcase.Record {"ms"?}`: a transactional task: inserts `(uuid,
//!   attempt)` into the table `showcase_effects` (which must exist), then
//!   sleeps `ms`; the row commits with the task's SUCCESS or not at all.
//!
//! With `SHOWCASE_JOURNAL=FILE` set, Sleep and Append append `UUID ATTEMPT`
//! to FILE as they start: the tests count how often user code really ran.
//!
//! Operations:
//! - `showcase.Pipeline {"flag"}`: Echo, Flaky, Echo: fails in the middle
//!   until the flag file exists, then `resume` finishes it.
//! - `showcase.Chain {"count", "ms"?}`: `count` Append steps.
//! - `showcase.Custom {"steps": [{"entrypoint", "params"}]}`: whatever steps
//!   it is given, to show how bad steps are refused up front.
//! - `showcase.Graph {"steps": [{"name", "entrypoint", "params"?, "after"?,
//!   "any"?, "on_failure"?, "delay_ms"?, "compensate"?, "recovery"?}]}`: a
//!   graph operation of the steps it is given (`on_failure`: fail, continue
//!   or compensate; `compensate`: `{"entrypoint", "params"}`; `recovery`:
//!   rerun or skip).

use std::process::ExitCode;
use std::time::Duration;

use kser::{
    JsonObject, OnFailure, Operation, OperationContext, Recovery, Registry, RetryPolicy, Step,
    Task, TaskContext, TaskError, TaskResult,
};
use serde_json::{Value, json};

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
    const EVENTS: &'static [&'static str] = &["showcase.greet"];
    type Params = EchoParams;

    /// `kser control event showcase.greet --params '{"to": "you"}'` logs a
    /// greeting; `{"fail": true}` makes the handler fail.
    async fn on_event(&self, event: &kser::Event) -> Result<(), TaskError> {
        if event.params.get("fail") == Some(&Value::Bool(true)) {
            return Err(TaskError::fatal("asked to fail"));
        }
        let to = event
            .params
            .get("to")
            .and_then(Value::as_str)
            .unwrap_or("nobody");
        tracing::info!(event = %event.name, "showcase.Echo greets {to}");
        Ok(())
    }

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
struct SizedParams {
    /// How many bytes of stdout the result carries.
    bytes: usize,
    /// Put a NUL character in the result, which Postgres cannot store.
    #[serde(default)]
    nul: bool,
}

struct Sized;

impl Task for Sized {
    const ENTRYPOINT: &'static str = "showcase.Sized";
    const DESCRIPTION: &'static str = "Returns a result of the requested size";
    type Params = SizedParams;

    async fn run(&self, _ctx: &TaskContext, params: SizedParams) -> Result<TaskResult, TaskError> {
        let mut result = TaskResult::ok().with_stdout("x".repeat(params.bytes));
        if params.nul {
            result.retval.insert("text".into(), "a\0b".into());
        }
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

/// Appends `UUID ATTEMPT` to `$SHOWCASE_JOURNAL`, in one write so lines of
/// concurrent workers never mix.
fn journal(ctx: &TaskContext) {
    use std::io::Write as _;
    let Some(path) = std::env::var_os("SHOWCASE_JOURNAL") else {
        return;
    };
    let line = format!("{} {}\n", ctx.uuid, ctx.attempt);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(err) = written {
        eprintln!("showcase: could not write the journal: {err}");
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct RecordParams {
    #[serde(default)]
    ms: u64,
}

struct Record;

impl kser::TransactionalTask for Record {
    const ENTRYPOINT: &'static str = "showcase.Record";
    const DESCRIPTION: &'static str = "Inserts a row into showcase_effects, exactly once";
    type Params = RecordParams;

    async fn run(
        &self,
        ctx: &TaskContext,
        params: RecordParams,
        conn: &mut diesel_async::AsyncPgConnection,
    ) -> Result<TaskResult, TaskError> {
        use diesel_async::RunQueryDsl as _;
        journal(ctx);
        diesel::sql_query("INSERT INTO showcase_effects (uuid, attempt) VALUES ($1, $2)")
            .bind::<diesel::sql_types::Text, _>(&ctx.uuid)
            .bind::<diesel::sql_types::Integer, _>(i32::try_from(ctx.attempt).unwrap_or(i32::MAX))
            .execute(conn)
            .await
            .map_err(|err| TaskError::retryable(format!("insert: {err}")))?;
        tokio::time::sleep(Duration::from_millis(params.ms)).await;
        Ok(TaskResult::ok())
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

    async fn run(&self, ctx: &TaskContext, params: SleepParams) -> Result<TaskResult, TaskError> {
        journal(ctx);
        tokio::time::sleep(Duration::from_millis(params.ms)).await;
        Ok(TaskResult::ok().with_value("slept_ms", params.ms))
    }
}

/// At most two run at once across every worker sharing the database.
struct Limited;

impl Task for Limited {
    const ENTRYPOINT: &'static str = "showcase.Limited";
    const DESCRIPTION: &'static str =
        "Sleeps for `ms` milliseconds; at most 2 at once across the fleet";
    const MAX_CONCURRENCY: Option<u32> = Some(2);
    type Params = SleepParams;

    async fn run(&self, ctx: &TaskContext, params: SleepParams) -> Result<TaskResult, TaskError> {
        Sleep.run(ctx, params).await
    }
}

/// Holds one unit of the `gpu` pool (capacity 2) while it runs.
struct Render;

impl Task for Render {
    const ENTRYPOINT: &'static str = "showcase.Render";
    const DESCRIPTION: &'static str = "Sleeps for `ms` milliseconds holding 1 gpu";
    const ACQUIRES: &'static [(&'static str, u32)] = &[("gpu", 1)];
    type Params = SleepParams;

    async fn run(&self, ctx: &TaskContext, params: SleepParams) -> Result<TaskResult, TaskError> {
        Sleep.run(ctx, params).await
    }
}

/// Holds both units of the `gpu` pool while it runs.
struct Train;

impl Task for Train {
    const ENTRYPOINT: &'static str = "showcase.Train";
    const DESCRIPTION: &'static str = "Sleeps for `ms` milliseconds holding 2 gpus";
    const ACQUIRES: &'static [(&'static str, u32)] = &[("gpu", 2)];
    type Params = SleepParams;

    async fn run(&self, ctx: &TaskContext, params: SleepParams) -> Result<TaskResult, TaskError> {
        Sleep.run(ctx, params).await
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

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct FlagParams {
    flag: String,
}

struct Flaky;

impl Task for Flaky {
    const ENTRYPOINT: &'static str = "showcase.Flaky";
    const DESCRIPTION: &'static str = "Fails until the file `flag` exists";
    type Params = FlagParams;

    async fn run(&self, _ctx: &TaskContext, params: FlagParams) -> Result<TaskResult, TaskError> {
        if std::path::Path::new(&params.flag).exists() {
            Ok(TaskResult::ok().with_stdout("the flag is up"))
        } else {
            Err(TaskError::retryable(format!("waiting for {}", params.flag)))
        }
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct FailTimesParams {
    times: u32,
}

struct FailTimes;

impl Task for FailTimes {
    const ENTRYPOINT: &'static str = "showcase.FailTimes";
    const DESCRIPTION: &'static str = "Fails on its first `times` attempts";
    type Params = FailTimesParams;

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(300),
            jitter: 0.0,
            ..RetryPolicy::NONE
        })
    }

    async fn run(
        &self,
        ctx: &TaskContext,
        params: FailTimesParams,
    ) -> Result<TaskResult, TaskError> {
        if ctx.attempt <= params.times {
            return Err(TaskError::retryable(format!(
                "failing on purpose (attempt {})",
                ctx.attempt
            )));
        }
        Ok(TaskResult::ok().with_stdout(format!("succeeded on attempt {}", ctx.attempt)))
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AppendParams {
    item: Value,
    #[serde(default)]
    ms: u64,
}

struct Append;

impl Task for Append {
    const ENTRYPOINT: &'static str = "showcase.Append";
    const DESCRIPTION: &'static str = "Appends `item` to the forwarded `items`";
    type Params = AppendParams;

    async fn run(&self, ctx: &TaskContext, params: AppendParams) -> Result<TaskResult, TaskError> {
        journal(ctx);
        tokio::time::sleep(Duration::from_millis(params.ms)).await;
        let mut items: Vec<Value> = ctx
            .forwarded
            .as_ref()
            .and_then(|result| result.retval.get("items"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        items.push(params.item);
        Ok(TaskResult::ok().with_value("items", items))
    }
}

struct Pipeline;

impl Operation for Pipeline {
    const ENTRYPOINT: &'static str = "showcase.Pipeline";
    const DESCRIPTION: &'static str = "Echo, Flaky, Echo";
    type Params = FlagParams;

    fn build(&self, params: &FlagParams) -> Result<Vec<Step>, TaskError> {
        Ok(vec![
            Step::new(
                Echo::ENTRYPOINT,
                json!({"text": "one", "retval": {"first": 1}}),
            ),
            Step::new(Flaky::ENTRYPOINT, json!({"flag": params.flag})),
            Step::new(
                Echo::ENTRYPOINT,
                json!({"text": "three", "retval": {"third": 3}}),
            ),
        ])
    }

    async fn on_success(&self, ctx: &OperationContext, result: &TaskResult) {
        tracing::info!(operation.uuid = %ctx.uuid, stdout = %result.stdout, "pipeline hook: succeeded");
    }

    async fn on_error(&self, ctx: &OperationContext, result: &TaskResult) {
        tracing::info!(operation.uuid = %ctx.uuid, retcode = result.retcode, "pipeline hook: failed");
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct ChainParams {
    count: u32,
    #[serde(default)]
    ms: u64,
}

struct Chain;

impl Operation for Chain {
    const ENTRYPOINT: &'static str = "showcase.Chain";
    const DESCRIPTION: &'static str = "`count` Append steps";
    type Params = ChainParams;

    fn check(&self, params: &ChainParams) -> Result<(), TaskError> {
        if (1..=1000).contains(&params.count) {
            Ok(())
        } else {
            Err(TaskError::fatal("count must be between 1 and 1000").with_retcode(400))
        }
    }

    fn build(&self, params: &ChainParams) -> Result<Vec<Step>, TaskError> {
        Ok((0..params.count)
            .map(|i| Step::new(Append::ENTRYPOINT, json!({"item": i, "ms": params.ms})))
            .collect())
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct CustomStep {
    entrypoint: String,
    #[serde(default)]
    params: Value,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct CustomParams {
    steps: Vec<CustomStep>,
}

struct Custom;

impl Operation for Custom {
    const ENTRYPOINT: &'static str = "showcase.Custom";
    const DESCRIPTION: &'static str = "Runs the steps it is given";
    type Params = CustomParams;

    fn build(&self, params: &CustomParams) -> Result<Vec<Step>, TaskError> {
        Ok(params
            .steps
            .iter()
            .map(|step| Step::new(step.entrypoint.clone(), step.params.clone()))
            .collect())
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct GraphStep {
    name: String,
    entrypoint: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    any: bool,
    /// fail, continue or compensate.
    #[serde(default)]
    on_failure: Option<String>,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    compensate: Option<CustomStep>,
    /// rerun or skip.
    #[serde(default)]
    recovery: Option<String>,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct GraphParams {
    steps: Vec<GraphStep>,
}

struct Graph;

impl Operation for Graph {
    const ENTRYPOINT: &'static str = "showcase.Graph";
    const DESCRIPTION: &'static str = "Runs the graph of steps it is given";
    type Params = GraphParams;

    fn build(&self, params: &GraphParams) -> Result<Vec<Step>, TaskError> {
        let invalid = |what: String| Err(TaskError::fatal(what).with_retcode(400));
        let mut steps = Vec::with_capacity(params.steps.len());
        for spec in &params.steps {
            let params = match &spec.params {
                Value::Null => json!({}),
                other => other.clone(),
            };
            let mut step = Step::new(spec.entrypoint.clone(), params)
                .named(spec.name.clone())
                .after(spec.after.iter().cloned())
                .delay(Duration::from_millis(spec.delay_ms));
            if spec.any {
                step = step.any();
            }
            step = match spec.on_failure.as_deref() {
                None | Some("fail") => step,
                Some("continue") => step.on_failure(OnFailure::Continue),
                Some("compensate") => step.on_failure(OnFailure::Compensate),
                Some(other) => return invalid(format!("unknown on_failure '{other}'")),
            };
            step = match spec.recovery.as_deref() {
                None | Some("resume") => step,
                Some("rerun") => step.on_resume(Recovery::Rerun),
                Some("skip") => step.on_resume(Recovery::Skip),
                Some(other) => return invalid(format!("unknown recovery '{other}'")),
            };
            if let Some(undo) = &spec.compensate {
                let params = match &undo.params {
                    Value::Null => json!({}),
                    other => other.clone(),
                };
                step = step.compensate(Step::new(undo.entrypoint.clone(), params));
            }
            steps.push(step);
        }
        Ok(steps)
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    let registered = registry
        .register(Echo)
        .and_then(|r| r.register(Fail))
        .and_then(|r| r.register(Sized))
        .and_then(|r| r.register(Panic))
        .and_then(|r| r.register(Sleep))
        .and_then(|r| r.register(Limited))
        .and_then(|r| r.register(Render))
        .and_then(|r| r.register(Train))
        .and_then(|r| r.pool("gpu", 2))
        .and_then(|r| r.register(Hooked))
        .and_then(|r| r.register(Flaky))
        .and_then(|r| r.register(Append))
        .and_then(|r| r.register(FailTimes))
        .and_then(|r| r.register_transactional(Record))
        .and_then(|r| r.register_operation(Pipeline))
        .and_then(|r| r.register_operation(Chain))
        .and_then(|r| r.register_operation(Custom))
        .and_then(|r| r.register_operation(Graph))
        .map(|_| ());
    if let Err(err) = registered {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    kser::cli::run(registry)
}
