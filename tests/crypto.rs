//! Encrypted messages (Python kser-crypto's format) end to end: a worker with
//! `KSER_SECRETBOX_KEY` reads encrypted and plain messages, dead-letters a
//! record it cannot decrypt and goes on, publishes its outbox encrypted, and
//! refuses to start with a bad key. Compatibility with the Python library
//! itself is in `tests/interop.rs`.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{TestEnv, WorkerProcess, example_path, text};
use kser::crypto::{Envelope, KEY_VARIABLE, is_encrypted};
use kser::dead_letter::{DeadLetterEntry, read_all};
use kser::{JsonObject, KafkaConfig, Message, Producer, SecretBox};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};

const KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const OTHER_KEY: &str = "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg=";

/// A showcase worker whose environment has `KSER_SECRETBOX_KEY=key`.
fn start_worker(env: &TestEnv, key: &str, args: &[&str]) -> WorkerProcess {
    let log = env.dir.path().join(format!(
        "worker-{}.log",
        std::fs::read_dir(env.dir.path()).map_or(0, |d| d.count())
    ));
    let mut command = env.command(&example_path("showcase"));
    command
        .arg("worker")
        .args(args)
        .env(KEY_VARIABLE, key)
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"));
    WorkerProcess::spawn(&mut command, log)
}

/// `kser ARGS` with `KSER_SECRETBOX_KEY=key`.
fn kser_with_key(env: &TestEnv, key: &str, args: &[&str]) -> Output {
    env.command(Path::new(env!("CARGO_BIN_EXE_kser")))
        .args(args)
        .env(KEY_VARIABLE, key)
        .output()
        .expect("kser")
}

