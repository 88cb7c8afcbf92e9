//! HTTP producers: `POST /api/v1/send` publishes kser messages (and, with
//! `?wait=`, answers with their outcome: request/reply over HTTP), and
//! `POST /topic/{topic}` takes what Python kser's HTTP producer
//! (`kser.http.Producer`, kser 0.8.27) sends.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};

use super::console::Console;
use super::extract::{
    ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody, ended, json_response, timed_out,
};
use crate::message::{JsonObject, Message};
use crate::status::Waited;

/// The most messages one request may send.
const MAX_BATCH: usize = 10_000;
/// The longest `?wait=`.
const MAX_WAIT: Duration = Duration::from_secs(300);

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/api/v1/send", post(send))
        .route("/topic/{topic}", post(topic))
}

/// One message to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct OneMessage {
    /// The registered name to run, e.g. `dice.DiceRoll`.
    pub entrypoint: String,
    /// Its parameters.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: JsonObject,
    /// Free context, passed through to the task.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: JsonObject,
    /// The message uuid (default: a new UUID4).
    #[serde(default)]
    pub uuid: Option<String>,
}

/// One message, or a batch of them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub(super) enum SendRequest {
    One(OneMessage),
    Many(Vec<OneMessage>),
}

/// Where to send, and whether to wait.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SendQuery {
    /// The topic (default: the console's).
    pub topic: Option<String>,
    /// Wait this long (e.g. `15s`, at most `5m`) for the task or operation
    /// to end, and answer with its status object.
    pub wait: Option<String>,
}

/// What was sent.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Sent {
    /// The uuids sent, in the order given.
    pub uuids: Vec<String>,
    /// Those not sent, with why.
    pub failed: Vec<Value>,
}

impl OneMessage {
    fn into_message(self) -> Result<Message, ApiError> {
        if self.entrypoint.trim().is_empty() {
            return Err(ApiError::bad_request("entrypoint must not be empty"));
        }
        let mut message = Message::new(self.entrypoint, self.params);
        message.metadata = self.metadata;
        if let Some(uuid) = self.uuid {
            if uuid.trim().is_empty() {
                return Err(ApiError::bad_request("uuid must not be empty"));
            }
            message.uuid = uuid;
        }
        Ok(message)
    }
}

/// Publishes kser messages and returns their uuids; with `?wait=`, waits
/// for them to end.
///
/// Without `wait`: 200 `{"uuids": [...], "failed": []}`. With `wait`, one
/// message: its status object, 200 on SUCCESS, 422 on FAILED or CANCELLED,
/// 504 when the wait passes first (the work goes on); a batch: an array of
/// them, with the worst of those codes.
#[utoipa::path(post, path = "/api/v1/send", params(SendQuery), request_body = SendRequest,
    responses(
        (status = 200, description = "Sent (or, with wait, ended in SUCCESS)", body = Sent),
        (status = 400, body = ErrorBody),
        (status = 409, description = "A uuid is taken by another message", body = Sent),
        (status = 422, description = "With wait: FAILED or CANCELLED", body = Object),
        (status = 504, description = "With wait: still running when the wait passed", body = Object)))]
pub(super) async fn send(
    State(console): State<Console>,
    ApiQuery(query): ApiQuery<SendQuery>,
    ApiJson(request): ApiJson<SendRequest>,
) -> Result<Response, ApiError> {
    let wait = match query.wait.as_deref().filter(|w| !w.is_empty()) {
        Some(text) => Some(parse_wait(text)?),
        None => None,
    };
    let (single, requested) = match request {
        SendRequest::One(one) => (true, vec![one]),
        SendRequest::Many(many) => (false, many),
    };
    if requested.is_empty() || requested.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "send 1 to {MAX_BATCH} messages"
        )));
    }
    let messages = requested
        .into_iter()
        .map(OneMessage::into_message)
        .collect::<Result<Vec<_>, _>>()?;
    let topic = choose_topic(&console, query.topic.as_deref())?;
    let (uuids, failed) = publish(&console, messages, &topic).await?;
    if !failed.is_empty() {
        return Ok(not_all_sent(uuids, failed));
    }
    let Some(wait) = wait else {
        return Ok(axum::Json(Sent {
            uuids,
            failed: Vec::new(),
        })
        .into_response());
    };
    let deadline = Instant::now() + wait;
    let mut answers = Vec::with_capacity(uuids.len());
    for uuid in &uuids {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = match crate::status::wait(console.store(), uuid, left).await? {
            Waited::Ended(status) => ended(&status),
            Waited::TimedOut(last) => timed_out(uuid, last.as_ref()),
        };
        answers.push(answer);
    }
    if single && let Some(answer) = answers.pop() {
        return Ok(answer);
    }
    // The worst code of the batch: a timeout, else a failure, else 200.
    let mut code = StatusCode::OK;
    let mut bodies = Vec::with_capacity(answers.len());
    for answer in answers {
        let status = answer.status();
        if status == StatusCode::GATEWAY_TIMEOUT
            || (status == StatusCode::UNPROCESSABLE_ENTITY && code == StatusCode::OK)
        {
            code = status;
        }
        let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        bodies.push(serde_json::from_slice::<Value>(&bytes).unwrap_or_default());
    }
    Ok(json_response(code, Value::Array(bodies)))
}

