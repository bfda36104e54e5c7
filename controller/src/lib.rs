//! The Palisade controller: the access layer (HTTPS API) and the service layer (identity,
//! compute, audit) over one database. Host work is delegated to host agents over mutual TLS.

pub mod access;
pub mod agent_client;
pub mod db;
pub mod error;
pub mod pki;
pub mod service;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

/// `palisade controller` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Directory holding the database, PKI and audit log (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// A second place for the audit log's signed tree heads (default `<data-dir>/audit-heads`):
    /// with it on another volume or a remote mount, cutting records off the end of the log is
    /// detectable even by someone who can rewrite the data directory.
    #[arg(long)]
    pub audit_head_store: Option<PathBuf>,
    /// Send every audit record to this syslog collector (`host:port`): RFC 5424 over TLS
    /// (RFC 5425), at least once, resuming after restarts from `<data-dir>/audit/syslog.cursor`.
    #[arg(long, requires = "audit_syslog_ca")]
    pub audit_syslog: Option<String>,
    /// The CA the syslog collector's certificate must chain to.
    #[arg(long)]
    pub audit_syslog_ca: Option<PathBuf>,
    /// The name the collector's certificate must carry (default: the host of --audit-syslog).
    #[arg(long)]
    pub audit_syslog_name: Option<String>,
    /// The platform's minimum audit retention (`365d`, `12h`, `90s`; days without a unit).
    /// Older records are purged: only their hashes stay, so the log still verifies. Tenants may
    /// keep theirs longer; a legal hold keeps them all.
    #[arg(long, default_value = "365d", value_parser = service::retention::parse_duration)]
    pub audit_retention: std::time::Duration,
    /// Seconds between purges of records past retention (the first runs at start).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_purge_interval_secs: u64,
    /// Address of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Base URL of the local host agent (mutual TLS with certificates from the data dir).
    #[arg(long, default_value = "https://127.0.0.1:8444")]
    pub agent_url: String,
    /// The platform master key file (0600; created on first start). Default:
    /// `<data-dir>/master.key`. Keep it on another volume (a secrets mount, say) so that a
    /// copy of the data directory or its backups opens no sealed secret.
    #[arg(long)]
    pub master_key: Option<PathBuf>,
    /// Guest image directory (with image.json) registered as a public image at start.
    #[arg(long)]
    pub guest_image: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the API server certificate.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// Requests per second one source address may make (bursts of twice that); more get 429.
    #[arg(long, default_value_t = 100)]
    pub rate_limit_per_source: u32,
    /// Requests per second one API key may make (bursts of twice that); more get 429.
    #[arg(long, default_value_t = 50)]
    pub rate_limit_per_key: u32,
    /// Wrong passwords in a row that lock an account.
    #[arg(long, default_value_t = 5)]
    pub lockout_after: u32,
    /// First lock's length in seconds; each further lock doubles it (at most an hour).
    #[arg(long, default_value_t = 30)]
    pub lockout_secs: u32,
    /// Seconds between reconciliation passes (a change also triggers one at once).
    #[arg(long, default_value_t = 5)]
    pub reconcile_interval_secs: u64,
    /// A login session ends after this many seconds without a request.
    #[arg(long, default_value_t = 900)]
    pub session_idle_secs: u32,
    /// A login session ends this many seconds after the login, used or not.
    #[arg(long, default_value_t = 8 * 3600)]
    pub session_max_secs: u32,
    /// Longest (and default) lifetime of an API key, in days.
    #[arg(long, default_value_t = 90)]
    pub key_max_days: u32,
    /// Passwords older than this must be changed before anything else (0 = no maximum;
    /// tenants may set a shorter one).
    #[arg(long, default_value_t = 0)]
    pub password_max_age_days: u32,
    /// Seconds a second-factor proof counts as fresh for administrative actions.
    #[arg(long, default_value_t = 900)]
    pub mfa_fresh_secs: u32,
    /// Let the URLs tenants set (alert webhooks, OpenID Connect providers) use plain HTTP and
    /// private, loopback or link-local addresses (on-premises services). Off: public HTTPS only.
    #[arg(long)]
    pub allow_private_endpoints: bool,
    /// The origin WebAuthn security keys are bound to: `https://<host name>[:port]`, the
    /// address users reach the platform at. Default: `https://localhost:<API port>`.
    #[arg(long)]
    pub webauthn_origin: Option<url::Url>,
}

