//! The audit log: one record per request, written before the action (failing closed), and a
//! hash chain that names the first record a flipped byte touched.

use std::time::Duration;

use palisade_common::{api, audit};

use crate::support::*;

/// Records of requests (host events, which the reconciler writes on its own, left out).
fn request_lines(p: &Platform) -> Vec<String> {
    std::fs::read_to_string(p.audit_log())
        .unwrap()
        .lines()
        .filter(|l| !l.contains(r#""type":"host""#))
        .map(str::to_string)
        .collect()
}

fn record_count(p: &Platform) -> usize {
    request_lines(p).len()
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

    let records: Vec<serde_json::Value> = request_lines(&p)
        .iter()
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
        serde_json::from_str(request_lines(&p).last().unwrap()).unwrap()
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

/// C1: a thousand random single-bit flips in a log the real server wrote, each caught by the
/// real CLI, which names the record the flip is in.
#[test]
fn every_one_of_a_thousand_bit_flips_is_detected_and_its_record_named() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    for _ in 0..5 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    }
    p.stop_controller(); // a quiet log to work on
    let good = std::fs::read(p.audit_log()).unwrap();
    let out = p.verify_audit(&p.audit_log());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let copy = p.data().join("tampered.log");
    let mut state = u64::from_le_bytes(rand_bytes()[..8].try_into().unwrap()) | 1;
    let mut next = || {
        // xorshift64*: reproducible from the printed seed if a case fails.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..1000 {
        let r = next();
        let pos = (r % good.len() as u64) as usize;
        let bit = 1u8 << ((r >> 32) % 8);
        let mut bad = good.clone();
        bad[pos] ^= bit;
        std::fs::write(&copy, &bad).unwrap();
        let out = p.verify_audit(&copy);
        assert!(
            !out.status.success(),
            "flip of bit {bit:#x} at byte {pos} went unnoticed"
        );
        let line = good[..pos].iter().filter(|b| **b == b'\n').count() + 1;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A flipped newline joins two records: the first of them is named.
        assert!(
            stderr.contains(&format!("record {line}:")),
            "bit {bit:#x} of byte {pos} (record {line}): {stderr}"
        );
    }
    // The controller refuses to start on a tampered log.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    std::fs::write(p.audit_log(), &bad).unwrap();
    let out = p.run_second_controller();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fails verification"));
}

fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split_inclusive(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn refused(p: &Platform, log: &[u8], why: &str) -> String {
    let copy = p.data().join("edited.log");
    std::fs::write(&copy, log).unwrap();
    let out = p.verify_audit(&copy);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{why} went unnoticed");
    assert!(
        stderr.contains("audit log broken at record"),
        "{why}: {stderr}"
    );
    stderr
}

/// C2 and C3: a deleted, swapped, duplicated or re-hashed record, a head re-signed with
/// another key, and a cut tail (the log and the heads beside it both cut) are all caught,
/// the last thanks to the heads in the separate store.
#[test]
fn deleted_swapped_duplicated_rehashed_and_cut_records_are_detected() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    for _ in 0..4 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    }
    p.stop_controller();
    let good = std::fs::read(p.audit_log()).unwrap();
    let all = lines(&good);
    let n = all.len();
    assert!(n > 8, "{n} records");

    let mut deleted = all.clone();
    deleted.remove(n / 2);
    refused(&p, &deleted.concat(), "a deleted record");
    let mut swapped = all.clone();
    swapped.swap(3, 4);
    refused(&p, &swapped.concat(), "two swapped records");
    let mut duplicated = all.clone();
    duplicated.insert(5, all[4].clone());
    refused(&p, &duplicated.concat(), "a duplicated record");

    // A record changed and given its recomputed hash: every line checks out on its own; the
    // signed heads do not.
    let target = n - 3;
    let mut record: palisade_common::audit::AuditRecord =
        serde_json::from_slice(&all[target]).unwrap();
    assert_eq!(record.result, "allowed");
    record.result = "denied".into();
    let mut rehashed = all.clone();
    rehashed[target] = record.seal();
    let stderr = refused(&p, &rehashed.concat(), "a re-hashed record");
    assert!(stderr.contains("do not match the head"), "{stderr}");

    // The heads re-signed by another key: not the published key.
    let forger = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let [beside, store] = p.audit_heads();
    let resigned: Vec<String> = std::fs::read_to_string(&beside)
        .unwrap()
        .lines()
        .map(|l| {
            let mut head: palisade_common::audit::TreeHead = serde_json::from_str(l).unwrap();
            head.sign(&forger);
            serde_json::to_string(&head).unwrap()
        })
        .collect();
    let forged_heads = p.data().join("forged-heads.jsonl");
    std::fs::write(&forged_heads, resigned.join("\n") + "\n").unwrap();
    let key = p.audit_head_key();
    let out = p.cli(&[
        "audit",
        "verify",
        "--log",
        &p.audit_log().display().to_string(),
        "--heads",
        &forged_heads.display().to_string(),
        "--key",
        &key,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("untrusted key"));

    // The tail cut off the log and off the heads beside it (everything the data directory
    // holds): the head store still has the later heads.
    let cut: Vec<u8> = all[..n - 3].concat();
    let heads_text = std::fs::read_to_string(&beside).unwrap();
    let kept_heads: Vec<&str> = heads_text
        .lines()
        .filter(|l| {
            let head: serde_json::Value = serde_json::from_str(l).unwrap();
            head["tree_size"].as_u64().unwrap() <= (n - 3) as u64
        })
        .collect();
    std::fs::write(p.audit_log(), &cut).unwrap();
    std::fs::write(&beside, kept_heads.join("\n") + "\n").unwrap();
    let only_beside = p.cli(&[
        "audit",
        "verify",
        "--log",
        &p.audit_log().display().to_string(),
        "--heads",
        &beside.display().to_string(),
        "--key",
        &key,
    ]);
    assert!(
        only_beside.status.success(),
        "the cut is consistent with what the data dir holds"
    );
    let stderr = refused(&p, &cut, "a cut tail");
    assert!(stderr.contains("were cut off"), "{stderr}");
    // Said to be an older copy, the same bytes verify, and the later heads are named.
    let [_, store_path] = p.audit_heads();
    let copy = p.cli(&[
        "audit",
        "verify",
        "--log",
        &p.audit_log().display().to_string(),
        "--heads",
        &store_path.display().to_string(),
        "--key",
        &key,
        "--copy",
    ]);
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    assert!(String::from_utf8_lossy(&copy.stdout).contains("later heads"));
    // A key that signed nothing here, or that is no key at all, is said to be the problem.
    let other = audit::public_key_text(&forger.verifying_key());
    for wrong in [other.as_str(), "garbage"] {
        let out = p.cli(&[
            "audit",
            "verify",
            "--log",
            &p.audit_log().display().to_string(),
            "--heads",
            &store_path.display().to_string(),
            "--key",
            wrong,
        ]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("key"),
            "{wrong}"
        );
    }
    assert!(store.exists());
    let out = p.run_second_controller();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cut off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// C7: a clean stop, a crash and a head-key rotation each leave a marker the verifier
/// reports, and the log verifies across all of them with the first published key.
#[test]
fn stops_crashes_and_key_rotations_leave_verifiable_markers() {
    let mut p = Platform::start();
    let admin = p.admin();
    let key = p.audit_head_key();
    p.stop_controller();
    p.start_controller();
    p.kill_controller();
    p.start_controller();
    let security = p.platform_account(&admin, "sam", "security_admin");
    let rotated: palisade_common::audit::TreeHead = p
        .block_on(security.client.post("/v1/audit/head-key/rotate", &()))
        .unwrap();
    assert_ne!(rotated.key, key);
    // Only a security administrator rotates.
    let (_, alice) = p.tenant(&admin, "acme", None);
    let err = p
        .block_on(
            alice
                .client
                .post::<_, serde_json::Value>("/v1/audit/head-key/rotate", &()),
        )
        .unwrap_err();
    assert_eq!(api_error(err).status, 403);
    p.stop_controller();

    let out = p.verify_audit(&p.audit_log());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for marker in [
        "log started",
        "writer restarted after a clean stop",
        "writer restarted after an unclean stop",
        "head key rotated",
        "writer stopped",
    ] {
        assert!(stdout.contains(marker), "no {marker:?} in:\n{stdout}");
    }
    assert!(stdout.contains(&rotated.key), "{stdout}");
}

/// Heads come by themselves at least every 10 s, carry the clock's state, and prove records:
/// a tenant proves its own records and cannot reach another tenant's.
#[test]
fn heads_come_every_ten_seconds_and_prove_a_tenants_own_records_only() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let (_, bob) = p.tenant(&admin, "bravo", None);
    let count = || {
        std::fs::read_to_string(&p.audit_heads()[1])
            .unwrap()
            .lines()
            .count()
    };
    let before = count();
    poll(Duration::from_secs(25), "a periodic head", || {
        (count() > before).then_some(())
    });
    let text = std::fs::read_to_string(&p.audit_heads()[1]).unwrap();
    let newest: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(newest["reason"], "periodic", "{newest}");
    assert!(newest["clock"]["synchronized"].is_boolean(), "{newest}");

    let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    let records = std::fs::read_to_string(p.audit_log()).unwrap();
    let seq = records
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["action"] == "instance.list")
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let head: audit::TreeHead = p
        .block_on(alice.client.post("/v1/audit/heads", &()))
        .unwrap();
    assert_eq!(head.reason, "request");
    let path = format!(
        "/v1/audit/proof/inclusion?seq={seq}&tree_size={}",
        head.tree_size
    );
    let proof: api::AuditInclusion = p.block_on(alice.client.get(&path)).unwrap();
    let key = p.audit_head_key();
    assert_eq!(
        audit::verify_inclusion(proof.record.as_bytes(), &proof.proof, &head, &key),
        Ok(())
    );
    // Another tenant's record is as missing as one past the end.
    let err = p
        .block_on(bob.client.get::<api::AuditInclusion>(&path))
        .unwrap_err();
    assert_eq!(api_error(err).status, 404);
    let past = format!(
        "/v1/audit/proof/inclusion?seq={}&tree_size=1",
        head.tree_size + 100
    );
    let err = p
        .block_on(alice.client.get::<api::AuditInclusion>(&past))
        .unwrap_err();
    assert_eq!(api_error(err).status, 404);
    for bad in [
        format!("/v1/audit/proof/inclusion?seq={seq}&tree_size={}", seq - 1),
        format!("/v1/audit/proof/inclusion?seq={seq}&tree_size=1&x=1"),
        "/v1/audit/proof/inclusion?seq=x&tree_size=1".to_string(),
    ] {
        let err = p
            .block_on(alice.client.get::<api::AuditInclusion>(&bad))
            .unwrap_err();
        assert_eq!(api_error(err).status, 400, "{bad}");
    }

    // The newest head extends the first one.
    let first: audit::TreeHead = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let path = format!(
        "/v1/audit/proof/consistency?first={}&second={}",
        first.tree_size, head.tree_size
    );
    let proof: audit::ConsistencyProof = p.block_on(bob.client.get(&path)).unwrap();
    assert_eq!(audit::verify_consistency(&first, &head, &proof), Ok(()));
    assert!(audit::verify_consistency(&head, &first, &proof).is_err());
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
    let out = p.verify_audit(&full.join("audit.log"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// C6 and X.1605 11.2-6: a tenant administrator reads its tenant's records (with the
/// provider's actions on its resources marked), filtered and a page at a time; other users
/// read their own; another tenant's records never show; nothing changes or deletes a record.
#[test]
fn tenants_read_their_own_records_filtered_and_paged_and_never_anothers() {
    let p = Platform::start();
    let admin = p.admin();
    let (acme, alice) = p.tenant(&admin, "acme", None);
    let (_, bob) = p.tenant(&admin, "bravo", None);
    let member = p.tenant_user(&admin, &acme.id, "mia", "member");
    let tad = p.tenant_user(&admin, &acme.id, "tad", "tenant_admin");
    for _ in 0..3 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
        let _: Vec<api::Instance> = p.block_on(bob.client.get("/v1/instances")).unwrap();
    }
    let _: Vec<api::Instance> = p.block_on(member.client.get("/v1/instances")).unwrap();
    // Someone tries mia's account with a wrong password: acme's administrator sees it.
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let attempt = serde_json::to_vec(&serde_json::json!({
        "user": "mia@acme",
        "password": "not-her-password",
        "public_key": palisade_common::signing::encode_public_key(&key.verifying_key()),
    }))
    .unwrap();
    assert_eq!(
        p.raw()
            .send(&p, "POST", "/v1/auth/login", &attempt, &[])
            .status,
        401
    );
    // The provider looks at acme: a provider action in acme's records.
    let _: api::Tenant = p
        .block_on(admin.client.get(&format!("/v1/tenants/{}", acme.id)))
        .unwrap();

    let page = |s: &Signer, query: &str| -> api::AuditRecords {
        p.block_on(s.client.get(&format!("/v1/audit/records{query}")))
            .unwrap()
    };
    let all = page(&tad, "?limit=1000");
    assert!(all.next.is_none());
    assert!(!all.records.is_empty());
    assert!(
        all.records
            .iter()
            .all(|r| r.tenant_id.as_deref() == Some(acme.id.as_str())),
        "only acme's records"
    );
    // The provider's actions: creating the tenant's three users, and the look at the tenant.
    let provider: Vec<&str> = all
        .records
        .iter()
        .filter(|r| r.provider)
        .map(|r| r.action.as_str())
        .collect();
    assert_eq!(
        provider,
        ["user.create", "user.create", "user.create", "tenant.show"]
    );
    assert!(all
        .records
        .iter()
        .filter(|r| r.provider)
        .all(|r| r.role.as_deref() == Some("platform_admin")
            && r.subject == "provider"
            && r.source == "provider"
            && r.key_id.is_none()));
    // A member proves its own records only, not the tenant administrator's.
    let head: audit::TreeHead = p
        .block_on(member.client.post("/v1/audit/heads", &()))
        .unwrap();
    let tads_record = all
        .records
        .iter()
        .find(|r| !r.provider && r.role.as_deref() == Some("tenant_admin"))
        .expect("a record of tad's");
    let path = format!(
        "/v1/audit/proof/inclusion?seq={}&tree_size={}",
        tads_record.seq, head.tree_size
    );
    let err = p
        .block_on(member.client.get::<api::AuditInclusion>(&path))
        .unwrap_err();
    assert_eq!(api_error(err).status, 404);
    let _: api::AuditInclusion = p.block_on(tad.client.get(&path)).unwrap();
    // Each record comes back byte for byte as logged: its hash still checks out. The
    // provider's are the exception: they name the role, not the person.
    for r in all.records.iter().filter(|r| !r.provider) {
        let mut copy = r.clone();
        copy.seal();
        assert_eq!(copy.hash, r.hash);
    }
    let failed: Vec<_> = all
        .records
        .iter()
        .filter(|r| r.action == "auth.login" && r.result == "denied")
        .collect();
    assert_eq!(failed.len(), 1, "the failed login on mia's account");
    assert_eq!(
        (failed[0].subject.as_str(), failed[0].kind.as_str()),
        ("anonymous", "authentication")
    );
    // A member sees only its own records.
    let own = page(&member, "");
    assert!(!own.records.is_empty());
    let subjects: std::collections::BTreeSet<&str> =
        own.records.iter().map(|r| r.subject.as_str()).collect();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert!(own.records.len() < all.records.len());

    // Filters and pages.
    let lists = page(&tad, "?action=instance.list&result=allowed");
    assert_eq!(lists.records.len(), 4, "three of alice's and one of mia's");
    let prefix = page(&tad, "?action=instance.*");
    assert_eq!(prefix.records.len(), 4);
    let first = page(&tad, "?action=instance.list&limit=3");
    assert_eq!(first.records.len(), 3);
    let cursor = first.next.expect("a cursor when more may follow");
    let rest = page(&tad, &format!("?action=instance.list&after={cursor}"));
    assert_eq!(rest.records.len(), 1);
    assert!(rest.records[0].seq > first.records[2].seq);
    let later = page(&tad, "?since=2999-01-01T00:00:00Z");
    assert!(later.records.is_empty());
    for bad in [
        "?limit=0",
        "?limit=5000",
        "?since=yesterday",
        "?tenant=x",
        "?verb=x",
    ] {
        let err = p
            .block_on(
                alice
                    .client
                    .get::<api::AuditRecords>(&format!("/v1/audit/records{bad}")),
            )
            .unwrap_err();
        assert_eq!(api_error(err).status, 400, "{bad}");
    }

    // Bob never sees acme's records, whatever he asks.
    let bobs = page(&bob, &format!("?limit=1000&object=tenant/{}*", acme.id));
    assert!(bobs
        .records
        .iter()
        .all(|r| r.tenant_id.as_deref() != Some(acme.id.as_str())));
    // No route changes or deletes a record.
    for method in ["PUT", "DELETE", "PATCH", "POST"] {
        let r = p.raw().signed(&p, &alice, method, "/v1/audit/records", b"");
        assert!(r.status == 405 || r.status == 404, "{method}: {}", r.status);
    }

    // The auditor reads everyone's, and may pick a tenant.
    let auditor = p.platform_account(&admin, "audrey", "auditor");
    let everything = page(&auditor, "?limit=1000");
    assert!(everything.records.len() > all.records.len());
    let tads = page(&tad, "?limit=1000");
    let acmes = page(&auditor, &format!("?limit=1000&tenant={}", acme.id));
    assert!(acmes
        .records
        .iter()
        .all(|r| r.tenant_id.as_deref() == Some(acme.id.as_str())));
    let seqs = |page: &api::AuditRecords| page.records.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&acmes)[..tads.records.len()], seqs(&tads)[..]);
    // The auditor sees who at the provider acted.
    assert!(acmes
        .records
        .iter()
        .filter(|r| r.provider)
        .all(|r| r.subject.starts_with("user:") && r.key_id.is_some()));
}

