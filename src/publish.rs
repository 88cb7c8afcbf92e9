//! Publishing messages the way `send` does, for the command line, the web
//! console and the schedules: each message recorded PENDING first (when a
//! database is configured) so a worker and `status` always find its row,
//! then published; a message that could not be published has its row
//! removed again, and a uuid the database knows with other content is
//! refused. A delayed send goes through the outbox instead.

use chrono::{DateTime, Utc};

use crate::message::Message;
use crate::producer::Producer;
use crate::store::{NewOutbox, NewTask, Store, TaskStatus};

/// A message to publish, with its record key (`None`: its uuid).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) message: Message,
    pub(crate) key: Option<String>,
    /// Whether the uuid came from the input rather than being generated.
    pub(crate) explicit_uuid: bool,
}

impl Outgoing {
    pub(crate) fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.message.uuid)
    }
}

/// Where and when messages go.
pub(crate) struct Target<'a> {
    pub(crate) topic: &'a str,
    pub(crate) producer: &'a Producer,
    pub(crate) store: Option<&'a Store>,
    /// Send later: schedule in the outbox instead of publishing now.
    pub(crate) due: Option<DateTime<Utc>>,
}

/// What became of a chunk of messages.
pub(crate) struct Published {
    /// The uuids the broker acknowledged, in input order.
    pub(crate) sent: Vec<String>,
    /// The uuids not sent, with why.
    pub(crate) failed: Vec<(String, String)>,
    /// Every send failed on the broker (not a refusal of kser's own).
    pub(crate) unreachable: bool,
}

/// Records `messages` as PENDING (when a database is configured) and then
/// publishes them. Recording first means a worker always finds the row,
/// and `status` knows a message as soon as `send` returns; a message that
/// could not be published has its row removed again.
pub(crate) async fn publish(outgoing: Vec<Outgoing>, target: &Target<'_>) -> Published {
    let (topic, producer, store) = (target.topic, target.producer, target.store);
    if let (Some(due), Some(store)) = (target.due, store) {
        return schedule(outgoing, topic, producer, store, due).await;
    }
    let keys: Vec<Vec<u8>> = outgoing
        .iter()
        .map(|o| o.key().as_bytes().to_vec())
        .collect();
    let messages: Vec<Message> = outgoing.into_iter().map(|o| o.message).collect();
    let mut inserted = Vec::new();
    let mut published = Published {
        sent: Vec::new(),
        failed: Vec::new(),
        unreachable: false,
    };
    let mut messages = messages;
    let mut keys = keys;
    if let Some(store) = store {
        match store.record_pending(&pending_rows(&messages, topic)).await {
            Ok(uuids) => inserted = uuids,
            Err(err) => {
                tracing::warn!(error = %err, "could not record the messages as PENDING; sending them anyway")
            }
        }
        // A uuid the database knows already: sending the same message again
        // is a resend (a worker runs it at most once), but a different
        // message under that uuid would be taken for the old one: refused.
        let known: Vec<String> = messages
            .iter()
            .map(|m| m.uuid.clone())
            .filter(|uuid| !inserted.contains(uuid))
            .collect();
        match store.task_contents(&known).await {
            Ok(existing) => {
                let conflicts: Vec<String> = existing
                    .into_iter()
                    .filter(|(uuid, entrypoint, params, metadata)| {
                        messages.iter().any(|m| {
                            &m.uuid == uuid
                                && (m.entrypoint != *entrypoint
                                    || serde_json::Value::Object(m.params.clone()) != *params
                                    || serde_json::Value::Object(m.metadata.clone()) != *metadata)
                        })
                    })
                    .map(|(uuid, ..)| uuid)
                    .collect();
                let (kept, refused): (Vec<_>, Vec<_>) = messages
                    .into_iter()
                    .zip(keys)
                    .partition(|(m, _)| !conflicts.contains(&m.uuid));
                for (message, _) in refused {
                    published.failed.push((
                        message.uuid,
                        "a task with this uuid exists with another entrypoint, params or metadata; \
                         use a new uuid"
                            .to_owned(),
                    ));
                }
                (messages, keys) = kept.into_iter().unzip();
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not compare the messages with the tasks they may resend")
            }
        }
    }
    let sends = messages
        .iter()
        .zip(&keys)
        .map(|(message, key)| producer.send_keyed(topic, key, message));
    let outcomes = futures::future::join_all(sends).await;
    published.unreachable = !outcomes.is_empty() && outcomes.iter().all(Result::is_err);
    for (message, outcome) in messages.into_iter().zip(outcomes) {
        match outcome {
            Ok(_) => published.sent.push(message.uuid),
            Err(err) => published.failed.push((message.uuid, err.to_string())),
        }
    }
    if let Some(store) = store {
        let unsent: Vec<String> = published
            .failed
            .iter()
            .map(|(uuid, _)| uuid.clone())
            .filter(|uuid| inserted.contains(uuid))
            .collect();
        if let Err(err) = store.forget_pending(&unsent).await {
            tracing::warn!(error = %err, "could not remove the PENDING rows of unsent messages");
        }
    }
    published
}

