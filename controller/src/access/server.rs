//! The HTTPS server (rustls only; there is no plain-HTTP listener) and the route table.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;

use super::{guard, handlers as h, net_handlers as n};
use crate::pki::Pki;
use crate::Controller;

/// One route of the public API: method, path, and the authorization action it performs.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    /// The role-matrix action; password routes name their own (`auth.*`, `mfa.enrol`, ...).
    pub action: &'static str,
}

/// Routes that read a query string; every other route refuses one (400), so a parameter the
/// API does not know is never silently ignored.
pub const QUERY_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/vpcs"),
    ("GET", "/v1/subnets"),
    ("GET", "/v1/security-groups"),
    ("GET", "/v1/ports"),
    ("GET", "/v1/users"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/policies"),
    ("GET", "/v1/instances/{id}/console"),
    ("GET", "/v1/audit/records"),
    ("GET", "/v1/audit/ocsf"),
    ("GET", "/v1/audit/proof/inclusion"),
    ("GET", "/v1/audit/proof/consistency"),
];

/// Routes that read a request body; every other route refuses a non-empty one (400), so a
/// field sent where none is read is never silently ignored.
pub const BODY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/vpcs"),
    ("POST", "/v1/vpcs/{id}/subnets"),
    ("PUT", "/v1/subnets/{id}/acl"),
    ("POST", "/v1/security-groups"),
    ("POST", "/v1/security-groups/{id}/rules"),
    ("PATCH", "/v1/ports/{id}"),
    ("POST", "/v1/instances/{id}/console"),
    ("POST", "/v1/auth/password"),
    ("POST", "/v1/auth/keys"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/mfa/totp"),
    ("POST", "/v1/auth/mfa/totp/confirm"),
    ("POST", "/v1/auth/mfa/webauthn/challenge"),
    ("POST", "/v1/auth/oidc/start"),
    ("POST", "/v1/auth/oidc/finish"),
    ("POST", "/v1/auth/mfa/verify"),
    ("POST", "/v1/mfa/webauthn/confirm"),
    ("POST", "/v1/keys/{id}/rotate"),
    ("POST", "/v1/tenants"),
    ("PUT", "/v1/tenants/{id}/settings"),
    ("PUT", "/v1/tenants/{id}/oidc"),
    ("PUT", "/v1/tenants/{id}/webhook"),
    ("POST", "/v1/users"),
    ("PUT", "/v1/users/{id}/role"),
    ("POST", "/v1/groups"),
    ("PUT", "/v1/policies"),
    ("PUT", "/v1/platform/policies"),
    ("PUT", "/v1/audit/holds/{id}"),
    ("POST", "/v1/instances"),
];

type Handler = MethodRouter<Arc<Controller>>;

