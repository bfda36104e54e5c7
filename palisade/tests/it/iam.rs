//! Identity and access management against the real server: the role × action matrix, one
//! real call per cell (TESTING.md A4); every route against bad credentials, foreign objects and
//! wrong methods (A2); revocation of every credential (B1); fresh MFA for administrative
//! actions and single-use codes (B3); sessions and key rotation; tenant Cedar policies;
//! secrets at rest; per-tenant rules.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use palisade_common::api;
use palisade_controller::access::authz::Matrix;
use palisade_controller::access::server::routes;
use serde_json::json;

use crate::support::*;

fn body(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", hex_id())
}

fn hex_id() -> String {
    rand_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Accounts of every role plus the objects the matrix test acts on.
struct World {
    signers: BTreeMap<String, Signer>,
    /// An OpenID Connect issuer the tenant can be pointed at.
    issuer: String,
    acme: String,
    instance: String,
    group: String,
    member_id: String,
    vpc: String,
    subnet: String,
    security_group: String,
    /// A rule of `security_group` (its default egress rule).
    sg_rule: String,
    /// The port of an instance in `subnet`.
    port: String,
}

impl World {
    fn new(p: &Platform, issuer: &str) -> World {
        let admin = p.admin();
        let acme: api::Tenant = p
            .block_on(admin.client.post(
                "/v1/tenants",
                &api::TenantCreate {
                    name: "acme".into(),
                    quota: Some(api::Quota {
                        instances: 20,
                        vcpus: 20,
                        memory_mib: 20 * 256,
                    }),
                },
            ))
            .unwrap();
        let mut signers = BTreeMap::new();
        for role in ["security_admin", "auditor", "operator"] {
            let s = p.platform_account(&admin, &format!("{role}-1"), role);
            signers.insert(role.to_string(), s);
        }
        for role in ["tenant_admin", "member", "reader"] {
            let s = p.tenant_user(&admin, &acme.id, &format!("acme-{role}"), role);
            // Enrolled, so that each can prove a second factor (mfa.verify) like anyone.
            let (uri, _) = p.enrol_totp(&s.user, &s.password);
            let s = p.key_with_totp(&s.user, &s.password, &uri);
            signers.insert(role.to_string(), s);
        }
        signers.insert("platform_admin".into(), admin);
        let ta = &signers["tenant_admin"];
        let instance = p.create_instance(ta, "shared").unwrap().id;
        let group: api::Group = p
            .block_on(
                ta.client
                    .post("/v1/groups", &api::GroupCreate { name: "g0".into() }),
            )
            .unwrap();
        let member_id = p
            .block_on(signers["member"].client.get::<api::Whoami>("/v1/whoami"))
            .unwrap()
            .user
            .id;
        let (vpc, subnet) = Self::vpc_with_subnet(p, ta);
        let sg = Self::security_group(p, ta);
        let wired: api::Instance = p
            .block_on(ta.client.post(
                "/v1/instances",
                &api::InstanceCreate {
                    name: "wired".into(),
                    image: "debian-12-busybox".into(),
                    flavor: "tiny".into(),
                    tags: Default::default(),
                    subnet: Some(subnet.clone()),
                    security_groups: vec![sg.id.clone()],
                },
            ))
            .unwrap();
        // Running before the matrix starts: its state must not change under the A2 snapshots.
        p.wait_state(ta, &wired.id, "running");
        p.wait_state(ta, &instance, "running");
        let ports: Vec<api::Port> = p.block_on(ta.client.get("/v1/ports")).unwrap();
        let port = ports
            .iter()
            .find(|port| port.instance_id == wired.id)
            .expect("the wired instance's port")
            .id
            .clone();
        World {
            signers,
            issuer: issuer.to_string(),
            acme: acme.id,
            instance,
            group: group.id,
            member_id,
            vpc,
            subnet,
            sg_rule: sg.rules[0].id.clone(),
            security_group: sg.id,
            port,
        }
    }

    /// A fresh VPC of acme with one subnet.
    fn vpc_with_subnet(p: &Platform, ta: &Signer) -> (String, String) {
        let vpc: api::Vpc = p
            .block_on(ta.client.post(
                "/v1/vpcs",
                &api::VpcCreate {
                    name: unique("vpc"),
                    cidr: "10.50.0.0/16".into(),
                },
            ))
            .unwrap();
        let subnet: api::Subnet = p
            .block_on(ta.client.post(
                &format!("/v1/vpcs/{}/subnets", vpc.id),
                &api::SubnetCreate {
                    name: "s0".into(),
                    cidr: "10.50.1.0/24".into(),
                },
            ))
            .unwrap();
        (vpc.id, subnet.id)
    }

    /// A fresh security group of acme.
    fn security_group(p: &Platform, ta: &Signer) -> api::SecurityGroup {
        p.block_on(ta.client.post(
            "/v1/security-groups",
            &api::SecurityGroupCreate {
                name: unique("sg"),
                description: String::new(),
            },
        ))
        .unwrap()
    }

    fn admin(&self) -> &Signer {
        &self.signers["platform_admin"]
    }

    fn tenant_admin(&self) -> &Signer {
        &self.signers["tenant_admin"]
    }

    fn is_platform(role: &str) -> bool {
        api::PLATFORM_ROLES.contains(&role)
    }

    /// A fresh tenant to disable, enable or delete.
    fn scratch_tenant(&self, p: &Platform) -> String {
        let t: api::Tenant = p
            .block_on(self.admin().client.post(
                "/v1/tenants",
                &api::TenantCreate {
                    name: unique("scratch"),
                    quota: None,
                },
            ))
            .unwrap();
        t.id
    }

    /// A fresh member of acme to act on.
    fn victim(&self, p: &Platform) -> String {
        let created: api::UserCreated = p
            .block_on(self.admin().client.post(
                "/v1/users",
                &api::UserCreate {
                    name: unique("victim"),
                    tenant_id: Some(self.acme.clone()),
                    role: None,
                },
            ))
            .unwrap();
        created.user.id
    }

    /// The one real call that exercises `action` as `role`: (method, path, body). Fixtures
    /// that the call would consume are made fresh for it.
    fn call(&self, p: &Platform, action: &str, role: &str) -> (&'static str, String, Vec<u8>) {
        let s = &self.signers[role];
        let raw = p.raw();
        let acme = &self.acme;
        let tenant_target = |w: &World| {
            if World::is_platform(role) {
                w.scratch_tenant(p)
            } else {
                w.acme.clone()
            }
        };
        match action {
            "user.whoami" => ("GET", "/v1/whoami".into(), vec![]),
            "key.list" => ("GET", "/v1/keys".into(), vec![]),
            "key.rotate" => (
                "POST",
                format!("/v1/keys/{}/rotate", s.key_id),
                body(json!({"public_key": new_public_key(), "overlap_secs": 3600})),
            ),
            "key.revoke" => {
                // A second key of the caller's, made by rotating with a long overlap.
                let r = raw.signed(
                    p,
                    s,
                    "POST",
                    &format!("/v1/keys/{}/rotate", s.key_id),
                    &body(json!({"public_key": new_public_key(), "overlap_secs": 3600})),
                );
                assert_eq!(r.status, 201, "{role}: {:?}", r.body);
                let id = r.body["id"].as_str().unwrap().to_string();
                ("DELETE", format!("/v1/keys/{id}"), vec![])
            }
            "mfa.verify" => {
                let uri = s.totp.as_ref().expect("every matrix account is enrolled");
                (
                    "POST",
                    "/v1/auth/mfa/verify".into(),
                    body(json!({"totp_code": totp_code(uri, 30)})),
                )
            }
            "mfa.webauthn_register" => ("POST", "/v1/mfa/webauthn".into(), vec![]),
            // After the row that registered a security key for every role.
            "mfa.verify_challenge" => ("POST", "/v1/auth/mfa/verify/challenge".into(), vec![]),
            "mfa.webauthn_confirm" => {
                use webauthn_authenticator_rs::prelude::*;
                let r = raw.signed(p, s, "POST", "/v1/mfa/webauthn", b"");
                assert_eq!(r.status, 201, "{role}: {:?}", r.body);
                let challenge: api::WebauthnChallenge = serde_json::from_value(r.body).unwrap();
                let options: CreationChallengeResponse =
                    serde_json::from_value(challenge.options).unwrap();
                let credential = new_security_key()
                    .do_registration(Url::parse(&challenge.origin).unwrap(), options)
                    .unwrap();
                (
                    "POST",
                    "/v1/mfa/webauthn/confirm".into(),
                    body(json!({"ceremony_id": challenge.ceremony_id, "credential": credential})),
                )
            }
            "tenant.create" => (
                "POST",
                "/v1/tenants".into(),
                body(json!({"name": unique("t")})),
            ),
            "tenant.list" => ("GET", "/v1/tenants".into(), vec![]),
            "tenant.show" => ("GET", format!("/v1/tenants/{acme}"), vec![]),
            "tenant.settings" => (
                "PUT",
                format!("/v1/tenants/{acme}/settings"),
                body(json!({})),
            ),
            "tenant.oidc" => (
                "PUT",
                format!("/v1/tenants/{acme}/oidc"),
                body(json!({"issuer": self.issuer, "client_id": "palisade"})),
            ),
            "tenant.webhook" => (
                "PUT",
                format!("/v1/tenants/{acme}/webhook"),
                body(json!({"url": null})),
            ),
            "tenant.disable" => (
                "POST",
                format!("/v1/tenants/{}/disable", tenant_target(self)),
                vec![],
            ),
            "tenant.enable" => (
                "POST",
                format!("/v1/tenants/{}/enable", tenant_target(self)),
                vec![],
            ),
            "tenant.delete" => (
                "DELETE",
                format!("/v1/tenants/{}", tenant_target(self)),
                vec![],
            ),
            "user.create" => (
                "POST",
                "/v1/users".into(),
                body(json!({"name": unique("u"), "tenant_id": acme})),
            ),
            "user.list" => ("GET", "/v1/users".into(), vec![]),
            "user.show" => ("GET", format!("/v1/users/{}", self.member_id), vec![]),
            "user.set_role" => (
                "PUT",
                format!("/v1/users/{}/role", self.victim(p)),
                body(json!({"role": "reader"})),
            ),
            "user.disable" => (
                "POST",
                format!("/v1/users/{}/disable", self.victim(p)),
                vec![],
            ),
            "user.enable" => (
                "POST",
                format!("/v1/users/{}/enable", self.victim(p)),
                vec![],
            ),
            "user.delete" => ("DELETE", format!("/v1/users/{}", self.victim(p)), vec![]),
            "user.reset_mfa" => (
                "DELETE",
                format!("/v1/users/{}/mfa", self.victim(p)),
                vec![],
            ),
            "group.create" => (
                "POST",
                "/v1/groups".into(),
                body(json!({"name": unique("g")})),
            ),
            "group.list" => ("GET", "/v1/groups".into(), vec![]),
            "group.delete" => {
                let g: api::Group = p
                    .block_on(
                        self.tenant_admin()
                            .client
                            .post("/v1/groups", &api::GroupCreate { name: unique("g") }),
                    )
                    .unwrap();
                ("DELETE", format!("/v1/groups/{}", g.id), vec![])
            }
            "group.add_member" => (
                "PUT",
                format!("/v1/groups/{}/members/{}", self.group, self.member_id),
                vec![],
            ),
            "group.remove_member" => (
                "DELETE",
                format!("/v1/groups/{}/members/{}", self.group, self.member_id),
                vec![],
            ),
            "policy.get" => ("GET", format!("/v1/policies?tenant={acme}"), vec![]),
            "policy.put" => ("PUT", "/v1/policies".into(), body(json!({"text": ""}))),
            "alert.list" => ("GET", "/v1/alerts".into(), vec![]),
            "platform.policy_get" => ("GET", "/v1/platform/policies".into(), vec![]),
            "platform.policy_put" => (
                "PUT",
                "/v1/platform/policies".into(),
                body(json!({"text": ""})),
            ),
            "audit.read" => ("GET", "/v1/audit/log".into(), vec![]),
            "audit_records.list" => ("GET", "/v1/audit/records".into(), vec![]),
            "audit_records.export" => ("GET", "/v1/audit/ocsf".into(), vec![]),
            "audit_proof.heads" => ("GET", "/v1/audit/heads".into(), vec![]),
            "audit_proof.sign" => ("POST", "/v1/audit/heads".into(), vec![]),
            "audit_proof.inclusion" => {
                // The caller's own record: the one this request leaves.
                let r = raw.signed(p, s, "GET", "/v1/whoami", b"");
                assert_eq!(r.status, 200, "{role}: {:?}", r.body);
                let log = std::fs::read_to_string(p.audit_log()).unwrap();
                let lines: Vec<&str> = log.lines().collect();
                let seq = lines
                    .iter()
                    .rposition(|l| l.contains(r#""action":"user.whoami""#))
                    .unwrap()
                    + 1;
                (
                    "GET",
                    format!("/v1/audit/proof/inclusion?seq={seq}&tree_size={seq}"),
                    vec![],
                )
            }
            "audit_proof.consistency" => (
                "GET",
                "/v1/audit/proof/consistency?first=1&second=2".into(),
                vec![],
            ),
            "audit_key.rotate" => ("POST", "/v1/audit/head-key/rotate".into(), vec![]),
            "audit_retention.show" => ("GET", "/v1/audit/retention".into(), vec![]),
            "audit_hold.set" => (
                "PUT",
                format!("/v1/audit/holds/{acme}"),
                body(json!({"reason": "matrix"})),
            ),
            "audit_hold.release" => {
                // A hold to release, placed by the security administrator.
                let hold = format!("/v1/audit/holds/{acme}");
                let admin = &self.signers["security_admin"];
                let r = raw.signed(p, admin, "PUT", &hold, &body(json!({"reason": "matrix"})));
                assert_eq!(r.status, 200, "{role}: {:?}", r.body);
                ("DELETE", hold, vec![])
            }
            "audit_log.purge" => ("POST", "/v1/audit/purge".into(), vec![]),
            "flavor.list" => ("GET", "/v1/flavors".into(), vec![]),
            "image.list" => ("GET", "/v1/images".into(), vec![]),
            "instance.create" => (
                "POST",
                "/v1/instances".into(),
                body(json!({"name": unique("vm"), "image": "debian-12-busybox", "flavor": "tiny"})),
            ),
            "instance.list" => ("GET", format!("/v1/instances?tenant={acme}"), vec![]),
            "instance.show" => ("GET", format!("/v1/instances/{}", self.instance), vec![]),
            "instance.console" => (
                "GET",
                format!("/v1/instances/{}/console", self.instance),
                vec![],
            ),
            "instance.console_input" => {
                // Typing needs a running guest with its console attached.
                p.wait_console(
                    &self.signers["tenant_admin"],
                    &self.instance,
                    "PALISADE-CONSOLE-READY",
                );
                (
                    "POST",
                    format!("/v1/instances/{}/console", self.instance),
                    b"echo typed\n".to_vec(),
                )
            }
            "vpc.create" => (
                "POST",
                "/v1/vpcs".into(),
                body(json!({"name": unique("vpc"), "cidr": "10.60.0.0/16"})),
            ),
            "vpc.list" => ("GET", format!("/v1/vpcs?tenant={acme}"), vec![]),
            "vpc.show" => ("GET", format!("/v1/vpcs/{}", self.vpc), vec![]),
            "vpc.delete" => {
                let vpc: api::Vpc = p
                    .block_on(self.tenant_admin().client.post(
                        "/v1/vpcs",
                        &api::VpcCreate {
                            name: unique("doomed"),
                            cidr: "10.61.0.0/16".into(),
                        },
                    ))
                    .unwrap();
                ("DELETE", format!("/v1/vpcs/{}", vpc.id), vec![])
            }
            "subnet.create" => {
                let (vpc, _) = Self::vpc_with_subnet(p, self.tenant_admin());
                (
                    "POST",
                    format!("/v1/vpcs/{vpc}/subnets"),
                    body(json!({"name": "s1", "cidr": "10.50.2.0/24"})),
                )
            }
            "subnet.list" => ("GET", format!("/v1/subnets?tenant={acme}"), vec![]),
            "subnet.show" => ("GET", format!("/v1/subnets/{}", self.subnet), vec![]),
            "subnet.delete" => {
                let (_, subnet) = Self::vpc_with_subnet(p, self.tenant_admin());
                ("DELETE", format!("/v1/subnets/{subnet}"), vec![])
            }
            "subnet.acl_set" => (
                "PUT",
                format!("/v1/subnets/{}/acl", self.subnet),
                body(json!({"rules": []})),
            ),
            "security_group.create" => (
                "POST",
                "/v1/security-groups".into(),
                body(json!({"name": unique("sg")})),
            ),
            "security_group.list" => ("GET", format!("/v1/security-groups?tenant={acme}"), vec![]),
            "security_group.show" => (
                "GET",
                format!("/v1/security-groups/{}", self.security_group),
                vec![],
            ),
            "security_group.delete" => {
                let sg = Self::security_group(p, self.tenant_admin());
                ("DELETE", format!("/v1/security-groups/{}", sg.id), vec![])
            }
            "security_group.rule_add" => {
                let sg = Self::security_group(p, self.tenant_admin());
                (
                    "POST",
                    format!("/v1/security-groups/{}/rules", sg.id),
                    body(
                        json!({"direction": "ingress", "protocol": "tcp", "port_from": 22,
                                "cidr": "10.0.0.0/8"}),
                    ),
                )
            }
            "security_group.rule_delete" => {
                let sg = Self::security_group(p, self.tenant_admin());
                (
                    "DELETE",
                    format!("/v1/security-group-rules/{}", sg.rules[0].id),
                    vec![],
                )
            }
            "port.list" => ("GET", format!("/v1/ports?tenant={acme}"), vec![]),
            "port.show" => ("GET", format!("/v1/ports/{}", self.port), vec![]),
            "port.traffic" => ("GET", format!("/v1/ports/{}/traffic", self.port), vec![]),
            "port.update" => (
                "PATCH",
                format!("/v1/ports/{}", self.port),
                body(json!({"ingress_kbit": 1000})),
            ),
            "instance.stop" => (
                "POST",
                format!("/v1/instances/{}/stop", self.instance),
                vec![],
            ),
            "instance.start" => (
                "POST",
                format!("/v1/instances/{}/start", self.instance),
                vec![],
            ),
            "instance.delete" => {
                let matrix = Matrix::builtin().unwrap();
                // Only a role that may delete gets a VM of its own to delete.
                let id = if matrix.allows(role, action) {
                    p.create_instance(self.tenant_admin(), &unique("doomed"))
                        .unwrap()
                        .id
                } else {
                    self.instance.clone()
                };
                ("DELETE", format!("/v1/instances/{id}"), vec![])
            }
            other => panic!(
                "no call for action {other}: add one here when adding a route (TESTING.md A4)"
            ),
        }
    }
}

fn new_public_key() -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    palisade_common::signing::encode_public_key(&key.verifying_key())
}

/// A platform and a provider for the role-matrix tests: private endpoints allowed (the tenant's
/// identity provider runs on loopback), a source rate high enough for one call per cell.
fn matrix_platform(extra: &[&str]) -> (OidcProvider, Platform) {
    let idp = OidcProvider::start(&json!({
        "clients": [{"client_id": "palisade", "redirect_uris": ["http://127.0.0.1:9/cb"]}],
        "accounts": [{"username": "x", "password": "x-password", "claims": {}}],
    }));
    let mut args = vec![
        "--allow-private-endpoints",
        "--rate-limit-per-source",
        "5000",
    ];
    args.extend_from_slice(extra);
    (idp, Platform::start_with_args(&args))
}

#[test]
fn every_cell_of_the_role_matrix_is_one_real_call() {
    let (idp, p) = matrix_platform(&[]);
    let matrix = Matrix::builtin().unwrap();
    let w = World::new(&p, &idp.issuer);
    let raw = p.raw();
    let mut wrong = Vec::new();
    let mut cells = 0;
    let mut reached = std::collections::BTreeSet::new();
    let mut strict = 0;
    for row in &matrix.rows {
        for role in &matrix.roles {
            let (method, path, request) = w.call(&p, &row.action, role);
            reached.insert(route_of(method, &path));
            let signer = &w.signers[role.as_str()];
            let expected = matrix.allows(role, &row.action);
            // Point 10: an allowed call with one field too many is refused whole, and does
            // nothing (the real call below still works).
            if let (true, Ok(serde_json::Value::Object(mut fields))) = (
                expected,
                serde_json::from_slice::<serde_json::Value>(&request),
            ) {
                fields.insert("unexpected_field".into(), json!(1));
                strict += 1;
                let extra = body(serde_json::Value::Object(fields));
                let r = raw.signed(&p, signer, method, &path, &extra);
                if (r.status, r.code()) != (400, "invalid_request") {
                    wrong.push(format!(
                        "{role} {} with an unknown field: {} {}",
                        row.action,
                        r.status,
                        r.code()
                    ));
                }
            }
            let r = raw.signed(&p, signer, method, &path, &request);
            r.assert_security_headers(&format!("{role} {method} {path}"));
            let fine = if expected {
                (200..300).contains(&r.status)
            } else {
                matches!(r.status, 403 | 404)
            };
            if !fine {
                wrong.push(format!(
                    "{role} {} ({method} {path}): expected {}, got {} {} {}",
                    row.action,
                    if expected { "2xx" } else { "403/404" },
                    r.status,
                    r.code(),
                    r.body["error"]["message"].as_str().unwrap_or("")
                ));
            }
            cells += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {cells} cells differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(cells, matrix.rows.len() * matrix.roles.len());
    assert!(
        strict >= 20,
        "only {strict} calls tried with an unknown field"
    );
    // Two routes may share an action: each route must still be called, so that a route added
    // with an existing action is tried for every role too.
    let unreached: Vec<_> = routes()
        .iter()
        .filter(|r| !palisade_controller::access::guard::is_password_route_path(r.method, r.path))
        .map(|r| (r.method, r.path))
        .filter(|route| !reached.contains(&Some(*route)))
        .collect();
    assert!(unreached.is_empty(), "routes no cell calls: {unreached:?}");
}

/// The route-table entry a concrete call lands on.
fn route_of(method: &str, path: &str) -> Option<(&'static str, &'static str)> {
    let path = path.split('?').next().unwrap_or(path);
    let sent: Vec<&str> = path.split('/').collect();
    routes()
        .into_iter()
        .find(|r| {
            let template: Vec<&str> = r.path.split('/').collect();
            r.method == method
                && template.len() == sent.len()
                && template
                    .iter()
                    .zip(&sent)
                    .all(|(t, s)| t.starts_with('{') || t == s)
        })
        .map(|r| (r.method, r.path))
}

/// B3 on every administrative cell: each role allowed an administrative action is refused it
/// (403 mfa_required) once its signing key's second-factor proof is stale, and nothing else
/// about the call differs from the allowed one in the role-matrix test.
#[test]
fn every_administrative_action_needs_a_fresh_second_factor() {
    const FRESH_SECS: u64 = 20;
    let (idp, p) = matrix_platform(&["--mfa-fresh-secs", &FRESH_SECS.to_string()]);
    let matrix = Matrix::builtin().unwrap();
    let w = World::new(&p, &idp.issuer);
    // Prepare every call while the proofs are fresh (some need objects made first)...
    let mut calls = Vec::new();
    for row in matrix.rows.iter().filter(|row| row.admin) {
        for role in &row.allowed {
            calls.push((
                row.action.clone(),
                role.clone(),
                w.call(&p, &row.action, role),
            ));
        }
    }
    assert!(calls.len() > 20, "{} administrative cells", calls.len());
    // ...then send them once every proof has gone stale.
    std::thread::sleep(Duration::from_secs(FRESH_SECS + 1));
    let raw = p.raw();
    let mut wrong = Vec::new();
    for (action, role, (method, path, request)) in &calls {
        let r = raw.signed(&p, &w.signers[role.as_str()], method, path, request);
        if (r.status, r.code()) != (403, "mfa_required") {
            wrong.push(format!("{role} {action}: {} {}", r.status, r.code()));
        }
    }
    assert!(
        wrong.is_empty(),
        "allowed without a fresh proof:\n{}",
        wrong.join("\n")
    );
}

/// Reads that show the state of tenant A: equal before and after refused calls.
fn snapshot(p: &Platform, w: &World) -> Vec<Vec<u8>> {
    let raw = p.raw();
    let ta = w.tenant_admin();
    let admin = w.admin();
    let reads = [
        (admin, "/v1/tenants".to_string()),
        (admin, format!("/v1/users?tenant={}", w.acme)),
        (ta, "/v1/groups".to_string()),
        (ta, "/v1/policies".to_string()),
        (ta, format!("/v1/instances/{}", w.instance)),
        (ta, "/v1/keys".to_string()),
        (ta, "/v1/instances".to_string()),
        (admin, format!("/v1/tenants/{}", w.acme)),
        (admin, "/v1/platform/policies".to_string()),
    ];
    reads
        .iter()
        .map(|(s, path)| {
            let r = raw.signed(p, s, "GET", path, b"");
            assert_eq!(r.status, 200, "{path}");
            r.bytes
        })
        .collect()
}

#[test]
fn every_route_refuses_bad_credentials_foreign_objects_and_wrong_methods() {
    // Hundreds of requests from one address and key in a few seconds: above the default rate
    // limits on a fast machine.
    let p = Platform::start_with_args(&[
        "--rate-limit-per-source",
        "5000",
        "--rate-limit-per-key",
        "5000",
    ]);
    let w = World::new(&p, "https://idp.invalid");
    let raw = p.raw();
    p.wait_state(w.tenant_admin(), &w.instance, "running");
    let (_, bob) = p.tenant(w.admin(), "bob-corp", None);
    // Bob administers his own tenant: the most a tenant account can be.
    let bob = p.promote(w.admin(), &bob, "tenant_admin");
    let ta_id = p
        .block_on(w.tenant_admin().client.get::<api::Whoami>("/v1/whoami"))
        .unwrap()
        .user
        .id;
    let before = snapshot(&p, &w);
    let stranger = p.signer(
        "nobody",
        "",
        "key-00000000-0000-4000-8000-000000000000",
        ed25519_dalek::SigningKey::from_bytes(&rand_bytes()),
        None,
    );
    let all = routes();
    for route in &all {
        if palisade_controller::access::guard::is_password_route_path(route.method, route.path) {
            continue;
        }
        // Tenant A's objects in every id slot.
        let id = match route.path.split('/').nth(2) {
            Some("instances") => w.instance.clone(),
            Some("users") => w.member_id.clone(),
            Some("groups") => w.group.clone(),
            Some("tenants") => w.acme.clone(),
            Some("keys") => w.tenant_admin().key_id.clone(),
            // A legal hold is on a tenant.
            Some("audit") if route.path.starts_with("/v1/audit/holds/") => w.acme.clone(),
            Some("vpcs") => w.vpc.clone(),
            Some("subnets") => w.subnet.clone(),
            Some("security-groups") => w.security_group.clone(),
            Some("security-group-rules") => w.sg_rule.clone(),
            Some("ports") => w.port.clone(),
            // A new kind of object with an id slot needs tenant A's object here.
            _ if route.path.contains('{') => panic!("{}: no object of tenant A", route.path),
            _ => String::new(),
        };
        let path = route.path.replace("{id}", &id).replace("{user}", &ta_id);
        let takes_body =
            palisade_controller::access::server::BODY_ROUTES.contains(&(route.method, route.path));
        let request = if takes_body { body(json!({})) } else { vec![] };
        let what = format!("{} {}", route.method, route.path);
        let expect_401 = |headers: Vec<(String, String)>, code: &str| {
            let r = raw.send(&p, route.method, &path, &request, &headers);
            assert_eq!((r.status, r.code()), (401, code), "{what}");
            r.assert_security_headers(&what);
        };
        expect_401(vec![], "signature_missing");
        // Over the body cap: 413 before anything else, signed or not.
        let oversized = vec![b' '; api::MAX_BODY_BYTES + 1];
        for headers in [vec![], sign(&bob, route.method, &path, &oversized, 0)] {
            let r = raw.send_refused_early(&p, route.method, &path, &oversized, &headers);
            assert_eq!((r.status, r.code()), (413, "body_too_large"), "{what}");
        }
        let mut malformed = sign(&bob, route.method, &path, &request, 0);
        malformed[2].1 = "sig1=:bm90IGEgc2lnbmF0dXJl:".into();
        expect_401(malformed, "signature_malformed");
        expect_401(
            sign(&stranger, route.method, &path, &request, 0),
            "key_invalid",
        );
        expect_401(
            sign(&bob, route.method, &path, &request, -120),
            "clock_skew",
        );
        let tampered = sign(&bob, route.method, &path, b"{\"x\":1}", 0);
        expect_401(tampered, "digest_mismatch");
        if route.path.contains("{id}") {
            let r = raw.signed(&p, &bob, route.method, &path, &request);
            assert_eq!((r.status, r.code()), (404, "not_found"), "{what}: tenant B");
            // A3: to tenant B, tenant A's object and one that does not exist look the same.
            let missing = route
                .path
                .replace("{id}", "0d6f7f3e-9c1a-4b7e-8f00-00000000abcd")
                .replace("{user}", &ta_id);
            let m = raw.signed(&p, &bob, route.method, &missing, &request);
            assert_eq!((m.status, &m.bytes), (r.status, &r.bytes), "{what}: A3");
            // Nor do the records tenant B reads of its own requests.
            let ids = [id.as_str(), "0d6f7f3e-9c1a-4b7e-8f00-00000000abcd"];
            assert_eq!(
                record_shape(&p, &r, &ids),
                record_shape(&p, &m, &ids),
                "{what}: A3 in the audit record"
            );
        }
        // A route that reads no body refuses one, rather than ignore what it says.
        if !takes_body {
            let r = raw.signed(&p, &bob, route.method, &path, b"{\"force\":true}");
            assert_eq!(
                (r.status, r.code()),
                (400, "invalid_request"),
                "{what}: a body"
            );
        }
        // B2: the same signed request, sent twice, is refused the second time on every route.
        let headers = sign(&bob, route.method, &path, &request, 0);
        let _ = raw.send(&p, route.method, &path, &request, &headers);
        let again = raw.send(&p, route.method, &path, &request, &headers);
        assert_eq!(
            (again.status, again.code()),
            (401, "replayed"),
            "{what}: a replay"
        );
        // A2: the privileged reads return the same bytes after each route's refused calls.
        assert_eq!(
            before,
            snapshot(&p, &w),
            "{what}: a refused call changed something"
        );
    }
    // Methods a path does not have: 405, whoever asks.
    let mut paths: Vec<&str> = all.iter().map(|r| r.path).collect();
    paths.dedup();
    for path in paths {
        let concrete = path.replace("{id}", &w.instance).replace("{user}", &ta_id);
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if all.iter().any(|r| r.path == path && r.method == method) {
                continue;
            }
            let r = raw.signed(&p, &bob, method, &concrete, b"");
            assert_eq!(
                (r.status, r.code()),
                (405, "method_not_allowed"),
                "{method} {path}"
            );
            r.assert_security_headers(&format!("{method} {path}"));
        }
    }
    let r = raw.signed(&p, &bob, "GET", "/v1/no-such-route", b"");
    assert_eq!((r.status, r.code()), (404, "not_found"));
    r.assert_security_headers("an unknown route");
    assert_eq!(before, snapshot(&p, &w), "a refused call changed something");
}

/// Tokens of one user: the key it enrolled with, five login sessions (with a second factor,
/// one recovery code each; none without codes),
/// and API keys made by rotation (each old key kept alive for an hour) up to
/// fifty, all working.
fn fifty_tokens(p: &Platform, s: &Signer, recovery_codes: &[String]) -> Vec<Signer> {
    let raw = p.raw();
    let mut tokens = vec![p.clone_signer(s)];
    // An account with a second factor logs in with one recovery code per session.
    let sessions = if s.totp.is_none() {
        5
    } else {
        recovery_codes.len().min(5)
    };
    for i in 0..sessions {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let session: api::ApiKey = p
            .block_on(p.anonymous().post(
                "/v1/auth/login",
                &api::Login {
                    user: s.user.clone(),
                    password: s.password.clone(),
                    public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
                    totp_code: None,
                    recovery_code: recovery_codes.get(i).cloned(),
                    webauthn: None,
                },
            ))
            .unwrap();
        assert_eq!(session.kind, "session");
        tokens.push(p.signer(&s.user, &s.password, &session.id, key, None));
    }
    // Rotation starts from the enrolment key, which is an API key.
    tokens.swap(0, sessions);
    while tokens.len() < 50 {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let public = palisade_common::signing::encode_public_key(&key.verifying_key());
        let last = tokens.last().unwrap();
        let r = raw.signed(
            p,
            last,
            "POST",
            &format!("/v1/keys/{}/rotate", last.key_id),
            &body(json!({"public_key": public, "overlap_secs": 3600})),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        let id = r.body["id"].as_str().unwrap();
        tokens.push(p.signer(&s.user, &s.password, id, key, s.totp.clone()));
    }
    for t in &tokens {
        assert_eq!(raw.signed(p, t, "GET", "/v1/whoami", b"").status, 200);
    }
    tokens
}

/// Every token is refused, all of them tried at once, within 1 s of `since`.
fn assert_all_refused(p: &Platform, tokens: &[Signer], since: Instant, event: &str) {
    let raw = p.raw();
    std::thread::scope(|scope| {
        for chunk in tokens.chunks(5) {
            let raw = &raw;
            scope.spawn(move || {
                for t in chunk {
                    let r = raw.signed(p, t, "GET", "/v1/whoami", b"");
                    assert_eq!(r.status, 401, "{event}: {} still works", t.key_id);
                }
            });
        }
    });
    assert!(
        since.elapsed() < Duration::from_secs(1),
        "{event}: refusing took {:?}",
        since.elapsed()
    );
}

#[test]
fn every_key_and_session_ends_when_the_account_loses_its_footing() {
    let p = Platform::start_with_args(&["--rate-limit-per-source", "5000"]);
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let security = p.platform_account(&admin, "sec-1", "security_admin");
    let fresh = |name: &str| p.tenant_user(&admin, &acme.id, name, "member");
    let bystander = fresh("bystander");

    // 1. A password change.
    let u = fresh("u-password");
    let tokens = fifty_tokens(&p, &u, &[]);
    let change = api::PasswordChange {
        user: u.user.clone(),
        current_password: u.password.clone(),
        new_password: "Another-passw0rd-9".into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let _: serde_json::Value = p
        .block_on(p.anonymous().post("/v1/auth/password", &change))
        .unwrap();
    assert_all_refused(&p, &tokens, Instant::now(), "password change");

    // 2. An MFA reset by the security administrator.
    let u = fresh("u-mfa");
    let (uri, recovery) = p.enrol_totp(&u.user, &u.password);
    let u = p.key_with_totp(&u.user, &u.password, &uri);
    let tokens = fifty_tokens(&p, &u, &recovery);
    let r = raw.signed(
        &p,
        &security,
        "DELETE",
        &format!("/v1/users/{}/mfa", whoami(&p, &u).id),
        b"",
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_all_refused(&p, &tokens, Instant::now(), "MFA reset");

    // 3-5. Disable, role change and delete by the tenant administrator.
    for (event, method, tail, request) in [
        ("disable", "POST", "/disable", json!(null)),
        ("role change", "PUT", "/role", json!({"role": "reader"})),
        ("delete", "DELETE", "", json!(null)),
    ] {
        let u = fresh(&format!("u-{}", event.replace(' ', "-")));
        let tokens = fifty_tokens(&p, &u, &[]);
        let id = whoami(&p, &u).id;
        let request = if request.is_null() {
            vec![]
        } else {
            body(request)
        };
        let r = raw.signed(&p, &ta, method, &format!("/v1/users/{id}{tail}"), &request);
        let done = Instant::now();
        assert_eq!(r.status, 204, "{event}: {:?}", r.body);
        assert_all_refused(&p, &tokens, done, event);
    }
    // None of that touched anyone else.
    assert_eq!(
        raw.signed(&p, &bystander, "GET", "/v1/whoami", b"").status,
        200
    );

    // 6. A tenant disable ends every user's credentials in it.
    let tokens = fifty_tokens(&p, &bystander, &[]);
    let r = raw.signed(
        &p,
        &admin,
        "POST",
        &format!("/v1/tenants/{}/disable", acme.id),
        b"",
    );
    let done = Instant::now();
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_all_refused(&p, &tokens, done, "tenant disable");
    let r = raw.signed(&p, &ta, "GET", "/v1/whoami", b"");
    assert_eq!(r.status, 401);
    // The password of a user in a disabled tenant makes nothing either.
    let e = api_error(
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: bystander.user.clone(),
                password: bystander.password.clone(),
                public_key: new_public_key(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .unwrap_err(),
    );
    assert_eq!((e.status, e.code.as_str()), (401, "credentials_invalid"));
    // Enabling the tenant brings no ended credential back; its users log in again.
    let r = raw.signed(
        &p,
        &admin,
        "POST",
        &format!("/v1/tenants/{}/enable", acme.id),
        b"",
    );
    assert_eq!(r.status, 204);
    assert_all_refused(&p, &tokens, Instant::now(), "tenant enable");
    let again = p.enrol_again(&bystander);
    assert_eq!(raw.signed(&p, &again, "GET", "/v1/whoami", b"").status, 200);

    // 7. A tenant delete ends every credential in it (its instances go first).
    let (doomed, owner) = p.tenant(&admin, "doomed", None);
    let tokens = fifty_tokens(&p, &owner, &[]);
    let r = raw.signed(
        &p,
        &admin,
        "DELETE",
        &format!("/v1/tenants/{}", doomed.id),
        b"",
    );
    let done = Instant::now();
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_all_refused(&p, &tokens, done, "tenant delete");
}

fn whoami(p: &Platform, s: &Signer) -> api::User {
    p.block_on(s.client.get::<api::Whoami>("/v1/whoami"))
        .unwrap()
        .user
}

#[test]
fn administrative_actions_need_a_fresh_second_factor_and_each_code_works_once() {
    let p = Platform::start_with_args(&[
        "--mfa-fresh-secs",
        "3",
        "--lockout-after",
        "3",
        "--lockout-secs",
        "60",
    ]);
    let admin = p.admin();
    let uri = admin.totp.clone().unwrap();
    let raw = p.raw();
    let create = |name: &str| {
        raw.signed(
            &p,
            &admin,
            "POST",
            "/v1/tenants",
            &body(json!({ "name": name })),
        )
    };
    assert_eq!(create("t1").status, 201);
    std::thread::sleep(Duration::from_secs(4));
    let r = create("t2");
    assert_eq!((r.status, r.code()), (403, "mfa_required"));
    // Not administrative: still fine.
    assert_eq!(raw.signed(&p, &admin, "GET", "/v1/whoami", b"").status, 200);

    let verify = |code: serde_json::Value| {
        raw.signed(&p, &admin, "POST", "/v1/auth/mfa/verify", &body(code))
    };
    let next = totp_code(&uri, 30);
    assert_eq!(verify(json!({ "totp_code": next })).status, 204);
    assert_eq!(create("t2").status, 201);
    // The same code again, within its step: refused.
    let r = verify(json!({ "totp_code": next }));
    assert_eq!((r.status, r.code()), (401, "mfa_invalid"));

    // A recovery code works once.
    let other = p.platform_account(&admin, "admin-2", "platform_admin");
    let created: api::UserCreated = p
        .block_on(admin.client.post(
            "/v1/users",
            &api::UserCreate {
                name: "admin-3".into(),
                tenant_id: None,
                role: Some("platform_admin".into()),
            },
        ))
        .unwrap_or_else(|_| {
            // The first admin's proof may have gone stale meanwhile: use the second admin.
            p.block_on(other.client.post(
                "/v1/users",
                &api::UserCreate {
                    name: "admin-3".into(),
                    tenant_id: None,
                    role: Some("platform_admin".into()),
                },
            ))
            .unwrap()
        });
    let password = "Third-admin-passw0rd";
    let change = api::PasswordChange {
        user: "admin-3".into(),
        current_password: created.initial_password.clone(),
        new_password: password.into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let _: serde_json::Value = p
        .block_on(p.anonymous().post("/v1/auth/password", &change))
        .unwrap();
    let (_, recovery) = p.enrol_totp("admin-3", password);
    assert_eq!(recovery.len(), 10);
    let login = |recovery_code: &str| {
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: "admin-3".into(),
                password: password.into(),
                public_key: new_public_key(),
                totp_code: None,
                recovery_code: Some(recovery_code.into()),
                webauthn: None,
            },
        ))
        .map_err(api_error)
    };
    let session = login(&recovery[0].to_uppercase()).unwrap();
    assert_eq!(session.kind, "session");
    let e = login(&recovery[0]).unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (401, "mfa_invalid"));

    // Wrong codes count like wrong passwords: the third locks the account, audited.
    let login_code = |code: &str| {
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: "admin-3".into(),
                password: password.into(),
                public_key: new_public_key(),
                totp_code: Some(code.into()),
                recovery_code: None,
                webauthn: None,
            },
        ))
        .map_err(api_error)
    };
    login_code("000000").unwrap_err();
    login_code("999999").unwrap_err();
    let e = login_code("123456").unwrap_err();
    assert_eq!(e.status, 401);
    let e = login(&recovery[1]).unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (401, "credentials_invalid"));
    let log = std::fs::read_to_string(p.audit_log()).unwrap();
    assert!(
        log.lines()
            .rev()
            .filter(|l| !l.contains(r#""type":"host""#))
            .take(3)
            .any(|l| l.contains("\"account_locked\"")),
        "the lock is not in the audit log"
    );
}

#[test]
fn sessions_end_when_idle_or_old_and_rotation_hands_over_from_key_to_key() {
    let p = Platform::start_with_args(&["--session-idle-secs", "3", "--session-max-secs", "6"]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let login = || {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let session: api::ApiKey = p
            .block_on(p.anonymous().post(
                "/v1/auth/login",
                &api::Login {
                    user: alice.user.clone(),
                    password: alice.password.clone(),
                    public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
                    totp_code: None,
                    recovery_code: None,
                    webauthn: None,
                },
            ))
            .unwrap();
        assert_eq!(
            (session.kind.as_str(), session.idle_timeout_secs),
            ("session", Some(3))
        );
        p.signer(&alice.user, &alice.password, &session.id, key, None)
    };
    let works = |s: &Signer| raw.signed(&p, s, "GET", "/v1/whoami", b"").status == 200;

    // Used twice a second, so never idle for long: lives until its absolute end (6 s after
    // the login), not beyond.
    let started = Instant::now();
    let busy = login();
    let ended = loop {
        if !works(&busy) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "outlived its absolute timeout"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ended >= Duration::from_secs(5), "ended early, at {ended:?}");
    // Left alone: ends after the idle timeout, long before its absolute end.
    let idle = login();
    assert!(works(&idle));
    std::thread::sleep(Duration::from_millis(4500));
    assert!(!works(&idle), "outlived its idle timeout");

    // API keys: expiry within the platform's maximum, rotation without and with overlap.
    let e = api_error(
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/keys",
            &api::KeyCreate {
                user: alice.user.clone(),
                password: alice.password.clone(),
                public_key: new_public_key(),
                name: None,
                totp_code: None,
                recovery_code: None,
                webauthn: None,
                expires_in_days: Some(1000),
            },
        ))
        .unwrap_err(),
    );
    assert_eq!((e.status, e.code.as_str()), (400, "invalid_request"));
    let keys: Vec<api::ApiKey> = p.block_on(alice.client.get("/v1/keys")).unwrap();
    assert!(keys.iter().all(|k| k.expires_at.is_some()));
    let rotate = |s: &Signer, overlap: u32| {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let public = palisade_common::signing::encode_public_key(&key.verifying_key());
        let r = raw.signed(
            &p,
            s,
            "POST",
            &format!("/v1/keys/{}/rotate", s.key_id),
            &body(json!({"public_key": public, "overlap_secs": overlap})),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        p.signer(
            &s.user,
            &s.password,
            r.body["id"].as_str().unwrap(),
            key,
            None,
        )
    };
    let k2 = rotate(&alice, 0);
    assert!(!works(&alice), "the rotated-out key still works");
    assert!(works(&k2));
    let k3 = rotate(&k2, 2);
    assert!(works(&k2), "the overlap did not keep the old key");
    assert!(works(&k3));
    std::thread::sleep(Duration::from_secs(3));
    assert!(!works(&k2), "the old key outlived the overlap");
    assert!(works(&k3));
}

#[test]
fn a_tenant_policy_lets_group_ops_stop_and_start_prod_but_not_delete() {
    let p = Platform::start();
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let reader = p.tenant_user(&admin, &acme.id, "ranger", "reader");
    let reader_id = whoami(&p, &reader).id;
    let vm = |name: &str, env: &str| {
        let r = raw.signed(
            &p,
            &ta,
            "POST",
            "/v1/instances",
            &body(
                json!({"name": name, "image": "debian-12-busybox", "flavor": "tiny",
                         "tags": {"env": env}}),
            ),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    };
    let prod = vm("web-prod", "prod");
    let dev = vm("web-dev", "dev");
    let act = |s: &Signer, method: &str, path: String| raw.signed(&p, s, method, &path, b"").status;

    // A reader sees instances but may not stop them.
    assert_eq!(act(&reader, "GET", format!("/v1/instances/{prod}")), 200);
    assert_eq!(
        act(&reader, "POST", format!("/v1/instances/{prod}/stop")),
        403
    );

    let group: api::Group = p
        .block_on(
            ta.client
                .post("/v1/groups", &api::GroupCreate { name: "ops".into() }),
        )
        .unwrap();
    assert_eq!(
        act(
            &ta,
            "PUT",
            format!("/v1/groups/{}/members/{reader_id}", group.id)
        ),
        204
    );
    let policy = r#"
        permit (principal in Group::"ops",
                action in [Action::"instance.stop", Action::"instance.start"],
                resource is Instance)
        when { resource.hasTag("env") && resource.getTag("env") == "prod" };
    "#;
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        "/v1/policies",
        &body(json!({ "text": policy })),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);

    assert_eq!(
        act(&reader, "POST", format!("/v1/instances/{prod}/stop")),
        202
    );
    assert_eq!(
        act(&reader, "POST", format!("/v1/instances/{prod}/start")),
        202
    );
    assert_eq!(act(&reader, "DELETE", format!("/v1/instances/{prod}")), 403);
    assert_eq!(
        act(&reader, "POST", format!("/v1/instances/{dev}/stop")),
        403
    );
    // Policies cannot be written by the reader, nor read.
    let r = raw.signed(
        &p,
        &reader,
        "PUT",
        "/v1/policies",
        &body(json!({"text": ""})),
    );
    assert_eq!(r.status, 403);

    // Out of the group, the rights go at once.
    assert_eq!(
        act(
            &ta,
            "DELETE",
            format!("/v1/groups/{}/members/{reader_id}", group.id)
        ),
        204
    );
    assert_eq!(
        act(&reader, "POST", format!("/v1/instances/{prod}/stop")),
        403
    );

    // Bad policies: 400 with the validator's words, and the stored policy is unchanged.
    for (bad, needle) in [
        ("permit (principal, action, resource", "unexpected"),
        (
            "permit (principal, action == Action::\"instance.fly\", resource);",
            "instance.fly",
        ),
        (
            "permit (principal, action, resource) when { resource.colour == \"red\" };",
            "colour",
        ),
    ] {
        let r = raw.signed(
            &p,
            &ta,
            "PUT",
            "/v1/policies",
            &body(json!({ "text": bad })),
        );
        assert_eq!((r.status, r.code()), (400, "policy_invalid"), "{bad}");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{bad}: {message}");
    }
    let stored: api::Policies = p.block_on(ta.client.get("/v1/policies")).unwrap();
    assert_eq!(stored.text, policy);

    // Another tenant's greediest policy opens nothing of acme's.
    let (_, bob) = p.tenant(&admin, "bob-corp", None);
    let bob = p.promote(&admin, &bob, "tenant_admin");
    let greedy = "permit (principal, action, resource);";
    let r = raw.signed(
        &p,
        &bob,
        "PUT",
        "/v1/policies",
        &body(json!({ "text": greedy })),
    );
    assert_eq!(r.status, 204);
    assert_eq!(act(&bob, "DELETE", format!("/v1/instances/{prod}")), 404);
    assert_eq!(act(&bob, "GET", format!("/v1/tenants/{}", acme.id)), 404);
    assert_eq!(act(&bob, "GET", "/v1/tenants".into()), 403);
}

#[test]
fn second_factor_secrets_are_sealed_at_rest_and_never_logged() {
    let p = Platform::start_with_args(&["--allow-private-endpoints"]);
    let admin = p.admin();
    let uri = admin.totp.clone().unwrap();
    let secret = uri
        .split(['?', '&'])
        .find_map(|x| x.strip_prefix("secret="))
        .unwrap()
        .to_string();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let carol = p.tenant_user(&admin, &acme.id, "carol", "member");
    let (carol_uri, recovery) = p.enrol_totp(&carol.user, &carol.password);

    // The tenant's other secrets: its webhook's signing secret (shown once) and its identity
    // provider's client secret.
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let raw = p.raw();
    let (hook, _calls) = webhook_receiver();
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        &format!("/v1/tenants/{}/webhook", acme.id),
        &body(json!({ "url": hook })),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let webhook_secret = r.body["secret"].as_str().unwrap().to_string();
    let client_secret = hex::encode(rand_bytes());
    let idp = OidcProvider::start(&json!({
        "clients": [{"client_id": "palisade", "client_secret": client_secret,
                     "token_endpoint_auth_method": "client_secret_basic",
                     "redirect_uris": ["http://127.0.0.1:9/cb"]}],
        "accounts": [{"username": "x", "password": "x-password", "claims": {}}],
    }));
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        &format!("/v1/tenants/{}/oidc", acme.id),
        &body(json!({"issuer": idp.issuer, "client_id": "palisade",
                     "client_secret": client_secret})),
    );
    assert!((200..300).contains(&r.status), "{:?}", r.body);
    assert!(!String::from_utf8_lossy(&r.bytes).contains(&client_secret));

    use std::os::unix::fs::PermissionsExt;
    let master = std::fs::metadata(p.data().join("master.key")).unwrap();
    assert_eq!(master.permissions().mode() & 0o777, 0o600);
    assert_eq!(master.len(), 32);

    let dump = std::process::Command::new("sqlite3")
        .arg(p.data().join("palisade.db"))
        .arg(".dump")
        .output()
        .unwrap();
    assert!(dump.status.success());
    let mut places = vec![
        (
            "database",
            String::from_utf8_lossy(&dump.stdout).to_string(),
        ),
        ("audit log", std::fs::read_to_string(p.audit_log()).unwrap()),
        ("controller log", p.tail("controller.log")),
    ];
    let wal = std::fs::read(p.data().join("palisade.db-wal")).unwrap_or_default();
    places.push(("database WAL", String::from_utf8_lossy(&wal).to_string()));
    let carol_secret = carol_uri
        .split(['?', '&'])
        .find_map(|x| x.strip_prefix("secret="))
        .unwrap()
        .to_string();
    for (place, text) in &places {
        for needle in [&secret, &carol_secret] {
            assert!(
                !text.contains(needle.as_str()),
                "a TOTP secret is in the {place}"
            );
        }
        assert!(
            !text.contains(&webhook_secret),
            "the webhook secret is in the {place}"
        );
        assert!(
            !text.contains(&client_secret),
            "the OIDC client secret is in the {place}"
        );
        for code in &recovery {
            assert!(
                !text.contains(code.as_str()),
                "a recovery code is in the {place}"
            );
        }
    }
    // The enrolment answer is the only place the secret was ever shown: asking again is 409.
    let e = api_error(
        p.block_on(p.anonymous().post::<_, api::TotpEnrolment>(
            "/v1/auth/mfa/totp",
            &api::TotpEnrol {
                user: carol.user.clone(),
                password: carol.password.clone(),
            },
        ))
        .unwrap_err(),
    );
    assert_eq!((e.status, e.code.as_str()), (409, "mfa_already_enrolled"));
}

#[test]
fn a_tenant_can_require_mfa_and_tighten_the_password_rules() {
    let p = Platform::start();
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let (ta_uri, _) = p.enrol_totp(&ta.user, &ta.password);
    let ta = p.key_with_totp(&ta.user, &ta.password, &ta_uri);
    let member = p.tenant_user(&admin, &acme.id, "mia", "member");
    assert_eq!(
        raw.signed(&p, &member, "GET", "/v1/whoami", b"").status,
        200
    );

    let settings =
        json!({"require_mfa": true, "password_min_length": 20, "password_max_age_days": 1});
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        &format!("/v1/tenants/{}/settings", acme.id),
        &body(settings),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    // A key the member made without a second factor works no more; a new one needs MFA.
    let r = raw.signed(&p, &member, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (401, "mfa_required"));
    let key = |user: &str, password: &str| {
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/keys",
            &api::KeyCreate {
                user: user.into(),
                password: password.into(),
                public_key: new_public_key(),
                name: None,
                totp_code: None,
                recovery_code: None,
                webauthn: None,
                expires_in_days: None,
            },
        ))
        .map_err(api_error)
    };
    let e = key(&member.user, &member.password).unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (403, "mfa_enrolment_required"));

    // The tenant's minimum length applies to its users' new passwords.
    let change = |current: &str, new: &str| {
        p.block_on(p.anonymous().post::<_, serde_json::Value>(
            "/v1/auth/password",
            &api::PasswordChange {
                user: member.user.clone(),
                current_password: current.into(),
                new_password: new.into(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .map_err(api_error)
    };
    let e = change(&member.password, "Short-but-ok-9").unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (400, "password_policy"));
    let long = "A-much-longer-passw0rd-here";
    change(&member.password, long).unwrap();

    // A password older than the tenant's maximum age must be changed before anything else.
    let (uri, _) = p.enrol_totp(&member.user, long);
    let fresh = p.key_with_totp(&member.user, long, &uri);
    assert_eq!(raw.signed(&p, &fresh, "GET", "/v1/whoami", b"").status, 200);
    let two_days_ago = time_now() - 2 * 86_400;
    let status = std::process::Command::new("sqlite3")
        .arg(p.data().join("palisade.db"))
        .arg(format!(
            "UPDATE users SET password_changed_at = {two_days_ago} WHERE name = '{}';",
            member.user
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let r = raw.signed(&p, &fresh, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (403, "password_change_required"));
}

#[test]
fn the_platform_maximum_password_age_forces_a_change_before_anything_else() {
    let p = Platform::start_with_args(&["--password-max-age-days", "30"]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    assert_eq!(raw.signed(&p, &alice, "GET", "/v1/whoami", b"").status, 200);
    let status = std::process::Command::new("sqlite3")
        .arg(p.data().join("palisade.db"))
        .arg(format!(
            "UPDATE users SET password_changed_at = {} WHERE name = '{}';",
            time_now() - 31 * 86_400,
            alice.user
        ))
        .status()
        .unwrap();
    assert!(status.success());

    // Neither the key nor the password does anything but the change now.
    let r = raw.signed(&p, &alice, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (403, "password_change_required"));
    let login = |password: &str| {
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: alice.user.clone(),
                password: password.into(),
                public_key: new_public_key(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .map_err(api_error)
    };
    let e = login(&alice.password).unwrap_err();
    assert_eq!(
        (e.status, e.code.as_str()),
        (403, "password_change_required")
    );
    let _: serde_json::Value = p
        .block_on(p.anonymous().post(
            "/v1/auth/password",
            &api::PasswordChange {
                user: alice.user.clone(),
                current_password: alice.password.clone(),
                new_password: "A-renewed-passw0rd-31".into(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .unwrap();
    login("A-renewed-passw0rd-31").unwrap();
}

/// A webhook receiver on loopback: every request's signature header and body, in order.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut length, mut signature) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("x-palisade-signature:") {
                    signature = line.split_once(':').unwrap().1.trim().to_string();
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            if tx.send((signature, body)).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

#[test]
fn identity_anomalies_become_alerts_in_the_api_the_audit_log_and_the_webhook() {
    use hmac::{KeyInit, Mac};
    let p = Platform::start_with_args(&["--allow-private-endpoints", "--lockout-after", "3"]);
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let alice = p.tenant_user(&admin, &acme.id, "alice", "member");
    let security = p.platform_account(&admin, "sec-1", "security_admin");
    let (_, bob) = p.tenant(&admin, "bob-corp", None);

    // The tenant's webhook: a refused target first, then the receiver.
    let (url, hooks) = webhook_receiver();
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        &format!("/v1/tenants/{}/webhook", acme.id),
        &body(json!({"url": "ftp://127.0.0.1/x"})),
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "webhook_invalid"),
        "{:?}",
        r.body
    );
    let r = raw.signed(
        &p,
        &ta,
        "PUT",
        &format!("/v1/tenants/{}/webhook", acme.id),
        &body(json!({ "url": url })),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_string();
    let next_hook = || {
        let (signature, body) = hooks.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&body);
        assert_eq!(
            signature,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
            "the webhook signature does not verify"
        );
        serde_json::from_slice::<api::Alert>(&body).unwrap()
    };
    let alerts =
        |s: &Signer| -> Vec<api::Alert> { p.block_on(s.client.get("/v1/alerts")).unwrap() };

    // Alice's key, used from 127.0.0.1 (learnt) and then from 127.0.0.2: new source.
    assert_eq!(raw.signed(&p, &alice, "GET", "/v1/whoami", b"").status, 200);
    assert!(alerts(&ta).is_empty());
    let elsewhere = p.raw_from(Some("127.0.0.2".parse().unwrap()));
    assert_eq!(
        elsewhere
            .signed(&p, &alice, "GET", "/v1/whoami", b"")
            .status,
        200
    );
    assert_eq!(
        elsewhere
            .signed(&p, &alice, "GET", "/v1/whoami", b"")
            .status,
        200
    );
    let seen = alerts(&ta);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].kind, "new_source");
    assert_eq!(
        seen[0].user_id.as_deref(),
        Some(whoami(&p, &alice).id.as_str())
    );
    assert_eq!(next_hook().kind, "new_source");

    // A burst of wrong passwords locks Alice's account: an alert, once.
    let wrong = || {
        p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: alice.user.clone(),
                password: "Wrong-passw0rd-x".into(),
                public_key: new_public_key(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .unwrap_err()
    };
    for _ in 0..5 {
        wrong();
    }
    let kinds: Vec<String> = alerts(&ta).into_iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "login_failures").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(next_hook().kind, "login_failures");

    // One source failing across accounts: a platform alert for the security administrator.
    for n in 0..10 {
        let _ = p.block_on(p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: format!("nobody-{n}"),
                password: "Wrong-passw0rd-x".into(),
                public_key: new_public_key(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ));
    }
    let platform: Vec<String> = alerts(&security).into_iter().map(|a| a.kind).collect();
    assert!(
        platform.contains(&"password_spraying".to_string()),
        "{platform:?}"
    );
    assert!(!alerts(&ta).iter().any(|a| a.kind == "password_spraying"));
    // Another tenant sees none of it.
    let r = raw.signed(&p, &bob, "GET", "/v1/alerts", b"");
    assert_eq!(r.status, 403, "a member may not read alerts");

    // Every alert is in the audit log too.
    let log = std::fs::read_to_string(p.audit_log()).unwrap();
    for kind in ["new_source", "login_failures", "password_spraying"] {
        assert!(
            log.contains(&format!("\"alert.{kind}\"")),
            "{kind} not audited"
        );
    }
}

#[test]
fn a_secret_sent_anywhere_never_comes_back_in_an_error_or_lands_in_a_log() {
    let mut p = Platform::start_with_args(&["--allow-private-endpoints"]);
    // Everything the controller and the agent can log, at every level, is searched below.
    p.log_filter = "trace".to_string();
    p.kill_controller();
    p.start_controller();
    let admin = p.admin();
    let (acme, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    // The tenant's administrator, made before the failed logins below lock Alice out.
    let ta = p.promote(&admin, &alice, "tenant_admin");
    let alice = p.clone_signer(&ta);
    // 32 random bytes.
    let marker = format!("Mk{}", (0..8).map(|_| hex_id()).collect::<String>());
    let mut answers: Vec<(String, RawResponse)> = Vec::new();
    let mut send = |what: &str, r: RawResponse| answers.push((what.to_string(), r));
    let unsigned = |path: &str, body: &[u8]| raw.send(&p, "POST", path, body, &[]);
    let text = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let m = marker.as_str();

    // Password routes: the secret as password, as user name (typed in the wrong field), as
    // code, in the wrong type, under an unknown field, in a truncated body.
    for (path, value) in [
        (
            "/v1/auth/password",
            json!({"user": "admin", "current_password": m, "new_password": format!("{m}Aa1!")}),
        ),
        (
            "/v1/auth/password",
            json!({"user": m, "current_password": m, "new_password": m}),
        ),
        (
            "/v1/auth/keys",
            json!({"user": alice.user, "password": m, "public_key": new_public_key()}),
        ),
        (
            "/v1/auth/keys",
            json!({"user": m, "password": m, "public_key": m}),
        ),
        (
            "/v1/auth/login",
            json!({"user": alice.user, "password": alice.password, "public_key": new_public_key(), "totp_code": m}),
        ),
        (
            "/v1/auth/login",
            json!({"user": alice.user, "password": alice.password, "public_key": new_public_key(), "recovery_code": m}),
        ),
        (
            "/v1/auth/login",
            json!({"user": m, "password": 5, "public_key": m}),
        ),
        (
            "/v1/auth/login",
            json!({"user": 5, "password": m, "public_key": "x"}),
        ),
        ("/v1/auth/login", json!({ m: 1 })),
        (
            "/v1/auth/mfa/totp",
            json!({"user": alice.user, "password": m}),
        ),
        (
            "/v1/auth/mfa/totp/confirm",
            json!({"user": alice.user, "password": alice.password, "code": m}),
        ),
        (
            "/v1/auth/oidc/finish",
            json!({"login_id": m, "code": m, "state": m}),
        ),
    ] {
        send(path, unsigned(path, &text(value)));
    }
    send(
        "truncated",
        unsigned(
            "/v1/auth/login",
            format!("{{\"user\":\"{m}\",\"password\":\"{m}").as_bytes(),
        ),
    );
    send(
        "not json",
        unsigned("/v1/auth/login", format!("password={m}").as_bytes()),
    );

    // Signed requests: the secret in queries (also repeated), as a wrong-typed or unknown
    // body field, and as a provider client secret the controller fails to use.
    for (method, path, request) in [
        ("GET", format!("/v1/instances?tenant={m}"), vec![]),
        (
            "GET",
            format!("/v1/instances?tenant={}&tenant={m}", acme.id),
            vec![],
        ),
        ("GET", format!("/v1/users?{m}=1"), vec![]),
        ("GET", format!("/v1/keys?x={m}"), vec![]),
        (
            "POST",
            "/v1/auth/mfa/verify".to_string(),
            text(json!({"totp_code": m})),
        ),
        (
            "POST",
            "/v1/auth/mfa/verify".to_string(),
            text(json!({"recovery_code": m})),
        ),
        (
            "POST",
            "/v1/instances".to_string(),
            text(json!({"name": 7, "image": m, "flavor": m})),
        ),
        (
            "POST",
            "/v1/instances".to_string(),
            text(json!({"name": "ok", "secret": m})),
        ),
        (
            "PUT",
            format!("/v1/tenants/{}/settings", acme.id),
            text(json!({"require_mfa": m})),
        ),
    ] {
        send(&path, raw.signed(&p, &alice, method, &path, &request));
    }
    // The secret as a path segment (an id, a route), as an extension method, and in headers
    // that look like credentials, signed and not.
    for (method, path) in [
        ("GET", format!("/v1/users/{m}")),
        ("DELETE", format!("/v1/keys/{m}")),
        ("GET", format!("/v1/{m}")),
        ("POST", format!("/v1/auth/{m}")),
        (m, "/v1/whoami".to_string()),
    ] {
        send(&path, raw.signed(&p, &alice, method, &path, &[]));
        send(&path, raw.send(&p, method, &path, &[], &[]));
    }
    for name in [
        "authorization",
        "x-api-key",
        "cookie",
        "signature",
        "x-forwarded-for",
    ] {
        let headers = [(name.to_string(), format!("Bearer {m}"))];
        send(name, raw.send(&p, "GET", "/v1/whoami", &[], &headers));
    }
    let path = format!("/v1/tenants/{}/oidc", acme.id);
    let config = json!({"issuer": format!("http://127.0.0.1:{}", free_port()), "client_id": "x", "client_secret": m});
    send(
        "oidc config",
        raw.signed(&p, &ta, "PUT", &path, &text(config)),
    );

    for (what, r) in &answers {
        assert!(r.status >= 400, "{what}: {} was accepted", r.status);
        assert!(
            !String::from_utf8_lossy(&r.bytes).contains(m),
            "{what}: the secret came back: {}",
            String::from_utf8_lossy(&r.bytes)
        );
    }
    for log in ["controller.log", "agent.log"] {
        let text = std::fs::read_to_string(p.data().join(log)).unwrap_or_default();
        assert!(!text.contains(m), "the secret is in {log}");
    }
    let audit = std::fs::read_to_string(p.audit_log()).unwrap();
    assert!(!audit.contains(m), "the secret is in the audit log");
    assert!(answers.len() >= 20);
}

#[test]
fn no_list_or_object_field_reaches_into_another_tenant() {
    let p = Platform::start();
    let w = World::new(&p, "https://idp.invalid");
    let raw = p.raw();
    let (bob_tenant, bob) = p.tenant(w.admin(), "bob-corp", None);
    let bob = p.promote(w.admin(), &bob, "tenant_admin");
    // Everything of acme's that has an id.
    let mut secrets_of_acme = vec![w.acme.clone(), w.instance.clone(), w.group.clone()];
    for s in w.signers.values() {
        secrets_of_acme.push(s.key_id.clone());
    }
    secrets_of_acme.push(w.member_id.clone());
    let ta_user = whoami(&p, w.tenant_admin()).id;
    secrets_of_acme.push(ta_user.clone());

    // A5: every list route, bare and with every filter it takes, pointed at acme.
    let lists: Vec<_> = routes()
        .into_iter()
        .filter(|r| r.method == "GET" && !r.path.contains('{'))
        .collect();
    assert!(lists.len() >= 8);
    for route in lists {
        let mut paths = vec![route.path.to_string()];
        if palisade_controller::access::server::QUERY_ROUTES.contains(&(route.method, route.path)) {
            paths.push(format!("{}?tenant={}", route.path, w.acme));
            paths.push(format!(
                "{}?tenant={}&tenant={}",
                route.path, bob_tenant.id, w.acme
            ));
        }
        for path in paths {
            let r = raw.signed(&p, &bob, "GET", &path, b"");
            let text = String::from_utf8_lossy(&r.bytes);
            for id in &secrets_of_acme {
                assert!(
                    !text.contains(id.as_str()),
                    "GET {path} as tenant B shows {id}: {text}"
                );
            }
        }
    }

    // A6: fields that name another object, given acme's: not found, nothing made.
    let before = snapshot(&p, &w);
    let bob_group: api::Group = p
        .block_on(
            bob.client
                .post("/v1/groups", &api::GroupCreate { name: "g".into() }),
        )
        .unwrap();
    for (method, path, request) in [
        (
            "PUT",
            format!("/v1/groups/{}/members/{ta_user}", bob_group.id),
            vec![],
        ),
        (
            "PUT",
            format!("/v1/groups/{}/members/{}", w.group, whoami(&p, &bob).id),
            vec![],
        ),
        (
            "POST",
            "/v1/users".to_string(),
            body(json!({"name": "sneaky", "tenant_id": w.acme})),
        ),
        (
            "POST",
            format!("/v1/keys/{}/rotate", w.tenant_admin().key_id),
            body(json!({"public_key": new_public_key()})),
        ),
        (
            "DELETE",
            format!("/v1/keys/{}", w.tenant_admin().key_id),
            vec![],
        ),
        (
            "POST",
            "/v1/instances".to_string(),
            body(json!({"name": "x", "image": w.instance, "flavor": "tiny"})),
        ),
    ] {
        let r = raw.signed(&p, &bob, method, &path, &request);
        assert_eq!((r.status, r.code()), (404, "not_found"), "{method} {path}");
        // A3 for fields too: acme's ids and ids that exist nowhere answer the same bytes.
        let missing = "0d6f7f3e-9c1a-4b7e-8f00-00000000beef";
        let foreign = [
            ta_user.to_string(),
            w.group.clone(),
            w.acme.clone(),
            w.tenant_admin()
                .key_id
                .trim_start_matches("key-")
                .to_string(),
            w.instance.clone(),
        ];
        let (mut path_m, mut request_m) = (path.clone(), String::from_utf8(request).unwrap());
        for id in &foreign {
            path_m = path_m.replace(id.as_str(), missing);
            request_m = request_m.replace(id.as_str(), missing);
        }
        assert_ne!(
            path_m.clone() + &request_m,
            path.clone(),
            "{method} {path}: no id replaced"
        );
        let m = raw.signed(&p, &bob, method, &path_m, request_m.as_bytes());
        assert_eq!(
            (m.status, &m.bytes),
            (r.status, &r.bytes),
            "{method} {path}: A3"
        );
        let mut ids: Vec<&str> = foreign.iter().map(String::as_str).collect();
        ids.push(missing);
        assert_eq!(
            record_shape(&p, &r, &ids),
            record_shape(&p, &m, &ids),
            "{method} {path}: A3 in the audit record"
        );
    }
    assert_eq!(before, snapshot(&p, &w), "a refused call changed acme");
    let bob_group: api::Group = p
        .block_on(bob.client.get::<Vec<api::Group>>("/v1/groups"))
        .unwrap()
        .into_iter()
        .find(|g| g.id == bob_group.id)
        .unwrap();
    assert!(bob_group.members.is_empty());
}

#[test]
fn the_security_administrator_restricts_everyone_with_forbid_only_platform_policies() {
    let p = Platform::start();
    let w = World::new(&p, "https://idp.invalid");
    let raw = p.raw();
    let sa = &w.signers["security_admin"];
    let ta = w.tenant_admin();
    let vm = |name: &str, tags: serde_json::Value| {
        let r = raw.signed(
            &p,
            ta,
            "POST",
            "/v1/instances",
            &body(
                json!({"name": name, "image": "debian-12-busybox", "flavor": "tiny", "tags": tags}),
            ),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    };
    let held = vm("held", json!({"legal-hold": "case-42"}));
    let free = vm("free", json!({}));

    // Grants come from the role table alone: a permit is refused, and nothing changes.
    let r = raw.signed(
        &p,
        sa,
        "PUT",
        "/v1/platform/policies",
        &body(json!({"text": "permit (principal, action == Action::\"audit.read\", resource);"})),
    );
    assert_eq!((r.status, r.code()), (400, "policy_invalid"));
    assert_eq!(raw.signed(&p, sa, "GET", "/v1/audit/log", b"").status, 403);

    let hold = r#"forbid (principal, action == Action::"instance.delete", resource is Instance)
                  when { resource.hasTag("legal-hold") };"#;
    let r = raw.signed(
        &p,
        sa,
        "PUT",
        "/v1/platform/policies",
        &body(json!({ "text": hold })),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    // Tenants cannot write it away, and it binds their administrators too.
    let r = raw.signed(
        &p,
        ta,
        "PUT",
        "/v1/policies",
        &body(json!({"text": "permit (principal, action, resource);"})),
    );
    assert_eq!(r.status, 204);
    let r = raw.signed(&p, ta, "DELETE", &format!("/v1/instances/{held}"), b"");
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = raw.signed(&p, ta, "POST", &format!("/v1/instances/{held}/stop"), b"");
    assert_eq!(r.status, 202);
    let r = raw.signed(&p, ta, "DELETE", &format!("/v1/instances/{free}"), b"");
    assert_eq!(r.status, 202);
    // Only the security administrator writes them.
    let r = raw.signed(
        &p,
        w.admin(),
        "PUT",
        "/v1/platform/policies",
        &body(json!({"text": ""})),
    );
    assert_eq!(r.status, 403);
    let stored: api::Policies = p.block_on(sa.client.get("/v1/platform/policies")).unwrap();
    assert_eq!(stored.text, hold);
}

#[test]
fn what_the_first_newcomer_broke_stays_fixed() {
    let p = Platform::start_with_args(&["--lockout-after", "3", "--lockout-secs", "60"]);
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let ta = p.promote(&admin, &ta, "tenant_admin");
    let raw = p.raw();
    let put_policy = |text: &str| {
        raw.signed(
            &p,
            &ta,
            "PUT",
            "/v1/policies",
            &body(json!({ "text": text })),
        )
    };

    // A deeply nested policy is a 400, not a crashed controller.
    for depth in [142, 5000] {
        let deep = format!(
            "permit (principal, action, resource) when {{ {}true{} }};",
            "(".repeat(depth),
            ")".repeat(depth)
        );
        let r = put_policy(&deep);
        assert_eq!(
            (r.status, r.code()),
            (400, "policy_invalid"),
            "depth {depth}"
        );
    }
    assert_eq!(raw.signed(&p, &ta, "GET", "/v1/whoami", b"").status, 200);

    // A tenant policy cannot hand out what no tenant role has (disabling its own tenant).
    let grab = "permit (principal, action in [Action::\"tenant.disable\", \
                Action::\"tenant.delete\"], resource);";
    assert_eq!(put_policy(grab).status, 204);
    let r = raw.signed(
        &p,
        &ta,
        "POST",
        &format!("/v1/tenants/{}/disable", acme.id),
        b"",
    );
    assert_eq!(r.status, 403);
    // Nor lock its own administrators out of their policies.
    let r = put_policy("forbid (principal, action, resource);");
    assert_eq!((r.status, r.code()), (400, "policy_invalid"));
    assert_eq!(put_policy("").status, 204);

    // Rotation: only by the key itself, once per live successor, never extending the life.
    let session_key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let session: api::ApiKey = p
        .block_on(p.anonymous().post(
            "/v1/auth/login",
            &api::Login {
                user: ta.user.clone(),
                password: ta.password.clone(),
                public_key: palisade_common::signing::encode_public_key(
                    &session_key.verifying_key(),
                ),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .unwrap();
    let session = p.signer(&ta.user, &ta.password, &session.id, session_key, None);
    let rotate = |signer: &Signer, id: &str| {
        raw.signed(
            &p,
            signer,
            "POST",
            &format!("/v1/keys/{id}/rotate"),
            &body(json!({"public_key": new_public_key(), "overlap_secs": 600})),
        )
    };
    let r = rotate(&session, &ta.key_id);
    assert_eq!((r.status, r.code()), (403, "rotate_with_the_key_itself"));
    let keys: Vec<api::ApiKey> = p.block_on(ta.client.get("/v1/keys")).unwrap();
    let old = keys.iter().find(|k| k.id == ta.key_id).unwrap().clone();
    let first = rotate(&ta, &ta.key_id);
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["expires_at"].as_str(), old.expires_at.as_deref());
    let r = rotate(&ta, &ta.key_id);
    assert_eq!((r.status, r.code()), (409, "key_already_rotated"));

    // A second factor, once enrolled, is needed to change the password, and a locked account
    // takes no codes on mfa/verify either.
    let (uri, _) = p.enrol_totp(&ta.user, &ta.password);
    let ta = p.key_with_totp(&ta.user, &ta.password, &uri);
    let e = p
        .block_on(p.anonymous().post::<_, serde_json::Value>(
            "/v1/auth/password",
            &api::PasswordChange {
                user: ta.user.clone(),
                current_password: ta.password.clone(),
                new_password: "Yet-another-passw0rd".into(),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .map_err(api_error)
        .unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (401, "mfa_required"));
    assert_eq!(raw.signed(&p, &ta, "GET", "/v1/whoami", b"").status, 200);
    let verify = |code: String| {
        raw.signed(
            &p,
            &ta,
            "POST",
            "/v1/auth/mfa/verify",
            &body(json!({ "totp_code": code })),
        )
    };
    for wrong in ["000000", "111111", "222222"] {
        assert_eq!(verify(wrong.into()).status, 401);
    }
    let r = verify(totp_code(&uri, 30));
    assert_eq!(
        (r.status, r.code()),
        (401, "mfa_invalid"),
        "a locked account took a code"
    );

    // Every platform account created is an alert for the security administrators.
    let security = p.platform_account(&admin, "sec-1", "security_admin");
    // A user the security administrator disabled stays disabled for the tenant's admin.
    let held = p.tenant_user(&admin, &acme.id, "held", "member");
    let held_id = whoami(&p, &held).id;
    let r = raw.signed(
        &p,
        &security,
        "POST",
        &format!("/v1/users/{held_id}/disable"),
        b"",
    );
    assert_eq!(r.status, 204);
    let r = raw.signed(&p, &ta, "POST", &format!("/v1/users/{held_id}/enable"), b"");
    assert_eq!((r.status, r.code()), (403, "platform_hold"));
    let r = raw.signed(
        &p,
        &security,
        "POST",
        &format!("/v1/users/{held_id}/enable"),
        b"",
    );
    assert_eq!(r.status, 204);
    p.platform_account(&admin, "audrey", "auditor");
    let alerts: Vec<api::Alert> = p.block_on(security.client.get("/v1/alerts")).unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "platform_account_change" && a.detail.contains("auditor")),
        "{alerts:?}"
    );
}

/// The master key can live outside the data directory (`--master-key`): it is made there, 0600,
/// and nothing of it is left in the data directory.
#[test]
fn the_master_key_can_be_kept_outside_the_data_directory() {
    use std::os::unix::fs::PermissionsExt;
    let vault = tempfile::tempdir().unwrap();
    let key = vault.path().join("master.key");
    let p = Platform::start_with_args(&["--master-key", key.to_str().unwrap()]);
    let admin = p.admin();
    let _ = p.tenant(&admin, "acme", None);
    let meta = std::fs::metadata(&key).expect("the master key was made where it was asked");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    assert!(!p.data().join("master.key").exists());
}

/// Creating a user tells a tenant nothing about other tenants: a name another tenant (or a
/// platform account) uses is free in this one; only the tenant's own names are taken.
#[test]
fn user_names_are_the_tenants_own_and_reveal_no_other_tenant() {
    let p = Platform::start();
    let admin = p.admin();
    let (acme, acme_user) = p.tenant(&admin, "acme", None);
    let (globex, _) = p.tenant(&admin, "globex", None);
    let acme_admin = p.promote(&admin, &acme_user, "tenant_admin");
    let _ = p.tenant_user(&admin, &globex.id, "taken", "member");
    let _ = p.platform_account(&admin, "ops-1", "operator");
    let create = |name: &str| {
        p.block_on(acme_admin.client.post::<_, api::UserCreated>(
            "/v1/users",
            &api::UserCreate {
                name: name.into(),
                tenant_id: Some(acme.id.clone()),
                role: None,
            },
        ))
        .map_err(api_error)
    };
    for name in ["taken", "ops-1", "admin", "globex-user"] {
        let created = create(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(created.user.name, format!("{name}@acme"));
    }
    // Within the tenant a name is taken, as any tenant can see for itself.
    // A tenant administrator who names no tenant means its own.
    let own: api::UserCreated = p
        .block_on(acme_admin.client.post(
            "/v1/users",
            &api::UserCreate {
                name: "no-tenant-named".into(),
                tenant_id: None,
                role: None,
            },
        ))
        .unwrap();
    assert_eq!(own.user.tenant_id.as_deref(), Some(acme.id.as_str()));
    assert_eq!(own.user.name, "no-tenant-named@acme");
    // Letter case makes no second name: no look-alike accounts.
    for name in ["taken", "acme-user", "TAKEN", "Acme-User"] {
        let e = create(name).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (409, "name_taken"), "{name}");
    }
}

/// The audit record of a response's request, without what differs from request to request
/// (sequence, time, id, source port, hash) and with the given ids masked.
fn record_shape(p: &Platform, r: &RawResponse, ids: &[&str]) -> serde_json::Value {
    let request_id = r.headers["x-request-id"].to_str().unwrap();
    let log = std::fs::read_to_string(p.audit_log()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(request_id))
        .expect("the request's record");
    let mut line = line.to_string();
    for id in ids {
        line = line.replace(id, "<id>");
    }
    let mut record: serde_json::Value = serde_json::from_str(&line).unwrap();
    for field in ["seq", "time", "request_id", "source", "hash"] {
        record.as_object_mut().unwrap().remove(field);
    }
    record
}
