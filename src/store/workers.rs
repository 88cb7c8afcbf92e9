//! The fleet in Postgres: `kser.workers`, where every worker records itself
//! and beats, and `kser.controls`, the pauses and drains `kser control` asks
//! for. Written with plain SQL: a heartbeat is one small statement, which
//! also marks LOST the workers whose own heartbeat stopped.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Double, Integer, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::Serialize;
use serde_json::Value;

use super::database::{Store, StoreError};

/// Where a worker is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum WorkerState {
    /// Started, not yet in its group.
    Starting,
    /// In the group, nothing running.
    Ready,
    /// Running tasks.
    Active,
    /// Holding back every entrypoint (a pause, or the pause lock file).
    Paused,
    /// Finishing its work before it leaves the group and exits.
    Draining,
    /// Exited cleanly.
    Stopped,
    /// No heartbeat for longer than it promised; marked by another worker.
    Lost,
}

impl WorkerState {
    /// Every state, in the order a worker goes through them.
    pub const ALL: [Self; 7] = [
        Self::Starting,
        Self::Ready,
        Self::Active,
        Self::Paused,
        Self::Draining,
        Self::Stopped,
        Self::Lost,
    ];

    /// The name stored in `kser.workers.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "STARTING",
            Self::Ready => "READY",
            Self::Active => "ACTIVE",
            Self::Paused => "PAUSED",
            Self::Draining => "DRAINING",
            Self::Stopped => "STOPPED",
            Self::Lost => "LOST",
        }
    }
}

/// What a worker records of itself when it starts.
#[derive(Debug, Clone)]
pub(crate) struct NewWorker {
    /// The worker's id, `host:pid` unless given.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// Its consumer group.
    pub group: String,
    /// The topics it consumes (named ones).
    pub topics: Vec<String>,
    /// `[{name, kind, params_schema}]`.
    pub entrypoints: Value,
    /// The kser version it runs.
    pub version: String,
    /// How long without a heartbeat before others may call it LOST.
    pub lost_after_ms: i64,
}

/// What a heartbeat writes.
#[derive(Debug, Clone)]
pub(crate) struct Beat {
    /// Where it is in its life cycle ([`WorkerState`]).
    pub state: WorkerState,
    /// Entrypoints held back, `*` for all.
    pub paused: Vec<String>,
    /// `{topic: [partition...]}`.
    pub assigned: Value,
    /// Partitions of the worker's topics.
    pub partitions: i32,
    /// Tasks it had in flight at its last heartbeat.
    pub in_flight: i32,
    /// Its counters (received, succeeded, failed...) at its last heartbeat.
    pub counters: Value,
    /// Records behind on its assigned partitions (`None` until known).
    pub lag: Option<i64>,
    /// `{"topic/partition": lag}` of the assigned partitions.
    pub lag_by_partition: Value,
    /// Tasks finished per second.
    pub throughput: f64,
    /// The scaling hint it computed last.
    pub desired: Option<i32>,
}

/// A row of `kser.workers` as `kser workers` shows it. `state` is LOST for
/// a worker whose heartbeat is overdue even if no live worker marked it yet.
#[derive(Debug, Clone, diesel::QueryableByName, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    /// The worker's id, `host:pid` unless given.
    #[diesel(sql_type = Text)]
    pub id: String,
    /// The host it runs on.
    #[diesel(sql_type = Text)]
    pub host: String,
    /// Its process id.
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    /// Its consumer group.
    #[diesel(sql_type = Text)]
    pub group: String,
    /// The topics it consumes (named ones).
    #[diesel(sql_type = Array<Text>)]
    pub topics: Vec<String>,
    /// The entrypoints it registered: name, kind, parameter schema, events.
    #[diesel(sql_type = Jsonb)]
    pub entrypoints: Value,
    /// The kser version it runs.
    #[diesel(sql_type = Text)]
    pub version: String,
    /// Where it is in its life cycle ([`WorkerState`]).
    #[diesel(sql_type = Text)]
    pub state: String,
    /// What it holds back: entrypoint names, or `*` for everything.
    #[diesel(sql_type = Array<Text>)]
    pub paused: Vec<String>,
    /// When it started.
    #[diesel(sql_type = Timestamptz)]
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    #[diesel(sql_type = Timestamptz)]
    pub heartbeat_at: DateTime<Utc>,
    /// How long without a heartbeat before it counts as LOST.
    #[diesel(sql_type = BigInt)]
    pub lost_after_ms: i64,
    /// Its assigned partitions: `{topic: [partition...]}`.
    #[diesel(sql_type = Jsonb)]
    pub assigned: Value,
    /// How many partitions its topics have.
    #[diesel(sql_type = Integer)]
    pub partitions: i32,
    /// Tasks it had in flight at its last heartbeat.
    #[diesel(sql_type = Integer)]
    pub in_flight: i32,
    /// Its counters (received, succeeded, failed...) at its last heartbeat.
    #[diesel(sql_type = Jsonb)]
    pub counters: Value,
    /// Records behind on its assigned partitions (`None` until known).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub lag: Option<i64>,
    /// Records behind per assigned partition: `{"topic/partition": lag}`.
    #[diesel(sql_type = Jsonb)]
    pub lag_by_partition: Value,
    /// Tasks finished per second, over the last minute.
    #[diesel(sql_type = Double)]
    pub throughput: f64,
    /// The scaling hint it computed last.
    #[diesel(sql_type = Nullable<Integer>)]
    pub desired: Option<i32>,
}

