//! The frame codec: how one record is laid out in a segment (see the
//! format in the module documentation), and a reader that finds and checks
//! frames in a segment file. Recovery and reads both decode frames, so the
//! codec is kept in one place where its bounds checks can be seen together.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::log::{LogError, Record, StoredRecord, TopicPartition};

/// Bytes of the frame header: body length and crc.
const FRAME_HEADER_BYTES: usize = 8;
/// Bytes of the body besides topic, key and value.
pub(super) const BODY_FIXED_BYTES: usize = 1 + 4 + 8 + 8 + 4 + 4;
/// Longest topic name, bounded by its one-byte length field.
pub(super) const MAX_TOPIC_BYTES: usize = 255;
/// Smallest body a frame can have (topic names are never empty).
const MIN_BODY_BYTES: usize = BODY_FIXED_BYTES + 1;

/// Checks a topic name fits in a frame.
pub(super) fn validate_topic_name(topic: &str) -> Result<(), LogError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(LogError::Backend(format!(
            "topic name {topic:?} must be 1 to {MAX_TOPIC_BYTES} bytes long"
        )));
    }
    Ok(())
}

/// Bytes the frame of `record` takes on disk.
pub(super) fn frame_bytes(topic: &str, record: &Record) -> usize {
    FRAME_HEADER_BYTES + BODY_FIXED_BYTES + topic.len() + record.key.len() + record.value.len()
}

/// Appends the frame of one record to `buf`.
pub(super) fn encode_frame(buf: &mut Vec<u8>, tp: &TopicPartition, offset: u64, record: &Record) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    // Topic names are checked to fit in a byte when topics are registered.
    buf.push(tp.topic.len() as u8);
    buf.extend_from_slice(tp.topic.as_bytes());
    buf.extend_from_slice(&tp.partition.to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    // Record sizes are checked against max_record_bytes, which fits in u32.
    buf.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.key);
    buf.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.value);
    let body_len = (buf.len() - start - FRAME_HEADER_BYTES) as u32;
    let crc = crc32fast::hash(&buf[start + FRAME_HEADER_BYTES..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded frame body, borrowing from the read buffer.
#[derive(Debug)]
pub(super) struct FrameView<'a> {
    /// Topic the record belongs to.
    pub(super) topic: &'a str,
    /// Partition the record belongs to.
    pub(super) partition: u32,
    /// Offset the writer gave the record.
    pub(super) offset: u64,
    /// Producer's timestamp.
    timestamp_ms: i64,
    /// Record key.
    key: &'a [u8],
    /// Record value.
    value: &'a [u8],
}

impl FrameView<'_> {
    pub(super) fn to_stored(&self) -> StoredRecord {
        StoredRecord {
            offset: self.offset,
            record: Record {
                key: Bytes::copy_from_slice(self.key),
                value: Bytes::copy_from_slice(self.value),
                timestamp_ms: self.timestamp_ms,
            },
        }
    }
}

/// Bounds-checked reader over a frame body.
struct BodyCursor<'a> {
    /// The whole body.
    bytes: &'a [u8],
    /// Next byte to read.
    pos: usize,
}

impl<'a> BodyCursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "field of {len} bytes at body byte {} runs past the body",
                    self.pos
                )
            })?;
        let field = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(field)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }
}

/// Decodes a frame body whose crc already matched.
pub(super) fn decode_body(body: &[u8]) -> Result<FrameView<'_>, String> {
    let mut cursor = BodyCursor {
        bytes: body,
        pos: 0,
    };
    let [topic_len] = cursor.array::<1>()?;
    let topic = std::str::from_utf8(cursor.take(topic_len as usize)?)
        .map_err(|_| "topic name is not UTF-8".to_owned())?;
    let partition = cursor.u32()?;
    let offset = cursor.array().map(u64::from_le_bytes)?;
    let timestamp_ms = cursor.array().map(i64::from_le_bytes)?;
    let key_len = cursor.u32()? as usize;
    let key = cursor.take(key_len)?;
    let value_len = cursor.u32()? as usize;
    let value = cursor.take(value_len)?;
    if cursor.pos != body.len() {
        return Err(format!(
            "{} bytes left over after the value",
            body.len() - cursor.pos
        ));
    }
    Ok(FrameView {
        topic,
        partition,
        offset,
        timestamp_ms,
        key,
        value,
    })
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(super) enum FrameError {
    /// The frame runs past the end of the file.
    Truncated,
    /// The length field is below the smallest frame (zeros, for instance).
    BadLength(u32),
    /// The length field is above the largest frame the settings allow.
    TooLarge(u32),
    /// The crc does not match; `next_pos` is where the next frame would start.
    BadCrc { next_pos: u64 },
    /// Reading the file failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "the frame runs past the end of the file"),
            FrameError::BadLength(len) => write!(f, "impossible frame length {len}"),
            FrameError::TooLarge(len) => write!(
                f,
                "frame body of {len} bytes is larger than max_record_bytes allows \
                 (if max_record_bytes was lowered, raise it back)"
            ),
            FrameError::BadCrc { .. } => write!(f, "checksum mismatch"),
            FrameError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// Reads frames of one segment through a window buffer, so that neighbouring
/// frames cost one positioned read instead of two each.
pub(super) struct FrameReader<'a> {
    /// The segment file.
    file: &'a File,
    /// Bytes of the file that may hold frames.
    pub(super) file_len: u64,
    /// Longest body accepted, checked before anything is allocated.
    max_body_bytes: usize,
    /// Least number of bytes read at once.
    chunk_bytes: usize,
    /// Bytes of the file starting at `window_pos`.
    window: Vec<u8>,
    /// File position of `window[0]`.
    window_pos: u64,
}