/// The route table: the single source of the router, and of the access-control tests, which
/// walk it so that a route added here without an entry in the authorization matrix fails CI.
fn table() -> Vec<(RouteSpec, Handler)> {
    fn r(
        method: &'static str,
        path: &'static str,
        action: &'static str,
        h: Handler,
    ) -> (RouteSpec, Handler) {
        (
            RouteSpec {
                method,
                path,
                action,
            },
            h,
        )
    }
    vec![
        // Password-authenticated (no key yet): see guard::PASSWORD_ROUTES.
        r(
            "POST",
            "/v1/auth/password",
            "auth.password_change",
            post(h::change_password),
        ),
        r("POST", "/v1/auth/keys", "key.create", post(h::create_key)),
        r("POST", "/v1/auth/login", "auth.login", post(h::login)),
        r(
            "POST",
            "/v1/auth/mfa/totp",
            "mfa.enrol",
            post(h::totp_enrol),
        ),
        r(
            "POST",
            "/v1/auth/mfa/totp/confirm",
            "mfa.confirm",
            post(h::totp_confirm),
        ),
        r(
            "POST",
            "/v1/auth/mfa/webauthn/challenge",
            "mfa.webauthn_challenge",
            post(h::webauthn_challenge),
        ),
        r(
            "POST",
            "/v1/auth/oidc/start",
            "auth.oidc_start",
            post(h::oidc_start),
        ),
        r(
            "POST",
            "/v1/auth/oidc/finish",
            "auth.oidc_finish",
            post(h::oidc_finish),
        ),
        // Signed.
        r(
            "POST",
            "/v1/auth/mfa/verify",
            "mfa.verify",
            post(h::mfa_verify),
        ),
        r(
            "POST",
            "/v1/auth/mfa/verify/challenge",
            "mfa.verify_challenge",
            post(h::mfa_verify_challenge),
        ),
        r(
            "POST",
            "/v1/mfa/webauthn",
            "mfa.webauthn_register",
            post(h::webauthn_register),
        ),
        r(
            "POST",
            "/v1/mfa/webauthn/confirm",
            "mfa.webauthn_confirm",
            post(h::webauthn_confirm),
        ),
        r("GET", "/v1/whoami", "user.whoami", get(h::whoami)),
        r("GET", "/v1/keys", "key.list", get(h::list_keys)),
        r(
            "DELETE",
            "/v1/keys/{id}",
            "key.revoke",
            delete(h::revoke_key),
        ),
        r(
            "POST",
            "/v1/keys/{id}/rotate",
            "key.rotate",
            post(h::rotate_key),
        ),
        r("GET", "/v1/tenants", "tenant.list", get(h::list_tenants)),
        r(
            "POST",
            "/v1/tenants",
            "tenant.create",
            post(h::create_tenant),
        ),
        r(
            "GET",
            "/v1/tenants/{id}",
            "tenant.show",
            get(h::show_tenant),
        ),
        r(
            "DELETE",
            "/v1/tenants/{id}",
            "tenant.delete",
            delete(h::delete_tenant),
        ),
        r(
            "PUT",
            "/v1/tenants/{id}/settings",
            "tenant.settings",
            put(h::tenant_settings),
        ),
        r(
            "PUT",
            "/v1/tenants/{id}/oidc",
            "tenant.oidc",
            put(h::tenant_oidc),
        ),
        r(
            "PUT",
            "/v1/tenants/{id}/webhook",
            "tenant.webhook",
            put(h::tenant_webhook),
        ),
        r(
            "POST",
            "/v1/tenants/{id}/disable",
            "tenant.disable",
            post(h::disable_tenant),
        ),
        r(
            "POST",
            "/v1/tenants/{id}/enable",
            "tenant.enable",
            post(h::enable_tenant),
        ),
        r("GET", "/v1/users", "user.list", get(h::list_users)),
        r("POST", "/v1/users", "user.create", post(h::create_user)),
        r("GET", "/v1/users/{id}", "user.show", get(h::show_user)),
        r(
            "DELETE",
            "/v1/users/{id}",
            "user.delete",
            delete(h::delete_user),
        ),
        r(
            "PUT",
            "/v1/users/{id}/role",
            "user.set_role",
            put(h::set_role),
        ),
        r(
            "POST",
            "/v1/users/{id}/disable",
            "user.disable",
            post(h::disable_user),
        ),
        r(
            "POST",
            "/v1/users/{id}/enable",
            "user.enable",
            post(h::enable_user),
        ),
        r(
            "DELETE",
            "/v1/users/{id}/mfa",
            "user.reset_mfa",
            delete(h::reset_mfa),
        ),
        r("GET", "/v1/groups", "group.list", get(h::list_groups)),
        r("POST", "/v1/groups", "group.create", post(h::create_group)),
        r(
            "DELETE",
            "/v1/groups/{id}",
            "group.delete",
            delete(h::delete_group),
        ),
        r(
            "PUT",
            "/v1/groups/{id}/members/{user}",
            "group.add_member",
            put(h::add_member),
        ),
        r(
            "DELETE",
            "/v1/groups/{id}/members/{user}",
            "group.remove_member",
            delete(h::remove_member),
        ),
        r("GET", "/v1/policies", "policy.get", get(h::get_policies)),
        r("PUT", "/v1/policies", "policy.put", put(h::put_policies)),
        r(
            "GET",
            "/v1/platform/policies",
            "platform.policy_get",
            get(h::get_platform_policies),
        ),
        r(
            "PUT",
            "/v1/platform/policies",
            "platform.policy_put",
            put(h::put_platform_policies),
        ),
        r("GET", "/v1/alerts", "alert.list", get(h::list_alerts)),
        r("GET", "/v1/flavors", "flavor.list", get(h::list_flavors)),
        r("GET", "/v1/images", "image.list", get(h::list_images)),
        r(
            "GET",
            "/v1/instances",
            "instance.list",
            get(h::list_instances),
        ),
        r(
            "POST",
            "/v1/instances",
            "instance.create",
            post(h::create_instance),
        ),
        r(
            "GET",
            "/v1/instances/{id}",
            "instance.show",
            get(h::show_instance),
        ),
        r(
            "DELETE",
            "/v1/instances/{id}",
            "instance.delete",
            delete(h::delete_instance),
        ),
        r(
            "POST",
            "/v1/instances/{id}/stop",
            "instance.stop",
            post(h::stop_instance),
        ),
        r(
            "POST",
            "/v1/instances/{id}/start",
            "instance.start",
            post(h::start_instance),
        ),
        r(
            "GET",
            "/v1/instances/{id}/console",
            "instance.console",
            get(h::console),
        ),
        r(
            "POST",
            "/v1/instances/{id}/console",
            "instance.console_input",
            post(h::console_input),
        ),
        r("GET", "/v1/vpcs", "vpc.list", get(n::list_vpcs)),
        r("POST", "/v1/vpcs", "vpc.create", post(n::create_vpc)),
        r("GET", "/v1/vpcs/{id}", "vpc.show", get(n::show_vpc)),
        r(
            "DELETE",
            "/v1/vpcs/{id}",
            "vpc.delete",
            delete(n::delete_vpc),
        ),
        r(
            "POST",
            "/v1/vpcs/{id}/subnets",
            "subnet.create",
            post(n::create_subnet),
        ),
        r("GET", "/v1/subnets", "subnet.list", get(n::list_subnets)),
        r(
            "GET",
            "/v1/subnets/{id}",
            "subnet.show",
            get(n::show_subnet),
        ),
        r(
            "DELETE",
            "/v1/subnets/{id}",
            "subnet.delete",
            delete(n::delete_subnet),
        ),
        r(
            "PUT",
            "/v1/subnets/{id}/acl",
            "subnet.acl_set",
            put(n::set_acl),
        ),
        r(
            "GET",
            "/v1/security-groups",
            "security_group.list",
            get(n::list_groups),
        ),
        r(
            "POST",
            "/v1/security-groups",
            "security_group.create",
            post(n::create_group),
        ),
        r(
            "GET",
            "/v1/security-groups/{id}",
            "security_group.show",
            get(n::show_group),
        ),
        r(
            "DELETE",
            "/v1/security-groups/{id}",
            "security_group.delete",
            delete(n::delete_group),
        ),
        r(
            "POST",
            "/v1/security-groups/{id}/rules",
            "security_group.rule_add",
            post(n::add_rule),
        ),
        r(
            "DELETE",
            "/v1/security-group-rules/{id}",
            "security_group.rule_delete",
            delete(n::delete_rule),
        ),
        r("GET", "/v1/ports", "port.list", get(n::list_ports)),
        r("GET", "/v1/ports/{id}", "port.show", get(n::show_port)),
        r(
            "GET",
            "/v1/ports/{id}/traffic",
            "port.traffic",
            get(n::port_traffic),
        ),
        r(
            "PATCH",
            "/v1/ports/{id}",
            "port.update",
            axum::routing::patch(n::update_port),
        ),
        r("GET", "/v1/audit/log", "audit.read", get(h::audit_log)),
        r(
            "GET",
            "/v1/audit/records",
            "audit_records.list",
            get(h::audit_records),
        ),
        r(
            "GET",
            "/v1/audit/ocsf",
            "audit_records.export",
            get(h::audit_ocsf),
        ),
        r(
            "GET",
            "/v1/audit/heads",
            "audit_proof.heads",
            get(h::audit_heads),
        ),
        r(
            "POST",
            "/v1/audit/heads",
            "audit_proof.sign",
            post(h::audit_sign_head),
        ),
        r(
            "GET",
            "/v1/audit/proof/inclusion",
            "audit_proof.inclusion",
            get(h::audit_inclusion),
        ),
        r(
            "GET",
            "/v1/audit/proof/consistency",
            "audit_proof.consistency",
            get(h::audit_consistency),
        ),
        r(
            "POST",
            "/v1/audit/head-key/rotate",
            "audit_key.rotate",
            post(h::audit_rotate_key),
        ),
        r(
            "GET",
            "/v1/audit/retention",
            "audit_retention.show",
            get(h::audit_retention),
        ),
        r(
            "PUT",
            "/v1/audit/holds/{id}",
            "audit_hold.set",
            put(h::audit_hold_set),
        ),
        r(
            "DELETE",
            "/v1/audit/holds/{id}",
            "audit_hold.release",
            delete(h::audit_hold_release),
        ),
        r(
            "POST",
            "/v1/audit/purge",
            "audit_log.purge",
            post(h::audit_purge),
        ),
    ]
}

