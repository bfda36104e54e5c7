//! The capped serial console log of an instance.
//!
//! QEMU writes the guest's serial port to a Unix socket; a reader task (see
//! `instance.rs`) appends what it reads here. The log file never grows beyond
//! `cap` bytes: when an append would pass the cap, only the newest `cap / 2`
//! bytes are kept. Offsets stay absolute: `console.base` holds the offset of the
//! log's first byte. A guest flooding its console therefore costs at most `cap`
//! bytes of disk and `cap / 2` bytes of agent memory while trimming.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use palisade_common::agent_api::ConsoleChunk;

/// Most bytes one `read` returns.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Bounds for `--console-cap-bytes`: trimming reads `cap / 2` into memory.
pub const MIN_CAP: u64 = 4 * 1024;
pub const MAX_CAP: u64 = 64 << 20;

#[derive(Debug)]
pub struct ConsoleLog {
    log: PathBuf,
    base: PathBuf,
    cap: u64,
    /// Serialises appends and trims against reads, so a reader never sees a
    /// trimmed log with the old base.
    lock: Mutex<()>,
}

impl ConsoleLog {
    /// The log of the instance whose directory is `dir`.
    pub fn new(dir: &Path, cap: u64) -> Self {
        ConsoleLog {
            log: dir.join("console.log"),
            base: dir.join("console.base"),
            cap,
            lock: Mutex::new(()),
        }
    }

    pub fn append(&self, data: &[u8]) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let len = file_len(&self.log)?;
        if len + data.len() as u64 <= self.cap {
            // What the guest prints is the tenant's: readable by root only.
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.log)?;
            return file.write_all(data);
        }
        self.trim_and_append(len, data)
    }

    /// Rewrites the log as the newest `cap / 2` bytes of `old log ++ data`.
    fn trim_and_append(&self, len: u64, data: &[u8]) -> io::Result<()> {
        let keep = self.cap / 2;
        let total = len + data.len() as u64;
        let dropped = total.saturating_sub(keep);

        let mut kept = Vec::with_capacity(keep as usize);
        if (data.len() as u64) < keep {
            let from_old = keep - data.len() as u64;
            let mut file = File::open(&self.log)?;
            file.seek(SeekFrom::Start(len - from_old))?;
            file.take(from_old).read_to_end(&mut kept)?;
            kept.extend_from_slice(data);
        } else {
            kept.extend_from_slice(&data[data.len() - keep as usize..]);
        }

        // TODO(correctness): the log and its base are two renames, not one; a
        // crash between them shifts offsets by up to `cap / 2` bytes.
        let base = read_base(&self.base)? + dropped;
        replace(&self.log, &kept)?;
        replace(&self.base, base.to_string().as_bytes())
    }

    /// Up to `MAX_CHUNK` bytes from absolute `offset`. An offset before the
    /// kept part starts at the first kept byte; one past the end gives an empty
    /// chunk at the end. A UTF-8 sequence cut by the end of the chunk is left
    /// for the next read.
    pub fn read(&self, offset: u64) -> io::Result<ConsoleChunk> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let base = read_base(&self.base)?;
        let len = file_len(&self.log)?;
        let start = offset.clamp(base, base + len);
        let want = (base + len - start).min(MAX_CHUNK as u64);

        let mut bytes = Vec::with_capacity(want as usize);
        if want > 0 {
            let mut file = File::open(&self.log)?;
            file.seek(SeekFrom::Start(start - base))?;
            file.take(want).read_to_end(&mut bytes)?;
        }
        bytes.truncate(complete_utf8_prefix(&bytes));

        Ok(ConsoleChunk {
            offset: start,
            next_offset: start + bytes.len() as u64,
            data: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}

/// Length of `bytes` without a trailing, incomplete UTF-8 sequence.
fn complete_utf8_prefix(bytes: &[u8]) -> usize {
    // Look back at most 3 bytes for the lead byte of the last sequence.
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needed > back {
            bytes.len() - back
        } else {
            bytes.len()
        };
    }
    bytes.len()
}

