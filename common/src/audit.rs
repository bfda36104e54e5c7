//! The audit log's formats and their verifier, shared by the controller (which writes the log)
//! and the CLI (which verifies an exported copy offline).
//!
//! The log is a transparency log in the manner of RFC 9162: one JSON record per line, each a
//! leaf of a Merkle tree (`merkle`). A record's `hash` is its leaf hash, SHA-256(0x00 ‖ the
//! record's bytes without `hash`), so a changed byte names its record. Signed tree heads
//! ([`TreeHead`]) commit to the root of the first `tree_size` records: a record rewritten with a
//! recomputed hash, removed, reordered or cut off the end no longer matches a head signed
//! before, and heads are kept in a second store too, so cutting both is needed to hide a cut.
//! The head key signs nothing but heads; a rotation is announced by a head the old key signs.

use std::collections::BTreeSet;

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::merkle::{self, Hash, Tree};

/// Record types (`type`).
pub const TYPE_AUTHENTICATION: &str = "authentication";
pub const TYPE_READ: &str = "read";
pub const TYPE_MUTATION: &str = "mutation";
pub const TYPE_HOST: &str = "host";
pub const TYPE_SYSTEM: &str = "system";

/// Actions of the records the log writes about itself.
pub const WRITER_STARTED: &str = "audit.writer_started";
pub const WRITER_STOPPED: &str = "audit.writer_stopped";
pub const HEAD_KEY_ROTATED: &str = "audit.head_key_rotated";
/// Records past their retention were reduced to stubs ([`PurgedRecord`]).
pub const RECORDS_PURGED: &str = "audit.records_purged";

/// Longest a head may lag the log it covers while the writer runs; the verifier reports
/// longer silences between heads that no writer restart explains.
pub const HEAD_INTERVAL_SECS: u64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// 1-based; the record is leaf `seq - 1`.
    pub seq: u64,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// `authentication`, `read`, `mutation`, `host` or `system`.
    #[serde(rename = "type")]
    pub kind: String,
    pub request_id: String,
    /// `ip:port` of the TCP peer, or `host:<name>` for what an agent reports.
    pub source: String,
    /// `user:<id>`, `agent:<host>`, `controller`, or `anonymous` before authentication.
    pub subject: String,
    /// The subject's role, once known.
    pub role: Option<String>,
    pub key_id: Option<String>,
    /// The tenant whose resource (or member) this concerns.
    pub tenant_id: Option<String>,
    /// A platform role acted on a tenant's resource: shown to that tenant as a provider action.
    pub provider: bool,
    /// e.g. `instance.create`, or `http.<METHOD>` when no action was reached.
    pub action: String,
    /// e.g. `instance/<id>`, or the request path when no object was reached.
    pub object: String,
    /// `allowed`, `denied`, `rejected` (malformed), or for outcomes `succeeded` / `failed`.
    pub result: String,
    /// Stable error code for refusals.
    pub code: Option<String>,
    /// The leaf hash, hex; last in the line, left out of what it hashes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditRecord {
    /// Fills in `hash` and gives the record's line (with its newline).
    pub fn seal(&mut self) -> Vec<u8> {
        self.hash = String::new();
        let unhashed = ascii_json(self);
        self.hash = hex::encode(merkle::leaf_hash(&unhashed));
        let mut line = ascii_json(self);
        line.push(b'\n');
        line
    }
}

/// What is left of a record past its retention: its number and its leaf hash, so the tree and
/// every head still verify, and the purge record (`purged_by`, an [`RECORDS_PURGED`] record
/// later in the log) that names, by count and digest, exactly which records it reduced. A stub
/// cannot be made without that record; the verifier checks each purge's set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PurgedRecord {
    pub seq: u64,
    pub purged_by: u64,
    pub hash: String,
}

impl PurgedRecord {
    /// The stub's line, with its newline.
    pub fn line(&self) -> Vec<u8> {
        let mut line = ascii_json(self);
        line.push(b'\n');
        line
    }
}

/// A line of the log: a record, or the stub of a purged one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Record(Box<AuditRecord>),
    Purged(PurgedRecord),
}

/// A purge record's `object`: the records' cut-off time, how many, and a digest of their
/// numbers (decimal, one per line, ascending).
pub fn purge_object(before: &str, seqs: &[u64]) -> String {
    format!(
        "audit-log/purge?before={before}&count={}&sha256={}",
        seqs.len(),
        seqs_digest(seqs)
    )
}

/// The count and digest a purge record's `object` commits to.
pub fn parse_purge_object(object: &str) -> Option<(u64, String)> {
    let query = object.strip_prefix("audit-log/purge?")?;
    let (mut count, mut digest) = (None, None);
    for pair in query.split('&') {
        match pair.split_once('=')? {
            ("count", n) => count = n.parse().ok(),
            ("sha256", d) => digest = Some(d.to_string()),
            _ => {}
        }
    }
    Some((count?, digest?))
}

