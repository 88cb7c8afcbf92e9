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
mod auth;
mod console;
mod extract;
mod ingress;
mod pages;

pub use console::{Console, TOKEN_VARIABLE};

use axum::Router;

use auth::guard;
use extract::MAX_BODY_BYTES;

impl Console {
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
}
