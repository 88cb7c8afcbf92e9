//! Periodic retention (`worker --retention 30d`): a task of its own that
//! prunes old finished work ([`Store::prune`]) once at start and then every
//! [`Retention::every`], on a connection outside the pool, so the hot path
//! never waits for it.
//!
//! A fleet prunes once at a time: [`Store::prune`] takes a Postgres advisory
//! lock and a worker that finds it taken skips that round. A failure is
//! logged and tried again after a backoff; it never stops the worker.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{PruneRequest, Store};

/// How often a worker prunes by default.
pub const DEFAULT_RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// The first wait after a failed round; doubled after each failure up to
/// [`Retention::every`].
const RETRY_FIRST: Duration = Duration::from_secs(30);

/// What a worker prunes, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Finished work whose last change is older than this goes.
    pub older_than: Duration,
    /// Time between two rounds.
    pub every: Duration,
}

impl Retention {
    /// Prune work older than `older_than`, hourly.
    pub fn older_than(older_than: Duration) -> Self {
        Self {
            older_than,
            every: DEFAULT_RETENTION_EVERY,
        }
    }
}

/// Prunes until `stop` is cancelled.
pub(super) async fn run(store: Store, retention: Retention, stop: CancellationToken) {
    let request = PruneRequest::older_than(retention.older_than);
    let every = retention.every.max(Duration::from_secs(1));
    let mut retry = RETRY_FIRST.min(every);
    loop {
        let wait = tokio::select! {
            () = stop.cancelled() => return,
            pruned = store.prune(&request) => match pruned {
                Ok(Some(pruned)) => {
                    tracing::info!(
                        older_than = %humantime::format_duration(retention.older_than),
                        cutoff = %pruned.cutoff,
                        tasks = pruned.tasks,
                        operations = pruned.operations,
                        steps = pruned.steps,
                        task_attempts = pruned.task_attempts,
                        "pruned old finished work"
                    );
                    retry = RETRY_FIRST.min(every);
                    every
                }
                Ok(None) => {
                    tracing::debug!("another session is pruning; skipping this round");
                    every
                }
                Err(err) => {
                    let wait = retry;
                    tracing::warn!(
                        error = %err,
                        retry_in_s = wait.as_secs_f64(),
                        "pruning failed; the worker goes on and tries again"
                    );
                    retry = (retry * 2).min(every);
                    wait
                }
            },
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
