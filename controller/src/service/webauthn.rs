//! WebAuthn security keys as a second factor (webauthn-rs does the ceremonies' cryptography).
//!
//! The platform is the relying party for one origin (`--webauthn-origin`, by default
//! `https://localhost:<API port>`); its host name is the RP ID. A ceremony's state stays on the
//! server, in the database, and is taken out exactly once: a challenge cannot be answered twice,
//! nor after five minutes, nor for another account. What is stored of a key is its public key
//! and signature counter, so nothing here needs sealing; a counter that goes backwards (a cloned
//! key) is refused by webauthn-rs.

use base64::Engine;
use palisade_common::api;
use sqlx::Row;
use webauthn_rs::prelude::{
    PublicKeyCredential, RegisterPublicKeyCredential, SecurityKey, SecurityKeyAuthentication,
    SecurityKeyRegistration, Url, Uuid, Webauthn, WebauthnBuilder,
};

use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};
use crate::service::identity;
use crate::service::secrets::MasterKey;

/// How long a challenge may be answered.
const CEREMONY_TTL_SECS: i64 = 300;
/// Ceremonies one account may have open at once; starting another drops the oldest.
const MAX_OPEN_CEREMONIES: i64 = 5;
/// Security keys one account may register.
const MAX_KEYS_PER_USER: i64 = 10;

/// The relying party: one origin, its host name as RP ID.
pub struct RelyingParty {
    webauthn: Webauthn,
    origin: Url,
}

impl RelyingParty {
    /// Fails when the origin is not `https://` with a DNS name (WebAuthn has no RP ID for a
    /// bare IP address).
    pub fn new(origin: &Url) -> anyhow::Result<RelyingParty> {
        anyhow::ensure!(
            origin.scheme() == "https" && origin.path() == "/" && origin.query().is_none(),
            "the WebAuthn origin must be https://<host name>[:port], got {origin}"
        );
        let rp_id = origin.domain().ok_or_else(|| {
            anyhow::anyhow!("the WebAuthn origin {origin} needs a host name, not an IP address")
        })?;
        let webauthn = WebauthnBuilder::new(rp_id, origin)?
            .rp_name("Palisade")
            .build()?;
        Ok(RelyingParty {
            webauthn,
            origin: origin.clone(),
        })
    }

