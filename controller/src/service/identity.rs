//! Identities: the platform administrator, tenants, users, passwords and API keys.
//!
//! Passwords are stored only as Argon2id PHC strings. API keys are Ed25519 key pairs made on the
//! client; the server stores only the public half, so nothing in its database can sign.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use palisade_common::api::{self, ApiKey, Quota, Tenant, User, UserCreated};
use sqlx::Row;

use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};

pub const PLATFORM_ADMIN: &str = "platform_admin";
pub const TENANT_MEMBER: &str = "tenant_member";
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
}

impl Principal {
    pub fn is_platform_admin(&self) -> bool {
        self.role == PLATFORM_ADMIN && self.tenant_id.is_none()
    }
}

/// What signature verification needs to know about a key id.
pub struct KeyRecord {
    pub public_key: String,
    pub principal: Principal,
    pub must_change_password: bool,
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
         created_at) VALUES ($1, 'admin', NULL, $2, $3, 1, $4)",
    )
    .bind(new_id())
    .bind(PLATFORM_ADMIN)
    .bind(hash)
    .bind(now())
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
/// TODO(security): per-source and per-user rate limits and lockout — issue 3.
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

async fn hash_password(password: String) -> anyhow::Result<String> {
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
    let refused = |locked| Error::LoginRefused { locked };
    if password.len() > MAX_PASSWORD_LEN {
        return Err(refused(false));
    }
    let row = sqlx::query(
        "SELECT id, tenant_id, password_hash, must_change_password, locked_until FROM users \
         WHERE name = $1",
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
    if row
        .get::<Option<i64>, _>("locked_until")
        .is_some_and(|until| until > now)
    {
        password_matches(password.to_string(), unknown_user_hash().await).await;
        return Err(refused(true));
    }
    if !password_matches(password.to_string(), row.get("password_hash")).await {
        let locked = record_failure(db, lockout, &id, now).await?;
        return Err(refused(locked));
    }
    sqlx::query(
        "UPDATE users SET failed_logins = 0, lockouts = 0, locked_until = NULL WHERE id = $1",
    )
    .bind(&id)
    .execute(&db.pool)
    .await?;
    Ok(VerifiedUser {
        id,
        tenant_id: row.get("tenant_id"),
        must_change_password: row.get::<i64, _>("must_change_password") != 0,
    })
}

/// Counts a wrong password, locking the account when it was one too many. One statement, so
/// parallel attempts cannot slip past the count. Returns whether the account is now locked.
async fn record_failure(db: &Db, lockout: Lockout, user_id: &str, now: i64) -> Result<bool> {
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

/// The platform password rule: 12 to 1024 characters, at least three of the four classes
/// (lower case, upper case, digits, anything else), not all one character, and not containing
/// the user name. TODO(security): per-tenant tightening and maximum age — issue 3.
pub fn check_new_password(user_name: &str, new: &str) -> Result<()> {
    if new.chars().count() < MIN_PASSWORD_LEN || new.len() > MAX_PASSWORD_LEN {
        return Err(policy_error(format!(
            "the new password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters"
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
         ORDER BY replaced_at DESC LIMIT $2)",
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
    sqlx::query("UPDATE users SET password_hash = $1, must_change_password = 0 WHERE id = $2")
        .bind(hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    // A password change ends every credential made under the old password: each key is
    // looked up on every request, so they fail from the next one on.
    sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL")
        .bind(user_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Validates a key registration into the record to insert.
pub fn prepare_key(user_id: &str, req: &api::KeyCreate) -> Result<ApiKey> {
    let public_key = palisade_common::signing::parse_public_key(&req.public_key)
        .ok_or_else(|| Error::invalid("public_key must be base64 of a 32-byte Ed25519 key"))?;
    let name = req.name.clone().unwrap_or_else(|| "default".into());
    if !api::is_valid_name(&name) {
        return Err(Error::invalid("key name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    Ok(ApiKey {
        id: format!("key-{}", new_id()),
        user_id: user_id.to_string(),
        name,
        public_key: palisade_common::signing::encode_public_key(&public_key),
        created_at: now(),
    })
}

pub async fn insert_key(db: &Db, key: ApiKey) -> Result<ApiKey> {
    let inserted = sqlx::query(
        "INSERT INTO api_keys (id, user_id, name, public_key, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (public_key) DO NOTHING",
    )
    .bind(&key.id)
    .bind(&key.user_id)
    .bind(&key.name)
    .bind(&key.public_key)
    .bind(&key.created_at)
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

pub async fn lookup_key(db: &Db, key_id: &str) -> Result<Option<KeyRecord>> {
    let row = sqlx::query(
        "SELECT k.public_key, u.id AS user_id, u.name, u.tenant_id, u.role, \
         u.must_change_password FROM api_keys k JOIN users u ON u.id = k.user_id \
         WHERE k.id = $1 AND k.revoked_at IS NULL",
    )
    .bind(key_id)
    .fetch_optional(&db.pool)
    .await?;
    Ok(row.map(|row| KeyRecord {
        public_key: row.get("public_key"),
        must_change_password: row.get::<i64, _>("must_change_password") != 0,
        principal: Principal {
            user_id: row.get("user_id"),
            user_name: row.get("name"),
            tenant_id: row.get("tenant_id"),
            role: row.get("role"),
            key_id: key_id.to_string(),
        },
    }))
}

/// The caller's own live keys.
pub async fn list_keys(db: &Db, user_id: &str) -> Result<Vec<ApiKey>> {
    let rows = sqlx::query(
        "SELECT id, user_id, name, public_key, created_at FROM api_keys WHERE user_id = $1 \
         AND revoked_at IS NULL ORDER BY created_at, id",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| ApiKey {
            id: row.get("id"),
            user_id: row.get("user_id"),
            name: row.get("name"),
            public_key: row.get("public_key"),
            created_at: row.get("created_at"),
        })
        .collect())
}

/// Checks that `key_id` is a live key of `user_id`; anything else is not found.
pub async fn check_own_key(db: &Db, user_id: &str, key_id: &str) -> Result<()> {
    sqlx::query("SELECT 1 FROM api_keys WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL")
        .bind(key_id)
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?
        .map(|_| ())
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

pub async fn list_tenants(db: &Db) -> Result<Vec<Tenant>> {
    let rows = sqlx::query(
        "SELECT id, name, quota_instances, quota_vcpus, quota_memory_mib, created_at \
         FROM tenants ORDER BY created_at, id",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| Tenant {
            id: row.get("id"),
            name: row.get("name"),
            quota: Quota {
                instances: row.get::<i64, _>("quota_instances") as u32,
                vcpus: row.get::<i64, _>("quota_vcpus") as u32,
                memory_mib: row.get::<i64, _>("quota_memory_mib") as u32,
            },
            created_at: row.get("created_at"),
        })
        .collect())
}

pub async fn check_user(db: &Db, req: &api::UserCreate) -> Result<()> {
    if !api::is_valid_name(&req.name) {
        return Err(Error::invalid("user name: 1-63 of A-Z a-z 0-9 - _ ."));
    }
    let tenant = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
        .bind(&req.tenant_id)
        .fetch_optional(&db.pool)
        .await?;
    if tenant.is_none() {
        return Err(Error::NotFound { what: "tenant" });
    }
    Ok(())
}

pub async fn create_user(db: &Db, req: &api::UserCreate) -> Result<UserCreated> {
    check_user(db, req).await?;
    let password = random_password();
    let user = User {
        id: new_id(),
        name: req.name.clone(),
        tenant_id: Some(req.tenant_id.clone()),
        role: TENANT_MEMBER.into(),
        created_at: now(),
    };
    let inserted = sqlx::query(
        "INSERT INTO users (id, name, tenant_id, role, password_hash, must_change_password, \
         created_at) VALUES ($1, $2, $3, $4, $5, 1, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&user.id)
    .bind(&user.name)
    .bind(&user.tenant_id)
    .bind(&user.role)
    .bind(hash_password(password.clone()).await?)
    .bind(&user.created_at)
    .execute(&db.pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "name_taken",
            message: "a user with this name exists".into(),
        });
    }
    Ok(UserCreated {
        user,
        initial_password: password,
    })
}

pub async fn get_user(db: &Db, user_id: &str) -> Result<User> {
    let row = sqlx::query("SELECT id, name, tenant_id, role, created_at FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound { what: "user" })?;
    Ok(User {
        id: row.get("id"),
        name: row.get("name"),
        tenant_id: row.get("tenant_id"),
        role: row.get("role"),
        created_at: row.get("created_at"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_rule() {
        for ok in ["Correct-horse-7", "tr0ub4dor&3xyz", "Ünïcödé-Pässwort-9"] {
            assert!(check_new_password("alice", ok).is_ok(), "{ok}");
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
            let err = check_new_password("alice", bad).unwrap_err();
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
