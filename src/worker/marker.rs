//! The marker: writes RUNNING the tasks still running after
//! `--running-after`, so `status` shows long tasks as RUNNING while a task
//! that ends sooner is written once, final.

use super::decode::{Decoded, decode};
use super::shared::{Mark, Shared};
use super::start::Running;
use crate::store::NewTask;
use std::sync::Arc;
use std::time::Duration;

impl Shared {
    /// Writes RUNNING the tasks still running past their mark time, every
    /// tick until the worker stops: `status` then shows long tasks as
    /// RUNNING, while a task that ends sooner is written once, final.
    pub(super) async fn marker(self: Arc<Self>) {
        let tick =
            (self.running_after / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = tokio::time::Instant::now();
            let due: Vec<Mark> = self
                .lock_in_flight()
                .values_mut()
                .filter(|task| task.mark.as_ref().is_some_and(|mark| mark.at <= now))
                .filter_map(|task| task.mark.take())
                .collect();
            let due: Vec<NewTask> = due
                .into_iter()
                .filter_map(|mark| self.marked_row(mark))
                .collect();
            for rows in due.chunks(self.batch_size) {
                let Some(marked) = self
                    .retry_db("record running tasks", || self.store.mark_running(rows))
                    .await
                else {
                    return;
                };
                match marked {
                    Ok(marked) if marked.len() < rows.len() => {
                        for row in rows.iter().filter(|row| !marked.contains(&row.uuid)) {
                            tracing::info!(task.uuid = %row.uuid, attempt = row.attempts, "the task was started again elsewhere or is final; this attempt's outcome will not be recorded");
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "could not record running tasks; they are recorded when they end")
                    }
                }
            }
        }
    }

    /// The RUNNING row of a task whose mark is due, from its record. (A
    /// task retried in place runs a message of its own, but its row exists
    /// by then, written PENDING with the retry, and the RUNNING upsert takes
    /// no parameters or metadata from a row it updates.)
    fn marked_row(&self, mark: Mark) -> Option<NewTask> {
        let Decoded::Message(message) =
            decode(mark.original.payload.as_deref(), self.producer.secretbox())
        else {
            return None;
        };
        let running = Running {
            position: &mark.position,
            enqueued_at: mark.enqueued_at,
            attempts: mark.attempts,
            started_at: mark.started_at,
        };
        Some(self.running_row_of(message, &running))
    }
}
