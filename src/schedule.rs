//! Schedules (`kser schedule add`): a cron expression that sends one message
//! per tick. This module holds the time arithmetic: parsing an expression,
//! and which ticks a worker fires when it finds a schedule due. The table is
//! [`Store`](crate::store::Store)'s; the firing loop is the worker's.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;

/// A tick older than this when a worker first sees it due counts as missed
/// (no worker ran then), and the schedule's [`Missed`] policy applies.
pub const MISSED_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(10);
/// The most on-time ticks fired in one round, so a busy sub-minute schedule
/// cannot make one transaction unbounded.
const MAX_TICKS_PER_ROUND: usize = 100;

/// What happens to the ticks a schedule missed while no worker ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Missed {
    /// Drop them: the schedule goes on at its next tick.
    Skip,
    /// Fire one catch-up, at once, for the latest missed tick.
    Once,
}

impl Missed {
    /// The name stored in `kser.schedules.missed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Once => "once",
        }
    }

    /// The policy stored under `name`; an unknown name is `skip`, the
    /// cautious one.
    pub fn from_stored(name: &str) -> Self {
        if name == "once" {
            Self::Once
        } else {
            Self::Skip
        }
    }
}

/// A cron expression that could not be parsed, or that never fires.
#[derive(Debug, thiserror::Error)]
#[error("bad cron expression {expression:?}: {reason}")]
pub struct CronError {
    expression: String,
    reason: String,
}

/// Parses a cron expression: five fields (minute hour day month weekday), or
/// six with seconds first, e.g. `*/5 * * * *` or `*/2 * * * * *`.
pub fn parse(expression: &str) -> Result<Cron, CronError> {
    let error = |reason: String| CronError {
        expression: expression.to_owned(),
        reason,
    };
    let cron = Cron::from_str(expression).map_err(|err| error(err.to_string()))?;
    cron.find_next_occurrence(&Utc::now(), false)
        .map_err(|err| error(format!("it never fires ({err})")))?;
    Ok(cron)
}

/// The first tick strictly after `after`, or `None` if there is none.
pub fn next_tick(cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after, false).ok()
}

/// The ticks to fire now, and the next tick not fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// Oldest first; a catch-up tick, if any, comes first.
    pub ticks: Vec<DateTime<Utc>>,
    /// The tick the schedule waits for next.
    pub next_at: DateTime<Utc>,
}

/// What a schedule whose next unfired tick is `next_at` fires at `now`:
/// every tick up to `now` no older than [`MISSED_AFTER`], plus, with
/// [`Missed::Once`], the latest older one. `None` if the expression has no
/// tick after `now`.
pub fn plan(
    cron: &Cron,
    next_at: DateTime<Utc>,
    now: DateTime<Utc>,
    missed: Missed,
) -> Option<Firing> {
    let on_time_from = now - MISSED_AFTER;
    let mut ticks = Vec::new();
    if next_at < on_time_from && missed == Missed::Once {
        // next_at is a tick before on_time_from, so this finds one.
        let latest = cron
            .find_previous_occurrence(&on_time_from, false)
            .ok()
            .filter(|tick| *tick >= next_at)
            .unwrap_or(next_at);
        ticks.push(latest);
    }
    let mut tick = if next_at >= on_time_from {
        Some(next_at)
    } else {
        cron.find_next_occurrence(&on_time_from, true).ok()
    };
    let mut on_time = 0;
    while let Some(t) = tick.filter(|t| *t <= now) {
        if on_time == MAX_TICKS_PER_ROUND {
            return Some(Firing { ticks, next_at: t });
        }
        ticks.push(t);
        on_time += 1;
        tick = next_tick(cron, t);
    }
    tick.map(|next_at| Firing { ticks, next_at })
}

/// The message uuid of a schedule's tick: the same for the same schedule
/// and tick, so a tick fired twice (a retried transaction) is one task.
pub fn tick_uuid(name: &str, tick: DateTime<Utc>) -> String {
    let key = format!("kser:schedule:{name}:{}", tick.timestamp_millis());
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, s)
            .single()
            .unwrap()
    }

    #[test]
    fn bad_expressions_say_which() {
        let err = parse("61 * * * *").unwrap_err().to_string();
        assert!(
            err.starts_with("bad cron expression \"61 * * * *\""),
            "{err}"
        );
        assert!(parse("not cron").is_err());
        assert!(parse("0 0 30 2 *").is_err(), "February 30 never comes");
        assert!(parse("*/5 * * * *").is_ok());
        assert!(parse("* * * * * *").is_ok());
    }

    #[test]
    fn an_on_time_tick_fires_once_and_moves_on() {
        let cron = parse("*/5 * * * *").unwrap();
        let firing = plan(&cron, at(10, 5, 0), at(10, 5, 1), Missed::Skip).unwrap();
        assert_eq!(firing.ticks, vec![at(10, 5, 0)]);
        assert_eq!(firing.next_at, at(10, 10, 0));
        // Not due yet: nothing fires, next_at stays.
        let firing = plan(&cron, at(10, 10, 0), at(10, 9, 59), Missed::Skip).unwrap();
        assert!(firing.ticks.is_empty());
        assert_eq!(firing.next_at, at(10, 10, 0));
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        let cron = parse("*/5 * * * *").unwrap();
        let skip = plan(&cron, at(8, 0, 0), at(10, 7, 0), Missed::Skip).unwrap();
        assert!(skip.ticks.is_empty());
        assert_eq!(skip.next_at, at(10, 10, 0));
        let once = plan(&cron, at(8, 0, 0), at(10, 7, 0), Missed::Once).unwrap();
        assert_eq!(once.ticks, vec![at(10, 5, 0)]);
        assert_eq!(once.next_at, at(10, 10, 0));
    }

    #[test]
    fn seconds_late_ticks_all_fire() {
        let cron = parse("* * * * * *").unwrap();
        let firing = plan(&cron, at(10, 0, 0), at(10, 0, 3), Missed::Skip).unwrap();
        assert_eq!(firing.ticks.len(), 4);
        assert_eq!(firing.next_at, at(10, 0, 4));
    }

    #[test]
    fn tick_uuids_are_stable_and_distinct() {
        assert_eq!(tick_uuid("a", at(1, 0, 0)), tick_uuid("a", at(1, 0, 0)));
        assert_ne!(tick_uuid("a", at(1, 0, 0)), tick_uuid("a", at(1, 0, 1)));
        assert_ne!(tick_uuid("a", at(1, 0, 0)), tick_uuid("b", at(1, 0, 0)));
    }
}
