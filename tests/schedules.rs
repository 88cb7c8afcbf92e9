//! Schedules: `kser schedule` adds, lists, pauses, resumes and removes
//! recurring messages; running workers fire each tick once across the
//! fleet, and ticks missed while no worker ran follow the schedule's policy.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestEnv, read_topic, text, wait_until};
use serde_json::Value;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let out = env.kser(args);
    assert!(out.status.success(), "kser {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn tasks_of(env: &TestEnv, schedule: &str) -> i64 {
    env.sql(&format!(
        "SELECT count(*) FROM kser.tasks WHERE metadata->>'schedule' = '{schedule}'"
    ))
    .parse()
    .expect("a count")
}

#[test]
fn a_schedule_fires_each_tick_once_across_workers_until_paused_or_removed() {
    let env = TestEnv::new();
    ok(&env, &["migrate"]);

    let bad = env.kser(&[
        "schedule",
        "add",
        "bad",
        "--cron",
        "61 * * * *",
        "showcase.Echo",
    ]);
    assert!(!bad.status.success());
    let err = text(&bad.stderr);
    assert!(err.contains("bad cron expression \"61 * * * *\""), "{err}");

    let every = [
        "schedule",
        "add",
        "every",
        "--cron",
        "* * * * * *",
        "showcase.Echo",
        "--params",
        r#"{"text": "tick"}"#,
    ];
    ok(&env, &every);
    let again = env.kser(&every);
    assert!(!again.status.success(), "a name is used once");
    assert!(
        text(&again.stderr).contains("exists already"),
        "{}",
        text(&again.stderr)
    );
    let listed: Value = serde_json::from_str(&ok(&env, &["schedule", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], "every");
    assert_eq!(listed[0]["cron"], "* * * * * *");
    assert_eq!(listed[0]["missed"], "skip");

    let mut first = env.start_worker("showcase", &[]);
    let mut second = env.start_worker("showcase", &[]);
    first.wait_assigned();
    second.wait_assigned();
    let run = "SELECT count(*) FROM kser.tasks \
               WHERE metadata->>'schedule' = 'every' AND status = 'SUCCESS'";
    wait_until("five ticks run", Duration::from_secs(30), || {
        env.sql(run).parse::<i64>().unwrap_or(0) >= 5
    });

    // Paused: no tick fires, however long we wait.
    ok(&env, &["schedule", "pause", "every"]);
    let paused = tasks_of(&env, "every");
    let paused_at = env.sql("SELECT now()");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(tasks_of(&env, "every"), paused, "a paused schedule fired");
    assert!(ok(&env, &["schedule", "list"]).contains("paused"));

    // Resumed: it fires again, from the next tick on.
    let resumed_at = env.sql("SELECT now()");
    ok(&env, &["schedule", "resume", "every"]);
    wait_until("a tick after resume", Duration::from_secs(20), || {
        tasks_of(&env, "every") > paused
    });
    // The ticks of the pause never fire, not even after it.
    let skipped = env.sql(&format!(
        "SELECT count(*) FROM kser.tasks WHERE metadata->>'schedule' = 'every' \
         AND (metadata->>'tick')::timestamptz > '{paused_at}' \
         AND (metadata->>'tick')::timestamptz < '{resumed_at}'"
    ));
    assert_eq!(skipped, "0", "ticks of the pause fired");

    ok(&env, &["schedule", "remove", "every"]);
    let removed = tasks_of(&env, "every");
    let gone = env.kser(&["schedule", "remove", "every"]);
    assert!(!gone.status.success());
    assert!(text(&gone.stderr).contains("no schedule named 'every'"));
    assert_eq!(ok(&env, &["schedule", "list", "--json"]).trim(), "[]");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(tasks_of(&env, "every"), removed, "a removed schedule fired");

    // Each tick became one task and one record on the topic, whichever
    // worker fired it; the ticks before the pause follow each other second
    // by second.
    env.wait_count(
        "SELECT count(*) FROM kser.outbox",
        0,
        Duration::from_secs(20),
    );
    let records = read_topic(&env, &env.topic, removed as usize, |r| {
        r["metadata"]["schedule"] == "every"
    });
    let mut per_tick: HashMap<String, usize> = HashMap::new();
    for record in &records {
        let tick = record["metadata"]["tick"]
            .as_str()
            .expect("tick")
            .to_owned();
        *per_tick.entry(tick).or_default() += 1;
    }
    assert_eq!(records.len() as i64, removed, "{per_tick:?}");
    assert!(
        per_tick.values().all(|n| *n == 1),
        "a tick sent twice: {per_tick:?}"
    );
    let ticks: Vec<i64> = env
        .sql(&format!(
            "SELECT extract(epoch FROM (metadata->>'tick')::timestamptz)::bigint FROM kser.tasks \
             WHERE metadata->>'schedule' = 'every' ORDER BY 1 LIMIT {paused}"
        ))
        .lines()
        .map(|l| l.parse().expect("epoch"))
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks skipped or repeated before the pause: {ticks:?}"
    );
    first.terminate(Duration::from_secs(20));
    second.terminate(Duration::from_secs(20));
}

