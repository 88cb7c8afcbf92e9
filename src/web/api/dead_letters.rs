//! Dead letters: reading the newest of a topic, and replaying them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::Done;
use crate::dead_letter::DeadLetterEntry;
use crate::web::console::Console;
use crate::web::extract::{ApiError, ApiJson, ApiQuery, ErrorBody};

/// The most dead letters one listing reads.
const MAX_DEAD_LETTERS: usize = 1000;

/// Which dead-letter topic to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(in crate::web) struct DeadLetterQuery {
    /// The source topic (default: the console's); its dead letters are in
    /// `<topic>.dlq` unless `dlq_topic` says otherwise.
    pub topic: Option<String>,
    /// The dead-letter topic itself.
    pub dlq_topic: Option<String>,
}

impl DeadLetterQuery {
    /// The source topic and the dead-letter topic.
    pub(in crate::web) fn topics(&self, console: &Console) -> Result<(String, String), ApiError> {
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
pub(in crate::web) async fn read_dead_letters(
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
pub(super) async fn dead_letters(
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
pub(in crate::web) struct ReplayRequest {
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
pub(super) async fn replay_dead_letters(
    State(console): State<Console>,
    ApiJson(request): ApiJson<ReplayRequest>,
) -> Result<Response, ApiError> {
    let message = replay(&console, &request).await?;
    Ok(axum::Json(Done { message }).into_response())
}

pub(in crate::web) async fn replay(
    console: &Console,
    request: &ReplayRequest,
) -> Result<String, ApiError> {
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