/// Shared state of a running controller.
pub struct Controller {
    pub db: db::Db,
    pub lockout: service::identity::Lockout,
    pub rules: service::identity::CredentialRules,
    pub authz: access::authz::Authz,
    /// The platform master key: seals TOTP seeds, keys recovery-code hashes.
    pub secrets: service::secrets::MasterKey,
    /// The WebAuthn relying party that security keys are registered with.
    pub relying_party: service::webauthn::RelyingParty,
    pub alerts: service::alerts::Alerts,
    pub limits: access::limits::Limits,
    pub audit: service::audit::AuditLog,
    pub retention: service::retention::Rules,
    pub compute: service::compute::Compute,
    pub data_dir: PathBuf,
}

impl Controller {
    /// What a second factor is checked against.
    pub fn factor_check(&self) -> service::identity::FactorCheck<'_> {
        service::identity::FactorCheck {
            db: &self.db,
            secrets: &self.secrets,
            relying_party: &self.relying_party,
            lockout: self.lockout,
        }
    }
}

pub async fn serve(args: ControllerArgs) -> anyhow::Result<()> {
    palisade_common::tls::install_crypto_provider();
    // Everything the controller creates (database, WAL, audit log, keys) is its own alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    // Database, keys, logs: nothing under the data dir is for other local users.
    std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))?;
    // One controller per data dir: a second would fork the audit chain and fight over hosts.
    let lock_path = args.data_dir.join("controller.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another controller is using {} (lock {} is held)",
            args.data_dir.display(),
            lock_path.display()
        )
    })?;
    let agent_host = reqwest::Url::parse(&args.agent_url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()));
    let pki = pki::ensure(&args.data_dir, &args.server_names, agent_host.as_slice())?;
    let db = db::Db::open(&args.data_dir.join("palisade.db")).await?;
    let master_key = args
        .master_key
        .clone()
        .unwrap_or_else(|| args.data_dir.join("master.key"));
    let secrets = service::secrets::MasterKey::load_or_create(&master_key)?;
    let audit_paths = service::audit::AuditPaths {
        dir: args.data_dir.join("audit"),
        head_store: args
            .audit_head_store
            .clone()
            .unwrap_or_else(|| args.data_dir.join("audit-heads")),
    };
    let audit = {
        // Reading and verifying the whole log, then waiting for the start record: blocking.
        let secrets = secrets.clone();
        tokio::task::spawn_blocking(move || service::audit::AuditLog::open(&audit_paths, &secrets))
            .await??
    };
    let authz = access::authz::Authz::new()?;
    // Bound now, so that the default WebAuthn origin names the real port (`--listen` may ask
    // for port 0).
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {}", args.listen))?;
    let webauthn_origin = match &args.webauthn_origin {
        Some(origin) => origin.clone(),
        None => url::Url::parse(&format!(
            "https://localhost:{}",
            listener.local_addr()?.port()
        ))?,
    };
    let relying_party = service::webauthn::RelyingParty::new(&webauthn_origin)?;

    if let Some(password) = service::identity::bootstrap_admin(&db).await? {
        // Shown once, on stdout only (never in a log): the operator must change it first.
        println!("PALISADE-INITIAL-ADMIN-PASSWORD {password}");
    }
    if let Some(dir) = &args.guest_image {
        service::compute::register_image_dir(&db, dir).await?;
    }

    let agent = agent_client::AgentClient::new(&args.agent_url, &pki)?;
    let compute = service::compute::Compute::new(db.clone(), agent, audit.clone());
    let alerts = service::alerts::Alerts::new(
        db.clone(),
        audit.clone(),
        service::outbound::OutboundPolicy {
            allow_private: args.allow_private_endpoints,
        },
    );
    let controller = Arc::new(Controller {
        db,
        lockout: service::identity::Lockout {
            after: args.lockout_after,
            base_secs: args.lockout_secs,
        },
        rules: service::identity::CredentialRules {
            session_idle_secs: i64::from(args.session_idle_secs),
            session_max_secs: i64::from(args.session_max_secs),
            key_max_days: args.key_max_days.max(1),
            password_max_age_days: args.password_max_age_days,
            mfa_fresh_secs: i64::from(args.mfa_fresh_secs),
        },
        authz,
        secrets,
        relying_party,
        alerts,
        limits: access::limits::Limits::new(args.rate_limit_per_source, args.rate_limit_per_key),
        audit,
        retention: service::retention::Rules {
            minimum: args.audit_retention,
        },
        compute,
        data_dir: args.data_dir.clone(),
    });
    controller
        .compute
        .spawn_reconciler(std::time::Duration::from_secs(args.reconcile_interval_secs));
    spawn_housekeeping(controller.clone());
    spawn_spoof_watch(controller.clone());
    service::retention::spawn(
        controller.db.clone(),
        controller.audit.clone(),
        controller.retention,
        std::time::Duration::from_secs(args.audit_purge_interval_secs),
    );
    if let (Some(address), Some(ca)) = (&args.audit_syslog, &args.audit_syslog_ca) {
        service::syslog::spawn(
            controller.audit.clone(),
            service::syslog::SyslogTarget {
                address: address.clone(),
                ca: ca.clone(),
                server_name: args.audit_syslog_name.clone(),
            },
        )?;
    }
    let audit = controller.audit.clone();
    let served = access::server::run(controller, listener, &pki).await;
    // A clean stop leaves a stop record and a last signed head; without them, the next start
    // shows an unclean stop.
    match tokio::task::spawn_blocking(move || audit.stop()).await {
        Ok(Ok(head)) => tracing::info!(records = head.tree_size, "audit log closed"),
        Ok(Err(e)) => {
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::error!(%error, "closing the audit log")
        }
        Err(e) => tracing::error!(error = %e, "closing the audit log"),
    }
    served
}

