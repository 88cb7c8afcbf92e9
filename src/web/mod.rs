//! The web console and its JSON API, served by `kser serve` and by a worker
//! started with `--http`.
//!
//! - `api`: the JSON API under `/api/v1/`, and its OpenAPI document.
//! - `ingress`: HTTP producers: `POST /api/v1/send` (with `?wait=`) and
//!   Python kser's `POST /topic/{topic}`.
//! - `pages`: the server-rendered pages (dashboard, operations, tasks, dead
//!   letters, workers, entrypoints), every asset embedded.
//!
//! Security: with a token ([`TOKEN_VARIABLE`]), every route but `/healthz`
//! needs it, as `Authorization: Bearer TOKEN`, as the password of HTTP Basic
//! (Python kser's HTTP producer), or as the cookie the login page sets.
//! Actions are POST only; a POST from a browser must come from the console's
//! own origin (`Origin` and `Sec-Fetch-Site` are checked), so another site
//! cannot make a logged-in browser act (CSRF). Everything shown is escaped.

mod api;
mod ingress;
mod pages;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::KafkaConfig;
use crate::producer::Producer;
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// The environment variable holding the console's token.
pub const TOKEN_VARIABLE: &str = "KSER_HTTP_TOKEN";

/// The cookie the login page sets.
const COOKIE: &str = "kser_token";

/// The largest request body taken (a batch of messages included).
const MAX_BODY_BYTES: usize = 16 << 20;

/// Errors from building a [`Console`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The producer for the actions that send could not be made.
    #[error(transparent)]
    Producer(#[from] crate::producer::ProducerError),
}

/// What the console serves: the store it reads, the cluster it sends to.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// The entrypoints of the binary serving the console (the workers'
    /// own, from `kser.workers`, are added when shown).
    registry: Registry,
    /// Settings for dead-letter replays; `None`: nothing can be sent.
    kafka: Option<KafkaConfig>,
    producer: Option<Producer>,
    /// Where `POST /api/v1/send` publishes unless told otherwise.
    topic: String,
    token: Option<String>,
    /// Topics already checked or created by a send.
    ensured: Mutex<HashSet<String>>,
}

impl Console {
    /// A console on `store`, sending through `kafka` when given (sends and
    /// replays answer 503 without it), to `topic` by default. Its token is
    /// [`TOKEN_VARIABLE`]'s value when set and not empty.
    pub fn new(
        store: Store,
        registry: &Registry,
        kafka: Option<KafkaConfig>,
        topic: impl Into<String>,
    ) -> Result<Self, ConsoleError> {
        let producer = match &kafka {
            Some(kafka) => Some(Producer::new(kafka)?),
            None => None,
        };
        let token = std::env::var(TOKEN_VARIABLE)
            .ok()
            .filter(|token| !token.trim().is_empty());
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                registry: registry.clone(),
                kafka,
                producer,
                topic: topic.into(),
                token,
                ensured: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Every route of the console and the API, and `/healthz`: what
    /// `kser serve` answers.
    pub fn router(&self) -> Router {
        self.around(Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" })))
    }

    /// The console's routes beside `others` (a worker's `/metrics` and
    /// `/readyz`), every one but `/healthz` behind the token check.
    pub fn around(&self, others: Router) -> Router {
        Router::new()
            .merge(api::routes())
            .merge(ingress::routes())
            .merge(pages::routes())
            .with_state(self.clone())
            .merge(others)
            .layer(axum::middleware::from_fn_with_state(self.clone(), guard))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
    }

    /// The registry of the binary serving the console.
    fn registry_view(&self) -> &Registry {
        &self.inner.registry
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The producer, or 503 when the console was built without a broker.
    fn producer(&self) -> Result<&Producer, ApiError> {
        self.inner.producer.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this console has no broker configured: it cannot send",
            )
        })
    }

