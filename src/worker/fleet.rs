//! The worker in its fleet: records itself in `kser.workers`, beats on a
//! timer, reads the controls that apply to it about once a second, and tells
//! the starter which entrypoints to hold back.
//!
//! All of it runs off the hot path, in one task: a heartbeat is one small
//! statement every `heartbeat_interval` (sooner when the state changes),
//! never a write per record. A Postgres outage is logged and waited out:
//! the worker keeps working and obeys the controls it read last.
//!
//! What a pause holds back, and how, is in `holding.rs`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use super::holding::Hold;
use super::scaling::{Backlog, Rate, desired_workers};
use super::shared::Shared;
use super::shared::WorkerStats;
use crate::registry::Registry;
use crate::store::Store;
use crate::store::{Beat, Control, EventRow, NewWorker, WorkerState};
use rdkafka::consumer::Consumer;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{self};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the controls are read (and the lock file looked at).
const CONTROL_POLL: Duration = Duration::from_secs(1);
/// How long the last heartbeat may take when the worker stops.
const STOPPED_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a worker takes part in its fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How often the worker writes its heartbeat.
    pub heartbeat_interval: Duration,
    /// How long without a heartbeat before other workers mark it LOST.
    pub lost_after: Duration,
    /// The scaling hint's goal: how many workers would drain the backlog
    /// within this long.
    pub drain_target: Duration,
    /// Python kser's pause lock file: every entrypoint is held while it
    /// exists.
    pub pause_lock: Option<PathBuf>,
}

impl Default for FleetConfig {
    /// A heartbeat every 5 s, LOST after 30 s, a drain target of 60 s.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            lost_after: Duration::from_secs(30),
            drain_target: Duration::from_secs(60),
            pause_lock: None,
        }
    }
}

/// Python kser's pause lock file under `LOCK_PATH`:
/// `$LOCK_PATH/kser-$HOSTNAME-pause.lock`.
pub fn pause_lock_file(lock_path: &std::path::Path) -> PathBuf {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(host_name);
    lock_path.join(format!("kser-{}-pause.lock", host.trim()))
}

