//! The dashboard: counts by status, throughput, failures by entrypoint,
//! workers and lag.

use axum::extract::State;
use chrono::Utc;
use maud::{Markup, html};

use super::fleet::workers_table;
use super::{PageResult, encode, layout, status_badge};
use crate::store::{MinuteCount, WorkerRow};
use crate::web::api::dashboard_data;
use crate::web::console::Console;

pub(super) async fn dashboard(State(console): State<Console>) -> PageResult {
    let data = dashboard_data(&console).await?;
    let count = |kind: &str, status: &str| {
        data.counts
            .iter()
            .find(|c| c.kind == kind && c.status == status)
            .map_or(0, |c| c.count)
    };
    let statuses = ["PENDING", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"];
    Ok(layout(
        "Dashboard",
        html! {
            h1 { "Dashboard" }
            section {
                h2 { "Last 24 hours" }
                p.muted { "Tasks SUCCESS and FAILED: ended so within the last 24 hours. Other states, and operations: recorded within the last 24 hours and in that state now." }
                table {
                    thead { tr { th { "" } @for s in statuses { th { (status_badge(s)) } } } }
                    tbody {
                        tr { th { "Tasks" } @for s in statuses { td.num { (count("task", s)) } } }
                        tr { th { "Operations" } @for s in statuses { td.num { (count("operation", s)) } } }
                    }
                }
            }
            section {
                h2 { "Throughput, last hour (tasks ended per minute)" }
                (throughput_chart(&data.throughput))
            }
            section {
                h2 { "Failures by entrypoint (tasks ended FAILED, 24 h)" }
                @if data.failures.is_empty() {
                    p.muted { "No failures." }
                } @else {
                    table {
                        thead { tr { th { "Entrypoint" } th { "Failed" } th { "Latest error" } } }
                        tbody {
                            @for f in &data.failures {
                                tr {
                                    td { a href={ "/tasks?status=FAILED&entrypoint=" (encode(&f.entrypoint)) } { (f.entrypoint) } }
                                    td.num { (f.failed) }
                                    td.error { (f.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Workers and lag" }
                (workers_table(&data.workers, false))
            }
            section {
                h2 { "Lag per partition" }
                (partition_lag_table(&data.workers))
            }
        },
    ))
}

/// The records behind on each partition, as the live worker that holds it
/// last reported (its heartbeat), most behind first.
fn partition_lag_table(workers: &[WorkerRow]) -> Markup {
    let mut rows: Vec<(&str, &str, i64)> = workers
        .iter()
        .filter(|w| w.is_live())
        .flat_map(|w| {
            w.lag_by_partition
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(move |(partition, lag)| {
                    Some((partition.as_str(), w.id.as_str(), lag.as_i64()?))
                })
        })
        .collect();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    html! {
        @if rows.is_empty() {
            p.muted { "no partition assigned to a running worker" }
        } @else {
            table {
                thead { tr { th { "topic/partition" } th.num { "lag" } th { "worker" } } }
                tbody {
                    @for (partition, worker, lag) in &rows {
                        tr {
                            td { (partition) }
                            td.num { (lag) }
                            td { (worker) }
                        }
                    }
                }
            }
        }
    }
}

/// Tasks ended per minute over the last hour, as bars (green succeeded,
/// red failed), in inline SVG.
fn throughput_chart(minutes: &[MinuteCount]) -> Markup {
    const WIDTH: i64 = 600;
    const HEIGHT: i64 = 120;
    let now = Utc::now();
    let mut buckets = [(0i64, 0i64); 60];
    for m in minutes {
        let ago = (now - m.minute).num_minutes();
        if (0..60).contains(&ago) {
            let slot = &mut buckets[59 - ago as usize];
            slot.0 += m.succeeded;
            slot.1 += m.failed;
        }
    }
    let max = buckets.iter().map(|(s, f)| s + f).max().unwrap_or(0).max(1);
    let total: i64 = buckets.iter().map(|(s, f)| s + f).sum();
    let bar = WIDTH / 60;
    html! {
        svg.chart width=(WIDTH) height=(HEIGHT + 16) viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 16) }
            role="img" aria-label={ (total) " tasks ended in the last hour" } {
            @for (i, (succeeded, failed)) in buckets.iter().enumerate() {
                @let x = i as i64 * bar;
                @let ok_h = succeeded * HEIGHT / max;
                @let fail_h = failed * HEIGHT / max;
                rect.ok x=(x) y=(HEIGHT - ok_h - fail_h) width=(bar - 1) height=(ok_h) {
                    title { (succeeded) " succeeded" }
                }
                rect.failed x=(x) y=(HEIGHT - fail_h) width=(bar - 1) height=(fail_h) {
                    title { (failed) " failed" }
                }
            }
            text x="0" y=(HEIGHT + 14) { "-60 min" }
            text x=(WIDTH - 30) y=(HEIGHT + 14) { "now" }
            text x=(WIDTH / 2 - 40) y=(HEIGHT + 14) { (total) " ended, peak " (max) "/min" }
        }
    }
}
