//! The worker's side of operations: recording an operation when its message
//! arrives, running its finish hook, and relaying the outbox (the next step
//! messages) to Kafka, encrypted when the worker has a key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::decode::{Decoded, decode};
use super::pipeline::Received;
use super::shared::Shared;
use crate::dead_letter::refused_for_good;
use crate::message::Message;
use crate::operation::{Join, OnFailure, OperationContext, Recovery, Step, is_graph};
use crate::producer::ProducerError;
use crate::store::{
    FinishedOperation, NewOperation, NewTask, OPERATION_METADATA_KEY, OperationStart, OutboxRow,
    StepRow, StoreError, TaskStatus,
};
use crate::trace::{TaskTrace, TraceParent};

/// Outbox messages published per round.
const RELAY_BATCH: i64 = 500;
/// How long a relay owns the messages it claimed before another may take them.
const RELAY_LEASE: Duration = Duration::from_secs(30);
/// The wait before publishing a message again after a failure that may
/// pass, doubled at each failure of that message, up to the maximum.
const RELAY_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The most messages whose backoff the relay remembers.
const RELAY_BACKOFF_KEPT: usize = 100_000;
/// How often an idle relay looks for messages queued by other processes
/// (`resume` from the CLI, other workers).
const RELAY_POLL: Duration = Duration::from_millis(250);

impl Shared {
    /// Builds and records operations whose message arrived. `false` when the
    /// shutdown deadline passed before they could be recorded.
    pub(super) async fn start_operations(
        &self,
        messages: Vec<(Received, Message)>,
        now: DateTime<Utc>,
    ) -> bool {
        let mut starts = Vec::with_capacity(messages.len());
        let mut positions = Vec::with_capacity(messages.len());
        for (received, message) in messages {
            starts.push(self.build_operation(&received, message, now));
            positions.push(received.position);
        }
        // One operation holding a value Postgres refuses is found by
        // splitting the batch; the others are recorded, it is recorded
        // FAILED without its values.
        let Some(isolated) = self
            .write_isolating("record operations", &starts, |starts| {
                self.store.create_operations(starts)
            })
            .await
        else {
            return false;
        };
        let mut created: HashSet<String> = isolated.written.into_iter().flatten().collect();
        for (index, err) in isolated.refused {
            let start = &starts[index];
            let stripped = unstorable_operation(start, &err);
            let single = std::slice::from_ref(&stripped);
            match self
                .retry_db("record an unstorable operation", || {
                    self.store.create_operations(single)
                })
                .await
            {
                None => return false,
                Some(Ok(one)) => created.extend(one),
                Some(Err(err)) => tracing::error!(
                    operation.uuid = %start.operation.uuid, error = %err,
                    "Postgres refused the operation; it is only in this log"
                ),
            }
        }
        for start in &starts {
            let op = &start.operation;
            if !created.contains(&op.uuid) {
                tracing::info!(operation.uuid = %op.uuid, "operation already recorded; not started again");
            } else if let Some(error) = &op.error {
                tracing::warn!(operation.uuid = %op.uuid, entrypoint = %op.entrypoint, error = %error, "operation failed before it started");
            } else {
                let trace = op.metadata.as_object().and_then(TraceParent::from_metadata);
                tracing::info!(
                    operation.uuid = %op.uuid, entrypoint = %op.entrypoint, steps = op.steps,
                    trace_id = %trace.map(|t| crate::trace::Hex(&t.trace_id).to_string()).unwrap_or_default(),
                    "operation started"
                );
            }
        }
        self.relay_wakeup.notify_one();
        self.release(&positions);
        true
    }

