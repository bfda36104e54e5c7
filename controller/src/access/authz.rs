//! Authorization: one engine (Cedar) for every decision.
//!
//! The role × action matrix (`controller/policy/roles.txt`) is the single statement of what
//! each role may do. At start-up it becomes (1) the action declarations of the Cedar schema
//! (`controller/policy/schema.cedarschema` holds the entity types) and (2) the platform's Cedar
//! policies. A tenant's own policies (uploaded by its admins, validated against the same
//! schema) are evaluated together with the platform's, under one platform `forbid` that no
//! tenant policy can lift: a tenant account never acts on anything outside its tenant.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::service::identity::Principal;

const MATRIX: &str = include_str!("../../policy/roles.txt");
const SCHEMA: &str = include_str!("../../policy/schema.cedarschema");

pub use palisade_common::api::{PLATFORM_ROLES, TENANT_ROLES};

/// One line of the matrix.
#[derive(Debug, Clone)]
pub struct Row {
    pub action: String,
    /// Cedar entity types the action applies to; "Self" is the caller's own `User`.
    pub resources: Vec<String>,
    /// Administrative: MFA-bound callers need a fresh second-factor proof.
    pub admin: bool,
    /// Roles allowed, in the matrix's column order.
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Matrix {
    pub roles: Vec<String>,
    pub rows: Vec<Row>,
}

impl Matrix {
    pub fn builtin() -> anyhow::Result<Matrix> {
        Matrix::parse(MATRIX)
    }

    pub fn parse(text: &str) -> anyhow::Result<Matrix> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        // The header is the last comment line that starts with "# action".
        let header = text
            .lines()
            .rfind(|l| l.trim_start().starts_with("# action"))
            .ok_or_else(|| anyhow::anyhow!("role matrix: no '# action' header"))?;
        let columns: Vec<&str> = header.trim_start_matches('#').split_whitespace().collect();
        anyhow::ensure!(
            columns.len() > 3 && columns[..3] == ["action", "resource", "admin"],
            "role matrix: header must start with 'action resource admin'"
        );
        let roles: Vec<String> = columns[3..].iter().map(|s| s.to_string()).collect();
        for role in &roles {
            anyhow::ensure!(
                PLATFORM_ROLES.contains(&role.as_str()) || TENANT_ROLES.contains(&role.as_str()),
                "role matrix: unknown role {role}"
            );
        }
        let mut rows: Vec<Row> = Vec::new();
        for line in lines.by_ref() {
            let cells: Vec<&str> = line.split_whitespace().collect();
            anyhow::ensure!(
                cells.len() == columns.len(),
                "role matrix: '{line}' has {} cells, the header {}",
                cells.len(),
                columns.len()
            );
            let flag = |cell: &str| match cell {
                "x" => Ok(true),
                "-" => Ok(false),
                other => Err(anyhow::anyhow!("role matrix: '{other}' is neither x nor -")),
            };
            let action = cells[0].to_string();
            anyhow::ensure!(
                !rows.iter().any(|r| r.action == action),
                "role matrix: {action} twice"
            );
            let mut allowed = Vec::new();
            for (role, cell) in roles.iter().zip(&cells[3..]) {
                if flag(cell)? {
                    allowed.push(role.clone());
                }
            }
            rows.push(Row {
                action,
                resources: cells[1].split(',').map(str::to_string).collect(),
                admin: flag(cells[2])?,
                allowed,
            });
        }
        Ok(Matrix { roles, rows })
    }

