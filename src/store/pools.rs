//! Limits across the fleet: `kser.pools`, `kser.leases` and `kser.waiters`.
//!
//! A task's [`MAX_CONCURRENCY`](crate::Task::MAX_CONCURRENCY) is the pool
//! `entrypoint:NAME`; the resources it [`ACQUIRES`](crate::Task::ACQUIRES)
//! are pools of their own. Before a task runs, its worker takes a lease on
//! each pool it needs, all or none, in one transaction that locks those
//! pools' rows (always in name order, so two workers never deadlock). A
//! task that finds no room, or finds tasks waiting before it, is parked:
//! a PENDING row and a `kser.waiters` row holding its message, in the same
//! transaction. Its record's offset may then move: the task is in Postgres.
//!
//! Room frees up when a lease is released (its task's final state is
//! written) or expires (its worker stopped renewing it: it died). Either way
//! the waiters are looked at in arrival order, and each one that fits gets
//! its leases reserved and its message queued in the outbox, in one
//! transaction: the worker that reads it again finds its room kept. A waiter
//! that does not fit stops those after it that need one of its pools, so a
//! task needing much is not starved by small ones arriving later.
//!
//! Only the units of live leases count, so a limit is exceeded by no run
//! whose worker is alive; a worker cut off from Postgres for longer than
//! the lease time may see its leases given away (as with any lease).
//!
//! One cohesive thing, kept in one file on purpose (~590 lines): acquiring,
//! parking, waking and sweeping are one protocol over the same three tables
//! and the same lock order, and each is only right read beside the others.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Int4, Jsonb, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::database::{INSERT_CHUNK, Store, StoreError};
use super::models::{NewOutbox, NewTask};
use super::schema::kser::tasks;

/// The most waiters one transaction looks at when room frees up.
const WAKE_BATCH: i64 = 1000;

/// The least time the room of a woken task is kept for it: its message is
/// sent again to the end of its partition, behind whatever backlog is
/// there, so it may take a while to be read.
const RESERVED_AT_LEAST: Duration = Duration::from_secs(300);

/// The pool a task's `MAX_CONCURRENCY` is kept in.
pub(crate) fn entrypoint_pool(entrypoint: &str) -> String {
    format!("entrypoint:{entrypoint}")
}

/// A task that must hold leases before it runs.
#[derive(Debug, Clone)]
pub(crate) struct LeaseRequest {
    /// The task.
    pub uuid: String,
    /// The pools it needs and how many units of each.
    pub needs: Vec<(String, i32)>,
    /// Its PENDING row, written if it has to wait (a row that exists is
    /// left as it is).
    pub row: NewTask,
    /// The message that runs it, sent again when room frees up.
    pub message: NewOutbox,
}

/// What [`Store::acquire`] decided for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// It holds its leases: run it.
    Granted,
    /// It waits in `kser.waiters` (or did already): its record is done with.
    Waiting,
}

/// One pool, for `kser pools`.
#[derive(Debug, Clone, QueryableByName, Serialize, utoipa::ToSchema)]
pub struct PoolRow {
    /// Its name: `entrypoint:NAME` for a task's concurrency limit.
    #[diesel(sql_type = Text)]
    pub name: String,
    /// How many units it has.
    #[diesel(sql_type = Int4)]
    pub capacity: i32,
    /// Units held by live leases.
    #[diesel(sql_type = BigInt)]
    pub in_use: i64,
    /// Live leases (runs holding units, or reserved for a waiter on its way).
    #[diesel(sql_type = BigInt)]
    pub leases: i64,
    /// Tasks waiting for room in it.
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
    /// Seconds the oldest of them has waited.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_wait_s: Option<f64>,
}

#[derive(QueryableByName)]
struct Capacity {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Int4)]
    capacity: i32,
}

#[derive(QueryableByName)]
struct Held {
    #[diesel(sql_type = Text)]
    pool: String,
    #[diesel(sql_type = BigInt)]
    units: i64,
}

#[derive(QueryableByName)]
struct Lease {
    #[diesel(sql_type = Text)]
    task_uuid: String,
    #[diesel(sql_type = Text)]
    pool: String,
    #[diesel(sql_type = Bool)]
    live: bool,
}