/// Every 5 s: a port whose anti-spoofing dropped frames since the last look raises a
/// `spoofing` alert for its tenant (API, audit record, webhook).
fn spawn_spoof_watch(controller: Arc<Controller>) {
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let Ok(traffic) = controller.compute.traffic().await else {
                continue;
            };
            for port in traffic.ports {
                let before = seen.insert(port.port_id.clone(), port.spoofed_frames);
                // Counters only grow while the agent runs; they restart with it.
                let new = match before {
                    Some(b) if port.spoofed_frames >= b => port.spoofed_frames - b,
                    _ => port.spoofed_frames,
                };
                if new == 0 {
                    continue;
                }
                let Ok(found) = service::network::find_port(&controller.db, &port.port_id).await
                else {
                    continue;
                };
                let request_id = db::new_id();
                let raised = controller
                    .alerts
                    .raise(
                        service::alerts::Raise {
                            tenant_id: Some(&found.tenant_id),
                            user_id: None,
                            kind: "spoofing",
                            detail: format!(
                                "instance {} (port {}) sent {new} frames with a forged address \
                                 or a forbidden protocol; they were dropped",
                                found.instance_id, found.id
                            ),
                            source: "host:local",
                            request_id: &request_id,
                        },
                        &controller.secrets,
                    )
                    .await;
                if let Err(e) = raised {
                    tracing::warn!(error = %e, "raising a spoofing alert");
                }
            }
        }
    });
}

/// Once a minute: forgets nonces too old to matter (their requests fail the time window
/// anyway), WebAuthn challenges nobody answered, and the rate-limit state of callers back at
/// full budget.
fn spawn_housekeeping(controller: Arc<Controller>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Err(e) = service::identity::purge_nonces(&controller.db, now).await {
                tracing::warn!(error = %format!("{e:#}"), "purging old nonces");
            }
            if let Err(e) = service::webauthn::purge_ceremonies(&controller.db, now).await {
                tracing::warn!(error = %format!("{e:#}"), "purging old WebAuthn ceremonies");
            }
            controller.limits.forget_idle();
        }
    });
}
