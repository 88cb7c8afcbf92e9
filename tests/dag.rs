//! Graph operations end to end: fan-out and fan-in across workers, joins
//! released exactly once (also under SIGKILL), per-step policies,
//! compensation, resume, and graphs refused up front.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestEnv, text};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn send_batch(env: &TestEnv, input: &str) -> Vec<String> {
    let out = env.run(
        Path::new(env!("CARGO_BIN_EXE_kser")),
        &["send", "--batch", "-"],
        Some(input),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

fn count(env: &TestEnv, query: &str) -> i64 {
    env.sql(query).parse().expect("a count")
}

/// A `showcase.Graph` message of `steps`, one line for `send --batch`.
fn graph(steps: Value) -> String {
    format!(
        "{}\n",
        json!({"entrypoint": "showcase.Graph", "params": {"steps": steps}})
    )
}

/// Logs every message written to the outbox, by the task uuid it runs, so
/// a test can tell how often each step was queued.
fn log_outbox(env: &TestEnv) {
    let out = env.kser(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.sql(
        "CREATE TABLE queued (task_uuid text); \
         CREATE FUNCTION log_queued() RETURNS trigger AS $$ BEGIN \
             INSERT INTO queued VALUES (NEW.payload::jsonb->>'uuid'); RETURN NEW; END $$ \
         LANGUAGE plpgsql; \
         CREATE TRIGGER log_queued AFTER INSERT ON kser.outbox \
             FOR EACH ROW EXECUTE FUNCTION log_queued();",
    );
}

/// `status, name` of every task of operation `uuid`, by name.
fn steps_of(env: &TestEnv, uuid: &str) -> Vec<(String, String)> {
    env.sql(&format!(
        "SELECT s.name || CASE WHEN s.compensates THEN ' (undo)' ELSE '' END, t.status \
         FROM kser.tasks t JOIN kser.steps s ON s.task_uuid = t.uuid \
         WHERE t.operation_uuid = '{uuid}' ORDER BY t.position"
    ))
    .lines()
    .map(|line| {
        let (name, status) = line.split_once('|').expect("name|status");
        (name.to_owned(), status.to_owned())
    })
    .collect()
}

fn op_status(env: &TestEnv, uuid: &str) -> String {
    env.sql(&format!(
        "SELECT status FROM kser.operations WHERE uuid = '{uuid}'"
    ))
}

fn wait_op(env: &TestEnv, uuid: &str, status: &str) {
    let mut last = String::new();
    common::wait_until(
        &format!("operation {uuid} to be {status}"),
        Duration::from_secs(90),
        || {
            last = op_status(env, uuid);
            last == status
        },
    );
}

fn task_field(env: &TestEnv, uuid: &str, name: &str, field: &str) -> String {
    env.sql(&format!(
        "SELECT t.{field} FROM kser.tasks t JOIN kser.steps s ON s.task_uuid = t.uuid \
         WHERE t.operation_uuid = '{uuid}' AND s.name = '{name}' AND NOT s.compensates"
    ))
}

#[test]
fn a_dice_duel_fans_out_and_in_across_two_workers() {
    let env = TestEnv::new();
    log_outbox(&env);
    let mut first = env.start_worker("dice", &["--partitions", "4"]);
    first.wait_assigned();
    let mut second = env.start_worker("dice", &["--partitions", "4"]);
    second.wait_assigned();
    first.wait_for_log("partitions assigned", 2, Duration::from_secs(60));

    let input = "{\"entrypoint\": \"dice.DiceDuel\", \"params\": {\"sides\": 6}}\n".repeat(12);
    let uuids = send_batch(&env, &input);
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        12,
        Duration::from_secs(90),
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS' OR attempts <> 1"
        ),
        0,
        "every step ran once"
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM (SELECT task_uuid FROM queued GROUP BY task_uuid \
             HAVING count(*) <> 1) AS twice"
        ),
        0,
        "every step was queued once"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM queued"), 36);
    assert_eq!(
        env.sql("SELECT count(DISTINCT worker) FROM kser.tasks"),
        "2",
        "steps ran on both workers"
    );
    for uuid in &uuids {
        let roll = |player: &str| -> u64 {
            let result = task_field(&env, uuid, player, "result");
            let result: Value = serde_json::from_str(&result).expect("result");
            result["retval"]["roll"].as_u64().expect("a roll")
        };
        let (a, b) = (roll("player1"), roll("player2"));
        let judged: Value =
            serde_json::from_str(&task_field(&env, uuid, "judge", "result")).expect("result");
        assert_eq!(judged["retval"]["rolls"], json!([a, b]), "{judged}");
        let winner = match a.cmp(&b) {
            std::cmp::Ordering::Greater => json!("player1"),
            std::cmp::Ordering::Less => json!("player2"),
            std::cmp::Ordering::Equal => Value::Null,
        };
        assert_eq!(judged["retval"]["winner"], winner, "{judged}");
        let stdout = judged["stdout"].as_str().unwrap_or_default();
        match winner.as_str() {
            Some(name) => assert!(stdout.starts_with(name), "{stdout}"),
            None => assert!(stdout.contains("tie"), "{stdout}"),
        }
        // The judge started after both rolls finished.
        assert_eq!(
            env.sql(&format!(
                "SELECT bool_and(j.started_at >= r.finished_at) FROM kser.tasks j \
                 JOIN kser.steps js ON js.task_uuid = j.uuid AND js.name = 'judge', \
                 kser.tasks r JOIN kser.steps rs ON rs.task_uuid = r.uuid \
                 WHERE j.operation_uuid = '{uuid}' AND r.operation_uuid = '{uuid}' \
                 AND rs.name <> 'judge'"
            )),
            "t"
        );
    }
    // `status` shows the graph: each step's name and what it runs after.
    let out = env.example_cmd("dice", &["status", &uuids[0]]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(shown.contains("judge"), "{shown}");
    assert!(shown.contains("player1, player2"), "{shown}");
}

#[test]
fn joins_run_once_with_their_dependencies_merged_in_declared_order() {
    let env = TestEnv::new();
    log_outbox(&env);
    let journal = env.dir.path().join("journal");
    let journal_path = journal.to_str().expect("utf-8 path");
    let args = ["--partitions", "4", "--concurrency", "8"];
    let envs = [("SHOWCASE_JOURNAL", journal_path)];
    let mut first = env.start_worker_env("showcase", &args, &envs);
    first.wait_assigned();
    let mut second = env.start_worker_env("showcase", &args, &envs);
    second.wait_assigned();
    first.wait_for_log("partitions assigned", 2, Duration::from_secs(60));

    // a and b finish at about the same moment, on either worker; `all`
    // joins on both, `first` on the first of them, and `late` waits 1.5 s
    // after `all`.
    let steps = json!([
        {"name": "a", "entrypoint": "showcase.Sleep", "params": {"ms": 300}},
        {"name": "b", "entrypoint": "showcase.Sleep", "params": {"ms": 300}},
        {"name": "ea", "entrypoint": "showcase.Echo", "after": ["a"],
         "params": {"text": "ea", "retval": {"from": "a", "a": 1}}},
        {"name": "eb", "entrypoint": "showcase.Echo", "after": ["b"],
         "params": {"text": "eb", "retval": {"from": "b", "b": 2}}},
        {"name": "all", "entrypoint": "showcase.Append", "after": ["ea", "eb"],
         "params": {"item": "all"}},
        {"name": "merged", "entrypoint": "showcase.Echo", "after": ["eb", "ea"],
         "params": {"text": "merged"}},
        {"name": "first", "entrypoint": "showcase.Append", "after": ["a", "b"], "any": true,
         "params": {"item": "first"}},
        {"name": "late", "entrypoint": "showcase.Echo", "after": ["all"], "delay_ms": 1500,
         "params": {"text": "late"}}
    ]);
    let uuids = send_batch(&env, &graph(steps).repeat(15));
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        15,
        Duration::from_secs(120),
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS'"
        ),
        0
    );
    assert_eq!(count(&env, "SELECT count(*) FROM queued"), 15 * 8);
    assert_eq!(
        count(
            &env,
            "SELECT count(DISTINCT task_uuid) FROM queued JOIN kser.tasks ON uuid = task_uuid"
        ),
        15 * 8,
        "every step was queued exactly once"
    );
    // The joins' own code ran once each.
    let journal = std::fs::read_to_string(&journal).expect("journal");
    for uuid in &uuids {
        for name in ["all", "first"] {
            let task = task_field(&env, uuid, name, "uuid");
            let runs = journal.lines().filter(|l| l.starts_with(&task)).count();
            assert_eq!(runs, 1, "{name} of {uuid} ran {runs} times");
        }
        // Merged in declared order: eb then ea, so ea's `from` wins.
        let merged: Value =
            serde_json::from_str(&task_field(&env, uuid, "merged", "result")).expect("result");
        let forwarded = &merged["retval"]["forwarded"]["retval"];
        assert_eq!(forwarded["from"], json!("a"), "{merged}");
        assert_eq!(
            (forwarded["a"].clone(), forwarded["b"].clone()),
            (json!(1), json!(2))
        );
        // `late` waited its delay after `all` finished.
        let waited = env.sql(&format!(
            "SELECT extract(epoch FROM l.started_at - a.finished_at) >= 1.4 FROM kser.tasks l, \
             kser.tasks a WHERE l.uuid = '{}' AND a.uuid = '{}'",
            task_field(&env, uuid, "late", "uuid"),
            task_field(&env, uuid, "all", "uuid")
        ));
        assert_eq!(waited, "t", "late started before its delay");
    }
    assert_eq!(
        env.sql("SELECT count(DISTINCT worker) FROM kser.tasks"),
        "2",
        "steps ran on both workers"
    );
}