#[test]
fn missed_ticks_are_skipped_or_caught_up_once() {
    let env = TestEnv::new();
    ok(&env, &["migrate"]);
    // Yearly, so no tick falls due on time while the test runs.
    for (name, missed) in [("skipper", "skip"), ("catcher", "once")] {
        ok(
            &env,
            &[
                "schedule",
                "add",
                name,
                "--cron",
                "0 0 1 1 *",
                "showcase.Echo",
                "--params",
                r#"{"text": "late"}"#,
                "--missed",
                missed,
            ],
        );
    }
    // As if every worker had been down for two years.
    env.sql("UPDATE kser.schedules SET next_at = next_at - interval '2 years'");

    let mut worker = env.start_worker("showcase", &[]);
    wait_until("both schedules looked at", Duration::from_secs(20), || {
        env.sql("SELECT count(*) FROM kser.schedules WHERE next_at > now()") == "2"
    });
    env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE metadata->>'schedule' = 'catcher' \
         AND status = 'SUCCESS'",
        1,
        Duration::from_secs(20),
    );
    // The catch-up is for the latest missed tick, this year's.
    assert_eq!(
        env.sql(
            "SELECT (metadata->>'tick')::timestamptz = date_trunc('year', now() AT TIME ZONE 'UTC') \
                 AT TIME ZONE 'UTC' FROM kser.tasks WHERE metadata->>'schedule' = 'catcher'"
        ),
        "t"
    );
    assert_eq!(tasks_of(&env, "skipper"), 0);
    // Both wait for next year's tick, and only the catch-up fired.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(tasks_of(&env, "catcher"), 1);
    assert_eq!(tasks_of(&env, "skipper"), 0);
    assert_eq!(
        env.sql(
            "SELECT count(*) FROM kser.schedules WHERE next_at = \
             date_trunc('year', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 year'"
        ),
        "2"
    );
    worker.terminate(Duration::from_secs(20));
}

#[test]
fn a_worker_binary_refuses_to_schedule_an_entrypoint_it_does_not_register() {
    let env = TestEnv::new();
    ok(&env, &["migrate"]);
    let add = |entrypoint: &str| {
        env.example_cmd(
            "showcase",
            &["schedule", "add", "typo", "--cron", "* * * * *", entrypoint],
        )
    };
    let refused = add("showcase.Ecco");
    assert!(!refused.status.success());
    let err = text(&refused.stderr);
    assert!(
        err.contains("unknown entrypoint 'showcase.Ecco'; registered entrypoints: ")
            && err.contains("showcase.Echo")
            && err.contains("showcase.Graph"),
        "{err}"
    );
    assert_eq!(ok(&env, &["schedule", "list", "--json"]).trim(), "[]");

    // A registered one, task or operation, is taken.
    let added = add("showcase.Echo");
    assert!(added.status.success(), "{}", text(&added.stderr));
    let listed: Value = serde_json::from_str(&ok(&env, &["schedule", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["entrypoint"], "showcase.Echo");
}
