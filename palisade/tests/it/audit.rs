//! The audit log: one record per request, written before the action (failing closed), and a
//! hash chain that names the first record a flipped byte touched.

use palisade_common::api;

use crate::support::*;

fn record_count(p: &Platform) -> usize {
    std::fs::read_to_string(p.audit_log())
        .unwrap()
        .lines()
        .count()
}

#[test]
fn every_request_leaves_exactly_one_record_with_who_what_when_where() {
    let p = Platform::start();
    let admin = p.admin();
    let (tenant, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let before = record_count(&p);
    let calls: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        ("GET", "/v1/instances", vec![], true),             // allowed
        ("GET", "/v1/instances", vec![], false),            // unsigned: denied
        ("POST", "/v1/instances", b"{oops".to_vec(), true), // malformed
        (
            "GET",
            "/v1/instances/7d1e5c9a-0000-4000-8000-000000000000",
            vec![],
            true,
        ), // not found
        ("GET", "/v1/tenants", vec![], true),               // forbidden for a tenant user
        ("DELETE", "/v1/images", vec![], true),             // no such method
    ];
    for (method, path, body, signed) in &calls {
        let headers = if *signed {
            sign(&alice, method, path, body, 0)
        } else {
            vec![]
        };
        raw.send(&p, method, path, body, &headers);
    }
    assert_eq!(
        record_count(&p),
        before + calls.len(),
        "one record per request"
    );

    let text = std::fs::read_to_string(p.audit_log()).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine = &records[before..];
    let results: Vec<&str> = mine.iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(
        results,
        ["allowed", "denied", "rejected", "denied", "denied", "rejected"]
    );
    for r in mine {
        for field in [
            "time",
            "request_id",
            "source",
            "subject",
            "action",
            "object",
            "result",
        ] {
            assert!(
                r[field].as_str().is_some_and(|v| !v.is_empty()),
                "{field} missing in {r}"
            );
        }
        assert!(
            r["time"].as_str().unwrap().ends_with('Z'),
            "time must be UTC: {r}"
        );
        assert!(r["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    assert_eq!(mine[0]["tenant_id"], tenant.id.as_str());
    assert_eq!(mine[0]["action"], "instance.list");
    assert_eq!(mine[1]["subject"], "anonymous");
    assert_eq!(mine[1]["code"], "signature_missing");
    assert_eq!(mine[4]["code"], "forbidden");
}

#[test]
fn refusals_are_recorded_as_refusals_with_bounded_text_and_the_claimed_key() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let last = || -> serde_json::Value {
        let text = std::fs::read_to_string(p.audit_log()).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };

    // A create that fails its checks is never recorded as allowed.
    let body = br#"{"name":"bad name!","image":"debian-12-busybox","flavor":"tiny"}"#;
    assert_eq!(
        raw.signed(&p, &alice, "POST", "/v1/instances", body).status,
        400
    );
    let record = last();
    assert_eq!(
        (record["action"].as_str(), record["result"].as_str()),
        (Some("instance.create"), Some("rejected")),
        "{record}"
    );

    // Anonymous callers cannot inflate the log: text from requests is capped.
    let fat = serde_json::json!({
        "user": "A".repeat(60_000), "current_password": "x", "new_password": "y",
    });
    let fat = serde_json::to_vec(&fat).unwrap();
    let before = std::fs::metadata(p.audit_log()).unwrap().len();
    assert_eq!(
        raw.send(&p, "POST", "/v1/auth/password", &fat, &[]).status,
        401
    );
    let grown = std::fs::metadata(p.audit_log()).unwrap().len() - before;
    assert!(
        grown < 2048,
        "one refused request grew the log by {grown} bytes"
    );

    // A replayed request is recorded against the key it claimed.
    let headers = sign(&alice, "GET", "/v1/whoami", b"", 0);
    raw.send(&p, "GET", "/v1/whoami", b"", &headers);
    assert_eq!(
        raw.send(&p, "GET", "/v1/whoami", b"", &headers).code(),
        "replayed"
    );
    let record = last();
    assert_eq!(
        record["key_id"].as_str(),
        Some(alice.key_id.as_str()),
        "{record}"
    );
    assert_eq!(record["subject"], "anonymous");
}

#[test]
fn a_flipped_byte_anywhere_is_detected_and_its_record_named() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    for _ in 0..5 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    }
    p.kill_controller(); // a quiet log to work on
    let good = std::fs::read(p.audit_log()).unwrap();
    let path = p.audit_log().display().to_string();
    let out = p.cli(&["audit", "verify", "--file", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let copy = p.data().join("tampered.log");
    let positions: Vec<usize> = (0..40).map(|i| i * (good.len() - 1) / 39).collect();
    for pos in positions {
        for bit in [0x01u8, 0x20, 0x80] {
            let mut bad = good.clone();
            bad[pos] ^= bit;
            std::fs::write(&copy, &bad).unwrap();
            let out = p.cli(&["audit", "verify", "--file", &copy.display().to_string()]);
            assert!(
                !out.status.success(),
                "flip of bit {bit:#x} at byte {pos} went unnoticed"
            );
            let line = good[..pos].iter().filter(|b| **b == b'\n').count() + 1;
            let stderr = String::from_utf8_lossy(&out.stderr);
            // A flipped newline joins two records: the first of them is named.
            assert!(
                stderr.contains(&format!("record {line}:")),
                "byte {pos} (record {line}): {stderr}"
            );
        }
    }
    // The controller refuses to start on a tampered log.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    std::fs::write(p.audit_log(), &bad).unwrap();
    let out = p.run_second_controller();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fails verification"));
}

#[test]
fn when_the_audit_log_cannot_be_written_the_request_fails_and_nothing_happens() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    // Fill the filesystem under the audit log: appends fail with ENOSPC, for real.
    let full = p.data().join("full");
    std::fs::create_dir_all(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&full)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(full.clone());
    let log = std::fs::read(p.audit_log()).unwrap();
    assert!(log.len() < 60_000);
    std::fs::write(full.join("audit.log"), &log).unwrap();
    let _ = std::fs::write(full.join("filler"), vec![0u8; 64 * 1024]);
    // Swap the live log onto the full filesystem under the running controller.
    p.kill_controller();
    std::fs::remove_file(p.audit_log()).unwrap();
    std::os::unix::fs::symlink(full.join("audit.log"), p.audit_log()).unwrap();
    p.start_controller();

    // The last page of the log may still have room for a few records: use it up.
    let mut appended = 0;
    while p
        .block_on(alice.client.get::<Vec<api::Instance>>("/v1/instances"))
        .is_ok()
    {
        appended += 1;
        assert!(
            appended < 200,
            "the full filesystem never refused an append"
        );
    }
    let err = p.create_instance(&alice, "never").unwrap_err();
    assert_eq!((err.status, err.code.as_str()), (503, "audit_unavailable"));
    // Make room again: the refused create left no instance behind.
    std::fs::remove_file(full.join("filler")).unwrap();
    let list: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    assert!(list.is_empty(), "{list:?}");
    // Torn appends were cut back: the log still verifies.
    p.cli_ok(&[
        "audit",
        "verify",
        "--file",
        &full.join("audit.log").display().to_string(),
    ]);
}
