//! The test harness: a real platform (controller + agent processes of the real `palisade`
//! binary) on a temp dir and free ports, driven through the real CLI or a signing client.
//! When a test fails, the processes' logs are printed (the temp dir is kept for a look).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use palisade_cli::client::{ApiError, Client};
use palisade_common::api;
use serde_json::Value;

pub const BOOT_MARKER: &str = "PALISADE-BOOT-OK";

pub fn palisade_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_palisade"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guest image: `$PALISADE_GUEST_IMAGE`, else `<workspace>/build/guest`.
pub fn guest_image() -> PathBuf {
    let dir = std::env::var_os("PALISADE_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/guest"));
    assert!(
        dir.join("image.json").exists(),
        "no guest image at {} — build it with images/build-guest.sh {}",
        dir.display(),
        dir.display()
    );
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Platform {
    pub dir: tempfile::TempDir,
    /// The guest image directory the controller registers at start.
    pub image: PathBuf,
    /// Extra `palisade controller` arguments, kept for restarts.
    pub controller_args: Vec<String>,
    pub endpoint: String,
    pub agent_port: u16,
    pub initial_password: Option<String>,
    /// `RUST_LOG` of the controller and the agent, kept for restarts.
    pub log_filter: String,
    controller: Option<Child>,
    agent: Option<Child>,
    runtime: tokio::runtime::Runtime,
}

impl Platform {
    /// Starts a fresh platform: controller first (it makes the PKI), then the agent.
    pub fn start() -> Platform {
        Platform::start_with_image(guest_image())
    }

    /// A fresh platform whose controller gets `args` as well.
    pub fn start_with_args(args: &[&str]) -> Platform {
        Platform::start_inner(guest_image(), args.iter().map(|a| a.to_string()).collect())
    }

    pub fn start_with_image(image: PathBuf) -> Platform {
        Platform::start_inner(image, Vec::new())
    }