    pub fn row(&self, action: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.action == action)
    }

    pub fn allows(&self, role: &str, action: &str) -> bool {
        self.row(action)
            .is_some_and(|r| r.allowed.iter().any(|a| a == role))
    }

    /// The Cedar schema: the entity types plus one action declaration per row.
    fn schema_text(&self) -> String {
        let mut text = SCHEMA.to_string();
        for row in &self.rows {
            let resources: Vec<&str> = row
                .resources
                .iter()
                .map(|r| if r == "Self" { "User" } else { r.as_str() })
                .collect();
            text.push_str(&format!(
                "action \"{}\" appliesTo {{ principal: User, resource: [{}], context: \
                 RequestContext }};\n",
                row.action,
                resources.join(", ")
            ));
        }
        text
    }

    /// The platform's policies: per role, one `permit` for its actions, scoped by kind.
    fn platform_policies(&self) -> Vec<String> {
        let mut policies = Vec::new();
        for role in &self.roles {
            let platform = PLATFORM_ROLES.contains(&role.as_str());
            let (own, other): (Vec<&Row>, Vec<&Row>) = self
                .rows
                .iter()
                .filter(|r| r.allowed.contains(role))
                .partition(|r| r.resources == ["Self"]);
            let list = |rows: &[&Row]| {
                rows.iter()
                    .map(|r| format!("Action::\"{}\"", r.action))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !own.is_empty() {
                policies.push(format!(
                    "permit (principal, action in [{}], resource) when {{ principal.role == \
                     \"{role}\" && resource == principal }};",
                    list(&own)
                ));
            }
            if !other.is_empty() {
                let scope = if platform {
                    "principal.tenant == \"\"".to_string()
                } else {
                    "principal.tenant != \"\" && resource.tenant == principal.tenant".to_string()
                };
                policies.push(format!(
                    "permit (principal, action in [{}], resource) when {{ principal.role == \
                     \"{role}\" && {scope} }};",
                    list(&other)
                ));
            }
        }
        // Actions no tenant role has in the table stay out of every tenant account's reach,
        // whatever its tenant's policies permit (disabling or deleting the tenant, say).
        let platform_only: Vec<String> = self
            .rows
            .iter()
            .filter(|r| !r.allowed.iter().any(|a| TENANT_ROLES.contains(&a.as_str())))
            .map(|r| format!("Action::\"{}\"", r.action))
            .collect();
        if !platform_only.is_empty() {
            policies.push(format!(
                "forbid (principal, action in [{}], resource) when {{ principal.tenant != \"\" }};",
                platform_only.join(", ")
            ));
        }
        // The tenant boundary, above every permit a tenant can write.
        policies.push(
            "forbid (principal, action, resource) when { principal.tenant != \"\" && \
             resource.tenant != principal.tenant };"
                .into(),
        );
        policies
    }
}

/// What a request acts on, as a Cedar entity.
#[derive(Debug, Clone)]
pub enum Resource {
    /// The caller's own account (keys, whoami, MFA).
    Caller,
    Platform,
    Tenant {
        id: String,
        name: String,
    },
    User {
        id: String,
        tenant: String,
        name: String,
        role: String,
    },
    Group {
        name: String,
        tenant: String,
    },
    Instance {
        id: String,
        tenant: String,
        name: String,
        tags: Vec<(String, String)>,
    },
    /// A VPC, subnet, security group or port.
    Net {
        kind: NetKind,
        id: String,
        tenant: String,
        name: String,
    },
}

/// The kinds of tenant network objects, each a Cedar entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetKind {
    Vpc,
    Subnet,
    SecurityGroup,
    Port,
}

impl NetKind {
    fn entity_type(self) -> &'static str {
        match self {
            NetKind::Vpc => "Vpc",
            NetKind::Subnet => "Subnet",
            NetKind::SecurityGroup => "SecurityGroup",
            NetKind::Port => "Port",
        }
    }

    /// The word of its audit names and 404s.
    pub fn word(self) -> &'static str {
        match self {
            NetKind::Vpc => "vpc",
            NetKind::Subnet => "subnet",
            NetKind::SecurityGroup => "security-group",
            NetKind::Port => "port",
        }
    }

    /// What a 404 calls it: the same word whether the object is missing or not the caller's.
    pub fn noun(self) -> &'static str {
        match self {
            NetKind::Vpc => "vpc",
            NetKind::Subnet => "subnet",
            NetKind::SecurityGroup => "security group",
            NetKind::Port => "port",
        }
    }

    fn show_action(self) -> &'static str {
        match self {
            NetKind::Vpc => "vpc.show",
            NetKind::Subnet => "subnet.show",
            NetKind::SecurityGroup => "security_group.show",
            NetKind::Port => "port.show",
        }
    }
}

