//! Real Kafka nodes failing under a running worker: a private 3-node Apache
//! Kafka cluster (replication factor 3, `min.insync.replicas=2`), the real
//! Postgres, and the showcase example as the worker. The node leading most
//! partitions of the test topic is killed (SIGKILL) or stopped (SIGTERM)
//! mid-run and started again; the worker, never restarted, finishes every
//! task, each exactly once, and `send --batch` run during the outage loses
//! nothing.
//!
//! Each test sends its tasks in four phases: before the fault, while the node
//! is down, just before it is started again, and once it is back. It takes
//! its size from `KSER_FAULT_TASKS` (tasks per test, 2,000 by default) and
//! its random choices (when to strike, for how long, task durations) from a
//! seed it prints; `KSER_SOAK_SEED` replays one:
//!
//! ```text
//! KSER_FAULT_TASKS=20000 scripts/test --test broker_faults -- --nocapture
//! ```

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::Cluster;
use common::{TestEnv, WorkerProcess, text};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Tasks the worker runs at once.
const CONCURRENCY: usize = 16;
/// Partitions of the test topic (and of its dead-letter topic).
const PARTITIONS: i32 = 6;
/// Steps of each `showcase.Chain` operation.
const STEPS: usize = 3;
/// Attempts of each `showcase.FailTimes` task: two retryable failures, then
/// a success.
const RETRIED_ATTEMPTS: i64 = 3;

