//! Reading a dead-letter topic back, a page at a time: its records, oldest
//! first per partition, completed with what Postgres keeps of those whose
//! original is there, then the ones kept in Postgres only. `dlq list`,
//! `dlq replay` and the console read through [`stream`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::entry::DeadLetterEntry;
use crate::config::{ClientRole, KafkaConfig};
use crate::store::{Store, StoreError, StoredDeadLetter};

/// Errors reading a dead-letter topic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The broker could not be read.
    #[error("could not read dead-letter topic '{topic}': {reason}")]
    Read {
        /// The dead-letter topic.
        topic: String,
        /// What librdkafka said.
        reason: String,
    },
    /// The rows of `kser.dead_letters` could not be read.
    #[error("could not read the dead letters kept in Postgres: {0}")]
    Store(StoreError),
}

impl From<StoreError> for DeadLetterError {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

/// How many dead letters are read, completed from Postgres and handed on
/// at a time: what `dlq list` and `dlq replay` hold, whatever the size of
/// the topic.
pub const PAGE: usize = 256;
/// The most bytes of dead letters a page holds: a page of large records
/// ends before [`PAGE`] of them.
pub const PAGE_BYTES: usize = 16 << 20;
/// Records read ahead of the page being handed on.
const READ_AHEAD: usize = 8;

/// How long the reader waits for the next record before it calls the topic
/// unreadable.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every dead letter of `dlq_topic`, a page at a time: its records, oldest
/// first per partition, completed with what `store` keeps of those whose
/// original is in Postgres; then the ones kept in Postgres only. Without a
/// store, the records alone. At most a few pages are held at once, so a
/// topic of any size is read in bounded memory.
pub fn stream(kafka: &KafkaConfig, dlq_topic: &str, store: Option<&Store>) -> DeadLetterStream {
    stream_from(kafka, dlq_topic, store, None)
}

/// Like [`stream`], but only the newest `per_partition` records of each
/// partition of the topic (and every row kept in Postgres): what a page
/// shows, read without reading the whole topic.
pub fn stream_newest(
    kafka: &KafkaConfig,
    dlq_topic: &str,
    store: Option<&Store>,
    per_partition: i64,
) -> DeadLetterStream {
    stream_from(kafka, dlq_topic, store, Some(per_partition.max(1)))
}

fn stream_from(
    kafka: &KafkaConfig,
    dlq_topic: &str,
    store: Option<&Store>,
    newest: Option<i64>,
) -> DeadLetterStream {
    let (tx, records) = tokio::sync::mpsc::channel(READ_AHEAD);
    let kafka = kafka.clone();
    let topic = dlq_topic.to_owned();
    std::thread::spawn(move || {
        if let Err(err) = read_blocking(&kafka, &topic, newest, &tx) {
            let _ = tx.blocking_send(Err(err));
        }
    });
    DeadLetterStream {
        records,
        store: store.cloned(),
        dlq_topic: dlq_topic.to_owned(),
        pointed_at: HashSet::new(),
        page: std::collections::VecDeque::new(),
        records_done: false,
        kept_after: 0,
        kept_done: store.is_none(),
    }
}

/// The dead letters of a topic as [`stream`] reads them.
pub struct DeadLetterStream {
    records: tokio::sync::mpsc::Receiver<Result<DeadLetterEntry, DeadLetterError>>,
    store: Option<Store>,
    dlq_topic: String,
    /// Rows of `kept.dead_letters` a record of the topic pointed at: listed
    /// with that record, not again on their own. Ids only, 8 bytes each.
    pointed_at: HashSet<i64>,
    page: std::collections::VecDeque<DeadLetterEntry>,
    records_done: bool,
    /// The id of the last row read of those kept in Postgres.
    kept_after: i64,
    kept_done: bool,
}

impl DeadLetterStream {
    /// The next dead letter; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<DeadLetterEntry>, DeadLetterError> {
        loop {
            if let Some(entry) = self.page.pop_front() {
                return Ok(Some(entry));
            }
            if !self.records_done {
                let mut page = Vec::with_capacity(PAGE);
                let mut bytes = 0;
                while page.len() < PAGE && bytes < PAGE_BYTES {
                    match self.records.recv().await {
                        Some(Ok(entry)) => {
                            bytes += entry.held_bytes();
                            page.push(entry);
                        }
                        Some(Err(err)) => return Err(err),
                        None => {
                            self.records_done = true;
                            break;
                        }
                    }
                }
                self.complete(&mut page).await?;
                self.page.extend(page);
                continue;
            }
            if self.kept_done {
                return Ok(None);
            }
            let Some(store) = &self.store else {
                return Ok(None);
            };
            let rows = store
                .kept_dead_letters(&self.dlq_topic, self.kept_after, PAGE as i64)
                .await?;
            match rows.last() {
                Some(last) => self.kept_after = last.id,
                None => self.kept_done = true,
            }
            self.page.extend(
                rows.iter()
                    .filter(|row| !self.pointed_at.contains(&row.id))
                    .map(DeadLetterEntry::from_kept),
            );
        }
    }