impl Resource {
    /// The Cedar entity: type, id, attributes and tags (`None` for the caller itself).
    #[allow(clippy::type_complexity)]
    fn entity_parts(
        &self,
    ) -> Option<(
        &'static str,
        String,
        Vec<(&'static str, String)>,
        &[(String, String)],
    )> {
        let none: &[(String, String)] = &[];
        Some(match self {
            Resource::Caller => return None,
            Resource::Platform => (
                "Platform",
                "platform".into(),
                vec![("tenant", String::new())],
                none,
            ),
            Resource::Tenant { id, name } => (
                "Tenant",
                id.clone(),
                vec![("tenant", id.clone()), ("name", name.clone())],
                none,
            ),
            Resource::User {
                id,
                tenant,
                name,
                role,
            } => (
                "User",
                id.clone(),
                vec![
                    ("tenant", tenant.clone()),
                    ("role", role.clone()),
                    ("name", name.clone()),
                ],
                none,
            ),
            Resource::Group { name, tenant } => (
                "Group",
                name.clone(),
                vec![("tenant", tenant.clone()), ("name", name.clone())],
                none,
            ),
            Resource::Instance {
                id,
                tenant,
                name,
                tags,
            } => (
                "Instance",
                id.clone(),
                vec![("tenant", tenant.clone()), ("name", name.clone())],
                tags.as_slice(),
            ),
            Resource::Net {
                kind,
                id,
                tenant,
                name,
            } => (
                kind.entity_type(),
                id.clone(),
                vec![("tenant", tenant.clone()), ("name", name.clone())],
                none,
            ),
        })
    }

    /// How the audit record names it (an id a caller sent that is none of ours as a digest).
    pub fn audit_name(&self) -> String {
        use crate::access::server::loggable_id;
        match self {
            Resource::Caller => "self".into(),
            Resource::Platform => "platform".into(),
            Resource::Tenant { id, .. } => format!("tenant/{}", loggable_id(id)),
            Resource::User { id, .. } => format!("user/{}", loggable_id(id)),
            Resource::Group { name, tenant } => {
                format!("tenant/{}/group/{name}", loggable_id(tenant))
            }
            Resource::Instance { id, .. } => format!("instance/{}", loggable_id(id)),
            Resource::Net { kind, id, .. } => format!("{}/{}", kind.word(), loggable_id(id)),
        }
    }

    /// The tenant the resource belongs to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Resource::Caller | Resource::Platform => None,
            Resource::Tenant { id, .. } => Some(id),
            Resource::User { tenant, .. }
            | Resource::Group { tenant, .. }
            | Resource::Instance { tenant, .. }
            | Resource::Net { tenant, .. } => Some(tenant),
        }
    }

    /// The word a 404 uses.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Caller | Resource::User { .. } => "user",
            Resource::Platform => "route",
            Resource::Tenant { .. } => "tenant",
            Resource::Group { .. } => "group",
            Resource::Instance { .. } => "instance",
            Resource::Net { kind, .. } => kind.noun(),
        }
    }

    /// The action whose permission means "may see this object": a refusal on an object the
    /// caller may not see is a 404, not a 403. `None`: the caller always sees it.
    pub fn show_action(&self) -> Option<&'static str> {
        match self {
            Resource::Caller | Resource::Platform => None,
            Resource::Tenant { .. } => Some("tenant.show"),
            Resource::User { .. } => Some("user.show"),
            Resource::Group { .. } => Some("group.list"),
            Resource::Instance { .. } => Some("instance.show"),
            Resource::Net { kind, .. } => Some(kind.show_action()),
        }
    }

    /// The collection a caller acts on for "Platform,Tenant" actions: its tenant, or the
    /// platform for platform accounts.
    pub fn scope_of(principal: &Principal, tenant_name: &str) -> Resource {
        match &principal.tenant_id {
            Some(id) => Resource::Tenant {
                id: id.clone(),
                name: tenant_name.to_string(),
            },
            None => Resource::Platform,
        }
    }
}

fn uid(kind: &str, id: &str) -> anyhow::Result<EntityUid> {
    Ok(EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(kind)?,
        EntityId::new(id),
    ))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