/// C4: ten thousand mixed calls (allowed, unsigned, forbidden, malformed, not found), each
/// leaving exactly one record with subject, object, action, result, UTC time and source.
#[test]
fn ten_thousand_mixed_calls_leave_exactly_one_full_record_each() {
    use futures::StreamExt;
    let p = Platform::start_with_args(&[
        "--rate-limit-per-source",
        "1000000",
        "--rate-limit-per-key",
        "1000000",
    ]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let anonymous = p.anonymous();
    let before = record_count(&p);
    const CALLS: usize = 10_000;
    let missing = "/v1/instances/7d1e5c9a-0000-4000-8000-000000000000";
    let outcomes: Vec<(usize, bool)> = p.block_on(
        futures::stream::iter(0..CALLS)
            .map(|i| {
                let (alice, anonymous) = (&alice.client, &anonymous);
                async move {
                    let ok = match i % 5 {
                        0 => {
                            alice
                                .send(reqwest::Method::GET, "/v1/instances", vec![])
                                .await
                        }
                        1 => {
                            anonymous
                                .send(reqwest::Method::GET, "/v1/instances", vec![])
                                .await
                        }
                        2 => {
                            alice
                                .send(reqwest::Method::GET, "/v1/tenants", vec![])
                                .await
                        }
                        3 => {
                            alice
                                .send(reqwest::Method::POST, "/v1/instances", b"{oops".to_vec())
                                .await
                        }
                        _ => alice.send(reqwest::Method::GET, missing, vec![]).await,
                    }
                    .is_ok();
                    (i % 5, ok)
                }
            })
            .buffer_unordered(8)
            .collect(),
    );
    for (kind, ok) in &outcomes {
        assert_eq!(*ok, *kind == 0, "call kind {kind}");
    }
    let records: Vec<serde_json::Value> = request_lines(&p)
        .iter()
        .skip(before)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), CALLS, "exactly one record per call");
    let mut ids = std::collections::HashSet::new();
    let mut tally = std::collections::BTreeMap::new();
    for r in &records {
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
        assert!(r["time"].as_str().unwrap().ends_with('Z'), "{r}");
        assert!(
            r["source"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
        assert!(
            ids.insert(r["request_id"].as_str().unwrap().to_string()),
            "{r}"
        );
        let key = format!(
            "{} {} {}",
            r["action"].as_str().unwrap(),
            r["result"].as_str().unwrap(),
            r["code"].as_str().unwrap_or("-")
        );
        *tally.entry(key).or_insert(0) += 1;
    }
    let expected: std::collections::BTreeMap<String, i32> = [
        ("instance.list allowed -", 2000),
        ("http.GET denied signature_missing", 2000),
        ("tenant.list denied forbidden", 2000),
        ("instance.create rejected invalid_request", 2000),
        ("instance.show denied not_found", 2000),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(tally, expected);
}

/// C5: caller text holding CR, LF, U+2028, NUL, terminal escapes or 64 KiB stays inside one
/// record per request, every line plain printable ASCII, and the log still verifies.
#[test]
fn hostile_text_stays_one_escaped_record_and_the_log_verifies() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    // As much as a request body may carry (64 KiB with its JSON around it).
    let big = format!("{}\r\n\u{2028}{}", "A".repeat(30_000), "B".repeat(30_000));
    let nasty = [
        "x\r\n{\"seq\":1}",
        "line\u{2028}sep\u{2029}",
        "nul\0byte",
        "\u{1b}[2J\u{1b}[31mred\u{7}",
        "\u{202e}evil\u{200b}",
        big.as_str(),
    ];
    let enc = |t: &str| t.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let mut sent = 0;
    let before = record_count(&p);
    for text in nasty {
        // In the path, in a login name, in an instance name, in a claimed key id.
        let path = format!("/v1/instances/{}", enc(&text[..text.len().min(2000)]));
        raw.signed(&p, &alice, "GET", &path, b"");
        let login =
            serde_json::to_vec(&serde_json::json!({"user": text, "password": "x"})).unwrap();
        raw.send(&p, "POST", "/v1/auth/login", &login, &[]);
        let create = serde_json::to_vec(
            &serde_json::json!({"name": text, "image": "debian-12-busybox", "flavor": "tiny"}),
        )
        .unwrap();
        let r = raw.signed(&p, &alice, "POST", "/v1/instances", &create);
        assert_eq!(r.status, 400);
        let header_text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
        let forged = format!("keyid=\"{header_text}\", alg=\"ed25519\"");
        raw.send(
            &p,
            "GET",
            "/v1/whoami",
            b"",
            &[("signature-input".to_string(), forged)],
        );
        sent += 4;
    }
    let lines = request_lines(&p);
    let new: Vec<&[u8]> = lines.iter().skip(before).map(|l| l.as_bytes()).collect();
    assert_eq!(new.len(), sent, "one record per request");
    for line in &new {
        assert!(
            line.iter().all(|b| (0x20..0x7f).contains(b)),
            "a byte outside printable ASCII: {}",
            String::from_utf8_lossy(line)
        );
        assert!(line.len() < 4096, "a record of {} bytes", line.len());
    }
    let _: audit::TreeHead = p
        .block_on(alice.client.post("/v1/audit/heads", &()))
        .unwrap();
    p.stop_controller();
    let out = p.verify_audit(&p.audit_log());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Host-agent operations on a tenant's instance are in the tenant's records, each before it
/// runs and with its outcome; the host agent going away and coming back are host events.
#[test]
fn host_operations_and_host_events_are_recorded() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (acme, alice) = p.tenant(&admin, "acme", None);
    let tad = p.tenant_user(&admin, &acme.id, "tad", "tenant_admin");
    let id = p.create_instance(&alice, "vm").unwrap().id;
    p.wait_state(&alice, &id, "running");
    let _: api::Instance = p
        .block_on(alice.client.post(&format!("/v1/instances/{id}/stop"), &()))
        .unwrap();
    p.wait_state(&alice, &id, "stopped");
    p.block_on(alice.client.send(
        reqwest::Method::DELETE,
        &format!("/v1/instances/{id}"),
        vec![],
    ))
    .unwrap();
    let object = format!("instance/{id}");
    let host_ops = || -> Vec<(String, String)> {
        let page: api::AuditRecords = p
            .block_on(tad.client.get("/v1/audit/records?action=host.*&limit=1000"))
            .unwrap();
        page.records
            .into_iter()
            .filter(|r| r.object == object)
            .map(|r| {
                assert_eq!(r.kind, "host");
                assert_eq!(r.subject, "controller");
                (r.action, r.result)
            })
            .collect()
    };
    let want: Vec<(String, String)> = [
        ("host.instance_start", "requested"),
        ("host.instance_start", "succeeded"),
        ("host.instance_stop", "requested"),
        ("host.instance_stop", "succeeded"),
        ("host.instance_erase", "requested"),
        ("host.instance_erase", "succeeded"),
    ]
    .iter()
    .map(|(a, r)| (a.to_string(), r.to_string()))
    .collect();
    poll(Duration::from_secs(30), "the erase to be recorded", || {
        (host_ops() == want).then_some(())
    });

    let auditor = p.platform_account(&admin, "audrey", "auditor");
    let events = |p: &Platform, action: &str| -> usize {
        let page: api::AuditRecords = p
            .block_on(
                auditor
                    .client
                    .get(&format!("/v1/audit/records?action={action}&limit=1000")),
            )
            .unwrap();
        page.records.len()
    };
    let gone = events(&p, "host.agent_unreachable");
    p.kill_agent();
    poll(
        Duration::from_secs(30),
        "the agent's absence to be recorded",
        || (events(&p, "host.agent_unreachable") > gone).then_some(()),
    );
    let back = events(&p, "host.agent_reachable");
    p.start_agent();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while events(&p, "host.agent_reachable") <= back {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's return was not recorded:\n{}",
            p.tail("controller.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// X.1605 11.2-9: a third-party system pulls the records as OCSF events with a cursor, missing
/// none and repeating none; a tenant administrator's stream holds only its tenant's.
#[test]
fn third_party_systems_pull_ocsf_events_with_a_cursor() {
    let p = Platform::start();
    let admin = p.admin();
    let (acme, alice) = p.tenant(&admin, "acme", None);
    let tad = p.tenant_user(&admin, &acme.id, "tad", "tenant_admin");
    let (_, bob) = p.tenant(&admin, "bravo", None);
    let auditor = p.platform_account(&admin, "audrey", "auditor");
    for _ in 0..5 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
        let _: Vec<api::Instance> = p.block_on(bob.client.get("/v1/instances")).unwrap();
    }
    let refused =
        serde_json::to_vec(&serde_json::json!({"user": "acme-user@acme", "password": "wrong"}))
            .unwrap();
    p.raw().send(&p, "POST", "/v1/auth/login", &refused, &[]);

    // Small pages, each picking up where the last left off.
    let mut cursor = 0;
    let mut seen: Vec<u64> = Vec::new();
    let mut events = Vec::new();
    loop {
        let page: api::OcsfPage = p
            .block_on(
                auditor
                    .client
                    .get(&format!("/v1/audit/ocsf?cursor={cursor}&limit=25")),
            )
            .unwrap();
        for e in &page.events {
            seen.push(e["metadata"]["sequence"].as_u64().unwrap());
        }
        let last = page.events.len() < 25;
        if page.events.is_empty() {
            assert_eq!(page.cursor, cursor);
        }
        cursor = page.cursor;
        events.extend(page.events);
        if last {
            break;
        }
    }
    assert!(seen.len() > 25, "more than one page: {}", seen.len());
    // Every record up to the cursor, once each (the reads above add records as they go).
    assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
    let lists: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["api"]["operation"] == "instance.list")
        .collect();
    assert_eq!(lists.len(), 10);
    assert!(lists
        .iter()
        .all(|e| e["class_uid"] == 6003 && e["activity_id"] == 2 && e["status_id"] == 1));
    // A platform account's first key request, refused for want of a second factor: a failed
    // logon.
    let login = events
        .iter()
        .find(|e| e["api"]["operation"] == "key.create" && e["status_id"] == 2)
        .expect("a refused key request");
    assert_eq!(
        (login["class_uid"].as_u64(), login["activity_id"].as_u64()),
        (Some(3002), Some(1))
    );
    assert!(login["time"].as_i64().unwrap() > 1_700_000_000_000);

    // The tenant administrator's stream: acme's records only.
    let page: api::OcsfPage = p
        .block_on(tad.client.get("/v1/audit/ocsf?limit=1000"))
        .unwrap();
    assert!(!page.events.is_empty());
    assert!(page
        .events
        .iter()
        .all(|e| e["cloud"]["account"]["uid"] == acme.id.as_str()));
    let err = p
        .block_on(tad.client.get::<api::OcsfPage>("/v1/audit/ocsf?limit=0"))
        .unwrap_err();
    assert_eq!(api_error(err).status, 400);
}

/// A real syslog collector: rsyslogd receiving RFC 5425 (octet-counted syslog over TLS) and
/// writing what it gets to a file.
struct Rsyslog {
    dir: std::path::PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Rsyslog {
    /// Writes a CA, a server certificate for 127.0.0.1 and the configuration.
    fn new(dir: &std::path::Path) -> Rsyslog {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = dir.join("rsyslog");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "syslog test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"global(workDirectory="{d}/work"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{d}/ca.pem"
  DefaultNetstreamDriverCertFile="{d}/cert.pem"
  DefaultNetstreamDriverKeyFile="{d}/key.pem")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%structured-data% %msg%\n")
if $msgid == "audit" then {{
  action(type="omfile" file="{d}/received.log" template="raw")
}}
"#
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        Rsyslog {
            dir,
            port,
            child: None,
        }
    }

    fn start(&mut self) {
        let child = std::process::Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("rsyslogd.err")).unwrap())
            .spawn()
            .expect("rsyslogd (apt-get install rsyslog rsyslog-gnutls)");
        self.child = Some(child);
        let port = self.port;
        poll(Duration::from_secs(20), "rsyslogd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `seq` of every audit record received (a record may come twice).
    fn received(&self) -> std::collections::BTreeSet<u64> {
        std::fs::read_to_string(self.dir.join("received.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let rest = l.split_once("seq=\"")?.1;
                rest.split_once('"')?.0.parse().ok()
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
    }
}

/// X.1605 11.2-9: every record reaches a real syslog collector over TLS, none lost while the
/// collector is down or the controller restarts: the backlog is sent when both are back.
#[test]
fn syslog_export_reaches_a_real_collector_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut collector = Rsyslog::new(dir.path());
    collector.start();
    let address = format!("127.0.0.1:{}", collector.port);
    let ca = collector.dir.join("ca.pem").display().to_string();
    let mut p = Platform::start_with_args(&["--audit-syslog", &address, "--audit-syslog-ca", &ca]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let size = |p: &Platform| request_lines_all(p);
    let all_received = |collector: &Rsyslog, upto: u64| {
        let got = collector.received();
        (1..=upto).all(|s| got.contains(&s))
    };
    let n = size(&p);
    poll(
        Duration::from_secs(30),
        "the collector to get every record",
        || all_received(&collector, n).then_some(()),
    );

    // The collector goes away; records keep coming, and the controller restarts meanwhile.
    collector.kill();
    for _ in 0..20 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    }
    p.stop_controller();
    p.start_controller();
    for _ in 0..20 {
        let _: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    }
    let n = size(&p);
    collector.start();
    poll(
        Duration::from_secs(60),
        "the backlog to reach the collector",
        || all_received(&collector, n).then_some(()),
    );
}

/// How many records the log holds.
fn request_lines_all(p: &Platform) -> u64 {
    std::fs::read_to_string(p.audit_log())
        .unwrap()
        .lines()
        .count() as u64
}

/// Point 6: records past the platform's minimum are purged to their hashes; a tenant that keeps
/// its records longer and a tenant under legal hold keep theirs; the log still verifies, each
/// purge is a record in the tenant's view, and a restart accepts the purged log.
#[test]
fn retention_purges_to_hashes_keeps_longer_rules_and_holds_and_still_verifies() {
    use reqwest::Method;
    let mut p = Platform::start_with_args(&["--audit-retention", "3s"]);
    let admin = p.admin();
    let security = p.platform_account(&admin, "sam", "security_admin");
    let auditor = p.platform_account(&admin, "audrey", "auditor");
    let mut tenants = Vec::new();
    for name in ["short", "long", "held"] {
        let (tenant, _) = p.tenant(&admin, name, None);
        let boss = p.tenant_user(&admin, &tenant.id, &format!("{name}-admin"), "tenant_admin");
        tenants.push((tenant, boss));
    }
    let [(_, short_admin), (long, long_admin), (held, held_admin)] =
        <[_; 3]>::try_from(tenants).ok().unwrap();

    // The long tenant keeps its records a day; below the minimum or absurd values are refused.
    let settings = |days: u32| api::TenantSettings {
        audit_retention_days: days,
        ..api::TenantSettings::default()
    };
    let path = format!("/v1/tenants/{}/settings", long.id);
    let set = |days| {
        p.block_on(long_admin.client.json::<_, api::Tenant>(
            Method::PUT,
            &path,
            Some(&settings(days)),
        ))
    };
    assert_eq!(set(1).unwrap().settings.audit_retention_days, 1);
    assert_eq!(api_error(set(36501).unwrap_err()).status, 400);
    // A legal hold on the held tenant, by the security administrator only.
    let hold = format!("/v1/audit/holds/{}", held.id);
    let reason = api::AuditHoldSet {
        reason: "case 2026-117".into(),
    };
    let put_hold = |who: &Signer, path: &str, reason: &api::AuditHoldSet| {
        p.block_on(
            who.client
                .json::<_, api::AuditHold>(Method::PUT, path, Some(reason)),
        )
    };
    assert_eq!(
        api_error(put_hold(&held_admin, &hold, &reason).unwrap_err()).status,
        403
    );
    // Another tenant's hold is as missing as a tenant that does not exist.
    assert_eq!(
        api_error(put_hold(&short_admin, &hold, &reason).unwrap_err()).status,
        404
    );
    for bad in ["", "two\nlines", "right\u{202e}left", &"x".repeat(161)] {
        let bad = api::AuditHoldSet { reason: bad.into() };
        assert_eq!(
            api_error(put_hold(&security, &hold, &bad).unwrap_err()).status,
            400
        );
    }
    let nobody = "/v1/audit/holds/00000000-0000-4000-8000-000000000000";
    assert_eq!(
        api_error(put_hold(&security, nobody, &reason).unwrap_err()).status,
        404
    );
    let placed = put_hold(&security, &hold, &reason).unwrap();
    assert_eq!(placed.scope, held.id);

    // Each tenant leaves records, which then age past the platform's 3 s.
    for who in [&short_admin, &long_admin, &held_admin] {
        let _: Vec<api::Instance> = p.block_on(who.client.get("/v1/instances")).unwrap();
    }
    let seen = |who: &Signer| -> Vec<audit::AuditRecord> {
        let page: api::AuditRecords = p
            .block_on(who.client.get("/v1/audit/records?limit=1000"))
            .unwrap();
        page.records
    };
    let before = [seen(&short_admin), seen(&long_admin), seen(&held_admin)];
    assert!(before.iter().all(|r| r.len() > 3));
    std::thread::sleep(Duration::from_secs(4));
    // Only the security administrator purges.
    let err = p
        .block_on(
            short_admin
                .client
                .post::<_, api::AuditPurge>("/v1/audit/purge", &()),
        )
        .unwrap_err();
    assert_eq!(api_error(err).status, 403);
    let done: api::AuditPurge = p
        .block_on(security.client.post("/v1/audit/purge", &()))
        .unwrap();
    assert!(
        done.records > 0 && !done.purge_records.is_empty(),
        "{done:?}"
    );

    // The short tenant sees only its purge record (and what came after); the others all.
    let short_after = seen(&short_admin);
    let purge = short_after
        .iter()
        .find(|r| r.action == audit::RECORDS_PURGED)
        .expect("the short tenant's purge record");
    let (count, _) = audit::parse_purge_object(&purge.object).unwrap();
    assert!(
        count as usize >= before[0].len(),
        "{count} of {}",
        before[0].len()
    );
    assert!(short_after
        .iter()
        .all(|r| r.seq > before[0].last().unwrap().seq));
    for (i, who) in [(1, &long_admin), (2, &held_admin)] {
        let after = seen(who);
        assert_eq!(
            &after[..before[i].len()],
            &before[i][..],
            "tenant {i} lost records"
        );
        assert!(after.iter().all(|r| r.action != audit::RECORDS_PURGED));
    }
    // The hold is in the held tenant's view, as the provider's.
    let hold_record = seen(&held_admin)
        .into_iter()
        .find(|r| r.action == "audit_hold.set" && r.result == "allowed")
        .expect("the hold in the tenant's records");
    assert!(hold_record.provider && hold_record.subject == "provider");
    // The record keeps the reason, which the hold row does not outlive.
    assert_eq!(
        hold_record.object,
        format!("audit-hold/tenant/{}?reason=case+2026-117", held.id)
    );
    let retention: api::AuditRetention = p
        .block_on(held_admin.client.get("/v1/audit/retention"))
        .unwrap();
    assert_eq!(retention.minimum_secs, 3);
    assert_eq!(retention.holds.len(), 1);
    assert_eq!(retention.holds[0].set_by, "provider");
    assert!(
        retention.tenants.is_empty(),
        "another tenant's rule shown: {retention:?}"
    );
    let all: api::AuditRetention = p
        .block_on(auditor.client.get("/v1/audit/retention"))
        .unwrap();
    assert_eq!(all.tenants.len(), 1);
    assert_eq!(all.tenants[0].tenant_id, long.id);
    // A purged record is not proved; it is gone, as one that never was.
    let purged_seq = before[0][0].seq;
    let path = format!("/v1/audit/proof/inclusion?seq={purged_seq}&tree_size={purged_seq}");
    let err = p
        .block_on(auditor.client.get::<api::AuditInclusion>(&path))
        .unwrap_err();
    assert_eq!(api_error(err).status, 404);

    // Released, the held tenant's old records go at the next purge.
    let client = &security.client;
    p.block_on(client.send(Method::DELETE, &hold, Vec::new()))
        .unwrap();
    let err = p
        .block_on(client.send(Method::DELETE, &hold, Vec::new()))
        .unwrap_err();
    assert_eq!(api_error(err).status, 404);
    std::thread::sleep(Duration::from_secs(4));
    let again: api::AuditPurge = p
        .block_on(security.client.post("/v1/audit/purge", &()))
        .unwrap();
    assert!(again.records > 0);
    assert!(seen(&held_admin)
        .iter()
        .all(|r| r.seq > before[2].last().unwrap().seq));
    assert_eq!(&seen(&long_admin)[..before[1].len()], &before[1][..]);

    // The purged log verifies offline, reports its purges, and a restart accepts it.
    p.stop_controller();
    let out = p.verify_audit(&p.audit_log());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("past retention purged"), "{stdout}");
    let purged = done.records + again.records;
    assert!(
        stdout.contains(&format!("({purged} purged past retention")),
        "{stdout}"
    );
    p.start_controller();
    let _: Vec<api::Instance> = p.block_on(long_admin.client.get("/v1/instances")).unwrap();
}
