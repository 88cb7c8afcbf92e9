//! Crashes, restarts, shutdowns and a second worker: nothing is lost, and
//! finished work is not run again.

mod common;

use std::time::Duration;

use common::TestEnv;

fn sleep_batch(count: usize, ms: u64) -> String {
    (0..count)
        .map(|_| format!("{{\"entrypoint\": \"showcase.Sleep\", \"params\": {{\"ms\": {ms}}}}}\n"))
        .collect()
}

fn count(env: &TestEnv, filter: &str) -> i64 {
    env.sql(&format!("SELECT count(*) FROM kser.tasks WHERE {filter}"))
        .parse()
        .expect("a count")
}

#[test]
fn a_worker_killed_with_sigkill_finishes_the_rest_after_restart() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--concurrency", "8"]);
    worker.wait_assigned();
    env.send_batch(&sleep_batch(300, 40));

    common::wait_until("some tasks to finish", Duration::from_secs(60), || {
        count(&env, "status = 'SUCCESS'") >= 40
    });
    worker.kill();
    let done_before = count(&env, "status = 'SUCCESS'");
    assert!(
        done_before < 300,
        "killed before the end ({done_before} done)"
    );

    let mut restarted = env.start_worker("showcase", &["--concurrency", "8"]);
    restarted.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        300,
        Duration::from_secs(120),
    );
    assert_eq!(count(&env, "status <> 'SUCCESS'"), 0);
    // Only tasks that were unfinished at the kill ran again; those whose
    // state was committed were skipped when redelivered.
    let reruns = count(&env, "attempts > 1");
    assert!(
        reruns <= 300 - done_before,
        "{reruns} reruns, {done_before} were done before the kill"
    );
}

#[test]
fn two_workers_split_the_partitions_and_run_each_message_once() {
    let env = TestEnv::new();
    let mut first = env.start_worker("showcase", &["--partitions", "4"]);
    first.wait_assigned();
    let mut second = env.start_worker("showcase", &["--partitions", "4"]);
    second.wait_assigned();
    // The first worker gave up half of its partitions.
    first.wait_for_log("partitions assigned", 2, Duration::from_secs(60));

    let input: String = (0..200)
        .map(|i| {
            format!("{{\"entrypoint\": \"showcase.Echo\", \"params\": {{\"text\": \"{i}\"}}}}\n")
        })
        .collect();
    env.send_batch(&input);
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        200,
        Duration::from_secs(60),
    );
    assert_eq!(count(&env, "attempts <> 1"), 0, "every message ran once");
    assert_eq!(
        env.sql("SELECT count(DISTINCT worker) FROM kser.tasks"),
        "2",
        "both workers ran tasks"
    );
    assert_eq!(
        env.sql("SELECT count(DISTINCT kafka_partition) FROM kser.tasks"),
        "4"
    );
}

#[test]
fn sigterm_finishes_running_tasks_and_leaves_queued_ones_to_the_next_owner() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--concurrency", "4"]);
    worker.wait_assigned();
    // Long enough to be written RUNNING (after 1 s) well before they end.
    env.send_batch(&sleep_batch(8, 3000));
    common::wait_until("tasks to start", Duration::from_secs(30), || {
        count(&env, "status = 'RUNNING'") >= 4
    });
    assert_eq!(
        count(&env, "status = 'RUNNING'"),
        4,
        "a task waiting for a slot is not RUNNING"
    );
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        count(&env, "status = 'SUCCESS'"),
        4,
        "running work finished"
    );
    assert_eq!(
        count(&env, "status = 'PENDING' AND attempts = 0"),
        4,
        "queued work never started"
    );
    let log = worker.log();
    assert!(log.contains("abandoned: 4"), "{log}");
    // Closed, not left to the broker's session timeout: the next owner
    // gets the partitions at once.
    assert!(log.contains("left the consumer group"), "{log}");

    // The offsets of finished work were committed: a new worker receives
    // only the four that never ran, and runs each once.
    let mut next = env.start_worker("showcase", &[]);
    next.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS' AND attempts = 1",
        8,
        Duration::from_secs(60),
    );
    assert!(next.terminate(Duration::from_secs(30)).success());
    let log = next.log();
    assert!(log.contains("received: 4"), "{log}");
}

