//! Stage 3, finish: writes final states in batches, then releases their
//! offsets and lanes and hands failures to the dead-letter topic.

use super::dead_letter::DeadLetter;
use super::pipeline::{Finished, Outcome};
use super::shared::{Counters, Shared, failure_kind, unstorable};
use super::telemetry;
use crate::store::{FinishedOperation, NewTask, Retry, StoreError, TaskRow, TaskStatus};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;

/// How many batches of outcomes are written at once, each on a connection
/// of its own. One Postgres backend runs one statement on one core: with a
/// single writer, the final writes of a fast worker queue behind each other
/// while the machine has cores to spare.
pub(super) const WRITERS: usize = 2;

/// The most outcomes a writer takes at once (fewer if `batch_size` is
/// smaller). Larger statements were no faster, and their buffers (about
/// 0.4 MB of bound arrays for 1,000 rows, copied again by the driver) made
/// glibc raise its mmap threshold and keep them in the heap: draining a
/// million records, 1,000 rows a write peaked at 65.7 MiB of RSS, 256 at
/// 51.8 MiB (500: 55.2 MiB), at the same rate.
const WRITE_ROWS: usize = 256;

impl Shared {
    /// Stage 3: writes final states in batches, [`WRITERS`] at a time,
    /// then releases their offsets. Each writer takes what has arrived
    /// (up to [`WRITE_ROWS`]) when it is free.
    pub(super) async fn finisher(self: Arc<Self>, finish_rx: mpsc::Receiver<Finished>) {
        let finish_rx = tokio::sync::Mutex::new(finish_rx);
        futures::future::join_all((0..WRITERS).map(|_| self.write_batches(&finish_rx))).await;
    }

