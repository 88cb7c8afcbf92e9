//! What users implement for multi-step work: the [`Operation`] trait and the
//! [`Step`]s it builds.
//!
//! An operation is started by one message. The worker that receives it builds
//! the list of steps, checks every step against the registered tasks, and
//! records the operation and all its tasks in one transaction. Each step is
//! then delivered as its own Kafka message, keyed by the operation uuid, so
//! any worker of the group can run it while the steps of one operation stay
//! in order. Step k+1 receives the merged result of steps 1..k; the
//! operation's result is the merge of all.

use std::future::Future;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::message::{JsonObject, TaskResult};
use crate::task::TaskError;

/// A sequence of tasks registered under an entrypoint name.
///
/// ```
/// use kser::{Operation, Step, TaskError};
/// use serde_json::json;
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Params {
///     sides: u32,
/// }
///
/// struct TwoRolls;
///
/// impl Operation for TwoRolls {
///     const ENTRYPOINT: &'static str = "dice.TwoRolls";
///     type Params = Params;
///
///     fn build(&self, params: &Params) -> Result<Vec<Step>, TaskError> {
///         Ok(vec![
///             Step::new("dice.DiceRoll", json!({ "sides": params.sides })),
///             Step::new("dice.DiceRoll", json!({ "sides": params.sides })),
///         ])
///     }
/// }
/// ```
pub trait Operation: Send + Sync + 'static {
    /// The name messages use to start this operation.
    const ENTRYPOINT: &'static str;
    /// One line for `entrypoints`.
    const DESCRIPTION: &'static str = "";
    /// The operation's parameters, checked before anything is built.
    type Params: DeserializeOwned + JsonSchema + Send + 'static;

    /// Checks the parameters beyond their type (ranges, combinations). An
    /// error makes the operation FAILED before any task is created.
    fn check(&self, _params: &Self::Params) -> Result<(), TaskError> {
        Ok(())
    }

    /// The tasks to run, in order. Each step's entrypoint must be a
    /// registered task and its parameters must fit that task's `Params`;
    /// otherwise the operation fails before any task is created.
    fn build(&self, params: &Self::Params) -> Result<Vec<Step>, TaskError>;

    /// Runs on the worker that finished the last step, after the operation
    /// is recorded as SUCCESS.
    fn on_success(
        &self,
        _ctx: &OperationContext,
        _result: &TaskResult,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs on the worker that recorded the operation as FAILED, with the
    /// merged result including the failure.
    fn on_error(
        &self,
        _ctx: &OperationContext,
        _result: &TaskResult,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// One task of an operation: an entrypoint and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub entrypoint: String,
    /// Must be a JSON object.
    pub params: Value,
}

impl Step {
    /// A step running `entrypoint` with `params` (a JSON object).
    pub fn new(entrypoint: impl Into<String>, params: Value) -> Self {
        Self {
            entrypoint: entrypoint.into(),
            params,
        }
    }

    /// A step whose parameters are serialized from a value, e.g. the task's
    /// own `Params` type when it implements `Serialize`.
    pub fn with<P: serde::Serialize>(
        entrypoint: impl Into<String>,
        params: &P,
    ) -> Result<Self, TaskError> {
        let params = serde_json::to_value(params)
            .map_err(|err| TaskError::fatal(format!("could not serialize step params: {err}")))?;
        Ok(Self::new(entrypoint, params))
    }
}

/// What an operation's hooks know about it.
#[derive(Debug, Clone)]
pub struct OperationContext {
    pub uuid: String,
    pub entrypoint: String,
    pub metadata: JsonObject,
    /// The worker running the hook.
    pub worker: String,
}
