//! The fleet's rules shared by the command line and the web console: which
//! controls make sense for the workers registered in `kser.workers`.

use std::collections::BTreeSet;

use anyhow::bail;
use serde_json::Value;

use crate::registry::Registry;
use crate::report::printable;
use crate::store::WorkerRow;

/// Refuses to drain a worker that is not running, naming those that are.
pub(crate) fn check_drain(worker: &str, rows: &[WorkerRow]) -> anyhow::Result<()> {
    let live: Vec<&WorkerRow> = rows.iter().filter(|w| w.is_live()).collect();
    if !live.iter().any(|w| w.id == worker) {
        let state = rows
            .iter()
            .find(|w| w.id == worker)
            .map(|w| w.state.as_str());
        let known = names(live.iter().map(|w| w.id.as_str()));
        match state {
            Some(state) => bail!(
                "worker '{}' is {state}, not running; running workers: {known}",
                printable(worker)
            ),
            None => bail!(
                "unknown worker '{}'; running workers: {known}",
                printable(worker)
            ),
        }
    }
    Ok(())
}

/// Refuses a control aimed at a worker no one has registered, or at an
/// entrypoint the target workers (or, for the whole fleet, this binary) do
/// not run as a task, naming the known ones.
pub(crate) fn check_target(
    worker: Option<&str>,
    entrypoint: Option<&str>,
    rows: &[WorkerRow],
    registry: &Registry,
) -> anyhow::Result<()> {
    let target: Vec<&WorkerRow> = match worker {
        Some(id) => {
            let found: Vec<_> = rows.iter().filter(|w| w.id == id).collect();
            if found.is_empty() {
                bail!(
                    "unknown worker '{}'; known workers: {}",
                    printable(id),
                    names(rows.iter().map(|w| w.id.as_str()))
                );
            }
            found
        }
        None => rows.iter().collect(),
    };
    if let Some(name) = entrypoint {
        let mut known: BTreeSet<&str> = target.iter().flat_map(|w| w.task_entrypoints()).collect();
        if worker.is_none() {
            known.extend(
                registry
                    .entrypoints()
                    .filter(|e| e.kind != "operation")
                    .map(|e| e.name),
            );
        }
        if !known.contains(name) {
            let operation = target.iter().any(|w| {
                w.entrypoints.as_array().into_iter().flatten().any(|e| {
                    e.get("name").and_then(Value::as_str) == Some(name)
                        && e.get("kind").and_then(Value::as_str) == Some("operation")
                })
            }) || registry
                .entrypoints()
                .any(|e| e.name == name && e.kind == "operation");
            let hint = if operation {
                " (it is an operation: pause the entrypoints of its steps)"
            } else {
                ""
            };
            bail!(
                "unknown entrypoint '{}'{hint}; {} task entrypoints: {}",
                printable(name),
                if worker.is_some() {
                    "the worker's"
                } else {
                    "known"
                },
                names(known.into_iter())
            );
        }
    }
    Ok(())
}

/// Names for an error message, printable, or `(none)`.
pub(crate) fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| printable(n).into_owned()).collect();
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}
