//! Tenant networks: VPCs, subnets and their ACLs, security groups and their rules, and the
//! instances' ports; and [`host_network`], the whole network a host must carry, which the
//! reconciler hands to the agent.
//!
//! Everything a tenant sends is checked here and stored in canonical form (`net.rs` types);
//! what another tenant owns is "not found", exactly like what does not exist.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use palisade_common::agent_api::{AclRuleNet, HostNetwork, PortNet, SgRuleNet, SubnetNet, VpcNet};
use palisade_common::api::{self, AclRule, Port, SecurityGroup, SecurityGroupRule, Subnet, Vpc};
use palisade_common::net::{
    self, AclAction, Direction, Ipv4Net, Mac, NetError, PortRange, Protocol,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};

use crate::db::{new_id, now, Db};
use crate::error::{Error, Result};

/// Most rules in one security group, and in one ACL.
pub const MAX_GROUP_RULES: usize = 2000;
pub const MAX_ACL_RULES: usize = 100;
/// Most security groups on one port.
pub const MAX_PORT_GROUPS: usize = 16;

fn bad(e: NetError) -> Error {
    Error::invalid(e.0)
}

fn check_name(name: &str, what: &str) -> Result<()> {
    if api::is_valid_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} name: 1-63 of A-Z a-z 0-9 - _ ."
        )))
    }
}

fn taken(what: &str) -> Error {
    Error::Conflict {
        code: "name_taken",
        message: format!("a {what} with this name exists"),
    }
}

fn in_use(message: &str) -> Error {
    Error::Conflict {
        code: "in_use",
        message: message.into(),
    }
}

// ---- VPCs ----------------------------------------------------------------------------

fn vpc_from_row(row: &SqliteRow) -> Vpc {
    Vpc {
        id: row.get("id"),
        tenant_id: row.get("tenant_id"),
        name: row.get("name"),
        cidr: row.get("cidr"),
        vni: row.get::<i64, _>("vni") as u32,
        created_at: row.get("created_at"),
    }
}

pub async fn create_vpc(db: &Db, tenant_id: &str, req: &api::VpcCreate) -> Result<Vpc> {
    check_name(&req.name, "VPC")?;
    let cidr = net::parse_cidr(&req.cidr).map_err(bad)?;
    net::check_vpc_cidr(&cidr).map_err(bad)?;
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    // The lowest VNI no VPC holds.
    let used: Vec<i64> = sqlx::query_scalar("SELECT vni FROM vpcs ORDER BY vni")
        .fetch_all(&mut *tx)
        .await?;
    let vni = (1..=65535i64)
        .zip(used.iter().copied().chain(std::iter::repeat(i64::MAX)))
        .find(|(want, have)| want != have)
        .map(|(want, _)| want)
        .ok_or(Error::Unavailable {
            code: "no_vni",
            message: "every VXLAN network identifier is in use".into(),
        })?;
    let vpc = Vpc {
        id: new_id(),
        tenant_id: tenant_id.into(),
        name: req.name.clone(),
        cidr: cidr.to_string(),
        vni: vni as u32,
        created_at: now(),
    };
    let inserted = sqlx::query(
        "INSERT INTO vpcs (id, tenant_id, name, cidr, vni, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, name) DO NOTHING",
    )
    .bind(&vpc.id)
    .bind(&vpc.tenant_id)
    .bind(&vpc.name)
    .bind(&vpc.cidr)
    .bind(vni)
    .bind(&vpc.created_at)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(taken("VPC"));
    }
    tx.commit().await?;
    Ok(vpc)
}

pub async fn list_vpcs(db: &Db, tenant_id: &str) -> Result<Vec<Vpc>> {
    let rows = sqlx::query("SELECT * FROM vpcs WHERE tenant_id = $1 ORDER BY created_at, id")
        .bind(tenant_id)
        .fetch_all(&db.pool)
        .await?;
    Ok(rows.iter().map(vpc_from_row).collect())
}

