//! The dice game from Python kser, as a kser worker binary.
//!
//! It registers the task `dice.DiceRoll`, which rolls a die with `sides`
//! faces (default 6) and answers "You made a N" with `{"roll": N}`, and the
//! operation `dice.DiceLaunch`: three rolls, each its own message, each
//! adding its roll to the `rolls` list it was forwarded. The binary has the
//! whole kser command line, so it is the worker and the client at once:
//!
//! ```text
//! cargo run --example dice -- migrate
//! cargo run --example dice -- worker
//! cargo run --example dice -- send dice.DiceRoll --params '{"sides": 20}'
//! cargo run --example dice -- send dice.DiceLaunch
//! cargo run --example dice -- watch <uuid>
//! ```
//!
//! `scripts/demo` runs all of this end to end, starting Kafka and Postgres
//! when none are configured.

use std::process::ExitCode;

use kser::{Operation, Registry, Step, Task, TaskContext, TaskError, TaskResult};
use rand::Rng;
use serde_json::json;

/// Parameters of a roll; `{}` is valid.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RollParams {
    /// How many faces the die has.
    #[serde(default = "six")]
    sides: u32,
}

fn six() -> u32 {
    6
}

struct DiceRoll;

impl Task for DiceRoll {
    const ENTRYPOINT: &'static str = "dice.DiceRoll";
    const DESCRIPTION: &'static str = "Rolls a die";
    type Params = RollParams;

    async fn run(&self, ctx: &TaskContext, params: RollParams) -> Result<TaskResult, TaskError> {
        if params.sides == 0 {
            return Err(TaskError::fatal("a die needs at least one side").with_retcode(400));
        }
        let roll = rand::rng().random_range(1..=params.sides);
        // In an operation, the previous rolls arrive in the forwarded result.
        let mut rolls: Vec<u32> = ctx
            .forwarded
            .as_ref()
            .and_then(|result| result.retval.get("rolls"))
            .and_then(|rolls| serde_json::from_value(rolls.clone()).ok())
            .unwrap_or_default();
        rolls.push(roll);
        Ok(TaskResult::ok()
            .with_stdout(format!("You made a {roll}"))
            .with_value("roll", roll)
            .with_value("rolls", rolls))
    }
}

/// Parameters of a launch; `{}` is valid.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LaunchParams {
    /// How many faces each die has.
    #[serde(default = "six")]
    sides: u32,
}

/// Three rolls in a row, possibly on three different workers.
struct DiceLaunch;

impl Operation for DiceLaunch {
    const ENTRYPOINT: &'static str = "dice.DiceLaunch";
    const DESCRIPTION: &'static str = "Rolls three dice, one after the other";
    type Params = LaunchParams;

    fn build(&self, params: &LaunchParams) -> Result<Vec<Step>, TaskError> {
        let roll = Step::new(DiceRoll::ENTRYPOINT, json!({ "sides": params.sides }));
        Ok(vec![roll.clone(), roll.clone(), roll])
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    let registered = registry
        .register(DiceRoll)
        .and_then(|r| r.register_operation(DiceLaunch));
    if let Err(err) = registered {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    kser::cli::run(registry)
}