    fn start_inner(image: PathBuf, controller_args: Vec<String>) -> Platform {
        let dir = tempfile::Builder::new()
            .prefix("palisade-it-")
            .tempdir()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut platform = Platform {
            dir,
            image,
            controller_args,
            endpoint: String::new(),
            agent_port: free_port(),
            initial_password: None,
            log_filter: "info".to_string(),
            controller: None,
            agent: None,
            runtime,
        };
        platform.start_controller();
        platform.start_agent();
        platform
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.data().join("pki/ca.pem")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.data().join("audit/audit.log")
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data().join(name))
            .unwrap()
    }

    pub fn start_controller(&mut self) {
        let listen = if self.endpoint.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.endpoint.trim_start_matches("https://").to_string()
        };
        let mut child = Command::new(palisade_bin())
            .arg("controller")
            .arg("--data-dir")
            .arg(self.data())
            .arg("--listen")
            .arg(&listen)
            .arg("--agent-url")
            .arg(format!("https://127.0.0.1:{}", self.agent_port))
            .arg("--guest-image")
            .arg(&self.image)
            .arg("--reconcile-interval-secs")
            .arg("1")
            .args(&self.controller_args)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log("controller.log"))
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .unwrap_or_else(|| {
                    panic!(
                        "controller exited at start:\n{}",
                        self.tail("controller.log")
                    )
                })
                .unwrap();
            if let Some(p) = line.strip_prefix("PALISADE-INITIAL-ADMIN-PASSWORD ") {
                self.initial_password = Some(p.to_string());
            }
            if let Some(url) = line.strip_prefix("PALISADE-API-LISTENING ") {
                self.endpoint = url.to_string();
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.controller = Some(child);
    }

    /// Starts the agent on `agent_port` and waits until it says it listens. The port was
    /// free when chosen, but another test's server may take it before the agent binds it: then
    /// the agent exits, and it is started on a new port, the controller restarted to match.
    pub fn start_agent(&mut self) {
        for _ in 0..5 {
            if self.try_start_agent() {
                return;
            }
            self.agent_port = free_port();
            if self.controller.is_some() {
                self.kill_controller();
                self.start_controller();
            }
        }
        panic!("the agent could not listen:\n{}", self.tail("agent.log"));
    }

    fn try_start_agent(&mut self) -> bool {
        let pki = self.data().join("pki");
        let addr_file = self.data().join("agent.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = Command::new(palisade_bin())
            .arg("agent")
            .arg("--data-dir")
            .arg(self.data().join("agent"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.agent_port))
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("agent.pem"))
            .arg("--key")
            .arg(pki.join("agent.key"))
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(self.log("agent.log"))
            .stderr(self.log("agent.log"))
            .spawn()
            .unwrap();
        // Its own word that it listens, not a connection that anything on the port accepts.
        let listening = poll(Duration::from_secs(30), "the agent to listen", || {
            if addr_file.exists() {
                return Some(true);
            }
            child.try_wait().unwrap().map(|_| false)
        });
        self.agent = Some(child);
        listening
    }

    /// kill -9, as a crash would.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as an operator's stop would, and waits for the exit.
    pub fn stop_controller(&mut self) {
        if let Some(mut child) = self.controller.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// The audit log's head files: beside the log, and in the separate head store.
    pub fn audit_heads(&self) -> [PathBuf; 2] {
        [
            self.data().join("audit/heads.jsonl"),
            self.data().join("audit-heads/heads.jsonl"),
        ]
    }

    /// The key of the audit log's first head: what an operator publishes.
    pub fn audit_head_key(&self) -> String {
        let text = std::fs::read_to_string(&self.audit_heads()[1]).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        first["key"].as_str().unwrap().to_string()
    }

    /// `palisade audit verify` of `log` against both head stores, the published key pinned.
    pub fn verify_audit(&self, log: &Path) -> Output {
        let [a, b] = self.audit_heads();
        let key = self.audit_head_key();
        let (log, a, b) = (
            log.display().to_string(),
            a.display().to_string(),
            b.display().to_string(),
        );
        self.cli(&[
            "audit", "verify", "--log", &log, "--heads", &a, "--heads", &b, "--key", &key,
        ])
    }

    pub fn kill_controller(&mut self) {
        if let Some(mut child) = self.controller.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.data().join(name)).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text[start..].to_string()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// An unsigned client (password routes only).
    pub fn anonymous(&self) -> Client {
        Client::new(&self.endpoint, &self.ca(), None).unwrap()
    }

    /// Changes `user`'s password and registers a fresh key; returns a signing client.
    /// Platform accounts (no tenant) must use a second factor: for them TOTP is enrolled first
    /// and the key is made with a code, so it carries a fresh MFA proof.
    pub fn enrol(&self, user: &str, initial: &str) -> Signer {
        let password = format!("Secret-{}-Pass", free_port());
        let anonymous = self.anonymous();
        let change = api::PasswordChange {
            user: user.into(),
            current_password: initial.into(),
            new_password: password.clone(),
            totp_code: None,
            recovery_code: None,
            webauthn: None,
        };
        let _: Value = self
            .block_on(anonymous.post("/v1/auth/password", &change))
            .unwrap();
        let key = SigningKey::from_bytes(&rand_bytes());
        let mut create = api::KeyCreate {
            user: user.into(),
            password: password.clone(),
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name: None,
            totp_code: None,
            recovery_code: None,
            webauthn: None,
            expires_in_days: None,
        };
        let mut totp = None;
        let first = self
            .block_on(anonymous.post("/v1/auth/keys", &create))
            .map_err(api_error);
        let created: api::ApiKey = match first {
            Ok(created) => created,
            Err(e) if e.code == "mfa_enrolment_required" => {
                let (uri, _) = self.enrol_totp(user, &password);
                create.totp_code = Some(totp_code(&uri, 0));
                totp = Some(uri);
                self.block_on(anonymous.post("/v1/auth/keys", &create))
                    .unwrap()
            }
            Err(e) => panic!("creating a key for {user}: {} {}", e.status, e.code),
        };
        Signer {
            client: Client::new(
                &self.endpoint,
                &self.ca(),
                Some((created.id.clone(), key.clone())),
            )
            .unwrap(),
            key_id: created.id,
            key,
            user: user.to_string(),
            password,
            totp,
        }
    }

    /// Enrols TOTP for `user`; returns the otpauth URI and the recovery codes. The confirming
    /// code is the previous step's (accepted with one step of skew), so the current step's
    /// code is still unused afterwards.
    pub fn enrol_totp(&self, user: &str, password: &str) -> (String, Vec<String>) {
        let anonymous = self.anonymous();
        let enrolment: api::TotpEnrolment = self
            .block_on(anonymous.post(
                "/v1/auth/mfa/totp",
                &api::TotpEnrol {
                    user: user.into(),
                    password: password.into(),
                },
            ))
            .unwrap();
        let codes: api::RecoveryCodes = self
            .block_on(anonymous.post(
                "/v1/auth/mfa/totp/confirm",
                &api::TotpConfirm {
                    user: user.into(),
                    password: password.into(),
                    code: totp_code(&enrolment.otpauth_uri, -30),
                },
            ))
            .unwrap();
        (enrolment.otpauth_uri, codes.recovery_codes)
    }

    /// A new key for a user enrolled with TOTP `uri`, made with the current step's code.
    pub fn key_with_totp(&self, user: &str, password: &str, uri: &str) -> Signer {
        let key = SigningKey::from_bytes(&rand_bytes());
        let create = api::KeyCreate {
            user: user.into(),
            password: password.into(),
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name: None,
            totp_code: Some(totp_code(uri, 0)),
            recovery_code: None,
            webauthn: None,
            expires_in_days: None,
        };
        let created: api::ApiKey = self
            .block_on(self.anonymous().post("/v1/auth/keys", &create))
            .unwrap();
        self.signer(user, password, &created.id, key, Some(uri.to_string()))
    }

    /// A new key for an already enrolled user (after a role change ended the old ones).
    pub fn enrol_again(&self, s: &Signer) -> Signer {
        let key = SigningKey::from_bytes(&rand_bytes());
        let create = api::KeyCreate {
            user: s.user.clone(),
            password: s.password.clone(),
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name: None,
            totp_code: s.totp.as_deref().map(|uri| totp_code(uri, 0)),
            recovery_code: None,
            webauthn: None,
            expires_in_days: None,
        };
        let created: api::ApiKey = self
            .block_on(self.anonymous().post("/v1/auth/keys", &create))
            .unwrap();
        self.signer(&s.user, &s.password, &created.id, key, s.totp.clone())
    }

    /// Gives `s`'s account `role` (which ends its keys) and returns a fresh key for it.
    pub fn promote(&self, admin: &Signer, s: &Signer, role: &str) -> Signer {
        let me: api::Whoami = self.block_on(s.client.get("/v1/whoami")).unwrap();
        let r = self.raw().signed(
            self,
            admin,
            "PUT",
            &format!("/v1/users/{}/role", me.user.id),
            &serde_json::to_vec(&serde_json::json!({ "role": role })).unwrap(),
        );
        assert_eq!(r.status, 204, "{:?}", r.body);
        self.enrol_again(s)
    }

    /// Another handle on the same key.
    pub fn clone_signer(&self, s: &Signer) -> Signer {
        self.signer(
            &s.user,
            &s.password,
            &s.key_id,
            s.key.clone(),
            s.totp.clone(),
        )
    }

    /// A signer for a key registered by other means.
    pub fn signer(
        &self,
        user: &str,
        password: &str,
        key_id: &str,
        key: SigningKey,
        totp: Option<String>,
    ) -> Signer {
        Signer {
            client: Client::new(
                &self.endpoint,
                &self.ca(),
                Some((key_id.to_string(), key.clone())),
            )
            .unwrap(),
            key_id: key_id.to_string(),
            key,
            user: user.to_string(),
            password: password.to_string(),
            totp,
        }
    }

    /// Creates a platform account with `role`, enrolled (with TOTP).
    pub fn platform_account(&self, admin: &Signer, name: &str, role: &str) -> Signer {
        let created: api::UserCreated = self
            .block_on(admin.client.post(
                "/v1/users",
                &api::UserCreate {
                    name: name.into(),
                    tenant_id: None,
                    role: Some(role.into()),
                },
            ))
            .unwrap();
        self.enrol(name, &created.initial_password)
    }

    /// Creates a user with `role` in `tenant`, enrolled.
    pub fn tenant_user(&self, admin: &Signer, tenant: &str, name: &str, role: &str) -> Signer {
        let created: api::UserCreated = self
            .block_on(admin.client.post(
                "/v1/users",
                &api::UserCreate {
                    name: name.into(),
                    tenant_id: Some(tenant.into()),
                    role: Some(role.into()),
                },
            ))
            .unwrap();
        // A tenant user logs in as `<name>@<tenant name>`.
        self.enrol(&created.user.name, &created.initial_password)
    }

    pub fn admin(&self) -> Signer {
        let initial = self
            .initial_password
            .clone()
            .expect("first start shows the password");
        self.enrol("admin", &initial)
    }

    /// Creates a tenant (with `quota`) and a user in it, enrolled.
    pub fn tenant(
        &self,
        admin: &Signer,
        name: &str,
        quota: Option<api::Quota>,
    ) -> (api::Tenant, Signer) {
        let tenant: api::Tenant = self
            .block_on(admin.client.post(
                "/v1/tenants",
                &api::TenantCreate {
                    name: name.into(),
                    quota,
                },
            ))
            .unwrap();
        let user_name = format!("{name}-user");
        let created: api::UserCreated = self
            .block_on(admin.client.post(
                "/v1/users",
                &api::UserCreate {
                    name: user_name.clone(),
                    tenant_id: Some(tenant.id.clone()),
                    role: None,
                },
            ))
            .unwrap();
        assert_eq!(created.user.name, format!("{user_name}@{name}"));
        let signer = self.enrol(&created.user.name, &created.initial_password);
        (tenant, signer)
    }

    pub fn create_instance(&self, signer: &Signer, name: &str) -> Result<api::Instance, ApiError> {
        let body = api::InstanceCreate {
            tags: Default::default(),
            name: name.into(),
            image: "debian-12-busybox".into(),
            flavor: "tiny".into(),
            subnet: None,
            security_groups: vec![],
        };
        self.block_on(signer.client.post("/v1/instances", &body))
            .map_err(api_error)
    }

    pub fn instance(&self, signer: &Signer, id: &str) -> api::Instance {
        self.block_on(signer.client.get(&format!("/v1/instances/{id}")))
            .unwrap()
    }

    pub fn wait_state(&self, signer: &Signer, id: &str, state: &str) -> api::Instance {
        poll(
            Duration::from_secs(120),
            &format!("instance {id} to be {state}"),
            || {
                let i = self.instance(signer, id);
                assert_ne!(
                    i.state,
                    "error",
                    "instance failed: {i:?}\n{}",
                    self.tail("agent.log")
                );
                (i.state == state).then_some(i)
            },
        )
    }

    /// Waits for `state`, including `error`.
    pub fn wait_state_allowing_error(
        &self,
        signer: &Signer,
        id: &str,
        state: &str,
    ) -> api::Instance {
        poll(
            Duration::from_secs(120),
            &format!("instance {id} to be {state}"),
            || {
                let i = self.instance(signer, id);
                (i.state == state).then_some(i)
            },
        )
    }

    /// Reads the console until `text` appears; returns everything read.
    pub fn wait_console(&self, signer: &Signer, id: &str, text: &str) -> String {
        let mut offset = 0;
        let mut seen = String::new();
        poll(
            Duration::from_secs(120),
            &format!("{text:?} on the console of {id}"),
            || {
                let chunk: api::ConsoleOutput = self
                    .block_on(
                        signer
                            .client
                            .get(&format!("/v1/instances/{id}/console?offset={offset}")),
                    )
                    .unwrap();
                offset = chunk.next_offset;
                seen.push_str(&chunk.data);
                seen.contains(text).then_some(())
            },
        );
        seen
    }

    /// Runs a second controller on this platform's data dir, to completion.
    pub fn run_second_controller(&self) -> Output {
        Command::new(palisade_bin())
            .args(["controller", "--data-dir"])
            .arg(self.data())
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap()
    }

    /// Runs the real CLI with this platform's config file.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(palisade_bin())
            .env("PALISADE_CONFIG", self.data().join("cli/config.json"))
            .env_remove("PALISADE_PROFILE")
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "palisade {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Ids of instances that have a directory on the agent's host.
    pub fn agent_instance_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.data().join("agent/instances"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pids of QEMU processes of instance `id` (found by `-name guest=<id>` on their command line).
pub fn qemu_pids(id: &str) -> Vec<u32> {
    let needle = format!("guest={id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The process exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
        }
        Err(_) => false,
    }
}

/// Cgroup directories still named after instance `id`, under v1 or v2 hierarchies.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let roots = [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ];
    for root in roots {
        let dir = Path::new(root).join("palisade").join(id);
        if dir.exists() {
            found.push(dir);
        }
    }
    found
}

