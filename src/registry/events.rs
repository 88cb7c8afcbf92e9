//! Custom events ([`Task::EVENTS`](crate::Task::EVENTS)): which tasks handle
//! an event, and delivering one to a task's handler.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use super::Registry;
use super::user_code::panic_text;
use crate::task::Event;

impl Registry {
    /// The custom events `entrypoint` handles (none for an unknown name).
    pub fn events_of(&self, entrypoint: &str) -> &'static [&'static str] {
        self.events.get(entrypoint).map_or(&[], |e| e.names)
    }

    /// The entrypoints that handle event `name`, restricted to
    /// `entrypoint` when given.
    pub(crate) fn handlers_of<'a>(
        &'a self,
        name: &'a str,
        entrypoint: Option<&'a str>,
    ) -> impl Iterator<Item = &'static str> + 'a {
        self.events
            .iter()
            .filter(move |(task, entry)| {
                entry.names.contains(&name) && entrypoint.is_none_or(|e| e == **task)
            })
            .map(|(task, _)| *task)
    }

    /// Delivers `event` to `entrypoint`'s handler within `limit`; a panic,
    /// an error or the time running out comes back as the error.
    pub(crate) async fn deliver(
        &self,
        entrypoint: &str,
        event: Event,
        limit: std::time::Duration,
    ) -> Result<(), String> {
        let Some(entry) = self.events.get(entrypoint) else {
            return Err(format!("{entrypoint} handles no events"));
        };
        let handled = AssertUnwindSafe((entry.handler)(event)).catch_unwind();
        match tokio::time::timeout(limit, handled).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(err))) => Err(err.to_string()),
            Ok(Err(panic)) => Err(format!("panicked: {}", panic_text(panic.as_ref()))),
            Err(_) => Err(format!("timed out after {:.1}s", limit.as_secs_f64())),
        }
    }
}
