//! The host agent, for real: the `palisade agent` process over mutual TLS,
//! real QEMU guests in the jailer's sandbox, real cgroups (TESTING.md G1), an
//! agent killed with SIGKILL and restarted, and a delete that leaves nothing.
//!
//! Needs root and the guest image (`images/build-guest.sh build/guest`, or
//! `$PALISADE_GUEST_IMAGE`). On failure the agent's log is printed and the
//! temp directory is kept.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{is_running, poll};

use palisade_common::agent_api::{
    ConsoleChunk, EraseReport, HostInfo, ImageSpec, InstanceSpec, InstanceStatus, PowerState,
};
use palisade_common::error::ErrorBody;
use serde_json::{json, Value};

const MARKER: &str = "PALISADE-BOOT-OK";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

const ID_A: &str = "a0000000-0000-4000-8000-00000000000a";
const ID_B: &str = "b0000000-0000-4000-8000-00000000000b";
const ID_C: &str = "c0000000-0000-4000-8000-00000000000c";
const ID_D: &str = "d0000000-0000-4000-8000-00000000000d";
const ID_E: &str = "e0000000-0000-4000-8000-00000000000e";
const ID_F: &str = "f0000000-0000-4000-8000-00000000000f";
const ID_G: &str = "a1000000-0000-4000-8000-0000000000a1";
const ID_H: &str = "a2000000-0000-4000-8000-0000000000a2";
const ID_I: &str = "a3000000-0000-4000-8000-0000000000a3";
/// Every instance id these tests use. Instance ids name cgroups, which are
/// host-wide, and QEMU processes are found by id: each test has ids of its own.
const ALL_IDS: [&str; 9] = [ID_A, ID_B, ID_C, ID_D, ID_E, ID_F, ID_G, ID_H, ID_I];

// ---- the test ---------------------------------------------------------------

