//! `palisade up` as an operator runs it: SIGTERM stops the controller and the agent (no
//! orphans left); a controller that fails after the first start is retried with a growing
//! back-off while the agent keeps running; a controller that fails at the first start is a
//! clear error at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::{free_port, guest_image, is_running, palisade_bin, poll};

#[test]
fn up_retries_a_failing_controller_and_stops_everything_on_sigterm() {
    let mut up = Up::spawn();
    poll(Duration::from_secs(120), "palisade up to be up", || {
        up.assert_running();
        up.stdout().contains("Palisade is up").then_some(())
    });
    let controller = up.child_process("controller");
    let agent = up.child_process("agent");

    // After the first start, the controller fails: its audit log no longer verifies. Up
    // retries it with a growing back-off, says where to look, and leaves the agent alone.
    let audit = up.data.join("audit/audit.log");
    let intact = std::fs::read(&audit).unwrap();
    append(&audit, b"not an audit record\n");
    signal(controller, Signal::SIGKILL);
    poll(
        Duration::from_secs(60),
        "three restarts of the controller",
        || {
            up.assert_running();
            up.stderr()
                .contains("restarting the controller in 4 s")
                .then_some(())
        },
    );
    let stderr = up.stderr();
    for expected in [
        "the controller exited (signal: 9",
        "restarting the controller in 1 s",
        "restarting the controller in 2 s",
        "fails verification",
        &up.data.join("logs/controller.log").display().to_string(),
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in:\n{stderr}");
    }
    assert!(is_running(agent), "the agent stopped with the controller");
    assert_eq!(up.child_process("agent"), agent, "the agent was restarted");

    // Once the log verifies again, the next retry brings the controller back.
    std::fs::write(&audit, intact).unwrap();
    poll(
        Duration::from_secs(60),
        "the controller to run again",
        || {
            up.assert_running();
            up.stderr()
                .contains("the controller is running again")
                .then_some(())
        },
    );
    std::net::TcpStream::connect(("127.0.0.1", up.listen)).unwrap();
    let controller = up.child_process("controller");

    // SIGTERM stops up and both processes, gracefully.
    signal(up.child.id(), Signal::SIGTERM);
    let status = poll(Duration::from_secs(30), "palisade up to exit", || {
        up.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}\n{}", up.stderr());
    for (name, pid) in [("controller", controller), ("agent", agent)] {
        assert!(!is_running(pid), "the {name} ({pid}) outlived palisade up");
    }
    let agent_log = std::fs::read_to_string(up.data.join("logs/agent.log")).unwrap();
    assert!(agent_log.contains("shutting down"), "{agent_log}");

    // A first start that fails stops at once, says why and where to look, and starts no agent.
    append(&audit, b"not an audit record\n");
    let again = Command::new(palisade_bin())
        .args(up.args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{stderr}");
    for expected in [
        "the controller did not start",
        "fails verification",
        "logs/controller.log",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in:\n{stderr}");
    }
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("Palisade is up"),
        "{stderr}"
    );
    up.finished = true;
}

/// `palisade up` killed with SIGKILL cannot stop its children: they end with it all the same,
/// and a new `palisade up` on the same data directory starts.
#[test]
fn the_controller_and_agent_end_with_a_killed_up() {
    let mut up = Up::spawn();
    poll(Duration::from_secs(120), "palisade up to be up", || {
        up.assert_running();
        up.stdout().contains("Palisade is up").then_some(())
    });
    let children = [up.child_process("controller"), up.child_process("agent")];
    signal(up.child.id(), Signal::SIGKILL);
    let _ = up.child.wait();
    poll(Duration::from_secs(20), "the children to end", || {
        children.iter().all(|pid| !is_running(*pid)).then_some(())
    });
    up.finished = true;

    let mut again = Command::new(palisade_bin())
        .args(up.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(again.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("Palisade is up") {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "the second palisade up ended early:\n{seen}");
        seen.push_str(&line);
    }
    let restarted = children_of(again.id());
    signal(again.id(), Signal::SIGTERM);
    assert!(again.wait().unwrap().success());
    for pid in restarted {
        assert!(!is_running(pid), "{pid} outlived the second palisade up");
    }
}

#[test]
fn the_quickstart_enrols_the_administrator_with_mfa_and_boots_the_demo_vm() {
    let mut up = Up::spawn_with(true);
    poll(Duration::from_secs(240), "the quickstart to finish", || {
        up.assert_running();
        up.stdout().contains("Try: ").then_some(())
    });
    let out = up.stdout();
    for expected in [
        "otpauth://totp/",
        "Recovery codes",
        "PALISADE-BOOT-OK",
        "mfa verify",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    let cli = |args: &[&str]| {
        let output = Command::new(palisade_bin())
            .env("PALISADE_CONFIG", up.path().join("cli/config.json"))
            .env_remove("PALISADE_PROFILE")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "palisade {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    // The administrator's profile works for administrative calls (its key carries the
    // enrolment's fresh second factor); the demo user administers the demo tenant.
    assert!(cli(&["--profile", "admin", "tenant", "list"]).contains("demo"));
    let me: serde_json::Value =
        serde_json::from_str(&cli(&["--profile", "demo", "--json", "whoami"])).unwrap();
    assert_eq!(me["user"]["role"], "tenant_admin");
    assert_eq!(me["user"]["name"], "demo@demo");
    let vms: serde_json::Value =
        serde_json::from_str(&cli(&["--profile", "demo", "--json", "instance", "list"])).unwrap();
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "demo-vm")
        .expect("the demo VM is listed");
    // Leave no VM behind.
    cli(&[
        "--profile",
        "demo",
        "instance",
        "delete",
        vm["id"].as_str().unwrap(),
        "--wait",
    ]);
    signal(up.child.id(), Signal::SIGTERM);
    let status = poll(Duration::from_secs(30), "palisade up to exit", || {
        up.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}\n{}", up.stderr());
    up.finished = true;
}

/// A `palisade up` on a temp dir and free ports, its stdout and stderr in files.
struct Up {
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    listen: u16,
    agent_listen: u16,
    child: Child,
    finished: bool,
}

impl Up {
    fn spawn() -> Up {
        Up::spawn_with(false)
    }

    fn spawn_with(quickstart: bool) -> Up {
        let dir = tempfile::Builder::new()
            .prefix("palisade-up-it-")
            .tempdir()
            .unwrap();
        let (listen, agent_listen) = (free_port(), free_port());
        let data = dir.path().join("data");
        let file = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let mut args = up_args(&data, listen, agent_listen);
        if quickstart {
            args.retain(|a| a != "--no-quickstart");
        }
        let child = Command::new(palisade_bin())
            .args(args)
            .env("PALISADE_CONFIG", dir.path().join("cli/config.json"))
            .stdin(Stdio::null())
            .stdout(file("up.out"))
            .stderr(file("up.err"))
            .spawn()
            .unwrap();
        Up {
            dir: Some(dir),
            data,
            listen,
            agent_listen,
            child,
            finished: false,
        }
    }

    fn args(&self) -> Vec<String> {
        up_args(&self.data, self.listen, self.agent_listen)
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.path().join("up.out")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path().join("up.err")).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("palisade up exited ({status}):\n{}", self.stderr());
        }
    }

    /// The pid of up's child running `palisade <role>`.
    fn child_process(&self, role: &str) -> u32 {
        let found: Vec<u32> = children_of(self.child.id())
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.split(|b| *b == 0).nth(1) == Some(role.as_bytes())
            })
            .collect();
        assert_eq!(found.len(), 1, "{role} children of palisade up: {found:?}");
        found[0]
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let children = children_of(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            signal(pid, Signal::SIGKILL);
        }
        if !self.finished {
            eprintln!("--- palisade up stdout ---\n{}", self.stdout());
            eprintln!("--- palisade up stderr ---\n{}", self.stderr());
            for name in ["controller.log", "agent.log"] {
                let log = std::fs::read_to_string(self.data.join("logs").join(name));
                eprintln!("--- {name} ---\n{}", log.unwrap_or_default());
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("--- kept {} ---", dir.keep().display());
            }
        }
    }
}

fn up_args(data: &Path, listen: u16, agent_listen: u16) -> Vec<String> {
    [
        "up",
        "--no-quickstart",
        "--data-dir",
        &data.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--agent-listen",
        &format!("127.0.0.1:{agent_listen}"),
        "--guest-image",
        &guest_image().display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

fn signal(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// Live (non-zombie) processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.get(1) == Some(&parent.as_str()) && !matches!(fields[0], "Z" | "X")
        })
        .collect()
}
