//! The scaling hint: the worker's backlog as librdkafka's statistics tell
//! it, the rate at which it finishes tasks, and from both, how many workers
//! would drain the group's lag within the drain target
//! (`kser_desired_workers`).

use std::sync::atomic::AtomicI64;

use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{self};
use std::time::Duration;

/// What librdkafka's statistics (every 5 s) say of the worker's backlog:
/// records behind on its assigned partitions, and how many partitions its
/// topics have. `-1` until the first statistics.
#[derive(Debug)]
pub(crate) struct Backlog {
    lag: AtomicI64,
    partitions: AtomicI64,
    /// Lag per assigned partition, `{"topic/partition": lag}`.
    by_partition: std::sync::Mutex<Value>,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            lag: AtomicI64::new(-1),
            partitions: AtomicI64::new(-1),
            by_partition: std::sync::Mutex::new(Value::Object(Default::default())),
        }
    }
}

impl Backlog {
    pub(crate) fn observe(&self, stats: &rdkafka::Statistics) {
        let mut lag = 0;
        let mut partitions = 0;
        let mut by_partition = serde_json::Map::new();
        for (name, topic) in &stats.topics {
            for (partition, stats) in &topic.partitions {
                // librdkafka's internal partition.
                if *partition < 0 {
                    continue;
                }
                partitions += 1;
                if !stats.desired || stats.hi_offset < 0 {
                    continue;
                }
                let behind = if stats.consumer_lag >= 0 {
                    stats.consumer_lag
                } else {
                    stats.hi_offset - stats.committed_offset.max(stats.lo_offset.max(0))
                }
                .max(0);
                lag += behind;
                by_partition.insert(format!("{name}/{partition}"), Value::from(behind));
            }
        }
        *self
            .by_partition
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Value::Object(by_partition);
        self.lag.store(lag, atomic::Ordering::Relaxed);
        self.partitions.store(partitions, atomic::Ordering::Relaxed);
    }

    pub(super) fn lag_by_partition(&self) -> Value {
        self.by_partition
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn lag(&self) -> Option<i64> {
        Some(self.lag.load(atomic::Ordering::Relaxed)).filter(|lag| *lag >= 0)
    }

    pub(super) fn partitions(&self) -> Option<i64> {
        Some(self.partitions.load(atomic::Ordering::Relaxed)).filter(|p| *p > 0)
    }
}

/// How many workers would keep up with the group's throughput and drain its
/// lag within `target`, at the throughput one worker reaches now, between 1
/// and the partition count (more would idle). `None` without data: no
/// throughput measured while records wait (starting, paused, stuck).
pub(super) fn desired_workers(
    workers: u64,
    lag: i64,
    throughput: f64,
    target: Duration,
    partitions: i64,
) -> Option<i64> {
    let cap = partitions.max(1);
    if lag <= 0 && throughput <= 0.0 {
        return Some(1);
    }
    if throughput <= 0.0 || workers == 0 {
        return None;
    }
    let per_worker = throughput / workers as f64;
    let needed = (throughput + lag.max(0) as f64 / target.as_secs_f64()) / per_worker;
    Some((needed.ceil() as i64).clamp(1, cap))
}

/// Tasks finished per second over about the last minute.
#[derive(Default)]
pub(super) struct Rate {
    samples: VecDeque<(std::time::Instant, u64)>,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(60);

    pub(super) fn add(&mut self, finished: u64) {
        let now = std::time::Instant::now();
        self.samples.push_back((now, finished));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
    }

    pub(super) fn per_second(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some((from, first)), Some((to, last))) if to > from => {
                last.saturating_sub(*first) as f64 / to.duration_since(*from).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaling_hint_drains_the_lag_within_the_target() {
        let minute = Duration::from_secs(60);
        // Caught up and idle: one worker is enough.
        assert_eq!(desired_workers(3, 0, 0.0, minute, 12), Some(1));
        // Caught up: as many as keep up with the throughput now.
        assert_eq!(desired_workers(3, 0, 300.0, minute, 12), Some(3));
        // 100 tasks/s each; 36,000 behind is 600/s more for a minute.
        assert_eq!(desired_workers(2, 36_000, 200.0, minute, 12), Some(8));
        // Never more than the partitions.
        assert_eq!(desired_workers(2, 36_000_000, 200.0, minute, 12), Some(12));
        // Records wait and nothing runs: no estimate.
        assert_eq!(desired_workers(2, 500, 0.0, minute, 12), None);
    }
}