#[test]
fn agent_runs_sandboxed_instances_adopts_them_after_sigkill_and_erases_them() {
    let mut env = Env::new();
    let image = GuestImage::locate();
    let agent = env.spawn_agent();
    let api = env.client(&agent, Identity::Platform);

    let host: HostInfo = api.ok("GET", "/v1/host", None);
    assert!(
        ["kvm", "tcg"].contains(&host.accelerator.as_str()),
        "{host:?}"
    );
    assert_eq!(host.cgroup_version, Cgroups::detect().version());

    refuses_clients_without_a_platform_certificate(&env, &agent);
    refuses_bad_input(&api, &image);

    // Two instances, each booted in its own sandbox.
    let a = api.start(&image.spec(ID_A, 1, 256, ""));
    let b = api.start(&image.spec(ID_B, 2, 192, ""));
    for status in [&a, &b] {
        assert_eq!(status.state, PowerState::Running, "{status:?}");
    }
    assert_eq!(
        api.start(&image.spec(ID_B, 2, 192, "")),
        b,
        "a repeated start is a no-op"
    );
    let (pid_a, pid_b) = (pid(&a), pid(&b));
    let mut console_a = api.wait_for_marker(ID_A, 0);
    api.wait_for_marker(ID_B, 0);

    assert_ne!(a.uid, b.uid);
    for (status, vcpus, memory_mib) in [(&a, 1, 256), (&b, 2, 192)] {
        assert_sandboxed(&env, status, vcpus, memory_mib);
    }
    assert_private_to_root(&env, ID_A);
    assert_no_side_channel_devices(&env, ID_A);

    refuses_an_image_that_does_not_match_its_digest(&env, &api, &image);

    // SIGKILL the agent: the guests go on; a new agent adopts A. B's pid file
    // is lost, as when an agent dies before recording a start: the new agent
    // finds B's QEMU in B's cgroups and kills it rather than leave it unwatched.
    agent.kill();
    assert!(
        is_running(pid_a) && is_running(pid_b),
        "QEMU died with its agent"
    );
    std::fs::remove_file(env.instance_dir(ID_B).join("pid")).expect("remove B's pid file");
    let agent = env.spawn_agent();
    let api = env.client(&agent, Identity::Platform);
    let listed = api.list();
    assert_eq!(find(&listed, ID_A), Some(&a), "{listed:?}");
    let b_now = find(&listed, ID_B).expect("B is listed");
    assert_eq!(
        (b_now.state, b_now.pid, b_now.uid),
        (PowerState::Stopped, None, b.uid)
    );
    assert!(!is_running(pid_b), "the unrecorded QEMU of B still runs");
    assert_no_cgroups(ID_B);

    // The console is read again: a guest reset prints the marker anew.
    console_a = api.read_to_end(ID_A, console_a);
    qmp(
        &env.instance_dir(ID_A).join("root/run/qmp.sock"),
        "system_reset",
    );
    console_a = api.wait_for_marker(ID_A, console_a);

    // Stop (twice), then start again on the same disk.
    let disk_a = env.instance_dir(ID_A).join("root/run/disk.qcow2");
    let disk_inode = std::fs::metadata(&disk_a).expect("disk of A").ino();
    let stopped = api.stop(ID_A);
    assert_eq!(
        (stopped.state, stopped.pid, stopped.uid),
        (PowerState::Stopped, None, a.uid)
    );
    assert!(!is_running(pid_a), "QEMU of A still runs after stop");
    assert_no_cgroups(ID_A);
    assert_eq!(api.stop(ID_A), stopped, "a repeated stop is a no-op");

    // The uid is not compared: other tests' instances may have taken A's
    // while it was stopped, and then A rightly gets another.
    let again = api.start(&image.spec(ID_A, 1, 256, ""));
    assert_eq!(again.state, PowerState::Running, "{again:?}");
    assert_eq!(
        std::fs::metadata(&disk_a).expect("disk of A").ino(),
        disk_inode
    );
    api.wait_for_marker(ID_A, console_a);
    assert_sandboxed(&env, &again, 1, 256);

    // Delete everything: no process, cgroup, directory or disk remains.
    let pids = [pid(&again), pid_b];
    for id in [ID_A, ID_B, ID_C] {
        let report: EraseReport = api.ok("DELETE", &format!("/v1/instances/{id}"), None);
        assert_eq!(report.id, id);
        let erased_at = report.disk_erased_at.clone().expect("disk erased");
        assert!(
            time_is_rfc3339(&erased_at),
            "disk_erased_at {erased_at:?} is not RFC 3339"
        );
        assert!(report.disk_bytes_overwritten > 0, "{report:?}");
        assert!(!env.instance_dir(id).exists(), "{id}: directory left");
        assert_no_cgroups(id);
        // A repeated delete (the controller crashed before recording the first) still says
        // when the disk was erased.
        let again: EraseReport = api.ok("DELETE", &format!("/v1/instances/{id}"), None);
        assert_eq!(again, report, "a repeated delete lost the erase receipt");
    }
    for pid in pids {
        assert!(!is_running(pid), "QEMU {pid} still runs after delete");
    }
    assert!(api.list().is_empty());
    // An id this host never had: nothing erased.
    let never = "5a0c1e2d-7777-4888-9999-000000000000";
    let repeated: EraseReport = api.ok("DELETE", &format!("/v1/instances/{never}"), None);
    assert_eq!(
        (repeated.disk_erased_at, repeated.disk_bytes_overwritten),
        (None, 0)
    );
    assert_no_zombie_children(agent.child.id());
    agent.kill();
}

/// TESTING.md G3: the agent will not serve with a key others can read.
#[test]
fn agent_refuses_a_world_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let key = env.path().join("readable.key");
    std::fs::copy(&env.pki.agent.1, &key).expect("copy key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let output = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("agent")
        .arg("--data-dir")
        .arg(env.data())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--ca")
        .arg(&env.pki.ca)
        .arg("--cert")
        .arg(&env.pki.agent.0)
        .arg("--key")
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .expect("run palisade agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the agent started: {stderr}");
    assert!(stderr.contains("readable by others"), "{stderr}");
}

/// A second agent on a data directory in use would adopt, stop and clean up
/// the first one's instances: it must refuse to start, and leave the first be.
#[test]
fn a_second_agent_on_the_same_data_dir_refuses_to_start() {
    let mut env = Env::new();
    let mut first = env.spawn_agent();
    let data = env.data().canonicalize().expect("data dir");

    let addr_file = env.next_addr_file();
    let output = env
        .agent_command(&data, &addr_file)
        .output()
        .expect("run a second palisade agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second agent ran: {stderr}");
    let expected = format!(
        "another agent is using the data directory {}",
        data.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!addr_file.exists(), "the second agent listened");

    assert!(
        first.child.try_wait().expect("try_wait").is_none(),
        "the first agent stopped"
    );
    let host: HostInfo = env
        .client(&first, Identity::Platform)
        .ok("GET", "/v1/host", None);
    assert!(!host.accelerator.is_empty());
    first.kill();
}

