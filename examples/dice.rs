//! The dice game from Python kser, as a kser worker binary.
//!
//! It registers one task, `dice.DiceRoll`, which rolls a die with `sides`
//! faces (default 6) and answers "You made a N" with `{"roll": N}`. The
//! binary has the whole kser command line, so it is the worker and the
//! client at once:
//!
//! ```text
//! cargo run --example dice -- migrate
//! cargo run --example dice -- worker
//! cargo run --example dice -- send dice.DiceRoll --params '{"sides": 20}'
//! cargo run --example dice -- status <uuid>
//! ```
//!
//! `scripts/demo` runs all of this end to end, starting Kafka and Postgres
//! when none are configured.

use std::process::ExitCode;

use kser::{Registry, Task, TaskContext, TaskError, TaskResult};
use rand::Rng;

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

    async fn run(&self, _ctx: &TaskContext, params: RollParams) -> Result<TaskResult, TaskError> {
        if params.sides == 0 {
            return Err(TaskError::fatal("a die needs at least one side").with_retcode(400));
        }
        let roll = rand::rng().random_range(1..=params.sides);
        Ok(TaskResult::ok()
            .with_stdout(format!("You made a {roll}"))
            .with_value("roll", roll))
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    if let Err(err) = registry.register(DiceRoll) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    kser::cli::run(registry)
}
