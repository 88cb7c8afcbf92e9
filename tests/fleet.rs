//! The fleet against the real broker and Postgres: workers record themselves
//! in `kser.workers`, `kser control` pauses and resumes an entrypoint across
//! two workers (nothing of it starts while paused, nothing is lost, the other
//! entrypoints keep flowing), drains a worker (it exits 0 and the other takes
//! its partitions), and a SIGKILLed worker is marked LOST by the live one.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestEnv, WorkerProcess, text};
use serde_json::Value;

/// Fast heartbeats, so LOST comes within seconds.
const FLEET: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--lost-after",
    "2s",
    "--concurrency",
    "4",
];

/// `kser workers --json`, parsed.
fn workers(env: &TestEnv) -> Vec<Value> {
    let out = env.kser(&["workers", "--json"]);
    assert!(out.status.success(), "workers: {}", text(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("workers --json prints JSON")
}

/// The row of the worker with this pid.
fn row_of(env: &TestEnv, worker: &WorkerProcess) -> Option<Value> {
    workers(env)
        .into_iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(worker.pid())))
}

fn id_of(env: &TestEnv, worker: &WorkerProcess) -> String {
    let row = row_of(env, worker).expect("the worker registered");
    row["id"].as_str().expect("id").to_owned()
}

/// Waits until the worker's row satisfies `check`.
fn wait_row(env: &TestEnv, worker: &WorkerProcess, what: &str, check: impl Fn(&Value) -> bool) {
    common::wait_until(what, Duration::from_secs(60), || {
        row_of(env, worker).is_some_and(|row| check(&row))
    });
}

fn in_group(row: &Value) -> bool {
    matches!(row["state"].as_str(), Some("READY" | "ACTIVE"))
}

/// Two workers of one group, both in the group.
fn two_workers(env: &TestEnv) -> (WorkerProcess, WorkerProcess) {
    let mut a = env.start_worker("showcase", FLEET);
    let mut b = env.start_worker("showcase", FLEET);
    a.wait_assigned();
    b.wait_assigned();
    wait_row(env, &a, "worker a in its group", in_group);
    wait_row(env, &b, "worker b in its group", in_group);
    (a, b)
}

/// Sends `showcase.Sleep` and `showcase.Echo` messages with known uuids.
fn send_mix(env: &TestEnv, prefix: &str, count: usize) {
    let mut input = String::new();
    for n in 0..count {
        input.push_str(&format!(
            "{{\"entrypoint\": \"showcase.Sleep\", \"uuid\": \"{prefix}-sleep-{n}\", \"params\": {{\"ms\": 20}}}}\n\
             {{\"entrypoint\": \"showcase.Echo\", \"uuid\": \"{prefix}-echo-{n}\", \"params\": {{\"text\": \"{n}\"}}}}\n"
        ));
    }
    env.send_batch(&input);
}

fn count(env: &TestEnv, query: &str) -> i64 {
    env.sql(query).trim().parse().expect("a count")
}

