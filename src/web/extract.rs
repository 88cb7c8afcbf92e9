//! What handlers take and give back: extractors that answer malformed
//! input 4xx with a JSON error (never a 500), the error itself, and JSON
//! answers.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::status::Status;
use crate::store::{StoreError, TaskStatus};

/// The largest request body taken (a batch of messages included).
pub(super) const MAX_BODY_BYTES: usize = 16 << 20;

/// An error answered as `{"error": "..."}` with its status code.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let status = match &err {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            err if err.is_connection_error() => StatusCode::SERVICE_UNAVAILABLE,
            _ => {
                tracing::warn!(error = %err, "a console query failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, err.to_string())
    }
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, in words.
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// `axum::Json` whose refusals (malformed, wrong type, too large) are
/// answered as JSON errors.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// `axum::extract::Query` answering refusals as JSON errors.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// `axum::extract::Path` answering refusals as JSON errors.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// A JSON answer with its status code.
pub(super) fn json_response(status: StatusCode, value: Value) -> Response {
    (status, axum::Json(value)).into_response()
}

/// `{"error": ...}` for routes that do not exist under `/api/`.
pub(super) async fn api_not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({"error": "no such route"}))
}

/// The answer to a wait: the status object, 200 on SUCCESS, 422 on FAILED
/// or CANCELLED.
pub(crate) fn ended(status: &Status) -> Response {
    let code = match status.outcome() {
        Some(TaskStatus::Success) => StatusCode::OK,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    json_response(code, status.to_json())
}

/// The answer to a wait that timed out: 504 with what was last seen.
pub(crate) fn timed_out(uuid: &str, last: Option<&Status>) -> Response {
    let mut body = last.map_or_else(
        || json!({"uuid": uuid, "status": TaskStatus::Pending.as_str()}),
        Status::to_json,
    );
    body["error"] = Value::from(format!(
        "{uuid} did not end in time; it goes on: GET /api/v1/tasks/{uuid} or /api/v1/operations/{uuid}"
    ));
    json_response(StatusCode::GATEWAY_TIMEOUT, body)
}
