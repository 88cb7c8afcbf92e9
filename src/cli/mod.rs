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

pub(crate) mod dlq;
pub(crate) mod fleet;
mod logging;
mod lookup;
pub(crate) mod output;
mod prune;
mod schedule;
pub(crate) mod send;
mod serve;
pub(crate) mod values;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::TopicLayout;
use crate::config::KafkaConfig;
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::store::{Store, StoreError, TaskFilter, TaskStatus};
use crate::worker::{
    DeadLetters, GroupProtocol, Ordering, Retention, TopicPattern, Worker, WorkerConfig,
};

/// A Kafka-native task consumer with its state in Postgres.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
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
    Worker(WorkerArgs),
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

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Topics to consume, comma-separated: names, not patterns (a name
    /// starting with '^' is refused; see --topic-pattern). None may be the
    /// dead-letter topic of another. Default: kser, unless --topic-pattern
    /// is given.
    #[arg(
        long,
        env = "KSER_TOPIC",
        value_delimiter = ',',
        value_parser = values::topic
    )]
    topics: Vec<String>,
    /// Also consume every existing topic whose whole name matches this
    /// regular expression (e.g. 'jobs\..*'), except dead-letter topics
    /// (*.dlq, --dlq-topic) and Kafka's internal ones; topics created later
    /// are picked up within --topic-refresh.
    #[arg(long, env = "KSER_TOPIC_PATTERN", value_parser = values::topic_pattern)]
    topic_pattern: Option<TopicPattern>,
    /// How often the topics are listed again for --topic-pattern (1s to 1
    /// day).
    #[arg(long, env = "KSER_TOPIC_REFRESH", default_value = "30s", value_parser = values::duration(Duration::from_secs(1), Duration::from_secs(86_400)))]
    topic_refresh: Duration,
    /// Consumer group; workers in one group share the partitions.
    #[arg(long, env = "KSER_GROUP", default_value = "kser-workers", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    group: String,
    /// How many tasks run at once (1 to 10000).
    #[arg(long, env = "KSER_CONCURRENCY", default_value = "64", value_parser = values::count::<usize>(1, 10_000))]
    concurrency: usize,
    /// Most rows per database write (1 to 100000).
    #[arg(long, default_value = "1000", value_parser = values::count::<usize>(1, 100_000))]
    batch_size: usize,
    /// How long in-flight work may take to finish after SIGINT/SIGTERM (0
    /// to 1 day; e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30", value_parser = values::duration(Duration::ZERO, Duration::from_secs(86_400)))]
    shutdown_timeout: Duration,
    /// Partitions of topics the worker creates (1 to 100000; existing
    /// topics are kept).
    #[arg(long, default_value = "6", value_parser = values::count::<i32>(1, 100_000))]
    partitions: i32,
    /// Replication factor of topics the worker creates (1 to 100).
    #[arg(long, default_value = "1", value_parser = values::count::<i32>(1, 100))]
    replication_factor: i32,
    /// Attempts per task, the first included, for tasks without a policy of
    /// their own (1 to 1000000). Retryable errors, panics and timeouts are
    /// retried.
    #[arg(long, env = "KSER_MAX_ATTEMPTS", default_value = "1", value_parser = values::count::<u32>(1, 1_000_000))]
    max_attempts: u32,
    /// Wait before the first retry (0 to 7 days; e.g. 500ms, 2s); doubles
    /// each time.
    #[arg(long, default_value = "1s", value_parser = values::duration(Duration::ZERO, Duration::from_secs(7 * 86_400)))]
    retry_backoff: Duration,
    /// Longest wait between two attempts (0 to 30 days, at least
    /// --retry-backoff).
    #[arg(long, default_value = "5m", value_parser = values::duration(Duration::ZERO, Duration::from_secs(30 * 86_400)))]
    retry_backoff_max: Duration,
    /// Longest time one attempt may run (1ms to 30 days; e.g. 30s); none by
    /// default.
    #[arg(long, value_parser = values::duration(Duration::from_millis(1), Duration::from_secs(30 * 86_400)))]
    task_timeout: Option<Duration>,
    /// Dead-letter topic for every consumed topic (default: <topic>.dlq);
    /// it must not be one of --topics.
    #[arg(long, env = "KSER_DLQ_TOPIC", conflicts_with = "no_dlq", value_parser = values::topic)]
    dlq_topic: Option<String>,
    /// Do not dead-letter: failures are only in Postgres and the logs.
    #[arg(long)]
    no_dlq: bool,
    /// Consumer group protocol: `classic`, or `consumer` (KIP-848, Kafka
    /// 4.0+; its session timeout is the broker's).
    #[arg(long, env = "KSER_GROUP_PROTOCOL", default_value = "classic")]
    group_protocol: GroupProtocol,
    /// Static membership (KIP-345): a name unique in the group that this
    /// worker keeps across restarts (group.instance.id), e.g. a pod name. A
    /// worker restarted within the session timeout gets its partitions back
    /// without a rebalance.
    #[arg(long, env = "KSER_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Order of the records of a partition: `key` (records with one key run
    /// one after the other, other keys in parallel), `partition` (one at a
    /// time), or `none`.
    #[arg(long, env = "KSER_ORDERING", default_value = "key")]
    ordering: Ordering,
    /// How long a task runs before it is written RUNNING (e.g. 1s, 200ms).
    /// A task that ends sooner is written once, with its outcome.
    #[arg(long, env = "KSER_RUNNING_AFTER", default_value = "1s", value_parser = values::duration(Duration::ZERO, Duration::from_secs(86_400)))]
    running_after: Duration,
    /// The largest task result kept, in bytes of JSON (default 16 MiB): a
    /// task returning more ends FAILED "result too large".
    #[arg(long, env = "KSER_MAX_RESULT_BYTES", default_value = "16777216", value_parser = values::count::<usize>(1024, 256 << 20))]
    max_result_bytes: usize,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` at this
    /// address, e.g. 0.0.0.0:8888. Python kser's `KSER_METRICS_ENABLED=yes`
    /// (with `KSER_METRICS_PORT`, default 8888, and `KSER_METRICS_ADDRESS`,
    /// default 0.0.0.0) turns it on too.
    #[arg(long, env = "KSER_HTTP", value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Never apply migrations: stop at start unless the database is migrated
    /// already (by `kser migrate`, run by an administrator). Without it a
    /// worker migrates only a database that lacks some migrations, so on a
    /// migrated one its role never needs CREATE either.
    #[arg(long, env = "KSER_NO_MIGRATE")]
    no_migrate: bool,
    /// The most bytes of records the worker holds (8MiB to 8GiB; e.g.
    /// 64MiB, 1GiB): an eighth for librdkafka's prefetch queue, an eighth
    /// for a fetch in flight (per broker), half for records in the pipeline
    /// until their outcome is written, a quarter of headroom. Counted in
    /// bytes, so large records cannot take the worker past it.
    #[arg(long, env = "KSER_MAX_BUFFERED_BYTES", default_value = "64MiB", value_parser = values::bytes(crate::worker::MIN_BUFFERED_BYTES, crate::worker::MAX_BUFFERED_BYTES))]
    max_buffered_bytes: u64,
    /// Prune finished work older than this (e.g. 30d), at start and then
    /// hourly, off the hot path; one worker of the fleet at a time (see
    /// `prune`). Off by default.
    #[arg(long, env = "KSER_RETENTION", value_name = "AGE", value_parser = prune::retention)]
    retention: Option<Duration>,
    /// How often the worker writes its heartbeat to `kser.workers` (100ms
    /// to 1h). Controls are read every second regardless.
    #[arg(long, env = "KSER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = values::duration(Duration::from_millis(100), Duration::from_secs(3600)))]
    heartbeat_interval: Duration,
    /// How long without a heartbeat before other workers mark this one LOST
    /// (at least twice --heartbeat-interval).
    #[arg(long, env = "KSER_LOST_AFTER", default_value = "30s", value_parser = values::duration(Duration::from_millis(200), Duration::from_secs(86_400)))]
    lost_after: Duration,
    /// The scaling hint (`kser_desired_workers`): how many workers would
    /// drain the backlog within this long.
    #[arg(long, env = "KSER_DRAIN_TARGET", default_value = "60s", value_parser = values::duration(Duration::from_secs(1), Duration::from_secs(86_400)))]
    drain_target: Duration,
    /// Publish one JSON record per finished task to this topic (entrypoint,
    /// uuid, worker, status, attempt, queued/run/end-to-end ms, trace id).
    /// Records the broker cannot take fast enough are dropped and counted
    /// (kser_metric_records_dropped_total), never waited for.
    #[arg(long, env = "KSER_METRICS_TOPIC", value_name = "TOPIC", value_parser = values::topic)]
    metrics_topic: Option<String>,
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
        Command::Worker(args) => {
            let kafka = kafka()?;
            if registry.is_empty() {
                bail!(
                    "no tasks are registered in this binary; build a worker with your tasks (see examples/dice.rs)"
                );
            }
            // A bad KSER_SECRETBOX_KEY stops the worker before it joins anything.
            crate::crypto::SecretBox::from_env()?;
            if args.retry_backoff_max < args.retry_backoff {
                bail!(
                    "--retry-backoff-max ({}) is shorter than --retry-backoff ({})",
                    humantime::format_duration(args.retry_backoff_max),
                    humantime::format_duration(args.retry_backoff)
                );
            }
            let topics = if args.topics.is_empty() && args.topic_pattern.is_none() {
                vec!["kser".to_owned()]
            } else {
                args.topics
            };
            let mut config = WorkerConfig::new(kafka, topics, args.group);
            config.topic_pattern = args.topic_pattern;
            config.topic_refresh = args.topic_refresh;
            config.concurrency = args.concurrency;
            config.batch_size = args.batch_size;
            config.group_protocol = args.group_protocol;
            config.ordering = args.ordering;
            config.running_after = args.running_after;
            config.max_result_bytes = args.max_result_bytes;
            config.http = match args.http {
                Some(address) => Some(address),
                None => python_metrics_address(|name| std::env::var(name).ok())?,
            };
            config.max_buffered_bytes = args.max_buffered_bytes;
            config.fleet = crate::worker::FleetConfig {
                heartbeat_interval: args.heartbeat_interval,
                lost_after: args.lost_after,
                drain_target: args.drain_target,
                // Python kser's pause lock file.
                pause_lock: std::env::var_os("LOCK_PATH")
                    .filter(|path| !path.is_empty())
                    .map(|path| crate::worker::pause_lock_file(std::path::Path::new(&path))),
            };
            config.instance_id = args.instance_id.filter(|id| !id.trim().is_empty());
            config.shutdown_timeout = args.shutdown_timeout;
            config.retention = args.retention.map(Retention::older_than);
            config.metrics_topic = args.metrics_topic;
            config.layout = TopicLayout {
                partitions: args.partitions,
                replication_factor: args.replication_factor,
            };
            config.dead_letters = match (args.no_dlq, args.dlq_topic) {
                (true, _) => DeadLetters::Disabled,
                (false, Some(topic)) => DeadLetters::Topic(topic),
                (false, None) => DeadLetters::Suffix,
            };
            config.retry = RetryPolicy {
                max_attempts: args.max_attempts,
                initial_backoff: args.retry_backoff,
                max_backoff: args.retry_backoff_max,
                timeout: args.task_timeout,
                ..RetryPolicy::NONE
            };
            config.validate()?;
            // The pipeline's batched writes need a few connections; each
            // running transactional task holds one more.
            let store =
                connect_sized(&global.database_url, 8 + config.concurrency.clamp(1, 32)).await?;
            prepare_schema(&store, args.no_migrate).await?;
            if config.http.is_some() {
                let topic = config
                    .topics
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "kser".into());
                let console = crate::web::Console::new(
                    store.clone(),
                    &registry,
                    Some(config.kafka.clone()),
                    topic,
                )?;
                config.http_routes = Some(crate::worker::HttpRoutes::new(move |routes| {
                    console.around(routes)
                }));
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(forward_signals(shutdown.clone()));
            Worker::new(config, registry, store).run(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
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

/// Makes sure a worker can start on the database: migrated (migrating it
/// only when migrations are missing and `no_migrate` is not set, so a
/// migrated schema never needs DDL rights), and the role holding every
/// privilege a worker uses, so a missing grant stops it here, named, once.
async fn prepare_schema(store: &Store, no_migrate: bool) -> anyhow::Result<()> {
    match store.check_migrated().await {
        Ok(()) => {}
        Err(err @ StoreError::NotMigrated { .. }) if no_migrate => {
            return Err(anyhow::Error::new(err).context(
                "the worker runs with --no-migrate (KSER_NO_MIGRATE) and the database is not migrated",
            ));
        }
        Err(StoreError::NotMigrated { .. }) => {
            let applied = store.migrate().await.context(
                "migrating the database (a role without CREATE cannot: run `kser migrate` as the schema's owner first)",
            )?;
            tracing::info!(applied = %applied.join(","), "applied migrations");
        }
        Err(err) => return Err(err.into()),
    }
    store.check_privileges().await?;
    Ok(())
}

/// A store for a command that reads or writes kser's tables: it must be
/// migrated, else the error says to run `kser migrate`.
async fn connect(database_url: &Option<String>) -> anyhow::Result<Store> {
    let store = connect_sized(database_url, 8).await?;
    store.check_migrated().await?;
    Ok(store)
}

async fn connect_sized(database_url: &Option<String>, connections: usize) -> anyhow::Result<Store> {
    let url = database_url
        .as_deref()
        .context("no database configured: set DATABASE_URL or pass --database-url")?;
    Ok(Store::connect(url, connections).await?)
}

/// Where Python kser's settings ask for metrics: `KSER_METRICS_ENABLED`
/// (`yes`, `true`, `1`, `on`), `KSER_METRICS_ADDRESS` (0.0.0.0) and
/// `KSER_METRICS_PORT` (8888).
fn python_metrics_address(
    var: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let enabled = var("KSER_METRICS_ENABLED").is_some_and(|value| {
        ["yes", "true", "1", "on"].contains(&value.trim().to_ascii_lowercase().as_str())
    });
    if !enabled {
        return Ok(None);
    }
    let address = var("KSER_METRICS_ADDRESS").unwrap_or_else(|| "0.0.0.0".into());
    let address: std::net::IpAddr = address.trim().parse().with_context(|| {
        format!(
            "KSER_METRICS_ADDRESS must be an IP address, not '{}'",
            address.trim()
        )
    })?;
    let port = var("KSER_METRICS_PORT").unwrap_or_else(|| "8888".into());
    let port: u16 = port.trim().parse().with_context(|| {
        format!(
            "KSER_METRICS_PORT must be a port number, not '{}'",
            port.trim()
        )
    })?;
    Ok(Some((address, port).into()))
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
pub(super) async fn forward_signals(shutdown: CancellationToken) {
    let mut signals = 0;
    loop {
        if wait_for_signal().await.is_err() {
            return;
        }
        signals += 1;
        if signals == 1 {
            tracing::info!("shutdown requested; send the signal again to exit at once");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal; exiting without waiting for in-flight work");
            std::process::exit(130);
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
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

    #[test]
    fn python_kser_metrics_settings_turn_http_on() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        assert_eq!(python_metrics_address(env(&[])).expect("off"), None);
        assert_eq!(
            python_metrics_address(env(&[("KSER_METRICS_ENABLED", "no")])).expect("off"),
            None
        );
        assert_eq!(
            python_metrics_address(env(&[("KSER_METRICS_ENABLED", "Yes")])).expect("on"),
            Some("0.0.0.0:8888".parse().expect("address"))
        );
        assert_eq!(
            python_metrics_address(env(&[
                ("KSER_METRICS_ENABLED", "true"),
                ("KSER_METRICS_ADDRESS", "127.0.0.1"),
                ("KSER_METRICS_PORT", "9100"),
            ]))
            .expect("on"),
            Some("127.0.0.1:9100".parse().expect("address"))
        );
        let err = python_metrics_address(env(&[
            ("KSER_METRICS_ENABLED", "1"),
            ("KSER_METRICS_PORT", "http"),
        ]))
        .expect_err("bad port");
        assert!(err.to_string().contains("KSER_METRICS_PORT"), "{err}");
    }
}
