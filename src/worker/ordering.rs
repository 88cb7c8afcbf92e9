//! Per-key ordering: which records may start now, and which wait for an
//! earlier record of their key (or partition) to reach a final state.
//!
//! A *lane* is the unit of order: a record key within a partition (`key`
//! mode), or a whole partition (`partition` mode). One record of a lane runs
//! at a time, in offset order; records of different lanes, and records with
//! no key in `key` mode, run side by side up to the concurrency limit.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::offsets::Position;

/// In what order a worker runs the records of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Records with the same key run one after the other, in offset order;
    /// different keys and keyless records run in parallel.
    #[default]
    Key,
    /// One record at a time per partition, like a plain consumer.
    Partition,
    /// No order: every record runs as soon as a slot is free.
    None,
}

impl Ordering {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Partition => "partition",
            Self::None => "none",
        }
    }
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Ordering {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "key" => Ok(Self::Key),
            "partition" => Ok(Self::Partition),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown ordering '{other}': expected key, partition or none"
            )),
        }
    }
}

/// The unit of order: a partition, and a record key within it (`None` in
/// `partition` mode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Lane {
    topic: Arc<str>,
    partition: i32,
    key: Option<Vec<u8>>,
}

/// The lane of a record under `mode`, or `None` when it is not ordered.
pub(crate) fn lane(mode: Ordering, position: &Position, key: Option<&[u8]>) -> Option<Lane> {
    let key = match (mode, key) {
        (Ordering::None, _) | (Ordering::Key, None) => return None,
        (Ordering::Key, Some(key)) => Some(key.to_vec()),
        (Ordering::Partition, _) => None,
    };
    Some(Lane {
        topic: Arc::clone(&position.topic),
        partition: position.partition,
        key,
    })
}

/// The lanes that have a record in flight, each with the records waiting
/// behind it.
#[derive(Debug)]
pub(crate) struct Lanes<T> {
    busy: HashMap<Lane, VecDeque<T>>,
    waiting: usize,
}

impl<T> Lanes<T> {
    pub(crate) fn new() -> Self {
        Self {
            busy: HashMap::new(),
            waiting: 0,
        }
    }

    /// Admits a record: it comes back if it may start now; otherwise it
    /// waits behind the record of its lane in flight.
    pub(crate) fn admit(&mut self, lane: Option<&Lane>, item: T) -> Option<T> {
        let Some(lane) = lane else {
            return Some(item);
        };
        match self.busy.get_mut(lane) {
            Some(queue) => {
                queue.push_back(item);
                self.waiting += 1;
                None
            }
            None => {
                self.busy.insert(lane.clone(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The record in flight on `lane` reached a final state (or was
    /// dropped): returns the next record of the lane, which now holds it.
    pub(crate) fn release(&mut self, lane: &Lane) -> Option<T> {
        let queue = self.busy.get_mut(lane)?;
        match queue.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                Some(next)
            }
            None => {
                self.busy.remove(lane);
                None
            }
        }
    }

    /// Records waiting behind another of their lane.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether no lane is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.busy.is_empty()
    }

    /// Forgets every lane and returns the records waiting (the worker is
    /// stopping).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + use<T> {
        self.waiting = 0;
        std::mem::take(&mut self.busy).into_values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::offsets::OffsetTracker;

    fn positions(n: i64) -> Vec<Position> {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        (0..n).map(|o| tracker.track(&topic, 0, o)).collect()
    }

    #[test]
    fn a_key_runs_one_record_at_a_time_in_order() {
        let p = positions(4);
        let mut lanes = Lanes::new();
        let a = lane(Ordering::Key, &p[0], Some(b"a"));
        let b = lane(Ordering::Key, &p[1], Some(b"b"));
        assert_eq!(lanes.admit(a.as_ref(), 0), Some(0));
        assert_eq!(
            lanes.admit(b.as_ref(), 1),
            Some(1),
            "another key runs beside it"
        );
        assert_eq!(lanes.admit(a.as_ref(), 2), None, "waits for record 0");
        assert_eq!(lanes.admit(a.as_ref(), 3), None);
        assert_eq!(lanes.waiting(), 2);
        let a = a.expect("keyed records have a lane");
        assert_eq!(lanes.release(&a), Some(2));
        assert_eq!(lanes.release(&a), Some(3));
        assert_eq!(lanes.release(&a), None);
        assert_eq!(lanes.admit(Some(&a), 4), Some(4), "the lane is free again");
    }

    #[test]
    fn keyless_records_are_not_ordered_by_key_but_are_by_partition() {
        let p = positions(2);
        assert_eq!(lane(Ordering::Key, &p[0], None), None);
        assert_eq!(
            lane(Ordering::Partition, &p[0], None),
            lane(Ordering::Partition, &p[1], Some(b"k"))
        );
        assert_eq!(lane(Ordering::None, &p[0], Some(b"k")), None);
    }

    #[test]
    fn orderings_parse_from_their_flag_values() {
        assert_eq!("key".parse(), Ok(Ordering::Key));
        assert_eq!("Partition".parse(), Ok(Ordering::Partition));
        assert_eq!("none".parse(), Ok(Ordering::None));
        assert!("random".parse::<Ordering>().is_err());
    }
}
