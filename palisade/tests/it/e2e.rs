//! The walking skeleton end to end, through the real CLI: a tenant boots a real VM, reads its
//! console, stops, starts and deletes it; nothing of it remains on the host afterwards.

use std::time::Duration;

use crate::support::*;

#[test]
fn tenant_boots_a_vm_through_the_cli_and_nothing_remains_after_delete() {
    let p = Platform::start();
    let endpoint = p.endpoint.clone();
    let ca = p.ca().display().to_string();
    let initial = p.initial_password.clone().unwrap();

    // The operator: pin the CA, change the initial password, make a key.
    p.cli_ok(&[
        "profile",
        "set",
        "default",
        "--endpoint",
        &endpoint,
        "--ca",
        &ca,
    ]);
    p.cli_ok(&[
        "profile",
        "set",
        "tenant",
        "--endpoint",
        &endpoint,
        "--ca",
        &ca,
    ]);
    let out = p.cli(&["key", "create", "--user", "admin", "--password", &initial]);
    assert!(
        !out.status.success(),
        "the initial password must not create keys"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("password_change_required"), "{stderr}");
    p.cli_ok(&[
        "password",
        "change",
        "--user",
        "admin",
        "--password",
        &initial,
        "--new-password",
        "operator-pass-123",
    ]);
    // A platform account needs a second factor before any key: enrol TOTP through the CLI,
    // with this test as the authenticator app.
    let out = p.cli(&[
        "key",
        "create",
        "--user",
        "admin",
        "--password",
        "operator-pass-123",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("mfa_enrolment_required"));
    let enrolment: serde_json::Value = serde_json::from_str(&p.cli_ok(&[
        "--json",
        "mfa",
        "enrol",
        "--user",
        "admin",
        "--password",
        "operator-pass-123",
    ]))
    .unwrap();
    let uri = enrolment["otpauth_uri"].as_str().unwrap().to_string();
    let codes: serde_json::Value = serde_json::from_str(&p.cli_ok(&[
        "--json",
        "mfa",
        "confirm",
        "--user",
        "admin",
        "--password",
        "operator-pass-123",
        "--code",
        &totp_code(&uri, -30),
    ]))
    .unwrap();
    assert_eq!(codes["recovery_codes"].as_array().unwrap().len(), 10);
    p.cli_ok(&[
        "key",
        "create",
        "--user",
        "admin",
        "--password",
        "operator-pass-123",
        "--totp-code",
        &totp_code(&uri, 0),
    ]);

    // A tenant with a user, who makes their own key.
    let tenant: serde_json::Value =
        serde_json::from_str(&p.cli_ok(&["--json", "tenant", "create", "acme"])).unwrap();
    let tenant_id = tenant["id"].as_str().unwrap().to_string();
    let user: serde_json::Value = serde_json::from_str(
        &p.cli_ok(&["--json", "user", "create", "alice", "--tenant", &tenant_id]),
    )
    .unwrap();
    let alice_initial = user["initial_password"].as_str().unwrap().to_string();
    // A tenant user's login name carries the tenant's.
    assert_eq!(user["user"]["name"], "alice@acme");
    p.cli_ok(&[
        "--profile",
        "tenant",
        "password",
        "change",
        "--user",
        "alice@acme",
        "--password",
        &alice_initial,
        "--new-password",
        "Wonder-land-1234",
    ]);
    p.cli_ok(&[
        "--profile",
        "tenant",
        "key",
        "create",
        "--user",
        "alice@acme",
        "--password",
        "Wonder-land-1234",
    ]);
    let table = p.cli_ok(&["--profile", "tenant", "image", "list"]);
    assert!(table.contains("debian-12-busybox"), "{table}");

    // A network of its own: a VPC, a subnet, a group that lets SSH in.
    let tenant_json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--profile", "tenant", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&p.cli_ok(&all)).unwrap()
    };
    let vpc = tenant_json(&["vpc", "create", "main", "--cidr", "10.40.0.0/16"]);
    let vpc_id = vpc["id"].as_str().unwrap().to_string();
    let subnet = tenant_json(&["subnet", "create", &vpc_id, "web", "--cidr", "10.40.1.0/24"]);
    let subnet_id = subnet["id"].as_str().unwrap().to_string();
    assert_eq!(subnet["gateway"], "10.40.1.1");
    let sg = tenant_json(&["sg", "create", "ssh"]);
    let sg_id = sg["id"].as_str().unwrap().to_string();
    tenant_json(&[
        "sg",
        "allow",
        &sg_id,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "22",
        "--cidr",
        "0.0.0.0/0",
    ]);
    let shown = p.cli_ok(&["--profile", "tenant", "sg", "show", &sg_id]);
    assert!(
        shown.contains("ingress") && shown.contains("0.0.0.0/0"),
        "{shown}"
    );
    let bad = p.cli(&[
        "--profile",
        "tenant",
        "sg",
        "allow",
        &sg_id,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "70000",
        "--cidr",
        "0.0.0.0/0",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("70000 is out of range"));

    // Boot, and read the console until the guest says it is up.
    let created: serde_json::Value = serde_json::from_str(&p.cli_ok(&[
        "--profile",
        "tenant",
        "--json",
        "instance",
        "create",
        "web-1",
        "--image",
        "debian-12-busybox",
        "--flavor",
        "tiny",
        "--subnet",
        &subnet_id,
        "--security-group",
        &sg_id,
        "--wait",
    ]))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "running");
    let console = p.cli_ok(&[
        "--profile",
        "tenant",
        "instance",
        "console",
        &id,
        "--follow",
        "--until",
        BOOT_MARKER,
        "--timeout",
        "120",
    ]);
    assert!(console.contains(BOOT_MARKER));
    // The serial console is interactive: a line typed there runs in the guest's shell. The
    // marker is split in what is typed, so only the shell's output can show it whole.
    let follow = |until: &str| {
        p.cli_ok(&[
            "--profile",
            "tenant",
            "instance",
            "console",
            &id,
            "--follow",
            "--until",
            until,
            "--timeout",
            "120",
        ])
    };
    follow("PALISADE-CONSOLE-READY");
    p.cli_ok(&[
        "--profile",
        "tenant",
        "instance",
        "type",
        &id,
        "echo TYPED-\"\"$((6*7))",
    ]);
    assert!(follow("TYPED-42").contains("TYPED-42"));
    // The guest got its port's address from the VPC's DHCP server.
    let ports = tenant_json(&["port", "list"]);
    let ip = ports[0]["ip"].as_str().unwrap().to_string();
    assert_eq!(ports[0]["instance_id"], id.as_str());
    p.cli_ok(&[
        "--profile",
        "tenant",
        "instance",
        "type",
        &id,
        "ip -o -4 addr show eth0",
    ]);
    follow(&format!("inet {ip}/24"));
    let port_id = ports[0]["id"].as_str().unwrap().to_string();
    let traffic = p.cli_ok(&["--profile", "tenant", "port", "traffic", &port_id]);
    assert!(traffic.contains("spoofed frames dropped: 0"), "{traffic}");
    let list = p.cli_ok(&["--profile", "tenant", "instance", "list"]);
    assert!(list.contains("web-1") && list.contains("running"), "{list}");
    assert_eq!(qemu_pids(&id).len(), 1, "one QEMU process per instance");

    // Stop: the process goes away. Start: it boots again from the same disk.
    p.cli_ok(&["--profile", "tenant", "instance", "stop", &id, "--wait"]);
    assert!(
        qemu_pids(&id).is_empty(),
        "stopped instance still has a QEMU process"
    );
    p.cli_ok(&["--profile", "tenant", "instance", "start", &id, "--wait"]);
    assert_eq!(qemu_pids(&id).len(), 1);
    // The console log spans both boots: the guest must say it is up a second time.
    poll(Duration::from_secs(120), "the second boot marker", || {
        let console = p.cli_ok(&["--profile", "tenant", "instance", "console", &id]);
        (console.matches(BOOT_MARKER).count() >= 2).then_some(())
    });

    // Delete: no process, cgroup, directory or disk of it remains; the record says when the
    // disk was erased.
    let deleted: serde_json::Value = serde_json::from_str(&p.cli_ok(&[
        "--profile",
        "tenant",
        "--json",
        "instance",
        "delete",
        &id,
        "--wait",
    ]))
    .unwrap();
    assert_eq!(deleted["state"], "deleted");
    assert!(deleted["disk_erased_at"].is_string(), "{deleted}");
    assert!(deleted["deleted_at"].is_string());
    assert!(qemu_pids(&id).is_empty());
    assert!(
        cgroup_dirs(&id).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&id)
    );
    assert!(
        !p.agent_instance_dirs().contains(&id),
        "instance directory left on the host"
    );
    let disks = std::process::Command::new("find")
        .arg(p.data())
        .args(["-name", "*.qcow2"])
        .output()
        .unwrap();
    assert!(
        disks.stdout.is_empty(),
        "disk files left: {}",
        String::from_utf8_lossy(&disks.stdout)
    );
    let list = p.cli_ok(&["--profile", "tenant", "instance", "list"]);
    assert!(!list.contains(&id), "a deleted instance is still listed");

    // The whole session verifies, online and offline. Reading the log is the auditor's alone:
    // the administrator is refused, and makes an auditor account (a separate person).
    let out = p.cli(&["audit", "verify"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    let auditor: serde_json::Value = serde_json::from_str(
        &p.cli_ok(&["--json", "user", "create", "audrey", "--role", "auditor"]),
    )
    .unwrap();
    let initial = auditor["initial_password"].as_str().unwrap().to_string();
    let as_auditor = |args: &[&str]| {
        let mut all = vec!["--profile", "auditor"];
        all.extend_from_slice(args);
        p.cli_ok(&all)
    };
    p.cli_ok(&[
        "profile",
        "set",
        "auditor",
        "--endpoint",
        &endpoint,
        "--ca",
        &ca,
    ]);
    let password = "Audit-trail-2468";
    as_auditor(&[
        "password",
        "change",
        "--user",
        "audrey",
        "--password",
        &initial,
        "--new-password",
        password,
    ]);
    let enrolment: serde_json::Value = serde_json::from_str(&as_auditor(&[
        "--json",
        "mfa",
        "enrol",
        "--user",
        "audrey",
        "--password",
        password,
    ]))
    .unwrap();
    let uri = enrolment["otpauth_uri"].as_str().unwrap().to_string();
    as_auditor(&[
        "mfa",
        "confirm",
        "--user",
        "audrey",
        "--password",
        password,
        "--code",
        &totp_code(&uri, -30),
    ]);
    as_auditor(&[
        "key",
        "create",
        "--user",
        "audrey",
        "--password",
        password,
        "--totp-code",
        &totp_code(&uri, 0),
    ]);
    let verdict = as_auditor(&["audit", "verify"]);
    assert!(verdict.contains("intact"), "{verdict}");
    let verdict: serde_json::Value =
        serde_json::from_str(&as_auditor(&["--json", "audit", "verify"])).unwrap();
    assert_eq!(verdict["intact"], true, "{verdict}");
    assert!(verdict["records"].as_u64().unwrap() > 10, "{verdict}");
    // Exported, then checked offline against the published head key.
    let saved = p.data().join("saved");
    as_auditor(&["audit", "export", "--dir", &saved.display().to_string()]);
    let key = p.audit_head_key();
    let offline = p.cli_ok(&[
        "audit",
        "verify",
        "--log",
        &saved.join("audit.log").display().to_string(),
        "--heads",
        &saved.join("heads.jsonl").display().to_string(),
        "--key",
        &key,
    ]);
    assert!(offline.contains("intact"), "{offline}");

    // The tenant reads its own records, keeps a head, and proves one of its records.
    let mine: serde_json::Value = serde_json::from_str(&p.cli_ok(&[
        "--json",
        "--profile",
        "tenant",
        "audit",
        "list",
        "--action",
        "instance.*",
    ]))
    .unwrap();
    let records = mine["records"].as_array().unwrap();
    assert!(
        records.iter().any(|r| r["action"] == "instance.delete"),
        "{mine}"
    );
    let table = p.cli_ok(&["--profile", "tenant", "audit", "list", "--limit", "2"]);
    assert!(table.contains("more: --after"), "{table}");
    let head = p.cli_ok(&["--profile", "tenant", "audit", "head"]);
    assert!(head.contains(&key), "{head}");
    let seq = records[0]["seq"].as_u64().unwrap().to_string();
    let proved = p.cli_ok(&["--profile", "tenant", "audit", "prove", &seq, "--key", &key]);
    assert!(proved.contains("proved"), "{proved}");

    // The OCSF stream ends at what the log held when it began, one small page at a time
    // (each read is a record too), and ends quietly when its reader goes away.
    let events = p.cli_ok(&["--profile", "tenant", "audit", "ocsf", "--limit", "1"]);
    assert!(events.lines().count() > 3, "{events}");
    let mut reader = std::process::Command::new(palisade_bin())
        .env("PALISADE_CONFIG", p.data().join("cli/config.json"))
        .args(["--profile", "tenant", "audit", "ocsf", "--limit", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(reader.stdout.take());
    let out = reader.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_image_changed_after_registration_never_boots() {
    // A private copy of the image, registered with its digests, then altered on disk.
    let copy = tempfile::tempdir().unwrap();
    for file in ["vmlinuz", "initramfs.cpio.gz", "image.json"] {
        std::fs::copy(guest_image().join(file), copy.path().join(file)).unwrap();
    }
    let mut p = Platform::start_with_image(copy.path().to_path_buf());
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let mut initrd = std::fs::read(copy.path().join("initramfs.cpio.gz")).unwrap();
    let last = initrd.len() - 1;
    initrd[last] ^= 0x01;
    std::fs::write(copy.path().join("initramfs.cpio.gz"), initrd).unwrap();

    let id = p.create_instance(&alice, "tampered").unwrap().id;
    let failed = p.wait_state_allowing_error(&alice, &id, "error");
    assert_eq!(failed.last_error.as_deref(), Some("image_digest_mismatch"));
    assert!(qemu_pids(&id).is_empty(), "a tampered image booted");

    // A restarted controller registers the image again from its manifest: the altered file
    // matches neither the manifest nor the pinned digest, so it still never boots.
    p.kill_controller();
    p.start_controller();
    let id = p.create_instance(&alice, "tampered-again").unwrap().id;
    let failed = p.wait_state_allowing_error(&alice, &id, "error");
    assert_eq!(failed.last_error.as_deref(), Some("image_digest_mismatch"));
    assert!(
        qemu_pids(&id).is_empty(),
        "a tampered image booted after a restart"
    );
}
