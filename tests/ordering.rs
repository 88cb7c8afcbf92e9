//! Per-key ordering (`--ordering key|partition|none`): records of one key run
//! one after the other in offset order, across two workers; other keys run
//! side by side; a retry holds back the later records of its key.

mod common;

use std::time::Duration;

use common::TestEnv;

/// `keys` keys x `per_key` Sleep records, interleaved, keyed by their key.
fn keyed_sleeps(keys: usize, per_key: usize, ms: u64) -> String {
    let mut input = String::new();
    for seq in 0..per_key {
        for key in 0..keys {
            input.push_str(&format!(
                "{{\"entrypoint\": \"showcase.Sleep\", \"key\": \"key-{key}\", \
                 \"params\": {{\"ms\": {ms}, \"key\": \"key-{key}\", \"seq\": {seq}}}}}\n"
            ));
        }
    }
    input
}

/// Runs of consecutive records of one lane that overlapped in time:
/// record n+1 started before record n finished. `lane` is an SQL expression.
fn overlaps(env: &TestEnv, lane: &str) -> i64 {
    env.sql(&format!(
        "SELECT count(*) FROM ( \
           SELECT started_at, lag(finished_at) OVER w AS previous_finished \
           FROM kser.tasks WINDOW w AS (PARTITION BY {lane} ORDER BY kafka_offset)) AS runs \
         WHERE started_at < previous_finished"
    ))
    .parse()
    .expect("a count")
}

/// Records of one key that ran out of send order.
fn out_of_order(env: &TestEnv) -> i64 {
    env.sql(
        "SELECT count(*) FROM ( \
           SELECT (params->>'seq')::int AS seq, \
                  lag((params->>'seq')::int) OVER w AS previous \
           FROM kser.tasks WINDOW w AS (PARTITION BY params->>'key' ORDER BY started_at, kafka_offset)) AS runs \
         WHERE seq < previous",
    )
    .parse()
    .expect("a count")
}

fn run_two_workers(env: &TestEnv, ordering: &str, input: &str, total: i64) {
    env.kser(&["migrate"]);
    let args = ["--ordering", ordering, "--concurrency", "16"];
    let mut first = env.start_worker("showcase", &args);
    let mut second = env.start_worker("showcase", &args);
    first.wait_assigned();
    second.wait_assigned();
    env.send_batch(input);
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        total,
        Duration::from_secs(120),
    );
    assert!(first.terminate(Duration::from_secs(30)).success());
    assert!(second.terminate(Duration::from_secs(30)).success());
}

#[test]
fn records_of_one_key_run_in_order_and_never_overlap() {
    let env = TestEnv::new();
    run_two_workers(&env, "key", &keyed_sleeps(20, 200, 3), 4000);
    assert_eq!(
        overlaps(&env, "params->>'key'"),
        0,
        "a key ran two records at once"
    );
    assert_eq!(out_of_order(&env), 0, "a key ran its records out of order");
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE attempts <> 1"),
        "0"
    );
    // Different keys did run side by side.
    assert!(
        overlaps(&env, "true") > 0,
        "keys ran one at a time over the whole topic"
    );
}

#[test]
fn without_ordering_records_of_one_key_overlap() {
    let env = TestEnv::new();
    run_two_workers(&env, "none", &keyed_sleeps(5, 100, 20), 500);
    assert!(
        overlaps(&env, "params->>'key'") > 0,
        "with --ordering none records of one key run concurrently"
    );
}

#[test]
fn partition_ordering_runs_one_record_at_a_time_per_partition() {
    let env = TestEnv::new();
    run_two_workers(&env, "partition", &keyed_sleeps(12, 20, 5), 240);
    assert_eq!(
        overlaps(&env, "topic, kafka_partition"),
        0,
        "a partition ran two records at once"
    );
    assert!(overlaps(&env, "true") > 0, "partitions ran side by side");
}

#[test]
fn a_retried_record_holds_back_the_later_records_of_its_key() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--concurrency", "8"]);
    worker.wait_assigned();
    // FailTimes fails twice (300 ms, then 600 ms backoff), then succeeds;
    // the Sleeps of its key are sent right behind it.
    let mut input = String::from(
        "{\"entrypoint\": \"showcase.FailTimes\", \"key\": \"k\", \
         \"params\": {\"times\": 2, \"key\": \"k\", \"seq\": 0}}\n",
    );
    for seq in 1..=5 {
        input.push_str(&format!(
            "{{\"entrypoint\": \"showcase.Sleep\", \"key\": \"k\", \
             \"params\": {{\"ms\": 5, \"key\": \"k\", \"seq\": {seq}}}}}\n"
        ));
    }
    env.send_batch(&input);
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        6,
        Duration::from_secs(60),
    );
    assert_eq!(
        env.sql("SELECT attempts FROM kser.tasks WHERE entrypoint = 'showcase.FailTimes'"),
        "3"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.task_attempts"),
        "2",
        "the failed attempts are in the history"
    );
    assert_eq!(
        env.sql(
            "SELECT count(*) FROM kser.tasks t, kser.tasks f \
             WHERE f.entrypoint = 'showcase.FailTimes' AND t.entrypoint = 'showcase.Sleep' \
               AND t.started_at < f.finished_at"
        ),
        "0",
        "a later record of the key started before the retried one succeeded"
    );
    assert_eq!(out_of_order(&env), 0);
    assert!(worker.terminate(Duration::from_secs(30)).success());
}
