//! Running a task: user code with its timeout, the row that records the
//! attempt, and retries in place under an ordering. (`transactional.rs`
//! runs the tasks whose writes commit with their state.)

use super::decode::{Decoded, decode};
use super::offsets::Position;
use super::ordering::Ordering;
use super::panicked::Spawned;
use super::pipeline::{Candidate, Finished, Outcome, Ready};
use super::shared::{Counters, Shared};
use super::telemetry;
use super::transactional::Transacted;
use crate::message::{ErrorKind, Message, TaskResult};
use crate::store::{NewOutbox, NewTask, Retry, TaskStatus};
use crate::task::TaskContext;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

impl Shared {
    /// Runs a task and hands its outcome to the finisher. Under an ordering
    /// a failed attempt is retried here, in place, after its backoff: the
    /// records behind it in its lane wait, and its offset stays uncommitted.
    /// (Without one, retries go through the outbox and block nothing.) If
    /// kser itself panics while running it, the task ends FAILED.
    pub(super) async fn run_task(
        self: Arc<Self>,
        task: Ready,
        permit: tokio::sync::OwnedSemaphorePermit,
        semaphore: Arc<Semaphore>,
        finish_tx: mpsc::Sender<Finished>,
        shutdown: CancellationToken,
    ) {
        let spawned = Spawned::of(&task);
        let attempts = self.run_attempts(task, permit, semaphore, finish_tx.clone(), shutdown);
        match AssertUnwindSafe(attempts).catch_unwind().await {
            // The finisher forgets it once its state is written.
            Ok(Handed::ToFinisher) => {}
            // Final, or a newer attempt runs elsewhere: the copies that came
            // meanwhile are done with too.
            Ok(Handed::Done) => self.forget_in_flight(spawned.uuid(), true),
            // Stopping: the copies will be delivered again.
            Ok(Handed::Abandoned) => self.forget_in_flight(spawned.uuid(), false),
            Err(panic) => {
                let panic = crate::registry::panic_text(panic.as_ref());
                self.task_panicked(spawned, &panic, &finish_tx).await;
            }
        }
    }

