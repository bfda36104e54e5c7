//! Audit retention (X.1605 11.2-8): the platform keeps every audit record at least its minimum;
//! a tenant may keep its records longer; a legal hold keeps a tenant's records, or the whole
//! log, whatever their age. Past retention a record is purged: reduced to its number and leaf
//! hash (`AuditLog::purge`), so the tree and every signed head still verify, and each purge is
//! itself a record in the tenant's view.

use std::collections::HashMap;
use std::time::Duration;

use palisade_common::api;
use sqlx::Row;

use crate::db::{now, Db};
use crate::error::{Error, Result};
use crate::service::audit::{AuditLog, Purged, Retention};

/// The scope of a hold on the whole log.
pub const PLATFORM: &str = "platform";

/// Longest hold reason kept.
const MAX_REASON: usize = 160;
/// The longest retention anyone may set (the platform minimum included), in days.
pub const MAX_TENANT_DAYS: u64 = 36500;

/// The platform's rule: every record is kept at least `minimum`.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub minimum: Duration,
}

/// Parses a retention such as `365d`, `12h`, `30m` or `90s` (days when no unit is given).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit: 365d, 12h, 30m, 90s"))?;
    let scale = match unit {
        "" | "d" => 86400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{text:?}: the unit must be d, h, m or s")),
    };
    let secs = n
        .checked_mul(scale)
        .filter(|s| *s > 0 && *s <= MAX_TENANT_DAYS * 86400)
        .ok_or_else(|| {
            format!("{text:?}: must be more than 0 and at most {MAX_TENANT_DAYS} days")
        })?;
    Ok(Duration::from_secs(secs))
}

/// The instant `age` before now, as records write their time.
fn cut_off(age: Duration) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let at = time::OffsetDateTime::now_utc()
        .checked_sub(time::Duration::seconds(age.as_secs() as i64))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&format).unwrap_or_default()
}

/// What is past retention now, from the rules, the tenants' own rules and the holds.
pub async fn plan(db: &Db, rules: Rules) -> Result<Retention> {
    let holds = holds(db).await?;
    if holds.iter().any(|h| h.scope == PLATFORM) {
        return Ok(Retention::default()); // the whole log is held
    }
    let mut tenants = HashMap::new();
    for row in
        sqlx::query("SELECT id, audit_retention_days FROM tenants WHERE audit_retention_days > 0")
            .fetch_all(&db.pool)
            .await?
    {
        let days = row.get::<i64, _>("audit_retention_days") as u64;
        let own = Duration::from_secs(days * 86400).max(rules.minimum);
        tenants.insert(row.get::<String, _>("id"), Some(cut_off(own)));
    }
    for hold in holds {
        tenants.insert(hold.scope, None);
    }
    Ok(Retention {
        platform: Some(cut_off(rules.minimum)),
        tenants,
    })
}

/// Purges what is past retention now.
pub async fn purge(db: &Db, audit: &AuditLog, rules: Rules) -> Result<Purged> {
    let retention = plan(db, rules).await?;
    audit.purge(retention).await.map_err(|e| {
        tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "purging the audit log");
        Error::Unavailable {
            code: "audit_unavailable",
            message: "the audit log cannot be purged now".into(),
        }
    })
}

/// Purges at start and then every `every`.
pub fn spawn(db: Db, audit: AuditLog, rules: Rules, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match purge(&db, &audit, rules).await {
                Ok(done) if done.records > 0 => {
                    tracing::info!(
                        records = done.records,
                        "purged audit records past retention"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "audit purge"),
            }
        }
    });
}

pub async fn holds(db: &Db) -> Result<Vec<api::AuditHold>> {
    let rows = sqlx::query("SELECT scope, reason, set_by, set_at FROM audit_holds ORDER BY set_at")
        .fetch_all(&db.pool)
        .await?;
    Ok(rows
        .iter()
        .map(|row| api::AuditHold {
            scope: row.get("scope"),
            reason: row.get("reason"),
            set_by: row.get("set_by"),
            set_at: row.get("set_at"),
        })
        .collect())
}

/// The tenants that keep their records longer than the minimum.
pub async fn tenant_rules(db: &Db) -> Result<Vec<api::TenantRetention>> {
    let rows = sqlx::query(
        "SELECT id, audit_retention_days FROM tenants WHERE audit_retention_days > 0 ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| api::TenantRetention {
            tenant_id: row.get("id"),
            days: row.get::<i64, _>("audit_retention_days") as u32,
        })
        .collect())
}

/// A tenant's name, deleted or not (404 when there never was one).
pub async fn tenant_name(db: &Db, id: &str) -> Result<String> {
    sqlx::query("SELECT name FROM tenants WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .map(|row| row.get("name"))
        .ok_or(Error::NotFound { what: "tenant" })
}

pub fn check_reason(reason: &str) -> Result<()> {
    if reason.trim().is_empty() || reason.len() > MAX_REASON {
        return Err(Error::invalid(format!(
            "reason must be 1 to {MAX_REASON} bytes"
        )));
    }
    if reason
        .chars()
        .any(|c| c.is_control() || api::is_invisible_format_char(c))
    {
        return Err(Error::invalid(
            "reason must be one line of printable text (no control or invisible characters)",
        ));
    }
    Ok(())
}

/// Sets (or replaces the reason of) a hold.
pub async fn set_hold(db: &Db, scope: &str, reason: &str, set_by: &str) -> Result<api::AuditHold> {
    let hold = api::AuditHold {
        scope: scope.into(),
        reason: reason.into(),
        set_by: set_by.into(),
        set_at: now(),
    };
    sqlx::query(
        "INSERT INTO audit_holds (scope, reason, set_by, set_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (scope) DO UPDATE SET reason = $2, set_by = $3, set_at = $4",
    )
    .bind(&hold.scope)
    .bind(&hold.reason)
    .bind(&hold.set_by)
    .bind(&hold.set_at)
    .execute(&db.pool)
    .await?;
    Ok(hold)
}

/// Releases a hold; 404 when there is none.
pub async fn release_hold(db: &Db, scope: &str) -> Result<()> {
    let done = sqlx::query("DELETE FROM audit_holds WHERE scope = $1")
        .bind(scope)
        .execute(&db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound { what: "legal hold" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("365d"), Ok(Duration::from_secs(365 * 86400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in [
            "",
            "0d",
            "d",
            "5y",
            "-3d",
            "1.5d",
            "99999999999999999999d",
            "40000d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tenant_may_lengthen_retention_but_never_shorten_it() {
        use crate::service::accounts::check_settings;
        let with = |days| api::TenantSettings {
            audit_retention_days: days,
            ..api::TenantSettings::default()
        };
        let minimum = 30 * 86400;
        assert!(check_settings(&with(0), minimum).is_ok(), "0 = the minimum");
        assert!(check_settings(&with(30), minimum).is_ok());
        assert!(check_settings(&with(3650), minimum).is_ok());
        assert!(check_settings(&with(29), minimum).is_err());
        assert!(check_settings(&with(36501), minimum).is_err());
        // A minimum of part of a day: one day is already longer.
        assert!(check_settings(&with(1), 3).is_ok());
    }
}
