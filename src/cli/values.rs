//! Value parsers for the command line: every count, duration and topic name
//! is checked by clap before anything runs, so `inf`, `1e300`, `-1`, `0`
//! where it means nothing, a year 200000 or an empty topic is a usage error
//! naming the flag, never a panic or a silent clamp.
//!
//! One parser per kind: [`count`] (a whole number in a range), [`bytes`] (a
//! size, `64MiB`), [`duration`]
//! (`500ms`, `30s`, `5m`, or bare seconds, in a range), [`topic`] (a Kafka
//! topic name) and [`time`] (an RFC 3339 time not absurdly far away).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The furthest in the future `--delay` and `--at` reach.
pub(super) const FURTHEST: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A whole number from `min` to `max`, as `T`.
pub(super) fn count<T>(min: u64, max: u64) -> impl Fn(&str) -> Result<T, String> + Clone
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    move |text: &str| {
        let range = || format!("expected a whole number from {min} to {max}");
        let value: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("'{text}' is not a number: {}", range()))?;
        if !(min..=max).contains(&value) {
            return Err(format!("{value} is out of range: {}", range()));
        }
        T::try_from(value).map_err(|_| range())
    }
}

/// A size in bytes from `min` to `max`: a whole number of bytes, or one
/// with a binary unit (`512KiB`, `64MiB`, `1GiB`; `K`, `M`, `G` and `KB`,
/// `MB`, `GB` mean the same powers of 1024).
pub(super) fn bytes(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |text: &str| {
        let range =
            || format!("expected a size from {min} to {max} bytes (e.g. 512KiB, 64MiB, 1GiB)");
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return Err(format!("'{text}' is not a size: {}", range())),
        };
        let value = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_bytes))
            .ok_or_else(|| format!("'{text}' is not a size: {}", range()))?;
        if !(min..=max).contains(&value) {
            return Err(format!("'{text}' is out of range: {}", range()));
        }
        Ok(value)
    }
}

/// A duration from `min` to `max`: `500ms`, `30s`, `1h 30m` (humantime), or
/// a bare number of seconds (`30`, `0.5`).
pub(super) fn duration(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |text: &str| {
        let range = || {
            format!(
                "expected a duration from {} to {} (e.g. 500ms, 30s, 5m; a bare number is seconds)",
                humantime::format_duration(min),
                humantime::format_duration(max)
            )
        };
        let text = text.trim();
        let value = match text.parse::<f64>() {
            // Checked before converting: Duration::from_secs_f64 panics on
            // what does not fit.
            Ok(secs) if secs.is_finite() && secs >= 0.0 && secs <= max.as_secs_f64() => {
                Duration::from_secs_f64(secs)
            }
            Ok(_) => return Err(format!("'{text}' is out of range: {}", range())),
            Err(_) => humantime::parse_duration(text)
                .map_err(|err| format!("'{text}' is not a duration ({err}): {}", range()))?,
        };
        if value < min || value > max {
            return Err(format!("'{text}' is out of range: {}", range()));
        }
        Ok(value)
    }
}

/// A regular expression that whole topic names must match.
pub(super) fn topic_pattern(text: &str) -> Result<crate::worker::TopicPattern, String> {
    crate::worker::TopicPattern::new(text)
}

pub(crate) use crate::admin::topic_name as topic;

/// An RFC 3339 time, at most [`FURTHEST`] from now.
pub(super) fn time(text: &str) -> Result<DateTime<Utc>, String> {
    let at = DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("expected an RFC 3339 time like 2026-11-24T18:00:00Z: {err}"))?;
    let furthest = chrono::Duration::from_std(FURTHEST).unwrap_or(chrono::Duration::MAX);
    match Utc::now().checked_add_signed(furthest) {
        Some(limit) if at <= limit => Ok(at),
        _ => Err(format!(
            "{text} is more than {} away",
            humantime::format_duration(FURTHEST)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_whole_numbers_in_range() {
        let parse = count::<usize>(1, 10_000);
        assert_eq!(parse("64"), Ok(64));
        for bad in [
            "0",
            "-1",
            "10001",
            "inf",
            "NaN",
            "1e300",
            "2.5",
            "",
            "99999999999999999999999",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("from 1 to 10000"), "{bad}: {err}");
        }
        assert_eq!(count::<i32>(1, 100_000)("6"), Ok(6));
    }

    #[test]
    fn sizes_take_binary_units_in_range() {
        let parse = bytes(1024, 1 << 40);
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512KiB"), Ok(512 << 10));
        assert_eq!(parse("64 MiB"), Ok(64 << 20));
        assert_eq!(parse("1G"), Ok(1 << 30));
        for bad in [
            "0",
            "1023",
            "-1",
            "1.5GiB",
            "2TiB",
            "inf",
            "",
            "MiB",
            "99999999999G",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_units_or_seconds_in_range() {
        let parse = duration(Duration::ZERO, Duration::from_secs(86_400));
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        for bad in [
            "inf",
            "-inf",
            "NaN",
            "-1",
            "1e300",
            "2d",
            "100000000000y",
            "soon",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let positive = duration(Duration::from_millis(1), Duration::from_secs(60));
        assert!(positive("0").is_err());
        assert!(positive("0s").is_err());
    }

    #[test]
    fn topic_names_are_kafka_names() {
        assert_eq!(topic("orders.v1_x-y"), Ok("orders.v1_x-y".to_owned()));
        for bad in ["", "^orders.*", ".", "..", "a b", "a/b", "é", "a\u{1b}"] {
            assert!(topic(bad).is_err(), "{bad:?}");
        }
        assert!(topic(&"a".repeat(250)).is_err());
        assert!(
            topic("^x")
                .expect_err("pattern")
                .contains("regular expression")
        );
    }

    #[test]
    fn times_are_not_absurdly_far() {
        assert!(time("2026-11-24T18:00:00Z").is_ok());
        assert!(time("9999-12-31T23:59:59Z").is_err());
        assert!(time("+200000-01-01T00:00:00Z").is_err());
        assert!(time("tomorrow").is_err());
    }
}
