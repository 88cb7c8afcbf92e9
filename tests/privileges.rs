//! Least privilege: a worker runs with a database role that has only the
//! grants the README lists, on a schema an administrator migrated; a role
//! short of one grant stops the worker at start with one error naming it.

mod common;

use std::time::Duration;

use common::{TestEnv, WorkerProcess, example_path, text};

/// The grants README's "Least privilege" section gives a worker's role,
/// word for word (the test of the README is this test).
fn worker_grants(database: &str, role: &str) -> String {
    format!(
        "GRANT CONNECT ON DATABASE {database} TO {role};
         GRANT USAGE ON SCHEMA kser TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA kser TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA kser TO {role};
         GRANT SELECT ON public.__diesel_schema_migrations TO {role};"
    )
}

/// A login role of the test cluster, dropped (after the test's database,
/// which holds its grants) when this goes out of scope. Declare it before
/// the `TestEnv`, so it is dropped after.
struct Role {
    name: String,
    admin_url: String,
}

impl Role {
    fn new() -> Self {
        let admin_url = std::env::var("KSER_TEST_DATABASE_URL").expect("KSER_TEST_DATABASE_URL");
        let name = format!(
            "kser_worker_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        psql(&admin_url, &format!("CREATE ROLE {name} LOGIN"));
        Self { name, admin_url }
    }

    /// `env`'s database URL, connecting as this role (the test cluster
    /// trusts local connections, so no password).
    fn url(&self, env: &TestEnv) -> String {
        let (scheme, rest) = env.database_url.split_once("://").expect("a URL");
        let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{host_and_db}", self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                &self.admin_url,
                "-qc",
                &format!("DROP ROLE IF EXISTS {}", self.name),
            ])
            .output();
    }
}