    fn kafka(&self) -> Result<&KafkaConfig, ApiError> {
        self.inner.kafka.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this console has no broker configured",
            )
        })
    }

    /// Creates `topic` if missing, once per topic and process.
    async fn ensure_topic(&self, topic: &str) -> Result<(), ApiError> {
        let known = self
            .inner
            .ensured
            .lock()
            .map(|set| set.contains(topic))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        crate::admin::ensure_topics(
            self.kafka()?,
            &[topic.to_owned()],
            crate::admin::TopicLayout::default(),
        )
        .await
        .map_err(|err| ApiError::new(StatusCode::BAD_GATEWAY, err.to_string()))?;
        if let Ok(mut set) = self.inner.ensured.lock() {
            set.insert(topic.to_owned());
        }
        Ok(())
    }

    /// The entrypoints known to this binary and to the registered workers,
    /// by name, each with its kind, description and parameter schema.
    async fn entrypoints(&self) -> Result<Vec<Value>, ApiError> {
        let mut known: BTreeMap<String, Value> = BTreeMap::new();
        for worker in self.store().workers().await? {
            for entry in worker.entrypoints.as_array().into_iter().flatten() {
                if let Some(name) = entry.get("name").and_then(Value::as_str) {
                    known
                        .entry(name.to_owned())
                        .or_insert_with(|| entry.clone());
                }
            }
        }
        for entry in self.inner.registry.entrypoints() {
            known.insert(
                entry.name.to_owned(),
                serde_json::to_value(entry).unwrap_or_default(),
            );
        }
        Ok(known.into_values().collect())
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("topic", &self.inner.topic)
            .field("token", &self.inner.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// An error answered as `{"error": "..."}` with its status code.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
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
pub(crate) struct ApiJson<T>(T);

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
pub(crate) struct ApiQuery<T>(T);

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
pub(crate) struct ApiPath<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token a request presents: a bearer token, the password of HTTP
/// Basic, or the login cookie.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(token) = value.strip_prefix("Bearer ") {
            return Some(token.trim().to_owned());
        }
        if let Some(encoded) = value.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            return decoded
                .split_once(':')
                .map(|(_, password)| password.to_owned());
        }
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Whether a POST comes from a page of another site: `Sec-Fetch-Site`
/// says so, or `Origin` names another host than the one asked. Clients
/// that are not browsers send neither and cannot be driven by a site.
fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    host != Some(origin_host)
}

/// Checks the token (when one is set) and refuses cross-site POSTs.
async fn guard(State(console): State<Console>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if request.method() == Method::POST && cross_site(request.headers()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-site request refused: actions must come from the console's own pages",
        )
        .into_response();
    }
    let Some(token) = &console.inner.token else {
        return next.run(request).await;
    };
    if path == "/login" || path == "/healthz" || path == "/assets/console.css" {
        return next.run(request).await;
    }
    let presented = presented_token(request.headers());
    if presented.is_some_and(|presented| same_secret(&presented, token)) {
        return next.run(request).await;
    }
    let wants_page = !path.starts_with("/api/") && !path.starts_with("/topic/");
    if wants_page && request.method() == Method::GET {
        return Redirect::to("/login").into_response();
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("authentication required: send Authorization: Bearer <{TOKEN_VARIABLE}>"),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer, Basic realm=\"kser\""),
    );
    response
}

/// The `Set-Cookie` value that logs a browser in with `token`.
fn login_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
}

/// A JSON answer with its status code.
fn json_response(status: StatusCode, value: Value) -> Response {
    (status, axum::Json(value)).into_response()
}

/// `{"error": ...}` for routes that do not exist under `/api/`.
async fn api_not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({"error": "no such route"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_bearer_basic_or_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(presented_token(&headers).as_deref(), Some("s3cret"));
        let basic = base64::engine::general_purpose::STANDARD.encode("user:s3cret");
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(presented_token(&headers).as_deref(), Some("s3cret"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "a=b; kser_token=t0k".parse().unwrap());
        assert_eq!(presented_token(&headers).as_deref(), Some("t0k"));
        assert_eq!(presented_token(&HeaderMap::new()), None);
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let mut headers = HeaderMap::new();
        assert!(!cross_site(&headers), "curl sends no Origin");
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_site(&headers));
        headers.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_site(&headers));
        headers.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(!cross_site(&headers));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
