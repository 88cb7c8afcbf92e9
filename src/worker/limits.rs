//! Limits across the fleet, the worker's side (the rules are in
//! `store/pools.rs`): tasks with a `MAX_CONCURRENCY` or `ACQUIRES` take
//! their leases right after their claim, in one transaction per group; the
//! ones that must wait are parked in Postgres and their records are done
//! with, so they hold neither their partition nor a concurrency slot. The
//! finisher releases a task's leases once its outcome is written, and a
//! task of its own renews the leases of running tasks and sweeps expired
//! ones about every second.
//!
//! Tasks without limits never reach this file: the hot path pays one
//! `has_limits` check per group.

use futures::FutureExt as _;

use super::pipeline::{Candidate, Finished, Outcome};
use super::shared::{Counters, Shared, unstorable};
use crate::store::{Admission, LeaseRequest};
use crate::store::{NewOutbox, StoreError, TaskStatus};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often leases are renewed and expired ones swept.
const LEASE_TICK: Duration = Duration::from_secs(1);

impl Shared {
    /// Takes the leases of the limited tasks of a claimed group. Returns
    /// the group without the tasks parked to wait for room (done with
    /// here: their offsets move, their in-flight entries go). Tasks
    /// Postgres refuses to park come back FAILED on `finish_tx`.
    pub(super) async fn take_leases(
        &self,
        group: Vec<Candidate>,
        finish_tx: &mpsc::Sender<Finished>,
    ) -> Vec<Candidate> {
        let limited = |c: &Candidate| !self.registry.needs(&c.message.entrypoint).is_empty();
        if !self.registry.has_limits() || !group.iter().any(limited) {
            return group;
        }
        let now = Utc::now();
        let requests: Vec<LeaseRequest> = group
            .iter()
            .filter(|c| limited(c))
            .map(|candidate| self.lease_request(candidate, now))
            .collect();
        let Some(isolated) = self
            .write_isolating("take leases", &requests, |requests| {
                self.store
                    .acquire(&self.worker_id, self.lease_ttl, requests)
                    .map(move |admissions| {
                        let uuids = requests.iter().map(|r| r.uuid.clone());
                        admissions.map(|a| uuids.zip(a).collect::<Vec<_>>())
                    })
            })
            .await
        else {
            self.abandon(group);
            return Vec::new();
        };
        let admissions: HashMap<String, Admission> =
            isolated.written.into_iter().flatten().collect();
        let mut refused: HashMap<&str, StoreError> = isolated
            .refused
            .into_iter()
            .map(|(index, err)| (requests[index].uuid.as_str(), err))
            .collect();
        let mut run = Vec::with_capacity(group.len());
        let mut parked = Vec::new();
        for candidate in group {
            if !limited(&candidate) {
                run.push(candidate);
                continue;
            }
            let uuid = &candidate.message.uuid;
            match admissions.get(uuid) {
                Some(Admission::Granted) => {
                    self.lock_leased().insert(uuid.clone());
                    run.push(candidate);
                }
                Some(Admission::Waiting) => {
                    tracing::info!(task.uuid = %uuid, entrypoint = %candidate.message.entrypoint, "no room in its pools; waiting in Postgres for its turn");
                    metrics::counter!("kser_tasks_waited_total", "entrypoint" => candidate.message.entrypoint.clone()).increment(1);
                    self.forget_in_flight(uuid, true);
                    parked.push(candidate.position);
                    if let Some(lane) = candidate.lane {
                        self.lane_done(lane);
                    }
                }
                None => {
                    let Some(err) = refused.remove(uuid.as_str()) else {
                        continue;
                    };
                    tracing::warn!(task.uuid = %uuid, error = %err, "Postgres refused the task's leases; recording it as FAILED");
                    let mut row = self.running_row(&candidate, now);
                    unstorable(&mut row, &err);
                    let finished = Finished {
                        position: candidate.position,
                        row,
                        kind: Outcome::Rejected,
                        resend: None,
                        original: candidate.original,
                        lane: candidate.lane,
                    };
                    if finish_tx.send(finished).await.is_err() {
                        return Vec::new();
                    }
                }
            }
        }
        Counters::add(&self.counters.waited, parked.len());
        self.release(&parked);
        run
    }

    /// What a limited task asks for: its pools, and, should it wait, its
    /// PENDING row and its message to send again when room frees up.
    fn lease_request(&self, candidate: &Candidate, now: DateTime<Utc>) -> LeaseRequest {
        let message = &candidate.message;
        let mut row = self.running_row(candidate, now);
        row.status = TaskStatus::Pending.as_str();
        row.attempts = 0;
        row.started_at = None;
        // Sent again to its topic with its key (its partition, so its place
        // among its key's records, is kept); a key that is not text is
        // replaced by the uuid, as retries do.
        let key = candidate
            .original
            .key
            .as_deref()
            .and_then(|key| std::str::from_utf8(key).ok())
            .map_or_else(|| message.uuid.clone(), str::to_owned);
        LeaseRequest {
            uuid: message.uuid.clone(),
            needs: self.registry.needs(&message.entrypoint).to_vec(),
            row,
            message: NewOutbox {
                topic: candidate.position.topic.to_string(),
                message_key: Some(key),
                payload: String::from_utf8_lossy(&message.to_bytes()).into_owned(),
                operation_uuid: None,
                available_at: None,
            },
        }
    }

    /// Releases the leases of tasks whose outcome is written; the waiters
    /// that now fit are woken (their messages queued in the outbox). A
    /// release Postgres refuses is left to expire.
    pub(super) async fn release_leases<'a>(&self, uuids: impl Iterator<Item = &'a str>) {
        let held: Vec<String> = {
            let mut leased = self.lock_leased();
            if leased.is_empty() {
                return;
            }
            uuids.filter_map(|uuid| leased.take(uuid)).collect()
        };
        self.free_leases(&held).await;
    }

    /// Releases the leases of `uuids` (kept for tasks found final when
    /// they came to run, or held by tasks whose outcome is written).
    pub(super) async fn free_leases(&self, uuids: &[String]) {
        if uuids.is_empty() {
            return;
        }
        match self
            .retry_db("release leases", || {
                self.store.release_leases(uuids, self.lease_ttl)
            })
            .await
        {
            Some(Ok(woken)) if woken > 0 => self.relay_wakeup.notify_one(),
            Some(Ok(_)) | None => {}
            Some(Err(err)) => {
                tracing::warn!(error = %err, "could not release leases; they expire instead")
            }
        }
    }

    /// Renews the leases of the tasks running here and sweeps expired ones
    /// (waking the waiters they held back), about every second, until the
    /// worker stops. Runs only when some task has limits. An outage is
    /// logged and retried: leases not renewed for the lease time expire.
    pub(super) async fn leases(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(LEASE_TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outage = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let held: Vec<String> = self.lock_leased().iter().cloned().collect();
            let renewed = self
                .store
                .renew_leases(&self.worker_id, &held, self.lease_ttl)
                .await;
            let swept = self.store.sweep_leases(self.lease_ttl).await;
            match (renewed, swept) {
                (Ok(_), Ok(woken)) => {
                    if woken > 0 {
                        tracing::info!(woken, "room freed up in pools; waiting tasks sent again");
                        self.relay_wakeup.notify_one();
                    }
                    if outage {
                        outage = false;
                        tracing::info!("leases renewed again");
                    }
                }
                (Err(err), _) | (_, Err(err)) => {
                    if !outage {
                        tracing::warn!(error = %err, "could not renew or sweep leases; retrying every second");
                    }
                    outage = true;
                }
            }
        }
    }

    fn lock_leased(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.leased.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
