//! Throughput benchmark: sends N no-op tasks, then measures, against the same
//! broker and database,
//!
//! 1. the raw consume rate of those messages with rdkafka (the ceiling), and
//! 2. the worker's end-to-end rate: every task run and its final state
//!    committed in Postgres, with `--ordering none` and with `--ordering key`
//!    over 10,000 distinct record keys.
//!
//! ```text
//! scripts/bench            # starts Apache Kafka and Postgres if needed, 100000 tasks
//! KSER_BROKERS=... DATABASE_URL=... cargo run --release --example bench -- 100000
//! ```
//!
//! The worker rate counts from the first task started to the last task
//! finished (`kser.tasks.started_at` / `finished_at`), so the consumer
//! group's join time is left out; the wall time including it is printed too.
//! The process's peak memory while the worker drains the backlog is printed
//! last: it is bounded by the prefetch limit and the in-flight limits, not
//! by N.

use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::sql_types::{BigInt, Double};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures::stream::{FuturesUnordered, StreamExt};
use kser::admin::{TopicLayout, ensure_topics};
use kser::config::ClientRole;
use kser::{
    JsonObject, KafkaConfig, Message, Ordering, Producer, Registry, Store, Task, TaskContext,
    TaskError, TaskResult, Worker, WorkerConfig,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

struct Noop;

/// A transactional no-op: a transaction per task, nothing written but the
/// task's own state.
struct TxNoop;

impl kser::TransactionalTask for TxNoop {
    const ENTRYPOINT: &'static str = "bench.TxNoop";
    type Params = Nothing;

    async fn run(
        &self,
        _ctx: &TaskContext,
        _params: Nothing,
        _conn: &mut diesel_async::AsyncPgConnection,
    ) -> Result<TaskResult, TaskError> {
        Ok(TaskResult::ok())
    }
}

impl Task for Noop {
    const ENTRYPOINT: &'static str = "bench.Noop";
    type Params = Nothing;

    async fn run(&self, _ctx: &TaskContext, _params: Nothing) -> Result<TaskResult, TaskError> {
        Ok(TaskResult::ok())
    }
}

/// A `/proc/self/status` memory figure, in KiB (Linux only).
fn memory_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(diesel::QueryableByName)]
struct Window {
    #[diesel(sql_type = BigInt)]
    done: i64,
    #[diesel(sql_type = Double)]
    seconds: f64,
}

/// Distinct record keys of the backlog: `--ordering key` runs one record
/// per key at a time, so the keys bound its parallelism.
const KEYS: usize = 10_000;