    /// Runs a task's attempts; says who finishes it.
    async fn run_attempts(
        &self,
        mut task: Ready,
        permit: tokio::sync::OwnedSemaphorePermit,
        semaphore: Arc<Semaphore>,
        finish_tx: mpsc::Sender<Finished>,
        shutdown: CancellationToken,
    ) -> Handed {
        let mut permit = Some(permit);
        loop {
            let position = task.position.clone();
            let original = Arc::clone(&task.original);
            let lane = task.lane.clone();
            let enqueued_at = task.enqueued_at;
            let stored = task.started.stored;
            let (mut row, resend) = if self.registry.is_transactional(&task.message.entrypoint) {
                match Box::pin(self.execute_transactional(task)).await {
                    Transacted::Ran(row, resend) => (row, resend),
                    Transacted::Committed(row, operation) => {
                        if let Some(operation) = operation {
                            self.relay_wakeup.notify_one();
                            self.operation_finished(operation);
                        }
                        let finished = Finished {
                            position,
                            row,
                            kind: Outcome::Committed,
                            resend: None,
                            original,
                            lane,
                        };
                        let _ = finish_tx.send(finished).await;
                        return Handed::ToFinisher;
                    }
                    Transacted::Fenced(uuid) => {
                        tracing::info!(task.uuid = %uuid, "a newer attempt owns the task; this one rolled back");
                        Counters::add(&self.counters.skipped, 1);
                        self.release(&[position]);
                        if let Some(lane) = lane {
                            self.lane_done(lane);
                        }
                        return Handed::Done;
                    }
                    Transacted::Stop => return Handed::Abandoned,
                }
            } else {
                Box::pin(self.execute(task, None)).await
            };
            // It ran: the outcome is written next, no RUNNING row before it.
            // (The slot is held until the finisher has the outcome, so tasks
            // never pile up waiting for a slow finisher: memory stays bounded
            // by the concurrency, not by the backlog.)
            if let Some(task) = self.lock_in_flight().get_mut(&row.uuid) {
                task.mark = None;
            }
            let kind = match &resend {
                Some(_) if self.ordering == Ordering::None => Outcome::Retry,
                None => Outcome::of_attempt(&row, stored),
                Some(again) => {
                    // Nothing runs during the backoff: free the slot.
                    drop(permit.take());
                    match Box::pin(self.retry_in_place(&mut row, &shutdown)).await {
                        InPlace::Due => {}
                        InPlace::Final => {
                            let finished = Finished {
                                kind: Outcome::of_run(&row),
                                position,
                                row,
                                resend: None,
                                original,
                                lane,
                            };
                            let _ = finish_tx.send(finished).await;
                            return Handed::ToFinisher;
                        }
                        InPlace::Fenced => {
                            self.release(&[position]);
                            if let Some(lane) = lane {
                                self.lane_done(lane);
                            }
                            return Handed::Done;
                        }
                        InPlace::Stop => return Handed::Abandoned,
                    }
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return Handed::Abandoned,
                        permit = Arc::clone(&semaphore).acquire_owned() => permit,
                    };
                    let Ok(next) = next else {
                        return Handed::Abandoned;
                    };
                    permit = Some(next);
                    let Decoded::Message(message) =
                        decode(Some(again.payload.as_bytes()), self.producer.secretbox())
                    else {
                        return Handed::Abandoned;
                    };
                    // Even if its partition was revoked meanwhile, the retry
                    // goes on here: the task is PENDING and only this worker
                    // knows it is due. (A copy delivered to the partition's
                    // new owner runs there too; the attempt fence keeps one
                    // outcome.)
                    let candidate = Candidate {
                        position,
                        message,
                        enqueued_at,
                        original,
                        lane,
                    };
                    let mut started = Box::pin(self.start_group(vec![candidate], &finish_tx)).await;
                    match started.pop() {
                        Some(next) => {
                            task = next;
                            continue;
                        }
                        // Final already, or refused and handed over.
                        None => return Handed::Done,
                    }
                }
            };
            let finished = Finished {
                position,
                row,
                kind,
                resend,
                original,
                lane,
            };
            let _ = finish_tx.send(finished).await;
            return Handed::ToFinisher;
        }
    }

    /// Records a failed attempt of an ordered task and waits out its
    /// backoff. `Final` when the task cannot be retried after all (the row
    /// then says FAILED, or the attempt was fenced), `Stop` on shutdown.
    async fn retry_in_place(&self, row: &mut NewTask, shutdown: &CancellationToken) -> InPlace {
        let retry = Retry {
            row: row.clone(),
            message: None,
        };
        let single = std::slice::from_ref(&retry);
        match self
            .retry_db("record a retry", || self.store.retry_tasks(single))
            .await
        {
            None => return InPlace::Stop,
            // A newer attempt runs elsewhere: this one has nothing to record.
            Some(Ok(0)) => return InPlace::Fenced,
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                tracing::warn!(task.uuid = %row.uuid, error = %err, "could not record the retry; the task fails");
                row.status = TaskStatus::Failed.as_str();
                row.next_attempt_at = None;
                return InPlace::Final;
            }
        }
        Counters::add(&self.counters.retried, 1);
        telemetry::retried(std::iter::once(&*row));
        let wait = row
            .next_attempt_at
            .map(|due| (due - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or_default();
        tokio::select! {
            () = shutdown.cancelled() => InPlace::Stop,
            () = tokio::time::sleep(wait) => InPlace::Due,
        }
    }

    /// Runs one task and returns its row after the attempt, and the message
    /// to send again if the attempt failed and will be retried.
    pub(super) async fn execute(
        &self,
        task: Ready,
        conn: Option<&mut diesel_async::AsyncPgConnection>,
    ) -> (NewTask, Option<NewOutbox>) {
        let Ready {
            position,
            mut message,
            started,
            enqueued_at,
            original,
            ..
        } = task;
        let position = &position;
        let attempt = started.attempts;
        let forwarded = message.result.clone();
        // Nothing to parse or allocate for a message without a trace.
        let trace = crate::trace::TaskTrace::continued(&message.metadata, original.trace);
        let span = tracing::info_span!(
            "task",
            task.uuid = %message.uuid,
            entrypoint = %message.entrypoint,
            attempt,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        if let Some(trace) = &trace {
            span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
            span.record("span_id", tracing::field::display(trace.span_id_hex()));
            if let Some(parent) = &trace.parent_id {
                span.record(
                    "parent_span_id",
                    tracing::field::display(crate::trace::Hex(parent)),
                );
            }
        }
        let started_at = Utc::now();
        let ctx = TaskContext {
            uuid: message.uuid.clone(),
            entrypoint: message.entrypoint.clone(),
            attempt: u32::try_from(attempt).unwrap_or(1),
            metadata: message.metadata.clone(),
            forwarded: forwarded.clone(),
            topic: position.topic.to_string(),
            partition: position.partition,
            offset: position.offset,
            worker: self.worker_id.clone(),
            operation: started.operation_uuid.clone().zip(started.position),
        };
        let params = Value::Object(message.params.clone());
        let policy = self
            .registry
            .retry_policy(&message.entrypoint)
            .unwrap_or(self.retry);
        let params_object = std::mem::take(&mut message.params);
        let run = async move {
            match conn {
                Some(conn) => self.registry.run_in(ctx, params_object, conn).await,
                None => self.registry.run(ctx, params_object).await,
            }
        }
        .instrument(span.clone());
        let result = match policy.timeout {
            None => run.await,
            Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                TaskResult::error(
                    504,
                    ErrorKind::Timeout,
                    format!("timed out after {:.3}s", limit.as_secs_f64()),
                    Value::Null,
                )
            }),
        };
        let result = self.within_cap(result);
        #[cfg(debug_assertions)]
        fault::panic_after_run(&message.entrypoint);
        let status = if result.is_success() {
            TaskStatus::Success
        } else {
            TaskStatus::Failed
        };
        let mut row = NewTask::new(message.uuid, message.entrypoint, status);
        row.error = result.failure_message();
        match &row.error {
            None => tracing::debug!(parent: &span, "task succeeded"),
            Some(error) => tracing::warn!(parent: &span, error = %error, "task failed"),
        }
        row.params = params;
        row.metadata = Value::Object(message.metadata);
        row.result = serde_json::to_value(&result).ok();
        row.attempts = attempt;
        self.locate(&mut row, position, enqueued_at);
        row.started_at = Some(started_at);
        row.finished_at = Some(Utc::now());
        row.operation_uuid = started.operation_uuid;
        row.position = started.position;
        row.trace = trace;
        let attempt_number = u32::try_from(attempt).unwrap_or(u32::MAX);
        if !policy.should_retry(attempt_number, result.error_kind()) {
            return (row, None);
        }
        let wait = policy.backoff(attempt_number);
        let due = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        tracing::info!(parent: &span, retry_in_ms = wait.as_millis() as u64, "will retry");
        row.status = TaskStatus::Pending.as_str();
        row.next_attempt_at = Some(due);
        let mut again = Message {
            uuid: row.uuid.clone(),
            entrypoint: row.entrypoint.clone(),
            params: row.params.as_object().cloned().unwrap_or_default(),
            result: forwarded,
            metadata: row.metadata.as_object().cloned().unwrap_or_default(),
        };
        // The next attempt is a child of this one, in the same trace.
        if let Some(trace) = &trace {
            trace.stamp(&mut again.metadata);
        }
        let resend = NewOutbox {
            topic: position.topic.to_string(),
            // Steps stay keyed by their operation, tasks by their uuid.
            message_key: Some(
                row.operation_uuid
                    .clone()
                    .unwrap_or_else(|| row.uuid.clone()),
            ),
            payload: String::from_utf8_lossy(&again.to_bytes()).into_owned(),
            operation_uuid: row.operation_uuid.clone(),
            available_at: Some(due),
        };
        (row, Some(resend))
    }

    /// The result, or a FAILED one saying it was too large to keep: a task
    /// that returns more than `max_result_bytes` of JSON ends FAILED (not
    /// retried), and the worker goes on.
    fn within_cap(&self, result: TaskResult) -> TaskResult {
        let size = json_size(&result);
        if size <= self.max_result_bytes {
            return result;
        }
        TaskResult::error(
            500,
            ErrorKind::Fatal,
            format!(
                "result too large: {size} bytes of JSON, over the worker's limit of {} \
                 (--max-result-bytes)",
                self.max_result_bytes
            ),
            Value::Null,
        )
    }

    pub(super) fn locate(
        &self,
        row: &mut NewTask,
        position: &Position,
        enqueued_at: Option<DateTime<Utc>>,
    ) {
        row.worker = Some(self.worker_id.clone());
        row.topic = Some(position.topic.to_string());
        row.kafka_partition = Some(position.partition);
        row.kafka_offset = Some(position.offset);
        row.enqueued_at = enqueued_at;
    }
}