/// "Each VM its own uid" holds across agents: two agents on one host (two
/// data directories) never run two instances under one uid, not even when one
/// agent's stopped instance finds its recorded uid taken by the other's.
#[test]
fn two_agents_on_one_host_never_share_an_instance_uid() {
    let mut env = Env::new();
    let image = GuestImage::locate();
    let (one_data, two_data) = (env.path().join("data-1"), env.path().join("data-2"));
    let one = env.spawn_agent_on(&one_data);
    let two = env.spawn_agent_on(&two_data);
    let (api_one, api_two) = (
        env.client(&one, Identity::Platform),
        env.client(&two, Identity::Platform),
    );

    let d = api_one.start(&image.spec(ID_D, 1, 128, ""));
    let e = api_two.start(&image.spec(ID_E, 1, 128, ""));
    assert_ne!(d.uid, e.uid, "{d:?} {e:?}");
    assert_runs_as(&d);
    assert_runs_as(&e);

    // D stops: its uid is free on the host again, and agent two may take it
    // for F. D's next start must then not reuse it.
    api_one.stop(ID_D);
    let f = api_two.start(&image.spec(ID_F, 1, 128, ""));
    assert_ne!(f.uid, e.uid, "{f:?} {e:?}");
    let d_again = api_one.start(&image.spec(ID_D, 1, 128, ""));
    assert_eq!(d_again.state, PowerState::Running, "{d_again:?}");
    assert!(
        d_again.uid != e.uid && d_again.uid != f.uid,
        "D {d_again:?} shares a uid with E {e:?} or F {f:?}"
    );
    let recorded = std::fs::read_to_string(one_data.join("instances").join(ID_D).join("uid"))
        .expect("D's uid file");
    assert_eq!(recorded.trim(), d_again.uid.to_string());
    for status in [&d_again, &e, &f] {
        assert_runs_as(status);
    }

    for (api, id) in [(&api_one, ID_D), (&api_two, ID_E), (&api_two, ID_F)] {
        let _: EraseReport = api.ok("DELETE", &format!("/v1/instances/{id}"), None);
    }
    one.kill();
    two.kill();
}

/// A guest writing far more to its serial console than the cap (the kernel's
/// whole boot log against a 4 KiB cap) never grows the log on the host past
/// the cap; the reader still gets the newest output at its absolute offsets.
#[test]
fn a_guest_console_never_grows_past_the_cap() {
    const CAP: u64 = 4096;
    let mut env = Env::new();
    let image = GuestImage::locate();
    let agent = env.spawn_agent_with(&["--console-cap-bytes", "4096"]);
    let api = env.client(&agent, Identity::Platform);
    // `ignore_loglevel` undoes the image's `quiet`: the kernel prints everything.
    api.start(&image.spec(ID_G, 1, 128, "ignore_loglevel"));

    let log = env.instance_dir(ID_G).join("console.log");
    let written = poll(BOOT_TIMEOUT, "four times the cap of console output", || {
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(size <= CAP, "console.log is {size} bytes, over the cap");
        let chunk = api.console(ID_G, 0);
        (chunk.next_offset > 4 * CAP).then_some(chunk)
    });
    // Reading from 0 starts at the oldest byte kept, not at what was dropped.
    assert!(written.offset > 0, "{written:?}");
    assert!(written.next_offset - written.offset <= CAP, "{written:?}");
    let _: EraseReport = api.ok("DELETE", &format!("/v1/instances/{ID_G}"), None);
    agent.kill();
}

/// A compromised QEMU owns its `run/` directory and can swap its monitor socket
/// for a link to another VM's: the agent, which runs as root, must still only
/// ever talk to the instance's own QEMU. Stopping H must not stop I.
#[test]
fn a_vm_cannot_point_the_agent_at_another_vms_monitor() {
    let mut env = Env::new();
    let image = GuestImage::locate();
    let agent = env.spawn_agent();
    let api = env.client(&agent, Identity::Platform);
    let h = api.start(&image.spec(ID_H, 1, 128, ""));
    let i = api.start(&image.spec(ID_I, 1, 128, ""));

    // What H's uid may do in its own run/: replace its socket with a link to I's.
    let run_h = env.instance_dir(ID_H).join("root/run");
    let socket_i = env.instance_dir(ID_I).join("root/run/qmp.sock");
    std::fs::rename(run_h.join("qmp.sock"), run_h.join("qmp.real")).expect("rename");
    std::os::unix::fs::symlink(&socket_i, run_h.join("qmp.sock")).expect("symlink");

    let stopped = api.stop(ID_H);
    assert_eq!(stopped.state, PowerState::Stopped, "{stopped:?}");
    assert!(!is_running(pid(&h)), "H still runs");
    assert!(is_running(pid(&i)), "stopping H stopped I through H's link");
    let listed = api.list();
    assert_eq!(
        find(&listed, ID_I).map(|s| s.state),
        Some(PowerState::Running)
    );

    for id in [ID_H, ID_I] {
        let _: EraseReport = api.ok("DELETE", &format!("/v1/instances/{id}"), None);
    }
    agent.kill();
}

