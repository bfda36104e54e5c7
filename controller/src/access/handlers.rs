//! HTTP handlers: parse, name the action, check access, `permit` (audit), then call the service.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use palisade_common::api;
use serde::de::DeserializeOwned;

use super::guard::RequestCtx;
use crate::access::authz::Resource;
use crate::access::server::{loggable_id, text_digest};
use crate::error::{Error, Result};
use crate::service::accounts;
use crate::service::identity::{self, Principal};
use crate::service::retention;
use crate::service::webauthn;
use crate::Controller;

pub(crate) type Ctl = State<Arc<Controller>>;

/// Parses a JSON body strictly: unknown fields and wrong types are a 400 naming the problem.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid {
        code: "invalid_request",
        message: format!(
            "request body: {} (line {}, column {})",
            safe_parse_message(&e.to_string()),
            e.line(),
            e.column()
        ),
    })
}

/// Parses a query string strictly, like bodies.
pub(crate) fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| Error::invalid(format!("query: {}", safe_parse_message(&e.to_string()))))
}

/// A parser's complaint, without the values it quotes: a secret sent in the wrong place (a
/// password with the wrong type, a code in an unknown field) must not come back in an error
/// or land in a log. Field names the API defines are kept; anything else is described only.
fn safe_parse_message(message: &str) -> String {
    let identifier = |s: &str| {
        !s.is_empty()
            && s.len() <= 40
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
    };
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    if let Some(field) = quoted("missing field `") {
        if identifier(&field) {
            return format!("missing field `{field}`");
        }
    }
    if let Some(field) = quoted("unknown field `") {
        return if identifier(&field) {
            format!("unknown field `{field}`")
        } else {
            "an unknown field".into()
        };
    }
    if let Some(field) = quoted("duplicate field `") {
        if identifier(&field) {
            return format!("field `{field}` given twice");
        }
    }
    let kind = if message.starts_with("invalid type") {
        "a value of the wrong type"
    } else if message.starts_with("invalid value") || message.starts_with("invalid length") {
        "a value out of range"
    } else if message.starts_with("EOF") {
        "the body ends too early"
    } else {
        "malformed JSON or query syntax"
    };
    kind.to_string()
}

/// A tenant named by an unauthenticated caller: kept when it is a valid name, else a digest.
fn named_tenant_text(name: &str) -> String {
    if api::is_valid_name(name) {
        format!("tenant-name/{name}")
    } else {
        format!("tenant-name/{}", text_digest(name))
    }
}

/// How the audit log names an account that a password route was asked about, before the
/// password proves who it is: a digest, not the text, because people type passwords into the
/// user-name field, and an unknown name must not land in the log as typed.
fn named_account(name: &str) -> String {
    format!("user-name/{}", text_digest(name))
}

fn principal(ctx: &RequestCtx) -> Result<&Principal> {
    ctx.principal.as_ref().ok_or(Error::Unauthorized {
        code: "signature_missing",
        message: "request is not signed".into(),
    })
}

/// Ids are UUIDs in any spelling the uuid crate accepts; returns the canonical (lower-case,
/// hyphenated) form the database holds. Anything else cannot name an object: not found.
pub(crate) fn canonical_id(id: &str, what: &'static str) -> Result<String> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| Error::NotFound { what })
}

/// [`own_scope`] of the request's caller.
pub(crate) async fn own_scope_of(c: &Controller, ctx: &RequestCtx) -> Result<Resource> {
    own_scope(c, principal(ctx)?).await
}

/// The collection a caller's "Platform,Tenant" action is on: its own tenant, or the platform.
async fn own_scope(c: &Controller, p: &Principal) -> Result<Resource> {
    Ok(match &p.tenant_id {
        Some(id) => {
            let tenant = accounts::get_tenant(&c.db, id).await?;
            Resource::Tenant {
                id: tenant.id,
                name: tenant.name,
            }
        }
        None => Resource::Platform,
    })
}

// ---- password-authenticated routes ----

/// The password (and, for MFA-bound accounts, second factor) of a human caller.
struct Human<'a> {
    user: &'a str,
    password: &'a str,
    factor: identity::Factor<'a>,
}

fn factor<'a>(
    totp_code: &'a Option<String>,
    recovery_code: &'a Option<String>,
    webauthn: &'a Option<api::WebauthnAssertion>,
) -> identity::Factor<'a> {
    identity::Factor {
        totp_code: totp_code.as_deref(),
        recovery_code: recovery_code.as_deref(),
        webauthn: webauthn.as_ref(),
    }
}

/// Checks a human's credentials for making a key or session. Returns the user and whether a
/// second factor was proven.
async fn authenticate_human(
    c: &Controller,
    ctx: &RequestCtx,
    human: Human<'_>,
) -> Result<(identity::VerifiedUser, bool)> {
    let user = verify_current_password(c, ctx, human.user, human.password).await?;
    let mfa = identity::mfa_state(&c.db, &user.id).await?;
    if mfa.bound && !mfa.enrolled {
        return Err(Error::Forbidden {
            code: "mfa_enrolment_required",
            message: "this account needs a second factor: enrol TOTP first \
                      (POST /v1/auth/mfa/totp); security keys can be added afterwards"
                .into(),
        });
    }
    if mfa.bound || human.factor.given() {
        identity::check_second_factor(c.factor_check(), &user.id, human.factor).await?;
        identity::clear_failures(&c.db, &user.id).await?;
        super::guard::note_source(c, ctx, &user.id, user.tenant_id.as_deref()).await;
        return Ok((user, true));
    }
    identity::clear_failures(&c.db, &user.id).await?;
    super::guard::note_source(c, ctx, &user.id, user.tenant_id.as_deref()).await;
    Ok((user, false))
}

/// Checks the password of a password route other than the password change itself. An initial
/// password, or one past its maximum age, can do nothing but change itself.
async fn verify_current_password(
    c: &Controller,
    ctx: &RequestCtx,
    user: &str,
    password: &str,
) -> Result<identity::VerifiedUser> {
    let user = identity::verify_password(&c.db, c.lockout, user, password).await?;
    ctx.set_subject(&user.id, user.tenant_id.clone());
    if user.must_change_password || password_expired(c, &user.id).await? {
        return Err(password_change_required());
    }
    Ok(user)
}

fn password_change_required() -> Error {
    Error::Forbidden {
        code: "password_change_required",
        message: "change the password first (initial, or older than the maximum age)".into(),
    }
}

async fn password_expired(c: &Controller, user_id: &str) -> Result<bool> {
    let (_, max_age) = identity::password_rules(&c.db, &c.rules, user_id).await?;
    if max_age == 0 {
        return Ok(false);
    }
    let changed = identity::password_changed_at(&c.db, user_id).await?;
    Ok(time::OffsetDateTime::now_utc().unix_timestamp() - changed > i64::from(max_age) * 86_400)
}

