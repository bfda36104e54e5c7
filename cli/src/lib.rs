//! The `palisade` command line: profiles, signed API calls, and `palisade up`.

pub mod client;
pub mod config;
mod net;
mod output;
pub mod up;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use ed25519_dalek::SigningKey;
use palisade_common::{api, audit};
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
    /// Log in (password, second factor): the profile gets a short-lived session key.
    Login {
        #[arg(long)]
        user: String,
        #[arg(long, env = "PALISADE_PASSWORD", hide_env_values = true)]
        password: String,
        #[command(flatten)]
        factor: SecondFactor,
    },
    /// Log in through the tenant's own identity provider (OpenID Connect): prints a URL to
    /// open in a browser, waits for the provider to send the browser back to this machine,
    /// and gives the profile a session key.
    Sso {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// Loopback port for the provider's redirect (0: any free port; the provider must
        /// accept http://127.0.0.1:<port>/callback).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Seconds to wait for the browser.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Change a password (the only thing an initial password may do).
    #[command(subcommand)]
    Password(PasswordCmd),
    /// API keys (Ed25519, made here; only the public key is sent).
    #[command(subcommand)]
    Key(KeyCmd),
    /// The second factor (TOTP): enrol, and prove it for administrative actions.
    #[command(subcommand)]
    Mfa(MfaCmd),
    /// Show who the profile's key belongs to.
    Whoami,
    /// Tenants (platform administrators; tenant administrators for their own settings).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Users (platform and tenant administrators).
    #[command(subcommand)]
    User(UserCmd),
    /// Groups of a tenant's users, for its policies (tenant administrators).
    #[command(subcommand)]
    Group(GroupCmd),
    /// VPCs: a tenant's own isolated networks.
    #[command(subcommand)]
    Vpc(net::VpcCmd),
    /// Subnets of VPCs, and their network ACLs.
    #[command(subcommand)]
    Subnet(net::SubnetCmd),
    /// Security groups: stateful rules on instances' ports.
    #[command(subcommand)]
    Sg(net::SgCmd),
    /// Instances' network ports: their groups and bandwidth.
    #[command(subcommand)]
    Port(net::PortCmd),
    /// The tenant's Cedar access policies (tenant administrators).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Identity alerts, e.g. failed-login bursts (security and tenant administrators).
    #[command(subcommand)]
    Alert(ListOnly),
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

/// The second factor of a password login, for accounts bound to MFA.
#[derive(Debug, Args)]
pub struct SecondFactor {
    /// A code from the authenticator app.
    #[arg(long, conflicts_with = "recovery_code")]
    pub totp_code: Option<String>,
    /// A one-time recovery code, when the authenticator is lost.
    #[arg(long)]
    pub recovery_code: Option<String>,
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
        /// Once a second factor is enrolled, a password change needs it too.
        #[command(flatten)]
        factor: SecondFactor,
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
        #[command(flatten)]
        factor: SecondFactor,
        /// Days until the key expires (default and maximum set by the platform).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// The profile user's live keys and sessions.
    List,
    /// Replace one of the profile's API keys with a new key pair made here.
    Rotate {
        id: String,
        /// Seconds the old key keeps working (at most 86400; default: it stops now).
        #[arg(long, default_value_t = 0)]
        overlap_secs: u32,
    },
    /// Revoke a key: requests it signs are refused from then on.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum MfaCmd {
    /// Start TOTP enrolment: prints the secret for an authenticator app (shown once).
    Enrol {
        #[arg(long)]
        user: String,
        #[arg(long, env = "PALISADE_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Finish enrolment with a first code; prints the recovery codes (shown once).
    Confirm {
        #[arg(long)]
        user: String,
        #[arg(long, env = "PALISADE_PASSWORD", hide_env_values = true)]
        password: String,
        /// A code from the authenticator app.
        #[arg(long)]
        code: String,
    },
    /// Prove the second factor again for the profile's key (administrative actions need a
    /// recent proof).
    #[command(group(ArgGroup::new("factor").required(true).args(["code", "recovery_code"])))]
    Verify {
        /// A code from the authenticator app.
        #[arg(long)]
        code: Option<String>,
        /// A one-time recovery code, when the authenticator is lost.
        #[arg(long)]
        recovery_code: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant with its quota (defaults: 10 instances, 16 vCPUs, 16 GiB).
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
    /// One tenant, with its password rules.
    Show {
        id: String,
    },
    /// Refuse every request of the tenant's users until it is enabled again.
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    /// Delete a tenant and its users (refused while it has instances).
    Delete {
        id: String,
    },
    /// Where the tenant's identity alerts are posted; prints the signing secret once.
    Webhook {
        id: String,
        /// An https URL (public address unless the platform allows private ones).
        #[arg(long, conflicts_with = "remove", required_unless_present = "remove")]
        url: Option<String>,
        /// Stop posting alerts.
        #[arg(long)]
        remove: bool,
    },
    /// Tighten the tenant's identity rules; only the settings given change.
    #[command(group(
        ArgGroup::new("setting")
            .required(true)
            .multiple(true)
            .args([
                "require_mfa",
                "password_min_length",
                "password_max_age_days",
                "audit_retention_days"
            ])
    ))]
    Settings {
        id: String,
        /// Every user of the tenant must use a second factor.
        #[arg(long, value_name = "true|false")]
        require_mfa: Option<bool>,
        /// 0 = the platform's minimum.
        #[arg(long)]
        password_min_length: Option<u32>,
        /// 0 = the platform's maximum age.
        #[arg(long)]
        password_max_age_days: Option<u32>,
        /// Keep the tenant's audit records this many days (at least the platform's minimum;
        /// 0 = the minimum).
        #[arg(long)]
        audit_retention_days: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user; its random initial password is printed once.
    Create {
        name: String,
        /// The user's tenant (default for a tenant administrator: its own); from a platform
        /// administrator without it, a platform account (which needs --role).
        #[arg(long)]
        tenant: Option<String>,
        /// Default `member` in a tenant.
        #[arg(long)]
        role: Option<String>,
    },
    /// The users of a tenant (default: your own tenant, or the platform's accounts).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        id: String,
    },
    /// Change a user's role (platform roles for platform accounts, tenant roles otherwise).
    SetRole {
        id: String,
        role: String,
    },
    /// Disable a user: their keys are revoked, and they cannot log in until enabled.
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Remove the user's second factor and revoke their keys, so they can enrol anew.
    ResetMfa {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    Create {
        name: String,
    },
    /// The tenant's groups and their members (user ids).
    List,
    Delete {
        id: String,
    },
    /// Add a user to a group.
    Add {
        group: String,
        user: String,
    },
    /// Remove a user from a group.
    Remove {
        group: String,
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Print the tenant's policies (or, with --platform, the platform's).
    Get {
        /// The platform's forbid-only policies (security administrators).
        #[arg(long)]
        platform: bool,
    },
    /// Replace the tenant's policies; they must validate, or nothing changes.
    Put {
        /// Cedar policy file; `-` for stdin.
        #[arg(long)]
        file: PathBuf,
        /// Replace the platform's policies instead (security administrators; `forbid` only).
        #[arg(long)]
        platform: bool,
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
        /// A label tenant policies can match; repeat for more.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// The subnet (id) of its network port; without it the instance has no network.
        #[arg(long)]
        subnet: Option<String>,
        /// A security group (id) of its port; repeat for more. None: nothing in or out.
        #[arg(long = "security-group", value_name = "ID")]
        security_groups: Vec<String>,
        /// Wait until it runs.
        #[arg(long)]
        wait: bool,
    },
    List {
        /// The tenant whose instances to list (platform operators).
        #[arg(long)]
        tenant: Option<String>,
    },
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
    /// Type a line on the serial console (the guest image gives a shell there); read what it
    /// prints with `console`.
    Type {
        id: String,
        text: String,
        /// Send TEXT as it is, without the newline.
        #[arg(long)]
        no_newline: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify the audit log against its signed tree heads: exported files (offline), or the
    /// live log (auditor). Names the first bad record; reports writer restarts and key
    /// rotations.
    Verify {
        /// An exported log (`audit export`); without it, the live log is fetched.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Head files (JSON lines): the export's, the head store's, heads you kept. Without
        /// them (and without --log), the live heads are fetched.
        #[arg(long = "heads")]
        heads: Vec<PathBuf>,
        /// The head key the operator published (base64); without it, the first head's key is
        /// trusted and shown.
        #[arg(long)]
        key: Option<String>,
        /// The log is a copy taken before some of the heads given (an export checked against
        /// the live head store): heads past its end are listed, not taken for a cut.
        #[arg(long)]
        copy: bool,
    },
    /// Audit records you may read, oldest first: a tenant administrator its tenant's (provider
    /// actions marked), others their own, the auditor all.
    List {
        /// From this RFC 3339 time on.
        #[arg(long)]
        since: Option<String>,
        /// Before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// An action, or a prefix ending in `*` (`instance.*`).
        #[arg(long)]
        action: Option<String>,
        /// An object, or a prefix ending in `*`.
        #[arg(long)]
        object: Option<String>,
        /// `allowed`, `denied`, `rejected`, ...
        #[arg(long)]
        result: Option<String>,
        /// Auditor only: one tenant's records.
        #[arg(long)]
        tenant: Option<String>,
        /// Records after this sequence number (the `next` of the previous page).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The pull stream for third-party audit systems: the records you may read after
    /// `--cursor`, as OCSF 1.1 JSON events, one per line; the next cursor goes to stderr.
    Ocsf {
        #[arg(long, default_value_t = 0)]
        cursor: u64,
        #[arg(long, default_value_t = 500)]
        limit: usize,
        /// Keep polling (every 2 s) for new events.
        #[arg(long)]
        follow: bool,
    },
    /// Write the live log and its heads to a directory (auditor), for offline verification.
    Export {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prove that record SEQ is in the log: fetches it, its inclusion proof and a fresh signed
    /// head, and checks them here.
    Prove {
        seq: u64,
        /// The head key to hold the head to (base64); without it, the server's is shown.
        #[arg(long)]
        key: Option<String>,
    },
    /// Sign a tree head now and print it (anyone may keep heads to check later).
    Head,
    /// Replace the head key (security administrator); the old key announces the new one.
    RotateKey,
    /// How long records are kept (the platform's minimum, tenants' longer rules) and the legal
    /// holds. A tenant administrator sees its own tenant's.
    Retention,
    /// Place a legal hold (security administrator): nothing it covers is purged until released.
    Hold {
        /// A tenant's id, or `platform` for the whole log.
        scope: String,
        /// Why (a case number, say); kept with the hold.
        #[arg(long)]
        reason: String,
    },
    /// Release a legal hold (security administrator).
    Release { scope: String },
    /// Purge the records past retention now (security administrator; it also runs hourly):
    /// only their hashes stay, so the log still verifies.
    Purge,
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
        Command::Login {
            user,
            password,
            factor,
        } => ctx.login(user, password, factor).await,
        Command::Sso {
            tenant,
            port,
            timeout,
        } => ctx.sso(tenant, port, Duration::from_secs(timeout)).await,
        Command::Password(PasswordCmd::Change {
            user,
            password,
            new_password,
            factor,
        }) => {
            let body = api::PasswordChange {
                user,
                current_password: password,
                new_password,
                totp_code: factor.totp_code,
                recovery_code: factor.recovery_code,
                webauthn: None,
            };
            let _: serde_json::Value = ctx.unsigned()?.post("/v1/auth/password", &body).await?;
            println!("password changed");
            Ok(())
        }
        Command::Key(cmd) => ctx.key(cmd).await,
        Command::Mfa(cmd) => ctx.mfa(cmd).await,
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
        Command::User(cmd) => ctx.user(cmd).await,
        Command::Group(cmd) => ctx.group(cmd).await,
        Command::Vpc(cmd) => ctx.vpc(cmd).await,
        Command::Subnet(cmd) => ctx.subnet(cmd).await,
        Command::Sg(cmd) => ctx.sg(cmd).await,
        Command::Port(cmd) => ctx.port(cmd).await,
        Command::Policy(cmd) => ctx.policy(cmd).await,
        Command::Alert(ListOnly::List) => ctx.alerts().await,
        Command::Flavor(ListOnly::List) => {
            let flavors: Vec<api::Flavor> = ctx.signed()?.get("/v1/flavors").await?;
            ctx.show(&flavors, |t| {
                t.row(["NAME", "VCPUS", "MEMORY MIB", "DISK GIB", "MBIT/S"]);
                for f in &flavors {
                    t.row([
                        f.name.clone(),
                        f.vcpus.to_string(),
                        f.memory_mib.to_string(),
                        f.disk_gib.to_string(),
                        f.bandwidth_mbps.to_string(),
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
        Command::Audit(AuditCmd::Verify {
            log,
            heads,
            key,
            copy,
        }) => ctx.audit_verify(log, heads, key, copy).await,
        Command::Audit(AuditCmd::List {
            since,
            until,
            action,
            object,
            result,
            tenant,
            after,
            limit,
        }) => {
            let query = serde_urlencoded::to_string([
                ("since", since),
                ("until", until),
                ("action", action),
                ("object", object),
                ("result", result),
                ("tenant", tenant),
                ("after", Some(after.to_string())),
                ("limit", Some(limit.to_string())),
            ])?;
            let page: api::AuditRecords = ctx
                .signed()?
                .get(&format!("/v1/audit/records?{query}"))
                .await?;
            ctx.show_audit_records(&page)
        }
        Command::Audit(AuditCmd::Ocsf {
            mut cursor,
            limit,
            follow,
        }) => {
            use std::io::Write;
            let client = ctx.signed()?;
            // Without --follow: what the log held at the first read (each read is a record
            // too, which would otherwise keep the stream going).
            let mut end = None;
            let mut out = std::io::stdout().lock();
            loop {
                let page: api::OcsfPage = client
                    .get(&format!("/v1/audit/ocsf?cursor={cursor}&limit={limit}"))
                    .await?;
                let end = *end.get_or_insert(page.end);
                let mut stopped = false;
                let mut printed = cursor;
                for event in &page.events {
                    let seq = event["metadata"]["sequence"].as_u64().unwrap_or(printed);
                    if seq > end && !follow {
                        stopped = true;
                        break;
                    }
                    // A closed pipe (`| head`) ends the stream quietly.
                    if writeln!(out, "{}", serde_json::to_string(event)?).is_err() {
                        return Ok(());
                    }
                    printed = seq;
                }
                cursor = if stopped { printed } else { page.cursor };
                if out.flush().is_err() {
                    return Ok(());
                }
                eprintln!("cursor {cursor}");
                let caught_up = page.events.len() < limit || cursor >= end;
                if caught_up {
                    if !follow {
                        break Ok(());
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        Command::Audit(AuditCmd::Export { dir }) => ctx.audit_export(&dir).await,
        Command::Audit(AuditCmd::Prove { seq, key }) => ctx.audit_prove(seq, key).await,
        Command::Audit(AuditCmd::Head) => {
            let head: audit::TreeHead = ctx
                .signed()?
                .json(Method::POST, "/v1/audit/heads", None::<&()>)
                .await?;
            ctx.print_head(&head)
        }
        Command::Audit(AuditCmd::Retention) => {
            let r: api::AuditRetention = ctx.signed()?.get("/v1/audit/retention").await?;
            ctx.show_one(&r, |_| {
                println!("platform minimum: {}", output::duration(r.minimum_secs));
                let mut t = Table::default();
                t.row(["TENANT", "RETENTION DAYS"]);
                for x in &r.tenants {
                    t.row([x.tenant_id.clone(), x.days.to_string()]);
                }
                print!("{t}");
                let mut t = Table::default();
                t.row(["LEGAL HOLD", "REASON", "SET BY", "SET AT"]);
                for h in &r.holds {
                    t.row([
                        h.scope.clone(),
                        output::printable(&h.reason),
                        h.set_by.clone(),
                        h.set_at.clone(),
                    ]);
                }
                print!("{t}");
                Ok(())
            })
        }
        Command::Audit(AuditCmd::Hold { scope, reason }) => {
            let hold: api::AuditHold = ctx
                .signed()?
                .json(
                    Method::PUT,
                    &format!("/v1/audit/holds/{}", segment(&scope)),
                    Some(&api::AuditHoldSet { reason }),
                )
                .await?;
            ctx.show_one(&hold, |_| {
                println!("legal hold on {} set at {}", hold.scope, hold.set_at);
                Ok(())
            })
        }
        Command::Audit(AuditCmd::Release { scope }) => {
            let client = ctx.signed()?;
            let path = format!("/v1/audit/holds/{}", segment(&scope));
            call(&client, Method::DELETE, &path, None::<&()>).await?;
            println!("legal hold on {scope} released");
            Ok(())
        }
        Command::Audit(AuditCmd::Purge) => {
            let done: api::AuditPurge = ctx
                .signed()?
                .json(Method::POST, "/v1/audit/purge", None::<&()>)
                .await?;
            ctx.show_one(&done, |_| {
                println!(
                    "purged {} records past retention (purge records: {:?})",
                    done.records, done.purge_records
                );
                Ok(())
            })
        }
        Command::Audit(AuditCmd::RotateKey) => {
            let head: audit::TreeHead = ctx
                .signed()?
                .json(Method::POST, "/v1/audit/head-key/rotate", None::<&()>)
                .await?;
            ctx.print_head(&head)
        }
        Command::Up(args) => up::run(ctx.global.clone(), args).await,
    }
}

/// Sends a request whose answer has no body (204 No Content).
async fn call<B: serde::Serialize>(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> anyhow::Result<()> {
    let body = match body {
        Some(b) => serde_json::to_vec(b)?,
        None => Vec::new(),
    };
    client.send(method, path, body).await?;
    Ok(())
}

/// `value` percent-encoded but for unreserved characters: safe as a path segment or a query
/// value (it cannot add segments or parameters).
fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `path?name=value`, the value percent-encoded so that it cannot add parameters.
fn with_query(path: &str, name: &str, value: Option<&str>) -> String {
    match value {
        Some(value) => format!("{path}?{name}={}", segment(value)),
        None => path.to_string(),
    }
}

/// `key=value`, for `--tag`.
fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// Items separated by commas, or `-` for none.
fn joined(items: impl Iterator<Item = impl std::fmt::Display>) -> String {
    let text = items.map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

/// `900` → `15m`: the largest unit that divides the duration exactly.
fn seconds(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
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
                "profile {:?} has no key yet (see `palisade key create` or `palisade login`)",
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

    /// Makes the profile sign with `key` (registered as `key_id`) from now on; `user`, when
    /// given, becomes the profile's user.
    fn store_key(
        &self,
        user: Option<String>,
        key_id: &str,
        key: &SigningKey,
    ) -> anyhow::Result<()> {
        config::save_key(&self.config_path, &self.global.profile, key)?;
        let mut config = Config::load(&self.config_path)?;
        if let Some(profile) = config.profiles.get_mut(&self.global.profile) {
            if user.is_some() {
                profile.user = user;
            }
            profile.key_id = Some(key_id.to_string());
        }
        config.save(&self.config_path)
    }

    async fn login(
        &self,
        user: String,
        password: String,
        factor: SecondFactor,
    ) -> anyhow::Result<()> {
        let key = config::new_key();
        let body = api::Login {
            user: user.clone(),
            password,
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            totp_code: factor.totp_code,
            recovery_code: factor.recovery_code,
            webauthn: None,
        };
        let session: api::ApiKey = self.unsigned()?.post("/v1/auth/login", &body).await?;
        self.store_key(Some(user), &session.id, &key)?;
        self.show(&session, |t| {
            t.row(["SESSION KEY", "EXPIRES", "IDLE TIMEOUT"]);
            t.row([
                session.id.clone(),
                session.expires_at.clone().unwrap_or_else(|| "-".into()),
                session
                    .idle_timeout_secs
                    .map_or_else(|| "-".into(), seconds),
            ]);
        })
    }

    /// A federated login (RFC 8252 style): the provider's answer comes back to a loopback port
    /// on this machine, and only then does the controller hand out the session.
    async fn sso(&self, tenant: String, port: u16, timeout: Duration) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
        let redirect_uri = format!(
            "http://127.0.0.1:{}/callback",
            listener.local_addr()?.port()
        );
        let key = config::new_key();
        let client = self.unsigned()?;
        let body = api::OidcStart {
            tenant,
            redirect_uri,
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
        };
        let started: api::OidcStarted = client.post("/v1/auth/oidc/start", &body).await?;
        println!(
            "Open this URL in a browser to log in:\n{}",
            started.authorization_url
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let (code, state) = tokio::time::timeout(timeout, async {
            loop {
                let (mut stream, _) = listener.accept().await?;
                let mut buffer = vec![0u8; 8192];
                let n = stream.read(&mut buffer).await?;
                let request = String::from_utf8_lossy(&buffer[..n]).to_string();
                let target = request
                    .lines()
                    .next()
                    .and_then(|line| line.split_whitespace().nth(1))
                    .unwrap_or("")
                    .to_string();
                let Some(query) = target.strip_prefix("/callback?") else {
                    let _ = stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    continue;
                };
                let params: Vec<(String, String)> =
                    serde_urlencoded::from_str(query).unwrap_or_default();
                let get = |name: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let page = "Palisade: you can close this window and return to the terminal.";
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: \
                             {}\r\nconnection: close\r\n\r\n{page}",
                            page.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                if let Some(error) = get("error") {
                    anyhow::bail!("the identity provider refused the login: {error}");
                }
                match (get("code"), get("state")) {
                    (Some(code), Some(state)) => return Ok::<_, anyhow::Error>((code, state)),
                    _ => anyhow::bail!("the identity provider sent no code"),
                }
            }
        })
        .await
        .context("no answer from the browser in time")??;
        let finish = api::OidcFinish {
            login_id: started.login_id,
            code,
            state,
        };
        let session: api::ApiKey = client.post("/v1/auth/oidc/finish", &finish).await?;
        self.store_key(None, &session.id, &key)?;
        self.show(&session, |t| {
            t.row(["SESSION KEY", "USER ID", "EXPIRES"]);
            t.row([
                session.id.clone(),
                session.user_id.clone(),
                session.expires_at.clone().unwrap_or_else(|| "-".into()),
            ]);
        })
    }

    async fn key(&self, cmd: KeyCmd) -> anyhow::Result<()> {
        match cmd {
            KeyCmd::Create {
                user,
                password,
                name,
                factor,
                expires_in_days,
            } => {
                let key = config::new_key();
                let body = api::KeyCreate {
                    user: user.clone(),
                    password,
                    public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
                    name,
                    totp_code: factor.totp_code,
                    recovery_code: factor.recovery_code,
                    webauthn: None,
                    expires_in_days,
                };
                let created: api::ApiKey = self.unsigned()?.post("/v1/auth/keys", &body).await?;
                self.store_key(Some(user), &created.id, &key)?;
                self.show_new_key(&created)
            }
            KeyCmd::List => {
                let keys: Vec<api::ApiKey> = self.signed()?.get("/v1/keys").await?;
                self.show(&keys, |t| {
                    t.row(["KEY", "NAME", "KIND", "CREATED", "EXPIRES", "PUBLIC KEY"]);
                    for k in &keys {
                        t.row([
                            &k.id,
                            &k.name,
                            &k.kind,
                            &k.created_at,
                            k.expires_at.as_deref().unwrap_or("-"),
                            &k.public_key,
                        ]);
                    }
                })
            }
            KeyCmd::Rotate { id, overlap_secs } => self.rotate_key(&id, overlap_secs).await,
            KeyCmd::Revoke { id } => {
                let path = format!("/v1/keys/{id}");
                call(&self.signed()?, Method::DELETE, &path, None::<&()>).await?;
                println!("key {id} revoked");
                Ok(())
            }
        }
    }

    /// Rotates the profile's own key: the new private key has nowhere else to go, so a key
    /// held by another profile is rotated from that profile.
    async fn rotate_key(&self, id: &str, overlap_secs: u32) -> anyhow::Result<()> {
        let config = Config::load(&self.config_path)?;
        let current = config.profile(&self.global.profile)?.key_id.clone();
        if current.as_deref() != Some(id) {
            anyhow::bail!(
                "key {id} is not the key of profile {:?}: rotate it with the profile that holds it",
                self.global.profile
            );
        }
        let key = config::new_key();
        let body = api::KeyRotate {
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            overlap_secs,
        };
        let path = format!("/v1/keys/{id}/rotate");
        let rotated: api::ApiKey = self.signed()?.post(&path, &body).await?;
        self.store_key(None, &rotated.id, &key).with_context(|| {
            format!(
                "saving the new key {} (the old one was rotated)",
                rotated.id
            )
        })?;
        self.show_new_key(&rotated)
    }

    fn show_new_key(&self, key: &api::ApiKey) -> anyhow::Result<()> {
        self.show(key, |t| {
            t.row(["KEY", "NAME", "KIND", "EXPIRES", "USER ID"]);
            t.row([
                &key.id,
                &key.name,
                &key.kind,
                key.expires_at.as_deref().unwrap_or("-"),
                &key.user_id,
            ]);
        })
    }

    async fn mfa(&self, cmd: MfaCmd) -> anyhow::Result<()> {
        match cmd {
            MfaCmd::Enrol { user, password } => {
                let body = api::TotpEnrol { user, password };
                let enrolment: api::TotpEnrolment =
                    self.unsigned()?.post("/v1/auth/mfa/totp", &body).await?;
                self.show(&enrolment, |t| {
                    t.row(["SECRET (shown once)", "OTPAUTH URI"]);
                    t.row([&enrolment.secret, &enrolment.otpauth_uri]);
                })
            }
            MfaCmd::Confirm {
                user,
                password,
                code,
            } => {
                let body = api::TotpConfirm {
                    user,
                    password,
                    code,
                };
                let codes: api::RecoveryCodes = self
                    .unsigned()?
                    .post("/v1/auth/mfa/totp/confirm", &body)
                    .await?;
                self.show(&codes, |t| {
                    t.row(["RECOVERY CODES (shown once)"]);
                    for code in &codes.recovery_codes {
                        t.row([code]);
                    }
                })
            }
            MfaCmd::Verify {
                code,
                recovery_code,
            } => {
                let body = api::MfaVerify {
                    totp_code: code,
                    recovery_code,
                    webauthn: None,
                };
                let client = self.signed()?;
                call(&client, Method::POST, "/v1/auth/mfa/verify", Some(&body)).await?;
                println!("second factor verified");
                Ok(())
            }
        }
    }

    async fn tenant(&self, cmd: TenantCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        let path = |id: &str, tail: &str| format!("/v1/tenants/{id}{tail}");
        let (id, done) = match cmd {
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
                return self.show_tenant(&tenant);
            }
            TenantCmd::List => {
                let tenants: Vec<api::Tenant> = client.get("/v1/tenants").await?;
                return self.show_tenants(&tenants);
            }
            TenantCmd::Show { id } => {
                let tenant: api::Tenant = client.get(&path(&id, "")).await?;
                return self.show_tenant(&tenant);
            }
            TenantCmd::Settings {
                id,
                require_mfa,
                password_min_length,
                password_max_age_days,
                audit_retention_days,
            } => {
                let mut settings = client.get::<api::Tenant>(&path(&id, "")).await?.settings;
                settings.require_mfa = require_mfa.unwrap_or(settings.require_mfa);
                settings.password_min_length =
                    password_min_length.unwrap_or(settings.password_min_length);
                settings.password_max_age_days =
                    password_max_age_days.unwrap_or(settings.password_max_age_days);
                settings.audit_retention_days =
                    audit_retention_days.unwrap_or(settings.audit_retention_days);
                let tenant: api::Tenant = client
                    .json(Method::PUT, &path(&id, "/settings"), Some(&settings))
                    .await?;
                return self.show_tenant(&tenant);
            }
            TenantCmd::Disable { id } => {
                call(&client, Method::POST, &path(&id, "/disable"), None::<&()>).await?;
                (id, "disabled")
            }
            TenantCmd::Enable { id } => {
                call(&client, Method::POST, &path(&id, "/enable"), None::<&()>).await?;
                (id, "enabled")
            }
            TenantCmd::Delete { id } => {
                call(&client, Method::DELETE, &path(&id, ""), None::<&()>).await?;
                (id, "deleted")
            }
            TenantCmd::Webhook { id, url, remove: _ } => {
                let webhook: api::Webhook = client
                    .json(
                        Method::PUT,
                        &path(&id, "/webhook"),
                        Some(&api::WebhookSet { url }),
                    )
                    .await?;
                return self.show(&webhook, |t| {
                    t.row(["URL", "SIGNING SECRET (shown once)"]);
                    t.row([
                        webhook.url.as_deref().unwrap_or("-"),
                        webhook.secret.as_deref().unwrap_or("-"),
                    ]);
                });
            }
        };
        println!("tenant {id} {done}");
        Ok(())
    }

    fn show_tenants(&self, tenants: &[api::Tenant]) -> anyhow::Result<()> {
        self.show(&tenants, |t| {
            t.row([
                "NAME",
                "ID",
                "DISABLED",
                "REQUIRE MFA",
                "MAX INSTANCES",
                "MAX VCPUS",
                "MAX MEMORY MIB",
            ]);
            for x in tenants {
                t.row([
                    x.name.clone(),
                    x.id.clone(),
                    yes_no(x.disabled).into(),
                    yes_no(x.settings.require_mfa).into(),
                    x.quota.instances.to_string(),
                    x.quota.vcpus.to_string(),
                    x.quota.memory_mib.to_string(),
                ]);
            }
        })
    }

    /// One tenant, with the password rules that the list leaves out.
    fn show_tenant(&self, tenant: &api::Tenant) -> anyhow::Result<()> {
        self.show_one(tenant, |c| {
            c.show_tenants(std::slice::from_ref(tenant))?;
            let rule = |n: u32| match n {
                0 => "platform default".to_string(),
                n => n.to_string(),
            };
            let mut t = Table::default();
            t.row([
                "PASSWORD MIN LENGTH",
                "PASSWORD MAX AGE DAYS",
                "AUDIT RETENTION DAYS",
                "CREATED",
            ]);
            t.row([
                rule(tenant.settings.password_min_length),
                rule(tenant.settings.password_max_age_days),
                rule(tenant.settings.audit_retention_days),
                tenant.created_at.clone(),
            ]);
            print!("\n{t}");
            Ok(())
        })
    }

    async fn user(&self, cmd: UserCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        let path = |id: &str, tail: &str| format!("/v1/users/{id}{tail}");
        let (id, done) = match cmd {
            UserCmd::Create { name, tenant, role } => {
                let body = api::UserCreate {
                    name,
                    tenant_id: tenant,
                    role,
                };
                let created: api::UserCreated = client.post("/v1/users", &body).await?;
                return self.show(&created, |t| {
                    t.row([
                        "USER",
                        "ID",
                        "TENANT",
                        "ROLE",
                        "INITIAL PASSWORD (shown once)",
                    ]);
                    t.row([
                        &created.user.name,
                        &created.user.id,
                        created.user.tenant_id.as_deref().unwrap_or("-"),
                        &created.user.role,
                        &created.initial_password,
                    ]);
                });
            }
            UserCmd::List { tenant } => {
                let path = with_query("/v1/users", "tenant", tenant.as_deref());
                return self.show_users(&client.get::<Vec<api::User>>(&path).await?);
            }
            UserCmd::Show { id } => {
                let user: api::User = client.get(&path(&id, "")).await?;
                return self.show_one(&user, |c| c.show_users(std::slice::from_ref(&user)));
            }
            UserCmd::SetRole { id, role } => {
                let body = api::RoleSet { role: role.clone() };
                call(&client, Method::PUT, &path(&id, "/role"), Some(&body)).await?;
                println!("user {id} is now {role}");
                return Ok(());
            }
            UserCmd::Disable { id } => {
                call(&client, Method::POST, &path(&id, "/disable"), None::<&()>).await?;
                (id, "disabled")
            }
            UserCmd::Enable { id } => {
                call(&client, Method::POST, &path(&id, "/enable"), None::<&()>).await?;
                (id, "enabled")
            }
            UserCmd::Delete { id } => {
                call(&client, Method::DELETE, &path(&id, ""), None::<&()>).await?;
                (id, "deleted")
            }
            UserCmd::ResetMfa { id } => {
                call(&client, Method::DELETE, &path(&id, "/mfa"), None::<&()>).await?;
                (id, "has no second factor now")
            }
        };
        println!("user {id} {done}");
        Ok(())
    }

    fn show_users(&self, users: &[api::User]) -> anyhow::Result<()> {
        self.show(&users, |t| {
            t.row(["NAME", "ID", "TENANT", "ROLE", "DISABLED", "MFA"]);
            for u in users {
                t.row([
                    &u.name,
                    &u.id,
                    u.tenant_id.as_deref().unwrap_or("-"),
                    &u.role,
                    yes_no(u.disabled),
                    yes_no(u.mfa_enrolled),
                ]);
            }
        })
    }

    async fn group(&self, cmd: GroupCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        let member = |group: &str, user: &str| format!("/v1/groups/{group}/members/{user}");
        match cmd {
            GroupCmd::Create { name } => {
                let body = api::GroupCreate { name };
                let group: api::Group = client.post("/v1/groups", &body).await?;
                self.show_one(&group, |c| c.show_groups(std::slice::from_ref(&group)))
            }
            GroupCmd::List => self.show_groups(&client.get::<Vec<api::Group>>("/v1/groups").await?),
            GroupCmd::Delete { id } => {
                let path = format!("/v1/groups/{id}");
                call(&client, Method::DELETE, &path, None::<&()>).await?;
                println!("group {id} deleted");
                Ok(())
            }
            GroupCmd::Add { group, user } => {
                call(&client, Method::PUT, &member(&group, &user), None::<&()>).await?;
                println!("user {user} added to group {group}");
                Ok(())
            }
            GroupCmd::Remove { group, user } => {
                call(&client, Method::DELETE, &member(&group, &user), None::<&()>).await?;
                println!("user {user} removed from group {group}");
                Ok(())
            }
        }
    }

    fn show_groups(&self, groups: &[api::Group]) -> anyhow::Result<()> {
        self.show(&groups, |t| {
            t.row(["NAME", "ID", "CREATED", "MEMBERS"]);
            for g in groups {
                t.row([
                    g.name.clone(),
                    g.id.clone(),
                    g.created_at.clone(),
                    joined(g.members.iter()),
                ]);
            }
        })
    }

    async fn policy(&self, cmd: PolicyCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            PolicyCmd::Get { platform } => {
                let path = if platform {
                    "/v1/platform/policies"
                } else {
                    "/v1/policies"
                };
                let policies: api::Policies = client.get(path).await?;
                self.show_one(&policies, |_| {
                    // Another administrator wrote this text: keep escape sequences away from
                    // the terminal.
                    let text = output::printable(&policies.text);
                    if text.is_empty() {
                        eprintln!("no policies are set");
                    }
                    print!("{text}");
                    if !text.is_empty() && !text.ends_with('\n') {
                        println!();
                    }
                    Ok(())
                })
            }
            PolicyCmd::Put { file, platform } => {
                let text = if file.as_os_str() == "-" {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading policies from stdin")?;
                    text
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                let body = api::Policies { text };
                let path = if platform {
                    "/v1/platform/policies"
                } else {
                    "/v1/policies"
                };
                call(&client, Method::PUT, path, Some(&body)).await?;
                println!("policies replaced");
                Ok(())
            }
        }
    }

    async fn alerts(&self) -> anyhow::Result<()> {
        let alerts: Vec<api::Alert> = self.signed()?.get("/v1/alerts").await?;
        self.show(&alerts, |t| {
            t.row(["ID", "KIND", "USER", "SOURCE", "CREATED", "DETAIL"]);
            for a in &alerts {
                t.row([
                    &a.id,
                    &a.kind,
                    a.user_id.as_deref().unwrap_or("-"),
                    &a.source,
                    &a.created_at,
                    &a.detail,
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
                tags,
                subnet,
                security_groups,
                wait,
            } => {
                let mut by_key = BTreeMap::new();
                for (key, value) in tags {
                    if by_key.insert(key.clone(), value).is_some() {
                        anyhow::bail!("tag {key:?} given twice");
                    }
                }
                let body = api::InstanceCreate {
                    tags: by_key,
                    name,
                    image,
                    flavor,
                    subnet,
                    security_groups,
                };
                (
                    client.post("/v1/instances", &body).await?,
                    wait.then_some("running"),
                )
            }
            InstanceCmd::List { tenant } => {
                let path = with_query("/v1/instances", "tenant", tenant.as_deref());
                let list: Vec<api::Instance> = client.get(&path).await?;
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
            InstanceCmd::Type {
                id,
                text,
                no_newline,
            } => {
                let mut bytes = text.into_bytes();
                if !no_newline {
                    bytes.push(b'\n');
                }
                client
                    .send(Method::POST, &path(&id, "/console"), bytes)
                    .await?;
                return Ok(());
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
            t.row([
                "NAME",
                "ID",
                "STATE",
                "FLAVOR",
                "CREATED",
                "DISK ERASED",
                "TAGS",
            ]);
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
                    joined(i.tags.iter().map(|(k, v)| format!("{k}={v}"))),
                ]);
            }
        })
    }

    async fn audit_verify(
        &self,
        log: Option<PathBuf>,
        head_files: Vec<PathBuf>,
        key: Option<String>,
        copy: bool,
    ) -> anyhow::Result<()> {
        check_head_key(key.as_deref())?;
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let bytes = match &log {
            Some(path) => read(path)?,
            None => {
                self.signed()?
                    .send(Method::GET, "/v1/audit/log", Vec::new())
                    .await?
            }
        };
        let mut stores: Vec<(String, Vec<u8>)> = Vec::new();
        for path in &head_files {
            stores.push((path.display().to_string(), read(path)?));
        }
        if head_files.is_empty() && log.is_none() {
            let live = self
                .signed()?
                .send(Method::GET, "/v1/audit/heads", Vec::new())
                .await?;
            stores.push(("the server's heads".into(), live));
        }
        let stores: Vec<(&str, &[u8])> = stores
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let heads = audit::read_heads(&stores).map_err(|e| anyhow::anyhow!(e))?;
        let report = audit::verify_with(&bytes, &heads, key.as_deref(), copy && log.is_some());
        if self.global.json {
            let verdict = serde_json::json!({
                "intact": report.fault.is_none(),
                "records": report.records,
                "purged": report.purged,
                "heads": report.heads,
                "covered": report.covered,
                "keys": report.keys,
                "events": report.events,
                "fault": report.fault.as_ref().map(|(line, why)| {
                    serde_json::json!({"record": line, "reason": why})
                }),
            });
            println!("{verdict}");
        } else {
            for event in &report.events {
                println!("  {}", output::printable(event));
            }
        }
        if let Some((line, reason)) = &report.fault {
            anyhow::bail!(
                "audit log broken at record {line}: {}",
                output::printable(reason)
            );
        }
        if heads.is_empty() {
            anyhow::bail!(
                "no signed heads given: the records are each sound, but without heads a cut \
                 or rewritten log cannot be told apart (pass --heads)"
            );
        }
        if !self.global.json {
            println!(
                "audit log intact: {} records ({} purged past retention, hashes kept), {} signed \
                 heads, the newest covering {} ({} newer records not yet under a head); head \
                 keys: {}",
                report.records,
                report.purged,
                report.heads,
                report.covered,
                report.records - report.covered,
                report.keys.join(", ")
            );
        }
        Ok(())
    }

    async fn audit_export(&self, dir: &Path) -> anyhow::Result<()> {
        let client = self.signed()?;
        // Heads first: every head then covers records the log fetched after it holds.
        let heads = client
            .send(Method::GET, "/v1/audit/heads", Vec::new())
            .await?;
        let log = client
            .send(Method::GET, "/v1/audit/log", Vec::new())
            .await?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The records name users, addresses and objects: readable by their owner only.
        config::write_private(&dir.join("audit.log"), &log)?;
        config::write_private(&dir.join("heads.jsonl"), &heads)?;
        let records = log.iter().filter(|b| **b == b'\n').count();
        println!(
            "exported {records} records and their heads to {}; check with: palisade audit \
             verify --log {0}/audit.log --heads {0}/heads.jsonl --key <published head key>",
            dir.display()
        );
        Ok(())
    }

    async fn audit_prove(&self, seq: u64, key: Option<String>) -> anyhow::Result<()> {
        let client = self.signed()?;
        let head: audit::TreeHead = client
            .json(Method::POST, "/v1/audit/heads", None::<&()>)
            .await?;
        let answer: api::AuditInclusion = client
            .get(&format!(
                "/v1/audit/proof/inclusion?seq={seq}&tree_size={}",
                head.tree_size
            ))
            .await?;
        check_head_key(key.as_deref())?;
        // A pinned key vouches for the head's key itself or through the rotations it announced.
        if let Some(pinned) = &key {
            let heads = client
                .send(Method::GET, "/v1/audit/heads", Vec::new())
                .await?;
            let heads = audit::read_heads(&[("the server's heads", &heads)])
                .map_err(|e| anyhow::anyhow!(e))?;
            if !audit::trusted_keys(&heads, pinned).contains(&head.key) {
                anyhow::bail!(
                    "record {seq} is NOT proved: the head is signed by {}, which the given key \
                     never announced",
                    head.key
                );
            }
        }
        audit::verify_inclusion(answer.record.as_bytes(), &answer.proof, &head, &head.key)
            .map_err(|e| anyhow::anyhow!("record {seq} is NOT proved: {e}"))?;
        if self.global.json {
            println!(
                "{}",
                serde_json::json!({"proved": true, "record": answer.record, "head": head})
            );
        } else {
            println!("{}", output::printable(&answer.record));
            println!(
                "proved: record {seq} is in the log of {} records whose head {} signed at {}{}",
                head.tree_size,
                head.key,
                head.time,
                if key.is_none() {
                    " (the server's key; pass --key to hold it to the published one)"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    fn show_audit_records(&self, page: &api::AuditRecords) -> anyhow::Result<()> {
        self.show(page, |t| {
            t.row([
                "SEQ", "TIME", "SUBJECT", "ROLE", "ACTION", "OBJECT", "RESULT", "CODE", "SOURCE",
            ]);
            for r in &page.records {
                let subject = if r.provider && r.subject != "provider" {
                    format!("{} (provider)", r.subject)
                } else {
                    r.subject.clone()
                };
                t.row([
                    r.seq.to_string(),
                    r.time.clone(),
                    subject,
                    r.role.clone().unwrap_or_else(|| "-".into()),
                    r.action.clone(),
                    r.object.clone(),
                    r.result.clone(),
                    r.code.clone().unwrap_or_else(|| "-".into()),
                    r.source.clone(),
                ]);
            }
        })?;
        if let (Some(next), false) = (page.next, self.global.json) {
            println!("more: --after {next}");
        }
        Ok(())
    }

    fn print_head(&self, head: &audit::TreeHead) -> anyhow::Result<()> {
        if self.global.json {
            println!("{}", serde_json::to_string(head)?);
        } else {
            println!(
                "tree head: {} records, root {}, signed {} by {} (clock {}, offset {} µs)",
                head.tree_size,
                head.root_hash,
                head.time,
                head.key,
                if head.clock.synchronized {
                    "synchronized"
                } else {
                    "NOT synchronized"
                },
                head.clock.offset_us
            );
            if let Some(next) = &head.next_key {
                println!("next head key: {next}");
            }
        }
        Ok(())
    }
}

/// A head key given on the command line must be an Ed25519 public key (base64).
fn check_head_key(key: Option<&str>) -> anyhow::Result<()> {
    match key {
        Some(k) if audit::parse_key(k).is_none() => anyhow::bail!(
            "--key is not an Ed25519 public key (base64 of 32 bytes): {}",
            output::printable(k)
        ),
        _ => Ok(()),
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
