//! Dead letters: poison records and failed messages land in `<topic>.dlq`
//! with their original bytes and where they came from; `dlq replay` runs
//! them again after a fix. A dead letter the topic refuses for good is kept
//! in Postgres and does not hold its partition.

mod common;

use std::time::Duration;

use common::{TestEnv, text};
use kser::dead_letter::{DeadLetterEntry, read_all};
use kser::{KafkaConfig, Producer};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
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

/// The raw producer the tests publish large records with: kser's own
/// producer keeps librdkafka's 1 MB default, as the worker's does.
fn large_record_producer(env: &TestEnv) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("message.max.bytes", "8000000")
        .create()
        .expect("producer")
}

async fn publish(producer: &FutureProducer, topic: &str, key: &[u8], payload: &[u8]) -> (i32, i64) {
    let record = FutureRecord::to(topic).key(key).payload(payload);
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(err, _)| err)
        .expect("send");
    (delivery.partition, delivery.offset)
}

/// The records of `topic`'s `partition` from `from` on, up to its end.
fn read_partition(env: &TestEnv, topic: &str, partition: i32, from: i64) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", "kser-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let (_, end) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from))
        .expect("offset");
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    let mut next = from;
    common::wait_until(
        &format!("{topic}[{partition}] up to {end}"),
        Duration::from_secs(60),
        || {
            while let Some(record) = consumer.poll(Duration::from_millis(200)) {
                let record = record.expect("record");
                next = record.offset() + 1;
                records.push(record.detach());
            }
            next >= end
        },
    );
    records
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_too_large_to_write_is_kept_in_postgres_and_its_partition_goes_on() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    // ~5 MB: the source topic takes it (the broker allows 8 MB), the
    // worker's producer (1 MB by default) refuses it as a dead letter.
    let padding = "x".repeat(5 * 1024 * 1024);
    let big = serde_json::json!({
        "uuid": "big",
        "entrypoint": "showcase.Fail",
        "params": {"reason": "too big to fail quietly", "padding": padding},
    })
    .to_string()
    .into_bytes();
    let key = b"same-partition".as_slice();
    let producer = large_record_producer(&env);
    let (partition, offset) = publish(&producer, &env.topic, key, &big).await;
    assert_eq!(env.wait_final("big")["status"], "FAILED");
    env.wait_count(
        "SELECT count(*) FROM kser.dead_letters",
        1,
        Duration::from_secs(60),
    );

    // Later records of the same partition run, and its offsets move on.
    let mut last = offset;
    for n in 0..3 {
        let message = format!(
            r#"{{"uuid": "after-{n}", "entrypoint": "showcase.Echo", "params": {{"text": "after {n}"}}}}"#
        );
        let (p, o) = publish(&producer, &env.topic, key, message.as_bytes()).await;
        assert_eq!(p, partition, "same key, same partition");
        last = o;
    }
    for n in 0..3 {
        assert_eq!(env.wait_final(&format!("after-{n}"))["status"], "SUCCESS");
    }
    common::wait_until(
        "the partition's offset to be committed past the big record",
        Duration::from_secs(30),
        || env.committed_offset(partition).is_some_and(|o| o > last),
    );

    let row = env.sql(
        "SELECT id, topic, kafka_partition, kafka_offset, error_kind, uuid, attempts, \
             octet_length(value), key, producer_error FROM kser.dead_letters",
    );
    let row: Vec<&str> = row.split('|').collect();
    let id = row[0];
    assert_eq!(
        row[1..9],
        [
            env.topic.as_str(),
            &partition.to_string(),
            &offset.to_string(),
            "fatal",
            "big",
            "1",
            &big.len().to_string(),
            r"\x73616d652d706172746974696f6e",
        ],
        "{row:?}"
    );
    assert!(row[9].contains("MessageSizeTooLarge"), "{row:?}");

    // The dead-letter topic has a small record pointing at the row.
    let kafka = KafkaConfig::new(env.brokers.clone());
    let dlq = format!("{}.dlq", env.topic);
    let entries = read_all(&kafka, &dlq).await.expect("read");
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let pointer = &entries[0];
    assert_eq!(pointer.stored.as_deref(), Some("postgres"));
    assert_eq!(
        pointer.stored_id.map(|i| i.to_string()).as_deref(),
        Some(id)
    );
    assert_eq!(pointer.raw_payload, None, "no payload");
    assert_eq!(pointer.uuid.as_deref(), Some("big"));
    assert_eq!(
        (pointer.partition, pointer.offset),
        (Some(partition), Some(offset))
    );
    assert_eq!(pointer.error_kind.as_deref(), Some("fatal"));

    let listed = env.kser(&["dlq", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["stored"], "postgres");
    assert_eq!(listed[0]["payload_bytes"], big.len());
    assert_eq!(listed[0]["key"], "same-partition");
    assert!(listed[0]["dlq_offset"].is_i64());
    let table = text(&env.kser(&["dlq", "list"]).stdout);
    assert!(
        table.contains("kept in Postgres") && table.contains(&format!("pg:{id}")),
        "{table}"
    );

    // A replay whose message the broker refuses changes no row: the task
    // stays FAILED with its error. (The source topic takes 1 MB for now.)
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .expect("admin");
    let set_max = |bytes: &'static str| {
        let admin = &admin;
        let topic = env.topic.clone();
        async move {
            let config =
                rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&topic))
                    .set("max.message.bytes", bytes);
            let results = admin
                .alter_configs([&config], &AdminOptions::new())
                .await
                .expect("alter configs");
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        }
    };
    set_max("1048588").await;
    let before = env.sql("SELECT status, error FROM kser.tasks WHERE uuid = 'big'");
    let out = env.kser(&["dlq", "replay", "big", "-X", "message.timeout.ms=5000"]);
    assert!(!out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        env.sql("SELECT status, error FROM kser.tasks WHERE uuid = 'big'"),
        before,
        "the row is as it was"
    );
    assert!(before.starts_with("FAILED|"), "{before}");
    set_max("8388608").await;

    // Replayed byte for byte from Postgres to the source topic.
    let out = env.kser(&["dlq", "replay", "big"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("replayed 1 dead letters"));
    let replayed: Vec<OwnedMessage> = read_partition(&env, &env.topic, partition, last + 1);
    let replayed: Vec<&OwnedMessage> = replayed
        .iter()
        .filter(|r| r.payload().is_some_and(|p| p.len() > 1024 * 1024))
        .collect();
    assert_eq!(replayed.len(), 1);
    assert!(
        replayed[0].payload() == Some(big.as_slice()),
        "byte for byte"
    );
    assert_eq!(replayed[0].key(), Some(key));
    // It fails again and is kept again, the partition still moving.
    env.wait_count(
        "SELECT count(*) FROM kser.dead_letters",
        2,
        Duration::from_secs(60),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_that_refuses_every_record_does_not_hold_the_partition() {
    let env = TestEnv::new();
    // A dead-letter topic whose broker-side limit no record fits: it refuses
    // the dead letter and the small record pointing at it alike.
    let dlq = format!("{}.dlq", env.topic);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "64")],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    let kafka = KafkaConfig::new(env.brokers.clone());
    let producer = Producer::new(&kafka).expect("producer");
    let key = Some(b"same-partition".as_slice());
    let fail = r#"{"uuid": "refused", "entrypoint": "showcase.Fail", "params": {"reason": "no"}}"#;
    let (partition, _) = producer
        .send_raw(&env.topic, key, Some(fail.as_bytes()))
        .await
        .expect("send");
    let echo = r#"{"uuid": "after", "entrypoint": "showcase.Echo", "params": {"text": "on"}}"#;
    let (p, last) = producer
        .send_raw(&env.topic, key, Some(echo.as_bytes()))
        .await
        .expect("send");
    assert_eq!(p, partition);

    assert_eq!(env.wait_final("refused")["status"], "FAILED");
    assert_eq!(env.wait_final("after")["status"], "SUCCESS");
    worker.wait_for_log(
        "refused even the record pointing",
        1,
        Duration::from_secs(60),
    );
    common::wait_until(
        "the partition's offset to be committed past the refused dead letter",
        Duration::from_secs(30),
        || env.committed_offset(partition).is_some_and(|o| o > last),
    );
    let kept = env.sql("SELECT id, uuid, producer_error FROM kser.dead_letters");
    let kept: Vec<&str> = kept.split('|').collect();
    assert_eq!(kept[1], "refused");
    assert!(kept[2].contains("MessageSizeTooLarge"), "{kept:?}");
    let id = kept[0];

    // Listed from Postgres alone: the topic has nothing.
    let listed = env.kser(&["dlq", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["uuid"], "refused");
    assert_eq!(listed[0]["stored"], "postgres");
    assert!(listed[0]["dlq_offset"].is_null());
    let table = text(&env.kser(&["dlq", "list"]).stdout);
    assert!(table.contains(&format!("pg:{id}")), "{table}");

    // Replayed from Postgres: it runs again.
    let out = env.kser(&["dlq", "replay", &format!("pg:{id}")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    common::wait_until("the replay to run", Duration::from_secs(60), || {
        env.status("refused")["attempts"] == 2
    });
    assert_eq!(env.wait_final("refused")["status"], "FAILED");
}

/// A uuid means one task: a malformed record naming a task that runs, or
/// one that is final, changes nothing; it is only dead-lettered, saying so.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_copy_of_a_running_or_final_task_changes_nothing() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let producer = Producer::new(&kafka).expect("producer");

    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Sleep",
            "--uuid",
            "sleeper",
            "--params",
            r#"{"ms": 3000}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    common::wait_until("the task to run", Duration::from_secs(30), || {
        env.status("sleeper")["status"] == "RUNNING"
    });
    // Not a message (no entrypoint), with the running task's uuid.
    let malformed = br#"{"uuid": "sleeper", "params": {"ms": 1}}"#;
    producer
        .send_raw(&env.topic, None, Some(malformed.as_slice()))
        .await
        .expect("send");
    let dlq = format!("{}.dlq", env.topic);
    let mut entries: Vec<DeadLetterEntry> = Vec::new();
    common::wait_until(
        "the malformed copy's dead letter",
        Duration::from_secs(30),
        || {
            entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
            !entries.is_empty()
        },
    );
    let status = env.wait_final("sleeper");
    assert_eq!(status["status"], "SUCCESS", "{status}");
    assert_eq!(status["result"]["retval"]["slept_ms"], 3000, "{status}");
    assert!(status["error"].is_null(), "{status}");

    // Once the task is final, a malformed copy leaves it as it is too.
    producer
        .send_raw(&env.topic, None, Some(malformed.as_slice()))
        .await
        .expect("send");
    common::wait_until("the second dead letter", Duration::from_secs(30), || {
        entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
        entries.len() >= 2
    });
    assert_eq!(entries.len(), 2, "{entries:#?}");
    for entry in &entries {
        assert_eq!(entry.uuid.as_deref(), Some("sleeper"));
        assert_eq!(entry.error_kind.as_deref(), Some("invalid_message"));
        assert_eq!(entry.raw_payload.as_deref(), Some(malformed.as_slice()));
    }
    // The dead-letter topic's partitions give no order between the two.
    let errors: Vec<&str> = entries.iter().filter_map(|e| e.error.as_deref()).collect();
    assert!(
        errors.iter().all(|e| e
            .starts_with("not recorded: uuid sleeper belongs to an existing task (")
            && e.contains("missing field `entrypoint`")),
        "{errors:?}"
    );
    let running = ["existing task (in flight)", "existing task (RUNNING)"];
    assert!(
        errors.iter().any(|e| running.iter().any(|r| e.contains(r))),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("existing task (SUCCESS)")),
        "{errors:?}"
    );
    let status = env.status("sleeper");
    assert_eq!(status["status"], "SUCCESS", "{status}");
    assert_eq!(status["result"]["retval"]["slept_ms"], 3000, "{status}");
    let exit = worker.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{}", worker.log());
}

