//! The frame codec: how one record is laid out in a segment (see the
//! format in the module documentation), and a reader that finds and checks
//! frames in a segment file. Recovery and reads both decode frames, so the
//! codec is kept in one place where its bounds checks can be seen together.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::log::{LogError, Record, StoredRecord};

/// Bytes of the frame header: body length and crc.
const FRAME_HEADER_BYTES: usize = 8;
/// First byte of every body this build writes. Frames of the first format
/// began with the length of the topic's name, which is never 0, so a log
/// of an earlier build is recognised and refused by name.
const FRAME_FORMAT: u8 = 0;
/// Longest varint: a u64 in 7-bit groups.
const MAX_VARINT_BYTES: usize = 10;
/// Most bytes of a body besides key and value: format, topic id, then
/// partition, offset, timestamp and key length as varints.
pub(super) const MAX_BODY_FIXED_BYTES: usize = 1 + 4 + 5 + 3 * MAX_VARINT_BYTES;
/// Smallest body a frame can have: every varint one byte, key and value empty.
const MIN_BODY_BYTES: usize = 1 + 4 + 4;
/// Longest topic name (kept in `topics.json`, not in frames).
pub(super) const MAX_TOPIC_BYTES: usize = 255;

/// Checks a topic name fits the log's limits.
pub(super) fn validate_topic_name(topic: &str) -> Result<(), LogError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(LogError::Backend(format!(
            "topic name {topic:?} must be 1 to {MAX_TOPIC_BYTES} bytes long"
        )));
    }
    Ok(())
}

/// The id that stands for a topic's name in its frames: the 32-bit FNV-1a
/// hash of the name. The registry refuses a topic whose id another
/// topic already has, so an id names one topic.
pub(super) fn topic_id(topic: &str) -> u32 {
    topic.bytes().fold(0x811c_9dc5, |hash: u32, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Most bytes the frame of `record` can take on disk, whatever its offset.
pub(super) fn max_frame_bytes(record: &Record) -> usize {
    FRAME_HEADER_BYTES + MAX_BODY_FIXED_BYTES + record.key.len() + record.value.len()
}

/// Appends `value` as a varint (7 bits a byte, low first).
fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Appends the frame of one record to `buf`: the header, then
/// `[format u8][topic id u32][partition][offset][timestamp_ms zigzag]
/// [key_len][key][value]` with varints, the value running to the end.
pub(super) fn encode_frame(
    buf: &mut Vec<u8>,
    topic_id: u32,
    partition: u32,
    offset: u64,
    record: &Record,
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    buf.push(FRAME_FORMAT);
    buf.extend_from_slice(&topic_id.to_le_bytes());
    put_varint(buf, u64::from(partition));
    put_varint(buf, offset);
    let timestamp = record.timestamp_ms;
    put_varint(buf, ((timestamp << 1) ^ (timestamp >> 63)) as u64);
    put_varint(buf, record.key.len() as u64);
    buf.extend_from_slice(&record.key);
    buf.extend_from_slice(&record.value);
    // Record sizes are checked against max_record_bytes, which fits in u32.
    let body_len = (buf.len() - start - FRAME_HEADER_BYTES) as u32;
    let crc = crc32fast::hash(&buf[start + FRAME_HEADER_BYTES..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded frame body, borrowing from the read buffer.
#[derive(Debug)]
pub(super) struct FrameView<'a> {
    /// Id of the topic the record belongs to (see [`topic_id`]).
    pub(super) topic_id: u32,
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

    fn varint(&mut self) -> Result<u64, String> {
        let at = self.pos;
        let mut value: u64 = 0;
        for index in 0..MAX_VARINT_BYTES {
            let [byte] = self.array::<1>()?;
            let bits = u64::from(byte & 0x7f);
            if index == MAX_VARINT_BYTES - 1 && bits > 1 {
                break;
            }
            value |= bits << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint at body byte {at} is longer than a u64"))
    }
}

/// Decodes a frame body whose crc already matched.
pub(super) fn decode_body(body: &[u8]) -> Result<FrameView<'_>, String> {
    let mut cursor = BodyCursor {
        bytes: body,
        pos: 0,
    };
    let [format] = cursor.array::<1>()?;
    if format != FRAME_FORMAT {
        return Err(
            "the frame is in the format of an earlier kpay build, which this build \
                    does not read; keep that build for this data directory, or start this \
                    one on a new one"
                .to_owned(),
        );
    }
    let topic_id = cursor.array().map(u32::from_le_bytes)?;
    let partition =
        u32::try_from(cursor.varint()?).map_err(|_| "partition number above u32".to_owned())?;
    let offset = cursor.varint()?;
    let zigzag = cursor.varint()?;
    let timestamp_ms = (zigzag >> 1) as i64 ^ -((zigzag & 1) as i64);
    let key_len = usize::try_from(cursor.varint()?).map_err(|_| "key length above usize")?;
    let key = cursor.take(key_len)?;
    let value = &body[cursor.pos..];
    Ok(FrameView {
        topic_id,
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

    // A frame decodes to what was encoded, extreme fields included; cut short it fails cleanly, never panics.
    #[test]
    fn frames_round_trip_and_cut_frames_fail() {
        for (partition, offset, timestamp) in [
            (1, 7, 3),
            (u32::MAX, u64::MAX, i64::MIN),
            (0, 0, i64::MAX),
            (9, 1 << 40, -1),
        ] {
            let mut buf = Vec::new();
            let record = record("key", "value", timestamp);
            encode_frame(&mut buf, topic_id("g"), partition, offset, &record);
            assert!(buf.len() <= max_frame_bytes(&record));
            let body = &buf[FRAME_HEADER_BYTES..];
            let frame = decode_body(body).expect("decodes");
            assert_eq!(
                (frame.topic_id, frame.partition, frame.offset),
                (topic_id("g"), partition, offset)
            );
            assert_eq!(
                (frame.timestamp_ms, frame.key, frame.value),
                (timestamp, &b"key"[..], &b"value"[..])
            );
            let value_at = body.len() - 5;
            for cut in 0..value_at - 3 {
                assert!(decode_body(&body[..cut]).is_err(), "cut at {cut}");
            }
        }
        let mut long = vec![FRAME_FORMAT, 0, 0, 0, 0];
        long.extend_from_slice(&[0xff; 11]);
        assert!(decode_body(&long)
            .unwrap_err()
            .contains("longer than a u64"));
    }

    // A frame of the first format (topic name inside) is refused by name.
    #[test]
    fn frames_of_an_earlier_build_are_refused_by_name() {
        let mut old = vec![1, b'g'];
        old.extend_from_slice(&[0; 28]);
        assert!(decode_body(&old)
            .unwrap_err()
            .contains("earlier kpay build"));
    }

    // Topic ids are FNV-1a: fixed, so frames written by one build read in the next.
    #[test]
    fn topic_ids_are_stable() {
        assert_eq!(topic_id(""), 0x811c_9dc5);
        assert_eq!(topic_id("a"), 0xe40c_292c);
        assert_ne!(topic_id("payment.incoming"), topic_id("payment.inflight"));
    }
}
