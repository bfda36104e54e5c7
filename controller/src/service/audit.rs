//! The audit log writer: a transparency log (`<data>/audit/audit.log`, one record per line,
//! each a leaf of an RFC 9162 Merkle tree) with signed tree heads.
//!
//! - A record is durable (written and `fdatasync`ed) before the action it describes runs; when
//!   the append fails, the request fails (fails closed). No record is ever changed; past its
//!   retention it may only be reduced to a stub keeping its number and leaf hash, by a purge
//!   that a purge record announces first (see [`AuditLog::purge`]).
//! - One writer thread owns the file. Appends that arrive while it syncs are written and synced
//!   together (group commit), so one `fdatasync` serves many requests.
//! - Tree heads are signed with a key used for nothing else (sealed under the master key) at
//!   start, at least every [`HEAD_INTERVAL_SECS`], on request, on key rotation and at a clean
//!   stop. Each is appended to `heads.jsonl` beside the log *and* in the head store (a second
//!   directory), so cutting records off the end means cutting both.
//! - The writer's start and clean stop, and key rotations, are records themselves: a restart
//!   without a stop record before it shows an unclean stop, never a silent gap.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use palisade_common::audit::{
    self as format, AuditRecord, ClockState, ConsistencyProof, InclusionProof, PurgedRecord,
    TreeHead, HEAD_INTERVAL_SECS, HEAD_KEY_ROTATED, RECORDS_PURGED, TYPE_SYSTEM, WRITER_STARTED,
    WRITER_STOPPED,
};
use palisade_common::merkle::Tree;

use crate::service::secrets::{random_bytes, write_new_private_file, MasterKey};

/// The fields a caller supplies; sequence, time and hash are filled in by the log.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// A record type (`palisade_common::audit::TYPE_*`); empty = `system`.
    pub kind: &'static str,
    pub request_id: String,
    pub source: String,
    pub subject: String,
    pub role: Option<String>,
    pub key_id: Option<String>,
    pub tenant_id: Option<String>,
    pub provider: bool,
    pub action: String,
    pub object: String,
    pub result: String,
    pub code: Option<String>,
}

/// Where the log and its heads live.
#[derive(Debug, Clone)]
pub struct AuditPaths {
    /// The log, its heads, and the sealed head key.
    pub dir: PathBuf,
    /// The second store of heads (another directory, ideally another volume or host mount).
    pub head_store: PathBuf,
}

const LOG_FILE: &str = "audit.log";
const HEADS_FILE: &str = "heads.jsonl";
const KEY_FILE: &str = "head.key";
const NEXT_KEY_FILE: &str = "head.key.next";
/// A purge writes the reduced log here, then renames it over the log.
const PURGING_FILE: &str = "audit.log.purging";
const KEY_PURPOSE: &str = "audit-head-key";
/// Most records written with one sync.
const MAX_BATCH: usize = 4096;

