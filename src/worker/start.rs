//! Stage 2, start: decodes batches, records what cannot run, waits for each
//! record's turn in its lane, and claims the tasks that got a concurrency
//! slot in one read before they run. (`marker.rs` writes RUNNING the tasks
//! that run long; `panicked.rs` ends a task whose run panicked in kser.)

use super::{holding, ordering};

use super::dead_letter::DeadLetter;
use super::decode::{Decoded, decode};
use super::offsets::Position;
use super::ordering::{Lane, Lanes};
use super::pipeline::{Candidate, Finished, Outcome, Ready, Received};
use super::shared::{Counters, InFlight, Mark, Shared, unstorable};
use crate::message::{ErrorKind, Message, TaskResult};
use crate::store::{NewTask, StartedTask, TaskStatus};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, PoisonError};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many groups of tasks are claimed at once. One claim at a time left
/// the slots of a group idle for the whole round trip of its claim, and the
/// next group waiting for it: at concurrency 256 on the benchmark, a group
/// was about 130 tasks and Postgres answered 380 claims a second.
pub(super) const CLAIMS: usize = 2;

impl Shared {
    /// Stage 2: decodes batches, then starts their tasks in order and as
    /// concurrency slots free up. A record waits while an earlier record of
    /// its lane (its key, or its partition, per [`Ordering`]) has no final
    /// state. Each group of tasks that got a slot is claimed in one read
    /// (which leaves out tasks already final and numbers each attempt), and
    /// only then runs. A task waiting for a slot or for its turn is never
    /// shown as RUNNING; one running past `running_after` is.
    ///
    /// Records of a partition revoked meanwhile, and every record not started
    /// once the worker is stopping, are dropped from the pipeline
    /// unfinished: their offsets are not committed, so they are delivered
    /// again to whoever owns the partition next.
    pub(super) async fn starter(
        self: Arc<Self>,
        mut intake_rx: mpsc::Receiver<Received>,
        mut lane_done_rx: mpsc::UnboundedReceiver<Lane>,
        finish_tx: mpsc::Sender<Finished>,
        semaphore: Arc<Semaphore>,
        shutdown: CancellationToken,
        mut holding: holding::Holding,
    ) {
        // The claims and the tasks they start: all are awaited before the
        // starter returns (and the finisher's channel closes).
        let running = TaskTracker::new();
        let claims = Arc::new(Semaphore::new(CLAIMS));
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut lanes: Lanes<Candidate> = Lanes::new();
        let mut ready: VecDeque<Candidate> = VecDeque::new();
        // Records waiting for their lane are held here, not in librdkafka:
        // past this many, stop reading until lanes move.
        let max_waiting = self.batch_size * 4;
        loop {
            while let Ok(lane) = lane_done_rx.try_recv() {
                ready.extend(lanes.release(&lane));
            }
            // Paused entrypoints wait in `holding`, their lanes taken.
            holding.sort(&mut ready);
            if shutdown.is_cancelled() {
                for candidate in ready.drain(..).chain(lanes.drain()) {
                    self.forget_in_flight(&candidate.message.uuid, false);
                }
                for candidate in holding.drain() {
                    self.forget_in_flight(&candidate.message.uuid, false);
                }
            }
            if ready.is_empty() {
                tokio::select! {
                    received = intake_rx.recv_many(&mut batch, self.batch_size),
                        if lanes.waiting() < max_waiting =>
                    {
                        if received == 0 {
                            break;
                        }
                        if shutdown.is_cancelled() {
                            batch.clear();
                            continue;
                        }
                        for candidate in self.prepare_batch(batch.drain(..), &finish_tx).await {
                            let lane = candidate.lane.clone();
                            ready.extend(lanes.admit(lane.as_ref(), candidate));
                        }
                    }
                    lane = lane_done_rx.recv() => match lane {
                        Some(lane) => ready.extend(lanes.release(&lane)),
                        None => break,
                    },
                    () = shutdown.cancelled(), if !lanes.is_empty() || !holding.is_empty() => {}
                    () = holding.changed() => {}
                }
                continue;
            }
            // A claim slot first: groups are claimed [`CLAIMS`] at a time,
            // so the next group gathers its slots while Postgres answers.
            let claim = tokio::select! {
                biased;
                () = shutdown.cancelled() => continue,
                claim = Arc::clone(&claims).acquire_owned() => claim,
            };
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => continue,
                permit = Arc::clone(&semaphore).acquire_owned() => permit,
            };
            let (Ok(claim), Ok(first)) = (claim, first) else {
                return;
            };
            let mut permits = vec![first];
            while permits.len() < ready.len() {
                match Arc::clone(&semaphore).try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let mut group = Vec::with_capacity(permits.len());
            for mut candidate in ready.drain(..permits.len()) {
                if self.is_current(&candidate.position) {
                    group.push(candidate);
                    continue;
                }
                // Its partition was revoked. Given back to this worker at
                // once (an eager rebalance revokes everything), the record
                // was fetched again and waits among the copies: that copy
                // runs in its place, or nothing would run it.
                if let Some(position) = self.take_current_copy(&candidate.message.uuid) {
                    candidate.position = position;
                    group.push(candidate);
                    continue;
                }
                // Whoever owns it now reads it (and the copies of it) again.
                self.forget_in_flight(&candidate.message.uuid, false);
                if let Some(lane) = candidate.lane {
                    // The lane's next record (dropped in turn) may be of a
                    // partition still ours.
                    self.lane_done(lane);
                }
            }
            let shared = Arc::clone(&self);
            let finish_tx = finish_tx.clone();
            let semaphore = Arc::clone(&semaphore);
            let shutdown = shutdown.clone();
            let tracker = running.clone();
            running.spawn(async move {
                let started = shared.start_group(group, &finish_tx).await;
                drop(claim);
                for (task, permit) in started.into_iter().zip(permits) {
                    tracker.spawn(Arc::clone(&shared).run_task(
                        task,
                        permit,
                        Arc::clone(&semaphore),
                        finish_tx.clone(),
                        shutdown.clone(),
                    ));
                }
            });
        }
        running.close();
        running.wait().await;
    }

