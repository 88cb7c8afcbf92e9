//! Retention: `kser prune` and `worker --retention` remove old finished work
//! and nothing else; the lookups `status` and `list` make, and prune's
//! batches, stay index scans on a big table.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestEnv, text, wait_until};
use serde_json::Value;

fn migrate(env: &TestEnv) {
    let out = env.kser(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A task row, created `created` days ago and last changed `changed` days
/// ago; a step of `op` at its position when given.
fn task(
    env: &TestEnv,
    uuid: &str,
    status: &str,
    created: u32,
    changed: u32,
    op: Option<(&str, i32)>,
) {
    let (op, position) = match op {
        Some((op, position)) => (format!("'{op}'"), position.to_string()),
        None => ("NULL".to_owned(), "NULL".to_owned()),
    };
    env.sql(&format!(
        "INSERT INTO kser.tasks (uuid, entrypoint, status, operation_uuid, position, attempts, \
             created_at, finished_at, updated_at) \
         VALUES ('{uuid}', 'showcase.Echo', '{status}', {op}, {position}, 1, \
             now() - interval '{created} days', \
             CASE WHEN '{status}' IN ('SUCCESS', 'FAILED', 'CANCELLED') \
                  THEN now() - interval '{changed} days' END, \
             now() - interval '{changed} days')"
    ));
}

fn operation(env: &TestEnv, uuid: &str, status: &str, created: u32, changed: u32) {
    env.sql(&format!(
        "INSERT INTO kser.operations (uuid, entrypoint, status, steps, created_at, finished_at, updated_at) \
         VALUES ('{uuid}', 'showcase.Chain', '{status}', 3, now() - interval '{created} days', \
             CASE WHEN '{status}' IN ('SUCCESS', 'FAILED', 'CANCELLED') \
                  THEN now() - interval '{changed} days' END, \
             now() - interval '{changed} days')"
    ));
}

fn attempt(env: &TestEnv, task: &str, attempt: i32) {
    env.sql(&format!(
        "INSERT INTO kser.task_attempts (task_uuid, attempt, finished_at, error) \
         VALUES ('{task}', {attempt}, now() - interval '40 days', 'failed once')"
    ));
}

/// Old and recent, finished and unfinished work, standalone and in
/// operations; the names say what prune must do with each.
fn fixture(env: &TestEnv) {
    migrate(env);
    task(env, "gone-success", "SUCCESS", 40, 40, None);
    attempt(env, "gone-success", 1);
    attempt(env, "gone-success", 2);
    task(env, "gone-failed", "FAILED", 40, 40, None);
    task(env, "kept-recent", "SUCCESS", 1, 1, None);
    task(env, "kept-pending", "PENDING", 40, 40, None);
    env.sql("UPDATE kser.tasks SET next_attempt_at = now() + interval '1 hour' WHERE uuid = 'kept-pending'");
    attempt(env, "kept-pending", 1);
    task(env, "kept-running", "RUNNING", 40, 40, None);
    // Created long ago, finished yesterday (a long retry): not old.
    task(env, "kept-finished-lately", "SUCCESS", 40, 1, None);

    // A finished operation: it goes whole, steps and attempts with it.
    operation(env, "gone-op", "SUCCESS", 40, 40);
    for position in 0..3 {
        task(
            env,
            &format!("gone-op-{position}"),
            "SUCCESS",
            40,
            40,
            Some(("gone-op", position)),
        );
    }
    attempt(env, "gone-op-1", 1);
    // A failed one: its later steps stay PENDING for a resume, yet the
    // operation is over.
    operation(env, "gone-op-failed", "FAILED", 40, 40);
    task(
        env,
        "gone-op-failed-0",
        "SUCCESS",
        40,
        40,
        Some(("gone-op-failed", 0)),
    );
    task(
        env,
        "gone-op-failed-1",
        "FAILED",
        40,
        40,
        Some(("gone-op-failed", 1)),
    );
    task(
        env,
        "gone-op-failed-2",
        "PENDING",
        40,
        40,
        Some(("gone-op-failed", 2)),
    );
    // A live operation: its old finished first step stays with it.
    operation(env, "kept-op-live", "RUNNING", 40, 40);
    task(
        env,
        "kept-op-live-0",
        "SUCCESS",
        40,
        40,
        Some(("kept-op-live", 0)),
    );
    task(
        env,
        "kept-op-live-1",
        "PENDING",
        40,
        40,
        Some(("kept-op-live", 1)),
    );
    // Cancelled while a step still runs.
    operation(env, "kept-op-step-running", "CANCELLED", 40, 40);
    task(
        env,
        "kept-op-step-running-0",
        "RUNNING",
        40,
        40,
        Some(("kept-op-step-running", 0)),
    );
    // Failed long ago, but a step changed yesterday.
    operation(env, "kept-op-step-lately", "FAILED", 40, 40);
    task(
        env,
        "kept-op-step-lately-0",
        "FAILED",
        40,
        1,
        Some(("kept-op-step-lately", 0)),
    );
    // Finished, with a message still waiting in the outbox.
    operation(env, "kept-op-outbox", "SUCCESS", 40, 40);
    task(
        env,
        "kept-op-outbox-0",
        "SUCCESS",
        40,
        40,
        Some(("kept-op-outbox", 0)),
    );
    env.sql(
        "INSERT INTO kser.outbox (topic, payload, operation_uuid, created_at) \
         VALUES ('t', '{}', 'kept-op-outbox', now() - interval '40 days')",
    );
    // A retry waiting in the outbox (no operation).
    env.sql("INSERT INTO kser.outbox (topic, payload) VALUES ('t', '{}')");
    env.sql(
        "INSERT INTO kser.dead_letters (dlq_topic, topic, kafka_partition, kafka_offset, \
             error_kind, error, attempts, producer_error, created_at) \
         VALUES ('t.dlq', 't', 0, 1, 'fatal', 'e', 1, 'too large', now() - interval '40 days'), \
                ('t.dlq', 't', 0, 2, 'fatal', 'e', 1, 'too large', now())",
    );
    // Many rows created in the same instant (one batched write), across
    // several batches of 100: the walk resumes after the last one read and
    // neither skips nor repeats any. One in ten is PENDING and stays.
    env.sql(
        "INSERT INTO kser.tasks (uuid, entrypoint, status, created_at, finished_at, updated_at) \
         SELECT 'bulk-' || lpad(i::text, 4, '0'), 'showcase.Echo', \
             CASE WHEN i % 10 = 0 THEN 'PENDING' ELSE 'SUCCESS' END, \
             now() - interval '40 days', \
             CASE WHEN i % 10 = 0 THEN NULL ELSE now() - interval '40 days' END, \
             now() - interval '40 days' \
         FROM generate_series(1, 550) AS i",
    );
}

/// The uuids in `kser.tasks` and `kser.operations` outside the bulk rows.
fn remaining(env: &TestEnv) -> Vec<String> {
    let rows = env.sql(
        "SELECT uuid FROM kser.tasks WHERE uuid NOT LIKE 'bulk-%' \
         UNION ALL SELECT uuid FROM kser.operations ORDER BY 1",
    );
    rows.lines().map(str::to_owned).collect()
}

fn counts(env: &TestEnv) -> String {
    env.sql(
        "SELECT (SELECT count(*) FROM kser.tasks) || ' ' || (SELECT count(*) FROM kser.operations) \
         || ' ' || (SELECT count(*) FROM kser.task_attempts) || ' ' || (SELECT count(*) FROM kser.outbox) \
         || ' ' || (SELECT count(*) FROM kser.dead_letters)",
    )
}

fn prune(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = vec!["prune", "--json", "--batch-size", "100"];
    all.extend_from_slice(args);
    let out = env.kser(&all);
    assert!(
        out.status.success(),
        "prune {args:?}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prune --json prints JSON")
}

fn removed(pruned: &Value) -> [u64; 4] {
    ["tasks", "operations", "steps", "task_attempts"].map(|k| pruned[k].as_u64().expect(k))
}

#[test]
fn prune_removes_old_finished_work_and_nothing_else() {
    let env = TestEnv::new();
    fixture(&env);
    let before = counts(&env);
    let everything = remaining(&env);

    // 2 standalone + 495 bulk tasks; 2 operations with 6 steps; 3 attempts.
    let expected = [2 + 495, 2, 6, 3];
    let dry = prune(&env, &["--older-than", "30d", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(removed(&dry), expected, "{dry:#}");
    assert_eq!(dry["dead_letters"], Value::Null);
    assert_eq!(counts(&env), before, "a dry run removes nothing");
    assert_eq!(remaining(&env), everything);

    let pruned = prune(&env, &["--older-than", "30d"]);
    assert_eq!(pruned["dry_run"], false);
    assert_eq!(
        removed(&pruned),
        expected,
        "the dry run said the same: {pruned:#}"
    );
    let kept: Vec<String> = everything
        .iter()
        .filter(|uuid| !uuid.starts_with("gone-"))
        .cloned()
        .collect();
    assert_eq!(remaining(&env), kept);
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid LIKE 'bulk-%' AND status = 'PENDING'"),
        "55"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid LIKE 'bulk-%'"),
        "55"
    );
    assert_eq!(
        env.sql("SELECT string_agg(task_uuid, ',') FROM kser.task_attempts"),
        "kept-pending"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.outbox"),
        "2",
        "the outbox is kept"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.dead_letters"),
        "2",
        "dead letters are kept"
    );

    // Nothing left to do; then the old dead letter, when asked.
    assert_eq!(removed(&prune(&env, &["--older-than", "30d"])), [0; 4]);
    let dead = prune(&env, &["--older-than", "30d", "--dead-letters"]);
    assert_eq!(dead["dead_letters"], 1, "{dead:#}");
    assert_eq!(env.sql("SELECT kafka_offset FROM kser.dead_letters"), "2");

    // The table for people says the same.
    let out = env.kser(&["prune", "--older-than", "1d", "--dry-run"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        table.contains("WOULD REMOVE") && table.contains("kser.task_attempts"),
        "{table}"
    );
}

#[test]
fn the_status_filter_removes_only_those_states() {
    let env = TestEnv::new();
    fixture(&env);
    let pruned = prune(&env, &["--older-than", "30d", "--status", "FAILED"]);
    // gone-failed, and the failed operation with its three steps.
    assert_eq!(removed(&pruned), [1, 1, 3, 0], "{pruned:#}");
    let left = remaining(&env);
    assert!(
        !left
            .iter()
            .any(|u| u == "gone-failed" || u.starts_with("gone-op-failed")),
        "{left:?}"
    );
    assert!(
        left.iter().any(|u| u == "gone-success") && left.iter().any(|u| u == "gone-op"),
        "{left:?}"
    );

    let pruned = prune(
        &env,
        &["--older-than", "30d", "--status", "success,cancelled"],
    );
    assert_eq!(removed(&pruned), [1 + 495, 1, 3, 3], "{pruned:#}");

    for (status, says) in [
        ("PENDING", "PENDING is not a finished state"),
        ("RUNNING", "RUNNING is not a finished state"),
        ("DONE", "DONE"),
    ] {
        let out = env.kser(&["prune", "--older-than", "30d", "--status", status]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(says) && err.contains("--status"), "{err}");
    }
}

#[test]
fn bad_ages_are_clear_errors() {
    let env = TestEnv::new();
    for (age, says) in [
        ("30", "'30' has no unit: write e.g. 30d, 12h or 90m"),
        ("30 days ago", "is not a duration"),
        ("-5d", "is not a duration"),
        ("10s", "is out of range"),
        ("", "is not a duration"),
    ] {
        let (older_than, retention) = (format!("--older-than={age}"), format!("--retention={age}"));
        for command in [vec!["prune", &older_than], vec!["worker", &retention]] {
            let out = env.kser(&command);
            assert_eq!(out.status.code(), Some(2), "{command:?} is a usage error");
            let err = text(&out.stderr);
            let flag = if command[0] == "prune" {
                "--older-than"
            } else {
                "--retention"
            };
            assert!(
                err.contains(says) && err.contains(flag),
                "{command:?}: {err}"
            );
        }
    }
    let out = env.kser(&["prune"]);
    assert!(
        text(&out.stderr).contains("--older-than"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn one_session_prunes_at_a_time() {
    let env = TestEnv::new();
    fixture(&env);
    // Another session holds the prune lock (a worker pruning).
    let mut holder = Command::new("psql")
        .args([
            env.database_url.as_str(),
            "-qc",
            &format!("SELECT pg_advisory_lock({})", kser::store::PRUNE_LOCK),
            "-qc",
            "SELECT pg_sleep(60)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    wait_until("the lock to be held", Duration::from_secs(20), || {
        env.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == "1"
    });
    let before = counts(&env);
    let out = env.kser(&["prune", "--older-than", "30d"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("another session is pruning"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(counts(&env), before);
    // A dry run takes no lock: it could run meanwhile, and does now.
    assert_eq!(
        removed(&prune(&env, &["--older-than", "30d", "--dry-run"]))[1],
        2
    );
}

#[test]
fn a_worker_with_retention_prunes_and_keeps_working() {
    let env = TestEnv::new();
    fixture(&env);
    let mut worker = env.start_worker("showcase", &["--retention", "30d"]);
    worker.wait_for_log("pruned old finished work", 1, Duration::from_secs(60));
    let log = worker.log();
    assert!(
        log.contains("tasks=497") && log.contains("operations=2"),
        "{log}"
    );
    let left = remaining(&env);
    assert!(!left.iter().any(|u| u.starts_with("gone-")), "{left:?}");
    assert!(left.iter().any(|u| u == "kept-op-live-0"), "{left:?}");

    worker.wait_assigned();
    let uuid = env.send("showcase", "showcase.Echo", r#"{"text": "still here"}"#);
    assert_eq!(env.wait_final(&uuid)["status"], "SUCCESS");
    assert!(worker.terminate(Duration::from_secs(30)).success());
}

/// How many task rows the plan test writes. 10 million took 3 min 41 s to
/// insert here (2 cores, shared), too long for every run of the suite:
/// by default 300,000 rows (a table of about 110 MB, past the size where a
/// sequential scan looks cheap, and each plan below is the one seen at 10
/// million rows, where we checked them by hand). KSER_TEST_PLAN_ROWS
/// sets another size.
fn plan_rows() -> u64 {
    std::env::var("KSER_TEST_PLAN_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300_000)
}

fn plan(env: &TestEnv, query: &str) -> String {
    env.sql(&format!("EXPLAIN {query}"))
}

fn assert_index_only(env: &TestEnv, what: &str, query: &str) {
    let plan = plan(env, query);
    assert!(plan.contains("Index"), "{what}: no index used:\n{plan}");
    assert!(
        !plan.contains("Seq Scan"),
        "{what}: a sequential scan:\n{plan}"
    );
}

#[test]
fn lookups_and_prune_batches_stay_index_scans_on_a_big_table() {
    let env = TestEnv::new();
    migrate(&env);
    let rows = plan_rows();
    let ops = rows / 30;
    let started = Instant::now();
    // Two months of operations (one in fifty FAILED) and tasks, newest
    // last; one task in a hundred FAILED, the
    // newest hundred still PENDING; every tenth row a step of an operation
    // (three steps each), with a retry now and then.
    env.sql(&format!(
        "INSERT INTO kser.operations (uuid, entrypoint, status, steps, created_at, finished_at, updated_at) \
         SELECT 'op-' || i, 'showcase.' || (i % 10), \
             CASE WHEN i % 50 = 0 THEN 'FAILED' ELSE 'SUCCESS' END, 3, t, t, t \
         FROM generate_series(1, {ops}) AS i, \
              LATERAL (SELECT now() - ({ops} - i) * interval '1 minute' * 60 * 24 * 60 / {ops}) AS ts(t)"
    ));
    env.sql(&format!(
        "INSERT INTO kser.tasks (uuid, entrypoint, status, operation_uuid, position, params, result, \
             attempts, worker, created_at, started_at, finished_at, updated_at) \
         SELECT md5(i::text), 'entry.' || (i % 10), \
             CASE WHEN i > {rows} - 100 THEN 'PENDING' WHEN i % 100 = 0 THEN 'FAILED' ELSE 'SUCCESS' END, \
             CASE WHEN i % 10 = 0 AND i / 10 <= {ops} * 3 THEN 'op-' || ((i / 10 - 1) / 3 + 1) END, \
             CASE WHEN i % 10 = 0 AND i / 10 <= {ops} * 3 THEN (i / 10 - 1) % 3 END, \
             '{{\"n\": 1}}', '{{\"retcode\": 0}}', 1, 'host:1', t, t, t, t \
         FROM generate_series(1, {rows}) AS i, \
              LATERAL (SELECT now() - ({rows} - i) * interval '1 minute' * 60 * 24 * 60 / {rows}) AS ts(t)"
    ));
    env.sql(
        "INSERT INTO kser.task_attempts (task_uuid, attempt, finished_at) \
         SELECT uuid, 1, created_at FROM kser.tasks WHERE status = 'FAILED'",
    );
    env.sql("VACUUM ANALYZE kser.tasks, kser.operations, kser.task_attempts, kser.outbox");
    eprintln!("{rows} task rows written in {:?}", started.elapsed());
    let some = env.sql(&format!("SELECT md5('{}')", rows / 2));

    // `status UUID`: the operation, else the task and its attempts.
    assert_index_only(
        &env,
        "status: operation",
        "SELECT * FROM kser.operations WHERE uuid = 'op-7'",
    );
    assert_index_only(
        &env,
        "status: steps",
        "SELECT * FROM kser.tasks WHERE operation_uuid = 'op-7' ORDER BY position",
    );
    assert_index_only(
        &env,
        "status: task",
        &format!("SELECT * FROM kser.tasks WHERE uuid = '{some}'"),
    );
    assert_index_only(
        &env,
        "status: attempts",
        &format!("SELECT * FROM kser.task_attempts WHERE task_uuid = '{some}' ORDER BY attempt"),
    );
    // `list`, with its filters: the newest first, read from the index.
    for filter in [
        "",
        "AND status = 'FAILED'",
        "AND status = 'SUCCESS'",
        "AND entrypoint = 'entry.3'",
        "AND status = 'FAILED' AND entrypoint = 'entry.0'",
    ] {
        assert_index_only(
            &env,
            &format!("list {filter}"),
            &format!(
                "SELECT * FROM kser.tasks WHERE operation_uuid IS NULL {filter} \
                 ORDER BY created_at DESC LIMIT 20"
            ),
        );
        // Operations are a table thirty times smaller: with two filters
        // a plain scan of it may well be the cheaper plan.
        if filter.matches("AND").count() > 1 {
            continue;
        }
        let ops_filter = filter.replace("entry.", "showcase.");
        assert_index_only(
            &env,
            &format!("list operations {ops_filter}"),
            &format!(
                "SELECT * FROM kser.operations WHERE true {ops_filter} ORDER BY created_at DESC LIMIT 20"
            ),
        );
    }
    // Prune's batches, first and later ones: index range scans in order.
    for statement in kser::store::prune_batch_statements() {
        for after in ["NULL", "now() - interval '50 days'"] {
            let prepared = format!(
                "PREPARE batch(timestamptz, timestamptz, text, bigint, text[]) AS {statement}; \
                 EXPLAIN EXECUTE batch(now() - interval '30 days', {after}, 'x', 5000, \
                     ARRAY['SUCCESS', 'FAILED', 'CANCELLED'])"
            );
            let plan = env.sql(&prepared);
            assert!(
                plan.contains("Scan using tasks_created_at_uuid_idx")
                    || plan.contains("Scan using operations_created_at_uuid_idx"),
                "batch after {after}: not driven by the index:\n{plan}"
            );
            // The outbox, a queue of unsent messages, is nearly empty: a
            // plain scan of it is the right plan.
            for table in ["tasks", "operations", "task_attempts"] {
                assert!(
                    !plan.contains(&format!("Seq Scan on {table}")),
                    "batch after {after}: a sequential scan of {table}:\n{plan}"
                );
            }
        }
    }

    // And the batches do their work: a month of the two goes.
    let started = Instant::now();
    let pruned = prune(&env, &["--older-than", "30d"]);
    let [tasks, operations, steps, attempts] = removed(&pruned);
    eprintln!(
        "pruned {tasks} tasks, {operations} operations ({steps} steps), {attempts} attempts in {:?}",
        started.elapsed()
    );
    // Against prune's own cutoff: an operation created just before it may
    // have steps after it, and stays whole; no old standalone task stays.
    let cutoff = pruned["cutoff"].as_str().expect("cutoff");
    let left = env.sql(&format!(
        "SELECT count(*) FROM kser.tasks WHERE operation_uuid IS NULL AND created_at < '{cutoff}'"
    ));
    assert_eq!(left, "0", "every old standalone task went");
    assert!(tasks > rows / 3 && operations > ops / 3, "{pruned:#}");
}
