//! Faults injected on purpose, with an in-process worker against rdkafka's
//! MockCluster (a librdkafka broker that can be taken down or made to fail
//! requests) and the real Postgres.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestEnv;
use kser::{
    KafkaConfig, Message, Producer, Registry, Store, Task, TaskContext, TaskError, TaskResult,
    Worker, WorkerConfig, WorkerStats,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio_util::sync::CancellationToken;

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Nothing {}

/// Counts its runs; takes a little time so work is in flight.
struct Counted(Arc<AtomicUsize>);

impl Task for Counted {
    const ENTRYPOINT: &'static str = "faults.Counted";
    type Params = Nothing;

    async fn run(&self, _ctx: &TaskContext, _params: Nothing) -> Result<TaskResult, TaskError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(TaskResult::ok())
    }
}

struct Setup {
    env: TestEnv,
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    kafka: KafkaConfig,
    store: Store,
    runs: Arc<AtomicUsize>,
}

async fn setup(partitions: i32) -> Setup {
    let env = TestEnv::new();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(&env.topic, partitions, 1)
        .expect("topic");
    cluster
        .create_topic(&format!("{}.dlq", env.topic), 1, 1)
        .expect("dead-letter topic");
    let mut kafka = KafkaConfig::new(cluster.bootstrap_servers());
    kafka.set("session.timeout.ms", "6000");
    let store = Store::connect(&env.database_url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    Setup {
        env,
        cluster,
        kafka,
        store,
        runs: Arc::new(AtomicUsize::new(0)),
    }
}

impl Setup {
    fn start(
        &self,
        shutdown_timeout: Duration,
    ) -> (CancellationToken, tokio::task::JoinHandle<WorkerStats>) {
        let mut registry = Registry::new();
        registry
            .register(Counted(Arc::clone(&self.runs)))
            .expect("register");
        let mut config = WorkerConfig::new(
            self.kafka.clone(),
            vec![self.env.topic.clone()],
            self.env.group.clone(),
        );
        config.concurrency = 8;
        config.shutdown_timeout = shutdown_timeout;
        let shutdown = CancellationToken::new();
        let worker = Worker::new(config, registry, self.store.clone());
        let token = shutdown.clone();
        let handle = tokio::spawn(async move { worker.run(token).await.expect("worker runs") });
        (shutdown, handle)
    }

    async fn send(&self, count: usize) {
        let producer = Producer::new(&self.kafka).expect("producer");
        for _ in 0..count {
            let message = Message::new(Counted::ENTRYPOINT, Default::default());
            producer
                .send(&self.env.topic, &message)
                .await
                .expect("send");
        }
    }

    fn count(&self, filter: &str) -> i64 {
        self.env
            .sql(&format!("SELECT count(*) FROM kser.tasks WHERE {filter}"))
            .parse()
            .expect("count")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_delays_work_and_loses_nothing() {
    let setup = setup(3).await;
    let (shutdown, worker) = setup.start(Duration::from_secs(10));
    setup.send(300).await;
    common::wait_until("work to start", Duration::from_secs(60), || {
        setup.count("status = 'SUCCESS'") >= 30
    });

    setup.cluster.broker_down(1).expect("down");
    tokio::time::sleep(Duration::from_secs(4)).await;
    setup.cluster.broker_up(1).expect("up");

    setup.env.wait_count(
        "SELECT count(*) FROM kser.tasks WHERE status = 'SUCCESS'",
        300,
        Duration::from_secs(120),
    );
    assert_eq!(
        setup.count("status <> 'SUCCESS'"),
        0,
        "nothing failed because Kafka was away"
    );
    assert!(setup.runs.load(Ordering::Relaxed) >= 300);
    shutdown.cancel();
    let stats = worker.await.expect("worker");
    assert_eq!(stats.failed, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_bounded_when_the_broker_is_gone() {
    let setup = setup(1).await;
    let (shutdown, worker) = setup.start(Duration::from_secs(2));
    setup.send(50).await;
    common::wait_until("work to start", Duration::from_secs(60), || {
        setup.count("status = 'SUCCESS'") >= 5
    });
    setup.cluster.broker_down(1).expect("down");
    let stopping = Instant::now();
    shutdown.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops within its shutdown timeout, broker or not")
        .expect("worker");
    assert!(stopping.elapsed() < Duration::from_secs(30));
    assert!(stats.received >= 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_dead_letter_topic_holds_the_offset() {
    let setup = setup(1).await;
    let producer = Producer::new(&setup.kafka).expect("producer");
    producer
        .send_raw(&setup.env.topic, None, Some(b"not a kser message"))
        .await
        .expect("send poison");
    // A good message behind it, on the same (only) partition.
    setup.send(1).await;
    // Every produce request fails for a while: the dead letter cannot be written.
    let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000];
    setup
        .cluster
        .request_errors(RDKafkaApiKey::Produce, &errors);
    let (shutdown, worker) = setup.start(Duration::from_secs(5));

    let committed = || {
        let reader: BaseConsumer = setup
            .kafka
            .client_config(
                kser::config::ClientRole::Consumer,
                &[("group.id", &setup.env.group)],
            )
            .create()
            .expect("reader");
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&setup.env.topic, 0);
        let offsets = reader
            .committed_offsets(partitions, Duration::from_secs(10))
            .expect("committed offsets");
        offsets
            .find_partition(&setup.env.topic, 0)
            .map(|p| p.offset())
            .unwrap_or(Offset::Invalid)
    };
    // The worker got past the poison record: the message behind it ran...
    common::wait_until("the good message to run", Duration::from_secs(60), || {
        setup.count("status = 'SUCCESS'") == 1
    });
    // ... but no offset is committed past the record not yet dead-lettered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !matches!(committed(), Offset::Offset(n) if n > 0),
        "the offset did not move past the unwritten dead letter"
    );

    setup.cluster.clear_request_errors(RDKafkaApiKey::Produce);
    common::wait_until(
        "the dead letter to be written and committed",
        Duration::from_secs(90),
        || matches!(committed(), Offset::Offset(2)),
    );
    shutdown.cancel();
    let stats = worker.await.expect("worker");
    assert_eq!(stats.rejected, 1);
}
