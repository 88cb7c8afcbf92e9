//! Transactional tasks: a `TransactionalTask` runs inside a transaction on
//! kser's own database, and its SUCCESS is written in that transaction,
//! fenced by its attempt, so its writes and its final state commit together.

use super::pipeline::Ready;
use super::shared::{Shared, unstorable};
use crate::store::{FinishedOperation, NewOutbox, NewTask, Store, StoreError, TaskStatus};
use std::time::Duration;

impl Shared {
    /// Runs a transactional task in a transaction on kser's database that
    /// also records its SUCCESS, fenced by its attempt: its writes and its
    /// final state commit together. A failed run rolls back and comes back
    /// to be recorded (or retried) like any task's; a lost connection runs
    /// the attempt again once the database is back.
    pub(super) async fn execute_transactional(&self, task: Ready) -> Transacted {
        let mut delay = Duration::from_millis(100);
        let mut failures = 0;
        let Ok(_slot) = self.transactions.acquire().await else {
            return Transacted::Stop;
        };
        loop {
            let attempt = task.clone();
            let outcome = match self.store.conn().await {
                Ok(mut conn) => {
                    use diesel_async::AsyncConnection as _;
                    conn.transaction::<_, TxAbort, _>(async move |conn| {
                        let (row, resend) = self.execute(attempt, Some(&mut *conn)).await;
                        if resend.is_some() || row.status != TaskStatus::Success.as_str() {
                            return Err(TxAbort::Ran(Box::new(row), resend));
                        }
                        match Store::complete_in(conn, &row).await {
                            Ok(Some(operation)) => Ok((row, operation)),
                            Ok(None) => Err(TxAbort::Fenced),
                            Err(err) => Err(TxAbort::Store(err, Some(Box::new(row)))),
                        }
                    })
                    .await
                }
                Err(err) => Err(TxAbort::Store(err, None)),
            };
            let err = match outcome {
                Ok((row, operation)) => return Transacted::Committed(row, operation),
                Err(TxAbort::Ran(row, resend)) => return Transacted::Ran(*row, resend),
                Err(TxAbort::Fenced) => return Transacted::Fenced(task.message.uuid),
                Err(TxAbort::Store(err, Some(row))) if err.is_permanent() => {
                    // The run succeeded but its state could not be stored:
                    // its writes rolled back; record why, without them.
                    let mut row = *row;
                    unstorable(&mut row, &err);
                    return Transacted::Ran(row, None);
                }
                Err(TxAbort::Store(err, _)) => err,
            };
            failures += usize::from(!err.is_connection_error());
            if failures >= 5 {
                let mut row = NewTask::new(
                    task.message.uuid.clone(),
                    task.message.entrypoint.clone(),
                    TaskStatus::Failed,
                );
                row.attempts = task.started.attempts;
                row.operation_uuid = task.started.operation_uuid.clone();
                row.position = task.started.position;
                unstorable(&mut row, &err);
                return Transacted::Ran(row, None);
            }
            tracing::warn!(task.uuid = %task.message.uuid, error = %err, retry_in_ms = delay.as_millis() as u64, "the task's transaction failed; running it again");
            tokio::select! {
                () = self.abandon.cancelled() => return Transacted::Stop,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// What became of a transactional task.
pub(super) enum Transacted {
    /// It failed (its writes rolled back): record this row, or retry.
    Ran(NewTask, Option<NewOutbox>),
    /// It succeeded: its writes and its SUCCESS are committed; the
    /// operation its step ended, if any.
    Committed(NewTask, Option<FinishedOperation>),
    /// A newer attempt owns the task (or it is final): rolled back.
    Fenced(String),
    /// The worker gave up waiting for the database at shutdown.
    Stop,
}

/// Why a transactional task's transaction rolled back.
enum TxAbort {
    Ran(Box<NewTask>, Option<NewOutbox>),
    Fenced,
    Store(StoreError, Option<Box<NewTask>>),
}

impl From<diesel::result::Error> for TxAbort {
    fn from(err: diesel::result::Error) -> Self {
        Self::Store(StoreError::Query(err), None)
    }
}