#[test]
fn joins_are_released_once_while_workers_are_killed() {
    let seed = common::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new();
    log_outbox(&env);
    let args = ["--partitions", "4", "--concurrency", "8"];
    let mut workers = vec![
        env.start_worker("showcase", &args),
        env.start_worker("showcase", &args),
    ];
    for worker in &mut workers {
        worker.wait_assigned();
    }
    let operations = 100;
    let mut input = String::new();
    for _ in 0..operations {
        let ms = |rng: &mut rand::rngs::StdRng| rng.random_range(50..400);
        input.push_str(&graph(json!([
            {"name": "a", "entrypoint": "showcase.Sleep", "params": {"ms": ms(&mut rng)}},
            {"name": "b", "entrypoint": "showcase.Sleep", "params": {"ms": ms(&mut rng)}},
            {"name": "c", "entrypoint": "showcase.Sleep", "params": {"ms": ms(&mut rng)}},
            {"name": "join", "entrypoint": "showcase.Sleep", "after": ["a", "b", "c"],
             "params": {"ms": ms(&mut rng)}},
            {"name": "any", "entrypoint": "showcase.Sleep", "after": ["a", "b"], "any": true,
             "params": {"ms": ms(&mut rng)}},
            {"name": "end", "entrypoint": "showcase.Append", "after": ["join", "any"],
             "params": {"item": "end"}}
        ])));
    }
    send_batch(&env, &input);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kills = 0;
    while Instant::now() < deadline
        && count(
            &env,
            "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        ) < operations
    {
        std::thread::sleep(Duration::from_millis(rng.random_range(400..1500)));
        let victim = rng.random_range(0..workers.len());
        workers[victim].kill();
        kills += 1;
        workers[victim] = env.start_worker("showcase", &args);
    }
    println!("{kills} workers killed");
    env.wait_count(
        "SELECT count(*) FROM kser.operations WHERE status = 'SUCCESS'",
        operations,
        Duration::from_secs(120),
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM kser.tasks WHERE status <> 'SUCCESS'"
        ),
        0
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM kser.tasks"),
        operations * 6
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM (SELECT task_uuid FROM queued GROUP BY task_uuid \
             HAVING count(*) <> 1) AS twice"
        ),
        0,
        "a step was queued twice (seed {seed})"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM queued"), operations * 6);
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(30),
    );
}

