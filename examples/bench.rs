//! Benchmark: how fast kser drains a backlog of no-op tasks, what the worker
//! process holds in memory meanwhile, and how long an operation waits
//! between its steps, all against the same broker and database:
//!
//! 1. the raw consume rate of the records with rdkafka (the ceiling);
//! 2. the worker's end-to-end rate, every task's RUNNING and final state
//!    committed in Postgres: `--ordering none`, `--ordering key` over 10,000
//!    record keys, a transactional task, and concurrency 1;
//! 3. Python kser 0.8.27's own consumer on the same kind of backlog
//!    (`scripts/bench_python_kser.py`, nothing persisted), and kser's rate
//!    over it;
//! 4. the `--ordering none` run again with `--http` (the metrics recorder on,
//!    `/metrics` scraped every second), and its rate over the run without;
//! 5. operations: one worker draining a backlog of N/10 three-step
//!    operations of no-op steps (operations and steps per second), the gap
//!    between an operation step finishing and the next one starting, over
//!    200 three-step operations sent one at a time, and the end-to-end time
//!    of a 1 -> 20 -> 1 fan-out/fan-in graph operation, over 100 sent one at
//!    a time.
//!
//! ```text
//! scripts/bench                 # starts Apache Kafka and Postgres if needed, 100000 tasks
//! scripts/bench --memory        # only the memory run: a 1,000,000-record backlog
//! scripts/bench --operations    # only the operation runs (N/10 operations in the backlog)
//! scripts/bench --throughput 5  # only the --ordering none rate, 5 runs and their median
//! scripts/bench --warm-up 0     # measure a broker just started as it is (500,000 records warm it by default)
//! KSER_BROKERS=... DATABASE_URL=... cargo run --release --example bench -- 100000
//! KSER_BROKERS=... DATABASE_URL=... cargo run --release --example bench -- --memory 1000000
//! ```
//!
//! Each worker runs as its own process, as a user's worker binary does: this
//! binary is one (`bench worker --topics ...` is kser's command line with the
//! benchmark's tasks registered), so the peak RSS printed (`VmHWM` of
//! `/proc/<pid>/status`) is the worker's alone, not the producer's or the
//! raw consumer's. A worker rate counts from the first task started
//! (`kser.tasks.started_at`) to the moment every final state is durable, so
//! the consumer group's join is left out; the wall time including it is
//! printed too. That moment is seen in the group's committed offsets (a
//! worker stores an offset only once the final state is committed in
//! Postgres), polled every 50 ms while the worker commits every 100 ms, so
//! it is late by up to ~150 ms. `finished_at` is stamped when a task stops
//! running, before its final state is written: the line under each rate
//! says how long those writes trailed the last task. Each run starts from
//! empty kser tables, so the benchmark needs a database of its own.
//!
//! Python kser runs with `KSER_BENCH_PYTHON` (default: `KSER_TEST_PYTHON`,
//! the venv `scripts/bench` installs); without it, its line says why it is
//! missing. Runs one task at a time (concurrency 1, Python kser) are capped
//! at 20,000 tasks to keep the whole benchmark within a few minutes. The
//! workers' logs go to a temporary directory, or to `KSER_BENCH_LOGS`, where
//! they stay.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures::stream::{FuturesUnordered, StreamExt};
use kser::admin::{TopicLayout, ensure_topics};
use kser::config::ClientRole;
use kser::{
    JsonObject, KafkaConfig, Message, Operation, Producer, Registry, Step, Store, Task,
    TaskContext, TaskError, TaskResult,
};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

/// Does nothing and succeeds.
struct Noop;

impl Task for Noop {
    const ENTRYPOINT: &'static str = "bench.Noop";
    type Params = Nothing;

    async fn run(&self, _ctx: &TaskContext, _params: Nothing) -> Result<TaskResult, TaskError> {
        Ok(TaskResult::ok())
    }
}

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

/// Three no-op steps: what the step latency is measured on.
struct ThreeSteps;

impl Operation for ThreeSteps {
    const ENTRYPOINT: &'static str = "bench.ThreeSteps";
    type Params = Nothing;

    fn build(&self, _params: &Nothing) -> Result<Vec<Step>, TaskError> {
        Ok((0..3)
            .map(|_| Step::new(Noop::ENTRYPOINT, serde_json::json!({})))
            .collect())
    }
}

/// A graph of no-op steps: one root, `FAN_OUT` parallel branches after it,
/// and a join after all of them; what the fan-out/fan-in latency is
/// measured on.
struct FanOut;

impl Operation for FanOut {
    const ENTRYPOINT: &'static str = "bench.FanOut";
    type Params = Nothing;

    fn build(&self, _params: &Nothing) -> Result<Vec<Step>, TaskError> {
        let noop = || Step::new(Noop::ENTRYPOINT, serde_json::json!({}));
        let branches: Vec<String> = (1..=FAN_OUT).map(|i| format!("branch{i}")).collect();
        let mut steps = vec![noop().named("start")];
        steps.extend(
            branches
                .iter()
                .map(|name| noop().named(name.as_str()).after(["start"])),
        );
        steps.push(noop().named("join").after(branches));
        Ok(steps)
    }
}

fn registry() -> Result<Registry, kser::RegistryError> {
    let mut registry = Registry::new();
    registry
        .register(Noop)?
        .register_transactional(TxNoop)?
        .register_operation(ThreeSteps)?
        .register_operation(FanOut)?;
    Ok(registry)
}

