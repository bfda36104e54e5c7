//! Federation: login through a tenant's own OpenID Connect provider (authorization code flow
//! with PKCE, RFC 7636), for command-line clients in the manner of RFC 8252.
//!
//! 1. `start`: the client makes a key pair and listens on a loopback port; the controller
//!    records a login (state, nonce, PKCE verifier, the client's redirect URI and public key,
//!    10 minutes) and answers with the provider's authorization URL.
//! 2. The user's browser logs in at the provider and is sent back to the client's loopback
//!    port with a code: only the machine that started the login receives it.
//! 3. `finish`: the client hands the code and state back; the controller spends the login
//!    (once), redeems the code with the verifier, checks the ID token (signature from the
//!    provider's JWKS, issuer, audience, expiry, nonce), maps its claims to a role and tenant
//!    groups, and registers the client's public key as a session of the federated user.
//!
//! A federated user is identified by (issuer, subject), never by a name or e-mail address the
//! provider could give to someone else later; it has no password.

use std::collections::BTreeMap;

use base64::Engine;
use palisade_common::api;
use sha2::Digest;
use sqlx::Row;

use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};
use crate::service::outbound::{self, OutboundPolicy};
use crate::service::secrets::MasterKey;

const LOGIN_TTL_SECS: i64 = 600;
const MAX_PENDING_LOGINS: i64 = 10_000;

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    b64(&bytes)
}

fn invalid(code: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        code,
        message: message.into(),
    }
}

/// What a provider publishes at `/.well-known/openid-configuration` (the parts used here).
#[derive(Debug, serde::Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

async fn discover(issuer: &str, policy: OutboundPolicy) -> anyhow::Result<Discovery> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let response = outbound::get(&url, policy).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "discovery answered {}",
        response.status()
    );
    let discovery: Discovery = response.json().await?;
    // OpenID Connect Discovery 1.0 §4.3: the issuer must be exactly the one asked for.
    anyhow::ensure!(
        discovery.issuer.trim_end_matches('/') == issuer.trim_end_matches('/'),
        "the provider calls itself {}, not {issuer}",
        discovery.issuer
    );
    Ok(discovery)
}

/// Validates and stores a tenant's provider; discovery must work now.
pub async fn configure(
    db: &Db,
    secrets: &MasterKey,
    policy: OutboundPolicy,
    tenant_id: &str,
    req: &api::OidcConfig,
) -> Result<()> {
    for role in req
        .role_map
        .values()
        .chain(std::iter::once(&req.default_role))
    {
        if !api::TENANT_ROLES.contains(&role.as_str()) {
            return Err(invalid(
                "invalid_role",
                format!(
                    "roles must be tenant roles: {}",
                    api::TENANT_ROLES.join(", ")
                ),
            ));
        }
    }
    if req.client_id.is_empty() || req.client_id.len() > 255 || req.groups_claim.is_empty() {
        return Err(Error::invalid(
            "client_id and groups_claim must be 1-255 characters",
        ));
    }
    discover(&req.issuer, policy).await.map_err(|e| {
        invalid(
            "oidc_unreachable",
            format!("OpenID Connect discovery: {e:#}"),
        )
    })?;
    let sealed = req
        .client_secret
        .as_ref()
        .map(|s| secrets.seal(&client_secret_purpose(tenant_id), s.as_bytes()));
    sqlx::query(
        "INSERT INTO tenant_oidc (tenant_id, issuer, client_id, client_secret, groups_claim, \
         role_map, default_role, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tenant_id) DO UPDATE SET issuer = $2, client_id = $3, \
         client_secret = $4, groups_claim = $5, role_map = $6, default_role = $7, updated_at = $8",
    )
    .bind(tenant_id)
    .bind(req.issuer.trim_end_matches('/'))
    .bind(&req.client_id)
    .bind(sealed)
    .bind(&req.groups_claim)
    .bind(serde_json::to_string(&req.role_map).map_err(|e| Error::Internal(e.into()))?)
    .bind(&req.default_role)
    .bind(now())
    .execute(&db.pool)
    .await?;
    Ok(())
}

