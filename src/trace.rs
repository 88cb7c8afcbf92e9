//! W3C trace context (<https://www.w3.org/TR/trace-context/>): continuing a
//! producer's trace through the tasks it started.
//!
//! A message carries its trace in `metadata.traceparent` (and optionally
//! `metadata.tracestate`, passed along untouched), or in a Kafka header
//! `traceparent`, as OpenTelemetry's Kafka instrumentations write it. A
//! worker continues it: the task's span gets the trace id and a span id of
//! its own ([`TaskTrace`]), so its log lines can be joined to the rest of the
//! trace, and every message kser sends on the task's behalf (the next step
//! of an operation, a retry, a dead letter) carries a `traceparent` with the
//! same trace id and the task's span as parent. One operation is one trace:
//! an operation message that arrives without one starts a new trace, which
//! its steps share.
//!
//! A malformed traceparent is ignored (logged at debug), never a reason to
//! fail a task. Parsing follows the specification: a two-digit version other
//! than `ff`, a 32-digit trace id and a 16-digit parent id, neither all
//! zeros, two digits of flags, all lowercase hex; version `00` is exactly
//! 55 characters, a later version may carry more after a `-`.

use std::fmt;

use crate::message::JsonObject;

/// The metadata key (and Kafka header) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of vendor-specific trace state, passed along untouched.
pub const TRACESTATE: &str = "tracestate";

/// A parsed `traceparent`: the trace, the span that sent the message, and
/// the trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, never all zeros.
    pub trace_id: [u8; 16],
    /// The sender's span, 8 bytes, never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags; kser passes them on as they came.
    pub flags: u8,
}

/// Why a traceparent was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Not four fields separated by `-`, or of the wrong lengths.
    #[error("not of the form VERSION-TRACEID-PARENTID-FLAGS")]
    Shape,
    /// Version `ff`, which the specification forbids.
    #[error("version ff is invalid")]
    Version,
    /// Not lowercase hexadecimal.
    #[error("not lowercase hexadecimal")]
    Hex,
    /// An all-zero trace id.
    #[error("the trace id is all zeros")]
    ZeroTrace,
    /// An all-zero parent id.
    #[error("the parent id is all zeros")]
    ZeroParent,
}

impl TraceParent {
    /// Parses a `traceparent` value (surrounding spaces and tabs allowed, as
    /// in an HTTP header).
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let value = value.trim_matches([' ', '\t']).as_bytes();
        if value.len() < 55 {
            return Err(TraceParentError::Shape);
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff {
            return Err(TraceParentError::Version);
        }
        // Version 00 is exactly 55 characters; a later version may go on,
        // after a dash, with fields this parser does not know.
        if (version == 0 && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
            return Err(TraceParentError::Shape);
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return Err(TraceParentError::Shape);
        }
        let mut trace_id = [0; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0; 8];
        for (i, byte) in parent_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTrace);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParent);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The traceparent of a message in `metadata`, if it has a valid one;
    /// a malformed one is logged at debug and ignored.
    pub fn from_metadata(metadata: &JsonObject) -> Option<Self> {
        let value = metadata.get(TRACEPARENT)?;
        let Some(text) = value.as_str() else {
            tracing::debug!("ignoring metadata.traceparent: not a string");
            return None;
        };
        Self::parse_or_ignore(text, "metadata.traceparent")
    }

    /// The traceparent of a Kafka header value, if valid (else ignored, said
    /// at debug).
    pub fn from_header(value: &[u8]) -> Option<Self> {
        match std::str::from_utf8(value) {
            Ok(text) => Self::parse_or_ignore(text, "the traceparent header"),
            Err(_) => {
                tracing::debug!("ignoring the traceparent header: not UTF-8");
                None
            }
        }
    }

    fn parse_or_ignore(text: &str, what: &str) -> Option<Self> {
        match Self::parse(text) {
            Ok(parent) => Some(parent),
            Err(err) => {
                tracing::debug!(value = %text.escape_debug(), error = %err, "ignoring {what}");
                None
            }
        }
    }
}

/// The trace of one task (or one operation's start): the trace it belongs
/// to, its own span id, and the span that sent its message, if known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskTrace {
    /// 16 bytes, never all zeros.
    pub trace_id: [u8; 16],
    /// This task's span: the parent of every message sent on its behalf.
    pub span_id: [u8; 8],
    /// The span that sent the message, when the trace was continued.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled), passed on as they came.
    pub flags: u8,
}

impl TaskTrace {
    /// Continues `parent`'s trace with a new span.
    pub fn child_of(parent: TraceParent) -> Self {
        Self {
            trace_id: parent.trace_id,
            span_id: new_span_id(),
            parent_id: Some(parent.parent_id),
            flags: parent.flags,
        }
    }

    /// Starts a new trace (sampled), with a new span.
    pub fn start() -> Self {
        let mut trace_id = [0; 16];
        while trace_id == [0; 16] {
            trace_id = rand::random();
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            parent_id: None,
            flags: 1,
        }
    }