#[test]
fn a_failed_step_compensates_what_succeeded_in_reverse_order() {
    let env = TestEnv::new();
    let flag = env.dir.path().join("undo-a");
    let flag_path = flag.to_str().expect("utf-8 path");
    let mut worker = env.start_worker("showcase", &["--concurrency", "4"]);
    worker.wait_assigned();
    let undo = |text: &str| json!({"entrypoint": "showcase.Echo", "params": {"text": text}});
    let steps = |undo_a: Value| {
        json!([
            {"name": "a", "entrypoint": "showcase.Echo", "params": {"text": "did a"},
             "compensate": undo_a},
            {"name": "b", "entrypoint": "showcase.Echo", "after": ["a"],
             "params": {"text": "did b"}, "compensate": undo("undo b")},
            {"name": "c", "entrypoint": "showcase.Echo", "after": ["b"],
             "params": {"text": "did c"}},
            {"name": "d", "entrypoint": "showcase.Echo", "after": ["c"],
             "params": {"text": "did d"}, "compensate": undo("undo d")},
            {"name": "pay", "entrypoint": "showcase.Fail", "after": ["d"],
             "params": {"reason": "card declined"}, "on_failure": "compensate"},
            {"name": "ship", "entrypoint": "showcase.Echo", "after": ["pay"],
             "params": {"text": "never"}}
        ])
    };
    let input = graph(steps(undo("undo a")))
        + &graph(steps(
            json!({"entrypoint": "showcase.Flaky", "params": {"flag": flag_path}}),
        ));
    let uuids = send_batch(&env, &input);
    wait_op(&env, &uuids[0], "COMPENSATED");
    let expected = |last: &str| {
        vec![
            ("a".to_owned(), "SUCCESS".to_owned()),
            ("b".into(), "SUCCESS".into()),
            ("c".into(), "SUCCESS".into()),
            ("d".into(), "SUCCESS".into()),
            ("pay".into(), "FAILED".into()),
            ("ship".into(), "CANCELLED".into()),
            ("d (undo)".into(), "SUCCESS".into()),
            ("b (undo)".into(), "SUCCESS".into()),
            ("a (undo)".into(), last.to_owned()),
        ]
    };
    assert_eq!(steps_of(&env, &uuids[0]), expected("SUCCESS"));
    // One after the other, each forwarded the result of the step it undoes.
    let undone = env.sql(&format!(
        "SELECT result->>'stdout', result->'retval'->'forwarded'->>'stdout' FROM kser.tasks \
         WHERE operation_uuid = '{}' AND position >= 6 ORDER BY started_at",
        uuids[0]
    ));
    assert_eq!(undone, "undo d|did d\nundo b|did b\nundo a|did a");
    let error = env.sql(&format!(
        "SELECT error FROM kser.operations WHERE uuid = '{}'",
        uuids[0]
    ));
    assert!(error.contains("card declined"), "{error}");
    let out = env.kser(&["status", &uuids[0]]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("COMPENSATED") && shown.contains("undo b"),
        "{shown}"
    );

    // A compensation that fails leaves the operation FAILED; once it can
    // succeed, resume finishes the compensation.
    wait_op(&env, &uuids[1], "FAILED");
    assert_eq!(steps_of(&env, &uuids[1]), expected("FAILED"));
    let error = env.sql(&format!(
        "SELECT error FROM kser.operations WHERE uuid = '{}'",
        uuids[1]
    ));
    assert!(error.contains("compensation of step 'a'"), "{error}");
    std::fs::write(&flag, "").expect("flag");
    let out = env.kser(&["resume", &uuids[1]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_op(&env, &uuids[1], "COMPENSATED");
    assert_eq!(steps_of(&env, &uuids[1]), expected("SUCCESS"));
}

#[test]
fn resume_runs_again_only_what_did_not_succeed() {
    let env = TestEnv::new();
    let flag = env.dir.path().join("flag");
    let flag_path = flag.to_str().expect("utf-8 path");
    let mut worker = env.start_worker("showcase", &["--concurrency", "4"]);
    worker.wait_assigned();
    let echo = |text: &str| json!({"text": text, "retval": {text: true}});
    let steps = json!([
        {"name": "a", "entrypoint": "showcase.Echo", "params": echo("a")},
        {"name": "c", "entrypoint": "showcase.Echo", "params": echo("c")},
        {"name": "again", "entrypoint": "showcase.Echo", "params": echo("again"),
         "recovery": "rerun"},
        {"name": "optional", "entrypoint": "showcase.Fail", "params": {"reason": "meh"},
         "on_failure": "continue", "recovery": "skip"},
        {"name": "after_optional", "entrypoint": "showcase.Echo", "after": ["optional"],
         "params": echo("after_optional")},
        {"name": "b", "entrypoint": "showcase.Flaky", "after": ["a", "again"],
         "params": {"flag": flag_path}},
        {"name": "join", "entrypoint": "showcase.Echo", "after": ["b", "c"],
         "params": echo("join")}
    ]);
    let uuid = send_batch(&env, &graph(steps)).remove(0);
    wait_op(&env, &uuid, "FAILED");
    let statuses = |env: &TestEnv| -> Vec<String> {
        steps_of(env, &uuid)
            .into_iter()
            .map(|(name, status)| format!("{name}={status}"))
            .collect()
    };
    assert_eq!(
        statuses(&env),
        [
            "a=SUCCESS",
            "c=SUCCESS",
            "again=SUCCESS",
            "optional=FAILED",
            "after_optional=CANCELLED",
            "b=FAILED",
            "join=CANCELLED"
        ]
    );
    let error = env.sql(&format!(
        "SELECT error FROM kser.operations WHERE uuid = '{uuid}'"
    ));
    assert!(error.contains("step 'b'"), "{error}");

    std::fs::write(&flag, "").expect("flag");
    let out = env.kser(&["resume", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_op(&env, &uuid, "SUCCESS");
    assert_eq!(
        statuses(&env),
        [
            "a=SUCCESS",
            "c=SUCCESS",
            "again=SUCCESS",
            "optional=SKIPPED",
            "after_optional=SUCCESS",
            "b=SUCCESS",
            "join=SUCCESS"
        ]
    );
    let attempts: Vec<String> = ["a", "c", "again", "b", "join"]
        .iter()
        .map(|name| format!("{name}={}", task_field(&env, &uuid, name, "attempts")))
        .collect();
    assert_eq!(attempts, ["a=1", "c=1", "again=2", "b=2", "join=1"]);
    // The kept results are merged into the operation's.
    let retval: Value = serde_json::from_str(&env.sql(&format!(
        "SELECT result->'retval' FROM kser.operations WHERE uuid = '{uuid}'"
    )))
    .expect("retval");
    for key in ["a", "c", "again", "join", "after_optional"] {
        assert_eq!(retval[key], json!(true), "{retval}");
    }
    let out = env.kser(&["resume", &uuid]);
    assert!(!out.status.success(), "a SUCCESS operation is not resumed");
}

#[test]
fn bad_graphs_are_refused_before_anything_is_created() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    let echo = json!({"text": "x"});
    let cases = [
        (
            json!([
                {"name": "a", "entrypoint": "showcase.Echo", "params": echo, "after": ["c"]},
                {"name": "b", "entrypoint": "showcase.Echo", "params": echo, "after": ["a"]},
                {"name": "c", "entrypoint": "showcase.Echo", "params": echo, "after": ["b"]},
                {"name": "d", "entrypoint": "showcase.Echo", "params": echo}
            ]),
            "the steps a, b, c depend on each other in a cycle",
        ),
        (
            json!([
                {"name": "a", "entrypoint": "showcase.Echo", "params": echo},
                {"name": "b", "entrypoint": "showcase.Echo", "params": echo, "after": ["nope"]}
            ]),
            "step 2 ('b', showcase.Echo) runs after 'nope', which is no step",
        ),
        (
            json!([
                {"name": "a", "entrypoint": "showcase.Echo", "params": echo},
                {"name": "a", "entrypoint": "showcase.Echo", "params": echo}
            ]),
            "the name 'a' is taken by step 1 already",
        ),
        (
            json!([
                {"name": "a", "entrypoint": "showcase.Echo", "params": echo,
                 "compensate": {"entrypoint": "showcase.Nope"}}
            ]),
            "its compensation (showcase.Nope): unknown entrypoint",
        ),
    ];
    let input: String = cases
        .iter()
        .map(|(steps, _)| graph(steps.clone()))
        .collect();
    let uuids = send_batch(&env, &input);
    for (uuid, (_, why)) in uuids.iter().zip(&cases) {
        wait_op(&env, uuid, "FAILED");
        let error = env.sql(&format!(
            "SELECT error FROM kser.operations WHERE uuid = '{uuid}'"
        ));
        assert!(error.contains(why), "expected `{why}` in `{error}`");
    }
    assert_eq!(count(&env, "SELECT count(*) FROM kser.tasks"), 0);
    assert_eq!(count(&env, "SELECT count(*) FROM kser.steps"), 0);
    assert_eq!(count(&env, "SELECT count(*) FROM kser.outbox"), 0);
}

#[test]
fn an_early_resume_leaves_the_steps_still_running_to_finish_once() {
    let env = TestEnv::new();
    let journal = env.dir.path().join("journal");
    let journal_path = journal.to_str().expect("utf-8 path");
    let flag = env.dir.path().join("flag");
    let flag_path = flag.to_str().expect("utf-8 path");
    let mut worker = env.start_worker_env(
        "showcase",
        &["--concurrency", "8"],
        &[("SHOWCASE_JOURNAL", journal_path)],
    );
    worker.wait_assigned();
    // `flaky` fails (the default policy, fail) 1.5 s in: `slow` has been
    // written RUNNING by then (--running-after 1 s), and `mid`, released
    // with `flaky`, has its message out and is not yet written RUNNING.
    let steps = json!([
        {"name": "slow", "entrypoint": "showcase.Sleep", "params": {"ms": 6000}},
        {"name": "gate", "entrypoint": "showcase.Sleep", "params": {"ms": 1500}},
        {"name": "flaky", "entrypoint": "showcase.Flaky", "after": ["gate"],
         "params": {"flag": flag_path}},
        {"name": "mid", "entrypoint": "showcase.Sleep", "after": ["gate"],
         "params": {"ms": 3000}},
        {"name": "join", "entrypoint": "showcase.Append", "after": ["slow", "flaky", "mid"],
         "params": {"item": "join"}}
    ]);
    let uuid = send_batch(&env, &graph(steps)).remove(0);
    wait_op(&env, &uuid, "FAILED");
    let status_of = |name: &str| task_field(&env, &uuid, name, "status");
    assert_eq!(status_of("slow"), "RUNNING");
    assert!(
        matches!(status_of("mid").as_str(), "PENDING" | "RUNNING"),
        "a step whose message is out is left to finish: {}",
        status_of("mid")
    );
    assert_eq!(status_of("join"), "CANCELLED");

    // Resumed before `slow` and `mid` end: only `flaky` runs again.
    std::fs::write(&flag, "").expect("flag");
    let out = env.kser(&["resume", &uuid]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("started flaky") && said.contains("slow") && said.contains("mid"),
        "{said}"
    );
    wait_op(&env, &uuid, "SUCCESS");
    let statuses: Vec<String> = steps_of(&env, &uuid)
        .into_iter()
        .map(|(name, status)| format!("{name}={status}"))
        .collect();
    assert_eq!(
        statuses,
        [
            "slow=SUCCESS",
            "gate=SUCCESS",
            "flaky=SUCCESS",
            "mid=SUCCESS",
            "join=SUCCESS"
        ]
    );
    let journal = std::fs::read_to_string(&journal).expect("journal");
    for name in ["slow", "mid", "join"] {
        let task = task_field(&env, &uuid, name, "uuid");
        let runs = journal.lines().filter(|l| l.starts_with(&task)).count();
        assert_eq!(runs, 1, "{name} ran {runs} times:\n{journal}");
    }
    let attempts: Vec<String> = ["slow", "flaky", "mid", "join"]
        .iter()
        .map(|name| format!("{name}={}", task_field(&env, &uuid, name, "attempts")))
        .collect();
    assert_eq!(attempts, ["slow=1", "flaky=2", "mid=1", "join=1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_step_message_fails_its_own_step() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    // Both roots wait a minute in the outbox, so neither is published
    // while the test settles `b`'s message as the broker refusing it.
    let steps = json!([
        {"name": "a", "entrypoint": "showcase.Echo", "params": {"text": "a"},
         "delay_ms": 60_000},
        {"name": "b", "entrypoint": "showcase.Echo", "params": {"text": "b"},
         "delay_ms": 60_000},
        {"name": "c", "entrypoint": "showcase.Echo", "after": ["a", "b"],
         "params": {"text": "c"}}
    ]);
    let uuid = send_batch(&env, &graph(steps)).remove(0);
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        2,
        Duration::from_secs(60),
    );
    let b = task_field(&env, &uuid, "b", "uuid");
    let id: i64 = env
        .sql(&format!(
            "SELECT id FROM kser.outbox WHERE payload::jsonb->>'uuid' = '{b}'"
        ))
        .parse()
        .expect("b's outbox row");
    let store = kser::Store::connect(&env.database_url, 2)
        .await
        .expect("store");
    // As the relay calls it when it cannot read the message itself.
    let ended = store
        .fail_unpublishable(id, None, "the broker refused it for good")
        .await
        .expect("settled");
    assert_eq!(ended.map(|op| op.uuid).as_deref(), Some(uuid.as_str()));
    assert_eq!(
        steps_of(&env, &uuid),
        [
            ("a".to_owned(), "CANCELLED".to_owned()),
            ("b".into(), "FAILED".into()),
            ("c".into(), "CANCELLED".into()),
        ]
    );
    let error = env.sql(&format!(
        "SELECT error FROM kser.operations WHERE uuid = '{uuid}'"
    ));
    assert!(
        error.starts_with("step 'b' (showcase.Echo) failed: the broker refused it"),
        "{error}"
    );
    assert_eq!(count(&env, "SELECT count(*) FROM kser.outbox"), 0);
}
