//! A record that can never be stored ends; it never stalls anything.
//!
//! Real Postgres errors are classified as a retry would see them (worth
//! waiting out, or never going to succeed), multi-row statements stay under
//! the protocol's 65,535 bind parameters however big the batch, and
//! end-to-end, a worker records the record Postgres refuses FAILED with its
//! reason, finishes the others and goes on.

mod common;

use std::time::Duration;

use common::TestEnv;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use kser::dead_letter::read_all;
use kser::store::{NewOperation, NewTask, OperationStart, Recovery, StoreError, TaskStatus};
use kser::{KafkaConfig, Producer, Store};

/// How `sql` fails against a real Postgres, as a retry sees it.
async fn recovery_of(conn: &mut AsyncPgConnection, sql: &str) -> (Recovery, String) {
    let err = diesel::sql_query(sql).execute(conn).await.expect_err(sql);
    let err = StoreError::from(err);
    (err.recovery(), err.to_string())
}

#[tokio::test]
async fn real_postgres_errors_are_classified() {
    let env = TestEnv::new();
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let mut conn = AsyncPgConnection::establish(&env.database_url)
        .await
        .expect("connect");
    // Random, so Postgres cannot compress it under the index's limit.
    let long_uuid: String = (0..125)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let permanent = [
        // 22P05: jsonb holds no NUL.
        r#"SELECT '"a\u0000b"'::jsonb"#.to_owned(),
        // 22012, 22P02, 22008, 22003.
        "SELECT 1/0".to_owned(),
        "SELECT 'x'::int".to_owned(),
        "SELECT '294277-01-01'::timestamptz".to_owned(),
        "SELECT 99999999999::int4".to_owned(),
        // 54000: an index row too large (a uuid of 4,000 bytes).
        format!(
            "INSERT INTO kser.tasks (uuid, entrypoint, updated_at) VALUES ('{long_uuid}', 'e', now())"
        ),
        // 23502.
        "INSERT INTO kser.tasks (uuid) VALUES ('u')".to_owned(),
    ];
    for sql in &permanent {
        let (recovery, error) = recovery_of(&mut conn, sql).await;
        assert_eq!(
            recovery,
            Recovery::Permanent,
            "{}: {error}",
            &sql[..sql.len().min(80)]
        );
    }
    let (recovery, error) = recovery_of(&mut conn, "SELECT * FROM kser.no_such_table").await;
    assert_eq!(recovery, Recovery::Transient, "{error}");
    // 57014: cancelled by the statement timeout.
    diesel::sql_query("SET statement_timeout = 10")
        .execute(&mut conn)
        .await
        .expect("set");
    let (recovery, error) = recovery_of(&mut conn, "SELECT pg_sleep(1)").await;
    assert_eq!(recovery, Recovery::Transient, "{error}");
    assert!(error.contains("statement timeout"), "{error}");
    diesel::sql_query("RESET statement_timeout")
        .execute(&mut conn)
        .await
        .expect("reset");
    // A trigger's words kser never saw: for the database to decide.
    diesel::sql_query(
        "CREATE FUNCTION pg_temp.refuse() RETURNS void LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'Zeile abgelehnt'; END $$",
    )
    .execute(&mut conn)
    .await
    .expect("function");
    let (recovery, error) = recovery_of(&mut conn, "SELECT pg_temp.refuse()").await;
    assert_eq!(recovery, Recovery::Unclassified, "{error}");
    // 57P01: the server ends the connection.
    let (recovery, error) =
        recovery_of(&mut conn, "SELECT pg_terminate_backend(pg_backend_pid())").await;
    assert_eq!(recovery, Recovery::Transient, "{error}");

    // More bind parameters than the protocol counts: the client refuses to
    // send the statement, every time.
    let mut conn = AsyncPgConnection::establish(&env.database_url)
        .await
        .expect("connect");
    let values: Vec<String> = (1..=70_000).map(|i| format!("${i}")).collect();
    let mut query = diesel::sql_query(format!("SELECT {}", values.join(" + "))).into_boxed();
    for i in 0..70_000 {
        query = query.bind::<diesel::sql_types::Int4, _>(i);
    }
    let err = StoreError::from(query.execute(&mut conn).await.expect_err("too many"));
    assert_eq!(err.recovery(), Recovery::Permanent, "{err}");
}

