//! The agent's HTTP API (JSON), served over mutually authenticated TLS.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/host` | `HostInfo` |
//! | `PUT /v1/network` (body `HostNetwork`) | 204: the host carries exactly that network |
//! | `GET /v1/network/traffic` | `HostTraffic`: spoof counters and flows per port |
//! | `GET /v1/instances` | `Vec<InstanceStatus>`: every instance with a directory here |
//! | `POST /v1/instances/{id}/start` (body `InstanceSpec`) | `InstanceStatus` |
//! | `POST /v1/instances/{id}/stop` | `InstanceStatus` |
//! | `DELETE /v1/instances/{id}` | `EraseReport`; an unknown id is 200 with nothing erased |
//! | `GET /v1/instances/{id}/console?offset=N` | `ConsoleChunk` (at most 64 KiB) |
//! | `POST /v1/instances/{id}/console` (raw bytes, at most 4 KiB) | 204: typed on the console |
//!
//! Errors are `ErrorBody` with a stable code; the detailed cause is logged
//! with the request id, never sent.
//!
//! TODO(security): any client certificate chaining to the platform CA is
//! accepted; the controller's identity (its SAN) is not checked yet.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use palisade_common::agent_api::{
    ConsoleChunk, ConsoleQuery, EraseReport, HostInfo, HostNetwork, HostTraffic, InstanceSpec,
    InstanceStatus,
};
use palisade_common::error::ErrorBody;
use tracing::{error, info, info_span, warn, Instrument};

use crate::id::InstanceId;
use crate::image::ImageError;
use crate::instance::{error_chain, InstanceError, Manager};

/// Specs are small; anything bigger is refused with 413.
const BODY_LIMIT: usize = 64 * 1024;

tokio::task_local! {
    static REQUEST_ID: String;
}

pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/network", axum::routing::put(put_network))
        .route("/v1/network/traffic", get(network_traffic))
        .route("/v1/instances", get(list))
        .route("/v1/instances/{id}/start", post(start))
        .route("/v1/instances/{id}/stop", post(stop))
        .route("/v1/instances/{id}", delete(erase))
        .route(
            "/v1/instances/{id}/console",
            get(console).post(console_input),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(log_request))
        .with_state(manager)
}

/// An API error: an HTTP status, a stable code, a message safe to send, and
/// the detailed cause for the log.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    cause: Option<InstanceError>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            cause: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<InstanceError> for ApiError {
    fn from(e: InstanceError) -> Self {
        use InstanceError as E;
        let (status, code, message) = match &e {
            E::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such instance".into(),
            ),
            E::Invalid(msg) => (StatusCode::BAD_REQUEST, "invalid_request", msg.clone()),
            E::Image(ImageError::DigestMismatch { .. }) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "image_digest_mismatch",
                "an image file does not match its pinned digest; nothing was booted".into(),
            ),
            E::Image(ImageError::ReadSource { .. }) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "image_unavailable",
                "an image file cannot be read on this host".into(),
            ),
            E::Disk(crate::disk::DiskError::Create(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "host_tool_failed",
                "a host tool failed".into(),
            ),
            E::StartFailed { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                "the instance failed to start".into(),
            ),
            E::StopTimedOut => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "stop_failed",
                "the instance did not stop".into(),
            ),
            E::NoFreeUid => (
                StatusCode::SERVICE_UNAVAILABLE,
                "host_full",
                "this host has no capacity for another instance".into(),
            ),
            E::ConsoleDetached => (StatusCode::CONFLICT, "console_detached", e.to_string()),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
        };
        ApiError {
            status,
            code,
            message,
            cause: Some(e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        rejection_error(rejection.status(), rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        rejection_error(rejection.status(), rejection.body_text())
    }
}

fn rejection_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "payload_too_large", "request body too large");
    }
    // Malformed JSON, unknown fields, wrong types, a missing content type:
    // all one thing to the caller.
    ApiError::invalid(text)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self.cause {
            Some(cause) if self.status.is_server_error() => {
                error!(code = self.code, error = %error_chain(cause), "request failed")
            }
            Some(cause) => info!(code = self.code, error = %error_chain(cause), "request refused"),
            None => info!(code = self.code, detail = %self.message, "request refused"),
        }
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.request_id = REQUEST_ID.try_with(|id| id.clone()).ok();
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse_id(id: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(id).map_err(|e| ApiError::invalid(e.to_string()))
}

