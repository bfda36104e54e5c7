//! `palisade up`: the all-in-one platform on one machine — the controller and one local host
//! agent as two supervised processes sharing a data directory — and, on first start, a
//! quickstart that creates a demo tenant and user and boots a VM.
//!
//! The first start fails fast: if either process does not come up, `palisade up` stops and
//! says why. After that, each process is supervised on its own: when one exits, it is started
//! again after a back-off that doubles with each consecutive failure (1 s, 2 s, 4 s … 30 s),
//! and the other keeps running, so the VMs never lose both their agent and their control plane.
//! SIGINT, SIGTERM and SIGHUP stop both processes (SIGTERM, then SIGKILL after `STOP_GRACE`);
//! QEMU processes run on, and the next start adopts them.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use palisade_common::api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::client::Client;
use crate::config::{self, Config, Profile};
use crate::output::printable;
use crate::Global;

/// The line the guest image prints once booted.
pub const BOOT_MARKER: &str = "PALISADE-BOOT-OK";

/// How long a process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The longest wait between two restarts of a failing process.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A process that ran this long before it exited is restarted after the shortest back-off.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Lines of a process's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 3;

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Where state lives: database, PKI, audit log, instance disks, logs.
    #[arg(long, default_value = "/var/lib/palisade")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub agent_listen: SocketAddr,
    /// Guest image directory made by images/build-guest.sh.
    #[arg(long, default_value = "build/guest")]
    pub guest_image: PathBuf,
    /// auto (KVM only where it really works), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accelerator: String,
    /// Skip the demo tenant, user and VM.
    #[arg(long)]
    pub no_quickstart: bool,
    /// More options for the controller, after `--` (see `palisade controller --help`), e.g.
    /// `-- --audit-head-store /mnt/heads --audit-syslog host:6514 --audit-syslog-ca ca.pem`.
    #[arg(last = true)]
    pub controller_args: Vec<String>,
}

/// Set by `palisade up` on the controller and agent it starts: its own pid.
pub const SUPERVISOR_ENV: &str = "PALISADE_SUPERVISOR_PID";

/// In a controller or agent started by `palisade up`: end with it. A supervisor killed with
/// SIGKILL cannot stop its children, and children left running would hold the data
/// directory's locks and keep a new `palisade up` from starting. The kernel sends SIGTERM when
/// the supervisor dies (PR_SET_PDEATHSIG); a supervisor already gone before that was set is
/// caught by comparing the parent pid. Call it before any thread is started.
pub fn end_with_supervisor() -> anyhow::Result<()> {
    let Ok(pid) = std::env::var(SUPERVISOR_ENV) else {
        return Ok(());
    };
    let pid: i32 = pid
        .parse()
        .with_context(|| format!("{SUPERVISOR_ENV} is not a pid"))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("asking to end with palisade up")?;
    if nix::unistd::getppid().as_raw() != pid {
        anyhow::bail!("palisade up ({pid}) is gone");
    }
    Ok(())
}

pub async fn run(global: Global, args: UpArgs) -> anyhow::Result<()> {
    // First of all, so that no signal ever leaves the children behind: from here on SIGINT,
    // SIGTERM and SIGHUP all mean "stop in order".
    let (stop_tx, mut stop) = watch::channel(false);
    let mut signals = StopSignals::install()?;
    let stopper = stop_tx.clone();
    tokio::spawn(async move {
        let name = signals.recv().await;
        note(&format!(
            "{name} received: stopping the controller and the agent (VMs keep running and \
             are adopted at the next start)"
        ));
        let _ = stopper.send(true);
    });

    let launcher = Arc::new(Launcher::new(args)?);
    let Some((controller, agent, initial_password)) = first_start(&launcher, &mut stop).await?
    else {
        return Ok(());
    };
    println!(
        "Palisade is up: API {}, data in {}, logs in {}",
        launcher.endpoint(),
        launcher.data_dir.display(),
        launcher.logs.display()
    );

    let supervisors = [(Role::Controller, controller), (Role::Agent, agent)]
        .map(|(role, child)| tokio::spawn(supervise(launcher.clone(), role, child, stop.clone())));
    let welcomed = tokio::select! {
        welcomed = welcome(&global, &launcher, initial_password) => welcomed,
        _ = stopped(&mut stop) => Ok(()),
    };
    match &welcomed {
        Ok(()) => stopped(&mut stop).await,
        Err(_) => {
            let _ = stop_tx.send(true);
        }
    }
    for supervisor in supervisors {
        let _ = supervisor.await;
    }
    welcomed
}