impl<'a> FrameReader<'a> {
    pub(super) fn new(
        file: &'a File,
        file_len: u64,
        max_body_bytes: usize,
        chunk_bytes: usize,
    ) -> Self {
        Self {
            file,
            file_len,
            max_body_bytes,
            chunk_bytes,
            window: Vec::new(),
            window_pos: 0,
        }
    }

    /// Makes `len` bytes at `pos` available in the window; false if they lie
    /// past the end of the file.
    fn load(&mut self, pos: u64, len: usize) -> io::Result<bool> {
        let end = pos.saturating_add(len as u64);
        if end > self.file_len {
            return Ok(false);
        }
        let window_end = self.window_pos + self.window.len() as u64;
        if pos >= self.window_pos && end <= window_end {
            return Ok(true);
        }
        let want_bytes = (len.max(self.chunk_bytes) as u64).min(self.file_len - pos);
        self.window.resize(want_bytes as usize, 0);
        self.window_pos = pos;
        self.file.read_exact_at(&mut self.window, pos)?;
        Ok(true)
    }

    /// Returns the crc-checked body of the frame at `pos` and where the next
    /// frame starts.
    pub(super) fn frame_at(&mut self, pos: u64) -> Result<(&[u8], u64), FrameError> {
        if !self.load(pos, FRAME_HEADER_BYTES).map_err(FrameError::Io)? {
            return Err(FrameError::Truncated);
        }
        let at = (pos - self.window_pos) as usize;
        let mut header = [0; FRAME_HEADER_BYTES];
        header.copy_from_slice(&self.window[at..at + FRAME_HEADER_BYTES]);
        let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let body_pos = pos + FRAME_HEADER_BYTES as u64;
        let next_pos = body_pos + u64::from(body_len);
        if next_pos > self.file_len {
            return Err(FrameError::Truncated);
        }
        let body_bytes = body_len as usize;
        if body_bytes < MIN_BODY_BYTES {
            return Err(FrameError::BadLength(body_len));
        }
        if body_bytes > self.max_body_bytes {
            return Err(FrameError::TooLarge(body_len));
        }
        if !self.load(body_pos, body_bytes).map_err(FrameError::Io)? {
            return Err(FrameError::Truncated);
        }
        let at = (body_pos - self.window_pos) as usize;
        let body = &self.window[at..at + body_bytes];
        if crc32fast::hash(body) != crc {
            return Err(FrameError::BadCrc { next_pos });
        }
        Ok((body, next_pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::embedded::test_support::record;

    // Frame decoding turns arbitrary bytes into errors, never panics.
    #[test]
    fn decoding_garbage_fails_cleanly() {
        let mut buf = Vec::new();
        let tp = TopicPartition::new("g", 1);
        encode_frame(&mut buf, &tp, 7, &record("k", "v", 3));
        let frame = decode_body(&buf[FRAME_HEADER_BYTES..]).expect("decodes");
        assert_eq!((frame.topic, frame.partition, frame.offset), ("g", 1, 7));
        for cut in 0..buf.len() - FRAME_HEADER_BYTES {
            assert!(decode_body(&buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + cut]).is_err());
        }
        let mut huge = buf[FRAME_HEADER_BYTES..].to_vec();
        let key_len_at = 1 + 1 + 4 + 8 + 8;
        huge[key_len_at..key_len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_body(&huge).is_err());
    }
}
