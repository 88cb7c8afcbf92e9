//! Custom events in Postgres: `kser.events`, sent by `kser control event`,
//! and `kser.event_deliveries`, one row per worker and task that handled
//! one. Workers read the events sent after they started, about once a
//! second, with their controls.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Jsonb, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::Serialize;
use serde_json::Value;

use super::database::{Store, StoreError};

/// An event as a worker reads it.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct EventRow {
    /// Its id, in the order events were sent.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Its name, one a task declares ([`Task::EVENTS`](crate::Task::EVENTS)).
    #[diesel(sql_type = Text)]
    pub name: String,
    /// Its parameters, a JSON object.
    #[diesel(sql_type = Jsonb)]
    pub params: Value,
    /// Only this entrypoint's handler, when set.
    #[diesel(sql_type = Nullable<Text>)]
    pub entrypoint: Option<String>,
}

/// A worker's handling of an event for one of its tasks.
#[derive(Debug, Clone, Serialize, diesel::QueryableByName)]
pub(crate) struct Delivery {
    /// The worker that handled it.
    #[diesel(sql_type = Text)]
    pub worker_id: String,
    /// The task whose handler ran.
    #[diesel(sql_type = Text)]
    pub entrypoint: String,
    /// Why the handler failed; `None` when it succeeded.
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
    /// When the handler ended.
    #[diesel(sql_type = Timestamptz)]
    pub delivered_at: DateTime<Utc>,
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

impl Store {
    /// Records an event for the workers and entrypoint given (every one
    /// where `None`) and returns its id.
    pub async fn add_event(
        &self,
        name: &str,
        params: &Value,
        worker_id: Option<&str>,
        entrypoint: Option<&str>,
    ) -> Result<i64, StoreError> {
        let mut conn = self.conn().await?;
        let row: Id = diesel::sql_query(
            "INSERT INTO kser.events (name, params, worker_id, entrypoint) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind::<Text, _>(name)
        .bind::<Jsonb, _>(params)
        .bind::<Nullable<Text>, _>(worker_id)
        .bind::<Nullable<Text>, _>(entrypoint)
        .get_result(&mut conn)
        .await?;
        Ok(row.id)
    }

    /// The id of the last event sent, 0 before the first: a worker starts
    /// reading after it.
    pub(crate) async fn last_event_id(&self) -> Result<i64, StoreError> {
        let mut conn = self.conn().await?;
        let row: Id = diesel::sql_query("SELECT coalesce(max(id), 0) AS id FROM kser.events")
            .get_result(&mut conn)
            .await?;
        Ok(row.id)
    }

    /// The events for worker `worker_id` sent after event `after`, oldest
    /// first.
    pub(crate) async fn events_after(
        &self,
        worker_id: &str,
        after: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT id, name, params, entrypoint FROM kser.events \
             WHERE id > $1 AND (worker_id IS NULL OR worker_id = $2) ORDER BY id LIMIT 1000",
        )
        .bind::<BigInt, _>(after)
        .bind::<Text, _>(worker_id)
        .load(&mut conn)
        .await?)
    }

    /// Records that `worker_id` handled event `event_id` for each of
    /// `entrypoints`, with the error of each (`None`: it succeeded).
    pub(crate) async fn record_deliveries(
        &self,
        event_id: i64,
        worker_id: &str,
        handled: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let entrypoints: Vec<&str> = handled.iter().map(|(e, _)| e.as_str()).collect();
        let errors: Vec<Option<&str>> = handled.iter().map(|(_, e)| e.as_deref()).collect();
        diesel::sql_query(
            "INSERT INTO kser.event_deliveries (event_id, worker_id, entrypoint, error) \
             SELECT $1, $2, e, err FROM unnest($3::text[], $4::text[]) AS d(e, err) \
             ON CONFLICT DO NOTHING",
        )
        .bind::<BigInt, _>(event_id)
        .bind::<Text, _>(worker_id)
        .bind::<Array<Text>, _>(entrypoints)
        .bind::<Array<Nullable<Text>>, _>(errors)
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// Who handled event `event_id` so far.
    pub(crate) async fn deliveries(&self, event_id: i64) -> Result<Vec<Delivery>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(
            "SELECT worker_id, entrypoint, error, delivered_at FROM kser.event_deliveries \
             WHERE event_id = $1 ORDER BY worker_id, entrypoint",
        )
        .bind::<BigInt, _>(event_id)
        .load(&mut conn)
        .await?)
    }
}