pub struct Signer {
    pub client: Client,
    pub key_id: String,
    pub key: SigningKey,
    pub user: String,
    pub password: String,
    /// The otpauth URI of the user's TOTP, when enrolled.
    pub totp: Option<String>,
}

/// The TOTP code of `uri` at now + `offset_secs`. Near the end of a 30 s step it first waits
/// for the next one, so that the code is still in the server's window (one step either way)
/// when the request arrives, however slow the machine.
pub fn totp_code(uri: &str, offset_secs: i64) -> String {
    if time_now() % 30 >= 25 {
        std::thread::sleep(std::time::Duration::from_secs(
            (31 - time_now() % 30) as u64,
        ));
    }
    let totp = totp_rs::Totp::from_url(uri).unwrap();
    totp.generate((time_now() + offset_secs) as u64).to_string()
}

pub fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

pub fn api_error(e: anyhow::Error) -> ApiError {
    match e.downcast::<ApiError>() {
        Ok(api) => api,
        Err(other) => panic!("expected an API error, got {other:#}"),
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- controller.log ---\n{}", self.tail("controller.log"));
            eprintln!("--- agent.log ---\n{}", self.tail("agent.log"));
            eprintln!("--- kept {} ---", self.data().display());
            let _ = self.dir.path().to_path_buf();
        }
        self.kill_controller();
        self.kill_agent();
        // QEMU processes outlive their agent by design; a test's must not outlive the test.
        for id in self.agent_instance_dirs() {
            for pid in qemu_pids(&id) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            std::thread::sleep(Duration::from_millis(200));
            for dir in cgroup_dirs(&id) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        if std::thread::panicking() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            let _ = dir.keep();
        }
    }
}

