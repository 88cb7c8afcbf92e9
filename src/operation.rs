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
//!
//! Named steps with dependencies make a graph instead (see [`Step`]): steps
//! whose dependencies succeeded run in parallel, a join runs once, and per
//! step policies say what a failure does ([`OnFailure`]), how long a step
//! waits, what undoes it ([`Step::compensate`]) and what `resume` does with
//! it ([`Recovery`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

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

/// One task of an operation: an entrypoint and its parameters, and, in a
/// graph operation, its name, the steps it runs after and its policies.
///
/// A list of plain steps runs in order, each step forwarded the merged
/// result of all before it: the linear operation Python kser knows. As soon
/// as one step is [named](Step::named) or declares [`after`](Step::after),
/// the list is a graph: every step must be named, a step without `after`
/// starts at once, and a step runs when its dependencies succeeded (or, with
/// [`any`](Step::any), when the first of them did), forwarded the merged
/// results of its dependencies in their declared order. Steps ready together
/// run in parallel, each its own message.
///
/// ```
/// use kser::{OnFailure, Step};
/// use serde_json::json;
///
/// let steps = vec![
///     Step::new("shop.Reserve", json!({})).named("reserve")
///         .compensate(Step::new("shop.Release", json!({}))),
///     Step::new("shop.Charge", json!({})).named("charge")
///         .on_failure(OnFailure::Compensate),
///     Step::new("shop.Ship", json!({})).named("ship").after(["reserve", "charge"]),
/// ];
/// # let _ = steps;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The task that runs the step.
    pub entrypoint: String,
    /// Must be a JSON object.
    pub params: Value,
    /// The step's name in a graph operation.
    pub name: Option<String>,
    /// The names of the steps this one runs after.
    pub after: Vec<String>,
    /// With several dependencies: wait for all of them, or the first.
    pub join: Join,
    /// What the operation does when this step fails.
    pub on_failure: OnFailure,
    /// How long the step waits once its dependencies finished.
    pub delay: Duration,
    /// The task that undoes this step once it succeeded, should the
    /// operation fail with [`OnFailure::Compensate`]: its entrypoint and
    /// parameters (the rest of this `Step` is ignored).
    pub compensation: Option<Box<Step>>,
    /// What `resume` does with this step.
    pub recovery: Recovery,
}

/// Which dependencies a graph step waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Join {
    /// Every dependency succeeded (fan-in).
    #[default]
    All,
    /// The first dependency succeeded; the others are not waited for.
    Any,
}

/// What a graph operation does when one of its steps fails for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// The operation fails; steps not yet started do not run.
    #[default]
    Fail,
    /// The failure is recorded and the operation goes on: the steps that
    /// needed this one do not run, the others do.
    Continue,
    /// The operation fails and undoes what succeeded: the compensations of
    /// the steps that had succeeded run, one after the other, in the
    /// reverse order of their success. It ends COMPENSATED, or FAILED when
    /// a compensation fails.
    Compensate,
}

/// What `resume` does with a step of a graph operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recovery {
    /// Run it again unless it succeeded.
    #[default]
    Resume,
    /// Run it again, even when it succeeded.
    Rerun,
    /// Do not run it again: unless it succeeded it is SKIPPED, and the
    /// steps after it run as if it had succeeded.
    Skip,
}

