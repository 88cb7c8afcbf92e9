//! A private Apache Kafka cluster for a fault test (scripts/kafka.sh).
//!
//! [`Cluster::up`] formats and starts three KRaft nodes (each broker and
//! controller; replication factor 3, `min.insync.replicas=2`) in a temporary
//! directory; a test kills, stops and restarts nodes by number (1 to 3, which
//! is also each node's broker id), and the nodes are killed on drop.
//!
//! One cluster runs at a time in a test binary: [`Cluster::up`] waits for the
//! previous one to be dropped, so three JVMs at most share the machine. A
//! watchdog process stops the nodes should the test binary die without
//! dropping its cluster (the nodes run in their own session, so a Ctrl-C
//! does not reach them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Held by the running cluster.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How many nodes a cluster has.
pub const NODES: i32 = 3;

pub struct Cluster {
    dir: tempfile::TempDir,
    brokers: String,
    watchdog: Option<Child>,
    _turn: MutexGuard<'static, ()>,
}

/// One partition as the cluster's metadata describes it.
#[derive(Debug, Clone)]
pub struct PartitionState {
    pub partition: i32,
    /// The leader's node number, -1 while there is none.
    pub leader: i32,
    pub isr: Vec<i32>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

impl Cluster {
    /// Starts three nodes and waits until each says it started (~15 s).
    pub fn up() -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::Builder::new()
            .prefix("kser-cluster-")
            .tempdir()
            .expect("temp dir");
        let watchdog = Command::new("setsid")
            .args([
                "sh",
                "-c",
                "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; \"$2\" down \"$3\"; rm -rf \"$3\"",
                "kser-cluster-watchdog",
                &std::process::id().to_string(),
            ])
            .arg(script())
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        let mut cluster = Self {
            dir,
            brokers: String::new(),
            watchdog,
            _turn: turn,
        };
        let started = Instant::now();
        let dir = cluster.dir.path().to_owned();
        let up = [
            "up".to_owned(),
            dir.to_string_lossy().into_owned(),
            NODES.to_string(),
        ];
        let up: Vec<&str> = up.iter().map(String::as_str).collect();
        let mut out = cluster.script(&up);
        let formatting = "could not format the storage";
        if !out.status.success() && super::text(&out.stderr).contains(formatting) {
            // kafka.sh draws a cluster id that starts with '-' one time in
            // 64, which the storage tool takes for an option: draw again.
            println!("cluster: {formatting}; trying again with another cluster id");
            out = cluster.script(&up);
        }
        if !out.status.success() {
            panic!(
                "could not start a {NODES}-node Kafka cluster in {}: {}\n{}",
                dir.display(),
                super::text(&out.stderr),
                cluster.log_tails(1..=NODES, 30),
            );
        }
        cluster.brokers = super::text(&out.stdout).trim().to_owned();
        println!(
            "cluster: {NODES} Kafka nodes at {} up in {:.1?} ({})",
            cluster.brokers,
            started.elapsed(),
            dir.display()
        );
        cluster
    }

    /// The bootstrap servers, all nodes.
    pub fn brokers(&self) -> String {
        self.brokers.clone()
    }

    /// SIGKILL node `n` (1-based) and wait until its process is gone.
    pub fn kill(&self, n: i32) {
        self.node_command("kill", n);
    }

    /// SIGTERM node `n` (a controlled shutdown) and wait until it exits.
    pub fn stop(&self, n: i32) {
        self.node_command("stop", n);
    }

    /// Starts node `n` again with its ports and data, and waits until it
    /// says it started.
    pub fn start(&self, n: i32) {
        self.node_command("start", n);
    }

    /// The node that leads `partition` of `topic`, -1 while none does.
    pub fn leader_of(&self, topic: &str, partition: i32) -> i32 {
        self.partitions(topic)
            .into_iter()
            .find(|p| p.partition == partition)
            .unwrap_or_else(|| panic!("no partition {partition} in topic {topic}"))
            .leader
    }