/// A request the test shapes by hand (to forge, replay or corrupt signatures).
pub struct Raw {
    http: reqwest::Client,
    endpoint: String,
}

pub struct RawResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub bytes: Vec<u8>,
}

impl RawResponse {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Every answer, whatever its status, carries the security headers and a request id.
    pub fn assert_security_headers(&self, what: &str) {
        for (name, value) in [
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            ("strict-transport-security", "max-age=31536000"),
            ("x-frame-options", "DENY"),
            (
                "content-security-policy",
                "default-src 'none'; frame-ancestors 'none'",
            ),
            ("referrer-policy", "no-referrer"),
        ] {
            assert_eq!(
                self.headers.get(name).and_then(|v| v.to_str().ok()),
                Some(value),
                "{what} ({}): header {name}",
                self.status
            );
        }
        assert!(
            self.headers.contains_key("x-request-id"),
            "{what} ({}): no x-request-id",
            self.status
        );
    }
}

impl Platform {
    pub fn raw(&self) -> Raw {
        self.raw_from(None)
    }

    /// A raw client whose connections come from `local` (another loopback address, say).
    pub fn raw_from(&self, local: Option<std::net::IpAddr>) -> Raw {
        let tls = palisade_common::tls::client_config(&self.ca(), None).unwrap();
        Raw {
            // A connection per request: the server closes one whose body it refused unread
            // (413), and a pooled connection could be picked just before that close arrives.
            http: reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .local_address(local)
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            endpoint: self.endpoint.clone(),
        }
    }
}

