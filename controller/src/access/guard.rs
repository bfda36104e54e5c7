//! The one authenticate → authorize → audit path every request takes.
//!
//! 1. The body is read up to [`MAX_BODY_BYTES`] (more → 413).
//! 2. Unless the route is one of the two password routes, the RFC 9421-style signature is
//!    verified (see `palisade_common::signing`): digest, Ed25519 signature against a known,
//!    unrevoked key, creation time within the window, nonce never seen for that key.
//! 3. The handler names its action and object, checks what it must, and calls
//!    [`RequestCtx::permit`] *before* it acts: that appends the audit record and fails the
//!    request if the append fails.
//! 4. A request that never reached `permit` (refused, malformed, unknown route) gets its record
//!    here, after the handler, with the refusal's code. Either way: one record per request.
//!
//! Checks that can refuse a request run before `permit` (a create's quota check runs inside
//! the write transaction, with `permit` between the check and the commit).
//! TODO(correctness): a permitted action that still fails afterwards (a database or disk
//! error) keeps its `allowed` record with no outcome record; outcomes come with issue #4.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use palisade_common::api::MAX_BODY_BYTES;
use palisade_common::error::ErrorBody;
use palisade_common::signing::{self, SignatureError, SIGNATURE_WINDOW_SECS};
use tracing::Instrument;

use crate::access::authz::Resource;
use crate::error::Error;
use crate::service::audit::Entry;
use crate::service::identity::{self, Principal};
use crate::Controller;

/// Per-request context, put into the request's extensions by the guard.
#[derive(Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub source: String,
    pub peer_ip: std::net::IpAddr,
    pub principal: Option<Principal>,
    controller: Arc<Controller>,
    record: Arc<Mutex<RecordState>>,
}

#[derive(Default)]
struct RecordState {
    action: Option<String>,
    object: Option<String>,
    subject: Option<String>,
    tenant_id: Option<String>,
    /// The key a refused signature claimed, so refusals can be traced to the key they target.
    claimed_key: Option<String>,
    /// The action the route table gives the matched route: the only one its handler may
    /// authorize and permit.
    route_action: Option<&'static str>,
    /// Whether the authorization engine allowed the action (signed routes must ask it).
    authorized: bool,
    /// The tenant owning the resource the action was asked for.
    resource_tenant: Option<String>,
    /// The record type: authentication, read or mutation.
    kind: &'static str,
    written: bool,
}

/// How long a client may take to send a request body (64 KiB at most).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest text a caller can put into one audit field: requests cannot inflate the log.
const MAX_AUDIT_TEXT: usize = 256;

fn capped(text: &str) -> String {
    if text.len() <= MAX_AUDIT_TEXT {
        return text.to_string();
    }
    let cut = (0..=MAX_AUDIT_TEXT)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    format!("{}…[{} bytes]", &text[..cut], text.len())
}

impl RequestCtx {
    /// Names what this request is about; used by its audit record, allowed or not.
    pub fn describe(&self, action: &str, object: impl Into<String>) {
        let mut state = self.lock();
        state.action = Some(capped(action));
        state.object = Some(capped(&object.into()));
    }

    /// Asks the authorization engine whether the caller may do `action` on `resource`, naming
    /// both for the audit record first. A refusal on an object the caller may not even see is
    /// 404 (indistinguishable from a missing one); otherwise 403. Administrative actions also
    /// need a fresh second-factor proof from MFA-bound callers.
    pub async fn authorize(&self, action: &str, resource: &Resource) -> Result<(), Error> {
        let described = {
            let state = self.lock();
            (state.action.clone(), state.object.clone())
        };
        self.describe(action, resource.audit_name());
        self.lock().resource_tenant = resource.tenant().map(str::to_string);
        let result = self.decide(action, resource).await;
        if let Err(Error::NotFound { .. }) = &result {
            // Something the caller may not see leaves the record a missing one would: the
            // caller reads its own records, which must not tell the two apart either.
            let mut state = self.lock();
            (state.action, state.object) = described;
            state.resource_tenant = None;
        }
        result
    }

