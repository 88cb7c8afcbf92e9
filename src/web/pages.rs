//! The console's pages, rendered on the server with `maud` (which escapes
//! every value it writes) and readable without JavaScript. Actions are
//! forms that POST and redirect back with a notice.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::api::{
    ControlRequest, DeadLetterQuery, FleetAction, ListQuery, ReplayRequest, cancel, dashboard_data,
    read_dead_letters, replay, resume, retry, steer,
};
use super::{ApiError, ApiPath, ApiQuery, Console, login_cookie, same_secret};
use crate::store::{MinuteCount, OperationRow, TaskRow, WorkerRow};

const CSS: &str = include_str!("assets/console.css");

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/", get(dashboard))
        .route("/assets/console.css", get(css))
        .route("/login", get(login_form).post(login))
        .route("/operations", get(operations))
        .route("/operations/{uuid}", get(operation))
        .route("/operations/{uuid}/resume", post(resume_action))
        .route("/operations/{uuid}/cancel", post(cancel_action))
        .route("/tasks", get(tasks))
        .route("/tasks/{uuid}", get(task))
        .route("/tasks/{uuid}/retry", post(retry_action))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/replay", post(replay_action))
        .route("/workers", get(workers))
        .route("/workers/control", post(control_action))
        .route("/entrypoints", get(entrypoints))
        .route("/entrypoints/send", post(send_action))
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/css"))],
        CSS,
    )
        .into_response()
}

/// An error as a page, with its status code.
struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(err: crate::store::StoreError) -> Self {
        Self(err.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = layout(
            "Error",
            html! {
                h1 { "Error " (self.0.status.as_u16()) }
                p.error { (self.0.message) }
            },
        );
        (self.0.status, page).into_response()
    }
}

type PageResult = Result<Markup, PageError>;

/// The page around `body`, with the navigation.
fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · kser" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                nav {
                    a.brand href="/" { "kser" }
                    a href="/" { "Dashboard" }
                    a href="/operations" { "Operations" }
                    a href="/tasks" { "Tasks" }
                    a href="/dead-letters" { "Dead letters" }
                    a href="/workers" { "Workers" }
                    a href="/entrypoints" { "Entrypoints" }
                }
                main { (body) }
            }
        }
    }
}

/// The notice an action left in the query string.
#[derive(Debug, Default, Deserialize)]
struct Notice {
    notice: Option<String>,
}

fn notice(text: &Option<String>) -> Markup {
    html! {
        @if let Some(text) = text {
            p.notice { (text) }
        }
    }
}

/// Back to `to` with `notice` shown there.
fn back(to: &str, notice: &str) -> Response {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("notice", notice)
        .finish();
    Redirect::to(&format!("{to}?{query}")).into_response()
}