/// The routes, without their handlers, for tests and documentation.
pub fn routes() -> Vec<RouteSpec> {
    table().into_iter().map(|(spec, _)| spec).collect()
}

/// The action of the route `method path` (`path` as in the table, with its `{id}` slots).
pub fn action_of(method: &str, path: &str) -> Option<&'static str> {
    static ROUTES: std::sync::OnceLock<Vec<RouteSpec>> = std::sync::OnceLock::new();
    ROUTES
        .get_or_init(routes)
        .iter()
        .find(|r| r.method == method && r.path == path)
        .map(|r| r.action)
}

/// `path` as it may be logged and audited: each segment that is a literal of some route or an
/// id (a UUID, or `key-<uuid>`) is kept; any other segment — which may be a secret pasted into
/// the wrong place — becomes a digest, so a request path never carries caller text into a log.
pub fn loggable_path(path: &str) -> String {
    static LITERALS: std::sync::OnceLock<std::collections::BTreeSet<&'static str>> =
        std::sync::OnceLock::new();
    let literals = LITERALS.get_or_init(|| {
        routes()
            .iter()
            .flat_map(|r| r.path.split('/'))
            .filter(|segment| !segment.starts_with('{'))
            .collect()
    });
    path.split('/')
        .map(|segment| match literals.contains(segment) {
            true => segment.to_string(),
            false => loggable_id(segment),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// An object id sent by a caller, as it may be logged and audited: an id of ours (a UUID, or
/// `key-<uuid>`) as sent, anything else as a digest.
pub fn loggable_id(id: &str) -> String {
    let uuid = id.strip_prefix("key-").unwrap_or(id);
    if uuid::Uuid::parse_str(uuid).is_ok() {
        return id.to_string();
    }
    format!("~{}", text_digest(id))
}

/// Caller text that may hold a secret, as logs and audit records name it: `sha256:<first 8
/// bytes, hex>`, enough to match repeats, never the text.
pub fn text_digest(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!("sha256:{}", hex::encode(&digest[..8]))
}

pub fn router(controller: Arc<Controller>) -> Router {
    let mut by_path: Vec<(&'static str, Handler)> = Vec::new();
    for (spec, handler) in table() {
        match by_path.iter_mut().find(|(path, _)| *path == spec.path) {
            Some((_, existing)) => {
                let merged = std::mem::take(existing).merge(handler);
                *existing = merged;
            }
            None => by_path.push((spec.path, handler)),
        }
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    router
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            controller.clone(),
            guard::guard,
        ))
        .with_state(controller)
}

const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(
    controller: Arc<Controller>,
    listener: std::net::TcpListener,
    pki: &Pki,
) -> anyhow::Result<()> {
    let tls = palisade_common::tls::server_config(&pki.server_cert, &pki.server_key, None)?;
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    let addr = listener.local_addr()?;
    // Printed for whoever started us (tests bind port 0 and read the real port from here).
    println!("PALISADE-API-LISTENING https://{addr}");
    tracing::info!(%addr, "API listening");
    let app = router(controller).into_make_service_with_connect_info::<SocketAddr>();
    // A client must finish each request's headers within HEADER_TIMEOUT, so slow-header
    // connections (slowloris) cannot pile up.
    let mut server =
        axum_server::from_tcp_rustls(listener, config)?.first_request_timeout(HEADER_TIMEOUT);
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    // SIGTERM or SIGINT: stop taking connections, let requests in flight finish (10 s at
    // most), then return, so the caller can close the audit log with a stop record.
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot watch for SIGTERM/SIGINT");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: finishing requests in flight");
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    server.handle(handle).serve(app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_route_literals_and_ids_of_a_path_are_logged_as_sent() {
        use super::loggable_path;
        let id = "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b";
        let path = format!("/v1/instances/{id}/console");
        assert_eq!(loggable_path(&path), path);
        let key = format!("/v1/keys/key-{id}/rotate");
        assert_eq!(loggable_path(&key), key);
        let secret = loggable_path("/v1/users/Hunter2-secret/x%0Ay");
        assert!(secret.starts_with("/v1/users/~sha256:"), "{secret}");
        assert!(
            !secret.contains("Hunter2") && !secret.contains("%0A"),
            "{secret}"
        );
    }

    use super::*;

    #[test]
    fn the_body_and_query_lists_name_real_routes() {
        let routes = routes();
        for (method, path) in BODY_ROUTES.iter().chain(QUERY_ROUTES) {
            assert!(
                routes
                    .iter()
                    .any(|r| r.method == *method && r.path == *path),
                "{method} {path} is not a route"
            );
        }
    }

    /// The routes a password (or an identity provider) authenticates instead of a signature
    /// (TESTING.md A1): this list may only shrink. Adding one means changing this test too,
    /// in review, with a reason.
    #[test]
    fn the_unsigned_routes_are_exactly_these() {
        let mut unsigned: Vec<String> = routes()
            .iter()
            .filter(|r| guard::is_password_route_path(r.method, r.path))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        unsigned.sort();
        assert_eq!(
            unsigned,
            [
                "POST /v1/auth/keys",
                "POST /v1/auth/login",
                "POST /v1/auth/mfa/totp",
                "POST /v1/auth/mfa/totp/confirm",
                "POST /v1/auth/mfa/webauthn/challenge",
                "POST /v1/auth/oidc/finish",
                "POST /v1/auth/oidc/start",
                "POST /v1/auth/password",
            ]
        );
        assert_eq!(guard::PASSWORD_ROUTES.len(), unsigned.len());
    }

    /// Every signed route's action is in the role matrix, and every matrix action has a route:
    /// a route cannot be added without deciding who may call it.
    #[test]
    fn routes_and_the_role_matrix_agree() {
        let matrix = crate::access::authz::Matrix::builtin().unwrap();
        let routes = routes();
        for route in &routes {
            if guard::is_password_route_path(route.method, route.path) {
                continue;
            }
            assert!(
                matrix.row(route.action).is_some(),
                "{} {} ({}) has no row in policy/roles.txt",
                route.method,
                route.path,
                route.action
            );
        }
        for row in &matrix.rows {
            assert!(
                routes.iter().any(|r| r.action == row.action),
                "{} is in the matrix but no route performs it",
                row.action
            );
        }
    }
}
