//! [`Worker::run`]: wires the stages and the tasks beside them, then
//! shuts them down in order: stop fetching, finish the running tasks,
//! publish what they queued, commit, leave the group.

use super::consumer::ConsumerSpec;
use super::error::WorkerError;
use super::offsets::OffsetTracker;
use super::pipeline::{Finished, Received};
use super::settings::DeadLetters;
use super::settings::TopicPattern;
use super::settings::WorkerConfig;
use super::settings::buffer_budget;
use super::shared::WorkerStats;
use super::shared::{Counters, Shared};
use super::{finish, fleet, holding, http, metrics_topic, retention, schedules, start, topics};
use crate::admin;
use crate::producer::Producer;
use crate::registry::Registry;
use crate::store::Store;
use rdkafka::consumer::{CommitMode, Consumer};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Consumes the configured topics and runs each message's task.
pub struct Worker {
    pub(crate) config: WorkerConfig,
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Store,
}

impl Worker {
    /// A worker for `registry`'s tasks, recording state in `store`.
    pub fn new(config: WorkerConfig, registry: Registry, store: Store) -> Self {
        Self {
            config,
            registry: Arc::new(registry),
            store,
        }
    }

    /// Runs until `shutdown` is cancelled, then stops fetching, lets in-flight
    /// work finish within the shutdown timeout, commits what is done and
    /// returns what it counted.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerStats, WorkerError> {
        let config = self.config;
        config.validate()?;
        self.registry
            .check_limits()
            .map_err(|err| WorkerError::Config(err.to_string()))?;
        // Capacities as this worker's code declares them.
        self.store.declare_pools(self.registry.pools()).await?;
        // A drain (`kser control drain`) stops this worker as a signal would.
        let shutdown = shutdown.child_token();
        let mut topics = config.topics.clone();
        for topic in &config.topics {
            match &config.dead_letters {
                DeadLetters::Disabled => {}
                DeadLetters::Suffix => topics.push(crate::dead_letter::default_topic(topic)),
                DeadLetters::Topic(dlq) => topics.push(dlq.clone()),
            }
        }
        topics.extend(config.metrics_topic.iter().cloned());
        topics.sort();
        topics.dedup();
        // A port in use stops the worker before it joins anything.
        let listener = match config.http {
            Some(address) => Some(http::listen(address).await?),
            None => None,
        };
        if !topics.is_empty() {
            admin::ensure_topics(&config.kafka, &topics, config.layout).await?;
        }

        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let budget = buffer_budget(config.max_buffered_bytes);
        let spec = ConsumerSpec {
            budget,
            kafka: config.kafka.clone(),
            group: config.group.clone(),
            protocol: config.group_protocol,
            instance_id: config.instance_id.clone(),
            topics: Arc::new(Mutex::new(config.topics.clone())),
            // Every 5 s: consumer lag for `/metrics` and the scaling hint.
            statistics: true,
            joined: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            backlog: Arc::default(),
        };
        let consumer = spec.create(&tracker)?;
        tracing::info!(
            worker = %config.worker_id,
            group = %config.group,
            group_protocol = %config.group_protocol,
            ordering = %config.ordering,
            instance_id = config.instance_id.as_deref().unwrap_or("-"),
            topics = %config.topics.join(","),
            topic_pattern = config.topic_pattern.as_ref().map_or("-", TopicPattern::as_str),
            concurrency = config.concurrency,
            max_buffered_bytes = config.max_buffered_bytes,
            "worker started"
        );

