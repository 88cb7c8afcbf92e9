//! Per-partition offset watermarks.
//!
//! Messages of one partition finish out of order when they run concurrently.
//! The consumer may only commit up to the last offset below which *every*
//! message is finished, so a crash never skips unfinished work. The tracker
//! keeps, per assigned partition, the offsets received and not yet released,
//! and says how far the watermark moved when one finishes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Identifies one received record, with the assignment generation it was
/// received under: a completion from before a revoke is ignored.
#[derive(Debug, Clone)]
pub struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    /// Received offsets -> finished?
    pending: BTreeMap<i64, bool>,
}

/// Offsets received and not yet safe to commit, by partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(Arc<str>, i32), PartitionState>,
    next_generation: u64,
}

impl OffsetTracker {
    /// Starts tracking a received record, in the order records arrive.
    pub fn track(&mut self, topic: &Arc<str>, partition: i32, offset: i64) -> Position {
        let key = (Arc::clone(topic), partition);
        let next_generation = &mut self.next_generation;
        let state = self.partitions.entry(key).or_insert_with(|| {
            *next_generation += 1;
            PartitionState {
                generation: *next_generation,
                pending: BTreeMap::new(),
            }
        });
        state.pending.insert(offset, false);
        Position {
            topic: Arc::clone(topic),
            partition,
            offset,
            generation: state.generation,
        }
    }

    /// Marks a record finished and returns the offset to store, if the
    /// watermark moved: the highest offset below which all are finished.
    pub fn complete(&mut self, position: &Position) -> Option<i64> {
        let key = (Arc::clone(&position.topic), position.partition);
        let state = self.partitions.get_mut(&key)?;
        if state.generation != position.generation {
            return None;
        }
        if let Some(done) = state.pending.get_mut(&position.offset) {
            *done = true;
        }
        let mut released = None;
        while let Some(entry) = state.pending.first_entry() {
            if !*entry.get() {
                break;
            }
            released = Some(*entry.key());
            entry.remove();
        }
        released
    }

    /// Forgets a partition this worker no longer owns; completions of its
    /// records in flight will be ignored.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        self.partitions
            .retain(|(t, p), _| !(t.as_ref() == topic && *p == partition));
    }

    /// Whether `position`'s partition is still assigned under the generation
    /// the record was received in.
    pub fn is_current(&self, position: &Position) -> bool {
        self.partitions
            .get(&(Arc::clone(&position.topic), position.partition))
            .is_some_and(|state| state.generation == position.generation)
    }

    /// Forgets every partition (the consumer was replaced).
    pub fn revoke_all(&mut self) {
        self.partitions.clear();
    }

    /// Records received and not finished, over all partitions.
    pub fn unfinished(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.pending.values().filter(|done| !**done).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_waits_for_the_oldest_unfinished() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        let p: Vec<_> = (10..15).map(|o| tracker.track(&topic, 0, o)).collect();
        assert_eq!(tracker.complete(&p[1]), None, "10 is not finished");
        assert_eq!(tracker.complete(&p[2]), None);
        assert_eq!(tracker.complete(&p[0]), Some(12), "10..=12 are finished");
        assert_eq!(tracker.complete(&p[4]), None);
        assert_eq!(tracker.complete(&p[3]), Some(14));
        assert_eq!(tracker.unfinished(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        let a = tracker.track(&topic, 0, 5);
        let b = tracker.track(&topic, 1, 7);
        assert_eq!(tracker.complete(&b), Some(7));
        assert_eq!(tracker.unfinished(), 1);
        assert_eq!(tracker.complete(&a), Some(5));
    }

    #[test]
    fn completions_from_before_a_revoke_are_ignored() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        let old = tracker.track(&topic, 0, 3);
        tracker.revoke("t", 0);
        let new = tracker.track(&topic, 0, 3);
        assert!(!tracker.is_current(&old));
        assert!(tracker.is_current(&new));
        assert_eq!(tracker.complete(&old), None);
        assert_eq!(tracker.unfinished(), 1);
        assert_eq!(tracker.complete(&new), Some(3));
    }
}
