//! Identities: the platform administrator, tenants, users, passwords and API keys.
//!
//! Passwords are stored only as Argon2id PHC strings. API keys are Ed25519 key pairs made on the
//! client; the server stores only the public half, so nothing in its database can sign.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use palisade_common::api::{self, ApiKey};
use sqlx::Row;

use crate::db::{new_id, now, Db};
use crate::error::{Error, NewLock, Result};
use crate::service::mfa;
use crate::service::secrets::MasterKey;
use crate::service::webauthn;

pub const PLATFORM_ADMIN: &str = "platform_admin";
const MIN_PASSWORD_LEN: usize = 12;
const MAX_PASSWORD_LEN: usize = 1024;

/// The authenticated principal behind a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub user_name: String,
    pub tenant_id: Option<String>,
    pub role: String,
    pub key_id: String,
    /// Names of the tenant groups the user is in.
    pub groups: Vec<String>,
    /// The signing key carries a second-factor proof younger than the freshness window.
    pub mfa_fresh: bool,
    /// The account must use a second factor (platform account, tenant rule, or enrolled).
    pub mfa_bound: bool,
}

/// What signature verification needs to know about a key id.
pub struct KeyRecord {
    pub public_key: String,
    pub principal: Principal,
    /// The password must be changed first (initial password, or older than the maximum age).
    pub must_change_password: bool,
    /// The account is bound to MFA but this key was made without a second factor (before the
    /// tenant required one): it works no more.
    pub lacks_mfa: bool,
    /// The key's last use is old enough to be written again (see [`touch_key`]).
    pub touch_due: bool,
}

/// Lifetimes of credentials, from the controller's arguments.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRules {
    pub session_idle_secs: i64,
    pub session_max_secs: i64,
    pub key_max_days: u32,
    /// 0 = passwords do not age (tenants may still set a maximum).
    pub password_max_age_days: u32,
    /// How long a second-factor proof counts as fresh for administrative actions.
    pub mfa_fresh_secs: i64,
}

impl Default for CredentialRules {
    fn default() -> Self {
        CredentialRules {
            session_idle_secs: 900,
            session_max_secs: 8 * 3600,
            key_max_days: 90,
            password_max_age_days: 0,
            mfa_fresh_secs: 900,
        }
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Creates the platform administrator on first start. Returns the random initial password,
/// which is shown once and works for nothing but changing itself.
pub async fn bootstrap_admin(db: &Db) -> anyhow::Result<Option<String>> {
    let exists = sqlx::query("SELECT 1 FROM users WHERE role = $1")
        .bind(PLATFORM_ADMIN)
        .fetch_optional(&db.pool)
        .await?;
    if exists.is_some() {
        return Ok(None);
    }
    let password = random_password();
    let hash = hash_password(password.clone()).await?;
    sqlx::query(
        "INSERT INTO users (id, name, tenant_id, role, password_hash, must_change_password, \
         created_at, password_changed_at) VALUES ($1, 'admin', NULL, $2, $3, 1, $4, $5)",
    )
    .bind(new_id())
    .bind(PLATFORM_ADMIN)
    .bind(hash)
    .bind(now())
    .bind(unix_now())
    .execute(&db.pool)
    .await?;
    Ok(Some(password))
}

/// A random password: 18 bytes from the OS, base64url (24 characters).
pub fn random_password() -> String {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Argon2id runs on two dedicated threads, never more (each hash takes ~19 MiB and a core for
/// tens of ms). A flood of password attempts queues instead of exhausting memory, and since
/// only these two threads ever allocate Argon2's buffers, the allocator keeps at most two
/// arenas' worth of them (on throwaway blocking threads it kept one per thread, up to ~1 GB).
const HASH_WORKERS: usize = 2;

type HashJob = Box<dyn FnOnce() + Send>;

/// Runs `work` on one of the hashing threads and waits for its answer.
async fn on_hash_worker<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    static QUEUE: std::sync::OnceLock<std::sync::mpsc::SyncSender<HashJob>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        // Bounded: a burst beyond this waits for room rather than growing the queue.
        let (tx, rx) = std::sync::mpsc::sync_channel::<HashJob>(1024);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for n in 0..HASH_WORKERS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || loop {
                    let job = rx.lock().map(|rx| rx.recv());
                    match job {
                        Ok(Ok(job)) => job(),
                        _ => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "starting a password hashing thread");
            }
        }
        tx
    });
    let (done, answer) = tokio::sync::oneshot::channel();
    let job: HashJob = Box::new(move || {
        let _ = done.send(work());
    });
    let queue = queue.clone();
    tokio::task::spawn_blocking(move || queue.send(job))
        .await?
        .map_err(|_| anyhow::anyhow!("password hashing threads are gone"))?;
    Ok(answer.await?)
}