/// The QEMU of `status` runs under the uid and gid the agent reported.
fn assert_runs_as(status: &InstanceStatus) {
    let proc_status = proc_status(pid(status));
    let uid = status.uid.to_string();
    for field in ["Uid", "Gid"] {
        let ids = proc_status.get(field).map(String::as_str).unwrap_or("?");
        assert_eq!(
            ids.split_whitespace().collect::<Vec<_>>(),
            [uid.as_str(); 4],
            "{field} of {status:?}"
        );
    }
}

/// No other local user reads the agent's state: the data directory is 0700 and
/// what the agent wrote for a running instance is 0600 (the sandbox above shows
/// that the jailed QEMU still gets into its root below it).
fn assert_private_to_root(env: &Env, id: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&env.data()), 0o700, "the data directory");
    assert_eq!(mode(&env.data().join("agent.lock")), 0o600);
    let dir = env.instance_dir(id);
    for name in ["uid", "spec.json", "pid", "qemu.log", "console.log"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name} of {id}");
    }
}

fn refuses_clients_without_a_platform_certificate(env: &Env, agent: &AgentProcess) {
    for identity in [Identity::None, Identity::ForeignCa] {
        let client = env.client(agent, identity);
        let result = client.try_call("GET", "/v1/host", None);
        assert!(result.is_err(), "{identity:?} was served: {result:?}");
    }
}

fn refuses_bad_input(api: &Api, image: &GuestImage) {
    let spec = serde_json::to_value(image.spec(ID_A, 1, 256, "")).expect("spec");
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            "/v1/instances/..%2F..%2Fetc/start".into(),
            Some(spec.clone()),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/instances/not-a-uuid/stop".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            "POST",
            format!("/v1/instances/{ID_B}/start"),
            Some(spec.clone()),
            400,
            "invalid_request",
        ),
        (
            "POST",
            format!("/v1/instances/{ID_A}/start"),
            Some(with_field(&spec, "debug", json!(true))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            format!("/v1/instances/{ID_A}/start"),
            Some(json!("x".repeat(100_000))),
            413,
            "payload_too_large",
        ),
        (
            "GET",
            format!("/v1/instances/{ID_A}/console?offset=0&verbose=1"),
            None,
            400,
            "invalid_request",
        ),
        (
            "GET",
            format!("/v1/instances/{ID_A}/console"),
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            format!("/v1/instances/{ID_A}/stop"),
            None,
            404,
            "not_found",
        ),
        ("GET", "/v1/nothing".into(), None, 404, "not_found"),
        ("PUT", "/v1/host".into(), None, 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, value) = api.call(method, &path, body);
        let error: Result<ErrorBody, _> = serde_json::from_value(value.clone());
        assert_eq!(got, status, "{method} {path}: {value}");
        assert_eq!(
            error.map(|e| e.error.code).ok().as_deref(),
            Some(code),
            "{method} {path}: {value}"
        );
    }
    assert!(api.list().is_empty(), "bad input created something");
}

fn refuses_an_image_that_does_not_match_its_digest(env: &Env, api: &Api, image: &GuestImage) {
    let mut spec = image.spec(ID_C, 1, 128, "");
    spec.image.kernel_sha256 = "0".repeat(64);
    let (status, value) = api.call(
        "POST",
        &format!("/v1/instances/{ID_C}/start"),
        Some(serde_json::to_value(&spec).expect("spec")),
    );
    assert_eq!(status, 422, "{value}");
    assert_eq!(value["error"]["code"], "image_digest_mismatch", "{value}");

    let run = env.instance_dir(ID_C).join("root/run");
    assert!(
        !run.join("vmlinuz").exists(),
        "the rejected kernel was kept"
    );
    assert!(
        qemu_pids_of(ID_C).is_empty(),
        "a QEMU runs for the rejected image"
    );
    assert_no_cgroups(ID_C);
    let listed = api.list();
    let c = find(&listed, ID_C).expect("C has a directory, so it is listed");
    assert_eq!((c.state, c.pid), (PowerState::Stopped, None));
}