impl Step {
    /// A step running `entrypoint` with `params` (a JSON object).
    pub fn new(entrypoint: impl Into<String>, params: Value) -> Self {
        Self {
            entrypoint: entrypoint.into(),
            params,
            name: None,
            after: Vec::new(),
            join: Join::All,
            on_failure: OnFailure::Fail,
            delay: Duration::ZERO,
            compensation: None,
            recovery: Recovery::Resume,
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

    /// Names the step, making its operation a graph.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Runs the step after the named steps (fan-in when there are several).
    pub fn after<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.after.extend(names.into_iter().map(Into::into));
        self
    }

    /// Runs the step once the first of its dependencies succeeded, rather
    /// than all of them.
    pub fn any(mut self) -> Self {
        self.join = Join::Any;
        self
    }

    /// What the operation does when this step fails.
    pub fn on_failure(mut self, policy: OnFailure) -> Self {
        self.on_failure = policy;
        self
    }

    /// Waits `delay` after the dependencies finished (after the start, for
    /// a step without dependencies) before the step's message is published.
    /// Nothing blocks meanwhile: the message waits in the outbox.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The task that undoes this step (see [`OnFailure::Compensate`]). It
    /// is forwarded this step's result.
    pub fn compensate(mut self, step: Step) -> Self {
        self.compensation = Some(Box::new(step));
        self
    }

    /// What `resume` does with this step.
    pub fn on_resume(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    /// Whether anything about this step needs a graph operation.
    fn is_graph(&self) -> bool {
        self.name.is_some() || !self.after.is_empty()
    }

    /// Whether this step declares a policy only graph operations have.
    fn has_policy(&self) -> bool {
        self.join != Join::All
            || self.on_failure != OnFailure::Fail
            || !self.delay.is_zero()
            || self.compensation.is_some()
            || self.recovery != Recovery::Resume
    }
}

/// Whether `steps` form a graph (some step is named or has dependencies)
/// rather than a list run in order.
pub(crate) fn is_graph(steps: &[Step]) -> bool {
    steps.iter().any(Step::is_graph)
}

/// Checks the shape of an operation's steps: in a list, no graph-only
/// policy; in a graph, every step named once, every dependency a known
/// step, and no cycle. The error names what is wrong.
pub(crate) fn check_shape(steps: &[Step]) -> Result<(), String> {
    let label = |index: usize, step: &Step| match &step.name {
        Some(name) => format!("step {} ('{name}', {})", index + 1, step.entrypoint),
        None => format!("step {} ({})", index + 1, step.entrypoint),
    };
    if !is_graph(steps) {
        if let Some((index, step)) = steps.iter().enumerate().find(|(_, s)| s.has_policy()) {
            return Err(format!(
                "{}: any, on_failure, delay, compensate and on_resume belong to graph \
                 operations: name the steps",
                label(index, step)
            ));
        }
        return Ok(());
    }
    let mut index_of: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
    for (index, step) in steps.iter().enumerate() {
        let Some(name) = step.name.as_deref().filter(|n| !n.is_empty()) else {
            return Err(format!(
                "{} has no name: every step of a graph operation needs one",
                label(index, step)
            ));
        };
        if let Some(first) = index_of.insert(name, index) {
            return Err(format!(
                "{}: the name '{name}' is taken by step {} already",
                label(index, step),
                first + 1
            ));
        }
    }
    for (index, step) in steps.iter().enumerate() {
        let mut seen = HashSet::new();
        for dependency in &step.after {
            if !index_of.contains_key(dependency.as_str()) {
                let mut known: Vec<&str> = index_of.keys().copied().collect();
                known.sort_unstable();
                return Err(format!(
                    "{} runs after '{dependency}', which is no step of the operation \
                     (steps: {})",
                    label(index, step),
                    known.join(", ")
                ));
            }
            if !seen.insert(dependency.as_str()) {
                return Err(format!(
                    "{} names '{dependency}' twice in `after`",
                    label(index, step)
                ));
            }
        }
        if step.join == Join::Any && step.after.is_empty() {
            return Err(format!(
                "{} waits for any of its dependencies but has none",
                label(index, step)
            ));
        }
        if let Some(compensation) = &step.compensation
            && compensation.has_policy()
        {
            return Err(format!(
                "{}: its compensation is a plain task: no policy of its own",
                label(index, step)
            ));
        }
    }
    // Kahn's algorithm: whatever never becomes ready is on a cycle or
    // behind one.
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.after.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (index, step) in steps.iter().enumerate() {
        for dependency in &step.after {
            dependents[index_of[dependency.as_str()]].push(index);
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|i| waiting[*i] == 0).collect();
    let mut done = 0;
    while let Some(index) = ready.pop() {
        done += 1;
        for &next in &dependents[index] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.push(next);
            }
        }
    }
    if done < steps.len() {
        let stuck: Vec<&str> = steps
            .iter()
            .zip(&waiting)
            .filter(|(_, w)| **w > 0)
            .filter_map(|(s, _)| s.name.as_deref())
            .collect();
        return Err(format!(
            "the steps {} depend on each other in a cycle: none of them could ever start",
            stuck.join(", ")
        ));
    }
    Ok(())
}
/// What an operation's hooks know about it.
#[derive(Debug, Clone)]
pub struct OperationContext {
    /// The operation's uuid.
    pub uuid: String,
    /// Its entrypoint.
    pub entrypoint: String,
    /// Its message's metadata.
    pub metadata: JsonObject,
    /// The worker running the hook.
    pub worker: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(name: &str, after: &[&str]) -> Step {
        Step::new("t.T", json!({}))
            .named(name)
            .after(after.iter().copied())
    }

    #[test]
    fn a_plain_list_is_no_graph_and_refuses_graph_policies() {
        let list = vec![Step::new("t.T", json!({})), Step::new("t.T", json!({}))];
        assert!(!is_graph(&list));
        assert_eq!(check_shape(&list), Ok(()));
        let delayed = vec![Step::new("t.T", json!({})).delay(Duration::from_secs(1))];
        let err = check_shape(&delayed).expect_err("refused");
        assert!(err.contains("name the steps"), "{err}");
    }

    #[test]
    fn a_diamond_is_a_valid_graph() {
        let steps = vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]).any(),
        ];
        assert!(is_graph(&steps));
        assert_eq!(check_shape(&steps), Ok(()));
    }

    #[test]
    fn bad_graphs_say_what_is_wrong() {
        let cases: Vec<(Vec<Step>, &str)> = vec![
            (
                vec![step("a", &["b"]), step("b", &["a"]), step("c", &[])],
                "the steps a, b depend on each other in a cycle",
            ),
            (vec![step("a", &["a"])], "the steps a depend"),
            (
                vec![step("a", &[]), step("b", &["x"])],
                "runs after 'x', which is no step of the operation (steps: a, b)",
            ),
            (
                vec![step("a", &[]), step("a", &[])],
                "the name 'a' is taken by step 1 already",
            ),
            (
                vec![step("a", &[]), Step::new("t.T", json!({})).after(["a"])],
                "step 2 (t.T) has no name",
            ),
            (
                vec![step("a", &[]), step("b", &["a", "a"])],
                "names 'a' twice",
            ),
            (vec![step("a", &[]).any()], "has none"),
        ];
        for (steps, expected) in cases {
            let err = check_shape(&steps).expect_err(expected);
            assert!(err.contains(expected), "expected `{expected}` in `{err}`");
        }
    }
}