fn pending(uuid: String) -> NewTask {
    let mut row = NewTask::new(uuid, "showcase.Echo".into(), TaskStatus::Pending);
    row.params = serde_json::json!({"text": "x"});
    row.worker = Some("w".into());
    row.topic = Some("t".into());
    row.kafka_partition = Some(0);
    row.kafka_offset = Some(1);
    row.enqueued_at = Some(chrono::Utc::now());
    row.started_at = Some(chrono::Utc::now());
    row
}

/// 19 columns × 5,000 rows is 95,000 parameters: one statement could not
/// carry them.
#[tokio::test]
async fn batches_over_the_bind_limit_are_written() {
    let env = TestEnv::new();
    let store = Store::connect(&env.database_url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let rows: Vec<NewTask> = (0..5000).map(|i| pending(format!("p{i}"))).collect();
    let inserted = store.record_pending(&rows).await.expect("record_pending");
    assert_eq!(inserted.len(), 5000);

    let finished: Vec<NewTask> = (0..5000)
        .map(|i| {
            let mut row = pending(format!("f{i}"));
            row.status = TaskStatus::Failed.as_str();
            row.error = Some("refused".into());
            row.finished_at = Some(chrono::Utc::now());
            row
        })
        .collect();
    assert_eq!(store.finish_tasks(&finished).await.expect("finish"), 5000);

    // One operation of 5,000 steps, and 3,000 operations in one batch.
    let now = chrono::Utc::now();
    let operation = |uuid: &str, steps: usize| {
        let tasks: Vec<NewTask> = (0..steps)
            .map(|i| {
                let mut task = pending(format!("{uuid}-s{i}"));
                task.operation_uuid = Some(uuid.to_owned());
                task.position = Some(i as i32);
                task
            })
            .collect();
        OperationStart {
            operation: NewOperation {
                uuid: uuid.to_owned(),
                entrypoint: "showcase.Chain".into(),
                status: TaskStatus::Running.as_str(),
                params: serde_json::json!({}),
                metadata: serde_json::json!({}),
                result: None,
                error: None,
                steps: steps as i32,
                worker: Some("w".into()),
                topic: Some("t".into()),
                enqueued_at: Some(now),
                started_at: Some(now),
                finished_at: None,
                updated_at: now,
                graph: false,
            },
            tasks,
            graph: Vec::new(),
        }
    };
    let created = store
        .create_operations(&[operation("big", 5000)])
        .await
        .expect("one operation of 5,000 steps");
    assert_eq!(created, ["big"]);
    let many: Vec<OperationStart> = (0..3000).map(|i| operation(&format!("o{i}"), 1)).collect();
    let created = store
        .create_operations(&many)
        .await
        .expect("3,000 operations");
    assert_eq!(created.len(), 3000);
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.outbox"),
        "3001",
        "each operation's first step is queued"
    );
}