fn psql(url: &str, query: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", query])
        .output()
        .expect("psql is installed");
    assert!(out.status.success(), "psql {query}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn database_name(env: &TestEnv) -> String {
    env.sql("SELECT current_database()")
}

/// Starts the showcase worker connecting as `role`, with `extra` env.
fn start_worker_as(env: &TestEnv, role: &Role, extra: &[(&str, &str)]) -> WorkerProcess {
    let log = env
        .dir
        .path()
        .join(format!("worker-{}.log", uuid::Uuid::new_v4().simple()));
    let mut command = env.command(&example_path("showcase"));
    command
        .env("DATABASE_URL", role.url(env))
        .envs(extra.iter().copied())
        .args(["worker", "--concurrency", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    WorkerProcess::spawn(&mut command, log)
}

#[test]
fn a_worker_runs_tasks_and_operations_with_only_the_documented_grants() {
    let role = Role::new();
    let env = TestEnv::new();
    let migrated = env.kser(&["migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    env.sql(&worker_grants(&database_name(&env), &role.name));
    // Nothing else: no CREATE anywhere (Postgres 15 gives PUBLIC none on
    // schema public; revoked again in case the cluster is older).
    env.sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let creates = env.sql(&format!(
        "SELECT has_database_privilege('{r}', current_database(), 'CREATE'), \
                has_schema_privilege('{r}', 'kser', 'CREATE'), \
                has_schema_privilege('{r}', 'public', 'CREATE')",
        r = role.name
    ));
    assert_eq!(creates, "f|f|f", "the role must not be able to create");

    let mut worker = start_worker_as(&env, &role, &[]);
    worker.wait_assigned();
    let echo = env.send("showcase", "showcase.Echo", r#"{"text": "least"}"#);
    let retried = env.send("showcase", "showcase.FailTimes", r#"{"times": 1}"#);
    let failed = env.send("showcase", "showcase.Fail", r#"{"reason": "no"}"#);
    let chain = env.send("showcase", "showcase.Chain", r#"{"count": 3}"#);
    for uuid in [&echo, &retried] {
        let status = env.wait_final(uuid);
        assert_eq!(status["status"], "SUCCESS", "{status}\n{}", worker.log());
    }
    assert_eq!(env.wait_final(&failed)["status"], "FAILED");
    env.wait_count(
        &format!(
            "SELECT count(*) FROM kser.operations WHERE uuid = '{chain}' AND status = 'SUCCESS'"
        ),
        1,
        Duration::from_secs(60),
    );
    assert_eq!(
        env.sql(&format!(
            "SELECT count(*) FROM kser.task_attempts WHERE task_uuid = '{retried}'"
        )),
        "1",
        "the retry's failed attempt is recorded"
    );
    let log = worker.log();
    assert!(!log.contains("permission denied"), "{log}");
    assert!(!log.contains("applied migrations"), "{log}");
    assert!(worker.terminate(Duration::from_secs(30)).success());

    // --no-migrate (here from the environment) starts the same way.
    let mut worker = start_worker_as(&env, &role, &[("KSER_NO_MIGRATE", "true")]);
    worker.wait_assigned();
    let echo = env.send("showcase", "showcase.Echo", r#"{"text": "again"}"#);
    assert_eq!(env.wait_final(&echo)["status"], "SUCCESS");

    // A grant revoked while it runs: the worker says which, waits, and
    // finishes the task once it is granted again; nothing is lost.
    env.sql(&format!("REVOKE UPDATE ON kser.tasks FROM {}", role.name));
    let blocked = env.send("showcase", "showcase.Echo", r#"{"text": "blocked"}"#);
    worker.wait_for_log(
        "the worker's role lacks a privilege",
        1,
        Duration::from_secs(60),
    );
    assert!(
        worker.log().contains("permission denied for table tasks"),
        "{}",
        worker.log()
    );
    env.sql(&format!("GRANT UPDATE ON kser.tasks TO {}", role.name));
    assert_eq!(env.wait_final(&blocked)["status"], "SUCCESS");
    assert!(worker.terminate(Duration::from_secs(30)).success());
}

#[test]
fn a_missing_grant_is_named_once_and_the_worker_stops() {
    let role = Role::new();
    let env = TestEnv::new();
    let migrated = env.kser(&["migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    env.sql(&worker_grants(&database_name(&env), &role.name));
    env.sql(&format!(
        "REVOKE DELETE ON kser.outbox FROM {r}; REVOKE UPDATE ON kser.tasks FROM {r}",
        r = role.name
    ));
    let mut worker = start_worker_as(&env, &role, &[]);
    let status = worker.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    let log = worker.log();
    assert!(
        log.contains(&format!(
            "permission denied: the role '{}' lacks UPDATE on kser.tasks; DELETE on kser.outbox",
            role.name
        )),
        "{log}"
    );
    assert!(log.contains("see README"), "{log}");
    assert_eq!(
        log.matches("permission denied").count(),
        1,
        "said once: {log}"
    );
    assert!(!log.contains("worker started"), "it never joins: {log}");

    // Without USAGE on the schema Postgres cannot name the tables: that is
    // what the error says.
    env.sql(&format!("REVOKE USAGE ON SCHEMA kser FROM {}", role.name));
    let mut worker = start_worker_as(&env, &role, &[]);
    assert!(!worker.wait_exit(Duration::from_secs(60)).success());
    assert!(
        worker.log().contains("lacks USAGE on schema kser"),
        "{}",
        worker.log()
    );
}

#[test]
fn a_worker_never_migrates_with_no_migrate_and_says_who_must() {
    let role = Role::new();
    let env = TestEnv::new();
    let database = database_name(&env);
    env.sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    env.sql(&format!(
        "GRANT CONNECT ON DATABASE {database} TO {}",
        role.name
    ));

    // The administrator's own URL, but --no-migrate: nothing is created.
    let mut command = env.command(&example_path("showcase"));
    let out = command
        .args(["worker", "--no-migrate"])
        .output()
        .expect("run the worker");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--no-migrate"), "{stderr}");
    assert!(stderr.contains("run `kser migrate`"), "{stderr}");
    assert_eq!(
        env.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'kser'"),
        "0",
        "nothing was created"
    );

    // A role without CREATE, on a database that is not migrated: the
    // error says the owner must migrate.
    let mut worker = start_worker_as(&env, &role, &[]);
    assert!(!worker.wait_exit(Duration::from_secs(60)).success());
    let log = worker.log();
    assert!(
        log.contains("run `kser migrate` as the schema's owner"),
        "{log}"
    );
    assert!(log.contains("permission denied"), "{log}");
}
