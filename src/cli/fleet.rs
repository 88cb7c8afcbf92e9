//! `kser workers` and `kser control`: see the fleet and steer it. Controls
//! are rows of `kser.controls`, which every worker reads about once a
//! second; they stay in force until lifted, so a worker started later obeys
//! them too.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::output::{add_row, new_table, printable};
use crate::fleet::{check_drain, check_target, names};
use crate::registry::Registry;
use crate::store::{ControlAction, PoolRow, Store, WorkerRow};

#[derive(Debug, Args)]
pub(super) struct ControlArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Hold back new tasks: of one entrypoint, or every one; on one worker,
    /// or every worker (also those started later). Their records wait with
    /// their offsets held; running tasks finish.
    Pause(Scope),
    /// Lift the pauses within a scope (all of them without flags).
    Resume(Scope),
    /// Ask a worker to finish its running tasks, leave its group and exit 0;
    /// its partitions go to the other workers of the group.
    Drain {
        /// The worker's id, as `kser workers` shows it.
        #[arg(long)]
        worker: String,
    },
    /// Send a custom event to the tasks that handle it (`Task::EVENTS`),
    /// on the running workers (or one), and report who handled it. Exits
    /// 1 if a handler failed, 2 if not every worker answered in --wait.
    Event {
        /// The event's name, one a task declares.
        name: String,
        /// Its parameters, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        #[command(flatten)]
        scope: Scope,
        /// How long to wait for the workers' answers (0: do not wait).
        #[arg(long, default_value = "10s", value_parser = super::values::duration(std::time::Duration::ZERO, std::time::Duration::from_secs(3600)))]
        wait: std::time::Duration,
    },
}

#[derive(Debug, Args)]
struct Scope {
    /// Only this worker (its id, as `kser workers` shows it).
    #[arg(long)]
    worker: Option<String>,
    /// Only this entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
}

