//! The web console's JSON API and HTTP ingress against a real broker and
//! Postgres: a worker started with `--http` serves them; `kser serve` with
//! a token guards every route but `/healthz`; Python kser's HTTP producer
//! sends through it; `send --wait` and `POST /api/v1/send?wait=` answer with
//! the outcome.

mod common;

use std::time::Duration;

use common::{TestEnv, free_port, text, wait_until};
use serde_json::{Value, json};

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let (code, body) = self.get(path).await;
        (
            code,
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}")),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("POST");
        let code = response.status().as_u16();
        let body = response.text().await.expect("body");
        (
            code,
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}")),
        )
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        // The server answers an oversized body without reading it and then
        // closes the connection: a body that large goes on a connection of
        // its own, or the next request could be sent on the closed one.
        let oversized = body.len() > 1 << 20;
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if oversized {
            request = request.header("connection", "close");
        }
        let response = request.body(body).send().await.expect("POST");
        let code = response.status().as_u16();
        let body = response.text().await.expect("body");
        (
            code,
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}")),
        )
    }

    async fn wait_healthy(&self) {
        for _ in 0..300 {
            if let Ok(response) = self
                .client
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} never answered /healthz", self.base);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_shows_and_steers_tasks_operations_and_workers() {
    let env = TestEnv::new();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut worker = env.start_worker("showcase", &["--http", &address]);
    worker.wait_assigned();
    let api = Api::new(port);
    api.wait_healthy().await;

    // Request/reply: 200 with the result on SUCCESS.
    let (code, status) = api
        .post(
            "/api/v1/send?wait=30s",
            &json!({"entrypoint": "showcase.Echo", "params": {"text": "hi", "retval": {"n": 7}}}),
        )
        .await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["status"], "SUCCESS");
    assert_eq!(status["kind"], "task");
    assert_eq!(status["result"]["retval"]["n"], 7, "{status}");
    let echoed = status["uuid"].as_str().expect("uuid").to_owned();

    // 422 on FAILED, 504 when the wait passes first.
    let (code, status) = api
        .post(
            "/api/v1/send?wait=30s",
            &json!({"entrypoint": "showcase.Fail", "params": {"reason": "no"}}),
        )
        .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["status"], "FAILED");
    let (code, status) = api
        .post(
            "/api/v1/send?wait=200ms",
            &json!({"entrypoint": "showcase.Sleep", "params": {"ms": 3000}}),
        )
        .await;
    assert_eq!(code, 504, "{status}");
    assert!(status["error"].as_str().is_some(), "{status}");

    // A batch, without waiting: uuids in order.
    let (code, sent) = api
        .post(
            "/api/v1/send",
            &json!([{"entrypoint": "showcase.Echo", "params": {"text": "a"}, "uuid": "batch-a"},
                    {"entrypoint": "showcase.Echo", "params": {"text": "b"}, "uuid": "batch-b"}]),
        )
        .await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(sent["uuids"], json!(["batch-a", "batch-b"]));
    env.wait_final("batch-b");

    // Malformed or oversized input: a 4xx with a JSON error, never a 500.
    for (path, body) in [
        ("/api/v1/send", b"{".to_vec()),
        ("/api/v1/send", b"[]".to_vec()),
        ("/api/v1/send", br#"{"entrypoint": ""}"#.to_vec()),
        (
            "/api/v1/send",
            br#"{"entrypoint": "e", "bogus": 1}"#.to_vec(),
        ),
        (
            "/api/v1/send?wait=forever",
            br#"{"entrypoint": "e"}"#.to_vec(),
        ),
        (
            "/api/v1/send?topic=a%20b",
            br#"{"entrypoint": "e"}"#.to_vec(),
        ),
        ("/api/v1/send", vec![b' '; 17 << 20]),
        (
            "/api/v1/workers/pause",
            br#"{"entrypoint": "no.Such"}"#.to_vec(),
        ),
        ("/api/v1/dead-letters/replay", br#"{"ids": []}"#.to_vec()),
    ] {
        let (code, body) = api.post_raw(path, body).await;
        assert!((400..500).contains(&code), "{path}: {code} {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    for path in [
        "/api/v1/tasks?limit=0",
        "/api/v1/tasks?status=DONE",
        "/api/v1/tasks?since=yesterday",
        "/api/v1/nope",
        "/api/v1/tasks/no-such-uuid",
    ] {
        let (code, body) = api.get_json(path).await;
        assert!((400..500).contains(&code), "{path}: {code} {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // Listings and details.
    let (code, tasks) = api
        .get_json("/api/v1/tasks?status=SUCCESS&entrypoint=showcase.Echo&limit=10")
        .await;
    assert_eq!(code, 200);
    let listed: Vec<&str> = tasks
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["uuid"].as_str())
        .collect();
    assert!(
        listed.contains(&echoed.as_str()) && listed.contains(&"batch-a"),
        "{listed:?}"
    );
    let (code, detail) = api.get_json(&format!("/api/v1/tasks/{echoed}")).await;
    assert_eq!(code, 200);
    assert_eq!(detail["params"]["text"], "hi");
    assert!(detail["attempt_history"].is_array());
    assert!(detail["kafka_offset"].is_number(), "{detail}");

    // An operation that fails in its middle step; resumed once its flag
    // exists, it succeeds.
    let flag = env.dir.path().join("pipeline-flag");
    let (code, status) = api
        .post(
            "/api/v1/send?wait=30s",
            &json!({"entrypoint": "showcase.Pipeline", "params": {"flag": flag.to_str()}}),
        )
        .await;
    assert_eq!(code, 422, "{status}");
    let operation = status["uuid"].as_str().expect("uuid").to_owned();
    let (code, detail) = api
        .get_json(&format!("/api/v1/operations/{operation}"))
        .await;
    assert_eq!(code, 200);
    let steps: Vec<&str> = detail["tasks"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|t| t["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(steps[..2], ["SUCCESS", "FAILED"], "{detail}");
    let (code, listed) = api.get_json("/api/v1/operations?status=FAILED").await;
    assert_eq!(code, 200);
    assert_eq!(listed[0]["uuid"], operation.as_str());
    std::fs::write(&flag, "").expect("flag");
    let (code, done) = api
        .post(
            &format!("/api/v1/operations/{operation}/resume"),
            &json!({}),
        )
        .await;
    assert_eq!(code, 200, "{done}");
    let ended = env.wait_final(&operation);
    assert_eq!(ended["status"], "SUCCESS", "{ended}");
    let (code, again) = api
        .post(
            &format!("/api/v1/operations/{operation}/resume"),
            &json!({}),
        )
        .await;
    assert_eq!(code, 409, "a finished operation is not resumed: {again}");

    // Retry a failed task: it runs again and, its flag there, succeeds.
    let flaky_flag = env.dir.path().join("flaky-flag");
    let (code, status) = api
        .post(
            "/api/v1/send?wait=30s",
            &json!({"entrypoint": "showcase.Flaky", "params": {"flag": flaky_flag.to_str()}}),
        )
        .await;
    assert_eq!(code, 422, "{status}");
    let flaky = status["uuid"].as_str().expect("uuid").to_owned();
    std::fs::write(&flaky_flag, "").expect("flag");
    let (code, done) = api
        .post(&format!("/api/v1/tasks/{flaky}/retry"), &json!({}))
        .await;
    assert_eq!(code, 200, "{done}");
    wait_until(
        "the retried task to succeed",
        Duration::from_secs(30),
        || env.status(&flaky)["status"] == "SUCCESS",
    );
    let (code, _) = api
        .post(&format!("/api/v1/tasks/{flaky}/retry"), &json!({}))
        .await;
    assert_eq!(code, 409, "only a FAILED task is retried");

    // The fleet: pause and resume an entrypoint; entrypoints with schemas.
    let (code, fleet) = api.get_json("/api/v1/workers").await;
    assert_eq!(code, 200);
    assert_eq!(
        fleet["workers"].as_array().map(Vec::len),
        Some(1),
        "{fleet}"
    );
    let (code, done) = api
        .post(
            "/api/v1/workers/pause",
            &json!({"entrypoint": "showcase.Echo"}),
        )
        .await;
    assert_eq!(code, 200, "{done}");
    let (_, fleet) = api.get_json("/api/v1/workers").await;
    assert_eq!(
        fleet["controls"][0]["entrypoint"], "showcase.Echo",
        "{fleet}"
    );
    let (code, done) = api.post("/api/v1/workers/resume", &json!({})).await;
    assert_eq!(code, 200, "{done}");
    let (code, drained) = api
        .post("/api/v1/workers/drain", &json!({"worker": "nobody"}))
        .await;
    assert_eq!(code, 400, "{drained}");
    let (code, entrypoints) = api.get_json("/api/v1/entrypoints").await;
    assert_eq!(code, 200);
    let echo = entrypoints
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "showcase.Echo")
        .expect("Echo");
    assert!(
        echo["params_schema"]["properties"]["text"].is_object(),
        "{echo}"
    );
    let (code, dashboard) = api.get_json("/api/v1/dashboard").await;
    assert_eq!(code, 200);
    assert!(
        dashboard["counts"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{dashboard}"
    );

    // The OpenAPI document names every route.
    let (code, doc) = api.get_json("/api/v1/openapi.json").await;
    assert_eq!(code, 200);
    for path in [
        "/api/v1/tasks",
        "/api/v1/tasks/{uuid}/retry",
        "/api/v1/operations/{uuid}/resume",
        "/api/v1/send",
        "/api/v1/dead-letters/replay",
        "/api/v1/workers/drain",
        "/topic/{topic}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }

    // Pages: escaped content, linked uuids, cross-site POSTs refused.
    let (code, status) = api
        .post("/api/v1/send?wait=30s", &json!({"entrypoint": "showcase.Echo", "params": {"text": "<script>alert(1)</script>"}}))
        .await;
    assert_eq!(code, 200, "{status}");
    let (code, page) = api
        .get(&format!(
            "/tasks/{}",
            status["uuid"].as_str().expect("uuid")
        ))
        .await;
    assert_eq!(code, 200);
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "escaped payload"
    );
    assert!(!page.contains("<script>alert(1)"), "no live script");
    let (code, page) = api.get(&format!("/operations/{operation}")).await;
    assert_eq!(code, 200);
    assert_eq!(
        page.matches("class=\"step success\"").count(),
        3,
        "three steps done"
    );
    let (code, page) = api.get("/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<svg") && page.contains("Failures by entrypoint"));
    // Lag per partition, once a heartbeat carried librdkafka's statistics.
    let partition = format!("{}/0", env.topic);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, page) = api.get("/").await;
        if page.contains("Lag per partition") && page.contains(&partition) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lag for {partition} on the dashboard:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for path in [
        "/operations",
        "/tasks?status=FAILED",
        "/workers",
        "/entrypoints",
        "/dead-letters",
    ] {
        let (code, page) = api.get(path).await;
        assert_eq!(code, 200, "{path}: {page}");
    }
    let response = api
        .client
        .post(format!("{}/api/v1/workers/pause", api.base))
        .header("origin", "https://evil.example")
        .json(&json!({}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 403, "cross-site POST refused");
    let (_, fleet) = api.get_json("/api/v1/workers").await;
    assert_eq!(fleet["controls"], json!([]), "nothing paused by it");

    // /metrics still answers beside the console.
    let (code, metrics) = api.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("kser_task_result_total"));
    worker.terminate(Duration::from_secs(30));
}

/// The dashboard's numbers, kept as tasks end (`kser.task_minutes`): each
/// end counts once, in the batch that wrote it; a write fenced out (a
/// redelivery of a final task, a stale attempt) and a retry count nothing;
/// a message rejected before it ran counts as a failure.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_counts_each_end_once() {
    use chrono::Utc;
    use kser::store::{NewTask, Store, TaskStatus};

    let env = TestEnv::new();
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let now = Utc::now();
    let row = |uuid: &str, entrypoint: &str, status: TaskStatus, seconds_ago: i64| {
        let mut row = NewTask::new(uuid.into(), entrypoint.into(), status);
        row.attempts = 1;
        row.worker = Some("worker-a".into());
        row.started_at = Some(now - chrono::Duration::seconds(seconds_ago + 1));
        if status.is_final() {
            row.finished_at = Some(now - chrono::Duration::seconds(seconds_ago));
        }
        row
    };
    let mut batch: Vec<NewTask> = (1..=3)
        .map(|i| row(&format!("dash-ok-{i}"), "dash.Ok", TaskStatus::Success, 0))
        .collect();
    for (uuid, error, ago) in [
        ("dash-bad-1", "first boom", 20),
        ("dash-bad-2", "latest boom", 1),
    ] {
        let mut failed = row(uuid, "dash.Bad", TaskStatus::Failed, ago);
        failed.error = Some(error.into());
        batch.push(failed);
    }
    let mut retry = row("dash-retry", "dash.Ok", TaskStatus::Pending, 0);
    retry.next_attempt_at = Some(now + chrono::Duration::hours(1));
    batch.push(retry);
    assert_eq!(store.complete_tasks(&batch).await.expect("complete"), 6);
    // A redelivery of the same outcomes: fenced out.
    assert_eq!(store.complete_tasks(&batch[..5]).await.expect("again"), 0);
    // A stale attempt: another worker owns attempt 2 now.
    let mut newer = row("dash-late", "dash.Bad", TaskStatus::Running, 0);
    newer.attempts = 2;
    newer.worker = Some("worker-b".into());
    assert_eq!(
        store.mark_running(&[newer]).await.expect("mark"),
        ["dash-late"]
    );
    let mut stale = row("dash-late", "dash.Bad", TaskStatus::Failed, 0);
    stale.error = Some("the stale attempt".into());
    assert_eq!(store.complete_tasks(&[stale]).await.expect("stale"), 0);
    // Rejected before it started (an unknown entrypoint, say): a failure.
    let mut rejected = row("dash-rejected", "dash.Bad", TaskStatus::Failed, 10);
    rejected.attempts = 0;
    rejected.error = Some("rejected".into());
    assert_eq!(store.finish_tasks(&[rejected]).await.expect("finish"), 1);
    let pending = NewTask::new("dash-pending".into(), "dash.Ok".into(), TaskStatus::Pending);
    assert_eq!(
        store
            .record_pending(&[pending])
            .await
            .expect("pending")
            .len(),
        1
    );

    let port = free_port();
    let mut worker = env.start_worker("showcase", &["--http", &format!("127.0.0.1:{port}")]);
    worker.wait_assigned();
    let api = Api::new(port);
    api.wait_healthy().await;
    let (code, dashboard) = api.get_json("/api/v1/dashboard").await;
    assert_eq!(code, 200, "{dashboard}");
    let count = |kind: &str, status: &str| {
        dashboard["counts"]
            .as_array()
            .expect("counts")
            .iter()
            .filter(|c| c["kind"] == kind && c["status"] == status)
            .map(|c| c["count"].as_i64().expect("count"))
            .sum::<i64>()
    };
    let counted: Vec<i64> = ["SUCCESS", "FAILED", "PENDING", "RUNNING", "CANCELLED"]
        .iter()
        .map(|s| count("task", s))
        .collect();
    assert_eq!(counted, [3, 3, 2, 1, 0], "{dashboard}");
    assert_eq!(
        dashboard["failures"],
        json!([{"entrypoint": "dash.Bad", "failed": 3, "last_error": "latest boom"}])
    );
    let ended = |field: &str| {
        dashboard["throughput"]
            .as_array()
            .expect("throughput")
            .iter()
            .map(|m| m[field].as_i64().expect("n"))
            .sum::<i64>()
    };
    assert_eq!((ended("succeeded"), ended("failed")), (3, 3), "{dashboard}");
    let (code, page) = api.get("/").await;
    assert_eq!(code, 200);
    assert!(page.contains("latest boom"), "{page}");
    worker.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_guards_every_route_but_healthz() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let port = free_port();
    let mut serve = common::WorkerProcess::spawn(
        env.command(std::path::Path::new(env!("CARGO_BIN_EXE_kser")))
            .env("KSER_HTTP_TOKEN", "s3cret")
            .args(["serve", "--http", &format!("127.0.0.1:{port}")]),
        env.dir.path().join("serve.log"),
    );
    let api = Api::new(port);
    api.wait_healthy().await;
    let (code, body) = api.get_json("/api/v1/tasks").await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = api.get("/metrics").await;
    assert_ne!(code, 200, "/metrics needs the token too");
    let (code, _) = api.get("/tasks").await;
    assert_eq!(code, 303, "a browser is sent to the login page");
    let bearer = api
        .client
        .get(format!("{}/api/v1/tasks", api.base))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("GET");
    assert_eq!(bearer.status().as_u16(), 200);
    let wrong = api
        .client
        .get(format!("{}/api/v1/tasks", api.base))
        .bearer_auth("s3cre")
        .send()
        .await
        .expect("GET");
    assert_eq!(wrong.status().as_u16(), 401);
    let basic = api
        .client
        .get(format!("{}/api/v1/workers", api.base))
        .basic_auth("kser", Some("s3cret"))
        .send()
        .await
        .expect("GET");
    assert_eq!(basic.status().as_u16(), 200);
    let login = api
        .client
        .post(format!("{}/login", api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=s3cret")
        .send()
        .await
        .expect("POST");
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let page = api
        .client
        .get(format!("{}/tasks", api.base))
        .header("cookie", cookie.split(';').next().expect("pair"))
        .send()
        .await
        .expect("GET");
    assert_eq!(page.status().as_u16(), 200);
    serve.terminate(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn python_kser_http_producer_sends_through_the_console() {
    let env = TestEnv::new();
    let port = free_port();
    let mut worker = env.start_worker_env(
        "showcase",
        &["--http", &format!("127.0.0.1:{port}")],
        &[("KSER_HTTP_TOKEN", "py-token")],
    );
    worker.wait_assigned();
    let api = Api::new(port);
    api.wait_healthy().await;
    let script = r#"
import sys
from kser.http.producer import Producer
from kser.schemas import Message
producer = Producer(dict(bootstrap_servers=sys.argv[1], sasl_plain_username="kser",
                         sasl_plain_password=sys.argv[2]))
one = producer.send(sys.argv[3], Message(uuid="py-http-one", entrypoint="showcase.Echo",
                                         params=dict(text="from python")))
print(one.retcode, one.stdout)
bulk = producer.bulk_send(sys.argv[3], [
    Message(uuid="py-http-bulk-%d" % i, entrypoint="showcase.Echo", params=dict(text=str(i)))
    for i in range(2)])
print(bulk.retcode, bulk.stdout)
"#;
    let python = std::env::var("KSER_TEST_PYTHON")
        .expect("KSER_TEST_PYTHON is not set: run the tests with scripts/test");
    let out = std::process::Command::new(python)
        .args(["-c", script, &api.base, "py-token", &env.topic])
        .output()
        .expect("python");
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{printed}{}", text(&out.stderr));
    let lines: Vec<&str> = printed.lines().collect();
    assert!(lines[0].starts_with("0 "), "{printed}");
    assert!(lines[1].starts_with("0 2 message(s) sent"), "{printed}");
    for uuid in ["py-http-one", "py-http-bulk-0", "py-http-bulk-1"] {
        assert_eq!(env.wait_final(uuid)["status"], "SUCCESS", "{uuid}");
    }
    assert_eq!(env.status("py-http-one")["result"]["stdout"], "from python");
    // A wrong password is refused, in JSON (its client would retry a
    // refusal for five minutes, so this asks directly).
    let refused = api
        .client
        .post(format!("{}/topic/{}?format=raw", api.base, env.topic))
        .basic_auth("kser", Some("wrong"))
        .json(&json!({"uuid": "py-http-refused", "entrypoint": "showcase.Echo", "params": {}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status().as_u16(), 401);
    let body: Value = refused.json().await.expect("a JSON body");
    assert!(body["error"].is_string(), "{body}");
    worker.terminate(Duration::from_secs(30));
}

#[test]
fn send_wait_exits_0_on_success_1_on_failure_2_on_timeout() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Echo",
            "--params",
            r#"{"text": "waited", "retval": {"n": 42}}"#,
            "--wait",
            "--timeout",
            "30s",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["status"], "SUCCESS");
    assert_eq!(status["result"]["retval"]["n"], 42);
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Fail",
            "--params",
            r#"{"reason": "nope"}"#,
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("FAILED"),
        "{}",
        text(&out.stdout)
    );
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Sleep",
            "--params",
            r#"{"ms": 3000}"#,
            "--wait",
            "--timeout",
            "300ms",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("did not end within"),
        "{}",
        text(&out.stderr)
    );
    worker.terminate(Duration::from_secs(30));
}