/// TESTING.md G1, for one running instance.
fn assert_sandboxed(env: &Env, status: &InstanceStatus, vcpus: u64, memory_mib: u64) {
    let pid = pid(status);
    let proc_status = proc_status(pid);
    let field = |name: &str| proc_status.get(name).map(String::as_str).unwrap_or("?");
    let uid = status.uid.to_string();
    assert!(status.uid >= 200_000, "{status:?}");
    assert_eq!(
        field("Uid").split_whitespace().collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(
        field("Gid").split_whitespace().collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(field("Groups"), "");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}");
    }

    let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("read /proc/pid/root");
    assert_eq!(root, env.instance_dir(&status.id).join("root"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.starts_with("/usr/bin/qemu-system-x86_64 "),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains("-runas") && !cmdline.contains("-chroot"),
        "{cmdline}"
    );

    let limits = [
        ("memory", (memory_mib + 192) << 20),
        ("cpu", vcpus * 100_000),
        ("pids", 120 + vcpus * 8),
    ];
    Cgroups::detect().assert_member_with_limits(&status.id, pid, &limits);
}

// ---- the environment --------------------------------------------------------

pub(crate) struct Env {
    dir: Option<tempfile::TempDir>,
    pki: Pki,
    log: PathBuf,
    agent_starts: u32,
}

pub(crate) struct AgentProcess {
    child: Child,
    addr: SocketAddr,
}

impl Env {
    pub(crate) fn new() -> Env {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the agent integration test needs root (chroot, setuid, cgroups)"
        );
        let dir = tempfile::Builder::new()
            .prefix("palisade-agent-it-")
            .tempdir()
            .expect("tempdir");
        let pki = Pki::generate(dir.path());
        let log = dir.path().join("agent.log");
        Env {
            dir: Some(dir),
            pki,
            log,
            agent_starts: 0,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// Ids of the instances this test's agents have directories for, in any
    /// of the data directories below the temp dir.
    fn instance_ids(&self) -> Vec<String> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir.path()) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| std::fs::read_dir(e.ok()?.path().join("instances")).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| ALL_IDS.contains(&name.as_str()))
            .collect()
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.data().join("instances").join(id)
    }

    pub(crate) fn spawn_agent(&mut self) -> AgentProcess {
        self.spawn_agent_on(&self.data())
    }

    /// `palisade agent` on `data`, any free port, the test PKI.
    fn agent_command(&self, data: &Path, addr_file: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_palisade"));
        command
            .arg("agent")
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--addr-file")
            .arg(addr_file)
            .arg("--ca")
            .arg(&self.pki.ca)
            .arg("--cert")
            .arg(&self.pki.agent.0)
            .arg("--key")
            .arg(&self.pki.agent.1)
            .env("RUST_LOG", "info,palisade_agent=debug")
            .stdin(Stdio::null());
        command
    }

    fn next_addr_file(&mut self) -> PathBuf {
        self.agent_starts += 1;
        self.path()
            .join(format!("agent-{}.addr", self.agent_starts))
    }

    fn spawn_agent_on(&mut self, data: &Path) -> AgentProcess {
        self.spawn_agent_args(data, &[])
    }

    fn spawn_agent_with(&mut self, extra: &[&str]) -> AgentProcess {
        self.spawn_agent_args(&self.data(), extra)
    }

    fn spawn_agent_args(&mut self, data: &Path, extra: &[&str]) -> AgentProcess {
        let addr_file = self.next_addr_file();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut child = self
            .agent_command(data, &addr_file)
            .args(extra)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn palisade agent");

        let addr = poll(Duration::from_secs(30), "the agent to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited with {status}");
            }
            let text = std::fs::read_to_string(&addr_file).ok()?;
            text.trim().parse().ok()
        });
        AgentProcess { child, addr }
    }

    pub(crate) fn client(&self, agent: &AgentProcess, identity: Identity) -> Api {
        Api::new(&self.pki, identity, agent.addr)
    }
}