pub async fn change_password(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<StatusCode> {
    let req: api::PasswordChange = parse(&body)?;
    ctx.describe("auth.password_change", named_account(&req.user));
    let user =
        identity::verify_password(&c.db, c.lockout, &req.user, &req.current_password).await?;
    ctx.set_subject(&user.id, user.tenant_id.clone());
    // Once a second factor is enrolled, the password alone cannot change the password (and
    // with it end every session of the account).
    if identity::mfa_state(&c.db, &user.id).await?.enrolled {
        let factor = factor(&req.totp_code, &req.recovery_code, &req.webauthn);
        identity::check_second_factor(c.factor_check(), &user.id, factor).await?;
    }
    identity::clear_failures(&c.db, &user.id).await?;
    let (min_length, _) = identity::password_rules(&c.db, &c.rules, &user.id).await?;
    identity::check_new_password(&req.user, &req.new_password, min_length)?;
    identity::check_not_reused(&c.db, &user.id, &req.new_password).await?;
    ctx.permit().await?;
    identity::set_password(&c.db, &user.id, &req.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn create_key(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::KeyCreate = parse(&body)?;
    ctx.describe("key.create", named_account(&req.user));
    let human = Human {
        user: &req.user,
        password: &req.password,
        factor: factor(&req.totp_code, &req.recovery_code, &req.webauthn),
    };
    let (user, mfa) = authenticate_human(&c, &ctx, human).await?;
    let kind = identity::KeyKind::Api {
        expires_in_days: req.expires_in_days,
    };
    let new_key = identity::prepare_key(
        &c.rules,
        &user.id,
        &req.public_key,
        req.name.as_deref(),
        kind,
    )?;
    ctx.describe("key.create", format!("key/{}", new_key.id));
    ctx.permit().await?;
    let key = identity::insert_key(&c.db, new_key, mfa).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

/// A human login: registers a short-lived session key (idle and absolute timeouts).
pub async fn login(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::Login = parse(&body)?;
    ctx.describe("auth.login", named_account(&req.user));
    let human = Human {
        user: &req.user,
        password: &req.password,
        factor: factor(&req.totp_code, &req.recovery_code, &req.webauthn),
    };
    let (user, mfa) = authenticate_human(&c, &ctx, human).await?;
    let session = identity::prepare_key(
        &c.rules,
        &user.id,
        &req.public_key,
        Some("session"),
        identity::KeyKind::Session,
    )?;
    ctx.describe("auth.login", format!("key/{}", session.id));
    ctx.permit().await?;
    let key = identity::insert_key(&c.db, session, mfa).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

pub async fn totp_enrol(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::TotpEnrol = parse(&body)?;
    ctx.describe("mfa.enrol", named_account(&req.user));
    let user = verify_current_password(&c, &ctx, &req.user, &req.password).await?;
    identity::clear_failures(&c.db, &user.id).await?;
    ctx.permit().await?;
    let enrolment = identity::begin_totp(&c.db, &c.secrets, &user.id, &req.user).await?;
    Ok((StatusCode::CREATED, Json(enrolment)).into_response())
}

pub async fn totp_confirm(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::TotpConfirm = parse(&body)?;
    ctx.describe("mfa.confirm", named_account(&req.user));
    let user = verify_current_password(&c, &ctx, &req.user, &req.password).await?;
    ctx.permit().await?;
    let codes = identity::confirm_totp(&c.db, &c.secrets, c.lockout, &user.id, &req.code).await?;
    Ok((StatusCode::CREATED, Json(codes)).into_response())
}

/// A WebAuthn challenge for a password login's second factor.
pub async fn webauthn_challenge(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::WebauthnChallengeRequest = parse(&body)?;
    ctx.describe("mfa.webauthn_challenge", named_account(&req.user));
    let user = verify_current_password(&c, &ctx, &req.user, &req.password).await?;
    ctx.permit().await?;
    let challenge = webauthn::begin_authentication(&c.db, &c.relying_party, &user.id).await?;
    Ok((StatusCode::CREATED, Json(challenge)).into_response())
}

/// Starts a federated login (see `service::federation`).
pub async fn oidc_start(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::OidcStart = parse(&body)?;
    ctx.describe("auth.oidc_start", named_tenant_text(&req.tenant));
    // An unknown or disabled tenant and one without a provider look the same.
    let no_provider = Error::NotFound {
        what: "identity provider",
    };
    let tenant = accounts::tenant_by_name(&c.db, &req.tenant)
        .await?
        .filter(|t| !t.disabled)
        .ok_or(no_provider)?;
    ctx.set_tenant(&tenant.id);
    ctx.permit().await?;
    let started = crate::service::federation::start(
        &c.db,
        &c.secrets,
        c.alerts.outbound_policy(),
        &tenant.id,
        &req,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(started)).into_response())
}

/// Finishes a federated login: the session key of the federated user.
pub async fn oidc_finish(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::OidcFinish = parse(&body)?;
    ctx.describe("auth.oidc_finish", "login");
    let federated =
        crate::service::federation::finish(&c.db, &c.secrets, c.alerts.outbound_policy(), &req)
            .await?;
    ctx.set_subject(&federated.user_id, Some(federated.tenant_id.clone()));
    let tenant = accounts::get_tenant(&c.db, &federated.tenant_id).await?;
    if tenant.disabled {
        return Err(Error::LoginRefused {
            locked: false,
            new_lock: None,
            account: None,
        });
    }
    let session = identity::prepare_key(
        &c.rules,
        &federated.user_id,
        &federated.public_key,
        Some("oidc"),
        identity::KeyKind::Session,
    )?;
    ctx.describe("auth.oidc_finish", format!("key/{}", session.id));
    ctx.permit().await?;
    let key = identity::insert_key(&c.db, session, federated.mfa).await?;
    super::guard::note_source(
        &c,
        &ctx,
        &federated.user_id,
        Some(federated.tenant_id.as_str()),
    )
    .await;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

// ---- the caller's own account ----

pub async fn whoami(State(c): Ctl, ctx: RequestCtx) -> Result<Json<api::Whoami>> {
    ctx.authorize("user.whoami", &Resource::Caller).await?;
    let p = principal(&ctx)?;
    ctx.permit().await?;
    Ok(Json(api::Whoami {
        user: accounts::get_user(&c.db, &p.user_id).await?,
        key_id: p.key_id.clone(),
    }))
}

/// A fresh second-factor proof for the signing key (administrative actions need one).
pub async fn mfa_verify(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<StatusCode> {
    ctx.authorize("mfa.verify", &Resource::Caller).await?;
    let p = principal(&ctx)?;
    let req: api::MfaVerify = parse(&body)?;
    ctx.permit().await?;
    let factor = factor(&req.totp_code, &req.recovery_code, &req.webauthn);
    identity::check_second_factor(c.factor_check(), &p.user_id, factor).await?;
    identity::mark_mfa_fresh(&c.db, &p.key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts registering a security key for the signing key's account. Once the account is bound
/// to a second factor, adding one needs a fresh proof of it, so a stolen key alone cannot add
/// a factor of its own.
pub async fn webauthn_register(State(c): Ctl, ctx: RequestCtx) -> Result<Response> {
    ctx.authorize("mfa.webauthn_register", &Resource::Caller)
        .await?;
    let p = principal(&ctx)?;
    if p.mfa_bound && !p.mfa_fresh {
        return Err(Error::Forbidden {
            code: "mfa_required",
            message: "adding a security key needs a fresh second-factor proof \
                      (POST /v1/auth/mfa/verify)"
                .into(),
        });
    }
    let user = accounts::get_user(&c.db, &p.user_id).await?;
    ctx.permit().await?;
    let challenge =
        webauthn::begin_registration(&c.db, &c.relying_party, &user.id, &user.name).await?;
    Ok((StatusCode::CREATED, Json(challenge)).into_response())
}

/// Finishes registering a security key with the authenticator's answer.
pub async fn webauthn_confirm(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.authorize("mfa.webauthn_confirm", &Resource::Caller)
        .await?;
    let p = principal(&ctx)?;
    let req: api::WebauthnConfirm = parse(&body)?;
    ctx.permit().await?;
    let registered =
        webauthn::finish_registration(&c.db, &c.secrets, &c.relying_party, &p.user_id, &req)
            .await?;
    Ok((StatusCode::CREATED, Json(registered)).into_response())
}

/// A WebAuthn challenge for the signing key's account, to answer in `mfa verify`.
pub async fn mfa_verify_challenge(State(c): Ctl, ctx: RequestCtx) -> Result<Response> {
    ctx.authorize("mfa.verify_challenge", &Resource::Caller)
        .await?;
    let p = principal(&ctx)?;
    ctx.permit().await?;
    let challenge = webauthn::begin_authentication(&c.db, &c.relying_party, &p.user_id).await?;
    Ok((StatusCode::CREATED, Json(challenge)).into_response())
}

pub async fn list_keys(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::ApiKey>>> {
    ctx.authorize("key.list", &Resource::Caller).await?;
    let p = principal(&ctx)?;
    ctx.permit().await?;
    Ok(Json(identity::list_keys(&c.db, &p.user_id).await?))
}

/// Revokes one of the caller's own keys or sessions (possibly the one signing this request).
pub async fn revoke_key(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    ctx.authorize("key.revoke", &Resource::Caller).await?;
    ctx.describe("key.revoke", format!("key/{}", loggable_id(&id)));
    let p = principal(&ctx)?;
    identity::own_key(&c.db, &p.user_id, &id).await?;
    ctx.permit().await?;
    identity::revoke_key(&c.db, &p.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces one of the caller's API keys with a new public key.
pub async fn rotate_key(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    ctx.authorize("key.rotate", &Resource::Caller).await?;
    ctx.describe("key.rotate", format!("key/{}", loggable_id(&id)));
    let p = principal(&ctx)?;
    let old = identity::own_key(&c.db, &p.user_id, &id).await?;
    let req: api::KeyRotate = parse(&body)?;
    if old.kind != "api" {
        return Err(Error::invalid(
            "only API keys rotate; log in again for a new session",
        ));
    }
    if req.overlap_secs > 86_400 {
        return Err(Error::invalid("overlap_secs must be at most 86400"));
    }
    // Only the key itself hands over to its successor: a session or another key of the same
    // user cannot turn into a long-lived key this way.
    if old.id != p.key_id {
        return Err(Error::Forbidden {
            code: "rotate_with_the_key_itself",
            message: "sign the rotation with the key being rotated".into(),
        });
    }
    let mut new = identity::prepare_key(
        &c.rules,
        &p.user_id,
        &req.public_key,
        Some(&old.name),
        identity::KeyKind::Api {
            expires_in_days: None,
        },
    )?;
    // Rotation changes the key, not its lifetime: the successor expires when the old key would
    // have. A longer life takes a new key, made with the password (and second factor).
    new.expires_at = old.expires_at.clone();
    ctx.permit().await?;
    let key = identity::rotate_key(&c.db, &old, new, req.overlap_secs).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

// ---- tenants ----

pub async fn create_tenant(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.authorize("tenant.create", &Resource::Platform).await?;
    let req: api::TenantCreate = parse(&body)?;
    accounts::check_tenant(&req)?;
    ctx.permit().await?;
    let tenant = accounts::create_tenant(&c.db, &req).await?;
    Ok((StatusCode::CREATED, Json(tenant)).into_response())
}

pub async fn list_tenants(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Tenant>>> {
    ctx.authorize("tenant.list", &Resource::Platform).await?;
    ctx.permit().await?;
    Ok(Json(accounts::list_tenants(&c.db).await?))
}

/// A tenant named in a query, as a resource (not found if it does not exist).
async fn named_tenant(c: &Controller, id: &str) -> Result<Resource> {
    let id = canonical_id(id, "tenant")?;
    let tenant = accounts::get_tenant(&c.db, &id).await?;
    Ok(Resource::Tenant {
        id: tenant.id,
        name: tenant.name,
    })
}

/// Resolves a tenant by id and asks whether the caller may do `action` on it.
async fn tenant_for(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    id: &str,
) -> Result<api::Tenant> {
    ctx.describe(action, format!("tenant/{}", loggable_id(id)));
    principal(ctx)?;
    let id = canonical_id(id, "tenant")?;
    let tenant = accounts::get_tenant(&c.db, &id).await?;
    ctx.authorize(
        action,
        &Resource::Tenant {
            id: tenant.id.clone(),
            name: tenant.name.clone(),
        },
    )
    .await?;
    Ok(tenant)
}

pub async fn show_tenant(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Tenant>> {
    let tenant = tenant_for(&c, &ctx, "tenant.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(tenant))
}

pub async fn tenant_settings(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<api::Tenant>> {
    let tenant = tenant_for(&c, &ctx, "tenant.settings", &id).await?;
    let settings: api::TenantSettings = parse(&body)?;
    accounts::check_settings(&settings, c.retention.minimum.as_secs())?;
    ctx.permit().await?;
    accounts::set_settings(&c.db, &tenant.id, &settings).await?;
    Ok(Json(accounts::get_tenant(&c.db, &tenant.id).await?))
}

/// Sets (or with `url: null` removes) the tenant's alert webhook; a new signing secret is made
/// and shown once.
pub async fn tenant_webhook(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<api::Webhook>> {
    let tenant = tenant_for(&c, &ctx, "tenant.webhook", &id).await?;
    let req: api::WebhookSet = parse(&body)?;
    let url = match &req.url {
        Some(url) => Some(
            crate::service::outbound::check_url(url, c.alerts.outbound_policy())
                .await
                .map_err(|e| Error::Invalid {
                    code: "webhook_invalid",
                    message: format!("{e}"),
                })?
                .to_string(),
        ),
        None => None,
    };
    ctx.permit().await?;
    let secret = url.as_ref().map(|_| identity::random_password());
    let sealed = secret.as_ref().map(|s| {
        c.secrets.seal(
            &crate::service::alerts::webhook_purpose(&tenant.id),
            s.as_bytes(),
        )
    });
    accounts::set_webhook(&c.db, &tenant.id, url.as_deref(), sealed.as_deref()).await?;
    Ok(Json(api::Webhook { url, secret }))
}

/// Sets the tenant's own OpenID Connect provider (discovery must answer now).
pub async fn tenant_oidc(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let tenant = tenant_for(&c, &ctx, "tenant.oidc", &id).await?;
    let req: api::OidcConfig = parse(&body)?;
    ctx.permit().await?;
    crate::service::federation::configure(
        &c.db,
        &c.secrets,
        c.alerts.outbound_policy(),
        &tenant.id,
        &req,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn disable_tenant(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    tenant_disabled(&c, &ctx, &id, true).await
}

pub async fn enable_tenant(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    tenant_disabled(&c, &ctx, &id, false).await
}

async fn tenant_disabled(
    c: &Controller,
    ctx: &RequestCtx,
    id: &str,
    disabled: bool,
) -> Result<StatusCode> {
    let action = if disabled {
        "tenant.disable"
    } else {
        "tenant.enable"
    };
    let tenant = tenant_for(c, ctx, action, id).await?;
    ctx.permit().await?;
    accounts::set_tenant_disabled(&c.db, &tenant.id, disabled).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_tenant(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let tenant = tenant_for(&c, &ctx, "tenant.delete", &id).await?;
    ctx.permit().await?;
    accounts::delete_tenant(&c.db, &tenant.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- users ----

pub async fn create_user(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("user.create", "user");
    let caller_tenant = principal(&ctx)?.tenant_id.clone();
    let mut req: api::UserCreate = parse(&body)?;
    // A tenant account names no tenant: it means its own.
    if req.tenant_id.is_none() {
        req.tenant_id = caller_tenant;
    }
    let scope = match &req.tenant_id {
        Some(id) => {
            let id = canonical_id(id, "tenant")?;
            let tenant = accounts::get_tenant(&c.db, &id).await?;
            Resource::Tenant {
                id: tenant.id,
                name: tenant.name,
            }
        }
        None => Resource::Platform,
    };
    ctx.authorize("user.create", &scope).await?;
    let role = accounts::check_user(&req)?;
    ctx.permit().await?;
    let created = accounts::create_user(&c.db, &req, &role).await?;
    if created.user.tenant_id.is_none() {
        platform_account_changed(
            &c,
            &ctx,
            &created.user.id,
            &format!("created with role {role}"),
        )
        .await;
    }
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Every new platform account and platform role change is a platform alert: separation of
/// duties rests on different people holding administration and audit, and whoever creates an
/// account learns its one-time password, so the security administrators see each such change.
async fn platform_account_changed(c: &Controller, ctx: &RequestCtx, user_id: &str, what: &str) {
    let by = ctx
        .principal
        .as_ref()
        .map(|p| p.user_id.clone())
        .unwrap_or_default();
    let alert = crate::service::alerts::Raise {
        tenant_id: None,
        user_id: Some(user_id),
        kind: "platform_account_change",
        detail: format!("{what} by user {by}"),
        source: &ctx.source,
        request_id: &ctx.request_id,
    };
    if let Err(e) = c.alerts.raise(alert, &c.secrets).await {
        tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "raising an alert");
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserQuery {
    tenant: Option<String>,
}

/// Users of the caller's tenant; for platform accounts, of `?tenant=` or the platform's own.
pub async fn list_users(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::User>>> {
    ctx.describe("user.list", "user");
    let p = principal(&ctx)?;
    let query: UserQuery = parse_query(query.as_deref())?;
    let scope = match (&query.tenant, &p.tenant_id) {
        (Some(id), _) => {
            let id = canonical_id(id, "tenant")?;
            let tenant = accounts::get_tenant(&c.db, &id).await?;
            Resource::Tenant {
                id: tenant.id,
                name: tenant.name,
            }
        }
        (None, _) => own_scope(&c, p).await?,
    };
    ctx.authorize("user.list", &scope).await?;
    ctx.permit().await?;
    let tenant = match &scope {
        Resource::Tenant { id, .. } => Some(id.as_str()),
        _ => None,
    };
    Ok(Json(accounts::list_users(&c.db, tenant).await?))
}

/// Resolves a user by id and asks whether the caller may do `action` on them.
async fn user_for(c: &Controller, ctx: &RequestCtx, action: &str, id: &str) -> Result<api::User> {
    ctx.describe(action, format!("user/{}", loggable_id(id)));
    principal(ctx)?;
    let id = canonical_id(id, "user")?;
    let user = accounts::get_user(&c.db, &id).await?;
    ctx.authorize(
        action,
        &Resource::User {
            id: user.id.clone(),
            tenant: user.tenant_id.clone().unwrap_or_default(),
            name: user.name.clone(),
            role: user.role.clone(),
        },
    )
    .await?;
    Ok(user)
}

pub async fn show_user(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::User>> {
    let user = user_for(&c, &ctx, "user.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(user))
}

pub async fn set_role(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let user = user_for(&c, &ctx, "user.set_role", &id).await?;
    let req: api::RoleSet = parse(&body)?;
    accounts::check_role(&req.role, user.tenant_id.as_deref())?;
    ctx.permit().await?;
    accounts::set_role(&c.db, &user, &req.role).await?;
    if user.tenant_id.is_none() && user.role != req.role {
        let what = format!("role changed from {} to {}", user.role, req.role);
        platform_account_changed(&c, &ctx, &user.id, &what).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn disable_user(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    user_disabled(&c, &ctx, &id, true).await
}

pub async fn enable_user(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    user_disabled(&c, &ctx, &id, false).await
}

async fn user_disabled(
    c: &Controller,
    ctx: &RequestCtx,
    id: &str,
    disabled: bool,
) -> Result<StatusCode> {
    let action = if disabled {
        "user.disable"
    } else {
        "user.enable"
    };
    let user = user_for(c, ctx, action, id).await?;
    let by_platform = principal(ctx)?.tenant_id.is_none();
    if !disabled && !by_platform {
        // Refused before the audit record says "allowed" (checked again when it is written).
        accounts::check_no_platform_hold(&c.db, &user.id).await?;
    }
    ctx.permit().await?;
    accounts::set_user_disabled(&c.db, &user, disabled, by_platform).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_user(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let user = user_for(&c, &ctx, "user.delete", &id).await?;
    ctx.permit().await?;
    accounts::delete_user(&c.db, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn reset_mfa(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let user = user_for(&c, &ctx, "user.reset_mfa", &id).await?;
    ctx.permit().await?;
    identity::reset_mfa(&c.db, &user.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- groups and policies (tenant accounts) ----

/// The caller's tenant as a resource; platform accounts have none here (404: nothing to see).
async fn caller_tenant(c: &Controller, ctx: &RequestCtx) -> Result<Resource> {
    let p = principal(ctx)?;
    match own_scope(c, p).await? {
        Resource::Platform => Err(Error::NotFound { what: "tenant" }),
        tenant => Ok(tenant),
    }
}

pub async fn create_group(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("group.create", "group");
    let tenant = caller_tenant(&c, &ctx).await?;
    ctx.authorize("group.create", &tenant).await?;
    let req: api::GroupCreate = parse(&body)?;
    ctx.permit().await?;
    let Resource::Tenant { id, .. } = &tenant else {
        return Err(Error::NotFound { what: "tenant" });
    };
    let group = accounts::create_group(&c.db, id, &req.name).await?;
    Ok((StatusCode::CREATED, Json(group)).into_response())
}

pub async fn list_groups(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Group>>> {
    ctx.describe("group.list", "group");
    let tenant = caller_tenant(&c, &ctx).await?;
    ctx.authorize("group.list", &tenant).await?;
    ctx.permit().await?;
    let Resource::Tenant { id, .. } = &tenant else {
        return Err(Error::NotFound { what: "tenant" });
    };
    Ok(Json(accounts::list_groups(&c.db, id).await?))
}

async fn group_for(c: &Controller, ctx: &RequestCtx, action: &str, id: &str) -> Result<api::Group> {
    ctx.describe(action, format!("group/{}", loggable_id(id)));
    let Resource::Tenant { id: tenant, .. } = caller_tenant(c, ctx).await? else {
        return Err(Error::NotFound { what: "group" });
    };
    let id = canonical_id(id, "group")?;
    let group = accounts::get_group(&c.db, &tenant, &id).await?;
    ctx.authorize(
        action,
        &Resource::Group {
            name: group.name.clone(),
            tenant: group.tenant_id.clone(),
        },
    )
    .await?;
    Ok(group)
}

pub async fn delete_group(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let group = group_for(&c, &ctx, "group.delete", &id).await?;
    ctx.permit().await?;
    accounts::delete_group(&c.db, &group).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn add_member(
    State(c): Ctl,
    ctx: RequestCtx,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode> {
    let group = group_for(&c, &ctx, "group.add_member", &id).await?;
    let user = canonical_id(&user, "user")?;
    ctx.permit().await?;
    accounts::set_membership(&c.db, &group, &user, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_member(
    State(c): Ctl,
    ctx: RequestCtx,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode> {
    let group = group_for(&c, &ctx, "group.remove_member", &id).await?;
    let user = canonical_id(&user, "user")?;
    ctx.permit().await?;
    accounts::set_membership(&c.db, &group, &user, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's tenant's policies; the security administrator names a tenant: `?tenant=`.
pub async fn get_policies(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<api::Policies>> {
    ctx.describe("policy.get", "policies");
    let query: UserQuery = parse_query(query.as_deref())?;
    let tenant = match &query.tenant {
        Some(id) => named_tenant(&c, id).await?,
        None => caller_tenant(&c, &ctx).await?,
    };
    ctx.authorize("policy.get", &tenant).await?;
    ctx.permit().await?;
    let Resource::Tenant { id, .. } = &tenant else {
        return Err(Error::NotFound { what: "tenant" });
    };
    Ok(Json(api::Policies {
        text: accounts::get_policies(&c.db, id).await?,
    }))
}

/// Replaces the tenant's Cedar policies; they must validate against the schema (400 with the
/// validator's message otherwise, and nothing changes).
pub async fn put_policies(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<StatusCode> {
    ctx.describe("policy.put", "policies");
    let tenant = caller_tenant(&c, &ctx).await?;
    ctx.authorize("policy.put", &tenant).await?;
    let req: api::Policies = parse(&body)?;
    c.authz
        .check_tenant_policies(&req.text)
        .map_err(|e| Error::Invalid {
            code: "policy_invalid",
            message: e.0,
        })?;
    // A tenant cannot lock its own administrators out of its policies: the uploader must still
    // be allowed to replace them under the new text.
    let after = crate::access::authz::StoredPolicies {
        tenant: req.text.clone(),
        platform: accounts::get_platform_policies(&c.db).await?,
    };
    let still = c
        .authz
        .is_allowed(principal(&ctx)?, "policy.put", &tenant, true, &after)
        .map_err(Error::Internal)?;
    if !still {
        return Err(Error::Invalid {
            code: "policy_invalid",
            message: "these policies would forbid you to change them again".into(),
        });
    }
    ctx.permit().await?;
    let Resource::Tenant { id, .. } = &tenant else {
        return Err(Error::NotFound { what: "tenant" });
    };
    accounts::set_policies(&c.db, id, &req.text).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The platform's own (forbid-only) policies.
pub async fn get_platform_policies(State(c): Ctl, ctx: RequestCtx) -> Result<Json<api::Policies>> {
    ctx.authorize("platform.policy_get", &Resource::Platform)
        .await?;
    ctx.permit().await?;
    Ok(Json(api::Policies {
        text: accounts::get_platform_policies(&c.db).await?,
    }))
}

/// Replaces the platform's policies: validated against the schema, `forbid` only.
pub async fn put_platform_policies(
    State(c): Ctl,
    ctx: RequestCtx,
    body: Bytes,
) -> Result<StatusCode> {
    ctx.authorize("platform.policy_put", &Resource::Platform)
        .await?;
    let req: api::Policies = parse(&body)?;
    c.authz
        .check_platform_policies(&req.text)
        .map_err(|e| Error::Invalid {
            code: "policy_invalid",
            message: e.0,
        })?;
    ctx.permit().await?;
    accounts::set_platform_policies(&c.db, &req.text).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Identity alerts of the caller's tenant (or, for the security admin, the platform's).
pub async fn list_alerts(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Alert>>> {
    ctx.describe("alert.list", "alerts");
    let scope = own_scope(&c, principal(&ctx)?).await?;
    ctx.authorize("alert.list", &scope).await?;
    ctx.permit().await?;
    let tenant = match &scope {
        Resource::Tenant { id, .. } => Some(id.as_str()),
        _ => None,
    };
    Ok(Json(accounts::list_alerts(&c.db, tenant, 500).await?))
}

pub async fn list_flavors(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Flavor>>> {
    ctx.describe("flavor.list", "flavor");
    let scope = own_scope(&c, principal(&ctx)?).await?;
    ctx.authorize("flavor.list", &scope).await?;
    ctx.permit().await?;
    Ok(Json(api::flavors()))
}

pub async fn list_images(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Image>>> {
    ctx.describe("image.list", "image");
    let scope = own_scope(&c, principal(&ctx)?).await?;
    ctx.authorize("image.list", &scope).await?;
    ctx.permit().await?;
    Ok(Json(c.compute.list_images().await?))
}

pub async fn create_instance(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("instance.create", "instance");
    let scope = own_scope(&c, principal(&ctx)?).await?;
    ctx.authorize("instance.create", &scope).await?;
    let Resource::Tenant { id: tenant, .. } = scope else {
        return Err(Error::NotFound { what: "tenant" });
    };
    let req: api::InstanceCreate = parse(&body)?;
    let mut new = c.compute.prepare_instance(&req).await?;
    match &req.subnet {
        Some(subnet) => {
            let plan =
                crate::service::network::plan_port(&c.db, &tenant, subnet, &req.security_groups)
                    .await?;
            new = new.with_port(plan);
        }
        None if !req.security_groups.is_empty() => {
            return Err(Error::invalid(
                "security groups are a port's: name a subnet too",
            ))
        }
        None => {}
    }
    ctx.describe("instance.create", format!("instance/{}", new.id));
    let instance = c
        .compute
        .create_instance(&tenant, new, ctx.permit())
        .await?;
    Ok((StatusCode::CREATED, Json(instance)).into_response())
}

/// The caller's tenant's instances; platform accounts (operators) name a tenant with
/// `?tenant=`.
pub async fn list_instances(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::Instance>>> {
    ctx.describe("instance.list", "instance");
    let p = principal(&ctx)?;
    let query: UserQuery = parse_query(query.as_deref())?;
    let scope = match &query.tenant {
        Some(id) => {
            let id = canonical_id(id, "tenant")?;
            let tenant = accounts::get_tenant(&c.db, &id).await?;
            Resource::Tenant {
                id: tenant.id,
                name: tenant.name,
            }
        }
        None => own_scope(&c, p).await?,
    };
    ctx.authorize("instance.list", &scope).await?;
    let Resource::Tenant { id: tenant, .. } = scope else {
        return Err(Error::invalid(
            "platform accounts name a tenant: ?tenant=<id>",
        ));
    };
    ctx.permit().await?;
    Ok(Json(c.compute.list_instances(&tenant).await?))
}

/// Resolves an instance and asks whether the caller may do `action` on it, naming the action
/// first so that a refusal is audited with it. Another tenant's instance is not found.
/// Deleted instances stay visible to `show` (with their erase time).
async fn instance_for(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    id: &str,
) -> Result<api::Instance> {
    ctx.describe(action, format!("instance/{}", loggable_id(id)));
    principal(ctx)?;
    let id = canonical_id(id, "instance")?;
    let instance = c.compute.find_instance(&id).await?;
    ctx.authorize(
        action,
        &Resource::Instance {
            id: instance.id.clone(),
            tenant: instance.tenant_id.clone(),
            name: instance.name.clone(),
            tags: instance
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        },
    )
    .await?;
    Ok(instance)
}

pub async fn show_instance(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Instance>> {
    let instance = instance_for(&c, &ctx, "instance.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(instance))
}

async fn change_power(
    c: &Controller,
    ctx: &RequestCtx,
    id: &str,
    desired: &str,
) -> Result<Response> {
    let action = match desired {
        "running" => "instance.start",
        "stopped" => "instance.stop",
        _ => "instance.delete",
    };
    let current = instance_for(c, ctx, action, id).await?;
    if current.deleted_at.is_some() || current.state == "deleting" {
        // Gone, or going: to its owner as to anyone, there is nothing to act on.
        return Err(Error::NotFound { what: "instance" });
    }
    ctx.permit().await?;
    let instance = c
        .compute
        .set_desired(&current.tenant_id, &current.id, desired)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(instance)).into_response())
}

pub async fn stop_instance(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Response> {
    change_power(&c, &ctx, &id, "stopped").await
}

pub async fn start_instance(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Response> {
    change_power(&c, &ctx, &id, "running").await
}

pub async fn delete_instance(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Response> {
    change_power(&c, &ctx, &id, "deleted").await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
}

pub async fn console(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<api::ConsoleOutput>> {
    let instance = instance_for(&c, &ctx, "instance.console", &id).await?;
    let query: ConsoleQuery = parse_query(query.as_deref())?;
    ctx.permit().await?;
    Ok(Json(
        c.compute
            .console(&instance.tenant_id, &instance.id, query.offset)
            .await?,
    ))
}

/// Most bytes one console input carries (the agent's limit too).
const MAX_CONSOLE_INPUT: usize = 4096;

/// Types the body on the instance's serial console, as a real cloud's interactive serial
/// console does. The record names the action, never what was typed (it may be a password).
pub async fn console_input(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let instance = instance_for(&c, &ctx, "instance.console_input", &id).await?;
    if body.len() > MAX_CONSOLE_INPUT {
        return Err(Error::TooLarge {
            limit: MAX_CONSOLE_INPUT,
        });
    }
    ctx.permit().await?;
    c.compute
        .console_input(&instance.tenant_id, &instance.id, body.to_vec())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The raw audit log, for offline verification (`palisade audit verify`): every durable
/// record, and nothing half-written.
pub async fn audit_log(State(c): Ctl, ctx: RequestCtx) -> Result<Response> {
    ctx.authorize("audit.read", &Resource::Platform).await?;
    ctx.describe("audit.read", "audit-log/platform");
    ctx.permit().await?;
    let audit = c.audit.clone();
    let bytes = tokio::task::spawn_blocking(move || audit.durable_log())
        .await
        .map_err(|e| Error::Internal(e.into()))?
        .map_err(Error::Internal)?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], bytes).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    since: Option<String>,
    until: Option<String>,
    action: Option<String>,
    object: Option<String>,
    result: Option<String>,
    tenant: Option<String>,
}

/// Whose records a caller reads: a tenant administrator its tenant's, the auditor all, anyone
/// else its own.
fn audit_scope(principal: &Principal) -> crate::service::audit::Scope {
    use crate::service::audit::Scope;
    match (&principal.tenant_id, principal.role.as_str()) {
        (Some(tenant), "tenant_admin") => Scope::Tenant(tenant.clone()),
        (None, "auditor") => Scope::All,
        _ => Scope::Subject(format!("user:{}", principal.user_id)),
    }
}

fn audit_scope_object(scope: &crate::service::audit::Scope) -> String {
    use crate::service::audit::Scope;
    match scope {
        Scope::All => "audit-log/platform".to_string(),
        Scope::Tenant(t) => format!("audit-log/tenant/{t}"),
        Scope::Subject(_) => "audit-log/self".to_string(),
    }
}

/// Reads a page of records in `scope`. A tenant sees what the provider did to its resources
/// and with which role, not which of the provider's people did it (that stays in the
/// auditor's view); such a record's hash is the logged one's, which the tenant cannot
/// recompute.
async fn read_audit(
    c: &Controller,
    scope: crate::service::audit::Scope,
    filter: crate::service::audit::Filter,
    after: u64,
    limit: usize,
) -> Result<(Vec<palisade_common::audit::AuditRecord>, Option<u64>)> {
    let audit = c.audit.clone();
    let everyone = matches!(scope, crate::service::audit::Scope::All);
    let (mut records, next) =
        tokio::task::spawn_blocking(move || audit.records(&scope, &filter, after, limit))
            .await
            .map_err(|e| Error::Internal(e.into()))?
            .map_err(Error::Internal)?;
    if !everyone {
        for record in records.iter_mut().filter(|r| r.provider) {
            record.subject = "provider".into();
            record.key_id = None;
            record.source = "provider".into();
        }
    }
    Ok((records, next))
}

/// Audit records, oldest first, a page at a time. A tenant administrator reads the tenant's
/// records (its users' and the provider's actions on its resources); other tenant users and
/// platform accounts read their own; the auditor reads all and may pick a tenant.
pub async fn audit_records(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<api::AuditRecords>> {
    use crate::service::audit::Filter;
    ctx.authorize("audit_records.list", &Resource::Caller)
        .await?;
    let principal = principal(&ctx)?;
    let query: RecordsQuery = parse_query(query.as_deref())?;
    let scope = audit_scope(principal);
    ctx.describe("audit_records.list", audit_scope_object(&scope));
    if query.tenant.is_some() && !matches!(scope, crate::service::audit::Scope::All) {
        return Err(Error::invalid("only the auditor chooses a tenant"));
    }
    let tenant = query
        .tenant
        .as_deref()
        .map(|t| canonical_id(t, "tenant"))
        .transpose()?;
    let time = |name: &str, text: &Option<String>| -> Result<Option<time::OffsetDateTime>> {
        text.as_deref()
            .map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| Error::invalid(format!("{name} must be an RFC 3339 time")))
            })
            .transpose()
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit must be 1 to 1000"));
    }
    for text in [&query.action, &query.object, &query.result, &query.tenant]
        .into_iter()
        .flatten()
    {
        if text.len() > 256 {
            return Err(Error::invalid("filters are at most 256 bytes"));
        }
    }
    let filter = Filter {
        since: time("since", &query.since)?,
        until: time("until", &query.until)?,
        action: query.action,
        object: query.object,
        result: query.result,
        tenant,
    };
    ctx.permit().await?;
    let (records, next) = read_audit(&c, scope, filter, query.after, limit).await?;
    Ok(Json(api::AuditRecords { records, next }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OcsfQuery {
    #[serde(default)]
    cursor: u64,
    limit: Option<usize>,
}

/// The pull stream for third-party audit systems: the records a caller may read (as
/// `GET /v1/audit/records`) after `cursor`, as OCSF events, and the cursor to pass next time.
pub async fn audit_ocsf(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<api::OcsfPage>> {
    ctx.authorize("audit_records.export", &Resource::Caller)
        .await?;
    let principal = principal(&ctx)?;
    let query: OcsfQuery = parse_query(query.as_deref())?;
    let scope = audit_scope(principal);
    ctx.describe("audit_records.export", audit_scope_object(&scope));
    let limit = query.limit.unwrap_or(500);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit must be 1 to 1000"));
    }
    ctx.permit().await?;
    let filter = crate::service::audit::Filter::default();
    let (records, next) = read_audit(&c, scope, filter, query.cursor, limit).await?;
    let cursor = records
        .last()
        .map(|r| r.seq)
        .max(next)
        .unwrap_or(query.cursor);
    Ok(Json(api::OcsfPage {
        events: records.iter().map(palisade_common::ocsf::event).collect(),
        cursor,
        end: c.audit.size(),
    }))
}

/// Every signed tree head, oldest first (JSON lines). Heads name no tenant: anyone signed in
/// may keep them, to check later that the log was never cut or rewritten.
pub async fn audit_heads(State(c): Ctl, ctx: RequestCtx) -> Result<Response> {
    ctx.authorize("audit_proof.heads", &Resource::Caller)
        .await?;
    ctx.describe("audit_proof.heads", "audit-log/heads");
    ctx.permit().await?;
    let bytes = tokio::fs::read(c.audit.heads_path())
        .await
        .map_err(|e| Error::Internal(e.into()))?;
    // Only whole lines: a head being written is left for the next read.
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut bytes = bytes;
    bytes.truncate(whole);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], bytes).into_response())
}

/// Signs a head over everything written so far, now.
pub async fn audit_sign_head(
    State(c): Ctl,
    ctx: RequestCtx,
) -> Result<Json<palisade_common::audit::TreeHead>> {
    ctx.authorize("audit_proof.sign", &Resource::Caller).await?;
    ctx.describe("audit_proof.sign", "audit-log/heads");
    ctx.permit().await?;
    c.audit.sign_head().await.map(Json).map_err(audit_failed)
}

fn audit_failed(e: crate::service::audit::AppendError) -> Error {
    tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "audit log");
    Error::Unavailable {
        code: "audit_unavailable",
        message: "the audit log cannot be written".into(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    seq: u64,
    tree_size: u64,
}

/// One record and its inclusion proof in the tree of `tree_size` records. A tenant's users
/// may prove their tenant's records, any other caller its own; the auditor any record. A
/// record the caller may not see is 404, as one that does not exist.
pub async fn audit_inclusion(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<api::AuditInclusion>> {
    ctx.authorize("audit_proof.inclusion", &Resource::Caller)
        .await?;
    let query: InclusionQuery = parse_query(query.as_deref())?;
    ctx.describe(
        "audit_proof.inclusion",
        format!("audit-log/record/{}", query.seq),
    );
    let principal = principal(&ctx)?;
    let audit = c.audit.clone();
    let seq = query.seq;
    let line = tokio::task::spawn_blocking(move || audit.record_line(seq))
        .await
        .map_err(|e| Error::Internal(e.into()))?
        .map_err(Error::Internal)?;
    let missing = || Error::NotFound {
        what: "audit record",
    };
    let line = line.ok_or_else(missing)?;
    // A purged record's stub names no one: as gone as a record that never was.
    let record = match palisade_common::audit::check_any_line(&line, seq) {
        Ok((palisade_common::audit::Line::Record(record), _)) => *record,
        Ok((palisade_common::audit::Line::Purged(_), _)) => return Err(missing()),
        Err(e) => return Err(Error::Internal(anyhow::anyhow!("audit record {seq}: {e}"))),
    };
    // The records the caller may list, less the provider's (they name the provider's people).
    let visible = match audit_scope(principal) {
        crate::service::audit::Scope::All => true,
        crate::service::audit::Scope::Tenant(tenant) => {
            record.tenant_id.as_deref() == Some(tenant.as_str()) && !record.provider
        }
        crate::service::audit::Scope::Subject(subject) => record.subject == subject,
    };
    if !visible {
        return Err(Error::NotFound {
            what: "audit record",
        });
    }
    let proof = c
        .audit
        .inclusion_proof(query.seq, query.tree_size)
        .ok_or_else(|| {
            Error::invalid("tree_size must cover the record and not pass the log's size")
        })?;
    ctx.permit().await?;
    Ok(Json(api::AuditInclusion {
        record: String::from_utf8_lossy(&line).into_owned(),
        proof,
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    first: u64,
    second: u64,
}

/// That the tree of `second` records extends the tree of `first` records.
pub async fn audit_consistency(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<palisade_common::audit::ConsistencyProof>> {
    ctx.authorize("audit_proof.consistency", &Resource::Caller)
        .await?;
    ctx.describe("audit_proof.consistency", "audit-log/heads");
    let query: ConsistencyQuery = parse_query(query.as_deref())?;
    let proof = c
        .audit
        .consistency_proof(query.first, query.second)
        .ok_or_else(|| Error::invalid("need 0 < first <= second <= the log's size"))?;
    ctx.permit().await?;
    Ok(Json(proof))
}

/// Replaces the head key (security administrators): the old key signs a head announcing the
/// new one, so verifiers follow the change; a record marks it in the log.
pub async fn audit_rotate_key(
    State(c): Ctl,
    ctx: RequestCtx,
) -> Result<Json<palisade_common::audit::TreeHead>> {
    ctx.authorize("audit_key.rotate", &Resource::Platform)
        .await?;
    ctx.describe("audit_key.rotate", "audit-log/head-key");
    ctx.permit().await?;
    c.audit.rotate_key().await.map(Json).map_err(audit_failed)
}

/// How long audit records are kept, and the legal holds. A tenant administrator sees its own
/// tenant's rule and hold; the platform's security administrators and auditors see all.
pub async fn audit_retention(State(c): Ctl, ctx: RequestCtx) -> Result<Json<api::AuditRetention>> {
    ctx.describe("audit_retention.show", "audit-log/retention");
    let scope = own_scope(&c, principal(&ctx)?).await?;
    ctx.authorize("audit_retention.show", &scope).await?;
    ctx.permit().await?;
    let mut tenants = retention::tenant_rules(&c.db).await?;
    let mut holds = retention::holds(&c.db).await?;
    if let Resource::Tenant { id, .. } = &scope {
        tenants.retain(|t| t.tenant_id == *id);
        holds.retain(|h| h.scope == *id);
        for hold in &mut holds {
            hold.set_by = "provider".into(); // the provider's people stay unnamed
        }
    }
    Ok(Json(api::AuditRetention {
        minimum_secs: c.retention.minimum.as_secs(),
        tenants,
        holds,
    }))
}

/// The resource a hold's scope names: the whole log, or a tenant (deleted ones too: their
/// records outlive them).
async fn hold_scope(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    scope: &str,
) -> Result<(String, Resource)> {
    if scope == retention::PLATFORM {
        ctx.describe(action, "audit-hold/platform");
        ctx.authorize(action, &Resource::Platform).await?;
        return Ok((scope.to_string(), Resource::Platform));
    }
    ctx.describe(action, format!("audit-hold/tenant/{}", loggable_id(scope)));
    let id = canonical_id(scope, "tenant")?;
    let name = retention::tenant_name(&c.db, &id).await?;
    let resource = Resource::Tenant {
        id: id.clone(),
        name,
    };
    ctx.authorize(action, &resource).await?;
    Ok((id, resource))
}

/// Places a legal hold on a tenant's records (`{scope}` = its id) or the whole log
/// (`platform`): nothing it covers is purged until it is released.
pub async fn audit_hold_set(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(scope): Path<String>,
    body: Bytes,
) -> Result<Json<api::AuditHold>> {
    let (scope, _) = hold_scope(&c, &ctx, "audit_hold.set", &scope).await?;
    let req: api::AuditHoldSet = parse(&body)?;
    retention::check_reason(&req.reason)?;
    let by = format!("user:{}", principal(&ctx)?.user_id);
    // The reason goes into the record: the hold row is replaced or deleted later, the log
    // keeps why each hold was set.
    let reason: String = url::form_urlencoded::byte_serialize(req.reason.as_bytes()).collect();
    let object = match scope.as_str() {
        retention::PLATFORM => format!("audit-hold/platform?reason={reason}"),
        id => format!("audit-hold/tenant/{id}?reason={reason}"),
    };
    ctx.describe("audit_hold.set", object);
    ctx.permit().await?;
    Ok(Json(
        retention::set_hold(&c.db, &scope, &req.reason, &by).await?,
    ))
}

pub async fn audit_hold_release(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(scope): Path<String>,
) -> Result<StatusCode> {
    let (scope, _) = hold_scope(&c, &ctx, "audit_hold.release", &scope).await?;
    ctx.permit().await?;
    retention::release_hold(&c.db, &scope).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Purges the records past retention now (it also runs on its own, hourly by default).
pub async fn audit_purge(State(c): Ctl, ctx: RequestCtx) -> Result<Json<api::AuditPurge>> {
    ctx.describe("audit_log.purge", "audit-log/platform");
    ctx.authorize("audit_log.purge", &Resource::Platform)
        .await?;
    ctx.permit().await?;
    let done = retention::purge(&c.db, &c.audit, c.retention).await?;
    Ok(Json(api::AuditPurge {
        records: done.records,
        purge_records: done.purge_records,
    }))
}

pub async fn not_found() -> Error {
    Error::NotFound { what: "route" }
}

pub async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}
