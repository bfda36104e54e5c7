//! Crashes: after kill -9 of the agent or the controller and a restart, records and QEMU
//! processes agree — no orphan process, no record stuck in a transitional state.

use std::time::Duration;

use crate::support::*;

#[test]
fn agent_killed_while_an_instance_runs_is_reconciled_on_restart() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let id = p.create_instance(&alice, "survivor").unwrap().id;
    p.wait_state(&alice, &id, "running");
    p.wait_console(&alice, &id, BOOT_MARKER);
    let pids = qemu_pids(&id);
    assert_eq!(pids.len(), 1);

    p.kill_agent();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(qemu_pids(&id), pids, "the VM must survive its agent");
    p.start_agent();

    // Adopted: same process, still running, console still readable, and it obeys again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.instance(&alice, &id).state, "running");
    assert_eq!(qemu_pids(&id), pids);
    p.wait_console(&alice, &id, BOOT_MARKER);
    let _: serde_json::Value = p
        .block_on(alice.client.post(&format!("/v1/instances/{id}/stop"), &()))
        .unwrap();
    p.wait_state(&alice, &id, "stopped");
    assert!(qemu_pids(&id).is_empty());
}

#[test]
fn controller_killed_mid_operation_finishes_it_after_restart() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);

    // Killed right after accepting a create: the instance still comes up.
    let id = p.create_instance(&alice, "half-made").unwrap().id;
    p.kill_controller();
    p.start_controller();
    p.wait_state(&alice, &id, "running");
    assert_eq!(qemu_pids(&id).len(), 1);

    // Killed right after accepting a delete: the delete completes, nothing remains.
    let _: serde_json::Value = p
        .block_on(alice.client.json(
            reqwest::Method::DELETE,
            &format!("/v1/instances/{id}"),
            None::<&()>,
        ))
        .unwrap();
    p.kill_controller();
    p.start_controller();
    let gone = p.wait_state(&alice, &id, "deleted");
    assert!(gone.disk_erased_at.is_some());
    assert!(qemu_pids(&id).is_empty());
    assert!(!p.agent_instance_dirs().contains(&id));

    // No record is left in a transitional state.
    let db = p.data().join("palisade.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("SELECT count(*) FROM instances WHERE state IN ('starting','stopping','deleting')")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn a_second_controller_on_the_same_data_dir_refuses_to_start() {
    let p = Platform::start();
    let out = p.run_second_controller();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another controller is using"), "{stderr}");
    // The first one still serves.
    let _ = p.admin();
}

#[test]
fn a_vm_that_dies_on_its_own_is_recorded_stopped_and_can_be_started_again() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let id = p.create_instance(&alice, "fragile").unwrap().id;
    p.wait_state(&alice, &id, "running");
    for pid in qemu_pids(&id) {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status();
    }
    // Not restarted behind the tenant's back: recorded as stopped, with the reason.
    let stopped = p.wait_state(&alice, &id, "stopped");
    assert_eq!(
        stopped.last_error.as_deref(),
        Some("exited_unexpectedly"),
        "{stopped:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(qemu_pids(&id).is_empty());
    assert_eq!(p.instance(&alice, &id).state, "stopped");
    let _: serde_json::Value = p
        .block_on(alice.client.post(&format!("/v1/instances/{id}/start"), &()))
        .unwrap();
    p.wait_state(&alice, &id, "running");
    p.wait_console(&alice, &id, BOOT_MARKER);
}

/// A VM on the host that the database does not know (its record lost, say a database restored
/// from before it was made) is an orphan: the reconciler stops it and erases it.
#[test]
fn a_vm_without_a_record_is_stopped_and_erased() {
    let mut p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let id = p.create_instance(&alice, "orphan").unwrap().id;
    p.wait_state(&alice, &id, "running");
    assert_eq!(qemu_pids(&id).len(), 1);

    p.kill_controller();
    let db = p.data().join("palisade.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!("DELETE FROM instances WHERE id = '{id}'"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    p.start_controller();

    poll(Duration::from_secs(60), "the orphan to be erased", || {
        (qemu_pids(&id).is_empty() && !p.agent_instance_dirs().contains(&id)).then_some(())
    });
    assert!(cgroup_dirs(&id).is_empty(), "{:?}", cgroup_dirs(&id));
}

/// An acknowledged delete never comes back (D3): stops and starts sent at the same moment as
/// the delete, over several rounds, end with every instance deleted and its QEMU gone.
#[test]
fn stops_and_starts_racing_a_delete_never_undo_it() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    for round in 0..4 {
        let id = p
            .create_instance(&alice, &format!("racer-{round}"))
            .unwrap()
            .id;
        p.wait_state(&alice, &id, "running");
        let client = &alice.client;
        let delete_path = format!("/v1/instances/{id}");
        let results = p.block_on(async {
            let power = (0..12).map(|i| {
                let verb = if i % 2 == 0 { "stop" } else { "start" };
                let path = format!("/v1/instances/{id}/{verb}");
                async move { client.post::<_, serde_json::Value>(&path, &()).await }
            });
            let delete =
                client.json::<(), serde_json::Value>(reqwest::Method::DELETE, &delete_path, None);
            futures::future::join(delete, futures::future::join_all(power)).await
        });
        assert!(results.0.is_ok(), "round {round}: {:?}", results.0);
        let gone = p.wait_state(&alice, &id, "deleted");
        assert!(gone.disk_erased_at.is_some(), "round {round}");
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(p.instance(&alice, &id).state, "deleted", "round {round}");
        assert!(qemu_pids(&id).is_empty(), "round {round}");
    }
}
