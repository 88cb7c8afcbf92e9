//! Throughput benchmark: sends N no-op tasks, then measures, against the same
//! broker and database,
//!
//! 1. the raw consume rate of those messages with rdkafka (the ceiling), and
//! 2. the worker's end-to-end rate: every task run and its final state
//!    committed in Postgres.
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
    JsonObject, KafkaConfig, Message, Producer, Registry, Store, Task, TaskContext, TaskError,
    TaskResult, Worker, WorkerConfig,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

struct Noop;

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
    let brokers = std::env::var("KSER_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let database_url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let kafka = KafkaConfig::new(brokers).with_env();
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let topic = format!("kser-bench-{run_id}");
    let layout = TopicLayout {
        partitions: 6,
        replication_factor: 1,
    };
    ensure_topics(&kafka, std::slice::from_ref(&topic), layout).await?;
    let store = Store::connect(&database_url, 8).await?;
    store.migrate().await?;

    // Send.
    let producer = Producer::new(&kafka)?;
    let started = Instant::now();
    let mut sends = FuturesUnordered::new();
    for _ in 0..count {
        if sends.len() >= 20_000 {
            sends.next().await.transpose()?;
        }
        let message = Message::new(Noop::ENTRYPOINT, JsonObject::new());
        let (producer, topic) = (producer.clone(), topic.clone());
        sends.push(async move { producer.send(&topic, &message).await });
    }
    while let Some(sent) = sends.next().await {
        sent?;
    }
    let produce_rate = count as f64 / started.elapsed().as_secs_f64();

    // Raw consume: the same records, read and dropped.
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
    consumer.subscribe(&[topic.as_str()])?;
    consumer.recv().await?;
    let raw_started = Instant::now();
    for _ in 1..count {
        consumer.recv().await?;
    }
    let raw_rate = (count - 1) as f64 / raw_started.elapsed().as_secs_f64();
    drop(consumer);

    // The worker, in this process, as a user's binary would run it.
    let mut registry = Registry::new();
    registry.register(Noop)?;
    let mut config = WorkerConfig::new(
        kafka.clone(),
        vec![topic.clone()],
        format!("bench-worker-{run_id}"),
    );
    config.concurrency = 256;
    let shutdown = CancellationToken::new();
    // Reset the peak-memory mark: what is measured below is the worker's
    // peak while it works through the whole backlog.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = memory_kib("VmRSS");
    let wall = Instant::now();
    let worker = tokio::spawn(Worker::new(config, registry, store.clone()).run(shutdown.clone()));
    let mut conn = AsyncPgConnection::establish(&database_url).await?;
    let window = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let window: Window = diesel::sql_query(
            "SELECT count(*) AS done, \
             coalesce(extract(epoch FROM max(finished_at) - min(started_at)), 0)::float8 AS seconds \
             FROM kser.tasks WHERE topic = $1 AND status IN ('SUCCESS', 'FAILED')",
        )
        .bind::<diesel::sql_types::Text, _>(&topic)
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
    let worker_rate = count as f64 / window.seconds.max(f64::EPSILON);

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
    println!("kser benchmark: {count} no-op tasks, {cores} cores ({cpu})");
    println!("  broker: {broker}");
    println!("  produce (kser send, acks=all)   {produce_rate:>10.0} msg/s");
    println!("  raw consume (rdkafka)           {raw_rate:>10.0} msg/s");
    println!(
        "  worker end to end (persisted)   {worker_rate:>10.0} tasks/s  ({:.2}s processing, {wall_seconds:.2}s with group join)",
        window.seconds
    );
    println!(
        "  worker stats: {} succeeded, {} failed, {} skipped",
        stats.succeeded, stats.failed, stats.skipped
    );
    if let (Some(before), Some(peak)) = (rss_before, peak) {
        println!(
            "  memory while draining the backlog: {} MiB before, {} MiB peak (process RSS)",
            before / 1024,
            peak / 1024
        );
    }
    Ok(())
}