/// One batch: good records around three that Postgres could never hold. The
/// good ones succeed, the bad ones end (FAILED with their reason, or
/// dead-lettered when not even their uuid can be stored), and the worker
/// goes on with new records.
#[tokio::test(flavor = "multi_thread")]
async fn records_postgres_refuses_end_and_the_rest_goes_on() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &["--batch-size", "100"]);
    worker.wait_assigned();
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    let long_uuid = "u".repeat(3000);
    let mut records = Vec::new();
    for i in 0..40 {
        records.push(format!(
            r#"{{"uuid":"good-{i}","entrypoint":"showcase.Echo","params":{{"text":"ok"}}}}"#
        ));
        match i {
            10 => records.push(
                r#"{"uuid":"nul-result","entrypoint":"showcase.Sized","params":{"bytes":10,"nul":true}}"#.into(),
            ),
            20 => records.push(
                r#"{"uuid":"nul-params","entrypoint":"showcase.Echo","params":{"text":"a\u0000b"}}"#.into(),
            ),
            30 => records.push(format!(
                r#"{{"uuid":"{long_uuid}","entrypoint":"showcase.Echo","params":{{"text":"x"}}}}"#
            )),
            _ => {}
        }
    }
    let sends = records
        .iter()
        .map(|record| producer.send_raw(&env.topic, None, Some(record.as_bytes())));
    for sent in futures::future::join_all(sends).await {
        sent.expect("send");
    }
    for i in 0..40 {
        assert_eq!(env.wait_final(&format!("good-{i}"))["status"], "SUCCESS");
    }
    let nul_result = env.wait_final("nul-result");
    assert_eq!(nul_result["status"], "FAILED");
    let error = nul_result["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("could not store the task in Postgres")
            && error.contains("Unicode escape"),
        "{error}"
    );
    let nul_params = env.wait_final("nul-params");
    assert_eq!(nul_params["status"], "FAILED");
    let error = nul_params["error"].as_str().unwrap_or_default();
    assert!(error.contains("params.text holds a \\u0000"), "{error}");

    let kafka = KafkaConfig::new(env.brokers.clone());
    let dlq = format!("{}.dlq", env.topic);
    let mut long = None;
    common::wait_until(
        "the long uuid dead-lettered",
        Duration::from_secs(30),
        || {
            let entries = futures::executor::block_on(read_all(&kafka, &dlq)).expect("read");
            long = entries.into_iter().find(|e| {
                e.error
                    .as_deref()
                    .is_some_and(|e| e.contains("`uuid` is 3000 bytes"))
            });
            long.is_some()
        },
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE length(uuid) > 128"),
        "0"
    );

    let after = env.send("showcase", "showcase.Echo", r#"{"text": "after"}"#);
    assert_eq!(env.wait_final(&after)["status"], "SUCCESS");
    assert!(worker.exited().is_none(), "the worker lives");
    worker.terminate(Duration::from_secs(20));
}

