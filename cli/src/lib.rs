//! The `palisade` command line: profiles, signed API calls, and `palisade up`.

pub mod client;
pub mod config;
mod output;
pub mod up;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use palisade_common::api;
use reqwest::Method;

use client::Client;
use config::Config;
use output::Table;

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Profile to use (endpoint, pinned CA, user, key).
    #[arg(
        long,
        global = true,
        env = "PALISADE_PROFILE",
        default_value = "default"
    )]
    pub profile: String,
    /// Configuration file (default ~/.config/palisade/config.json).
    #[arg(long, global = true, env = "PALISADE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage CLI profiles.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Change a password (the only thing an initial password may do).
    #[command(subcommand)]
    Password(PasswordCmd),
    /// Create API keys (Ed25519, made here; only the public key is sent).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Show who the profile's key belongs to.
    Whoami,
    /// Tenants (platform administrators).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Users (platform administrators).
    #[command(subcommand)]
    User(UserCmd),
    /// Instance sizes.
    #[command(subcommand)]
    Flavor(ListOnly),
    /// Bootable images.
    #[command(subcommand)]
    Image(ListOnly),
    /// Virtual machines.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Start the all-in-one platform (controller + local agent) and a demo VM.
    Up(up::UpArgs),
}

#[derive(Debug, Subcommand)]
pub enum ProfileCmd {
    /// Create or update a profile.
    Set {
        name: String,
        #[arg(long)]
        endpoint: String,
        /// The platform CA certificate (PEM) to pin.
        #[arg(long)]
        ca: PathBuf,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum PasswordCmd {
    Change {
        #[arg(long)]
        user: String,
        #[arg(long, env = "PALISADE_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long, env = "PALISADE_NEW_PASSWORD", hide_env_values = true)]
        new_password: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make a key pair, register its public half, and store it in the profile.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long, env = "PALISADE_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// The profile user's live keys.
    List,
    /// Revoke a key: requests it signs are refused from then on.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    Create {
        name: String,
        #[arg(long)]
        max_instances: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u32>,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a tenant user; its random initial password is printed once.
    Create {
        name: String,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListOnly {
    List,
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "tiny")]
        flavor: String,
        /// Wait until it runs.
        #[arg(long)]
        wait: bool,
    },
    List,
    Show {
        id: String,
    },
    Stop {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    Start {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    Delete {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Print the serial console log.
    Console {
        id: String,
        /// Keep printing new output.
        #[arg(long)]
        follow: bool,
        /// With --follow: stop once this text has appeared (exit 1 on timeout).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain of the audit log: an exported file, or the live one (admin).
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Runs one client command.
pub async fn run(global: Global, command: Command) -> anyhow::Result<()> {
    let config_path = config::config_path(global.config.as_deref());
    let ctx = Ctx {
        global,
        config_path,
    };
    match command {
        Command::Profile(cmd) => ctx.profile(cmd),
        Command::Password(PasswordCmd::Change {
            user,
            password,
            new_password,
        }) => {
            let body = api::PasswordChange {
                user,
                current_password: password,
                new_password,
            };
            let _: serde_json::Value = ctx.unsigned()?.post("/v1/auth/password", &body).await?;
            println!("password changed");
            Ok(())
        }
        Command::Key(KeyCmd::Create {
            user,
            password,
            name,
        }) => ctx.create_key(user, password, name).await,
        Command::Key(KeyCmd::List) => {
            let keys: Vec<api::ApiKey> = ctx.signed()?.get("/v1/keys").await?;
            ctx.show(&keys, |t| {
                t.row(["KEY", "NAME", "CREATED", "PUBLIC KEY"]);
                for k in &keys {
                    t.row([&k.id, &k.name, &k.created_at, &k.public_key]);
                }
            })
        }
        Command::Key(KeyCmd::Revoke { id }) => {
            let path = format!("/v1/keys/{id}");
            ctx.signed()?
                .send(Method::DELETE, &path, Vec::new())
                .await?;
            println!("key {id} revoked");
            Ok(())
        }
        Command::Whoami => {
            let me: api::Whoami = ctx.signed()?.get("/v1/whoami").await?;
            ctx.show(&me, |t| {
                t.row(["USER", "ID", "TENANT", "ROLE", "KEY"]);
                t.row([
                    &me.user.name,
                    &me.user.id,
                    me.user.tenant_id.as_deref().unwrap_or("-"),
                    &me.user.role,
                    &me.key_id,
                ]);
            })
        }
        Command::Tenant(cmd) => ctx.tenant(cmd).await,
        Command::User(UserCmd::Create { name, tenant }) => {
            let body = api::UserCreate {
                name,
                tenant_id: tenant,
            };
            let created: api::UserCreated = ctx.signed()?.post("/v1/users", &body).await?;
            ctx.show(&created, |t| {
                t.row(["USER", "ID", "TENANT", "INITIAL PASSWORD (shown once)"]);
                t.row([
                    &created.user.name,
                    &created.user.id,
                    created.user.tenant_id.as_deref().unwrap_or("-"),
                    &created.initial_password,
                ]);
            })
        }
        Command::Flavor(ListOnly::List) => {
            let flavors: Vec<api::Flavor> = ctx.signed()?.get("/v1/flavors").await?;
            ctx.show(&flavors, |t| {
                t.row(["NAME", "VCPUS", "MEMORY MIB", "DISK GIB"]);
                for f in &flavors {
                    t.row([
                        f.name.clone(),
                        f.vcpus.to_string(),
                        f.memory_mib.to_string(),
                        f.disk_gib.to_string(),
                    ]);
                }
            })
        }
        Command::Image(ListOnly::List) => {
            let images: Vec<api::Image> = ctx.signed()?.get("/v1/images").await?;
            ctx.show(&images, |t| {
                t.row(["NAME", "ID", "KERNEL SHA256", "INITRD SHA256"]);
                for i in &images {
                    t.row([
                        &i.name,
                        &i.id,
                        &i.kernel_sha256[..16],
                        &i.initrd_sha256[..16],
                    ]);
                }
            })
        }
        Command::Instance(cmd) => ctx.instance(cmd).await,
        Command::Audit(AuditCmd::Verify { file }) => ctx.audit_verify(file).await,
        Command::Up(args) => up::run(ctx.global.clone(), args).await,
    }
}

struct Ctx {
    global: Global,
    config_path: PathBuf,
}

impl Ctx {
    fn unsigned(&self) -> anyhow::Result<Client> {
        let config = Config::load(&self.config_path)?;
        let profile = config.profile(&self.global.profile)?;
        Client::new(&profile.endpoint, &profile.ca, None)
    }

    fn signed(&self) -> anyhow::Result<Client> {
        let config = Config::load(&self.config_path)?;
        let profile = config.profile(&self.global.profile)?;
        let key_id = profile.key_id.clone().with_context(|| {
            format!(
                "profile {:?} has no key yet (see `palisade key create`)",
                self.global.profile
            )
        })?;
        let key = config::load_key(&self.config_path, &self.global.profile)?;
        Client::new(&profile.endpoint, &profile.ca, Some((key_id, key)))
    }

    fn show<T: serde::Serialize>(
        &self,
        value: &T,
        table: impl FnOnce(&mut Table),
    ) -> anyhow::Result<()> {
        if self.global.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            let mut t = Table::default();
            table(&mut t);
            print!("{t}");
        }
        Ok(())
    }

    /// One object: as itself with `--json`, else through `table`.
    fn show_one<T: serde::Serialize>(
        &self,
        value: &T,
        table: impl FnOnce(&Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.global.json {
            println!("{}", serde_json::to_string_pretty(value)?);
            return Ok(());
        }
        table(self)
    }

    fn profile(&self, cmd: ProfileCmd) -> anyhow::Result<()> {
        let mut config = Config::load(&self.config_path)?;
        match cmd {
            ProfileCmd::Set { name, endpoint, ca } => {
                let ca = std::fs::canonicalize(&ca)
                    .with_context(|| format!("CA certificate {}", ca.display()))?;
                let entry = config.profiles.entry(name).or_default();
                entry.endpoint = endpoint;
                entry.ca = ca;
                config.save(&self.config_path)
            }
            ProfileCmd::List => {
                let profiles = config.profiles.clone();
                self.show(&profiles, |t| {
                    t.row(["PROFILE", "ENDPOINT", "USER", "KEY"]);
                    for (name, p) in &profiles {
                        t.row([
                            name.as_str(),
                            &p.endpoint,
                            p.user.as_deref().unwrap_or("-"),
                            p.key_id.as_deref().unwrap_or("-"),
                        ]);
                    }
                })
            }
        }
    }

    async fn create_key(
        &self,
        user: String,
        password: String,
        name: Option<String>,
    ) -> anyhow::Result<()> {
        let key = config::new_key();
        let body = api::KeyCreate {
            user: user.clone(),
            password,
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name,
        };
        let created: api::ApiKey = self.unsigned()?.post("/v1/auth/keys", &body).await?;
        config::save_key(&self.config_path, &self.global.profile, &key)?;
        let mut config = Config::load(&self.config_path)?;
        if let Some(profile) = config.profiles.get_mut(&self.global.profile) {
            profile.user = Some(user);
            profile.key_id = Some(created.id.clone());
        }
        config.save(&self.config_path)?;
        self.show(&created, |t| {
            t.row(["KEY", "NAME", "USER ID"]);
            t.row([&created.id, &created.name, &created.user_id]);
        })
    }

    async fn tenant(&self, cmd: TenantCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            TenantCmd::Create {
                name,
                max_instances,
                max_vcpus,
                max_memory_mib,
            } => {
                let d = api::Quota::default();
                let quota = api::Quota {
                    instances: max_instances.unwrap_or(d.instances),
                    vcpus: max_vcpus.unwrap_or(d.vcpus),
                    memory_mib: max_memory_mib.unwrap_or(d.memory_mib),
                };
                let body = api::TenantCreate {
                    name,
                    quota: Some(quota),
                };
                let tenant: api::Tenant = client.post("/v1/tenants", &body).await?;
                self.show_one(&tenant, |c| c.show_tenants(std::slice::from_ref(&tenant)))
            }
            TenantCmd::List => {
                self.show_tenants(&client.get::<Vec<api::Tenant>>("/v1/tenants").await?)
            }
        }
    }

    fn show_tenants(&self, tenants: &[api::Tenant]) -> anyhow::Result<()> {
        self.show(&tenants, |t| {
            t.row(["NAME", "ID", "MAX INSTANCES", "MAX VCPUS", "MAX MEMORY MIB"]);
            for x in tenants {
                t.row([
                    x.name.clone(),
                    x.id.clone(),
                    x.quota.instances.to_string(),
                    x.quota.vcpus.to_string(),
                    x.quota.memory_mib.to_string(),
                ]);
            }
        })
    }

    async fn instance(&self, cmd: InstanceCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        let path = |id: &str, tail: &str| format!("/v1/instances/{id}{tail}");
        let (instance, wait_for): (api::Instance, Option<&str>) = match cmd {
            InstanceCmd::Create {
                name,
                image,
                flavor,
                wait,
            } => {
                let body = api::InstanceCreate {
                    name,
                    image,
                    flavor,
                };
                (
                    client.post("/v1/instances", &body).await?,
                    wait.then_some("running"),
                )
            }
            InstanceCmd::List => {
                let list: Vec<api::Instance> = client.get("/v1/instances").await?;
                return self.show_instances(&list);
            }
            InstanceCmd::Show { id } => (client.get(&path(&id, "")).await?, None),
            InstanceCmd::Stop { id, wait } => (
                client.post(&path(&id, "/stop"), &()).await?,
                wait.then_some("stopped"),
            ),
            InstanceCmd::Start { id, wait } => (
                client.post(&path(&id, "/start"), &()).await?,
                wait.then_some("running"),
            ),
            InstanceCmd::Delete { id, wait } => {
                let deleted = client
                    .json(Method::DELETE, &path(&id, ""), None::<&()>)
                    .await?;
                (deleted, wait.then_some("deleted"))
            }
            InstanceCmd::Console {
                id,
                follow,
                until,
                timeout,
            } => {
                return console(
                    &client,
                    &id,
                    follow,
                    until.as_deref(),
                    Duration::from_secs(timeout),
                )
                .await;
            }
        };
        let instance = match wait_for {
            Some(state) => {
                wait_state(&client, &instance.id, state, Duration::from_secs(180)).await?
            }
            None => instance,
        };
        self.show_one(&instance, |c| {
            c.show_instances(std::slice::from_ref(&instance))
        })
    }

    fn show_instances(&self, list: &[api::Instance]) -> anyhow::Result<()> {
        self.show(&list, |t| {
            t.row(["NAME", "ID", "STATE", "FLAVOR", "CREATED", "DISK ERASED"]);
            for i in list {
                let state = match &i.last_error {
                    Some(e) => format!("{} ({e})", i.state),
                    None => i.state.clone(),
                };
                t.row([
                    i.name.clone(),
                    i.id.clone(),
                    state,
                    i.flavor.clone(),
                    i.created_at.clone(),
                    i.disk_erased_at.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
        })
    }

    async fn audit_verify(&self, file: Option<PathBuf>) -> anyhow::Result<()> {
        let bytes = match &file {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
            }
            None => {
                self.signed()?
                    .send(Method::GET, "/v1/audit/log", Vec::new())
                    .await?
            }
        };
        match palisade_common::audit::verify(&bytes) {
            palisade_common::audit::Verdict::Intact { records, head } => {
                println!("audit log intact: {records} records, head {head}");
                Ok(())
            }
            palisade_common::audit::Verdict::Broken { line, reason } => {
                anyhow::bail!("audit log broken at record {line}: {reason}")
            }
        }
    }
}

/// Polls until the instance reaches `state` (or `error`).
pub async fn wait_state(
    client: &Client,
    id: &str,
    state: &str,
    timeout: Duration,
) -> anyhow::Result<api::Instance> {
    let deadline = Instant::now() + timeout;
    loop {
        let instance: api::Instance = client.get(&format!("/v1/instances/{id}")).await?;
        if instance.state == state {
            return Ok(instance);
        }
        if instance.state == "error" {
            anyhow::bail!(
                "instance {id} failed: {}",
                instance.last_error.unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "instance {id} is {} after {timeout:?}, not {state}",
                instance.state
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints the console; with `follow`, keeps polling, stopping at `until` or the timeout.
pub async fn console(
    client: &Client,
    id: &str,
    follow: bool,
    until: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    let mut seen = String::new();
    loop {
        let chunk: api::ConsoleOutput = client
            .get(&format!("/v1/instances/{id}/console?offset={offset}"))
            .await?;
        // The guest writes these bytes: keep its escape sequences away from the terminal.
        print!("{}", output::printable(&chunk.data));
        seen.push_str(&chunk.data);
        offset = chunk.next_offset;
        if let Some(text) = until {
            if seen.contains(text) {
                return Ok(());
            }
            // Keep only a tail long enough to match `until` across chunk boundaries.
            if seen.len() > 4 * text.len() + 65536 {
                let cut = seen.len() - 2 * text.len();
                let cut = (cut..seen.len())
                    .find(|i| seen.is_char_boundary(*i))
                    .unwrap_or(0);
                seen.drain(..cut);
            }
        }
        if !follow {
            return Ok(());
        }
        if Instant::now() > deadline {
            match until {
                Some(text) => anyhow::bail!("{text:?} did not appear within {timeout:?}"),
                None => return Ok(()),
            }
        }
        if chunk.data.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}