    /// The operation row and its tasks, or a FAILED row saying why the
    /// operation could not be built.
    ///
    /// The operation continues its message's trace, or starts one: its
    /// metadata's `traceparent` names the operation's span, the parent of
    /// its first step (see [`crate::trace`]).
    fn build_operation(
        &self,
        received: &Received,
        mut message: Message,
        now: DateTime<Utc>,
    ) -> OperationStart {
        let trace = TaskTrace::continued(&message.metadata, received.original.trace)
            .unwrap_or_else(TaskTrace::start);
        trace.stamp(&mut message.metadata);
        let built = self
            .registry
            .build_operation(&message.entrypoint, message.params.clone());
        let mut operation = NewOperation {
            uuid: message.uuid.clone(),
            entrypoint: message.entrypoint.clone(),
            status: TaskStatus::Running.as_str(),
            params: Value::Object(message.params),
            metadata: Value::Object(message.metadata.clone()),
            result: None,
            error: None,
            steps: 0,
            worker: Some(self.worker_id.clone()),
            topic: Some(received.position.topic.to_string()),
            enqueued_at: received.timestamp,
            started_at: Some(now),
            finished_at: None,
            updated_at: now,
            graph: false,
        };
        let steps = match built {
            Ok(steps) => steps,
            Err(failure) => {
                operation.status = TaskStatus::Failed.as_str();
                operation.error = failure.failure_message();
                operation.result = serde_json::to_value(&failure).ok();
                operation.finished_at = Some(now);
                return OperationStart {
                    operation,
                    tasks: Vec::new(),
                    graph: Vec::new(),
                };
            }
        };
        operation.steps = i32::try_from(steps.len()).unwrap_or(i32::MAX);
        let mut metadata = message.metadata;
        metadata.insert(
            OPERATION_METADATA_KEY.into(),
            Value::from(message.uuid.clone()),
        );
        let graph = is_graph(&steps);
        operation.graph = graph;
        let mut places = Vec::new();
        let tasks = steps
            .into_iter()
            .enumerate()
            .map(|(index, step)| {
                let status = if graph && !step.after.is_empty() {
                    TaskStatus::Waiting
                } else {
                    TaskStatus::Pending
                };
                let task_uuid = uuid::Uuid::new_v4().to_string();
                if graph {
                    places.push(place(&message.uuid, &task_uuid, &step));
                }
                let mut task = NewTask::new(task_uuid, step.entrypoint, status);
                task.params = step.params;
                task.metadata = Value::Object(metadata.clone());
                task.topic = operation.topic.clone();
                task.operation_uuid = Some(message.uuid.clone());
                task.position = i32::try_from(index).ok();
                task.updated_at = now;
                task
            })
            .collect();
        OperationStart {
            operation,
            tasks,
            graph: places,
        }
    }

    /// Runs the operation's `on_success`/`on_error` hook, off the finisher.
    pub(super) fn operation_finished(&self, operation: FinishedOperation) {
        let status = if operation.result.is_success() {
            "SUCCESS"
        } else {
            "FAILED"
        };
        tracing::info!(operation.uuid = %operation.uuid, entrypoint = %operation.entrypoint, status, "operation finished");
        let ctx = OperationContext {
            uuid: operation.uuid,
            entrypoint: operation.entrypoint,
            metadata: operation.metadata,
            worker: self.worker_id.clone(),
        };
        let registry = Arc::clone(&self.registry);
        tokio::spawn(async move { registry.operation_finished(ctx, operation.result).await });
    }

    /// Publishes outbox messages until `stop`, then once more until the
    /// outbox has nothing this worker can publish.
    pub(super) async fn relay(self: Arc<Self>, stop: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        // Per message: how long it waits after its last failed publish.
        let mut backoff: HashMap<i64, Duration> = HashMap::new();
        loop {
            let claimed = match self.store.claim_outbox(RELAY_BATCH, RELAY_LEASE).await {
                Ok(claimed) => {
                    delay = Duration::from_millis(100);
                    claimed
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not read the outbox; retrying");
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if claimed.is_empty() {
                if stop.is_cancelled() {
                    return;
                }
                tokio::select! {
                    () = self.relay_wakeup.notified() => {}
                    () = tokio::time::sleep(RELAY_POLL) => {}
                    () = stop.cancelled() => {}
                }
                continue;
            }
            // Rows hold plain messages (and `send --delay --encrypt`'s
            // encrypted ones): with a key, the worker publishes them all
            // encrypted.
            let payloads: Vec<_> = claimed
                .iter()
                .map(|row| self.producer.seal(row.payload.as_bytes()))
                .collect();
            let sends = claimed.iter().zip(&payloads).map(|(row, payload)| {
                self.producer.send_raw(
                    &row.topic,
                    row.message_key.as_deref().map(str::as_bytes),
                    Some(payload),
                )
            });
            let outcomes = futures::future::join_all(sends).await;
            let (mut sent, mut deferred, mut refused) = (Vec::new(), Vec::new(), Vec::new());
            for (row, outcome) in claimed.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => {
                        backoff.remove(&row.id);
                        sent.push(row.id);
                    }
                    Err(err) if refused_for_good(&err) => {
                        backoff.remove(&row.id);
                        refused.push((row, err));
                    }
                    Err(err) => {
                        let delay = backoff
                            .get(&row.id)
                            .map_or(RELAY_BACKOFF_MIN, |d| (*d * 2).min(RELAY_BACKOFF_MAX));
                        backoff.insert(row.id, delay);
                        tracing::warn!(
                            outbox.id = row.id, topic = %row.topic, error = %err,
                            retry_in_ms = delay.as_millis() as u64,
                            "could not publish an outbox message; it stays queued"
                        );
                        deferred.push((row.id, delay));
                    }
                }
            }
            // A message published but not deleted (the database went away)
            // is published again after its lease: a duplicate, which workers
            // skip.
            if let Err(err) = self.store.delete_outbox(&sent).await {
                tracing::warn!(error = %err, "could not delete published outbox messages");
            }
            // Each message waits out its own backoff; the relay goes on with
            // the others. If this write fails, the lease runs out instead.
            if let Err(err) = self.store.defer_outbox(&deferred).await {
                tracing::warn!(error = %err, "could not put back unpublished outbox messages; they are retried when their lease runs out");
            }
            for (row, err) in refused {
                if !self.settle_unpublishable(row, &err).await {
                    return;
                }
            }
            if backoff.len() > RELAY_BACKOFF_KEPT {
                // Rows deleted meanwhile (a cancel) would stay forever.
                backoff.clear();
            }
        }
    }