impl AgentProcess {
    /// SIGKILL, as a crash would.
    pub(crate) fn kill(mut self) {
        self.child.kill().expect("SIGKILL the agent");
        self.child.wait().expect("reap the agent");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(20_000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("--- agent.log (tail) ---\n{tail}");
        }
        // QEMU outlives its agent by design; the test's must not outlive the
        // test. Only this test's: tests run in parallel, each with its own ids.
        let ids = self.instance_ids();
        for id in &ids {
            for pid in qemu_pids_of(id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(5);
            for dir in Cgroups::detect().dirs(id) {
                while dir.exists()
                    && std::fs::remove_dir(&dir).is_err()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // The agent's network namespace (named after its data directory) goes with the test.
        if let Ok(data) = self.data().canonicalize() {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
            let name = format!("pal-{}", &hex::encode(digest)[..10]);
            // Its own, and its VPC routers' (`<name>-r<vni>`).
            for entry in std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
            {
                let ns = entry.file_name().to_string_lossy().into_owned();
                if ns == name || ns.starts_with(&format!("{name}-")) {
                    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
                }
            }
        }
        if failed {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

// ---- certificates -----------------------------------------------------------

/// A platform CA with the agent's server certificate and a client certificate,
/// plus a client certificate from a foreign CA.
pub(crate) struct Pki {
    ca: PathBuf,
    agent: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    foreign_client: (PathBuf, PathBuf),
}

impl Pki {
    fn generate(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = dir.join("pki");
        std::fs::create_dir(&dir).expect("mkdir pki");
        let write = |name: &str, pem: String| {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("create pem");
            file.write_all(pem.as_bytes()).expect("write pem");
            path
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).expect("CA cert");
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>, names: Vec<String>, usage| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, issuer).expect("cert");
            (cert.pem(), key.serialize_pem())
        };

        let (ca_pem, platform) = ca("palisade test CA");
        let (_, foreign) = ca("foreign CA");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let agent = leaf(&platform, names, ExtendedKeyUsagePurpose::ServerAuth);
        let client = leaf(
            &platform,
            vec!["controller".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let foreign_client = leaf(
            &foreign,
            vec!["controller".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", ca_pem),
            agent: (write("agent.pem", agent.0), write("agent.key", agent.1)),
            client: (write("client.pem", client.0), write("client.key", client.1)),
            foreign_client: (
                write("foreign.pem", foreign_client.0),
                write("foreign.key", foreign_client.1),
            ),
        }
    }
}

// ---- the API client ---------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub(crate) enum Identity {
    Platform,
    None,
    ForeignCa,
}

pub(crate) struct Api {
    runtime: Arc<tokio::runtime::Runtime>,
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(pki: &Pki, identity: Identity, addr: SocketAddr) -> Api {
        let identity = match identity {
            Identity::Platform => Some((pki.client.0.as_path(), pki.client.1.as_path())),
            Identity::None => None,
            Identity::ForeignCa => Some((
                pki.foreign_client.0.as_path(),
                pki.foreign_client.1.as_path(),
            )),
        };
        let tls = palisade_common::tls::client_config(&pki.ca, identity).expect("client TLS");
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Api {
            runtime: Arc::new(runtime),
            client,
            base: format!("https://{addr}"),
        }
    }

    pub(crate) fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.runtime.block_on(async {
            let response = request.send().await.map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(|e| format!("{e:?}"))?;
            let value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            Ok((status, value))
        })
    }

    /// Types `text` on an instance's serial console.
    pub(crate) fn type_on_console(&self, id: &str, text: &str) {
        let url = format!("{}/v1/instances/{id}/console", self.base);
        let request = self.client.post(url).body(text.to_string());
        let status = self
            .runtime
            .block_on(async { request.send().await.map(|r| r.status().as_u16()) })
            .unwrap_or_else(|e| panic!("console input: {e:?}"));
        assert_eq!(status, 204, "console input to {id}");
    }

    pub(crate) fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub(crate) fn ok<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> T {
        let (status, value) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {value}");
        serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {value}"))
    }

    pub(crate) fn start(&self, spec: &InstanceSpec) -> InstanceStatus {
        let body = serde_json::to_value(spec).expect("spec");
        self.ok(
            "POST",
            &format!("/v1/instances/{}/start", spec.id),
            Some(body),
        )
    }

    pub(crate) fn stop(&self, id: &str) -> InstanceStatus {
        self.ok("POST", &format!("/v1/instances/{id}/stop"), None)
    }

    pub(crate) fn list(&self) -> Vec<InstanceStatus> {
        self.ok("GET", "/v1/instances", None)
    }

    pub(crate) fn console(&self, id: &str, offset: u64) -> ConsoleChunk {
        self.ok(
            "GET",
            &format!("/v1/instances/{id}/console?offset={offset}"),
            None,
        )
    }

    /// Reads the console from `offset` until the boot marker shows up; returns
    /// the offset just past it.
    pub(crate) fn wait_for_marker(&self, id: &str, offset: u64) -> u64 {
        let mut text = String::new();
        let mut next = offset;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let chunk = self.console(id, next);
            assert!(chunk.offset >= next, "console went back: {chunk:?}");
            text.push_str(&chunk.data.replace('\r', ""));
            next = chunk.next_offset;
            if text.lines().any(|line| line.trim() == MARKER) {
                return next;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: no {MARKER} within {BOOT_TIMEOUT:?}; console from {offset}:\n{text}"
            );
            if chunk.data.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Reads until no more console output comes; returns the end offset.
    pub(crate) fn read_to_end(&self, id: &str, mut offset: u64) -> u64 {
        loop {
            let chunk = self.console(id, offset);
            if chunk.data.is_empty() {
                return chunk.next_offset;
            }
            offset = chunk.next_offset;
        }
    }
}

// ---- the guest image ----------------------------------------------------------

pub(crate) struct GuestImage {
    dir: PathBuf,
    manifest: Value,
}

impl GuestImage {
    pub(crate) fn locate() -> GuestImage {
        let dir = std::env::var_os("PALISADE_GUEST_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"));
        let manifest = std::fs::read(dir.join("image.json")).unwrap_or_else(|e| {
            panic!(
                "no guest image at {} ({e}); build it with `images/build-guest.sh build/guest` \
                 or point PALISADE_GUEST_IMAGE at one",
                dir.display()
            )
        });
        let manifest = serde_json::from_slice(&manifest).expect("image.json is JSON");
        GuestImage { dir, manifest }
    }

    fn field(&self, name: &str) -> String {
        self.manifest[name]
            .as_str()
            .unwrap_or_else(|| panic!("image.json has no {name}"))
            .to_string()
    }

    pub(crate) fn spec(&self, id: &str, vcpus: u32, memory_mib: u32, extra: &str) -> InstanceSpec {
        let cmdline = format!("{} {extra}", self.field("cmdline"))
            .trim()
            .to_string();
        InstanceSpec {
            id: id.to_string(),
            vcpus,
            memory_mib,
            disk_gib: 1,
            image: ImageSpec {
                kernel_path: self.dir.join(self.field("kernel")).display().to_string(),
                kernel_sha256: self.field("kernel_sha256"),
                initrd_path: self.dir.join(self.field("initrd")).display().to_string(),
                initrd_sha256: self.field("initrd_sha256"),
                cmdline,
            },
            nics: vec![],
        }
    }
}

// ---- cgroups, as the test sees them ----------------------------------------------

enum Cgroups {
    V1,
    V2,
}

impl Cgroups {
    fn detect() -> Cgroups {
        if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            Cgroups::V2
        } else {
            Cgroups::V1
        }
    }

    fn version(&self) -> &'static str {
        match self {
            Cgroups::V1 => "v1",
            Cgroups::V2 => "v2",
        }
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1 => ["cpu", "memory", "pids"]
                .iter()
                .map(|c| Path::new(CGROUP_ROOT).join(c).join("palisade").join(id))
                .collect(),
            Cgroups::V2 => vec![Path::new(CGROUP_ROOT).join("palisade").join(id)],
        }
    }

    fn assert_member_with_limits(&self, id: &str, pid: u32, limits: &[(&str, u64)]) {
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let group = format!("/palisade/{id}");
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .trim()
                .to_string()
        };
        for (controller, limit) in limits {
            let (dir, file, expected) = match self {
                Cgroups::V1 => {
                    let dir = Path::new(CGROUP_ROOT)
                        .join(controller)
                        .join("palisade")
                        .join(id);
                    let file = match *controller {
                        "memory" => "memory.limit_in_bytes",
                        "cpu" => "cpu.cfs_quota_us",
                        _ => "pids.max",
                    };
                    let line = membership
                        .lines()
                        .find(|l| l.split(':').nth(1) == Some(controller))
                        .unwrap_or_else(|| panic!("no {controller} line in {membership}"));
                    assert!(line.ends_with(&format!(":{group}")), "{line}");
                    (dir, file, limit.to_string())
                }
                Cgroups::V2 => {
                    let dir = Path::new(CGROUP_ROOT).join("palisade").join(id);
                    assert!(
                        membership.lines().any(|l| l == format!("0::{group}")),
                        "{membership}"
                    );
                    match *controller {
                        "memory" => (dir, "memory.max", limit.to_string()),
                        "cpu" => (dir, "cpu.max", format!("{limit} 100000")),
                        _ => (dir, "pids.max", limit.to_string()),
                    }
                }
            };
            assert_eq!(read(dir.join(file)), expected, "{controller} limit of {id}");
            // No guest memory may go to swap: v1 caps memory plus swap at the memory
            // limit, v2 sets swap to zero (where the kernel offers the file).
            let swap = match self {
                Cgroups::V1 => ("memory.memsw.limit_in_bytes", expected.clone()),
                Cgroups::V2 => ("memory.swap.max", "0".to_string()),
            };
            if *controller == "memory" && dir.join(swap.0).exists() {
                assert_eq!(read(dir.join(swap.0)), swap.1, "swap limit of {id}");
            }
            let procs = read(dir.join("cgroup.procs"));
            assert!(
                procs.lines().any(|p| p == pid.to_string()),
                "{pid} not in {}",
                dir.display()
            );
        }
    }
}

fn assert_no_cgroups(id: &str) {
    for dir in Cgroups::detect().dirs(id) {
        assert!(!dir.exists(), "{} remains", dir.display());
    }
}

// ---- processes ----------------------------------------------------------------------

fn pid(status: &InstanceStatus) -> u32 {
    status.pid.unwrap_or_else(|| panic!("no pid in {status:?}"))
}

fn find<'a>(list: &'a [InstanceStatus], id: &str) -> Option<&'a InstanceStatus> {
    list.iter().find(|s| s.id == id)
}

