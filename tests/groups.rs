//! Consumer groups on Apache Kafka: the classic protocol and KIP-848's
//! (`--group-protocol consumer`), with static membership (`--instance-id`) on
//! and off. A worker restarted after a SIGKILL gets its partitions back, and
//! a group hit by a seeded storm of SIGTERMs and SIGKILLs heals: every
//! partition makes progress again within 30 s of the last restart, every task
//! ends in exactly one final state, and `attempts` counts the recorded runs of
//! user code (the showcase worker journals each start).
//!
//! Each test prints its figures (time until every partition progressed
//! again, tasks whose code ran twice); the README quotes them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestEnv, WorkerProcess};

/// How the workers of a test join their group.
#[derive(Debug, Clone, Copy)]
struct Membership {
    protocol: &'static str,
    static_ids: bool,
}

impl Membership {
    fn label(self) -> String {
        let membership = if self.static_ids { "static" } else { "dynamic" };
        format!("{} protocol, {membership} membership", self.protocol)
    }
}

/// A group of showcase workers that journal every task start.
struct Group<'a> {
    env: &'a TestEnv,
    membership: Membership,
    journal: std::path::PathBuf,
    concurrency: usize,
    workers: Vec<WorkerProcess>,
    /// Workers sent SIGTERM, still shutting down.
    stopping: Vec<WorkerProcess>,
    kills: usize,
    /// Workers SIGTERMed (each one's partitions move to another).
    terminations: usize,
}

impl<'a> Group<'a> {
    fn new(env: &'a TestEnv, membership: Membership, concurrency: usize) -> Self {
        env.kser(&["migrate"]);
        Self {
            env,
            membership,
            journal: env.dir.path().join("journal"),
            concurrency,
            workers: Vec::new(),
            stopping: Vec::new(),
            kills: 0,
            terminations: 0,
        }
    }

