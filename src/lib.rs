//! kser: a Kafka-native, message-driven task consumer with its state in
//! Postgres.
//!
//! Producers publish kser messages (`{"uuid", "entrypoint", "params", ...}`,
//! the Python kser 0.8 wire format) to a topic. Workers in a consumer group
//! read them, route each by entrypoint to a registered [`Task`], and record
//! every task's state and result in the `kser.tasks` table.
//!
//! A worker is the user's own binary: build a [`Registry`] of tasks and hand
//! it to [`cli::run`], which gives the binary `worker`, `send`, `status`,
//! `list`, `migrate` and `entrypoints` subcommands.
//!
//! ```no_run
//! use kser::{Registry, Task, TaskContext, TaskError, TaskResult};
//!
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! struct Params {
//!     name: String,
//! }
//!
//! struct Greet;
//!
//! impl Task for Greet {
//!     const ENTRYPOINT: &'static str = "example.Greet";
//!     type Params = Params;
//!
//!     async fn run(&self, _ctx: &TaskContext, p: Params) -> Result<TaskResult, TaskError> {
//!         Ok(TaskResult::ok().with_stdout(format!("hello {}", p.name)))
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let mut registry = Registry::new();
//!     if let Err(err) = registry.register(Greet) {
//!         eprintln!("{err}");
//!         return std::process::ExitCode::FAILURE;
//!     }
//!     kser::cli::run(registry)
//! }
//! ```
//!
//! # Layout
//! - [`message`]: the wire envelope ([`Message`]) and result ([`TaskResult`]).
//! - [`task`]: the [`Task`] trait users implement, its context and errors.
//! - [`operation`]: the [`Operation`] trait: a sequence of tasks.
//! - [`registry`]: entrypoint name -> task or operation.
//! - [`retry`]: retry policies: attempts, backoff, timeouts.
//! - [`worker`]: consume, record, run, commit; offsets and shutdown.
//! - [`producer`]: publishing messages.
//! - [`crypto`]: kser-crypto's encrypted envelope (secretbox).
//! - [`store`]: the Postgres schema, migrations and queries.
//! - [`config`]: Kafka client settings.
//! - [`trace`]: W3C trace context carried from a message to what kser sends for it.
//! - [`dead_letter`]: the dead-letter topic: headers, reading it back.
//! - [`admin`]: broker checks and topic creation.
//! - [`status`]: a task's or operation's state by uuid; waiting for its end.
//! - [`cli`]: the command line shared by `kser` and user binaries.
//!
//! Internal (not part of the API): the web console (`web`), cron
//! arithmetic (`schedule`), secret redaction (`redact`), error reports
//! (`report`), the engines the command line and the console share
//! (`publish`, `replay`, `fleet`), and with the feature `jemalloc`, the
//! binary's global allocator (`allocator`). `ARCHITECTURE.md` maps them.

#![warn(missing_docs)]

pub mod admin;
#[cfg(feature = "jemalloc")]
mod allocator;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dead_letter;
mod fleet;
pub mod message;
pub mod operation;
#[cfg(feature = "otel")]
pub mod otel;
pub mod producer;
mod publish;
pub(crate) mod redact;
pub mod registry;
mod replay;
pub(crate) mod report;
pub mod retry;
pub(crate) mod schedule;
pub mod status;
pub mod store;
pub mod task;
pub mod trace;
pub(crate) mod web;
pub mod worker;

pub use config::KafkaConfig;
pub use crypto::SecretBox;
pub use message::{ErrorKind, JsonObject, Message, TaskResult};
pub use operation::{Join, OnFailure, Operation, OperationContext, Recovery, Step};
pub use producer::Producer;
pub use registry::{Registry, RegistryError};
pub use retry::RetryPolicy;
pub use store::{Store, TaskStatus};
pub use task::{Event, Task, TaskContext, TaskError, TransactionalTask};
pub use worker::{
    DEFAULT_MAX_BUFFERED_BYTES, DeadLetters, GroupProtocol, Ordering, Retention, Worker,
    WorkerConfig, WorkerStats,
};