#[derive(QueryableByName)]
struct Waiter {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    task_uuid: String,
    #[diesel(sql_type = Array<Text>)]
    pools: Vec<String>,
    #[diesel(sql_type = Array<Int4>)]
    units: Vec<i32>,
}

#[derive(QueryableByName)]
struct Uuid {
    #[diesel(sql_type = Text)]
    task_uuid: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

/// Units free per pool, as one transaction sees them with the pools locked.
struct Room {
    capacity: HashMap<String, i64>,
    held: HashMap<String, i64>,
    /// Pools with a waiter ahead of any newcomer.
    blocked: HashSet<String>,
}

impl Room {
    fn fits(&self, needs: &[(String, i32)]) -> bool {
        needs.iter().all(|(pool, units)| {
            let capacity = self.capacity.get(pool).copied().unwrap_or(0);
            let held = self.held.get(pool).copied().unwrap_or(0);
            !self.blocked.contains(pool) && held + i64::from(*units) <= capacity
        })
    }

    fn take(&mut self, needs: &[(String, i32)]) {
        for (pool, units) in needs {
            *self.held.entry(pool.clone()).or_default() += i64::from(*units);
        }
    }

    fn block(&mut self, needs: &[(String, i32)]) {
        self.blocked
            .extend(needs.iter().map(|(pool, _)| pool.clone()));
    }
}

fn seconds(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

impl Store {
    /// Writes the pools a worker's registry declares, with their
    /// capacities: the worker started last sets a pool's capacity.
    pub(crate) async fn declare_pools(
        &self,
        pools: &BTreeMap<String, i32>,
    ) -> Result<(), StoreError> {
        if pools.is_empty() {
            return Ok(());
        }
        let names: Vec<&String> = pools.keys().collect();
        let capacities: Vec<i32> = pools.values().copied().collect();
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "INSERT INTO kser.pools (name, capacity) SELECT * FROM unnest($1::text[], $2::int4[]) \
             ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity, updated_at = now() \
             WHERE kser.pools.capacity <> excluded.capacity",
        )
        .bind::<Array<Text>, _>(names)
        .bind::<Array<Int4>, _>(capacities)
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// Takes, for each task in order, a lease on every pool it needs, all
    /// or none, for `ttl` (renewed by [`renew_leases`](Self::renew_leases)
    /// while it runs). A task that already holds live leases on its pools
    /// (reserved when it was woken, or taken by a worker that lost its
    /// partition) takes them over. A task that does not fit, or that would
    /// pass a task waiting for one of its pools, is parked: its PENDING row
    /// and its message are written to wait in `kser.waiters`.
    pub(crate) async fn acquire(
        &self,
        worker: &str,
        ttl: Duration,
        requests: &[LeaseRequest],
    ) -> Result<Vec<Admission>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let pools: Vec<String> = requests
            .iter()
            .flat_map(|r| r.needs.iter().map(|(pool, _)| pool.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let uuids: Vec<&str> = requests.iter().map(|r| r.uuid.as_str()).collect();
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let mut room = lock_room(conn, Some(&pools)).await?;
            let blocked: Vec<Name> = diesel::sql_query(
                "SELECT DISTINCT unnest(pools) AS name FROM kser.waiters WHERE pools && $1",
            )
            .bind::<Array<Text>, _>(&pools)
            .load(conn)
            .await?;
            room.blocked.extend(blocked.into_iter().map(|b| b.name));
            let leases: Vec<Lease> = diesel::sql_query(
                "SELECT task_uuid, pool, expires_at > now() AS live FROM kser.leases \
                 WHERE task_uuid = ANY($1)",
            )
            .bind::<Array<Text>, _>(&uuids)
            .load(conn)
            .await?;
            let parked: HashSet<String> =
                diesel::sql_query("SELECT task_uuid FROM kser.waiters WHERE task_uuid = ANY($1)")
                    .bind::<Array<Text>, _>(&uuids)
                    .load::<Uuid>(conn)
                    .await?
                    .into_iter()
                    .map(|u| u.task_uuid)
                    .collect();

            let mut admissions = Vec::with_capacity(requests.len());
            let (mut renew, mut stale, mut grant, mut park) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for request in requests {
                if parked.contains(&request.uuid) {
                    admissions.push(Admission::Waiting);
                    continue;
                }
                let held: Vec<&Lease> = leases
                    .iter()
                    .filter(|l| l.task_uuid == request.uuid)
                    .collect();
                let holds_all = request
                    .needs
                    .iter()
                    .all(|(pool, _)| held.iter().any(|l| l.live && &l.pool == pool));
                if holds_all {
                    renew.push(request.uuid.as_str());
                    admissions.push(Admission::Granted);
                    continue;
                }
                if !held.is_empty() {
                    stale.push(request.uuid.as_str());
                }
                if room.fits(&request.needs) {
                    room.take(&request.needs);
                    grant.push(request);
                    admissions.push(Admission::Granted);
                } else {
                    room.block(&request.needs);
                    park.push(request);
                    admissions.push(Admission::Waiting);
                }
            }
            if !stale.is_empty() {
                diesel::sql_query("DELETE FROM kser.leases WHERE task_uuid = ANY($1)")
                    .bind::<Array<Text>, _>(&stale)
                    .execute(conn)
                    .await?;
            }
            if !renew.is_empty() {
                diesel::sql_query(
                    "UPDATE kser.leases SET worker = $1, \
                     expires_at = now() + make_interval(secs => $2) WHERE task_uuid = ANY($3)",
                )
                .bind::<Text, _>(worker)
                .bind::<Double, _>(seconds(ttl))
                .bind::<Array<Text>, _>(&renew)
                .execute(conn)
                .await?;
            }
            let granted: Vec<(&str, &str, i32)> = grant
                .iter()
                .flat_map(|r| {
                    r.needs
                        .iter()
                        .map(|(pool, units)| (r.uuid.as_str(), pool.as_str(), *units))
                })
                .collect();
            insert_leases(conn, &granted, Some(worker), ttl).await?;
            park_tasks(conn, &park).await?;
            Ok(admissions)
        })
        .await
    }

    /// Renews the leases of tasks running on `worker` for another `ttl`.
    pub(crate) async fn renew_leases(
        &self,
        worker: &str,
        uuids: &[String],
        ttl: Duration,
    ) -> Result<usize, StoreError> {
        if uuids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "UPDATE kser.leases SET worker = $1, expires_at = now() + make_interval(secs => $2) \
             WHERE task_uuid = ANY($3)",
        )
        .bind::<Text, _>(worker)
        .bind::<Double, _>(seconds(ttl))
        .bind::<Array<Text>, _>(uuids)
        .execute(&mut conn)
        .await?)
    }

    /// Releases the leases of tasks whose final state (or retry) is
    /// written, and wakes the waiters that fit in the room freed, reserving
    /// their leases for `ttl`. Returns how many were woken: their messages
    /// are in the outbox.
    pub(crate) async fn release_leases(
        &self,
        uuids: &[String],
        ttl: Duration,
    ) -> Result<usize, StoreError> {
        if uuids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let released = diesel::sql_query("DELETE FROM kser.leases WHERE task_uuid = ANY($1)")
                .bind::<Array<Text>, _>(uuids)
                .execute(conn)
                .await?;
            if released == 0 || !any_waiter(conn).await? {
                return Ok(0);
            }
            wake(conn, ttl).await
        })
        .await
    }

    /// Drops expired leases (their workers died) and wakes the waiters that
    /// fit: run about every second by each worker that has limits. Returns
    /// how many were woken.
    pub(crate) async fn sweep_leases(&self, ttl: Duration) -> Result<usize, StoreError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            if !any_waiter(conn).await? {
                diesel::sql_query("DELETE FROM kser.leases WHERE expires_at <= now()")
                    .execute(conn)
                    .await?;
                return Ok(0);
            }
            wake(conn, ttl).await
        })
        .await
    }

    /// Every pool with its use and its waiters, by name.
    pub async fn pools(&self) -> Result<Vec<PoolRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT p.name, p.capacity, \
                 coalesce((SELECT sum(l.units) FROM kser.leases l \
                     WHERE l.pool = p.name AND l.expires_at > now()), 0)::int8 AS in_use, \
                 (SELECT count(*) FROM kser.leases l \
                     WHERE l.pool = p.name AND l.expires_at > now()) AS leases, \
                 (SELECT count(*) FROM kser.waiters w WHERE p.name = ANY(w.pools)) AS waiting, \
                 (SELECT extract(epoch FROM now() - min(w.created_at))::float8 \
                     FROM kser.waiters w WHERE p.name = ANY(w.pools)) AS oldest_wait_s \
             FROM kser.pools p ORDER BY p.name",
        )
        .load(&mut conn)
        .await?)
    }
}