/// `kser workers`.
pub(super) async fn workers(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let rows = store.workers().await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        outln!("no workers have registered (a worker records itself when it starts)");
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{}", workers_table(&rows));
    for line in hints(&rows) {
        outln!("{line}");
    }
    let controls = store.controls().await?;
    for control in controls {
        outln!(
            "in force: {} {} on {}",
            control.action,
            control
                .entrypoint
                .as_deref()
                .map_or("every entrypoint".into(), printable),
            control
                .worker_id
                .as_deref()
                .map_or("every worker".into(), printable),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kser control`.
pub(super) async fn control(
    args: ControlArgs,
    store: &Store,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let rows = store.workers().await?;
    match args.action {
        Action::Pause(scope) => {
            check_scope(&scope, &rows, registry)?;
            let added = store
                .add_control(
                    ControlAction::Pause,
                    scope.worker.as_deref(),
                    scope.entrypoint.as_deref(),
                )
                .await?;
            let what = describe(&scope);
            if added {
                outln!("paused {what}; running workers obey within 2s, workers started later too");
            } else {
                outln!("{what} was paused already");
            }
        }
        Action::Resume(scope) => {
            check_scope(&scope, &rows, registry)?;
            let lifted = store
                .remove_pauses(scope.worker.as_deref(), scope.entrypoint.as_deref())
                .await?;
            let what = describe(&scope);
            if lifted > 0 {
                outln!("resumed {what} ({lifted} pause(s) lifted); workers obey within 2s");
            } else {
                outln!("no pause of {what} was in force");
            }
            let remaining: Vec<_> = store
                .controls()
                .await?
                .into_iter()
                .filter(|c| c.action == "pause")
                .collect();
            for pause in remaining {
                outln!(
                    "still paused: {} on {}",
                    pause
                        .entrypoint
                        .as_deref()
                        .map_or("every entrypoint".into(), printable),
                    pause
                        .worker_id
                        .as_deref()
                        .map_or("every worker".into(), printable),
                );
            }
        }
        Action::Drain { worker } => {
            check_drain(&worker, &rows)?;
            store
                .add_control(ControlAction::Drain, Some(&worker), None)
                .await?;
            outln!(
                "draining worker {}: it finishes its running tasks, leaves its group and exits",
                printable(&worker)
            );
        }
        Action::Event {
            name,
            params,
            scope,
            wait,
        } => return event(store, registry, &rows, &name, &params, &scope, wait).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kser control event`: checks that some task handles the event where it
/// is sent, records it, and waits for the workers' answers.
async fn event(
    store: &Store,
    registry: &Registry,
    rows: &[WorkerRow],
    name: &str,
    params: &str,
    scope: &Scope,
    wait: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let params = super::send::parse_object(params).context("--params")?;
    let live: Vec<&WorkerRow> = rows.iter().filter(|w| w.is_live()).collect();
    let targets: Vec<&WorkerRow> = match &scope.worker {
        Some(id) => {
            let found: Vec<_> = live.iter().copied().filter(|w| &w.id == id).collect();
            if found.is_empty() {
                bail!(
                    "unknown or stopped worker '{}'; running workers: {}",
                    printable(id),
                    names(live.iter().map(|w| w.id.as_str()))
                );
            }
            found
        }
        None => live.clone(),
    };
    // Who handles what: the running workers' tasks, and this binary's.
    let mut handlers: BTreeSet<(String, String)> = targets
        .iter()
        .flat_map(|w| w.events())
        .map(|(entrypoint, event)| (event.to_owned(), entrypoint.to_owned()))
        .collect();
    if scope.worker.is_none() {
        for entry in registry.entrypoints() {
            for event in registry.events_of(entry.name) {
                handlers.insert(((*event).to_owned(), entry.name.to_owned()));
            }
        }
    }
    // The entrypoint is in scope and handles the event.
    let handles = |entrypoint: &str, event: &str| {
        event == name && scope.entrypoint.as_deref().is_none_or(|s| s == entrypoint)
    };
    if !handlers.iter().any(|(e, t)| handles(t, e)) {
        let known: Vec<String> = handlers.iter().map(|(e, t)| format!("{e} ({t})")).collect();
        let known = names(known.iter().map(String::as_str));
        match &scope.entrypoint {
            Some(entrypoint) => bail!(
                "{} handles no event '{}' here; events handled: {known}",
                printable(entrypoint),
                printable(name)
            ),
            None => bail!(
                "no task handles event '{}' here; events handled: {known}",
                printable(name)
            ),
        }
    }
    let id = store
        .add_event(
            name,
            &Value::Object(params),
            scope.worker.as_deref(),
            scope.entrypoint.as_deref(),
        )
        .await?;
    // The running workers with a task that handles it.
    let expected: BTreeSet<&str> = targets
        .iter()
        .filter(|w| w.events().any(|(t, e)| handles(t, e)))
        .map(|w| w.id.as_str())
        .collect();
    outln!(
        "event {id} '{}' sent to {}; {} running worker(s) handle it",
        printable(name),
        describe(scope),
        expected.len()
    );
    let deadline = tokio::time::Instant::now() + wait;
    let mut deliveries = store.deliveries(id).await?;
    while !wait.is_zero() && tokio::time::Instant::now() < deadline {
        let answered: BTreeSet<&str> = deliveries.iter().map(|d| d.worker_id.as_str()).collect();
        if expected.iter().all(|w| answered.contains(w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        deliveries = store.deliveries(id).await?;
    }
    if wait.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = new_table(&["worker", "entrypoint", "outcome"]);
    for delivery in &deliveries {
        let outcome = delivery.error.as_deref().map_or("handled".to_owned(), |e| {
            format!("failed: {}", printable(e))
        });
        add_row(
            &mut table,
            vec![
                printable(&delivery.worker_id).into_owned(),
                printable(&delivery.entrypoint).into_owned(),
                outcome,
            ],
        );
    }
    if !deliveries.is_empty() {
        outln!("{table}");
    }
    let answered: BTreeSet<&str> = deliveries.iter().map(|d| d.worker_id.as_str()).collect();
    let silent: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|w| !answered.contains(w))
        .collect();
    if deliveries.iter().any(|d| d.error.is_some()) {
        return Ok(ExitCode::from(1));
    }
    if !silent.is_empty() {
        outln!(
            "no answer within {} from: {}",
            humantime::format_duration(wait),
            silent.join(", ")
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a worker or entrypoint no worker has registered, naming the
/// known ones.
fn check_scope(scope: &Scope, rows: &[WorkerRow], registry: &Registry) -> anyhow::Result<()> {
    check_target(
        scope.worker.as_deref(),
        scope.entrypoint.as_deref(),
        rows,
        registry,
    )
}

fn describe(scope: &Scope) -> String {
    format!(
        "{} on {}",
        scope
            .entrypoint
            .as_deref()
            .map_or("every entrypoint".into(), |e| format!(
                "entrypoint {}",
                printable(e)
            )),
        scope
            .worker
            .as_deref()
            .map_or("every worker".into(), |w| format!(
                "worker {}",
                printable(w)
            )),
    )
}

/// `kser pools`: each pool's capacity, units in use, and tasks waiting.
pub(super) async fn pools(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    let rows = store.pools().await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        outln!(
            "no pools: a worker records its tasks' MAX_CONCURRENCY and ACQUIRES pools when it starts"
        );
    } else {
        outln!("{}", pools_table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

fn pools_table(rows: &[PoolRow]) -> String {
    let mut table = new_table(&[
        "POOL",
        "CAPACITY",
        "IN USE",
        "LEASES",
        "WAITING",
        "OLDEST WAIT",
    ]);
    for row in rows {
        add_row(
            &mut table,
            vec![
                printable(&row.name).into_owned(),
                row.capacity.to_string(),
                row.in_use.to_string(),
                row.leases.to_string(),
                row.waiting.to_string(),
                row.oldest_wait_s
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s")),
            ],
        );
    }
    table.to_string()
}

/// The fleet for people: one row per worker.
fn workers_table(rows: &[WorkerRow]) -> String {
    let mut table = new_table(&[
        "WORKER",
        "GROUP",
        "STATE",
        "PAUSED",
        "PARTITIONS",
        "IN FLIGHT",
        "DONE",
        "HEARTBEAT",
        "STARTED",
        "VERSION",
    ]);
    let now = chrono::Utc::now();
    for row in rows {
        let done = ["succeeded", "failed"]
            .iter()
            .filter_map(|k| row.counters.get(*k).and_then(Value::as_u64))
            .sum::<u64>();
        add_row(
            &mut table,
            vec![
                row.id.clone(),
                row.group.clone(),
                row.state.clone(),
                if row.paused.is_empty() {
                    "-".into()
                } else {
                    row.paused.join(",")
                },
                partitions(&row.assigned),
                row.in_flight.to_string(),
                done.to_string(),
                ago(now - row.heartbeat_at),
                row.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                row.version.clone(),
            ],
        );
    }
    table.to_string()
}

/// `topic[0,1,2]`, for the table.
fn partitions(assigned: &Value) -> String {
    let Some(topics) = assigned.as_object().filter(|t| !t.is_empty()) else {
        return "-".into();
    };
    topics
        .iter()
        .map(|(topic, partitions)| {
            let list: Vec<String> = partitions
                .as_array()
                .into_iter()
                .flatten()
                .map(Value::to_string)
                .collect();
            format!("{topic}[{}]", list.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ago(elapsed: chrono::TimeDelta) -> String {
    let secs = elapsed.num_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// The scaling hint of each group, from its live workers' beats.
fn hints(rows: &[WorkerRow]) -> Vec<String> {
    let mut groups: Vec<&str> = rows.iter().map(|w| w.group.as_str()).collect();
    groups.dedup();
    let mut lines = Vec::new();
    for group in groups {
        let live: Vec<&WorkerRow> = rows
            .iter()
            .filter(|w| w.group == group && w.is_live())
            .collect();
        let Some(desired) = live.iter().filter_map(|w| w.desired).max() else {
            continue;
        };
        let lag: i64 = live.iter().filter_map(|w| w.lag).sum();
        let rate: f64 = live.iter().map(|w| w.throughput).sum();
        lines.push(format!(
            "group {}: {} worker(s) running, {desired} desired (lag {lag} records, {rate:.1} tasks/s)",
            printable(group),
            live.len()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_read_as_topic_partition_lists() {
        let assigned = serde_json::json!({"jobs": [0, 2], "other": [1]});
        assert_eq!(partitions(&assigned), "jobs[0,2] other[1]");
        assert_eq!(partitions(&serde_json::json!({})), "-");
    }
}