    /// The trace of a message: its metadata's traceparent first, else its
    /// Kafka header's; `None` when neither is there (or valid).
    pub fn continued(metadata: &JsonObject, header: Option<TraceParent>) -> Option<Self> {
        TraceParent::from_metadata(metadata)
            .or(header)
            .map(Self::child_of)
    }

    /// The traceparent of a message sent on this task's behalf: the same
    /// trace, this task's span as the parent.
    pub fn traceparent(&self) -> String {
        self.as_parent().to_string()
    }

    /// This task as the parent of what it sends.
    pub fn as_parent(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: self.flags,
        }
    }

    /// Writes this task's traceparent into a message's metadata.
    pub fn stamp(&self, metadata: &mut JsonObject) {
        metadata.insert(TRACEPARENT.into(), self.traceparent().into());
    }

    /// The trace id as 32 lowercase hex digits, as logs show it.
    pub fn trace_id_hex(&self) -> Hex<'_> {
        Hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> Hex<'_> {
        Hex(&self.span_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            Hex(&self.trace_id),
            Hex(&self.parent_id),
            self.flags
        )
    }
}

/// Bytes shown as lowercase hex, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// The `traceparent` header of a Kafka record, if it has a valid one. A
/// record without headers costs nothing here.
pub fn header<H: rdkafka::message::Headers + ?Sized>(headers: &H) -> Option<TraceParent> {
    (0..headers.count())
        .filter_map(|index| headers.try_get(index))
        .find(|header| header.key == TRACEPARENT)
        .and_then(|header| TraceParent::from_header(header.value?))
}

fn new_span_id() -> [u8; 8] {
    let mut id = [0; 8];
    while id == [0; 8] {
        id = rand::random();
    }
    id
}

fn hex_byte(pair: &[u8]) -> Result<u8, TraceParentError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceParentError::Hex),
    };
    Ok(digit(pair[0])? << 4 | digit(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specifications_example() {
        let parent = TraceParent::parse(VALID).expect("valid");
        assert_eq!(
            Hex(&parent.trace_id).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(Hex(&parent.parent_id).to_string(), "00f067aa0ba902b7");
        assert_eq!(parent.flags, 1);
        assert_eq!(parent.to_string(), VALID);
        assert_eq!(
            TraceParent::parse(&format!(" {VALID}\t")).expect("padded"),
            parent
        );
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        use TraceParentError::*;
        let cases = [
            ("", Shape),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Shape,
            ),
            (&format!("{VALID}-x"), Shape),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                Hex,
            ),
            (
                "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Shape,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                Shape,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ZeroTrace,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ZeroParent,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
                Shape,
            ),
        ];
        for (value, why) in cases {
            assert_eq!(TraceParent::parse(value), Err(why), "{value:?}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        let parent = TraceParent::parse(later).expect("valid");
        assert_eq!(parent.flags, 1);
        // Sent on as version 00, the one kser speaks.
        assert_eq!(parent.to_string(), VALID);
        assert!(TraceParent::parse(&later[..55]).is_ok());
    }

    #[test]
    fn a_task_continues_the_trace_with_a_span_of_its_own() {
        let metadata = json!({"traceparent": VALID})
            .as_object()
            .cloned()
            .expect("object");
        let trace = TaskTrace::continued(&metadata, None).expect("continued");
        let parent = TraceParent::parse(VALID).expect("valid");
        assert_eq!(trace.trace_id, parent.trace_id);
        assert_eq!(trace.parent_id, Some(parent.parent_id));
        assert_ne!(trace.span_id, parent.parent_id);
        let sent = TraceParent::parse(&trace.traceparent()).expect("what kser sends parses");
        assert_eq!(sent.trace_id, parent.trace_id);
        assert_eq!(sent.parent_id, trace.span_id);
        assert_eq!(sent.flags, 1);
    }

    #[test]
    fn metadata_wins_over_the_header_and_bad_values_are_ignored() {
        let header = TraceParent::parse(VALID).expect("valid");
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let metadata = json!({"traceparent": other})
            .as_object()
            .cloned()
            .expect("object");
        let trace = TaskTrace::continued(&metadata, Some(header)).expect("continued");
        assert_eq!(
            trace.trace_id_hex().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(trace.flags, 0);
        for bad in [json!("nonsense"), json!(42), json!(null)] {
            let metadata = json!({"traceparent": bad})
                .as_object()
                .cloned()
                .expect("object");
            assert_eq!(TaskTrace::continued(&metadata, None), None);
            let from_header = TaskTrace::continued(&metadata, Some(header)).expect("header");
            assert_eq!(from_header.trace_id, header.trace_id);
        }
        assert_eq!(TaskTrace::continued(&JsonObject::new(), None), None);
        assert_eq!(TraceParent::from_header(b"\xff\xfe"), None);
    }

    #[test]
    fn a_new_trace_is_valid_and_sampled() {
        let trace = TaskTrace::start();
        let sent = TraceParent::parse(&trace.traceparent()).expect("valid");
        assert_eq!(sent.trace_id, trace.trace_id);
        assert_eq!(sent.flags, 1);
        assert_eq!(trace.parent_id, None);
        assert_ne!(TaskTrace::start().trace_id, trace.trace_id);
    }
}
