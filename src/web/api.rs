//! The JSON API under `/api/v1/`: what the pages show and do, for scripts.
//! Its OpenAPI document (`/api/v1/openapi.json`) is generated from the
//! handlers below by `utoipa`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, Console, ErrorBody, json_response};
use crate::dead_letter::DeadLetterEntry;
use crate::message::Message;
use crate::status::Status;
use crate::store::{
    AttemptRow, Control, ControlAction, EntrypointFailures, MinuteCount, OperationRow, StatusCount,
    TaskFilter, TaskRow, TaskStatus, WorkerRow,
};

/// The most rows one listing answers.
pub(super) const MAX_LIMIT: i64 = 500;
/// The most dead letters one listing reads.
const MAX_DEAD_LETTERS: usize = 1000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kser console API",
        description = "Tasks, operations, dead letters and workers of a kser deployment; \
            actions that retry, resume, cancel, replay and steer; HTTP ingress. With \
            KSER_HTTP_TOKEN set, send `Authorization: Bearer <token>`."
    ),
    paths(
        list_tasks,
        task,
        retry_task,
        list_operations,
        operation,
        resume_operation,
        cancel_operation,
        dead_letters,
        replay_dead_letters,
        workers,
        pause_workers,
        resume_workers,
        drain_worker,
        entrypoints,
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
        .route("/api/v1/tasks", get(list_tasks))
        .route("/api/v1/tasks/{uuid}", get(task))
        .route("/api/v1/tasks/{uuid}/retry", post(retry_task))
        .route("/api/v1/operations", get(list_operations))
        .route("/api/v1/operations/{uuid}", get(operation))
        .route("/api/v1/operations/{uuid}/resume", post(resume_operation))
        .route("/api/v1/operations/{uuid}/cancel", post(cancel_operation))
        .route("/api/v1/dead-letters", get(dead_letters))
        .route("/api/v1/dead-letters/replay", post(replay_dead_letters))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/workers/pause", post(pause_workers))
        .route("/api/v1/workers/resume", post(resume_workers))
        .route("/api/v1/workers/drain", post(drain_worker))
        .route("/api/v1/entrypoints", get(entrypoints))
        .route("/api/v1/dashboard", get(dashboard))
        .route("/api/v1", any(super::api_not_found))
        .route("/api/v1/{*rest}", any(super::api_not_found))
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

/// A task with its earlier failed attempts.
#[derive(Serialize, ToSchema)]
struct TaskDetail {
    #[serde(flatten)]
    task: TaskRow,
    attempt_history: Vec<AttemptRow>,
}

/// An operation with its steps, in order.
#[derive(Serialize, ToSchema)]
struct OperationDetail {
    #[serde(flatten)]
    operation: OperationRow,
    tasks: Vec<TaskRow>,
}

/// What an action did.
#[derive(Serialize, ToSchema)]
pub(super) struct Done {
    /// In words.
    pub message: String,
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", params(ListQuery),
    responses((status = 200, body = [TaskRow]), (status = 400, body = ErrorBody)))]
async fn list_tasks(
    State(console): State<Console>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let rows = console.store().list_tasks(&query.filter()?).await?;
    Ok(axum::Json(rows).into_response())
}

/// A task by uuid, with its attempt history.
#[utoipa::path(get, path = "/api/v1/tasks/{uuid}",
    params(("uuid" = String, Path, description = "The task's uuid")),
    responses((status = 200, body = TaskDetail), (status = 404, body = ErrorBody)))]
async fn task(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some(task) = console.store().task(&uuid).await? else {
        return Err(ApiError::not_found(format!("no task {uuid}")));
    };
    let attempt_history = console.store().task_attempts(&uuid).await?;
    Ok(axum::Json(TaskDetail {
        task,
        attempt_history,
    })
    .into_response())
}

/// Runs a FAILED standalone task again: PENDING, and its message sent back
/// to its topic.
#[utoipa::path(post, path = "/api/v1/tasks/{uuid}/retry",
    params(("uuid" = String, Path, description = "The task's uuid")),
    responses((status = 200, body = Done), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Not FAILED, or a step of an operation")))]
async fn retry_task(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = retry(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Retries the FAILED task `uuid`; says what it did.
pub(super) async fn retry(console: &Console, uuid: &str) -> Result<String, ApiError> {
    let store = console.store();
    let Some(task) = store.task(uuid).await? else {
        return Err(ApiError::not_found(format!("no task {uuid}")));
    };
    if let Some(operation) = &task.operation_uuid {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {uuid} is a step of operation {operation}: resume the operation"),
        ));
    }
    let producer = console.producer()?;
    let reset = store.reset_for_replay(&[uuid.to_owned()]).await?;
    let Some(row) = reset.into_iter().next() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "task {uuid} is {}, not FAILED: only a failed task is retried",
                task.status
            ),
        ));
    };
    let topic = row
        .topic
        .clone()
        .unwrap_or_else(|| console.inner.topic.clone());
    let mut message = Message::new(row.entrypoint.clone(), object(&row.params));
    message.uuid = row.uuid.clone();
    message.metadata = object(&row.metadata);
    if let Err(err) = producer.send(&topic, &message).await {
        if let Err(restore) = store.restore_after_replay(&[row]).await {
            tracing::warn!(error = %restore, "could not put back a task whose retry was not sent");
        }
        return Err(ApiError::new(StatusCode::BAD_GATEWAY, err.to_string()));
    }
    Ok(format!("task {uuid} sent again to topic {topic}"))
}

