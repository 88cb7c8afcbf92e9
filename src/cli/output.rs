//! Text output for people: task details and tables.
//!
//! Everything shown here comes from records anyone who can write to the
//! topic controls (entrypoints, params, errors, stdout, results), so every
//! value goes through [`printable`] on its way to the terminal: a record
//! cannot move the cursor, retitle the window or hide text. `--json` output
//! is escaped by serde instead.
//!
//! One cohesive thing, kept in one file on purpose (~500 lines): every text
//! a person reads goes through here, so this one file is where escaping is
//! checked.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

use super::lookup::Found;
use crate::registry::EntrypointInfo;
use crate::store::{AttemptRow, OperationRow, StepRow, TaskRow};

/// `status` output: a task, or an operation with the table of its steps.
pub(super) fn details(found: &Found) -> String {
    match found {
        Found::Operation(op, tasks, graph) => operation_details(op, tasks, graph),
        Found::Task(task, attempts) => task_details(task, attempts),
    }
}

/// A task: one field per line, then earlier failed attempts.
fn task_details(task: &TaskRow, attempts: &[AttemptRow]) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(
            out,
            "{:<11} {}",
            format!("{name}:"),
            printable_lines(&value)
        );
    };
    field("uuid", task.uuid.clone());
    field("entrypoint", task.entrypoint.clone());
    field("status", task.status.clone());
    field("attempts", task.attempts.to_string());
    if let (Some(operation), Some(position)) = (&task.operation_uuid, task.position) {
        field("operation", format!("{operation} (step {})", position + 1));
    }
    field("params", compact(&task.params));
    if let Some(result) = &task.result {
        field(
            "retcode",
            result.get("retcode").map(compact).unwrap_or_default(),
        );
        for (name, value) in result_fields(result) {
            field(name, value);
        }
    } else {
        field("result", "-".to_owned());
    }
    if let Some(error) = &task.error {
        field("error", error.clone());
    }
    field("worker", task.worker.clone().unwrap_or_else(|| "-".into()));
    if let (Some(topic), Some(partition), Some(offset)) =
        (&task.topic, task.kafka_partition, task.kafka_offset)
    {
        field(
            "source",
            format!("{topic} partition {partition} offset {offset}"),
        );
    }
    field("created", time(Some(task.created_at)));
    field("enqueued", time(task.enqueued_at));
    let queued = between(task.enqueued_at, task.started_at);
    field(
        "started",
        format!("{}{}", time(task.started_at), suffix("queued", queued)),
    );
    let ran = between(task.started_at, task.finished_at);
    field(
        "finished",
        format!("{}{}", time(task.finished_at), suffix("ran", ran)),
    );
    if let Some(next) = task.next_attempt_at.filter(|_| task.status == "PENDING") {
        field("next try", time(Some(next)));
    }
    if !attempts.is_empty() {
        let mut table = new_table(&[
            "ATTEMPT", "WORKER", "STARTED", "FINISHED", "RETCODE", "ERROR",
        ]);
        for attempt in attempts {
            add_row(
                &mut table,
                vec![
                    attempt.attempt.to_string(),
                    attempt.worker.clone().unwrap_or_else(|| "-".into()),
                    time(attempt.started_at),
                    time(Some(attempt.finished_at)),
                    attempt.retcode.map(|c| c.to_string()).unwrap_or_default(),
                    attempt
                        .error
                        .as_deref()
                        .map(|e| shorten(e, 50))
                        .unwrap_or_default(),
                ],
            );
        }
        let _ = writeln!(out, "earlier attempts:\n{table}");
    }
    out
}