#[test]
fn the_shutdown_deadline_abandons_work_that_is_then_redelivered() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--shutdown-timeout", "1"]);
    worker.wait_assigned();
    env.send_batch(&sleep_batch(3, 8000));
    common::wait_until("tasks to start", Duration::from_secs(30), || {
        count(&env, "status = 'RUNNING'") == 3
    });
    let status = worker.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(worker.log().contains("abandoning unfinished work"));
    assert_eq!(count(&env, "status = 'RUNNING'"), 3);

    let mut next = env.start_worker("showcase", &[]);
    next.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS' AND attempts = 2",
        3,
        Duration::from_secs(60),
    );
}

#[test]
fn a_database_outage_delays_work_but_fails_nothing() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--concurrency", "16"]);
    worker.wait_assigned();
    env.send_batch(&sleep_batch(600, 30));
    common::wait_until("some tasks to finish", Duration::from_secs(60), || {
        count(&env, "status = 'SUCCESS'") >= 50
    });

    // Postgres goes away for the worker: no new connection, the open ones cut.
    env.database_outage(Duration::from_secs(3));

    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status IN ('SUCCESS', 'FAILED')",
        600,
        Duration::from_secs(120),
    );
    assert_eq!(
        count(&env, "status = 'FAILED'"),
        0,
        "no task failed because Postgres was away"
    );
    let log = worker.log();
    assert!(
        log.contains("retrying"),
        "the worker waited out the outage: {log}"
    );
}

#[test]
fn repeated_sigkills_at_random_moments_lose_nothing_and_double_nothing() {
    use rand::{Rng, SeedableRng};

    let seed = common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut input = sleep_batch(300, 15);
    for _ in 0..20 {
        input.push_str(
            "{\"entrypoint\": \"showcase.Chain\", \"params\": {\"count\": 3, \"ms\": 30}}\n",
        );
    }
    env.send_batch(&input);

    // KSER_SOAK_ROUNDS=30 for a longer soak; CI runs three.
    let rounds: u32 = std::env::var("KSER_SOAK_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        let mut worker = env.start_worker("showcase", &["--concurrency", "8"]);
        worker.wait_assigned();
        let ms = rng.random_range(300..2000);
        std::thread::sleep(Duration::from_millis(ms));
        worker.kill();
        println!("round {round}: killed after {ms} ms");
    }
    let mut last = env.start_worker("showcase", &["--concurrency", "8"]);
    last.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        300 + 60,
        Duration::from_secs(180),
    );
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        20,
        Duration::from_secs(60),
    );
    assert_eq!(count(&env, "status <> 'SUCCESS'"), 0, "seed {seed}");
    assert_eq!(
        env.sql("SELECT DISTINCT result->'retval'->>'items' FROM kser.operations"),
        "[0, 1, 2]",
        "each step moved its operation once (seed {seed})"
    );
    // A task runs again only if a kill caught it in flight.
    assert!(count(&env, "attempts > 4") == 0, "seed {seed}");
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(30),
    );
}

