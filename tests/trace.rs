//! Logs and traces: a W3C `traceparent` sent with an operation reaches every
//! message kser sends for it (its steps, a retry) and the JSON log lines of
//! every step, as one trace; a malformed one is ignored; `--log-format json`
//! writes one JSON object per line.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{TestEnv, text};
use kser::trace::TraceParent;
use kser::{KafkaConfig, Producer};
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// The worker's log lines, each parsed as JSON (a line that is not JSON
/// fails the test).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect()
}

/// The fields of the `task` span a log line happened in, if any: its
/// current span, or one of the spans it is nested in.
fn task_span(line: &Value) -> Option<&Value> {
    std::iter::once(&line["span"])
        .chain(line["spans"].as_array().into_iter().flatten())
        .find(|span| span["name"] == "task")
}

fn traceparent(message: &Value) -> TraceParent {
    let value = message["metadata"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent in {message}"));
    TraceParent::parse(value).expect("kser sends valid traceparents")
}

fn hex(bytes: &[u8]) -> String {
    kser::trace::Hex(bytes).to_string()
}

#[test]
fn a_traceparent_flows_through_a_three_step_operation_and_its_retry() {
    let env = TestEnv::new();
    // Retries through the outbox, so the retry is a message of its own.
    let mut worker = env.start_worker_env(
        "showcase",
        &[
            "--log-format",
            "json",
            "--ordering",
            "none",
            "--max-attempts",
            "10",
            "--retry-backoff",
            "300ms",
        ],
        &[("RUST_LOG", "info,kser=debug,librdkafka=warn,rdkafka=warn")],
    );
    worker.wait_assigned();
    let flag = env.dir.path().join("flag");
    let sent_parent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let metadata = serde_json::json!({ "traceparent": sent_parent, "tracestate": "k=v" });
    let op = env.send_pipeline(&flag, &metadata);
    // The second step fails until the flag is up: one retry at least.
    worker.wait_for_log("will retry", 1, Duration::from_secs(60));
    std::fs::write(&flag, "up").expect("flag");
    assert_eq!(env.wait_final(&op)["status"], "SUCCESS");

    let steps = env.step_uuids(&op);
    assert_eq!(steps.len(), 3);
    // Every message kser sent for the operation: three steps and a retry.
    let messages = common::read_topic(&env, &env.topic, 4, |record| {
        record["metadata"]["kser_operation"] == op.as_str()
    });
    let mut parents = HashSet::new();
    for message in &messages {
        let sent = traceparent(message);
        assert_eq!(hex(&sent.trace_id), TRACE_ID, "{message}");
        assert_ne!(hex(&sent.parent_id), PARENT_ID, "a new parent: {message}");
        assert_eq!(sent.flags, 1);
        assert_eq!(message["metadata"]["tracestate"], "k=v", "passed on");
        parents.insert(sent.parent_id);
    }
    assert_eq!(parents.len(), messages.len(), "each sent by another span");

    // Each step's log lines carry the trace; each step's span is the parent
    // of the message sent after it.
    let log = worker.log();
    let lines = json_lines(&log);
    let mut spans: HashMap<String, HashSet<String>> = HashMap::new();
    for line in &lines {
        let Some(span) = task_span(line) else {
            continue;
        };
        let uuid = span["task.uuid"].as_str().unwrap_or_default();
        if steps.iter().any(|step| step == uuid) {
            assert_eq!(span["trace_id"], TRACE_ID, "{line}");
            let span_id = span["span_id"].as_str().expect("span_id");
            spans
                .entry(uuid.to_owned())
                .or_default()
                .insert(span_id.to_owned());
        }
    }
    for step in &steps {
        assert!(
            spans.contains_key(step),
            "no log line of step {step} in:\n{log}"
        );
    }
    for (before, after) in steps.iter().zip(&steps[1..]) {
        let message = messages
            .iter()
            .find(|m| m["uuid"] == after.as_str() && m["result"].is_object())
            .unwrap_or_else(|| panic!("no message of step {after}"));
        let parent = hex(&traceparent(message).parent_id);
        assert!(
            spans[before].contains(&parent),
            "step {after}'s message names {parent}, not a span of step {before}: {:?}",
            spans[before]
        );
    }
    // The retry of step 2 is sent by its failed attempt.
    let attempts: Vec<&Value> = messages
        .iter()
        .filter(|m| m["uuid"] == steps[1].as_str())
        .collect();
    assert!(attempts.len() >= 2, "step 2 and its retry: {attempts:?}");
    for message in attempts {
        assert!(
            spans[&steps[1]].contains(&hex(&traceparent(message).parent_id)) || {
                // The first message of step 2 is sent by step 1.
                spans[&steps[0]].contains(&hex(&traceparent(message).parent_id))
            }
        );
    }
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
    for line in json_lines(&worker.log()) {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_header_is_continued_and_a_malformed_one_ignored() {
    let env = TestEnv::new();
    let mut worker = env.start_worker_env(
        "showcase",
        &["--log-format", "json"],
        &[("RUST_LOG", "info,kser=debug,librdkafka=warn,rdkafka=warn")],
    );
    worker.wait_assigned();
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    // Only in a Kafka header, as OpenTelemetry's Kafka instrumentations put it.
    let chain =
        r#"{"uuid": "chain-header", "entrypoint": "showcase.Chain", "params": {"count": 3}}"#;
    producer
        .send_with_headers(
            &env.topic,
            Some(b"chain-header".as_slice()),
            Some(chain.as_bytes()),
            &[("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-00"))],
        )
        .await
        .expect("send");
    // Malformed: an operation starts a trace of its own, a task runs untraced.
    let bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let chain_bad = serde_json::json!({
        "uuid": "chain-bad", "entrypoint": "showcase.Chain", "params": {"count": 3},
        "metadata": {"traceparent": bad},
    });
    let echo_bad = serde_json::json!({
        "uuid": "echo-bad", "entrypoint": "showcase.Echo", "params": {"text": "hi"},
        "metadata": {"traceparent": "garbage\u{1b}[2J"},
    });
    for message in [&chain_bad, &echo_bad] {
        producer
            .send_raw(&env.topic, None, Some(message.to_string().as_bytes()))
            .await
            .expect("send");
    }
    for uuid in ["chain-header", "chain-bad", "echo-bad"] {
        assert_eq!(env.wait_final(uuid)["status"], "SUCCESS", "{uuid}");
    }

    let header_steps = common::read_topic(&env, &env.topic, 3, |r| {
        r["metadata"]["kser_operation"] == "chain-header"
    });
    for message in &header_steps {
        let sent = traceparent(message);
        assert_eq!(hex(&sent.trace_id), TRACE_ID, "{message}");
        assert_eq!(sent.flags, 0, "flags passed on as they came");
    }
    let bad_steps = common::read_topic(&env, &env.topic, 3, |r| {
        r["metadata"]["kser_operation"] == "chain-bad"
    });
    let trace_ids: HashSet<[u8; 16]> = bad_steps.iter().map(|m| traceparent(m).trace_id).collect();
    assert_eq!(trace_ids.len(), 1, "one new trace for the operation");
    assert!(!trace_ids.contains(&[0; 16]));

    let lines = json_lines(&worker.log());
    let echo_lines: Vec<&Value> = lines
        .iter()
        .filter(|line| task_span(line).is_some_and(|span| span["task.uuid"] == "echo-bad"))
        .collect();
    assert!(!echo_lines.is_empty(), "the task logged in its span");
    for line in echo_lines {
        let span = task_span(line).expect("span");
        assert!(span.get("trace_id").is_none(), "no trace: {line}");
    }
    let ignored = lines
        .iter()
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ignoring metadata.traceparent"))
        })
        .count();
    assert!(ignored >= 2, "each malformed traceparent said at debug");
    let log = worker.log();
    assert!(!log.contains('\u{1b}'), "control characters stay escaped");
}

#[test]
fn a_dead_letter_carries_the_failed_tasks_trace_in_a_header() {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::{Headers as _, Message as _};

    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let metadata = serde_json::json!({ "traceparent": format!("00-{TRACE_ID}-{PARENT_ID}-01") });
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Fail",
            "--uuid",
            "traced-failure",
            "--metadata",
            &metadata.to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(env.wait_final("traced-failure")["status"], "FAILED");

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("{}-dlq-reader", env.group))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[&format!("{}.dlq", env.topic)])
        .expect("subscribe");
    let mut sent = None;
    common::wait_until("the dead letter", Duration::from_secs(60), || {
        while let Some(record) = consumer.poll(Duration::from_millis(300)) {
            let record = record.expect("record");
            let headers = record.headers().expect("dead letters have headers");
            let value = headers
                .iter()
                .find(|header| header.key == "traceparent")
                .and_then(|header| header.value)
                .expect("a traceparent header");
            sent = Some(TraceParent::parse(&text(value)).expect("valid"));
        }
        sent.is_some()
    });
    let sent = sent.expect("read");
    assert_eq!(hex(&sent.trace_id), TRACE_ID);
    assert_ne!(hex(&sent.parent_id), PARENT_ID, "the failed task's span");
}