/// Starts the controller (it makes the PKI the agent needs), then the agent. Any failure ends
/// `palisade up` with its reason: that is what someone trying the platform wants to see. Returns
/// both children and the initial admin password of a fresh platform, or `None` when told to
/// stop meanwhile.
async fn first_start(
    launcher: &Launcher,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<(Child, Child, Option<String>)>> {
    let Some(controller) = launcher.start(Role::Controller, stop).await? else {
        return Ok(None);
    };
    let mut controller_child = controller.child;
    match launcher.start(Role::Agent, stop).await {
        Ok(Some(agent)) => Ok(Some((
            controller_child,
            agent.child,
            controller.initial_password,
        ))),
        stopped_or_failed => {
            terminate(Role::Controller, &mut controller_child).await;
            if let Some(password) = controller.initial_password {
                // The controller made the platform and will not show this again.
                println!(
                    "The platform was created but is not up. Initial admin password (shown \
                     once; it can only be changed): {password}"
                );
            }
            stopped_or_failed.map(|_| None)
        }
    }
}

/// The quickstart on a fresh platform, then how to use and stop it.
async fn welcome(
    global: &Global,
    launcher: &Launcher,
    initial_password: Option<String>,
) -> anyhow::Result<()> {
    let cli = cli_command(global)?;
    match initial_password {
        Some(password) if !launcher.args.no_quickstart => {
            let config_path = config::config_path(global.config.as_deref());
            quickstart(
                &config_path,
                &launcher.endpoint(),
                &launcher.data_dir.join("pki/ca.pem"),
                &password,
                &cli,
            )
            .await
            .context("the quickstart failed; stopping")?;
        }
        Some(password) => {
            println!("Initial admin password (shown once; it can only be changed): {password}")
        }
        None => println!("Existing platform: use your profiles ({cli} profile list)."),
    }
    println!(
        "Stop with Ctrl-C or SIGTERM (kill {}): the controller and agent stop, VMs keep \
         running and are adopted at the next start.",
        std::process::id()
    );
    Ok(())
}

/// How to call this CLI again: the running executable's real path (it is rarely on `PATH`
/// right after a build), with `--config` when one was given.
fn cli_command(global: &Global) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cli = exe.display().to_string();
    if let Some(config) = &global.config {
        cli.push_str(&format!(" --config {}", config.display()));
    }
    Ok(cli)
}

// ---- the two processes ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Controller,
    Agent,
}

impl Role {
    fn start_timeout(self) -> Duration {
        match self {
            Role::Controller => Duration::from_secs(60),
            Role::Agent => Duration::from_secs(30),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
        })
    }
}

/// A process that has come up: it serves. On the platform's first start the controller prints
/// the initial admin password once.
struct Started {
    child: Child,
    initial_password: Option<String>,
}

/// What `palisade up` starts, and where it keeps its state and logs.
struct Launcher {
    exe: PathBuf,
    data_dir: PathBuf,
    logs: PathBuf,
    guest_image: PathBuf,
    args: UpArgs,
}