pub fn seqs_digest(seqs: &[u64]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for seq in seqs {
        h.update(format!("{seq}\n"));
    }
    hex::encode(h.finalize())
}

/// JSON with every character outside printable ASCII written as a `\u` escape: a record is one line
/// of plain text whatever its fields hold (no line or paragraph separators, terminal escapes,
/// NULs or bidirectional controls reach a reader raw).
pub fn ascii_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    // Plain data structs with string keys: serializing them cannot fail.
    let _ = value.serialize(&mut ser);
    out
}

struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// A line ends with `,"hash":"<64 hex>"}`; its leaf hash covers the line without that.
const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;

fn unhashed_part(line: &[u8]) -> Option<&[u8]> {
    let cut = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (body, suffix) = line.split_at(cut);
    (suffix.starts_with(br#","hash":""#) && suffix.ends_with(b"\"}")).then_some(body)
}

/// The leaf hash a record line must carry, computed from its bytes alone.
pub fn line_leaf_hash(line: &[u8]) -> Option<Hash> {
    use sha2::{Digest, Sha256};
    let body = unhashed_part(line)?;
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(body);
    h.update(b"}");
    Some(h.finalize().into())
}

/// Checks one line as record `seq`: well-formed, numbered, and carrying its own leaf hash.
pub fn check_line(line: &[u8], seq: u64) -> Result<(AuditRecord, Hash), String> {
    let record: AuditRecord =
        serde_json::from_slice(line).map_err(|e| format!("not a valid record: {e}"))?;
    if record.seq != seq {
        return Err(format!("sequence {} where {seq} was due", record.seq));
    }
    let leaf = line_leaf_hash(line).ok_or("the record does not end with its hash")?;
    if hex::encode(leaf) != record.hash {
        return Err("content does not match its hash".into());
    }
    Ok((record, leaf))
}

/// Checks one line as line `seq`: a record (as [`check_line`]) or a purged record's stub,
/// whose hash cannot be recomputed (the tree and the purge record's digest vouch for it).
pub fn check_any_line(line: &[u8], seq: u64) -> Result<(Line, Hash), String> {
    if !line.starts_with(format!("{{\"seq\":{seq},\"purged_by\":").as_bytes()) {
        return check_line(line, seq).map(|(record, leaf)| (Line::Record(Box::new(record)), leaf));
    }
    let stub: PurgedRecord =
        serde_json::from_slice(line).map_err(|e| format!("not a valid purged record: {e}"))?;
    if stub.purged_by <= seq {
        return Err(format!(
            "purged by record {}, not a later one",
            stub.purged_by
        ));
    }
    let leaf = hex::decode(&stub.hash)
        .ok()
        .and_then(|h| h.try_into().ok())
        .filter(|_| stub.hash.len() == 64 && stub.hash == stub.hash.to_lowercase())
        .ok_or("a purged record without a valid hash")?;
    Ok((Line::Purged(stub), leaf))
}

/// The host clock as the kernel's time discipline reports it when a head is signed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClockState {
    /// Whether an NTP/PTP daemon keeps the clock synchronized (adjtimex without STA_UNSYNC).
    pub synchronized: bool,
    /// The measured offset from the time source, microseconds.
    pub offset_us: i64,
    /// The kernel's bound on the clock error, microseconds.
    pub max_error_us: i64,
}

/// A signed tree head: the log's first `tree_size` records have root `root_hash`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    pub tree_size: u64,
    /// Hex.
    pub root_hash: String,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    pub clock: ClockState,
    /// `start`, `periodic`, `request`, `rotation` or `stop`.
    pub reason: String,
    /// The Ed25519 public key that signs this head, base64.
    pub key: String,
    /// On a rotation: the key that signs the heads after this one, base64.
    pub next_key: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

const HEAD_CONTEXT: &[u8] = b"palisade audit tree head v1\n";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

pub fn public_key_text(key: &VerifyingKey) -> String {
    b64().encode(key.as_bytes())
}

impl TreeHead {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = String::new();
        let mut bytes = HEAD_CONTEXT.to_vec();
        bytes.extend(serde_json::to_vec(&unsigned).unwrap_or_default());
        bytes
    }

    pub fn sign(&mut self, key: &SigningKey) {
        self.key = public_key_text(&key.verifying_key());
        self.signature = b64().encode(key.sign(&self.signed_bytes()).to_bytes());
    }

    /// Whether the signature is the named key's over this head.
    pub fn signature_valid(&self) -> bool {
        let Some(key) = parse_key(&self.key) else {
            return false;
        };
        let Ok(sig) = b64().decode(&self.signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&sig) else {
            return false;
        };
        key.verify(&self.signed_bytes(), &sig).is_ok()
    }

    pub fn root(&self) -> Option<Hash> {
        hex::decode(&self.root_hash).ok()?.try_into().ok()
    }
}