/// Distinct record keys of the backlog: `--ordering key` runs one record
/// per key at a time, so the keys bound its parallelism.
const KEYS: usize = 10_000;
/// Partitions of the benchmark's topics.
const PARTITIONS: i32 = 6;
/// The most tasks of a run that goes one task at a time.
const ONE_AT_A_TIME_MAX: usize = 20_000;
/// Operations of the step latency run.
const OPERATIONS: usize = 200;
/// Tasks per run for each three-step operation of the operation
/// throughput run: N tasks per run make N / 10 operations (3 N / 10 steps).
const TASKS_PER_OPERATION: usize = 10;
/// Parallel branches of the fan-out/fan-in graph.
const FAN_OUT: usize = 20;
/// Graph operations of the fan-out/fan-in latency run (after one to warm
/// up, not counted).
const GRAPHS: usize = 100;
/// The issue's memory target while draining a 1,000,000-record backlog.
const MEMORY_TARGET_MIB: u64 = 64;

#[derive(Parser)]
#[command(about = "kser's benchmark (see the header of examples/bench.rs)")]
struct Args {
    /// Tasks per run.
    #[arg(default_value_t = 100_000)]
    count: usize,
    /// Only the memory run: one worker drains a backlog of this many
    /// records (1,000,000 if no number is given).
    #[arg(long, value_name = "RECORDS", num_args = 0..=1, default_missing_value = "1000000")]
    memory: Option<usize>,
    /// Only the step latency run.
    #[arg(long, conflicts_with = "memory")]
    steps: bool,
    /// Only the operation runs: a backlog of N/10 three-step operations,
    /// the step latency and the fan-out/fan-in latency.
    #[arg(long, conflicts_with_all = ["memory", "steps"])]
    operations: bool,
    /// Only the `--ordering none` rate, this many runs (each on a backlog
    /// of its own), and their median: rates vary from run to run, so a
    /// change to the hot path is judged on several.
    #[arg(long, value_name = "RUNS", conflicts_with_all = ["memory", "steps", "operations"])]
    throughput: Option<usize>,
    /// Records produced and read back before anything is measured, so
    /// that a broker just started (Apache Kafka's JVM compiles its hot code
    /// as it runs) is measured warm, as a long-running broker is; 0 for
    /// none.
    #[arg(long, value_name = "RECORDS", default_value_t = 500_000)]
    warm_up: usize,
}