fn object(value: &Value) -> crate::message::JsonObject {
    value.as_object().cloned().unwrap_or_default()
}

/// Operations, newest first.
#[utoipa::path(get, path = "/api/v1/operations", params(ListQuery),
    responses((status = 200, body = [OperationRow]), (status = 400, body = ErrorBody)))]
async fn list_operations(
    State(console): State<Console>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let rows = console.store().list_operations(&query.filter()?).await?;
    Ok(axum::Json(rows).into_response())
}

/// An operation by uuid, with its steps.
#[utoipa::path(get, path = "/api/v1/operations/{uuid}",
    params(("uuid" = String, Path, description = "The operation's uuid")),
    responses((status = 200, body = OperationDetail), (status = 404, body = ErrorBody)))]
async fn operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some(operation) = console.store().operation(&uuid).await? else {
        return Err(ApiError::not_found(format!("no operation {uuid}")));
    };
    let tasks = console.store().operation_tasks(&uuid).await?;
    Ok(axum::Json(OperationDetail { operation, tasks }).into_response())
}

/// Runs a FAILED or CANCELLED operation again from its first unfinished
/// step.
#[utoipa::path(post, path = "/api/v1/operations/{uuid}/resume",
    params(("uuid" = String, Path, description = "The operation's uuid")),
    responses((status = 200, body = Done), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn resume_operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = resume(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(super) async fn resume(console: &Console, uuid: &str) -> Result<String, ApiError> {
    let resumed = console.store().resume_operation(uuid).await?;
    Ok(format!(
        "resumed operation {uuid} from step {} ({})",
        resumed.step, resumed.entrypoint
    ))
}

/// Stops an operation between steps: pending steps never run.
#[utoipa::path(post, path = "/api/v1/operations/{uuid}/cancel",
    params(("uuid" = String, Path, description = "The operation's uuid")),
    responses((status = 200, body = Done), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn cancel_operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = cancel(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(super) async fn cancel(console: &Console, uuid: &str) -> Result<String, ApiError> {
    let running = console.store().cancel_operation(uuid).await?;
    let mut message = format!("cancelled operation {uuid}");
    for step in running {
        message.push_str(&format!(
            "; step {} ({}) is running: it finishes, and starts no next step",
            step.step, step.entrypoint
        ));
    }
    Ok(message)
}

/// Which dead-letter topic to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeadLetterQuery {
    /// The source topic (default: the console's); its dead letters are in
    /// `<topic>.dlq` unless `dlq_topic` says otherwise.
    pub topic: Option<String>,
    /// The dead-letter topic itself.
    pub dlq_topic: Option<String>,
}

impl DeadLetterQuery {
    /// The source topic and the dead-letter topic.
    pub(super) fn topics(&self, console: &Console) -> Result<(String, String), ApiError> {
        let topic = self
            .topic
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| console.inner.topic.clone());
        let dlq = self
            .dlq_topic
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| crate::dead_letter::default_topic(&topic));
        for name in [&topic, &dlq] {
            crate::admin::topic_name(name).map_err(ApiError::bad_request)?;
        }
        Ok((topic, dlq))
    }
}

/// The newest dead letters of a topic (at most 1000), with their headers
/// and a preview of their payload.
pub(super) async fn read_dead_letters(
    console: &Console,
    dlq_topic: &str,
) -> Result<Vec<DeadLetterEntry>, ApiError> {
    // Only the newest of each partition are read, not the whole topic.
    let mut stream = crate::dead_letter::stream_newest(
        console.kafka()?,
        dlq_topic,
        Some(console.store()),
        MAX_DEAD_LETTERS as i64,
    );
    let mut entries = std::collections::VecDeque::new();
    while let Some(mut entry) = stream
        .next()
        .await
        .map_err(|err| ApiError::new(StatusCode::BAD_GATEWAY, err.to_string()))?
    {
        // What the page shows: the raw bytes stay out of memory.
        entry.raw_payload = None;
        entry.raw_key = None;
        if let Some(payload) = &mut entry.payload
            && payload.len() > 4096
        {
            let mut end = 4096;
            while !payload.is_char_boundary(end) {
                end -= 1;
            }
            payload.truncate(end);
            payload.push('…');
        }
        entries.push_back(entry);
        if entries.len() > MAX_DEAD_LETTERS {
            entries.pop_front();
        }
    }
    let mut entries: Vec<_> = entries.into();
    entries.reverse();
    Ok(entries)
}

/// The dead letters of a topic, newest first.
#[utoipa::path(get, path = "/api/v1/dead-letters", params(DeadLetterQuery),
    responses((status = 200, description = "Dead letters, newest first", body = [Object]),
        (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn dead_letters(
    State(console): State<Console>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let (_, dlq) = query.topics(&console)?;
    let entries = read_dead_letters(&console, &dlq).await?;
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut value = serde_json::to_value(e).unwrap_or_default();
            value["id"] = Value::from(e.id());
            value
        })
        .collect();
    Ok(axum::Json(entries).into_response())
}

/// Dead letters to send back.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayRequest {
    /// Message uuids, PARTITION:OFFSET in the dead-letter topic, or pg:ID.
    pub ids: Vec<String>,
    /// The source topic (default: the console's).
    pub topic: Option<String>,
    /// The dead-letter topic (default: `<topic>.dlq`).
    pub dlq_topic: Option<String>,
}

