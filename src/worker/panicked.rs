//! A panic in kser's own code while a task runs (user code's panics are
//! caught where it runs): the task ends FAILED, its lane and offset move
//! on, and the worker keeps running.

use super::decode::{Decoded, decode};
use super::offsets::Position;
use super::ordering::Lane;
use super::pipeline::{Finished, Original, Outcome, Ready};
use super::shared::Shared;
use crate::message::{ErrorKind, TaskResult};
use crate::store::{NewTask, TaskStatus};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::mpsc;

impl Shared {
    /// Records FAILED a task whose run panicked in kser's own code (user
    /// code's panics are caught where it runs, as a failed result): the
    /// task ends with the panic as its error, its lane and offset move on,
    /// and the worker keeps running. A bug must never leave a task RUNNING
    /// with its partition held.
    pub(super) async fn task_panicked(
        &self,
        spawned: Spawned,
        text: &str,
        finish_tx: &mpsc::Sender<Finished>,
    ) {
        tracing::error!(task.uuid = %spawned.uuid, panic = %text, "kser panicked while running the task; recording it FAILED");
        let attempt = self
            .lock_in_flight()
            .get_mut(&spawned.uuid)
            .and_then(|task| {
                task.mark = None;
                task.attempt.clone()
            });
        let Some(attempt) = attempt else {
            // Not claimed, or already handed over: nothing holds it.
            self.forget_in_flight(&spawned.uuid, false);
            return;
        };
        let now = Utc::now();
        let message = match decode(
            spawned.original.payload.as_deref(),
            self.producer.secretbox(),
        ) {
            Decoded::Message(message) => Some(message),
            Decoded::Invalid { .. } => None,
        };
        let entrypoint = message
            .as_ref()
            .map(|m| m.entrypoint.clone())
            .unwrap_or_default();
        let error = format!("kser panicked while running the task (a bug in kser): {text}");
        let result = TaskResult::error(500, ErrorKind::Panic, error.clone(), Value::Null);
        let mut row = NewTask::new(spawned.uuid, entrypoint, TaskStatus::Failed);
        if let Some(message) = message {
            row.params = Value::Object(message.params);
            row.metadata = Value::Object(message.metadata);
        }
        row.result = serde_json::to_value(&result).ok();
        row.error = Some(error);
        row.attempts = attempt.attempts;
        row.operation_uuid = attempt.operation_uuid;
        row.position = attempt.position;
        self.locate(&mut row, &spawned.position, spawned.enqueued_at);
        row.started_at = Some(now);
        row.finished_at = Some(now);
        let finished = Finished {
            kind: Outcome::of_run(&row),
            position: spawned.position,
            row,
            resend: None,
            original: spawned.original,
            lane: spawned.lane,
        };
        let _ = finish_tx.send(finished).await;
    }
}

/// What `run_task` keeps of a task it runs, to end it should its run
/// panic.
pub(super) struct Spawned {
    uuid: String,
    position: Position,
    enqueued_at: Option<DateTime<Utc>>,
    original: Arc<Original>,
    lane: Option<Lane>,
}

impl Spawned {
    /// The uuid of the task's message.
    pub(super) fn uuid(&self) -> &str {
        &self.uuid
    }

    pub(super) fn of(task: &Ready) -> Self {
        Self {
            uuid: task.message.uuid.clone(),
            position: task.position.clone(),
            enqueued_at: task.enqueued_at,
            original: Arc::clone(&task.original),
            lane: task.lane.clone(),
        }
    }
}
