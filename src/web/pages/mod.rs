//! The console's pages, rendered on the server with `maud` (which escapes
//! every value it writes) and readable without JavaScript. Actions are
//! forms that POST and redirect back with a notice.
//!
//! This file holds the routes, the layout and what every page shares; each
//! group of pages has its own file: `dashboard`, `runs` (operations and
//! tasks), `dead_letters`, `fleet` (workers and entrypoints).

mod dashboard;
mod dead_letters;
mod fleet;
mod runs;

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

use super::auth::{login_cookie, same_secret};
use super::console::Console;
use super::extract::{ApiError, ApiQuery};
use dashboard::dashboard;
use dead_letters::{dead_letters, replay_action};
use fleet::{control_action, entrypoints, send_action, workers};
use runs::{cancel_action, operation, operations, resume_action, retry_action, task, tasks};

const CSS: &str = include_str!("../assets/console.css");

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

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
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
