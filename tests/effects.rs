//! Exactly-once effects: a transactional task's writes commit with its final
//! state, so under a seeded soak of SIGKILLs and rebalances its table gets
//! exactly one row per message, while a plain task's side effects can run
//! twice. Both counts are printed; the README quotes them.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{TestEnv, WorkerProcess};

fn start(env: &TestEnv, journal: &Path) -> WorkerProcess {
    let n = std::fs::read_dir(env.dir.path())
        .map(|d| d.count())
        .unwrap_or(0);
    let log = env.dir.path().join(format!("worker-{n}.log"));
    let mut command = env.command(&common::example_path("showcase"));
    command
        .args(["worker", "--concurrency", "8"])
        .env("SHOWCASE_JOURNAL", journal)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    WorkerProcess::spawn(&mut command, log)
}

/// Two workers run `tasks` records of `entrypoint` while seeded rounds
/// SIGKILL one of them and start it again (a rebalance each time). Returns
/// how many tasks' code started more than once.
fn soak(env: &TestEnv, entrypoint: &str, tasks: usize, seed: u64) -> usize {
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    env.kser(&["migrate"]);
    let journal = env.dir.path().join("journal");
    let mut workers = vec![start(env, &journal), start(env, &journal)];
    for worker in &mut workers {
        worker.wait_assigned();
    }
    let line = format!("{{\"entrypoint\": \"{entrypoint}\", \"params\": {{\"ms\": 40}}}}\n");
    env.send_batch(&line.repeat(tasks));
    common::wait_until("work to start", Duration::from_secs(60), || {
        env.sql("SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'")
            .parse::<usize>()
            .unwrap_or(0)
            >= 50
    });
    let rounds = std::env::var("KSER_SOAK_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        let index = rng.random_range(0..workers.len());
        workers[index].kill();
        workers[index] = start(env, &journal);
        println!("{entrypoint}: round {round}: SIGKILL worker {index}, started again");
    }
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        tasks as i64,
        Duration::from_secs(180),
    );
    for worker in &mut workers {
        assert!(worker.terminate(Duration::from_secs(60)).success());
    }
    let mut starts: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(&journal)
        .unwrap_or_default()
        .lines()
    {
        if let Some((uuid, _)) = line.split_once(' ') {
            *starts.entry(uuid.to_owned()).or_default() += 1;
        }
    }
    starts.values().filter(|n| **n > 1).count()
}

#[test]
fn a_transactional_task_writes_exactly_one_row_per_message_through_kills() {
    let seed = common::seed();
    let env = TestEnv::new();
    env.sql("CREATE TABLE showcase_effects (uuid text NOT NULL, attempt int NOT NULL)");
    let tasks = 1500;
    let started_twice = soak(&env, "showcase.Record", tasks, seed);
    let rows: usize = env
        .sql("SELECT count(*) FROM showcase_effects")
        .parse()
        .expect("a count");
    let distinct: usize = env
        .sql("SELECT count(DISTINCT uuid) FROM showcase_effects")
        .parse()
        .expect("a count");
    println!(
        "transactional task: {tasks} messages, {started_twice} started more than once, \
         {rows} rows written, {} effects doubled (seed {seed})",
        rows - distinct
    );
    assert_eq!(distinct, tasks, "every message left its row (seed {seed})");
    assert_eq!(rows, tasks, "no message left two rows (seed {seed})");
    // The row is the one of the attempt that committed.
    assert_eq!(
        env.sql(
            "SELECT count(*) FROM showcase_effects e JOIN kser.tasks t ON t.uuid = e.uuid \
             WHERE e.attempt <> t.attempts"
        ),
        "0"
    );
}

#[test]
fn a_plain_task_under_the_same_soak_can_run_its_effects_twice() {
    let seed = common::seed();
    let env = TestEnv::new();
    let tasks = 1500;
    let twice = soak(&env, "showcase.Sleep", tasks, seed);
    println!("plain task: {tasks} messages, {twice} side effects ran twice (seed {seed})");
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS'"),
        "0"
    );
}