pub(crate) async fn hash_password(password: String) -> anyhow::Result<String> {
    on_hash_worker(move || {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing: {e}"))
    })
    .await?
}

async fn password_matches(password: String, stored: String) -> bool {
    on_hash_worker(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), stored.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// A hash of a random password, made once, to verify against when the user does not exist.
async fn unknown_user_hash() -> String {
    static HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    HASH.get_or_init(|| async {
        hash_password(random_password())
            .await
            .unwrap_or_else(|_| "$argon2id$v=19$m=19456,t=2,p=1$invalid$invalid".into())
    })
    .await
    .clone()
}

/// A user whose password just checked out.
pub struct VerifiedUser {
    pub id: String,
    pub tenant_id: Option<String>,
    pub must_change_password: bool,
}

/// Account lockout: after `after` wrong passwords in a row, the account refuses every password
/// for `base_secs`, doubling with each further lock (capped at an hour) until a success.
#[derive(Debug, Clone, Copy)]
pub struct Lockout {
    pub after: u32,
    pub base_secs: u32,
}

const MAX_LOCK_SECS: i64 = 3600;

/// Checks a user's password. Unknown user, wrong password and locked account are the same
/// answer and cost the same work, so neither timing nor text tells who exists or is locked.
pub async fn verify_password(
    db: &Db,
    lockout: Lockout,
    user: &str,
    password: &str,
) -> Result<VerifiedUser> {
    let refused = |locked| Error::LoginRefused {
        locked,
        new_lock: None,
        account: None,
    };
    if password.len() > MAX_PASSWORD_LEN {
        return Err(refused(false));
    }
    // A disabled account, or one in a disabled tenant, answers like an unknown one.
    let row = sqlx::query(
        "SELECT u.id, u.tenant_id, u.password_hash, u.must_change_password, u.locked_until \
         FROM users u LEFT JOIN tenants t ON t.id = u.tenant_id \
         WHERE u.name = $1 AND u.disabled_at IS NULL AND t.disabled_at IS NULL",
    )
    .bind(user)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else {
        password_matches(password.to_string(), unknown_user_hash().await).await;
        return Err(refused(false));
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let id: String = row.get("id");
    let account = NewLock {
        user_id: id.clone(),
        tenant_id: row.get("tenant_id"),
    };
    if row
        .get::<Option<i64>, _>("locked_until")
        .is_some_and(|until| until > now)
    {
        password_matches(password.to_string(), unknown_user_hash().await).await;
        return Err(Error::LoginRefused {
            locked: true,
            new_lock: None,
            account: Some(account),
        });
    }
    if !password_matches(password.to_string(), row.get("password_hash")).await {
        let locked = record_failure(db, lockout, &id, now).await?;
        return Err(Error::LoginRefused {
            locked,
            new_lock: locked.then(|| account.clone()),
            account: Some(account),
        });
    }
    // The failure count is cleared only once the whole login succeeds (see `clear_failures`):
    // a right password followed by wrong second factors must still lock the account.
    Ok(VerifiedUser {
        id,
        tenant_id: row.get("tenant_id"),
        must_change_password: row.get::<i64, _>("must_change_password") != 0,
    })
}

/// A complete, successful authentication: the failure count and back-off start over.
pub async fn clear_failures(db: &Db, user_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE users SET failed_logins = 0, lockouts = 0, locked_until = NULL WHERE id = $1",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Counts a wrong password, locking the account when it was one too many. One statement, so
/// parallel attempts cannot slip past the count. Returns whether the account is now locked.
pub(crate) async fn record_failure(
    db: &Db,
    lockout: Lockout,
    user_id: &str,
    now: i64,
) -> Result<bool> {
    let row = sqlx::query(
        "UPDATE users SET \
           failed_logins = CASE WHEN failed_logins + 1 >= $2 THEN 0 ELSE failed_logins + 1 END, \
           lockouts = CASE WHEN failed_logins + 1 >= $2 THEN lockouts + 1 ELSE lockouts END, \
           locked_until = CASE WHEN failed_logins + 1 >= $2 \
             THEN $3 + MIN($4 * (1 << MIN(lockouts, 20)), $5) ELSE locked_until END \
         WHERE id = $1 RETURNING locked_until",
    )
    .bind(user_id)
    .bind(i64::from(lockout.after.max(1)))
    .bind(now)
    .bind(i64::from(lockout.base_secs))
    .bind(MAX_LOCK_SECS)
    .fetch_one(&db.pool)
    .await?;
    Ok(row
        .get::<Option<i64>, _>("locked_until")
        .is_some_and(|until| until > now))
}

/// How many earlier passwords a new one may not repeat (besides the current one).
const PASSWORD_HISTORY: i64 = 5;

fn policy_error(message: impl Into<String>) -> Error {
    Error::Invalid {
        code: "password_policy",
        message: message.into(),
    }
}

/// The platform password rule: 12 (or the tenant's higher minimum) to 1024 characters, at
/// least three of the four classes (lower case, upper case, digits, anything else), at least
/// five distinct characters, and not containing the user name.
pub fn check_new_password(user_name: &str, new: &str, tenant_min_length: u32) -> Result<()> {
    let min = MIN_PASSWORD_LEN
        .max(tenant_min_length as usize)
        .min(MAX_PASSWORD_LEN);
    if new.chars().count() < min || new.len() > MAX_PASSWORD_LEN {
        return Err(policy_error(format!(
            "the new password must be {min} to {MAX_PASSWORD_LEN} characters"
        )));
    }
    let classes = [
        new.chars().any(char::is_lowercase),
        new.chars().any(char::is_uppercase),
        new.chars().any(|c| c.is_ascii_digit()),
        new.chars().any(|c| !c.is_alphanumeric()),
    ];
    if classes.iter().filter(|present| **present).count() < 3 {
        return Err(policy_error(
            "the new password needs three of: lower case, upper case, digits, other characters",
        ));
    }
    let mut distinct: Vec<char> = new.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 5 {
        return Err(policy_error("the new password repeats too few characters"));
    }
    // A tenant user's login name is `<name>@<tenant>`: the name part is what people pick.
    let user_name = user_name.split('@').next().unwrap_or(user_name);
    if user_name.chars().count() >= 3 && new.to_lowercase().contains(&user_name.to_lowercase()) {
        return Err(policy_error(
            "the new password must not contain the user name",
        ));
    }
    Ok(())
}

/// Refuses a password equal to the current one or one of the last [`PASSWORD_HISTORY`].
pub async fn check_not_reused(db: &Db, user_id: &str, new: &str) -> Result<()> {
    let rows = sqlx::query(
        "SELECT password_hash AS hash FROM users WHERE id = $1 UNION ALL \
         SELECT hash FROM (SELECT hash FROM password_history WHERE user_id = $1 \
         ORDER BY replaced_at DESC, rowid DESC LIMIT $2)",
    )
    .bind(user_id)
    .bind(PASSWORD_HISTORY)
    .fetch_all(&db.pool)
    .await?;
    for row in rows {
        if password_matches(new.to_string(), row.get("hash")).await {
            return Err(Error::Invalid {
                code: "password_reused",
                message: format!(
                    "the new password must differ from the current and last {PASSWORD_HISTORY}"
                ),
            });
        }
    }
    Ok(())
}

/// Sets a new password, keeping the old hash in the history and revoking the user's keys.
pub async fn set_password(db: &Db, user_id: &str, new: &str) -> Result<()> {
    let hash = hash_password(new.to_string()).await?;
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO password_history (user_id, hash, replaced_at) \
         SELECT id, password_hash, $2 FROM users WHERE id = $1",
    )
    .bind(user_id)
    .bind(now())
    .execute(&mut *tx)
    .await?;
    // Hashes older than the history are of no use, and kept would only be exposed.
    // (`replaced_at` has one-second steps; the row id orders changes within one second.)
    sqlx::query(
        "DELETE FROM password_history WHERE user_id = $1 AND rowid NOT IN \
         (SELECT rowid FROM password_history WHERE user_id = $1 \
          ORDER BY replaced_at DESC, rowid DESC LIMIT $2)",
    )
    .bind(user_id)
    .bind(PASSWORD_HISTORY)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE users SET password_hash = $1, must_change_password = 0, \
         password_changed_at = $3 WHERE id = $2",
    )
    .bind(hash)
    .bind(user_id)
    .bind(unix_now())
    .execute(&mut *tx)
    .await?;
    // A password change ends every credential made under the old password.
    revoke_all_keys(&mut tx, user_id).await?;
    tx.commit().await?;
    Ok(())
}

/// Revokes every key and session of a user. Each key is looked up on every request, so they
/// fail from the next request on.
pub async fn revoke_all_keys(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    user_id: &str,
) -> Result<()> {
    sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL")
        .bind(user_id)
        .bind(now())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The password rules that apply to a user: the tenant's minimum length and the maximum age
/// (the stricter of the platform's and the tenant's; 0 = none).
pub async fn password_rules(db: &Db, rules: &CredentialRules, user_id: &str) -> Result<(u32, u32)> {
    let row = sqlx::query(
        "SELECT t.password_min_length, t.password_max_age_days FROM users u \
         LEFT JOIN tenants t ON t.id = u.tenant_id WHERE u.id = $1",
    )
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?;
    let (min, tenant_age) = row
        .map(|r| {
            (
                r.get::<Option<i64>, _>("password_min_length").unwrap_or(0) as u32,
                r.get::<Option<i64>, _>("password_max_age_days")
                    .unwrap_or(0) as u32,
            )
        })
        .unwrap_or((0, 0));
    Ok((min, stricter_age(rules.password_max_age_days, tenant_age)))
}

/// Unix time of the user's last password change.
pub async fn password_changed_at(db: &Db, user_id: &str) -> Result<i64> {
    Ok(
        sqlx::query("SELECT password_changed_at FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await?
            .get("password_changed_at"),
    )
}

/// The stricter of two maximum ages, where 0 means "no maximum".
fn stricter_age(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// A key to register: an API key (expires) or a login session (short-lived, idle timeout).
pub enum KeyKind {
    Api { expires_in_days: Option<u32> },
    Session,
}

/// Validates a key registration into the record to insert.
pub fn prepare_key(
    rules: &CredentialRules,
    user_id: &str,
    public_key: &str,
    name: Option<&str>,
    kind: KeyKind,
) -> Result<ApiKey> {
    let public_key = palisade_common::signing::parse_public_key(public_key)
        .ok_or_else(|| Error::invalid("public_key must be base64 of a 32-byte Ed25519 key"))?;
    let name = name.unwrap_or("default").to_string();
    if !api::is_valid_name(&name) {
        return Err(Error::invalid("key name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    let now = unix_now();
    let (kind, expires_at, idle) = match kind {
        KeyKind::Api { expires_in_days } => {
            let days = expires_in_days.unwrap_or(rules.key_max_days);
            if days == 0 || days > rules.key_max_days {
                return Err(Error::invalid(format!(
                    "expires_in_days must be 1 to {}",
                    rules.key_max_days
                )));
            }
            ("api", now + i64::from(days) * 86_400, None)
        }
        KeyKind::Session => (
            "session",
            now + rules.session_max_secs,
            Some(rules.session_idle_secs as u64),
        ),
    };
    Ok(ApiKey {
        id: format!("key-{}", new_id()),
        user_id: user_id.to_string(),
        name,
        public_key: palisade_common::signing::encode_public_key(&public_key),
        created_at: now_string(now),
        kind: kind.into(),
        expires_at: Some(rfc3339(expires_at)),
        idle_timeout_secs: idle,
    })
}

fn now_string(unix: i64) -> String {
    rfc3339(unix)
}

/// Stores a prepared key. `mfa_proven`: the key was made with a second factor just now, so it
/// starts with a fresh proof.
pub async fn insert_key(db: &Db, key: ApiKey, mfa_proven: bool) -> Result<ApiKey> {
    let now = unix_now();
    let expires_at = key
        .expires_at
        .as_deref()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| t.unix_timestamp());
    let inserted = sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, public_key, created_at, kind, expires_at, \
         idle_secs, last_used_at, mfa_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (public_key) DO NOTHING",
    )
    .bind(&key.id)
    .bind(&key.user_id)
    .bind(&key.name)
    .bind(&key.public_key)
    .bind(&key.created_at)
    .bind(&key.kind)
    .bind(expires_at)
    .bind(key.idle_timeout_secs.map(|s| s as i64))
    .bind(now)
    .bind(mfa_proven.then_some(now))
    .execute(&db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "key_exists",
            message: "this public key is already registered".into(),
        });
    }
    Ok(key)
}

/// Looks a key up for a request: unknown, revoked, expired or idle keys, and keys of disabled
/// users or tenants, are all `None` (the caller sees one answer, `key_invalid`).
pub async fn lookup_key(
    db: &Db,
    rules: &CredentialRules,
    key_id: &str,
) -> Result<Option<KeyRecord>> {
    let now = unix_now();
    let row = sqlx::query(concat!(
        "SELECT k.public_key, k.expires_at, k.idle_secs, k.last_used_at, k.mfa_at, \
         u.id AS user_id, u.name, u.tenant_id, u.role, u.must_change_password, \
         u.password_changed_at, t.require_mfa, t.password_max_age_days, ",
        mfa_enrolled_sql!("u"),
        " AS mfa_enrolled FROM api_keys k JOIN users u ON u.id = k.user_id \
         LEFT JOIN tenants t ON t.id = u.tenant_id \
         WHERE k.id = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL \
         AND t.disabled_at IS NULL"
    ))
    .bind(key_id)
    .fetch_optional(&db.pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    if row
        .get::<Option<i64>, _>("expires_at")
        .is_some_and(|at| at <= now)
    {
        return Ok(None);
    }
    let idle = row.get::<Option<i64>, _>("idle_secs");
    let last_used = row.get::<Option<i64>, _>("last_used_at");
    if let (Some(idle), Some(last)) = (idle, last_used) {
        if now - last > idle {
            return Ok(None);
        }
    }
    let user_id: String = row.get("user_id");
    let tenant_id: Option<String> = row.get("tenant_id");
    let groups = sqlx::query(
        "SELECT g.name FROM group_members m JOIN groups g ON g.id = m.group_id \
         WHERE m.user_id = $1 ORDER BY g.name",
    )
    .bind(&user_id)
    .fetch_all(&db.pool)
    .await?
    .iter()
    .map(|r| r.get::<String, _>("name"))
    .collect();
    let max_age = stricter_age(
        rules.password_max_age_days,
        row.get::<Option<i64>, _>("password_max_age_days")
            .unwrap_or(0) as u32,
    );
    let password_expired =
        max_age > 0 && now - row.get::<i64, _>("password_changed_at") > i64::from(max_age) * 86_400;
    let mfa_bound = tenant_id.is_none()
        || row.get::<Option<i64>, _>("require_mfa").unwrap_or(0) != 0
        || row.get::<i64, _>("mfa_enrolled") != 0;
    let mfa_at = row.get::<Option<i64>, _>("mfa_at");
    // Each use is not written: a session's last use is kept to a quarter of its idle timeout
    // (at most 30 s), an API key's to a minute, so a busy key costs no write per request.
    let granularity = idle.map_or(60, |idle| (idle / 4).clamp(1, 30));
    let touch_due = last_used.is_none_or(|last| now - last >= granularity);
    Ok(Some(KeyRecord {
        touch_due,
        lacks_mfa: mfa_bound && mfa_at.is_none(),
        public_key: row.get("public_key"),
        must_change_password: row.get::<i64, _>("must_change_password") != 0 || password_expired,
        principal: Principal {
            user_id,
            user_name: row.get("name"),
            tenant_id,
            role: row.get("role"),
            key_id: key_id.to_string(),
            groups,
            mfa_fresh: mfa_at.is_some_and(|at| now - at <= rules.mfa_fresh_secs),
            mfa_bound,
        },
    }))
}

/// Notes a verified request on a key (the idle timeout counts from here).
pub async fn touch_key(db: &Db, key_id: &str) -> Result<()> {
    sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
        .bind(key_id)
        .bind(unix_now())
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Records a fresh second-factor proof on the signing key.
pub async fn mark_mfa_fresh(db: &Db, key_id: &str) -> Result<()> {
    sqlx::query("UPDATE api_keys SET mfa_at = $2 WHERE id = $1")
        .bind(key_id)
        .bind(unix_now())
        .execute(&db.pool)
        .await?;
    Ok(())
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> ApiKey {
    ApiKey {
        id: row.get("id"),
        user_id: row.get("user_id"),
        name: row.get("name"),
        public_key: row.get("public_key"),
        created_at: row.get("created_at"),
        kind: row.get("kind"),
        expires_at: row.get::<Option<i64>, _>("expires_at").map(rfc3339),
        idle_timeout_secs: row.get::<Option<i64>, _>("idle_secs").map(|s| s as u64),
    }
}

/// The caller's own live keys and sessions.
pub async fn list_keys(db: &Db, user_id: &str) -> Result<Vec<ApiKey>> {
    let rows = sqlx::query(
        "SELECT id, user_id, name, public_key, created_at, kind, expires_at, idle_secs \
         FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2) ORDER BY created_at, id",
    )
    .bind(user_id)
    .bind(unix_now())
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.iter().map(key_from_row).collect())
}

/// A live key of `user_id`; anything else is not found.
pub async fn own_key(db: &Db, user_id: &str, key_id: &str) -> Result<ApiKey> {
    sqlx::query(
        "SELECT id, user_id, name, public_key, created_at, kind, expires_at, idle_secs \
         FROM api_keys WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $3)",
    )
    .bind(key_id)
    .bind(user_id)
    .bind(unix_now())
    .fetch_optional(&db.pool)
    .await?
    .map(|row| key_from_row(&row))
    .ok_or(Error::NotFound { what: "key" })
}

/// Revokes a key: from the next request on, signatures by it get 401 `key_invalid`.
pub async fn revoke_key(db: &Db, user_id: &str, key_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 \
         AND revoked_at IS NULL",
    )
    .bind(now())
    .bind(key_id)
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Rotation: `new` (prepared for the same user) replaces `old`, which stops working after
/// `overlap_secs` (at once for 0). One transaction: never both gone, never an unbounded pair.
pub async fn rotate_key(db: &Db, old: &ApiKey, new: ApiKey, overlap_secs: u32) -> Result<ApiKey> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let now = unix_now();
    let successor_lives = sqlx::query(
        "SELECT 1 FROM api_keys o JOIN api_keys n ON n.id = o.rotated_to WHERE o.id = $1 \
         AND n.revoked_at IS NULL AND (n.expires_at IS NULL OR n.expires_at > $2)",
    )
    .bind(&old.id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?
    .is_some();
    if successor_lives {
        return Err(Error::Conflict {
            code: "key_already_rotated",
            message: "this key was rotated already; rotate its successor".into(),
        });
    }
    let ends = now + i64::from(overlap_secs);
    sqlx::query(
        "UPDATE api_keys SET expires_at = MIN(COALESCE(expires_at, $2), $2), rotated_to = $3 \
         WHERE id = $1",
    )
    .bind(&old.id)
    .bind(ends)
    .bind(&new.id)
    .execute(&mut *tx)
    .await?;
    if overlap_secs == 0 {
        sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1")
            .bind(&old.id)
            .bind(crate::db::now())
            .execute(&mut *tx)
            .await?;
    }
    let expires_at = new
        .expires_at
        .as_deref()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| t.unix_timestamp());
    // The new key carries the old one's second-factor proof: same holder, same proof.
    let inserted = sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, public_key, created_at, kind, expires_at, \
         idle_secs, last_used_at, mfa_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, mfa_at FROM api_keys WHERE id = $10 \
         ON CONFLICT (public_key) DO NOTHING",
    )
    .bind(&new.id)
    .bind(&new.user_id)
    .bind(&new.name)
    .bind(&new.public_key)
    .bind(&new.created_at)
    .bind(&new.kind)
    .bind(expires_at)
    .bind(new.idle_timeout_secs.map(|s| s as i64))
    .bind(unix_now())
    .bind(&old.id)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "key_exists",
            message: "this public key is already registered".into(),
        });
    }
    tx.commit().await?;
    Ok(new)
}