    /// Ends what an outbox message the broker refused for good would have
    /// run: its task FAILED, and for a step its operation too, the message
    /// deleted, in one transaction. `false` when the shutdown deadline
    /// passed first.
    async fn settle_unpublishable(&self, row: &OutboxRow, err: &ProducerError) -> bool {
        let task_uuid = match decode(Some(row.payload.as_bytes()), self.producer.secretbox()) {
            Decoded::Message(message) => Some(message.uuid),
            Decoded::Invalid { uuid, .. } => uuid,
        };
        let why = match err {
            ProducerError::Send { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        let reason = format!(
            "the broker refused its message ({} bytes) to topic '{}' for good: {why}",
            row.payload.len(),
            row.topic
        )
        .replace('\0', "");
        tracing::error!(
            outbox.id = row.id, task.uuid = task_uuid.as_deref().unwrap_or("-"),
            topic = %row.topic, error = %err,
            "the broker refused an outbox message for good; its task fails"
        );
        let Some(settled) = self
            .retry_db("fail a task whose message the broker refused", || {
                self.store
                    .fail_unpublishable(row.id, task_uuid.as_deref(), &reason)
            })
            .await
        else {
            return false;
        };
        match settled {
            Ok(Some(operation)) => self.operation_finished(operation),
            Ok(None) => {}
            Err(err) => tracing::error!(
                outbox.id = row.id, error = %err,
                "could not record the refused outbox message; it is tried again after its lease"
            ),
        }
        true
    }
}

/// A graph step's row of `kser.steps`.
fn place(op_uuid: &str, task_uuid: &str, step: &Step) -> StepRow {
    StepRow {
        task_uuid: task_uuid.to_owned(),
        operation_uuid: op_uuid.to_owned(),
        name: step.name.clone().unwrap_or_default(),
        after: step.after.clone(),
        join_any: step.join == Join::Any,
        on_failure: match step.on_failure {
            OnFailure::Fail => "fail",
            OnFailure::Continue => "continue",
            OnFailure::Compensate => "compensate",
        }
        .to_owned(),
        delay_ms: i64::try_from(step.delay.as_millis()).unwrap_or(i64::MAX),
        recovery: match step.recovery {
            Recovery::Resume => "resume",
            Recovery::Rerun => "rerun",
            Recovery::Skip => "skip",
        }
        .to_owned(),
        compensation: step
            .compensation
            .as_ref()
            .map(|c| serde_json::json!({"entrypoint": c.entrypoint, "params": c.params})),
        compensates: false,
    }
}

/// An operation that Postgres refused, as a FAILED row without its values.
fn unstorable_operation(start: &OperationStart, err: &StoreError) -> OperationStart {
    let mut operation = start.operation.clone();
    operation.status = TaskStatus::Failed.as_str();
    operation.params = Value::Object(Default::default());
    operation.metadata = Value::Object(Default::default());
    operation.result = None;
    operation.error =
        Some(format!("could not store the operation in Postgres: {err}").replace('\0', ""));
    operation.entrypoint = operation.entrypoint.replace('\0', "");
    operation.steps = 0;
    operation.finished_at = Some(Utc::now());
    OperationStart {
        operation,
        tasks: Vec::new(),
        graph: Vec::new(),
    }
}
