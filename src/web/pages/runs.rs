//! The operations and tasks pages: listings with their filters, details,
//! and the resume, cancel and retry actions.

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::{
    Notice, PageError, PageResult, back, duration, encode, json_block, layout, notice,
    status_badge, time,
};
use crate::store::{OperationRow, TaskRow};
use crate::web::api::{ListQuery, cancel, resume, retry};
use crate::web::console::Console;
use crate::web::extract::{ApiError, ApiPath, ApiQuery};

/// A listing's filters, as the form sends them.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListForm {
    status: Option<String>,
    entrypoint: Option<String>,
    since: Option<String>,
    until: Option<String>,
    q: Option<String>,
    notice: Option<String>,
}

impl ListForm {
    fn query(&self) -> Result<ListQuery, ApiError> {
        let time = |text: &Option<String>, name: &str| -> Result<Option<DateTime<Utc>>, ApiError> {
            match text.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                None => Ok(None),
                Some(text) => DateTime::parse_from_rfc3339(text)
                    .map(|t| Some(t.with_timezone(&Utc)))
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "{name} must be a time like 2026-11-24T18:00:00Z"
                        ))
                    }),
            }
        };
        Ok(ListQuery {
            status: self.status.clone(),
            entrypoint: self.entrypoint.clone(),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            limit: Some(50),
            standalone: None,
        })
    }

    fn form(&self, action: &str) -> Markup {
        let selected = self.status.as_deref().unwrap_or("");
        html! {
            form.filters method="get" action=(action) {
                label { "Status "
                    select name="status" {
                        option value="" { "any" }
                        @for s in ["PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"] {
                            option value=(s) selected[selected == s] { (s) }
                        }
                    }
                }
                label { "Entrypoint " input name="entrypoint" value=(self.entrypoint.as_deref().unwrap_or("")); }
                label { "Since " input name="since" placeholder="2026-11-24T00:00:00Z" value=(self.since.as_deref().unwrap_or("")); }
                label { "Until " input name="until" placeholder="RFC 3339" value=(self.until.as_deref().unwrap_or("")); }
                button type="submit" { "Filter" }
                label { "Uuid " input name="q" placeholder="search by uuid" value=(self.q.as_deref().unwrap_or("")); }
                button type="submit" { "Search" }
            }
        }
    }
}

/// `?q=UUID`: the page of the operation or task it names, if any.
async fn search(console: &Console, q: &Option<String>) -> Result<Option<Response>, PageError> {
    let Some(q) = q.as_deref().map(str::trim).filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    let store = console.store();
    if store.operation(q).await?.is_some() {
        return Ok(Some(
            Redirect::to(&format!("/operations/{}", encode(q))).into_response(),
        ));
    }
    if store.task(q).await?.is_some() {
        return Ok(Some(
            Redirect::to(&format!("/tasks/{}", encode(q))).into_response(),
        ));
    }
    Err(PageError(ApiError::not_found(format!(
        "no operation or task with uuid {q}"
    ))))
}

/// The link to the next page of a listing: rows recorded before the last.
fn next_page(action: &str, form: &ListForm, last: Option<DateTime<Utc>>) -> Markup {
    let Some(last) = last else {
        return html! {};
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in [
        ("status", &form.status),
        ("entrypoint", &form.entrypoint),
        ("since", &form.since),
    ] {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            query.append_pair(name, value);
        }
    }
    query.append_pair("until", &last.to_rfc3339());
    html! { p { a href={ (action) "?" (query.finish()) } { "Older →" } } }
}

pub(super) async fn operations(
    State(console): State<Console>,
    ApiQuery(form): ApiQuery<ListForm>,
) -> Result<Response, PageError> {
    if let Some(found) = search(&console, &form.q).await? {
        return Ok(found);
    }
    let rows = console
        .store()
        .list_operations(&form.query()?.filter()?)
        .await?;
    Ok(layout(
        "Operations",
        html! {
            h1 { "Operations" }
            (notice(&form.notice))
            (form.form("/operations"))
            (operations_table(&rows))
            @if rows.len() == 50 { (next_page("/operations", &form, rows.last().map(|r| r.created_at))) }
        },
    )
    .into_response())
}

