//! The fleet: workers, the pause, resume and drain actions, entrypoints.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Done;
use crate::store::{Control, ControlAction, WorkerRow};
use crate::web::console::Console;
use crate::web::extract::{ApiError, ApiJson, ErrorBody};

/// The fleet and the controls in force.
#[derive(Serialize, ToSchema)]
pub(super) struct WorkersAnswer {
    workers: Vec<WorkerRow>,
    controls: Vec<Control>,
}

/// The workers of the fleet (LOST when overdue) and the pauses in force.
#[utoipa::path(get, path = "/api/v1/workers", responses((status = 200, body = WorkersAnswer)))]
pub(super) async fn workers(State(console): State<Console>) -> Result<Response, ApiError> {
    let workers = console.store().workers().await?;
    let controls = console.store().controls().await?;
    Ok(axum::Json(WorkersAnswer { workers, controls }).into_response())
}

/// Where a pause or resume applies: a worker, an entrypoint, both, or
/// (neither) every entrypoint on every worker.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::web) struct ControlRequest {
    pub worker: Option<String>,
    pub entrypoint: Option<String>,
}

/// The worker to drain.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainRequest {
    pub worker: String,
}

/// What the fleet actions are.
#[derive(Debug, Clone, Copy)]
pub(in crate::web) enum FleetAction {
    Pause,
    Resume,
    Drain,
}

/// Pauses, resumes or drains, as `kser control` does; says what it did.
pub(in crate::web) async fn steer(
    console: &Console,
    action: FleetAction,
    request: &ControlRequest,
) -> Result<String, ApiError> {
    let store = console.store();
    let worker = request.worker.as_deref().filter(|w| !w.is_empty());
    let entrypoint = request.entrypoint.as_deref().filter(|e| !e.is_empty());
    let rows = store.workers().await?;
    let refused = |err: anyhow::Error| ApiError::bad_request(format!("{err:#}"));
    let scope = format!(
        "{} on {}",
        entrypoint.map_or("every entrypoint".into(), |e| format!("entrypoint {e}")),
        worker.map_or("every worker".into(), |w| format!("worker {w}"))
    );
    let registry = console.registry_view();
    match action {
        FleetAction::Pause => {
            crate::fleet::check_target(worker, entrypoint, &rows, registry).map_err(refused)?;
            let added = store
                .add_control(ControlAction::Pause, worker, entrypoint)
                .await?;
            Ok(if added {
                format!("paused {scope}")
            } else {
                format!("{scope} was paused already")
            })
        }
        FleetAction::Resume => {
            crate::fleet::check_target(worker, entrypoint, &rows, registry).map_err(refused)?;
            let lifted = store.remove_pauses(worker, entrypoint).await?;
            Ok(format!("resumed {scope} ({lifted} pause(s) lifted)"))
        }
        FleetAction::Drain => {
            let worker = worker.ok_or_else(|| ApiError::bad_request("name the worker to drain"))?;
            crate::fleet::check_drain(worker, &rows).map_err(refused)?;
            store
                .add_control(ControlAction::Drain, Some(worker), None)
                .await?;
            Ok(format!(
                "draining worker {worker}: it finishes its running tasks, leaves its group and exits"
            ))
        }
    }
}

/// Holds back new tasks of an entrypoint and/or worker.
#[utoipa::path(post, path = "/api/v1/workers/pause", request_body = ControlRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
pub(super) async fn pause_workers(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ControlRequest>,
) -> Result<Response, ApiError> {
    let message = steer(&console, FleetAction::Pause, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Lifts the pauses within a scope.
#[utoipa::path(post, path = "/api/v1/workers/resume", request_body = ControlRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
pub(super) async fn resume_workers(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ControlRequest>,
) -> Result<Response, ApiError> {
    let message = steer(&console, FleetAction::Resume, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Asks a worker to finish its running tasks, leave its group and exit.
#[utoipa::path(post, path = "/api/v1/workers/drain", request_body = DrainRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
pub(super) async fn drain_worker(
    State(console): State<Console>,
    ApiJson(request): ApiJson<DrainRequest>,
) -> Result<Response, ApiError> {
    let request = ControlRequest {
        worker: Some(request.worker),
        entrypoint: None,
    };
    let message = steer(&console, FleetAction::Drain, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// The registered entrypoints, with their kind, description and the JSON
/// schema of their parameters.
#[utoipa::path(get, path = "/api/v1/entrypoints",
    responses((status = 200, description = "Entrypoints by name", body = [Object])))]
pub(super) async fn entrypoints(State(console): State<Console>) -> Result<Response, ApiError> {
    Ok(axum::Json(console.entrypoints().await?).into_response())
}
