//! Bad input on the command side: secrets in settings, records that would
//! drive a terminal, a database never migrated, batch files with a BOM or
//! duplicate uuids, numbers and topic names that make no sense. Each gets a
//! clear error, or is shown harmlessly, and loses nothing.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{TestEnv, example_path, text};

const SECRET: &str = "KNOWNSECRET-7f3a";

/// A local port nothing listens on.
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn kser_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kser"))
}

/// Runs `program ARGS` with this test's settings, `envs` on top.
fn run_with(env: &TestEnv, program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command: Command = env.command(program);
    command
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.output().expect("run")
}

/// Everything a run printed.
fn printed(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// A command line to run: program, arguments, environment on top of the
/// test's.
#[derive(Clone)]
struct Run {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Run {
    fn new(program: &Path, args: &[&str]) -> Self {
        Self {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: Vec::new(),
        }
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    fn label(&self) -> String {
        let envs: Vec<String> = self.envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{} {} {}",
            envs.join(" "),
            self.program.display(),
            self.args.join(" ")
        )
    }
}

/// Runs them all at once (the ones that wait for a broker take seconds each).
fn run_all(env: &TestEnv, runs: &[Run]) -> Vec<Output> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|run| {
                scope.spawn(move || {
                    let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
                    let envs: Vec<(&str, &str)> = run
                        .envs
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    run_with(env, &run.program, &args, &envs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("run"))
            .collect()
    })
}

/// Every command, against Postgres settings holding a password in each form
/// Postgres reads (URL, `?password=`, key=value) at a port nothing listens
/// on, and against a broker with SASL secrets in `-X` and `KSER_KAFKA_*`:
/// each fails, says why, and prints no secret, at any log level.
#[test]
fn no_command_prints_a_secret() {
    let env = TestEnv::new();
    let port = dead_port();
    let database_urls = [
        format!("postgres://kser:{SECRET}@127.0.0.1:{port}/kser"),
        format!("postgres://kser@127.0.0.1:{port}/kser?password={SECRET}"),
        format!("host=127.0.0.1 port={port} user=kser password={SECRET} dbname=kser"),
    ];
    let kser = kser_path();
    let showcase = example_path("showcase");
    let uuid = "00000000-0000-4000-8000-000000000000";
    let mut runs = Vec::new();
    // Commands that need the database; the broker is the test's own.
    for url in &database_urls {
        for (program, args) in [
            (&kser, vec!["status", uuid]),
            (&kser, vec!["status", uuid, "--json"]),
            (&kser, vec!["list"]),
            (&kser, vec!["watch", uuid, "--timeout", "1"]),
            (&kser, vec!["resume", uuid]),
            (&kser, vec!["cancel", uuid]),
            (&kser, vec!["migrate"]),
            (&kser, vec!["dlq", "list"]),
            (&kser, vec!["dlq", "replay", "--all"]),
            (&kser, vec!["send", "showcase.Echo", "--params", "{}"]),
            (&showcase, vec!["worker"]),
        ] {
            runs.push(
                Run::new(program, &args)
                    .env("DATABASE_URL", url)
                    .env("RUST_LOG", "debug"),
            );
        }
        runs.push(Run::new(&kser, &["--database-url", url, "list"]).env("RUST_LOG", "debug"));
    }
    // A broker that does not answer, with SASL secrets to hand it: the
    // commands that reach Kafka time out, with librdkafka's debug output
    // (its configuration dump among it) in the log.
    let brokers = format!("127.0.0.1:{}", dead_port());
    let password = format!("sasl.password={SECRET}");
    let sasl = [
        "-X",
        "security.protocol=SASL_PLAINTEXT",
        "-X",
        "sasl.mechanism=PLAIN",
        "-X",
        "sasl.username=kser",
        "-X",
        &password,
    ];
    for (program, args) in [
        (&kser, vec!["send", "showcase.Echo", "--params", "{}"]),
        (&kser, vec!["dlq", "list"]),
        (&kser, vec!["dlq", "replay", "--all"]),
        (&showcase, vec!["worker"]),
        (&kser, vec!["-X", "debug=conf,security,broker", "send", "e"]),
    ] {
        let all: Vec<&str> = sasl.iter().copied().chain(args).collect();
        runs.push(
            Run::new(program, &all)
                .env("KSER_BROKERS", &brokers)
                .env("KSER_KAFKA_SSL_KEY_PASSWORD", SECRET)
                .env("RUST_LOG", "debug"),
        );
    }
    // The same secrets, logged as JSON (--log-format json).
    for (program, args) in [
        (&showcase, vec!["worker"]),
        (&kser, vec!["send", "showcase.Echo", "--params", "{}"]),
    ] {
        let all: Vec<&str> = sasl.iter().copied().chain(args).collect();
        runs.push(
            Run::new(program, &all)
                .env("DATABASE_URL", &database_urls[2])
                .env("KSER_BROKERS", &brokers)
                .env("KSER_KAFKA_SSL_KEY_PASSWORD", SECRET)
                .env("KSER_LOG_FORMAT", "json")
                .env("RUST_LOG", "debug"),
        );
    }
    // Properties librdkafka refuses, or that are not key=value.
    let unknown = format!("my.secret.option={SECRET}");
    let colon = format!("sasl.password:{SECRET}");
    let pem = format!("ssl.key.pem={SECRET}");
    for args in [
        vec!["-X", &unknown, "send", "e"],
        vec!["-X", &colon, "send", "e"],
        vec!["-X", &pem, "-X", "security.protocol=SSL", "send", "e"],
    ] {
        runs.push(Run::new(&kser, &args).env("RUST_LOG", "debug"));
    }

    let outputs = run_all(&env, &runs);
    for (run, out) in runs.iter().zip(&outputs) {
        let all = printed(out);
        let label = run.label();
        assert!(!out.status.success(), "{label} succeeded:\n{all}");
        assert!(!all.contains(SECRET), "{label} printed the secret:\n{all}");
        assert!(all.contains("error"), "{label} said no error:\n{all}");
        assert!(!all.contains("panicked"), "{label} panicked:\n{all}");
    }
    // The unreachable database is named, without its password.
    let status = printed(&outputs[0]);
    assert!(
        status.contains(&format!("postgres://kser@127.0.0.1:{port}/kser")),
        "{status}"
    );
    let key_value = printed(&outputs[2 * 12]);
    assert!(
        key_value.contains(&format!("postgres://kser@127.0.0.1:{port}/kser")),
        "{key_value}"
    );
}

/// A database nobody migrated: every command that reads kser's tables says
/// to run `kser migrate`, naming the cause once; `migrate` then fixes it.
#[test]
fn a_database_never_migrated_asks_for_migrate() {
    let env = TestEnv::new();
    let kser = kser_path();
    let uuid = "00000000-0000-4000-8000-000000000001";
    let runs: Vec<Run> = [
        vec!["status", uuid],
        vec!["status", uuid, "--json"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["watch", uuid, "--timeout", "5"],
        vec!["resume", uuid],
        vec!["cancel", uuid],
        vec!["dlq", "list"],
        vec!["send", "showcase.Echo", "--params", "{}"],
    ]
    .iter()
    .map(|args| Run::new(&kser, args))
    .collect();
    for (run, out) in runs.iter().zip(run_all(&env, &runs)) {
        let label = run.label();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{label} succeeded");
        assert!(
            stderr.contains("not migrated") && stderr.contains("run `kser migrate`"),
            "{label}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{label} said more: {stderr}");
    }
    // Nothing was sent while the database could not record it.
    let out = env.kser(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(env.sql("SELECT count(*) FROM kser.tasks"), "0");
    let out = env.kser(&["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `watch` exit codes: 0 SUCCESS, 1 FAILED or CANCELLED, 2 an error,
/// 124 a timeout.
#[test]
fn watch_exit_codes_tell_outcomes_apart() {
    let env = TestEnv::new();
    let out = env.kser(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.sql(
        "INSERT INTO kser.tasks (uuid, entrypoint, status, error) VALUES \
         ('w-success', 'e', 'SUCCESS', NULL), ('w-failed', 'e', 'FAILED', 'no'), \
         ('w-pending', 'e', 'PENDING', NULL); \
         INSERT INTO kser.operations (uuid, entrypoint, status) VALUES ('w-cancelled', 'op', 'CANCELLED')",
    );
    let code = |args: &[&str]| env.kser(args).status.code();
    assert_eq!(code(&["watch", "w-success"]), Some(0));
    assert_eq!(code(&["watch", "w-failed"]), Some(1));
    assert_eq!(code(&["watch", "w-cancelled"]), Some(1));
    assert_eq!(code(&["watch", "w-pending", "--timeout", "0.3"]), Some(124));
    assert_eq!(
        code(&["watch", "w-never-sent", "--timeout", "0.3"]),
        Some(124)
    );
    // Errors: the database unreachable, bad arguments.
    let dead = format!("postgres://kser@127.0.0.1:{}/kser", dead_port());
    let out = run_with(
        &env,
        &kser_path(),
        &["watch", "w-failed"],
        &[("DATABASE_URL", &dead)],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(code(&["watch", "w-failed", "--interval", "soon"]), Some(2));
    // The codes are in --help.
    let help = text(&env.kser(&["watch", "--help"]).stdout);
    assert!(help.contains("124") && help.contains("CANCELLED"), "{help}");
}

/// Terminal control sequences in what records carry (entrypoint, uuid,
/// params, error, stdout): `status`, `list`, `watch`, `dlq list`, `send`
/// and the worker's log show them escaped, never raw.
#[test]
fn records_cannot_drive_the_terminal() {
    let env = TestEnv::new();
    let mut worker = env.start_worker("showcase", &[]);
    worker.wait_assigned();
    // Retitle the window, ring, turn red, clear the screen, overwrite the line.
    let hostile = "\x1b]0;owned\x07\x1b[31mred\x1b[2J\rover\u{9b}1m";
    let send = |args: &[&str]| {
        let out = env.example_cmd("showcase", args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let echo_params = serde_json::json!({ "text": hostile }).to_string();
    let fail_params = serde_json::json!({ "reason": hostile }).to_string();
    let evil_uuid = format!("uuid-{hostile}");
    let printed_uuid = send(&[
        "send",
        "showcase.Echo",
        "--params",
        &echo_params,
        "--uuid",
        &evil_uuid,
    ]);
    assert!(printed_uuid.contains("\\u{1b}"), "{printed_uuid}");
    let failed = send(&["send", "showcase.Fail", "--params", &fail_params]);
    let unknown = send(&["send", &format!("showcase.{hostile}")]);
    let mut outputs = Vec::new();
    for uuid in [evil_uuid.as_str(), &failed, &unknown] {
        env.wait_final(uuid);
        outputs.push(env.kser(&["status", uuid]));
        outputs.push(env.kser(&["watch", uuid]));
    }
    outputs.push(env.kser(&["list"]));
    common::wait_until(
        "two dead letters",
        std::time::Duration::from_secs(30),
        || {
            let out = env.kser(&["dlq", "list", "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                == Some(2)
        },
    );
    outputs.push(env.kser(&["dlq", "list"]));
    let mut all = String::new();
    for out in &outputs {
        all.push_str(&printed(out));
    }
    all.push_str(&worker.log());
    for raw in ['\x1b', '\x07', '\r', '\u{9b}'] {
        assert!(!all.contains(raw), "{raw:?} printed raw:\n{all}");
    }
    // Shown, not dropped: the escaped text is there.
    assert!(all.contains("\\u{1b}]0;owned\\u{7}\\u{1b}[31mred"), "{all}");
    assert!(all.contains("\\rover\\u{9b}1m"), "{all}");
}

/// `send --batch`: a byte-order mark before the first line is skipped; a
/// uuid used twice in the input is an error, not printed as sent twice. A
/// uuid sent again with other content is refused; the same message again
/// is a resend.
#[test]
fn send_refuses_reused_uuids_and_accepts_a_bom() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let input = "\u{feff}{\"entrypoint\": \"showcase.Echo\", \"uuid\": \"dup-1\", \"params\": {\"text\": \"first\"}}\n\
                 {\"entrypoint\": \"showcase.Echo\", \"uuid\": \"dup-2\", \"params\": {\"text\": \"b\"}}\n\
                 {\"entrypoint\": \"showcase.Echo\", \"uuid\": \"dup-1\", \"params\": {\"text\": \"second\"}}\n";
    let out = env.run(&kser_path(), &["send", "--batch", "-"], Some(input));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["dup-1", "dup-2"],
        "{stderr}"
    );
    assert!(
        stderr.contains("line 3: not sent: uuid dup-1 is already used on line 1"),
        "{stderr}"
    );
    assert!(stderr.contains("sent 2 messages"), "{stderr}");
    assert_eq!(
        env.sql("SELECT params->>'text' FROM kser.tasks WHERE uuid = 'dup-1'"),
        "first"
    );

    // Another message under a known uuid: refused, in --batch and alone.
    let other = r#"{"entrypoint": "showcase.Echo", "uuid": "dup-2", "params": {"text": "other"}}"#;
    let out = env.run(&kser_path(), &["send", "--batch", "-"], Some(other));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("exists with another entrypoint"),
        "{}",
        text(&out.stderr)
    );
    let send = |params: &str| {
        env.kser(&[
            "send",
            "showcase.Echo",
            "--uuid",
            "dup-1",
            "--params",
            params,
        ])
    };
    let out = send(r#"{"text": "second"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("dup-1") && text(&out.stderr).contains("use a new uuid"),
        "{}",
        text(&out.stderr)
    );
    // The same message again is a resend, as before.
    let out = send(r#"{"text": "first"}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "dup-1");
    assert_eq!(
        env.sql("SELECT params->>'text' FROM kser.tasks WHERE uuid = 'dup-1'"),
        "first"
    );
}

/// Input over `--max-input-bytes` is refused with nothing sent: a batch
/// file, a params file; standard input stops at the line that passes it.
/// A batch line over 16 MiB is skipped without being held whole.
#[test]
fn send_refuses_input_over_its_cap() {
    let env = TestEnv::new();
    assert!(env.kser(&["migrate"]).status.success());
    let line = |i: usize| {
        format!(
            "{{\"entrypoint\": \"showcase.Echo\", \"uuid\": \"cap-{i}\", \"params\": {{\"text\": \"{i}\"}}}}\n"
        )
    };
    let input: String = (0..3).map(line).collect();
    let file = env.dir.path().join("batch.jsonl");
    std::fs::write(&file, &input).expect("write");
    let cap = (input.len() - 1).to_string();
    let out = env.kser(&[
        "send",
        "--batch",
        file.to_str().expect("path"),
        "--max-input-bytes",
        &cap,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is {} bytes, more than the {cap} bytes allowed (--max-input-bytes): nothing sent",
            input.len()
        )),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "");
    assert_eq!(env.sql("SELECT count(*) FROM kser.tasks"), "0");
    let kafka = kser::KafkaConfig::new(env.brokers.clone());
    let records = futures::executor::block_on(kser::dead_letter::read_all(&kafka, &env.topic))
        .expect("read the topic");
    assert!(records.is_empty(), "nothing reached Kafka: {records:?}");

    // The same file fits under its own size.
    let fits = input.len().to_string();
    let path = file.to_str().expect("path");
    let out = env.kser(&["send", "--batch", path, "--max-input-bytes", &fits]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(env.sql("SELECT count(*) FROM kser.tasks"), "3");

    // Standard input has no size up front: read up to the cap, and nothing
    // from the line that passes it.
    let more: String = (3..6).map(line).collect();
    let cap = (2 * line(3).len() + 10).to_string();
    let out = env.run(
        &kser_path(),
        &["send", "--batch", "-", "--max-input-bytes", &cap],
        Some(&more),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        ["cap-3", "cap-4"]
    );
    assert!(
        stderr.contains(&format!(
            "the input passed the {cap} bytes allowed (--max-input-bytes) at line 3: nothing from that line on was sent"
        )),
        "{stderr}"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid = 'cap-5'"),
        "0"
    );

    // A line over 16 MiB is reported and skipped; the next one is sent.
    let huge = format!("{}\n{}", "x".repeat(17 << 20), line(6));
    let out = env.run(&kser_path(), &["send", "--batch", "-"], Some(&huge));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 1: not sent: longer than 16777216 bytes"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout).trim(), "cap-6");

    // A params file over its cap (16 MiB unless told): nothing sent.
    let params = env.dir.path().join("params.json");
    std::fs::write(&params, format!("{{\"text\": \"{}\"}}", "y".repeat(300))).expect("write");
    let params = params.to_str().expect("path");
    let out = env.kser(&[
        "send",
        "showcase.Echo",
        "--uuid",
        "cap-params",
        "--params-file",
        params,
        "--max-input-bytes",
        "100",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is more than the 100 bytes allowed (--max-input-bytes): nothing sent"),
        "{stderr}"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM kser.tasks WHERE uuid = 'cap-params'"),
        "0"
    );
    let out = env.kser(&[
        "send",
        "showcase.Echo",
        "--uuid",
        "cap-params",
        "--params-file",
        params,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Absurd numbers and topic names, from flags or the environment: a clear
/// error naming the setting, before anything runs; no panic, no clamp.
#[test]
fn absurd_settings_are_refused_up_front() {
    let env = TestEnv::new();
    // Migrated, so that a command that got through would leave a trace.
    env.kser(&["migrate"]);
    let showcase = example_path("showcase");
    let kser = kser_path();
    let topic = env.topic.clone();
    let cases: Vec<(Run, &str)> = vec![
        (
            Run::new(&showcase, &["worker", "--shutdown-timeout", "inf"]),
            "--shutdown-timeout",
        ),
        (
            Run::new(&showcase, &["worker", "--shutdown-timeout", "1e300"]),
            "--shutdown-timeout",
        ),
        (
            Run::new(&showcase, &["worker", "--concurrency", "99999999999"]),
            "--concurrency",
        ),
        (
            Run::new(&showcase, &["worker"]).env("KSER_CONCURRENCY", "0"),
            "--concurrency",
        ),
        (
            Run::new(&showcase, &["worker", "--batch-size", "0"]),
            "--batch-size",
        ),
        (
            Run::new(&showcase, &["worker", "--partitions=-3"]),
            "--partitions",
        ),
        (
            Run::new(&showcase, &["worker", "--max-attempts", "0"]),
            "--max-attempts",
        ),
        (
            Run::new(&showcase, &["worker", "--task-timeout", "1e300"]),
            "--task-timeout",
        ),
        (
            Run::new(&showcase, &["worker", "--retry-backoff", "99999999y"]),
            "--retry-backoff",
        ),
        (
            Run::new(&showcase, &["worker"]).env("KSER_TOPIC", ""),
            "--topics",
        ),
        (
            Run::new(&showcase, &["worker", "--topics", "^kser-test-.*"]),
            "regular expression",
        ),
        (
            Run::new(&kser, &["watch", "x", "--timeout", "1e300"]),
            "--timeout",
        ),
        (
            Run::new(&kser, &["watch", "x", "--interval=-1"]),
            "--interval",
        ),
        (Run::new(&kser, &["list", "--limit", "0"]), "--limit"),
        (
            Run::new(&kser, &["send", "showcase.Echo", "--delay", "300000y"]),
            "--delay",
        ),
        (
            Run::new(
                &kser,
                &["send", "showcase.Echo", "--at", "+200000-01-01T00:00:00Z"],
            ),
            "--at",
        ),
        (
            Run::new(&kser, &["send", "showcase.Echo", "--partitions", "0"]),
            "--partitions",
        ),
        (
            Run::new(&kser, &["dlq", "list", "--dlq-topic", ""]),
            "--dlq-topic",
        ),
    ];
    let runs: Vec<Run> = cases.iter().map(|(run, _)| run.clone()).collect();
    for ((run, needle), out) in cases.iter().zip(run_all(&env, &runs)) {
        let (label, stderr) = (run.label(), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{label}: {stderr}");
        assert!(stderr.contains(needle), "{label}: {stderr}");
        assert!(!stderr.contains("panicked"), "{label}: {stderr}");
    }
    // A dead-letter topic that is also consumed: refused at start.
    let dlq = format!("{topic}.dlq");
    for args in [
        vec!["worker", "--topics", &topic, "--topics", &dlq],
        vec!["worker", "--dlq-topic", &topic],
    ] {
        let out = env.example_cmd("showcase", &args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("dead-letter topic"), "{args:?}: {stderr}");
        assert!(!stderr.contains("worker started"), "{args:?}: {stderr}");
    }
    // Nothing was sent or scheduled by any of them.
    assert_eq!(env.sql("SELECT count(*) FROM kser.tasks"), "0");
}
