//! `prune`: retention from the command line. What goes and what stays is
//! [`Store::prune`]'s to decide; this parses the flags and prints the
//! counts per table.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::output;
use crate::store::{DEFAULT_PRUNE_BATCH, PruneRequest, Pruned, Store, TaskStatus};

/// The shortest retention: less is more likely a slip than a wish.
pub(super) const MIN_RETENTION: Duration = Duration::from_secs(60);
/// The longest retention (100 years).
pub(super) const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 86_400);

#[derive(Debug, Args)]
pub(super) struct PruneArgs {
    /// Remove finished work whose last change is older than this (1m to
    /// 100 years, with a unit: 30d, 12h, 90m, 2w).
    #[arg(long, value_name = "AGE", value_parser = retention)]
    older_than: Duration,
    /// Only tasks and operations in these finished states, comma-separated
    /// (SUCCESS, FAILED, CANCELLED, COMPENSATED); all of them by default.
    #[arg(long, value_delimiter = ',', value_parser = finished_status)]
    status: Vec<TaskStatus>,
    /// Also remove the dead letters kept in Postgres (`kser.dead_letters`,
    /// those the dead-letter topic refused) kept before the cutoff. Without
    /// it they stay: nothing records whether one was replayed.
    #[arg(long)]
    dead_letters: bool,
    /// Rows read per statement (100 to 100000); each is its own short
    /// transaction.
    #[arg(long, default_value_t = DEFAULT_PRUNE_BATCH, value_parser = super::values::count::<i64>(100, 100_000))]
    batch_size: i64,
    /// Count what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A retention age: a duration with a unit, from [`MIN_RETENTION`] to
/// [`MAX_RETENTION`]. A bare number is refused, since `30` could as well
/// mean days as seconds.
pub(super) fn retention(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.parse::<f64>().is_ok() {
        return Err(format!(
            "'{trimmed}' has no unit: write e.g. 30d, 12h or 90m"
        ));
    }
    super::values::duration(MIN_RETENTION, MAX_RETENTION)(trimmed)
}

/// A state `prune` may remove.
fn finished_status(text: &str) -> Result<TaskStatus, String> {
    let status: TaskStatus = text.trim().parse()?;
    if !status.is_final() {
        return Err(format!(
            "{status} is not a finished state; prune removes only SUCCESS, FAILED or CANCELLED work"
        ));
    }
    Ok(status)
}

pub(super) async fn run(args: PruneArgs, store: &Store) -> anyhow::Result<ExitCode> {
    let request = PruneRequest {
        older_than: args.older_than,
        statuses: args.status,
        dead_letters: args.dead_letters,
        batch_size: args.batch_size,
        dry_run: args.dry_run,
    };
    let Some(pruned) = store.prune(&request).await? else {
        bail!(
            "another session is pruning this database (a `kser prune`, or a worker with --retention); try again when it is done"
        );
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&pruned)?);
    } else {
        outln!("{}", table(&pruned));
    }
    Ok(ExitCode::SUCCESS)
}

/// Counts per table, and what was left alone on purpose.
fn table(pruned: &Pruned) -> String {
    let verb = if pruned.dry_run {
        "WOULD REMOVE"
    } else {
        "REMOVED"
    };
    let mut table = output::new_table(&["TABLE", verb, "WHAT"]);
    let rows = [
        (
            "kser.operations",
            pruned.operations.to_string(),
            "finished operations",
        ),
        (
            "kser.tasks",
            (pruned.tasks + pruned.steps).to_string(),
            "finished standalone tasks, and the steps of those operations",
        ),
        (
            "kser.task_attempts",
            pruned.task_attempts.to_string(),
            "earlier attempts of those tasks",
        ),
        (
            "kser.outbox",
            "0".to_owned(),
            "kept: it holds only messages not yet published",
        ),
    ];
    for (name, count, what) in rows {
        output::add_row(&mut table, vec![name.to_owned(), count, what.to_owned()]);
    }
    let (count, what) = match pruned.dead_letters {
        Some(count) => (count.to_string(), "kept dead letters"),
        None => ("0".to_owned(), "kept: pass --dead-letters to remove them"),
    };
    output::add_row(
        &mut table,
        vec!["kser.dead_letters".to_owned(), count, what.to_owned()],
    );
    format!(
        "{}last changed before {} ({} of them steps of operations)\n{table}",
        if pruned.dry_run { "dry run: " } else { "" },
        pruned
            .cutoff
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        pruned.steps
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_needs_a_unit_and_a_sane_range() {
        assert_eq!(retention("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(retention("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(retention("90m"), Ok(Duration::from_secs(90 * 60)));
        for (bad, says) in [
            ("30", "has no unit"),
            ("-1d", "not a duration"),
            ("thirty days", "not a duration"),
            ("10s", "out of range"),
            ("1000y", "out of range"),
            ("", "not a duration"),
        ] {
            let err = retention(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn only_finished_states_are_accepted() {
        assert_eq!(finished_status("failed"), Ok(TaskStatus::Failed));
        let err = finished_status("RUNNING").expect_err("running");
        assert!(err.contains("not a finished state"), "{err}");
        assert!(finished_status("DONE").is_err());
    }
}