/// `status` output for an operation: its fields, then its steps.
fn operation_details(op: &OperationRow, tasks: &[TaskRow], graph: &[StepRow]) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(
            out,
            "{:<11} {}",
            format!("{name}:"),
            printable_lines(&value)
        );
    };
    field("operation", op.uuid.clone());
    field("entrypoint", op.entrypoint.clone());
    field("status", op.status.clone());
    field("params", compact(&op.params));
    for (name, value) in op.result.iter().flat_map(result_fields) {
        field(name, value);
    }
    if let Some(error) = &op.error {
        field("error", error.clone());
    }
    field("created", time(Some(op.created_at)));
    field(
        "finished",
        format!(
            "{}{}",
            time(op.finished_at),
            suffix("took", between(op.started_at, op.finished_at))
        ),
    );
    let mut header = vec!["#"];
    if op.graph {
        header.extend(["STEP", "AFTER"]);
    }
    header.extend([
        "TASK",
        "ENTRYPOINT",
        "STATUS",
        "WORKER",
        "ATTEMPTS",
        "DURATION",
        "RESULT",
    ]);
    let mut table = new_table(&header);
    for task in tasks {
        let result = match (&task.error, &task.result) {
            (Some(error), _) => shorten(error, 50),
            (None, Some(result)) => result
                .get("stdout")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(|s| shorten(s, 50))
                .unwrap_or_else(|| shorten(&compact(&result["retval"]), 50)),
            (None, None) => String::new(),
        };
        let mut row = vec![
            task.position
                .map(|p| (p + 1).to_string())
                .unwrap_or_default(),
        ];
        if op.graph {
            let place = graph.iter().find(|s| s.task_uuid == task.uuid);
            row.extend(place_cells(place));
        }
        row.extend([
            task.uuid.clone(),
            task.entrypoint.clone(),
            task.status.clone(),
            task.worker.clone().unwrap_or_else(|| "-".into()),
            task.attempts.to_string(),
            between(task.started_at, task.finished_at).unwrap_or_else(|| "-".into()),
            result,
        ]);
        add_row(&mut table, row);
    }
    let _ = writeln!(out, "{table}");
    out
}

/// A graph step's name and what it runs after, for the STEP and AFTER
/// columns: `undo NAME` for a compensation, `any of ...` for an `any` join,
/// and its delay.
fn place_cells(place: Option<&StepRow>) -> [String; 2] {
    let Some(place) = place else {
        return [String::new(), String::new()];
    };
    if place.compensates {
        return [format!("undo {}", place.name), String::new()];
    }
    let mut after = place.after.join(", ");
    if place.join_any {
        after = format!("any of {after}");
    }
    if place.delay_ms > 0 {
        let delay = format!("+{}", humantime_ms(place.delay_ms));
        after = if after.is_empty() {
            delay
        } else {
            format!("{after} {delay}")
        };
    }
    [place.name.clone(), after]
}