/// A valid message waiting for its turn (behind an earlier record of its
/// partition, under `--ordering partition`) is as much its task as one
/// running: a malformed copy arriving meanwhile is dead-lettered, and the
/// valid one runs when its turn comes.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_copy_of_a_task_waiting_for_its_turn_changes_nothing() {
    let env = TestEnv::new();
    // One partition: "waiting" is read after "blocker", and waits for it.
    let mut worker = env.start_worker(
        "showcase",
        &["--ordering", "partition", "--partitions", "1"],
    );
    worker.wait_assigned();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let producer = Producer::new(&kafka).expect("producer");
    for (uuid, entrypoint, params) in [
        ("blocker", "showcase.Sleep", r#"{"ms": 4000}"#),
        ("waiting", "showcase.Echo", r#"{"text": "valid"}"#),
    ] {
        let out = env.example_cmd(
            "showcase",
            &["send", entrypoint, "--uuid", uuid, "--params", params],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    common::wait_until("the blocker to run", Duration::from_secs(30), || {
        env.status("blocker")["status"] == "RUNNING"
    });
    // "waiting" waits for its turn. A copy of it that is not a message
    // arrives in a later batch.
    let malformed = br#"{"uuid": "waiting", "entrypoint": "showcase.Echo", "params": [1]}"#;
    producer
        .send_raw(&env.topic, None, Some(malformed.as_slice()))
        .await
        .expect("send");
    let dlq = format!("{}.dlq", env.topic);
    let mut entries: Vec<DeadLetterEntry> = Vec::new();
    common::wait_until(
        "the malformed copy's dead letter",
        Duration::from_secs(30),
        || {
            entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
            !entries.is_empty()
        },
    );
    let error = entries[0].error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("not recorded: uuid waiting belongs to an existing task (in flight)"),
        "{error}"
    );
    assert_eq!(env.wait_final("blocker")["status"], "SUCCESS");
    let waiting = env.wait_final("waiting");
    assert_eq!(waiting["status"], "SUCCESS", "{waiting}");
    assert_eq!(waiting["result"]["stdout"], "valid", "{waiting}");
    let exit = worker.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{}", worker.log());
}

/// `dlq list` and `dlq replay` read the topic a page at a time
/// (`kser::dead_letter::PAGE`); every page is listed and replayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_of_many_pages_is_listed_and_replayed_whole() {
    use rdkafka::message::{Header, OwnedHeaders};

    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let dlq = format!("{}.dlq", env.topic);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .expect("admin");
    for topic in [&env.topic, &dlq] {
        admin
            .create_topics(
                &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topics");
    }
    let count = 2 * kser::dead_letter::PAGE + 37;
    let producer = large_record_producer(&env);
    let sends = (0..count).map(|i| {
        let uuid = format!("dl-{i:04}");
        let payload = format!("payload {i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: kser::dead_letter::HEADER_UUID,
                value: Some(uuid.as_bytes()),
            })
            .insert(Header {
                key: kser::dead_letter::HEADER_TOPIC,
                value: Some(env.topic.as_bytes()),
            });
        let producer = &producer;
        let dlq = &dlq;
        async move {
            let record = FutureRecord::to(dlq)
                .key(&uuid)
                .payload(&payload)
                .headers(headers);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(err, _)| err)
                .expect("send");
        }
    });
    futures::future::join_all(sends).await;
    let expected: std::collections::BTreeSet<String> =
        (0..count).map(|i| format!("dl-{i:04}")).collect();

    let listed = env.kser(&["dlq", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("one JSON array");
    let uuids: std::collections::BTreeSet<String> = listed
        .iter()
        .map(|e| e["uuid"].as_str().expect("uuid").to_owned())
        .collect();
    assert_eq!(listed.len(), count, "each dead letter once");
    assert_eq!(uuids, expected);

    let table = text(&env.kser(&["dlq", "list"]).stdout);
    assert_eq!(table.matches("dl-").count(), count, "{table}");

    let out = env.kser(&["dlq", "replay", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("replayed {count} dead letters")),
        "{}",
        text(&out.stdout)
    );
    let kafka = KafkaConfig::new(env.brokers.clone());
    let replayed = read_all(&kafka, &env.topic).await.expect("read");
    let payloads: std::collections::BTreeSet<String> = replayed
        .iter()
        .map(|e| e.payload.clone().expect("payload"))
        .collect();
    assert_eq!(replayed.len(), count);
    assert_eq!(payloads.len(), count);

    // By name: found on the last page as on the first.
    let last = format!("dl-{:04}", count - 1);
    let out = env.kser(&["dlq", "replay", "dl-0000", &last]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("replayed 2 dead letters"));
}

/// What the console's dead-letter page reads: the newest records of each
/// partition, not the whole topic.
#[tokio::test(flavor = "multi_thread")]
async fn the_newest_dead_letters_are_read_without_the_rest() {
    let env = TestEnv::new();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let dlq = format!("{}.dlq", env.topic);
    let layout = kser::admin::TopicLayout {
        partitions: 1,
        ..Default::default()
    };
    kser::admin::ensure_topics(&kafka, std::slice::from_ref(&dlq), layout)
        .await
        .expect("topic");
    let producer = Producer::new(&kafka).expect("producer");
    for i in 0..5 {
        let record = format!(r#"{{"uuid": "dead-{i}"}}"#);
        producer
            .send_raw(&dlq, None, Some(record.as_bytes()))
            .await
            .expect("send");
    }
    let mut newest = kser::dead_letter::stream_newest(&kafka, &dlq, None, 2);
    let mut offsets = Vec::new();
    while let Some(entry) = newest.next().await.expect("read") {
        offsets.push(entry.dlq_offset);
    }
    assert_eq!(offsets, [3, 4]);
    let all = read_all(&kafka, &dlq).await.expect("read");
    assert_eq!(all.len(), 5);
}
