//! Retries with backoff, timeouts, delayed sends, and fencing of stale
//! attempts.

mod common;

use chrono::{DateTime, Utc};
use common::{TestEnv, text};
use serde_json::Value;

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("a timestamp, not {value}"))
}

#[test]
fn a_retryable_failure_succeeds_on_the_third_attempt_after_its_backoff() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    let uuid = env.send("showcase", "showcase.FailTimes", r#"{"times": 2}"#);
    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(status["attempts"], 3);
    assert_eq!(status["result"]["stdout"], "succeeded on attempt 3");
    let history = status["attempt_history"].as_array().expect("history");
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["error"], "failing on purpose (attempt 1)");
    assert_eq!(history[1]["retcode"], 503);

    // The policy waits 300 ms, then 600 ms (no jitter).
    let second_start = time(&status["started_at"]);
    let gap = second_start - time(&history[1]["finished_at"]);
    assert!(
        gap >= chrono::Duration::milliseconds(600),
        "second wait {gap}"
    );
    let human = text(&env.kser(&["status", &uuid]).stdout);
    assert!(human.contains("earlier attempts"), "{human}");
    assert!(human.contains("failing on purpose (attempt 2)"), "{human}");
}

#[test]
fn a_failure_that_never_passes_ends_failed_with_its_history() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let uuid = env.send("showcase", "showcase.FailTimes", r#"{"times": 100}"#);
    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["attempts"], 4, "max_attempts of the task's policy");
    assert_eq!(status["error"], "failing on purpose (attempt 4)");
    let history = status["attempt_history"].as_array().expect("history");
    let numbers: Vec<i64> = history
        .iter()
        .map(|a| a["attempt"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    let first = time(&history[0]["finished_at"]);
    let last = time(&history[2]["finished_at"]);
    assert!(
        last - first >= chrono::Duration::milliseconds(900),
        "300 + 600 ms of backoff"
    );
}

#[test]
fn the_worker_policy_retries_panics_and_timeouts_but_not_fatal_errors() {
    let env = TestEnv::new();
    let mut worker = env.start_worker(
        "showcase",
        &[
            "--max-attempts",
            "2",
            "--retry-backoff",
            "100ms",
            "--task-timeout",
            "500ms",
        ],
    );
    worker.wait_assigned();
    let panics = env.send("showcase", "showcase.Panic", "{}");
    let hangs = env.send("showcase", "showcase.Sleep", r#"{"ms": 20000}"#);
    let fatal = env.send("showcase", "showcase.Fail", r#"{"reason": "no"}"#);

    let status = env.wait_final(&panics);
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["attempts"], 2);
    assert!(
        status["attempt_history"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("panicked")
    );

    let status = env.wait_final(&hangs);
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["attempts"], 2);
    assert_eq!(status["result"]["retval"]["error"]["kind"], "timeout");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out after 0.500s")
    );
    let ran = time(&status["finished_at"]) - time(&status["started_at"]);
    assert!(
        ran < chrono::Duration::seconds(5),
        "cancelled at the timeout: {ran}"
    );

    let status = env.wait_final(&fatal);
    assert_eq!(status["attempts"], 1, "a fatal error is not retried");
}

#[test]
fn send_delay_runs_the_task_later() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let out = env.kser(&[
        "send",
        "showcase.Echo",
        "--params",
        r#"{"text": "later"}"#,
        "--delay",
        "2s",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let uuid = text(&out.stdout).trim().to_owned();
    let pending = env.status(&uuid);
    assert_eq!(pending["status"], "PENDING");
    assert!(pending["next_attempt_at"].is_string());

    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "SUCCESS");
    assert_eq!(status["result"]["stdout"], "later");
    let waited = time(&status["started_at"]) - time(&status["created_at"]);
    assert!(
        waited >= chrono::Duration::milliseconds(1900),
        "ran after its delay: {waited}"
    );

    let past = env.kser(&[
        "send",
        "showcase.Echo",
        "--params",
        r#"{"text": "now"}"#,
        "--at",
        "2020-01-01T00:00:00Z",
    ]);
    let uuid = text(&past.stdout).trim().to_owned();
    assert_eq!(env.wait_final(&uuid)["status"], "SUCCESS");

    let mut command = env.command(std::path::Path::new(env!("CARGO_BIN_EXE_kser")));
    let out = command
        .args(["send", "showcase.Echo", "--delay", "1s"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--delay and --at need a database"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_attempt_cannot_overwrite_a_newer_one() {
    use kser::store::{NewTask, Store, TaskStatus};

    let env = TestEnv::new();
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    // Two workers claim the same message before either records anything:
    // both would run attempt 1.
    let uuids = ["fenced".to_owned()];
    let first = store.claim_tasks(&uuids).await.expect("claim");
    let second = store.claim_tasks(&uuids).await.expect("claim again");
    assert_eq!(first["fenced"].attempts, 1);
    assert_eq!(second["fenced"].attempts, 1);
    // Neither found a row: each would record its outcome with a plain
    // insert, which must fall back to the fenced upsert.
    assert!(!first["fenced"].stored && !second["fenced"].stored);
    let attempt = |worker: &str, status: TaskStatus| {
        let mut row = NewTask::new("fenced".into(), "showcase.Echo".into(), status);
        row.attempts = 1;
        row.worker = Some(worker.into());
        row.started_at = Some(Utc::now());
        if status.is_final() {
            row.finished_at = Some(Utc::now());
        }
        row
    };
    // The second runs long and is written RUNNING first: it owns attempt 1.
    let marked = store
        .mark_running(&[attempt("worker-b", TaskStatus::Running)])
        .await
        .expect("mark");
    assert_eq!(marked, ["fenced"]);
    assert!(
        store
            .mark_running(&[attempt("worker-a", TaskStatus::Running)])
            .await
            .expect("mark")
            .is_empty(),
        "the other attempt cannot mark it too"
    );
    let mut zombie = attempt("worker-a", TaskStatus::Failed);
    zombie.error = Some("the zombie's outcome".into());
    assert_eq!(
        store
            .complete_new_tasks(std::slice::from_ref(&zombie))
            .await
            .expect("complete"),
        0
    );
    let done = attempt("worker-b", TaskStatus::Success);
    assert_eq!(
        store
            .complete_new_tasks(std::slice::from_ref(&done))
            .await
            .expect("complete"),
        1
    );
    // Final: it is not claimed again, nor recorded again.
    assert!(store.claim_tasks(&uuids).await.expect("claim").is_empty());
    let again = std::slice::from_ref(&done);
    assert_eq!(store.complete_tasks(again).await.expect("complete"), 0);
    assert_eq!(store.complete_new_tasks(again).await.expect("complete"), 0);
    let task = store.task("fenced").await.expect("task").expect("row");
    assert_eq!(task.status, "SUCCESS");
    assert_eq!(task.worker.as_deref(), Some("worker-b"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_numbers_attempts_and_leaves_out_final_tasks() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    use kser::store::{NewTask, Store, TaskStatus};

    let env = TestEnv::new();
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let row = |uuid: &str, status: TaskStatus| {
        let mut row = NewTask::new(uuid.into(), "showcase.Echo".into(), status);
        row.attempts = 1;
        row.worker = Some("worker-a".into());
        row.started_at = Some(Utc::now());
        if status.is_final() {
            row.finished_at = Some(Utc::now());
        }
        row
    };
    store
        .mark_running(&[row("running", TaskStatus::Running)])
        .await
        .expect("mark");
    store
        .complete_new_tasks(&[
            row("final", TaskStatus::Success),
            row("failed", TaskStatus::Failed),
        ])
        .await
        .expect("complete");
    // Sent, not run yet: a PENDING row at attempt 0.
    let mut sent = NewTask::new("sent".into(), "showcase.Echo".into(), TaskStatus::Pending);
    sent.topic = Some("topic".into());
    store.record_pending(&[sent]).await.expect("record");
    // The second step of an operation, waiting for its turn.
    let mut conn = AsyncPgConnection::establish(&env.database_url)
        .await
        .expect("connect");
    conn.batch_execute(
        "INSERT INTO kser.operations (uuid, entrypoint, steps) VALUES ('op', 'showcase.Op', 2); \
         INSERT INTO kser.tasks (uuid, entrypoint, operation_uuid, position) \
             VALUES ('step', 'showcase.Echo', 'op', 1)",
    )
    .await
    .expect("insert a step");
    // A batch may hold a uuid twice (a duplicate send): a final task is
    // left out each time, never taken for one Postgres has no row of.
    let uuids = [
        "new", "running", "final", "sent", "failed", "final", "step", "new",
    ]
    .map(String::from);
    let claimed = store.claim_tasks(&uuids).await.expect("claim");
    let mut names: Vec<&str> = claimed.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["new", "running", "sent", "step"]);
    assert_eq!(claimed["new"].attempts, 1);
    assert!(!claimed["new"].stored);
    assert_eq!(claimed["new"].operation_uuid, None);
    // The RUNNING row's attempt was 1: this is the second.
    assert_eq!(claimed["running"].attempts, 2);
    assert!(claimed["running"].stored);
    // Postgres has the sent one's row, though no attempt ran yet.
    assert_eq!(claimed["sent"].attempts, 1);
    assert!(claimed["sent"].stored);
    let step = &claimed["step"];
    assert_eq!(
        (
            step.attempts,
            step.stored,
            step.operation_uuid.as_deref(),
            step.position
        ),
        (1, true, Some("op"), Some(1))
    );
}
