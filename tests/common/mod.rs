//! Shared fixture of the integration tests: a private database and topic per
//! test, and helpers to drive the CLI and worker processes as a user would.
//!
//! The services come from `scripts/test`: `KSER_TEST_BROKERS` (a Kafka-protocol
//! broker) and `KSER_TEST_DATABASE_URL` (a Postgres admin URL; each test gets
//! its own database, dropped afterwards).

#![allow(dead_code)]

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod cluster;

pub struct TestEnv {
    pub database_url: String,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    admin_url: String,
    database: String,
    pub dir: tempfile::TempDir,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test, which starts Kafka and Postgres"
        )
    })
}

impl TestEnv {
    pub fn new() -> Self {
        let admin_url = required("KSER_TEST_DATABASE_URL");
        let brokers = required("KSER_TEST_BROKERS");
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("kser_test_{id}");
        psql(&admin_url, &format!("CREATE DATABASE {database}"));
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .expect("database URL with a path");
        Self {
            database_url: format!("{base}/{database}"),
            brokers,
            topic: format!("kser-test-{id}"),
            group: format!("kser-test-{id}"),
            admin_url,
            database,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A command with this test's settings in its environment.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env("KSER_BROKERS", &self.brokers)
            .env("DATABASE_URL", &self.database_url)
            .env("KSER_TOPIC", &self.topic)
            .env("KSER_GROUP", &self.group)
            // A restarted or second worker gets partitions back quickly.
            .env("KSER_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("KSER_KAFKA_HEARTBEAT_INTERVAL_MS", "500")
            .env("KSER_KAFKA_MAX_POLL_INTERVAL_MS", "10000")
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null());
        command
    }

    /// Runs `kser ARGS` to completion.
    pub fn kser(&self, args: &[&str]) -> Output {
        self.run(Path::new(env!("CARGO_BIN_EXE_kser")), args, None)
    }

    /// Runs an example binary (`dice`, `showcase`) to completion.
    pub fn example_cmd(&self, example: &str, args: &[&str]) -> Output {
        self.run(&example_path(example), args, None)
    }

    pub fn run(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self.command(program);
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command.spawn().expect("spawn");
        // Fed from a thread: a child that answers each line fills its stdout
        // pipe while we would still be writing its stdin.
        let feeder = stdin.map(|input| {
            let mut pipe = child.stdin.take().expect("stdin");
            let input = input.to_owned();
            std::thread::spawn(move || pipe.write_all(input.as_bytes()))
        });
        let output = child.wait_with_output().expect("wait");
        if let Some(feeder) = feeder {
            feeder.join().expect("stdin feeder").expect("write stdin");
        }
        output
    }

    /// Starts a worker from an example binary, logging to a file.
    pub fn start_worker(&self, example: &str, args: &[&str]) -> WorkerProcess {
        self.start_worker_env(example, args, &[])
    }

    /// Starts a worker with more variables in its environment.
    pub fn start_worker_env(
        &self,
        example: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> WorkerProcess {
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.dir.path().join(format!("worker-{n}.log"));
        let child = self
            .command(&example_path(example))
            .envs(envs.iter().copied())
            .arg("worker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn worker");
        WorkerProcess { child, log }
    }

    /// The offset the test's group has committed for `partition` of its
    /// topic, if any.
    pub fn committed_offset(&self, partition: i32) -> Option<i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .create()
            .expect("consumer");
        let mut wanted = rdkafka::TopicPartitionList::new();
        wanted.add_partition(&self.topic, partition);
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .ok()?;
        match committed.find_partition(&self.topic, partition)?.offset() {
            rdkafka::Offset::Offset(offset) => Some(offset),
            _ => None,
        }
    }

    /// Sends one message with the example's `send` and returns its uuid.
    pub fn send(&self, example: &str, entrypoint: &str, params: &str) -> String {
        let out = self.example_cmd(example, &["send", entrypoint, "--params", params]);
        assert!(out.status.success(), "send failed: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// `status UUID --json`, parsed.
    pub fn status(&self, uuid: &str) -> Value {
        let out = self.kser(&["status", uuid, "--json"]);
        assert!(out.status.success(), "status failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// `status UUID --json`, parsed, or `Value::Null` while no worker has
    /// recorded it yet (an operation exists once a worker received it): for
    /// waits that may begin before that.
    pub fn try_status(&self, uuid: &str) -> Value {
        let out = self.kser(&["status", uuid, "--json"]);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Waits until the task reaches SUCCESS or FAILED, and returns its status.
    pub fn wait_final(&self, uuid: &str) -> Value {
        let mut last = Value::Null;
        wait_until(
            &format!("task {uuid} to finish"),
            Duration::from_secs(60),
            || {
                let out = self.kser(&["status", uuid, "--json"]);
                if !out.status.success() {
                    return false;
                }
                last = serde_json::from_slice(&out.stdout).expect("JSON");
                matches!(last["status"].as_str(), Some("SUCCESS" | "FAILED"))
            },
        );
        last
    }

    /// `kser send --batch -` with `input` (newline-delimited messages); the
    /// send must succeed.
    /// Sends `showcase.Pipeline` (three steps; the second fails until
    /// `flag` exists) with `metadata`, as a user would with the CLI; returns
    /// the operation's uuid.
    pub fn send_pipeline(&self, flag: &Path, metadata: &Value) -> String {
        let params = serde_json::json!({ "flag": flag.to_str().expect("path") });
        let out = self.example_cmd(
            "showcase",
            &[
                "send",
                "showcase.Pipeline",
                "--params",
                &params.to_string(),
                "--metadata",
                &metadata.to_string(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// The uuids of operation `op`'s steps, in order, as `status` shows them.
    pub fn step_uuids(&self, op: &str) -> Vec<String> {
        self.status(op)["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|task| task["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    }

    pub fn send_batch(&self, input: &str) {
        let out = self.run(
            Path::new(env!("CARGO_BIN_EXE_kser")),
            &["send", "--batch", "-"],
            Some(input),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// Runs SQL in this test's database and returns psql's unaligned output.
    pub fn sql(&self, query: &str) -> String {
        psql(&self.database_url, query)
    }

    /// Runs SQL in the maintenance database, outside this test's database.
    pub fn admin_sql(&self, query: &str) -> String {
        psql(&self.admin_url, query)
    }

    /// Takes this test's database away for `duration`: no new connection,
    /// the open ones cut.
    pub fn database_outage(&self, duration: Duration) {
        let db = &self.database;
        self.admin_sql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"));
        self.admin_sql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'"
        ));
        std::thread::sleep(duration);
        self.admin_sql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
    }

    /// The last lines of each worker log this test wrote, for a test that
    /// timed out: what the workers saw is usually why.
    pub fn worker_log_tails(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("worker-") && name.ends_with(".log"))
        });
        logs.sort();
        let mut out = String::new();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            out.push_str(&format!(
                "\n--- last lines of {} ---\n{tail}",
                log.display()
            ));
        }
        out
    }

    /// Waits until `query` (a count) returns `expected`.
    pub fn wait_count(&self, query: &str, expected: i64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let seen = self.sql(query);
            if seen.trim().parse::<i64>().ok() == Some(expected) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for `{query}` to reach {expected} \
                 (last: {}){}{}",
                seen.trim(),
                self.worker_log_tails(),
                broker_log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("KSER_TEST_KEEP").is_some() {
            // KSER_TEST_KEEP=1 keeps a failed test's database and logs to look at.
            if let Ok(dir) = tempfile::tempdir() {
                let kept = std::mem::replace(&mut self.dir, dir).keep();
                eprintln!("kept {} and database {}", kept.display(), self.database);
            }
            return;
        }
        let _ = Command::new("psql")
            .args([
                &self.admin_url,
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
            ])
            .output();
    }
}

fn psql(url: &str, query: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", query])
        .output()
        .expect("psql is installed");
    assert!(out.status.success(), "psql {query}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// The seed of a randomized test: `KSER_TEST_SEED` to replay one, printed
/// either way.
pub fn seed() -> u64 {
    let seed = std::env::var("KSER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    println!("KSER_TEST_SEED={seed}");
    seed
}

/// A loopback port nothing listens on, below the kernel's ephemeral range
/// (as `scripts/kafka.sh` draws them): a port the kernel hands out could be
/// taken as the source port of an outgoing connection before the process it
/// was given to binds it.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut draw = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ std::process::id() as u64)
        .unwrap_or(1);
    if low > 11000 {
        for _ in 0..500 {
            // xorshift: enough to spread draws over the range.
            draw ^= draw << 13;
            draw ^= draw >> 7;
            draw ^= draw << 17;
            let port = 10000 + (draw % u64::from(low - 10000)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// GETs `path` from 127.0.0.1:`port` and returns the status code and body,
/// or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of the first Prometheus sample line that starts with `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The path of an example binary, built by `cargo test` next to the tests.
pub fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = target.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with cargo test",
        path.display()
    );
    path
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}{}",
            broker_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The end of the test broker's log (Apache Kafka started by scripts/test),
/// for a test that timed out: the broker may be why.
pub fn broker_log_tail() -> String {
    let Ok(dir) = std::env::var("KSER_BROKER_DIR") else {
        return String::new();
    };
    let log = Path::new(&dir).join("node-1").join("kafka.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    format!("\n--- last lines of {} ---\n{tail}", log.display())
}

pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Spawns a prepared worker command whose stderr goes to `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> Self {
        let child = command.spawn().expect("spawn worker");
        Self { child, log }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the worker to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "worker did not exit within {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let log = self.log.clone();
        let start = Instant::now();
        let what = format!("'{needle}' in {}", log.display());
        wait_until(&what, timeout + Duration::from_secs(1), || {
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}:\n{}{}",
                    self.log(),
                    broker_log_tail()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}: {}", self.log());
            }
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches(needle)
                .count()
                >= count
        });
    }

    /// Waits until the worker owns partitions.
    pub fn wait_assigned(&mut self) {
        self.wait_for_log("partitions assigned", 1, Duration::from_secs(60));
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "worker did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The exit status, if the worker has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every record value of `topic` (all partitions), parsed as JSON, once at
/// least `least` of them pass `wanted`.
pub fn read_topic(
    env: &TestEnv,
    topic: &str,
    least: usize,
    wanted: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::message::Message as _;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("{}-reader", env.group))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut records = Vec::new();
    wait_until(
        &format!("{least} wanted records in {topic}"),
        Duration::from_secs(60),
        || {
            while let Some(record) = consumer.poll(Duration::from_millis(300)) {
                let record = record.expect("record");
                if let Some(value) = record
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                {
                    records.push(value);
                }
            }
            records.iter().filter(|r| wanted(r)).count() >= least
        },
    );
    records.into_iter().filter(|r| wanted(r)).collect()
}

/// The first record of `env`'s topic, read from the start by a group of its
/// own, within a minute: its key and value.
pub async fn first_record(env: &TestEnv) -> (Option<Vec<u8>>, Vec<u8>) {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::Message as _;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("{}-reader", env.group))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[env.topic.as_str()])
        .expect("subscribe");
    let record = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within a minute")
        .expect("a record");
    let key = record.key().map(<[u8]>::to_vec);
    (key, record.payload().expect("a value").to_vec())
}