/// Locks the pools' rows (`pools`, or all of them), in name order, and
/// reads their capacities and the units their live leases hold.
async fn lock_room(
    conn: &mut AsyncPgConnection,
    pools: Option<&[String]>,
) -> Result<Room, StoreError> {
    let capacities: Vec<Capacity> = match pools {
        Some(pools) => {
            diesel::sql_query(
                "SELECT name, capacity FROM kser.pools WHERE name = ANY($1) \
                 ORDER BY name FOR UPDATE",
            )
            .bind::<Array<Text>, _>(pools)
            .load(conn)
            .await?
        }
        None => {
            diesel::sql_query("SELECT name, capacity FROM kser.pools ORDER BY name FOR UPDATE")
                .load(conn)
                .await?
        }
    };
    let names: Vec<&str> = capacities.iter().map(|c| c.name.as_str()).collect();
    let held: Vec<Held> = diesel::sql_query(
        "SELECT pool, sum(units)::int8 AS units FROM kser.leases \
         WHERE pool = ANY($1) AND expires_at > now() GROUP BY pool",
    )
    .bind::<Array<Text>, _>(&names)
    .load(conn)
    .await?;
    Ok(Room {
        capacity: capacities
            .into_iter()
            .map(|c| (c.name, i64::from(c.capacity)))
            .collect(),
        held: held.into_iter().map(|h| (h.pool, h.units)).collect(),
        blocked: HashSet::new(),
    })
}

