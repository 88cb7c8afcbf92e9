//! The privileges a worker's role needs on a migrated schema, checked at
//! start so a missing grant stops the worker once, named, instead of
//! failing its first write.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::database::{Store, StoreError};

/// The tables of schema `kser` a worker reads and writes, and the
/// privileges it needs on each.
const WORKER_TABLES: &[&str] = &[
    "kser.tasks",
    "kser.operations",
    "kser.outbox",
    "kser.task_attempts",
    "kser.task_minutes",
    "kser.dead_letters",
    "kser.workers",
    "kser.controls",
    "kser.events",
    "kser.event_deliveries",
    "kser.schedules",
    "kser.steps",
    "kser.pools",
    "kser.leases",
    "kser.waiters",
];
const WORKER_TABLE_PRIVILEGES: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE"];
/// The sequences behind `bigserial` ids, which inserts advance.
const WORKER_SEQUENCES: &[&str] = &[
    "kser.outbox_id_seq",
    "kser.dead_letters_id_seq",
    "kser.waiters_seq_seq",
];

impl Store {
    /// Fails with [`StoreError::Privileges`], naming each one missing,
    /// unless the connected role has every privilege a worker needs on a
    /// migrated schema (`WORKER_PRIVILEGES`). A worker checks at start, so
    /// a role short of a grant stops it at once with one clear error instead
    /// of every write failing later. Asks Postgres (`has_*_privilege`), so
    /// it needs no right of its own and changes nothing.
    pub(crate) async fn check_privileges(&self) -> Result<(), StoreError> {
        use diesel::sql_types::{Array, Text};

        #[derive(QueryableByName)]
        struct Missing {
            #[diesel(sql_type = Text)]
            object: String,
            #[diesel(sql_type = Text)]
            privilege: String,
        }

        let mut conn = self.conn().await?;
        // Without USAGE on the schema, Postgres cannot even name its tables.
        self.require(
            &mut conn,
            "has_schema_privilege('kser', 'USAGE')",
            "USAGE on schema kser",
        )
        .await?;
        let (mut kinds, mut objects, mut privileges) = (Vec::new(), Vec::new(), Vec::new());
        for table in WORKER_TABLES {
            for privilege in WORKER_TABLE_PRIVILEGES {
                kinds.push("table");
                objects.push(*table);
                privileges.push(*privilege);
            }
        }
        for sequence in WORKER_SEQUENCES {
            kinds.push("sequence");
            objects.push(*sequence);
            privileges.push("USAGE");
        }
        let missing: Vec<Missing> = diesel::sql_query(
            "SELECT object, privilege \
             FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY \
                  AS wanted(kind, object, privilege, n) \
             WHERE NOT CASE kind WHEN 'table' THEN has_table_privilege(object, privilege) \
                                 ELSE has_sequence_privilege(object, privilege) END \
             ORDER BY n",
        )
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&objects)
        .bind::<Array<Text>, _>(&privileges)
        .load(&mut conn)
        .await?;
        if missing.is_empty() {
            return Ok(());
        }
        // "SELECT, UPDATE on kser.tasks; USAGE on kser.outbox_id_seq"
        let mut by_object: Vec<(String, Vec<String>)> = Vec::new();
        for Missing { object, privilege } in missing {
            match by_object.iter_mut().find(|(o, _)| *o == object) {
                Some((_, privileges)) => privileges.push(privilege),
                None => by_object.push((object, vec![privilege])),
            }
        }
        let missing = by_object
            .iter()
            .map(|(object, privileges)| format!("{} on {object}", privileges.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(StoreError::Privileges {
            role: self.role(&mut conn).await?,
            missing,
        })
    }

    /// The role this store's connections act as.
    /// Fails naming `missing` when `check`, an SQL test of a privilege, is
    /// false for the connection's role.
    pub(super) async fn require(
        &self,
        conn: &mut AsyncPgConnection,
        check: &str,
        missing: &str,
    ) -> Result<(), StoreError> {
        let granted: bool = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(check))
            .get_result(conn)
            .await?;
        if granted {
            return Ok(());
        }
        Err(StoreError::Privileges {
            role: self.role(conn).await?,
            missing: missing.into(),
        })
    }

    async fn role(&self, conn: &mut AsyncPgConnection) -> Result<String, StoreError> {
        Ok(diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "current_user::text",
        ))
        .get_result(conn)
        .await?)
    }
}
