//! Dead letters: poison records and failed messages land in `<topic>.dlq`
//! with their original bytes and where they came from; `dlq replay` runs
//! them again after a fix.

mod common;

use std::time::Duration;

use common::{TestEnv, text};
use kser::dead_letter::{DeadLetterEntry, read_all};
use kser::{KafkaConfig, Producer};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_and_failed_messages_are_dead_lettered() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let producer = Producer::new(&kafka).expect("producer");

    let poison: &[u8] = b"\xff\xfe not even text";
    let (partition, offset) = producer
        .send_raw(&env.topic, Some(b"poison-key".as_slice()), Some(poison))
        .await
        .expect("send");
    let bad_params = r#"{"uuid": "bad-params", "entrypoint": "showcase.Echo", "params": {}}"#;
    producer
        .send_raw(&env.topic, None, Some(bad_params.as_bytes()))
        .await
        .expect("send");
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.FailTimes",
            "--uuid",
            "exhausted",
            "--params",
            r#"{"times": 100}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ok = env.send("showcase", "showcase.Echo", r#"{"text": "fine"}"#);
    assert_eq!(env.wait_final("exhausted")["attempts"], 4);
    assert_eq!(env.wait_final("bad-params")["status"], "FAILED");
    assert_eq!(env.wait_final(&ok)["status"], "SUCCESS");

    let dlq = format!("{}.dlq", env.topic);
    let mut entries: Vec<DeadLetterEntry> = Vec::new();
    common::wait_until("three dead letters", Duration::from_secs(30), || {
        entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
        entries.len() >= 3
    });
    assert_eq!(
        entries.len(),
        3,
        "successes are not dead-lettered: {entries:#?}"
    );

    let poisoned = entries
        .iter()
        .find(|e| e.uuid.is_none())
        .expect("the poison record");
    assert_eq!(
        poisoned.raw_payload.as_deref(),
        Some(poison),
        "bytes untouched"
    );
    assert_eq!(poisoned.raw_key.as_deref(), Some(b"poison-key".as_slice()));
    assert_eq!(poisoned.topic.as_deref(), Some(env.topic.as_str()));
    assert_eq!(
        (poisoned.partition, poisoned.offset),
        (Some(partition), Some(offset))
    );
    assert_eq!(poisoned.error_kind.as_deref(), Some("invalid_message"));
    assert!(
        poisoned
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("UTF-8")
    );
    assert!(poisoned.timestamp.is_some());

    let invalid = entries
        .iter()
        .find(|e| e.uuid.as_deref() == Some("bad-params"))
        .expect("bad-params");
    assert_eq!(invalid.error_kind.as_deref(), Some("invalid_params"));
    assert_eq!(invalid.raw_payload.as_deref(), Some(bad_params.as_bytes()));
    assert_eq!(invalid.attempts, Some(1));

    let exhausted = entries
        .iter()
        .find(|e| e.uuid.as_deref() == Some("exhausted"))
        .expect("exhausted");
    assert_eq!(exhausted.error_kind.as_deref(), Some("retryable"));
    assert_eq!(exhausted.attempts, Some(4), "retries exhausted");

    let listed = env.kser(&["dlq", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    let table = text(&env.kser(&["dlq", "list"]).stdout);
    assert!(
        table.contains("invalid_params") && table.contains("exhausted"),
        "{table}"
    );
}

#[test]
fn replay_runs_a_dead_letter_again_after_a_fix() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let flag = env.dir.path().join("fixed");
    let params = serde_json::json!({ "flag": flag }).to_string();
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Flaky",
            "--uuid",
            "flaky",
            "--params",
            &params,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(env.wait_final("flaky")["status"], "FAILED");
    worker.wait_for_log("dead-lettered", 1, Duration::from_secs(30));

    let missing = env.kser(&["dlq", "replay", "nope"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no dead letter nope"));

    std::fs::write(&flag, b"fixed").expect("fix");
    let out = env.kser(&["dlq", "replay", "flaky"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("replayed 1 dead letters"));
    common::wait_until("the replay to succeed", Duration::from_secs(60), || {
        env.status("flaky")["status"] == "SUCCESS"
    });
    let status = env.status("flaky");
    assert_eq!(status["attempts"], 2);
    assert_eq!(status["result"]["stdout"], "the flag is up");
}
