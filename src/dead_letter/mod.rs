//! Dead letters: records kser could not process, kept in a dead-letter topic
//! (by default `<topic>.dlq`) with their original key and bytes untouched and
//! headers saying where they came from and why they failed.
//!
//! A worker dead-letters every record that is not a kser message and every
//! message whose task ends FAILED (steps of operations excepted: `resume`
//! runs those again). The record's offset moves only once the dead-letter
//! topic has acknowledged it, or, when the topic refuses it for good (see
//! `refused_for_good`: too large for it, an invalid record, no right to
//! write there), once the original is kept in Postgres (`kser.dead_letters`)
//! and a small record without payload, pointing at the row, is in the topic.
//! `kser dlq list` shows both kinds; `kser dlq replay` sends chosen ones back
//! to where they came from, byte for byte.
//!
//! `headers.rs`: the headers, the topic's name, what the broker refuses for
//! good; `entry.rs`: [`DeadLetterEntry`], one dead letter as read back;
//! `read.rs`: reading a topic back ([`stream`]). This file only re-exports.

mod entry;
mod headers;
mod read;

pub use entry::DeadLetterEntry;
pub(crate) use headers::refused_for_good;
pub use headers::{
    HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_OFFSET, HEADER_PARTITION,
    HEADER_PRODUCER_ERROR, HEADER_STORED, HEADER_STORED_ID, HEADER_TIMESTAMP, HEADER_TOPIC,
    HEADER_UUID, STORED_IN_POSTGRES, default_topic,
};
pub use read::{
    DeadLetterError, DeadLetterStream, PAGE, PAGE_BYTES, list, read_all, stream, stream_newest,
};