/// Sends dead letters back to their topics; their FAILED tasks become
/// PENDING again.
#[utoipa::path(post, path = "/api/v1/dead-letters/replay", request_body = ReplayRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
async fn replay_dead_letters(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ReplayRequest>,
) -> Result<Response, ApiError> {
    let message = replay(&console, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(super) async fn replay(console: &Console, request: &ReplayRequest) -> Result<String, ApiError> {
    if request.ids.is_empty() || request.ids.len() > MAX_DEAD_LETTERS {
        return Err(ApiError::bad_request(format!(
            "ids: name 1 to {MAX_DEAD_LETTERS} dead letters"
        )));
    }
    let query = DeadLetterQuery {
        topic: request.topic.clone(),
        dlq_topic: request.dlq_topic.clone(),
    };
    let (topic, dlq) = query.topics(console)?;
    let replayed = crate::replay::replay_ids(
        console.kafka()?,
        console.store(),
        &dlq,
        &topic,
        &request.ids,
    )
    .await
    .map_err(|err| ApiError::bad_request(crate::report::error_chain(err.as_ref())))?;
    Ok(format!("replayed {replayed} dead letters"))
}

/// The fleet and the controls in force.
#[derive(Serialize, ToSchema)]
struct WorkersAnswer {
    workers: Vec<WorkerRow>,
    controls: Vec<Control>,
}

/// The workers of the fleet (LOST when overdue) and the pauses in force.
#[utoipa::path(get, path = "/api/v1/workers", responses((status = 200, body = WorkersAnswer)))]
async fn workers(State(console): State<Console>) -> Result<Response, ApiError> {
    let workers = console.store().workers().await?;
    let controls = console.store().controls().await?;
    Ok(axum::Json(WorkersAnswer { workers, controls }).into_response())
}

/// Where a pause or resume applies: a worker, an entrypoint, both, or
/// (neither) every entrypoint on every worker.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ControlRequest {
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
pub(super) enum FleetAction {
    Pause,
    Resume,
    Drain,
}

/// Pauses, resumes or drains, as `kser control` does; says what it did.
pub(super) async fn steer(
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
async fn pause_workers(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ControlRequest>,
) -> Result<Response, ApiError> {
    let message = steer(&console, FleetAction::Pause, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Lifts the pauses within a scope.
#[utoipa::path(post, path = "/api/v1/workers/resume", request_body = ControlRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
async fn resume_workers(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ControlRequest>,
) -> Result<Response, ApiError> {
    let message = steer(&console, FleetAction::Resume, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Asks a worker to finish its running tasks, leave its group and exit.
#[utoipa::path(post, path = "/api/v1/workers/drain", request_body = DrainRequest,
    responses((status = 200, body = Done), (status = 400, body = ErrorBody)))]
async fn drain_worker(
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
async fn entrypoints(State(console): State<Console>) -> Result<Response, ApiError> {
    Ok(axum::Json(console.entrypoints().await?).into_response())
}

/// What the dashboard shows.
#[derive(Serialize, ToSchema)]
pub(super) struct Dashboard {
    /// Tasks and operations recorded within the last day, by state.
    pub counts: Vec<StatusCount>,
    /// Tasks ended per minute over the last hour.
    pub throughput: Vec<MinuteCount>,
    /// The entrypoints with the most failures within the last day.
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

/// The answer to a wait: the status object, 200 on SUCCESS, 422 on FAILED
/// or CANCELLED.
pub(super) fn ended(status: &Status) -> Response {
    let code = match status.outcome() {
        Some(TaskStatus::Success) => StatusCode::OK,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    json_response(code, status.to_json())
}

/// The answer to a wait that timed out: 504 with what was last seen.
pub(super) fn timed_out(uuid: &str, last: Option<&Status>) -> Response {
    let mut body = last.map_or_else(
        || json!({"uuid": uuid, "status": TaskStatus::Pending.as_str()}),
        Status::to_json,
    );
    body["error"] = Value::from(format!(
        "{uuid} did not end in time; it goes on: GET /api/v1/tasks/{uuid} or /api/v1/operations/{uuid}"
    ));
    json_response(StatusCode::GATEWAY_TIMEOUT, body)
}
