//! Firing schedules (`kser schedule add`): a task of its own that, about
//! every second, fires the due schedules through [`Store::fire_schedules`].
//! Each tick becomes a PENDING task and an outbox message in one
//! transaction, which the relay publishes; rows are claimed with `SKIP
//! LOCKED` and task uuids derive from schedule and tick, so a fleet fires
//! each tick once. A failure is logged and tried again after a backoff; it
//! never stops the worker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::message::{JsonObject, Message};
use crate::producer::Producer;
use crate::publish::pending_rows;
use crate::schedule::{self, Missed};
use crate::store::{NewOutbox, ScheduleFiring, ScheduleRow, Store};

/// Time between two rounds.
const EVERY: Duration = Duration::from_secs(1);
/// The longest wait after failed rounds (doubling from [`EVERY`]), so a
/// database outage is not logged every second.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Fires schedules until `stop` is cancelled.
pub(super) async fn run(store: Store, producer: Producer, stop: CancellationToken) {
    let mut wait = EVERY;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            fired = store.fire_schedules(|row, now| firing(row, now, &producer)) => match fired {
                Ok(fired) => {
                    wait = EVERY;
                    for fired in fired {
                        if !fired.uuids.is_empty() {
                            tracing::info!(schedule = %fired.name, tasks = fired.uuids.len(), "fired schedule");
                        }
                        if fired.exhausted {
                            tracing::warn!(schedule = %fired.name, "schedule paused: its cron expression has no tick left");
                        }
                    }
                }
                Err(err) => {
                    wait = (wait * 2).min(RETRY_MAX);
                    tracing::warn!(
                        error = %err,
                        retry_in_s = wait.as_secs_f64(),
                        "firing schedules failed; the worker goes on and tries again"
                    );
                }
            },
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What `row` fires at `now`: one message per tick, keyed by its uuid and
/// carrying the schedule and tick in its metadata.
fn firing(row: &ScheduleRow, now: DateTime<Utc>, producer: &Producer) -> ScheduleFiring {
    let plan = schedule::parse(&row.cron)
        .ok()
        .and_then(|cron| schedule::plan(&cron, row.next_at, now, Missed::from_stored(&row.missed)));
    let Some(plan) = plan else {
        return ScheduleFiring {
            messages: Vec::new(),
            next_at: None,
        };
    };
    let params: JsonObject = match &row.params {
        serde_json::Value::Object(params) => params.clone(),
        _ => JsonObject::new(),
    };
    let messages: Vec<Message> = plan
        .ticks
        .iter()
        .map(|tick| {
            let mut message = Message::new(row.entrypoint.clone(), params.clone());
            message.uuid = schedule::tick_uuid(&row.name, *tick);
            message
                .metadata
                .insert("schedule".into(), row.name.clone().into());
            message.metadata.insert(
                "tick".into(),
                tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    .into(),
            );
            message
        })
        .collect();
    let rows = pending_rows(&messages, &row.topic);
    let outbox = messages.iter().map(|message| NewOutbox {
        topic: row.topic.clone(),
        message_key: Some(message.uuid.clone()),
        payload: String::from_utf8_lossy(&producer.payload(message)).into_owned(),
        operation_uuid: None,
        available_at: None,
    });
    ScheduleFiring {
        messages: rows.into_iter().zip(outbox).collect(),
        next_at: Some(plan.next_at),
    }
}
