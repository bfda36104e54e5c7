//! HTTP handlers of tenant networks: VPCs, subnets and ACLs, security groups and rules,
//! ports. Same order as every handler (`docs/adding-an-endpoint.md`): describe, authorize,
//! parse, `permit` (the audit record), act; then the reconciler is woken, so the hosts carry
//! the change within its pass.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use palisade_common::api;

use super::authz::{NetKind, Resource};
use super::guard::RequestCtx;
use super::handlers::{canonical_id, own_scope_of, parse, parse_query, Ctl};
use crate::access::server::loggable_id;
use crate::error::{Error, Result};
use crate::service::{accounts, network};
use crate::Controller;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantQuery {
    tenant: Option<String>,
}

/// The tenant a list is of: the caller's; platform accounts (operators) name one.
async fn list_scope(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    word: &str,
    query: Option<&str>,
) -> Result<String> {
    ctx.describe(action, word);
    let query: TenantQuery = parse_query(query)?;
    let scope = match &query.tenant {
        Some(id) => {
            let id = canonical_id(id, "tenant")?;
            let tenant = accounts::get_tenant(&c.db, &id).await?;
            Resource::Tenant {
                id: tenant.id,
                name: tenant.name,
            }
        }
        None => own_scope_of(c, ctx).await?,
    };
    ctx.authorize(action, &scope).await?;
    let Resource::Tenant { id, .. } = scope else {
        return Err(Error::invalid(
            "platform accounts name a tenant: ?tenant=<id>",
        ));
    };
    ctx.permit().await?;
    Ok(id)
}

/// The caller's own tenant, for a create.
async fn create_scope(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    word: &str,
) -> Result<String> {
    ctx.describe(action, word);
    let scope = own_scope_of(c, ctx).await?;
    ctx.authorize(action, &scope).await?;
    match scope {
        Resource::Tenant { id, .. } => Ok(id),
        _ => Err(Error::NotFound { what: "tenant" }),
    }
}

async fn authorize_net(
    ctx: &RequestCtx,
    action: &str,
    kind: NetKind,
    id: &str,
    tenant: &str,
    name: &str,
) -> Result<()> {
    ctx.authorize(
        action,
        &Resource::Net {
            kind,
            id: id.into(),
            tenant: tenant.into(),
            name: name.into(),
        },
    )
    .await
}

async fn vpc_for(c: &Controller, ctx: &RequestCtx, action: &str, id: &str) -> Result<api::Vpc> {
    ctx.describe(action, format!("vpc/{}", loggable_id(id)));
    let id = canonical_id(id, "vpc")?;
    let vpc = network::find_vpc(&c.db, &id).await?;
    authorize_net(
        ctx,
        action,
        NetKind::Vpc,
        &vpc.id,
        &vpc.tenant_id,
        &vpc.name,
    )
    .await?;
    Ok(vpc)
}

async fn subnet_for(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    id: &str,
) -> Result<api::Subnet> {
    ctx.describe(action, format!("subnet/{}", loggable_id(id)));
    let id = canonical_id(id, "subnet")?;
    let subnet = network::find_subnet(&c.db, &id).await?;
    authorize_net(
        ctx,
        action,
        NetKind::Subnet,
        &subnet.id,
        &subnet.tenant_id,
        &subnet.name,
    )
    .await?;
    Ok(subnet)
}

async fn group_for(
    c: &Controller,
    ctx: &RequestCtx,
    action: &str,
    id: &str,
) -> Result<api::SecurityGroup> {
    ctx.describe(action, format!("security-group/{}", loggable_id(id)));
    let id = canonical_id(id, "security group")?;
    let group = network::find_group(&c.db, &id).await?;
    authorize_net(
        ctx,
        action,
        NetKind::SecurityGroup,
        &group.id,
        &group.tenant_id,
        &group.name,
    )
    .await?;
    Ok(group)
}

async fn port_for(c: &Controller, ctx: &RequestCtx, action: &str, id: &str) -> Result<api::Port> {
    ctx.describe(action, format!("port/{}", loggable_id(id)));
    let id = canonical_id(id, "port")?;
    let port = network::find_port(&c.db, &id).await?;
    authorize_net(
        ctx,
        action,
        NetKind::Port,
        &port.id,
        &port.tenant_id,
        &port.id,
    )
    .await?;
    Ok(port)
}

fn created<T: serde::Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

// ---- VPCs ----------------------------------------------------------------------------

pub async fn create_vpc(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let tenant = create_scope(&c, &ctx, "vpc.create", "vpc").await?;
    let req: api::VpcCreate = parse(&body)?;
    ctx.permit().await?;
    Ok(created(network::create_vpc(&c.db, &tenant, &req).await?))
}