    /// Drops candidates that will not start here (the worker is stopping):
    /// they and the copies of their messages are delivered again.
    pub(super) fn abandon(&self, candidates: impl IntoIterator<Item = Candidate>) {
        for candidate in candidates {
            self.forget_in_flight(&candidate.message.uuid, false);
        }
    }

    /// Tells the starter that the record holding `lane` is done with it.
    pub(super) fn lane_done(&self, lane: Lane) {
        let _ = self.lane_done.send(lane);
    }

    /// Whether a record's partition is still this worker's, as it was when
    /// the record arrived.
    pub(super) fn is_current(&self, position: &Position) -> bool {
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_current(position)
    }

    /// Decodes a batch: records invalid messages, starts operations, skips
    /// duplicates, and returns the tasks that may run.
    pub(super) async fn prepare_batch(
        self: &Arc<Self>,
        batch: impl Iterator<Item = Received>,
        finish_tx: &mpsc::Sender<Finished>,
    ) -> Vec<Candidate> {
        let now = Utc::now();
        let mut candidates = Vec::new();
        let mut release = Vec::new();
        let mut operations = Vec::new();
        let mut dead = Vec::new();
        let mut seen = HashSet::new();
        let mut operation_copies = Vec::new();
        for received in batch {
            match decode(
                received.original.payload.as_deref(),
                self.producer.secretbox(),
            ) {
                Decoded::Message(message) => {
                    // A task read earlier, in this batch or before: its
                    // offset moves when that copy ends. (The earlier copy
                    // may be of a partition revoked since, and this one
                    // fetched again: then this one runs in its place.)
                    if let Some(task) = self.lock_in_flight().get_mut(&message.uuid) {
                        tracing::info!(task.uuid = %message.uuid, "duplicate of a message in flight; skipped");
                        Counters::add(&self.counters.skipped, 1);
                        task.copies.push(received.position);
                        continue;
                    }
                    // A task's first copy is in flight from here on, so
                    // `seen` only needs operations' and invalid records'.
                    let operation = self.registry.is_operation(&message.entrypoint);
                    let duplicate = if operation {
                        !seen.insert(message.uuid.clone())
                    } else {
                        seen.contains(&message.uuid)
                    };
                    if duplicate {
                        tracing::info!(task.uuid = %message.uuid, "duplicate in one batch; skipped");
                        Counters::add(&self.counters.skipped, 1);
                        // An operation's copy moves once the operation is
                        // recorded; an invalid message's, at once.
                        if operation {
                            operation_copies.push(received.position);
                        } else {
                            release.push(received.position);
                        }
                        continue;
                    }
                    if operation {
                        operations.push((received, message));
                        continue;
                    }
                    // In flight from now on, waiting for its turn and a slot
                    // included: a copy arriving meanwhile, valid or not,
                    // changes nothing.
                    self.lock_in_flight()
                        .insert(message.uuid.clone(), InFlight::default());
                    let lane = ordering::lane(
                        self.ordering,
                        &received.position,
                        received.original.key.as_deref(),
                    );
                    candidates.push(Candidate {
                        position: received.position,
                        message,
                        enqueued_at: received.timestamp,
                        original: received.original,
                        lane,
                    });
                }
                Decoded::Invalid {
                    uuid: Some(uuid),
                    entrypoint,
                    error,
                } => {
                    let position = &received.position;
                    tracing::warn!(
                        task.uuid = %uuid, topic = %position.topic, partition = position.partition,
                        offset = position.offset, error = %error, "invalid message"
                    );
                    // A uuid means one task: a malformed copy of a message
                    // read earlier in this batch, or of a task running here,
                    // changes nothing; it is only dead-lettered.
                    let running = self.lock_in_flight().contains_key(&uuid);
                    if running || !seen.insert(uuid.clone()) {
                        Counters::add(&self.counters.skipped, 1);
                        dead.push(DeadLetter {
                            position: received.position,
                            original: received.original,
                            kind: ErrorKind::InvalidMessage.as_str(),
                            error: duplicate_error(&uuid, "in flight", &error),
                            attempts: 1,
                            uuid: Some(uuid),
                            trace: None,
                        });
                        continue;
                    }
                    let row = self.invalid_row(uuid, entrypoint, error, &received, now);
                    let finished = Finished {
                        position: received.position,
                        row,
                        kind: Outcome::Invalid,
                        resend: None,
                        original: received.original,
                        lane: None,
                    };
                    if finish_tx.send(finished).await.is_err() {
                        self.abandon(candidates);
                        return Vec::new();
                    }
                }
                Decoded::Invalid {
                    uuid: None, error, ..
                } => {
                    let position = received.position;
                    tracing::warn!(
                        topic = %position.topic, partition = position.partition,
                        offset = position.offset, error = %error,
                        "rejected a record that is not a kser message and has no uuid"
                    );
                    Counters::add(&self.counters.rejected, 1);
                    dead.push(DeadLetter {
                        position,
                        original: received.original,
                        kind: ErrorKind::InvalidMessage.as_str(),
                        error,
                        attempts: 1,
                        uuid: None,
                        trace: None,
                    });
                }
            }
        }
        self.release(&release);
        // Records without a uuid exist nowhere but in the dead-letter topic:
        // their offsets move only once it has them.
        self.dead_letter_later(dead);
        if !operations.is_empty() && !self.start_operations(operations, now).await {
            self.abandon(candidates);
            return Vec::new();
        }
        self.release(&operation_copies);
        candidates
    }

