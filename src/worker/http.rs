//! What a worker tells its operators over HTTP (`worker --http ADDR`), beside
//! the web console (`crate::web`) when the CLI adds it:
//! `/metrics` in the Prometheus text format (recorded by `telemetry.rs`),
//! `/healthz` (the process answers) and `/readyz` (200 only while the
//! worker holds partitions, and Postgres and the broker answer; 503 with
//! the reason otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics::gauge;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use super::error::WorkerError;
use super::shared::Shared;
use super::telemetry::recorder;

/// How often the gauges that need a query (outbox backlog) are refreshed.
const REFRESH: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for Postgres or the broker to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// What [`WorkerConfig::http_routes`](super::WorkerConfig::http_routes) holds: a function that puts more
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
