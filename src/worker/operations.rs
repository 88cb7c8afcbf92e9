//! The worker's side of operations: recording an operation when its message
//! arrives, running its finish hook, and relaying the outbox (the next step
//! messages) to Kafka, encrypted when the worker has a key.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Received, Shared};
use crate::message::Message;
use crate::operation::OperationContext;
use crate::store::{
    FinishedOperation, NewOperation, NewTask, OPERATION_METADATA_KEY, OperationStart, StoreError,
    TaskStatus,
};

/// Outbox messages published per round.
const RELAY_BATCH: i64 = 500;
/// How long a relay owns the messages it claimed before another may take them.
const RELAY_LEASE: Duration = Duration::from_secs(30);
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
                tracing::info!(operation.uuid = %op.uuid, entrypoint = %op.entrypoint, steps = op.steps, "operation started");
            }
        }
        self.relay_wakeup.notify_one();
        self.release(&positions);
        true
    }

    /// The operation row and its tasks, or a FAILED row saying why the
    /// operation could not be built.
    fn build_operation(
        &self,
        received: &Received,
        message: Message,
        now: DateTime<Utc>,
    ) -> OperationStart {
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
                };
            }
        };
        operation.steps = i32::try_from(steps.len()).unwrap_or(i32::MAX);
        let mut metadata = message.metadata;
        metadata.insert(
            OPERATION_METADATA_KEY.into(),
            Value::from(message.uuid.clone()),
        );
        let tasks = steps
            .into_iter()
            .enumerate()
            .map(|(index, step)| {
                let mut task = NewTask::new(
                    uuid::Uuid::new_v4().to_string(),
                    step.entrypoint,
                    TaskStatus::Pending,
                );
                task.params = step.params;
                task.metadata = Value::Object(metadata.clone());
                task.topic = operation.topic.clone();
                task.operation_uuid = Some(message.uuid.clone());
                task.position = i32::try_from(index).ok();
                task.updated_at = now;
                task
            })
            .collect();
        OperationStart { operation, tasks }
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
        loop {
            let claimed = match self.store.claim_outbox(RELAY_BATCH, RELAY_LEASE).await {
                Ok(claimed) => claimed,
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
            let (mut sent, mut failed) = (Vec::new(), Vec::new());
            for (row, outcome) in claimed.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => sent.push(row.id),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not publish an outbox message; it stays queued");
                        failed.push(row.id);
                    }
                }
            }
            // A message published but not deleted (the database went away)
            // is published again after its lease: a duplicate, which workers
            // skip.
            if let Err(err) = self.store.delete_outbox(&sent).await {
                tracing::warn!(error = %err, "could not delete published outbox messages");
            }
            if !failed.is_empty() {
                let _ = self.store.unclaim_outbox(&failed).await;
                if stop.is_cancelled() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            } else {
                delay = Duration::from_millis(100);
            }
        }
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
    }
}