#[test]
fn rebalances_under_load_double_nothing() {
    use rand::{Rng, SeedableRng};

    let seed = common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut first = env.start_worker("showcase", &["--partitions", "6", "--concurrency", "8"]);
    first.wait_assigned();
    let mut input = sleep_batch(400, 20);
    for _ in 0..20 {
        input.push_str(
            "{\"entrypoint\": \"showcase.Chain\", \"params\": {\"count\": 3, \"ms\": 50}}\n",
        );
    }
    env.send_batch(&input);
    common::wait_until("work to start", Duration::from_secs(60), || {
        count(&env, "status = 'SUCCESS'") >= 40
    });
    // A second worker joins mid-load, then the first one leaves mid-load.
    let mut second = env.start_worker("showcase", &["--concurrency", "8"]);
    second.wait_assigned();
    first.wait_for_log("partitions revoked", 1, Duration::from_secs(60));
    // At a random moment of the rebalance or after it.
    let ms = rng.random_range(0..1500);
    std::thread::sleep(Duration::from_millis(ms));
    println!("first worker stopped {ms} ms after its revoke");
    assert!(first.terminate(Duration::from_secs(60)).success());
    let log = first.log();
    assert!(log.contains("left the consumer group"), "{log}");

    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        400 + 60,
        Duration::from_secs(180),
    );
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        20,
        Duration::from_secs(60),
    );
    assert_eq!(
        env.sql("SELECT DISTINCT result->'retval'->>'items' FROM kser.operations"),
        "[0, 1, 2]"
    );
    assert_eq!(count(&env, "status <> 'SUCCESS'"), 0);
    assert!(
        env.sql("SELECT count(DISTINCT worker) FROM kser.tasks")
            .parse::<i64>()
            .unwrap_or(0)
            >= 2,
        "both workers ran tasks"
    );
}

#[test]
fn records_waiting_in_a_partition_kept_through_a_rebalance_still_run() {
    // Eight keys, each a lane: the first record of each runs for seconds
    // and the others of its key wait behind it in the worker's pipeline.
    // When a second worker joins, the first one's partitions are all
    // revoked and some are given back at once, so it fetches again records
    // it still holds. They must run without another rebalance.
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut first = env.start_worker("showcase", &["--partitions", "4", "--concurrency", "8"]);
    first.wait_assigned();
    let input: String = (0..80)
        .map(|i| {
            // Long enough for the second worker to start and join while
            // they run, on a slow machine too.
            let ms = if i < 8 { 8000 } else { 50 };
            format!(
                "{{\"entrypoint\": \"showcase.Sleep\", \"params\": {{\"ms\": {ms}}}, \"key\": \"k{}\"}}\n",
                i % 8
            )
        })
        .collect();
    env.send_batch(&input);
    // Marked RUNNING after a second: the waiting records are in the pipeline.
    common::wait_until(
        "the first of each key to run",
        Duration::from_secs(60),
        || count(&env, "status = 'RUNNING'") == 8,
    );
    let mut second = env.start_worker("showcase", &["--concurrency", "8"]);
    second.wait_assigned();
    first.wait_for_log("partitions assigned", 2, Duration::from_secs(60));
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        80,
        Duration::from_secs(90),
    );
    let log = first.log();
    assert!(
        log.contains("duplicate of a message in flight"),
        "the first worker fetched again records it held: {log}"
    );
    // Only the long ones of partitions now the second worker's ran twice.
    assert_eq!(count(&env, "attempts > 1 AND params->>'ms' = '50'"), 0);
}

#[test]
fn a_long_database_outage_keeps_the_worker_in_its_group() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    // Small batches: the pipeline fills up quickly while Postgres is away.
    let mut worker = env.start_worker("showcase", &["--batch-size", "5", "--concurrency", "2"]);
    worker.wait_assigned();
    env.send_batch(&sleep_batch(200, 5));
    common::wait_until("some tasks to finish", Duration::from_secs(60), || {
        count(&env, "status = 'SUCCESS'") >= 10
    });

    // Longer than the worker's max.poll.interval.ms (10 s in these tests).
    env.database_outage(Duration::from_secs(15));

    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        200,
        Duration::from_secs(120),
    );
    let log = worker.log();
    assert!(log.contains("pausing fetch"), "the worker paused: {log}");
    assert!(
        !log.contains("partitions revoked"),
        "the worker stayed in its group: {log}"
    );
}