impl Launcher {
    fn new(args: UpArgs) -> anyhow::Result<Launcher> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let data_dir = absolute(&args.data_dir)?;
        let guest_image = absolute(&args.guest_image)?;
        if !guest_image.join("image.json").exists() {
            anyhow::bail!(
                "no guest image at {} (build it with images/build-guest.sh {})",
                guest_image.display(),
                guest_image.display()
            );
        }
        // The logs quote requests and errors: readable by root only.
        let logs = data_dir.join("logs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .with_context(|| format!("creating {}", logs.display()))?;
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", logs.display()))?;
        Ok(Launcher {
            exe,
            data_dir,
            logs,
            guest_image,
            args,
        })
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.args.listen)
    }

    fn log_path(&self, role: Role) -> PathBuf {
        self.logs.join(format!("{role}.log"))
    }

    /// Where the agent writes its address once it listens.
    fn agent_addr_file(&self) -> PathBuf {
        self.data_dir.join("agent/agent.addr")
    }

    fn command(&self, role: Role) -> anyhow::Result<Command> {
        let log = private_log(&self.log_path(role))?;
        let mut command = Command::new(&self.exe);
        match role {
            Role::Controller => {
                command
                    .arg("controller")
                    .arg("--data-dir")
                    .arg(&self.data_dir)
                    .arg("--listen")
                    .arg(self.args.listen.to_string())
                    .arg("--agent-url")
                    .arg(format!("https://{}", self.args.agent_listen))
                    .arg("--guest-image")
                    .arg(&self.guest_image)
                    // The server certificate must name the address clients use.
                    .arg("--server-name")
                    .arg(self.args.listen.ip().to_string())
                    .args(&self.args.controller_args)
                    // The password and address lines are read from stdout.
                    .stdout(Stdio::piped())
                    .stderr(log);
            }
            Role::Agent => {
                let pki = self.data_dir.join("pki");
                command
                    .arg("agent")
                    .arg("--data-dir")
                    .arg(self.data_dir.join("agent"))
                    .arg("--listen")
                    .arg(self.args.agent_listen.to_string())
                    .arg("--addr-file")
                    .arg(self.agent_addr_file())
                    .arg("--ca")
                    .arg(pki.join("ca.pem"))
                    .arg("--cert")
                    .arg(pki.join("agent.pem"))
                    .arg("--key")
                    .arg(pki.join("agent.key"))
                    .arg("--accelerator")
                    .arg(&self.args.accelerator)
                    .stdout(log.try_clone().context("duplicating the agent log")?)
                    .stderr(log);
            }
        }
        // A process group of its own: a Ctrl-C in the terminal reaches `palisade up` only,
        // which then stops the children in order. Plain text in the logs, no colour codes.
        command
            .process_group(0)
            .env("NO_COLOR", "1")
            .env(SUPERVISOR_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(command)
    }

    /// Starts `role` and waits until it serves. Returns `None` when the platform is told to
    /// stop meanwhile; the process has then been stopped too. On failure the process is gone,
    /// and the error quotes the end of its log.
    async fn start(
        &self,
        role: Role,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Started>> {
        if *stop.borrow() {
            return Ok(None);
        }
        if role == Role::Agent {
            remove_if_present(&self.agent_addr_file())?;
        }
        // What this attempt writes to its log is quoted if it fails.
        let log = self.log_path(role);
        let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut child = self
            .command(role)?
            .spawn()
            .with_context(|| format!("starting the {role} ({})", self.exe.display()))?;
        let stdout = child.stdout.take();
        let ready = async {
            match role {
                Role::Controller => controller_ready(stdout).await,
                Role::Agent => {
                    agent_ready(&self.agent_addr_file()).await;
                    Ok(None)
                }
            }
        };
        let failure = tokio::select! {
            ready = tokio::time::timeout(role.start_timeout(), ready) => match ready {
                Ok(Ok(initial_password)) => {
                    return Ok(Some(Started { child, initial_password }));
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("it did not serve within {} s", role.start_timeout().as_secs()),
            },
            status = child.wait() => format!("it exited ({})", describe(status)),
            _ = stopped(stop) => {
                terminate(role, &mut child).await;
                return Ok(None);
            }
        };
        terminate(role, &mut child).await;
        anyhow::bail!(
            "the {role} did not start: {failure}; its log {} ends with:\n{}",
            log.display(),
            log_tail(&log, log_start, LOG_TAIL_LINES)
        )
    }
}

/// Reads the controller's stdout until it says it listens; returns the initial admin password
/// if it printed one. From then on its stdout is drained, so it never blocks on a full pipe.
async fn controller_ready(stdout: Option<ChildStdout>) -> anyhow::Result<Option<String>> {
    let mut lines = BufReader::new(stdout.context("no pipe to the controller's stdout")?).lines();
    let mut password = None;
    while let Some(line) = lines.next_line().await? {
        if let Some(p) = line.strip_prefix("PALISADE-INITIAL-ADMIN-PASSWORD ") {
            password = Some(p.to_string());
        }
        if line.starts_with("PALISADE-API-LISTENING") {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(password);
        }
    }
    // Its stdout closed: it is exiting, and the caller reports its exit status.
    std::future::pending().await
}

/// Waits for the agent's address file, written once it listens.
async fn agent_ready(addr_file: &Path) {
    loop {
        if let Ok(text) = tokio::fs::read_to_string(addr_file).await {
            if text.trim().parse::<SocketAddr>().is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps `role` running until the platform stops, whatever the other process does: when it
/// exits, it is started again after `backoff(n)`, n counting the consecutive failures (a
/// run of `STABLE_RUN` or more resets it). Each failure is logged with where to look.
async fn supervise(
    launcher: Arc<Launcher>,
    role: Role,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0;
    let mut started_at = Instant::now();
    loop {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stopped(&mut stop) => {
                terminate(role, &mut child).await;
                return;
            }
        };
        if *stop.borrow() {
            return;
        }
        if started_at.elapsed() >= STABLE_RUN {
            failures = 0;
        }
        let mut failure = format!(
            "the {role} exited ({}); its log: {}",
            describe(status),
            launcher.log_path(role).display()
        );
        loop {
            let delay = backoff(failures);
            failures += 1;
            note(&format!(
                "{failure}\n  restarting the {role} in {} s",
                delay.as_secs()
            ));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => return,
            }
            match launcher.start(role, &mut stop).await {
                Ok(Some(started)) => {
                    child = started.child;
                    started_at = Instant::now();
                    note(&format!("the {role} is running again"));
                    break;
                }
                Ok(None) => return,
                Err(e) => failure = format!("{e:#}"),
            }
        }
    }
}

/// The wait before restart number `failures + 1`: 1 s, 2 s, 4 s … at most `BACKOFF_CAP`.
fn backoff(failures: u32) -> Duration {
    let secs = 1u64.checked_shl(failures).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(BACKOFF_CAP)
}

/// Stops a child: SIGTERM, then SIGKILL if it is still there after `STOP_GRACE`.
async fn terminate(role: Role, child: &mut Child) {
    // A child not yet waited for keeps its pid (as a zombie at worst): the signal cannot
    // reach another process.
    let Some(pid) = child.id() else {
        return;
    };
    if let Err(e) = send_sigterm(pid).await {
        note(&format!(
            "sending SIGTERM to the {role} (pid {pid}) failed: {e:#}"
        ));
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        note(&format!(
            "the {role} did not stop within {} s of SIGTERM; killing it",
            STOP_GRACE.as_secs()
        ));
        let _ = child.kill().await;
    }
}

/// Asks a child to stop (SIGTERM), as a service manager would.
async fn send_sigterm(pid: u32) -> anyhow::Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("kill -TERM {pid}"))
}

/// Waits until the platform is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means every sender is gone: nothing can ask for more work, so stop as well.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// SIGINT (Ctrl-C), SIGTERM (service managers, `kill`) and SIGHUP (a closed terminal).
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        let listen = |kind: SignalKind| signal(kind).context("listening for signals");
        Ok(StopSignals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    /// The name of the next stop signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// A supervisor line on stderr, with the time: `palisade up` may run for months.
fn note(message: &str) {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    eprintln!("{now} {message}");
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("its status is unknown: {e}"),
    }
}

/// The last `lines` non-empty lines a log got from byte `from` on, indented, made safe for a
/// terminal.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(from.max(len.saturating_sub(16 * 1024))))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = match read() {
        Ok(text) => text,
        Err(e) => return format!("  (cannot read it: {e})"),
    };
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &tail[tail.len().saturating_sub(lines)..];
    if tail.is_empty() {
        return "  (nothing)".into();
    }
    tail.iter()
        .map(|line| format!("  {}", printable(line.trim_end())))
        .collect::<Vec<_>>()
        .join("\n")
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(path))
}

