//! OpenTelemetry export (`--features otel`): a worker with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` sends the spans of traced tasks over
//! OTLP/HTTP, with the ids kser stamped into the messages it sent, to a
//! collector stood in for by a small HTTP server that keeps what it gets.
#![cfg(feature = "otel")]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestEnv;
use kser::trace::TraceParent;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// The request paths and bodies an OTLP/HTTP endpoint received.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Answers every POST with 200 and keeps its path and body.
fn collector() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let received: Received = Arc::default();
    let keep = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let path = request
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let mut length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            keep.lock().expect("lock").push((path, body));
            let _ = reader.get_mut().write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
            );
        }
    });
    (port, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn bytes_of_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn traced_tasks_are_exported_as_spans_with_kser_s_ids() {
    let env = TestEnv::new();
    let (port, received) = collector();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut worker = env.start_worker_env(
        "showcase",
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Export within a fraction of a second, not the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    worker.wait_assigned();
    let flag = env.dir.path().join("flag");
    std::fs::write(&flag, "up").expect("flag");
    let metadata =
        serde_json::json!({ "traceparent": format!("00-{TRACE_ID}-b7ad6b7169203331-01") });
    let op = env.send_pipeline(&flag, &metadata);
    assert_eq!(env.wait_final(&op)["status"], "SUCCESS");
    let steps = env.step_uuids(&op);
    assert_eq!(steps.len(), 3);
    // Steps 2 and 3 were sent by the spans of steps 1 and 2: those spans'
    // ids are the parents their messages carry.
    let messages = common::read_topic(&env, &env.topic, 3, |record| {
        record["metadata"]["kser_operation"] == op.as_str()
    });
    let sender_spans: Vec<[u8; 8]> = messages
        .iter()
        .filter(|m| m["uuid"] != steps[0].as_str())
        .map(|m| {
            TraceParent::parse(m["metadata"]["traceparent"].as_str().expect("traceparent"))
                .expect("valid")
                .parent_id
        })
        .collect();
    assert_eq!(sender_spans.len(), 2);

    let trace_id = bytes_of_hex(TRACE_ID);
    common::wait_until(
        "the spans at the collector",
        Duration::from_secs(30),
        || {
            let received = received.lock().expect("lock");
            let bodies: Vec<&[u8]> = received
                .iter()
                .filter(|(path, _)| path == "/v1/traces")
                .map(|(_, body)| body.as_slice())
                .collect();
            let anywhere = |needle: &[u8]| bodies.iter().any(|body| contains(body, needle));
            anywhere(&trace_id)
                && steps.iter().all(|uuid| anywhere(uuid.as_bytes()))
                && sender_spans.iter().all(|span| anywhere(span))
        },
    );
    worker.terminate(Duration::from_secs(20));
}
