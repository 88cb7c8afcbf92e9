//! Limits across the fleet: a task's `MAX_CONCURRENCY` and the resource
//! pools it `ACQUIRES`, held in Postgres with leases. Measured from the
//! rows: the runs' `[started_at, finished_at)` intervals never overlap more
//! than the limit allows.

mod common;

use std::time::Duration;

use common::{TestEnv, text, wait_until};
use serde_json::Value;

/// The most units of `entrypoints` running at one moment, from the task
/// rows (`Train` holds two gpus, the others one unit).
fn max_overlap(env: &TestEnv, entrypoints: &str) -> i64 {
    let query = format!(
        "WITH t AS (SELECT uuid, started_at, finished_at, \
             CASE entrypoint WHEN 'showcase.Train' THEN 2 ELSE 1 END AS units \
             FROM kser.tasks WHERE entrypoint IN ({entrypoints})) \
         SELECT coalesce(max(held), 0) FROM (SELECT sum(b.units) AS held FROM t a JOIN t b \
             ON b.started_at <= a.started_at AND a.started_at < b.finished_at GROUP BY a.uuid) x"
    );
    env.sql(&query).trim().parse().expect("a number")
}

fn batch(lines: &[(String, &str, u64)]) -> String {
    lines
        .iter()
        .map(|(uuid, entrypoint, ms)| {
            format!(
                r#"{{"uuid": "{uuid}", "entrypoint": "{entrypoint}", "params": {{"ms": {ms}}}}}"#
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn uuids(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("{prefix}-{}", uuid::Uuid::new_v4()))
        .collect()
}

fn pools(env: &TestEnv) -> Vec<Value> {
    let out = env.kser(&["pools", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("pools --json prints JSON")
}

#[test]
fn limits_hold_across_two_workers() {
    let env = TestEnv::new();
    let args = ["--partitions", "4", "--concurrency", "16"];
    let mut first = env.start_worker("showcase", &args);
    let mut second = env.start_worker("showcase", &args);
    first.wait_assigned();
    second.wait_assigned();

    let limited = uuids("limited", 50);
    let render = uuids("render", 20);
    let train = uuids("train", 5);
    let mut lines: Vec<(String, &str, u64)> = Vec::new();
    lines.extend(limited.iter().map(|u| (u.clone(), "showcase.Limited", 120)));
    lines.extend(render.iter().map(|u| (u.clone(), "showcase.Render", 100)));
    lines.extend(train.iter().map(|u| (u.clone(), "showcase.Train", 100)));
    env.send_batch(&batch(&lines));
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        75,
        Duration::from_secs(120),
    );

    // MAX_CONCURRENCY 2: never 3 at once, and 2 at once reached (the limit
    // is not a queue of one).
    assert_eq!(max_overlap(&env, "'showcase.Limited'"), 2);
    // The gpu pool has 2 units: Render holds 1, Train 2.
    assert!(max_overlap(&env, "'showcase.Render', 'showcase.Train'") <= 2);
    // Both workers ran limited tasks: the limit is the fleet's, not theirs.
    let workers = env
        .sql("SELECT count(DISTINCT worker) FROM kser.tasks WHERE entrypoint = 'showcase.Limited'");
    assert_eq!(workers.trim(), "2", "both workers ran limited tasks");
    // Some had to wait, and every lease and waiter is gone.
    assert!(
        first.log().contains("waiting in Postgres") || second.log().contains("waiting in Postgres")
    );
    assert_eq!(env.sql("SELECT count(*) FROM kser.leases").trim(), "0");
    assert_eq!(env.sql("SELECT count(*) FROM kser.waiters").trim(), "0");
    let pools = pools(&env);
    let gpu = pools.iter().find(|p| p["name"] == "gpu").expect("gpu pool");
    assert_eq!(gpu["capacity"], 2);
    assert_eq!(gpu["in_use"], 0);
    let limit = pools
        .iter()
        .find(|p| p["name"] == "entrypoint:showcase.Limited")
        .expect("the Limited pool");
    assert_eq!(limit["capacity"], 2);
    assert_eq!(limit["waiting"], 0);

    first.terminate(Duration::from_secs(30));
    second.terminate(Duration::from_secs(30));
}

#[test]
fn a_waiting_task_keeps_its_place_and_holds_nothing_back() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &["--partitions", "1"]);
    worker.wait_assigned();

    // Train holds the whole gpu pool: one at a time, in arrival order.
    let train = uuids("train", 5);
    let lines: Vec<_> = train
        .iter()
        .map(|u| (u.clone(), "showcase.Train", 300))
        .collect();
    env.send_batch(&batch(&lines));
    wait_until("the later trains to wait", Duration::from_secs(30), || {
        env.sql("SELECT count(*) FROM kser.waiters").trim() == "4"
    });
    // Records after the waiting ones, on the same partition, run at once.
    let echo = env.send("showcase", "showcase.Echo", r#"{"text": "not held back"}"#);
    let echoed = env.wait_final(&echo);
    assert_eq!(echoed["status"], "SUCCESS");
    let pending = env.sql(&format!(
        "SELECT count(*) FROM kser.tasks WHERE status = 'PENDING' AND uuid IN ('{}')",
        train[1..].join("','")
    ));
    assert_ne!(pending.trim(), "0", "the echo ran while trains waited");

    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE entrypoint = 'showcase.Train' AND status = 'SUCCESS'",
        5,
        Duration::from_secs(60),
    );
    let order = env.sql(
        "SELECT string_agg(uuid, ',' ORDER BY started_at) FROM kser.tasks \
         WHERE entrypoint = 'showcase.Train'",
    );
    assert_eq!(order.trim(), train.join(","), "trains ran in arrival order");
    assert_eq!(
        max_overlap(&env, "'showcase.Train'"),
        2,
        "one train (2 units) at a time"
    );
    let status = env.status(&train[4]);
    assert_eq!(status["attempts"], 1, "waiting is not an attempt: {status}");

    worker.terminate(Duration::from_secs(30));
}

#[test]
fn leases_of_a_killed_worker_expire() {
    let env = TestEnv::new();
    let fleet = ["--heartbeat-interval", "500ms", "--lost-after", "3s"];
    let mut doomed = env.start_worker("showcase", &fleet);
    doomed.wait_assigned();
    let long = env.send("showcase", "showcase.Train", r#"{"ms": 600000}"#);
    wait_until(
        "the long train to hold the gpus",
        Duration::from_secs(30),
        || {
            env.sql(&format!(
                "SELECT count(*) FROM kser.leases WHERE task_uuid = '{long}' AND worker IS NOT NULL"
            ))
            .trim()
                == "1"
        },
    );
    doomed.kill();

    // Another group on another topic: the killed worker's record is never
    // read again, so only expiry can free its gpus.
    let topic = format!("{}-other", env.topic);
    let group = format!("{}-other", env.group);
    let mut other = env.start_worker_env(
        "showcase",
        &fleet,
        &[
            ("KSER_TOPIC", topic.as_str()),
            ("KSER_GROUP", group.as_str()),
        ],
    );
    other.wait_assigned();
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Render",
            "--params",
            r#"{"ms": 10}"#,
            "--topic",
            &topic,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let render = text(&out.stdout).trim().to_owned();
    let done = env.wait_final(&render);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert!(
        other.log().contains("waiting in Postgres"),
        "it waited for the dead worker's gpus first"
    );
    let long = env.status(&long);
    assert_ne!(
        long["status"], "SUCCESS",
        "the killed worker's task never finished: {long}"
    );

    other.terminate(Duration::from_secs(30));
}