#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    heads_path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    view: Arc<RwLock<View>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What readers see: only durable records and written heads.
struct View {
    /// The log file the offsets are into (a purge swaps in a rewritten one).
    file: Arc<File>,
    tree: Tree,
    /// Bytes of the log that are durable records.
    len: u64,
    /// Byte offset of each record's line.
    offsets: Vec<u64>,
    /// The records (`seq`) of each tenant, and of each subject, in order.
    by_tenant: HashMap<String, Vec<u64>>,
    by_subject: HashMap<String, Vec<u64>>,
    latest: Option<TreeHead>,
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T, AppendError>>;

enum Job {
    Append(Box<Entry>, Reply<AuditRecord>),
    Purge(Retention, Reply<Purged>),
    Head(&'static str, Reply<TreeHead>),
    Rotate(Reply<TreeHead>),
    Stop(Reply<TreeHead>),
}

#[derive(Debug, thiserror::Error)]
#[error("audit log append failed")]
pub struct AppendError(#[source] std::io::Error);

fn other(e: impl std::fmt::Display) -> AppendError {
    AppendError(std::io::Error::other(e.to_string()))
}

impl AuditLog {
    /// Opens the log, verifying the records and every head in both stores first: a controller
    /// does not start on top of a log that was tampered with or cut. Then the writer starts,
    /// with a start record and a signed head.
    pub fn open(paths: &AuditPaths, master: &MasterKey) -> anyhow::Result<AuditLog> {
        for dir in [&paths.dir, &paths.head_store] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let path = paths.dir.join(LOG_FILE);
        // A purge that stopped before its rename left the log whole: drop its half copy.
        match std::fs::remove_file(paths.dir.join(PURGING_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("removing an interrupted purge's copy")
            }
            _ => {}
        }
        let heads_path = paths.dir.join(HEADS_FILE);
        let store_path = paths.head_store.join(HEADS_FILE);
        let log = read_or_empty(&path)?;
        let log = cut_torn_tail(&path, log, |bytes| {
            format::verify_records(bytes).fault.is_none()
        })?;
        let mut head_bytes = Vec::new();
        for p in [&heads_path, &store_path] {
            let bytes = read_or_empty(p)?;
            let bytes = cut_torn_tail(p, bytes, |b| format::read_heads(&[("", b)]).is_ok())?;
            head_bytes.push((p.display().to_string(), bytes));
        }
        let stores: Vec<(&str, &[u8])> = head_bytes
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let heads = format::read_heads(&stores).map_err(|e| anyhow::anyhow!(e))?;
        let key = load_head_key(&paths.dir, master, heads.last())?;
        let pinned = heads.first().map(|h| h.key.clone());
        let check = format::verify_records(&log);
        let report = format::verify_checked(&check, &heads, pinned.as_deref(), false);
        if let Some((line, reason)) = &report.fault {
            bail!(
                "audit log {} fails verification at record {line}: {reason}; refusing to start \
                 (keep the files for investigation, and move them aside to start a new log)",
                path.display()
            );
        }
        let tree = check.tree;
        let mut offsets = Vec::with_capacity(tree.size());
        let (mut by_tenant, mut by_subject) = (HashMap::new(), HashMap::new());
        let mut at = 0u64;
        for (index, line) in log.split_inclusive(|b| *b == b'\n').enumerate() {
            offsets.push(at);
            at += line.len() as u64;
            if is_stub(line) {
                continue;
            }
            let who: Who = serde_json::from_slice(line).context("indexing the audit log")?;
            who.index(index as u64 + 1, &mut by_tenant, &mut by_subject);
        }
        let open_append = |p: &Path| {
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))
        };
        let writer = Writer {
            file: open_append(&path)?,
            head_files: vec![
                (heads_path.clone(), open_append(&heads_path)?),
                (store_path.clone(), open_append(&store_path)?),
            ],
            len: log.len() as u64,
            seq: tree.size() as u64,
            key,
            dir: paths.dir.clone(),
            master: master.clone(),
            last_head: Instant::now(),
            pending: Vec::new(),
            pending_lines: Vec::new(),
        };
        let reader = Arc::new(File::open(&path)?);
        let (tx, rx) = mpsc::channel();
        let audit = AuditLog {
            inner: Arc::new(Inner {
                path,
                heads_path,
                jobs: Mutex::new(Some(tx)),
                view: Arc::new(RwLock::new(View {
                    file: reader,
                    len: log.len() as u64,
                    tree,
                    offsets,
                    by_tenant,
                    by_subject,
                    latest: heads.last().cloned(),
                })),
                writer: Mutex::new(None),
            }),
        };
        let view = audit.inner.view.clone();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, &view))?;
        *audit.inner.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        let previous = heads.last().map_or("none".to_string(), |h| {
            format!("{}@{}", h.tree_size, h.time)
        });
        audit
            .append_blocking(Entry {
                action: WRITER_STARTED.into(),
                object: format!("audit-log/last-head/{previous}"),
                subject: "controller".into(),
                result: "succeeded".into(),
                ..Entry::default()
            })
            .context("writing the start record")?;
        audit
            .request(|reply| Job::Head("start", reply))
            .context("signing the start head")?;
        Ok(audit)
    }

    /// A log in `dir/audit` with heads in `dir/heads` and a master key in `dir`.
    #[cfg(test)]
    pub(crate) fn open_for_test(dir: &Path) -> AuditLog {
        let paths = AuditPaths {
            dir: dir.join("audit"),
            head_store: dir.join("heads"),
        };
        let master = MasterKey::load_or_create(&dir.join("master.key")).unwrap();
        // Opening waits for the writer; from a thread of its own, so async tests may call it.
        std::thread::spawn(move || AuditLog::open(&paths, &master).unwrap())
            .join()
            .unwrap()
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn heads_path(&self) -> &Path {
        &self.inner.heads_path
    }

    fn send(&self, job: Job) -> Result<(), AppendError> {
        let jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| other("the audit writer has stopped")),
            None => Err(other("the audit writer has stopped")),
        }
    }

    fn request<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(job(reply))?;
        rx.blocking_recv()
            .map_err(|_| other("the audit writer has stopped"))?
    }

    async fn request_async<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(job(reply))?;
        rx.await
            .map_err(|_| other("the audit writer has stopped"))?
    }

    /// Appends one record and makes it durable. Blocking: call from a blocking context.
    pub fn append_blocking(&self, entry: Entry) -> Result<AuditRecord, AppendError> {
        self.request(|reply| Job::Append(Box::new(entry), reply))
    }

    pub async fn append(&self, entry: Entry) -> Result<AuditRecord, AppendError> {
        self.request_async(|reply| Job::Append(Box::new(entry), reply))
            .await
    }

    /// Signs a head over everything durable now.
    pub async fn sign_head(&self) -> Result<TreeHead, AppendError> {
        self.request_async(|reply| Job::Head("request", reply))
            .await
    }

    /// Reduces the records past their retention to stubs (`seq`, leaf hash, purge record), so
    /// the tree and every head still verify. First one purge record per tenant (and one for
    /// the platform's own records) names the set it purges; then the log is rewritten to a copy
    /// and renamed over the original, so a crash leaves either the whole log or the purged one.
    /// The log's records about itself are never purged.
    pub async fn purge(&self, retention: Retention) -> Result<Purged, AppendError> {
        self.request_async(|reply| Job::Purge(retention, reply))
            .await
    }

    /// Replaces the head key: a rotation record, a head the old key signs announcing the new
    /// one, then a head the new key signs.
    pub async fn rotate_key(&self) -> Result<TreeHead, AppendError> {
        self.request_async(Job::Rotate).await
    }

    /// Ends the writer cleanly: a stop record and a last head. Appends after it fail.
    pub fn stop(&self) -> Result<TreeHead, AppendError> {
        let head = self.request(Job::Stop);
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = handle.join();
        }
        head
    }

    pub fn latest_head(&self) -> Option<TreeHead> {
        self.view().latest.clone()
    }

    pub fn size(&self) -> u64 {
        self.view().tree.size() as u64
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.inner.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored line of record `seq` (1-based), without its newline: the record, or the stub
    /// left of it by a purge.
    pub fn record_line(&self, seq: u64) -> anyhow::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let (file, start, end) = {
            let view = self.view();
            let Some(index) = seq.checked_sub(1).map(|i| i as usize) else {
                return Ok(None);
            };
            let Some(start) = view.offsets.get(index).copied() else {
                return Ok(None);
            };
            let end = view.offsets.get(index + 1).copied().unwrap_or(view.len);
            (view.file.clone(), start, end)
        };
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        Ok(Some(buf))
    }

    /// Records in `scope` after `after` that pass `filter`, at most `limit`, and the cursor
    /// to go on from when more may follow.
    pub fn records(
        &self,
        scope: &Scope,
        filter: &Filter,
        after: u64,
        limit: usize,
    ) -> anyhow::Result<(Vec<AuditRecord>, Option<u64>)> {
        use std::os::unix::fs::FileExt;
        let (file, candidates, spans): (Arc<File>, Vec<u64>, Vec<(u64, u64)>) = {
            let view = self.view();
            let size = view.offsets.len() as u64;
            let seqs: Vec<u64> = match scope {
                Scope::All => (after + 1..=size).take(MAX_SCAN).collect(),
                Scope::Tenant(key) | Scope::Subject(key) => {
                    let index = match scope {
                        Scope::Tenant(_) => &view.by_tenant,
                        _ => &view.by_subject,
                    };
                    let seqs = index.get(key).map(Vec::as_slice).unwrap_or(&[]);
                    let from = seqs.partition_point(|s| *s <= after);
                    seqs[from..].iter().copied().take(MAX_SCAN).collect()
                }
            };
            let spans = seqs
                .iter()
                .map(|seq| {
                    let i = (*seq - 1) as usize;
                    let start = view.offsets[i];
                    let end = view.offsets.get(i + 1).copied().unwrap_or(view.len);
                    (start, end)
                })
                .collect();
            (view.file.clone(), seqs, spans)
        };
        let mut found = Vec::new();
        let mut last = after;
        for (seq, (start, end)) in candidates.iter().zip(spans) {
            if found.len() == limit {
                return Ok((found, Some(last)));
            }
            let mut line = vec![0u8; (end - start) as usize];
            file.read_exact_at(&mut line, start)?;
            last = *seq;
            if is_stub(&line) {
                continue; // purged: nothing left to show
            }
            let record: AuditRecord =
                serde_json::from_slice(&line).with_context(|| format!("audit record {seq}"))?;
            if filter.matches(&record) {
                found.push(record);
            }
        }
        let more = candidates.len() == MAX_SCAN;
        Ok((found, more.then_some(last)))
    }

    /// The log's durable records (a record being written is left out).
    pub fn durable_log(&self) -> anyhow::Result<Vec<u8>> {
        let (file, len) = {
            let view = self.view();
            (view.file.clone(), view.len)
        };
        // Positioned reads: readers share the handle, never its file position.
        let mut bytes = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0)?;
        Ok(bytes)
    }

    /// The audit path of record `seq` in the tree of `tree_size` records.
    pub fn inclusion_proof(&self, seq: u64, tree_size: u64) -> Option<InclusionProof> {
        let path = self
            .view()
            .tree
            .inclusion_proof(seq.checked_sub(1)? as usize, tree_size as usize)?;
        Some(InclusionProof {
            seq,
            tree_size,
            path: path.iter().map(hex::encode).collect(),
        })
    }

    pub fn consistency_proof(&self, first: u64, second: u64) -> Option<ConsistencyProof> {
        let path = self
            .view()
            .tree
            .consistency_proof(first as usize, second as usize)?;
        Some(ConsistencyProof {
            first,
            second,
            path: path.iter().map(hex::encode).collect(),
        })
    }
}

