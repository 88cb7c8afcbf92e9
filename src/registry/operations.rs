//! Operations in the registry: registering one, building and checking its
//! steps when a message starts it, and running its finish hook.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use serde_json::Value;

use super::user_code::{catch_panic, deserialize_params};
use super::{Builder, Entry, EntrypointInfo, FinishHook, Kind, Registry, RegistryError};
use crate::message::{ErrorKind, JsonObject, TaskResult};
use crate::operation::{Operation, OperationContext, Step};

impl Registry {
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
}
