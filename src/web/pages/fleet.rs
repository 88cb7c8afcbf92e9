//! The workers page (pause, resume, drain) and the entrypoints page (send a
//! message).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use maud::{Markup, html};
use serde_json::Value;

use super::{
    Notice, PageError, PageResult, back, encode, field, form_fields, json_block, layout, notice,
    status_badge,
};
use crate::store::WorkerRow;
use crate::web::api::{ControlRequest, FleetAction, steer};
use crate::web::console::Console;
use crate::web::extract::{ApiError, ApiQuery};

pub(super) async fn workers(
    State(console): State<Console>,
    ApiQuery(n): ApiQuery<Notice>,
) -> PageResult {
    let rows = console.store().workers().await?;
    let controls = console.store().controls().await?;
    Ok(layout(
        "Workers",
        html! {
            h1 { "Workers" }
            (notice(&n.notice))
            (workers_table(&rows, true))
            h2 { "Controls in force" }
            @if controls.is_empty() {
                p.muted { "None." }
            } @else {
                ul {
                    @for c in &controls {
                        li { (c.action) " " (c.entrypoint.as_deref().unwrap_or("every entrypoint")) " on " (c.worker_id.as_deref().unwrap_or("every worker")) }
                    }
                }
            }
            h2 { "Pause or resume an entrypoint" }
            form.filters method="post" action="/workers/control" {
                label { "Entrypoint " input name="entrypoint" placeholder="every one"; }
                label { "Worker " input name="worker" placeholder="every one"; }
                button type="submit" name="action" value="pause" { "Pause" }
                button type="submit" name="action" value="resume" { "Resume" }
            }
        },
    ))
}

pub(super) fn workers_table(rows: &[WorkerRow], actions: bool) -> Markup {
    let now = Utc::now();
    html! {
        @if rows.is_empty() {
            p.muted { "No workers have registered." }
        } @else {
            table {
                thead { tr { th { "Worker" } th { "Group" } th { "State" } th { "Paused" } th { "Partitions" } th { "In flight" } th { "Lag" } th { "Per second" } th { "Heartbeat" } @if actions { th { "" } } } }
                tbody {
                    @for w in rows {
                        tr {
                            td { (w.id) }
                            td { (w.group) }
                            td { (status_badge(&w.state)) }
                            td { @if w.paused.is_empty() { "-" } @else { (w.paused.join(", ")) } }
                            td { (partitions(&w.assigned)) }
                            td.num { (w.in_flight) }
                            td.num { (w.lag.map_or("-".into(), |l| l.to_string())) }
                            td.num { (format!("{:.1}", w.throughput)) }
                            td { ((now - w.heartbeat_at).num_seconds().max(0)) " s ago" }
                            @if actions {
                                td.actions {
                                    @if w.is_live() {
                                        form method="post" action="/workers/control" {
                                            input type="hidden" name="worker" value=(w.id);
                                            button type="submit" name="action" value="pause" { "Pause" }
                                            button type="submit" name="action" value="resume" { "Resume" }
                                            button.danger type="submit" name="action" value="drain" { "Drain" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `topic[0,1] other[2]` from a worker's assignment (`{topic: [partitions]}`
/// or a list of `{topic, partition}`).
fn partitions(assigned: &Value) -> String {
    match assigned {
        Value::Object(map) if !map.is_empty() => map
            .iter()
            .map(|(topic, parts)| {
                let parts: Vec<String> = parts
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p.to_string())
                    .collect();
                format!("{topic}[{}]", parts.join(","))
            })
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(list) if !list.is_empty() => list
            .iter()
            .map(|p| match (p.get("topic"), p.get("partition")) {
                (Some(Value::String(t)), Some(n)) => format!("{t}[{n}]"),
                _ => p.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => "-".to_owned(),
    }
}

pub(super) async fn control_action(
    State(console): State<Console>,
    body: Bytes,
) -> Result<Response, PageError> {
    let fields = form_fields(&body);
    let action = match field(&fields, "action").as_deref() {
        Some("pause") => FleetAction::Pause,
        Some("resume") => FleetAction::Resume,
        Some("drain") => FleetAction::Drain,
        _ => return Err(ApiError::bad_request("action must be pause, resume or drain").into()),
    };
    let request = ControlRequest {
        worker: field(&fields, "worker"),
        entrypoint: field(&fields, "entrypoint"),
    };
    let done = steer(&console, action, &request).await?;
    Ok(back("/workers", &done))
}

pub(super) async fn entrypoints(
    State(console): State<Console>,
    ApiQuery(n): ApiQuery<Notice>,
) -> PageResult {
    let entries = console.entrypoints().await?;
    let name = |e: &Value| {
        e.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    Ok(layout(
        "Entrypoints",
        html! {
            h1 { "Entrypoints" }
            (notice(&n.notice))
            @if entries.is_empty() {
                p.muted { "No entrypoints: start a worker, which registers its own." }
            } @else {
                h2 { "Send a message" }
                form.send method="post" action="/entrypoints/send" {
                    label { "Entrypoint "
                        select name="entrypoint" {
                            @for e in &entries { option value=(name(e)) { (name(e)) } }
                        }
                    }
                    label { "Parameters (JSON) " textarea name="params" rows="4" { "{}" } }
                    label { "Topic " input name="topic" placeholder=(console.inner.topic); }
                    button type="submit" { "Send" }
                }
                @for e in &entries {
                    section.entrypoint id=(name(e)) {
                        h2 { (name(e)) " " span.muted { (e.get("kind").and_then(Value::as_str).unwrap_or("")) } }
                        @if let Some(description) = e.get("description").and_then(Value::as_str).filter(|d| !d.is_empty()) {
                            p { (description) }
                        }
                        details { summary { "Parameter schema" } (json_block(e.get("params_schema").unwrap_or(&Value::Null))) }
                    }
                }
            }
        },
    ))
}

pub(super) async fn send_action(
    State(console): State<Console>,
    body: Bytes,
) -> Result<Response, PageError> {
    let fields = form_fields(&body);
    let entrypoint = field(&fields, "entrypoint")
        .ok_or_else(|| ApiError::bad_request("choose an entrypoint"))?;
    let params = field(&fields, "params").unwrap_or_else(|| "{}".to_owned());
    let params: crate::message::JsonObject = serde_json::from_str(&params)
        .map_err(|err| ApiError::bad_request(format!("parameters: not a JSON object: {err}")))?;
    let topic = match field(&fields, "topic") {
        Some(topic) => crate::admin::topic_name(&topic).map_err(ApiError::bad_request)?,
        None => console.inner.topic.clone(),
    };
    let message = crate::message::Message::new(entrypoint, params);
    let producer = console.producer()?;
    console.ensure_topic(&topic).await?;
    let (sent, failed) =
        crate::publish::publish_messages(vec![message], &topic, producer, console.store()).await;
    if let Some((_, why)) = failed.into_iter().next() {
        return Err(ApiError::new(StatusCode::BAD_GATEWAY, why).into());
    }
    let uuid = sent.into_iter().next().unwrap_or_default();
    Ok(back(
        &format!("/tasks/{}", encode(&uuid)),
        &format!("sent {uuid} to topic {topic}"),
    ))
}
