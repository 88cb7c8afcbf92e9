//! OpenTelemetry export of task spans (cargo feature `otel`, off by
//! default): with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, every task that ran in a
//! trace ([`crate::trace`]) is exported as a span over OTLP/HTTP
//! (protobuf), once its final state is durable.
//!
//! The span is kser's own, not a copy: its trace id, span id and parent are
//! those [`TaskTrace`](crate::trace::TaskTrace) gave the task and stamped
//! into the messages sent on its behalf, so a collector joins the producer's
//! span, every step of an operation, its retries and its dead letters into
//! one tree. Spans go through the SDK's batch processor, on a thread of its
//! own: a slow or absent collector drops spans (the SDK's queue is bounded),
//! never slows a worker. The SDK reads its usual variables too
//! (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`...).

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

use crate::store::{NewTask, TaskStatus};

static EXPORT: OnceLock<(SdkTracerProvider, Tracer)> = OnceLock::new();

/// Flushes the spans not yet exported when dropped (the process ends).
#[must_use = "spans still queued are lost unless the guard lives until the end"]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((provider, _)) = EXPORT.get()
            && let Err(err) = provider.shutdown()
        {
            tracing::debug!(error = %err, "OpenTelemetry exporter shutdown");
        }
    }
}

/// Starts the exporter when an OTLP endpoint is configured; `None` (and
/// nothing exported) otherwise, or when it cannot be built.
pub fn init() -> Option<Guard> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if !configured {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(err) => {
            tracing::warn!(error = %err, "could not build the OpenTelemetry exporter; no spans are exported");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("kser");
    EXPORT.get_or_init(|| (provider, tracer));
    tracing::info!("exporting task spans over OTLP/HTTP");
    Some(Guard(()))
}

/// Exports the span of each row that ran in a trace (no-op without an
/// exporter, or for a row without a trace).
pub(crate) fn finished<'a>(rows: impl Iterator<Item = &'a NewTask>) {
    let Some((_, tracer)) = EXPORT.get() else {
        return;
    };
    for row in rows {
        let Some(trace) = &row.trace else { continue };
        let trace_id = TraceId::from_bytes(trace.trace_id);
        let parent = match trace.parent_id {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                SpanId::from_bytes(parent),
                TraceFlags::new(trace.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let started = row
            .started_at
            .map_or_else(SystemTime::now, SystemTime::from);
        let ended = row
            .finished_at
            .map_or_else(SystemTime::now, SystemTime::from);
        let mut attributes = vec![
            KeyValue::new("kser.task.uuid", row.uuid.clone()),
            KeyValue::new("kser.entrypoint", row.entrypoint.clone()),
            KeyValue::new("kser.status", row.status),
            KeyValue::new("kser.attempt", i64::from(row.attempts)),
            KeyValue::new("messaging.system", "kafka"),
        ];
        if let Some(topic) = &row.topic {
            attributes.push(KeyValue::new("messaging.destination.name", topic.clone()));
        }
        if let Some(operation) = &row.operation_uuid {
            attributes.push(KeyValue::new("kser.operation.uuid", operation.clone()));
        }
        let builder = tracer
            .span_builder(row.entrypoint.clone())
            .with_kind(SpanKind::Consumer)
            .with_trace_id(trace_id)
            .with_span_id(SpanId::from_bytes(trace.span_id))
            .with_start_time(started)
            .with_attributes(attributes);
        let mut span = tracer.build_with_context(builder, &parent);
        if row.status == TaskStatus::Failed.as_str() {
            span.set_status(Status::error(row.error.clone().unwrap_or_default()));
        }
        span.end_with_timestamp(ended);
    }
}
