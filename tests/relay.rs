//! The outbox relay end to end: a next-step message the broker can never
//! accept fails its operation (which `kser resume` can run again) and holds
//! back no other message.

mod common;

use std::time::Duration;

use common::{TestEnv, text};
use serde_json::{Value, json};

fn count(env: &TestEnv, query: &str) -> i64 {
    env.sql(query).parse().expect("a count")
}

/// Waits until the operation is final and returns its status.
fn wait_operation(env: &TestEnv, uuid: &str) -> Value {
    let mut last = Value::Null;
    common::wait_until(
        &format!("operation {uuid} to end"),
        Duration::from_secs(90),
        || {
            last = env.status(uuid);
            matches!(
                last["status"].as_str(),
                Some("SUCCESS" | "FAILED" | "CANCELLED")
            )
        },
    );
    last
}

#[test]
fn a_step_message_too_large_for_the_broker_fails_its_operation_and_delays_no_other() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    // Step 1 returns 9 MB; step 2's message forwards it, over the 8 MB the
    // test broker takes (and librdkafka's own 1 MB default).
    let big = json!({"steps": [
        {"entrypoint": "showcase.Sized", "params": {"bytes": 9_000_000}},
        {"entrypoint": "showcase.Echo", "params": {"text": "never"}},
    ]})
    .to_string();
    let big_uuid = env.send("showcase", "showcase.Custom", &big);
    // Others sent meanwhile go through.
    let small: Vec<String> = (0..5)
        .map(|_| env.send("showcase", "showcase.Chain", r#"{"count": 3}"#))
        .collect();

    let status = wait_operation(&env, &big_uuid);
    assert_eq!(status["status"], "FAILED", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("step 2 (showcase.Echo) failed: the broker refused its message")
            && error.contains("MessageSizeTooLarge"),
        "the error names the size problem: {error}"
    );
    let steps: Vec<&str> = status["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(steps, ["SUCCESS", "FAILED"], "{status}");
    assert_eq!(
        count(&env, "SELECT count(*) FROM kser.outbox"),
        0,
        "the refused message left the outbox with its step's failure"
    );
    for uuid in &small {
        let status = wait_operation(&env, uuid);
        assert_eq!(status["status"], "SUCCESS", "{status}");
    }

    // It can be resumed: the step is queued again (and refused again, the
    // broker being what it is), and the operation fails again, not hangs.
    let out = env.kser(&["resume", &big_uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("from step 2 (showcase.Echo)"),
        "{}",
        text(&out.stdout)
    );
    worker.wait_for_log(
        "the broker refused an outbox message for good",
        2,
        Duration::from_secs(60),
    );
    let status = wait_operation(&env, &big_uuid);
    assert_eq!(status["status"], "FAILED", "{status}");
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(30),
    );
    let exit = worker.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{}", worker.log());
}