    /// Adds to the records pointing at a row of `kser.dead_letters` what
    /// only the row has.
    async fn complete(&mut self, page: &mut [DeadLetterEntry]) -> Result<(), DeadLetterError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let ids: Vec<i64> = page.iter().filter_map(|entry| entry.stored_id).collect();
        let rows = store.kept_dead_letters_by_id(&ids).await?;
        let by_id: HashMap<i64, &StoredDeadLetter> = rows
            .iter()
            .filter(|row| row.dlq_topic == self.dlq_topic)
            .map(|row| (row.id, row))
            .collect();
        for entry in page {
            if let Some(row) = entry.stored_id.and_then(|id| by_id.get(&id)) {
                entry.add_kept(row);
                self.pointed_at.insert(row.id);
            }
        }
        Ok(())
    }
}

/// Every dead letter of `dlq_topic`, in memory: see [`stream`], which
/// `dlq list` and `replay` use instead.
pub async fn list(
    kafka: &KafkaConfig,
    dlq_topic: &str,
    store: Option<&Store>,
) -> Result<Vec<DeadLetterEntry>, DeadLetterError> {
    let mut entries = Vec::new();
    let mut stream = stream(kafka, dlq_topic, store);
    while let Some(entry) = stream.next().await? {
        entries.push(entry);
    }
    Ok(entries)
}

/// Every record of a dead-letter topic, oldest first per partition, in
/// memory. Reads the partitions directly, without joining a consumer group.
pub async fn read_all(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Vec<DeadLetterEntry>, DeadLetterError> {
    list(kafka, topic, None).await
}

/// Reads the records of `topic` up to the end each partition had when it
/// began (from its start, or its `newest` last records), handing each to
/// `tx`; stops early when nobody listens any more.
fn read_blocking(
    kafka: &KafkaConfig,
    topic: &str,
    newest: Option<i64>,
    tx: &tokio::sync::mpsc::Sender<Result<DeadLetterEntry, DeadLetterError>>,
) -> Result<(), DeadLetterError> {
    let failed = |reason: String| DeadLetterError::Read {
        topic: topic.to_owned(),
        reason,
    };
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = kafka
        .client_config(
            ClientRole::Consumer,
            &[
                ("group.id", "kser-dlq-reader"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                // Prefetch a little: the reader hands records on a page
                // at a time.
                ("queued.max.messages.kbytes", "16384"),
            ],
        )
        .create()
        .map_err(|err| failed(err.to_string()))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| failed(err.to_string()))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, timeout)
            .map_err(|err| failed(err.to_string()))?;
        let from = newest.map_or(low, |n| high.saturating_sub(n).max(low));
        if high > from {
            ends.insert(*partition, high);
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(from))
                .map_err(|err| failed(err.to_string()))?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&assignment)
        .map_err(|err| failed(err.to_string()))?;
    let mut idle_since = std::time::Instant::now();
    while !ends.is_empty() {
        if idle_since.elapsed() > READ_IDLE_TIMEOUT {
            return Err(failed(format!(
                "no record for {}s before the end of the topic",
                READ_IDLE_TIMEOUT.as_secs()
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(record)) => {
                idle_since = std::time::Instant::now();
                let partition = record.partition();
                let Some(end) = ends.get(&partition).copied() else {
                    continue;
                };
                if record.offset() < end
                    && tx
                        .blocking_send(Ok(DeadLetterEntry::from_record(&record)))
                        .is_err()
                {
                    return Ok(());
                }
                if record.offset() + 1 >= end {
                    ends.remove(&partition);
                }
            }
            Some(Err(err)) => return Err(failed(err.to_string())),
            None => {}
        }
    }
    Ok(())
}
