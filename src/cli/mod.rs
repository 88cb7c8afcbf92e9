//! The command line shared by the `kser` binary and users' worker binaries.
//!
//! A user's binary builds a [`Registry`] and calls [`run`]; it then has the
//! `worker`, `send`, `status`, `list`, `migrate`, `entrypoints`, `workers`,
//! `control` and `serve` (the web console) subcommands. Settings come from flags, or from `KSER_BROKERS`,
//! `DATABASE_URL`, `KSER_TOPIC`, `KSER_GROUP` and `KSER_KAFKA_*`.

/// `println!` that ends the process quietly when stdout is closed, as in
/// `kser list | head`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(err) = writeln!(out, $($arg)*) {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod batch;
mod connect;
pub(crate) mod dlq;
pub(crate) mod fleet;
mod logging;
mod lookup;
pub(crate) mod output;
mod prune;
mod schedule;
pub(crate) mod send;
mod serve;
mod signals;
pub(crate) mod values;
mod watch;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::KafkaConfig;
use crate::registry::Registry;
use crate::store::{TaskFilter, TaskStatus};
use connect::{connect, connect_sized};

/// A Kafka-native task consumer with its state in Postgres.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KSER_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    brokers: String,
    /// Postgres URL of the kser database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// A librdkafka property, e.g. -X security.protocol=SASL_SSL (repeatable).
    /// Environment variables KSER_KAFKA_<NAME> set them too:
    /// KSER_KAFKA_SASL_PASSWORD sets sasl.password. Secrets are never printed.
    #[arg(
        short = 'X',
        long = "kafka-property",
        value_name = "KEY=VALUE",
        global = true
    )]
    kafka_properties: Vec<String>,
    /// How log lines look: `text` for people, `json` (one object per line)
    /// for log shippers.
    #[arg(
        long,
        env = "KSER_LOG_FORMAT",
        default_value = "text",
        value_enum,
        global = true
    )]
    log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the consumer group and run tasks until SIGINT/SIGTERM.
    Worker(worker::WorkerArgs),
    /// Publish a message (or many with --batch) and print its uuid.
    Send(send::SendArgs),
    /// Show one task's or operation's state from Postgres.
    Status {
        /// The task or operation (message) uuid.
        uuid: String,
        /// Print one JSON object instead of text (operations: with a `tasks` array).
        #[arg(long)]
        json: bool,
    },
    /// Follow a task or operation until it ends.
    ///
    /// Exit codes: 0 SUCCESS; 1 FAILED or CANCELLED; 2 an error (bad
    /// arguments, the database unreachable or not migrated); 124 --timeout
    /// passed first (as timeout(1) does).
    Watch {
        /// The task or operation uuid.
        uuid: String,
        /// Time between two looks at the database (10ms to 1h; e.g. 500ms,
        /// 2s; a bare number is seconds).
        #[arg(long, default_value = "0.5", value_parser = values::duration(Duration::from_millis(10), Duration::from_secs(3600)))]
        interval: Duration,
        /// Give up (exit 124) after this long (up to 366 days; e.g. 90s, 5m;
        /// a bare number is seconds).
        #[arg(long, value_parser = values::duration(Duration::ZERO, Duration::from_secs(366 * 86_400)))]
        timeout: Option<Duration>,
    },
    /// Run a FAILED or CANCELLED operation again from its first unfinished
    /// step; steps that succeeded keep their results and do not run again.
    Resume {
        /// The operation uuid.
        uuid: String,
    },
    /// Stop an operation between steps: pending steps never run.
    Cancel {
        /// The operation uuid.
        uuid: String,
    },
    /// List recent operations and standalone tasks, newest first.
    List {
        /// Only those in this state (PENDING, RUNNING, SUCCESS, FAILED, CANCELLED).
        #[arg(long)]
        status: Option<TaskStatus>,
        /// Only those of this entrypoint.
        #[arg(long)]
        entrypoint: Option<String>,
        /// How many tasks at most (1 to 100000).
        #[arg(long, default_value = "20", value_parser = values::count::<i64>(1, 100_000))]
        limit: i64,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the dead-letter topic and send dead letters back.
    Dlq(dlq::DlqArgs),
    /// Delete old finished tasks and operations (with their steps and
    /// attempts) in short batches; nothing PENDING or RUNNING, and no step
    /// of a live operation, is ever removed.
    Prune(prune::PruneArgs),
    /// Recurring messages on a cron expression, fired by the running
    /// workers once per tick across the fleet.
    Schedule(schedule::ScheduleArgs),
    /// Apply the database migrations (a worker also does at start, unless
    /// --no-migrate or the database is migrated already).
    Migrate,
    /// Show the workers of the fleet: state, partitions, pauses, heartbeats.
    Workers {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Steer running workers: pause or resume entrypoints, drain a worker.
    Control(fleet::ControlArgs),
    /// Show the limits across the fleet: each pool (a task's
    /// MAX_CONCURRENCY, a resource pool its tasks ACQUIRE) with its
    /// capacity, the units in use and the tasks waiting for room.
    Pools {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the web console and its JSON API (see /api/v1/openapi.json).
    Serve(serve::ServeArgs),
    /// List the registered entrypoints and the parameters they expect.
    Entrypoints {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line, runs the command with `registry`'s tasks, prints
/// any error with its causes, and returns the exit code.
pub fn run(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.global.log_format);
    // Until the end of the process: dropping it flushes the spans queued.
    #[cfg(feature = "otel")]
    let _otel = crate::otel::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(execute(cli, registry)) {
        Ok(code) => code,
        Err(err) => {
            print_error(&err);
            ExitCode::FAILURE
        }
    };
    // Done: do not wait for a read of standard input still blocked in a
    // thread (`send --batch -` stopped by a signal while its input stays
    // open).
    runtime.shutdown_background();
    code
}

/// `error: ` and the error with its causes, each said once, escaped like
/// all output (an error may quote a record).
fn print_error(err: &anyhow::Error) {
    let line = crate::report::error_chain(err.as_ref());
    eprintln!("error: {}", output::printable(&line));
}

async fn execute(cli: Cli, registry: Registry) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    let kafka = || -> anyhow::Result<KafkaConfig> {
        let kafka = KafkaConfig::new(global.brokers.clone())
            .with_env()
            .with_properties(&global.kafka_properties)?;
        // librdkafka's own errors quote refused values: check them here,
        // where secrets are masked, before any client is built.
        kafka.check()?;
        Ok(kafka)
    };
    match cli.command {
        Command::Worker(args) => worker::run(args, kafka()?, &global.database_url, registry).await,
        Command::Send(args) => {
            let kafka = kafka()?;
            // A bad or missing key is said before anything is touched.
            if crate::crypto::SecretBox::from_env()?.is_none() && args.encrypt {
                bail!(
                    "--encrypt needs the key in {} (the base64 of 32 bytes)",
                    crate::crypto::KEY_VARIABLE
                );
            }
            let store = match &global.database_url {
                Some(_) => Some(connect(&global.database_url).await?),
                None => None,
            };
            send::send(args, &kafka, store.as_ref()).await
        }
        Command::Status { uuid, json } => {
            let store = connect(&global.database_url).await?;
            let found = lookup::lookup(&store, &uuid)
                .await?
                .with_context(|| format!("no task or operation with uuid {uuid} (not sent, or not yet received by a worker)"))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&found.to_json())?);
            } else {
                outln!("{}", output::details(&found).trim_end());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            uuid,
            interval,
            timeout,
        } => {
            let watched = async {
                let store = connect(&global.database_url).await?;
                watch::watch(&store, &uuid, interval, timeout).await
            };
            // An error has a code of its own, so a script can tell it from
            // a task that failed.
            Ok(watched.await.unwrap_or_else(|err| {
                print_error(&err);
                ExitCode::from(watch::EXIT_ERROR)
            }))
        }
        Command::Resume { uuid } => {
            let store = connect(&global.database_url).await?;
            let resumed = store.resume_operation(&uuid).await?;
            if resumed.started.is_empty() && resumed.running.is_empty() {
                outln!(
                    "resumed operation {} from step {} ({})",
                    output::printable(&uuid),
                    resumed.step,
                    output::printable(&resumed.entrypoint)
                );
            } else {
                let started = match resumed.started.is_empty() {
                    true => "nothing yet".to_owned(),
                    false => resumed.started.join(", "),
                };
                let mut said = format!(
                    "resumed operation {}: started {}",
                    output::printable(&uuid),
                    output::printable(&started)
                );
                if !resumed.running.is_empty() {
                    said.push_str(&format!(
                        "; still running, left to finish: {}",
                        output::printable(&resumed.running.join(", "))
                    ));
                }
                outln!("{said}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { uuid } => {
            let store = connect(&global.database_url).await?;
            let running = store.cancel_operation(&uuid).await?;
            outln!("cancelled operation {}", output::printable(&uuid));
            for step in running {
                outln!(
                    "step {} ({}) is running: it finishes, and starts no next step",
                    step.step,
                    output::printable(&step.entrypoint)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List {
            status,
            entrypoint,
            limit,
            json,
        } => {
            let store = connect(&global.database_url).await?;
            let filter = TaskFilter {
                status,
                entrypoint,
                limit,
                standalone: true,
                ..TaskFilter::default()
            };
            let mut listed: Vec<lookup::Found> = store
                .list_operations(&filter)
                .await?
                .into_iter()
                .map(|op| lookup::Found::Operation(op, Vec::new(), Vec::new()))
                .chain(
                    store
                        .list_tasks(&filter)
                        .await?
                        .into_iter()
                        .map(|task| lookup::Found::Task(task, Vec::new())),
                )
                .collect();
            listed.sort_by_key(|found| std::cmp::Reverse(found.created_at()));
            listed.truncate(usize::try_from(limit.max(1)).unwrap_or(usize::MAX));
            if json {
                let rows: Vec<_> = listed.iter().map(lookup::Found::to_json).collect();
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                outln!("{}", output::list_table(&listed));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(args) => {
            let store = match &global.database_url {
                Some(_) => Some(connect(&global.database_url).await?),
                None => None,
            };
            dlq::run(args, &kafka()?, store.as_ref()).await
        }
        Command::Prune(args) => {
            let store = connect_sized(&global.database_url, 1).await?;
            store.check_migrated().await?;
            prune::run(args, &store).await
        }
        Command::Schedule(args) => {
            schedule::check(&args, &registry)?;
            let store = connect_sized(&global.database_url, 1).await?;
            store.check_migrated().await?;
            schedule::run(args, &store).await
        }
        Command::Migrate => {
            let store = connect_sized(&global.database_url, 1).await?;
            let applied = store.migrate().await?;
            if applied.is_empty() {
                outln!("the database is up to date");
            }
            for version in applied {
                outln!("applied {version}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers { json } => {
            let store = connect(&global.database_url).await?;
            fleet::workers(&store, json).await
        }
        Command::Pools { json } => {
            let store = connect(&global.database_url).await?;
            fleet::pools(&store, json).await
        }
        Command::Control(args) => {
            let store = connect(&global.database_url).await?;
            fleet::control(args, &store, &registry).await
        }
        Command::Serve(args) => {
            let kafka = kafka()?;
            let store = connect(&global.database_url).await?;
            serve::serve(args, store, &registry, kafka).await
        }
        Command::Entrypoints { json } => {
            let entries: Vec<_> = registry.entrypoints().collect();
            if json {
                outln!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                outln!("no entrypoints are registered in this binary");
            } else {
                outln!("{}", output::entrypoint_table(&entries));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn worker_topics_split_on_commas() {
        let cli = Cli::try_parse_from(["kser", "worker", "--topics", "a,b", "--concurrency", "3"])
            .expect("valid");
        let Command::Worker(args) = cli.command else {
            panic!("not a worker command");
        };
        assert_eq!(args.topics, ["a", "b"]);
        assert_eq!(args.concurrency, 3);
    }

    #[test]
    fn absurd_numbers_are_usage_errors() {
        for args in [
            &["kser", "worker", "--concurrency", "0"][..],
            &["kser", "worker", "--concurrency", "18446744073709551615"],
            &["kser", "worker", "--batch-size", "0"],
            &["kser", "worker", "--max-buffered-bytes", "1MiB"],
            &["kser", "worker", "--max-buffered-bytes", "1TiB"],
            &["kser", "worker", "--shutdown-timeout", "inf"],
            &["kser", "worker", "--shutdown-timeout", "1e300"],
            &["kser", "worker", "--partitions", "0"],
            &["kser", "worker", "--max-attempts", "0"],
            &["kser", "worker", "--task-timeout", "0s"],
            &["kser", "worker", "--retry-backoff", "100000000000y"],
            &["kser", "worker", "--topics", ""],
            &["kser", "worker", "--topics", "a,,b"],
            &["kser", "worker", "--topics", "^orders.*"],
            &["kser", "watch", "u", "--timeout", "NaN"],
            &["kser", "watch", "u", "--interval", "0"],
            &["kser", "list", "--limit", "0"],
            &["kser", "list", "--limit=-5"],
            &["kser", "send", "e", "--delay", "300000y"],
            &["kser", "send", "e", "--at", "+200000-01-01T00:00:00Z"],
            &["kser", "send", ""],
            &["kser", "send", "e", "--topic", ""],
        ] {
            let err = Cli::try_parse_from(args).expect_err(&args.join(" "));
            use clap::error::ErrorKind;
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{args:?}: {err}"
            );
        }
    }
}