    async fn decide(&self, action: &str, resource: &Resource) -> Result<(), Error> {
        let principal = self.principal.as_ref().ok_or(Error::Unauthorized {
            code: "signature_missing",
            message: "request is not signed".into(),
        })?;
        let c = &self.controller;
        let policies = crate::access::authz::StoredPolicies {
            tenant: match &principal.tenant_id {
                Some(tenant) => crate::service::accounts::get_policies(&c.db, tenant).await?,
                None => String::new(),
            },
            platform: crate::service::accounts::get_platform_policies(&c.db).await?,
        };
        let decide = |action: &str| {
            c.authz
                .is_allowed(principal, action, resource, principal.mfa_fresh, &policies)
                .map_err(Error::Internal)
        };
        if !decide(action)? {
            let visible = match resource.show_action() {
                Some(show) if show != action => decide(show)?,
                Some(_) => false,
                None => true,
            };
            return Err(if visible {
                Error::Forbidden {
                    code: "forbidden",
                    message: format!("your role may not {action}"),
                }
            } else {
                Error::NotFound {
                    what: resource.kind(),
                }
            });
        }
        let admin = c.authz.matrix().row(action).is_some_and(|r| r.admin);
        if admin && principal.mfa_bound && !principal.mfa_fresh {
            return Err(Error::Forbidden {
                code: "mfa_required",
                message: "this administrative action needs a fresh second-factor proof \
                          (POST /v1/auth/mfa/verify)"
                    .into(),
            });
        }
        self.lock().authorized = true;
        Ok(())
    }

    /// The tenant a request concerns before anyone is authenticated (a federated login).
    pub fn set_tenant(&self, tenant_id: &str) {
        self.lock().tenant_id = Some(tenant_id.to_string());
    }

    /// For password routes: who the request proved to be, once the password checked out.
    pub fn set_subject(&self, user_id: &str, tenant_id: Option<String>) {
        let mut state = self.lock();
        state.subject = Some(format!("user:{user_id}"));
        state.tenant_id = tenant_id;
    }

    /// Records that the request is allowed and about to act. Must come before the action; if
    /// the record cannot be made durable, the request fails and nothing is done.
    ///
    /// Fails closed, as an internal error, when the handler names another action than the
    /// route table gives its route, or (on a signed route) never asked the authorization
    /// engine: a handler cannot act on a decision made for something else, or on none.
    pub async fn permit(&self) -> Result<(), Error> {
        {
            let state = self.lock();
            if let Some(expected) = state.route_action {
                if state.action.as_deref() != Some(expected) {
                    return Err(Error::Internal(anyhow::anyhow!(
                        "the handler permits {:?}, but the route table says {expected}",
                        state.action
                    )));
                }
            }
            if self.principal.is_some() && !state.authorized {
                return Err(Error::Internal(anyhow::anyhow!(
                    "a signed request was permitted without an authorization decision"
                )));
            }
        }
        self.write("allowed", None).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordState> {
        self.record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn write(&self, result: &str, code: Option<&str>) -> Result<(), Error> {
        let entry = {
            let state = self.lock();
            if state.written {
                return Ok(());
            }
            let principal = self.principal.as_ref();
            // A tenant's user acts in its own tenant; a platform role acting on a tenant's
            // resource is a provider action, shown in that tenant's records.
            let (tenant_id, provider) = match principal {
                Some(p) if p.tenant_id.is_some() => (p.tenant_id.clone(), false),
                Some(_) if state.resource_tenant.is_some() => (state.resource_tenant.clone(), true),
                _ => (state.tenant_id.clone(), false),
            };
            Entry {
                kind: state.kind,
                role: principal.map(|p| p.role.clone()),
                provider,
                request_id: self.request_id.clone(),
                source: self.source.clone(),
                subject: state
                    .subject
                    .clone()
                    .or_else(|| principal.map(|p| format!("user:{}", p.user_id)))
                    .unwrap_or_else(|| "anonymous".into()),
                key_id: principal
                    .map(|p| p.key_id.clone())
                    .or_else(|| state.claimed_key.clone()),
                tenant_id,
                action: state
                    .action
                    .clone()
                    .unwrap_or_else(|| "http.request".into()),
                object: state.object.clone().unwrap_or_default(),
                result: result.to_string(),
                code: code.map(str::to_string),
            }
        };
        match self.controller.audit.append(entry).await {
            Ok(_) => {
                self.lock().written = true;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "audit append");
                Err(Error::Unavailable {
                    code: "audit_unavailable",
                    message: "the audit log cannot be written; nothing was done".into(),
                })
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCtx {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestCtx>()
            .cloned()
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("request passed no guard")))
    }
}

/// The stable error code of a refusal, carried from the handler's response to the guard.
#[derive(Clone)]
struct ErrorCode(&'static str);

/// The existing account a refused login named: the record goes to its tenant.
#[derive(Clone)]
struct RefusedAccount(crate::error::NewLock);

/// A failed login (password or second factor), for the anomaly detector.
#[derive(Clone)]
struct FailedLogin(Option<crate::error::NewLock>);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(source) = &self {
            tracing::error!(error = %format!("{source:#}"), "internal error");
        }
        let body = ErrorBody::new(self.code(), self.to_string());
        let mut response = (self.status(), axum::Json(body)).into_response();
        response
            .extensions_mut()
            .insert(ErrorCode(self.audit_code()));
        if let Error::LoginRefused {
            account: Some(account),
            ..
        } = &self
        {
            response
                .extensions_mut()
                .insert(RefusedAccount(account.clone()));
        }
        if let Error::LoginRefused { new_lock, .. } | Error::MfaRefused { new_lock, .. } = &self {
            response
                .extensions_mut()
                .insert(FailedLogin(new_lock.clone()));
        }
        if let Error::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after_secs));
        }
        response
    }
}