/// The host name, as the kernel or `$HOSTNAME` says.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Shared {
    /// Hands each event to the tasks here that handle it, one after the
    /// other, and records who handled it and how. An event no task here
    /// handles is left alone; recording waits out a short outage.
    async fn deliver_events(self: Arc<Self>, events: Vec<EventRow>, worker: String) {
        for event in events {
            let handlers: Vec<&'static str> = self
                .registry
                .handlers_of(&event.name, event.entrypoint.as_deref())
                .collect();
            if handlers.is_empty() {
                continue;
            }
            let params = match event.params {
                Value::Object(params) => params,
                _ => crate::message::JsonObject::new(),
            };
            let mut handled = Vec::with_capacity(handlers.len());
            for entrypoint in handlers {
                let delivered = crate::task::Event {
                    id: event.id,
                    name: event.name.clone(),
                    params: params.clone(),
                    worker: worker.clone(),
                };
                let outcome = self
                    .registry
                    .deliver(entrypoint, delivered, EVENT_TIMEOUT)
                    .await;
                match &outcome {
                    Ok(()) => {
                        tracing::info!(event.id = event.id, event.name = %event.name, entrypoint, "event handled")
                    }
                    Err(err) => {
                        tracing::warn!(event.id = event.id, event.name = %event.name, entrypoint, error = %err, "event handler failed")
                    }
                }
                handled.push((entrypoint.to_owned(), outcome.err()));
            }
            for _ in 0..30 {
                match self
                    .store
                    .record_deliveries(event.id, &worker, &handled)
                    .await
                {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::debug!(event.id = event.id, error = %err, "could not record the event's delivery; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

/// What the control task needs beside [`Shared`].
pub(super) struct Fleet {
    pub(super) config: FleetConfig,
    pub(super) me: NewWorker,
    pub(super) hold: watch::Sender<Hold>,
    /// Set once the consumer joined its group (its first assignment,
    /// empty or not).
    pub(super) joined: Arc<AtomicBool>,
    pub(super) backlog: Arc<Backlog>,
    /// The worker's shutdown: cancelled by a drain.
    pub(super) shutdown: CancellationToken,
}

/// What to hold from the start: the pauses in force and the lock file.
/// Postgres not answering within a few seconds holds nothing for now; the
/// control task reads again every second.
pub(super) async fn initial_hold(store: &Store, id: &str, config: &FleetConfig) -> Hold {
    let lock_file = config.pause_lock.as_deref().is_some_and(|p| p.exists());
    let controls = match tokio::time::timeout(STOPPED_WRITE_TIMEOUT, store.controls_for(id)).await {
        Ok(Ok(controls)) => controls,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "could not read the controls in force; reading them again every second");
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    let hold = Hold::of(&controls, lock_file);
    if !hold.is_empty() {
        tracing::info!(paused = %hold.names().join(","), lock_file, "starting paused: records of these entrypoints wait, their offsets held");
    }
    hold
}

/// The registered entrypoints as `kser.workers` keeps them.
pub(super) fn entrypoints_json(registry: &Registry) -> Value {
    let mut entries: Vec<_> = registry.entrypoints().collect();
    entries.sort_by_key(|e| e.name);
    let entries = entries
        .into_iter()
        .map(|entry| {
            let mut value = serde_json::to_value(entry).unwrap_or_default();
            let events = registry.events_of(entry.name);
            if let (Value::Object(map), false) = (&mut value, events.is_empty()) {
                map.insert("events".into(), serde_json::json!(events));
            }
            value
        })
        .collect();
    Value::Array(entries)
}

/// How long one task's event handler may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

impl Shared {
    /// Registers the worker, then reads its controls every second and beats
    /// every `heartbeat_interval`, until aborted.
    pub(super) async fn fleet(self: Arc<Self>, fleet: Fleet) {
        let Fleet {
            config,
            me,
            hold,
            joined,
            backlog,
            shutdown,
        } = fleet;
        // What the other live workers of the group said last.
        let mut others: Option<(u64, i64, f64)> = None;
        let mut registered = false;
        let mut outage = false;
        let mut controls: Vec<Control> = Vec::new();
        let mut last_event: Option<i64> = None;
        let mut last_beat: Option<(tokio::time::Instant, WorkerState, Vec<String>)> = None;
        let mut last_received = 0;
        let mut rate = Rate::default();
        let mut interval = tokio::time::interval(CONTROL_POLL.min(config.heartbeat_interval));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let mut failed = None;
            if !registered {
                match self.store.register_worker(&me).await {
                    Ok(()) => registered = true,
                    Err(err) => failed = Some(err),
                }
            }
            match self.store.controls_for(&me.id).await {
                Ok(read) => controls = read,
                Err(err) => failed = failed.or(Some(err)),
            }
            // Events sent once this worker runs, not those sent before.
            match last_event {
                None => match self.store.last_event_id().await {
                    Ok(id) => last_event = Some(id),
                    Err(err) => failed = failed.or(Some(err)),
                },
                Some(after) => match self.store.events_after(&me.id, after).await {
                    Ok(events) => {
                        if let Some(last) = events.last() {
                            last_event = Some(last.id);
                            tokio::spawn(Arc::clone(&self).deliver_events(events, me.id.clone()));
                        }
                    }
                    Err(err) => failed = failed.or(Some(err)),
                },
            }
            let lock_file = config.pause_lock.as_deref().is_some_and(|p| p.exists());
            let wanted = Hold::of(&controls, lock_file);
            hold.send_if_modified(|current| {
                if *current == wanted {
                    return false;
                }
                if wanted.is_empty() {
                    tracing::info!("resumed: every entrypoint runs again");
                } else {
                    tracing::info!(
                        paused = %wanted.names().join(","), lock_file,
                        "paused: records of these entrypoints wait, their offsets held"
                    );
                }
                *current = wanted.clone();
                true
            });
            let drain = controls.iter().any(|c| c.action == "drain");
            if drain && !shutdown.is_cancelled() {
                tracing::info!(
                    "drain requested: finishing the running tasks, then leaving the group and exiting"
                );
                // Cleared first: the worker may be gone before a later write.
                if let Err(err) = self.store.drained(&me.id).await {
                    tracing::debug!(error = %err, "could not clear the drain request");
                }
                shutdown.cancel();
            }

            let stats = self.counters.snapshot();
            let in_flight = self.lock_in_flight().len();
            rate.add(stats.succeeded + stats.failed + stats.retried);
            let state = if shutdown.is_cancelled() {
                WorkerState::Draining
            } else if !joined.load(atomic::Ordering::Relaxed) {
                WorkerState::Starting
            } else if wanted.all {
                WorkerState::Paused
            } else if in_flight > 0 || stats.received != last_received {
                WorkerState::Active
            } else {
                WorkerState::Ready
            };
            last_received = stats.received;
            let paused = wanted.names();
            let due = match &last_beat {
                None => true,
                Some((at, last_state, last_paused)) => {
                    at.elapsed() >= config.heartbeat_interval
                        || *last_state != state
                        || *last_paused != paused
                }
            };
            if registered && due {
                let lag = backlog.lag();
                let throughput = rate.per_second();
                let partitions = backlog.partitions();
                let desired = match (others, lag, partitions) {
                    (Some((n, others_lag, others_rate)), Some(lag), Some(partitions)) => {
                        desired_workers(
                            n + 1,
                            lag + others_lag,
                            throughput + others_rate,
                            config.drain_target,
                            partitions,
                        )
                    }
                    _ => None,
                };
                if let Some(desired) = desired {
                    metrics::gauge!("kser_desired_workers", "group" => me.group.clone())
                        .set(desired as f64);
                }
                let beat = Beat {
                    state,
                    paused: paused.clone(),
                    assigned: self.assigned(),
                    partitions: partitions.and_then(|p| i32::try_from(p).ok()).unwrap_or(0),
                    in_flight: i32::try_from(in_flight).unwrap_or(i32::MAX),
                    counters: serde_json::to_value(stats).unwrap_or_default(),
                    lag,
                    lag_by_partition: backlog.lag_by_partition(),
                    throughput,
                    desired: desired.and_then(|d| i32::try_from(d).ok()),
                };
                match self.store.heartbeat(&me.id, &me.group, &beat).await {
                    Ok(reply) => {
                        last_beat = Some((tokio::time::Instant::now(), state, paused));
                        // Deleted by hand: record it again.
                        registered = reply.beat > 0;
                        others = Some((
                            u64::try_from(reply.others).unwrap_or(0),
                            reply.others_lag,
                            reply.others_throughput,
                        ));
                        for state in WorkerState::ALL {
                            let n = reply.states[state.as_str()].as_f64().unwrap_or(0.0);
                            metrics::gauge!("kser_workers", "group" => me.group.clone(), "state" => state.as_str())
                                .set(n);
                        }
                        let lost = reply.lost;
                        metrics::counter!("kser_workers_marked_lost_total", "group" => me.group.clone())
                            .increment(u64::try_from(lost).unwrap_or(0));
                        if lost > 0 {
                            tracing::warn!(
                                lost,
                                "marked workers LOST: their heartbeat stopped (see `kser workers`)"
                            );
                        }
                    }
                    Err(err) => failed = failed.or(Some(err)),
                }
            }
            match failed {
                Some(err) if !outage => {
                    outage = true;
                    tracing::warn!(error = %err, "could not read controls or write the heartbeat; working on with the controls read last, retrying every second");
                }
                Some(err) => tracing::debug!(error = %err, "heartbeat still failing"),
                None if outage => {
                    outage = false;
                    tracing::info!("heartbeat and controls reach Postgres again");
                }
                None => {}
            }
        }
    }

    /// `{topic: [partition...]}` of the partitions assigned now.
    fn assigned(&self) -> Value {
        let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
        if let Ok(assignment) = self.consumer().assignment() {
            for element in assignment.elements() {
                by_topic
                    .entry(element.topic().to_owned())
                    .or_default()
                    .push(element.partition());
            }
        }
        for partitions in by_topic.values_mut() {
            partitions.sort_unstable();
        }
        serde_json::to_value(by_topic).unwrap_or_default()
    }

    /// Writes the worker STOPPED, if Postgres answers soon.
    pub(super) async fn stopped(&self, id: &str, stats: &WorkerStats) {
        let counters = serde_json::to_value(stats).unwrap_or_default();
        match tokio::time::timeout(
            STOPPED_WRITE_TIMEOUT,
            self.store.worker_stopped(id, &counters),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "could not record the worker STOPPED"),
            Err(_) => tracing::warn!("could not record the worker STOPPED: Postgres is slow"),
        }
    }
}