        let (metrics_topic, metric_records) = match &config.metrics_topic {
            Some(topic) => {
                let (topic, publisher) =
                    metrics_topic::MetricsTopic::start(&config.kafka, topic, &config.worker_id)
                        .map_err(WorkerError::Producer)?;
                (Some(topic), Some(publisher))
            }
            None => (None, None),
        };
        let (lane_done, lane_done_rx) = mpsc::unbounded_channel();
        // The pipeline's own writes keep some of the pool
        // (`PIPELINE_CONNECTIONS`).
        let transaction_slots = self
            .store
            .max_connections()
            .saturating_sub(PIPELINE_CONNECTIONS)
            .max(1);
        let shared = Arc::new(Shared {
            transactions: Semaphore::new(transaction_slots),
            ordering: config.ordering,
            running_after: config.running_after,
            max_result_bytes: config.max_result_bytes,
            lane_done,
            consumer: RwLock::new(Arc::new(consumer)),
            spec,
            tracker,
            store: self.store,
            registry: self.registry,
            counters: Counters::default(),
            in_flight: Mutex::new(HashMap::new()),
            worker_id: config.worker_id.clone(),
            batch_size: config.batch_size.max(1),
            abandon: CancellationToken::new(),
            producer: Producer::prompt(&config.kafka).map_err(WorkerError::Producer)?,
            relay_wakeup: tokio::sync::Notify::new(),
            dead_letter_tasks: tokio_util::task::TaskTracker::new(),
            retry: config.retry,
            dead_letters: config.dead_letters.clone(),
            buffered: Arc::new(Semaphore::new(
                usize::try_from(budget.pipeline_bytes).unwrap_or(usize::MAX >> 4),
            )),
            buffered_budget: budget.pipeline_bytes,
            metrics_topic,
            leased: Mutex::new(HashSet::new()),
            lease_ttl: config.fleet.lost_after,
        });

        // Pauses in force when the worker starts apply to its first record.
        let hold = fleet::initial_hold(&shared.store, &config.worker_id, &config.fleet).await;
        let (hold_tx, hold_rx) = tokio::sync::watch::channel(hold);
        let fleet = tokio::spawn(Arc::clone(&shared).fleet(fleet::Fleet {
            config: config.fleet.clone(),
            me: crate::store::NewWorker {
                id: config.worker_id.clone(),
                host: fleet::host_name(),
                pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
                group: config.group.clone(),
                topics: config.topics.clone(),
                entrypoints: fleet::entrypoints_json(&shared.registry),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                lost_after_ms:
                    i64::try_from(config.fleet.lost_after.as_millis()).unwrap_or(i64::MAX),
            },
            hold: hold_tx,
            joined: Arc::clone(&shared.spec.joined),
            backlog: Arc::clone(&shared.spec.backlog),
            shutdown: shutdown.clone(),
        }));

        let (intake_tx, intake_rx) = mpsc::channel::<Received>(shared.batch_size * 2);
        // Room for a few writes of outcomes: a task that finds it full keeps
        // its slot until the finisher takes its outcome.
        let (finish_tx, finish_rx) = mpsc::channel::<Finished>(shared.batch_size);
        let semaphore = Arc::new(Semaphore::new(config.concurrency.max(1)));

        let finisher = tokio::spawn(Arc::clone(&shared).finisher(finish_rx));
        let starter = tokio::spawn(Arc::clone(&shared).starter(
            intake_rx,
            lane_done_rx,
            finish_tx,
            semaphore,
            shutdown.clone(),
            holding::Holding::new(hold_rx),
        ));
        let reporter = tokio::spawn(Arc::clone(&shared).reporter());
        let marker = tokio::spawn(Arc::clone(&shared).marker());
        let http_stop = CancellationToken::new();
        let http = listener.map(|listener| {
            tokio::spawn(Arc::clone(&shared).serve_http(
                listener,
                config.http_routes.clone(),
                shutdown.clone(),
                http_stop.clone(),
            ))
        });
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(Arc::clone(&shared).relay(relay_stop.clone()));
        // Leases are renewed until the last running task has ended.
        let leases_stop = CancellationToken::new();
        let leases = shared
            .registry
            .has_limits()
            .then(|| tokio::spawn(Arc::clone(&shared).leases(leases_stop.clone())));
        let retention = config.retention.clone().map(|retention| {
            tokio::spawn(retention::run(
                shared.store.clone(),
                retention,
                shutdown.clone(),
            ))
        });
        let schedules = tokio::spawn(schedules::run(
            shared.store.clone(),
            shared.producer.clone(),
            shutdown.clone(),
        ));
        let watch_stop = CancellationToken::new();
        let watcher = config.topic_pattern.clone().map(|pattern| {
            let watch = topics::Watch {
                pattern,
                named: config.topics.clone(),
                every: config.topic_refresh,
                layout: config.layout,
                excluded: config.metrics_topic.iter().cloned().collect(),
            };
            tokio::spawn(Arc::clone(&shared).watch_topics(watch, watch_stop.clone()))
        });
        let stop_polling = CancellationToken::new();
        let intake = tokio::spawn(Arc::clone(&shared).intake(
            intake_tx,
            shutdown.clone(),
            stop_polling.clone(),
        ));

