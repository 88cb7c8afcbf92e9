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
