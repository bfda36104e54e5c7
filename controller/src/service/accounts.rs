//! Accounts: tenants, users, roles, groups and tenant policies.
//!
//! Every change that takes something away from a user (disable, delete, role change, MFA
//! reset, tenant disable) ends their keys and sessions in the same transaction, or — for
//! tenants — by the join every request's key lookup makes, so it holds from the next request.

use palisade_common::api::{self, Group, Quota, Tenant, TenantSettings, User, UserCreated};
use sqlx::Row;

use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};
use crate::service::identity::{self, hash_password, random_password};

pub fn check_tenant(req: &api::TenantCreate) -> Result<()> {
    if !api::is_valid_name(&req.name) {
        return Err(Error::invalid("tenant name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    if let Some(q) = req.quota {
        if q.instances > 10_000 || q.vcpus > 100_000 || q.memory_mib > 100_000_000 {
            return Err(Error::invalid("quota values are out of range"));
        }
    }
    Ok(())
}

pub async fn create_tenant(db: &Db, req: &api::TenantCreate) -> Result<Tenant> {
    check_tenant(req)?;
    let quota = req.quota.unwrap_or_default();
    let tenant = Tenant {
        id: new_id(),
        name: req.name.clone(),
        quota,
        settings: TenantSettings::default(),
        disabled: false,
        created_at: now(),
    };
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, name, quota_instances, quota_vcpus, quota_memory_mib, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&tenant.id)
    .bind(&tenant.name)
    .bind(quota.instances as i64)
    .bind(quota.vcpus as i64)
    .bind(quota.memory_mib as i64)
    .bind(&tenant.created_at)
    .execute(&db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "name_taken",
            message: "a tenant with this name exists".into(),
        });
    }
    Ok(tenant)
}

/// Column lists as macros, so every query stays one `&'static str` (no SQL built at run time).
macro_rules! tenant_columns {
    () => {
        "id, name, quota_instances, quota_vcpus, quota_memory_mib, created_at, disabled_at, \
         require_mfa, password_min_length, password_max_age_days, audit_retention_days"
    };
}
macro_rules! user_columns {
    () => {
        concat!(
            "id, name, tenant_id, role, created_at, disabled_at, ",
            mfa_enrolled_sql!("users"),
            " AS mfa_enrolled"
        )
    };
}

fn tenant_from_row(row: &sqlx::sqlite::SqliteRow) -> Tenant {
    Tenant {
        id: row.get("id"),
        name: row.get("name"),
        quota: Quota {
            instances: row.get::<i64, _>("quota_instances") as u32,
            vcpus: row.get::<i64, _>("quota_vcpus") as u32,
            memory_mib: row.get::<i64, _>("quota_memory_mib") as u32,
        },
        settings: TenantSettings {
            require_mfa: row.get::<i64, _>("require_mfa") != 0,
            password_min_length: row.get::<i64, _>("password_min_length") as u32,
            password_max_age_days: row.get::<i64, _>("password_max_age_days") as u32,
            audit_retention_days: row.get::<i64, _>("audit_retention_days") as u32,
        },
        disabled: row.get::<Option<String>, _>("disabled_at").is_some(),
        created_at: row.get("created_at"),
    }
}

pub async fn list_tenants(db: &Db) -> Result<Vec<Tenant>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants WHERE deleted_at IS NULL ORDER BY created_at, id"
    ))
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.iter().map(tenant_from_row).collect())
}

pub async fn get_tenant(db: &Db, id: &str) -> Result<Tenant> {
    sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(&db.pool)
    .await?
    .map(|row| tenant_from_row(&row))
    .ok_or(Error::NotFound { what: "tenant" })
}

/// A live tenant by name, if any.
pub async fn tenant_by_name(db: &Db, name: &str) -> Result<Option<Tenant>> {
    Ok(sqlx::query(concat!(
        "SELECT ",
        tenant_columns!(),
        " FROM tenants WHERE name = $1 AND deleted_at IS NULL"
    ))
    .bind(name)
    .fetch_optional(&db.pool)
    .await?
    .map(|row| tenant_from_row(&row)))
}

