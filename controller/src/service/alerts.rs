//! Identity anomalies: each becomes an alert the tenant (or, for platform accounts, the
//! security administrator) reads through the API, a record in the audit log, and optionally a
//! webhook call signed with the tenant's webhook secret.
//!
//! Detected here:
//! - `login_failures`: an account locked by a burst of failed logins or second factors;
//! - `password_spraying`: one source failing logins across accounts (platform alert);
//! - `new_source`: a login or key use from an address never seen for that identity before
//!   (the very first address of an identity is learnt silently).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Row;

use crate::db::{new_id, now, Db};
use crate::error::Result;
use crate::service::audit::{AuditLog, Entry};
use crate::service::outbound::{self, OutboundPolicy};

/// Failed logins from one source within [`SPRAY_WINDOW`] that make a spraying alert.
const SPRAY_THRESHOLD: usize = 10;
const SPRAY_WINDOW: Duration = Duration::from_secs(60);
/// Most (identity, source) pairs remembered in memory; the database stays the truth.
const MAX_REMEMBERED: usize = 100_000;

pub struct Alerts {
    db: Db,
    audit: AuditLog,
    webhook: OutboundPolicy,
    /// (user, source address) pairs already known, to skip the database on every request.
    known: Mutex<HashSet<(String, IpAddr)>>,
    /// Recent failed logins per source, for spraying.
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

/// One alert to raise.
pub struct Raise<'a> {
    pub tenant_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub kind: &'a str,
    pub detail: String,
    pub source: &'a str,
    pub request_id: &'a str,
}

