//! The dead letters page and its replay action.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::{PageError, PageResult, back, encode, field, form_fields, layout, notice};
use crate::web::api::{DeadLetterQuery, ReplayRequest, read_dead_letters, replay};
use crate::web::console::Console;
use crate::web::extract::ApiQuery;

#[derive(Debug, Default, Deserialize)]
pub(super) struct DeadLetterForm {
    topic: Option<String>,
    dlq_topic: Option<String>,
    notice: Option<String>,
}

pub(super) async fn dead_letters(
    State(console): State<Console>,
    ApiQuery(form): ApiQuery<DeadLetterForm>,
) -> PageResult {
    let query = DeadLetterQuery {
        topic: form.topic.clone(),
        dlq_topic: form.dlq_topic.clone(),
    };
    let (topic, dlq) = query.topics(&console)?;
    let entries = read_dead_letters(&console, &dlq).await?;
    Ok(layout(
        "Dead letters",
        html! {
            h1 { "Dead letters of " (topic) }
            (notice(&form.notice))
            form.filters method="get" action="/dead-letters" {
                label { "Topic " input name="topic" value=(topic); }
                label { "Dead-letter topic " input name="dlq_topic" value=(dlq); }
                button type="submit" { "Show" }
            }
            @if entries.is_empty() {
                p.muted { "No dead letters in " (dlq) "." }
            } @else {
                form method="post" action="/dead-letters/replay" {
                    input type="hidden" name="topic" value=(topic);
                    input type="hidden" name="dlq_topic" value=(dlq);
                    table {
                        thead { tr { th { "" } th { "Id" } th { "Uuid" } th { "From" } th { "Kind" } th { "Error" } th { "Attempts" } th { "Payload" } } }
                        tbody {
                            @for e in &entries {
                                tr {
                                    td { input type="checkbox" name="ids" value=(e.id()); }
                                    td { (e.id()) }
                                    td.uuid {
                                        @if let Some(uuid) = &e.uuid { a href={ "/tasks/" (encode(uuid)) } { (uuid) } }
                                    }
                                    td { (e.topic.as_deref().unwrap_or("-")) ":" (e.partition.map_or("-".into(), |p| p.to_string())) ":" (e.offset.map_or("-".into(), |o| o.to_string())) }
                                    td { (e.error_kind.as_deref().unwrap_or("-")) }
                                    td.error { (e.error.as_deref().unwrap_or("")) }
                                    td.num { (e.attempts.map_or("-".into(), |a| a.to_string())) }
                                    td { pre.preview { (e.payload.as_deref().unwrap_or("")) } }
                                }
                            }
                        }
                    }
                    button type="submit" { "Replay selected" }
                }
            }
        },
    ))
}

pub(super) async fn replay_action(
    State(console): State<Console>,
    body: Bytes,
) -> Result<Response, PageError> {
    let fields = form_fields(&body);
    let request = ReplayRequest {
        ids: fields
            .iter()
            .filter(|(n, _)| n == "ids")
            .map(|(_, v)| v.clone())
            .collect(),
        topic: field(&fields, "topic"),
        dlq_topic: field(&fields, "dlq_topic"),
    };
    let done = replay(&console, &request).await?;
    let mut to = String::from("/dead-letters");
    if let Some(topic) = &request.topic {
        to = format!("{to}?topic={}", encode(topic));
        return Ok(Redirect::to(&format!("{to}&notice={}", encode(&done))).into_response());
    }
    Ok(back(&to, &done))
}
