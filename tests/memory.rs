//! What a worker holds when records are large: 2,000 records of 500 KB (1 GB
//! in all) through one worker, and its peak resident memory (`VmHWM`).
//! A measurement, not a timed test: ignored by default, run with
//!
//! ```text
//! scripts/test --test memory -- --ignored --nocapture
//! ```
//!
//! It fails if the peak passes the worker's stated bound
//! (`--max-buffered-bytes`) plus what the process needs without records.

mod common;

use std::time::Duration;

use common::{TestEnv, text};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: usize = 2_000;
const RECORD_BYTES: usize = 500_000;

/// `VmHWM` (peak resident set) or `VmRSS` of a process, in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .expect("field");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: sends 1 GB through a worker"]
async fn large_records_stay_within_the_buffered_bytes_bound() {
    let bound: u64 = std::env::var("KSER_TEST_MAX_BUFFERED_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    let env = TestEnv::new();
    let bound_arg = bound.to_string();
    let mut worker = env.start_worker(
        "showcase",
        &["--partitions", "6", "--max-buffered-bytes", &bound_arg],
    );
    worker.wait_assigned();
    let idle = memory(worker.pid(), "VmRSS:");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .expect("producer");
    let padding = "x".repeat(RECORD_BYTES - 120);
    for start in (0..RECORDS).step_by(100) {
        let sends = (start..start + 100).map(|i| {
            // Unknown fields are ignored: the task is small, the record is not.
            let payload = format!(
                r#"{{"uuid": "big-{i}", "entrypoint": "showcase.Echo", "params": {{"text": "{i}"}}, "padding": "{padding}"}}"#
            );
            let producer = &producer;
            let topic = &env.topic;
            async move {
                let key = format!("big-{i}");
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&payload),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(err, _)| err)
                    .expect("send");
            }
        });
        futures::future::join_all(sends).await;
    }
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        RECORDS as i64,
        Duration::from_secs(600),
    );
    let peak = memory(worker.pid(), "VmHWM:");
    println!(
        "{RECORDS} records of {RECORD_BYTES} bytes, --max-buffered-bytes {:.0} MiB: idle RSS {:.1} MiB, peak RSS {:.1} MiB",
        mib(bound),
        mib(idle),
        mib(peak)
    );
    assert!(worker.terminate(Duration::from_secs(30)).success());
    assert!(
        peak <= idle + bound + (16 << 20),
        "peak {:.1} MiB passes the bound: idle {:.1} MiB + {:.0} MiB (+16 MiB slack for the allocator and the process's own growth)\n{}",
        mib(peak),
        mib(idle),
        mib(bound),
        text(worker.log().as_bytes())
    );
}
