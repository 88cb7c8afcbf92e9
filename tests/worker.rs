//! The worker and the CLI end to end: messages sent as a user sends them,
//! run by a worker process, their state read back with `status` and `list`.

mod common;

use std::time::Duration;

use common::{TestEnv, text};
use kser::{KafkaConfig, Producer};
use serde_json::{Value, json};

#[test]
fn send_runs_the_task_and_status_shows_success() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("dice", &[]);
    worker.wait_assigned();

    let uuid = env.send("dice", "dice.DiceRoll", r#"{"sides": 6}"#);
    assert!(
        uuid::Uuid::parse_str(&uuid).is_ok(),
        "send prints the uuid: {uuid}"
    );
    let status = env.wait_final(&uuid);
    assert_eq!(status["status"], "SUCCESS", "{status:#}");
    assert_eq!(status["entrypoint"], "dice.DiceRoll");
    assert_eq!(status["params"], json!({"sides": 6}));
    assert_eq!(status["attempts"], 1);
    let roll = status["result"]["retval"]["roll"].as_u64().expect("a roll");
    assert!((1..=6).contains(&roll), "{roll}");
    assert_eq!(status["result"]["stdout"], format!("You made a {roll}"));
    assert_eq!(status["result"]["retcode"], 0);

    // Parameters are optional for the dice: `{}` is valid.
    let plain = env.kser(&["send", "dice.DiceRoll"]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let uuid = text(&plain.stdout).trim().to_owned();
    assert_eq!(env.wait_final(&uuid)["status"], "SUCCESS");

    let human = env.kser(&["status", &uuid]);
    let human = text(&human.stdout);
    assert!(human.contains("SUCCESS"), "{human}");
    assert!(human.contains("You made a"), "{human}");
    assert!(human.contains("queued"), "{human}");
}

#[test]
fn failing_tasks_are_recorded_with_their_error() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    let fail = env.send(
        "showcase",
        "showcase.Fail",
        r#"{"reason": "out of cheese", "retcode": 422}"#,
    );
    let hooked = env.send("showcase", "showcase.Hooked", "{}");
    let panicked = env.send("showcase", "showcase.Panic", "{}");
    let echo = env.send("showcase", "showcase.Echo", r#"{"text": "still alive"}"#);

    let status = env.wait_final(&fail);
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["error"], "out of cheese");
    assert_eq!(status["result"]["retcode"], 422);
    assert_eq!(status["result"]["retval"]["error"]["kind"], "fatal");
    assert_eq!(
        status["result"]["retval"]["error"]["extra"]["hint"],
        "this task always fails"
    );

    let status = env.wait_final(&hooked);
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["result"]["retcode"], 403);
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("before_run refused")
    );

    let status = env.wait_final(&panicked);
    assert_eq!(status["status"], "FAILED");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("panicked on purpose"),
        "{status:#}"
    );

    let status = env.wait_final(&echo);
    assert_eq!(status["status"], "SUCCESS", "the worker survives a panic");
    assert_eq!(status["result"]["stdout"], "still alive");

    let listed = env.kser(&["list", "--status", "failed", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_never_stops_the_worker() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &["--task-timeout", "1s"]);
    worker.wait_assigned();

    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    // One key: every record lands on the same partition, in this order, so
    // the last message runs only if the worker got past all the others.
    let key = Some(b"one-partition".as_slice());
    let huge = vec![b'x'; 800 * 1024];
    let no_uuid: [&[u8]; 6] = [
        b"\xff\xfe not utf-8",
        b"{\"uuid\": \"truncated",
        b"[1, 2, 3]",
        br#"{"entrypoint": "showcase.Echo", "params": {"text": "no uuid"}}"#,
        b"",
        &huge,
    ];
    for payload in no_uuid {
        producer
            .send_raw(&env.topic, key, Some(payload))
            .await
            .expect("send");
    }
    let with_uuid = [
        ("bad-shape", r#"{"uuid": "bad-shape", "entrypoint": 42}"#),
        ("no-entrypoint", r#"{"uuid": "no-entrypoint"}"#),
        (
            "unknown",
            r#"{"uuid": "unknown", "entrypoint": "nope.Nope"}"#,
        ),
        (
            "wrong-type",
            r#"{"uuid": "wrong-type", "entrypoint": "showcase.Sleep", "params": {"ms": "soon"}}"#,
        ),
        (
            "missing",
            r#"{"uuid": "missing", "entrypoint": "showcase.Echo", "params": {}}"#,
        ),
        (
            "params-not-object",
            r#"{"uuid": "params-not-object", "entrypoint": "showcase.Echo", "params": [1]}"#,
        ),
        (
            "panics",
            r#"{"uuid": "panics", "entrypoint": "showcase.Panic", "params": {}}"#,
        ),
        (
            "hangs",
            r#"{"uuid": "hangs", "entrypoint": "showcase.Sleep", "params": {"ms": 600000}}"#,
        ),
        (
            "last",
            r#"{"uuid": "last", "entrypoint": "showcase.Echo", "params": {"text": "made it"}}"#,
        ),
    ];
    for (_, payload) in &with_uuid {
        producer
            .send_raw(&env.topic, key, Some(payload.as_bytes()))
            .await
            .expect("send");
    }

    let last = env.wait_final("last");
    assert_eq!(last["status"], "SUCCESS");
    assert_eq!(last["result"]["stdout"], "made it");

    let error = |uuid: &str| {
        let status = env.status(uuid);
        assert_eq!(status["status"], "FAILED", "{uuid}: {status:#}");
        status["error"].as_str().unwrap_or_default().to_owned()
    };
    assert!(error("bad-shape").contains("entrypoint"));
    assert!(error("no-entrypoint").contains("entrypoint"));
    let unknown = error("unknown");
    assert!(
        unknown.contains("unknown entrypoint 'nope.Nope'"),
        "{unknown}"
    );
    assert!(
        unknown.contains("showcase.Echo"),
        "lists the registered names: {unknown}"
    );
    let wrong = error("wrong-type");
    assert!(
        wrong.contains("ms: invalid type"),
        "names the field: {wrong}"
    );
    let missing = error("missing");
    assert!(missing.contains("missing field `text`"), "{missing}");
    assert!(error("params-not-object").contains("params"));
    assert!(error("panics").contains("panicked on purpose"));
    assert!(
        env.wait_final("hangs")["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out after 1.000s")
    );

    // Records without a uuid are logged with where they came from.
    worker.wait_for_log("rejected a record", no_uuid.len(), Duration::from_secs(10));
    let log = worker.log();
    assert!(log.contains("not valid UTF-8"), "{log}");
    assert!(log.contains("not valid JSON"), "{log}");
    assert!(log.contains("offset="), "{log}");
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks"),
        with_uuid.len().to_string(),
        "one row per message with a uuid"
    );
    // ... and counted: the worker reports them when it stops.
    assert!(worker.terminate(Duration::from_secs(30)).success());
    let log = worker.log();
    assert!(log.contains("rejected: 6"), "{log}");
}

#[test]
fn send_batch_publishes_every_line_and_counts_them() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();

    let mut input: String = (0..50)
        .map(|i| {
            format!("{{\"entrypoint\": \"showcase.Echo\", \"params\": {{\"text\": \"n{i}\"}}}}\n")
        })
        .collect();
    input.push_str("{\"uuid\": \"my-own\", \"entrypoint\": \"showcase.Echo\", \"params\": {\"text\": \"mine\"}}\n");
    input.push_str("this is not json\n");
    let out = env.run(
        std::path::Path::new(env!("CARGO_BIN_EXE_kser")),
        &["send", "--batch", "-"],
        Some(&input),
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "an invalid line fails the command");
    assert!(stderr.contains("line 52"), "{stderr}");
    assert!(stderr.contains("sent 51 messages"), "{stderr}");
    assert_eq!(
        text(&out.stdout).lines().count(),
        51,
        "one uuid per message"
    );

    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        51,
        Duration::from_secs(60),
    );
    assert_eq!(env.status("my-own")["result"]["stdout"], "mine");

    let listed = env.kser(&[
        "list",
        "--entrypoint",
        "showcase.Echo",
        "--limit",
        "100",
        "--json",
    ]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(51));
    let table = text(&env.kser(&["list", "--limit", "5"]).stdout);
    assert_eq!(table.matches("showcase.Echo").count(), 5, "{table}");
}