async fn any_waiter(conn: &mut AsyncPgConnection) -> Result<bool, StoreError> {
    let found: Exists = diesel::sql_query("SELECT EXISTS (SELECT 1 FROM kser.waiters) AS exists")
        .get_result(conn)
        .await?;
    Ok(found.exists)
}

/// Looks at the waiters in arrival order, with every pool locked: each one
/// that fits gets its leases, held by no worker yet and reserved for `ttl`
/// or [`RESERVED_AT_LEAST`], whichever is longer, and its message goes to
/// the outbox. Expired leases are dropped
/// first.
async fn wake(conn: &mut AsyncPgConnection, ttl: Duration) -> Result<usize, StoreError> {
    let mut room = lock_room(conn, None).await?;
    diesel::sql_query("DELETE FROM kser.leases WHERE expires_at <= now()")
        .execute(conn)
        .await?;
    let waiters: Vec<Waiter> = diesel::sql_query(
        "SELECT seq, task_uuid, pools, units FROM kser.waiters ORDER BY seq LIMIT $1",
    )
    .bind::<BigInt, _>(WAKE_BATCH)
    .load(conn)
    .await?;
    let mut woken = Vec::new();
    let mut granted = Vec::new();
    for waiter in &waiters {
        let needs: Vec<(String, i32)> = waiter
            .pools
            .iter()
            .cloned()
            .zip(waiter.units.iter().copied())
            .collect();
        if room.fits(&needs) {
            room.take(&needs);
            woken.push(waiter.seq);
            granted.extend(
                needs
                    .into_iter()
                    .map(|(pool, units)| (waiter.task_uuid.as_str(), pool, units)),
            );
        } else {
            room.block(&needs);
        }
    }
    if woken.is_empty() {
        return Ok(0);
    }
    let granted: Vec<(&str, &str, i32)> = granted
        .iter()
        .map(|(uuid, pool, units)| (*uuid, pool.as_str(), *units))
        .collect();
    insert_leases(conn, &granted, None, ttl.max(RESERVED_AT_LEAST)).await?;
    diesel::sql_query(
        "WITH woken AS (DELETE FROM kser.waiters WHERE seq = ANY($1) \
             RETURNING seq, topic, message_key, payload, operation_uuid) \
         INSERT INTO kser.outbox (topic, message_key, payload, operation_uuid) \
         SELECT topic, message_key, payload, operation_uuid FROM woken ORDER BY seq",
    )
    .bind::<Array<BigInt>, _>(&woken)
    .execute(conn)
    .await?;
    Ok(woken.len())
}

