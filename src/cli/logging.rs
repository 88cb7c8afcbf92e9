//! Where log lines go and how they look: `--log-format text` (the default,
//! for people) or `json` (one object per line, for log shippers).
//!
//! Field values come from records (entrypoints, errors, uuids), so neither
//! format lets them drive a terminal: text goes through the escaping all
//! output uses ([`printable`](super::output::printable)); JSON is escaped by
//! the encoder, and what JSON allows raw but a terminal acts on (DEL, C1
//! controls, bidirectional overrides) is written as `\uXXXX` escapes too.
//! Secrets never reach a log line: settings are logged through
//! [`redact`](crate::redact) and masked properties only.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event, spans and fields as `name=value`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the
    /// event's fields (`message` among them) at the top, and `span` /
    /// `spans` with the fields of the spans it happened in (a task's
    /// `task.uuid`, `entrypoint`, `trace_id`, `span_id`).
    Json,
}

/// Installs the process's subscriber: `RUST_LOG` filters (default `info`,
/// librdkafka's chatter at `warn`), to standard error.
pub(super) fn init(format: LogFormat) {
    use tracing_subscriber::field::MakeExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
    });
    match format {
        LogFormat::Text => {
            // Each field value goes through the one escaping function all
            // output uses, so a log line cannot drive a terminal either.
            let fields = tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
                let value = format!("{value:?}");
                let value = super::output::printable(&value);
                match field.name() {
                    "message" => write!(writer, "{value}"),
                    name => write!(writer, "{}={value}", name.trim_start_matches("r#")),
                }
            })
            .delimited(" ");
            tracing_subscriber::fmt()
                .fmt_fields(fields)
                .with_env_filter(filter)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
        }
        LogFormat::Json => {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .with_env_filter(filter)
                .with_writer(JsonStderr)
                .init();
        }
    }
}

/// Standard error, with the characters JSON allows raw but terminals act on
/// written as escapes.
struct JsonStderr;

impl<'a> MakeWriter<'a> for JsonStderr {
    type Writer = Escaping<io::StderrLock<'static>>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping(io::stderr().lock())
    }
}

/// Writes JSON text with DEL, C1 controls and bidirectional overrides as
/// `\uXXXX` escapes. Outside strings JSON has only ASCII punctuation, so
/// this changes no meaning; inside them the escape is the same character.
struct Escaping<W>(W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // The formatter hands over each line whole.
        match std::str::from_utf8(bytes) {
            Ok(text) if text.chars().any(needs_escape) => {
                self.0.write_all(escape_json(text).as_bytes())
            }
            _ => self.0.write_all(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn needs_escape(c: char) -> bool {
    matches!(c, '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_json(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_terminals_act_on_is_escaped_and_the_json_means_the_same() {
        let line = serde_json::json!({"error": "a\u{1b}[2J\u{7f}\u{9b}\u{202e}b"}).to_string();
        let mut out = Escaping(Vec::new());
        out.write_all(line.as_bytes()).expect("write");
        let text = String::from_utf8(out.0).expect("UTF-8");
        assert!(
            !text.chars().any(|c| c.is_control() || needs_escape(c)),
            "{text}"
        );
        assert!(
            text.contains(r"\u007f") && text.contains(r"\u202e"),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).expect("still JSON");
        assert_eq!(back["error"], "a\u{1b}[2J\u{7f}\u{9b}\u{202e}b");
    }

    #[test]
    fn plain_lines_pass_untouched() {
        let mut out = Escaping(Vec::new());
        out.write_all("{\"message\":\"héllo\"}\n".as_bytes())
            .expect("write");
        assert_eq!(out.0, "{\"message\":\"héllo\"}\n".as_bytes());
    }
}