/// Signature headers for a request, with every knob a test may want to turn.
pub fn sign(
    signer: &Signer,
    method: &str,
    path: &str,
    body: &[u8],
    created_offset: i64,
) -> Vec<(String, String)> {
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let params = palisade_common::signing::SignatureParams {
        created: time_now() + created_offset,
        nonce: palisade_common::signing::new_nonce(),
        keyid: signer.key_id.clone(),
    };
    let message = palisade_common::signing::Message {
        method,
        path: path_only,
        query,
        body,
    };
    let h = palisade_common::signing::sign(&signer.key, &params, &message);
    vec![
        ("content-digest".into(), h.content_digest),
        ("signature-input".into(), h.signature_input),
        ("signature".into(), h.signature),
    ]
}

pub fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Raw {
    /// Sends a correctly signed request.
    pub fn signed(
        &self,
        platform: &Platform,
        signer: &Signer,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> RawResponse {
        self.send(
            platform,
            method,
            path,
            body,
            &sign(signer, method, path, body, 0),
        )
    }

    pub fn send(
        &self,
        platform: &Platform,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(String, String)],
    ) -> RawResponse {
        self.try_send(platform, method, path, body, headers)
            .unwrap()
    }

    /// A request whose body the server may refuse before reading it (413): the connection can
    /// close while the body is still being sent, so a transport error is tried again.
    pub fn send_refused_early(
        &self,
        platform: &Platform,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(String, String)],
    ) -> RawResponse {
        (0..5)
            .find_map(|_| self.try_send(platform, method, path, body, headers).ok())
            .unwrap_or_else(|| panic!("{method} {path}: no answer in five tries"))
    }

    fn try_send(
        &self,
        platform: &Platform,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(String, String)],
    ) -> reqwest::Result<RawResponse> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.endpoint));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(body.to_vec());
        platform.block_on(async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let bytes = response.bytes().await?.to_vec();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok(RawResponse {
                status,
                headers,
                body,
                bytes,
            })
        })
    }
}

