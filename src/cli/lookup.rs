//! Looking up a uuid as an operation or a task (see [`crate::status`]):
//! rendering it for people is `output.rs`'s job.

pub(super) use crate::status::{Status as Found, lookup};