/// What the console's `POST /api/v1/send` and the send form do: records `messages` as
/// PENDING and publishes them to `topic`, each keyed by its uuid, as `send`
/// does. Returns the uuids sent, and those not sent with why.
pub(crate) async fn publish_messages(
    messages: Vec<Message>,
    topic: &str,
    producer: &Producer,
    store: &Store,
) -> (Vec<String>, Vec<(String, String)>) {
    let outgoing = messages
        .into_iter()
        .map(|message| Outgoing {
            message,
            key: None,
            explicit_uuid: true,
        })
        .collect();
    let target = Target {
        topic,
        producer,
        store: Some(store),
        due: None,
    };
    let published = publish(outgoing, &target).await;
    (published.sent, published.failed)
}

/// Records messages to publish at `due`: PENDING rows and outbox messages,
/// which a worker's relay publishes when due. With `--encrypt`, the outbox
/// holds them encrypted already.
async fn schedule(
    outgoing: Vec<Outgoing>,
    topic: &str,
    producer: &Producer,
    store: &Store,
    due: DateTime<Utc>,
) -> Published {
    let outbox: Vec<NewOutbox> = outgoing
        .iter()
        .map(|o| NewOutbox {
            topic: topic.to_owned(),
            message_key: Some(o.key().to_owned()),
            payload: String::from_utf8_lossy(&producer.payload(&o.message)).into_owned(),
            operation_uuid: None,
            available_at: Some(due),
        })
        .collect();
    let messages: Vec<Message> = outgoing.into_iter().map(|o| o.message).collect();
    let mut rows = pending_rows(&messages, topic);
    for row in &mut rows {
        row.next_attempt_at = Some(due);
    }
    let mut published = Published {
        sent: Vec::new(),
        failed: Vec::new(),
        unreachable: false,
    };
    match store.schedule(&rows, &outbox).await {
        Ok(scheduled) => {
            for message in messages {
                if scheduled.contains(&message.uuid) {
                    published.sent.push(message.uuid);
                } else {
                    let why = "a task with this uuid exists already".to_owned();
                    published.failed.push((message.uuid, why));
                }
            }
        }
        Err(err) => {
            let why = format!("could not schedule: {err}");
            published
                .failed
                .extend(messages.into_iter().map(|m| (m.uuid, why.clone())));
        }
    }
    published
}

/// The PENDING rows of messages about to be sent to `topic`.
pub(crate) fn pending_rows(messages: &[Message], topic: &str) -> Vec<NewTask> {
    messages
        .iter()
        .map(|message| {
            let mut row = NewTask::new(
                message.uuid.clone(),
                message.entrypoint.clone(),
                TaskStatus::Pending,
            );
            row.params = serde_json::Value::Object(message.params.clone());
            row.metadata = serde_json::Value::Object(message.metadata.clone());
            row.topic = Some(topic.to_owned());
            row.enqueued_at = Some(chrono::Utc::now());
            row
        })
        .collect()
}
