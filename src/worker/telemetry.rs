//! What a worker tells its operators over HTTP (`worker --http ADDR`), beside
//! the web console (`crate::web`) when the CLI adds it:
//! `/metrics` in the Prometheus text format, `/healthz` (the process
//! answers) and `/readyz` (200 only while the worker holds partitions, and
//! Postgres and the broker answer; 503 with the reason otherwise).
//!
//! The stages record through the `metrics` facade; without `--http` no
//! recorder is installed and each record is a no-op. Python kser's counter
//! `kser_task_result_total{hostname,name,status}` keeps its name and labels,
//! so its dashboards keep working.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::*;

/// Histogram buckets, in seconds: a millisecond to five minutes.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How often the gauges that need a query (outbox backlog) are refreshed.
const REFRESH: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for Postgres or the broker to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Whether anything records: without `--http` the hooks below return at
/// once instead of building labels for nobody on the hot path.
fn recording() -> bool {
    HANDLE.get().is_some_and(Result::is_ok)
}

/// The process's Prometheus recorder: one per process, installed by the
/// first worker that serves HTTP.
fn recorder() -> Result<&'static PrometheusHandle, String> {
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
fn hostname() -> &'static str {
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

impl Shared {
    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener`, and
    /// refreshes the gauges that need a query.
    /// `/readyz` says "stopping" once `shutdown` is cancelled; the server
    /// answers until `stop` is.
    pub(super) async fn serve_http(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        routes: Option<HttpRoutes>,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) {
        let refresh = tokio::spawn(Arc::clone(&self).refresh_gauges());
        let app = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state((Arc::clone(&self), shutdown));
        let app = match routes {
            Some(routes) => (routes.0)(app),
            None => app,
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::warn!(error = %err, "the HTTP server stopped");
        }
        refresh.abort();
    }

    /// Keeps the outbox and in-flight gauges current.
    async fn refresh_gauges(self: Arc<Self>) {
        loop {
            // Started (claimed), not those waiting for their turn or a slot.
            let started = self
                .lock_in_flight()
                .values()
                .filter(|task| task.attempt.is_some())
                .count();
            gauge!("kser_tasks_in_flight").set(started as f64);
            match self.store.outbox_backlog().await {
                Ok((rows, oldest)) => {
                    gauge!("kser_outbox_backlog").set(rows as f64);
                    gauge!("kser_outbox_oldest_seconds").set(oldest);
                }
                Err(err) => tracing::debug!(error = %err, "could not read the outbox backlog"),
            }
            tokio::time::sleep(REFRESH).await;
        }
    }

    /// Why the worker is not ready, or `None` when it is.
    async fn not_ready(&self, stopping: &CancellationToken) -> Option<String> {
        if stopping.is_cancelled() {
            return Some("the worker is stopping".into());
        }
        let consumer = self.consumer();
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        if assigned == 0 {
            return Some("no partitions assigned (joining the group?)".into());
        }
        let database = tokio::time::timeout(PROBE_TIMEOUT, self.store.ping()).await;
        match database {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Some(format!("Postgres does not answer: {err}")),
            Err(_) => {
                return Some(format!(
                    "Postgres does not answer within {}s",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
        }
        let broker = tokio::task::spawn_blocking(move || {
            consumer
                .client()
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map(|_| ())
        })
        .await;
        match broker {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(format!("the broker does not answer: {err}")),
            Err(err) => Some(format!("the broker probe failed: {err}")),
        }
    }
}

type AppState = (Arc<Shared>, CancellationToken);

/// What [`WorkerConfig::http_routes`] holds: a function that puts more
/// routes around the worker's own (the web console, with its token check).
#[derive(Clone)]
pub struct HttpRoutes(Arc<dyn Fn(Router) -> Router + Send + Sync>);

impl HttpRoutes {
    /// Routes built by `wrap` around the worker's `/metrics`, `/healthz`
    /// and `/readyz`.
    pub fn new(wrap: impl Fn(Router) -> Router + Send + Sync + 'static) -> Self {
        Self(Arc::new(wrap))
    }
}

impl std::fmt::Debug for HttpRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpRoutes")
    }
}

async fn render_metrics() -> (StatusCode, String) {
    match recorder() {
        Ok(handle) => (StatusCode::OK, handle.render()),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

async fn ready(State((shared, stopping)): State<AppState>) -> (StatusCode, String) {
    match shared.not_ready(&stopping).await {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Opens the HTTP listener and installs the recorder, so a port in use or a
/// bad address stops the worker before it joins its group.
pub(super) async fn listen(address: SocketAddr) -> Result<tokio::net::TcpListener, WorkerError> {
    recorder().map_err(|err| WorkerError::Config(format!("metrics recorder: {err}")))?;
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|err| WorkerError::Config(format!("cannot serve HTTP on {address}: {err}")))
}
