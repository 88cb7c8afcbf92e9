//! `worker`: its command-line settings ([`WorkerArgs`]), turned into a
//! [`WorkerConfig`], then the database prepared (migrated if needed, the
//! role's privileges checked) and the worker run until a signal.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use super::connect::connect_sized;
use super::{prune, values};
use crate::admin::TopicLayout;
use crate::config::KafkaConfig;
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::store::{Store, StoreError};
use crate::worker::{
    DeadLetters, GroupProtocol, Ordering, Retention, TopicPattern, Worker, WorkerConfig,
};

#[derive(Debug, Args)]
pub(super) struct WorkerArgs {
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
    pub(super) topics: Vec<String>,
    /// Also consume every existing topic whose whole name matches this
    /// regular expression (e.g. 'jobs\..*'), except dead-letter topics
    /// (*.dlq, --dlq-topic) and Kafka's internal ones; topics created later
    /// are picked up within --topic-refresh.
    #[arg(long, env = "KSER_TOPIC_PATTERN", value_parser = values::topic_pattern)]
    pub(super) topic_pattern: Option<TopicPattern>,
    /// How often the topics are listed again for --topic-pattern (1s to 1
    /// day).
    #[arg(long, env = "KSER_TOPIC_REFRESH", default_value = "30s", value_parser = values::duration(Duration::from_secs(1), Duration::from_secs(86_400)))]
    pub(super) topic_refresh: Duration,
    /// Consumer group; workers in one group share the partitions.
    #[arg(long, env = "KSER_GROUP", default_value = "kser-workers", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub(super) group: String,
    /// How many tasks run at once (1 to 10000).
    #[arg(long, env = "KSER_CONCURRENCY", default_value = "64", value_parser = values::count::<usize>(1, 10_000))]
    pub(super) concurrency: usize,
    /// Most rows per database write (1 to 100000).
    #[arg(long, default_value = "1000", value_parser = values::count::<usize>(1, 100_000))]
    pub(super) batch_size: usize,
    /// How long in-flight work may take to finish after SIGINT/SIGTERM (0
    /// to 1 day; e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30", value_parser = values::duration(Duration::ZERO, Duration::from_secs(86_400)))]
    pub(super) shutdown_timeout: Duration,
    /// Partitions of topics the worker creates (1 to 100000; existing
    /// topics are kept).
    #[arg(long, default_value = "6", value_parser = values::count::<i32>(1, 100_000))]
    pub(super) partitions: i32,
    /// Replication factor of topics the worker creates (1 to 100).
    #[arg(long, default_value = "1", value_parser = values::count::<i32>(1, 100))]
    pub(super) replication_factor: i32,
    /// Attempts per task, the first included, for tasks without a policy of
    /// their own (1 to 1000000). Retryable errors, panics and timeouts are
    /// retried.
    #[arg(long, env = "KSER_MAX_ATTEMPTS", default_value = "1", value_parser = values::count::<u32>(1, 1_000_000))]
    pub(super) max_attempts: u32,
    /// Wait before the first retry (0 to 7 days; e.g. 500ms, 2s); doubles
    /// each time.
    #[arg(long, default_value = "1s", value_parser = values::duration(Duration::ZERO, Duration::from_secs(7 * 86_400)))]
    pub(super) retry_backoff: Duration,
    /// Longest wait between two attempts (0 to 30 days, at least
    /// --retry-backoff).
    #[arg(long, default_value = "5m", value_parser = values::duration(Duration::ZERO, Duration::from_secs(30 * 86_400)))]
    pub(super) retry_backoff_max: Duration,
    /// Longest time one attempt may run (1ms to 30 days; e.g. 30s); none by
    /// default.
    #[arg(long, value_parser = values::duration(Duration::from_millis(1), Duration::from_secs(30 * 86_400)))]
    pub(super) task_timeout: Option<Duration>,
    /// Dead-letter topic for every consumed topic (default: <topic>.dlq);
    /// it must not be one of --topics.
    #[arg(long, env = "KSER_DLQ_TOPIC", conflicts_with = "no_dlq", value_parser = values::topic)]
    pub(super) dlq_topic: Option<String>,
    /// Do not dead-letter: failures are only in Postgres and the logs.
    #[arg(long)]
    pub(super) no_dlq: bool,
    /// Consumer group protocol: `classic`, or `consumer` (KIP-848, Kafka
    /// 4.0+; its session timeout is the broker's).
    #[arg(long, env = "KSER_GROUP_PROTOCOL", default_value = "classic")]
    pub(super) group_protocol: GroupProtocol,
    /// Static membership (KIP-345): a name unique in the group that this
    /// worker keeps across restarts (group.instance.id), e.g. a pod name. A
    /// worker restarted within the session timeout gets its partitions back
    /// without a rebalance.
    #[arg(long, env = "KSER_INSTANCE_ID")]
    pub(super) instance_id: Option<String>,
    /// Order of the records of a partition: `key` (records with one key run
    /// one after the other, other keys in parallel), `partition` (one at a
    /// time), or `none`.
    #[arg(long, env = "KSER_ORDERING", default_value = "key")]
    pub(super) ordering: Ordering,
    /// How long a task runs before it is written RUNNING (e.g. 1s, 200ms).
    /// A task that ends sooner is written once, with its outcome.
    #[arg(long, env = "KSER_RUNNING_AFTER", default_value = "1s", value_parser = values::duration(Duration::ZERO, Duration::from_secs(86_400)))]
    pub(super) running_after: Duration,
    /// The largest task result kept, in bytes of JSON (default 16 MiB): a
    /// task returning more ends FAILED "result too large".
    #[arg(long, env = "KSER_MAX_RESULT_BYTES", default_value = "16777216", value_parser = values::count::<usize>(1024, 256 << 20))]
    pub(super) max_result_bytes: usize,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` at this
    /// address, e.g. 0.0.0.0:8888. Python kser's `KSER_METRICS_ENABLED=yes`
    /// (with `KSER_METRICS_PORT`, default 8888, and `KSER_METRICS_ADDRESS`,
    /// default 0.0.0.0) turns it on too.
    #[arg(long, env = "KSER_HTTP", value_name = "ADDR")]
    pub(super) http: Option<std::net::SocketAddr>,
    /// Never apply migrations: stop at start unless the database is migrated
    /// already (by `kser migrate`, run by an administrator). Without it a
    /// worker migrates only a database that lacks some migrations, so on a
    /// migrated one its role never needs CREATE either.
    #[arg(long, env = "KSER_NO_MIGRATE")]
    pub(super) no_migrate: bool,
    /// The most bytes of records the worker holds (8MiB to 8GiB; e.g.
    /// 64MiB, 1GiB): an eighth for librdkafka's prefetch queue, an eighth
    /// for a fetch in flight (per broker), half for records in the pipeline
    /// until their outcome is written, a quarter of headroom. Counted in
    /// bytes, so large records cannot take the worker past it.
    #[arg(long, env = "KSER_MAX_BUFFERED_BYTES", default_value = "64MiB", value_parser = values::bytes(crate::worker::MIN_BUFFERED_BYTES, crate::worker::MAX_BUFFERED_BYTES))]
    pub(super) max_buffered_bytes: u64,
    /// Prune finished work older than this (e.g. 30d), at start and then
    /// hourly, off the hot path; one worker of the fleet at a time (see
    /// `prune`). Off by default.
    #[arg(long, env = "KSER_RETENTION", value_name = "AGE", value_parser = prune::retention)]
    pub(super) retention: Option<Duration>,
    /// How often the worker writes its heartbeat to `kser.workers` (100ms
    /// to 1h). Controls are read every second regardless.
    #[arg(long, env = "KSER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = values::duration(Duration::from_millis(100), Duration::from_secs(3600)))]
    pub(super) heartbeat_interval: Duration,
    /// How long without a heartbeat before other workers mark this one LOST
    /// (at least twice --heartbeat-interval).
    #[arg(long, env = "KSER_LOST_AFTER", default_value = "30s", value_parser = values::duration(Duration::from_millis(200), Duration::from_secs(86_400)))]
    pub(super) lost_after: Duration,
    /// The scaling hint (`kser_desired_workers`): how many workers would
    /// drain the backlog within this long.
    #[arg(long, env = "KSER_DRAIN_TARGET", default_value = "60s", value_parser = values::duration(Duration::from_secs(1), Duration::from_secs(86_400)))]
    pub(super) drain_target: Duration,
    /// Publish one JSON record per finished task to this topic (entrypoint,
    /// uuid, worker, status, attempt, queued/run/end-to-end ms, trace id).
    /// Records the broker cannot take fast enough are dropped and counted
    /// (kser_metric_records_dropped_total), never waited for.
    #[arg(long, env = "KSER_METRICS_TOPIC", value_name = "TOPIC", value_parser = values::topic)]
    pub(super) metrics_topic: Option<String>,
}

/// `worker`: builds the worker's settings from `args`, prepares the
/// database, serves the console with `--http`, and runs until a signal.
pub(super) async fn run(
    args: WorkerArgs,
    kafka: KafkaConfig,
    database_url: &Option<String>,
    registry: Registry,
) -> anyhow::Result<ExitCode> {
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
    // The pipeline's batched writes need a few connections, the fleet's
    // beats, leases and schedules three more; each running transactional
    // task holds one more.
    let pool = crate::worker::PIPELINE_CONNECTIONS + 3 + config.concurrency.clamp(1, 32);
    let store = connect_sized(database_url, pool).await?;
    prepare_schema(&store, args.no_migrate).await?;
    if config.http.is_some() {
        let topic = config
            .topics
            .first()
            .cloned()
            .unwrap_or_else(|| "kser".into());
        let console =
            crate::web::Console::new(store.clone(), &registry, Some(config.kafka.clone()), topic)?;
        config.http_routes = Some(crate::worker::HttpRoutes::new(move |routes| {
            console.around(routes)
        }));
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(super::signals::forward_signals(shutdown.clone()));
    Worker::new(config, registry, store).run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use super::*;

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
