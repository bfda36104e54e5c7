//! The audit log's record format and its hash chain, shared by the controller (which writes
//! it) and the CLI (which verifies an exported copy offline).
//!
//! One JSON object per line. Each record's `hash` is SHA-256 over the previous record's hash
//! and the record's canonical JSON without `hash`; the first record chains from 32 zero bytes.
//! Changing, removing, inserting or reordering any byte breaks the chain at or after that
//! record. (Cutting records off the end needs signed heads kept elsewhere: a later step.)

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    pub request_id: String,
    /// `ip:port` of the TCP peer.
    pub source: String,
    /// `user:<id>`, or `anonymous` before authentication succeeded.
    pub subject: String,
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    /// e.g. `instance.create`, or `http.<METHOD>` when no action was reached.
    pub action: String,
    /// e.g. `instance/<id>`, or the request path when no object was reached.
    pub object: String,
    /// `allowed`, `denied` or `rejected` (malformed).
    pub result: String,
    /// Stable error code for refusals.
    pub code: Option<String>,
    pub prev: String,
    #[serde(default)]
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must carry, given its fields and `prev`.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let canonical = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(self.prev.as_bytes());
        hasher.update(b"\n");
        hasher.update(&canonical);
        hex::encode(hasher.finalize())
    }
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        records: u64,
        head: String,
    },
    /// The first record (1-based line number and, where readable, its sequence number) that
    /// does not verify, and why.
    Broken {
        line: u64,
        reason: String,
    },
}

/// Verifies a whole log, stopping at the first bad record.
pub fn verify(log: &[u8]) -> Verdict {
    let mut prev = GENESIS.to_string();
    let mut count = 0u64;
    if !log.is_empty() && !log.ends_with(b"\n") {
        let line = log.split(|b| *b == b'\n').count() as u64;
        return broken(line, "last record is not terminated by a newline");
    }
    for (index, raw) in log.split(|b| *b == b'\n').enumerate() {
        let line = index as u64 + 1;
        if raw.is_empty() && line as usize == log.split(|b| *b == b'\n').count() {
            break;
        }
        let record: AuditRecord = match serde_json::from_slice(raw) {
            Ok(record) => record,
            Err(e) => return broken(line, &format!("not a valid record: {e}")),
        };
        if record.seq != count + 1 {
            return broken(
                line,
                &format!("sequence {} where {} was due", record.seq, count + 1),
            );
        }
        if record.prev != prev {
            return broken(line, "does not chain to the record before it");
        }
        if record.compute_hash() != record.hash {
            return broken(line, "content does not match its hash");
        }
        // Re-serializing must give back the stored bytes: no alternative encodings accepted.
        if serde_json::to_vec(&record).ok().as_deref() != Some(raw) {
            return broken(line, "record is not in canonical form");
        }
        prev = record.hash;
        count += 1;
    }
    Verdict::Intact {
        records: count,
        head: prev,
    }
}

fn broken(line: u64, reason: &str) -> Verdict {
    Verdict::Broken {
        line,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<u8> {
        let mut prev = GENESIS.to_string();
        let mut out = Vec::new();
        for seq in 1..=n {
            let mut r = AuditRecord {
                seq,
                time: "2026-01-01T00:00:00Z".into(),
                request_id: format!("req-{seq}"),
                source: "127.0.0.1:1".into(),
                subject: "anonymous".into(),
                key_id: None,
                tenant_id: None,
                action: "http.GET".into(),
                object: "/v1/x\n\u{1b}[31m".into(),
                result: "denied".into(),
                code: Some("signature_missing".into()),
                prev: prev.clone(),
                hash: String::new(),
            };
            r.hash = r.compute_hash();
            prev = r.hash.clone();
            out.extend(serde_json::to_vec(&r).unwrap());
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn intact_log_verifies() {
        assert!(matches!(
            verify(&log(5)),
            Verdict::Intact { records: 5, .. }
        ));
        assert!(matches!(verify(b""), Verdict::Intact { records: 0, .. }));
    }

    #[test]
    fn every_single_byte_flip_is_detected_at_or_before_its_record() {
        let good = log(4);
        for pos in 0..good.len() {
            let mut bad = good.clone();
            bad[pos] ^= 0x01;
            let record_line = good[..pos].iter().filter(|b| **b == b'\n').count() as u64 + 1;
            match verify(&bad) {
                Verdict::Broken { line, .. } => assert!(
                    line <= record_line + 1,
                    "flip at {pos} reported at line {line}"
                ),
                Verdict::Intact { .. } => panic!("flip at byte {pos} not detected"),
            }
        }
    }

    #[test]
    fn removed_or_swapped_records_are_detected() {
        let good = log(3);
        let lines: Vec<&[u8]> = good
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let join = |ls: &[&[u8]]| {
            let mut v = Vec::new();
            for l in ls {
                v.extend_from_slice(l);
                v.push(b'\n');
            }
            v
        };
        assert!(matches!(
            verify(&join(&[lines[0], lines[2]])),
            Verdict::Broken { line: 2, .. }
        ));
        assert!(matches!(
            verify(&join(&[lines[1], lines[0], lines[2]])),
            Verdict::Broken { line: 1, .. }
        ));
    }
}