    /// One writer of the finisher: batches until the channel closes (or
    /// the shutdown deadline passes).
    async fn write_batches(
        self: &Arc<Self>,
        finish_rx: &tokio::sync::Mutex<mpsc::Receiver<Finished>>,
    ) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            let received = finish_rx
                .lock()
                .await
                .recv_many(&mut batch, self.batch_size.min(WRITE_ROWS))
                .await;
            if received == 0 {
                return;
            }
            let mut seen = HashSet::new();
            let mut by_kind: [(Outcome, Vec<NewTask>); 4] = [
                (Outcome::Ran, Vec::new()),
                (Outcome::RanNew, Vec::new()),
                (Outcome::Step, Vec::new()),
                (Outcome::Rejected, Vec::new()),
            ];
            let mut retries = Vec::new();
            let mut invalid = Vec::new();
            let mut positions = Vec::with_capacity(batch.len());
            let mut originals = HashMap::with_capacity(batch.len());
            let mut done_lanes = Vec::new();
            let mut committed = Vec::new();
            for Finished {
                position,
                row,
                kind,
                resend,
                original,
                lane,
            } in batch.drain(..)
            {
                done_lanes.extend(lane);
                // Only failures are dead-lettered; keep their records.
                if row.status == TaskStatus::Failed.as_str() || kind == Outcome::Retry {
                    originals
                        .entry(row.uuid.clone())
                        .or_insert_with(|| (position.clone(), original));
                }
                positions.push(position);
                // Two invalid records with one uuid: the first one wins.
                if !seen.insert(row.uuid.clone()) {
                    Counters::add(&self.counters.skipped, 1);
                } else if kind == Outcome::Committed {
                    committed.push(row);
                } else if kind == Outcome::Invalid {
                    invalid.push(row);
                } else if let Some(message) = resend {
                    retries.push(Retry {
                        row,
                        message: Some(message),
                    });
                } else if let Some((_, rows)) = by_kind.iter_mut().find(|(k, _)| *k == kind) {
                    rows.push(row);
                }
            }
            // A retry Postgres refuses is recorded as a final failure instead.
            let Some(unretried) = self.write_retries(&retries).await else {
                return;
            };
            for mut row in unretried {
                row.status = TaskStatus::Failed.as_str();
                row.next_attempt_at = None;
                let kind = Outcome::of_run(&row);
                if let Some((_, rows)) = by_kind.iter_mut().find(|(k, _)| *k == kind) {
                    rows.push(row);
                }
            }
            let mut finished_operations = Vec::new();
            for (kind, rows) in &by_kind {
                let Some(finished) = self.write_finished(rows, *kind).await else {
                    return;
                };
                finished_operations.extend(finished);
            }
            let Some(duplicates) = self.write_invalid(&invalid).await else {
                return;
            };
            if by_kind
                .iter()
                .any(|(kind, rows)| *kind == Outcome::Step && !rows.is_empty())
            {
                self.relay_wakeup.notify_one();
            }
            for operation in finished_operations {
                self.operation_finished(operation);
            }
            // FAILED messages go to the dead-letter topic, and their offsets
            // move only once it has them (steps excepted: `resume` runs those
            // again). The other offsets of the batch move now.
            let dead: Vec<DeadLetter> = by_kind
                .iter()
                .filter(|(kind, _)| *kind != Outcome::Step)
                .flat_map(|(_, rows)| rows)
                .chain(&invalid)
                .filter(|row| row.status == TaskStatus::Failed.as_str())
                .filter_map(|row| {
                    let (position, original) = originals.get(&row.uuid)?;
                    let error = duplicates.get(&row.uuid).cloned();
                    Some(DeadLetter {
                        position: position.clone(),
                        original: Arc::clone(original),
                        kind: failure_kind(row),
                        error: error.or_else(|| row.error.clone()).unwrap_or_default(),
                        attempts: row.attempts,
                        uuid: Some(row.uuid.clone()),
                        trace: row.trace.map(|trace| trace.as_parent()),
                    })
                })
                .collect();
            positions.retain(|position| {
                !dead.iter().any(|d| {
                    d.position.offset == position.offset
                        && d.position.partition == position.partition
                        && d.position.topic == position.topic
                })
            });
            self.dead_letter_later(dead);
            let rows = by_kind.iter().flat_map(|(_, rows)| rows).chain(&committed);
            let succeeded = rows
                .clone()
                .filter(|row| row.status == TaskStatus::Success.as_str())
                .count();
            Counters::add(&self.counters.succeeded, succeeded);
            Counters::add(&self.counters.failed, rows.clone().count() - succeeded);
            telemetry::finished(rows.clone());
            #[cfg(feature = "otel")]
            crate::otel::finished(rows.clone());
            if let Some(metrics) = &self.metrics_topic {
                metrics.finished(rows.clone());
            }
            Counters::add(&self.counters.failed, invalid.len() - duplicates.len());
            Counters::add(&self.counters.skipped, duplicates.len());
            {
                let mut in_flight = self.lock_in_flight();
                for row in rows.chain(retries.iter().map(|r| &r.row)) {
                    if let Some(task) = in_flight.remove(&row.uuid) {
                        positions.extend(task.copies);
                    }
                }
            }
            // Their outcomes are written: their room in the pools is free.
            self.release_leases(
                by_kind
                    .iter()
                    .flat_map(|(_, rows)| rows)
                    .chain(&committed)
                    .chain(retries.iter().map(|r| &r.row))
                    .map(|row| row.uuid.as_str()),
            )
            .await;
            self.release(&positions);
            for lane in done_lanes {
                self.lane_done(lane);
            }
        }
    }

    /// Records records that are not messages but name a uuid
    /// ([`Store::record_invalid`]), waiting out database outages. Returns,
    /// for each one left alone because its uuid belongs to a task in flight
    /// here or one that ran, runs or is final, the error its dead letter
    /// says; `None` when the shutdown deadline passed.
    pub(super) async fn write_invalid(&self, rows: &[NewTask]) -> Option<HashMap<String, String>> {
        let mut duplicates = HashMap::new();
        // Started since the record was read: its task's outcome is on its way.
        let rows: Vec<NewTask> = {
            let in_flight = self.lock_in_flight();
            rows.iter()
                .filter(|row| {
                    let running = in_flight.contains_key(&row.uuid);
                    if running {
                        let error = row.error.as_deref().unwrap_or_default();
                        duplicates.insert(
                            row.uuid.clone(),
                            super::start::duplicate_error(&row.uuid, "in flight", error),
                        );
                    }
                    !running
                })
                .cloned()
                .collect()
        };
        if rows.is_empty() {
            return Some(duplicates);
        }
        let isolated = self
            .write_isolating("record invalid messages", &rows, |rows| {
                self.store.record_invalid(rows)
            })
            .await?;
        let mut existing: Vec<TaskRow> = isolated.written.into_iter().flatten().collect();
        for (index, err) in isolated.refused {
            let mut stripped = rows[index].clone();
            unstorable(&mut stripped, &err);
            let single = std::slice::from_ref(&stripped);
            match self
                .retry_db("record an unstorable invalid message", || {
                    self.store.record_invalid(single)
                })
                .await?
            {
                Ok(left) => existing.extend(left),
                Err(err) => tracing::error!(
                    task.uuid = %stripped.uuid, error = %err,
                    "Postgres refused the invalid message's state; it is only in this log and its dead letter"
                ),
            }
        }
        for task in existing {
            let Some(row) = rows.iter().find(|row| row.uuid == task.uuid) else {
                continue;
            };
            // The same record read again (its dead letter was not written
            // before a restart): its own FAILED row, its own error.
            let redelivered = task.status == TaskStatus::Failed.as_str()
                && task.topic == row.topic
                && task.kafka_partition == row.kafka_partition
                && task.kafka_offset == row.kafka_offset;
            if redelivered {
                continue;
            }
            tracing::warn!(
                task.uuid = %task.uuid, status = %task.status,
                "an invalid record names an existing task; the task is left as it is and the record dead-lettered"
            );
            let error = row.error.as_deref().unwrap_or_default();
            duplicates.insert(
                task.uuid.clone(),
                super::start::duplicate_error(&task.uuid, &task.status, error),
            );
        }
        Some(duplicates)
    }

    /// Records failed attempts that will be retried, waiting out database
    /// outages. Returns the rows Postgres refused (to record as final
    /// failures), or `None` when the shutdown deadline passed.
    pub(super) async fn write_retries(&self, retries: &[Retry]) -> Option<Vec<NewTask>> {
        if retries.is_empty() {
            return Some(Vec::new());
        }
        let isolated = self
            .write_isolating("record retries", retries, |retries| {
                self.store.retry_tasks(retries)
            })
            .await?;
        let refused: Vec<NewTask> = isolated
            .refused
            .into_iter()
            .map(|(index, err)| {
                let row = &retries[index].row;
                tracing::warn!(task.uuid = %row.uuid, error = %err, "could not record the retry; the task fails");
                row.clone()
            })
            .collect();
        Counters::add(&self.counters.retried, retries.len() - refused.len());
        telemetry::retried(
            retries
                .iter()
                .map(|retry| &retry.row)
                .filter(|row| !refused.iter().any(|r| r.uuid == row.uuid)),
        );
        Some(refused)
    }

    /// Writes final rows, waiting out database outages. When Postgres
    /// refuses the batch for good, it is split until the rows at fault are
    /// found ([`write_isolating`](Self::write_isolating)); the others are
    /// written, and each refused row is stored FAILED without the offending
    /// values, saying why (or, if even that is refused, only logged).
    /// Returns the operations that finished, or `None` when the shutdown
    /// deadline passed before the write.
    pub(super) async fn write_finished(
        &self,
        rows: &[NewTask],
        kind: Outcome,
    ) -> Option<Vec<FinishedOperation>> {
        if rows.is_empty() {
            return Some(Vec::new());
        }
        let isolated = self
            .write_isolating("record finished tasks", rows, |rows| {
                self.write_outcomes(rows, kind)
            })
            .await?;
        let mut finished: Vec<FinishedOperation> = isolated.written.into_iter().flatten().collect();
        for (index, err) in isolated.refused {
            let row = &rows[index];
            let mut stripped = row.clone();
            unstorable(&mut stripped, &err);
            let single = std::slice::from_ref(&stripped);
            // A step still moves its operation along (to FAILED). A task
            // that ran stays fenced by its attempt: its stripped row never
            // overwrites a newer attempt started elsewhere meanwhile.
            let kind = match kind {
                Outcome::Step | Outcome::Ran => kind,
                Outcome::RanNew => Outcome::Ran,
                _ => Outcome::Rejected,
            };
            match self
                .retry_db("record an unstorable task", || {
                    self.write_outcomes(single, kind)
                })
                .await?
            {
                Ok(done) => {
                    finished.extend(done);
                    tracing::warn!(task.uuid = %row.uuid, error = %err, "stored the task FAILED without the values Postgres refused");
                }
                Err(err) => {
                    tracing::error!(task.uuid = %row.uuid, error = %err, "Postgres refused the task's state; it is only in this log");
                }
            }
        }
        Some(finished)
    }

    pub(super) async fn write_outcomes(
        &self,
        rows: &[NewTask],
        kind: Outcome,
    ) -> Result<Vec<FinishedOperation>, StoreError> {
        match kind {
            Outcome::Ran => self.store.complete_tasks(rows).await.map(|_| Vec::new()),
            Outcome::RanNew => self
                .store
                .complete_new_tasks(rows)
                .await
                .map(|_| Vec::new()),
            Outcome::Step => self.store.complete_steps(rows).await,
            Outcome::Rejected | Outcome::Retry => {
                self.store.finish_tasks(rows).await.map(|_| Vec::new())
            }
            Outcome::Invalid => self.store.record_invalid(rows).await.map(|_| Vec::new()),
            Outcome::Committed => Ok(Vec::new()),
        }
    }
}