pub fn parse_key(text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = b64().decode(text).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Reads heads (JSON lines) from any number of stores, merged, duplicates dropped, ordered by
/// size then time. A line that is not a head is an error naming its store and line.
pub fn read_heads(stores: &[(&str, &[u8])]) -> Result<Vec<TreeHead>, String> {
    let mut heads = Vec::new();
    for (name, bytes) in stores {
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let head: TreeHead = serde_json::from_slice(line)
                .map_err(|e| format!("{name} line {}: not a tree head: {e}", i + 1))?;
            heads.push(head);
        }
    }
    heads.sort_by(|a, b| (a.tree_size, &a.time).cmp(&(b.tree_size, &b.time)));
    heads.dedup();
    Ok(heads)
}

/// What verifying a log against its heads found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub records: u64,
    /// Records purged after their retention (only their hashes are left).
    pub purged: u64,
    /// Heads checked (signature, key, root).
    pub heads: u64,
    /// The size the newest valid head covers.
    pub covered: u64,
    /// The keys that signed heads, in order of use.
    pub keys: Vec<String>,
    /// Writer starts and stops, key rotations and silences, one line each, in log order.
    pub events: Vec<String>,
    /// The first fault: the 1-based record (line) it is in or after, and why. `None` = intact.
    pub fault: Option<(u64, String)>,
}

/// What checking the records alone found.
#[derive(Debug, Default)]
pub struct RecordsCheck {
    /// The tree over the records before the first bad one.
    pub tree: Tree,
    /// The log's records about itself (writer starts and stops, rotations), with their `seq`.
    pub markers: Vec<(u64, AuditRecord)>,
    /// The first bad record (1-based line) and why.
    pub fault: Option<(u64, String)>,
    /// The stubs each purge record (by `seq`) left.
    pub purged: std::collections::BTreeMap<u64, PurgeGroup>,
}

/// The stubs one purge record left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeGroup {
    pub count: u64,
    /// The first stub's `seq`.
    pub first: u64,
}

/// Verifies the records alone: each numbered in order and carrying its own hash.
pub fn verify_records(log: &[u8]) -> RecordsCheck {
    let mut check = RecordsCheck::default();
    // An unterminated last line is a fault there; the complete lines before it are still
    // checked (and counted), so the fault is named at that line, not as a cut at the first.
    let unterminated = (!log.is_empty() && !log.ends_with(b"\n"))
        .then(|| log.split(|b| *b == b'\n').count() as u64);
    let log = match unterminated {
        Some(_) => log
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&log[..0], |end| &log[..=end]),
        None => log,
    };
    let body = log.strip_suffix(b"\n").unwrap_or(log);
    if body.is_empty() {
        if let Some(line) = unterminated {
            check.fault = Some((line, "last record is not terminated by a newline".into()));
        }
        return check;
    }
    // The stubs each purge record left, to check against what it committed to.
    let mut stubs: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for (index, line) in body.split(|b| *b == b'\n').enumerate() {
        let seq = index as u64 + 1;
        match check_any_line(line, seq) {
            Ok((Line::Record(record), leaf)) => {
                check.tree.push(leaf);
                if record.kind == TYPE_SYSTEM && record.action.starts_with("audit.") {
                    check.markers.push((seq, *record));
                }
            }
            Ok((Line::Purged(stub), leaf)) => {
                check.tree.push(leaf);
                let group = check.purged.entry(stub.purged_by).or_insert(PurgeGroup {
                    count: 0,
                    first: seq,
                });
                group.count += 1;
                stubs.entry(stub.purged_by).or_default().push(seq);
            }
            Err(reason) => {
                check.fault = Some((seq, reason));
                break;
            }
        }
    }
    // A stub stands only for a record its purge record names: the set of stubs pointing at
    // each purge record must be exactly the set it committed to.
    let size = check.tree.size() as u64;
    let mut bad = None;
    // Purge records at or past a bad line were never read: their stubs stay unjudged.
    let read = check.fault.as_ref().map_or(u64::MAX, |(line, _)| *line);
    for (by, seqs) in stubs.range(..read) {
        let committed = check
            .markers
            .iter()
            .find(|(seq, r)| seq == by && r.action == RECORDS_PURGED)
            .and_then(|(_, r)| parse_purge_object(&r.object));
        let fits = committed.as_ref().is_some_and(|(count, digest)| {
            *count == seqs.len() as u64 && *digest == seqs_digest(seqs)
        });
        if !fits {
            let why = match *by <= size && committed.is_some() {
                true => format!(
                    "the {} records marked purged by record {by} ({}..{}) are not the ones it \
                     purged",
                    seqs.len(),
                    seqs[0],
                    seqs[seqs.len() - 1]
                ),
                false => format!("purged by record {by}, which is no purge record of this log"),
            };
            if bad.as_ref().is_none_or(|(first, _)| seqs[0] < *first) {
                bad = Some((seqs[0], why));
            }
        }
    }
    if let Some((first, why)) = bad {
        if check.fault.as_ref().is_none_or(|(line, _)| first < *line) {
            check.tree.truncate(first as usize - 1);
            check.markers.retain(|(seq, _)| *seq < first);
            check.fault = Some((first, why));
        }
    }
    if let (Some(line), None) = (unterminated, &check.fault) {
        check.fault = Some((line, "last record is not terminated by a newline".into()));
    }
    check
}

