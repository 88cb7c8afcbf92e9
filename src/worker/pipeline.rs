//! What the stages hand each other, in the order a record travels:
//! [`Received`] (intake -> start), [`Candidate`] (decoded, waiting for its
//! turn and a slot), [`Ready`] (claimed, about to run), [`Finished`] (an
//! outcome for the finisher, written as its [`Outcome`] says), and the
//! record's bytes as read ([`Original`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::offsets::Position;
use super::ordering::Lane;
use crate::message::Message;
use crate::store::{NewOutbox, NewTask, StartedTask};

/// How long the pipeline may stay full before the worker pauses fetching.
pub(super) const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(5);

/// The wait before the first rebuild of a consumer that hit a fatal error,
/// doubled each time it happens again, up to the maximum.
pub(super) const REBUILD_DELAY_MIN: Duration = Duration::from_millis(500);
pub(super) const REBUILD_DELAY_MAX: Duration = Duration::from_secs(10);

/// A record as read from Kafka, before decoding.
pub(super) struct Received {
    pub(super) position: Position,
    pub(super) original: Arc<Original>,
    pub(super) timestamp: Option<DateTime<Utc>>,
}

/// A record's key and value as read, kept until its outcome is durable so a
/// failure can be dead-lettered byte for byte.
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    /// The record timestamp, in milliseconds.
    pub(crate) timestamp: Option<i64>,
    /// Its share of the pipeline's byte budget, given back when the last
    /// copy of the record is dropped.
    pub(crate) budget: std::sync::OnceLock<tokio::sync::OwnedSemaphorePermit>,
    /// The record's `traceparent` header, if it had a valid one.
    pub(crate) trace: Option<crate::trace::TraceParent>,
}

/// A task's final state, ready to write.
pub(super) struct Finished {
    pub(super) position: Position,
    pub(super) row: NewTask,
    pub(super) kind: Outcome,
    /// For a retry: the message to send again when it is due.
    pub(super) resend: Option<NewOutbox>,
    /// The record as read, to dead-letter if the task ends FAILED.
    pub(super) original: Arc<Original>,
    /// The lane the record holds until its final state is written.
    pub(super) lane: Option<Lane>,
}

/// How a final state is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A standalone task that ran: its row is upserted whole, fenced by
    /// attempt.
    Ran,
    /// A standalone task that ran, of which Postgres had no row when it was
    /// claimed: inserted, or upserted like [`Outcome::Ran`] if a row
    /// appeared meanwhile ([`Store::complete_new_tasks`]).
    ///
    /// [`Store::complete_new_tasks`]: crate::store::Store::complete_new_tasks
    RanNew,
    /// A step of an operation that ran: written with the follow-up (next
    /// step or end of the operation) in one transaction.
    Step,
    /// A message that did not run (invalid, refused): the row is upserted
    /// whole.
    Rejected,
    /// A record that is not a kser message but names a uuid: recorded
    /// FAILED only if that uuid has no task that ran, runs or is final
    /// ([`Store::record_invalid`]); otherwise only dead-lettered, as a
    /// duplicate.
    Invalid,
    /// A failed attempt that will be retried: back to PENDING, the attempt
    /// recorded, the message queued until its backoff has passed.
    Retry,
    /// A transactional task whose SUCCESS is committed already: nothing to
    /// write, only its offset to release.
    Committed,
}

impl Outcome {
    /// How the final state of a task that ran is written: with its
    /// operation's follow-up for a step, alone otherwise.
    pub(super) fn of_run(row: &NewTask) -> Self {
        if row.operation_uuid.is_some() {
            Self::Step
        } else {
            Self::Ran
        }
    }

    /// [`of_run`](Self::of_run) for an attempt whose claim found a row of
    /// the task in Postgres (`stored`) or none (then it is inserted).
    pub(super) fn of_attempt(row: &NewTask, stored: bool) -> Self {
        match Self::of_run(row) {
            Self::Ran if !stored => Self::RanNew,
            kind => kind,
        }
    }
}

/// A decoded message of a registered task, waiting for its turn and a
/// concurrency slot.
pub(super) struct Candidate {
    pub(super) position: Position,
    pub(super) message: Message,
    pub(super) enqueued_at: Option<DateTime<Utc>>,
    pub(super) original: Arc<Original>,
    pub(super) lane: Option<Lane>,
}

/// A task cleared to run.
#[derive(Clone)]
pub(super) struct Ready {
    pub(super) position: Position,
    pub(super) message: Message,
    pub(super) started: StartedTask,
    pub(super) enqueued_at: Option<DateTime<Utc>>,
    pub(super) original: Arc<Original>,
    pub(super) lane: Option<Lane>,
}
