//! `worker --metrics-topic T`: one small JSON record per finished task,
//! published to a Kafka topic (titanfe's packet metrics), for whoever wants
//! every task's timings rather than Prometheus's histograms.
//!
//! The finisher hands records to a bounded channel and never waits: when
//! the broker is slow and the channel is full, a record is dropped and
//! counted (`kser_metric_records_dropped_total`, and a warning at most every
//! 10 s) instead of slowing the pipeline. A task of its own drains the
//! channel in batches through a producer of its own, so these records never
//! queue behind next steps or dead letters. Without the flag none of this
//! exists and the finisher does nothing more.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::producer::Producer;
use crate::store::NewTask;

/// Records waiting to be published; beyond this they are dropped.
const CAPACITY: usize = 8192;
/// Records published per round.
const BATCH: usize = 1000;
/// How long a stopping worker gives the last records to reach the broker.
const FLUSH_AT_STOP: Duration = Duration::from_secs(5);
/// The least time between two warnings about dropped records.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One finished task, as published to the metrics topic.
#[derive(Debug, Serialize)]
pub(crate) struct MetricRecord {
    pub(crate) uuid: String,
    pub(crate) entrypoint: String,
    pub(crate) worker: String,
    /// SUCCESS or FAILED.
    pub(crate) status: &'static str,
    /// The attempt that ended it (1 for the first).
    pub(crate) attempt: i32,
    /// Record produced -> task started, when both are known.
    pub(crate) queued_ms: Option<f64>,
    /// Task started -> ended.
    pub(crate) run_ms: Option<f64>,
    /// Record produced -> task ended.
    pub(crate) end_to_end_ms: Option<f64>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) operation_uuid: Option<String>,
    /// The W3C trace id of the task, when its message carried a trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) trace_id: Option<String>,
}

impl MetricRecord {
    fn of(row: &NewTask, worker: &Arc<str>) -> Self {
        let ms = |from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| {
            let took = (to? - from?).num_microseconds()?;
            Some(took.max(0) as f64 / 1000.0)
        };
        Self {
            uuid: row.uuid.clone(),
            entrypoint: row.entrypoint.clone(),
            worker: worker.to_string(),
            status: row.status,
            attempt: row.attempts,
            queued_ms: ms(row.enqueued_at, row.started_at),
            run_ms: ms(row.started_at, row.finished_at),
            end_to_end_ms: ms(row.enqueued_at, row.finished_at),
            finished_at: row.finished_at,
            operation_uuid: row.operation_uuid.clone(),
            trace_id: row.trace.map(|trace| trace.trace_id_hex().to_string()),
        }
    }
}

/// The finisher's end of the metrics topic.
pub(crate) struct MetricsTopic {
    records: mpsc::Sender<MetricRecord>,
    worker: Arc<str>,
    dropped: AtomicU64,
    /// When dropped records were last warned about, and how many then.
    warned: Mutex<(Option<Instant>, u64)>,
}

/// The task publishing the records; [`finish`](Self::finish) flushes it.
pub(crate) struct Publisher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsTopic {
    /// Creates the producer and starts publishing to `topic`.
    pub(crate) fn start(
        kafka: &KafkaConfig,
        topic: &str,
        worker: &str,
    ) -> Result<(Self, Publisher), crate::producer::ProducerError> {
        // Records of kser's own, never encrypted.
        let producer = Producer::new(kafka)?.without_secretbox();
        // Shown from the start (at 0), so an alert on it has a series.
        metrics::counter!("kser_metric_records_dropped_total").absolute(0);
        metrics::counter!("kser_metric_records_sent_total").absolute(0);
        let (records, rx) = mpsc::channel(CAPACITY);
        let stop = CancellationToken::new();
        let task = tokio::spawn(publish(producer, topic.to_owned(), rx, stop.clone()));
        let topic = Self {
            records,
            worker: Arc::from(worker),
            dropped: AtomicU64::new(0),
            warned: Mutex::new((None, 0)),
        };
        Ok((topic, Publisher { stop, task }))
    }

