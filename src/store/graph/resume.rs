//! Resuming a graph operation: its failed and cancelled steps (or its
//! unfinished compensations) are reset and those whose dependencies are met
//! released again.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::Value;

use super::{Graph, release};
use crate::store::database::StoreError;
use crate::store::models::{OperationRow, TaskStatus};
use crate::store::schema::kser::{operations, tasks};
use crate::store::steps::{Resumed, parse_result};

/// Resumes a FAILED or CANCELLED graph operation (locked): a failed
/// compensation runs again and the ones after it follow; otherwise the
/// steps that did not succeed run again (those declared `rerun` too, those
/// declared `skip` are SKIPPED instead), each as soon as its dependencies
/// are satisfied. Steps that succeeded keep their results.
///
/// A step still in flight (PENDING with its message out, or RUNNING: a
/// sibling of the step that failed, sent before the failure) is not sent
/// again, whatever its recovery: it runs to its end, once, and the steps
/// after it start when it succeeds, since the operation runs again.
pub(in crate::store) async fn resume(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
) -> Result<Resumed, StoreError> {
    let mut graph = Graph::load(conn, &op.uuid).await?;
    let now = Utc::now();
    let compensations: Vec<usize> = graph.compensations().collect();
    let (status, restart) = if compensations.is_empty() {
        (
            TaskStatus::Running,
            resume_steps(conn, op, &mut graph, now).await?,
        )
    } else {
        // A compensation still in flight (the operation was cancelled
        // while it ran) would run twice if queued again.
        if let Some(busy) = compensations.iter().find(|i| graph.in_flight(**i)) {
            return Err(StoreError::Conflict(format!(
                "operation {}: the compensation of step '{}' is still {}; \
                 resume once it has ended",
                op.uuid,
                graph.nodes[*busy].1.name,
                graph.status(*busy)
            )));
        }
        let unfinished: Vec<usize> = compensations
            .into_iter()
            .filter(|i| graph.status(*i) != TaskStatus::Success.as_str())
            .collect();
        let Some((&first, rest)) = unfinished.split_first() else {
            return Err(StoreError::Conflict(format!(
                "operation {} has no unfinished compensation to resume",
                op.uuid
            )));
        };
        reset(conn, &mut graph, rest, TaskStatus::Waiting, now).await?;
        reset(conn, &mut graph, &[first], TaskStatus::Waiting, now).await?;
        let compensated = graph
            .named(&graph.nodes[first].1.name)
            .map(|i| parse_result(graph.nodes[i].0.result.as_ref()));
        release(conn, op, &mut graph, first, compensated.as_ref()).await?;
        let restart = Restart {
            first,
            started: vec![first],
            running: Vec::new(),
        };
        (TaskStatus::Compensating, restart)
    };
    diesel::update(operations::table.find(&op.uuid))
        .set((
            operations::status.eq(status.as_str()),
            operations::error.eq(None::<String>),
            operations::finished_at.eq(None::<DateTime<Utc>>),
            operations::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    let names = |indices: &[usize]| -> Vec<String> {
        indices
            .iter()
            .map(|i| graph.nodes[*i].1.name.clone())
            .collect()
    };
    Ok(Resumed {
        step: graph.nodes[restart.first].0.position.unwrap_or(0) + 1,
        entrypoint: graph.nodes[restart.first].0.entrypoint.clone(),
        started: names(&restart.started),
        running: names(&restart.running),
    })
}

/// What [`resume_steps`] did.
struct Restart {
    /// The first step put back (by position): queued, or waiting.
    first: usize,
    /// The steps queued at once.
    started: Vec<usize>,
    /// The steps still in flight, left to finish.
    running: Vec<usize>,
}

/// The forward part of [`resume`].
async fn resume_steps(
    conn: &mut AsyncPgConnection,
    op: &OperationRow,
    graph: &mut Graph,
    now: DateTime<Utc>,
) -> Result<Restart, StoreError> {
    let mut skip = Vec::new();
    let mut again = Vec::new();
    let mut running = Vec::new();
    for index in graph.forward() {
        let (task, step) = &graph.nodes[index];
        let kept = task.status == TaskStatus::Success.as_str()
            || task.status == TaskStatus::Skipped.as_str();
        if graph.in_flight(index) {
            running.push(index);
            continue;
        }
        match step.recovery.as_str() {
            "rerun" => again.push(index),
            "skip" if !kept => skip.push(index),
            _ if !kept => again.push(index),
            _ => {}
        }
    }
    let still_running = || -> String {
        if running.is_empty() {
            return String::new();
        }
        let names: Vec<&str> = running
            .iter()
            .map(|i| graph.nodes[*i].1.name.as_str())
            .collect();
        format!(" (still running: {})", names.join(", "))
    };
    if again.is_empty() && skip.is_empty() {
        return Err(StoreError::Conflict(format!(
            "operation {} has no unfinished step to resume{}",
            op.uuid,
            still_running()
        )));
    }
    let first = again.iter().chain(&skip).copied().min().unwrap_or_default();
    if !skip.is_empty() {
        let uuids: Vec<&str> = skip
            .iter()
            .map(|i| graph.nodes[*i].0.uuid.as_str())
            .collect();
        diesel::update(tasks::table.filter(tasks::uuid.eq_any(uuids)))
            .set((
                tasks::status.eq(TaskStatus::Skipped.as_str()),
                tasks::error.eq(Some("skipped by resume")),
                tasks::finished_at.eq(Some(now)),
                tasks::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        for &index in &skip {
            graph.set_status(index, TaskStatus::Skipped);
        }
    }
    // Everything to run again waits first, so a dependency run again is not
    // counted as satisfied by what it did before.
    reset(conn, graph, &again, TaskStatus::Waiting, now).await?;
    let mut started = Vec::new();
    for &index in &again {
        if graph.ready(index) {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
            started.push(index);
        }
    }
    if started.is_empty() {
        // Only skips: what waited on them may go now, or it is all done.
        let ready: Vec<usize> = graph
            .forward()
            .filter(|i| graph.status(*i) == TaskStatus::Waiting.as_str() && graph.ready(*i))
            .collect();
        for index in ready {
            let forwarded = graph.forwarded(&op.uuid, index);
            release(conn, op, graph, index, forwarded.as_ref()).await?;
            started.push(index);
        }
    }
    // Nothing queued is fine while a step still in flight will release
    // what waits on it.
    if started.is_empty() && running.is_empty() {
        return Err(StoreError::Conflict(format!(
            "operation {}: no step could start again",
            op.uuid
        )));
    }
    Ok(Restart {
        first,
        started,
        running,
    })
}

/// Tasks back to `status`, their outcome cleared.
async fn reset(
    conn: &mut AsyncPgConnection,
    graph: &mut Graph,
    indices: &[usize],
    status: TaskStatus,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if indices.is_empty() {
        return Ok(());
    }
    let uuids: Vec<&str> = indices
        .iter()
        .map(|i| graph.nodes[*i].0.uuid.as_str())
        .collect();
    diesel::update(tasks::table.filter(tasks::uuid.eq_any(uuids)))
        .set((
            tasks::status.eq(status.as_str()),
            tasks::error.eq(None::<String>),
            tasks::result.eq(None::<Value>),
            tasks::finished_at.eq(None::<DateTime<Utc>>),
            tasks::next_attempt_at.eq(None::<DateTime<Utc>>),
            tasks::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    for &index in indices {
        graph.set_status(index, status);
        graph.nodes[index].0.result = None;
    }
    Ok(())
}
