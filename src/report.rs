//! Errors as people read them: an error and its causes on one line, each
//! said once.
//!
//! An error type may put its cause in its own message, return it as its
//! `source()`, or (third-party types, rdkafka's among them) both. Printing
//! every link of the chain would then say a cause twice ("relation does not
//! exist: relation does not exist"). kser's own errors do one or the other;
//! [`error_chain`] drops a cause whose text the line already has, whoever
//! made the error.

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

/// `err` and its causes, joined by `: `, each cause left out when the text
/// before it already says it.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// `text` safe to print on a terminal: control characters (C0, DEL, C1) and
/// the bidirectional overrides that reorder what is shown are written as
/// escapes (`\n`, `\r`, `\t`, `\u{1b}`); everything else is unchanged.
/// Every value from the database or a topic goes through it before the CLI
/// prints it.
pub(crate) fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Both(#[source] std::io::Error);

    #[test]
    fn a_cause_in_the_message_and_the_source_is_said_once() {
        let err = Both(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&err), "outer: disk on fire");
    }

    #[test]
    fn context_and_causes_each_appear() {
        let err = anyhow::Error::new(std::io::Error::other("no route"))
            .context("reading the dead letters");
        assert_eq!(
            error_chain(err.as_ref()),
            "reading the dead letters: no route"
        );
    }

    #[test]
    fn store_errors_name_their_cause_once() {
        let query = diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new("relation \"kser.tasks\" does not exist".to_owned()),
        );
        let err = anyhow::Error::from(StoreError::from(query)).context("listing tasks");
        let line = error_chain(err.as_ref());
        assert_eq!(line.matches("does not exist").count(), 1, "{line}");
        // Nor through `{:#}`, which prints every link.
        let alternate = format!("{err:#}");
        assert_eq!(
            alternate.matches("does not exist").count(),
            1,
            "{alternate}"
        );
    }
}