/// Whether a stored line is the stub of a purged record.
fn is_stub(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"{\"seq\":") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    rest[digits..].starts_with(b",\"purged_by\":")
}

/// What the record indexes need of a record.
#[derive(serde::Deserialize)]
struct Who {
    tenant_id: Option<String>,
    subject: String,
}

impl Who {
    fn index(
        self,
        seq: u64,
        by_tenant: &mut HashMap<String, Vec<u64>>,
        by_subject: &mut HashMap<String, Vec<u64>>,
    ) {
        if let Some(tenant) = self.tenant_id {
            by_tenant.entry(tenant).or_default().push(seq);
        }
        by_subject.entry(self.subject).or_default().push(seq);
    }
}

/// Which records are past retention: those made before a cut-off time (RFC 3339 UTC with
/// milliseconds, as records carry it). `None` keeps everything (a legal hold).
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// For records of no tenant, and of tenants without a rule of their own.
    pub platform: Option<String>,
    /// Per tenant.
    pub tenants: HashMap<String, Option<String>>,
}

impl Retention {
    fn before(&self, tenant: Option<&str>) -> Option<&str> {
        match tenant.and_then(|t| self.tenants.get(t)) {
            Some(own) => own.as_deref(),
            None => self.platform.as_deref(),
        }
    }
}