    /// Starts the worker of slot `index` (its instance id under static
    /// membership).
    fn start(&self, index: usize) -> WorkerProcess {
        let concurrency = self.concurrency.to_string();
        let instance = format!("worker-{index}");
        let mut args = vec![
            "--group-protocol",
            self.membership.protocol,
            "--concurrency",
            &concurrency,
            "--partitions",
            "6",
        ];
        if self.membership.static_ids {
            args.extend(["--instance-id", instance.as_str()]);
        }
        let n = std::fs::read_dir(self.env.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.env.dir.path().join(format!("worker-{index}-{n}.log"));
        let mut command = self.env.command(&common::example_path("showcase"));
        command
            .arg("worker")
            .args(&args)
            .env("SHOWCASE_JOURNAL", &self.journal)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        WorkerProcess::spawn(&mut command, log)
    }

    /// Sends SIGTERM to slot `index` and starts its replacement at once.
    fn terminate_and_replace(&mut self, index: usize) {
        let fresh = self.start(index);
        let old = std::mem::replace(&mut self.workers[index], fresh);
        old.sigterm();
        self.terminations += 1;
        self.stopping.push(old);
    }

    /// SIGKILLs slot `index` and starts its replacement at once.
    fn kill_and_replace(&mut self, index: usize) {
        self.workers[index].kill();
        self.kills += 1;
        self.workers[index] = self.start(index);
    }

    /// Every worker SIGKILLed at once, then all started again.
    fn kill_all_and_restart(&mut self) {
        for worker in &mut self.workers {
            worker.kill();
            self.kills += 1;
        }
        for index in 0..self.workers.len() {
            self.workers[index] = self.start(index);
        }
    }

    /// How many times user code started, per task uuid.
    fn starts(&self) -> HashMap<String, i64> {
        let journal = std::fs::read_to_string(&self.journal).unwrap_or_default();
        let mut starts = HashMap::new();
        for line in journal.lines() {
            if let Some((uuid, _)) = line.split_once(' ') {
                *starts.entry(uuid.to_owned()).or_insert(0) += 1;
            }
        }
        starts
    }

    /// Checks `attempts` against the journal and returns how many tasks ran
    /// more than once. `attempts` counts recorded runs: a run is recorded
    /// when it ends, or as RUNNING once it has run for `--running-after`. A
    /// run cut short by a kill before either, or fenced because the
    /// partition's next owner ran the message too, is not counted. So
    /// `attempts` never exceeds a task's runs and may fall short of them,
    /// each missing run being one of the at most `concurrency` tasks a
    /// worker had running when it was killed or lost partitions, or one
    /// that had ended and given its slot back but whose outcome the
    /// finisher had not written yet (a slot is held until the outcome is
    /// handed to the finisher, not until it is durable). With tasks far
    /// longer than a batch write, as here, at most `concurrency` more end
    /// during one write: `2 * concurrency` per disruption.
    fn check_attempts(&self) -> usize {
        let starts = self.starts();
        let rows = self
            .env
            .sql("SELECT uuid || ' ' || attempts FROM kser.tasks ORDER BY uuid");
        let mut unrecorded_runs = 0;
        let mut twice = 0;
        for row in rows.lines() {
            let (uuid, attempts) = row.split_once(' ').expect("uuid attempts");
            let attempts: i64 = attempts.parse().expect("attempts");
            let runs = starts.get(uuid).copied().unwrap_or(0);
            assert!(
                attempts <= runs,
                "task {uuid} records {attempts} attempts for {runs} runs"
            );
            assert!(
                runs == 0 || attempts >= 1,
                "task {uuid} ran {runs} times, records none"
            );
            unrecorded_runs += runs - attempts;
            if runs > 1 {
                twice += 1;
            }
        }
        let disruptions = self.kills + self.terminations;
        assert!(
            unrecorded_runs as usize <= disruptions * 2 * self.concurrency,
            "{unrecorded_runs} runs not recorded, with {} kills and {} terminations",
            self.kills,
            self.terminations
        );
        twice
    }

    /// SIGTERMs every worker and checks that each exits 0.
    fn stop_all(&mut self) {
        for worker in self.workers.iter_mut().chain(self.stopping.iter_mut()) {
            if worker.exited().is_none() {
                worker.sigterm();
            }
        }
        for worker in self.workers.iter_mut().chain(self.stopping.iter_mut()) {
            let status = worker.wait_exit(Duration::from_secs(60));
            assert!(status.success(), "exit status {status}: {}", worker.log());
        }
    }
}

fn sleep_line(ms: u64) -> String {
    format!("{{\"entrypoint\": \"showcase.Sleep\", \"params\": {{\"ms\": {ms}}}}}\n")
}

fn count(env: &TestEnv, query: &str) -> i64 {
    env.sql(query).parse().expect("a count")
}

/// The database's clock, as epoch seconds.
fn db_now(env: &TestEnv) -> f64 {
    env.sql("SELECT extract(epoch FROM clock_timestamp())")
        .parse()
        .expect("a time")
}

/// Seconds from `since` until the last of the partitions that still had
/// work then finished a task: how long the group took to make progress on
/// all of them again.
fn progress_gap(env: &TestEnv, since: f64) -> f64 {
    env.sql(&format!(
        "SELECT coalesce(max(first), 0) FROM ( \
           SELECT extract(epoch FROM min(finished_at)) - {since} AS first \
           FROM kser.tasks WHERE finished_at > to_timestamp({since}) \
           GROUP BY topic, kafka_partition) AS p"
    ))
    .parse()
    .expect("seconds")
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Two workers share the load; one is SIGKILLed mid-run and started again
/// at once (under static membership, with its instance id: on the consumer
/// protocol the broker then refuses it with UNRELEASED_INSTANCE_ID until the
/// killed member's session expires, and the worker must get over that).
fn restart_after_sigkill(membership: Membership) {
    let env = TestEnv::new();
    let mut group = Group::new(&env, membership, 4);
    group.workers = vec![group.start(0), group.start(1)];
    for worker in &mut group.workers {
        worker.wait_assigned();
    }
    let tasks = 1500;
    env.send_batch(&sleep_line(30).repeat(tasks));
    common::wait_until("work to start", Duration::from_secs(60), || {
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        ) >= 200
    });
    group.kill_and_replace(0);
    let restarted = db_now(&env);
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        tasks as i64,
        Duration::from_secs(120),
    );
    let gap = progress_gap(&env, restarted);
    let twice = group.check_attempts();
    let log = group.workers[0].log();
    let fenced = log.contains("fatal error");
    println!(
        "{}: every partition progressed {gap:.1} s after the restart; {twice} of {tasks} tasks ran twice{}",
        membership.label(),
        if fenced {
            "; the restarted worker was refused its instance id and rebuilt its consumer"
        } else {
            ""
        }
    );
    assert!(
        gap <= 30.0,
        "{}: {gap:.1} s without progress on some partition",
        membership.label()
    );
    group.stop_all();
}