/// `?wait=`: a duration such as `15s` or `2m`, a bare number of seconds.
fn parse_wait(text: &str) -> Result<Duration, ApiError> {
    let parsed = match text.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Duration::try_from_secs_f64(seconds).ok()
        }
        Ok(_) => None,
        Err(_) => humantime::parse_duration(text.trim()).ok(),
    };
    match parsed {
        Some(wait) if wait <= MAX_WAIT => Ok(wait),
        Some(_) => Err(ApiError::bad_request(format!(
            "wait is at most {}",
            humantime::format_duration(MAX_WAIT)
        ))),
        None => Err(ApiError::bad_request(format!(
            "wait must be a duration such as 15s or 2m, not '{text}'"
        ))),
    }
}

/// The topic asked for (a valid Kafka name) or the console's.
fn choose_topic(console: &Console, asked: Option<&str>) -> Result<String, ApiError> {
    match asked.filter(|t| !t.is_empty()) {
        Some(topic) => crate::admin::topic_name(topic).map_err(ApiError::bad_request),
        None => Ok(console.inner.topic.clone()),
    }
}

/// Records the messages PENDING and publishes them, as `send` does.
async fn publish(
    console: &Console,
    messages: Vec<Message>,
    topic: &str,
) -> Result<(Vec<String>, Vec<(String, String)>), ApiError> {
    let producer = console.producer()?;
    console.ensure_topic(topic).await?;
    Ok(crate::publish::publish_messages(messages, topic, producer, console.store()).await)
}

/// 409 when messages were refused for taking another's uuid, 502 when the
/// broker did not take them.
fn not_all_sent(uuids: Vec<String>, failed: Vec<(String, String)>) -> Response {
    let conflict = failed.iter().all(|(_, why)| why.contains("uuid"));
    let code = if conflict {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let failed = failed
        .into_iter()
        .map(|(uuid, error)| json!({"uuid": uuid, "error": error}))
        .collect();
    (code, axum::Json(Sent { uuids, failed })).into_response()
}

/// Python kser's HTTP producer's query: `format=raw` for one message.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TopicQuery {
    /// `raw`: the body is one message; otherwise a list of `{"Value": message}`.
    pub format: Option<String>,
}

/// One record of Python kser's bulk form.
#[derive(Debug, Deserialize)]
struct BulkRecord {
    #[serde(rename = "Value")]
    value: Message,
}

/// Publishes what Python kser's `kser.http.Producer` sends: one message
/// (`?format=raw`) or a list of `{"Value": message}` (`bulk_send`).
/// Answers `{"uuids": [...], "failed": [...]}`, which its client parses.
#[utoipa::path(post, path = "/topic/{topic}",
    params(("topic" = String, Path, description = "The topic to publish to"), TopicQuery),
    request_body(content = Object, description = "A kser message, or a list of {\"Value\": message}"),
    responses((status = 200, body = Sent), (status = 400, body = ErrorBody)))]
pub(super) async fn topic(
    State(console): State<Console>,
    ApiPath(topic): ApiPath<String>,
    ApiQuery(query): ApiQuery<TopicQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let topic = crate::admin::topic_name(&topic).map_err(ApiError::bad_request)?;
    let messages: Vec<Message> = if query.format.as_deref() == Some("raw") {
        vec![serde_json::from_value(body).map_err(|err| ApiError::bad_request(err.to_string()))?]
    } else {
        let records: Vec<BulkRecord> = serde_json::from_value(body).map_err(|err| {
            ApiError::bad_request(format!("expected [{{\"Value\": message}}]: {err}"))
        })?;
        records.into_iter().map(|r| r.value).collect()
    };
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "send 1 to {MAX_BATCH} messages"
        )));
    }
    if let Some(bad) = messages
        .iter()
        .find(|m| m.entrypoint.trim().is_empty() || m.uuid.trim().is_empty())
    {
        return Err(ApiError::bad_request(format!(
            "message '{}' lacks an entrypoint or a uuid",
            bad.uuid
        )));
    }
    let (uuids, failed) = publish(&console, messages, &topic).await?;
    if !failed.is_empty() {
        return Ok(not_all_sent(uuids, failed));
    }
    Ok(axum::Json(Sent {
        uuids,
        failed: Vec::new(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_bounded_durations() {
        assert_eq!(parse_wait("15s").ok(), Some(Duration::from_secs(15)));
        assert_eq!(parse_wait("2").ok(), Some(Duration::from_secs(2)));
        assert_eq!(parse_wait("250ms").ok(), Some(Duration::from_millis(250)));
        for bad in ["soon", "-1", "NaN", "1h", "1e300"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_message_or_a_batch() {
        let one: SendRequest =
            serde_json::from_str(r#"{"entrypoint": "e", "params": {"a": 1}}"#).expect("one");
        assert!(matches!(one, SendRequest::One(_)));
        let many: SendRequest =
            serde_json::from_str(r#"[{"entrypoint": "e"}, {"entrypoint": "f"}]"#).expect("many");
        assert!(matches!(many, SendRequest::Many(ref m) if m.len() == 2));
        assert!(serde_json::from_str::<SendRequest>(r#"{"entrypoint": "e", "x": 1}"#).is_err());
    }
}