/// What one purge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Purged {
    /// Records reduced to stubs.
    pub records: u64,
    /// The purge records written, one per tenant (and one for the platform's records).
    pub purge_records: Vec<u64>,
}

/// What a purge needs of a record to judge its age.
#[derive(serde::Deserialize)]
struct Aging {
    time: String,
    tenant_id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    action: String,
}

/// Whose records a reader may see.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Tenant(String),
    Subject(String),
}

/// What a reader asks for; empty fields match everything. `action` and `object` match exactly,
/// or as a prefix when they end with `*`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    pub action: Option<String>,
    pub object: Option<String>,
    pub result: Option<String>,
    pub tenant: Option<String>,
}

fn text_matches(pattern: &Option<String>, text: &str) -> bool {
    match pattern {
        None => true,
        Some(p) => match p.strip_suffix('*') {
            Some(prefix) => text.starts_with(prefix),
            None => p == text,
        },
    }
}

impl Filter {
    fn matches(&self, record: &AuditRecord) -> bool {
        use time::format_description::well_known::Rfc3339;
        if self.since.is_some() || self.until.is_some() {
            let Ok(at) = time::OffsetDateTime::parse(&record.time, &Rfc3339) else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) {
                return false;
            }
        }
        text_matches(&self.action, &record.action)
            && text_matches(&self.object, &record.object)
            && self.result.as_ref().is_none_or(|r| *r == record.result)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| record.tenant_id.as_deref() == Some(t.as_str()))
    }
}

/// Most records one page looks at: a filter that matches little returns a short page and a
/// cursor instead of scanning the whole log in one request.
const MAX_SCAN: usize = 50_000;

fn read_or_empty(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context(format!("reading {}", path.display())),
    }
}

/// The head key: sealed under the master key in `<dir>/head.key`, made on first start. A log
/// with heads but no key refuses to start: a new key nobody announced would look like forgery.
/// A rotation cut short leaves `head.key.next`: kept if the newest head announced it.
fn load_head_key(
    dir: &Path,
    master: &MasterKey,
    newest: Option<&TreeHead>,
) -> anyhow::Result<SigningKey> {
    let path = dir.join(KEY_FILE);
    let next = dir.join(NEXT_KEY_FILE);
    if next.exists() {
        let key = open_key(&next, master)?;
        let announced = newest.and_then(|h| h.next_key.as_deref())
            == Some(format::public_key_text(&key.verifying_key()).as_str());
        if announced {
            std::fs::rename(&next, &path)?;
        } else {
            std::fs::remove_file(&next)?;
        }
    }
    if path.exists() {
        return open_key(&path, master);
    }
    if newest.is_some() {
        bail!(
            "the audit log has signed heads but its head key {} is missing; restore it",
            path.display()
        );
    }
    let key = SigningKey::from_bytes(&random_bytes());
    save_key(&path, &key, master)?;
    Ok(key)
}

