//! Pauses in the starter: [`Hold`] says which entrypoints to hold back
//! (from the controls in force and Python kser's lock file, read by the
//! fleet task in `fleet.rs`), and [`Holding`] keeps the held records.
//!
//! A held record stays in the pipeline: its offset is unfinished, so the
//! watermark stops below it (`offsets.rs`), and its lane stays taken, so
//! the records after it in its lane wait too and nothing is reordered. The
//! records it holds count against the byte budget; when they fill it, the
//! intake pauses fetching (and keeps polling, so the worker stays in its
//! group) until the entrypoint is resumed.

use std::collections::BTreeSet;

use tokio::sync::watch;

use super::pipeline::Candidate;
use crate::store::Control;
use std::collections::VecDeque;

/// What the starter holds back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hold {
    /// Every entrypoint (a pause of the whole worker, or the lock file).
    pub(crate) all: bool,
    /// These entrypoints.
    pub(crate) entrypoints: BTreeSet<String>,
}

impl Hold {
    /// From the controls in force for this worker and the lock file.
    pub(super) fn of(controls: &[Control], lock_file: bool) -> Self {
        let mut hold = Self {
            all: lock_file,
            entrypoints: BTreeSet::new(),
        };
        for control in controls.iter().filter(|c| c.action == "pause") {
            match &control.entrypoint {
                None => hold.all = true,
                Some(name) => {
                    hold.entrypoints.insert(name.clone());
                }
            }
        }
        hold
    }

    pub(crate) fn holds(&self, entrypoint: &str) -> bool {
        self.all || self.entrypoints.contains(entrypoint)
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.all && self.entrypoints.is_empty()
    }

    /// For `kser.workers.paused` and logs: `*`, or the names.
    pub(super) fn names(&self) -> Vec<String> {
        if self.all {
            vec!["*".to_owned()]
        } else {
            self.entrypoints.iter().cloned().collect()
        }
    }
}

/// The starter's side: the records it holds back, and what to hold.
pub(crate) struct Holding {
    rx: watch::Receiver<Hold>,
    current: Hold,
    held: VecDeque<Candidate>,
}

impl Holding {
    pub(crate) fn new(rx: watch::Receiver<Hold>) -> Self {
        // The value it was made with counts as seen: take it now.
        let current = rx.borrow().clone();
        Self {
            rx,
            current,
            held: VecDeque::new(),
        }
    }

    /// Takes in a change of what to hold: records let go go back to the
    /// front of `ready`, in the order they arrived; records to hold leave
    /// `ready`.
    pub(super) fn sort(&mut self, ready: &mut VecDeque<Candidate>) {
        match self.rx.has_changed() {
            Ok(true) => self.current = self.rx.borrow_and_update().clone(),
            Ok(false) => {}
            // The control task is gone (the worker stops): hold nothing.
            Err(_) => self.current = Hold::default(),
        }
        if !self.held.is_empty() {
            let (keep, go): (VecDeque<_>, VecDeque<_>) = self
                .held
                .drain(..)
                .partition(|c| self.current.holds(&c.message.entrypoint));
            self.held = keep;
            for candidate in go.into_iter().rev() {
                ready.push_front(candidate);
            }
        }
        if !self.current.is_empty() {
            let (hold, run): (VecDeque<_>, VecDeque<_>) = ready
                .drain(..)
                .partition(|c| self.current.holds(&c.message.entrypoint));
            *ready = run;
            self.held.extend(hold);
        }
    }

    /// Resolves when what to hold may have changed while records are held;
    /// never otherwise.
    pub(super) async fn changed(&mut self) {
        if self.held.is_empty() || self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        // Seen now: `sort` would not see it as a change.
        self.current = self.rx.borrow_and_update().clone();
    }

    /// Whether records are held.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Returns the held records, to drop unfinished (the worker stops):
    /// they are delivered again to the next owner of their partitions.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Candidate> + '_ {
        self.held.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(worker: Option<&str>, entrypoint: Option<&str>) -> Control {
        Control {
            action: "pause".into(),
            worker_id: worker.map(Into::into),
            entrypoint: entrypoint.map(Into::into),
        }
    }

    #[test]
    fn pauses_and_the_lock_file_say_what_to_hold() {
        let none = Hold::of(&[], false);
        assert!(none.is_empty() && !none.holds("a"));
        let one = Hold::of(&[pause(None, Some("a"))], false);
        assert!(one.holds("a") && !one.holds("b"));
        assert_eq!(one.names(), ["a"]);
        let all = Hold::of(&[pause(Some("w"), None), pause(None, Some("a"))], false);
        assert!(all.holds("b"));
        assert_eq!(all.names(), ["*"]);
        assert!(Hold::of(&[], true).holds("anything"));
        let drain = Control {
            action: "drain".into(),
            worker_id: Some("w".into()),
            entrypoint: None,
        };
        assert!(Hold::of(&[drain], false).is_empty());
    }
}