fn proc_status(pid: u32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/pid/status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Live QEMU processes whose command line names instance `id`.
fn qemu_pids_of(id: &str) -> Vec<u32> {
    let needle = format!("guest={id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).split('\0').any(|w| w == needle))
                .unwrap_or(false)
        })
        .filter(|pid| is_running(*pid))
        .collect()
}

fn assert_no_zombie_children(parent: u32) {
    let entries = std::fs::read_dir("/proc").expect("/proc");
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&parent.to_string().as_str()) {
            assert_ne!(fields[0], "Z", "zombie child {pid} of the agent");
        }
    }
}

/// Runs one QMP command on a QEMU monitor socket, as a host operator would,
/// and returns its answer.
fn qmp(socket: &Path, command: &str) -> Value {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    for execute in ["qmp_capabilities", command] {
        writeln!(writer, "{}", json!({ "execute": execute })).expect("write");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("answer");
            assert!(!line.contains("\"error\""), "{execute}: {line}");
            if line.contains("\"return\"") {
                break;
            }
        }
    }
    let answer: Value = serde_json::from_str(&line).expect("QMP answer is JSON");
    answer["return"].clone()
}

/// What the guest can see, asked of the running QEMU itself rather than read
/// from its command line: no display, no USB controller, no virtio-serial
/// (the channel a clipboard agent would use), no sound.
fn assert_no_side_channel_devices(env: &Env, id: &str) {
    let socket = env.instance_dir(id).join("root/run/qmp.sock");
    let buses = qmp(&socket, "query-pci");
    let devices: Vec<Value> = buses
        .as_array()
        .expect("query-pci returns a list")
        .iter()
        .flat_map(|bus| bus["devices"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(!devices.is_empty(), "query-pci found no devices: {buses}");
    for device in &devices {
        let class = device["class_info"]["class"].as_u64().expect("class");
        let (vendor, product) = (
            device["id"]["vendor"].as_u64().unwrap_or(0),
            device["id"]["device"].as_u64().unwrap_or(0),
        );
        let what = device["class_info"]["desc"].as_str().unwrap_or("?");
        // 0x03xx display, 0x0c03 USB, 0x04xx multimedia (sound).
        assert!(
            class >> 8 != 0x03 && class != 0x0c03 && class >> 8 != 0x04,
            "{id}: guest sees a {what} device (class {class:#06x})"
        );
        // virtio-serial: vendor 0x1af4, device 0x1003 (legacy) or 0x1043 (modern).
        assert!(
            !(vendor == 0x1af4 && (product == 0x1003 || product == 0x1043)),
            "{id}: guest sees a virtio-serial device"
        );
    }
}

fn with_field(value: &Value, name: &str, field: Value) -> Value {
    let mut value = value.clone();
    value[name] = field;
    value
}

fn time_is_rfc3339(text: &str) -> bool {
    // e.g. 2026-12-03T16:28:00.123456Z
    let bytes = text.as_bytes();
    bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && (text.ends_with('Z') || text[19..].contains('+'))
}