/// Routes a password (not a key) authenticates; they check it themselves. This list may only
/// shrink: the access-control tests fail on any other unsigned route.
pub const PASSWORD_ROUTES: &[&str] = &[
    "/v1/auth/password",
    "/v1/auth/keys",
    "/v1/auth/login",
    "/v1/auth/mfa/totp",
    "/v1/auth/mfa/totp/confirm",
    "/v1/auth/mfa/webauthn/challenge",
    // Federated login: the identity provider, not a password, authenticates; see
    // service::federation.
    "/v1/auth/oidc/start",
    "/v1/auth/oidc/finish",
];

pub fn is_password_route_path(method: &str, path: &str) -> bool {
    method == "POST" && PASSWORD_ROUTES.contains(&path)
}

/// Whether the matched route reads a query string (see `server::QUERY_ROUTES`).
fn takes_query(parts: &Parts) -> bool {
    route_is_in(parts, super::server::QUERY_ROUTES)
}

/// Whether the matched route reads a body (see `server::BODY_ROUTES`).
fn takes_body(parts: &Parts) -> bool {
    route_is_in(parts, super::server::BODY_ROUTES)
}

/// An empty body, or JSON that carries nothing (`null`, `{}`), as clients send to POSTs
/// without a payload.
fn says_nothing(body: &[u8]) -> bool {
    if body.is_empty() {
        return true;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Null) => true,
        Ok(serde_json::Value::Object(fields)) => fields.is_empty(),
        _ => false,
    }
}

fn route_is_in(parts: &Parts, routes: &[(&str, &str)]) -> bool {
    let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() else {
        // No route matched: the fallback answers 404 anyway.
        return true;
    };
    routes
        .iter()
        .any(|(method, path)| parts.method.as_str() == *method && matched.as_str() == *path)
}

fn is_password_route(method: &Method, path: &str) -> bool {
    is_password_route_path(method.as_str(), path)
}

pub async fn guard(
    State(controller): State<Arc<Controller>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let ctx = RequestCtx {
        request_id: uuid::Uuid::new_v4().to_string(),
        source: peer.to_string(),
        peer_ip: peer.ip(),
        principal: None,
        controller: controller.clone(),
        record: Arc::default(),
    };
    // The path as sent may carry anything, a secret included: log and audit a safe form.
    let path = super::server::loggable_path(parts.uri.path());
    // Extension methods are any token a client likes: only the standard ones are named.
    let method = match parts.method.as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" | "TRACE"
        | "CONNECT") => m,
        _ => "OTHER",
    };
    ctx.describe(&format!("http.{method}"), path.as_str());
    ctx.lock().kind = if parts.uri.path().starts_with("/v1/auth/") {
        palisade_common::audit::TYPE_AUTHENTICATION
    } else if matches!(method, "GET" | "HEAD") {
        palisade_common::audit::TYPE_READ
    } else {
        palisade_common::audit::TYPE_MUTATION
    };
    let span = tracing::info_span!("request", request_id = %ctx.request_id,
        method = %method, path = %path, peer = %ctx.source);
    guarded(controller, ctx, parts, body, next, peer.ip())
        .instrument(span)
        .await
}