fn file_len(path: &Path) -> io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn read_base(path: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| io::Error::new(ErrorKind::InvalidData, "console.base is not a number")),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes `path` through a temporary file and a rename.
fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(contents)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_appended_with_absolute_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ConsoleLog::new(dir.path(), 1024);
        log.append(b"hello ").expect("append");
        log.append(b"world").expect("append");

        let chunk = log.read(0).expect("read");
        assert_eq!((chunk.offset, chunk.next_offset), (0, 11));
        assert_eq!(chunk.data, "hello world");

        let chunk = log.read(6).expect("read");
        assert_eq!((chunk.offset, chunk.data.as_str()), (6, "world"));

        let chunk = log.read(500).expect("read");
        assert_eq!(
            (chunk.offset, chunk.next_offset, chunk.data.as_str()),
            (11, 11, "")
        );
    }

    #[test]
    fn the_log_and_its_base_are_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ConsoleLog::new(dir.path(), MIN_CAP);
        log.append(b"secret").expect("append");
        log.append(&vec![b'x'; MIN_CAP as usize])
            .expect("append past the cap");
        for name in ["console.log", "console.base"] {
            let meta = std::fs::metadata(dir.path().join(name)).expect(name);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn an_empty_log_reads_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunk = ConsoleLog::new(dir.path(), 1024).read(0).expect("read");
        assert_eq!(
            (chunk.offset, chunk.next_offset, chunk.data.as_str()),
            (0, 0, "")
        );
    }

    #[test]
    fn a_flood_never_grows_the_file_past_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cap = 4096;
        let log = ConsoleLog::new(dir.path(), cap);
        let mut written = 0u64;
        for i in 0..1000u32 {
            let line = format!("line {i:05}\n");
            log.append(line.as_bytes()).expect("append");
            written += line.len() as u64;
            let len = std::fs::metadata(dir.path().join("console.log"))
                .expect("stat")
                .len();
            assert!(len <= cap, "log grew to {len}");
        }

        // The newest bytes are kept, and offsets still count from the start.
        let chunk = log.read(0).expect("read");
        assert!(chunk.offset > 0);
        assert_eq!(chunk.next_offset, written);
        assert!(chunk.data.ends_with("line 00999\n"));
        let first_kept = chunk.offset;
        let skip = (11 - first_kept % 11) % 11;
        let expected_line_start = format!("line {:05}\n", (first_kept + skip) / 11);
        assert!(chunk.data[skip as usize..].starts_with(&expected_line_start));
    }

    #[test]
    fn a_single_append_larger_than_the_cap_keeps_its_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ConsoleLog::new(dir.path(), MIN_CAP);
        let data: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        log.append(&data).expect("append");

        let chunk = log.read(0).expect("read");
        assert_eq!(chunk.offset, 10_000 - MIN_CAP / 2);
        assert_eq!(chunk.next_offset, 10_000);
        assert_eq!(
            chunk.data.as_bytes(),
            &data[(10_000 - MIN_CAP / 2) as usize..]
        );
    }

    #[test]
    fn one_read_returns_at_most_64_kib() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ConsoleLog::new(dir.path(), 1 << 20);
        log.append(&vec![b'x'; 100_000]).expect("append");
        let chunk = log.read(0).expect("read");
        assert_eq!(chunk.next_offset, MAX_CHUNK as u64);
        let rest = log.read(chunk.next_offset).expect("read");
        assert_eq!(rest.next_offset, 100_000);
    }

    #[test]
    fn a_utf8_sequence_cut_by_the_chunk_end_waits_for_the_next_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ConsoleLog::new(dir.path(), 1 << 20);
        let mut data = vec![b'x'; MAX_CHUNK - 1];
        data.extend_from_slice("é!".as_bytes());
        log.append(&data).expect("append");

        let first = log.read(0).expect("read");
        assert_eq!(first.next_offset, (MAX_CHUNK - 1) as u64);
        assert!(!first.data.contains('\u{FFFD}'));
        let second = log.read(first.next_offset).expect("read");
        assert_eq!(second.data, "é!");
    }

    #[test]
    fn complete_utf8_prefix_cases() {
        assert_eq!(complete_utf8_prefix(b"abc"), 3);
        assert_eq!(complete_utf8_prefix("é".as_bytes()), 2);
        assert_eq!(complete_utf8_prefix(&"é".as_bytes()[..1]), 0);
        assert_eq!(complete_utf8_prefix(&"ab€".as_bytes()[..4]), 2);
        assert_eq!(complete_utf8_prefix(b"\xff\xfe"), 2);
    }
}
