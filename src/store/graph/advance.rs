//! A graph step finished: release the dependents it satisfied, or, when it
//! failed, apply its policy (`continue`: cancel what can no longer run;
//! `fail`: stop the operation; `compensate`: stop, then compensate).

use std::collections::HashSet;

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::compensation::{compensate, compensation_finished};
use super::{Graph, cancel_waiting, finish, release};
use crate::store::database::StoreError;
use crate::store::models::{NewTask, OperationRow, TaskStatus};
use crate::store::schema::kser::operations;
use crate::store::steps::{FinishedOperation, message_uuid};

/// Moves a graph operation along after step `step` finished; `op` is
/// locked.
pub(in crate::store) async fn advance(
    conn: &mut AsyncPgConnection,
    op: OperationRow,
    step: &NewTask,
) -> Result<Option<FinishedOperation>, StoreError> {
    let mut graph = Graph::load(conn, &op.uuid).await?;
    let Some(me) = graph.nodes.iter().position(|(t, _)| t.uuid == step.uuid) else {
        return Ok(None);
    };
    if graph.nodes[me].1.compensates {
        return compensation_finished(conn, &op, &mut graph, me).await;
    }
    if op.status == TaskStatus::Compensating.as_str() {
        // A step that was running when the operation began compensating:
        // the compensations start once nothing runs any more.
        return compensate(conn, &op, &mut graph).await;
    }
    if op.status != TaskStatus::Running.as_str() {
        return Ok(None);
    }
    if step.status == TaskStatus::Success.as_str() {
        release_dependents(conn, &op, &mut graph, me).await?;
    } else {
        let (task, node) = &graph.nodes[me];
        let reason = step.error.as_deref().unwrap_or("failed");
        let error = format!(
            "step '{}' ({}) failed: {reason}",
            node.name, task.entrypoint
        );
        match node.on_failure.as_str() {
            "continue" => cancel_unreachable(conn, &mut graph, me).await?,
            "compensate" => {
                stop(conn, &op, &mut graph).await?;
                let now = Utc::now();
                diesel::update(operations::table.find(&op.uuid))
                    .set((
                        operations::status.eq(TaskStatus::Compensating.as_str()),
                        operations::error.eq(format!("{error}; compensating")),
                        operations::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                let mut op = op;
                op.status = TaskStatus::Compensating.as_str().to_owned();
                op.error = Some(error);
                return compensate(conn, &op, &mut graph).await;
            }
            _ => {
                stop(conn, &op, &mut graph).await?;
                return finish(conn, &op, &graph, TaskStatus::Failed, Some(error)).await;
            }
        }
    }
    if graph.forward().any(|i| graph.is_unfinished(i)) {
        return Ok(None);
    }
    finish(conn, &op, &graph, TaskStatus::Success, None).await
}

/// Releases the WAITING steps after `me` (which succeeded) that may start.
async fn release_dependents(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    me: usize,
) -> Result<(), StoreError> {
    for index in graph.waiting_on(me) {
        if graph.ready(index) {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
        }
    }
    Ok(())
}

/// After `failed` failed with `continue`: the WAITING steps that can no
/// longer start, and the steps after them, are CANCELLED.
async fn cancel_unreachable(
    conn: &mut AsyncPgConnection,
    graph: &mut Graph,
    failed: usize,
) -> Result<(), StoreError> {
    let mut work = vec![failed];
    while let Some(gone) = work.pop() {
        let name = graph.nodes[gone].1.name.clone();
        for index in graph.waiting_on(gone) {
            let step = &graph.nodes[index].1;
            let deps: Vec<usize> = step.after.iter().filter_map(|n| graph.named(n)).collect();
            let unreachable = !step.join_any
                || deps
                    .iter()
                    .all(|d| !graph.is_unfinished(*d) && !graph.satisfied(*d));
            if !unreachable {
                continue;
            }
            let why = if graph.status(gone) == TaskStatus::Failed.as_str() {
                "failed"
            } else {
                "did not run"
            };
            let error = format!("not run: it needs step '{name}', which {why}");
            cancel_waiting(conn, graph, &[index], &error).await?;
            work.push(index);
        }
    }
    Ok(())
}

/// Stops what has not been sent: the WAITING steps become CANCELLED, and
/// so do the PENDING steps whose message it takes back from the outbox
/// (one no relay holds). A step whose message is out (published, or
/// claimed by a relay that is publishing it) may be running already: it is
/// left PENDING or RUNNING, runs to its end and its outcome is recorded,
/// but it starts nothing while the operation is not RUNNING. A step
/// finishing at this moment (its row locked) is left alone too: it
/// finishes, and starts nothing.
async fn stop(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, Text};

    let withdrawn: Vec<Withdrawn> = diesel::sql_query(
        "DELETE FROM kser.outbox WHERE id IN (SELECT id FROM kser.outbox \
         WHERE operation_uuid = $1 AND (claimed_until IS NULL OR claimed_until < now()) \
         FOR UPDATE SKIP LOCKED) \
         RETURNING payload",
    )
    .bind::<Text, _>(&op.uuid)
    .load(conn)
    .await?;
    let withdrawn: HashSet<String> = withdrawn
        .iter()
        .filter_map(|row| message_uuid(&row.payload))
        .collect();
    let error = "not run: the operation failed";
    let waiting: Vec<usize> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str())
        .collect();
    cancel_waiting(conn, graph, &waiting, error).await?;
    let unsent: Vec<String> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Pending.as_str())
        .map(|i| graph.nodes[i].0.uuid.clone())
        .filter(|uuid| withdrawn.contains(uuid))
        .collect();
    if unsent.is_empty() {
        return Ok(());
    }
    let cancelled: Vec<Completed> = diesel::sql_query(
        "UPDATE kser.tasks SET status = 'CANCELLED', error = $2, finished_at = now(), \
             updated_at = now() \
         WHERE uuid IN (SELECT uuid FROM kser.tasks WHERE uuid = ANY($1) \
             AND status = 'PENDING' FOR UPDATE SKIP LOCKED) \
         RETURNING uuid",
    )
    .bind::<Array<Text>, _>(unsent)
    .bind::<Text, _>(error)
    .load(conn)
    .await?;
    for done in cancelled {
        if let Some(index) = graph.nodes.iter().position(|(t, _)| t.uuid == done.uuid) {
            graph.set_status(index, TaskStatus::Cancelled);
        }
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Withdrawn {
    #[diesel(sql_type = diesel::sql_types::Text)]
    payload: String,
}

#[derive(QueryableByName)]
struct Completed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    uuid: String,
}
