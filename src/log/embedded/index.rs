//! The in-memory index: every topic and partition, and for each partition
//! its offsets, the disk position of every retained record and the tail
//! cache. It also owns `topics.json` and `log_starts.json`, the two small
//! files the index is rebuilt from besides the segments, so that their
//! format and their atomic replacement are defined in one place.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::frame::{topic_id, MAX_TOPIC_BYTES};
use super::segment::sync_dir;
use super::{corrupt, io_error};
use crate::log::{LogError, StoredRecord, TopicPartition};

/// Name of the file listing the topics.
pub(super) const TOPICS_FILE: &str = "topics.json";
/// Name of the file recording each partition's log start after retention.
pub(super) const LOG_STARTS_FILE: &str = "log_starts.json";

/// Where one record sits on disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordPosition {
    /// Number of the segment file holding the record.
    pub(super) segment: u32,
    /// Byte position of the record's frame in that file. Segments stay below
    /// 4 GiB: at most `MAX_SEGMENT_BYTES` before a group, whose first append
    /// is at most `MAX_APPEND_BYTES` and the rest `MAX_GROUP_BYTES`.
    pub(super) pos: u32,
}

impl RecordPosition {
    /// The compact position (8 bytes per retained record in memory), if it fits.
    pub(super) fn new(segment: u64, pos: u64) -> Option<Self> {
        Some(Self {
            segment: u32::try_from(segment).ok()?,
            pos: u32::try_from(pos).ok()?,
        })
    }
}

/// Mutable state of one partition; guarded by [`Partition::state`].
#[derive(Debug)]
pub(super) struct PartitionState {
    /// First retained offset; `positions[0]` belongs to it.
    pub(super) log_start: u64,
    /// Offset the next record will get; everything below is durable.
    pub(super) high_watermark: u64,
    /// Consumers are done with offsets below this; retention may drop them.
    pub(super) released: u64,
    /// Disk position of every retained record, offset `log_start + index`.
    pub(super) positions: VecDeque<RecordPosition>,
    /// The newest records, so readers at the tail are served from memory.
    pub(super) tail: VecDeque<StoredRecord>,
}

/// One topic-partition of the log.
#[derive(Debug)]
pub(super) struct Partition {
    /// Index into [`Registry::by_id`]; segments refer to partitions by it.
    pub(super) id: usize,
    /// Name of the partition.
    pub(super) tp: TopicPartition,
    /// Its topic's id (see [`topic_id`]), written into each of its frames.
    pub(super) topic_id: u32,
    /// Index, high-water mark and tail cache.
    pub(super) state: Mutex<PartitionState>,
    /// Publishes the high-water mark so `wait_for` can sleep until it moves.
    pub(super) hwm: watch::Sender<u64>,
}

impl Partition {
    fn new(id: usize, tp: TopicPartition, log_start: u64) -> Self {
        Self {
            id,
            topic_id: topic_id(&tp.topic),
            tp,
            state: Mutex::new(PartitionState {
                log_start,
                high_watermark: log_start,
                released: log_start,
                positions: VecDeque::new(),
                tail: VecDeque::new(),
            }),
            hwm: watch::Sender::new(log_start),
        }
    }
}

/// A topic's place in the registry.
#[derive(Debug, Clone, Copy)]
pub(super) struct TopicEntry {
    /// Id of partition 0; partition `p` has id `first_id + p`.
    pub(super) first_id: usize,
    /// Number of partitions of the topic.
    pub(super) partitions: u32,
}

/// Every known topic and partition.
#[derive(Debug, Default)]
pub(super) struct Registry {
    /// Topic name to its partitions, to resolve names from appends.
    pub(super) topics: BTreeMap<String, TopicEntry>,
    /// Topic id (see [`topic_id`]) to name, to resolve frames.
    names: HashMap<u32, String>,
    /// All partitions by id, for retention which walks segments by id.
    pub(super) by_id: Vec<Arc<Partition>>,
}

impl Registry {
    /// Registers a topic; `starts` gives each partition's log start, if
    /// known. Refused if another topic has the same id in frames.
    pub(super) fn add_topic(
        &mut self,
        topic: &str,
        partitions: u32,
        starts: Option<&Vec<u64>>,
    ) -> Result<(), LogError> {
        self.check_id(topic)?;
        self.names.insert(topic_id(topic), topic.to_owned());
        let first_id = self.by_id.len();
        for partition in 0..partitions {
            let log_start = starts
                .and_then(|starts| starts.get(partition as usize))
                .copied()
                .unwrap_or(0);
            let tp = TopicPartition::new(topic, partition);
            self.by_id.push(Arc::new(Partition::new(
                first_id + partition as usize,
                tp,
                log_start,
            )));
        }
        let entry = TopicEntry {
            first_id,
            partitions,
        };
        self.topics.insert(topic.to_owned(), entry);
        Ok(())
    }

    /// Refuses `topic` if another topic has its id in frames.
    pub(super) fn check_id(&self, topic: &str) -> Result<(), LogError> {
        let id = topic_id(topic);
        match self.names.get(&id).filter(|other| *other != topic) {
            Some(other) => Err(LogError::Backend(format!(
                "topic {topic:?} has the same frame id ({id:08x}) as topic {other:?}; \
                 choose another name"
            ))),
            None => Ok(()),
        }
    }

    /// Partition `partition` of the topic with frame id `topic_id`.
    pub(super) fn lookup_id(&self, topic_id: u32, partition: u32) -> Option<&Arc<Partition>> {
        self.lookup(self.names.get(&topic_id)?, partition)
    }

    /// Partition `partition` of `topic`, if both are registered.
    pub(super) fn lookup(&self, topic: &str, partition: u32) -> Option<&Arc<Partition>> {
        let entry = self.topics.get(topic)?;
        if partition >= entry.partitions {
            return None;
        }
        self.by_id.get(entry.first_id + partition as usize)
    }

    /// Topic name to partition count, as stored in `topics.json`.
    pub(super) fn topic_counts(&self) -> BTreeMap<String, u32> {
        self.topics
            .iter()
            .map(|(name, entry)| (name.clone(), entry.partitions))
            .collect()
    }
}

/// Replaces `dir/name` with `contents` so that a crash leaves either the old
/// or the new version, never a mix.
pub(super) fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), LogError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let context = || format!("writing {}", path.display());
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = written {
        // A half-written temporary file would only hold space (a full disk).
        let _ = fs::remove_file(&tmp);
        return Err(io_error(context(), e));
    }
    fs::rename(&tmp, &path).map_err(|e| io_error(context(), e))?;
    sync_dir(dir).map_err(|e| io_error(context(), e))
}

/// Reads and parses a JSON file; a missing file yields the default.
fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, LogError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
    };
    serde_json::from_slice(&text).map_err(|e| {
        corrupt(
            path,
            format!("not valid JSON ({e}); restore it from a backup or fix it by hand"),
        )
    })
}

/// Loads `topics.json` and `log_starts.json` into a registry.
pub(super) fn load_registry(dir: &Path) -> Result<Registry, LogError> {
    let topics_path = dir.join(TOPICS_FILE);
    let topics: BTreeMap<String, u32> = read_json(&topics_path)?;
    let starts: BTreeMap<String, Vec<u64>> = read_json(&dir.join(LOG_STARTS_FILE))?;
    let mut registry = Registry::default();
    for (topic, partitions) in &topics {
        if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES || *partitions == 0 {
            return Err(corrupt(
                &topics_path,
                format!("topic {topic:?} with {partitions} partitions is not valid"),
            ));
        }
        registry.add_topic(topic, *partitions, starts.get(topic))?;
    }
    Ok(registry)
}
