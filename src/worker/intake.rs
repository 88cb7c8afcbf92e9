//! Stage 1, intake: reads records from Kafka into the pipeline and tracks
//! their offsets; keeps serving the consumer while the worker stops; rebuilds
//! a consumer that hit a fatal error.

use super::context::KserContext;
use super::decode;
use super::pipeline::{
    Original, REBUILD_DELAY_MAX, REBUILD_DELAY_MIN, Received, STALL_BEFORE_PAUSE,
};
use super::settings::record_cost;
use super::shared::{Counters, Shared};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::VecDeque;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl Shared {
    /// Stage 1: feeds the pipeline with records until shutdown, then keeps
    /// serving the consumer (rebalances, heartbeats) until the worker closes
    /// it, so a stopping worker never holds up its group.
    pub(super) async fn intake(
        self: Arc<Self>,
        intake_tx: mpsc::Sender<Received>,
        shutdown: CancellationToken,
        stop_polling: CancellationToken,
    ) {
        self.feed(intake_tx, &shutdown).await;
        let consumer = self.consumer();
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        let mut ignored = 0_u64;
        loop {
            tokio::select! {
                biased;
                () = stop_polling.cancelled() => break,
                record = consumer.recv() => match record {
                    // Not tracked: the partition's next owner reads it again.
                    Ok(_) => ignored += 1,
                    Err(_) if consumer.client().fatal_error().is_some() => break,
                    Err(err) => {
                        tracing::debug!(error = %err, "Kafka consumer error while stopping");
                        tokio::select! {
                            () = stop_polling.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                }
            }
        }
        if ignored > 0 {
            tracing::debug!(
                ignored,
                "records fetched while stopping were left for the next owner of their partitions"
            );
        }
    }

    /// Reads records into the pipeline until shutdown; rebuilds the consumer
    /// when it hits a fatal error.
    pub(super) async fn feed(
        &self,
        intake_tx: mpsc::Sender<Received>,
        shutdown: &CancellationToken,
    ) {
        let mut consumer = self.consumer();
        let mut topic_names: Vec<Arc<str>> = Vec::new();
        // Records that arrived while fetching was paused (partitions
        // assigned meanwhile are not paused): handed over first.
        let mut stash: VecDeque<Received> = VecDeque::new();
        let mut rebuild_delay = REBUILD_DELAY_MIN;
        loop {
            let received = match stash.pop_front() {
                Some(received) => received,
                None => {
                    let record = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        record = consumer.recv() => record,
                    };
                    let error = match record {
                        Ok(record) => {
                            rebuild_delay = REBUILD_DELAY_MIN;
                            Ok(self.received(&record, &mut topic_names))
                        }
                        Err(err) => Err(err),
                    };
                    match error {
                        Ok(received) => received,
                        Err(_) if consumer.client().fatal_error().is_some() => {
                            let fatal = consumer.client().fatal_error();
                            let Some(fresh) =
                                self.rebuild(fatal, &mut rebuild_delay, shutdown).await
                            else {
                                return;
                            };
                            let old = std::mem::replace(&mut consumer, fresh);
                            // Closing a consumer blocks; keep it off the runtime.
                            tokio::task::spawn_blocking(move || drop(old));
                            continue;
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "Kafka consumer error; the client retries by itself");
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                            }
                        }
                    }
                }
            };
            // The record's share of the byte budget, then a place in the
            // channel: a pipeline full of large records waits like a full
            // channel.
            let cost = record_cost(
                received.original.key.as_ref().map_or(0, Vec::len),
                received.original.payload.as_ref().map_or(0, Vec::len),
                self.buffered_budget,
            );
            let ready = async {
                let budget = Arc::clone(&self.buffered).acquire_many_owned(cost).await;
                (budget, intake_tx.reserve().await)
            };
            let mut ready = std::pin::pin!(ready);
            let waited = tokio::select! {
                () = shutdown.cancelled() => return,
                ready = tokio::time::timeout(STALL_BEFORE_PAUSE, &mut ready) => ready,
            };
            let (budget, permit) = match waited {
                Ok((budget, Ok(permit))) => (budget, permit),
                Ok((_, Err(_))) => return,
                // The pipeline stays full (the database is away, tasks are
                // slow): stop fetching, but keep polling so the consumer
                // group does not take this worker for dead.
                Err(_) => {
                    let paused = consumer.assignment().unwrap_or_default();
                    if consumer.pause(&paused).is_ok() {
                        tracing::warn!(
                            "the pipeline is full (is the database away? are entrypoints paused?); pausing fetch until it drains"
                        );
                    }
                    let (budget, permit) = loop {
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return,
                            ready = &mut ready => break ready,
                            record = consumer.recv() => {
                                if let Ok(record) = record {
                                    stash.push_back(self.received(&record, &mut topic_names));
                                }
                            }
                        }
                    };
                    let Ok(permit) = permit else { return };
                    if consumer.resume(&paused).is_ok() {
                        tracing::info!("the pipeline drains again; resuming fetch");
                    }
                    (budget, permit)
                }
            };
            // Given back when the last copy of the record is dropped: once
            // its outcome is durable (and dead-lettered).
            if let Ok(budget) = budget {
                let _ = received.original.budget.set(budget);
            }
            permit.send(received);
        }
    }

    /// Replaces a consumer that hit a fatal error (librdkafka cannot go on
    /// with it) with a new one, after a backoff that grows while the error
    /// comes back. Everything the old one received is forgotten: it will be
    /// delivered again. `None` on shutdown.
    pub(super) async fn rebuild(
        &self,
        fatal: Option<(RDKafkaErrorCode, String)>,
        delay: &mut Duration,
        shutdown: &CancellationToken,
    ) -> Option<Arc<StreamConsumer<KserContext>>> {
        let (code, reason) = fatal.unwrap_or((RDKafkaErrorCode::Fatal, String::new()));
        let hint = if code == RDKafkaErrorCode::UnreleasedInstanceId {
            "; its group.instance.id is still held by an earlier member (one killed before it \
             could leave?) until the broker's session timeout releases it"
        } else {
            ""
        };
        tracing::error!(
            error_code = ?code, error = %reason, retry_in_ms = delay.as_millis() as u64,
            "the Kafka consumer hit a fatal error and cannot go on; building a new one{hint}"
        );
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .revoke_all();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(*delay) => {}
            }
            *delay = (*delay * 2).min(REBUILD_DELAY_MAX);
            match self.spec.create(&self.tracker) {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    *self
                        .consumer
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
                    tracing::info!("new Kafka consumer created; joining the group again");
                    return Some(fresh);
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "could not create the Kafka consumer; retrying");
                }
            }
        }
    }

    /// Tracks a record's offset and copies what the pipeline needs of it.
    pub(super) fn received(
        &self,
        record: &rdkafka::message::BorrowedMessage<'_>,
        topic_names: &mut Vec<Arc<str>>,
    ) -> Received {
        let topic = match topic_names.iter().find(|t| t.as_ref() == record.topic()) {
            Some(topic) => Arc::clone(topic),
            None => {
                let topic: Arc<str> = Arc::from(record.topic());
                topic_names.push(Arc::clone(&topic));
                topic
            }
        };
        let position = self
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .track(&topic, record.partition(), record.offset());
        Counters::add(&self.counters.received, 1);
        let millis = record.timestamp().to_millis();
        Received {
            position,
            original: Arc::new(Original {
                key: record.key().map(<[u8]>::to_vec),
                payload: record.payload().map(<[u8]>::to_vec),
                timestamp: millis,
                budget: std::sync::OnceLock::new(),
                trace: record.headers().and_then(crate::trace::header),
            }),
            timestamp: decode::storable_timestamp(millis),
        }
    }
}