impl WorkerRow {
    /// Whether the worker is running (neither STOPPED nor LOST).
    pub fn is_live(&self) -> bool {
        !matches!(self.state.as_str(), "STOPPED" | "LOST")
    }

    /// The custom events its tasks handle: (entrypoint, event) pairs.
    pub fn events(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entrypoints
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("name")?.as_str()?, e.get("events")?.as_array()?)))
            .flat_map(|(name, events)| {
                events
                    .iter()
                    .filter_map(Value::as_str)
                    .map(move |event| (name, event))
            })
    }

    /// The task entrypoints it registered (operations left out).
    pub fn task_entrypoints(&self) -> impl Iterator<Item = &str> {
        self.entrypoints
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e.get("kind").and_then(Value::as_str) != Some("operation"))
            .filter_map(|e| e.get("name").and_then(Value::as_str))
    }
}

/// What `kser control` can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlAction {
    /// Hold back an entrypoint, or everything, until resumed.
    Pause,
    /// Finish the running tasks, leave the group and exit.
    Drain,
}

impl ControlAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Drain => "drain",
        }
    }
}

/// A pause or drain in force: on `worker_id` (every worker when `None`),
/// for `entrypoint` (every one when `None`).
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName, Serialize, utoipa::ToSchema)]
pub struct Control {
    /// `pause` or `drain`.
    #[diesel(sql_type = Text)]
    pub action: String,
    /// The worker it applies to (`None`: every worker).
    #[diesel(sql_type = Nullable<Text>)]
    pub worker_id: Option<String>,
    /// The entrypoint it applies to (`None`: every one).
    #[diesel(sql_type = Nullable<Text>)]
    pub entrypoint: Option<String>,
}

/// What a heartbeat learns back.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub(crate) struct BeatReply {
    /// Whether the worker's row was there (it registers again if not).
    #[diesel(sql_type = BigInt)]
    pub beat: i64,
    /// How many workers it marked LOST.
    #[diesel(sql_type = BigInt)]
    pub lost: i64,
    /// The other live workers of its group, as their last beats said.
    #[diesel(sql_type = BigInt)]
    pub others: i64,
    /// Their lag, summed.
    #[diesel(sql_type = BigInt)]
    pub others_lag: i64,
    /// Their throughput, summed.
    #[diesel(sql_type = Double)]
    pub others_throughput: f64,
    /// How many workers of its group are in each state (`{"ACTIVE": 2}`),
    /// LOST and STOPPED rows included.
    #[diesel(sql_type = Jsonb)]
    pub states: serde_json::Value,
}

/// The state of `kser.workers` as people should see it: overdue is LOST.
const SHOWN_STATE: &str = "CASE WHEN state NOT IN ('STOPPED', 'LOST') \
     AND heartbeat_at < now() - lost_after_ms * interval '1 millisecond' \
     THEN 'LOST' ELSE state END";