fn open_key(path: &Path, master: &MasterKey) -> anyhow::Result<SigningKey> {
    let sealed = std::fs::read_to_string(path)?;
    let seed = master
        .open(KEY_PURPOSE, sealed.trim())
        .with_context(|| format!("opening the head key {}", path.display()))?;
    let seed: [u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} does not hold a key", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn save_key(path: &Path, key: &SigningKey, master: &MasterKey) -> anyhow::Result<()> {
    let sealed = master.seal(KEY_PURPOSE, key.as_bytes());
    write_new_private_file(path, sealed.as_bytes())?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The host clock's synchronization as the kernel reports it (`adjtimex`, read only). The one
/// `unsafe` of the controller: no safe wrapper of adjtimex exists in the crates we use.
#[allow(unsafe_code)]
pub fn clock_state() -> ClockState {
    // SAFETY: `timex` is plain data; with `modes == 0` adjtimex only reads into it.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    // In nanosecond mode the offset is in ns, otherwise in µs.
    let offset_us = if tx.status & libc::STA_NANO != 0 {
        tx.offset / 1000
    } else {
        tx.offset
    };
    ClockState {
        synchronized: state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        offset_us,
        max_error_us: tx.maxerror,
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn now_millis() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

struct Writer {
    file: File,
    head_files: Vec<(PathBuf, File)>,
    /// Length of the durable log: a failed append is cut back to it, so a torn write never
    /// leaves half a record for the next one to follow.
    len: u64,
    seq: u64,
    key: SigningKey,
    dir: PathBuf,
    master: MasterKey,
    last_head: Instant,
    pending: Vec<(AuditRecord, Reply<AuditRecord>)>,
    pending_lines: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>, view: &RwLock<View>) {
        let interval = Duration::from_secs(HEAD_INTERVAL_SECS);
        loop {
            let wait = interval.saturating_sub(self.last_head.elapsed());
            let first = match rx.recv_timeout(wait) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.head("periodic", None, view) {
                        tracing::error!(error = %e, "signing the periodic audit head");
                        // Try again soon, not in a tight loop.
                        self.last_head = Instant::now() - interval / 2;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut job = Some(first);
            let mut taken = 0;
            while let Some(next) = job.take() {
                taken += 1;
                match next {
                    Job::Append(entry, reply) => self.stage(*entry, reply),
                    other => {
                        self.flush(view);
                        if self.control(other, view) {
                            return;
                        }
                    }
                }
                if taken < MAX_BATCH {
                    job = rx.try_recv().ok();
                }
            }
            self.flush(view);
            if self.last_head.elapsed() >= interval {
                if let Err(e) = self.head("periodic", None, view) {
                    tracing::error!(error = %e, "signing the periodic audit head");
                }
            }
        }
    }

    fn stage(&mut self, entry: Entry, reply: Reply<AuditRecord>) {
        let mut record = AuditRecord {
            seq: self.seq + self.pending.len() as u64 + 1,
            time: now_millis(),
            kind: if entry.kind.is_empty() {
                TYPE_SYSTEM.into()
            } else {
                entry.kind.into()
            },
            request_id: entry.request_id,
            source: entry.source,
            subject: entry.subject,
            role: entry.role,
            key_id: entry.key_id,
            tenant_id: entry.tenant_id,
            provider: entry.provider,
            action: entry.action,
            object: entry.object,
            result: entry.result,
            code: entry.code,
            hash: String::new(),
        };
        let line = record.seal();
        self.pending_lines.extend_from_slice(&line);
        self.pending.push((record, reply));
    }

    /// Writes and syncs the staged records, then answers their callers.
    fn flush(&mut self, view: &RwLock<View>) {
        if self.pending.is_empty() {
            return;
        }
        let written = self
            .file
            .write_all(&self.pending_lines)
            .and_then(|()| self.file.sync_data());
        let pending = std::mem::take(&mut self.pending);
        let lines = std::mem::take(&mut self.pending_lines);
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            let kind = e.kind();
            let text = e.to_string();
            for (_, reply) in pending {
                let _ = reply.send(Err(AppendError(std::io::Error::new(kind, text.clone()))));
            }
            return;
        }
        {
            let mut view = view.write().unwrap_or_else(|p| p.into_inner());
            let mut at = self.len;
            for (line, (record, _)) in lines.split_inclusive(|b| *b == b'\n').zip(&pending) {
                view.offsets.push(at);
                at += line.len() as u64;
                let leaf = hex::decode(&record.hash)
                    .ok()
                    .and_then(|h| h.try_into().ok())
                    .unwrap_or([0; 32]);
                view.tree.push(leaf);
                let who = Who {
                    tenant_id: record.tenant_id.clone(),
                    subject: record.subject.clone(),
                };
                let View {
                    by_tenant,
                    by_subject,
                    ..
                } = &mut *view;
                who.index(record.seq, by_tenant, by_subject);
            }
            view.len = at;
        }
        self.len += lines.len() as u64;
        self.seq += pending.len() as u64;
        for (record, reply) in pending {
            let _ = reply.send(Ok(record));
        }
    }

    /// Runs a control job; true when the writer must end.
    fn control(&mut self, job: Job, view: &RwLock<View>) -> bool {
        match job {
            Job::Append(..) => false,
            Job::Head(reason, reply) => {
                let _ = reply.send(self.head(reason, None, view).map_err(other));
                false
            }
            Job::Rotate(reply) => {
                let _ = reply.send(self.rotate(view).map_err(other));
                false
            }
            Job::Purge(retention, reply) => {
                let _ = reply.send(
                    self.purge(&retention, view)
                        .map_err(|e| other(format!("{e:#}"))),
                );
                false
            }
            Job::Stop(reply) => {
                let (tx, _) = tokio::sync::oneshot::channel();
                self.stage(
                    Entry {
                        action: WRITER_STOPPED.into(),
                        object: "audit-log".into(),
                        subject: "controller".into(),
                        result: "succeeded".into(),
                        ..Entry::default()
                    },
                    tx,
                );
                self.flush(view);
                let _ = reply.send(self.head("stop", None, view).map_err(other));
                true
            }
        }
    }

    /// The lines of the durable log, in order, with their `seq`.
    fn each_line(
        &self,
        path: &Path,
        mut visit: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        use std::io::{BufRead, Read};
        let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file.take(self.len));
        let mut line = Vec::new();
        let mut seq = 0;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            seq += 1;
            visit(seq, &line)?;
        }
    }

    fn purge(&mut self, retention: &Retention, view: &RwLock<View>) -> anyhow::Result<Purged> {
        self.flush(view);
        let path = self.dir.join(LOG_FILE);
        // Which records are due, by tenant (`None`: the platform's own).
        let mut due: BTreeMap<Option<String>, (String, Vec<u64>)> = BTreeMap::new();
        self.each_line(&path, |seq, line| {
            if is_stub(line) {
                return Ok(());
            }
            let record: Aging =
                serde_json::from_slice(line).with_context(|| format!("audit record {seq}"))?;
            let about_the_log = record.kind == TYPE_SYSTEM && record.action.starts_with("audit.");
            let Some(before) = retention.before(record.tenant_id.as_deref()) else {
                return Ok(());
            };
            if !about_the_log && record.time.as_str() < before {
                due.entry(record.tenant_id)
                    .or_insert_with(|| (before.to_string(), Vec::new()))
                    .1
                    .push(seq);
            }
            Ok(())
        })?;
        if due.is_empty() {
            return Ok(Purged::default());
        }
        // The purge records first, durable before any record is touched.
        let mut replies = Vec::new();
        for (tenant, (before, seqs)) in &due {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.stage(
                Entry {
                    action: RECORDS_PURGED.into(),
                    object: format::purge_object(before, seqs),
                    subject: "controller".into(),
                    tenant_id: tenant.clone(),
                    result: "succeeded".into(),
                    ..Entry::default()
                },
                tx,
            );
            replies.push(rx);
        }
        self.flush(view);
        // (record, its purge record), sorted: 16 bytes a purged record, looked up in order.
        let mut purged_by: Vec<(u64, u64)> = Vec::new();
        let mut done = Purged::default();
        for (rx, (_, seqs)) in replies.into_iter().zip(due.values()) {
            let record = rx
                .blocking_recv()
                .map_err(|_| anyhow::anyhow!("purge record lost"))?
                .context("writing a purge record")?;
            done.purge_records.push(record.seq);
            done.records += seqs.len() as u64;
            purged_by.extend(seqs.iter().map(|seq| (*seq, record.seq)));
        }
        purged_by.sort_unstable();
        // A signed head over the purge records before any record is reduced: stubs under no
        // head are forgeries, and verifiers say so.
        self.head("purge", None, view)?;
        // Then the reduced copy, renamed over the log.
        let copy = self.dir.join(PURGING_FILE);
        let written = self.write_purged(&path, &copy, &purged_by, view);
        let (offsets, len) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&copy);
                return Err(e.context("writing the purged copy of the log (the log is whole)"));
            }
        };
        std::fs::rename(&copy, &path)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        {
            let mut view = view.write().unwrap_or_else(|p| p.into_inner());
            view.file = Arc::new(File::open(&path)?);
            view.offsets = offsets;
            view.len = len;
            let view = &mut *view;
            for index in [&mut view.by_tenant, &mut view.by_subject] {
                index.retain(|_, seqs| {
                    seqs.retain(|seq| purged_by.binary_search_by_key(seq, |p| p.0).is_err());
                    !seqs.is_empty()
                });
            }
        }
        self.len = len;
        Ok(done)
    }

    /// Writes the log to `copy` with the records in `purged_by` reduced to stubs, synced;
    /// gives the new line offsets and length.
    fn write_purged(
        &self,
        path: &Path,
        copy: &Path,
        purged_by: &[(u64, u64)],
        view: &RwLock<View>,
    ) -> anyhow::Result<(Vec<u64>, u64)> {
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(copy)
            .with_context(|| format!("creating {}", copy.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        let mut offsets = Vec::with_capacity(self.seq as usize);
        let mut at = 0u64;
        let tree = view.read().unwrap_or_else(|p| p.into_inner());
        let mut due = purged_by.iter().peekable();
        self.each_line(path, |seq, line| {
            offsets.push(at);
            let stub;
            let line = match due.next_if(|(purged, _)| *purged == seq).map(|(_, by)| by) {
                Some(by) => {
                    let leaf = tree.tree.leaf(seq as usize - 1).context("leaf missing")?;
                    stub = PurgedRecord {
                        seq,
                        purged_by: *by,
                        hash: hex::encode(leaf),
                    }
                    .line();
                    &stub[..]
                }
                None => line,
            };
            out.write_all(line)?;
            at += line.len() as u64;
            Ok(())
        })?;
        drop(tree);
        let out = out.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        Ok((offsets, at))
    }

    fn rotate(&mut self, view: &RwLock<View>) -> anyhow::Result<TreeHead> {
        let new = SigningKey::from_bytes(&random_bytes());
        let new_text = format::public_key_text(&new.verifying_key());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.stage(
            Entry {
                action: HEAD_KEY_ROTATED.into(),
                object: format!("head-key/{new_text}"),
                subject: "controller".into(),
                result: "succeeded".into(),
                ..Entry::default()
            },
            tx,
        );
        self.flush(view);
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("rotation record lost"))?
            .context("writing the rotation record")?;
        let next_path = self.dir.join(NEXT_KEY_FILE);
        let _ = std::fs::remove_file(&next_path);
        save_key(&next_path, &new, &self.master)?;
        self.head("rotation", Some(new_text), view)?;
        std::fs::rename(&next_path, self.dir.join(KEY_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.key = new;
        self.head("rotation", None, view)
    }

    /// Signs a head over the durable log and writes it to both stores.
    fn head(
        &mut self,
        reason: &str,
        next_key: Option<String>,
        view: &RwLock<View>,
    ) -> anyhow::Result<TreeHead> {
        self.last_head = Instant::now();
        let root = {
            let view = view.read().unwrap_or_else(|p| p.into_inner());
            view.tree
                .root_at(self.seq as usize)
                .context("tree shorter than the log")?
        };
        let mut head = TreeHead {
            tree_size: self.seq,
            root_hash: hex::encode(root),
            time: now_millis(),
            clock: clock_state(),
            reason: reason.into(),
            key: String::new(),
            next_key,
            signature: String::new(),
        };
        head.sign(&self.key);
        let mut line = serde_json::to_vec(&head)?;
        line.push(b'\n');
        let mut failures = Vec::new();
        for (path, file) in &mut self.head_files {
            if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
                failures.push(format!("{}: {e}", path.display()));
            }
        }
        if !failures.is_empty() {
            bail!("writing a signed head failed: {}", failures.join("; "));
        }
        view.write().unwrap_or_else(|p| p.into_inner()).latest = Some(head.clone());
        Ok(head)
    }
}

/// A crash in the middle of an append leaves a last line without its newline. That record
/// was never made durable, so its request failed and its action never ran: it is cut off (and
/// the cut is logged). Only an unterminated tail is cut, and only when all before it is sound.
fn cut_torn_tail(
    path: &Path,
    log: Vec<u8>,
    sound: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    if log.is_empty() || log.ends_with(b"\n") {
        return Ok(log);
    }
    let keep = log.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if !sound(&log[..keep]) {
        return Ok(log); // not a torn append: let verification report it
    }
    tracing::warn!(path = %path.display(), bytes = log.len() - keep,
        "cutting a torn, never-acknowledged line off the end");
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

    fn paths(dir: &Path) -> AuditPaths {
        AuditPaths {
            dir: dir.join("audit"),
            head_store: dir.join("heads"),
        }
    }

    fn master(dir: &Path) -> MasterKey {
        MasterKey::load_or_create(&dir.join("master.key")).unwrap()
    }

    fn verify_all(dir: &Path) -> format::Report {
        let log = std::fs::read(dir.join("audit").join(LOG_FILE)).unwrap();
        let a = std::fs::read(dir.join("audit").join(HEADS_FILE)).unwrap();
        let b = std::fs::read(dir.join("heads").join(HEADS_FILE)).unwrap();
        let heads = format::read_heads(&[("a", &a), ("b", &b)]).unwrap();
        format::verify(&log, &heads, None)
    }

    #[test]
    fn appends_verify_and_survive_a_clean_and_an_unclean_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        for i in 0..3 {
            log.append_blocking(Entry {
                action: format!("test.{i}"),
                ..Entry::default()
            })
            .unwrap();
        }
        log.stop().unwrap();
        assert!(log.append_blocking(Entry::default()).is_err());
        // Reopened after a clean stop, then dropped without one (as a crash would).
        let log = AuditLog::open(&paths, &master).unwrap();
        let record = log.append_blocking(Entry::default()).unwrap();
        assert_eq!(record.seq, 7, "start, 3, stop, start, this one");
        drop(log);
        let log = AuditLog::open(&paths, &master).unwrap();
        log.stop().unwrap();
        let report = verify_all(dir.path());
        assert_eq!(report.fault, None, "{report:?}");
        let events = report.events.join("\n");
        assert!(events.contains("after a clean stop"), "{events}");
        assert!(events.contains("after an unclean stop"), "{events}");
    }

    #[test]
    fn a_torn_last_append_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        log.stop().unwrap();
        let path = paths.dir.join(LOG_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":3,"time":"20"#).unwrap();
        drop(file);
        let log = AuditLog::open(&paths, &master).unwrap();
        assert_eq!(log.append_blocking(Entry::default()).unwrap().seq, 4);
        log.stop().unwrap();
        assert_eq!(verify_all(dir.path()).fault, None);
    }

    #[test]
    fn refuses_to_start_on_a_tampered_or_cut_log_or_without_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        log.append_blocking(Entry::default()).unwrap();
        log.stop().unwrap();
        let path = paths.dir.join(LOG_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[10] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(AuditLog::open(&paths, &master).is_err());
        // The last record cut off (both the log and the heads beside it): the head store
        // still remembers.
        let cut = good.len()
            - 1
            - good[..good.len() - 1]
                .iter()
                .rev()
                .position(|b| *b == b'\n')
                .unwrap();
        std::fs::write(&path, &good[..cut]).unwrap();
        std::fs::write(paths.dir.join(HEADS_FILE), b"").unwrap();
        let e = AuditLog::open(&paths, &master).err().unwrap().to_string();
        assert!(e.contains("cut off"), "{e}");
        std::fs::write(&path, &good).unwrap();
        std::fs::rename(paths.dir.join(KEY_FILE), dir.path().join("elsewhere")).unwrap();
        assert!(AuditLog::open(&paths, &master).is_err());
    }

    #[test]
    fn a_rotated_key_is_announced_and_the_log_verifies_across_it() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let before = log.latest_head().unwrap().key;
        let after = rt.block_on(log.rotate_key()).unwrap();
        assert_ne!(before, after.key);
        log.stop().unwrap();
        let log = AuditLog::open(&paths, &master).unwrap();
        assert_eq!(log.latest_head().unwrap().key, after.key);
        log.stop().unwrap();
        let report = verify_all(dir.path());
        assert_eq!(report.fault, None, "{report:?}");
        assert_eq!(report.keys, vec![before, after.key]);
    }

    #[test]
    fn proofs_from_the_writer_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        for _ in 0..10 {
            log.append_blocking(Entry::default()).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let head = rt.block_on(log.sign_head()).unwrap();
        let line = log.record_line(5).unwrap().unwrap();
        let proof = log.inclusion_proof(5, head.tree_size).unwrap();
        assert_eq!(
            format::verify_inclusion(&line, &proof, &head, &head.key),
            Ok(())
        );
        assert!(log.record_line(99).unwrap().is_none());
        log.stop().unwrap();
    }

    #[test]
    fn a_purge_keeps_the_tree_markers_and_held_tenants_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, master) = (paths(dir.path()), master(dir.path()));
        let log = AuditLog::open(&paths, &master).unwrap();
        for tenant in ["a", "b", "a", "c"] {
            log.append_blocking(Entry {
                kind: format::TYPE_MUTATION,
                action: "instance.create".into(),
                subject: format!("user:{tenant}"),
                tenant_id: Some(tenant.into()),
                ..Entry::default()
            })
            .unwrap();
        }
        let platform = log.append_blocking(Entry::default()).unwrap();
        std::thread::sleep(Duration::from_millis(5)); // past the last record's millisecond
        let retention = Retention {
            platform: Some(now_millis()),
            // a: the platform's; b: held; c: kept longer (a cut-off before everything).
            tenants: HashMap::from([
                ("b".to_string(), None),
                (
                    "c".to_string(),
                    Some("2000-01-01T00:00:00.000Z".to_string()),
                ),
            ]),
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let done = rt.block_on(log.purge(retention.clone())).unwrap();
        assert_eq!(done.records, 3, "a's two and the platform's one");
        assert_eq!(
            done.purge_records.len(),
            2,
            "one for a, one for the platform"
        );
        // Nothing left of them to read; b, c and the start marker stay whole.
        let (all, _) = log
            .records(&Scope::All, &Filter::default(), 0, 100)
            .unwrap();
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        assert!(!seqs.contains(&2) && !seqs.contains(&4) && !seqs.contains(&platform.seq));
        assert!(
            seqs.contains(&1) && seqs.contains(&3) && seqs.contains(&5),
            "{seqs:?}"
        );
        let (a, _) = log
            .records(&Scope::Tenant("a".into()), &Filter::default(), 0, 100)
            .unwrap();
        assert_eq!(a.len(), 1, "only a's purge record: {a:?}");
        assert_eq!(a[0].action, RECORDS_PURGED);
        assert!(is_stub(&log.record_line(2).unwrap().unwrap()));
        // A second purge finds nothing new; appends go on after the rewrite.
        assert_eq!(rt.block_on(log.purge(retention)).unwrap().records, 0);
        log.append_blocking(Entry::default()).unwrap();
        log.stop().unwrap();
        let report = verify_all(dir.path());
        assert_eq!(report.fault, None, "{report:?}");
        assert_eq!(report.purged, 3);
        // A restart verifies the purged log, indexes it, and goes on; the half copy of a
        // purge that died before its rename is dropped (the log it would replace is whole).
        std::fs::write(paths.dir.join(PURGING_FILE), b"half").unwrap();
        let log = AuditLog::open(&paths, &master).unwrap();
        assert!(!paths.dir.join(PURGING_FILE).exists());
        let (b, _) = log
            .records(&Scope::Subject("user:b".into()), &Filter::default(), 0, 10)
            .unwrap();
        assert_eq!(b.len(), 1);
        log.stop().unwrap();
        assert_eq!(verify_all(dir.path()).fault, None);
    }
}
