//! What every stage shares: [`Shared`], the state of one worker (its
//! consumer, store, registry, counters and in-flight tasks), with the
//! helpers all stages use: waiting out the database (`retry_db`,
//! `write_isolating`), storing offsets (`release`), and the counters.

use super::consumer::ConsumerSpec;
use super::context::KserContext;
use super::offsets::{OffsetTracker, Position};
use super::ordering::Lane;
use super::ordering::Ordering;
use super::pipeline::Original;
use super::settings::DeadLetters;
use super::{metrics_topic, telemetry};
use crate::message::{ErrorKind, TaskResult};
use crate::producer::Producer;
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::store::{NewTask, Recovery, StartedTask, Store, StoreError, TaskStatus};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{self, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// What a worker did, counted since it started.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WorkerStats {
    /// Records read from Kafka.
    pub received: u64,
    /// Tasks recorded as SUCCESS.
    pub succeeded: u64,
    /// Tasks recorded as FAILED (including invalid messages with a uuid).
    pub failed: u64,
    /// Failed attempts that will be retried after their backoff.
    pub retried: u64,
    /// Messages not run because their task was already final or in flight.
    pub skipped: u64,
    /// Records that were not kser messages and had no uuid: logged, not stored.
    pub rejected: u64,
    /// Records received and left unfinished at shutdown: still running at
    /// the deadline, or fetched and not started. They will be delivered
    /// again.
    pub abandoned: u64,
    /// Tasks that found no room in their pools (`MAX_CONCURRENCY`,
    /// `ACQUIRES`) and were parked in Postgres; each runs when it is sent
    /// again.
    pub waited: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) succeeded: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) waited: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, atomic::Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            received: self.received.load(atomic::Ordering::Relaxed),
            succeeded: self.succeeded.load(atomic::Ordering::Relaxed),
            failed: self.failed.load(atomic::Ordering::Relaxed),
            retried: self.retried.load(atomic::Ordering::Relaxed),
            skipped: self.skipped.load(atomic::Ordering::Relaxed),
            rejected: self.rejected.load(atomic::Ordering::Relaxed),
            abandoned: 0,
            waited: self.waited.load(atomic::Ordering::Relaxed),
        }
    }
}

pub(super) struct Shared {
    /// The consumer; replaced when it hits a fatal error.
    pub(super) consumer: RwLock<Arc<StreamConsumer<KserContext>>>,
    /// How to build the consumer again.
    pub(super) spec: ConsumerSpec,
    pub(super) tracker: Arc<Mutex<OffsetTracker>>,
    pub(super) store: Store,
    pub(super) registry: Arc<Registry>,
    pub(super) counters: Counters,
    /// Tasks started and not yet recorded final, by uuid.
    pub(super) in_flight: Mutex<HashMap<String, InFlight>>,
    /// How long a task runs before the marker writes it RUNNING.
    pub(super) running_after: Duration,
    /// The largest task result kept, in bytes of JSON.
    pub(super) max_result_bytes: usize,
    pub(super) worker_id: String,
    pub(super) batch_size: usize,
    /// Cancelled when the shutdown deadline passes: stop waiting for the
    /// database.
    pub(super) abandon: CancellationToken,
    /// Publishes the outbox: next steps of operations.
    pub(super) producer: Producer,
    /// For tasks that declare no policy of their own.
    pub(super) retry: RetryPolicy,
    pub(super) dead_letters: DeadLetters,
    /// Wakes the outbox relay when this worker has just queued messages.
    pub(super) relay_wakeup: tokio::sync::Notify,
    /// Dead letters being written; shutdown waits for them.
    pub(super) dead_letter_tasks: tokio_util::task::TaskTracker,
    /// In what order records run.
    pub(super) ordering: Ordering,
    /// Tells the starter that a lane's record reached a final state.
    pub(super) lane_done: mpsc::UnboundedSender<Lane>,
    /// Transactional tasks running at once, each holding a connection: the
    /// pool's size less what the pipeline's own writes need.
    pub(super) transactions: Semaphore,
    /// Bytes of records the pipeline may still take in
    /// ([`BufferBudget::pipeline_bytes`]), one permit per byte.
    pub(super) buffered: Arc<Semaphore>,
    pub(super) buffered_budget: u64,
    /// `--metrics-topic`: a record per finished task.
    pub(super) metrics_topic: Option<metrics_topic::MetricsTopic>,
    /// Tasks holding leases on pools (limits across the fleet), until
    /// their outcome is written.
    pub(super) leased: Mutex<HashSet<String>>,
    /// How long a lease lasts unless renewed: the fleet's `lost_after`.
    pub(super) lease_ttl: Duration,
}

