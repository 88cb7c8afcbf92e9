//! `worker --http`: Prometheus metrics, liveness and readiness, read over
//! HTTP from a running worker against the real broker and Postgres.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::TestEnv;

#[test]
fn a_worker_serves_metrics_liveness_and_readiness() {
    let env = TestEnv::new();
    let port = common::free_port();
    let address = format!("127.0.0.1:{port}");
    let mut worker = env.start_worker("showcase", &["--http", &address]);
    common::wait_until("the worker to answer", Duration::from_secs(60), || {
        common::http_get(port, "/healthz").is_some()
    });
    assert_eq!(common::http_get(port, "/healthz").map(|r| r.0), Some(200));
    worker.wait_assigned();
    common::wait_until("the worker to be ready", Duration::from_secs(30), || {
        common::http_get(port, "/readyz").is_some_and(|(status, _)| status == 200)
    });

    let ok = env.send("showcase", "showcase.Echo", r#"{"text": "hi"}"#);
    let failed = env.send("showcase", "showcase.Fail", r#"{"reason": "no"}"#);
    assert_eq!(env.wait_final(&ok)["status"], "SUCCESS");
    assert_eq!(env.wait_final(&failed)["status"], "FAILED");

    let (status, metrics) = common::http_get(port, "/metrics").expect("metrics");
    assert_eq!(status, 200, "{metrics}");
    // Python kser's counter, its name and labels unchanged.
    let counted = |name: &str, status: &str| {
        metrics.lines().any(|line| {
            line.starts_with("kser_task_result_total{")
                && line.contains("hostname=\"")
                && line.contains(&format!("name=\"{name}\""))
                && line.contains(&format!("status=\"{status}\""))
                && line.ends_with(" 1")
        })
    };
    assert!(counted("showcase.Echo", "SUCCESS"), "{metrics}");
    assert!(counted("showcase.Fail", "FAILED"), "{metrics}");
    for histogram in [
        "kser_task_queued_seconds_bucket{entrypoint=\"showcase.Echo\"",
        "kser_task_run_seconds_count{entrypoint=\"showcase.Echo\"",
        "kser_task_end_to_end_seconds_sum{entrypoint=\"showcase.Fail\"",
        "kser_postgres_write_seconds_count{what=\"record finished tasks\"",
    ] {
        assert!(
            common::sample(&metrics, histogram).is_some(),
            "{histogram}: {metrics}"
        );
    }
    assert_eq!(
        common::sample(&metrics, "kser_dead_letters_total{kind=\"fatal\""),
        Some(1.0),
        "{metrics}"
    );
    // Gauges refreshed in the background: lag from librdkafka's statistics
    // (every 5 s), the outbox and in-flight tasks from the worker.
    common::wait_until("the lag and outbox gauges", Duration::from_secs(30), || {
        common::http_get(port, "/metrics").is_some_and(|(_, metrics)| {
            metrics.lines().any(|line| {
                line.starts_with("kser_consumer_lag{")
                    && line.contains(&format!("topic=\"{}\"", env.topic))
                    && line.ends_with(" 0")
            }) && common::sample(&metrics, "kser_outbox_backlog").is_some()
                && common::sample(&metrics, "kser_tasks_in_flight").is_some()
        })
    });

    // Postgres away: not ready, and says why; alive all along.
    let outage = std::thread::scope(|scope| {
        let outage = scope.spawn(|| env.database_outage(Duration::from_secs(6)));
        // Not ready as soon as the worker sees Postgres gone, within the outage.
        let mut ready = (0, String::new());
        common::wait_until(
            "readyz to report the outage",
            Duration::from_secs(5),
            || {
                ready = common::http_get(port, "/readyz").expect("readyz");
                ready.0 != 200
            },
        );
        let alive = common::http_get(port, "/healthz").expect("healthz");
        outage.join().expect("outage");
        (ready, alive)
    });
    let ((ready, reason), (alive, _)) = outage;
    assert_eq!(ready, 503, "{reason}");
    assert!(reason.contains("Postgres"), "{reason}");
    assert_eq!(alive, 200);
    common::wait_until("ready again", Duration::from_secs(30), || {
        common::http_get(port, "/readyz").is_some_and(|(status, _)| status == 200)
    });

    assert!(worker.terminate(Duration::from_secs(30)).success());
    assert!(
        common::http_get(port, "/healthz").is_none(),
        "the server stopped with the worker"
    );
}

#[test]
fn a_port_in_use_stops_the_worker_before_it_joins() {
    let env = TestEnv::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let out = env.example_cmd("showcase", &["worker", "--http", &address]);
    let stderr = common::text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot serve HTTP on"), "{stderr}");
    assert!(!stderr.contains("worker started"), "{stderr}");
}
