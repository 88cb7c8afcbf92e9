//! Operations end to end: steps across workers, failure and resume, crash
//! recovery, duplicates, cancellation, and operations refused up front.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestEnv, text};
use kser::{KafkaConfig, Producer};
use serde_json::{Value, json};

fn send_batch(env: &TestEnv, input: &str) -> Vec<String> {
    let out = env.run(
        Path::new(env!("CARGO_BIN_EXE_kser")),
        &["send", "--batch", "-"],
        Some(input),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

fn count(env: &TestEnv, query: &str) -> i64 {
    env.sql(query).parse().expect("a count")
}

/// The status of each step of an operation, in order.
fn step_statuses(status: &Value) -> Vec<&str> {
    status["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["status"].as_str().unwrap_or_default())
        .collect()
}

fn watch(env: &TestEnv, uuid: &str) -> (i32, String) {
    let out = env.kser(&["watch", uuid, "--timeout", "90", "--interval", "0.2"]);
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

#[test]
fn dice_launches_run_their_steps_across_two_workers() {
    let env = TestEnv::new();
    let mut first = env.start_worker("dice", &["--partitions", "4"]);
    first.wait_assigned();
    let mut second = env.start_worker("dice", &["--partitions", "4"]);
    second.wait_assigned();
    first.wait_for_log("partitions assigned", 2, Duration::from_secs(60));

    let input = "{\"entrypoint\": \"dice.DiceLaunch\", \"params\": {\"sides\": 20}}\n".repeat(20);
    let uuids = send_batch(&env, &input);
    assert_eq!(uuids.len(), 20);
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        20,
        Duration::from_secs(90),
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE operation_uuid IS NOT NULL"
        ),
        60
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS' OR attempts <> 1"
        ),
        0,
        "every step ran once"
    );
    assert_eq!(
        env.sql("SELECT count(DISTINCT worker) FROM kser.tasks WHERE operation_uuid IS NOT NULL"),
        "2",
        "steps ran on both workers"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.outbox"), 0);

    let status = env.status(&uuids[0]);
    assert_eq!(status["kind"], "operation");
    assert_eq!(status["status"], "SUCCESS");
    let tasks = status["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 3);
    let rolls: Vec<Value> = tasks
        .iter()
        .map(|t| t["result"]["retval"]["roll"].clone())
        .collect();
    assert_eq!(
        status["result"]["retval"]["rolls"],
        Value::Array(rolls),
        "each step got the rolls before it"
    );
    assert_eq!(
        tasks[2]["result"]["retval"]["rolls"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    let human = text(&env.kser(&["status", &uuids[0]]).stdout);
    assert_eq!(human.matches("dice.DiceRoll").count(), 3, "{human}");
    assert!(human.contains("You made a"), "{human}");
    let step = text(
        &env.kser(&["status", tasks[1]["uuid"].as_str().expect("uuid")])
            .stdout,
    );
    assert!(step.contains(&format!("{} (step 2)", uuids[0])), "{step}");

    let listed = env.kser(&[
        "list",
        "--entrypoint",
        "dice.DiceLaunch",
        "--json",
        "--limit",
        "50",
    ]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 20);
    assert!(listed.iter().all(|row| row["kind"] == "operation"));
}

#[test]
fn a_failed_operation_resumes_from_the_failed_step() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let flag = env.dir.path().join("flag");
    let params = json!({ "flag": flag }).to_string();

    let uuid = env.send("showcase", "showcase.Pipeline", &params);
    let (code, output) = watch(&env, &uuid);
    assert_eq!(code, 1, "watch exits 1 for a failed operation: {output}");
    assert!(output.contains("FAILED"), "{output}");

    let status = env.status(&uuid);
    assert_eq!(status["status"], "FAILED");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("step 2 (showcase.Flaky) failed: waiting for"),
        "{error}"
    );
    let steps = step_statuses(&status);
    assert_eq!(
        steps,
        ["SUCCESS", "FAILED", "PENDING"],
        "later steps stay PENDING"
    );
    worker.wait_for_log("pipeline hook: failed", 1, Duration::from_secs(10));

    std::fs::write(&flag, b"up").expect("flag");
    let out = env.kser(&["resume", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("from step 2 (showcase.Flaky)"),
        "{}",
        text(&out.stdout)
    );
    // On a terminal (a pty from `script`), watch redraws in place.
    let kser = env!("CARGO_BIN_EXE_kser");
    let tty = env.run(
        Path::new("script"),
        &[
            "-qec",
            &format!("{kser} watch {uuid} --timeout 90 --interval 0.2"),
            "/dev/null",
        ],
        None,
    );
    let screen = text(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(
        screen.contains("SUCCESS") && screen.contains("showcase.Flaky"),
        "{screen}"
    );

    let status = env.status(&uuid);
    let attempts: Vec<i64> = status["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["attempts"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(attempts, [1, 2, 1], "the first step did not run again");
    assert_eq!(status["result"]["retval"]["first"], 1);
    assert_eq!(status["result"]["retval"]["third"], 3);
    assert_eq!(status["result"]["stdout"], "three");
    assert!(status["error"].is_null());
    worker.wait_for_log("pipeline hook: succeeded", 1, Duration::from_secs(10));

    let again = env.kser(&["resume", &uuid]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("is SUCCESS; only FAILED or CANCELLED"),
        "{}",
        text(&again.stderr)
    );
    let missing = env.kser(&["resume", "no-such-operation"]);
    assert!(text(&missing.stderr).contains("no operation with uuid no-such-operation"));
}

#[test]
fn operations_survive_a_worker_killed_mid_run() {
    let env = TestEnv::new();
    env.kser(&["migrate"]);
    let mut worker = env.start_worker("showcase", &["--concurrency", "8"]);
    worker.wait_assigned();
    let input =
        "{\"entrypoint\": \"showcase.Chain\", \"params\": {\"count\": 4, \"ms\": 40}}\n".repeat(30);
    send_batch(&env, &input);
    common::wait_until("some steps to finish", Duration::from_secs(60), || {
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        ) >= 25
    });
    worker.kill();
    assert!(
        count(
            &env,
            "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'"
        ) < 30
    );

    let mut restarted = env.start_worker("showcase", &["--concurrency", "8"]);
    restarted.wait_assigned();
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        30,
        Duration::from_secs(120),
    );
    // Each step moved its operation along exactly once, in order.
    let items = env.sql("SELECT DISTINCT result->'retval'->>'items' FROM kser.operations");
    assert_eq!(items, "[0, 1, 2, 3]");
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS'"
        ),
        0
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.tasks"), 120);
    assert_eq!(
        count(&env, "SELECT count(*) FROM kser.tasks WHERE attempts > 2"),
        0
    );
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(30),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_operation_and_step_messages_are_harmless() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let op = "dup-op";
    let send = |uuid: &str, entrypoint: &str, params: &str| {
        let out = env.example_cmd(
            "showcase",
            &["send", entrypoint, "--uuid", uuid, "--params", params],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    send(op, "showcase.Chain", r#"{"count": 2}"#);
    let (code, _) = watch(&env, op);
    assert_eq!(code, 0);
    let before = env.status(op);

    // The same operation message again, and its first step's message again,
    // then a marker on the same partition: once it ran, both were handled.
    send(op, "showcase.Chain", r#"{"count": 2}"#);
    let step = &before["tasks"][0];
    let mut metadata = step["metadata"].clone();
    metadata["kser_operation"] = json!(op);
    let duplicate = json!({
        "uuid": step["uuid"], "entrypoint": step["entrypoint"],
        "params": step["params"], "metadata": metadata,
    });
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    let key = Some(op.as_bytes());
    producer
        .send_raw(&env.topic, key, Some(duplicate.to_string().as_bytes()))
        .await
        .expect("send");
    let marker =
        json!({"uuid": "marker", "entrypoint": "showcase.Echo", "params": {"text": "done"}});
    producer
        .send_raw(&env.topic, key, Some(marker.to_string().as_bytes()))
        .await
        .expect("send");
    assert_eq!(env.wait_final("marker")["status"], "SUCCESS");

    let after = env.status(op);
    assert_eq!(after["status"], "SUCCESS");
    assert_eq!(
        after["result"], before["result"],
        "the result did not change"
    );
    assert_eq!(after["tasks"], before["tasks"], "no step ran again");
    assert_eq!(count(&env, "SELECT count(*) FROM kser.operations"), 1);
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE uuid = 'dup-op'"
        ),
        0
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.outbox"), 0);
    let log = worker.log();
    assert!(log.contains("operation already recorded"), "{log}");
    assert!(log.contains("already finished; not run again"), "{log}");
}

/// A cancel while the last step runs comes too late, and `cancel` says so:
/// the operation ends with that step's outcome, here SUCCESS with its
/// result (never CANCELLED with every step SUCCESS and no result).
#[test]
fn a_cancel_racing_the_last_step_ends_with_what_happened() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let params = json!({"steps": [
        {"entrypoint": "showcase.Echo", "params": {"text": "one", "retval": {"first": 1}}},
        {"entrypoint": "showcase.Sleep", "params": {"ms": 3000}},
    ]})
    .to_string();
    let uuid = env.send("showcase", "showcase.Custom", &params);
    common::wait_until("the last step to run", Duration::from_secs(60), || {
        env.try_status(&uuid)["tasks"][1]["status"] == "RUNNING"
    });
    let out = env.kser(&["cancel", &uuid]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stderr);
    assert!(
        said.contains("its last step, 2 (showcase.Sleep), is running") && said.contains("too late"),
        "{said}"
    );
    let (code, output) = watch(&env, &uuid);
    assert_eq!(code, 0, "the last step succeeded: {output}");
    let status = env.status(&uuid);
    assert_eq!(status["status"], "SUCCESS", "{status}");
    assert_eq!(step_statuses(&status), ["SUCCESS", "SUCCESS"]);
    assert_eq!(status["result"]["retval"]["first"], 1, "{status}");
    assert_eq!(status["result"]["retval"]["slept_ms"], 3000, "{status}");
    assert!(status["error"].is_null(), "{status}");
    let again = env.kser(&["cancel", &uuid]);
    assert!(
        text(&again.stderr).contains("already SUCCESS"),
        "{}",
        text(&again.stderr)
    );
    let exit = worker.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{}", worker.log());
}

#[test]
fn cancel_stops_an_operation_between_steps() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let uuid = env.send("showcase", "showcase.Chain", r#"{"count": 3, "ms": 2000}"#);
    common::wait_until("the first step to start", Duration::from_secs(60), || {
        env.try_status(&uuid)["tasks"][0]["status"] == "RUNNING"
    });
    let out = env.kser(&["cancel", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("step 1 (showcase.Append) is running: it finishes"),
        "{}",
        text(&out.stdout)
    );
    let (code, _) = watch(&env, &uuid);
    assert_eq!(code, 1, "watch exits 1 for a cancelled operation");

    // The running step finishes; the others never start.
    common::wait_until(
        "the running step to finish",
        Duration::from_secs(30),
        || env.status(&uuid)["tasks"][0]["status"] == "SUCCESS",
    );
    std::thread::sleep(Duration::from_secs(1));
    let status = env.status(&uuid);
    assert_eq!(status["status"], "CANCELLED");
    let steps = step_statuses(&status);
    assert_eq!(steps, ["SUCCESS", "CANCELLED", "CANCELLED"]);
    assert_eq!(
        status["result"]["retval"]["items"],
        json!([0]),
        "the result of the step that finished after the cancel is kept: {status}"
    );
    let again = env.kser(&["cancel", &uuid]);
    assert!(text(&again.stderr).contains("already CANCELLED"));

    // A cancelled operation can be resumed.
    let out = env.kser(&["resume", &uuid]);
    assert!(
        text(&out.stdout).contains("from step 2"),
        "{}",
        text(&out.stdout)
    );
    let (code, _) = watch(&env, &uuid);
    assert_eq!(code, 0);
    assert_eq!(
        env.status(&uuid)["result"]["retval"]["items"],
        json!([0, 1, 2])
    );
}

#[test]
fn a_resume_while_the_cancelled_step_still_runs_lets_it_finish_once() {
    let env = TestEnv::new();
    let journal = env.dir.path().join("journal");
    let journal_path = journal.to_str().expect("utf-8 path");
    let mut worker = env.start_worker_env("showcase", &[], &[("SHOWCASE_JOURNAL", journal_path)]);
    worker.wait_assigned();
    let uuid = env.send("showcase", "showcase.Chain", r#"{"count": 3, "ms": 3000}"#);
    common::wait_until("the first step to start", Duration::from_secs(60), || {
        env.try_status(&uuid)["tasks"][0]["status"] == "RUNNING"
    });
    let out = env.kser(&["cancel", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Resumed at once: step 1 is still running, so it is not sent again;
    // its end sends step 2.
    let out = env.kser(&["resume", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("still running, left to finish: step 1 (showcase.Append)"),
        "{}",
        text(&out.stdout)
    );
    let (code, _) = watch(&env, &uuid);
    assert_eq!(code, 0);
    let status = env.status(&uuid);
    assert_eq!(
        status["result"]["retval"]["items"],
        json!([0, 1, 2]),
        "{status}"
    );
    let first = status["tasks"][0]["uuid"].as_str().expect("step 1's uuid");
    let journal = std::fs::read_to_string(&journal).expect("journal");
    let runs = journal.lines().filter(|l| l.starts_with(first)).count();
    assert_eq!(runs, 1, "step 1 ran {runs} times:\n{journal}");
    assert_eq!(status["tasks"][0]["attempts"], json!(1), "{status}");
}

#[test]
fn operations_that_cannot_be_built_fail_up_front() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let cases = [
        (
            "showcase.Chain",
            r#"{"count": "many"}"#,
            "invalid params for showcase.Chain: count: invalid type",
        ),
        (
            "showcase.Chain",
            r#"{"count": 0}"#,
            "count must be between 1 and 1000",
        ),
        (
            "showcase.Custom",
            r#"{"steps": [{"entrypoint": "showcase.Echo", "params": {"text": "ok"}}, {"entrypoint": "nope.Nope"}]}"#,
            "step 2 (nope.Nope): unknown entrypoint 'nope.Nope'",
        ),
        (
            "showcase.Custom",
            r#"{"steps": [{"entrypoint": "showcase.Sleep", "params": {"ms": "soon"}}]}"#,
            "step 1 (showcase.Sleep): invalid params for showcase.Sleep: ms: invalid type",
        ),
        (
            "showcase.Custom",
            r#"{"steps": [{"entrypoint": "showcase.Echo", "params": {}}]}"#,
            "step 1 (showcase.Echo): invalid params for showcase.Echo: missing field `text`",
        ),
        (
            "showcase.Custom",
            r#"{"steps": [{"entrypoint": "showcase.Chain", "params": {"count": 1}}]}"#,
            "cannot be a step of another operation",
        ),
        ("showcase.Custom", r#"{"steps": []}"#, "built no steps"),
    ];
    let uuids: Vec<String> = cases
        .iter()
        .map(|(entrypoint, params, _)| env.send("showcase", entrypoint, params))
        .collect();
    for ((_, _, expected), uuid) in cases.iter().zip(&uuids) {
        let (code, _) = watch(&env, uuid);
        assert_eq!(code, 1);
        let status = env.status(uuid);
        assert_eq!(status["kind"], "operation");
        assert_eq!(status["status"], "FAILED");
        let error = status["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expected),
            "expected '{expected}' in '{error}'"
        );
        assert_eq!(status["tasks"], json!([]), "nothing half-created");
    }
    assert_eq!(count(&env, "SELECT count(*) FROM kser.tasks"), 0);
}