    /// Queues a record for each task whose final state was just written;
    /// never waits. A record that finds the queue full is dropped and
    /// counted.
    pub(crate) fn finished<'a>(&self, rows: impl Iterator<Item = &'a NewTask>) {
        let mut dropped = 0;
        for row in rows {
            if self
                .records
                .try_send(MetricRecord::of(row, &self.worker))
                .is_err()
            {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.dropped(dropped);
        }
    }

    fn dropped(&self, n: u64) {
        metrics::counter!("kser_metric_records_dropped_total").increment(n);
        let total = self.dropped.fetch_add(n, AtomicOrdering::Relaxed) + n;
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.0.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                dropped = total - warned.1,
                dropped_total = total,
                "the metrics topic does not keep up (is the broker slow?); dropped metric records"
            );
            *warned = (Some(Instant::now()), total);
        }
    }
}

impl Publisher {
    /// Publishes what is queued (for a few seconds at most), then stops.
    pub(crate) async fn finish(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(FLUSH_AT_STOP, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!("metric records not yet published at shutdown were dropped");
        }
    }
}

/// Publishes records in batches until `stop`, then what is left queued.
async fn publish(
    producer: Producer,
    topic: String,
    mut rx: mpsc::Receiver<MetricRecord>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            biased;
            received = rx.recv_many(&mut batch, BATCH) => received,
            () = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, BATCH).await
            }
        };
        if received == 0 {
            return;
        }
        let payloads: Vec<(Vec<u8>, Vec<u8>)> = batch
            .drain(..)
            .filter_map(|record| {
                let json = serde_json::to_vec(&record).ok()?;
                Some((record.uuid.into_bytes(), json))
            })
            .collect();
        let sends = payloads.iter().map(|(key, json)| {
            producer.send_raw(&topic, Some(key.as_slice()), Some(json.as_slice()))
        });
        let failed = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect::<Vec<_>>();
        let sent = payloads.len() - failed.len();
        metrics::counter!("kser_metric_records_sent_total").increment(sent as u64);
        if let Some(err) = failed.first() {
            metrics::counter!("kser_metric_records_dropped_total").increment(failed.len() as u64);
            tracing::warn!(
                topic = %topic, dropped = failed.len(), error = %err,
                "could not publish metric records; dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TaskStatus;

    #[test]
    fn a_record_says_how_long_the_task_waited_and_ran() {
        let mut row = NewTask::new("u".into(), "e.Task".into(), TaskStatus::Success);
        let t0 = Utc::now();
        row.enqueued_at = Some(t0);
        row.started_at = Some(t0 + chrono::Duration::milliseconds(20));
        row.finished_at = Some(t0 + chrono::Duration::milliseconds(25));
        row.attempts = 2;
        let record = serde_json::to_value(MetricRecord::of(&row, &Arc::from("w:1"))).expect("JSON");
        assert_eq!(record["uuid"], "u");
        assert_eq!(record["entrypoint"], "e.Task");
        assert_eq!(record["worker"], "w:1");
        assert_eq!(record["status"], "SUCCESS");
        assert_eq!(record["attempt"], 2);
        assert_eq!(record["queued_ms"], 20.0);
        assert_eq!(record["run_ms"], 5.0);
        assert_eq!(record["end_to_end_ms"], 25.0);
        assert!(record.get("trace_id").is_none());
        row.enqueued_at = None;
        let record = serde_json::to_value(MetricRecord::of(&row, &Arc::from("w:1"))).expect("JSON");
        assert!(record["queued_ms"].is_null());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (records, _rx) = mpsc::channel(2);
        let topic = MetricsTopic {
            records,
            worker: Arc::from("w"),
            dropped: AtomicU64::new(0),
            warned: Mutex::new((None, 0)),
        };
        let rows: Vec<NewTask> = (0..5)
            .map(|i| NewTask::new(i.to_string(), "e".into(), TaskStatus::Success))
            .collect();
        topic.finished(rows.iter());
        assert_eq!(topic.dropped.load(AtomicOrdering::Relaxed), 3);
    }
}