// ---- second factor ----

/// Whether a user must present a second factor, and whether one is enrolled.
pub struct MfaState {
    pub bound: bool,
    pub enrolled: bool,
}

pub async fn mfa_state(db: &Db, user_id: &str) -> Result<MfaState> {
    let row = sqlx::query(concat!(
        "SELECT u.tenant_id, t.require_mfa, ",
        mfa_enrolled_sql!("u"),
        " AS mfa_enrolled FROM users u LEFT JOIN tenants t ON t.id = u.tenant_id WHERE u.id = $1"
    ))
    .bind(user_id)
    .fetch_one(&db.pool)
    .await?;
    let enrolled = row.get::<i64, _>("mfa_enrolled") != 0;
    Ok(MfaState {
        bound: row.get::<Option<String>, _>("tenant_id").is_none()
            || row.get::<Option<i64>, _>("require_mfa").unwrap_or(0) != 0
            || enrolled,
        enrolled,
    })
}

/// The second factor a caller offers: exactly one of these must be given.
#[derive(Clone, Copy, Default)]
pub struct Factor<'a> {
    pub totp_code: Option<&'a str>,
    pub recovery_code: Option<&'a str>,
    pub webauthn: Option<&'a api::WebauthnAssertion>,
}

impl Factor<'_> {
    pub fn given(&self) -> bool {
        self.totp_code.is_some() || self.recovery_code.is_some() || self.webauthn.is_some()
    }
}