impl Store {
    /// Records a worker that starts (or starts again under the same id).
    pub(crate) async fn register_worker(&self, worker: &NewWorker) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "INSERT INTO kser.workers (id, host, pid, consumer_group, topics, entrypoints, \
             version, state, lost_after_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, 'STARTING', $8) \
             ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, \
             consumer_group = excluded.consumer_group, topics = excluded.topics, \
             entrypoints = excluded.entrypoints, version = excluded.version, state = 'STARTING', \
             paused = '{}', started_at = now(), heartbeat_at = now(), \
             lost_after_ms = excluded.lost_after_ms, assigned = '{}', in_flight = 0, \
             counters = '{}', lag = NULL, lag_by_partition = '{}', throughput = 0, desired = NULL",
        )
        .bind::<Text, _>(&worker.id)
        .bind::<Text, _>(&worker.host)
        .bind::<Integer, _>(worker.pid)
        .bind::<Text, _>(&worker.group)
        .bind::<Array<Text>, _>(&worker.topics)
        .bind::<Jsonb, _>(&worker.entrypoints)
        .bind::<Text, _>(&worker.version)
        .bind::<BigInt, _>(worker.lost_after_ms)
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// Writes a worker's heartbeat and marks LOST the other workers whose
    /// heartbeat is overdue, in one statement, which also reads what the
    /// other live workers of `group` said last (for the scaling hint).
    pub(crate) async fn heartbeat(
        &self,
        id: &str,
        group: &str,
        beat: &Beat,
    ) -> Result<BeatReply, StoreError> {
        let mut conn = self.conn().await?;
        let reply: BeatReply = diesel::sql_query(
            "WITH beat AS ( \
                UPDATE kser.workers SET state = $2, paused = $3, heartbeat_at = now(), \
                assigned = $4, partitions = $5, in_flight = $6, counters = $7, lag = $8, \
                lag_by_partition = $12, \
                throughput = $9, desired = $10 WHERE id = $1 RETURNING id \
             ), lost AS ( \
                UPDATE kser.workers SET state = 'LOST' WHERE id <> $1 \
                AND state NOT IN ('STOPPED', 'LOST') \
                AND heartbeat_at < now() - lost_after_ms * interval '1 millisecond' \
                RETURNING id \
             ), others AS ( \
                SELECT count(*) AS n, coalesce(sum(lag), 0)::bigint AS lag, \
                coalesce(sum(throughput), 0)::float8 AS throughput FROM kser.workers \
                WHERE consumer_group = $11 AND id <> $1 AND state NOT IN ('STOPPED', 'LOST') \
                AND heartbeat_at >= now() - lost_after_ms * interval '1 millisecond' \
             ), states AS ( \
                SELECT state, count(*) AS n FROM kser.workers WHERE consumer_group = $11 \
                GROUP BY state \
             ) SELECT (SELECT count(*) FROM beat) AS beat, (SELECT count(*) FROM lost) AS lost, \
             n AS others, lag AS others_lag, throughput AS others_throughput, \
             (SELECT coalesce(jsonb_object_agg(state, n), '{}') FROM states) AS states \
             FROM others",
        )
        .bind::<Text, _>(id)
        .bind::<Text, _>(beat.state.as_str())
        .bind::<Array<Text>, _>(&beat.paused)
        .bind::<Jsonb, _>(&beat.assigned)
        .bind::<Integer, _>(beat.partitions)
        .bind::<Integer, _>(beat.in_flight)
        .bind::<Jsonb, _>(&beat.counters)
        .bind::<Nullable<BigInt>, _>(beat.lag)
        .bind::<Double, _>(beat.throughput)
        .bind::<Nullable<Integer>, _>(beat.desired)
        .bind::<Text, _>(group)
        .bind::<Jsonb, _>(&beat.lag_by_partition)
        .get_result(&mut conn)
        .await?;
        Ok(reply)
    }

    /// The controls that apply to worker `id`: its own and the fleet's.
    pub(crate) async fn controls_for(&self, id: &str) -> Result<Vec<Control>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT action, worker_id, entrypoint FROM kser.controls \
             WHERE worker_id IS NULL OR worker_id = $1 ORDER BY id",
        )
        .bind::<Text, _>(id)
        .load(&mut conn)
        .await?)
    }

    /// Every control in force.
    pub async fn controls(&self) -> Result<Vec<Control>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(
            diesel::sql_query(
                "SELECT action, worker_id, entrypoint FROM kser.controls ORDER BY id",
            )
            .load(&mut conn)
            .await?,
        )
    }

    /// Puts a control in force; `false` when it was already.
    pub async fn add_control(
        &self,
        action: ControlAction,
        worker_id: Option<&str>,
        entrypoint: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let added = diesel::sql_query(
            "INSERT INTO kser.controls (action, worker_id, entrypoint) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(action.as_str())
        .bind::<Nullable<Text>, _>(worker_id)
        .bind::<Nullable<Text>, _>(entrypoint)
        .execute(&mut conn)
        .await?;
        Ok(added > 0)
    }

    /// Lifts the pauses within a scope: those of `worker_id` (any worker
    /// when `None`) and `entrypoint` (any when `None`). Returns how many.
    pub async fn remove_pauses(
        &self,
        worker_id: Option<&str>,
        entrypoint: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "DELETE FROM kser.controls WHERE action = 'pause' \
             AND ($1::text IS NULL OR worker_id = $1) AND ($2::text IS NULL OR entrypoint = $2)",
        )
        .bind::<Nullable<Text>, _>(worker_id)
        .bind::<Nullable<Text>, _>(entrypoint)
        .execute(&mut conn)
        .await?)
    }

    /// A worker acted on its drain: forget it, so a worker that starts
    /// again under the same id is not drained at once.
    pub async fn drained(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query("DELETE FROM kser.controls WHERE action = 'drain' AND worker_id = $1")
            .bind::<Text, _>(id)
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    /// Records that a worker exited cleanly.
    pub(crate) async fn worker_stopped(
        &self,
        id: &str,
        counters: &Value,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "UPDATE kser.workers SET state = 'STOPPED', heartbeat_at = now(), assigned = '{}', \
             in_flight = 0, counters = $2, lag = NULL, lag_by_partition = '{}', throughput = 0, \
             desired = NULL \
             WHERE id = $1",
        )
        .bind::<Text, _>(id)
        .bind::<Jsonb, _>(counters)
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// The fleet: every worker recorded, by group, the newest first.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(format!(
            "SELECT id, host, pid, consumer_group AS \"group\", topics, entrypoints, version, \
             {SHOWN_STATE} AS state, paused, started_at, heartbeat_at, lost_after_ms, assigned, \
             partitions, in_flight, counters, lag, lag_by_partition, throughput, desired \
             FROM kser.workers \
             ORDER BY consumer_group, started_at DESC, id"
        ))
        .load(&mut conn)
        .await?)
    }
}