/// Verifies an exported log against heads from its stores. `pinned`: the head key the
/// operator published; without it, the first head's key is trusted (and reported).
pub fn verify(log: &[u8], heads: &[TreeHead], pinned: Option<&str>) -> Report {
    verify_with(log, heads, pinned, false)
}

/// As [`verify`]; with `copy`, the log is a copy taken earlier than some heads: heads that
/// cover records past its end are reported (they cannot be checked against it), not taken
/// for a cut. Use it for an export checked against a live head store, never for the live log.
pub fn verify_with(log: &[u8], heads: &[TreeHead], pinned: Option<&str>, copy: bool) -> Report {
    verify_checked(&verify_records(log), heads, pinned, copy)
}

/// As [`verify_with`], over records already checked (the writer keeps their tree).
pub fn verify_checked(
    check: &RecordsCheck,
    heads: &[TreeHead],
    pinned: Option<&str>,
    copy: bool,
) -> Report {
    let RecordsCheck {
        tree,
        markers,
        fault,
        purged,
    } = check;
    let mut report = Report {
        records: tree.size() as u64,
        purged: purged.values().map(|g| g.count).sum(),
        fault: fault.clone(),
        ..Report::default()
    };
    let mut trusted: BTreeSet<String> = pinned.map(str::to_string).into_iter().collect();
    let mut head_events: Vec<(u64, String)> = Vec::new();
    let mut last_good: Option<&TreeHead> = None;
    for head in heads {
        if trusted.is_empty() {
            trusted.insert(head.key.clone());
            head_events.push((
                0,
                format!(
                    "trusting head key {} (first head; pin it with --key)",
                    head.key
                ),
            ));
        }
        let fail = |report: &mut Report, line: u64, why: String| {
            if report.fault.as_ref().is_none_or(|(l, _)| *l > line) {
                report.fault = Some((line, why));
            }
        };
        if !head.signature_valid() {
            fail(
                &mut report,
                head.tree_size.max(1),
                format!(
                    "the head of {} records signed at {} has no valid signature",
                    head.tree_size, head.time
                ),
            );
            break;
        }
        if !trusted.contains(&head.key) {
            fail(
                &mut report,
                head.tree_size.max(1),
                format!(
                    "the head of {} records at {} is signed by an untrusted key {}",
                    head.tree_size, head.time, head.key
                ),
            );
            break;
        }
        if !report.keys.contains(&head.key) {
            report.keys.push(head.key.clone());
        }
        let from = last_good.map_or(0, |h| h.tree_size);
        if head.tree_size > report.records && copy && head.signature_valid() {
            let later = heads
                .iter()
                .filter(|h| h.tree_size > report.records)
                .count();
            head_events.push((
                report.records,
                format!(
                    "this copy ends after {} records; {later} later heads cover records it does \
                     not hold (from {})",
                    report.records, head.time
                ),
            ));
            break;
        }
        if head.tree_size > report.records {
            let have = report.records;
            fail(
                &mut report,
                have + 1,
                format!(
                    "the log ends after {have} records, but a head signed at {} covers {}: \
                 records {}..{} were cut off",
                    head.time,
                    head.tree_size,
                    have + 1,
                    head.tree_size
                ),
            );
            break;
        }
        let root = tree.root_at(head.tree_size as usize);
        if root.is_none() || root != head.root() {
            fail(
                &mut report,
                from + 1,
                format!(
                    "records {}..{} do not match the head signed at {}: one was changed, removed, \
                 reordered or re-hashed",
                    from + 1,
                    head.tree_size,
                    head.time
                ),
            );
            break;
        }
        if let Some(prev) = last_good {
            if let Some(gap) = seconds_between(&prev.time, &head.time) {
                let restarted = markers.iter().any(|(seq, r)| {
                    r.action == WRITER_STARTED && *seq > prev.tree_size && *seq <= head.tree_size
                });
                if gap > 3 * HEAD_INTERVAL_SECS as i64 && !restarted && prev.reason != "stop" {
                    head_events.push((
                        head.tree_size,
                        format!(
                            "no head for {gap} s before {} while the writer ran",
                            head.time
                        ),
                    ));
                }
            }
        }
        if let Some(next) = &head.next_key {
            trusted.insert(next.clone());
            head_events.push((
                head.tree_size,
                format!("head key rotated at {} ({} -> {next})", head.time, head.key),
            ));
        }
        report.heads += 1;
        report.covered = head.tree_size;
        last_good = Some(head);
    }
    // A purge signs a head over its purge record before it reduces any record, so stubs
    // whose purge record no head covers were not made by the writer: whoever wrote them could
    // have hidden any record that way.
    // (Judged on an otherwise sound log only: a fault elsewhere already stops trust.)
    let uncovered = purged
        .iter()
        .filter(|(by, _)| **by > report.covered)
        .min_by_key(|(_, group)| group.first);
    if let (Some((by, group)), None) = (uncovered, &report.fault) {
        report.fault = Some((
            group.first,
            format!(
                "records from {} on are marked purged by record {by}, which no signed head \
                 covers: the writer signs a purge before it reduces any record",
                group.first
            ),
        ));
    }
    let mut events: Vec<(u64, String)> = head_events;
    let mut stopped_cleanly = true;
    for (seq, record) in markers {
        match record.action.as_str() {
            WRITER_STARTED => {
                let how = if *seq == 1 {
                    "log started"
                } else if stopped_cleanly {
                    "writer restarted after a clean stop"
                } else {
                    "writer restarted after an unclean stop (no stop marker)"
                };
                events.push((*seq, format!("record {seq}: {how} at {}", record.time)));
                stopped_cleanly = false;
            }
            WRITER_STOPPED => {
                events.push((
                    *seq,
                    format!("record {seq}: writer stopped at {}", record.time),
                ));
                stopped_cleanly = true;
            }
            HEAD_KEY_ROTATED => events.push((
                *seq,
                format!("record {seq}: head key rotation to {}", record.object),
            )),
            RECORDS_PURGED => {
                let whose = record
                    .tenant_id
                    .as_deref()
                    .map_or("platform".to_string(), |t| format!("tenant {t}"));
                let count = parse_purge_object(&record.object).map_or(0, |(n, _)| n);
                let done = match purged.get(seq) {
                    Some(_) => "(hashes kept)",
                    None => "(announced, not carried out: still in full)",
                };
                events.push((
                    *seq,
                    format!(
                        "record {seq}: {count} {whose} records past retention purged at {} {done}",
                        record.time
                    ),
                ))
            }
            _ => events.push((*seq, format!("record {seq}: {}", record.action))),
        }
    }
    events.sort_by_key(|(seq, _)| *seq);
    report.events = events.into_iter().map(|(_, e)| e).collect();
    report
}