/// The seed of a test's random choices: `KSER_SOAK_SEED` (or
/// `KSER_TEST_SEED`) to replay one, printed either way.
fn seed(test: &str) -> u64 {
    let seed = ["KSER_SOAK_SEED", "KSER_TEST_SEED"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    println!("{test}: KSER_SOAK_SEED={seed}");
    seed
}

/// Tasks per test: `KSER_FAULT_TASKS`, 2,000 by default, 500 at least.
fn task_count() -> usize {
    std::env::var("KSER_FAULT_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
        // Enough that every partition gets tasks of every phase.
        .max(500)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `showcase.Sleep`: SUCCESS on its first attempt.
    Sleep,
    /// `showcase.FailTimes {"times": 2}`: SUCCESS on its third attempt.
    Retried,
    /// `showcase.Fail`: FAILED on its first attempt, and dead-lettered once.
    DeadLetter,
    /// `showcase.Chain`: an operation of [`STEPS`] steps, each run once.
    Operation,
    /// `showcase.Flaky`: retried (in place, every half second at most) until
    /// the test raises its flag once the node is back, then SUCCESS.
    Flaky,
}

/// The messages of one phase, as `send --batch` input.
struct Batch {
    phase: u32,
    input: String,
    sent: Vec<(String, Kind)>,
}

/// What a test has sent so far, and so what the database must end with.
#[derive(Default)]
struct Sent {
    messages: Vec<(String, Kind)>,
}

impl Sent {
    fn count(&self, kind: Kind) -> usize {
        self.messages.iter().filter(|(_, k)| *k == kind).count()
    }

    /// Rows of kser.tasks once everything sent is final.
    fn task_rows(&self) -> usize {
        self.messages.len() + self.count(Kind::Operation) * (STEPS - 1)
    }

    fn successes(&self) -> usize {
        self.task_rows() - self.count(Kind::DeadLetter)
    }
}

/// Builds the batches of a test: mostly sleeps of about `ms`, and when
/// `mixed`, one in forty of each of the other kinds (flaky tasks only with
/// a `flag`, and only before the node is back).
struct Planner {
    rng: StdRng,
    ms: u64,
    mixed: bool,
    flag: Option<String>,
}

impl Planner {
    fn batch(&mut self, phase: u32, count: usize) -> Batch {
        let others = if self.mixed { (count / 40).max(1) } else { 0 };
        let mut mix = vec![Kind::Retried, Kind::DeadLetter, Kind::Operation];
        if self.flag.is_some() && phase <= 2 {
            mix.push(Kind::Flaky);
        }
        let mut kinds = vec![Kind::Sleep; count - mix.len() * others];
        for kind in mix {
            kinds.extend(std::iter::repeat_n(kind, others));
        }
        kinds.shuffle(&mut self.rng);
        let mut input = String::new();
        let mut sent = Vec::with_capacity(count);
        for kind in kinds {
            let uuid = uuid::Builder::from_random_bytes(self.rng.random())
                .into_uuid()
                .to_string();
            let (entrypoint, params) = match kind {
                Kind::Sleep => {
                    let ms = self.rng.random_range(self.ms / 2..=self.ms * 3 / 2);
                    ("showcase.Sleep", json!({ "ms": ms }))
                }
                Kind::Retried => (
                    "showcase.FailTimes",
                    json!({ "times": RETRIED_ATTEMPTS - 1 }),
                ),
                Kind::DeadLetter => (
                    "showcase.Fail",
                    json!({ "reason": "dead-lettered on purpose", "retcode": 422 }),
                ),
                Kind::Operation => ("showcase.Chain", json!({ "count": STEPS, "ms": 20 })),
                Kind::Flaky => ("showcase.Flaky", json!({ "flag": self.flag })),
            };
            let line = json!({
                "uuid": uuid,
                "entrypoint": entrypoint,
                "params": params,
                "metadata": { "phase": phase },
            });
            input.push_str(&line.to_string());
            input.push('\n');
            sent.push((uuid, kind));
        }
        Batch { phase, input, sent }
    }
}

/// Runs `kser send --batch -` on `batch` to completion and checks that it
/// exited 0 and printed every uuid. Returns how long it took.
fn send_batch(env: &TestEnv, batch: &Batch) -> Duration {
    let started = Instant::now();
    let mut child = env
        .command(Path::new(env!("CARGO_BIN_EXE_kser")))
        .args(["send", "--batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    // Threads on each pipe: send prints uuids while it still reads input.
    let mut stdin = child.stdin.take().expect("stdin");
    let input = batch.input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stderr.read_to_end(&mut out);
        text(&out)
    });
    // The producer gives up on a record after 30 s (message.timeout.ms).
    let deadline = Duration::from_secs(90) + Duration::from_millis(batch.sent.len() as u64);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for send") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "send --batch (phase {}) still running after {deadline:?}: {}",
                batch.phase,
                errors.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let written = writer.join().expect("stdin writer");
    let printed = reader.join().expect("stdout reader").expect("read stdout");
    let errors = errors.join().unwrap_or_default();
    assert!(
        status.success(),
        "send --batch (phase {}) exited with {status}: {errors}",
        batch.phase
    );
    written.expect("send read all its input");
    let mut printed: Vec<&str> = printed.lines().collect();
    let mut expected: Vec<&str> = batch.sent.iter().map(|(uuid, _)| uuid.as_str()).collect();
    assert_eq!(
        printed.len(),
        expected.len(),
        "send --batch (phase {}) printed one uuid per message: {errors}",
        batch.phase
    );
    printed.sort_unstable();
    expected.sort_unstable();
    assert!(
        printed == expected,
        "send printed other uuids than it was given"
    );
    took
}

fn count(env: &TestEnv, query: &str) -> usize {
    env.sql(query)
        .parse()
        .unwrap_or_else(|_| panic!("a count from {query}"))
}

fn finished_tasks(env: &TestEnv) -> usize {
    count(
        env,
        "SELECT count(*) FROM kser.tasks WHERE status IN ('SUCCESS', 'FAILED')",
    )
}

/// Waits until everything in `sent` is final: its task rows (operation
/// steps included) and its operations. Prints where things stand if they
/// are not.
fn wait_all_final(env: &TestEnv, cluster: &Cluster, sent: &Sent, timeout: Duration) {
    let (rows, operations) = (sent.task_rows(), sent.count(Kind::Operation));
    let start = Instant::now();
    loop {
        let seen = (
            finished_tasks(env),
            count(
                env,
                "SELECT count(*) FROM kser.operations WHERE status IN ('SUCCESS', 'FAILED')",
            ),
        );
        if seen == (rows, operations) {
            return;
        }
        if start.elapsed() > timeout {
            diagnose(env, cluster);
            panic!(
                "timed out after {timeout:?} waiting for {rows} final tasks and {operations} final operations; \
                 {} and {} are",
                seen.0, seen.1
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Prints the state of the tasks, the outbox and the offsets.
fn diagnose(env: &TestEnv, cluster: &Cluster) {
    let queries = [
        "SELECT entrypoint, status, count(*), min(updated_at) FROM kser.tasks GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT status, count(*) FROM kser.operations GROUP BY 1",
        "SELECT count(*), count(*) FILTER (WHERE claimed_until > now()), min(available_at), \
         min(created_at) FROM kser.outbox",
        "SELECT kafka_partition, count(*), max(kafka_offset), \
         count(*) FILTER (WHERE status NOT IN ('SUCCESS', 'FAILED')) FROM kser.tasks GROUP BY 1 ORDER BY 1",
        "SELECT uuid, entrypoint, status, attempts, kafka_partition, kafka_offset, updated_at, \
         next_attempt_at FROM kser.tasks WHERE status NOT IN ('SUCCESS', 'FAILED') ORDER BY updated_at LIMIT 10",
    ];
    for query in queries {
        eprintln!("--- {query}\n{}", env.sql(query));
    }
    for topic in [env.topic.clone(), format!("{}.dlq", env.topic)] {
        eprintln!(
            "--- {topic}: (partition, end offset, committed by the group): {:?}",
            cluster.offsets(&topic, &env.group)
        );
    }
}

/// Seconds since the epoch, to compare with Postgres timestamps.
fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL: the node vanishes, and is fenced when its session expires.
    Kill,
    /// SIGTERM: a controlled shutdown that moves leadership away first.
    Stop,
}

struct Scenario {
    name: &'static str,
    fault: Fault,
    /// Seconds the node stays down at least, from the fault on; it also
    /// stays down until the worker has recovered.
    min_down: u64,
    /// Seconds it stays down longer, drawn from this range.
    extra_down: std::ops::RangeInclusive<u64>,
    /// Retried tasks, dead letters and operations among the sleeps.
    mixed: bool,
    /// Also tasks that keep failing, and are retried, until the node is back.
    flaky: bool,
}

fn run(scenario: Scenario) {
    let name = scenario.name;
    let seed = seed(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let total = task_count();
    let (n1, n2, n3) = (total * 2 / 5, total * 3 / 10, total * 3 / 20);
    let n4 = total - n1 - n2 - n3;
    // Sleeps long enough that the first phase keeps the worker busy for a
    // few seconds: the fault comes while tasks are in flight.
    let ms = (6000 * CONCURRENCY as u64 / n1 as u64).clamp(2, 200);
    let mut planner = Planner {
        rng: StdRng::seed_from_u64(rng.random()),
        ms,
        mixed: scenario.mixed,
        flag: None,
    };
    println!(
        "{name}: {total} tasks in phases of {n1}/{n2}/{n3}/{n4}, sleeps of ~{ms} ms, concurrency {CONCURRENCY}"
    );

    let cluster = Cluster::up();
    let began = Instant::now();
    let mut env = TestEnv::new();
    env.brokers = cluster.brokers();
    let dlq = format!("{}.dlq", env.topic);
    let flag = env.dir.path().join("flag");
    if scenario.flaky {
        planner.flag = Some(flag.to_string_lossy().into_owned());
    }
    // The showcase journals each start of a Sleep or an Append: how often
    // user code really ran.
    let journal = env.dir.path().join("journal");
    let log = env.dir.path().join("worker.log");
    let mut command = env.command(&common::example_path("showcase"));
    command
        .arg("worker")
        .args(["--replication-factor", "3", "--partitions"])
        .arg(PARTITIONS.to_string())
        .arg("--concurrency")
        .arg(CONCURRENCY.to_string())
        .args([
            // For showcase.Flaky (FailTimes has a policy of its own).
            "--max-attempts",
            "100000",
            "--retry-backoff",
            "200ms",
            "--retry-backoff-max",
            "500ms",
        ])
        .env("SHOWCASE_JOURNAL", &journal)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("worker log"));
    let mut worker = WorkerProcess::spawn(&mut command, log);
    let _log_on_failure = LogOnFailure {
        log: worker.log.clone(),
        keep_in: cluster.dir().to_owned(),
    };
    worker.wait_assigned();
    cluster.wait_in_sync(&[&env.topic, &dlq], Duration::from_secs(60));
    let drain = Duration::from_secs(120) + Duration::from_millis(total as u64 * 20);
    let mut sent = Sent::default();

    // Phase 1: work under way.
    let batch = planner.batch(1, n1);
    let took = send_batch(&env, &batch);
    sent.messages.extend(batch.sent);
    println!("{name}: phase 1 sent in {took:.1?}");
    let strike_at = rng.random_range(n1 / 20..=n1 / 6);
    common::wait_until(
        &format!("{strike_at} tasks to finish"),
        Duration::from_secs(60),
        || finished_tasks(&env) >= strike_at,
    );

    // The fault: the node that leads most partitions of the topic.
    let leaders = cluster.partitions(&env.topic);
    let mut led: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in &leaders {
        led.entry(p.leader).or_default().push(p.partition);
    }
    let most = led.values().map(Vec::len).max().expect("leaders");
    let busiest: Vec<i32> = led
        .iter()
        .filter(|(_, partitions)| partitions.len() == most)
        .map(|(node, _)| *node)
        .collect();
    let victim = busiest[rng.random_range(0..busiest.len())];
    let victim_partitions = led[&victim].clone();
    assert_eq!(victim, cluster.leader_of(&env.topic, victim_partitions[0]));
    let coordinator = cluster.coordinator_of(&env.group);
    let done_at_fault = finished_tasks(&env);
    let fault_epoch = epoch_now();
    let fault_at = Instant::now();
    match scenario.fault {
        Fault::Kill => cluster.kill(victim),
        Fault::Stop => cluster.stop(victim),
    }
    let done_after = finished_tasks(&env);
    println!(
        "{name}: {:?} node {victim} (leader of partitions {victim_partitions:?}; leaders {led:?}; \
         group coordinator {coordinator:?}) with {done_at_fault} of {} tasks done ({done_after} once it was down)",
        scenario.fault,
        sent.task_rows()
    );
    assert!(
        done_at_fault < sent.task_rows(),
        "the fault came mid-run (seed {seed})"
    );

    // Phase 2, sent while the node is down. The worker has recovered once
    // a task of it has finished on every partition.
    let batch = planner.batch(2, n2);
    let took = send_batch(&env, &batch);
    sent.messages.extend(batch.sent);
    println!(
        "{name}: phase 2 sent during the outage in {took:.1?}, {:.1?} after the fault",
        fault_at.elapsed()
    );
    common::wait_until(
        "a task sent after the fault to finish on every partition",
        drain,
        || {
            count(
                &env,
                "SELECT count(DISTINCT kafka_partition) FROM kser.tasks \
                 WHERE metadata->>'phase' = '2' AND status IN ('SUCCESS', 'FAILED')",
            ) == PARTITIONS as usize
        },
    );
    println!(
        "{name}: recovered {:.1?} after the fault: a task sent after it finished on every partition",
        fault_at.elapsed()
    );
    report_recovery(&env, name, fault_epoch, &victim_partitions);
    let down = Duration::from_secs(scenario.min_down).saturating_sub(fault_at.elapsed())
        + Duration::from_secs(rng.random_range(scenario.extra_down));
    std::thread::sleep(down);

    // Phase 3 runs while the node starts again; phase 4 once it is back.
    let batch = planner.batch(3, n3);
    send_batch(&env, &batch);
    sent.messages.extend(batch.sent);
    cluster.start(victim);
    println!(
        "{name}: node {victim} back after {:.1?} down",
        fault_at.elapsed()
    );
    let batch = planner.batch(4, n4);
    send_batch(&env, &batch);
    sent.messages.extend(batch.sent);
    cluster.wait_in_sync(&[&env.topic, &dlq], Duration::from_secs(120));
    // The flaky tasks may succeed now.
    std::fs::write(&flag, "").expect("raise the flag");
    wait_all_final(&env, &cluster, &sent, drain);
    println!(
        "{name}: all {} tasks final {:.1?} after the fault",
        sent.task_rows(),
        fault_at.elapsed()
    );

    verify(&env, &mut worker, &journal, &sent, seed);
    println!(
        "{name}: passed in {:.1?} after the cluster was up (seed {seed})",
        began.elapsed()
    );
}

/// Prints how long after the fault the first task sent after it finished,
/// at worst, on the partitions the node led and on the others (both include
/// the wait behind earlier tasks), and the longest time without any task
/// finishing: how long the worker stalled.
fn report_recovery(env: &TestEnv, name: &str, fault_epoch: f64, victim_partitions: &[i32]) {
    let rows = env.sql(&format!(
        "SELECT kafka_partition, extract(epoch FROM min(finished_at)) - {fault_epoch} FROM kser.tasks \
         WHERE metadata->>'phase' = '2' AND finished_at IS NOT NULL GROUP BY 1"
    ));
    let (mut moved, mut others) = (0.0f64, 0.0f64);
    for (partition, after) in rows.lines().filter_map(|row| {
        let (partition, after) = row.split_once('|')?;
        Some((partition.parse::<i32>().ok()?, after.parse::<f64>().ok()?))
    }) {
        if victim_partitions.contains(&partition) {
            moved = moved.max(after);
        } else {
            others = others.max(after);
        }
    }
    let pause = env.sql(&format!(
        "SELECT round(extract(epoch FROM max(gap)), 1) FROM (SELECT finished_at - \
         coalesce(lag(finished_at) OVER (ORDER BY finished_at), to_timestamp({fault_epoch})) AS gap \
         FROM kser.tasks WHERE finished_at > to_timestamp({fault_epoch})) gaps"
    ));
    println!(
        "{name}: first task sent after the fault finished {moved:.1} s after it on the partitions the node led, \
         {others:.1} s on the others; the worker stalled {pause} s at most (no task finishing)"
    );
}

/// The checks every test ends with: each message in exactly one final state
/// with the attempts it should have taken, nothing lost or extra, each
/// dead letter written once, and one worker process, alive all along, that
/// exits cleanly on SIGTERM.
fn verify(env: &TestEnv, worker: &mut WorkerProcess, journal: &Path, sent: &Sent, seed: u64) {
    // Final states, counted.
    let by_status: BTreeMap<String, usize> = env
        .sql("SELECT status, count(*) FROM kser.tasks GROUP BY 1 ORDER BY 1")
        .lines()
        .filter_map(|row| {
            let (status, n) = row.split_once('|')?;
            Some((status.to_owned(), n.parse().ok()?))
        })
        .collect();
    let mut expected = BTreeMap::from([("SUCCESS".to_owned(), sent.successes())]);
    if sent.count(Kind::DeadLetter) > 0 {
        expected.insert("FAILED".to_owned(), sent.count(Kind::DeadLetter));
    }
    assert_eq!(by_status, expected, "tasks by status (seed {seed})");

    // Each message sent: its one row, final state and attempts.
    let rows: HashMap<String, (String, i64)> = env
        .sql("SELECT uuid, status, attempts FROM kser.tasks WHERE operation_uuid IS NULL")
        .lines()
        .filter_map(|row| {
            let mut fields = row.split('|');
            let uuid = fields.next()?.to_owned();
            let status = fields.next()?.to_owned();
            let attempts = fields.next()?.parse().ok()?;
            Some((uuid, (status, attempts)))
        })
        .collect();
    let mut wrong = Vec::new();
    for (uuid, kind) in &sent.messages {
        let want = match kind {
            Kind::Sleep => Some(("SUCCESS", Some(1))),
            Kind::Retried => Some(("SUCCESS", Some(RETRIED_ATTEMPTS))),
            Kind::DeadLetter => Some(("FAILED", Some(1))),
            Kind::Flaky => Some(("SUCCESS", None)),
            Kind::Operation => None,
        };
        let Some((status, attempts)) = want else {
            continue;
        };
        match rows.get(uuid) {
            Some((s, a)) if s == status && attempts.is_none_or(|n| n == *a) => {}
            other => wrong.push(format!(
                "{uuid} ({kind:?}): {other:?}, not {status} in {attempts:?} attempts"
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} tasks lost or not run as they should (seed {seed}): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let standalone = sent.messages.len() - sent.count(Kind::Operation);
    assert_eq!(rows.len(), standalone, "no task row but those sent");
    // Each failed attempt recorded once, for the intended retries only
    // (the attempts of each kind are checked above).
    let retried_attempts = count(env, "SELECT count(*) FROM kser.task_attempts");
    assert_eq!(
        retried_attempts,
        count(env, "SELECT coalesce(sum(attempts - 1), 0) FROM kser.tasks"),
        "failed attempts recorded, one per retry (seed {seed})"
    );

    // Operations: each step ran once, in order.
    let operations = sent.count(Kind::Operation);
    assert_eq!(
        count(
            env,
            "SELECT count(*) FROM kser.tasks WHERE operation_uuid IS NOT NULL AND status = 'SUCCESS' AND attempts = 1"
        ),
        operations * STEPS,
        "every step ran once (seed {seed})"
    );
    if operations > 0 {
        assert_eq!(
            env.sql(
                "SELECT status, result->'retval'->>'items', count(*) FROM kser.operations GROUP BY 1, 2"
            ),
            format!("SUCCESS|[0, 1, 2]|{operations}"),
            "each step moved its operation once (seed {seed})"
        );
    }
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(30),
    );

    // Dead letters: written before the worker stops.
    let dead = sent.count(Kind::DeadLetter);
    let dead_letters = || -> Vec<Value> {
        let out = env.kser(&["dlq", "list", "--json"]);
        assert!(out.status.success(), "dlq list: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("dlq list --json prints JSON")
    };
    if dead > 0 {
        common::wait_until(
            &format!("{dead} dead letters"),
            Duration::from_secs(60),
            || dead_letters().len() >= dead,
        );
    }

    // User code ran once per task: each Sleep and each Append step has one
    // start in the journal.
    let journal = std::fs::read_to_string(journal).unwrap_or_default();
    let mut starts: HashMap<&str, usize> = HashMap::new();
    for line in journal.lines() {
        let uuid = line.split_once(' ').map_or(line, |(uuid, _)| uuid);
        *starts.entry(uuid).or_default() += 1;
    }
    let twice: Vec<(&&str, &usize)> = starts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} tasks ran more than once (seed {seed}): {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let journaled = env.sql(
        "SELECT uuid FROM kser.tasks WHERE entrypoint IN ('showcase.Sleep', 'showcase.Append')",
    );
    let mut expected: Vec<&str> = journaled.lines().collect();
    let mut ran: Vec<&str> = starts.keys().copied().collect();
    expected.sort_unstable();
    ran.sort_unstable();
    assert_eq!(
        (ran.len(), expected.len()),
        (
            sent.count(Kind::Sleep) + operations * STEPS,
            sent.count(Kind::Sleep) + operations * STEPS
        ),
        "every Sleep and Append ran (seed {seed})"
    );
    assert!(ran == expected, "the journal names the tasks in kser.tasks");

    // One worker did it all, and it is still running.
    assert_eq!(worker.exited(), None, "the worker is still running");
    let log = worker.log();
    assert_eq!(
        log.matches("worker started").count(),
        1,
        "the worker never restarted"
    );
    assert_eq!(
        env.sql(
            "SELECT count(DISTINCT worker) FROM (SELECT worker FROM kser.tasks UNION ALL SELECT worker FROM kser.operations) w"
        ),
        "1"
    );
    let status = worker.terminate(Duration::from_secs(60));
    assert!(status.success(), "worker exit status {status}");
    let log = worker.log();
    let stats = log
        .lines()
        .find(|line| line.contains("worker stopped"))
        .unwrap_or_else(|| panic!("no stats line in the worker log:\n{log}"));
    let stat = |field: &str| -> usize {
        stats
            .split_once(&format!("{field}: "))
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field} in {stats}"))
    };
    println!(
        "worker stats: received {}, succeeded {}, failed {}, retried {}, skipped {} (redeliveries)",
        stat("received"),
        stat("succeeded"),
        stat("failed"),
        stat("retried"),
        stat("skipped")
    );
    assert_eq!(
        (stat("succeeded"), stat("failed"), stat("retried")),
        (sent.successes(), dead, retried_attempts),
        "the worker ran each task once: {stats}"
    );

    // Once it has stopped: each failure dead-lettered once, nothing else.
    let entries = dead_letters();
    let mut listed: Vec<&str> = entries.iter().filter_map(|e| e["uuid"].as_str()).collect();
    let mut failed: Vec<&str> = sent
        .messages
        .iter()
        .filter(|(_, kind)| *kind == Kind::DeadLetter)
        .map(|(uuid, _)| uuid.as_str())
        .collect();
    listed.sort_unstable();
    failed.sort_unstable();
    assert_eq!(
        (entries.len(), listed),
        (dead, failed),
        "each failure dead-lettered once (seed {seed})"
    );
    let not_in_topic: Vec<&Value> = entries
        .iter()
        .filter(|e| e["dlq_offset"].is_null())
        .collect();
    assert!(
        not_in_topic.is_empty(),
        "an outage is waited out, not a reason to keep dead letters out of the topic: {not_in_topic:?}"
    );
    report_log(&log);
}

/// Prints the end of the worker's log when a test fails, and keeps the log
/// with the cluster's.
struct LogOnFailure {
    log: std::path::PathBuf,
    keep_in: std::path::PathBuf,
}

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let kept = self.keep_in.join("worker.log");
            let _ = std::fs::write(&kept, &log);
            eprintln!(
                "--- last 60 lines of the worker log (kept in {}):\n{}",
                kept.display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// Prints the worker's warnings and errors, counted by message, and its
/// consumer group's moves.
fn report_log(log: &str) {
    let mut counted: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_time), Some(level)) = (parts.next(), parts.next()) else {
            continue;
        };
        if level != "WARN" && level != "ERROR" {
            continue;
        }
        // The message without its span, its fields and numbers.
        let rest = &line[line.find(level).unwrap_or(0) + level.len()..];
        let rest = match rest.trim_start().split_once("}: ") {
            Some((span, message)) if !span.contains(' ') || span.starts_with("task{") => message,
            _ => rest.trim_start(),
        };
        let message: Vec<&str> = rest
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect();
        let message: String = message
            .join(" ")
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(110)
            .collect();
        *counted.entry(format!("{level} {message}")).or_default() += 1;
    }
    println!("worker log, warnings and errors:");
    for (message, n) in &counted {
        println!("  {n:>5} x {message}");
    }
    for line in log.lines().filter(|line| {
        line.contains("partitions assigned")
            || line.contains("partitions revoked")
            || line.contains("SESSTMOUT")
    }) {
        println!("  {}", line.chars().take(160).collect::<String>());
    }
}

#[test]
fn the_leader_killed_mid_run_and_restarted_loses_and_doubles_nothing() {
    run(Scenario {
        name: "kill",
        fault: Fault::Kill,
        min_down: 0,
        extra_down: 0..=6,
        mixed: false,
        flaky: false,
    });
}

#[test]
fn a_leader_stopped_for_thirty_seconds_loses_and_doubles_nothing() {
    run(Scenario {
        name: "stop",
        fault: Fault::Stop,
        min_down: 30,
        extra_down: 0..=0,
        mixed: false,
        flaky: false,
    });
}

#[test]
fn retries_dead_letters_and_operations_cross_a_killed_leader_once() {
    run(Scenario {
        name: "mixed",
        fault: Fault::Kill,
        min_down: 0,
        extra_down: 0..=6,
        mixed: true,
        flaky: false,
    });
}

/// Tasks retried in place through the whole outage. Each SIGKILL here costs
/// the worker its group session (6 s in these tests, shorter than the 9 s the
/// controller takes to fence the dead node), and its partitions come back
/// after a rejoin: a task waiting for its next attempt at that moment must
/// still get it.
#[test]
fn tasks_retried_across_a_killed_leader_all_end_final() {
    run(Scenario {
        name: "flaky",
        fault: Fault::Kill,
        min_down: 0,
        extra_down: 0..=6,
        mixed: true,
        flaky: true,
    });
}
