//! Compensation: once every forward step has stopped, the compensations of
//! the steps that succeeded are inserted (once) and run as a chain, in
//! reverse order, each released by its predecessor.

use chrono::Utc;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::{Value, json};

use super::{Graph, finish, graph_message, release};
use crate::store::database::StoreError;
use crate::store::models::{NewOutbox, NewTask, OperationRow, StepRow, TaskStatus};
use crate::store::schema::kser::{outbox, steps, tasks};
use crate::store::steps::{FinishedOperation, OPERATION_METADATA_KEY, parse_result};

/// Starts the compensations of a COMPENSATING operation once none of its
/// steps runs any more: one task per succeeded step that declared one, in
/// the reverse order of their success, the first queued, the others
/// WAITING. With nothing to undo, the operation is COMPENSATED at once.
pub(super) async fn compensate(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
) -> Result<Option<FinishedOperation>, StoreError> {
    if graph.forward().any(|i| graph.is_unfinished(i)) || graph.compensations().next().is_some() {
        return Ok(None);
    }
    let mut undo: Vec<usize> = graph
        .forward()
        .filter(|i| graph.status(*i) == TaskStatus::Success.as_str())
        .filter(|i| graph.nodes[*i].1.compensation.is_some())
        .collect();
    undo.sort_by_key(|i| {
        let task = &graph.nodes[*i].0;
        std::cmp::Reverse((task.finished_at, task.position))
    });
    if undo.is_empty() {
        let error = op.error.clone();
        return finish(conn, op, graph, TaskStatus::Compensated, error).await;
    }
    let now = Utc::now();
    let mut metadata = op.metadata.as_object().cloned().unwrap_or_default();
    metadata.insert(OPERATION_METADATA_KEY.into(), Value::from(op.uuid.clone()));
    let base = graph
        .nodes
        .iter()
        .filter_map(|(t, _)| t.position)
        .max()
        .unwrap_or(0)
        + 1;
    let mut rows = Vec::with_capacity(undo.len());
    let mut places = Vec::with_capacity(undo.len());
    for (n, &index) in undo.iter().enumerate() {
        let (task, step) = &graph.nodes[index];
        let spec = step.compensation.clone().unwrap_or(Value::Null);
        let entrypoint = spec["entrypoint"].as_str().unwrap_or_default().to_owned();
        let status = if n == 0 {
            TaskStatus::Pending
        } else {
            TaskStatus::Waiting
        };
        let mut row = NewTask::new(uuid::Uuid::new_v4().to_string(), entrypoint, status);
        row.params = spec.get("params").cloned().unwrap_or_else(|| json!({}));
        row.metadata = Value::Object(metadata.clone());
        row.topic = op.topic.clone();
        row.operation_uuid = Some(op.uuid.clone());
        row.position = i32::try_from(n).ok().map(|n| base + n);
        row.updated_at = now;
        places.push(StepRow {
            task_uuid: row.uuid.clone(),
            operation_uuid: op.uuid.clone(),
            name: step.name.clone(),
            after: Vec::new(),
            join_any: false,
            on_failure: "fail".to_owned(),
            delay_ms: 0,
            recovery: "resume".to_owned(),
            compensation: None,
            compensates: true,
        });
        if n == 0 {
            let forwarded = parse_result(task.result.as_ref());
            let message = graph_message(op, &row, Some(&forwarded), 0, now);
            rows.push((row, Some(message)));
        } else {
            rows.push((row, None));
        }
    }
    let (task_rows, messages): (Vec<NewTask>, Vec<Option<NewOutbox>>) = rows.into_iter().unzip();
    diesel::insert_into(tasks::table)
        .values(&task_rows)
        .execute(conn)
        .await?;
    diesel::insert_into(steps::table)
        .values(&places)
        .execute(conn)
        .await?;
    let messages: Vec<NewOutbox> = messages.into_iter().flatten().collect();
    diesel::insert_into(outbox::table)
        .values(&messages)
        .execute(conn)
        .await?;
    Ok(None)
}

/// After compensation `me` finished: the next one is queued, or the
/// operation ends COMPENSATED; a failed compensation ends it FAILED.
pub(super) async fn compensation_finished(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    me: usize,
) -> Result<Option<FinishedOperation>, StoreError> {
    if op.status != TaskStatus::Compensating.as_str() {
        return Ok(None);
    }
    let (task, step) = &graph.nodes[me];
    if task.status != TaskStatus::Success.as_str() {
        let reason = task.error.as_deref().unwrap_or("failed");
        let error = format!(
            "the compensation of step '{}' ({}) failed: {reason}",
            step.name, task.entrypoint
        );
        return finish(conn, op, graph, TaskStatus::Failed, Some(error)).await;
    }
    let position = task.position;
    let next = graph.compensations().find(|i| {
        graph.nodes[*i].0.position > position && graph.status(*i) != TaskStatus::Success.as_str()
    });
    match next {
        Some(index) => {
            let compensated = graph
                .named(&graph.nodes[index].1.name)
                .map(|i| parse_result(graph.nodes[i].0.result.as_ref()));
            release(conn, op, graph, index, compensated.as_ref()).await?;
            Ok(None)
        }
        None => {
            let error = op
                .error
                .as_deref()
                .map(|e| e.trim_end_matches("; compensating").to_owned());
            finish(conn, op, graph, TaskStatus::Compensated, error).await
        }
    }
}