/// Where second factors are checked: the database, the key sealing TOTP seeds, the WebAuthn
/// relying party and the lockout rule that failures count toward.
#[derive(Clone, Copy)]
pub struct FactorCheck<'a> {
    pub db: &'a Db,
    pub secrets: &'a MasterKey,
    pub relying_party: &'a webauthn::RelyingParty,
    pub lockout: Lockout,
}

/// Checks a TOTP code, a recovery code or a security key's WebAuthn assertion of an enrolled
/// user. A TOTP code is accepted once: its step must be newer than the last accepted one
/// (compare-and-set, so two parallel uses of one code cannot both pass). A recovery code is
/// spent by the same kind of update, a WebAuthn challenge by taking it out of the database.
/// Failures count toward the account lockout like wrong passwords.
pub async fn check_second_factor(
    check: FactorCheck<'_>,
    user_id: &str,
    factor: Factor<'_>,
) -> Result<()> {
    let FactorCheck {
        db,
        secrets,
        relying_party,
        lockout,
    } = check;
    let now = unix_now();
    // A locked account takes no second factor either: a stolen key cannot be used to guess
    // codes at the rate limit's pace while the owner is locked out.
    let locked = sqlx::query("SELECT locked_until FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?
        .and_then(|r| r.get::<Option<i64>, _>("locked_until"))
        .is_some_and(|until| until > now);
    if locked {
        return Err(Error::MfaRefused {
            locked: true,
            new_lock: None,
        });
    }
    let accepted = match (factor.totp_code, factor.recovery_code, factor.webauthn) {
        (None, None, Some(assertion)) => {
            webauthn::check_assertion(db, relying_party, user_id, assertion).await?
        }
        (Some(code), None, None) => {
            let row = sqlx::query(
                "SELECT totp_sealed, totp_last_step FROM users WHERE id = $1 \
                 AND totp_confirmed = 1",
            )
            .bind(user_id)
            .fetch_optional(&db.pool)
            .await?;
            match row {
                None => false,
                Some(row) => {
                    let sealed: String = row.get("totp_sealed");
                    let secret = secrets
                        .open(&totp_purpose(user_id), &sealed)
                        .map_err(Error::Internal)?;
                    let last = row
                        .get::<Option<i64>, _>("totp_last_step")
                        .map(|s| s as u64);
                    match mfa::check_totp(&secret, code, now as u64, last) {
                        Ok(step) => {
                            sqlx::query(
                                "UPDATE users SET totp_last_step = $2 WHERE id = $1 AND \
                                 (totp_last_step IS NULL OR totp_last_step < $2)",
                            )
                            .bind(user_id)
                            .bind(step as i64)
                            .execute(&db.pool)
                            .await?
                            .rows_affected()
                                == 1
                        }
                        Err(_) => false,
                    }
                }
            }
        }
        (None, Some(code), None) => match mfa::normalize_recovery_code(code) {
            None => false,
            Some(code) => {
                let hash = secrets.keyed_hash(&recovery_purpose(user_id), code.as_bytes());
                sqlx::query(
                    "UPDATE recovery_codes SET used_at = $3 WHERE user_id = $1 \
                     AND code_hash = $2 AND used_at IS NULL",
                )
                .bind(user_id)
                .bind(hash)
                .bind(crate::db::now())
                .execute(&db.pool)
                .await?
                .rows_affected()
                    == 1
            }
        },
        (None, None, None) => {
            return Err(Error::Unauthorized {
                code: "mfa_required",
                message: "this account needs a second factor: totp_code, recovery_code or \
                          webauthn"
                    .into(),
            })
        }
        _ => {
            return Err(Error::invalid(
                "give one of totp_code, recovery_code and webauthn, not several",
            ))
        }
    };
    if accepted {
        return Ok(());
    }
    let locked = record_failure(db, lockout, user_id, now).await?;
    Err(mfa_refused(db, user_id, locked).await)
}

async fn mfa_refused(db: &Db, user_id: &str, locked: bool) -> Error {
    let tenant_id = if locked {
        sqlx::query("SELECT tenant_id FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&db.pool)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<Option<String>, _>("tenant_id"))
    } else {
        None
    };
    Error::MfaRefused {
        locked,
        new_lock: locked.then(|| NewLock {
            user_id: user_id.to_string(),
            tenant_id,
        }),
    }
}

pub fn totp_purpose(user_id: &str) -> String {
    format!("totp-seed:{user_id}")
}

pub fn recovery_purpose(user_id: &str) -> String {
    format!("recovery-code:{user_id}")
}

/// Starts TOTP enrolment: a new secret, sealed, pending until confirmed. Refused when a
/// confirmed one exists (only an administrator's reset removes it).
pub async fn begin_totp(
    db: &Db,
    secrets: &MasterKey,
    user_id: &str,
    user_name: &str,
) -> Result<api::TotpEnrolment> {
    let secret = mfa::new_totp_secret();
    let sealed = secrets.seal(&totp_purpose(user_id), &secret);
    // A security key counts too: a password alone must not add a second factor of its own.
    let updated = sqlx::query(
        "UPDATE users SET totp_sealed = $2, totp_last_step = NULL WHERE id = $1 \
         AND totp_confirmed = 0 AND NOT EXISTS \
         (SELECT 1 FROM webauthn_credentials WHERE user_id = $1)",
    )
    .bind(user_id)
    .bind(sealed)
    .execute(&db.pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "mfa_already_enrolled",
            message: "a second factor is enrolled; an administrator can reset it".into(),
        });
    }
    let otpauth_uri = mfa::otpauth_uri(&secret, user_name).map_err(Error::Internal)?;
    // The same secret in base32, for apps where it is typed in: the URI's `secret` parameter.
    let secret = otpauth_uri
        .split(['?', '&'])
        .find_map(|part| part.strip_prefix("secret="))
        .unwrap_or_default()
        .to_string();
    Ok(api::TotpEnrolment {
        secret,
        otpauth_uri,
    })
}