pub struct Authz {
    matrix: Matrix,
    schema: Schema,
    platform: PolicySet,
    authorizer: Authorizer,
    /// Stored policy texts already parsed, by text (bounded; cleared when full).
    parsed: std::sync::Mutex<HashMap<String, std::sync::Arc<PolicySet>>>,
}

/// Longest policy text a tenant or the platform may store.
pub const MAX_POLICY_BYTES: usize = 32 * 1024;
/// Deepest nesting of brackets a policy may use. Cedar's parser recurses per level, and a few
/// hundred levels overflow a thread's stack: the text is measured before Cedar sees it.
const MAX_POLICY_DEPTH: usize = 32;
const MAX_PARSED: usize = 256;

/// The deepest nesting of (), [] and {} in Cedar text, outside string literals and comments.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Policy texts stored by tenants and by the security administrator.
#[derive(Debug, Clone, Default)]
pub struct StoredPolicies {
    pub tenant: String,
    pub platform: String,
}

/// Why a policy upload was refused: the parser's or the validator's own words.
#[derive(Debug)]
pub struct PolicyRejected(pub String);

impl Authz {
    pub fn new() -> anyhow::Result<Authz> {
        Authz::from_matrix(Matrix::builtin()?)
    }

    pub fn from_matrix(matrix: Matrix) -> anyhow::Result<Authz> {
        let (schema, _) = Schema::from_cedarschema_str(&matrix.schema_text())
            .map_err(|e| anyhow::anyhow!("authorization schema: {e:?}"))?;
        let mut platform = PolicySet::new();
        for (n, text) in matrix.platform_policies().iter().enumerate() {
            let policy = Policy::parse(Some(PolicyId::new(format!("platform-{n}"))), text)
                .map_err(|e| anyhow::anyhow!("platform policy {text}: {e:?}"))?;
            platform.add(policy)?;
        }
        let validation = Validator::new(schema.clone()).validate(&platform, ValidationMode::Strict);
        anyhow::ensure!(
            validation.validation_passed(),
            "platform policies do not validate: {validation}"
        );
        Ok(Authz {
            matrix,
            schema,
            platform,
            authorizer: Authorizer::new(),
            parsed: std::sync::Mutex::default(),
        })
    }

    pub fn matrix(&self) -> &Matrix {
        &self.matrix
    }

