//! `serve`: the web console and its JSON API over HTTP, without a worker.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::registry::Registry;
use crate::store::Store;
use crate::web::Console;

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Where to listen. The default answers this machine only; with
    /// another address, set KSER_HTTP_TOKEN so that every route but
    /// /healthz needs the token.
    #[arg(
        long,
        env = "KSER_HTTP",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    http: SocketAddr,
    /// The topic the console sends to and whose dead letters it shows by
    /// default.
    #[arg(long, env = "KSER_TOPIC", default_value = "kser", value_parser = super::values::topic)]
    topic: String,
}

pub(super) async fn serve(
    args: ServeArgs,
    store: Store,
    registry: &Registry,
    kafka: KafkaConfig,
) -> anyhow::Result<ExitCode> {
    let console = Console::new(store, registry, Some(kafka), args.topic)?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", args.http))?;
    let address = listener.local_addr().unwrap_or(args.http);
    tracing::info!(address = %address, "serving the console at http://{address}/");
    let shutdown = CancellationToken::new();
    tokio::spawn(super::signals::forward_signals(shutdown.clone()));
    axum::serve(listener, console.router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the HTTP server stopped")?;
    Ok(ExitCode::SUCCESS)
}