/// A real OpenID Connect provider (testing/oidc: npm oidc-provider) on a loopback port,
/// stopped when dropped (and, through its stdin, if the test process dies).
pub struct OidcProvider {
    child: std::process::Child,
    pub issuer: String,
}

impl OidcProvider {
    /// Starts the provider with the given clients and accounts (see testing/oidc/README.md).
    pub fn start(config: &Value) -> OidcProvider {
        let dir = workspace_root().join("testing/oidc");
        static SETUP: std::sync::Once = std::sync::Once::new();
        SETUP.call_once(|| {
            let status = Command::new(dir.join("setup.sh")).status().unwrap();
            assert!(status.success(), "testing/oidc/setup.sh failed");
        });
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(config).unwrap()).unwrap();
        let (_, path) = file.keep().unwrap();
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .args([
                "--config",
                &path.display().to_string(),
                "--exit-on-stdin-close",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed (scripts/host-packages.sh)");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let issuer = line
            .trim()
            .strip_prefix("OIDC-ISSUER ")
            .unwrap_or_else(|| panic!("the OIDC provider did not start: {line:?}"))
            .to_string();
        OidcProvider { child, issuer }
    }

    /// Plays the browser: follows the authorization URL through the provider's login form
    /// (username and password) and returns the redirect it ends with (the client's loopback
    /// URL carrying `code` and `state`), without following it.
    pub fn browser_login(&self, p: &Platform, url: &str, user: &str, password: &str) -> String {
        p.block_on(async {
            let http = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let mut cookies: Vec<(String, String)> = Vec::new();
            let mut next = url.to_string();
            let mut form: Option<String> = None;
            for _ in 0..10 {
                let cookie_header = cookies
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let request = match form.take() {
                    Some(body) => http
                        .post(&next)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body),
                    None => http.get(&next),
                };
                let response = request
                    .header("cookie", cookie_header)
                    .send()
                    .await
                    .unwrap();
                for value in response.headers().get_all("set-cookie") {
                    let pair = value.to_str().unwrap().split(';').next().unwrap();
                    if let Some((k, v)) = pair.split_once('=') {
                        cookies.retain(|(name, _)| name != k);
                        cookies.push((k.to_string(), v.to_string()));
                    }
                }
                let location = response
                    .headers()
                    .get("location")
                    .map(|l| l.to_str().unwrap().to_string());
                let Some(location) = location else {
                    panic!("the provider stopped at {next}: {}", response.status());
                };
                let location = if location.starts_with('/') {
                    format!("{}{location}", self.issuer)
                } else {
                    location
                };
                if !location.starts_with(&self.issuer) {
                    return location;
                }
                if location.contains("/interaction/") {
                    next = format!("{location}/login");
                    form = Some(
                        serde_urlencoded::to_string([("username", user), ("password", password)])
                            .unwrap(),
                    );
                } else {
                    next = location;
                }
            }
            panic!("the provider's login did not end in a redirect to the client");
        })
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A software security key (webauthn-rs's CTAP2 soft token): a real authenticator that answers
/// the platform's WebAuthn ceremonies.
pub fn new_security_key() -> webauthn_authenticator_rs::softtoken::SoftToken {
    webauthn_authenticator_rs::softtoken::SoftToken::new(true)
        .unwrap()
        .0
}

/// Runs a WebAuthn registration ceremony for `signer`'s account with `token`; returns the
/// platform's answer (recovery codes when it is the first second factor).
pub fn register_security_key(
    p: &Platform,
    signer: &Signer,
    token: &mut webauthn_authenticator_rs::softtoken::SoftToken,
) -> api::WebauthnRegistered {
    use webauthn_authenticator_rs::prelude::*;
    let r = p.raw().signed(p, signer, "POST", "/v1/mfa/webauthn", b"");
    assert_eq!(r.status, 201, "starting a registration: {:?}", r.body);
    let challenge: api::WebauthnChallenge = serde_json::from_value(r.body).unwrap();
    let origin = Url::parse(&challenge.origin).unwrap();
    let options: CreationChallengeResponse = serde_json::from_value(challenge.options).unwrap();
    let credential = token.do_registration(origin, options).unwrap();
    let confirm = serde_json::to_vec(&api::WebauthnConfirm {
        ceremony_id: challenge.ceremony_id,
        credential: serde_json::to_value(credential).unwrap(),
        name: None,
    })
    .unwrap();
    let r = p
        .raw()
        .signed(p, signer, "POST", "/v1/mfa/webauthn/confirm", &confirm);
    assert_eq!(r.status, 201, "confirming a registration: {:?}", r.body);
    serde_json::from_value(r.body).unwrap()
}

/// `token`'s answer to a WebAuthn challenge.
pub fn answer_challenge(
    token: &mut webauthn_authenticator_rs::softtoken::SoftToken,
    challenge: api::WebauthnChallenge,
) -> api::WebauthnAssertion {
    use webauthn_authenticator_rs::prelude::*;
    let origin = Url::parse(&challenge.origin).unwrap();
    let options: RequestChallengeResponse = serde_json::from_value(challenge.options).unwrap();
    let credential = token.do_authentication(origin, options).unwrap();
    api::WebauthnAssertion {
        ceremony_id: challenge.ceremony_id,
        credential: serde_json::to_value(credential).unwrap(),
    }
}

impl Platform {
    /// A password login's WebAuthn challenge for `user`.
    pub fn webauthn_challenge(&self, user: &str, password: &str) -> api::WebauthnChallenge {
        self.block_on(self.anonymous().post(
            "/v1/auth/mfa/webauthn/challenge",
            &api::WebauthnChallengeRequest {
                user: user.into(),
                password: password.into(),
            },
        ))
        .unwrap()
    }
}