/// A VPC by id, whoever owns it (the caller's right to see it is checked by authorization).
pub async fn find_vpc(db: &Db, id: &str) -> Result<Vpc> {
    let row = sqlx::query("SELECT * FROM vpcs WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound { what: "vpc" })?;
    Ok(vpc_from_row(&row))
}

pub async fn delete_vpc(db: &Db, vpc: &Vpc) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let subnets: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM subnets WHERE vpc_id = $1")
        .bind(&vpc.id)
        .fetch_one(&mut *tx)
        .await?;
    if subnets > 0 {
        return Err(in_use("the VPC still has subnets"));
    }
    sqlx::query("DELETE FROM vpcs WHERE id = $1")
        .bind(&vpc.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

// ---- subnets and ACLs ----------------------------------------------------------------

async fn acl_of(db: &Db, subnet_id: &str) -> Result<Vec<AclRule>> {
    let rows = sqlx::query("SELECT * FROM acl_rules WHERE subnet_id = $1 ORDER BY position")
        .bind(subnet_id)
        .fetch_all(&db.pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| AclRule {
            direction: r.get("direction"),
            action: r.get("action"),
            protocol: r.get("protocol"),
            port_from: r.get::<Option<i64>, _>("port_from").map(|p| p as u32),
            port_to: r.get::<Option<i64>, _>("port_to").map(|p| p as u32),
            cidr: r.get("cidr"),
        })
        .collect())
}

async fn subnet_from_row(db: &Db, row: &SqliteRow) -> Result<Subnet> {
    let cidr: String = row.get("cidr");
    let gateway = net::parse_cidr(&cidr)
        .map(|n| net::gateway(&n).to_string())
        .unwrap_or_default();
    let id: String = row.get("id");
    Ok(Subnet {
        acl: acl_of(db, &id).await?,
        id,
        tenant_id: row.get("tenant_id"),
        vpc_id: row.get("vpc_id"),
        name: row.get("name"),
        cidr,
        gateway,
        created_at: row.get("created_at"),
    })
}

pub async fn create_subnet(db: &Db, vpc: &Vpc, req: &api::SubnetCreate) -> Result<Subnet> {
    check_name(&req.name, "subnet")?;
    let cidr = net::parse_cidr(&req.cidr).map_err(bad)?;
    let vpc_cidr = net::parse_cidr(&vpc.cidr).map_err(bad)?;
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let siblings: Vec<String> = sqlx::query_scalar("SELECT cidr FROM subnets WHERE vpc_id = $1")
        .bind(&vpc.id)
        .fetch_all(&mut *tx)
        .await?;
    let siblings: Vec<Ipv4Net> = siblings
        .iter()
        .filter_map(|s| net::parse_cidr(s).ok())
        .collect();
    net::check_subnet_cidr(&cidr, &vpc_cidr, &siblings).map_err(bad)?;
    let id = new_id();
    let inserted = sqlx::query(
        "INSERT INTO subnets (id, tenant_id, vpc_id, name, cidr, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (vpc_id, name) DO NOTHING",
    )
    .bind(&id)
    .bind(&vpc.tenant_id)
    .bind(&vpc.id)
    .bind(&req.name)
    .bind(cidr.to_string())
    .bind(now())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(taken("subnet"));
    }
    tx.commit().await?;
    find_subnet(db, &id).await
}

pub async fn list_subnets(db: &Db, tenant_id: &str) -> Result<Vec<Subnet>> {
    let rows = sqlx::query("SELECT * FROM subnets WHERE tenant_id = $1 ORDER BY created_at, id")
        .bind(tenant_id)
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::new();
    for row in &rows {
        out.push(subnet_from_row(db, row).await?);
    }
    Ok(out)
}