#[test]
fn classic_dynamic_restart() {
    restart_after_sigkill(Membership {
        protocol: "classic",
        static_ids: false,
    });
}

#[test]
fn classic_static_restart() {
    restart_after_sigkill(Membership {
        protocol: "classic",
        static_ids: true,
    });
}

#[test]
fn consumer_dynamic_restart() {
    restart_after_sigkill(Membership {
        protocol: "consumer",
        static_ids: false,
    });
}

#[test]
fn consumer_static_restart() {
    restart_after_sigkill(Membership {
        protocol: "consumer",
        static_ids: true,
    });
}

/// Three workers under load: seeded rounds SIGTERM or SIGKILL a random
/// worker (or all at once) and start its replacement at once.
fn storm(membership: Membership) {
    use rand::{Rng, SeedableRng};

    let seed = common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new();
    let mut group = Group::new(&env, membership, 8);
    group.workers = (0..3).map(|index| group.start(index)).collect();
    for worker in &mut group.workers {
        worker.wait_assigned();
    }
    // KSER_STORM_TASKS=20000 KSER_STORM_ROUNDS=20 for the full soak.
    let tasks = env_number("KSER_STORM_TASKS", 3000);
    let rounds = env_number("KSER_STORM_ROUNDS", 6);
    let operations = tasks / 100;
    let mut input = String::new();
    for _ in 0..tasks {
        input.push_str(&sleep_line(rng.random_range(20..200)));
    }
    for _ in 0..operations {
        input.push_str(
            "{\"entrypoint\": \"showcase.Chain\", \"params\": {\"count\": 5, \"ms\": 20}}\n",
        );
    }
    env.send_batch(&input);
    common::wait_until("work to start", Duration::from_secs(60), || {
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        ) >= 50
    });
    for round in 0..rounds {
        let index = rng.random_range(0..3);
        let action = if round + 1 == rounds / 2 {
            group.kill_all_and_restart();
            "SIGKILL all, restart all".to_owned()
        } else if rng.random_bool(0.5) {
            group.terminate_and_replace(index);
            format!("SIGTERM worker {index}, start its replacement")
        } else {
            group.kill_and_replace(index);
            format!("SIGKILL worker {index}, start its replacement")
        };
        println!("{}: round {round}: {action}", membership.label());
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..3500)));
    }
    let last_restart = db_now(&env);
    let total = (tasks + operations * 5) as i64;
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status IN ('SUCCESS', 'FAILED', 'CANCELLED')",
        total,
        Duration::from_secs(240),
    );
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        operations as i64,
        Duration::from_secs(60),
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS'"
        ),
        0,
        "every task succeeded once (seed {seed})"
    );
    assert_eq!(
        env.sql("SELECT DISTINCT result->'retval'->>'items' FROM kser.operations"),
        "[0, 1, 2, 3, 4]",
        "each step moved its operation once (seed {seed})"
    );
    let gap = progress_gap(&env, last_restart);
    let twice = group.check_attempts();
    println!(
        "{}: storm of {rounds} rounds ({} kills) over {tasks} tasks and {operations} operations: \
         every partition progressed {gap:.1} s after the last restart; {twice} tasks ran twice (seed {seed})",
        membership.label(),
        group.kills
    );
    assert!(
        gap <= 30.0,
        "{gap:.1} s without progress on some partition (seed {seed})"
    );
    group.stop_all();
}

#[test]
fn storm_classic_dynamic() {
    storm(Membership {
        protocol: "classic",
        static_ids: false,
    });
}

#[test]
fn storm_consumer_static() {
    storm(Membership {
        protocol: "consumer",
        static_ids: true,
    });
}
