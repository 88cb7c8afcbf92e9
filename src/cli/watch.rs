//! `watch`: following a task or an operation until it ends.

use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::lookup::{Found, lookup};
use super::output;
use crate::store::{Store, TaskStatus};

/// One line saying where it stands, for `watch` when not on a terminal.
fn summary(found: &Found) -> String {
    match found {
        Found::Task(task, _) => match &task.error {
            Some(error) => format!("{} {}: {error}", task.status, task.entrypoint),
            None => format!("{} {}", task.status, task.entrypoint),
        },
        Found::Operation(op, tasks, _) => {
            let done = tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Success.as_str())
                .count();
            let mut line = format!(
                "{} {} {done}/{} steps done",
                op.status, op.entrypoint, op.steps
            );
            if let Some(current) = tasks
                .iter()
                .find(|t| t.status == TaskStatus::Running.as_str())
            {
                line.push_str(&format!(
                    ", step {} ({}) RUNNING",
                    current.position.unwrap_or(0) + 1,
                    current.entrypoint
                ));
            }
            if let Some(error) = &op.error {
                line.push_str(&format!(": {error}"));
            }
            line
        }
    }
}

/// `watch`'s exit code for FAILED or CANCELLED.
pub(super) const EXIT_FAILED: u8 = 1;
/// `watch`'s exit code for an error: clap's for bad arguments, too.
pub(super) const EXIT_ERROR: u8 = 2;
/// `watch`'s exit code when the timeout passes first, as timeout(1)'s.
pub(super) const EXIT_TIMEOUT: u8 = 124;

/// Follows `uuid` until it ends: redrawn in place on a terminal, one line per
/// change otherwise. Exit code 0 for SUCCESS, [`EXIT_FAILED`] for FAILED or
/// CANCELLED, [`EXIT_TIMEOUT`] when `timeout` passes first.
pub(super) async fn watch(
    store: &Store,
    uuid: &str,
    interval: Duration,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last = String::new();
    let mut drawn_lines = 0;
    loop {
        let found = lookup(store, uuid).await?;
        let text = match &found {
            Some(found) if terminal => output::details(found),
            Some(found) => summary(found),
            None => format!(
                "waiting for {} (not received by a worker yet)",
                output::printable(uuid)
            ),
        };
        if text != last {
            let mut out = std::io::stdout().lock();
            if terminal {
                // Move up over the previous drawing and clear it.
                if drawn_lines > 0 {
                    let _ = write!(out, "\x1b[{drawn_lines}A\x1b[J");
                }
                drawn_lines = text.trim_end().lines().count();
                let _ = writeln!(out, "{}", text.trim_end());
            } else {
                let _ = writeln!(
                    out,
                    "{} {} {}",
                    Utc::now().format("%H:%M:%S%.3f"),
                    output::printable(uuid),
                    output::printable(&text)
                );
            }
            let _ = out.flush();
            last = text;
        }
        if let Some(found) = &found {
            match found.status().parse::<TaskStatus>() {
                Ok(TaskStatus::Success) => return Ok(ExitCode::SUCCESS),
                Ok(status) if status.is_final() => return Ok(ExitCode::from(EXIT_FAILED)),
                _ => {}
            }
        }
        if timeout.is_some_and(|timeout| started.elapsed() >= timeout) {
            eprintln!("error: {} did not finish in time", output::printable(uuid));
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(interval).await;
    }
}