pub async fn find_subnet(db: &Db, id: &str) -> Result<Subnet> {
    let row = sqlx::query("SELECT * FROM subnets WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound { what: "subnet" })?;
    subnet_from_row(db, &row).await
}

pub async fn delete_subnet(db: &Db, subnet: &Subnet) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let ports: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ports WHERE subnet_id = $1")
        .bind(&subnet.id)
        .fetch_one(&mut *tx)
        .await?;
    if ports > 0 {
        return Err(in_use("instances still have ports in the subnet"));
    }
    for sql in [
        "DELETE FROM acl_rules WHERE subnet_id = $1",
        "DELETE FROM subnets WHERE id = $1",
    ] {
        sqlx::query(sql).bind(&subnet.id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ports of tcp and udp rules: both or neither; one alone means that single port.
fn rule_ports(protocol: Protocol, from: Option<u32>, to: Option<u32>) -> Result<Option<PortRange>> {
    match (from, to) {
        (None, None) => Ok(None),
        _ if !protocol.has_ports() => Err(Error::invalid(format!(
            "{} rules take no ports",
            protocol.as_str()
        ))),
        (Some(f), None) | (None, Some(f)) => PortRange::new(f, f).map(Some).map_err(bad),
        (Some(f), Some(t)) => PortRange::new(f, t).map(Some).map_err(bad),
    }
}

fn check_acl_rule(rule: &AclRule) -> Result<AclRuleNet> {
    let direction: Direction = rule.direction.parse().map_err(bad)?;
    let action = match rule.action.as_str() {
        "allow" => AclAction::Allow,
        "deny" => AclAction::Deny,
        _ => return Err(Error::invalid("an ACL rule's action is allow or deny")),
    };
    let protocol: Protocol = rule.protocol.parse().map_err(bad)?;
    let ports = rule_ports(protocol, rule.port_from, rule.port_to)?;
    let cidr = net::parse_cidr(&rule.cidr).map_err(bad)?;
    net::check_remote_cidr(&cidr).map_err(bad)?;
    Ok(AclRuleNet {
        direction,
        action,
        protocol,
        ports,
        cidr,
    })
}

/// Replaces a subnet's whole ACL at once; a bad rule refuses the lot.
pub async fn set_acl(db: &Db, subnet: &Subnet, rules: &[AclRule]) -> Result<Subnet> {
    if rules.len() > MAX_ACL_RULES {
        return Err(Error::invalid(format!(
            "an ACL holds at most {MAX_ACL_RULES} rules"
        )));
    }
    let checked: Vec<AclRuleNet> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            check_acl_rule(r).map_err(|e| match e {
                Error::Invalid { code, message } => Error::Invalid {
                    code,
                    message: format!("rule {}: {message}", i + 1),
                },
                e => e,
            })
        })
        .collect::<Result<_>>()?;
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query("DELETE FROM acl_rules WHERE subnet_id = $1")
        .bind(&subnet.id)
        .execute(&mut *tx)
        .await?;
    for (position, rule) in checked.iter().enumerate() {
        sqlx::query(
            "INSERT INTO acl_rules (subnet_id, position, direction, action, protocol, \
             port_from, port_to, cidr) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&subnet.id)
        .bind(position as i64)
        .bind(rule.direction.as_str())
        .bind(match rule.action {
            AclAction::Allow => "allow",
            AclAction::Deny => "deny",
        })
        .bind(rule.protocol.as_str())
        .bind(rule.ports.map(|p| i64::from(p.from)))
        .bind(rule.ports.map(|p| i64::from(p.to)))
        .bind(rule.cidr.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    find_subnet(db, &subnet.id).await
}

// ---- security groups -----------------------------------------------------------------

fn rule_from_row(row: &SqliteRow) -> SecurityGroupRule {
    SecurityGroupRule {
        id: row.get("id"),
        group_id: row.get("group_id"),
        direction: row.get("direction"),
        protocol: row.get("protocol"),
        port_from: row.get::<Option<i64>, _>("port_from").map(|p| p as u32),
        port_to: row.get::<Option<i64>, _>("port_to").map(|p| p as u32),
        cidr: row.get("cidr"),
        remote_group: row.get("remote_group_id"),
        created_at: row.get("created_at"),
    }
}

async fn group_from_row(db: &Db, row: &SqliteRow) -> Result<SecurityGroup> {
    let id: String = row.get("id");
    let rules = sqlx::query("SELECT * FROM sg_rules WHERE group_id = $1 ORDER BY created_at, id")
        .bind(&id)
        .fetch_all(&db.pool)
        .await?;
    Ok(SecurityGroup {
        rules: rules.iter().map(rule_from_row).collect(),
        id,
        tenant_id: row.get("tenant_id"),
        name: row.get("name"),
        description: row.get("description"),
        created_at: row.get("created_at"),
    })
}

/// A new group allows nothing in and everything out (its one rule, which may be removed).
pub async fn create_group(
    db: &Db,
    tenant_id: &str,
    req: &api::SecurityGroupCreate,
) -> Result<SecurityGroup> {
    check_name(&req.name, "security group")?;
    if req.description.len() > 255
        || req
            .description
            .chars()
            .any(|c| c.is_control() || api::is_invisible_format_char(c))
    {
        return Err(Error::invalid(
            "description: at most 255 bytes of printable text on one line",
        ));
    }
    let id = new_id();
    let created_at = now();
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let inserted = sqlx::query(
        "INSERT INTO security_groups (id, tenant_id, name, description, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, name) DO NOTHING",
    )
    .bind(&id)
    .bind(tenant_id)
    .bind(&req.name)
    .bind(&req.description)
    .bind(&created_at)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(taken("security group"));
    }
    sqlx::query(
        "INSERT INTO sg_rules (id, group_id, direction, protocol, cidr, created_at) \
         VALUES ($1, $2, 'egress', 'any', '0.0.0.0/0', $3)",
    )
    .bind(new_id())
    .bind(&id)
    .bind(&created_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    find_group(db, &id).await
}

pub async fn list_groups(db: &Db, tenant_id: &str) -> Result<Vec<SecurityGroup>> {
    let rows =
        sqlx::query("SELECT * FROM security_groups WHERE tenant_id = $1 ORDER BY created_at, id")
            .bind(tenant_id)
            .fetch_all(&db.pool)
            .await?;
    let mut out = Vec::new();
    for row in &rows {
        out.push(group_from_row(db, row).await?);
    }
    Ok(out)
}

pub async fn find_group(db: &Db, id: &str) -> Result<SecurityGroup> {
    let row = sqlx::query("SELECT * FROM security_groups WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound {
            what: "security group",
        })?;
    group_from_row(db, &row).await
}

pub async fn delete_group(db: &Db, group: &SecurityGroup) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let ports: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM port_groups WHERE group_id = $1")
        .bind(&group.id)
        .fetch_one(&mut *tx)
        .await?;
    if ports > 0 {
        return Err(in_use("ports still use the security group"));
    }
    let referrers: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sg_rules WHERE remote_group_id = $1 AND group_id != $1",
    )
    .bind(&group.id)
    .fetch_one(&mut *tx)
    .await?;
    if referrers > 0 {
        return Err(in_use("rules of other security groups name it"));
    }
    for sql in [
        "DELETE FROM sg_rules WHERE group_id = $1",
        "DELETE FROM security_groups WHERE id = $1",
    ] {
        sqlx::query(sql).bind(&group.id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Adds a rule. The remote group must be the same tenant's: another tenant's is not found.
pub async fn add_rule(
    db: &Db,
    group: &SecurityGroup,
    req: &api::SecurityGroupRuleCreate,
) -> Result<SecurityGroupRule> {
    let direction: Direction = req.direction.parse().map_err(bad)?;
    let protocol: Protocol = req.protocol.parse().map_err(bad)?;
    let ports = rule_ports(protocol, req.port_from, req.port_to)?;
    let (cidr, remote) = match (&req.cidr, &req.remote_group) {
        (Some(cidr), None) => {
            let cidr = net::parse_cidr(cidr).map_err(bad)?;
            net::check_remote_cidr(&cidr).map_err(bad)?;
            (Some(cidr.to_string()), None)
        }
        (None, Some(remote)) => {
            let remote = crate::access::handlers::canonical_id(remote, "security group")?;
            let theirs: Option<String> =
                sqlx::query_scalar("SELECT tenant_id FROM security_groups WHERE id = $1")
                    .bind(&remote)
                    .fetch_optional(&db.pool)
                    .await?;
            if theirs.as_deref() != Some(group.tenant_id.as_str()) {
                return Err(Error::NotFound {
                    what: "security group",
                });
            }
            (None, Some(remote))
        }
        _ => {
            return Err(Error::invalid(
                "a rule names its far end with exactly one of cidr and remote_group",
            ))
        }
    };
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let existing = sqlx::query("SELECT * FROM sg_rules WHERE group_id = $1")
        .bind(&group.id)
        .fetch_all(&mut *tx)
        .await?;
    if existing.len() >= MAX_GROUP_RULES {
        return Err(Error::invalid(format!(
            "a security group holds at most {MAX_GROUP_RULES} rules"
        )));
    }
    let rule = SecurityGroupRule {
        id: new_id(),
        group_id: group.id.clone(),
        direction: direction.as_str().into(),
        protocol: protocol.as_str().into(),
        port_from: ports.map(|p| u32::from(p.from)),
        port_to: ports.map(|p| u32::from(p.to)),
        cidr,
        remote_group: remote,
        created_at: now(),
    };
    let same = |r: &SecurityGroupRule| {
        (
            &r.direction,
            &r.protocol,
            r.port_from,
            r.port_to,
            &r.cidr,
            &r.remote_group,
        ) == (
            &rule.direction,
            &rule.protocol,
            rule.port_from,
            rule.port_to,
            &rule.cidr,
            &rule.remote_group,
        )
    };
    if existing.iter().map(rule_from_row).any(|r| same(&r)) {
        return Err(Error::Conflict {
            code: "duplicate_rule",
            message: "the security group already has this rule".into(),
        });
    }
    sqlx::query(
        "INSERT INTO sg_rules (id, group_id, direction, protocol, port_from, port_to, cidr, \
         remote_group_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&rule.id)
    .bind(&rule.group_id)
    .bind(&rule.direction)
    .bind(&rule.protocol)
    .bind(rule.port_from.map(i64::from))
    .bind(rule.port_to.map(i64::from))
    .bind(&rule.cidr)
    .bind(&rule.remote_group)
    .bind(&rule.created_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rule)
}

/// A rule and the group that holds it.
pub async fn find_rule(db: &Db, id: &str) -> Result<(SecurityGroupRule, SecurityGroup)> {
    let row = sqlx::query("SELECT * FROM sg_rules WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        // The same word as for a rule of a group the caller may not see.
        .ok_or(Error::NotFound {
            what: "security group",
        })?;
    let rule = rule_from_row(&row);
    let group = find_group(db, &rule.group_id).await?;
    Ok((rule, group))
}

pub async fn delete_rule(db: &Db, rule: &SecurityGroupRule) -> Result<()> {
    sqlx::query("DELETE FROM sg_rules WHERE id = $1")
        .bind(&rule.id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

// ---- ports ---------------------------------------------------------------------------

/// What an instance create asked of the network, checked.
#[derive(Debug, Clone)]
pub struct PortPlan {
    pub subnet: Subnet,
    pub groups: Vec<String>,
}

/// Checks the subnet and groups an instance create names: the tenant's own, or not found.
pub async fn plan_port(
    db: &Db,
    tenant_id: &str,
    subnet: &str,
    groups: &[String],
) -> Result<PortPlan> {
    let subnet_id = crate::access::handlers::canonical_id(subnet, "subnet")?;
    let subnet = find_subnet(db, &subnet_id)
        .await
        .ok()
        .filter(|s| s.tenant_id == tenant_id)
        .ok_or(Error::NotFound { what: "subnet" })?;
    Ok(PortPlan {
        subnet,
        groups: check_groups(db, tenant_id, groups).await?,
    })
}

async fn check_groups(db: &Db, tenant_id: &str, groups: &[String]) -> Result<Vec<String>> {
    if groups.len() > MAX_PORT_GROUPS {
        return Err(Error::invalid(format!(
            "a port has at most {MAX_PORT_GROUPS} security groups"
        )));
    }
    let mut out: Vec<String> = Vec::new();
    for group in groups {
        let id = crate::access::handlers::canonical_id(group, "security group")?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT tenant_id FROM security_groups WHERE id = $1")
                .bind(&id)
                .fetch_optional(&db.pool)
                .await?;
        if owner.as_deref() != Some(tenant_id) {
            return Err(Error::NotFound {
                what: "security group",
            });
        }
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Creates an instance's port inside the instance's create transaction: the lowest free
/// address of the subnet, a MAC derived from the port id.
pub async fn insert_port(
    tx: &mut Transaction<'_, Sqlite>,
    tenant_id: &str,
    instance_id: &str,
    plan: &PortPlan,
) -> Result<()> {
    let cidr = net::parse_cidr(&plan.subnet.cidr).map_err(bad)?;
    let taken: Vec<String> = sqlx::query_scalar("SELECT ip FROM ports WHERE subnet_id = $1")
        .bind(&plan.subnet.id)
        .fetch_all(&mut **tx)
        .await?;
    let ip = net::assignable(&cidr)
        .find(|a| !taken.contains(&a.to_string()))
        .ok_or(Error::Conflict {
            code: "subnet_full",
            message: "the subnet has no free address".into(),
        })?;
    let id = new_id();
    sqlx::query(
        "INSERT INTO ports (id, tenant_id, instance_id, vpc_id, subnet_id, mac, ip, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(tenant_id)
    .bind(instance_id)
    .bind(&plan.subnet.vpc_id)
    .bind(&plan.subnet.id)
    .bind(Mac::for_port(&id).to_string())
    .bind(ip.to_string())
    .bind(now())
    .execute(&mut **tx)
    .await?;
    for group in &plan.groups {
        sqlx::query("INSERT INTO port_groups (port_id, group_id) VALUES ($1, $2)")
            .bind(&id)
            .bind(group)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Removes an instance's port (its instance is gone).
pub async fn delete_port_of(db: &Db, instance_id: &str) -> Result<()> {
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    let port: Option<String> = sqlx::query_scalar("SELECT id FROM ports WHERE instance_id = $1")
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(port) = port {
        for sql in [
            "DELETE FROM port_groups WHERE port_id = $1",
            "DELETE FROM ports WHERE id = $1",
        ] {
            sqlx::query(sql).bind(&port).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn port_from_row(db: &Db, row: &SqliteRow) -> Result<Port> {
    let id: String = row.get("id");
    let groups: Vec<String> =
        sqlx::query_scalar("SELECT group_id FROM port_groups WHERE port_id = $1 ORDER BY group_id")
            .bind(&id)
            .fetch_all(&db.pool)
            .await?;
    Ok(Port {
        id,
        tenant_id: row.get("tenant_id"),
        instance_id: row.get("instance_id"),
        vpc_id: row.get("vpc_id"),
        subnet_id: row.get("subnet_id"),
        mac: row.get("mac"),
        ip: row.get("ip"),
        security_groups: groups,
        ingress_kbit: row.get::<i64, _>("ingress_kbit") as u32,
        egress_kbit: row.get::<i64, _>("egress_kbit") as u32,
        created_at: row.get("created_at"),
    })
}

pub async fn list_ports(db: &Db, tenant_id: &str) -> Result<Vec<Port>> {
    let rows = sqlx::query("SELECT * FROM ports WHERE tenant_id = $1 ORDER BY created_at, id")
        .bind(tenant_id)
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::new();
    for row in &rows {
        out.push(port_from_row(db, row).await?);
    }
    Ok(out)
}

pub async fn find_port(db: &Db, id: &str) -> Result<Port> {
    let row = sqlx::query("SELECT * FROM ports WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(Error::NotFound { what: "port" })?;
    port_from_row(db, &row).await
}

/// The port of an instance, if it has one.
pub async fn port_of(db: &Db, instance_id: &str) -> Result<Option<Port>> {
    let row = sqlx::query("SELECT * FROM ports WHERE instance_id = $1")
        .bind(instance_id)
        .fetch_optional(&db.pool)
        .await?;
    match row {
        Some(row) => Ok(Some(port_from_row(db, &row).await?)),
        None => Ok(None),
    }
}

/// The flavor ceiling of a port's instance, in kbit/s.
async fn ceiling_kbit(db: &Db, instance_id: &str) -> Result<u32> {
    let flavor: String = sqlx::query_scalar("SELECT flavor FROM instances WHERE id = $1")
        .bind(instance_id)
        .fetch_one(&db.pool)
        .await?;
    Ok(api::flavors()
        .iter()
        .find(|f| f.name == flavor)
        .map_or(0, |f| f.bandwidth_mbps * 1000))
}

/// Changes a port's security groups and bandwidth (0: the flavor's ceiling).
pub async fn update_port(db: &Db, port: &Port, req: &api::PortUpdate) -> Result<Port> {
    let ceiling = ceiling_kbit(db, &port.instance_id).await?;
    for (what, value) in [
        ("ingress_kbit", req.ingress_kbit),
        ("egress_kbit", req.egress_kbit),
    ] {
        if value.is_some_and(|v| v > ceiling) {
            return Err(Error::invalid(format!(
                "{what} may be at most the flavor's ceiling, {ceiling} kbit/s"
            )));
        }
    }
    let groups = match &req.security_groups {
        Some(groups) => Some(check_groups(db, &port.tenant_id, groups).await?),
        None => None,
    };
    let mut tx = db.pool.begin_with("BEGIN IMMEDIATE").await?;
    if let Some(groups) = &groups {
        sqlx::query("DELETE FROM port_groups WHERE port_id = $1")
            .bind(&port.id)
            .execute(&mut *tx)
            .await?;
        for group in groups {
            sqlx::query("INSERT INTO port_groups (port_id, group_id) VALUES ($1, $2)")
                .bind(&port.id)
                .bind(group)
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query(
        "UPDATE ports SET ingress_kbit = COALESCE($2, ingress_kbit), \
         egress_kbit = COALESCE($3, egress_kbit) WHERE id = $1",
    )
    .bind(&port.id)
    .bind(req.ingress_kbit.map(i64::from))
    .bind(req.egress_kbit.map(i64::from))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    find_port(db, &port.id).await
}

// ---- what a host carries -------------------------------------------------------------

/// The whole network of the (single) host: every VPC with a port, every port of a live
/// instance, each port's rules the union of its groups', remote groups resolved to the
/// addresses of their ports in the same VPC, bandwidth from the port or its flavor.
pub async fn host_network(db: &Db) -> Result<HostNetwork> {
    let ports = sqlx::query(
        "SELECT p.*, i.flavor FROM ports p JOIN instances i ON i.id = p.instance_id \
         WHERE i.deleted_at IS NULL ORDER BY p.id",
    )
    .fetch_all(&db.pool)
    .await?;
    let memberships = sqlx::query("SELECT port_id, group_id FROM port_groups")
        .fetch_all(&db.pool)
        .await?;
    let mut groups_of: HashMap<String, Vec<String>> = HashMap::new();
    for m in &memberships {
        groups_of
            .entry(m.get("port_id"))
            .or_default()
            .push(m.get("group_id"));
    }
    // (group, VPC) → member addresses, for remote-group rules.
    let mut members: HashMap<(String, String), Vec<Ipv4Addr>> = HashMap::new();
    for p in &ports {
        let id: String = p.get("id");
        let ip: Ipv4Addr = p
            .get::<String, _>("ip")
            .parse()
            .map_err(|e| Error::Internal(anyhow::anyhow!("port {id}: {e}")))?;
        for g in groups_of.get(&id).into_iter().flatten() {
            members
                .entry((g.clone(), p.get("vpc_id")))
                .or_default()
                .push(ip);
        }
    }
    let rule_rows = sqlx::query("SELECT * FROM sg_rules")
        .fetch_all(&db.pool)
        .await?;
    let mut rules_of: HashMap<String, Vec<SecurityGroupRule>> = HashMap::new();
    for r in rule_rows.iter().map(rule_from_row) {
        rules_of.entry(r.group_id.clone()).or_default().push(r);
    }

    let mut vpc_ids: BTreeMap<String, ()> = BTreeMap::new();
    let mut out_ports = Vec::new();
    for p in &ports {
        let id: String = p.get("id");
        let vpc_id: String = p.get("vpc_id");
        vpc_ids.insert(vpc_id.clone(), ());
        let mut rules = Vec::new();
        for g in groups_of.get(&id).into_iter().flatten() {
            for r in rules_of.get(g).into_iter().flatten() {
                let direction: Direction = r.direction.parse().map_err(|e: NetError| {
                    Error::Internal(anyhow::anyhow!("stored rule {}: {}", r.id, e.0))
                })?;
                let protocol: Protocol = r.protocol.parse().map_err(|e: NetError| {
                    Error::Internal(anyhow::anyhow!("stored rule {}: {}", r.id, e.0))
                })?;
                let ports = match (r.port_from, r.port_to) {
                    (Some(f), Some(t)) => Some(PortRange::new(f, t).map_err(|e| {
                        Error::Internal(anyhow::anyhow!("stored rule {}: {}", r.id, e.0))
                    })?),
                    _ => None,
                };
                let remotes: Vec<Ipv4Net> = match (&r.cidr, &r.remote_group) {
                    (Some(cidr), _) => vec![net::parse_cidr(cidr).map_err(|e| {
                        Error::Internal(anyhow::anyhow!("stored rule {}: {}", r.id, e.0))
                    })?],
                    (None, Some(remote)) => members
                        .get(&(remote.clone(), vpc_id.clone()))
                        .into_iter()
                        .flatten()
                        .map(|ip| Ipv4Net::from(*ip))
                        .collect(),
                    (None, None) => vec![],
                };
                for remote in remotes {
                    rules.push(SgRuleNet {
                        direction,
                        protocol,
                        ports,
                        remote,
                    });
                }
            }
        }
        rules.sort();
        rules.dedup();
        let flavor: String = p.get("flavor");
        let ceiling = api::flavors()
            .iter()
            .find(|f| f.name == flavor)
            .map_or(0, |f| f.bandwidth_mbps * 1000);
        let limit = |v: i64| if v == 0 { ceiling } else { v as u32 };
        out_ports.push(PortNet {
            instance_id: p.get("instance_id"),
            vpc_id,
            subnet_id: p.get("subnet_id"),
            mac: p
                .get::<String, _>("mac")
                .parse()
                .map_err(|e: NetError| Error::Internal(anyhow::anyhow!("port {id}: {}", e.0)))?,
            ip: p
                .get::<String, _>("ip")
                .parse()
                .map_err(|e| Error::Internal(anyhow::anyhow!("port {id}: {e}")))?,
            rules,
            ingress_kbit: limit(p.get("ingress_kbit")),
            egress_kbit: limit(p.get("egress_kbit")),
            id,
        });
    }
    let mut vpcs = Vec::new();
    for vpc_id in vpc_ids.keys() {
        let vpc = find_vpc(db, vpc_id).await?;
        let subnet_rows = sqlx::query("SELECT * FROM subnets WHERE vpc_id = $1 ORDER BY id")
            .bind(vpc_id)
            .fetch_all(&db.pool)
            .await?;
        let mut subnets = Vec::new();
        for row in &subnet_rows {
            let subnet = subnet_from_row(db, row).await?;
            let acl = subnet
                .acl
                .iter()
                .map(check_acl_rule)
                .collect::<Result<Vec<_>>>()?;
            subnets.push(SubnetNet {
                id: subnet.id.clone(),
                cidr: net::parse_cidr(&subnet.cidr).map_err(bad)?,
                acl,
            });
        }
        vpcs.push(VpcNet {
            id: vpc.id,
            vni: vpc.vni,
            subnets,
            external_ip: None,
            floating: vec![],
        });
    }
    Ok(HostNetwork {
        vpcs,
        ports: out_ports,
    })
}
