//! Dead letters kept in Postgres: records whose dead letter the dead-letter
//! topic refused for good (too large for it, an invalid record, no right to
//! write there). The original key and value are kept byte for byte in
//! `kser.dead_letters`; the dead-letter topic gets a small record, without
//! payload, that points at the row.

use chrono::{DateTime, Utc};
use diesel::expression::functions::declare_sql_function;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::database::{Store, StoreError};
use super::schema::kser::dead_letters;

#[declare_sql_function]
extern "SQL" {
    /// Postgres' `octet_length`: the size of a value in bytes.
    fn octet_length(
        value: diesel::sql_types::Nullable<diesel::sql_types::Bytea>,
    ) -> diesel::sql_types::Nullable<diesel::sql_types::Int4>;
}

/// A record to keep: where it was read, why it was dead-lettered, why the
/// dead-letter topic refused it, and its bytes.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = dead_letters, check_for_backend(diesel::pg::Pg))]
pub(crate) struct NewDeadLetter {
    /// The dead-letter topic that refused it.
    pub dlq_topic: String,
    /// The topic of the record that failed.
    pub topic: String,
    /// Its partition.
    pub kafka_partition: i32,
    /// Its offset.
    pub kafka_offset: i64,
    /// The record timestamp, in milliseconds.
    pub kafka_timestamp: Option<i64>,
    /// Why it was dead-lettered: `invalid_message`, `unknown_entrypoint`, `fatal`...
    pub error_kind: String,
    /// The error, as the dead letter says it.
    pub error: String,
    /// How many attempts it had.
    pub attempts: i32,
    /// The uuid it named, if any.
    pub uuid: Option<String>,
    /// Why the dead-letter topic refused it.
    pub producer_error: String,
    /// The record's key, as it was.
    pub key: Option<Vec<u8>>,
    /// The record's value, as it was.
    pub value: Option<Vec<u8>>,
}

/// A kept dead letter as `dlq list` shows it: everything but the value,
/// which may be large; `Store::dead_letter_original` reads that.
#[derive(Debug, Clone, Queryable, Selectable, Serialize)]
#[diesel(table_name = dead_letters, check_for_backend(diesel::pg::Pg))]
pub struct StoredDeadLetter {
    /// The row id.
    pub id: i64,
    /// The dead-letter topic that refused it.
    pub dlq_topic: String,
    /// The topic of the record that failed.
    pub topic: String,
    /// Its partition.
    pub kafka_partition: i32,
    /// Its offset.
    pub kafka_offset: i64,
    /// The record timestamp, in milliseconds.
    pub kafka_timestamp: Option<i64>,
    /// Why it was dead-lettered: `invalid_message`, `unknown_entrypoint`, `fatal`...
    pub error_kind: String,
    /// The error, as the dead letter says it.
    pub error: String,
    /// How many attempts it had.
    pub attempts: i32,
    /// The uuid it named, if any.
    pub uuid: Option<String>,
    /// Why the dead-letter topic refused it.
    pub producer_error: String,
    /// The record's key, as it was.
    pub key: Option<Vec<u8>>,
    /// The size of the value in bytes; `None` for a record without one.
    #[diesel(select_expression = octet_length(dead_letters::value))]
    pub value_bytes: Option<i32>,
    /// When it was kept.
    pub created_at: DateTime<Utc>,
}

/// The original bytes of a kept dead letter, to replay.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = dead_letters, check_for_backend(diesel::pg::Pg))]
pub(crate) struct KeptRecord {
    /// The record's key, as it was.
    pub key: Option<Vec<u8>>,
    /// The record's value, as it was.
    pub value: Option<Vec<u8>>,
}

impl Store {
    /// Keeps a dead letter and returns its row id. The same record kept
    /// again (delivered twice) keeps its row, with the latest error.
    pub(crate) async fn keep_dead_letter(&self, row: &NewDeadLetter) -> Result<i64, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::insert_into(dead_letters::table)
            .values(row)
            .on_conflict((
                dead_letters::topic,
                dead_letters::kafka_partition,
                dead_letters::kafka_offset,
            ))
            .do_update()
            .set((
                dead_letters::dlq_topic.eq(excluded(dead_letters::dlq_topic)),
                dead_letters::error_kind.eq(excluded(dead_letters::error_kind)),
                dead_letters::error.eq(excluded(dead_letters::error)),
                dead_letters::attempts.eq(excluded(dead_letters::attempts)),
                dead_letters::producer_error.eq(excluded(dead_letters::producer_error)),
            ))
            .returning(dead_letters::id)
            .get_result(&mut conn)
            .await?)
    }

    /// A page of the dead letters kept for `dlq_topic`: at most `limit`,
    /// those with an id above `after`, oldest first, without their values.
    /// `dlq list` reads them a page at a time.
    pub async fn kept_dead_letters(
        &self,
        dlq_topic: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(dead_letters::table
            .filter(dead_letters::dlq_topic.eq(dlq_topic))
            .filter(dead_letters::id.gt(after))
            .order(dead_letters::id.asc())
            .limit(limit)
            .select(StoredDeadLetter::as_select())
            .load(&mut conn)
            .await?)
    }

    /// The kept dead letters with these ids (those that exist), without
    /// their values.
    pub async fn kept_dead_letters_by_id(
        &self,
        ids: &[i64],
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        Ok(dead_letters::table
            .filter(dead_letters::id.eq_any(ids))
            .select(StoredDeadLetter::as_select())
            .load(&mut conn)
            .await?)
    }

    /// The original key and value of a kept dead letter, byte for byte;
    /// `None` if there is no row `id`.
    pub(crate) async fn dead_letter_original(
        &self,
        id: i64,
    ) -> Result<Option<KeptRecord>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(dead_letters::table
            .find(id)
            .select(KeptRecord::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }
}