impl Shared {
    /// The consumer as it is now (it is replaced after a fatal error).
    pub(super) fn consumer(&self) -> Arc<StreamConsumer<KserContext>> {
        Arc::clone(&self.consumer.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs a database write until it succeeds or fails for good. Errors a
    /// retry can cure (an outage, a deadlock: [`Recovery::Transient`]) are
    /// retried with backoff; a permanent one is returned at once, never
    /// retried. An error kser cannot place ([`Recovery::Unclassified`]) is
    /// returned as permanent if a known-good write goes through meanwhile
    /// ([`Store::probe_write`]), and waited out as an outage if not. `None`
    /// when the shutdown deadline passed.
    pub(super) async fn retry_db<T, F, Fut>(
        &self,
        what: &str,
        mut write: F,
    ) -> Option<Result<T, StoreError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            let written = write().await;
            telemetry::wrote(what, started.elapsed());
            let err = match written {
                Ok(value) => return Some(Ok(value)),
                Err(err) => err,
            };
            let retry_in_ms = delay.as_millis() as u64;
            match err.recovery() {
                Recovery::Permanent => return Some(Err(err)),
                Recovery::Unclassified => match self.store.probe_write().await {
                    Ok(()) => {
                        tracing::warn!(error = %err, "could not {what}: Postgres refused the statement with an error kser does not know, while it takes a known-good write; the statement is at fault, so it is not retried");
                        return Some(Err(err));
                    }
                    Err(probe) => {
                        tracing::warn!(error = %err, probe = %probe, retry_in_ms, "could not {what}, nor write a known-good row; retrying")
                    }
                },
                // A grant revoked while the worker runs: an operator's fix,
                // so waited out, but said as what it is.
                _ if err.to_string().contains("permission denied") => tracing::error!(
                    error = %err, retry_in_ms,
                    "could not {what}: the worker's role lacks a privilege; {}; retrying until it is granted (see README, \"Least privilege\")",
                    crate::store::WORKER_PRIVILEGES
                ),
                _ => tracing::warn!(error = %err, retry_in_ms, "could not {what}; retrying"),
            }
            tokio::select! {
                () = self.abandon.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes `items` in one statement, waiting out outages (see
    /// [`retry_db`](Self::retry_db)). If Postgres refuses the statement for
    /// good, the batch is halved and each half written the same way, down
    /// to single items: a batch of 1,000 with one bad item costs about 20
    /// statements, and every other item is written. Returns what each
    /// successful write returned and, for each item refused on its own, its
    /// index and the error; `None` when the shutdown deadline passed.
    pub(super) async fn write_isolating<'a, T, R, F, Fut>(
        &self,
        what: &str,
        items: &'a [T],
        mut write: F,
    ) -> Option<Isolated<R>>
    where
        F: FnMut(&'a [T]) -> Fut,
        Fut: std::future::Future<Output = Result<R, StoreError>>,
    {
        let mut isolated = Isolated {
            written: Vec::new(),
            refused: Vec::new(),
        };
        // Ranges still to write, the next one last.
        let mut pending = Vec::with_capacity(64);
        pending.push(0..items.len());
        while let Some(range) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            let slice = &items[range.clone()];
            match self.retry_db(what, || write(slice)).await? {
                Ok(written) => isolated.written.push(written),
                Err(err) if range.len() == 1 => isolated.refused.push((range.start, err)),
                Err(err) => {
                    tracing::debug!(rows = range.len(), error = %err, "Postgres refused a batch for good; splitting it to find the rows at fault");
                    let middle = range.start + range.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
        }
        Some(isolated)
    }

    /// Marks records finished and stores the offsets that became safe.
    pub(super) fn release(&self, positions: &[Position]) {
        if positions.is_empty() {
            return;
        }
        let mut safe = Vec::new();
        {
            let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            for position in positions {
                if let Some(offset) = tracker.complete(position) {
                    safe.push((Arc::clone(&position.topic), position.partition, offset));
                }
            }
        }
        let consumer = self.consumer();
        for (topic, partition, offset) in safe {
            // `store_offset(o)` commits o + 1: the next record to read.
            if let Err(err) = consumer.store_offset(&topic, partition, offset) {
                tracing::debug!(topic = %topic, partition, offset, error = %err, "offset not stored (partition revoked?)");
            }
        }
    }

    /// Logs the counters every 30 seconds while they move.
    pub(super) async fn reporter(self: Arc<Self>) {
        let mut last = WorkerStats::default();
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let now = self.counters.snapshot();
            if now.received != last.received {
                tracing::info!(
                    received = now.received,
                    succeeded = now.succeeded,
                    failed = now.failed,
                    skipped = now.skipped,
                    rejected = now.rejected,
                    "worker progress"
                );
            }
            last = now;
        }
    }

    /// A task is no longer in flight: releases the copies of its message that
    /// arrived meanwhile (`release_copies`), or leaves them unreleased to be
    /// delivered again (at shutdown).
    pub(super) fn forget_in_flight(&self, uuid: &str, release_copies: bool) {
        let copies = self
            .lock_in_flight()
            .remove(uuid)
            .map(|task| task.copies)
            .unwrap_or_default();
        if release_copies {
            self.release(&copies);
        }
    }

    /// Takes out of a task's copies one received under its partition's
    /// current assignment, if any: it stands in for a record whose
    /// partition was revoked and given back meanwhile. Locks `in_flight`,
    /// then `tracker` (nothing takes them the other way round).
    pub(super) fn take_current_copy(&self, uuid: &str) -> Option<Position> {
        let mut in_flight = self.lock_in_flight();
        let copies = &mut in_flight.get_mut(uuid)?.copies;
        let tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        let current = copies.iter().position(|copy| tracker.is_current(copy))?;
        Some(copies.swap_remove(current))
    }

    pub(super) fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlight>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`Shared::write_isolating`] wrote and what Postgres refused.
pub(super) struct Isolated<R> {
    /// What each successful statement returned.
    pub(super) written: Vec<R>,
    /// The items refused on their own: their index and why.
    pub(super) refused: Vec<(usize, StoreError)>,
}

/// A task started and not yet recorded final.
#[derive(Default)]
pub(super) struct InFlight {
    /// The positions of copies of its message that arrived meanwhile: they
    /// are released when it ends, never before, so a copy skipped now is not
    /// lost if this run is abandoned.
    pub(super) copies: Vec<Position>,
    /// When and what to write RUNNING, until the marker writes it.
    pub(super) mark: Option<Mark>,
    /// The attempt running, as claimed: what a panic in kser's own code
    /// records FAILED.
    pub(super) attempt: Option<StartedTask>,
}

/// When and what to write for a task that runs long. Its RUNNING row is
/// built from the record only when due: most tasks end sooner, and keeping
/// a row per task would copy every message's parameters once more.
pub(super) struct Mark {
    pub(super) at: tokio::time::Instant,
    /// When it started.
    pub(super) started_at: DateTime<Utc>,
    /// The attempt it runs, as claimed.
    pub(super) attempts: i32,
    pub(super) original: Arc<Original>,
    pub(super) position: Position,
    pub(super) enqueued_at: Option<DateTime<Utc>>,
}

/// The error kind of a failed row, as its result says.
pub(super) fn failure_kind(row: &NewTask) -> &'static str {
    let kind = row
        .result
        .as_ref()
        .and_then(|result| result.get("retval")?.get("error")?.get("kind")?.as_str());
    [
        ErrorKind::InvalidMessage,
        ErrorKind::UnknownEntrypoint,
        ErrorKind::InvalidParams,
        ErrorKind::Retryable,
        ErrorKind::Fatal,
        ErrorKind::Panic,
        ErrorKind::Timeout,
    ]
    .into_iter()
    .map(ErrorKind::as_str)
    .find(|known| Some(*known) == kind)
    .unwrap_or("failed")
}

/// Strips a row of the values Postgres refused and records why.
pub(super) fn unstorable(row: &mut NewTask, err: &StoreError) {
    let error = format!("could not store the task in Postgres: {err}").replace('\0', "");
    let result = TaskResult::error(500, ErrorKind::InvalidMessage, error.clone(), Value::Null);
    row.status = TaskStatus::Failed.as_str();
    row.params = Value::Object(Default::default());
    row.metadata = Value::Object(Default::default());
    row.result = serde_json::to_value(&result).ok();
    row.error = Some(error);
    row.entrypoint = row.entrypoint.replace('\0', "");
    row.finished_at = Some(Utc::now());
}