#[test]
fn a_paused_entrypoint_waits_on_every_worker_and_resumes_in_full() {
    let env = TestEnv::new();
    let (a, b) = two_workers(&env);

    let out = env.kser(&["control", "pause", "--entrypoint", "showcase.Sleep"]);
    assert!(out.status.success(), "pause: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("paused entrypoint showcase.Sleep on every worker"));
    for worker in [&a, &b] {
        wait_row(&env, worker, "the pause to be obeyed", |row| {
            row["paused"] == serde_json::json!(["showcase.Sleep"])
        });
    }
    let table = env.kser(&["workers"]);
    assert!(
        text(&table.stdout).contains("showcase.Sleep"),
        "{}",
        text(&table.stdout)
    );

    let n = 20;
    send_mix(&env, "p", n);
    // The other entrypoint flows on both workers...
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE entrypoint = 'showcase.Echo' AND status = 'SUCCESS'",
        n as i64,
        Duration::from_secs(120),
    );
    // ...and a few heartbeats later nothing of the paused one has started.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE entrypoint = 'showcase.Sleep' \
             AND (started_at IS NOT NULL OR status <> 'PENDING')"
        ),
        0,
        "a paused entrypoint started"
    );
    for worker in [&a, &b] {
        let row = row_of(&env, worker).expect("row");
        assert_ne!(row["state"], "PAUSED", "only one entrypoint is paused");
    }

    let resumed_at = env.sql("SELECT clock_timestamp()");
    let out = env.kser(&["control", "resume", "--entrypoint", "showcase.Sleep"]);
    assert!(out.status.success(), "resume: {}", text(&out.stderr));
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE entrypoint = 'showcase.Sleep' AND status = 'SUCCESS'",
        n as i64,
        Duration::from_secs(120),
    );
    // None started before the resume, each ran once, none was dead-lettered.
    let early = count(
        &env,
        &format!(
            "SELECT count(*) FROM kser.tasks WHERE entrypoint = 'showcase.Sleep' \
             AND started_at < '{}'::timestamptz",
            resumed_at.trim()
        ),
    );
    assert_eq!(
        early, 0,
        "tasks of the paused entrypoint started before the resume"
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM kser.tasks WHERE attempts <> 1"),
        0
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.dead_letters"), 0);
    assert_eq!(count(&env, "SELECT count(*) FROM kser.controls"), 0);
}

