//! `schedule`: add, list, remove, pause and resume recurring messages. The
//! running workers fire them (see `worker/schedules.rs`); this only edits
//! `kser.schedules`.

use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};

use super::output;
use crate::registry::Registry;
use crate::schedule::{self, Missed};
use crate::store::{NewSchedule, ScheduleRow, Store};

#[derive(Debug, Args)]
pub(super) struct ScheduleArgs {
    #[command(subcommand)]
    command: ScheduleCommand,
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Send a message on every tick of a cron expression. A running worker
    /// fires each tick once across the fleet, as a PENDING task whose
    /// metadata names the schedule and tick.
    Add {
        /// A unique name for the schedule.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        name: String,
        /// When: five fields (minute hour day month weekday, e.g. "*/5 * * * *"),
        /// or six with seconds first (e.g. "*/10 * * * * *"), in UTC.
        #[arg(long, value_parser = cron)]
        cron: String,
        /// The entrypoint to run, e.g. dice.DiceRoll: one this binary
        /// registers (the plain `kser`, which registers none, takes any).
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        entrypoint: String,
        /// Parameters as a JSON object, the same for every tick.
        #[arg(long)]
        params: Option<String>,
        /// Topic to publish to.
        #[arg(long, env = "KSER_TOPIC", default_value = "kser", value_parser = super::values::topic)]
        topic: String,
        /// Ticks missed while no worker ran (older than 10s when a worker
        /// comes): skip drops them, once fires one catch-up at once.
        #[arg(long, value_enum, default_value = "skip")]
        missed: Missed,
    },
    /// List the schedules and their next tick.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule; the tasks it sent stay.
    Remove { name: String },
    /// Stop firing a schedule until `schedule resume`.
    Pause { name: String },
    /// Fire a paused schedule again from its next tick; the ticks of the
    /// pause are not fired.
    Resume { name: String },
}

/// A cron expression that parses and fires at least once more.
fn cron(text: &str) -> Result<String, String> {
    schedule::parse(text).map_err(|err| err.to_string())?;
    Ok(text.trim().to_owned())
}

/// What can be refused before the database is touched: an entrypoint
/// `schedule add` names that the binary does not register.
pub(super) fn check(args: &ScheduleArgs, registry: &Registry) -> anyhow::Result<()> {
    match &args.command {
        ScheduleCommand::Add { entrypoint, .. } => check_entrypoint(registry, entrypoint),
        _ => Ok(()),
    }
}

pub(super) async fn run(args: ScheduleArgs, store: &Store) -> anyhow::Result<ExitCode> {
    match args.command {
        ScheduleCommand::Add {
            name,
            cron,
            entrypoint,
            params,
            topic,
            missed,
        } => {
            let params = match params {
                Some(text) => super::send::parse_object(&text).context("--params")?,
                None => Default::default(),
            };
            let next_at = first_tick(&cron)?;
            store
                .add_schedule(&NewSchedule {
                    name: name.clone(),
                    cron,
                    entrypoint,
                    params: serde_json::Value::Object(params),
                    topic,
                    missed: missed.as_str().to_owned(),
                    next_at,
                })
                .await?;
            outln!("added schedule {name}; first tick {}", time(next_at));
        }
        ScheduleCommand::List { json } => {
            let schedules = store.list_schedules().await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&schedules)?);
            } else {
                outln!("{}", table(&schedules));
            }
        }
        ScheduleCommand::Remove { name } => {
            store.remove_schedule(&name).await?;
            outln!("removed schedule {name}");
        }
        ScheduleCommand::Pause { name } => {
            store.set_schedule_paused(&name, None).await?;
            outln!("paused schedule {name}");
        }
        ScheduleCommand::Resume { name } => {
            let row = store.schedule_named(&name).await?;
            let next_at = first_tick(&row.cron)?;
            store.set_schedule_paused(&name, Some(next_at)).await?;
            outln!("resumed schedule {name}; next tick {}", time(next_at));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses an entrypoint the binary does not register, naming those it
/// does: a typo would otherwise fail only at each tick, as FAILED tasks.
/// The plain `kser` binary registers no task, so it cannot tell and takes
/// any name (a schedule for another binary's, or Python kser's, tasks).
fn check_entrypoint(registry: &Registry, entrypoint: &str) -> anyhow::Result<()> {
    if registry.is_empty() {
        return Ok(());
    }
    registry.check(entrypoint).map_err(|err| {
        anyhow::anyhow!(
            "{}; add the schedule with the binary that registers it, or with the plain kser \
             binary, which checks no name",
            output::printable(&err.to_string())
        )
    })
}

/// The first tick of `expression` after now.
fn first_tick(expression: &str) -> anyhow::Result<chrono::DateTime<Utc>> {
    let cron = schedule::parse(expression)?;
    schedule::next_tick(&cron, Utc::now())
        .with_context(|| format!("the cron expression {expression:?} has no tick left"))
}

fn time(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn table(schedules: &[ScheduleRow]) -> String {
    let mut table = output::new_table(&[
        "NAME",
        "CRON",
        "ENTRYPOINT",
        "TOPIC",
        "MISSED",
        "STATE",
        "NEXT",
        "LAST FIRED",
    ]);
    for s in schedules {
        output::add_row(
            &mut table,
            vec![
                output::printable(&s.name).into_owned(),
                s.cron.clone(),
                output::printable(&s.entrypoint).into_owned(),
                s.topic.clone(),
                s.missed.clone(),
                if s.paused { "paused" } else { "active" }.to_owned(),
                time(s.next_at),
                s.last_fired_at.map(time).unwrap_or_else(|| "-".to_owned()),
            ],
        );
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_flags_are_checked() {
        assert_eq!(cron(" */5 * * * * ").as_deref(), Ok("*/5 * * * *"));
        let err = cron("*/5 * *").expect_err("three fields");
        assert!(err.contains("bad cron expression"), "{err}");
    }
}