/// Confirms a pending TOTP secret with a first code; returns fresh one-time recovery codes.
pub async fn confirm_totp(
    db: &Db,
    secrets: &MasterKey,
    lockout: Lockout,
    user_id: &str,
    code: &str,
) -> Result<api::RecoveryCodes> {
    let row = sqlx::query(
        "SELECT totp_sealed FROM users WHERE id = $1 AND totp_confirmed = 0 \
         AND totp_sealed IS NOT NULL",
    )
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?
    .ok_or(Error::Conflict {
        code: "mfa_not_pending",
        message: "no TOTP enrolment is pending; start one first".into(),
    })?;
    let sealed: String = row.get("totp_sealed");
    let secret = secrets
        .open(&totp_purpose(user_id), &sealed)
        .map_err(Error::Internal)?;
    let now = unix_now();
    let Ok(step) = mfa::check_totp(&secret, code, now as u64, None) else {
        let locked = record_failure(db, lockout, user_id, now).await?;
        return Err(mfa_refused(db, user_id, locked).await);
    };
    let mut tx = db.pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE users SET totp_confirmed = 1, totp_last_step = $2 WHERE id = $1 \
         AND totp_confirmed = 0 AND totp_sealed = $3",
    )
    .bind(user_id)
    .bind(step as i64)
    .bind(&sealed)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "mfa_not_pending",
            message: "the enrolment changed meanwhile; start again".into(),
        });
    }
    let codes = replace_recovery_codes(&mut tx, secrets, user_id).await?;
    // Credentials made before the second factor existed did not prove it: end them.
    revoke_all_keys(&mut tx, user_id).await?;
    tx.commit().await?;
    Ok(api::RecoveryCodes {
        recovery_codes: codes,
    })
}