#[test]
fn a_pause_is_durable_and_the_lock_file_pauses_a_worker() {
    let env = TestEnv::new();
    let migrate = env.kser(&["migrate"]);
    assert!(migrate.status.success(), "{}", text(&migrate.stderr));
    // Before any worker runs: the binary's own registry knows the name.
    let out = env.example_cmd(
        "showcase",
        &["control", "pause", "--entrypoint", "showcase.Echo"],
    );
    assert!(out.status.success(), "pause: {}", text(&out.stderr));

    let lock_dir = env.dir.path().join("locks");
    std::fs::create_dir_all(&lock_dir).expect("lock dir");
    let log = env.dir.path().join("locked-worker.log");
    let mut command = env.command(&common::example_path("showcase"));
    command
        .arg("worker")
        .args(FLEET)
        .env("LOCK_PATH", &lock_dir)
        .env("HOSTNAME", "fleet-test-host")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut worker = WorkerProcess::spawn(&mut command, log);
    worker.wait_assigned();

    let echo = env.send("showcase", "showcase.Echo", r#"{"text": "held"}"#);
    let fail = env.send("showcase", "showcase.Fail", r#"{"reason": "flows"}"#);
    assert_eq!(env.wait_final(&fail)["status"], "FAILED");

    // The lock file pauses everything while it exists.
    let lock = lock_dir.join("kser-fleet-test-host-pause.lock");
    std::fs::write(&lock, "").expect("lock file");
    wait_row(&env, &worker, "the lock file to pause the worker", |row| {
        row["state"] == "PAUSED" && row["paused"] == serde_json::json!(["*"])
    });
    let other = env.send("showcase", "showcase.Fail", r#"{"reason": "held"}"#);
    let out = env.kser(&["control", "resume"]);
    assert!(out.status.success(), "resume: {}", text(&out.stderr));
    std::thread::sleep(Duration::from_secs(2));
    let held = env.status(&echo);
    assert!(
        held["started_at"].is_null(),
        "paused task started: {held}\n{}",
        worker.log()
    );
    let held = env.status(&other);
    assert!(
        held["started_at"].is_null(),
        "locked worker started a task: {held}"
    );

    std::fs::remove_file(&lock).expect("remove lock");
    assert_eq!(env.wait_final(&echo)["status"], "SUCCESS");
    assert_eq!(env.wait_final(&other)["status"], "FAILED");
    let status = worker.terminate(Duration::from_secs(60));
    assert!(status.success(), "{}", worker.log());
    let stopped = workers(&env);
    assert_eq!(stopped[0]["state"], "STOPPED", "{stopped:?}");
}

#[test]
fn a_drained_worker_exits_and_hands_its_partitions_over() {
    let env = TestEnv::new();
    let (mut a, b) = two_workers(&env);
    let a_id = id_of(&env, &a);
    let b_id = id_of(&env, &b);

    let out = env.kser(&["control", "drain", "--worker", "nobody:1"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("unknown worker 'nobody:1'"), "{err}");
    assert!(err.contains(&a_id) && err.contains(&b_id), "{err}");

    send_mix(&env, "d", 10);
    let out = env.kser(&["control", "drain", "--worker", &a_id]);
    assert!(out.status.success(), "drain: {}", text(&out.stderr));
    let status = a.wait_exit(Duration::from_secs(90));
    assert!(
        status.success(),
        "a drained worker exits 0: {status}\n{}",
        a.log()
    );
    assert!(a.log().contains("drain requested"), "{}", a.log());

    let partitions = |row: &Value| -> usize {
        row["assigned"].as_object().map_or(0, |topics| {
            topics
                .values()
                .filter_map(Value::as_array)
                .map(Vec::len)
                .sum()
        })
    };
    wait_row(&env, &b, "the other worker to own every partition", |row| {
        partitions(row) == 6
    });
    let rows = workers(&env);
    let a_row = rows.iter().find(|w| w["id"] == a_id.as_str()).expect("a");
    assert_eq!(a_row["state"], "STOPPED");
    // Nothing sent is lost; later work goes to the other worker.
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        20,
        Duration::from_secs(120),
    );
    let late = env.send("showcase", "showcase.Echo", r#"{"text": "late"}"#);
    let late = env.wait_final(&late);
    assert_eq!(late["worker"], b_id.as_str());
    assert_eq!(count(&env, "SELECT count(*) FROM kser.controls"), 0);

    // The scaling hint, once librdkafka's statistics came: between one
    // worker and the partition count.
    wait_row(&env, &b, "the scaling hint", |row| {
        row["desired"]
            .as_i64()
            .is_some_and(|d| (1..=6).contains(&d))
            && row["partitions"] == 6
            && row["lag"].as_i64().is_some()
    });
    let table = text(&env.kser(&["workers"]).stdout);
    assert!(table.contains(" desired (lag "), "{table}");
}

#[test]
fn a_killed_worker_becomes_lost_and_control_names_what_it_knows() {
    let env = TestEnv::new();
    let mut a = env.start_worker("showcase", FLEET);
    let port = common::free_port();
    let address = format!("127.0.0.1:{port}");
    let mut b = env.start_worker("showcase", &[FLEET, &["--http", &address]].concat());
    a.wait_assigned();
    b.wait_assigned();
    wait_row(&env, &a, "worker a in its group", in_group);
    wait_row(&env, &b, "worker b in its group", in_group);
    let a_id = id_of(&env, &a);
    let b_id = id_of(&env, &b);

    let out = env.kser(&["control", "pause", "--worker", "ghost"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown worker 'ghost'; known workers:"),
        "{err}"
    );
    assert!(err.contains(&a_id) && err.contains(&b_id), "{err}");
    let out = env.kser(&["control", "pause", "--entrypoint", "showcase.Nope"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("unknown entrypoint 'showcase.Nope'"), "{err}");
    assert!(
        err.contains("showcase.Echo") && err.contains("showcase.Sleep"),
        "{err}"
    );
    let out = env.kser(&["control", "pause", "--entrypoint", "showcase.Chain"]);
    assert!(
        text(&out.stderr).contains("it is an operation"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.controls"), 0);

    a.kill();
    // Marked in the table by the live worker, not only shown so.
    env.wait_count(
        &format!("SELECT count(*) FROM kser.workers WHERE id = '{a_id}' AND state = 'LOST'"),
        1,
        Duration::from_secs(60),
    );
    let rows = workers(&env);
    let b_row = rows.iter().find(|w| w["id"] == b_id.as_str()).expect("b");
    assert!(in_group(b_row), "{b_row}");
    let out = env.kser(&["control", "drain", "--worker", &a_id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is LOST"),
        "{}",
        text(&out.stderr)
    );
    let table = text(&env.kser(&["workers"]).stdout);
    assert!(table.contains("LOST") && table.contains(&b_id), "{table}");
    // For alerts: the group's workers by state, and those marked LOST.
    let group = &env.group;
    common::wait_until("LOST in /metrics", Duration::from_secs(30), || {
        common::http_get(port, "/metrics").is_some_and(|(_, metrics)| {
            common::sample(
                &metrics,
                &format!("kser_workers{{group=\"{group}\",state=\"LOST\"}}"),
            ) == Some(1.0)
                && common::sample(
                    &metrics,
                    &format!("kser_workers{{group=\"{group}\",state=\"ACTIVE\"}}"),
                )
                .is_some()
                && common::sample(
                    &metrics,
                    &format!("kser_workers_marked_lost_total{{group=\"{group}\"}}"),
                ) == Some(1.0)
        })
    });
}

#[test]
fn heartbeats_and_controls_ride_out_a_postgres_outage() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", FLEET);
    worker.wait_assigned();
    wait_row(&env, &worker, "the worker in its group", in_group);

    env.database_outage(Duration::from_secs(4));
    let after = env.sql("SELECT clock_timestamp()");
    worker.wait_for_log(
        "heartbeat and controls reach Postgres again",
        1,
        Duration::from_secs(60),
    );
    assert!(
        worker
            .log()
            .contains("could not read controls or write the heartbeat"),
        "{}",
        worker.log()
    );
    // It beats again, obeys a control given after the outage, and runs tasks.
    env.wait_count(
        &format!(
            "SELECT count(*) FROM kser.workers WHERE heartbeat_at > '{}'::timestamptz",
            after.trim()
        ),
        1,
        Duration::from_secs(60),
    );
    let out = env.kser(&["control", "pause", "--entrypoint", "showcase.Fail"]);
    assert!(out.status.success(), "pause: {}", text(&out.stderr));
    wait_row(&env, &worker, "the pause to be obeyed", |row| {
        row["paused"] == serde_json::json!(["showcase.Fail"])
    });
    let ok = env.send("showcase", "showcase.Echo", r#"{"text": "after"}"#);
    assert_eq!(env.wait_final(&ok)["status"], "SUCCESS");
    assert!(worker.exited().is_none(), "{}", worker.log());
}

#[test]
fn a_custom_event_reaches_the_tasks_that_handle_it_on_each_worker() {
    let env = TestEnv::new();
    let (a, b) = two_workers(&env);
    let a_id = id_of(&env, &a);

    // Every running worker: each one's showcase.Echo greets.
    let out = env.kser(&[
        "control",
        "event",
        "showcase.greet",
        "--params",
        r#"{"to": "the fleet"}"#,
        "--wait",
        "30s",
    ]);
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{printed}{}", text(&out.stderr));
    assert!(
        printed.contains("2 running worker(s) handle it"),
        "{printed}"
    );
    assert_eq!(printed.matches("handled").count(), 2, "{printed}");
    for worker in [&a, &b] {
        assert!(
            worker.log().contains("showcase.Echo greets the fleet"),
            "{}",
            worker.log()
        );
    }

    // One worker, and a handler that fails: exit 1, the error shown.
    let out = env.kser(&[
        "control",
        "event",
        "showcase.greet",
        "--params",
        r#"{"fail": true}"#,
        "--worker",
        &a_id,
        "--wait",
        "30s",
    ]);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains("failed: asked to fail"), "{printed}");
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.event_deliveries WHERE error IS NOT NULL"
        ),
        1
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.event_deliveries"), 3);

    // Nothing handles it: refused, with what is handled.
    let out = env.kser(&["control", "event", "showcase.nope"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no task handles event 'showcase.nope'")
            && err.contains("showcase.greet (showcase.Echo)"),
        "{err}"
    );
    let out = env.kser(&[
        "control",
        "event",
        "showcase.greet",
        "--entrypoint",
        "showcase.Sleep",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("showcase.Sleep handles no event 'showcase.greet'"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.events"), 2);
}