fn humantime_ms(ms: i64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `list` output: operations and standalone tasks.
pub(super) fn list_table(rows: &[Found]) -> String {
    if rows.is_empty() {
        return "no tasks or operations".to_owned();
    }
    let mut table = new_table(&[
        "UUID",
        "KIND",
        "ENTRYPOINT",
        "STATUS",
        "CREATED",
        "DURATION",
        "ERROR",
    ]);
    for row in rows {
        let (uuid, kind, entrypoint, status, created, duration, error) = match row {
            Found::Operation(op, ..) => (
                &op.uuid,
                "operation",
                &op.entrypoint,
                &op.status,
                op.created_at,
                between(op.started_at, op.finished_at),
                &op.error,
            ),
            Found::Task(task, _) => (
                &task.uuid,
                "task",
                &task.entrypoint,
                &task.status,
                task.created_at,
                between(task.started_at, task.finished_at),
                &task.error,
            ),
        };
        add_row(
            &mut table,
            vec![
                uuid.clone(),
                kind.to_owned(),
                entrypoint.clone(),
                status.clone(),
                time(Some(created)),
                duration.unwrap_or_else(|| "-".into()),
                error.as_deref().map(|e| shorten(e, 60)).unwrap_or_default(),
            ],
        );
    }
    table.to_string()
}

/// `dlq list` output.
pub(super) fn dead_letter_table(entries: &[crate::dead_letter::DeadLetterEntry]) -> String {
    if entries.is_empty() {
        return "no dead letters".to_owned();
    }
    let mut table = new_table(&["AT", "FROM", "UUID", "KIND", "ATTEMPTS", "ERROR", "VALUE"]);
    for entry in entries {
        let from = match (&entry.topic, entry.partition, entry.offset) {
            (Some(topic), Some(partition), Some(offset)) => {
                format!("{topic}[{partition}]@{offset}")
            }
            _ => "-".to_owned(),
        };
        add_row(
            &mut table,
            vec![
                format!("{}:{}", entry.dlq_partition, entry.dlq_offset),
                from,
                entry.uuid.clone().unwrap_or_else(|| "-".into()),
                entry.error_kind.clone().unwrap_or_default(),
                entry.attempts.map(|a| a.to_string()).unwrap_or_default(),
                entry
                    .error
                    .as_deref()
                    .map(|e| shorten(e, 50))
                    .unwrap_or_default(),
                entry
                    .payload
                    .as_deref()
                    .map(|p| shorten(p, 40))
                    .unwrap_or_default(),
            ],
        );
    }
    table.to_string()
}

/// `entrypoints` output.
pub(super) fn entrypoint_table(entries: &[&EntrypointInfo]) -> String {
    let mut table = new_table(&["ENTRYPOINT", "KIND", "PARAMS", "DESCRIPTION"]);
    for entry in entries {
        add_row(
            &mut table,
            vec![
                entry.name.to_owned(),
                entry.kind.to_owned(),
                describe_params(&entry.params_schema),
                entry.description.to_owned(),
            ],
        );
    }
    table.to_string()
}

pub(super) use crate::report::printable;

/// [`printable`] line by line, for multi-line values (a task's stdout).
fn printable_lines(text: &str) -> String {
    text.split('\n')
        .map(printable)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Adds a row of printable cells (a cell may have several lines).
pub(super) fn add_row(table: &mut Table, cells: Vec<String>) {
    table.add_row(
        cells
            .iter()
            .map(|cell| printable_lines(cell))
            .collect::<Vec<_>>(),
    );
}

pub(super) fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    // A terminal that reports no real width (a bare pty says 0) would squeeze
    // every column to one character: print at full width instead.
    if table.width().is_some_and(|width| width < 40) {
        table.set_content_arrangement(ContentArrangement::Disabled);
    }
    table
}

/// `sides: integer (optional, default 6)`, one parameter per line, from the
/// parameters' JSON schema.
pub(super) fn describe_params(schema: &Value) -> String {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return "(none)".to_owned();
    };
    if properties.is_empty() {
        return "(none)".to_owned();
    }
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    properties
        .iter()
        .map(|(name, property)| {
            let kind = match property.get("type") {
                Some(Value::String(kind)) => kind.clone(),
                Some(Value::Array(kinds)) => kinds
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|k| *k != "null")
                    .collect::<Vec<_>>()
                    .join("|"),
                _ => "any".to_owned(),
            };
            let mut notes = vec![if required.contains(&name.as_str()) {
                "required".to_owned()
            } else {
                "optional".to_owned()
            }];
            if let Some(default) = property.get("default") {
                notes.push(format!("default {}", compact(default)));
            }
            format!("{name}: {kind} ({})", notes.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The non-empty `stdout`, `stderr` and the `retval` of a wire-format result.
fn result_fields(result: &Value) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    for key in ["stdout", "stderr"] {
        if let Some(text) = result
            .get(key)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            fields.push((key, text.trim_end().to_owned()));
        }
    }
    if let Some(retval) = result.get("retval") {
        fields.push(("retval", compact(retval)));
    }
    fields
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

fn between(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Option<String> {
    let millis = (to? - from?).num_milliseconds().max(0);
    Some(if millis < 1000 {
        format!("{millis}ms")
    } else {
        format!("{:.2}s", millis as f64 / 1000.0)
    })
}

fn suffix(label: &str, duration: Option<String>) -> String {
    duration
        .map(|d| format!(" ({label} {d})"))
        .unwrap_or_default()
}

fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(max - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_are_described_from_the_schema() {
        let schema = json!({
            "properties": {"sides": {"type": "integer", "default": 6}, "name": {"type": ["string", "null"]}},
            "required": ["name"]
        });
        let text = describe_params(&schema);
        assert!(
            text.contains("sides: integer (optional, default 6)"),
            "{text}"
        );
        assert!(text.contains("name: string (required)"), "{text}");
        assert_eq!(describe_params(&json!({"type": "object"})), "(none)");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let hostile = "a\x1b]0;owned\x07b\x1b[2Jc\rd\u{9b}31me\u{202e}f\x7f";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(
            shown,
            "a\\u{1b}]0;owned\\u{7}b\\u{1b}[2Jc\\rd\\u{9b}31me\\u{202e}f\\u{7f}"
        );
        assert!(matches!(
            printable("plain · text"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(printable_lines("one\ntwo\x1b"), "one\ntwo\\u{1b}");
    }

    #[test]
    fn tables_and_details_escape_what_they_show() {
        let mut table = new_table(&["A"]);
        add_row(&mut table, vec!["x\x1b[31my".to_owned()]);
        let text = table.to_string();
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("x\\u{1b}[31my"), "{text}");
    }

    #[test]
    fn long_errors_are_shortened() {
        assert_eq!(shorten("abc\ndef", 10), "abc");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }
}