fn send_encrypted(env: &TestEnv, args: &[&str]) -> String {
    let mut all = vec!["send", "--encrypt"];
    all.extend_from_slice(args);
    let out = kser_with_key(env, KEY, &all);
    assert!(out.status.success(), "send failed: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn echo(uuid: &str, text: &str) -> Message {
    let mut params = JsonObject::new();
    params.insert("text".into(), Value::from(text));
    let mut message = Message::new("showcase.Echo", params);
    message.uuid = uuid.to_owned();
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_under_another_key_is_dead_lettered_and_the_worker_goes_on() {
    let env = TestEnv::new();
    let mut worker = start_worker(&env, KEY, &[]);
    worker.wait_assigned();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let ours = Producer::new(&kafka)
        .expect("producer")
        .with_secretbox(SecretBox::from_base64(KEY).expect("key"));
    let theirs = Producer::new(&kafka)
        .expect("producer")
        .with_secretbox(SecretBox::from_base64(OTHER_KEY).expect("key"));

    // One record key: one partition, the good record after the bad one.
    let stranger = echo("under-another-key", "plaintext-params-nobody-may-read");
    let (partition, offset) = theirs
        .send_keyed(&env.topic, b"one-lane", &stranger)
        .await
        .expect("send");
    let good = echo("under-our-key", "decrypted fine");
    ours.send_keyed(&env.topic, b"one-lane", &good)
        .await
        .expect("send");
    let plain = env.send("showcase", "showcase.Echo", r#"{"text": "plain too"}"#);

    let status = env.wait_final("under-our-key");
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(status["result"]["stdout"], "decrypted fine");
    assert_eq!(env.wait_final(&plain)["result"]["stdout"], "plain too");

    let dlq = format!("{}.dlq", env.topic);
    let mut entries: Vec<DeadLetterEntry> = Vec::new();
    common::wait_until("the dead letter", Duration::from_secs(30), || {
        entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
        !entries.is_empty()
    });
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let dead = &entries[0];
    assert_eq!(dead.uuid, None, "nothing was read from it");
    assert_eq!(dead.error_kind.as_deref(), Some("invalid_message"));
    let error = dead.error.as_deref().unwrap_or_default();
    assert!(error.contains("cannot decrypt"), "{error}");
    assert_eq!(
        (dead.partition, dead.offset),
        (Some(partition), Some(offset))
    );
    let payload = dead.raw_payload.as_deref().expect("the original value");
    assert!(is_encrypted(payload), "dead-lettered as it came");
    let value: Value = serde_json::from_slice(payload).expect("JSON");
    let other = SecretBox::from_base64(OTHER_KEY).expect("key");
    let opened = other
        .open(&Envelope::from_json(&value).expect("envelope"))
        .expect("the sender's key opens it");
    assert_eq!(opened, stranger.to_bytes(), "bytes untouched");

    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid = 'under-another-key'"),
        "0"
    );
    let log = worker.log();
    assert!(log.contains("cannot decrypt"), "{log}");
    assert!(
        !log.contains("plaintext-params-nobody-may-read"),
        "plaintext in the log: {log}"
    );
}

/// Every record of `topic`, read from the start until none came for a while.
async fn read_topic(env: &TestEnv, topic: &str, at_least: usize) -> Vec<Vec<u8>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("{}-reader", env.group))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut values = Vec::new();
    loop {
        let wait = if values.len() < at_least { 60 } else { 5 };
        match tokio::time::timeout(Duration::from_secs(wait), consumer.recv()).await {
            Ok(record) => {
                let record = record.expect("a record");
                values.push(record.payload().unwrap_or_default().to_vec());
            }
            Err(_) if values.len() >= at_least => return values,
            Err(_) => panic!("only {} records in {topic}", values.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_key_publishes_steps_retries_and_delayed_sends_encrypted() {
    let env = TestEnv::new();
    // Without an order to keep, retries go through the outbox.
    let mut worker = start_worker(&env, KEY, &["--ordering", "none"]);
    worker.wait_assigned();
    let flag = env.dir.path().join("flag");
    std::fs::write(&flag, "up").expect("flag");
    let flag = flag.display().to_string();

    let pipeline = send_encrypted(
        &env,
        &[
            "showcase.Pipeline",
            "--params",
            &json!({"flag": flag}).to_string(),
        ],
    );
    let retried = send_encrypted(&env, &["showcase.FailTimes", "--params", r#"{"times": 1}"#]);
    let delayed = send_encrypted(
        &env,
        &[
            "showcase.Echo",
            "--params",
            r#"{"text": "later"}"#,
            "--delay",
            "1s",
        ],
    );
    // Scheduled in plain text; the worker's relay encrypts it.
    let out = env.kser(&[
        "send",
        "showcase.Echo",
        "--params",
        r#"{"text": "later, plain"}"#,
        "--delay",
        "1s",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let delayed_plain = text(&out.stdout).trim().to_owned();

    let operation = env.wait_final(&pipeline);
    assert_eq!(operation["status"], "SUCCESS", "{operation:#}");
    let status = env.wait_final(&retried);
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(status["attempts"], 2);
    assert_eq!(env.wait_final(&delayed)["result"]["stdout"], "later");
    assert_eq!(
        env.wait_final(&delayed_plain)["result"]["stdout"],
        "later, plain"
    );

    // 2 sends, 3 steps, 1 retry, 2 delayed sends.
    let records = read_topic(&env, &env.topic, 8).await;
    assert_eq!(records.len(), 8);
    for record in &records {
        assert!(is_encrypted(record), "{}", text(record));
    }
    let log = worker.log();
    assert!(!log.contains("cannot decrypt"), "{log}");
}

#[test]
fn a_bad_key_stops_the_worker_and_send_at_startup_without_showing_it() {
    let env = TestEnv::new();
    for (key, says) in [
        ("s3cr3t!not-base64", "is not valid base64"),
        ("c2VjcmV0LXNpeHRlZW4tYg==", "decodes to 16 bytes"),
    ] {
        let mut worker = start_worker(&env, key, &[]);
        let status = worker.wait_exit(Duration::from_secs(60));
        assert!(!status.success());
        let log = worker.log();
        assert!(log.contains(KEY_VARIABLE) && log.contains(says), "{log}");
        assert!(!log.contains(key), "the key is shown: {log}");

        let out = kser_with_key(&env, key, &["send", "--encrypt", "showcase.Echo"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(KEY_VARIABLE) && stderr.contains(says),
            "{stderr}"
        );
        assert!(!stderr.contains(key), "{stderr}");
    }
    let out = env.kser(&["send", "--encrypt", "showcase.Echo"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--encrypt needs the key in KSER_SECRETBOX_KEY"),
        "{}",
        text(&out.stderr)
    );
}
