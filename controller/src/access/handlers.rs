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
use crate::error::{Error, Result};
use crate::service::identity::{self, Principal};
use crate::Controller;

type Ctl = State<Arc<Controller>>;

/// Parses a JSON body strictly: unknown fields and wrong types are a 400 naming the problem.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid {
        code: "invalid_request",
        message: format!("request body: {e}"),
    })
}

fn principal(ctx: &RequestCtx) -> Result<&Principal> {
    ctx.principal.as_ref().ok_or(Error::Unauthorized {
        code: "signature_missing",
        message: "request is not signed".into(),
    })
}

fn platform_admin(ctx: &RequestCtx) -> Result<&Principal> {
    let p = principal(ctx)?;
    if !p.is_platform_admin() {
        return Err(Error::Forbidden {
            code: "forbidden",
            message: "this call is for platform administrators".into(),
        });
    }
    Ok(p)
}

/// The caller's tenant. Platform accounts act on no tenant's resources here.
fn tenant_of(ctx: &RequestCtx) -> Result<String> {
    principal(ctx)?.tenant_id.clone().ok_or(Error::Forbidden {
        code: "tenant_scope_required",
        message: "this call acts on a tenant's resources; use a tenant user's key".into(),
    })
}

/// Ids are UUIDs; anything else cannot name an object, so it is simply not found.
/// Ids are UUIDs in any spelling the uuid crate accepts; returns the canonical (lower-case,
/// hyphenated) form the database holds. Anything else cannot name an object: not found.
fn canonical_id(id: &str, what: &'static str) -> Result<String> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| Error::NotFound { what })
}