/// New one-time recovery codes for a user, in place of any earlier ones; only their keyed
/// hashes are stored.
pub async fn replace_recovery_codes(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    secrets: &MasterKey,
    user_id: &str,
) -> Result<Vec<String>> {
    let codes = mfa::new_recovery_codes();
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    for code in &codes {
        sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)")
            .bind(user_id)
            .bind(secrets.keyed_hash(&recovery_purpose(user_id), code.as_bytes()))
            .execute(&mut **tx)
            .await?;
    }
    Ok(codes)
}

/// Removes a user's second factor (an administrator's reset) and ends all their credentials.
pub async fn reset_mfa(db: &Db, user_id: &str) -> Result<()> {
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "UPDATE users SET totp_sealed = NULL, totp_confirmed = 0, totp_last_step = NULL \
         WHERE id = $1",
    )
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    for sql in [
        "DELETE FROM recovery_codes WHERE user_id = $1",
        "DELETE FROM webauthn_credentials WHERE user_id = $1",
        "DELETE FROM webauthn_ceremonies WHERE user_id = $1",
    ] {
        sqlx::query(sql).bind(user_id).execute(&mut *tx).await?;
    }
    revoke_all_keys(&mut tx, user_id).await?;
    tx.commit().await?;
    Ok(())
}