    /// Parses and validates a tenant's policy text; the error carries the validator's message.
    pub fn check_tenant_policies(&self, text: &str) -> Result<PolicySet, PolicyRejected> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyRejected(format!(
                "policies are limited to {MAX_POLICY_BYTES} bytes"
            )));
        }
        if nesting_depth(text) > MAX_POLICY_DEPTH {
            return Err(PolicyRejected(format!(
                "expressions may nest at most {MAX_POLICY_DEPTH} levels deep"
            )));
        }
        let set = PolicySet::from_str(text).map_err(|e| {
            let details: Vec<String> = e.iter().map(|d| d.to_string()).collect();
            PolicyRejected(format!("{e}: {}", details.join("; ")))
        })?;
        if set.templates().next().is_some() {
            return Err(PolicyRejected("templates are not supported".into()));
        }
        let validation = Validator::new(self.schema.clone()).validate(&set, ValidationMode::Strict);
        if !validation.validation_passed() {
            // The validator repeats one fault for every action it checks: say each once.
            let mut messages: Vec<String> = Vec::new();
            for message in validation.validation_errors().map(|e| format!("{e}")) {
                if !messages.contains(&message) {
                    messages.push(message);
                }
            }
            return Err(PolicyRejected(messages.join("; ")));
        }
        Ok(set)
    }

    /// A stored text, parsed once and then taken from the cache. Texts that fail the upload
    /// checks (size, depth, syntax) are never parsed here.
    fn parsed(&self, text: &str) -> Option<std::sync::Arc<PolicySet>> {
        let mut cache = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = cache.get(text) {
            return Some(set.clone());
        }
        if text.len() > MAX_POLICY_BYTES || nesting_depth(text) > MAX_POLICY_DEPTH {
            return None;
        }
        let set = std::sync::Arc::new(PolicySet::from_str(text).ok()?);
        if cache.len() >= MAX_PARSED {
            cache.clear();
        }
        cache.insert(text.to_string(), set.clone());
        Some(set)
    }

    /// Parses and validates the platform's own policies: like a tenant's, but `forbid` only
    /// (grants come from the role table alone).
    pub fn check_platform_policies(&self, text: &str) -> Result<PolicySet, PolicyRejected> {
        let set = self.check_tenant_policies(text)?;
        if let Some(permit) = set
            .policies()
            .find(|p| p.effect() == cedar_policy::Effect::Permit)
        {
            return Err(PolicyRejected(format!(
                "platform policies may only forbid; {} permits",
                permit.id()
            )));
        }
        Ok(set)
    }

    /// Decides one request. `policies` are the stored texts (validated on upload) of the
    /// caller's tenant and of the platform.
    pub fn is_allowed(
        &self,
        principal: &Principal,
        action: &str,
        resource: &Resource,
        mfa_fresh: bool,
        stored: &StoredPolicies,
    ) -> anyhow::Result<bool> {
        if self.matrix.row(action).is_none() {
            return Ok(false);
        }
        let tenant = principal.tenant_id.clone().unwrap_or_default();
        let principal_uid = uid("User", &principal.user_id)?;
        let mut entities = Vec::new();
        let mut parents = Vec::new();
        for group in &principal.groups {
            let group_uid = uid("Group", group)?;
            parents.push(group_uid.clone());
            entities.push(Entity::new(
                group_uid,
                HashMap::from([
                    ("tenant".to_string(), string(&tenant)),
                    ("name".to_string(), string(group)),
                ]),
                Default::default(),
            )?);
        }
        entities.push(Entity::new_with_tags(
            principal_uid.clone(),
            [
                ("tenant".to_string(), string(&tenant)),
                ("role".to_string(), string(&principal.role)),
                ("name".to_string(), string(&principal.user_name)),
            ],
            parents,
            [],
        )?);
        let resource_uid = match resource.entity_parts() {
            // The caller's own account is already in the set (with its groups).
            None => principal_uid.clone(),
            Some((kind, id, _, _)) if kind == "User" && id == principal.user_id => {
                principal_uid.clone()
            }
            Some((kind, id, attrs, tags)) => {
                let uid = uid(kind, &id)?;
                // A group the caller belongs to is already in the set: this one replaces it.
                entities.retain(|e| e.uid() != uid);
                entities.push(Entity::new_with_tags(
                    uid.clone(),
                    attrs.into_iter().map(|(k, v)| (k.to_string(), string(&v))),
                    [],
                    tags.iter().map(|(k, v)| (k.clone(), string(v))),
                )?);
                uid
            }
        };
        let entities = Entities::from_entities(entities, None)?;
        let context = Context::from_pairs([(
            "mfa_fresh".to_string(),
            RestrictedExpression::new_bool(mfa_fresh),
        )])?;
        let request = Request::new(
            principal_uid,
            uid("Action", action)?,
            resource_uid,
            context,
            None,
        )?;
        let mut policies = self.platform.clone();
        let tenant_text = if principal.tenant_id.is_some() {
            stored.tenant.as_str()
        } else {
            ""
        };
        for text in [tenant_text, stored.platform.as_str()] {
            if text.trim().is_empty() {
                continue;
            }
            match self.parsed(text) {
                Some(set) => {
                    policies.merge(&set, true)?;
                }
                // Checked on upload; should it still not pass, it grants nothing.
                None => tracing::error!("stored policies do not pass the checks"),
            }
        }
        let answer = self
            .authorizer
            .is_authorized(&request, &policies, &entities);
        Ok(answer.decision() == Decision::Allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: &str, tenant: Option<&str>, groups: &[&str]) -> Principal {
        Principal {
            user_id: format!("u-{role}"),
            user_name: role.into(),
            tenant_id: tenant.map(str::to_string),
            role: role.into(),
            key_id: "key".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            mfa_fresh: true,
            mfa_bound: false,
        }
    }

    fn tenant(text: &str) -> StoredPolicies {
        StoredPolicies {
            tenant: text.into(),
            platform: String::new(),
        }
    }

    #[test]
    fn platform_policies_only_forbid_and_bind_everyone() {
        let authz = Authz::new().unwrap();
        let err = authz
            .check_platform_policies("permit (principal, action, resource);")
            .unwrap_err();
        assert!(err.0.contains("only forbid"), "{}", err.0);
        let hold = r#"forbid (principal, action == Action::"instance.delete", resource is Instance)
                      when { resource.hasTag("hold") };"#;
        authz.check_platform_policies(hold).unwrap();
        let stored = StoredPolicies {
            tenant: "permit (principal, action, resource);".into(),
            platform: hold.into(),
        };
        let admin = principal("tenant_admin", Some("t1"), &[]);
        let held = instance("t1", &[("hold", "yes")]);
        assert!(!authz
            .is_allowed(&admin, "instance.delete", &held, true, &stored)
            .unwrap());
        assert!(authz
            .is_allowed(
                &admin,
                "instance.delete",
                &instance("t1", &[]),
                true,
                &stored
            )
            .unwrap());
        assert!(authz
            .is_allowed(&admin, "instance.stop", &held, true, &stored)
            .unwrap());
    }

    fn instance(tenant: &str, tags: &[(&str, &str)]) -> Resource {
        Resource::Instance {
            id: "i-1".into(),
            tenant: tenant.into(),
            name: "web".into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_matrix_parses_and_keeps_administration_apart_from_audit() {
        let m = Matrix::builtin().unwrap();
        assert!(m.rows.len() > 30);
        let audit: Vec<&Row> = m
            .rows
            .iter()
            .filter(|r| r.action.starts_with("audit."))
            .collect();
        for role in &m.roles {
            let audits = audit.iter().any(|r| r.allowed.contains(role));
            let administers = m.rows.iter().any(|r| r.admin && r.allowed.contains(role));
            assert!(
                !(audits && administers),
                "{role} holds both administration and audit"
            );
        }
    }

    #[test]
    fn every_cell_of_the_matrix_is_what_cedar_decides() {
        let authz = Authz::new().unwrap();
        let m = authz.matrix().clone();
        for row in &m.rows {
            for role in &m.roles {
                let platform = PLATFORM_ROLES.contains(&role.as_str());
                let p = principal(role, (!platform).then_some("t1"), &[]);
                let resource = match row.resources[0].as_str() {
                    "Self" => Resource::Caller,
                    "Platform" if row.resources.len() > 1 && !platform => Resource::Tenant {
                        id: "t1".into(),
                        name: "t1".into(),
                    },
                    "Platform" => Resource::Platform,
                    "Tenant" => Resource::Tenant {
                        id: "t1".into(),
                        name: "t1".into(),
                    },
                    "User" => Resource::User {
                        id: "u-other".into(),
                        tenant: "t1".into(),
                        name: "other".into(),
                        role: "member".into(),
                    },
                    "Group" => Resource::Group {
                        name: "ops".into(),
                        tenant: "t1".into(),
                    },
                    "Instance" => instance("t1", &[]),
                    net @ ("Vpc" | "Subnet" | "SecurityGroup" | "Port") => Resource::Net {
                        kind: match net {
                            "Vpc" => NetKind::Vpc,
                            "Subnet" => NetKind::Subnet,
                            "SecurityGroup" => NetKind::SecurityGroup,
                            _ => NetKind::Port,
                        },
                        id: "n1".into(),
                        tenant: "t1".into(),
                        name: "n1".into(),
                    },
                    other => panic!("resource type {other} has no case here"),
                };
                let allowed = authz
                    .is_allowed(&p, &row.action, &resource, true, &StoredPolicies::default())
                    .unwrap();
                assert_eq!(
                    allowed,
                    m.allows(role, &row.action),
                    "{role} {}",
                    row.action
                );
            }
        }
    }

    #[test]
    fn tenant_roles_never_cross_the_tenant_boundary() {
        let authz = Authz::new().unwrap();
        let admin = principal("tenant_admin", Some("t1"), &[]);
        assert!(authz
            .is_allowed(
                &admin,
                "instance.delete",
                &instance("t1", &[]),
                true,
                &StoredPolicies::default()
            )
            .unwrap());
        assert!(!authz
            .is_allowed(
                &admin,
                "instance.delete",
                &instance("t2", &[]),
                true,
                &StoredPolicies::default()
            )
            .unwrap());
        // Nor actions no tenant role has: disabling or deleting its own tenant, say.
        for action in ["tenant.disable", "tenant.delete", "tenant.enable"] {
            let own = Resource::Tenant {
                id: "t1".into(),
                name: "t1".into(),
            };
            assert!(!authz
                .is_allowed(
                    &admin,
                    action,
                    &own,
                    true,
                    &tenant("permit (principal, action, resource);")
                )
                .unwrap());
        }
        // Not even a tenant policy can open another tenant's objects.
        let greedy = "permit (principal, action, resource);";
        authz.check_tenant_policies(greedy).unwrap();
        assert!(!authz
            .is_allowed(
                &admin,
                "instance.delete",
                &instance("t2", &[]),
                true,
                &tenant(greedy)
            )
            .unwrap());
        assert!(!authz
            .is_allowed(
                &admin,
                "tenant.create",
                &Resource::Platform,
                true,
                &tenant(greedy)
            )
            .unwrap());
    }

    #[test]
    fn a_tenant_policy_grants_by_group_and_tag() {
        let authz = Authz::new().unwrap();
        let policy = r#"
            permit (principal in Group::"ops",
                    action in [Action::"instance.stop", Action::"instance.start"],
                    resource is Instance)
            when { resource.hasTag("env") && resource.getTag("env") == "prod" };
        "#;
        authz.check_tenant_policies(policy).unwrap();
        let ops_reader = principal("reader", Some("t1"), &["ops"]);
        let other_reader = principal("reader", Some("t1"), &[]);
        let prod = instance("t1", &[("env", "prod")]);
        let dev = instance("t1", &[("env", "dev")]);
        let decide = |p: &Principal, a: &str, r: &Resource| {
            authz.is_allowed(p, a, r, true, &tenant(policy)).unwrap()
        };
        assert!(decide(&ops_reader, "instance.stop", &prod));
        assert!(decide(&ops_reader, "instance.start", &prod));
        assert!(!decide(&ops_reader, "instance.delete", &prod));
        assert!(!decide(&ops_reader, "instance.stop", &dev));
        assert!(!decide(&other_reader, "instance.stop", &prod));
    }

    #[test]
    fn deep_or_huge_policies_are_refused_before_cedar_parses_them() {
        let authz = Authz::new().unwrap();
        let deep = |n: usize| {
            format!(
                "permit (principal, action, resource) when {{ {}true{} }};",
                "(".repeat(n),
                ")".repeat(n)
            )
        };
        authz.check_tenant_policies(&deep(20)).unwrap();
        for n in [40, 200, 5000] {
            let err = authz.check_tenant_policies(&deep(n)).unwrap_err();
            assert!(err.0.contains("nest"), "{}", err.0);
        }
        let sets = format!(
            "permit (principal, action, resource) when {{ {}1{}.contains(1) }};",
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(authz.check_tenant_policies(&sets).is_err());
        // Brackets inside strings and comments do not count.
        let quoted = format!(
            "// {}\npermit (principal, action, resource) when {{ \"{}\" == \"x\" }};",
            "(".repeat(500),
            "[".repeat(500)
        );
        authz.check_tenant_policies(&quoted).unwrap();
        let huge = "permit (principal, action, resource);\n".repeat(2000);
        assert!(authz.check_tenant_policies(&huge).is_err());
    }

    #[test]
    fn bad_policies_are_refused_with_the_validators_words() {
        let authz = Authz::new().unwrap();
        for bad in [
            "permit (principal, action, resource", // syntax
            "permit (principal, action == Action::\"instance.fly\", resource);", // no such action
            "permit (principal, action, resource) when { resource.colour == \"red\" };",
        ] {
            let err = authz.check_tenant_policies(bad).unwrap_err();
            assert!(!err.0.is_empty(), "{bad}");
        }
    }
}
