//! Compute: images, flavors, instances, quotas, and the reconciler that makes hosts match the
//! database.
//!
//! API calls only change records (`desired` and a transitional `state`) and wake the
//! reconciler; the reconciler alone tells agents what to do. Every agent call is idempotent, so
//! after a crash of either side the next pass simply finishes what was started: no record stays
//! in a transitional state and no QEMU process lives without a record.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palisade_common::agent_api::{HostNetwork, ImageSpec, InstanceSpec, NicSpec, PowerState};
use palisade_common::api::{self, ConsoleOutput, Image, Instance};
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use tokio::sync::{Mutex, Notify};

use crate::agent_client::{AgentClient, AgentError};
use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};
use crate::service::audit::{AuditLog, Entry};
use crate::service::network;

/// The host every instance is placed on until there is more than one (issue: multi-host).
const LOCAL_HOST: &str = "local";

#[derive(Clone)]
pub struct Compute {
    db: Db,
    agent: AgentClient,
    audit: AuditLog,
    wake: Arc<Notify>,
    pass: Arc<Mutex<()>>,
    /// Whether the agent answered the last pass (`None` before the first): a change is a host
    /// event in the audit log.
    agent_up: Arc<std::sync::Mutex<Option<bool>>>,
    /// The network the agent was last given: it is handed a new one when this changes, and
    /// again whenever the agent comes back.
    pushed: Arc<Mutex<Option<HostNetwork>>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageManifest {
    name: String,
    kernel: String,
    initrd: String,
    #[serde(default)]
    cmdline: String,
    /// Written by the build script: the digests the platform pins. Files that no longer match
    /// them are never registered.
    kernel_sha256: String,
    initrd_sha256: String,
    #[allow(dead_code)]
    kernel_version: Option<String>,
}

/// Registers (or refreshes) the public image described by `<dir>/image.json`, pinning the
/// digests the build wrote there; agents re-check them before every boot. Files that do not
/// match their manifest are not registered: a record already there keeps its digests, so an
/// image altered on disk never boots, even after a restart.
pub async fn register_image_dir(db: &Db, dir: &Path) -> anyhow::Result<()> {
    let manifest_path = dir.join("image.json");
    let manifest: ImageManifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let kernel = dir.join(&manifest.kernel);
    let initrd = dir.join(&manifest.initrd);
    for (path, pinned) in [
        (&kernel, &manifest.kernel_sha256),
        (&initrd, &manifest.initrd_sha256),
    ] {
        let actual = sha256_file(path)?;
        if !actual.eq_ignore_ascii_case(pinned) {
            tracing::error!(image = %manifest.name, file = %path.display(), pinned = %pinned,
                %actual, "guest image file does not match its manifest: not registered");
            return Ok(());
        }
    }
    let (kernel_sha256, initrd_sha256) = (
        manifest.kernel_sha256.to_ascii_lowercase(),
        manifest.initrd_sha256.to_ascii_lowercase(),
    );
    sqlx::query(
        "INSERT INTO images (id, name, kernel_path, kernel_sha256, initrd_path, initrd_sha256, \
         cmdline, public, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8) \
         ON CONFLICT (name) DO UPDATE SET kernel_path = excluded.kernel_path, \
         kernel_sha256 = excluded.kernel_sha256, initrd_path = excluded.initrd_path, \
         initrd_sha256 = excluded.initrd_sha256, cmdline = excluded.cmdline",
    )
    .bind(new_id())
    .bind(&manifest.name)
    .bind(kernel.display().to_string())
    .bind(kernel_sha256)
    .bind(initrd.display().to_string())
    .bind(initrd_sha256)
    .bind(&manifest.cmdline)
    .bind(now())
    .execute(&db.pool)
    .await?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A create request that passed its checks.
pub struct NewInstance {
    /// Chosen before the record exists, so the audit record can name the instance.
    pub id: String,
    name: String,
    image_id: String,
    flavor: api::Flavor,
    tags: String,
    port: Option<network::PortPlan>,
}

impl NewInstance {
    /// Gives the instance a port in the planned subnet, with the planned groups.
    pub fn with_port(mut self, plan: network::PortPlan) -> NewInstance {
        self.port = Some(plan);
        self
    }
}

const INSTANCE_COLUMNS: &str = "id, tenant_id, name, image_id, flavor, vcpus, memory_mib, \
    disk_gib, desired, state, last_error, created_at, deleted_at, disk_erased_at, tags";

fn instance_from_row(row: &SqliteRow) -> Instance {
    Instance {
        id: row.get("id"),
        tenant_id: row.get("tenant_id"),
        name: row.get("name"),
        image_id: row.get("image_id"),
        flavor: row.get("flavor"),
        vcpus: row.get::<i64, _>("vcpus") as u32,
        memory_mib: row.get::<i64, _>("memory_mib") as u32,
        disk_gib: row.get::<i64, _>("disk_gib") as u32,
        tags: serde_json::from_str(row.get::<&str, _>("tags")).unwrap_or_default(),
        state: row.get("state"),
        last_error: row.get("last_error"),
        created_at: row.get("created_at"),
        deleted_at: row.get("deleted_at"),
        disk_erased_at: row.get("disk_erased_at"),
    }
}

fn image_from_row(row: &SqliteRow) -> Image {
    Image {
        id: row.get("id"),
        name: row.get("name"),
        kernel_sha256: row.get("kernel_sha256"),
        initrd_sha256: row.get("initrd_sha256"),
        public: row.get::<i64, _>("public") != 0,
        created_at: row.get("created_at"),
    }
}

/// Tags: at most 16, keys like names, values readable as they are (`api::is_valid_tag_value`).
fn check_tags(tags: &std::collections::BTreeMap<String, String>) -> Result<()> {
    if tags.len() > 16 {
        return Err(Error::invalid("at most 16 tags"));
    }
    for (key, value) in tags {
        if !api::is_valid_name(key) {
            return Err(Error::invalid("tag keys: 1-63 of A-Z a-z 0-9 - _ ."));
        }
        if !api::is_valid_tag_value(value) {
            return Err(Error::invalid(
                "tag values: up to 128 letters, digits, spaces and _ . : / = + - @",
            ));
        }
    }
    Ok(())
}

impl Compute {
    pub fn new(db: Db, agent: AgentClient, audit: AuditLog) -> Compute {
        Compute {
            db,
            agent,
            audit,
            wake: Arc::new(Notify::new()),
            pass: Arc::new(Mutex::new(())),
            agent_up: Arc::default(),
            pushed: Arc::default(),
        }
    }

    /// A host event or operation's record: subject `controller`, type `host`, in the tenant's
    /// records when it concerns one of its instances.
    fn host_entry(
        request_id: &str,
        action: &str,
        object: String,
        tenant_id: Option<&str>,
        result: &str,
        code: Option<String>,
    ) -> Entry {
        Entry {
            kind: palisade_common::audit::TYPE_HOST,
            request_id: request_id.to_string(),
            source: format!("host:{LOCAL_HOST}"),
            subject: "controller".into(),
            tenant_id: tenant_id.map(str::to_string),
            action: action.into(),
            object,
            result: result.into(),
            code,
            ..Entry::default()
        }
    }

    /// Runs one host-agent operation on an instance: recorded before it runs (not run when the
    /// record cannot be written) and its outcome after.
    async fn host_op<T>(
        &self,
        action: &str,
        instance_id: &str,
        tenant_id: Option<&str>,
        op: impl std::future::Future<Output = std::result::Result<T, AgentError>>,
    ) -> anyhow::Result<std::result::Result<T, AgentError>> {
        let request_id = new_id();
        let object = format!("instance/{instance_id}");
        let entry = |result: &str, code: Option<String>| {
            Self::host_entry(&request_id, action, object.clone(), tenant_id, result, code)
        };
        self.audit
            .append(entry("requested", None))
            .await
            .context("auditing a host operation")?;
        let outcome = op.await;
        let (result, code) = match &outcome {
            Ok(_) => ("succeeded", None),
            Err(AgentError::Refused { code, .. }) => ("failed", Some(code.clone())),
            Err(_) => ("failed", Some("host_unavailable".to_string())),
        };
        if let Err(e) = self.audit.append(entry(result, code)).await {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "auditing a host outcome");
        }
        Ok(outcome)
    }

    /// Records a change in whether the host agent answers.
    /// Records a change in the agent's reachability; true when it has just come (back) up.
    async fn note_agent(&self, up: bool) -> bool {
        let changed = {
            let mut last = self.agent_up.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *last != Some(up);
            *last = Some(up);
            changed
        };
        if changed {
            let action = if up {
                "host.agent_reachable"
            } else {
                "host.agent_unreachable"
            };
            let entry = Self::host_entry(
                &new_id(),
                action,
                format!("host/{LOCAL_HOST}"),
                None,
                "observed",
                None,
            );
            if let Err(e) = self.audit.append(entry).await {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "auditing a host event");
            }
        }
        changed && up
    }

