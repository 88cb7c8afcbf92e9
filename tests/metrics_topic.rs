//! Metric records: `worker --metrics-topic T` publishes one JSON record per
//! finished task, with the fields Postgres has for it, and counts what it
//! sent and dropped in `/metrics`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestEnv;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// The body of `/metrics`.
fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

#[test]
fn metric_records_reach_the_metrics_topic_one_per_finished_task() {
    let env = TestEnv::new();
    let metrics_topic = format!("{}.metrics", env.topic);
    let port = common::free_port();
    let http = format!("127.0.0.1:{port}");
    let mut worker = env.start_worker(
        "showcase",
        &["--metrics-topic", &metrics_topic, "--http", &http],
    );
    worker.wait_assigned();
    let mut batch = String::new();
    for i in 0..20 {
        batch.push_str(&format!(
            "{{\"entrypoint\": \"showcase.Echo\", \"uuid\": \"echo-{i}\", \"params\": {{\"text\": \"{i}\"}}}}\n"
        ));
    }
    batch.push_str(&format!(
        "{{\"entrypoint\": \"showcase.Fail\", \"uuid\": \"fail-0\", \"params\": {{}}, \"metadata\": {{\"traceparent\": \"00-{TRACE_ID}-{PARENT_ID}-01\"}}}}\n"
    ));
    env.send_batch(&batch);
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status IN ('SUCCESS', 'FAILED')",
        21,
        Duration::from_secs(60),
    );
    let records = common::read_topic(&env, &metrics_topic, 21, |_| true);
    assert_eq!(records.len(), 21, "one record per task: {records:?}");
    let mut uuids = HashSet::new();
    for record in &records {
        let uuid = record["uuid"].as_str().expect("uuid");
        uuids.insert(uuid.to_owned());
        let row = env.status(uuid);
        assert_eq!(record["status"], row["status"], "{record}");
        assert_eq!(record["entrypoint"], row["entrypoint"]);
        assert_eq!(record["worker"], row["worker"]);
        assert_eq!(record["attempt"], 1);
        for field in ["queued_ms", "run_ms", "end_to_end_ms"] {
            let ms = record[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field}: {record}"));
            assert!(ms >= 0.0, "{record}");
        }
        assert!(
            record["end_to_end_ms"].as_f64() >= record["run_ms"].as_f64(),
            "{record}"
        );
        if uuid == "fail-0" {
            assert_eq!(record["status"], "FAILED");
            assert_eq!(record["trace_id"], TRACE_ID);
        } else {
            assert_eq!(record["status"], "SUCCESS");
            assert!(record.get("trace_id").is_none(), "{record}");
        }
    }
    assert_eq!(uuids.len(), 21);
    let body = scrape(port);
    assert!(
        body.contains("kser_metric_records_dropped_total 0"),
        "{body}"
    );
    assert!(body.contains("kser_metric_records_sent_total 21"), "{body}");
    assert_eq!(worker.terminate(Duration::from_secs(60)).code(), Some(0));
}