fn operations_table(rows: &[OperationRow]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "No operations match." }
        } @else {
            table {
                thead { tr { th { "Uuid" } th { "Entrypoint" } th { "Status" } th { "Steps" } th { "Created" } th { "Duration" } th { "Error" } } }
                tbody {
                    @for op in rows {
                        tr {
                            td.uuid { a href={ "/operations/" (encode(&op.uuid)) } { (op.uuid) } }
                            td { (op.entrypoint) }
                            td { (status_badge(&op.status)) }
                            td.num { (op.steps) }
                            td { (time(Some(op.created_at))) }
                            td { (duration(op.started_at, op.finished_at)) }
                            td.error { (op.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

pub(super) async fn operation(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
    ApiQuery(notice_query): ApiQuery<Notice>,
) -> PageResult {
    let store = console.store();
    let Some(op) = store.operation(&uuid).await? else {
        return Err(ApiError::not_found(format!("no operation {uuid}")).into());
    };
    let steps = store.operation_tasks(&uuid).await?;
    let path = format!("/operations/{}", encode(&uuid));
    Ok(layout(
        &format!("Operation {uuid}"),
        html! {
            h1 { "Operation " span.uuid { (op.uuid) } }
            (notice(&notice_query.notice))
            dl {
                dt { "Entrypoint" } dd { (op.entrypoint) }
                dt { "Status" } dd { (status_badge(&op.status)) }
                dt { "Topic" } dd { (op.topic.as_deref().unwrap_or("-")) }
                dt { "Worker" } dd { (op.worker.as_deref().unwrap_or("-")) }
                dt { "Created" } dd { (time(Some(op.created_at))) }
                dt { "Duration" } dd { (duration(op.started_at, op.finished_at)) }
                @if let Some(error) = &op.error { dt { "Error" } dd.error { (error) } }
            }
            div.actions {
                form method="post" action={ (path) "/resume" } { button type="submit" { "Resume" } }
                form method="post" action={ (path) "/cancel" } { button.danger type="submit" { "Cancel" } }
            }
            h2 { "Steps" }
            ol.timeline {
                @for step in &steps {
                    li class={ "step " (step.status.to_ascii_lowercase()) } {
                        div.head {
                            (status_badge(&step.status)) " "
                            strong { (step.entrypoint) } " "
                            a.uuid href={ "/tasks/" (encode(&step.uuid)) } { (step.uuid) }
                        }
                        div.meta {
                            "worker " (step.worker.as_deref().unwrap_or("-"))
                            " · attempts " (step.attempts)
                            " · " (duration(step.started_at, step.finished_at))
                        }
                        @if let Some(result) = &step.result { details open { summary { "Result" } (json_block(result)) } }
                        @if let Some(error) = &step.error { p.error { (error) } }
                    }
                }
            }
            h2 { "Parameters" }
            (json_block(&op.params))
            @if let Some(result) = &op.result { h2 { "Result" } (json_block(result)) }
        },
    ))
}

pub(super) async fn resume_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = resume(&console, &uuid).await?;
    Ok(back(&format!("/operations/{}", encode(&uuid)), &done))
}

pub(super) async fn cancel_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = cancel(&console, &uuid).await?;
    Ok(back(&format!("/operations/{}", encode(&uuid)), &done))
}

pub(super) async fn tasks(
    State(console): State<Console>,
    ApiQuery(form): ApiQuery<ListForm>,
) -> Result<Response, PageError> {
    if let Some(found) = search(&console, &form.q).await? {
        return Ok(found);
    }
    let rows = console.store().list_tasks(&form.query()?.filter()?).await?;
    Ok(layout(
        "Tasks",
        html! {
            h1 { "Tasks" }
            (notice(&form.notice))
            (form.form("/tasks"))
            (tasks_table(&rows))
            @if rows.len() == 50 { (next_page("/tasks", &form, rows.last().map(|r| r.created_at))) }
        },
    )
    .into_response())
}

fn tasks_table(rows: &[TaskRow]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "No tasks match." }
        } @else {
            table {
                thead { tr { th { "Uuid" } th { "Entrypoint" } th { "Status" } th { "Attempts" } th { "Operation" } th { "Created" } th { "Duration" } th { "Error" } } }
                tbody {
                    @for task in rows {
                        tr {
                            td.uuid { a href={ "/tasks/" (encode(&task.uuid)) } { (task.uuid) } }
                            td { (task.entrypoint) }
                            td { (status_badge(&task.status)) }
                            td.num { (task.attempts) }
                            td.uuid {
                                @if let Some(op) = &task.operation_uuid {
                                    a href={ "/operations/" (encode(op)) } { (op) }
                                }
                            }
                            td { (time(Some(task.created_at))) }
                            td { (duration(task.started_at, task.finished_at)) }
                            td.error { (task.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

pub(super) async fn task(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
    ApiQuery(notice_query): ApiQuery<Notice>,
) -> PageResult {
    let store = console.store();
    let Some(task) = store.task(&uuid).await? else {
        return Err(ApiError::not_found(format!("no task {uuid}")).into());
    };
    let attempts = store.task_attempts(&uuid).await?;
    Ok(layout(
        &format!("Task {uuid}"),
        html! {
            h1 { "Task " span.uuid { (task.uuid) } }
            (notice(&notice_query.notice))
            dl {
                dt { "Entrypoint" } dd { (task.entrypoint) }
                dt { "Status" } dd { (status_badge(&task.status)) }
                @if let Some(op) = &task.operation_uuid {
                    dt { "Operation" }
                    dd { a.uuid href={ "/operations/" (encode(op)) } { (op) } " step " (task.position.unwrap_or(0) + 1) }
                }
                dt { "Source" }
                dd {
                    (task.topic.as_deref().unwrap_or("-"))
                    " partition " (task.kafka_partition.map_or("-".into(), |p| p.to_string()))
                    " offset " (task.kafka_offset.map_or("-".into(), |o| o.to_string()))
                }
                dt { "Worker" } dd { (task.worker.as_deref().unwrap_or("-")) }
                dt { "Attempts" } dd { (task.attempts) }
                dt { "Created" } dd { (time(Some(task.created_at))) }
                dt { "Started" } dd { (time(task.started_at)) }
                dt { "Finished" } dd { (time(task.finished_at)) }
                @if let Some(next) = task.next_attempt_at { dt { "Next attempt" } dd { (time(Some(next))) } }
                @if let Some(error) = &task.error { dt { "Error" } dd.error { (error) } }
            }
            @if task.status == "FAILED" && task.operation_uuid.is_none() {
                div.actions {
                    form method="post" action={ "/tasks/" (encode(&task.uuid)) "/retry" } { button type="submit" { "Retry" } }
                }
            }
            h2 { "Parameters" } (json_block(&task.params))
            @if let Some(result) = &task.result { h2 { "Result" } (json_block(result)) }
            h2 { "Metadata" } (json_block(&task.metadata))
            @if !attempts.is_empty() {
                h2 { "Attempt history" }
                table {
                    thead { tr { th { "Attempt" } th { "Worker" } th { "Started" } th { "Duration" } th { "Retcode" } th { "Error" } } }
                    tbody {
                        @for a in &attempts {
                            tr {
                                td.num { (a.attempt) }
                                td { (a.worker.as_deref().unwrap_or("-")) }
                                td { (time(a.started_at)) }
                                td { (duration(a.started_at, Some(a.finished_at))) }
                                td.num { (a.retcode.map_or("-".into(), |r| r.to_string())) }
                                td.error { (a.error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        },
    ))
}

pub(super) async fn retry_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = retry(&console, &uuid).await?;
    Ok(back(&format!("/tasks/{}", encode(&uuid)), &done))
}