/// Records a nonce; false when this key already used it (a replay).
pub async fn remember_nonce(db: &Db, key_id: &str, nonce: &str, now_unix: i64) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO seen_nonces (key_id, nonce, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (key_id, nonce) DO NOTHING",
    )
    .bind(key_id)
    .bind(nonce)
    .bind(now_unix)
    .execute(&db.pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets nonces older than twice the window: a request that old is refused by its time.
pub async fn purge_nonces(db: &Db, now_unix: i64) -> Result<()> {
    let horizon = now_unix - 2 * palisade_common::signing::SIGNATURE_WINDOW_SECS - 5;
    sqlx::query("DELETE FROM seen_nonces WHERE seen_at < $1")
        .bind(horizon)
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_rule() {
        for ok in ["Correct-horse-7", "tr0ub4dor&3xyz", "Ünïcödé-Pässwort-9"] {
            assert!(check_new_password("alice", ok, 0).is_ok(), "{ok}");
        }
        for bad in [
            "Short-1",              // too short
            "            ",         // twelve spaces: one class, one character
            "alllowercaseletters",  // one class
            "lowercase-only-words", // two classes
            "Aa1!Aa1!Aa1!Aa1!",     // four distinct characters
            "My-alice-Password-1",  // contains the user name
            "MY-ALICE-PASSWORD-1",  // ... in any case
        ] {
            let err = check_new_password("alice", bad, 0).unwrap_err();
            assert_eq!(err.code(), "password_policy", "{bad}");
        }
    }

    #[tokio::test]
    async fn nonces_are_single_use_and_purged_only_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let t = 1_000_000;
        assert!(remember_nonce(&db, "k1", "n1", t).await.unwrap());
        assert!(
            !remember_nonce(&db, "k1", "n1", t + 1).await.unwrap(),
            "replay accepted"
        );
        assert!(
            remember_nonce(&db, "k2", "n1", t).await.unwrap(),
            "nonces are per key"
        );
        // Within twice the window the nonce is kept, so a replay inside it is still caught.
        purge_nonces(&db, t + 2 * palisade_common::signing::SIGNATURE_WINDOW_SECS)
            .await
            .unwrap();
        assert!(!remember_nonce(&db, "k1", "n1", t).await.unwrap());
        purge_nonces(&db, t + 10_000).await.unwrap();
        assert!(remember_nonce(&db, "k1", "n1", t + 10_000).await.unwrap());
    }
}