/// The keys a verifier holding `pinned` may trust: `pinned`, and every key a validly signed
/// head of a trusted key announced as its successor, in order.
pub fn trusted_keys(heads: &[TreeHead], pinned: &str) -> BTreeSet<String> {
    let mut trusted = BTreeSet::from([pinned.to_string()]);
    for head in heads {
        if let Some(next) = &head.next_key {
            if trusted.contains(&head.key) && head.signature_valid() {
                trusted.insert(next.clone());
            }
        }
    }
    trusted
}

fn seconds_between(a: &str, b: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let a = time::OffsetDateTime::parse(a, &Rfc3339).ok()?;
    let b = time::OffsetDateTime::parse(b, &Rfc3339).ok()?;
    Some((b - a).whole_seconds())
}

/// An inclusion proof of one record, as the API gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub seq: u64,
    pub tree_size: u64,
    /// Hex hashes, leaf to root.
    pub path: Vec<String>,
}

/// A consistency proof between two tree sizes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    pub first: u64,
    pub second: u64,
    pub path: Vec<String>,
}

fn hashes(path: &[String]) -> Option<Vec<Hash>> {
    path.iter()
        .map(|h| hex::decode(h).ok()?.try_into().ok())
        .collect()
}

/// Proves one record line is in the log the head signs: the line carries its own hash, the
/// proof leads from it to the head's root, and the head is validly signed by `key`.
pub fn verify_inclusion(
    line: &[u8],
    proof: &InclusionProof,
    head: &TreeHead,
    key: &str,
) -> Result<(), String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (_, leaf) = check_line(line, proof.seq)?;
    if head.key != key || !head.signature_valid() {
        return Err("the head is not validly signed by the given key".into());
    }
    if proof.tree_size != head.tree_size || proof.seq == 0 {
        return Err("the proof is for another tree size".into());
    }
    let path = hashes(&proof.path).ok_or("the proof holds a malformed hash")?;
    let root = head.root().ok_or("the head holds a malformed root")?;
    if merkle::verify_inclusion(proof.seq - 1, proof.tree_size, &leaf, &path, &root) {
        Ok(())
    } else {
        Err("the record is not in the tree the head signs".into())
    }
}

