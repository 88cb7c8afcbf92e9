//! The JSON API under `/api/v1/`: what the pages show and do, for scripts.
//! Its OpenAPI document (`/api/v1/openapi.json`) is generated from the
//! handlers by `utoipa`.
//!
//! This file holds the routes, the OpenAPI document, the listing query, the
//! dashboard and the answers to waits; the handlers live by concern in
//! `runs` (tasks and operations), `dead_letters` and `fleet` (workers and
//! entrypoints).

mod dead_letters;
mod fleet;
mod runs;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::console::Console;
use super::extract::{ApiError, ErrorBody};
use crate::store::{
    AttemptRow, Control, EntrypointFailures, MinuteCount, OperationRow, StatusCount, TaskFilter,
    TaskRow, TaskStatus, WorkerRow,
};
pub(super) use dead_letters::{DeadLetterQuery, ReplayRequest, read_dead_letters, replay};
pub(super) use fleet::{ControlRequest, FleetAction, steer};
use fleet::{DrainRequest, WorkersAnswer};
use runs::{OperationDetail, TaskDetail};
pub(super) use runs::{cancel, resume, retry};

/// The most rows one listing answers.
pub(super) const MAX_LIMIT: i64 = 500;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kser console API",
        description = "Tasks, operations, dead letters and workers of a kser deployment; \
            actions that retry, resume, cancel, replay and steer; HTTP ingress. With \
            KSER_HTTP_TOKEN set, send `Authorization: Bearer <token>`."
    ),
    paths(
        runs::list_tasks,
        runs::task,
        runs::retry_task,
        runs::list_operations,
        runs::operation,
        runs::resume_operation,
        runs::cancel_operation,
        dead_letters::dead_letters,
        dead_letters::replay_dead_letters,
        fleet::workers,
        fleet::pause_workers,
        fleet::resume_workers,
        fleet::drain_worker,
        fleet::entrypoints,
        dashboard,
        super::ingress::send,
        super::ingress::topic
    ),
    components(schemas(
        TaskRow,
        OperationRow,
        AttemptRow,
        WorkerRow,
        Control,
        ErrorBody,
        Done,
        StatusCount,
        MinuteCount,
        EntrypointFailures,
        Dashboard,
        ReplayRequest,
        ControlRequest,
        DrainRequest,
        TaskDetail,
        OperationDetail,
        WorkersAnswer,
        super::ingress::SendRequest,
        super::ingress::OneMessage,
        super::ingress::Sent
    ))
)]
struct ApiDoc;

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/tasks", get(runs::list_tasks))
        .route("/api/v1/tasks/{uuid}", get(runs::task))
        .route("/api/v1/tasks/{uuid}/retry", post(runs::retry_task))
        .route("/api/v1/operations", get(runs::list_operations))
        .route("/api/v1/operations/{uuid}", get(runs::operation))
        .route(
            "/api/v1/operations/{uuid}/resume",
            post(runs::resume_operation),
        )
        .route(
            "/api/v1/operations/{uuid}/cancel",
            post(runs::cancel_operation),
        )
        .route("/api/v1/dead-letters", get(dead_letters::dead_letters))
        .route(
            "/api/v1/dead-letters/replay",
            post(dead_letters::replay_dead_letters),
        )
        .route("/api/v1/workers", get(fleet::workers))
        .route("/api/v1/workers/pause", post(fleet::pause_workers))
        .route("/api/v1/workers/resume", post(fleet::resume_workers))
        .route("/api/v1/workers/drain", post(fleet::drain_worker))
        .route("/api/v1/entrypoints", get(fleet::entrypoints))
        .route("/api/v1/dashboard", get(dashboard))
        .route("/api/v1", any(super::extract::api_not_found))
        .route("/api/v1/{*rest}", any(super::extract::api_not_found))
}

async fn openapi() -> Response {
    axum::Json(ApiDoc::openapi()).into_response()
}

/// Which tasks or operations a listing shows.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// PENDING, RUNNING, SUCCESS, FAILED or CANCELLED.
    pub status: Option<String>,
    /// Only this entrypoint.
    pub entrypoint: Option<String>,
    /// Only those recorded at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Only those recorded before this time (RFC 3339): the next page of a
    /// listing starts before the last row shown.
    pub until: Option<DateTime<Utc>>,
    /// How many at most (1 to 500, default 50).
    pub limit: Option<i64>,
    /// Tasks only: leave out the steps of operations.
    pub standalone: Option<bool>,
}

impl ListQuery {
    /// The store's filter, or a 400 naming what is wrong.
    pub(super) fn filter(&self) -> Result<TaskFilter, ApiError> {
        let status = match self.status.as_deref().filter(|s| !s.is_empty()) {
            Some(status) => Some(
                status
                    .parse::<TaskStatus>()
                    .map_err(ApiError::bad_request)?,
            ),
            None => None,
        };
        let limit = self.limit.unwrap_or(50);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be from 1 to {MAX_LIMIT}, not {limit}"
            )));
        }
        Ok(TaskFilter {
            status,
            entrypoint: self.entrypoint.clone().filter(|e| !e.is_empty()),
            limit,
            standalone: self.standalone.unwrap_or(false),
            since: self.since,
            until: self.until,
        })
    }
}

/// What an action did.
#[derive(Serialize, ToSchema)]
pub(super) struct Done {
    /// In words.
    pub message: String,
}

/// What the dashboard shows.
#[derive(Serialize, ToSchema)]
pub(super) struct Dashboard {
    /// By state: tasks that ended SUCCESS or FAILED within the last day;
    /// tasks in another state, and operations, recorded within the last
    /// day.
    pub counts: Vec<StatusCount>,
    /// Tasks ended per minute over the last hour.
    pub throughput: Vec<MinuteCount>,
    /// The entrypoints with the most tasks that ended FAILED within the
    /// last day.
    pub failures: Vec<EntrypointFailures>,
    /// The workers, with their lag and partitions.
    pub workers: Vec<WorkerRow>,
}

pub(super) async fn dashboard_data(console: &Console) -> Result<Dashboard, ApiError> {
    let store = console.store();
    Ok(Dashboard {
        counts: store.status_counts().await?,
        throughput: store.throughput().await?,
        failures: store.failures_by_entrypoint(10).await?,
        workers: store.workers().await?,
    })
}

/// Counts by status, throughput over the last hour, failures by entrypoint
/// and the workers.
#[utoipa::path(get, path = "/api/v1/dashboard", responses((status = 200, body = Dashboard)))]
async fn dashboard(State(console): State<Console>) -> Result<Response, ApiError> {
    Ok(axum::Json(dashboard_data(&console).await?).into_response())
}
