//! The dice game from Python kser, as a kser worker binary.
//!
//! It registers the task `dice.DiceRoll`, which rolls a die with `sides`
//! faces (default 6) and answers "You made a N" with `{"roll": N}`, the
//! operation `dice.DiceLaunch`: three rolls, each its own message, each
//! adding its roll to the `rolls` list it was forwarded, and the graph
//! operation `dice.DiceDuel`: two players roll at the same time (two
//! `dice.DiceRoll` steps, fan-out) and `dice.DiceJudge` (fan-in) names the
//! winner, `{"winner": ..., "rolls": [a, b]}`. The binary has the whole kser
//! command line, so it is the worker and the client at once:
//!
//! ```text
//! cargo run --example dice -- migrate
//! cargo run --example dice -- worker
//! cargo run --example dice -- send dice.DiceRoll --params '{"sides": 20}'
//! cargo run --example dice -- send dice.DiceLaunch
//! cargo run --example dice -- send dice.DiceDuel
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
    /// Who rolls: the roll is also returned under this name, so a judge
    /// forwarded several rolls tells them apart.
    #[serde(default)]
    player: Option<String>,
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
        let mut result = TaskResult::ok()
            .with_stdout(format!("You made a {roll}"))
            .with_value("roll", roll)
            .with_value("rolls", rolls);
        if let Some(player) = params.player {
            result = result.with_value(player, roll);
        }
        Ok(result)
    }
}

/// Parameters of a judgement: the players, in order.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct JudgeParams {
    players: Vec<String>,
}

/// Reads each player's roll in the forwarded result and names the winner.
struct DiceJudge;

impl Task for DiceJudge {
    const ENTRYPOINT: &'static str = "dice.DiceJudge";
    const DESCRIPTION: &'static str = "Names the player who rolled highest";
    type Params = JudgeParams;

    async fn run(&self, ctx: &TaskContext, params: JudgeParams) -> Result<TaskResult, TaskError> {
        let retval = ctx.forwarded.as_ref().map(|r| &r.retval);
        let mut rolls = Vec::with_capacity(params.players.len());
        for player in &params.players {
            let roll = retval
                .and_then(|retval| retval.get(player))
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| TaskError::fatal(format!("no roll from {player}")))?;
            rolls.push(roll);
        }
        let best = rolls.iter().copied().max().unwrap_or(0);
        let winners: Vec<&String> = params
            .players
            .iter()
            .zip(&rolls)
            .filter(|(_, roll)| **roll == best)
            .map(|(player, _)| player)
            .collect();
        let (winner, stdout) = match winners.as_slice() {
            [one] => (json!(one), format!("{one} wins with a {best}")),
            _ => (json!(null), format!("A tie at {best}")),
        };
        Ok(TaskResult::ok()
            .with_stdout(stdout)
            .with_value("winner", winner)
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

/// Parameters of a duel; `{}` is valid.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DuelParams {
    /// How many faces each die has.
    #[serde(default = "six")]
    sides: u32,
}

/// Two players roll at once; the judge waits for both.
struct DiceDuel;

impl Operation for DiceDuel {
    const ENTRYPOINT: &'static str = "dice.DiceDuel";
    const DESCRIPTION: &'static str = "Two players roll at once, a judge names the winner";
    type Params = DuelParams;

    fn build(&self, params: &DuelParams) -> Result<Vec<Step>, TaskError> {
        let roll = |player: &str| {
            Step::new(
                DiceRoll::ENTRYPOINT,
                json!({ "sides": params.sides, "player": player }),
            )
            .named(player)
        };
        Ok(vec![
            roll("player1"),
            roll("player2"),
            Step::new(
                DiceJudge::ENTRYPOINT,
                json!({ "players": ["player1", "player2"] }),
            )
            .named("judge")
            .after(["player1", "player2"]),
        ])
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    let registered = registry
        .register(DiceRoll)
        .and_then(|r| r.register(DiceJudge))
        .and_then(|r| r.register_operation(DiceLaunch))
        .and_then(|r| r.register_operation(DiceDuel));
    if let Err(err) = registered {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    kser::cli::run(registry)
}