    /// Claims a group of tasks that got a concurrency slot, in one read,
    /// and returns those to run: not those already final. A task is written
    /// RUNNING only if it is still running after `running_after` (the
    /// marker's job), so a short task costs one write, its outcome.
    pub(super) async fn start_group(
        &self,
        group: Vec<Candidate>,
        finish_tx: &mpsc::Sender<Finished>,
    ) -> Vec<Ready> {
        if group.is_empty() {
            return Vec::new();
        }
        let uuids: Vec<String> = group.iter().map(|c| c.message.uuid.clone()).collect();
        let Some(mut started) = self.claim(&uuids).await else {
            self.abandon(group);
            return Vec::new();
        };
        // Tasks with limits across the fleet take their leases, or wait in
        // Postgres (and leave the group) when there is no room.
        let (claimed, others): (Vec<Candidate>, Vec<Candidate>) = group
            .into_iter()
            .partition(|c| matches!(started.get(&c.message.uuid), Some(Ok(_))));
        let mut group = self.take_leases(claimed, finish_tx).await;
        group.extend(others);
        let now = Utc::now();
        let mark_at = tokio::time::Instant::now() + self.running_after;
        let mut ready = Vec::with_capacity(started.len());
        let mut already_final = Vec::new();
        let mut finished_limited = Vec::new();
        for candidate in group {
            match started.remove(&candidate.message.uuid) {
                Some(Ok(started)) => {
                    let Candidate {
                        position,
                        message,
                        enqueued_at,
                        original,
                        lane,
                    } = candidate;
                    {
                        let mut in_flight = self.lock_in_flight();
                        let task = in_flight.entry(message.uuid.clone()).or_default();
                        task.mark = Some(Mark {
                            at: mark_at,
                            started_at: now,
                            attempts: started.attempts,
                            original: Arc::clone(&original),
                            position: position.clone(),
                            enqueued_at,
                        });
                        task.attempt = Some(started.clone());
                    }
                    ready.push(Ready {
                        position,
                        message,
                        started,
                        enqueued_at,
                        original,
                        lane,
                    });
                }
                Some(Err(row)) => {
                    let finished = Finished {
                        position: candidate.position,
                        row: *row,
                        kind: Outcome::Rejected,
                        resend: None,
                        original: candidate.original,
                        lane: candidate.lane,
                    };
                    if finish_tx.send(finished).await.is_err() {
                        return Vec::new();
                    }
                }
                None => {
                    if !self
                        .registry
                        .needs(&candidate.message.entrypoint)
                        .is_empty()
                    {
                        finished_limited.push(candidate.message.uuid.clone());
                    }
                    tracing::info!(task.uuid = %candidate.message.uuid, "task already finished; not run again");
                    // The copies that came meanwhile are done with too.
                    self.forget_in_flight(&candidate.message.uuid, true);
                    already_final.push(candidate.position);
                    if let Some(lane) = candidate.lane {
                        self.lane_done(lane);
                    }
                }
            }
        }
        Counters::add(&self.counters.skipped, already_final.len());
        self.release(&already_final);
        // A woken task may find itself final (cancelled meanwhile): the
        // room kept for it is free again.
        self.free_leases(&finished_limited).await;
        ready
    }