    /// Every partition of `topic`, in partition order; empty while the
    /// topic does not exist.
    pub fn partitions(&self, topic: &str) -> Vec<PartitionState> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("metadata client");
        let metadata = match client.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(metadata) => metadata,
            Err(err) => {
                println!("cluster: no metadata for {topic}: {err}");
                return Vec::new();
            }
        };
        let mut partitions: Vec<PartitionState> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions())
            .map(|p| PartitionState {
                partition: p.id(),
                leader: if p.error().is_none() { p.leader() } else { -1 },
                isr: p.isr().to_vec(),
            })
            .collect();
        partitions.sort_by_key(|p| p.partition);
        partitions
    }

    /// Waits until every partition of each topic has a leader and all the
    /// nodes in its in-sync replicas: a restarted node has caught up.
    pub fn wait_in_sync(&self, topics: &[&str], timeout: Duration) {
        let start = Instant::now();
        loop {
            let last: Vec<(String, Vec<PartitionState>)> = topics
                .iter()
                .map(|topic| (topic.to_string(), self.partitions(topic)))
                .collect();
            let in_sync = last.iter().all(|(_, partitions)| {
                !partitions.is_empty()
                    && partitions
                        .iter()
                        .all(|p| p.leader > 0 && p.isr.len() == NODES as usize)
            });
            if in_sync {
                return;
            }
            if start.elapsed() > timeout {
                let lagging: Vec<i32> = (1..=NODES)
                    .filter(|n| {
                        last.iter()
                            .any(|(_, ps)| ps.iter().any(|p| !p.isr.contains(n)))
                    })
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {topics:?} to be in sync on {NODES} nodes: {last:?}\n{}",
                    self.log_tails(lagging, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The directory of the nodes' data and logs, kept when a test fails.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Per partition of `topic`: its end offset (high watermark) and the
    /// offset `group` has committed (-1 for none).
    pub fn offsets(&self, topic: &str, group: &str) -> Vec<(i32, i64, i64)> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .create()
            .expect("offsets client");
        let timeout = Duration::from_secs(10);
        let mut wanted = rdkafka::TopicPartitionList::new();
        for p in self.partitions(topic) {
            wanted.add_partition(topic, p.partition);
        }
        let committed = client.committed_offsets(wanted.clone(), timeout).ok();
        wanted
            .elements()
            .iter()
            .map(|e| {
                let partition = e.partition();
                let end = client
                    .fetch_watermarks(topic, partition, timeout)
                    .map_or(-1, |(_, high)| high);
                let done = committed
                    .as_ref()
                    .and_then(|c| c.find_partition(topic, partition))
                    .and_then(|p| p.offset().to_raw())
                    .unwrap_or(-1);
                (partition, end, done)
            })
            .collect()
    }

    /// The node coordinating consumer group `group`: the last one whose log
    /// says it formed or loaded the group; None before the group exists.
    pub fn coordinator_of(&self, group: &str) -> Option<i32> {
        let needles = [
            format!("Stabilized group {group} "),
            format!("Loaded classic group {group} "),
        ];
        (1..=NODES)
            .filter_map(|n| {
                let log = std::fs::read_to_string(self.node_dir(n).join("kafka.log")).ok()?;
                let line = log
                    .lines()
                    .rfind(|line| needles.iter().any(|needle| line.contains(needle.as_str())))?;
                // Lines start with a sortable "[yyyy-mm-dd hh:mm:ss,mmm]".
                Some((line.get(..25)?.to_owned(), n))
            })
            .max()
            .map(|(_, n)| n)
    }

    /// The last `lines` lines of node `n`'s log.
    pub fn log_tail(&self, n: i32, lines: usize) -> String {
        let path = self.node_dir(n).join("kafka.log");
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("--- last {lines} lines of {}:\n{tail}", path.display())
    }

    fn log_tails(&self, nodes: impl IntoIterator<Item = i32>, lines: usize) -> String {
        nodes
            .into_iter()
            .map(|n| self.log_tail(n, lines))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn node_dir(&self, n: i32) -> PathBuf {
        self.dir.path().join(format!("node-{n}"))
    }

    fn node_command(&self, action: &str, n: i32) {
        assert!(
            (1..=NODES).contains(&n),
            "no node {n} in a {NODES}-node cluster"
        );
        let started = Instant::now();
        let dir = self.dir.path().to_string_lossy().into_owned();
        let out = self.script(&[action, &dir, &n.to_string()]);
        if !out.status.success() {
            panic!(
                "`kafka.sh {action} {dir} {n}` failed: {}\n{}",
                super::text(&out.stderr),
                self.log_tail(n, 40)
            );
        }
        println!("cluster: {action} node {n} took {:.1?}", started.elapsed());
    }

    fn script(&self, args: &[&str]) -> Output {
        Command::new(script())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/kafka.sh")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs of a failed test, and show the end of each.
            self.dir.disable_cleanup(true);
            eprintln!(
                "cluster: the test failed; node logs kept in {}\n{}",
                self.dir.path().display(),
                self.log_tails(1..=NODES, 15)
            );
        }
        // SIGKILL, all at once: the data goes away with the directory, and a
        // controlled shutdown of each node would take seconds.
        let killers: Vec<Child> = (1..=NODES)
            .filter_map(|n| {
                Command::new(script())
                    .arg("kill")
                    .arg(self.dir.path())
                    .arg(n.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        let all = killers.len() == NODES as usize;
        for mut killer in killers {
            let _ = killer.wait();
        }
        // Otherwise the watchdog stops what is left when the tests exit.
        if let Some(mut watchdog) = self.watchdog.take().filter(|_| all) {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}
