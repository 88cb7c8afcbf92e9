//! Tasks and operations: listings, details, and the retry, resume and
//! cancel actions the pages share.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{Done, ListQuery};
use crate::message::Message;
use crate::store::{AttemptRow, OperationRow, TaskRow};
use crate::web::console::Console;
use crate::web::extract::{ApiError, ApiPath, ApiQuery, ErrorBody};

/// A task with its earlier failed attempts.
#[derive(Serialize, ToSchema)]
pub(super) struct TaskDetail {
    #[serde(flatten)]
    task: TaskRow,
    attempt_history: Vec<AttemptRow>,
}

/// An operation with its steps, in order.
#[derive(Serialize, ToSchema)]
pub(super) struct OperationDetail {
    #[serde(flatten)]
    operation: OperationRow,
    tasks: Vec<TaskRow>,
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", params(ListQuery),
    responses((status = 200, body = [TaskRow]), (status = 400, body = ErrorBody)))]
pub(super) async fn list_tasks(
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
pub(super) async fn task(
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
pub(super) async fn retry_task(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = retry(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

/// Retries the FAILED task `uuid`; says what it did.
pub(in crate::web) async fn retry(console: &Console, uuid: &str) -> Result<String, ApiError> {
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
pub(super) async fn list_operations(
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
pub(super) async fn operation(
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
pub(super) async fn resume_operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = resume(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(in crate::web) async fn resume(console: &Console, uuid: &str) -> Result<String, ApiError> {
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
pub(super) async fn cancel_operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, ApiError> {
    let message = cancel(&console, &uuid).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(in crate::web) async fn cancel(console: &Console, uuid: &str) -> Result<String, ApiError> {
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
