//! `kser.schedules`: recurring messages, and the transaction that fires the
//! due ones. Firing claims the due rows with `FOR UPDATE SKIP LOCKED`, so each
//! is fired by one worker of a fleet at a time, and writes the PENDING task,
//! its outbox message and the schedule's next tick together: a tick is sent
//! exactly when it is recorded.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::Serialize;

use super::database::{Store, StoreError};
use super::models::{NewOutbox, NewTask};
use super::schema::kser::{outbox, tasks};

/// The most schedules one worker fires in one transaction.
const FIRE_BATCH: i64 = 100;

/// One row of `kser.schedules`.
#[derive(Debug, Clone, QueryableByName, Serialize)]
pub struct ScheduleRow {
    /// Its name, unique.
    #[diesel(sql_type = Text)]
    pub name: String,
    /// The cron expression.
    #[diesel(sql_type = Text)]
    pub cron: String,
    /// The entrypoint each tick sends.
    #[diesel(sql_type = Text)]
    pub entrypoint: String,
    /// The parameters each tick sends, a JSON object.
    #[diesel(sql_type = Jsonb)]
    pub params: serde_json::Value,
    /// The topic the messages go to.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// The missed-tick policy, `skip` or `once`.
    #[diesel(sql_type = Text)]
    pub missed: String,
    /// Whether it is paused (no tick fires).
    #[diesel(sql_type = Bool)]
    pub paused: bool,
    /// The next tick not fired yet.
    #[diesel(sql_type = Timestamptz)]
    pub next_at: DateTime<Utc>,
    /// When it fired last.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_fired_at: Option<DateTime<Utc>>,
    /// When it was added.
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

/// A schedule to add.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// Its name, unique.
    pub name: String,
    /// The cron expression (5 fields, or 6 with seconds first).
    pub cron: String,
    /// The entrypoint each tick sends.
    pub entrypoint: String,
    /// The parameters each tick sends, a JSON object.
    pub params: serde_json::Value,
    /// The topic the messages go to.
    pub topic: String,
    /// The missed-tick policy, `skip` or `once`.
    pub missed: String,
    /// Its first tick.
    pub next_at: DateTime<Utc>,
}

/// What firing a due schedule writes: a task and its outbox message per
/// tick, and the tick to wait for next. `next_at: None` pauses the schedule
/// (its expression has no tick left).
#[derive(Debug, Clone)]
pub(crate) struct ScheduleFiring {
    /// Each tick to fire: its PENDING task and the message that runs it.
    pub messages: Vec<(NewTask, NewOutbox)>,
    /// The tick to wait for next.
    pub next_at: Option<DateTime<Utc>>,
}

/// A schedule fired by [`Store::fire_schedules`].
#[derive(Debug, Clone)]
pub(crate) struct Fired {
    /// The schedule's name.
    pub name: String,
    /// Uuids of the tasks recorded (a tick recorded before is left out).
    pub uuids: Vec<String>,
    /// Whether it was paused for having no tick left.
    pub exhausted: bool,
}

const COLUMNS: &str =
    "name, cron, entrypoint, params, topic, missed, paused, next_at, last_fired_at, created_at";

impl Store {
    /// Adds a schedule; a name in use is a [`StoreError::Conflict`].
    pub async fn add_schedule(&self, new: &NewSchedule) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let added = diesel::sql_query(
            "INSERT INTO kser.schedules (name, cron, entrypoint, params, topic, missed, next_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind::<Text, _>(&new.name)
        .bind::<Text, _>(&new.cron)
        .bind::<Text, _>(&new.entrypoint)
        .bind::<Jsonb, _>(&new.params)
        .bind::<Text, _>(&new.topic)
        .bind::<Text, _>(&new.missed)
        .bind::<Timestamptz, _>(new.next_at)
        .execute(&mut conn)
        .await?;
        if added == 0 {
            return Err(StoreError::Conflict(format!(
                "a schedule named '{}' exists already (remove it first)",
                new.name
            )));
        }
        Ok(())
    }