fn client_secret_purpose(tenant_id: &str) -> String {
    format!("oidc-client-secret:{tenant_id}")
}

struct Provider {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    groups_claim: String,
    role_map: BTreeMap<String, String>,
    default_role: String,
}

async fn provider(db: &Db, secrets: &MasterKey, tenant_id: &str) -> Result<Provider> {
    let row = sqlx::query("SELECT * FROM tenant_oidc WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound {
            what: "identity provider",
        })?;
    let client_secret = match row.get::<Option<String>, _>("client_secret") {
        Some(sealed) => {
            let bytes = secrets
                .open(&client_secret_purpose(tenant_id), &sealed)
                .map_err(Error::Internal)?;
            Some(String::from_utf8_lossy(&bytes).to_string())
        }
        None => None,
    };
    Ok(Provider {
        issuer: row.get("issuer"),
        client_id: row.get("client_id"),
        client_secret,
        groups_claim: row.get("groups_claim"),
        role_map: serde_json::from_str(row.get::<&str, _>("role_map")).unwrap_or_default(),
        default_role: row.get("default_role"),
    })
}

/// A redirect URI a command-line client may use: loopback HTTP (RFC 8252 §7.3) only.
fn check_redirect(uri: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(uri)
        .map_err(|_| invalid("invalid_redirect", "redirect_uri is not a URL"))?;
    let loopback = matches!(parsed.host_str(), Some("127.0.0.1") | Some("[::1]"));
    if parsed.scheme() != "http" || !loopback {
        return Err(invalid(
            "invalid_redirect",
            "redirect_uri must be http://127.0.0.1[:port]/... or http://[::1][:port]/...",
        ));
    }
    Ok(())
}

/// Starts a login: records it and returns the provider's authorization URL.
pub async fn start(
    db: &Db,
    secrets: &MasterKey,
    policy: OutboundPolicy,
    tenant_id: &str,
    req: &api::OidcStart,
) -> Result<api::OidcStarted> {
    check_redirect(&req.redirect_uri)?;
    palisade_common::signing::parse_public_key(&req.public_key)
        .ok_or_else(|| Error::invalid("public_key must be base64 of a 32-byte Ed25519 key"))?;
    let provider = provider(db, secrets, tenant_id).await?;
    let discovery = discover(&provider.issuer, policy)
        .await
        .map_err(|e| Error::Unavailable {
            code: "oidc_unreachable",
            message: format!("the identity provider: {e:#}"),
        })?;
    // Expired logins go first; a flood of starts cannot grow the table without bound.
    sqlx::query("DELETE FROM oidc_logins WHERE expires_at < $1")
        .bind(unix_now())
        .execute(&db.pool)
        .await?;
    let pending = sqlx::query("SELECT COUNT(*) AS n FROM oidc_logins")
        .fetch_one(&db.pool)
        .await?
        .get::<i64, _>("n");
    if pending >= MAX_PENDING_LOGINS {
        return Err(Error::Unavailable {
            code: "too_many_logins",
            message: "too many logins under way; try again in a few minutes".into(),
        });
    }
    let (id, state, nonce, verifier) = (new_id(), random_token(), random_token(), random_token());
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    sqlx::query(
        "INSERT INTO oidc_logins (id, tenant_id, state, nonce, verifier, redirect_uri, \
         public_key, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(tenant_id)
    .bind(&state)
    .bind(&nonce)
    .bind(&verifier)
    .bind(&req.redirect_uri)
    .bind(&req.public_key)
    .bind(unix_now() + LOGIN_TTL_SECS)
    .execute(&db.pool)
    .await?;
    let mut url = reqwest::Url::parse(&discovery.authorization_endpoint)
        .map_err(|e| Error::Internal(e.into()))?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &provider.client_id)
        .append_pair("redirect_uri", &req.redirect_uri)
        .append_pair(
            "scope",
            &format!("openid email profile {}", provider.groups_claim),
        )
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    Ok(api::OidcStarted {
        login_id: id,
        authorization_url: url.to_string(),
    })
}