async fn guarded(
    controller: Arc<Controller>,
    mut ctx: RequestCtx,
    mut parts: Parts,
    body: Body,
    next: Next,
    peer_ip: std::net::IpAddr,
) -> Response {
    let started = std::time::Instant::now();
    let outcome = async {
        controller.limits.check_source(peer_ip)?;
        let body = read_body(&parts.headers, body).await?;
        if !is_password_route(&parts.method, parts.uri.path()) {
            let principal = match authenticate(&controller, &ctx, &parts, &body).await {
                Ok(principal) => principal,
                Err(e) => {
                    // A request whose signature fails is a failed authentication.
                    ctx.lock().kind = palisade_common::audit::TYPE_AUTHENTICATION;
                    return Err(e);
                }
            };
            controller.limits.check_key(&principal.0.key_id)?;
            note_source(
                &controller,
                &ctx,
                &principal.0.user_id,
                principal.0.tenant_id.as_deref(),
            )
            .await;
            if principal.1 {
                ctx.principal = Some(principal.0);
                return Err(Error::Forbidden {
                    code: "password_change_required",
                    message: "change the initial password first".into(),
                });
            }
            ctx.principal = Some(principal.0);
        }
        // After authentication, so that an unsigned request is a 401 whatever it carries.
        if parts.uri.query().is_some_and(|q| !q.is_empty()) && !takes_query(&parts) {
            return Err(Error::invalid("this route takes no query parameters"));
        }
        if !says_nothing(&body) && !takes_body(&parts) {
            return Err(Error::invalid("this route takes no request body"));
        }
        Ok(body)
    }
    .await;

    let response = match outcome {
        Ok(body) => {
            ctx.lock().route_action = parts
                .extensions
                .get::<axum::extract::MatchedPath>()
                .and_then(|path| super::server::action_of(parts.method.as_str(), path.as_str()));
            parts.extensions.insert(ctx.clone());
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Err(e) => e.into_response(),
    };
    let failed = response.extensions().get::<FailedLogin>().cloned();
    if let Some(FailedLogin(new_lock)) = failed {
        login_failed(&controller, &ctx, new_lock).await;
    }
    if let Some(RefusedAccount(account)) = response.extensions().get::<RefusedAccount>() {
        if let Some(tenant) = &account.tenant_id {
            ctx.set_tenant(tenant);
        }
    }
    let mut response = finish_record(&ctx, response).await;
    add_headers(response.headers_mut(), &ctx.request_id);
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_millis() as u64,
        "request done"
    );
    response
}

/// Raises the alerts a failed login calls for: the account it locked, and a source failing
/// across accounts.
async fn login_failed(
    controller: &Controller,
    ctx: &RequestCtx,
    new_lock: Option<crate::error::NewLock>,
) {
    use crate::service::alerts::Raise;
    let mut raised = Vec::new();
    if let Some(lock) = &new_lock {
        raised.push(Raise {
            tenant_id: lock.tenant_id.as_deref(),
            user_id: Some(&lock.user_id),
            kind: "login_failures",
            detail: "a burst of failed logins locked the account".into(),
            source: &ctx.source,
            request_id: &ctx.request_id,
        });
    }
    if controller.alerts.note_failure(ctx.peer_ip) {
        raised.push(Raise {
            tenant_id: None,
            user_id: None,
            kind: "password_spraying",
            detail: "many failed logins from one source within a minute".into(),
            source: &ctx.source,
            request_id: &ctx.request_id,
        });
    }
    for alert in raised {
        if let Err(e) = controller.alerts.raise(alert, &controller.secrets).await {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "raising an alert");
        }
    }
}

/// Notes a verified use of an identity; an address never seen for it raises `new_source`.
pub async fn note_source(
    controller: &Controller,
    ctx: &RequestCtx,
    user_id: &str,
    tenant: Option<&str>,
) {
    match controller.alerts.note_source(user_id, ctx.peer_ip).await {
        Ok(false) => {}
        Ok(true) => {
            let alert = crate::service::alerts::Raise {
                tenant_id: tenant,
                user_id: Some(user_id),
                kind: "new_source",
                detail: format!("first use of this identity from {}", ctx.peer_ip),
                source: &ctx.source,
                request_id: &ctx.request_id,
            };
            if let Err(e) = controller.alerts.raise(alert, &controller.secrets).await {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "raising an alert");
            }
        }
        Err(e) => {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "noting a source")
        }
    }
}