impl Alerts {
    pub fn new(db: Db, audit: AuditLog, webhook: OutboundPolicy) -> Alerts {
        Alerts {
            db,
            audit,
            webhook,
            known: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    pub fn outbound_policy(&self) -> OutboundPolicy {
        self.webhook
    }

    /// Stores the alert, appends it to the audit log, and starts its webhook delivery.
    pub async fn raise(&self, alert: Raise<'_>, secrets: &super::secrets::MasterKey) -> Result<()> {
        let record = palisade_common::api::Alert {
            id: new_id(),
            tenant_id: alert.tenant_id.map(str::to_string),
            user_id: alert.user_id.map(str::to_string),
            kind: alert.kind.to_string(),
            detail: alert.detail.clone(),
            source: alert.source.to_string(),
            created_at: now(),
        };
        sqlx::query(
            "INSERT INTO alerts (id, tenant_id, user_id, kind, detail, source, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.id)
        .bind(&record.tenant_id)
        .bind(&record.user_id)
        .bind(&record.kind)
        .bind(&record.detail)
        .bind(&record.source)
        .bind(&record.created_at)
        .execute(&self.db.pool)
        .await?;
        let appended = self
            .audit
            .append(Entry {
                request_id: alert.request_id.to_string(),
                source: alert.source.to_string(),
                subject: "platform:anomaly-detector".into(),
                key_id: None,
                tenant_id: record.tenant_id.clone(),
                action: format!("alert.{}", record.kind),
                object: record
                    .user_id
                    .as_ref()
                    .map(|u| format!("user/{u}"))
                    .unwrap_or_else(|| format!("source/{}", record.source)),
                result: "alert".into(),
                code: None,
                ..Entry::default()
            })
            .await;
        if let Err(e) = appended {
            // The alert itself is stored; the request that caused it has its own record.
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "audit append of an alert");
        }
        if let Some(tenant) = &record.tenant_id {
            self.deliver(tenant, &record, secrets).await;
        }
        tracing::warn!(kind = %record.kind, tenant = ?record.tenant_id, "identity alert");
        Ok(())
    }

    /// Notes a verified use of an identity from `source`; true when the address is new for an
    /// identity that had been seen elsewhere before (worth an alert).
    pub async fn note_source(&self, user_id: &str, source: IpAddr) -> Result<bool> {
        let key = (user_id.to_string(), source);
        if self.lock_known().contains(&key) {
            return Ok(false);
        }
        let inserted = sqlx::query(
            "INSERT INTO known_sources (user_id, source, first_seen) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(source.to_string())
        .bind(now())
        .execute(&self.db.pool)
        .await?
        .rows_affected()
            == 1;
        let earlier = if inserted {
            sqlx::query("SELECT COUNT(*) AS n FROM known_sources WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&self.db.pool)
                .await?
                .get::<i64, _>("n")
                > 1
        } else {
            false
        };
        let mut known = self.lock_known();
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(key);
        Ok(earlier)
    }

    /// Forgets what an identity was seen from (its account is gone).
    pub fn forget_user(&self, user_id: &str) {
        self.lock_known().retain(|(u, _)| u != user_id);
    }

    /// Counts a failed login from `source`; true exactly when it reaches the spraying
    /// threshold within the window (one alert per burst).
    pub fn note_failure(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failures.len() > MAX_REMEMBERED {
            failures.retain(|_, times| times.last().is_some_and(|t| now - *t < SPRAY_WINDOW));
        }
        let times = failures.entry(source).or_default();
        times.retain(|t| now - *t < SPRAY_WINDOW);
        times.push(now);
        times.len() == SPRAY_THRESHOLD
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashSet<(String, IpAddr)>> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Posts the alert to the tenant's webhook, if it has one: JSON body, HMAC-SHA256 of the
    /// body under the tenant's webhook secret in `x-palisade-signature`. A few tries with
    /// back-off, in the background; failures are logged, never block the request.
    async fn deliver(
        &self,
        tenant: &str,
        alert: &palisade_common::api::Alert,
        secrets: &super::secrets::MasterKey,
    ) {
        let row = sqlx::query("SELECT webhook_url, webhook_secret FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_optional(&self.db.pool)
            .await;
        let Ok(Some(row)) = row else { return };
        let (Some(url), Some(sealed)) = (
            row.get::<Option<String>, _>("webhook_url"),
            row.get::<Option<String>, _>("webhook_secret"),
        ) else {
            return;
        };
        let Ok(secret) = secrets.open(&webhook_purpose(tenant), &sealed) else {
            tracing::error!(%tenant, "the webhook secret does not open");
            return;
        };
        let Ok(body) = serde_json::to_vec(alert) else {
            return;
        };
        let signature = secrets_hmac(&secret, &body);
        let policy = self.webhook;
        tokio::spawn(async move {
            for attempt in 0..4u32 {
                match post_webhook(&url, policy, &body, &signature).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(%url, attempt, error = %format!("{e:#}"), "webhook delivery");
                        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    }
                }
            }
        });
    }
}

pub fn webhook_purpose(tenant: &str) -> String {
    format!("webhook-secret:{tenant}")
}

fn secrets_hmac(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post_webhook(
    url: &str,
    policy: OutboundPolicy,
    body: &[u8],
    signature: &str,
) -> anyhow::Result<()> {
    // Checked again at delivery: a name may resolve elsewhere now than when it was set.
    let checked = outbound::check(url, policy).await?;
    let response = outbound::client_for(&checked)?
        .post(checked.url.clone())
        .header("content-type", "application/json")
        .header("x-palisade-signature", signature)
        .body(body.to_vec())
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "the receiver answered {}",
        response.status()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spraying_alerts_once_per_burst_and_new_sources_after_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let audit = AuditLog::open_for_test(dir.path());
        let alerts = Alerts::new(
            db,
            audit,
            OutboundPolicy {
                allow_private: false,
            },
        );
        let source: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let bursts = (0..25).filter(|_| alerts.note_failure(source)).count();
        assert_eq!(bursts, 1, "one alert per burst, not one per failure");
        assert!(!alerts.note_failure(other), "sources are counted apart");

        // The first address of an identity is learnt silently; a second one is news, once.
        assert!(!alerts.note_source("u1", source).await.unwrap());
        assert!(!alerts.note_source("u1", source).await.unwrap());
        assert!(alerts.note_source("u1", other).await.unwrap());
        assert!(!alerts.note_source("u1", other).await.unwrap());
        assert!(!alerts.note_source("u2", other).await.unwrap());
    }
}