/// What a finished login established.
pub struct Federated {
    pub user_id: String,
    pub tenant_id: String,
    pub public_key: String,
    /// The provider says a second factor was used (`amr` contains mfa, otp, hwk or swk).
    pub mfa: bool,
}

#[derive(Debug, serde::Deserialize)]
struct TokenResponse {
    id_token: String,
}

/// Finishes a login: spends it, redeems the code, checks the ID token, provisions the user.
pub async fn finish(
    db: &Db,
    secrets: &MasterKey,
    policy: OutboundPolicy,
    req: &api::OidcFinish,
) -> Result<Federated> {
    let refused = |why: &str| {
        tracing::warn!(reason = why, "federated login refused");
        Error::Unauthorized {
            code: "oidc_refused",
            message: "the login could not be completed; start again".into(),
        }
    };
    // Spent at once, whatever follows: a login finishes once.
    let row = sqlx::query("DELETE FROM oidc_logins WHERE id = $1 RETURNING *")
        .bind(&req.login_id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or_else(|| refused("unknown or spent login"))?;
    if row.get::<i64, _>("expires_at") < unix_now() {
        return Err(refused("login expired"));
    }
    let state: String = row.get("state");
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        state.as_bytes(),
        req.state.as_bytes(),
    )) {
        return Err(refused("state mismatch"));
    }
    let tenant_id: String = row.get("tenant_id");
    let provider = provider(db, secrets, &tenant_id).await?;
    let discovery = discover(&provider.issuer, policy)
        .await
        .map_err(|e| Error::Unavailable {
            code: "oidc_unreachable",
            message: format!("the identity provider: {e:#}"),
        })?;

    let mut form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", req.code.clone()),
        ("redirect_uri", row.get::<String, _>("redirect_uri")),
        ("client_id", provider.client_id.clone()),
        ("code_verifier", row.get::<String, _>("verifier")),
    ];
    if let Some(secret) = &provider.client_secret {
        form.push(("client_secret", secret.clone()));
    }
    let body = serde_urlencoded::to_string(&form).map_err(|e| Error::Internal(e.into()))?;
    let checked = outbound::check(&discovery.token_endpoint, policy)
        .await
        .map_err(|e| Error::Unavailable {
            code: "oidc_unreachable",
            message: format!("the token endpoint: {e:#}"),
        })?;
    let response = outbound::client_for(&checked)
        .map_err(Error::Internal)?
        .post(checked.url.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|_| refused("token endpoint unreachable"))?;
    if !response.status().is_success() {
        return Err(refused("the provider refused the code"));
    }
    let tokens: TokenResponse = response
        .json()
        .await
        .map_err(|_| refused("token response"))?;
    let claims = verify_id_token(&tokens.id_token, &provider, &discovery, policy).await?;
    let nonce: String = row.get("nonce");
    if claims.get("nonce").and_then(|n| n.as_str()) != Some(nonce.as_str()) {
        return Err(refused("nonce mismatch"));
    }
    let subject = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| refused("no subject"))?;
    let groups: Vec<String> = claims
        .get(&provider.groups_claim)
        .and_then(|g| g.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mfa = claims
        .get("amr")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|m| matches!(m.as_str(), Some("mfa" | "otp" | "hwk" | "swk")))
        });
    let role = provider
        .role_map
        .iter()
        .filter(|(group, _)| groups.contains(group))
        .map(|(_, role)| role.clone())
        .max_by_key(|role| role_rank(role))
        .unwrap_or(provider.default_role.clone());
    let user_id = provision(db, &tenant_id, &provider.issuer, subject, &role, &groups).await?;
    Ok(Federated {
        user_id,
        tenant_id,
        public_key: row.get("public_key"),
        mfa,
    })
}

fn role_rank(role: &str) -> u8 {
    match role {
        "tenant_admin" => 3,
        "member" => 2,
        _ => 1,
    }
}