/// Runs an instance operation in its own task: a client that hangs up must
/// not cancel a start or a delete half-way.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, InstanceError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(op.in_current_span()).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => {
            error!(error = %e, "instance operation panicked");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            ))
        }
    }
}

async fn host(State(manager): State<Arc<Manager>>) -> Json<HostInfo> {
    Json(manager.host_info())
}

async fn list(State(manager): State<Arc<Manager>>) -> Json<Vec<InstanceStatus>> {
    Json(manager.list())
}

async fn start(
    State(manager): State<Arc<Manager>>,
    Path(id): Path<String>,
    body: Result<Json<InstanceSpec>, JsonRejection>,
) -> ApiResult<InstanceStatus> {
    let id = parse_id(&id)?;
    let Json(spec) = body?;
    let span = info_span!("start", instance_id = %id);
    detached(async move { manager.start(&id, &spec).await }.instrument(span))
        .await
        .map(Json)
}

async fn stop(
    State(manager): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<InstanceStatus> {
    let id = parse_id(&id)?;
    let span = info_span!("stop", instance_id = %id);
    detached(async move { manager.stop(&id).await }.instrument(span))
        .await
        .map(Json)
}

async fn erase(
    State(manager): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<EraseReport> {
    let id = parse_id(&id)?;
    let span = info_span!("delete", instance_id = %id);
    detached(async move { manager.delete(&id).await }.instrument(span))
        .await
        .map(Json)
}

async fn console(
    State(manager): State<Arc<Manager>>,
    Path(id): Path<String>,
    query: Result<Query<ConsoleQuery>, QueryRejection>,
) -> ApiResult<ConsoleChunk> {
    let id = parse_id(&id)?;
    let Query(query) = query?;
    Ok(Json(manager.console(&id, query.offset).await?))
}

async fn put_network(
    State(manager): State<Arc<Manager>>,
    body: Result<Json<HostNetwork>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(network) = body?;
    // Run to the end even if the caller goes away: a half-applied network is never left.
    let applied =
        tokio::spawn(async move { manager.net().apply(network).await }.in_current_span()).await;
    match applied {
        Ok(Ok(())) => Ok(StatusCode::NO_CONTENT),
        Ok(Err(crate::net::host::NetError::Invalid(e))) => Err(ApiError::invalid(e.to_string())),
        Ok(Err(e)) => {
            error!(error = %error_chain(&e), "applying the host network failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "network_failed",
                "the host network could not be applied",
            ))
        }
        Err(e) => {
            error!(error = %e, "applying the host network panicked");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            ))
        }
    }
}

async fn network_traffic(State(manager): State<Arc<Manager>>) -> ApiResult<HostTraffic> {
    match manager.net().traffic().await {
        Ok(traffic) => Ok(Json(traffic)),
        Err(e) => {
            error!(error = %error_chain(&e), "reading the network's counters failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "network_failed",
                "the network's counters could not be read",
            ))
        }
    }
}

/// Most bytes one console input carries.
pub const MAX_CONSOLE_INPUT: usize = 4096;

async fn console_input(
    State(manager): State<Arc<Manager>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if body.len() > MAX_CONSOLE_INPUT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("console input is at most {MAX_CONSOLE_INPUT} bytes"),
        ));
    }
    manager.console_input(&id, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    )
}

/// One span per request (request id, method, path, peer), closed with the
/// status and latency.
async fn log_request(request: Request, next: Next) -> Response {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let request_id = format!(
        "{:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_default();
    let span = info_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
        peer = %peer,
    );

    let started = Instant::now();
    let response = REQUEST_ID
        .scope(request_id, next.run(request))
        .instrument(span.clone())
        .await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_millis() as u64;
    span.in_scope(|| {
        if status >= 500 {
            warn!(status, latency_ms, "request completed");
        } else {
            info!(status, latency_ms, "request completed");
        }
    });
    response
}