#[test]
fn entrypoints_show_names_and_parameters() {
    let env = TestEnv::new();
    let out = env.example_cmd("showcase", &["entrypoints"]);
    let table = text(&out.stdout);
    assert!(table.contains("showcase.Echo"), "{table}");
    assert!(table.contains("text: string (required)"), "{table}");
    assert!(table.contains("ms: integer (required)"), "{table}");

    let out = env.example_cmd("dice", &["entrypoints", "--json"]);
    let entries: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let entry = |name: &str| {
        entries
            .as_array()
            .and_then(|all| all.iter().find(|e| e["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {entries:#}"))
    };
    assert_eq!(entry("dice.DiceRoll")["kind"], "task");
    assert_eq!(entry("dice.DiceLaunch")["kind"], "operation");
    assert_eq!(
        entry("dice.DiceRoll")["params_schema"]["properties"]["sides"]["default"],
        6
    );

    let out = env.kser(&["entrypoints"]);
    assert!(text(&out.stdout).contains("no entrypoints"));
}

#[test]
fn startup_problems_get_clear_errors() {
    let env = TestEnv::new();

    let mut command = env.command(&common::example_path("dice"));
    let out = command
        .args(["worker"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("could not connect to Postgres at postgres://postgres@127.0.0.1:1/nowhere"),
        "{stderr}"
    );

    let mut command = env.command(&common::example_path("dice"));
    let out = command
        .args(["worker"])
        .env("KSER_BROKERS", "127.0.0.1:1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("could not reach Kafka at 127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );

    let out = env.kser(&["worker"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no tasks are registered"));

    env.kser(&["migrate"]);
    let out = env.kser(&["status", "does-not-exist"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no task or operation with uuid does-not-exist"),
        "{}",
        text(&out.stderr)
    );

    let out = env.kser(&["send", "dice.DiceRoll", "--params", "[1]"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("expected a JSON object"),
        "{}",
        text(&out.stderr)
    );

    let out = env.kser(&["send", "dice.DiceRoll", "-X", "sasl.password"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("expected key=value"));
}

#[test]
fn a_panic_in_kser_s_own_code_ends_the_task_failed_and_the_worker_goes_on() {
    // A debug-built worker panics in its own code (not in the task's)
    // right after each showcase.Sized ran. Under partition ordering the
    // records behind it wait for it: a task left RUNNING would hold them,
    // and its offset, for good.
    let env = TestEnv::new();
    let mut worker = env.start_worker_env(
        "showcase",
        &["--ordering", "partition", "--partitions", "1"],
        &[("KSER_FAULT_PANIC_AFTER_RUN", "showcase.Sized")],
    );
    worker.wait_assigned();
    let broken = env.send("showcase", "showcase.Sized", r#"{"bytes": 10}"#);
    let behind: Vec<String> = (0..3)
        .map(|n| {
            env.send(
                "showcase",
                "showcase.Echo",
                &format!(r#"{{"text": "after {n}"}}"#),
            )
        })
        .collect();
    let failed = env.wait_final(&broken);
    assert_eq!(failed["status"], "FAILED", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("kser panicked"), "{failed}");
    assert!(error.contains("KSER_FAULT_PANIC_AFTER_RUN"), "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert_eq!(failed["params"], json!({"bytes": 10}), "{failed}");
    for uuid in &behind {
        assert_eq!(env.wait_final(uuid)["status"], "SUCCESS", "{uuid}");
    }
    // Its offset moved on with the others'.
    let last = env.wait_final(behind.last().expect("three sent"))["kafka_offset"]
        .as_i64()
        .expect("an offset");
    common::wait_until(
        "the offsets to be committed",
        Duration::from_secs(30),
        || env.committed_offset(0).is_some_and(|offset| offset > last),
    );
    assert!(worker.exited().is_none(), "the worker lives");
    assert!(
        worker
            .log()
            .contains("kser panicked while running the task")
    );
    worker.terminate(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_pattern_takes_matching_topics_old_and_new_but_no_dead_letter_topic() {
    let env = TestEnv::new();
    let kafka = KafkaConfig::new(env.brokers.clone());
    let (a, b) = (format!("{}.a", env.topic), format!("{}.b", env.topic));
    let dead = format!("{a}.dlq");
    kser::admin::ensure_topics(&kafka, &[a.clone(), dead.clone()], Default::default())
        .await
        .expect("topics");
    let pattern = format!(r"{}\..*", regex::escape(&env.topic));
    let log = env.dir.path().join("pattern-worker.log");
    let mut command = env.command(&common::example_path("showcase"));
    command
        .env_remove("KSER_TOPIC")
        .args([
            "worker",
            "--topic-pattern",
            &pattern,
            "--topic-refresh",
            "1s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut worker = common::WorkerProcess::spawn(&mut command, log);
    worker.wait_for_log(
        "subscribed to the topics the pattern matches",
        1,
        Duration::from_secs(60),
    );

    let producer = Producer::new(&kafka).expect("producer");
    let echo = |uuid: &str| {
        format!(r#"{{"uuid":"{uuid}","entrypoint":"showcase.Echo","params":{{"text":"{uuid}"}}}}"#)
    };
    // A message in a dead-letter topic is never run, whatever the pattern.
    producer
        .send_raw(&dead, None, Some(echo("in-dlq").as_bytes()))
        .await
        .expect("send");
    producer
        .send_raw(&a, None, Some(echo("in-a").as_bytes()))
        .await
        .expect("send");
    assert_eq!(env.wait_final("in-a")["status"], "SUCCESS");

    // A topic created while the worker runs is picked up.
    kser::admin::ensure_topics(&kafka, std::slice::from_ref(&b), Default::default())
        .await
        .expect("topic");
    worker.wait_for_log(
        "subscribed to the topics the pattern matches",
        2,
        Duration::from_secs(60),
    );
    producer
        .send_raw(&b, None, Some(echo("in-b").as_bytes()))
        .await
        .expect("send");
    assert_eq!(env.wait_final("in-b")["status"], "SUCCESS");
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid = 'in-dlq'"),
        "0"
    );
    let log = worker.log();
    let subscribed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("subscribed to the topics the pattern matches"))
        .collect();
    assert!(
        subscribed.iter().all(|line| !line.contains(".dlq")),
        "{subscribed:#?}"
    );
    assert!(
        subscribed.last().is_some_and(|line| line.contains(&b)),
        "{subscribed:#?}"
    );
    worker.terminate(Duration::from_secs(20));
}