fn main() -> ExitCode {
    let registry = match registry() {
        Ok(registry) => registry,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The benchmark's workers: this binary run as a user's worker binary.
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return kser::cli::run(registry);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(bench(args)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the benchmark runs against.
struct Bench {
    kafka: KafkaConfig,
    database_url: String,
    conn: AsyncPgConnection,
    run_id: String,
    /// Where the workers' logs go: `KSER_BENCH_LOGS`, kept, or a temporary
    /// directory.
    logs: Logs,
}

/// What one worker run measured.
struct WorkerRun {
    rate: f64,
    /// From the first task started to every final state durable.
    seconds: f64,
    /// From the first task started to the last one finished running: the
    /// rest of `seconds` is the wait for the last final states' writes.
    ran_seconds: f64,
    wall_seconds: f64,
    succeeded: i64,
    failed: i64,
    memory: Memory,
}

/// A process's memory, in KiB, and the CPU time it used, read just before
/// it is stopped.
#[derive(Default)]
struct Memory {
    peak: Option<u64>,
    resident: Option<u64>,
    /// User and system CPU seconds, its start and group join included.
    cpu_seconds: Option<f64>,
}

impl Memory {
    fn describe(&self) -> String {
        match (self.peak, self.resident) {
            (Some(peak), Some(resident)) => format!(
                "worker process: {:.1} MiB peak RSS, {:.1} MiB at the end",
                mib(peak),
                mib(resident)
            ),
            _ => "worker process memory: unknown (no /proc here)".into(),
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let brokers = std::env::var("KSER_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let database_url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    // Migrated here so the tables can be emptied before each worker starts.
    Store::connect(&database_url, 2).await?.migrate().await?;
    let mut bench = Bench {
        kafka: KafkaConfig::new(brokers).with_env(),
        conn: AsyncPgConnection::establish(&database_url)
            .await
            .context("connecting to DATABASE_URL")?,
        database_url,
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        logs: Logs::new()?,
    };
    print_setup(&mut bench).await?;
    warm_up(&bench, args.warm_up).await?;
    if let Some(records) = args.memory {
        memory_run(&mut bench, records).await
    } else if args.steps {
        bench.step_latency().await?.print();
        Ok(())
    } else if args.operations {
        operation_runs(&mut bench, args.count, None).await
    } else if let Some(runs) = args.throughput {
        throughput_runs(&mut bench, args.count, runs).await
    } else {
        full_run(&mut bench, args.count).await
    }
}

/// The machine, the broker and the database the figures are of.
async fn print_setup(bench: &mut Bench) -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        value: String,
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
        .unwrap_or_else(|_| format!("the broker at {}", bench.kafka.brokers));
    let mut setting = async |query: &str| -> anyhow::Result<String> {
        let row: Setting = diesel::sql_query(query).get_result(&mut bench.conn).await?;
        Ok(row.value)
    };
    let version = setting("SELECT current_setting('server_version') AS value").await?;
    let fsync = setting("SELECT current_setting('fsync') AS value").await?;
    let commit = setting("SELECT current_setting('synchronous_commit') AS value").await?;
    println!("kser benchmark on {cores} cores ({cpu})");
    println!("  broker: {broker}");
    println!("  database: Postgres {version}, fsync={fsync}, synchronous_commit={commit}");
    Ok(())
}

/// Produces `records` no-op records and reads them back with a bare
/// consumer, not counted. On a broker just started, the first runs were up
/// to a fifth slower, and the producer a third as fast, while the JVM
/// compiled the broker's hot code.
async fn warm_up(bench: &Bench, records: usize) -> anyhow::Result<()> {
    if records == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let topic = bench.topic("warm-up");
    produce(&bench.kafka, &topic, records, Noop::ENTRYPOINT).await?;
    let group = format!("{}-warm-up", bench.run_id);
    raw_consume(&bench.kafka, &topic, records, &group).await?;
    println!(
        "  broker warm-up: {records} records produced and read back in {:.1}s, not counted",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every figure but the large memory run.
async fn full_run(bench: &mut Bench, count: usize) -> anyhow::Result<()> {
    anyhow::ensure!(count >= 2, "the benchmark needs at least 2 tasks");
    let slow = count.min(ONE_AT_A_TIME_MAX);
    let tx = <TxNoop as kser::TransactionalTask>::ENTRYPOINT;
    // One backlog per run: a record whose task is final is not run again.
    let none_topic = bench.topic("none");
    let produce_rate = produce(&bench.kafka, &none_topic, count, Noop::ENTRYPOINT).await?;
    let key_topic = bench.topic("key");
    produce(&bench.kafka, &key_topic, count, Noop::ENTRYPOINT).await?;
    let tx_topic = bench.topic("tx");
    produce(&bench.kafka, &tx_topic, count, tx).await?;
    let one_topic = bench.topic("one");
    produce(&bench.kafka, &one_topic, slow, Noop::ENTRYPOINT).await?;
    let python_topic = bench.topic("python");
    produce(&bench.kafka, &python_topic, slow, Noop::ENTRYPOINT).await?;
    let http_topic = bench.topic("http");
    produce(&bench.kafka, &http_topic, count, Noop::ENTRYPOINT).await?;
    let operations = operations_backlog(bench, count).await?;

    println!("  {count} no-op tasks per run ({slow} for the runs one task at a time)");
    println!("  produce (kser producer, idempotent, acks=all)     {produce_rate:>10.0} msg/s");
    let raw_rate = raw_consume(&bench.kafka, &none_topic, count, &bench.run_id).await?;
    println!("  raw consume (rdkafka)                             {raw_rate:>10.0} msg/s");

    let runs = [
        ("worker --ordering none", &none_topic, count, "none", 256),
        (
            "worker --ordering key (10,000 keys)",
            &key_topic,
            count,
            "key",
            256,
        ),
        (
            "worker transactional, --ordering none",
            &tx_topic,
            count,
            "none",
            256,
        ),
        (
            "worker concurrency 1, --ordering none",
            &one_topic,
            slow,
            "none",
            1,
        ),
    ];
    let mut rates = Vec::new();
    for (label, topic, tasks, ordering, concurrency) in runs {
        let run = bench
            .run_worker(topic, tasks, ordering, concurrency, &[])
            .await?;
        print_worker_run(label, &run);
        rates.push(run.rate);
    }
    let (none_rate, key_rate, one_rate) = (rates[0], rates[1], rates[3]);
    println!(
        "  key / none: {:.2}",
        key_rate / none_rate.max(f64::EPSILON)
    );

    // The same run with the metrics recorder on and /metrics scraped every
    // second, as Prometheus would.
    let address = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let scraper = Scraper::start(&address);
    let run = bench
        .run_worker(&http_topic, count, "none", 256, &[("KSER_HTTP", &address)])
        .await?;
    let scrapes = scraper.stop();
    print_worker_run("worker --ordering none, --http (scraped 1/s)", &run);
    println!(
        "  --http / none: {:.2} ({scrapes} scrapes answered)",
        run.rate / none_rate.max(f64::EPSILON)
    );

    match python_kser(bench, &python_topic, slow).await? {
        PythonRun::Ran {
            rate,
            seconds,
            failed,
            peak_rss_kib,
            cpu_per_task,
        } => {
            println!(
                "  Python kser 0.8.27 consumer (confluent)           {rate:>10.0} tasks/s  \
                 ({seconds:.2}s, {failed} failed, nothing persisted)"
            );
            println!(
                "      Python process: {:.1} MiB peak RSS; {:.0} µs CPU per task",
                mib(peak_rss_kib),
                cpu_per_task * 1e6
            );
            println!(
                "  kser / Python kser: {:.1} (--ordering none), {:.2} (concurrency 1)",
                none_rate / rate.max(f64::EPSILON),
                one_rate / rate.max(f64::EPSILON)
            );
        }
        PythonRun::Missing(why) => println!("  Python kser 0.8.27: skipped, {why}"),
    }

    operation_runs(bench, count, Some(operations)).await
}

/// The `--ordering none` run `runs` times, and the median rate.
async fn throughput_runs(bench: &mut Bench, count: usize, runs: usize) -> anyhow::Result<()> {
    anyhow::ensure!(count >= 2, "the benchmark needs at least 2 tasks");
    println!("  {count} no-op tasks per run, {runs} runs");
    let mut rates = Vec::with_capacity(runs);
    for run in 1..=runs.max(1) {
        let topic = bench.topic(&format!("none{run}"));
        produce(&bench.kafka, &topic, count, Noop::ENTRYPOINT).await?;
        let result = bench.run_worker(&topic, count, "none", 256, &[]).await?;
        print_worker_run(&format!("worker --ordering none, run {run}"), &result);
        rates.push(result.rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "  median of {} runs: {:.0} tasks/s",
        rates.len(),
        rates[rates.len() / 2]
    );
    Ok(())
}

/// Produces the backlog of the operation throughput run: `count /
/// TASKS_PER_OPERATION` three-step operations. Returns the topic and how
/// many.
async fn operations_backlog(bench: &Bench, count: usize) -> anyhow::Result<(String, usize)> {
    let operations = (count / TASKS_PER_OPERATION).max(1);
    let topic = bench.topic("operations");
    produce(&bench.kafka, &topic, operations, ThreeSteps::ENTRYPOINT).await?;
    Ok((topic, operations))
}

/// The operation figures: throughput on a backlog (produced now unless
/// `backlog` was produced before), step latency, fan-out/fan-in latency.
async fn operation_runs(
    bench: &mut Bench,
    count: usize,
    backlog: Option<(String, usize)>,
) -> anyhow::Result<()> {
    let (topic, operations) = match backlog {
        Some(backlog) => backlog,
        None => operations_backlog(bench, count).await?,
    };
    bench
        .operation_throughput(&topic, operations)
        .await?
        .print();
    bench.step_latency().await?.print();
    bench.fan_latency().await?.print();
    Ok(())
}

/// One worker draining a large backlog, for its peak memory.
async fn memory_run(bench: &mut Bench, records: usize) -> anyhow::Result<()> {
    anyhow::ensure!(records >= 2, "the memory run needs at least 2 records");
    let topic = bench.topic("memory");
    let produce_rate = produce(&bench.kafka, &topic, records, Noop::ENTRYPOINT).await?;
    println!(
        "  memory run: a backlog of {records} no-op records, produced at {produce_rate:.0} msg/s"
    );
    let run = bench.run_worker(&topic, records, "none", 256, &[]).await?;
    print_worker_run("worker --ordering none, concurrency 256", &run);
    if let Some(peak) = run.memory.peak {
        let verdict = if mib(peak) <= MEMORY_TARGET_MIB as f64 {
            "within"
        } else {
            "over"
        };
        println!(
            "  peak RSS {:.1} MiB: {verdict} the target of {MEMORY_TARGET_MIB} MiB",
            mib(peak)
        );
    }
    Ok(())
}

/// Reads a worker's `/metrics` every second, on a thread of its own.
struct Scraper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Scraper {
    fn start(address: &str) -> Self {
        use std::io::{Read as _, Write as _};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let address = address.to_owned();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            while !std::sync::atomic::AtomicBool::load(
                &stopping,
                std::sync::atomic::Ordering::Relaxed,
            ) {
                if let Ok(mut stream) = std::net::TcpStream::connect(&address) {
                    let mut body = String::new();
                    let asked = stream.write_all(
                        b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
                    );
                    if asked.is_ok()
                        && stream.read_to_string(&mut body).is_ok()
                        && body.contains("kser_task_result_total")
                    {
                        answered += 1;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            answered
        });
        Self { stop, thread }
    }

    /// Stops and says how many scrapes got metrics back.
    fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn print_worker_run(label: &str, run: &WorkerRun) {
    println!(
        "  {label:<49} {:>10.0} tasks/s  ({:.2}s processing, {:.2}s with start and group join; \
         {} succeeded, {} failed)",
        run.rate, run.seconds, run.wall_seconds, run.succeeded, run.failed
    );
    println!(
        "      the last task ran {:.2}s after the first started, its final state was durable {:.2}s later",
        run.ran_seconds,
        run.seconds - run.ran_seconds
    );
    let cpu = run
        .memory
        .cpu_seconds
        .map(|cpu| {
            let tasks = (run.succeeded + run.failed).max(1) as f64;
            format!("; {:.0} µs CPU per task", cpu * 1e6 / tasks)
        })
        .unwrap_or_default();
    println!("      {}{cpu}", run.memory.describe());
}

impl Bench {
    fn topic(&self, what: &str) -> String {
        format!("kser-bench-{}-{what}", self.run_id)
    }

    /// Empties kser's tables, so no run pays for the rows of the one
    /// before (and the tables that refer to tasks and operations, such as
    /// the pools' waiters, with them).
    async fn empty_tables(&mut self) -> anyhow::Result<()> {
        diesel::sql_query(
            "TRUNCATE kser.task_attempts, kser.outbox, kser.steps, kser.tasks, kser.operations \
             CASCADE",
        )
        .execute(&mut self.conn)
        .await
        .context("emptying kser's tables")?;
        Ok(())
    }

    /// Runs a worker process on `topic` until every one of its `count`
    /// records is done (its offset committed, so its final state is in
    /// Postgres), then stops it.
    async fn run_worker(
        &mut self,
        topic: &str,
        count: usize,
        ordering: &str,
        concurrency: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<WorkerRun> {
        #[derive(diesel::QueryableByName)]
        struct Window {
            #[diesel(sql_type = BigInt)]
            succeeded: i64,
            #[diesel(sql_type = BigInt)]
            failed: i64,
            #[diesel(sql_type = Nullable<Double>)]
            first_started: Option<f64>,
            #[diesel(sql_type = Nullable<Double>)]
            last_finished: Option<f64>,
        }

        self.empty_tables().await?;
        let group = format!("bench-worker-{topic}");
        let wall = Instant::now();
        let mut worker = self.spawn_worker(topic, &group, ordering, concurrency, env)?;
        let progress = Progress::new(&self.kafka, &group, topic)?;
        let limit = Duration::from_secs(600);
        let durable = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            worker.check_alive()?;
            // The group's coordinator may still be loading or moving (a
            // broker just started): not the end of the run.
            let done = match progress.committed().await {
                Ok(done) => done,
                Err(err) if wall.elapsed() < limit => {
                    eprintln!("  (reading the group's offsets: {err:#}; trying again)");
                    continue;
                }
                Err(err) => return Err(err),
            };
            if done >= count as i64 {
                break chrono::Utc::now();
            }
            anyhow::ensure!(
                wall.elapsed() < limit,
                "only {done} of {count} records done after {} s; worker log: {}",
                limit.as_secs(),
                worker.log.display()
            );
        };
        let wall_seconds = wall.elapsed().as_secs_f64();
        let memory = worker.memory();
        worker.stop().await?;
        let window: Window = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE status = 'SUCCESS') AS succeeded, \
                 count(*) FILTER (WHERE status = 'FAILED') AS failed, \
                 extract(epoch FROM min(started_at))::float8 AS first_started, \
                 extract(epoch FROM max(finished_at))::float8 AS last_finished \
             FROM kser.tasks WHERE topic = $1",
        )
        .bind::<Text, _>(topic)
        .get_result(&mut self.conn)
        .await?;
        let durable = durable.timestamp_micros() as f64 / 1e6;
        let first_started = window.first_started.unwrap_or(durable);
        let seconds = durable - first_started;
        Ok(WorkerRun {
            rate: count as f64 / seconds.max(f64::EPSILON),
            seconds,
            ran_seconds: window.last_finished.unwrap_or(durable) - first_started,
            wall_seconds,
            succeeded: window.succeeded,
            failed: window.failed,
            memory,
        })
    }

    fn spawn_worker(
        &self,
        topic: &str,
        group: &str,
        ordering: &str,
        concurrency: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<WorkerProcess> {
        let log = self.logs.path(group);
        let stderr = std::fs::File::create(&log)?;
        let exe = std::env::current_exe().context("finding the benchmark's own binary")?;
        // KSER_BENCH_WRAP runs each worker under a profiler, e.g.
        // "heaptrack -o /tmp/worker" or "perf record -g -o /tmp/perf.data --"
        // (the memory figures are then the wrapper's).
        let wrap = std::env::var("KSER_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(wrapper) => {
                let mut command = Command::new(wrapper);
                command.args(words).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command
            .args(["worker", "--topics", topic, "--group", group])
            .args(["--ordering", ordering, "--concurrency"])
            .arg(concurrency.to_string())
            .env("DATABASE_URL", &self.database_url)
            .env("KSER_BROKERS", &self.kafka.brokers)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        // The end of a run is seen in the group's committed offsets: commit
        // every 100 ms instead of every second, so it is seen sooner.
        if std::env::var_os("KSER_KAFKA_AUTO_COMMIT_INTERVAL_MS").is_none() {
            command.env("KSER_KAFKA_AUTO_COMMIT_INTERVAL_MS", "100");
        }
        let child = command.spawn().context("starting a worker process")?;
        Ok(WorkerProcess { child, log })
    }

    /// Polls operation `uuid` every 2 ms until it is SUCCESS: an error if
    /// it ends otherwise, the worker exits, or `limit` passes.
    async fn wait_operation(
        &mut self,
        worker: &mut WorkerProcess,
        uuid: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        #[derive(diesel::QueryableByName)]
        struct Status {
            #[diesel(sql_type = Text)]
            status: String,
        }

        let sent = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let status: Option<Status> =
                diesel::sql_query("SELECT status FROM kser.operations WHERE uuid = $1")
                    .bind::<Text, _>(uuid)
                    .get_result(&mut self.conn)
                    .await
                    .map(Some)
                    .or_else(|err| match err {
                        diesel::result::Error::NotFound => Ok(None),
                        err => Err(err),
                    })?;
            match status.as_ref().map(|s| s.status.as_str()) {
                Some("SUCCESS") => return Ok(()),
                Some(status @ ("FAILED" | "CANCELLED")) => {
                    anyhow::bail!("operation {uuid} ended {status}")
                }
                _ => {}
            }
            worker.check_alive()?;
            anyhow::ensure!(
                sent.elapsed() < limit,
                "operation {uuid} not done after {} s; worker log: {}",
                limit.as_secs(),
                worker.log.display()
            );
        }
    }

    /// One worker (`--ordering key`, concurrency 256) drains a backlog of
    /// `operations` three-step operations: from the first operation
    /// recorded (`kser.operations.started_at`) to the last one's final
    /// state (`finished_at`, stamped in the transaction that writes it).
    /// The end is seen by counting finished operations every 100 ms.
    async fn operation_throughput(
        &mut self,
        topic: &str,
        operations: usize,
    ) -> anyhow::Result<OperationThroughput> {
        #[derive(diesel::QueryableByName)]
        struct Done {
            #[diesel(sql_type = BigInt)]
            done: i64,
        }
        #[derive(diesel::QueryableByName)]
        struct Window {
            #[diesel(sql_type = BigInt)]
            succeeded: i64,
            #[diesel(sql_type = BigInt)]
            failed: i64,
            #[diesel(sql_type = Nullable<Double>)]
            first_started: Option<f64>,
            #[diesel(sql_type = Nullable<Double>)]
            last_finished: Option<f64>,
            #[diesel(sql_type = BigInt)]
            steps: i64,
        }

        self.empty_tables().await?;
        let group = format!("bench-worker-{topic}");
        let wall = Instant::now();
        let mut worker = self.spawn_worker(topic, &group, "key", 256, &[])?;
        let limit = Duration::from_secs(600);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            worker.check_alive()?;
            let done: Done = diesel::sql_query(
                "SELECT count(*) AS done FROM kser.operations WHERE finished_at IS NOT NULL",
            )
            .get_result(&mut self.conn)
            .await?;
            if done.done >= operations as i64 {
                break;
            }
            anyhow::ensure!(
                wall.elapsed() < limit,
                "only {} of {operations} operations done after {} s; worker log: {}",
                done.done,
                limit.as_secs(),
                worker.log.display()
            );
        }
        let wall_seconds = wall.elapsed().as_secs_f64();
        let memory = worker.memory();
        worker.stop().await?;
        let window: Window = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE status = 'SUCCESS') AS succeeded, \
                 count(*) FILTER (WHERE status <> 'SUCCESS') AS failed, \
                 extract(epoch FROM min(started_at))::float8 AS first_started, \
                 extract(epoch FROM max(finished_at))::float8 AS last_finished, \
                 (SELECT count(*) FROM kser.tasks WHERE topic = $1 \
                     AND status = 'SUCCESS') AS steps \
             FROM kser.operations WHERE topic = $1",
        )
        .bind::<Text, _>(topic)
        .get_result(&mut self.conn)
        .await?;
        let seconds = match (window.first_started, window.last_finished) {
            (Some(first), Some(last)) => last - first,
            _ => wall_seconds,
        };
        let rate = operations as f64 / seconds.max(f64::EPSILON);
        Ok(OperationThroughput {
            operations,
            rate,
            seconds,
            wall_seconds,
            succeeded: window.succeeded,
            failed: window.failed,
            steps: window.steps,
            memory,
        })
    }

    /// Runs `GRAPHS` fan-out/fan-in operations one at a time (each sent
    /// once the previous one ended, after one to warm up) on a worker
    /// whose consumer has `fetch.wait.max.ms=1`, and measures each from
    /// just before its send to its SUCCESS seen in Postgres.
    async fn fan_latency(&mut self) -> anyhow::Result<FanLatency> {
        #[derive(diesel::QueryableByName)]
        struct Marks {
            #[diesel(sql_type = Text)]
            uuid: String,
            #[diesel(sql_type = Nullable<Double>)]
            root_finished: Option<f64>,
            #[diesel(sql_type = Nullable<Double>)]
            branches_finished: Option<f64>,
        }

        self.empty_tables().await?;
        let topic = self.topic("fan");
        let layout = TopicLayout {
            partitions: PARTITIONS,
            replication_factor: 1,
        };
        ensure_topics(&self.kafka, std::slice::from_ref(&topic), layout).await?;
        let group = format!("bench-worker-{topic}");
        let mut worker = self.spawn_worker(
            &topic,
            &group,
            "key",
            256,
            &[("KSER_KAFKA_FETCH_WAIT_MAX_MS", "1")],
        )?;
        let producer = Producer::new(&self.kafka)?;
        // Per operation: when it was sent and when its SUCCESS was seen, in
        // seconds since the epoch (the worker stamps its rows with the same
        // clock: one machine).
        let mut timed: Vec<(String, f64, f64)> = Vec::with_capacity(GRAPHS);
        for index in 0..=GRAPHS {
            let message = Message::new(FanOut::ENTRYPOINT, JsonObject::new());
            // The first one waits for the worker to start and join.
            let limit = Duration::from_secs(if index == 0 { 120 } else { 30 });
            let sent_at = epoch_now();
            producer.send(&topic, &message).await?;
            self.wait_operation(&mut worker, &message.uuid, limit)
                .await?;
            if index > 0 {
                timed.push((message.uuid.clone(), sent_at, epoch_now()));
            }
        }
        worker.stop().await?;
        let marks: Vec<Marks> = diesel::sql_query(
            "SELECT o.uuid, \
                 extract(epoch FROM max(t.finished_at) FILTER (WHERE s.name = 'start'))::float8 \
                     AS root_finished, \
                 extract(epoch FROM max(t.finished_at) FILTER (WHERE s.name LIKE 'branch%'))::float8 \
                     AS branches_finished \
             FROM kser.operations o JOIN kser.tasks t ON t.operation_uuid = o.uuid \
             JOIN kser.steps s ON s.task_uuid = t.uuid \
             WHERE o.topic = $1 GROUP BY o.uuid",
        )
        .bind::<Text, _>(&topic)
        .load(&mut self.conn)
        .await?;
        let marks: std::collections::HashMap<String, (f64, f64)> = marks
            .into_iter()
            .filter_map(|m| Some((m.uuid, (m.root_finished?, m.branches_finished?))))
            .collect();
        let ms = |seconds: f64| seconds * 1000.0;
        let split: Vec<(f64, f64, f64)> = timed
            .iter()
            .filter_map(|(uuid, sent, seen)| {
                let (root, branches) = marks.get(uuid)?;
                Some((ms(root - sent), ms(branches - root), ms(seen - branches)))
            })
            .collect();
        anyhow::ensure!(
            split.len() == timed.len(),
            "the steps of some fan-out operations were not found"
        );
        Ok(FanLatency {
            total: Percentiles::of(timed.iter().map(|(_, sent, seen)| ms(seen - sent))),
            to_root: Percentiles::of(split.iter().map(|s| s.0)),
            branches: Percentiles::of(split.iter().map(|s| s.1)),
            to_end: Percentiles::of(split.iter().map(|s| s.2)),
        })
    }

    /// Runs `OPERATIONS` three-step operations one at a time on a worker
    /// whose consumer has `fetch.wait.max.ms=1`, and measures the gaps
    /// between a step's end and the next step's start.
    async fn step_latency(&mut self) -> anyhow::Result<StepLatency> {
        #[derive(diesel::QueryableByName)]
        struct Gap {
            #[diesel(sql_type = Double)]
            total: f64,
            #[diesel(sql_type = Nullable<Double>)]
            to_publish: Option<f64>,
            #[diesel(sql_type = Nullable<Double>)]
            to_start: Option<f64>,
        }

        self.empty_tables().await?;
        let topic = self.topic("steps");
        let layout = TopicLayout {
            partitions: PARTITIONS,
            replication_factor: 1,
        };
        ensure_topics(&self.kafka, std::slice::from_ref(&topic), layout).await?;
        let group = format!("bench-worker-{topic}");
        let mut worker = self.spawn_worker(
            &topic,
            &group,
            "key",
            256,
            &[("KSER_KAFKA_FETCH_WAIT_MAX_MS", "1")],
        )?;
        let producer = Producer::new(&self.kafka)?;
        for index in 0..OPERATIONS {
            let message = Message::new(ThreeSteps::ENTRYPOINT, JsonObject::new());
            producer.send(&topic, &message).await?;
            // The first one waits for the worker to start and join.
            let limit = Duration::from_secs(if index == 0 { 120 } else { 30 });
            self.wait_operation(&mut worker, &message.uuid, limit)
                .await?;
        }
        worker.stop().await?;
        // The record timestamp of a step's message (its `enqueued_at`, set
        // by the producer when the outbox relay sends it, in whole
        // milliseconds) splits each gap in two.
        let gaps: Vec<Gap> = diesel::sql_query(
            "SELECT extract(epoch FROM started_at - previous)::float8 * 1000 AS total, \
                 extract(epoch FROM enqueued_at - previous)::float8 * 1000 AS to_publish, \
                 extract(epoch FROM started_at - enqueued_at)::float8 * 1000 AS to_start \
             FROM (SELECT t.started_at, t.enqueued_at, lag(t.finished_at) \
                       OVER (PARTITION BY t.operation_uuid ORDER BY t.position) AS previous \
                   FROM kser.tasks t JOIN kser.operations o ON o.uuid = t.operation_uuid \
                   WHERE o.topic = $1) AS steps \
             WHERE previous IS NOT NULL AND started_at IS NOT NULL",
        )
        .bind::<Text, _>(&topic)
        .load(&mut self.conn)
        .await?;
        anyhow::ensure!(!gaps.is_empty(), "no step gaps were recorded");
        Ok(StepLatency {
            total: Percentiles::of(gaps.iter().map(|g| g.total)),
            to_publish: Percentiles::of(gaps.iter().filter_map(|g| g.to_publish)),
            to_start: Percentiles::of(gaps.iter().filter_map(|g| g.to_start)),
        })
    }
}

/// Where the logs of the benchmark's processes go.
enum Logs {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl Logs {
    fn new() -> anyhow::Result<Self> {
        match std::env::var_os("KSER_BENCH_LOGS").filter(|dir| !dir.is_empty()) {
            Some(dir) => {
                std::fs::create_dir_all(&dir)?;
                Ok(Self::Kept(dir.into()))
            }
            None => Ok(Self::Temporary(tempfile::tempdir()?)),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let dir = match self {
            Self::Kept(dir) => dir.as_path(),
            Self::Temporary(dir) => dir.path(),
        };
        dir.join(format!("{name}.log"))
    }
}

/// A worker process of the benchmark.
struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the worker exited with {status}:\n{}", log_tail(&self.log));
        }
        Ok(())
    }

    fn memory(&self) -> Memory {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
        else {
            return Memory::default();
        };
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        Memory {
            peak: field("VmHWM:"),
            resident: field("VmRSS:"),
            cpu_seconds: cpu_seconds(self.child.id()),
        }
    }

    /// SIGTERM, as a deployment stops a worker, then waits for its exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(sent.success(), "could not signal the worker");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "the worker exited with {status}:\n{}",
                    log_tail(&self.log)
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child.kill()?;
        anyhow::bail!("the worker did not stop within 60 s of SIGTERM")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User and system CPU time of a process and its threads, from
/// `/proc/<pid>/stat` (in clock ticks, `getconf CLK_TCK`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses: utime
    // and stime are the 14th and 15th of the whole line.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0);
    Some(ticks as f64 / per_second)
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// How many records of a topic a consumer group has committed: a worker
/// commits a record's offset only once its final state is in Postgres, so
/// this tells when a run is done without counting rows while it runs.
struct Progress {
    probe: Arc<BaseConsumer>,
    partitions: TopicPartitionList,
}

impl Progress {
    fn new(kafka: &KafkaConfig, group: &str, topic: &str) -> anyhow::Result<Self> {
        // Never subscribes, so it reads the group's offsets without joining.
        let probe: BaseConsumer = kafka
            .client_config(ClientRole::Consumer, &[("group.id", group)])
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            partitions.add_partition(topic, partition);
        }
        Ok(Self {
            probe: Arc::new(probe),
            partitions,
        })
    }

    async fn committed(&self) -> anyhow::Result<i64> {
        let (probe, partitions) = (Arc::clone(&self.probe), self.partitions.clone());
        let committed = tokio::task::spawn_blocking(move || {
            probe.committed_offsets(partitions, Duration::from_secs(10))
        })
        .await??;
        Ok(committed
            .elements()
            .iter()
            .map(|element| match element.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            })
            .sum())
    }
}

/// Publishes `count` messages of `entrypoint` keyed by `KEYS` distinct keys
/// and returns the rate.
async fn produce(
    kafka: &KafkaConfig,
    topic: &str,
    count: usize,
    entrypoint: &str,
) -> anyhow::Result<f64> {
    let layout = TopicLayout {
        partitions: PARTITIONS,
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

enum PythonRun {
    Ran {
        rate: f64,
        seconds: f64,
        failed: u64,
        peak_rss_kib: u64,
        /// CPU seconds per task, its start and group join included.
        cpu_per_task: f64,
    },
    Missing(String),
}

/// Runs Python kser's consumer (`scripts/bench_python_kser.py`) on `topic`.
async fn python_kser(bench: &Bench, topic: &str, count: usize) -> anyhow::Result<PythonRun> {
    #[derive(serde::Deserialize)]
    struct Report {
        rate: f64,
        seconds: f64,
        failed: u64,
        peak_rss_kib: u64,
        cpu_seconds: f64,
        tasks: u64,
    }

    let Some(python) = std::env::var_os("KSER_BENCH_PYTHON")
        .or_else(|| std::env::var_os("KSER_TEST_PYTHON"))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
    else {
        return Ok(PythonRun::Missing(
            "set KSER_BENCH_PYTHON to a Python with kser 0.8.27 and confluent-kafka \
             (scripts/bench installs one)"
                .into(),
        ));
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_python_kser.py");
    let group = format!("bench-python-{topic}");
    let log = bench.logs.path(&group);
    let spawned = Command::new(&python)
        .args(["-W", "ignore"])
        .arg(&script)
        .args([bench.kafka.brokers.as_str(), topic, &group])
        .arg(count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            return Ok(PythonRun::Missing(format!(
                "could not run {}: {err}",
                python.display()
            )));
        }
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the Python kser benchmark did not finish within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout)?;
    }
    if status.code() == Some(3) {
        return Ok(PythonRun::Missing(format!(
            "{} says: {}",
            python.display(),
            log_tail(&log).trim()
        )));
    }
    anyhow::ensure!(
        status.success(),
        "the Python kser benchmark failed ({status}):\n{}",
        log_tail(&log)
    );
    let report: Report = serde_json::from_str(stdout.trim())
        .with_context(|| format!("reading the Python kser benchmark's report: {stdout}"))?;
    Ok(PythonRun::Ran {
        rate: report.rate,
        seconds: report.seconds,
        failed: report.failed,
        peak_rss_kib: report.peak_rss_kib,
        cpu_per_task: report.cpu_seconds / report.tasks.max(1) as f64,
    })
}

/// Nearest-rank percentiles of a sample, in milliseconds.
struct Percentiles {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.collect();
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| -> f64 {
            if values.is_empty() {
                return f64::NAN;
            }
            let index = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
            values[index]
        };
        Self {
            count: values.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The gaps between steps of one operation.
struct StepLatency {
    /// From a step's `finished_at` to the next step's `started_at`.
    total: Percentiles,
    /// From a step's end to its next step's message being produced (the
    /// record timestamp): the finish write and the outbox relay.
    to_publish: Percentiles,
    /// From that record timestamp to the step's start: the producer, the
    /// broker, the consumer's fetch and the worker's intake.
    to_start: Percentiles,
}

impl StepLatency {
    fn print(&self) {
        println!(
            "  operation step latency ({OPERATIONS} three-step operations sent one at a time, \
             each after the previous one ended; consumer fetch.wait.max.ms=1)"
        );
        println!(
            "      step finished -> next step started: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} gaps)",
            self.total.p50, self.total.p99, self.total.max, self.total.count
        );
        println!(
            "      of which finished -> next step's record produced: p50 {:.1} ms, p99 {:.1} ms; \
             produced -> started: p50 {:.1} ms, p99 {:.1} ms (record timestamps are whole ms)",
            self.to_publish.p50, self.to_publish.p99, self.to_start.p50, self.to_start.p99
        );
    }
}

/// Seconds since the epoch, now.
fn epoch_now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// What the operation throughput run measured.
struct OperationThroughput {
    operations: usize,
    /// Operations per second.
    rate: f64,
    /// From the first operation recorded to the last one finished.
    seconds: f64,
    wall_seconds: f64,
    succeeded: i64,
    failed: i64,
    /// Steps that succeeded.
    steps: i64,
    memory: Memory,
}

impl OperationThroughput {
    fn print(&self) {
        println!(
            "  {:<49} {:>10.0} ops/s = {:.0} steps/s  ({} operations of 3 no-op steps, \
             {:.2}s processing, {:.2}s with start and group join; {} succeeded, {} failed, \
             {} steps succeeded)",
            "3-step operations, one worker (--ordering key)",
            self.rate,
            self.rate * 3.0,
            self.operations,
            self.seconds,
            self.wall_seconds,
            self.succeeded,
            self.failed,
            self.steps
        );
        let cpu = self
            .memory
            .cpu_seconds
            .map(|cpu| {
                let steps = self.steps.max(1) as f64;
                format!("; {:.0} µs CPU per step", cpu * 1e6 / steps)
            })
            .unwrap_or_default();
        println!("      {}{cpu}", self.memory.describe());
    }
}

/// End-to-end times of the fan-out/fan-in graph operations.
struct FanLatency {
    /// From just before the send to the operation's SUCCESS seen.
    total: Percentiles,
    /// From the send to the root step's `finished_at`.
    to_root: Percentiles,
    /// From the root's end to the last branch's `finished_at`.
    branches: Percentiles,
    /// From the last branch's end to the SUCCESS seen: the join.
    to_end: Percentiles,
}

impl FanLatency {
    fn print(&self) {
        println!(
            "  fan-out/fan-in latency ({GRAPHS} graph operations 1 -> {FAN_OUT} -> 1 of no-op steps, \
             sent one at a time, each after the previous one ended; consumer fetch.wait.max.ms=1)"
        );
        println!(
            "      send -> operation SUCCESS seen: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} operations)",
            self.total.p50, self.total.p99, self.total.max, self.total.count
        );
        println!(
            "      of which send -> root finished: p50 {:.1} ms, p99 {:.1} ms; root -> last of the \
             {FAN_OUT} branches finished: p50 {:.1} ms, p99 {:.1} ms; -> join done, SUCCESS seen: \
             p50 {:.1} ms, p99 {:.1} ms",
            self.to_root.p50,
            self.to_root.p99,
            self.branches.p50,
            self.branches.p99,
            self.to_end.p50,
            self.to_end.p99
        );
    }
}