/// Inserts leases `(task, pool, units)` held by `worker` (`None`: reserved
/// for a woken waiter) until `ttl` from now.
async fn insert_leases(
    conn: &mut AsyncPgConnection,
    leases: &[(&str, &str, i32)],
    worker: Option<&str>,
    ttl: Duration,
) -> Result<(), StoreError> {
    if leases.is_empty() {
        return Ok(());
    }
    let tasks: Vec<&str> = leases.iter().map(|l| l.0).collect();
    let pools: Vec<&str> = leases.iter().map(|l| l.1).collect();
    let units: Vec<i32> = leases.iter().map(|l| l.2).collect();
    diesel::sql_query(
        "INSERT INTO kser.leases (task_uuid, pool, units, worker, expires_at) \
         SELECT t, p, u, $4, now() + make_interval(secs => $5) \
         FROM unnest($1::text[], $2::text[], $3::int4[]) AS l(t, p, u) \
         ON CONFLICT (pool, task_uuid) DO UPDATE SET units = excluded.units, \
             worker = excluded.worker, expires_at = excluded.expires_at, acquired_at = now()",
    )
    .bind::<Array<Text>, _>(tasks)
    .bind::<Array<Text>, _>(pools)
    .bind::<Array<Int4>, _>(units)
    .bind::<Nullable<Text>, _>(worker)
    .bind::<Double, _>(seconds(ttl))
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes parked tasks: their PENDING rows (left alone where they exist)
/// and their places in `kser.waiters`, in arrival order.
async fn park_tasks(
    conn: &mut AsyncPgConnection,
    parked: &[&LeaseRequest],
) -> Result<(), StoreError> {
    if parked.is_empty() {
        return Ok(());
    }
    let rows: Vec<NewTask> = parked.iter().map(|r| r.row.clone()).collect();
    for chunk in rows.chunks(INSERT_CHUNK) {
        diesel::insert_into(tasks::table)
            .values(chunk)
            .on_conflict_do_nothing()
            .execute(conn)
            .await?;
    }
    let waiters: Vec<serde_json::Value> = parked
        .iter()
        .map(|r| {
            serde_json::json!({
                "task_uuid": r.uuid,
                "entrypoint": r.row.entrypoint,
                "pools": r.needs.iter().map(|(pool, _)| pool).collect::<Vec<_>>(),
                "units": r.needs.iter().map(|(_, units)| units).collect::<Vec<_>>(),
                "topic": r.message.topic,
                "message_key": r.message.message_key,
                "payload": r.message.payload,
                "operation_uuid": r.message.operation_uuid,
            })
        })
        .collect();
    diesel::sql_query(
        "INSERT INTO kser.waiters (task_uuid, entrypoint, pools, units, topic, message_key, \
             payload, operation_uuid) \
         SELECT e->>'task_uuid', e->>'entrypoint', \
             ARRAY(SELECT v FROM jsonb_array_elements_text(e->'pools') \
                 WITH ORDINALITY AS a(v, i) ORDER BY i), \
             ARRAY(SELECT v::int4 FROM jsonb_array_elements_text(e->'units') \
                 WITH ORDINALITY AS a(v, i) ORDER BY i), \
             e->>'topic', e->>'message_key', e->>'payload', e->>'operation_uuid' \
         FROM jsonb_array_elements($1) WITH ORDINALITY AS x(e, n) \
         ORDER BY n ON CONFLICT (task_uuid) DO NOTHING",
    )
    .bind::<Jsonb, _>(serde_json::Value::Array(waiters))
    .execute(conn)
    .await?;
    Ok(())
}