/// A result over `--max-result-bytes` ends its task FAILED, "result too
/// large", not retried; a result under it is kept whole.
#[test]
fn a_result_over_the_cap_ends_failed_and_the_worker_goes_on() {
    let env = TestEnv::new();
    let mut worker = env.start_worker(
        "showcase",
        &["--max-result-bytes", "4096", "--max-attempts", "3"],
    );
    worker.wait_assigned();
    let big = env.send("showcase", "showcase.Sized", r#"{"bytes": 5000}"#);
    let small = env.send("showcase", "showcase.Sized", r#"{"bytes": 3000}"#);
    let failed = env.wait_final(&big);
    assert_eq!(failed["status"], "FAILED", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("result too large"), "{failed}");
    assert!(error.contains("4096"), "{failed}");
    assert_eq!(failed["attempts"], 1, "not retried: {failed}");
    let kept = env.wait_final(&small);
    assert_eq!(kept["status"], "SUCCESS", "{kept}");
    assert_eq!(
        kept["result"]["stdout"].as_str().map(str::len),
        Some(3000),
        "{kept}"
    );
    assert!(worker.exited().is_none(), "the worker lives");
    worker.terminate(Duration::from_secs(20));
}

/// Installs a trigger on `kser.tasks` that refuses the rows `condition`
/// picks with words kser does not know (as a server speaking German would).
fn refuse_rows_in_german(env: &TestEnv, condition: &str) {
    env.sql(&format!(
        "CREATE OR REPLACE FUNCTION kser.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF {condition} THEN RAISE EXCEPTION 'Zeile abgelehnt'; END IF; RETURN NEW; END $$; \
         CREATE OR REPLACE TRIGGER refuse BEFORE INSERT OR UPDATE ON kser.tasks \
         FOR EACH ROW EXECUTE FUNCTION kser.refuse()"
    ));
}

/// An error kser cannot place (its words unknown, its SQLSTATE lost on the
/// way) is decided by a known-good write: refused for one record while
/// others are stored, it ends that record FAILED; refused for every write,
/// it is waited out like an outage and nothing ends FAILED for it.
#[tokio::test(flavor = "multi_thread")]
async fn errors_in_unknown_words_are_decided_by_the_database() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &["--batch-size", "100"]);
    worker.wait_assigned();
    let producer = Producer::new(&KafkaConfig::new(env.brokers.clone())).expect("producer");
    let send_all = async |records: Vec<String>| {
        let sends = records
            .iter()
            .map(|record| producer.send_raw(&env.topic, None, Some(record.as_bytes())));
        for sent in futures::future::join_all(sends).await {
            sent.expect("send");
        }
    };
    let echo = |uuid: &str, text: &str| {
        format!(r#"{{"uuid":"{uuid}","entrypoint":"showcase.Echo","params":{{"text":"{text}"}}}}"#)
    };

    // One record at fault.
    refuse_rows_in_german(&env, "NEW.result::text LIKE '%poison%'");
    let mut records: Vec<String> = (0..20).map(|i| echo(&format!("fine-{i}"), "ok")).collect();
    records.insert(10, echo("poisoned", "poison"));
    send_all(records).await;
    for i in 0..20 {
        assert_eq!(env.wait_final(&format!("fine-{i}"))["status"], "SUCCESS");
    }
    let poisoned = env.wait_final("poisoned");
    assert_eq!(poisoned["status"], "FAILED", "{poisoned}");
    let error = poisoned["error"].as_str().unwrap_or_default();
    assert!(error.contains("Zeile abgelehnt"), "{poisoned}");

    // Every write refused: an outage, waited out.
    refuse_rows_in_german(&env, "NEW.entrypoint <> ''");
    send_all((0..5).map(|i| echo(&format!("held-{i}"), "ok")).collect()).await;
    worker.wait_for_log(
        "nor write a known-good row; retrying",
        1,
        Duration::from_secs(60),
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid LIKE 'held-%' AND status = 'FAILED'"),
        "0"
    );
    env.sql("DROP TRIGGER refuse ON kser.tasks");
    for i in 0..5 {
        let held = env.wait_final(&format!("held-{i}"));
        assert_eq!(held["status"], "SUCCESS", "{held}");
    }
    assert!(worker.exited().is_none(), "the worker lives");
    worker.terminate(Duration::from_secs(20));
}

/// A task whose outcome Postgres refuses is stored FAILED without the
/// refused values, still fenced by its attempt: if a newer attempt started
/// elsewhere meanwhile, the stripped row leaves that attempt's row alone.
#[test]
fn a_stripped_outcome_never_overwrites_a_newer_attempt() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    // Words kser knows as a data exception (22P02): permanent.
    env.sql(
        "CREATE FUNCTION kser.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.status = 'SUCCESS' AND NEW.result::text LIKE '%slept_ms%' THEN \
         RAISE EXCEPTION 'invalid input syntax for a sleep'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON kser.tasks \
         FOR EACH ROW EXECUTE FUNCTION kser.refuse()",
    );
    let out = env.example_cmd(
        "showcase",
        &[
            "send",
            "showcase.Sleep",
            "--uuid",
            "sleeper",
            "--params",
            r#"{"ms": 3000}"#,
        ],
    );
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    common::wait_until("the task to run", Duration::from_secs(30), || {
        env.status("sleeper")["status"] == "RUNNING"
    });
    // A redelivery started it again on another worker.
    env.sql("UPDATE kser.tasks SET attempts = attempts + 1, worker = 'elsewhere:1' WHERE uuid = 'sleeper'");
    // The stripped row was written, or fenced out.
    worker.wait_for_log(
        "stored the task FAILED without the values Postgres refused",
        1,
        Duration::from_secs(30),
    );
    assert_eq!(
        env.sql("SELECT status || ' ' || attempts || ' ' || worker FROM kser.tasks WHERE uuid = 'sleeper'"),
        "RUNNING 2 elsewhere:1"
    );
    assert!(worker.exited().is_none(), "the worker lives");
    worker.terminate(Duration::from_secs(20));
}