/// Checks that `second` extends `first` (both signed by trusted keys, checked by the caller).
pub fn verify_consistency(
    first: &TreeHead,
    second: &TreeHead,
    proof: &ConsistencyProof,
) -> Result<(), String> {
    let (Some(a), Some(b)) = (first.root(), second.root()) else {
        return Err("a head holds a malformed root".into());
    };
    if proof.first != first.tree_size || proof.second != second.tree_size {
        return Err("the proof is for other sizes".into());
    }
    let path = hashes(&proof.path).ok_or("the proof holds a malformed hash")?;
    if first.tree_size == 0
        || merkle::verify_consistency(first.tree_size, second.tree_size, &a, &b, &path)
    {
        Ok(())
    } else {
        Err("the later head does not extend the earlier one".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, action: &str) -> AuditRecord {
        AuditRecord {
            seq,
            time: format!("2026-01-01T00:00:{:02}.000Z", seq % 60),
            kind: TYPE_READ.into(),
            request_id: format!("req-{seq}"),
            source: "127.0.0.1:1".into(),
            subject: "anonymous".into(),
            role: None,
            key_id: None,
            tenant_id: None,
            provider: false,
            action: action.into(),
            object: "/v1/x\n\u{1b}[31m\u{2028}\0".into(),
            result: "denied".into(),
            code: Some("signature_missing".into()),
            hash: String::new(),
        }
    }

    fn log(n: u64) -> (Vec<u8>, Tree) {
        let mut out = Vec::new();
        let mut tree = Tree::new();
        for seq in 1..=n {
            let mut r = record(seq, "http.GET");
            out.extend(r.seal());
            tree.push(hex::decode(&r.hash).unwrap().try_into().unwrap());
        }
        (out, tree)
    }

    fn head(tree: &Tree, size: u64, key: &SigningKey, time: &str) -> TreeHead {
        let mut h = TreeHead {
            tree_size: size,
            root_hash: hex::encode(tree.root_at(size as usize).unwrap()),
            time: time.into(),
            clock: ClockState::default(),
            reason: "periodic".into(),
            key: String::new(),
            next_key: None,
            signature: String::new(),
        };
        h.sign(key);
        h
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn an_intact_log_verifies_against_its_heads() {
        let (bytes, tree) = log(5);
        let k = key(1);
        let heads = [
            head(&tree, 3, &k, "2026-01-01T00:00:03.000Z"),
            head(&tree, 5, &k, "2026-01-01T00:00:05.000Z"),
        ];
        let pinned = public_key_text(&k.verifying_key());
        let report = verify(&bytes, &heads, Some(&pinned));
        assert_eq!(report.fault, None, "{report:?}");
        assert_eq!((report.records, report.heads, report.covered), (5, 2, 5));
        assert_eq!(verify(b"", &[], None).fault, None);
    }

    #[test]
    fn every_single_bit_flip_names_its_record() {
        let (good, _) = log(4);
        for pos in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[pos] ^= bit;
                let record_line = good[..pos].iter().filter(|b| **b == b'\n').count() as u64 + 1;
                match verify(&bad, &[], None).fault {
                    Some((line, _)) => assert!(
                        line == record_line || (good[pos] == b'\n' && line == record_line + 1),
                        "flip at {pos} reported at line {line}, not {record_line}"
                    ),
                    None => panic!("flip at byte {pos} not detected"),
                }
            }
        }
    }

    #[test]
    fn rehashed_removed_swapped_and_cut_records_fail_the_heads() {
        let (good, tree) = log(6);
        let k = key(2);
        let heads = [head(&tree, 6, &k, "2026-01-01T00:00:06.000Z")];
        let pinned = public_key_text(&k.verifying_key());
        let lines: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
        let join = |ls: &[&[u8]]| ls.concat();
        // A record rewritten with a recomputed hash: each line is fine, the head is not.
        let mut forged = record(3, "http.GET");
        forged.result = "allowed".into();
        let forged = forged.seal();
        let rewritten = join(&[lines[0], lines[1], &forged, lines[3], lines[4], lines[5]]);
        assert!(verify_records(&rewritten).fault.is_none());
        assert!(verify(&rewritten, &heads, Some(&pinned)).fault.is_some());
        // Cut tail.
        let cut = join(&lines[..4]);
        let report = verify(&cut, &heads, Some(&pinned));
        assert!(
            report.fault.as_ref().unwrap().1.contains("cut off"),
            "{report:?}"
        );
        // Removed, swapped, duplicated: the sequence breaks.
        for bad in [
            join(&[lines[0], lines[2]]),
            join(&[lines[1], lines[0]]),
            join(&[lines[0], lines[0]]),
        ] {
            assert!(verify(&bad, &heads, Some(&pinned)).fault.is_some());
        }
        // A head signed by another key, or with a forged signature.
        let other = head(&tree, 6, &key(3), "2026-01-01T00:00:06.000Z");
        assert!(verify(&good, &[other], Some(&pinned)).fault.is_some());
        let mut tampered = heads[0].clone();
        tampered.tree_size = 5;
        tampered.root_hash = hex::encode(tree.root_at(5).unwrap());
        assert!(verify(&good, &[tampered], Some(&pinned)).fault.is_some());
    }

    #[test]
    fn an_older_copy_is_not_a_cut_when_said_so() {
        let (bytes, tree) = log(6);
        let k = key(7);
        let heads = [head(&tree, 6, &k, "2026-01-01T00:00:06.000Z")];
        let pinned = public_key_text(&k.verifying_key());
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        let older = lines[..4].concat();
        assert!(verify(&older, &heads, Some(&pinned)).fault.is_some());
        let report = verify_with(&older, &heads, Some(&pinned), true);
        assert_eq!(report.fault, None, "{report:?}");
        assert!(report.events.iter().any(|e| e.contains("later heads")));
    }

    #[test]
    fn a_rotation_is_followed_and_reported() {
        let (bytes, tree) = log(4);
        let (old, new) = (key(4), key(5));
        let mut rotation = TreeHead {
            next_key: Some(public_key_text(&new.verifying_key())),
            ..head(&tree, 2, &old, "2026-01-01T00:00:02.000Z")
        };
        rotation.sign(&old);
        let after = head(&tree, 4, &new, "2026-01-01T00:00:04.000Z");
        let pinned = public_key_text(&old.verifying_key());
        let report = verify(&bytes, &[rotation.clone(), after.clone()], Some(&pinned));
        assert_eq!(report.fault, None, "{report:?}");
        assert_eq!(report.keys.len(), 2);
        assert!(report.events.iter().any(|e| e.contains("rotated")));
        let trusted = trusted_keys(&[rotation.clone(), after.clone()], &pinned);
        assert!(trusted.contains(&after.key));
        assert_eq!(trusted_keys(std::slice::from_ref(&after), &pinned).len(), 1);
        // Without the announcing head, the new key is not trusted.
        assert!(verify(&bytes, &[after], Some(&pinned)).fault.is_some());
    }

    #[test]
    fn one_record_is_proved_against_a_signed_head() {
        let (bytes, tree) = log(9);
        let k = key(6);
        let h = head(&tree, 9, &k, "2026-01-01T00:00:09.000Z");
        let line = bytes.split_inclusive(|b| *b == b'\n').nth(4).unwrap();
        let proof = InclusionProof {
            seq: 5,
            tree_size: 9,
            path: tree
                .inclusion_proof(4, 9)
                .unwrap()
                .iter()
                .map(hex::encode)
                .collect(),
        };
        let pinned = public_key_text(&k.verifying_key());
        assert_eq!(verify_inclusion(line, &proof, &h, &pinned), Ok(()));
        let mut other = line.to_vec();
        other[10] ^= 1;
        assert!(verify_inclusion(&other, &proof, &h, &pinned).is_err());
        let wrong = InclusionProof {
            seq: 6,
            ..proof.clone()
        };
        assert!(verify_inclusion(line, &wrong, &h, &pinned).is_err());
        let older = head(&tree, 6, &k, "2026-01-01T00:00:06.000Z");
        let consistency = ConsistencyProof {
            first: 6,
            second: 9,
            path: tree
                .consistency_proof(6, 9)
                .unwrap()
                .iter()
                .map(hex::encode)
                .collect(),
        };
        assert_eq!(verify_consistency(&older, &h, &consistency), Ok(()));
        assert!(verify_consistency(&h, &older, &consistency).is_err());
    }

    /// Records 2..=4 of a 5-record log purged by record 6, a purge record; heads over all.
    fn purged_log() -> (Vec<u8>, Vec<TreeHead>) {
        let mut lines = Vec::new();
        let mut tree = Tree::new();
        let purged = [2, 3, 4];
        for seq in 1..=6 {
            let mut r = record(seq, "http.GET");
            if seq == 6 {
                r.kind = TYPE_SYSTEM.into();
                r.action = RECORDS_PURGED.into();
                r.object = purge_object("2026-01-01T00:00:05.000Z", &purged);
            }
            lines.push(r.seal());
            tree.push(hex::decode(&r.hash).unwrap().try_into().unwrap());
        }
        let heads = vec![head(&tree, 6, &key(1), "2026-01-01T00:00:06.000Z")];
        for seq in purged {
            let hash = hex::encode(tree.leaf(seq as usize - 1).unwrap());
            let stub = PurgedRecord {
                seq,
                purged_by: 6,
                hash,
            };
            lines[seq as usize - 1] = stub.line();
        }
        (lines.concat(), heads)
    }

    #[test]
    fn purged_records_keep_the_tree_and_their_purge_is_reported() {
        let (bytes, heads) = purged_log();
        let report = verify(&bytes, &heads, None);
        assert_eq!(report.fault, None);
        assert_eq!((report.records, report.purged, report.covered), (6, 3, 6));
        assert!(
            report
                .events
                .iter()
                .any(|e| e.contains("3 platform records past retention")),
            "{:?}",
            report.events
        );
    }

    #[test]
    fn a_last_record_without_its_newline_is_named_not_taken_for_a_cut() {
        let mut bytes = Vec::new();
        let mut tree = Tree::new();
        for seq in 1..=3 {
            let mut r = record(seq, "http.GET");
            bytes.extend(r.seal());
            tree.push(hex::decode(&r.hash).unwrap().try_into().unwrap());
        }
        let heads = vec![head(&tree, 3, &key(1), "2026-01-01T00:00:03.000Z")];
        assert_eq!(verify(&bytes, &heads, None).fault, None);
        *bytes.last_mut().unwrap() = b'\x0b';
        let report = verify(&bytes, &heads, None);
        let (line, why) = report.fault.expect("a fault");
        assert_eq!(line, 3, "{why}");
        assert_eq!(report.records, 2);
    }

    #[test]
    fn stubs_of_a_purge_no_head_covers_are_a_fault() {
        // Someone with write access but no key: records 2..=4 turned into stubs (true hashes,
        // so every head still matches) of a purge record 6 appended after the last head.
        let (bytes, heads) = purged_log();
        let mut tree = Tree::new();
        for line in String::from_utf8(bytes.clone()).unwrap().lines().take(5) {
            let seq = tree.size() as u64 + 1;
            let (_, leaf) = check_any_line(line.as_bytes(), seq).expect("a sound line");
            tree.push(leaf);
        }
        let only_five = vec![head(&tree, 5, &key(1), "2026-01-01T00:00:05.500Z")];
        let report = verify(&bytes, &only_five, None);
        let (line, why) = report.fault.expect("a fault");
        assert_eq!(line, 2, "{why}");
        assert!(why.contains("no signed head covers"), "{why}");
        // The same log with a head over the purge record verifies.
        assert_eq!(verify(&bytes, &heads, None).fault, None);
    }

    #[test]
    fn a_purge_that_never_ran_leaves_its_records_whole_and_is_reported() {
        let (bytes, heads) = purged_log();
        // The log as it was before the rewrite: purge record 6 written, records all whole.
        let mut whole = Vec::new();
        for (i, line) in String::from_utf8(bytes).unwrap().lines().enumerate() {
            let seq = i as u64 + 1;
            if (2..=4).contains(&seq) {
                whole.extend(record(seq, "http.GET").seal());
            } else {
                whole.extend(format!("{line}\n").into_bytes());
            }
        }
        let report = verify(&whole, &heads, None);
        assert_eq!(report.fault, None);
        assert_eq!(report.purged, 0);
        assert!(
            report.events.iter().any(|e| e.contains("not carried out")),
            "{:?}",
            report.events
        );
    }

    #[test]
    fn a_stub_no_purge_record_names_is_a_fault() {
        let (bytes, heads) = purged_log();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Record 5 replaced by a stub carrying its true hash, pointing at the real purge.
        let (r5, _) = check_line(lines[4].as_bytes(), 5).unwrap();
        let forged = PurgedRecord {
            seq: 5,
            purged_by: 6,
            hash: r5.hash.clone(),
        };
        let mut tampered = lines.clone();
        let forged_line = String::from_utf8(forged.line()).unwrap();
        tampered[4] = forged_line.trim_end();
        let report = verify(
            format!("{}\n", tampered.join("\n")).as_bytes(),
            &heads,
            None,
        );
        let (line, why) = report.fault.expect("a fault");
        assert_eq!(line, 2, "{why}");
        assert!(why.contains("marked purged by record 6 (2..5)"), "{why}");
        // A stub pointing at a record that is no purge, or at an earlier one.
        for (by, expect) in [(7u64, "no purge record"), (1, "not a later one")] {
            let stub = PurgedRecord {
                seq: 5,
                purged_by: by,
                hash: r5.hash.clone(),
            };
            let mut tampered = lines.clone();
            let line_text = String::from_utf8(stub.line()).unwrap();
            tampered[4] = line_text.trim_end();
            let report = verify(
                format!("{}\n", tampered.join("\n")).as_bytes(),
                &heads,
                None,
            );
            let (_, why) = report.fault.expect("a fault");
            assert!(why.contains(expect), "{by}: {why}");
        }
        // A stub's hash changed: the tree no longer matches the head.
        let mut tampered = lines.clone();
        let changed = lines[2].replacen("\"hash\":\"", "\"hash\":\"0", 1);
        let changed = changed.replacen(&changed[changed.len() - 3..changed.len() - 2], "", 1);
        tampered[2] = &changed;
        let report = verify(
            format!("{}\n", tampered.join("\n")).as_bytes(),
            &heads,
            None,
        );
        assert!(report.fault.is_some());
    }
}