/// How many bytes `value` takes as JSON, counted without building the text.
fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Not serializable: it cannot be stored at all.
        Err(_) => usize::MAX,
    }
}

/// Faults injected in debug builds only, so tests can prove the worker
/// survives a bug in its own code; release builds have none of this.
#[cfg(debug_assertions)]
mod fault {
    use std::sync::OnceLock;

    /// Panics, in kser's code and outside the task's own, right after a
    /// task of the entrypoint named by `KSER_FAULT_PANIC_AFTER_RUN` ran.
    pub(super) fn panic_after_run(entrypoint: &str) {
        static TARGET: OnceLock<Option<String>> = OnceLock::new();
        let target = TARGET.get_or_init(|| std::env::var("KSER_FAULT_PANIC_AFTER_RUN").ok());
        if target.as_deref() == Some(entrypoint) {
            panic!("fault injected after {entrypoint} ran (KSER_FAULT_PANIC_AFTER_RUN)");
        }
    }
}

/// Who finishes a task once its run ends.
enum Handed {
    /// The finisher got its outcome.
    ToFinisher,
    /// Nothing to write: it is final, or a newer attempt runs elsewhere.
    Done,
    /// The worker is stopping; it will be delivered again.
    Abandoned,
}

/// What became of an ordered task's failed attempt.
enum InPlace {
    /// Recorded, and its backoff has passed: run it again.
    Due,
    /// It cannot be retried after all: record the row as it is.
    Final,
    /// A newer attempt of the task runs elsewhere: record nothing.
    Fenced,
    /// The worker is stopping: leave it for redelivery.
    Stop,
}