    /// Every schedule, by name.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(format!(
            "SELECT {COLUMNS} FROM kser.schedules ORDER BY name"
        ))
        .load(&mut conn)
        .await?)
    }

    /// One schedule by name.
    pub async fn schedule_named(&self, name: &str) -> Result<ScheduleRow, StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(format!(
            "SELECT {COLUMNS} FROM kser.schedules WHERE name = $1"
        ))
        .bind::<Text, _>(name)
        .get_result(&mut conn)
        .await
        .optional()?
        .ok_or_else(|| not_found(name))
    }

    /// Removes a schedule; the tasks it sent stay.
    pub async fn remove_schedule(&self, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let removed = diesel::sql_query("DELETE FROM kser.schedules WHERE name = $1")
            .bind::<Text, _>(name)
            .execute(&mut conn)
            .await?;
        if removed == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    /// Pauses a schedule (`next_at: None`), or resumes it from `next_at`, so
    /// the ticks of the pause are not fired.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        next_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let changed = diesel::sql_query(
            "UPDATE kser.schedules SET paused = $2, next_at = coalesce($3, next_at), \
                 updated_at = now() WHERE name = $1",
        )
        .bind::<Text, _>(name)
        .bind::<Bool, _>(next_at.is_none())
        .bind::<Nullable<Timestamptz>, _>(next_at)
        .execute(&mut conn)
        .await?;
        if changed == 0 {
            return Err(not_found(name));
        }
        Ok(())
    }

    /// Fires the schedules due at the database's `now()`, in one
    /// transaction: `plan` says what each writes. Rows another session is
    /// firing are skipped, not waited for. A task whose uuid exists already
    /// (the same tick fired before) is not recorded nor sent again.
    pub(crate) async fn fire_schedules(
        &self,
        plan: impl Fn(&ScheduleRow, DateTime<Utc>) -> ScheduleFiring + Sync,
    ) -> Result<Vec<Fired>, StoreError> {
        #[derive(QueryableByName)]
        struct Now {
            #[diesel(sql_type = Timestamptz)]
            now: DateTime<Utc>,
        }
        let plan = &plan;
        let mut conn = self.conn().await?;
        conn.transaction(async move |conn| {
            let due: Vec<ScheduleRow> = diesel::sql_query(format!(
                "SELECT {COLUMNS} FROM kser.schedules WHERE NOT paused AND next_at <= now() \
                 ORDER BY next_at LIMIT {FIRE_BATCH} FOR UPDATE SKIP LOCKED"
            ))
            .load(conn)
            .await?;
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let now = diesel::sql_query("SELECT now() AS now")
                .get_result::<Now>(conn)
                .await?
                .now;
            let mut fired = Vec::with_capacity(due.len());
            for schedule in &due {
                let firing = plan(schedule, now);
                let mut uuids = Vec::new();
                for (task, message) in &firing.messages {
                    let inserted: Option<String> = diesel::insert_into(tasks::table)
                        .values(task)
                        .on_conflict_do_nothing()
                        .returning(tasks::uuid)
                        .get_result(conn)
                        .await
                        .optional()?;
                    if let Some(uuid) = inserted {
                        diesel::insert_into(outbox::table)
                            .values(message)
                            .execute(conn)
                            .await?;
                        uuids.push(uuid);
                    }
                }
                diesel::sql_query(
                    "UPDATE kser.schedules SET next_at = coalesce($2, next_at), \
                         paused = paused OR $2 IS NULL, \
                         last_fired_at = CASE WHEN $3 THEN now() ELSE last_fired_at END, \
                         updated_at = now() WHERE name = $1",
                )
                .bind::<Text, _>(&schedule.name)
                .bind::<Nullable<Timestamptz>, _>(firing.next_at)
                .bind::<Bool, _>(!uuids.is_empty())
                .execute(conn)
                .await?;
                fired.push(Fired {
                    name: schedule.name.clone(),
                    uuids,
                    exhausted: firing.next_at.is_none(),
                });
            }
            Ok(fired)
        })
        .await
    }
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound(format!("no schedule named '{name}'"))
}
