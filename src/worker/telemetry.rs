//! The worker's metrics: what `/metrics` serves (`http.rs`) in the
//! Prometheus text format.
//!
//! The stages record through the `metrics` facade; without `--http` no
//! recorder is installed and each record is a no-op. Python kser's counter
//! `kser_task_result_total{hostname,name,status}` keeps its name and labels,
//! so its dashboards keep working.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::store::NewTask;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Histogram buckets, in seconds: a millisecond to five minutes.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Whether anything records: without `--http` the hooks below return at
/// once instead of building labels for nobody on the hot path.
pub(super) fn recording() -> bool {
    HANDLE.get().is_some_and(Result::is_ok)
}

/// The process's Prometheus recorder: one per process, installed by the
/// first worker that serves HTTP.
pub(super) fn recorder() -> Result<&'static PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .map_err(|err| err.to_string())?
                .install_recorder()
                .map_err(|err| err.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// This machine's name, as Python kser labels its counter.
pub(super) fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    })
}

/// Records the tasks whose final state (or retry) was just written.
pub(super) fn finished<'a>(rows: impl Iterator<Item = &'a NewTask>) {
    if !recording() {
        return;
    }
    for row in rows {
        let name = row.entrypoint.clone();
        counter!("kser_task_result_total",
            "hostname" => hostname(), "name" => name.clone(), "status" => row.status)
        .increment(1);
        let seconds = |from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>| {
            Some((to? - from?).to_std().ok()?.as_secs_f64())
        };
        if let Some(queued) = seconds(row.enqueued_at, row.started_at) {
            histogram!("kser_task_queued_seconds", "entrypoint" => name.clone()).record(queued);
        }
        if let Some(run) = seconds(row.started_at, row.finished_at) {
            histogram!("kser_task_run_seconds", "entrypoint" => name.clone()).record(run);
        }
        if let Some(total) = seconds(row.enqueued_at, row.finished_at) {
            histogram!("kser_task_end_to_end_seconds", "entrypoint" => name).record(total);
        }
    }
}

/// Records failed attempts that will be retried.
pub(super) fn retried<'a>(rows: impl Iterator<Item = &'a NewTask>) {
    if !recording() {
        return;
    }
    for row in rows {
        counter!("kser_task_retries_total", "entrypoint" => row.entrypoint.clone()).increment(1);
    }
}

/// Records records sent to the dead-letter topic, by kind.
pub(super) fn dead_lettered(kind: &'static str) {
    if !recording() {
        return;
    }
    counter!("kser_dead_letters_total", "kind" => kind).increment(1);
}

/// Records how long one database write took.
pub(super) fn wrote(what: &str, took: Duration) {
    if !recording() {
        return;
    }
    histogram!("kser_postgres_write_seconds", "what" => what.to_owned()).record(took.as_secs_f64());
}

/// Records the consumer's lag per assigned partition from librdkafka's
/// statistics: the records after the committed offset (or, before the
/// group's first commit on the partition, after its oldest record).
pub(super) fn lag(stats: &rdkafka::Statistics) {
    for (topic, stats) in &stats.topics {
        for (partition, stats) in &stats.partitions {
            // librdkafka's internal partition, and partitions not ours.
            if *partition < 0 || !stats.desired || stats.hi_offset < 0 {
                continue;
            }
            let lag = if stats.consumer_lag >= 0 {
                stats.consumer_lag
            } else {
                stats.hi_offset - stats.committed_offset.max(stats.lo_offset.max(0))
            };
            gauge!("kser_consumer_lag",
                "topic" => topic.clone(), "partition" => partition.to_string())
            .set(lag.max(0) as f64);
        }
    }
}