/// Opens a log for appending, readable by root only.
fn private_log(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    Ok(file)
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Registers a fresh key for `user` and saves it as `profile`.
async fn enrol(
    config_path: &Path,
    profile: &str,
    endpoint: &str,
    ca: &Path,
    user: &str,
    password: &str,
    totp_code: Option<String>,
) -> anyhow::Result<Client> {
    let key = config::new_key();
    let anonymous = Client::new(endpoint, ca, None)?;
    let body = api::KeyCreate {
        user: user.into(),
        password: password.into(),
        public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
        name: Some(format!("{profile}-cli")),
        totp_code,
        recovery_code: None,
        webauthn: None,
        expires_in_days: None,
    };
    let created: api::ApiKey = anonymous.post("/v1/auth/keys", &body).await?;
    config::save_key(config_path, profile, &key)?;
    let mut config = Config::load(config_path)?;
    config.profiles.insert(
        profile.into(),
        Profile {
            endpoint: endpoint.into(),
            ca: ca.to_path_buf(),
            user: Some(user.into()),
            key_id: Some(created.id.clone()),
        },
    );
    config.save(config_path)?;
    Client::new(endpoint, ca, Some((created.id, key)))
}

async fn change_password(client: &Client, user: &str, current: &str) -> anyhow::Result<String> {
    let new_password = random_password();
    let body = api::PasswordChange {
        user: user.into(),
        current_password: current.into(),
        new_password: new_password.clone(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let _: serde_json::Value = client.post("/v1/auth/password", &body).await?;
    Ok(new_password)
}

/// 24 random base64url characters, then one of each class the password rule counts, so the
/// result always passes it (the random part carries the strength).
fn random_password() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    let random = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!("{random}-aZ7")
}

async fn quickstart(
    config_path: &Path,
    endpoint: &str,
    ca: &Path,
    initial: &str,
    cli: &str,
) -> anyhow::Result<()> {
    let anonymous = Client::new(endpoint, ca, None)?;
    let admin_password = change_password(&anonymous, "admin", initial).await?;
    // Platform accounts must use a second factor: enrol TOTP, acting once as the
    // administrator's authenticator app (the secret is printed for the real one).
    let enrolment: api::TotpEnrolment = anonymous
        .post(
            "/v1/auth/mfa/totp",
            &api::TotpEnrol {
                user: "admin".into(),
                password: admin_password.clone(),
            },
        )
        .await?;
    let totp = totp_rs::Totp::from_url(&enrolment.otpauth_uri)
        .map_err(|e| anyhow::anyhow!("the enrolment URI does not parse: {e:?}"))?;
    // Near the end of a step, wait for the next one: both codes must still be in the
    // server's window (one step either way) when they arrive.
    let unix_now = || time::OffsetDateTime::now_utc().unix_timestamp().max(30);
    if unix_now() % 30 >= 25 {
        tokio::time::sleep(Duration::from_secs((31 - unix_now() % 30) as u64)).await;
    }
    let now = unix_now() as u64;
    // Each code is accepted once per 30 s step, with one step of skew: confirm with the
    // previous step's code and register the key with the current one.
    let codes: api::RecoveryCodes = anonymous
        .post(
            "/v1/auth/mfa/totp/confirm",
            &api::TotpConfirm {
                user: "admin".into(),
                password: admin_password.clone(),
                code: totp.generate(now - 30).to_string(),
            },
        )
        .await?;
    let admin = enrol(
        config_path,
        "admin",
        endpoint,
        ca,
        "admin",
        &admin_password,
        Some(totp.generate(now).to_string()),
    )
    .await?;
    println!(
        "Platform administrator: user admin, password {admin_password} (shown once), \
              CLI profile 'admin'\n  TOTP (add to your authenticator app, shown once): {}\n  \
              Recovery codes (shown once): {}\n  Administrative calls need a second-factor \
              proof younger than 15 minutes: `palisade --profile admin mfa verify --code <code>`",
        enrolment.otpauth_uri,
        codes.recovery_codes.join(" ")
    );

    let tenant: api::Tenant = admin
        .post(
            "/v1/tenants",
            &api::TenantCreate {
                name: "demo".into(),
                quota: None,
            },
        )
        .await?;
    let user: api::UserCreated = admin
        .post(
            "/v1/users",
            &api::UserCreate {
                name: "demo".into(),
                tenant_id: Some(tenant.id.clone()),
                role: Some("tenant_admin".into()),
            },
        )
        .await?;
    // A tenant user's login name is `<name>@<tenant>`: demo@demo.
    let login = user.user.name.as_str();
    let demo_password = change_password(&anonymous, login, &user.initial_password).await?;
    let demo = enrol(
        config_path,
        "demo",
        endpoint,
        ca,
        login,
        &demo_password,
        None,
    )
    .await?;
    println!(
        "Tenant demo ({}): user {login}, password {demo_password} (shown once), CLI profile \
              'demo'",
        tenant.id
    );

    let images: Vec<api::Image> = demo.get("/v1/images").await?;
    let image = images.first().context("no image registered")?;
    let create = api::InstanceCreate {
        tags: Default::default(),
        name: "demo-vm".into(),
        image: image.id.clone(),
        flavor: "tiny".into(),
        subnet: None,
        security_groups: Vec::new(),
    };
    let instance: api::Instance = demo.post("/v1/instances", &create).await?;
    println!(
        "Booting instance demo-vm ({}) from image {} ...",
        instance.id, image.name
    );
    crate::wait_state(&demo, &instance.id, "running", Duration::from_secs(120)).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut offset = 0;
    let mut log = String::new();
    while !log.contains(BOOT_MARKER) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no boot marker within 180 s"
        );
        let chunk: api::ConsoleOutput = demo
            .get(&format!(
                "/v1/instances/{}/console?offset={offset}",
                instance.id
            ))
            .await?;
        offset = chunk.next_offset;
        log.push_str(&chunk.data);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let boot_line = log
        .lines()
        .find(|l| l.contains(BOOT_MARKER))
        .unwrap_or(BOOT_MARKER);
    println!("Guest console: {}", boot_line.trim());
    println!(
        "Try: {cli} --profile demo instance list\n     {cli} --profile demo instance console {}",
        instance.id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_follows_two_dashes_goes_to_the_controller() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let cli = Cli::try_parse_from([
            "up",
            "--accelerator",
            "tcg",
            "--",
            "--audit-syslog",
            "127.0.0.1:6514",
        ])
        .expect("parses");
        assert_eq!(cli.up.accelerator, "tcg");
        assert_eq!(cli.up.controller_args, ["--audit-syslog", "127.0.0.1:6514"]);
        assert!(Cli::try_parse_from(["up", "--audit-syslog", "x"]).is_err());
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let waits: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn a_log_tail_is_its_last_lines_without_escape_sequences() {
        let log = std::env::temp_dir().join(format!("palisade-up-{}.log", std::process::id()));
        std::fs::write(&log, "one\ntwo\n\nthree \x1b[31mred\n").expect("write");
        let tail = log_tail(&log, 0, 2);
        let from_two = log_tail(&log, 4, 5);
        let nothing = log_tail(&log, 100, 2);
        let _ = std::fs::remove_file(&log);
        assert_eq!(tail, "  two\n  three ?[31mred");
        assert_eq!(from_two, "  two\n  three ?[31mred");
        assert_eq!(nothing, "  (nothing)");
        assert!(log_tail(&log, 0, 2).contains("cannot read"));
    }
}