    /// Hands the agent the host's network when it differs from what it was last given, or
    /// when the agent has just come back. Recorded like every host operation.
    async fn push_network(&self, agent_back: bool) -> anyhow::Result<()> {
        let wanted = network::host_network(&self.db)
            .await
            .map_err(|e| anyhow::anyhow!("building the host network: {e}"))?;
        let mut pushed = self.pushed.lock().await;
        if !agent_back && pushed.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let request_id = new_id();
        let entry = |result: &str, code: Option<String>| {
            Self::host_entry(
                &request_id,
                "host.network_apply",
                format!("host/{LOCAL_HOST}/network"),
                None,
                result,
                code,
            )
        };
        self.audit
            .append(entry("requested", None))
            .await
            .context("auditing a host operation")?;
        let outcome = self.agent.put_network(&wanted).await;
        let (result, code) = match &outcome {
            Ok(()) => ("succeeded", None),
            Err(AgentError::Refused { code, .. }) => ("failed", Some(code.clone())),
            Err(AgentError::Unreachable(_)) => ("failed", Some("host_unreachable".into())),
        };
        self.audit
            .append(entry(result, code))
            .await
            .context("auditing a host operation")?;
        outcome.context("handing the host its network")?;
        *pushed = Some(wanted);
        Ok(())
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let rows = sqlx::query("SELECT * FROM images WHERE public = 1 ORDER BY name")
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.iter().map(image_from_row).collect())
    }

    /// Checks a create request (name, flavor, image) without changing anything.
    pub async fn prepare_instance(&self, req: &api::InstanceCreate) -> Result<NewInstance> {
        if !api::is_valid_name(&req.name) {
            return Err(Error::invalid("instance name: 1-63 of A-Z a-z 0-9 - _ ."));
        }
        let flavor = api::flavors()
            .into_iter()
            .find(|f| f.name == req.flavor)
            .ok_or_else(|| Error::Invalid {
                code: "unknown_flavor",
                message: "no such flavor (see GET /v1/flavors)".into(),
            })?;
        check_tags(&req.tags)?;
        let image =
            sqlx::query("SELECT id FROM images WHERE public = 1 AND (id = $1 OR name = $1)")
                .bind(&req.image)
                .fetch_optional(&self.db.pool)
                .await?
                .ok_or(Error::NotFound { what: "image" })?;
        Ok(NewInstance {
            id: new_id(),
            name: req.name.clone(),
            image_id: image.get("id"),
            flavor,
            tags: serde_json::to_string(&req.tags).map_err(|e| Error::Internal(e.into()))?,
            port: None,
        })
    }

    /// Creates an instance record within the tenant's quota, atomically: the quota check and
    /// the insert are one statement, so parallel creates can never overshoot. `permit` (the
    /// audit append) runs after the quota check and before the commit, inside the write
    /// transaction: a create refused for quota is never recorded as allowed, and no one sees
    /// the instance before its record is durable.
    pub async fn create_instance(
        &self,
        tenant_id: &str,
        new: NewInstance,
        permit: impl std::future::Future<Output = Result<()>>,
    ) -> Result<Instance> {
        let NewInstance {
            id,
            name,
            image_id,
            flavor,
            tags,
            port,
        } = new;
        let created_at = now();
        // IMMEDIATE: take the write lock now, so the transaction cannot fail to upgrade later.
        let mut tx = self.db.pool.begin_with("BEGIN IMMEDIATE").await?;
        let inserted = sqlx::query(
            "INSERT INTO instances (id, tenant_id, name, image_id, flavor, vcpus, memory_mib, \
             disk_gib, host, desired, state, created_at, updated_at, tags) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'running', 'starting', $10, $10, $11 \
             FROM tenants t WHERE t.id = $2 \
             AND (SELECT COUNT(*) FROM instances i WHERE i.tenant_id = $2 \
                  AND i.deleted_at IS NULL) < t.quota_instances \
             AND (SELECT COALESCE(SUM(i.vcpus), 0) FROM instances i WHERE i.tenant_id = $2 \
                  AND i.deleted_at IS NULL) + $6 <= t.quota_vcpus \
             AND (SELECT COALESCE(SUM(i.memory_mib), 0) FROM instances i WHERE i.tenant_id = $2 \
                  AND i.deleted_at IS NULL) + $7 <= t.quota_memory_mib",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(&name)
        .bind(&image_id)
        .bind(&flavor.name)
        .bind(flavor.vcpus as i64)
        .bind(flavor.memory_mib as i64)
        .bind(flavor.disk_gib as i64)
        .bind(LOCAL_HOST)
        .bind(&created_at)
        .bind(&tags)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(Error::Conflict {
                code: "quota_exceeded",
                message: "the tenant's quota for instances, vCPUs or memory would be exceeded"
                    .into(),
            });
        }
        if let Some(plan) = &port {
            network::insert_port(&mut tx, tenant_id, &id, plan).await?;
        }
        permit.await?;
        tx.commit().await?;
        self.wake.notify_one();
        self.get_instance(tenant_id, &id).await
    }

    pub async fn list_instances(&self, tenant_id: &str) -> Result<Vec<Instance>> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE tenant_id = $1 \
             AND deleted_at IS NULL ORDER BY created_at, id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.iter().map(instance_from_row).collect())
    }

    /// An instance by id alone, for the authorization decision (which knows its tenant).
    pub async fn find_instance(&self, id: &str) -> Result<Instance> {
        let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or(Error::NotFound { what: "instance" })?;
        Ok(instance_from_row(&row))
    }

    /// Another tenant's instance and a missing one give the same answer: 404.
    pub async fn get_instance(&self, tenant_id: &str, id: &str) -> Result<Instance> {
        let sql =
            format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1 AND tenant_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or(Error::NotFound { what: "instance" })?;
        Ok(instance_from_row(&row))
    }

    /// Sets what the tenant wants; the reconciler does it.
    pub async fn set_desired(&self, tenant_id: &str, id: &str, desired: &str) -> Result<Instance> {
        // One statement decides from the row as it is now: a stop or start racing a delete can
        // never turn the delete back (a read first, then a write, could).
        let changed = sqlx::query(
            "UPDATE instances SET desired = $1, last_error = NULL, updated_at = $2, state = \
               CASE WHEN $1 = 'deleted' THEN 'deleting' \
                    WHEN $1 = 'running' AND state <> 'running' THEN 'starting' \
                    WHEN $1 = 'stopped' AND state <> 'stopped' THEN 'stopping' \
                    ELSE state END \
             WHERE id = $3 AND tenant_id = $4 AND deleted_at IS NULL AND state <> 'deleting' \
               AND (desired <> 'deleted' OR $1 = 'deleted')",
        )
        .bind(desired)
        .bind(now())
        .bind(id)
        .bind(tenant_id)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(Error::NotFound { what: "instance" });
        }
        self.wake.notify_one();
        self.get_instance(tenant_id, id).await
    }

    pub async fn console(&self, tenant_id: &str, id: &str, offset: u64) -> Result<ConsoleOutput> {
        let instance = self.get_instance(tenant_id, id).await?;
        if instance.deleted_at.is_some() {
            return Err(Error::NotFound { what: "instance" });
        }
        match self.agent.console(id, offset).await {
            Ok(chunk) => Ok(ConsoleOutput {
                offset: chunk.offset,
                next_offset: chunk.next_offset,
                data: chunk.data,
            }),
            // Not started yet on its host: no output so far.
            Err(AgentError::Refused { status: 404, .. }) => Ok(ConsoleOutput {
                offset,
                next_offset: offset,
                data: String::new(),
            }),
            Err(e) => Err(agent_unavailable(e)),
        }
    }

    /// The host's traffic counters and flows, per port.
    pub async fn traffic(&self) -> Result<palisade_common::agent_api::HostTraffic> {
        self.agent.traffic().await.map_err(agent_unavailable)
    }

    /// A network object changed: the next pass (now) hands the hosts their new network.
    pub fn network_changed(&self) {
        self.wake.notify_one();
    }

    /// Types `data` on a running instance's serial console.
    pub async fn console_input(&self, tenant_id: &str, id: &str, data: Vec<u8>) -> Result<()> {
        let instance = self.get_instance(tenant_id, id).await?;
        if instance.deleted_at.is_some() {
            return Err(Error::NotFound { what: "instance" });
        }
        match self.agent.console_input(id, data).await {
            Ok(()) => Ok(()),
            Err(AgentError::Refused {
                status: 404 | 409, ..
            }) => Err(Error::Conflict {
                code: "not_running",
                message: "the instance is not running (or its console is not attached yet)".into(),
            }),
            Err(e) => Err(agent_unavailable(e)),
        }
    }

    /// Runs reconciliation passes: at once when woken by a change, and every `interval`.
    pub fn spawn_reconciler(&self, interval: Duration) {
        let compute = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = compute.reconcile_once().await {
                    tracing::warn!(error = %format!("{e:#}"), "reconciliation pass failed");
                }
                let _ = tokio::time::timeout(interval, compute.wake.notified()).await;
            }
        });
    }

    /// One pass: bring every host instance in line with its record, and remove what has none.
    pub async fn reconcile_once(&self) -> anyhow::Result<()> {
        let _single = self.pass.lock().await;
        let listed = self.agent.list().await;
        let agent_back = self.note_agent(listed.is_ok()).await;
        let on_host: HashMap<String, PowerState> =
            listed?.into_iter().map(|s| (s.id, s.state)).collect();
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE deleted_at IS NULL ORDER BY created_at"
        );
        let live = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.db.pool)
            .await?;
        // Then the network, read after the instances: every port of an instance this pass
        // starts (created with it, in one transaction) has its tap and rules before it starts.
        self.push_network(agent_back).await?;
        let mut known = std::collections::HashSet::new();
        for row in &live {
            let desired: String = row.get("desired");
            let instance = instance_from_row(row);
            known.insert(instance.id.clone());
            let actual = on_host.get(&instance.id).copied();
            if let Err(e) = self.reconcile_instance(&instance, &desired, actual).await {
                tracing::warn!(instance = %instance.id, error = %format!("{e:#}"), "reconcile");
            }
        }
        for id in on_host.keys().filter(|id| !known.contains(*id)) {
            tracing::warn!(instance = %id, "removing an instance that has no live record");
            self.host_op("host.orphan_erase", id, None, self.agent.delete(id))
                .await??;
        }
        Ok(())
    }

    async fn reconcile_instance(
        &self,
        instance: &Instance,
        desired: &str,
        actual: Option<PowerState>,
    ) -> anyhow::Result<()> {
        let running = actual == Some(PowerState::Running);
        match desired {
            "running" if running => self.set_state(&instance.id, "running", None).await,
            "running" if instance.state == "running" => {
                // It was running and is no more: it stopped or crashed on its own.
                // Not started again behind the tenant's back; the record says why it stopped.
                tracing::warn!(instance = %instance.id, "instance exited unexpectedly");
                self.audit
                    .append(Self::host_entry(
                        &new_id(),
                        "host.instance_exited",
                        format!("instance/{}", instance.id),
                        Some(&instance.tenant_id),
                        "observed",
                        Some("exited_unexpectedly".into()),
                    ))
                    .await
                    .context("auditing a host event")?;
                sqlx::query(
                    "UPDATE instances SET state = 'stopped', desired = 'stopped', \
                     last_error = 'exited_unexpectedly', updated_at = $1 \
                     WHERE id = $2 AND desired = 'running' AND state = 'running'",
                )
                .bind(now())
                .bind(&instance.id)
                .execute(&self.db.pool)
                .await?;
                Ok(())
            }
            "running" => match self
                .host_op(
                    "host.instance_start",
                    &instance.id,
                    Some(&instance.tenant_id),
                    self.agent.start(&self.spec(instance).await?),
                )
                .await?
            {
                Ok(_) => self.set_state(&instance.id, "running", None).await,
                Err(AgentError::Refused { code, message, .. }) => {
                    tracing::warn!(instance = %instance.id, %code, %message, "start refused");
                    // Retrying will not help: stop wanting it to run, and say why.
                    sqlx::query(
                        "UPDATE instances SET desired = 'stopped', state = 'error', \
                         last_error = $1, updated_at = $2 WHERE id = $3",
                    )
                    .bind(&code)
                    .bind(now())
                    .bind(&instance.id)
                    .execute(&self.db.pool)
                    .await?;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            "stopped" => {
                if running {
                    let tenant = Some(instance.tenant_id.as_str());
                    self.host_op(
                        "host.instance_stop",
                        &instance.id,
                        tenant,
                        self.agent.stop(&instance.id),
                    )
                    .await??;
                }
                if instance.state == "error" {
                    return Ok(());
                }
                self.set_state(&instance.id, "stopped", None).await
            }
            "deleted" => {
                let tenant = Some(instance.tenant_id.as_str());
                let report = self
                    .host_op(
                        "host.instance_erase",
                        &instance.id,
                        tenant,
                        self.agent.delete(&instance.id),
                    )
                    .await??;
                sqlx::query(
                    "UPDATE instances SET state = 'deleted', deleted_at = $1, \
                     disk_erased_at = $2, updated_at = $1 WHERE id = $3",
                )
                .bind(now())
                .bind(report.disk_erased_at)
                .bind(&instance.id)
                .execute(&self.db.pool)
                .await?;
                // Its port goes with it, address and all; the next pass removes its tap.
                network::delete_port_of(&self.db, &instance.id)
                    .await
                    .map_err(|e| anyhow::anyhow!("removing the port: {e}"))?;
                self.wake.notify_one();
                Ok(())
            }
            other => anyhow::bail!("unknown desired state {other}"),
        }
    }

    async fn spec(&self, instance: &Instance) -> anyhow::Result<InstanceSpec> {
        let image = sqlx::query("SELECT * FROM images WHERE id = $1")
            .bind(&instance.image_id)
            .fetch_one(&self.db.pool)
            .await?;
        Ok(InstanceSpec {
            id: instance.id.clone(),
            vcpus: instance.vcpus,
            memory_mib: instance.memory_mib,
            disk_gib: instance.disk_gib,
            image: ImageSpec {
                kernel_path: image.get("kernel_path"),
                kernel_sha256: image.get("kernel_sha256"),
                initrd_path: image.get("initrd_path"),
                initrd_sha256: image.get("initrd_sha256"),
                cmdline: image.get("cmdline"),
            },
            nics: network::port_of(&self.db, &instance.id)
                .await
                .map_err(|e| anyhow::anyhow!("reading the port: {e}"))?
                .map(|p| -> anyhow::Result<NicSpec> {
                    Ok(NicSpec {
                        mac: p.mac.parse().map_err(|e: palisade_common::net::NetError| {
                            anyhow::anyhow!("port {}: {}", p.id, e.0)
                        })?,
                        port_id: p.id,
                    })
                })
                .transpose()?
                .into_iter()
                .collect(),
        })
    }

    /// Records what the reconciler saw or did; `desired` too when it changes what is wanted.
    async fn set_state(&self, id: &str, state: &str, desired: Option<&str>) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE instances SET state = $1, desired = COALESCE($2, desired), updated_at = $3 \
             WHERE id = $4 AND (state <> $1 OR desired <> COALESCE($2, desired))",
        )
        .bind(state)
        .bind(desired)
        .bind(now())
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }
}

fn agent_unavailable(e: AgentError) -> Error {
    tracing::warn!(error = %format!("{e:#}"), "host agent call failed");
    Error::Unavailable {
        code: "host_unavailable",
        message: "the instance's host did not answer; try again".into(),
    }
}
