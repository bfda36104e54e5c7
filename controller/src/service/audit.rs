//! The audit log writer: an append-only, hash-chained file (`<data>/audit/audit.log`).
//!
//! A record is durable (written and `fdatasync`ed) before the action it describes runs; when the
//! append fails, the request fails (fails closed). Records are never rewritten or deleted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use palisade_common::audit::{verify, AuditRecord, Verdict};

/// The fields a caller supplies; sequence, time and chain are filled in by the log.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub request_id: String,
    pub source: String,
    pub subject: String,
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub action: String,
    pub object: String,
    pub result: String,
    pub code: Option<String>,
}

#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

struct State {
    file: File,
    /// Length of the verified log: a failed append is cut back to it, so a torn write never
    /// leaves half a record for the next one to chain onto.
    len: u64,
    seq: u64,
    prev: String,
}

#[derive(Debug, thiserror::Error)]
#[error("audit log append failed")]
pub struct AppendError(#[source] std::io::Error);

impl AuditLog {
    /// Opens the log, verifying the existing chain first: a controller does not start on top of
    /// a log that was tampered with.
    pub fn open(dir: &Path) -> anyhow::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("audit.log");
        let existing = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).context(format!("reading {}", path.display())),
        };
        let existing = cut_torn_tail(&path, existing)?;
        let (seq, prev) = match verify(&existing) {
            Verdict::Intact { records, head } => (records, head),
            Verdict::Broken { line, reason } => anyhow::bail!(
                "audit log {} fails verification at record {line}: {reason}; refusing to start",
                path.display()
            ),
        };
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(AuditLog {
            path,
            state: Arc::new(Mutex::new(State {
                file,
                len: existing.len() as u64,
                seq,
                prev,
            })),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and makes it durable. Blocking: call from a blocking context.
    pub fn append_blocking(&self, entry: Entry) -> Result<AuditRecord, AppendError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut record = AuditRecord {
            seq: state.seq + 1,
            time: crate::db::now(),
            request_id: entry.request_id,
            source: entry.source,
            subject: entry.subject,
            key_id: entry.key_id,
            tenant_id: entry.tenant_id,
            action: entry.action,
            object: entry.object,
            result: entry.result,
            code: entry.code,
            prev: state.prev.clone(),
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        let mut line =
            serde_json::to_vec(&record).map_err(|e| AppendError(std::io::Error::other(e)))?;
        line.push(b'\n');
        let written = state
            .file
            .write_all(&line)
            .and_then(|()| state.file.sync_data());
        if let Err(e) = written {
            let _ = state.file.set_len(state.len);
            return Err(AppendError(e));
        }
        state.len += line.len() as u64;
        state.seq = record.seq;
        state.prev = record.hash.clone();
        Ok(record)
    }

    pub async fn append(&self, entry: Entry) -> Result<AuditRecord, AppendError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(entry))
            .await
            .map_err(|e| AppendError(std::io::Error::other(e)))?
    }
}

/// A crash in the middle of an append leaves a last line without its newline. That record was
/// never made durable, so its request failed and its action never ran: it is cut off (and the
/// cut is logged). Only an unterminated tail is cut, and only when all before it verifies.
fn cut_torn_tail(path: &Path, log: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if log.is_empty() || log.ends_with(b"\n") {
        return Ok(log);
    }
    let keep = log.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if !matches!(verify(&log[..keep]), Verdict::Intact { .. }) {
        return Ok(log); // not a torn append: let verification report it
    }
    tracing::warn!(path = %path.display(), bytes = log.len() - keep,
        "cutting a torn, never-acknowledged record off the end of the audit log");
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(keep as u64)?;
    file.sync_all()?;
    let mut log = log;
    log.truncate(keep);
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for i in 0..3 {
            log.append_blocking(Entry {
                action: format!("test.{i}"),
                ..Entry::default()
            })
            .unwrap();
        }
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        let record = log.append_blocking(Entry::default()).unwrap();
        assert_eq!(record.seq, 4);
        let bytes = std::fs::read(dir.path().join("audit.log")).unwrap();
        assert!(matches!(verify(&bytes), Verdict::Intact { records: 4, .. }));
    }

    #[test]
    fn a_torn_last_append_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append_blocking(Entry::default()).unwrap();
        drop(log);
        let path = dir.path().join("audit.log");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":2,"time":"20"#).unwrap();
        drop(file);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append_blocking(Entry::default()).unwrap().seq, 2);
        let bytes = std::fs::read(&path).unwrap();
        assert!(matches!(verify(&bytes), Verdict::Intact { records: 2, .. }));
    }

    #[test]
    fn refuses_to_start_on_a_tampered_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append_blocking(Entry::default()).unwrap();
        drop(log);
        let path = dir.path().join("audit.log");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(AuditLog::open(dir.path()).is_err());
    }
}