        shutdown.cancelled().await;
        tracing::info!(
            timeout_s = config.shutdown_timeout.as_secs_f64(),
            "stopping: nothing new starts; finishing the running tasks while the consumer keeps serving its group"
        );

        let stages = [
            starter.abort_handle(),
            finisher.abort_handle(),
            relay.abort_handle(),
        ];
        // Finish the running tasks, then publish the next steps they queued.
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            let _ = starter.await;
            let _ = finisher.await;
            shared.dead_letter_tasks.close();
            shared.dead_letter_tasks.wait().await;
            relay_stop.cancel();
            let _ = relay.await;
        })
        .await;
        reporter.abort();
        marker.abort();
        watch_stop.cancel();
        if let Some(watcher) = &watcher {
            // A listing in progress is not waited for.
            watcher.abort();
        }
        if let Some(publisher) = metric_records {
            publisher.finish().await;
        }
        // It stops at the shutdown signal; a round in progress rolls back.
        let _ = schedules.await;
        if let Some(retention) = retention {
            // It stops at the shutdown signal, a batch cut short at most.
            let _ = retention.await;
        }
        leases_stop.cancel();
        if let Some(leases) = leases {
            let _ = leases.await;
        }
        let mut stats = shared.counters.snapshot();
        if drained.is_err() {
            shared.abandon.cancel();
            for stage in stages {
                stage.abort();
            }
        }
        stats.abandoned = shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unfinished() as u64;
        if drained.is_err() {
            tracing::warn!(
                abandoned = stats.abandoned,
                "shutdown timeout passed; abandoning unfinished work, which will be delivered again"
            );
        }
        stop_polling.cancel();
        let _ = intake.await;
        if let Err(err) = shared.consumer().commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %err, "final commit");
        }
        http_stop.cancel();
        if let Some(http) = http {
            let _ = http.await;
        }
        fleet.abort();
        // Each holds the worker's state: awaited, so it is let go.
        let _ = tokio::join!(fleet, reporter, marker);
        if let Some(watcher) = watcher {
            let _ = watcher.await;
        }
        shared.stopped(&config.worker_id, &stats).await;
        leave_group(shared).await;
        tracing::info!(?stats, "worker stopped");
        Ok(stats)
    }
}

/// The connections the pipeline's own writes use at once: the finisher's
/// writers, the starter's claims, the marker and the relay. The rest of the
/// pool goes to transactional tasks, each holding one while it runs.
pub(crate) const PIPELINE_CONNECTIONS: usize = finish::WRITERS + start::CLAIMS + 2;

/// How long a stopping worker waits to leave its group: for the parts that
/// still hold its state to let go, then for the consumer to close.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);

/// Closes the consumer, which leaves the group at once (after a last
/// revoke, which commits): its partitions go to the other members now, not
/// when the broker's session timeout gives up on this one. The consumer
/// closes when the last holder of the worker's state lets go; a part that
/// has not after [`LEAVE_WITHIN`], or a close that takes longer (the broker
/// is away), is left behind, and the session timeout does the rest.
async fn leave_group(shared: Arc<Shared>) {
    let deadline = tokio::time::Instant::now() + LEAVE_WITHIN;
    let mut shared = shared;
    let owned = loop {
        match Arc::try_unwrap(shared) {
            Ok(owned) => break owned,
            Err(held) if tokio::time::Instant::now() >= deadline => {
                held.consumer().unsubscribe();
                tracing::warn!(
                    "the worker's state is still held elsewhere; left the consumer group without closing the consumer"
                );
                return;
            }
            Err(held) => {
                shared = held;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Closing a consumer blocks (it serves the revoke, then waits for the
    // broker); keep it off the runtime.
    let close = tokio::task::spawn_blocking(move || drop(owned));
    match tokio::time::timeout_at(deadline, close).await {
        Ok(_) => tracing::info!("left the consumer group"),
        Err(_) => tracing::warn!(
            "the consumer did not close in time; the group notices when the session times out"
        ),
    }
}