    /// Claims tasks, waiting out database outages: the attempt each one
    /// may start, or the FAILED row to record for one Postgres cannot even
    /// look up. Tasks already final are left out. `None` when the shutdown
    /// deadline passed.
    async fn claim(
        &self,
        uuids: &[String],
    ) -> Option<HashMap<String, Result<StartedTask, Box<NewTask>>>> {
        let claimed = self
            .write_isolating("look up started tasks", uuids, |uuids| {
                self.store.claim_tasks(uuids)
            })
            .await?;
        let mut started: HashMap<_, _> = claimed
            .written
            .into_iter()
            .flatten()
            .map(|(uuid, started)| (uuid, Ok(started)))
            .collect();
        for (index, err) in claimed.refused {
            let uuid = &uuids[index];
            tracing::warn!(task.uuid = %uuid, error = %err, "Postgres refused the task; recording it as FAILED");
            let mut failed = NewTask::new(uuid.clone(), String::new(), TaskStatus::Failed);
            failed.attempts = 1;
            unstorable(&mut failed, &err);
            started.insert(uuid.clone(), Err(Box::new(failed)));
        }
        Some(started)
    }

    /// The RUNNING row of a task about to run.
    pub(super) fn running_row(&self, candidate: &Candidate, now: DateTime<Utc>) -> NewTask {
        let running = Running {
            position: &candidate.position,
            enqueued_at: candidate.enqueued_at,
            attempts: 1,
            started_at: now,
        };
        self.running_row_of(candidate.message.clone(), &running)
    }

    /// The RUNNING row of `message`'s task, running as `running` says:
    /// what a task about to run and a task running long are written as.
    pub(super) fn running_row_of(&self, message: Message, running: &Running<'_>) -> NewTask {
        let mut row = NewTask::new(message.uuid, message.entrypoint, TaskStatus::Running);
        row.params = Value::Object(message.params);
        row.metadata = Value::Object(message.metadata);
        row.attempts = running.attempts;
        self.locate(&mut row, running.position, running.enqueued_at);
        row.started_at = Some(running.started_at);
        row.updated_at = running.started_at;
        row
    }

    pub(super) fn invalid_row(
        &self,
        uuid: String,
        entrypoint: Option<String>,
        error: String,
        received: &Received,
        now: DateTime<Utc>,
    ) -> NewTask {
        let result = TaskResult::error(400, ErrorKind::InvalidMessage, error.clone(), Value::Null);
        let mut row = NewTask::new(uuid, entrypoint.unwrap_or_default(), TaskStatus::Failed);
        row.result = serde_json::to_value(&result).ok();
        row.error = Some(error);
        row.attempts = 1;
        self.locate(&mut row, &received.position, received.timestamp);
        row.started_at = Some(now);
        row.finished_at = Some(now);
        row
    }
}

/// The error of a malformed record whose uuid belongs to a task that exists
/// (`state`: in flight, RUNNING, SUCCESS...): dead-lettered, never recorded.
pub(super) fn duplicate_error(uuid: &str, state: &str, error: &str) -> String {
    format!(
        "not recorded: uuid {uuid} belongs to an existing task ({state}), which this record \
         does not change; the record is not a valid message: {error}"
    )
}

/// Where and since when a task runs, and its attempt: what its RUNNING row
/// says besides its message.
pub(super) struct Running<'a> {
    pub(super) position: &'a Position,
    pub(super) enqueued_at: Option<DateTime<Utc>>,
    pub(super) attempts: i32,
    pub(super) started_at: DateTime<Utc>,
}
