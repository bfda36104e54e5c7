//! `palisade up`: the all-in-one platform on one machine — the controller and one local host
//! agent as two supervised processes sharing a data directory — and, on first start, a
//! quickstart that creates a demo tenant and user and boots a VM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use palisade_common::api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::Client;
use crate::config::{self, Config, Profile};
use crate::Global;

/// The line the guest image prints once booted.
pub const BOOT_MARKER: &str = "PALISADE-BOOT-OK";

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
}

pub async fn run(global: Global, args: UpArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let data_dir = absolute(&args.data_dir)?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let guest_image = absolute(&args.guest_image)?;
    if !guest_image.join("image.json").exists() {
        anyhow::bail!(
            "no guest image at {} (build it with images/build-guest.sh {})",
            guest_image.display(),
            guest_image.display()
        );
    }

    let (mut controller, initial_password) =
        start_controller(&exe, &data_dir, &args, &guest_image, &logs).await?;
    let mut agent = start_agent(&exe, &data_dir, &args, &logs)?;
    let endpoint = format!("https://{}", args.listen);
    println!(
        "Palisade is up: API {endpoint}, data in {}, logs in {}",
        data_dir.display(),
        logs.display()
    );

    match initial_password {
        Some(password) if !args.no_quickstart => {
            let config_path = config::config_path(global.config.as_deref());
            quickstart(
                &config_path,
                &endpoint,
                &data_dir.join("pki/ca.pem"),
                &password,
            )
            .await?;
        }
        Some(password) => {
            println!("Initial admin password (shown once; it can only be changed): {password}")
        }
        None => println!("Existing platform: use your profiles (palisade profile list)."),
    }
    println!(
        "Press Ctrl-C to stop the controller and agent (VMs keep running and are adopted \
              at the next start)."
    );

    // Supervise: restart whichever process exits, until Ctrl-C.
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            status = controller.wait() => {
                eprintln!("controller exited ({status:?}); restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                controller = start_controller(&exe, &data_dir, &args, &guest_image, &logs).await?.0;
            }
            status = agent.wait() => {
                eprintln!("agent exited ({status:?}); restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                agent = start_agent(&exe, &data_dir, &args, &logs)?;
            }
        }
    }
    let _ = controller.kill().await;
    let _ = agent.kill().await;
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(path))
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("opening {}/{name}", dir.display()))
}

/// Starts the controller and waits until it listens; returns the initial admin password when
/// this was the platform's first start.
async fn start_controller(
    exe: &Path,
    data_dir: &Path,
    args: &UpArgs,
    guest_image: &Path,
    logs: &Path,
) -> anyhow::Result<(Child, Option<String>)> {
    let mut child = Command::new(exe)
        .arg("controller")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(args.listen.to_string())
        .arg("--agent-url")
        .arg(format!("https://{}", args.agent_listen))
        .arg("--guest-image")
        .arg(guest_image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(logs, "controller.log")?)
        .kill_on_drop(true)
        .spawn()
        .context("starting the controller")?;
    let stdout = child.stdout.take().context("controller stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut password = None;
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(p) = line.strip_prefix("PALISADE-INITIAL-ADMIN-PASSWORD ") {
                password = Some(p.to_string());
            }
            if line.starts_with("PALISADE-API-LISTENING") {
                return Ok(());
            }
        }
        anyhow::bail!(
            "the controller exited during start; see {}/controller.log",
            logs.display()
        )
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("the controller did not start within 60 s")??;
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, password))
}

fn start_agent(exe: &Path, data_dir: &Path, args: &UpArgs, logs: &Path) -> anyhow::Result<Child> {
    let pki = data_dir.join("pki");
    Command::new(exe)
        .arg("agent")
        .arg("--data-dir")
        .arg(data_dir.join("agent"))
        .arg("--listen")
        .arg(args.agent_listen.to_string())
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("agent.pem"))
        .arg("--key")
        .arg(pki.join("agent.key"))
        .arg("--accelerator")
        .arg(&args.accelerator)
        .stdin(Stdio::null())
        .stdout(log_file(logs, "agent.log")?)
        .stderr(log_file(logs, "agent.log")?)
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")
}

/// Registers a fresh key for `user` and saves it as `profile`.
async fn enrol(
    config_path: &Path,
    profile: &str,
    endpoint: &str,
    ca: &Path,
    user: &str,
    password: &str,
) -> anyhow::Result<Client> {
    let key = config::new_key();
    let anonymous = Client::new(endpoint, ca, None)?;
    let body = api::KeyCreate {
        user: user.into(),
        password: password.into(),
        public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
        name: Some(format!("{profile}-cli")),
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
    };
    let _: serde_json::Value = client.post("/v1/auth/password", &body).await?;
    Ok(new_password)
}

fn random_password() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn quickstart(
    config_path: &Path,
    endpoint: &str,
    ca: &Path,
    initial: &str,
) -> anyhow::Result<()> {
    let anonymous = Client::new(endpoint, ca, None)?;
    let admin_password = change_password(&anonymous, "admin", initial).await?;
    let admin = enrol(config_path, "admin", endpoint, ca, "admin", &admin_password).await?;
    println!(
        "Platform administrator: user admin, password {admin_password} (shown once), \
              CLI profile 'admin'"
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
                tenant_id: tenant.id.clone(),
            },
        )
        .await?;
    let demo_password = change_password(&anonymous, "demo", &user.initial_password).await?;
    let demo = enrol(config_path, "demo", endpoint, ca, "demo", &demo_password).await?;
    println!(
        "Tenant demo ({}): user demo, password {demo_password} (shown once), CLI profile \
              'demo'",
        tenant.id
    );

    let images: Vec<api::Image> = demo.get("/v1/images").await?;
    let image = images.first().context("no image registered")?;
    let create = api::InstanceCreate {
        name: "demo-vm".into(),
        image: image.id.clone(),
        flavor: "tiny".into(),
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
        "Try: palisade --profile demo instance list; \
              palisade --profile demo instance console {}",
        instance.id
    );
    Ok(())
}