pub async fn change_password(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<StatusCode> {
    let req: api::PasswordChange = parse(&body)?;
    ctx.describe("auth.password_change", format!("user/{}", req.user));
    let user =
        identity::verify_password(&c.db, c.lockout, &req.user, &req.current_password).await?;
    ctx.set_subject(&user.id, user.tenant_id.clone());
    identity::check_new_password(&req.user, &req.new_password)?;
    identity::check_not_reused(&c.db, &user.id, &req.new_password).await?;
    ctx.permit().await?;
    identity::set_password(&c.db, &user.id, &req.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn create_key(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let req: api::KeyCreate = parse(&body)?;
    ctx.describe("key.create", format!("user/{}", req.user));
    let user = identity::verify_password(&c.db, c.lockout, &req.user, &req.password).await?;
    ctx.set_subject(&user.id, user.tenant_id.clone());
    if user.must_change_password {
        return Err(Error::Forbidden {
            code: "password_change_required",
            message: "change the initial password first".into(),
        });
    }
    let new_key = identity::prepare_key(&user.id, &req)?;
    ctx.describe("key.create", format!("key/{}", new_key.id));
    ctx.permit().await?;
    let key = identity::insert_key(&c.db, new_key).await?;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

pub async fn whoami(State(c): Ctl, ctx: RequestCtx) -> Result<Json<api::Whoami>> {
    let p = principal(&ctx)?;
    ctx.describe("user.whoami", format!("user/{}", p.user_id));
    ctx.permit().await?;
    Ok(Json(api::Whoami {
        user: identity::get_user(&c.db, &p.user_id).await?,
        key_id: p.key_id.clone(),
    }))
}

pub async fn list_keys(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::ApiKey>>> {
    let p = principal(&ctx)?;
    ctx.describe("key.list", format!("user/{}", p.user_id));
    ctx.permit().await?;
    Ok(Json(identity::list_keys(&c.db, &p.user_id).await?))
}

/// Revokes one of the caller's own keys (possibly the one signing this request).
pub async fn revoke_key(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let p = principal(&ctx)?;
    ctx.describe("key.revoke", format!("key/{id}"));
    identity::check_own_key(&c.db, &p.user_id, &id).await?;
    ctx.permit().await?;
    identity::revoke_key(&c.db, &p.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn create_tenant(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("tenant.create", "tenant");
    platform_admin(&ctx)?;
    let req: api::TenantCreate = parse(&body)?;
    identity::check_tenant(&req)?;
    ctx.permit().await?;
    let tenant = identity::create_tenant(&c.db, &req).await?;
    Ok((StatusCode::CREATED, Json(tenant)).into_response())
}

pub async fn list_tenants(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Tenant>>> {
    ctx.describe("tenant.list", "tenant");
    platform_admin(&ctx)?;
    ctx.permit().await?;
    Ok(Json(identity::list_tenants(&c.db).await?))
}

pub async fn create_user(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("user.create", "user");
    platform_admin(&ctx)?;
    let req: api::UserCreate = parse(&body)?;
    identity::check_user(&c.db, &req).await?;
    ctx.permit().await?;
    let created = identity::create_user(&c.db, &req).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn list_flavors(ctx: RequestCtx) -> Result<Json<Vec<api::Flavor>>> {
    ctx.describe("flavor.list", "flavor");
    principal(&ctx)?;
    ctx.permit().await?;
    Ok(Json(api::flavors()))
}

pub async fn list_images(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Image>>> {
    ctx.describe("image.list", "image");
    principal(&ctx)?;
    ctx.permit().await?;
    Ok(Json(c.compute.list_images().await?))
}

pub async fn create_instance(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    ctx.describe("instance.create", "instance");
    let tenant = tenant_of(&ctx)?;
    let req: api::InstanceCreate = parse(&body)?;
    let new = c.compute.prepare_instance(&req).await?;
    ctx.describe("instance.create", format!("instance/{}", new.id));
    let instance = c
        .compute
        .create_instance(&tenant, new, ctx.permit())
        .await?;
    Ok((StatusCode::CREATED, Json(instance)).into_response())
}

pub async fn list_instances(State(c): Ctl, ctx: RequestCtx) -> Result<Json<Vec<api::Instance>>> {
    ctx.describe("instance.list", "instance");
    let tenant = tenant_of(&ctx)?;
    ctx.permit().await?;
    Ok(Json(c.compute.list_instances(&tenant).await?))
}

/// Resolves an instance of the caller's tenant, naming the action first so that a refusal is
/// audited with it. Deleted instances stay visible to `show` (with their erase time).
/// Returns the tenant and the canonical instance id.
async fn own_instance(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    id: &str,
) -> Result<(String, String)> {
    ctx.describe(action, format!("instance/{id}"));
    let tenant = tenant_of(ctx)?;
    let id = canonical_id(id, "instance")?;
    c.compute.get_instance(&tenant, &id).await?;
    Ok((tenant, id))
}

pub async fn show_instance(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Instance>> {
    let (tenant, id) = own_instance(&c, &ctx, "instance.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(c.compute.get_instance(&tenant, &id).await?))
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
    let (tenant, id) = own_instance(c, ctx, action, id).await?;
    let current = c.compute.get_instance(&tenant, &id).await?;
    if current.deleted_at.is_some() || current.state == "deleting" {
        // Gone, or going: to its owner as to anyone, there is nothing to act on.
        return Err(Error::NotFound { what: "instance" });
    }
    ctx.permit().await?;
    let instance = c.compute.set_desired(&tenant, &id, desired).await?;
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
    let (tenant, id) = own_instance(&c, &ctx, "instance.console", &id).await?;
    let query: ConsoleQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| Error::invalid(format!("query: {e}")))?;
    ctx.permit().await?;
    Ok(Json(c.compute.console(&tenant, &id, query.offset).await?))
}

/// The raw audit log, for offline verification (`palisade audit verify`).
pub async fn audit_log(State(c): Ctl, ctx: RequestCtx) -> Result<Response> {
    ctx.describe("audit.export", "audit-log/platform");
    platform_admin(&ctx)?;
    ctx.permit().await?;
    let bytes = tokio::fs::read(c.audit.path())
        .await
        .map_err(|e| Error::Internal(e.into()))?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], bytes).into_response())
}

pub async fn not_found() -> Error {
    Error::NotFound { what: "route" }
}

pub async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}