/// What one worker run measured.
struct WorkerRun {
    rate: f64,
    seconds: f64,
    wall_seconds: f64,
    stats: kser::WorkerStats,
    rss_before: Option<u64>,
    peak: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("the argument is the number of tasks")?
        .unwrap_or(100_000);
    anyhow::ensure!(count >= 2, "the benchmark needs at least 2 tasks");
    let brokers = std::env::var("KSER_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let database_url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let kafka = KafkaConfig::new(brokers).with_env();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    // As the worker command sizes it: 8, plus one per transactional task.
    let store = Store::connect(&database_url, 8 + 32).await?;
    store.migrate().await?;

    // One backlog per worker run: a record whose task is final is not run
    // again, so each run needs records of its own.
    let runs = [
        ("--ordering none", Ordering::None, Noop::ENTRYPOINT),
        (
            "--ordering key (10,000 keys)",
            Ordering::Key,
            Noop::ENTRYPOINT,
        ),
        (
            "transactional, --ordering none",
            Ordering::None,
            <TxNoop as kser::TransactionalTask>::ENTRYPOINT,
        ),
    ];
    let mut topics = Vec::new();
    let mut produce_rate = 0.0;
    for (index, (_, _, entrypoint)) in runs.iter().enumerate() {
        let topic = format!("kser-bench-{run_id}-{index}");
        let rate = produce(&kafka, &topic, count, entrypoint).await?;
        if index == 0 {
            produce_rate = rate;
        }
        topics.push(topic);
    }
    let raw_rate = raw_consume(&kafka, &topics[0], count, &run_id).await?;
    let mut measured = Vec::new();
    for ((label, ordering, _), topic) in runs.iter().zip(&topics) {
        let run = run_worker(&kafka, &store, &database_url, topic, count, *ordering).await?;
        measured.push((*label, run));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let broker = std::env::var("KSER_BENCH_BROKER")
        .unwrap_or_else(|_| format!("the broker at {}", kafka.brokers));
    println!("kser benchmark: {count} no-op tasks per run, {cores} cores ({cpu})");
    println!("  broker: {broker}");
    println!("  produce (kser send, idempotent, acks=all)  {produce_rate:>10.0} msg/s");
    println!("  raw consume (rdkafka)                      {raw_rate:>10.0} msg/s");
    for (label, run) in &measured {
        println!(
            "  worker {label:<34} {:>10.0} tasks/s  ({:.2}s processing, {:.2}s with group join; \
             {} succeeded, {} failed, {} skipped)",
            run.rate,
            run.seconds,
            run.wall_seconds,
            run.stats.succeeded,
            run.stats.failed,
            run.stats.skipped
        );
        if let (Some(before), Some(peak)) = (run.rss_before, run.peak) {
            println!(
                "      memory while draining: {} MiB before, {} MiB peak (process RSS)",
                before / 1024,
                peak / 1024
            );
        }
    }
    if let [(_, none), (_, key), ..] = measured.as_slice() {
        println!(
            "  key / none: {:.2}",
            key.rate / none.rate.max(f64::EPSILON)
        );
    }
    Ok(())
}

/// Publishes `count` no-op messages keyed by `KEYS` distinct keys and
/// returns the rate.
async fn produce(
    kafka: &KafkaConfig,
    topic: &str,
    count: usize,
    entrypoint: &str,
) -> anyhow::Result<f64> {
    let layout = TopicLayout {
        partitions: 6,
        replication_factor: 1,
    };
    ensure_topics(kafka, &[topic.to_owned()], layout).await?;
    let producer = Producer::new(kafka)?;
    let started = Instant::now();
    let mut sends = FuturesUnordered::new();
    for index in 0..count {
        if sends.len() >= 20_000 {
            sends.next().await.transpose()?;
        }
        let message = Message::new(entrypoint, JsonObject::new());
        let key = format!("key-{}", index % KEYS);
        let (producer, topic) = (producer.clone(), topic.to_owned());
        sends.push(async move { producer.send_keyed(&topic, key.as_bytes(), &message).await });
    }
    while let Some(sent) = sends.next().await {
        sent?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Reads the records with a bare rdkafka consumer and drops them: the
/// ceiling of what any consumer does here.
async fn raw_consume(
    kafka: &KafkaConfig,
    topic: &str,
    count: usize,
    run_id: &str,
) -> anyhow::Result<f64> {
    let raw_group = format!("bench-raw-{run_id}");
    let consumer: StreamConsumer = kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", raw_group.as_str()),
                ("auto.offset.reset", "earliest"),
            ],
        )
        .create()?;
    consumer.subscribe(&[topic])?;
    consumer.recv().await?;
    let raw_started = Instant::now();
    for _ in 1..count {
        consumer.recv().await?;
    }
    Ok((count - 1) as f64 / raw_started.elapsed().as_secs_f64())
}

/// Runs a worker, in this process as a user's binary would, until every
/// task of `topic` has its final state in Postgres.
async fn run_worker(
    kafka: &KafkaConfig,
    store: &Store,
    database_url: &str,
    topic: &str,
    count: usize,
    ordering: Ordering,
) -> anyhow::Result<WorkerRun> {
    let mut registry = Registry::new();
    registry.register(Noop)?.register_transactional(TxNoop)?;
    let mut config = WorkerConfig::new(
        kafka.clone(),
        vec![topic.to_owned()],
        format!("bench-worker-{topic}"),
    );
    config.concurrency = 256;
    config.ordering = ordering;
    // Every run starts from an empty table, so none pays for the rows of
    // the runs before it.
    let mut conn = AsyncPgConnection::establish(database_url).await?;
    diesel::sql_query("TRUNCATE kser.tasks, kser.task_attempts")
        .execute(&mut conn)
        .await?;
    let shutdown = CancellationToken::new();
    // Reset the peak-memory mark: what is measured below is the worker's
    // peak while it works through the whole backlog.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = memory_kib("VmRSS");
    let wall = Instant::now();
    let worker = tokio::spawn(Worker::new(config, registry, store.clone()).run(shutdown.clone()));
    let window = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let window: Window = diesel::sql_query(
            "SELECT count(*) AS done, \
             coalesce(extract(epoch FROM max(finished_at) - min(started_at)), 0)::float8 AS seconds \
             FROM kser.tasks WHERE topic = $1 AND status IN ('SUCCESS', 'FAILED')",
        )
        .bind::<diesel::sql_types::Text, _>(topic)
        .get_result(&mut conn)
        .await?;
        if window.done as usize >= count {
            break window;
        }
        anyhow::ensure!(
            wall.elapsed() < Duration::from_secs(600),
            "only {} of {count} tasks done after 10 minutes",
            window.done
        );
    };
    let wall_seconds = wall.elapsed().as_secs_f64();
    let peak = memory_kib("VmHWM");
    shutdown.cancel();
    let stats = worker.await??;
    Ok(WorkerRun {
        rate: count as f64 / window.seconds.max(f64::EPSILON),
        seconds: window.seconds,
        wall_seconds,
        stats,
        rss_before,
        peak,
    })
}