/// `minimum_secs`: the platform's audit retention, which a tenant may only lengthen.
pub fn check_settings(settings: &TenantSettings, minimum_secs: u64) -> Result<()> {
    if settings.password_min_length > 1024 {
        return Err(Error::invalid("password_min_length must be at most 1024"));
    }
    if settings.password_max_age_days > 3650 {
        return Err(Error::invalid("password_max_age_days must be at most 3650"));
    }
    let days = settings.audit_retention_days;
    if u64::from(days) > crate::service::retention::MAX_TENANT_DAYS {
        return Err(Error::invalid(format!(
            "audit_retention_days must be at most {}",
            crate::service::retention::MAX_TENANT_DAYS
        )));
    }
    if days != 0 && u64::from(days) * 86400 < minimum_secs {
        return Err(Error::invalid(format!(
            "audit_retention_days must be 0 (the platform's minimum) or at least {} \
             (the platform keeps audit records {minimum_secs} s)",
            minimum_secs.div_ceil(86400)
        )));
    }
    Ok(())
}

pub async fn set_settings(db: &Db, tenant_id: &str, settings: &TenantSettings) -> Result<()> {
    sqlx::query(
        "UPDATE tenants SET require_mfa = $2, password_min_length = $3, \
         password_max_age_days = $4, audit_retention_days = $5 WHERE id = $1",
    )
    .bind(tenant_id)
    .bind(i64::from(settings.require_mfa))
    .bind(i64::from(settings.password_min_length))
    .bind(i64::from(settings.password_max_age_days))
    .bind(i64::from(settings.audit_retention_days))
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Disables or enables a tenant. Disabling ends every key and session of its users (enabling
/// brings none back: they log in again); its instances keep their state.
pub async fn set_tenant_disabled(db: &Db, tenant_id: &str, disabled: bool) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("UPDATE tenants SET disabled_at = $2 WHERE id = $1")
        .bind(tenant_id)
        .bind(disabled.then(now))
        .execute(&mut *tx)
        .await?;
    if disabled {
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $2 WHERE revoked_at IS NULL \
             AND user_id IN (SELECT id FROM users WHERE tenant_id = $1)",
        )
        .bind(tenant_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Deletes a tenant that owns no live instance, with its users, keys, groups and policies.
pub async fn delete_tenant(db: &Db, tenant_id: &str) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let live =
        sqlx::query("SELECT 1 FROM instances WHERE tenant_id = $1 AND deleted_at IS NULL LIMIT 1")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if live.is_some() {
        return Err(Error::Conflict {
            code: "tenant_not_empty",
            message: "delete the tenant's instances first".into(),
        });
    }
    let users: Vec<String> = sqlx::query("SELECT id FROM users WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    for user in &users {
        delete_user_rows(&mut tx, user).await?;
    }
    sqlx::query(
        "DELETE FROM group_members WHERE group_id IN (SELECT id FROM groups WHERE tenant_id = $1)",
    )
    .bind(tenant_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM groups WHERE tenant_id = $1")
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?;
    // Deleted instances keep their records (with erase times), so the row stays, disabled and
    // marked deleted, and only its name is freed.
    sqlx::query(
        "UPDATE tenants SET name = 'deleted-' || id, disabled_at = $2, deleted_at = $2 \
         WHERE id = $1",
    )
    .bind(tenant_id)
    .bind(now())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn delete_user_rows(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, user: &str) -> Result<()> {
    for sql in [
        "DELETE FROM api_keys WHERE user_id = $1",
        "DELETE FROM password_history WHERE user_id = $1",
        "DELETE FROM recovery_codes WHERE user_id = $1",
        "DELETE FROM group_members WHERE user_id = $1",
        "DELETE FROM known_sources WHERE user_id = $1",
        "DELETE FROM webauthn_credentials WHERE user_id = $1",
        "DELETE FROM webauthn_ceremonies WHERE user_id = $1",
        "DELETE FROM users WHERE id = $1",
    ] {
        sqlx::query(sql).bind(user).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Checks a role against the account kind: platform roles for platform accounts only.
pub fn check_role(role: &str, tenant: Option<&str>) -> Result<()> {
    let fits = match tenant {
        Some(_) => api::TENANT_ROLES.contains(&role),
        None => api::PLATFORM_ROLES.contains(&role),
    };
    if !fits {
        return Err(Error::Invalid {
            code: "invalid_role",
            message: format!(
                "role must be one of {} for {}",
                if tenant.is_some() {
                    api::TENANT_ROLES.join(", ")
                } else {
                    api::PLATFORM_ROLES.join(", ")
                },
                if tenant.is_some() {
                    "a tenant user"
                } else {
                    "a platform account"
                }
            ),
        });
    }
    Ok(())
}

/// Validates a user creation; returns the role the user gets.
pub fn check_user(req: &api::UserCreate) -> Result<String> {
    if !api::is_valid_name(&req.name) {
        return Err(Error::invalid("user name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    let role = match (&req.role, &req.tenant_id) {
        (Some(role), _) => role.clone(),
        (None, Some(_)) => "member".to_string(),
        (None, None) => {
            return Err(Error::Invalid {
                code: "invalid_role",
                message: "a platform account needs a role".into(),
            })
        }
    };
    check_role(&role, req.tenant_id.as_deref())?;
    Ok(role)
}

/// Creates a user with a random initial password, shown once in the answer; it must be
/// changed before anything else.
/// Creates a user with a random one-time password. A tenant user's login name is
/// `<name>@<tenant name>`: names are unique within a tenant, so that creating a user can never
/// tell a tenant which names other tenants (or the platform) use.
pub async fn create_user(db: &Db, req: &api::UserCreate, role: &str) -> Result<UserCreated> {
    let name = match &req.tenant_id {
        Some(tenant_id) => {
            let tenant: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
                .bind(tenant_id)
                .fetch_optional(&db.pool)
                .await?
                .ok_or(Error::NotFound { what: "tenant" })?;
            format!("{}@{tenant}", req.name)
        }
        None => req.name.clone(),
    };
    let password = random_password();
    let user = User {
        id: new_id(),
        name,
        tenant_id: req.tenant_id.clone(),
        role: role.to_string(),
        disabled: false,
        mfa_enrolled: false,
        created_at: now(),
    };
    let inserted = sqlx::query(
        "INSERT INTO users (id, name, tenant_id, role, password_hash, must_change_password, \
         created_at, password_changed_at) VALUES ($1, $2, $3, $4, $5, 1, $6, $7) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&user.id)
    .bind(&user.name)
    .bind(&user.tenant_id)
    .bind(&user.role)
    .bind(hash_password(password.clone()).await?)
    .bind(&user.created_at)
    .bind(time::OffsetDateTime::now_utc().unix_timestamp())
    .execute(&db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "name_taken",
            message: "a user with this name exists in the tenant (or among platform accounts)"
                .into(),
        });
    }
    Ok(UserCreated {
        user,
        initial_password: password,
    })
}

fn user_from_row(row: &sqlx::sqlite::SqliteRow) -> User {
    User {
        id: row.get("id"),
        name: row.get("name"),
        tenant_id: row.get("tenant_id"),
        role: row.get("role"),
        disabled: row.get::<Option<String>, _>("disabled_at").is_some(),
        mfa_enrolled: row.get::<i64, _>("mfa_enrolled") != 0,
        created_at: row.get("created_at"),
    }
}

pub async fn get_user(db: &Db, user_id: &str) -> Result<User> {
    sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE id = $1"
    ))
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?
    .map(|row| user_from_row(&row))
    .ok_or(Error::NotFound { what: "user" })
}

/// The users of a tenant, or the platform accounts for `None`.
pub async fn list_users(db: &Db, tenant: Option<&str>) -> Result<Vec<User>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE tenant_id IS $1 ORDER BY created_at, id"
    ))
    .bind(tenant)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.iter().map(user_from_row).collect())
}

/// Refuses a change that would leave the platform without an enabled platform administrator.
async fn keep_one_platform_admin(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    user: &User,
) -> Result<()> {
    if user.role != identity::PLATFORM_ADMIN {
        return Ok(());
    }
    let others = sqlx::query(
        "SELECT COUNT(*) AS n FROM users WHERE role = $1 AND disabled_at IS NULL AND id != $2",
    )
    .bind(identity::PLATFORM_ADMIN)
    .bind(&user.id)
    .fetch_one(&mut **tx)
    .await?
    .get::<i64, _>("n");
    if others == 0 {
        return Err(Error::Conflict {
            code: "last_platform_admin",
            message: "this is the last enabled platform administrator".into(),
        });
    }
    Ok(())
}

/// Changes a user's role; every key and session of the user ends.
pub async fn set_role(db: &Db, user: &User, role: &str) -> Result<()> {
    check_role(role, user.tenant_id.as_deref())?;
    // IMMEDIATE: the last-administrator check reads, then writes; two administrators acting
    // on each other at once must queue, not fail on a stale snapshot.
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    if role != user.role {
        keep_one_platform_admin(&mut tx, user).await?;
    }
    if role == user.role {
        // Nothing changes, so nothing is taken away: the keys stay.
        return Ok(());
    }
    sqlx::query("UPDATE users SET role = $2 WHERE id = $1")
        .bind(&user.id)
        .bind(role)
        .execute(&mut *tx)
        .await?;
    identity::revoke_all_keys(&mut tx, &user.id).await?;
    tx.commit().await?;
    Ok(())
}

fn platform_hold() -> Error {
    Error::Forbidden {
        code: "platform_hold",
        message: "a platform administrator disabled this user; only one can enable it".into(),
    }
}

/// Refuses to go on when a platform account's hold keeps the user disabled.
pub async fn check_no_platform_hold(db: &Db, user_id: &str) -> Result<()> {
    let held = sqlx::query("SELECT disabled_by_platform FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?
        .is_some_and(|r| r.get::<i64, _>("disabled_by_platform") != 0);
    if held {
        return Err(platform_hold());
    }
    Ok(())
}

/// Disables (every key and session ends; the password stops working) or enables a user.
/// `by_platform`: a platform account acts. A platform account's hold is lifted only by a
/// platform account, never by the tenant's own administrators.
pub async fn set_user_disabled(
    db: &Db,
    user: &User,
    disabled: bool,
    by_platform: bool,
) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    if disabled {
        keep_one_platform_admin(&mut tx, user).await?;
        identity::revoke_all_keys(&mut tx, &user.id).await?;
    } else if !by_platform {
        let held = sqlx::query("SELECT disabled_by_platform FROM users WHERE id = $1")
            .bind(&user.id)
            .fetch_one(&mut *tx)
            .await?
            .get::<i64, _>("disabled_by_platform");
        if held != 0 {
            return Err(platform_hold());
        }
    }
    sqlx::query("UPDATE users SET disabled_at = $2, disabled_by_platform = $3 WHERE id = $1")
        .bind(&user.id)
        .bind(disabled.then(now))
        .bind(i64::from(disabled && by_platform))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn delete_user(db: &Db, user: &User) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    keep_one_platform_admin(&mut tx, user).await?;
    delete_user_rows(&mut tx, &user.id).await?;
    tx.commit().await?;
    Ok(())
}

// ---- groups ----

async fn group_members(db: &Db, group_id: &str) -> Result<Vec<String>> {
    Ok(
        sqlx::query("SELECT user_id FROM group_members WHERE group_id = $1 ORDER BY user_id")
            .bind(group_id)
            .fetch_all(&db.pool)
            .await?
            .iter()
            .map(|r| r.get("user_id"))
            .collect(),
    )
}

pub async fn create_group(db: &Db, tenant_id: &str, name: &str) -> Result<Group> {
    if !api::is_valid_name(name) {
        return Err(Error::invalid("group name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    let group = Group {
        id: new_id(),
        tenant_id: tenant_id.to_string(),
        name: name.to_string(),
        members: Vec::new(),
        created_at: now(),
    };
    let inserted = sqlx::query(
        "INSERT INTO groups (id, tenant_id, name, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant_id, name) DO NOTHING",
    )
    .bind(&group.id)
    .bind(&group.tenant_id)
    .bind(&group.name)
    .bind(&group.created_at)
    .execute(&db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "name_taken",
            message: "a group with this name exists in the tenant".into(),
        });
    }
    Ok(group)
}

/// A group of the given tenant; another tenant's group is simply not found.
pub async fn get_group(db: &Db, tenant_id: &str, group_id: &str) -> Result<Group> {
    let row = sqlx::query(
        "SELECT id, tenant_id, name, created_at FROM groups WHERE id = $1 AND tenant_id = $2",
    )
    .bind(group_id)
    .bind(tenant_id)
    .fetch_optional(&db.pool)
    .await?
    .ok_or(Error::NotFound { what: "group" })?;
    Ok(Group {
        id: row.get("id"),
        tenant_id: row.get("tenant_id"),
        name: row.get("name"),
        members: group_members(db, group_id).await?,
        created_at: row.get("created_at"),
    })
}

pub async fn list_groups(db: &Db, tenant_id: &str) -> Result<Vec<Group>> {
    let ids: Vec<String> = sqlx::query("SELECT id FROM groups WHERE tenant_id = $1 ORDER BY name")
        .bind(tenant_id)
        .fetch_all(&db.pool)
        .await?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    let mut groups = Vec::with_capacity(ids.len());
    for id in ids {
        groups.push(get_group(db, tenant_id, &id).await?);
    }
    Ok(groups)
}

pub async fn delete_group(db: &Db, group: &Group) -> Result<()> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("DELETE FROM group_members WHERE group_id = $1")
        .bind(&group.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM groups WHERE id = $1")
        .bind(&group.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Adds or removes a member; the user must belong to the group's tenant (else not found).
/// Membership is read on every request, so a removal takes away the group's rights at once.
pub async fn set_membership(db: &Db, group: &Group, user_id: &str, member: bool) -> Result<()> {
    let user = get_user(db, user_id).await?;
    if user.tenant_id.as_deref() != Some(group.tenant_id.as_str()) {
        return Err(Error::NotFound { what: "user" });
    }
    let sql = if member {
        "INSERT INTO group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM group_members WHERE group_id = $1 AND user_id = $2"
    };
    sqlx::query(sql)
        .bind(&group.id)
        .bind(&user.id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

// ---- tenant policies ----

pub async fn get_policies(db: &Db, tenant_id: &str) -> Result<String> {
    Ok(sqlx::query("SELECT policies FROM tenants WHERE id = $1")
        .bind(tenant_id)
        .fetch_optional(&db.pool)
        .await?
        .map(|r| r.get("policies"))
        .unwrap_or_default())
}

pub async fn set_policies(db: &Db, tenant_id: &str, text: &str) -> Result<()> {
    sqlx::query("UPDATE tenants SET policies = $2 WHERE id = $1")
        .bind(tenant_id)
        .bind(text)
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub async fn set_webhook(
    db: &Db,
    tenant_id: &str,
    url: Option<&str>,
    sealed_secret: Option<&str>,
) -> Result<()> {
    sqlx::query("UPDATE tenants SET webhook_url = $2, webhook_secret = $3 WHERE id = $1")
        .bind(tenant_id)
        .bind(url)
        .bind(sealed_secret)
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub async fn get_platform_policies(db: &Db) -> Result<String> {
    Ok(
        sqlx::query("SELECT text FROM platform_policies WHERE id = 1")
            .fetch_optional(&db.pool)
            .await?
            .map(|r| r.get("text"))
            .unwrap_or_default(),
    )
}

pub async fn set_platform_policies(db: &Db, text: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO platform_policies (id, text, updated_at) VALUES (1, $1, $2) \
         ON CONFLICT (id) DO UPDATE SET text = $1, updated_at = $2",
    )
    .bind(text)
    .bind(now())
    .execute(&db.pool)
    .await?;
    Ok(())
}

// ---- alerts ----

/// Alerts of a tenant, or the platform's own (`None`), newest first.
pub async fn list_alerts(db: &Db, tenant: Option<&str>, limit: i64) -> Result<Vec<api::Alert>> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, user_id, kind, detail, source, created_at FROM alerts \
         WHERE tenant_id IS $1 ORDER BY created_at DESC, id LIMIT $2",
    )
    .bind(tenant)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| api::Alert {
            id: row.get("id"),
            tenant_id: row.get("tenant_id"),
            user_id: row.get("user_id"),
            kind: row.get("kind"),
            detail: row.get("detail"),
            source: row.get("source"),
            created_at: row.get("created_at"),
        })
        .collect())
}