async fn verify_id_token(
    token: &str,
    provider: &Provider,
    discovery: &Discovery,
    policy: OutboundPolicy,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let refused = |why: String| {
        tracing::warn!(reason = %why, "ID token refused");
        Error::Unauthorized {
            code: "oidc_refused",
            message: "the identity provider's token did not verify".into(),
        }
    };
    let header = jsonwebtoken::decode_header(token).map_err(|e| refused(format!("header: {e}")))?;
    // Asymmetric signatures only: never `none`, never a shared-secret HMAC.
    let allowed = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    if !allowed.contains(&header.alg) {
        return Err(refused(format!("algorithm {:?}", header.alg)));
    }
    let response = outbound::get(&discovery.jwks_uri, policy)
        .await
        .map_err(|e| refused(format!("JWKS: {e:#}")))?;
    let jwks: jsonwebtoken::jwk::JwkSet = response
        .json()
        .await
        .map_err(|e| refused(format!("JWKS: {e}")))?;
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid),
        None if jwks.keys.len() == 1 => jwks.keys.first(),
        None => None,
    }
    .ok_or_else(|| refused("no matching key".into()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| refused(format!("key: {e}")))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[provider.issuer.as_str()]);
    validation.set_audience(&[provider.client_id.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = 60;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &key,
        &validation,
    )
    .map_err(|e| refused(format!("{e}")))?;
    Ok(data.claims)
}

/// Creates or updates the federated user: role from the claims, membership of exactly the
/// tenant groups named by the claims. A role change ends the user's earlier sessions.
async fn provision(
    db: &Db,
    tenant_id: &str,
    issuer: &str,
    subject: &str,
    role: &str,
    groups: &[String],
) -> Result<String> {
    let federated = format!("{issuer}|{subject}");
    let existing = sqlx::query(
        "SELECT id, role, disabled_at FROM users WHERE tenant_id = $1 AND federated_subject = $2",
    )
    .bind(tenant_id)
    .bind(&federated)
    .fetch_optional(&db.pool)
    .await?;
    let mut tx = db.pool.begin().await?;
    let user_id = match existing {
        Some(row) => {
            if row.get::<Option<String>, _>("disabled_at").is_some() {
                return Err(Error::LoginRefused {
                    locked: false,
                    new_lock: None,
                    account: None,
                });
            }
            let id: String = row.get("id");
            if row.get::<String, _>("role") != role {
                sqlx::query("UPDATE users SET role = $2 WHERE id = $1")
                    .bind(&id)
                    .bind(role)
                    .execute(&mut *tx)
                    .await?;
                crate::service::identity::revoke_all_keys(&mut tx, &id).await?;
            }
            id
        }
        None => {
            let id = new_id();
            let digest = hex::encode(sha2::Sha256::digest(federated.as_bytes()));
            sqlx::query(
                "INSERT INTO users (id, name, tenant_id, role, password_hash, \
                 must_change_password, created_at, password_changed_at, federated_subject) \
                 VALUES ($1, $2, $3, $4, 'federated: no password', 0, $5, $6, $7)",
            )
            .bind(&id)
            .bind(format!("fed-{}", &digest[..24]))
            .bind(tenant_id)
            .bind(role)
            .bind(now())
            .bind(unix_now())
            .bind(&federated)
            .execute(&mut *tx)
            .await?;
            id
        }
    };
    sqlx::query("DELETE FROM group_members WHERE user_id = $1")
        .bind(&user_id)
        .execute(&mut *tx)
        .await?;
    for group in groups {
        sqlx::query(
            "INSERT INTO group_members (group_id, user_id) SELECT id, $3 FROM groups \
             WHERE tenant_id = $1 AND name = $2 ON CONFLICT DO NOTHING",
        )
        .bind(tenant_id)
        .bind(group)
        .bind(&user_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_redirects_are_accepted() {
        for ok in ["http://127.0.0.1:4321/callback", "http://[::1]:80/cb"] {
            assert!(check_redirect(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://127.0.0.1:4321/callback",
            "http://localhost:4321/callback",
            "http://evil.example:4321/callback",
            "http://127.0.0.1.evil.example:4321/",
            "javascript:alert(1)",
            "",
        ] {
            assert!(check_redirect(bad).is_err(), "{bad}");
        }
    }
}