    /// The origin the authenticator's client data must name (no trailing slash).
    pub fn origin(&self) -> String {
        self.origin.as_str().trim_end_matches('/').to_string()
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn invalid_credential(what: &str) -> Error {
    Error::Invalid {
        code: "webauthn_invalid",
        message: format!("credential: not a WebAuthn {what} in JSON form"),
    }
}

fn credential_id_text(key: &SecurityKey) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode::<&[u8]>(key.cred_id().as_ref())
}

/// Opens a ceremony of `kind` for `user_id`, keeping the account's open ceremonies bounded.
async fn open_ceremony(db: &Db, user_id: &str, kind: &str, state: String) -> Result<String> {
    let id = new_id();
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "DELETE FROM webauthn_ceremonies WHERE expires_at < $2 OR id IN \
         (SELECT id FROM webauthn_ceremonies WHERE user_id = $1 \
          ORDER BY expires_at DESC LIMIT -1 OFFSET $3)",
    )
    .bind(user_id)
    .bind(unix_now())
    .bind(MAX_OPEN_CEREMONIES - 1)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO webauthn_ceremonies (id, user_id, kind, state, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(user_id)
    .bind(kind)
    .bind(state)
    .bind(unix_now() + CEREMONY_TTL_SECS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Takes a ceremony out, once: `None` when it is unknown, expired, of another kind or of
/// another account (all the same to the caller).
async fn take_ceremony(db: &Db, user_id: &str, kind: &str, id: &str) -> Result<Option<String>> {
    let row = sqlx::query(
        "DELETE FROM webauthn_ceremonies WHERE id = $1 AND user_id = $2 AND kind = $3 \
         RETURNING state, expires_at",
    )
    .bind(id)
    .bind(user_id)
    .bind(kind)
    .fetch_optional(&db.pool)
    .await?;
    Ok(row
        .filter(|r| r.get::<i64, _>("expires_at") >= unix_now())
        .map(|r| r.get("state")))
}

async fn security_keys(db: &Db, user_id: &str) -> Result<Vec<SecurityKey>> {
    let rows = sqlx::query("SELECT security_key FROM webauthn_credentials WHERE user_id = $1")
        .bind(user_id)
        .fetch_all(&db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            serde_json::from_str(&r.get::<String, _>("security_key"))
                .map_err(|e| Error::Internal(anyhow::Error::new(e).context("stored security key")))
        })
        .collect()
}

/// Whether the account has a security key registered.
pub async fn enrolled(db: &Db, user_id: &str) -> Result<bool> {
    Ok(
        sqlx::query("SELECT 1 FROM webauthn_credentials WHERE user_id = $1 LIMIT 1")
            .bind(user_id)
            .fetch_optional(&db.pool)
            .await?
            .is_some(),
    )
}

/// Starts registering a security key for the account.
pub async fn begin_registration(
    db: &Db,
    rp: &RelyingParty,
    user_id: &str,
    user_name: &str,
) -> Result<api::WebauthnChallenge> {
    let existing = security_keys(db, user_id).await?;
    if existing.len() as i64 >= MAX_KEYS_PER_USER {
        return Err(Error::Conflict {
            code: "webauthn_key_limit",
            message: format!("an account has at most {MAX_KEYS_PER_USER} security keys"),
        });
    }
    let user_uuid = Uuid::parse_str(user_id).map_err(|e| Error::Internal(e.into()))?;
    // Keys already registered are excluded, so one authenticator is not registered twice.
    let exclude = existing.iter().map(|k| k.cred_id().clone()).collect();
    let (options, state) = rp
        .webauthn
        .start_securitykey_registration(user_uuid, user_name, user_name, Some(exclude), None, None)
        .map_err(|e| Error::Internal(anyhow::anyhow!("starting a registration: {e}")))?;
    let state = serde_json::to_string(&state).map_err(|e| Error::Internal(e.into()))?;
    let ceremony_id = open_ceremony(db, user_id, "register", state).await?;
    Ok(api::WebauthnChallenge {
        ceremony_id,
        origin: rp.origin(),
        options: serde_json::to_value(options).map_err(|e| Error::Internal(e.into()))?,
    })
}

/// Checks the authenticator's answer to a registration and stores the new key. When it is the
/// account's first second factor, the account's earlier keys and sessions end (they did not
/// prove one) and new recovery codes are returned, shown once.
pub async fn finish_registration(
    db: &Db,
    secrets: &MasterKey,
    rp: &RelyingParty,
    user_id: &str,
    req: &api::WebauthnConfirm,
) -> Result<api::WebauthnRegistered> {
    let name = req.name.as_deref().unwrap_or("security-key");
    if !api::is_valid_name(name) {
        return Err(Error::invalid(
            "name: 1 to 63 letters, digits, -, _ or ., starting with a letter or digit",
        ));
    }
    let (ceremony_id, credential) = (&req.ceremony_id, &req.credential);
    let credential: RegisterPublicKeyCredential = serde_json::from_value(credential.clone())
        .map_err(|_| invalid_credential("registration"))?;
    let state = take_ceremony(db, user_id, "register", ceremony_id)
        .await?
        .ok_or(Error::NotFound {
            what: "WebAuthn ceremony",
        })?;
    let state: SecurityKeyRegistration =
        serde_json::from_str(&state).map_err(|e| Error::Internal(e.into()))?;
    let key = rp
        .webauthn
        .finish_securitykey_registration(&credential, &state)
        .map_err(|e| Error::Unauthorized {
            code: "webauthn_refused",
            message: format!("the security key's registration was refused: {e}"),
        })?;
    let id = new_id();
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let totp: i64 = sqlx::query("SELECT totp_confirmed FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?
        .get("totp_confirmed");
    let others: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM webauthn_credentials WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?
            .get("n");
    let inserted = sqlx::query(
        "INSERT INTO webauthn_credentials (id, user_id, credential_id, name, security_key, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (credential_id) DO NOTHING",
    )
    .bind(&id)
    .bind(user_id)
    .bind(credential_id_text(&key))
    .bind(name)
    .bind(serde_json::to_string(&key).map_err(|e| Error::Internal(e.into()))?)
    .bind(now())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict {
            code: "webauthn_key_exists",
            message: "this security key is already registered".into(),
        });
    }
    let mut recovery_codes = Vec::new();
    if totp == 0 && others == 0 {
        recovery_codes = identity::replace_recovery_codes(&mut tx, secrets, user_id).await?;
        // Credentials made before the second factor existed did not prove it: end them.
        identity::revoke_all_keys(&mut tx, user_id).await?;
    }
    tx.commit().await?;
    Ok(api::WebauthnRegistered {
        id,
        name: name.to_string(),
        recovery_codes,
    })
}

/// Starts an authentication with the account's security keys.
pub async fn begin_authentication(
    db: &Db,
    rp: &RelyingParty,
    user_id: &str,
) -> Result<api::WebauthnChallenge> {
    let keys = security_keys(db, user_id).await?;
    if keys.is_empty() {
        return Err(Error::Conflict {
            code: "webauthn_not_enrolled",
            message: "this account has no security key".into(),
        });
    }
    let (options, state) = rp
        .webauthn
        .start_securitykey_authentication(&keys)
        .map_err(|e| Error::Internal(anyhow::anyhow!("starting an authentication: {e}")))?;
    let state = serde_json::to_string(&state).map_err(|e| Error::Internal(e.into()))?;
    let ceremony_id = open_ceremony(db, user_id, "authenticate", state).await?;
    Ok(api::WebauthnChallenge {
        ceremony_id,
        origin: rp.origin(),
        options: serde_json::to_value(options).map_err(|e| Error::Internal(e.into()))?,
    })
}

/// Checks a security key's answer to one of the account's open challenges, and stores the
/// key's new signature counter. `false` for any wrong answer: an unknown, used or expired
/// ceremony, another account's, a bad signature, a wrong origin, a counter gone backwards.
pub async fn check_assertion(
    db: &Db,
    rp: &RelyingParty,
    user_id: &str,
    assertion: &api::WebauthnAssertion,
) -> Result<bool> {
    let Ok(credential) =
        serde_json::from_value::<PublicKeyCredential>(assertion.credential.clone())
    else {
        return Err(invalid_credential("assertion"));
    };
    let Some(state) = take_ceremony(db, user_id, "authenticate", &assertion.ceremony_id).await?
    else {
        return Ok(false);
    };
    let state: SecurityKeyAuthentication =
        serde_json::from_str(&state).map_err(|e| Error::Internal(e.into()))?;
    let result = match rp
        .webauthn
        .finish_securitykey_authentication(&credential, &state)
    {
        Ok(result) => result,
        Err(e) => {
            tracing::info!(user_id, error = %e, "WebAuthn assertion refused");
            return Ok(false);
        }
    };
    for mut key in security_keys(db, user_id).await? {
        if key.update_credential(&result) == Some(true) {
            sqlx::query(
                "UPDATE webauthn_credentials SET security_key = $2, last_used_at = $3 \
                 WHERE user_id = $1 AND credential_id = $4",
            )
            .bind(user_id)
            .bind(serde_json::to_string(&key).map_err(|e| Error::Internal(e.into()))?)
            .bind(now())
            .bind(credential_id_text(&key))
            .execute(&db.pool)
            .await?;
        }
    }
    Ok(true)
}

/// Forgets ceremonies nobody answered in time.
pub async fn purge_ceremonies(db: &Db, now_unix: i64) -> Result<()> {
    sqlx::query("DELETE FROM webauthn_ceremonies WHERE expires_at < $1")
        .bind(now_unix)
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_must_be_https_with_a_host_name() {
        let ok = RelyingParty::new(&Url::parse("https://cloud.example.com:8443").unwrap()).unwrap();
        assert_eq!(ok.origin(), "https://cloud.example.com:8443");
        for bad in [
            "http://cloud.example.com",
            "https://127.0.0.1:8443",
            "https://[::1]:8443",
            "https://cloud.example.com/console",
        ] {
            assert!(
                RelyingParty::new(&Url::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }
}
