//! The HTTPS server (rustls only; there is no plain-HTTP listener) and the route table.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use super::{guard, handlers as h};
use crate::pki::Pki;
use crate::Controller;

/// Every route of the public API. Tests walk this table (see `ROUTES`), so a route added here
/// without being covered there fails CI.
pub fn router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/v1/auth/password", post(h::change_password))
        .route("/v1/auth/keys", post(h::create_key))
        .route("/v1/whoami", get(h::whoami))
        .route("/v1/keys", get(h::list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(h::revoke_key))
        .route("/v1/tenants", get(h::list_tenants).post(h::create_tenant))
        .route("/v1/users", post(h::create_user))
        .route("/v1/flavors", get(h::list_flavors))
        .route("/v1/images", get(h::list_images))
        .route(
            "/v1/instances",
            get(h::list_instances).post(h::create_instance),
        )
        .route(
            "/v1/instances/{id}",
            get(h::show_instance).delete(h::delete_instance),
        )
        .route("/v1/instances/{id}/stop", post(h::stop_instance))
        .route("/v1/instances/{id}/start", post(h::start_instance))
        .route("/v1/instances/{id}/console", get(h::console))
        .route("/v1/audit/log", get(h::audit_log))
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            controller.clone(),
            guard::guard,
        ))
        .with_state(controller)
}

/// The routes above as (method, path) pairs, for the access-control test matrix.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/auth/password"),
    ("POST", "/v1/auth/keys"),
    ("GET", "/v1/whoami"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{id}"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/tenants"),
    ("POST", "/v1/users"),
    ("GET", "/v1/flavors"),
    ("GET", "/v1/images"),
    ("GET", "/v1/instances"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances/{id}"),
    ("DELETE", "/v1/instances/{id}"),
    ("POST", "/v1/instances/{id}/stop"),
    ("POST", "/v1/instances/{id}/start"),
    ("GET", "/v1/instances/{id}/console"),
    ("GET", "/v1/audit/log"),
];

const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(controller: Arc<Controller>, listen: SocketAddr, pki: &Pki) -> anyhow::Result<()> {
    let tls = palisade_common::tls::server_config(&pki.server_cert, &pki.server_key, None)?;
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    let listener = std::net::TcpListener::bind(listen)?;
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
    server.serve(app).await?;
    Ok(())
}