fn status_badge(status: &str) -> Markup {
    html! { span class={ "status " (status.to_ascii_lowercase()) } { (status) } }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |at| at.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn duration(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> String {
    match (from, to) {
        (Some(from), Some(to)) => {
            let ms = (to - from).num_milliseconds().max(0);
            if ms < 1000 {
                format!("{ms} ms")
            } else {
                format!("{:.1} s", ms as f64 / 1000.0)
            }
        }
        _ => "-".to_owned(),
    }
}

fn json_block(value: &Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    html! { pre { (text) } }
}

// ---- dashboard

async fn dashboard(State(console): State<Console>) -> PageResult {
    let data = dashboard_data(&console).await?;
    let count = |kind: &str, status: &str| {
        data.counts
            .iter()
            .find(|c| c.kind == kind && c.status == status)
            .map_or(0, |c| c.count)
    };
    let statuses = ["PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"];
    Ok(layout(
        "Dashboard",
        html! {
            h1 { "Dashboard" }
            section {
                h2 { "Last 24 hours" }
                table {
                    thead { tr { th { "" } @for s in statuses { th { (status_badge(s)) } } } }
                    tbody {
                        tr { th { "Tasks" } @for s in statuses { td.num { (count("task", s)) } } }
                        tr { th { "Operations" } @for s in statuses { td.num { (count("operation", s)) } } }
                    }
                }
            }
            section {
                h2 { "Throughput, last hour (tasks ended per minute)" }
                (throughput_chart(&data.throughput))
            }
            section {
                h2 { "Failures by entrypoint (24 h)" }
                @if data.failures.is_empty() {
                    p.muted { "No failures." }
                } @else {
                    table {
                        thead { tr { th { "Entrypoint" } th { "Failed" } th { "Latest error" } } }
                        tbody {
                            @for f in &data.failures {
                                tr {
                                    td { a href={ "/tasks?status=FAILED&entrypoint=" (encode(&f.entrypoint)) } { (f.entrypoint) } }
                                    td.num { (f.failed) }
                                    td.error { (f.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Workers and lag" }
                (workers_table(&data.workers, false))
            }
            section {
                h2 { "Lag per partition" }
                (partition_lag_table(&data.workers))
            }
        },
    ))
}

/// The records behind on each partition, as the live worker that holds it
/// last reported (its heartbeat), most behind first.
fn partition_lag_table(workers: &[WorkerRow]) -> Markup {
    let mut rows: Vec<(&str, &str, i64)> = workers
        .iter()
        .filter(|w| w.is_live())
        .flat_map(|w| {
            w.lag_by_partition
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(move |(partition, lag)| {
                    Some((partition.as_str(), w.id.as_str(), lag.as_i64()?))
                })
        })
        .collect();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    html! {
        @if rows.is_empty() {
            p.muted { "no partition assigned to a running worker" }
        } @else {
            table {
                thead { tr { th { "topic/partition" } th.num { "lag" } th { "worker" } } }
                tbody {
                    @for (partition, worker, lag) in &rows {
                        tr {
                            td { (partition) }
                            td.num { (lag) }
                            td { (worker) }
                        }
                    }
                }
            }
        }
    }
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Tasks ended per minute over the last hour, as bars (green succeeded,
/// red failed), in inline SVG.
fn throughput_chart(minutes: &[MinuteCount]) -> Markup {
    const WIDTH: i64 = 600;
    const HEIGHT: i64 = 120;
    let now = Utc::now();
    let mut buckets = [(0i64, 0i64); 60];
    for m in minutes {
        let ago = (now - m.minute).num_minutes();
        if (0..60).contains(&ago) {
            let slot = &mut buckets[59 - ago as usize];
            slot.0 += m.succeeded;
            slot.1 += m.failed;
        }
    }
    let max = buckets.iter().map(|(s, f)| s + f).max().unwrap_or(0).max(1);
    let total: i64 = buckets.iter().map(|(s, f)| s + f).sum();
    let bar = WIDTH / 60;
    html! {
        svg.chart width=(WIDTH) height=(HEIGHT + 16) viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 16) }
            role="img" aria-label={ (total) " tasks ended in the last hour" } {
            @for (i, (succeeded, failed)) in buckets.iter().enumerate() {
                @let x = i as i64 * bar;
                @let ok_h = succeeded * HEIGHT / max;
                @let fail_h = failed * HEIGHT / max;
                rect.ok x=(x) y=(HEIGHT - ok_h - fail_h) width=(bar - 1) height=(ok_h) {
                    title { (succeeded) " succeeded" }
                }
                rect.failed x=(x) y=(HEIGHT - fail_h) width=(bar - 1) height=(fail_h) {
                    title { (failed) " failed" }
                }
            }
            text x="0" y=(HEIGHT + 14) { "-60 min" }
            text x=(WIDTH - 30) y=(HEIGHT + 14) { "now" }
            text x=(WIDTH / 2 - 40) y=(HEIGHT + 14) { (total) " ended, peak " (max) "/min" }
        }
    }
}

// ---- operations and tasks

/// A listing's filters, as the form sends them.
#[derive(Debug, Default, Deserialize)]
struct ListForm {
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

async fn operations(
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

async fn operation(
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

async fn resume_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = resume(&console, &uuid).await?;
    Ok(back(&format!("/operations/{}", encode(&uuid)), &done))
}

async fn cancel_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = cancel(&console, &uuid).await?;
    Ok(back(&format!("/operations/{}", encode(&uuid)), &done))
}

async fn tasks(
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

async fn task(
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

async fn retry_action(
    State(console): State<Console>,
    ApiPath(uuid): ApiPath<String>,
) -> Result<Response, PageError> {
    let done = retry(&console, &uuid).await?;
    Ok(back(&format!("/tasks/{}", encode(&uuid)), &done))
}

// ---- dead letters

#[derive(Debug, Default, Deserialize)]
struct DeadLetterForm {
    topic: Option<String>,
    dlq_topic: Option<String>,
    notice: Option<String>,
}

async fn dead_letters(
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

/// The fields of a form body, repeated names kept (`ids`).
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

async fn replay_action(State(console): State<Console>, body: Bytes) -> Result<Response, PageError> {
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

// ---- workers

async fn workers(State(console): State<Console>, ApiQuery(n): ApiQuery<Notice>) -> PageResult {
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

fn workers_table(rows: &[WorkerRow], actions: bool) -> Markup {
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

async fn control_action(
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

// ---- entrypoints

async fn entrypoints(State(console): State<Console>, ApiQuery(n): ApiQuery<Notice>) -> PageResult {
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

async fn send_action(State(console): State<Console>, body: Bytes) -> Result<Response, PageError> {
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

// ---- login

async fn login_form(ApiQuery(n): ApiQuery<Notice>) -> Markup {
    layout(
        "Log in",
        html! {
            h1 { "Log in" }
            (notice(&n.notice))
            form.filters method="post" action="/login" {
                label { "Token " input type="password" name="token" autofocus; }
                button type="submit" { "Log in" }
            }
            p.muted { "The token is the server's " code { (super::TOKEN_VARIABLE) } "." }
        },
    )
}

async fn login(State(console): State<Console>, body: Bytes) -> Response {
    let fields = form_fields(&body);
    let given = field(&fields, "token").unwrap_or_default();
    match &console.inner.token {
        Some(token) if same_secret(&given, token) => {
            let mut response = Redirect::to("/").into_response();
            if let Ok(cookie) = HeaderValue::from_str(&login_cookie(token)) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Some(_) => {
            let mut response = back("/login", "wrong token");
            *response.status_mut() = StatusCode::SEE_OTHER;
            response
        }
        None => Redirect::to("/").into_response(),
    }
}
