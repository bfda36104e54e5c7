//! Audit log throughput: durable appends per second through the real writer (every record
//! `fdatasync`ed before its caller hears back, many callers sharing one sync: group commit),
//! and offline verification speed next to `sha256sum` over the same bytes; then how fast a
//! retention purge reduces the whole log to stubs (appends wait meanwhile).
//!
//! `cargo bench -p palisade --bench audit [-- <records>]`. Writes into a directory under the
//! current one (not /tmp, which may be a tmpfs where a sync costs nothing) and prints the
//! file system it measured. Goals (issue #4): at least 20 000 appends/s on 2 cores; verification
//! at least half as fast as `sha256sum`. Prints numbers; asserts nothing about speed.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use palisade_common::audit;
use palisade_controller::service::audit::{now_millis, AuditLog, AuditPaths, Entry, Retention};
use palisade_controller::service::secrets::MasterKey;

/// Callers appending at once, as concurrent API requests would.
const CALLERS: usize = 256;

fn entry(i: usize) -> Entry {
    Entry {
        kind: audit::TYPE_READ,
        request_id: format!("7d1e5c9a-0000-4000-8000-{i:012}"),
        source: "192.0.2.10:51234".into(),
        subject: "user:0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
        role: Some("member".into()),
        key_id: Some("key-0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into()),
        tenant_id: Some("3c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f".into()),
        provider: false,
        action: "instance.list".into(),
        object: "tenant/3c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f".into(),
        result: "allowed".into(),
        code: None,
    }
}

fn fs_type(dir: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let records: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::Builder::new()
        .prefix("audit-bench-")
        .tempdir_in(".")
        .unwrap();
    let paths = AuditPaths {
        dir: dir.path().join("audit"),
        head_store: dir.path().join("heads"),
    };
    let master = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();
    let log = AuditLog::open(&paths, &master).unwrap();
    println!(
        "audit bench: {records} records, {CALLERS} concurrent callers, on {} ({})",
        dir.path().display(),
        fs_type(dir.path())
    );

    // One caller at a time: one sync per record, the floor group commit lifts.
    let single = 500.min(records);
    let started = Instant::now();
    for i in 0..single {
        log.append_blocking(entry(i)).unwrap();
    }
    let single_rate = single as f64 / started.elapsed().as_secs_f64();
    println!("  one caller:          {single_rate:>10.0} durable appends/s (a sync each)");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        let per_caller = records / CALLERS;
        let mut tasks = Vec::new();
        for c in 0..CALLERS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_caller {
                    log.append(entry(c * per_caller + i)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let appended = records / CALLERS * CALLERS;
    let rate = appended as f64 / elapsed;
    println!(
        "  {CALLERS} callers:         {rate:>10.0} durable appends/s (group commit; goal 20000) \
         = {:.1}x one caller",
        rate / single_rate
    );
    log.stop().unwrap();

    // Verification of the whole export against its heads, next to sha256sum of the log.
    let log_path = paths.dir.join("audit.log");
    let bytes = std::fs::read(&log_path).unwrap();
    let heads_bytes = std::fs::read(paths.head_store.join("heads.jsonl")).unwrap();
    let started = Instant::now();
    let heads = audit::read_heads(&[("store", &heads_bytes)]).unwrap();
    let report = audit::verify(&bytes, &heads, None);
    let verify_secs = started.elapsed().as_secs_f64();
    assert_eq!(report.fault, None, "the benchmark's own log must verify");
    let started = Instant::now();
    let status = Command::new("sha256sum")
        .arg(&log_path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let sha_secs = started.elapsed().as_secs_f64();
    let mib = bytes.len() as f64 / (1024.0 * 1024.0);
    println!(
        "  verify:              {:>10.0} MiB/s ({} records, {} heads)",
        mib / verify_secs,
        report.records,
        report.heads
    );
    println!("  sha256sum:           {:>10.0} MiB/s", mib / sha_secs);
    println!(
        "  verify / sha256sum:  {:>10.2} (goal at least 0.5)",
        sha_secs / verify_secs
    );

    // A purge of everything but the log's own markers: one pass, a copy, a rename.
    let log = AuditLog::open(&paths, &master).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let retention = Retention {
        platform: Some(now_millis()),
        ..Retention::default()
    };
    let started = Instant::now();
    let purged = runtime.block_on(log.purge(retention)).unwrap();
    let purge_secs = started.elapsed().as_secs_f64();
    log.stop().unwrap();
    println!(
        "  purge:               {:>10.0} records/s ({} records in {purge_secs:.2} s; appends \
         wait meanwhile)",
        purged.records as f64 / purge_secs,
        purged.records
    );
    let bytes = std::fs::read(&log_path).unwrap();
    let heads_bytes = std::fs::read(paths.head_store.join("heads.jsonl")).unwrap();
    let heads = audit::read_heads(&[("store", &heads_bytes)]).unwrap();
    let report = audit::verify(&bytes, &heads, None);
    assert_eq!(report.fault, None, "the purged log must verify");
    assert_eq!(report.purged, purged.records);
}