pub async fn list_vpcs(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::Vpc>>> {
    let tenant = list_scope(&c, &ctx, "vpc.list", "vpc", query.as_deref()).await?;
    Ok(Json(network::list_vpcs(&c.db, &tenant).await?))
}

pub async fn show_vpc(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Vpc>> {
    let vpc = vpc_for(&c, &ctx, "vpc.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(vpc))
}

pub async fn delete_vpc(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let vpc = vpc_for(&c, &ctx, "vpc.delete", &id).await?;
    ctx.permit().await?;
    network::delete_vpc(&c.db, &vpc).await?;
    c.compute.network_changed();
    Ok(StatusCode::NO_CONTENT)
}

// ---- subnets and ACLs ----------------------------------------------------------------

pub async fn create_subnet(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let vpc = vpc_for(&c, &ctx, "subnet.create", &id).await?;
    let req: api::SubnetCreate = parse(&body)?;
    ctx.permit().await?;
    Ok(created(network::create_subnet(&c.db, &vpc, &req).await?))
}

pub async fn list_subnets(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::Subnet>>> {
    let tenant = list_scope(&c, &ctx, "subnet.list", "subnet", query.as_deref()).await?;
    Ok(Json(network::list_subnets(&c.db, &tenant).await?))
}

pub async fn show_subnet(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Subnet>> {
    let subnet = subnet_for(&c, &ctx, "subnet.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(subnet))
}

pub async fn delete_subnet(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let subnet = subnet_for(&c, &ctx, "subnet.delete", &id).await?;
    ctx.permit().await?;
    network::delete_subnet(&c.db, &subnet).await?;
    c.compute.network_changed();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn set_acl(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<api::Subnet>> {
    let subnet = subnet_for(&c, &ctx, "subnet.acl_set", &id).await?;
    let req: api::AclSet = parse(&body)?;
    ctx.permit().await?;
    let subnet = network::set_acl(&c.db, &subnet, &req.rules).await?;
    c.compute.network_changed();
    Ok(Json(subnet))
}

// ---- security groups -----------------------------------------------------------------

pub async fn create_group(State(c): Ctl, ctx: RequestCtx, body: Bytes) -> Result<Response> {
    let tenant = create_scope(&c, &ctx, "security_group.create", "security-group").await?;
    let req: api::SecurityGroupCreate = parse(&body)?;
    ctx.permit().await?;
    Ok(created(network::create_group(&c.db, &tenant, &req).await?))
}

pub async fn list_groups(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::SecurityGroup>>> {
    let tenant = list_scope(
        &c,
        &ctx,
        "security_group.list",
        "security-group",
        query.as_deref(),
    )
    .await?;
    Ok(Json(network::list_groups(&c.db, &tenant).await?))
}

pub async fn show_group(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::SecurityGroup>> {
    let group = group_for(&c, &ctx, "security_group.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(group))
}

pub async fn delete_group(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let group = group_for(&c, &ctx, "security_group.delete", &id).await?;
    ctx.permit().await?;
    network::delete_group(&c.db, &group).await?;
    c.compute.network_changed();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn add_rule(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let group = group_for(&c, &ctx, "security_group.rule_add", &id).await?;
    let req: api::SecurityGroupRuleCreate = parse(&body)?;
    ctx.permit().await?;
    let rule = network::add_rule(&c.db, &group, &req).await?;
    c.compute.network_changed();
    Ok(created(rule))
}

pub async fn delete_rule(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    ctx.describe(
        "security_group.rule_delete",
        format!("security-group-rule/{}", loggable_id(&id)),
    );
    let id = canonical_id(&id, "security group")?;
    let (rule, group) = network::find_rule(&c.db, &id).await?;
    authorize_net(
        &ctx,
        "security_group.rule_delete",
        NetKind::SecurityGroup,
        &group.id,
        &group.tenant_id,
        &group.name,
    )
    .await?;
    ctx.describe(
        "security_group.rule_delete",
        format!("security-group/{}/rule/{}", group.id, rule.id),
    );
    ctx.permit().await?;
    network::delete_rule(&c.db, &rule).await?;
    c.compute.network_changed();
    Ok(StatusCode::NO_CONTENT)
}

// ---- ports ---------------------------------------------------------------------------

pub async fn list_ports(
    State(c): Ctl,
    ctx: RequestCtx,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<api::Port>>> {
    let tenant = list_scope(&c, &ctx, "port.list", "port", query.as_deref()).await?;
    Ok(Json(network::list_ports(&c.db, &tenant).await?))
}

pub async fn show_port(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<api::Port>> {
    let port = port_for(&c, &ctx, "port.show", &id).await?;
    ctx.permit().await?;
    Ok(Json(port))
}

pub async fn update_port(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<api::Port>> {
    let port = port_for(&c, &ctx, "port.update", &id).await?;
    let req: api::PortUpdate = parse(&body)?;
    ctx.permit().await?;
    let port = network::update_port(&c.db, &port, &req).await?;
    c.compute.network_changed();
    Ok(Json(port))
}

/// The port's traffic: frames its anti-spoofing dropped, and its flows of the last two
/// minutes (5-tuple, packets, bytes, accepted or denied).
pub async fn port_traffic(
    State(c): Ctl,
    ctx: RequestCtx,
    Path(id): Path<String>,
) -> Result<Json<palisade_common::agent_api::PortTraffic>> {
    let port = port_for(&c, &ctx, "port.traffic", &id).await?;
    ctx.permit().await?;
    let traffic = c.compute.traffic().await?;
    Ok(Json(
        traffic
            .ports
            .into_iter()
            .find(|t| t.port_id == port.id)
            .unwrap_or(palisade_common::agent_api::PortTraffic {
                port_id: port.id,
                ..Default::default()
            }),
    ))
}