/// Writes the record of a request that did not reach `permit`. If even that fails, the caller
/// learns that the platform could not audit (and no action ran, since none was permitted).
async fn finish_record(ctx: &RequestCtx, response: Response) -> Response {
    let status = response.status();
    let code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0)
        .or(match status {
            StatusCode::NOT_FOUND => Some("not_found"),
            StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
            _ => None,
        });
    let result = match status.as_u16() {
        200..=399 => "allowed",
        401 | 403 | 404 => "denied",
        _ => "rejected",
    };
    match ctx.write(result, code).await {
        Ok(()) => response,
        Err(e) => e.into_response(),
    }
}

fn add_headers(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", value);
    }
    let fixed = [
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("strict-transport-security", "max-age=31536000"),
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        ("referrer-policy", "no-referrer"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Error> {
    let too_large = || Error::TooLarge {
        limit: MAX_BODY_BYTES,
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    // A body dribbled in slowly must not hold a connection open forever.
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(read) => read.map_err(|_| too_large()),
        Err(_) => Err(Error::RequestTimeout),
    }
}

/// Verifies the request's signature. Returns the principal and whether its password must still
/// be changed.
async fn authenticate(
    controller: &Controller,
    ctx: &RequestCtx,
    parts: &Parts,
    body: &[u8],
) -> Result<(Principal, bool), Error> {
    let refuse = |e: SignatureError| Error::Unauthorized {
        code: e.code(),
        message: e.to_string(),
    };
    let header = |name: &str| -> Result<Option<&str>, Error> {
        let mut values = parts.headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(refuse(SignatureError::Malformed(
                "repeated signature header",
            )));
        }
        first
            .map(|v| {
                v.to_str()
                    .map_err(|_| refuse(SignatureError::Malformed("non-ASCII header")))
            })
            .transpose()
    };
    let (input, signature, digest) = match (
        header(signing::HEADER_SIGNATURE_INPUT)?,
        header(signing::HEADER_SIGNATURE)?,
        header(signing::HEADER_CONTENT_DIGEST)?,
    ) {
        (None, None, _) => return Err(refuse(SignatureError::Missing)),
        (Some(i), Some(s), Some(d)) => (i, s, d),
        _ => {
            return Err(refuse(SignatureError::Malformed(
                "incomplete signature headers",
            )))
        }
    };
    let params = signing::parse_signature_input(input).map_err(refuse)?;
    // A key id of ours (`key-<uuid>`) is recorded as claimed; any other text is recorded as a
    // digest, so that a secret pasted into the header never lands in the log.
    let ours = params
        .keyid
        .strip_prefix("key-")
        .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok());
    ctx.lock().claimed_key = Some(if ours {
        params.keyid.clone()
    } else {
        format!("unknown-key/{}", super::server::text_digest(&params.keyid))
    });
    let signature = signing::parse_signature(signature).map_err(refuse)?;

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if params.created.abs_diff(now) > SIGNATURE_WINDOW_SECS.unsigned_abs() {
        return Err(Error::Unauthorized {
            code: "clock_skew",
            message: format!(
                "signature creation time is more than {SIGNATURE_WINDOW_SECS} s from server time"
            ),
        });
    }
    let key = identity::lookup_key(&controller.db, &controller.rules, &params.keyid)
        .await?
        .ok_or(Error::Unauthorized {
            code: "key_invalid",
            message: "unknown, revoked or expired key".into(),
        })?;
    let public_key = signing::parse_public_key(&key.public_key)
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("stored public key does not parse")))?;
    let message = signing::Message {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        body,
    };
    signing::verify(&public_key, &message, digest, &params, &signature).map_err(refuse)?;
    // Only a verified request may spend a nonce, so nobody can fill the table without a key.
    if !identity::remember_nonce(&controller.db, &params.keyid, &params.nonce, now).await? {
        return Err(Error::Unauthorized {
            code: "replayed",
            message: "this signed request was already used".into(),
        });
    }
    if key.lacks_mfa {
        return Err(Error::Unauthorized {
            code: "mfa_required",
            message: "this account needs a second factor; this key was made without one".into(),
        });
    }
    if key.touch_due {
        identity::touch_key(&controller.db, &params.keyid).await?;
    }
    Ok((key.principal, key.must_change_password))
}
