//! The controller's error type. Each variant carries a safe public message and a stable code;
//! internal detail stays in the `#[source]` chain, which is logged once at the HTTP edge and
//! never sent to the caller.

use axum::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    /// A password login refused. Wrong password, unknown user and locked account look the same
    /// to the caller; only the audit record tells a lock apart.
    #[error("user name or password is wrong, or the account is locked for a while")]
    LoginRefused {
        locked: bool,
        new_lock: Option<NewLock>,
        /// The existing account the attempt named (wrong password or locked): its tenant's
        /// records show the failed attempt. Never told to the caller.
        account: Option<NewLock>,
    },
    /// A second factor refused (wrong, malformed or reused); `locked` when it was one failure
    /// too many and locked the account (the audit record says so, the caller is not told).
    #[error("the second factor is wrong, malformed or already used")]
    MfaRefused {
        locked: bool,
        new_lock: Option<NewLock>,
    },
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The object does not exist *or the caller may not see it*: the two are indistinguishable.
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("this method is not supported on this path")]
    MethodNotAllowed,
    #[error("too many requests; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the request was not received in time")]
    RequestTimeout,
    #[error("request bodies are limited to {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The account a failed login has just locked (the anomaly detector raises an alert for it).
#[derive(Debug, Clone)]
pub struct NewLock {
    pub user_id: String,
    pub tenant_id: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid {
            code: "invalid_request",
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::Unauthorized { .. } | Error::LoginRefused { .. } | Error::MfaRefused { .. } => {
                StatusCode::UNAUTHORIZED
            }
            Error::Forbidden { .. } => StatusCode::FORBIDDEN,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::Forbidden { code, .. }
            | Error::Conflict { code, .. }
            | Error::Unavailable { code, .. } => code,
            Error::NotFound { .. } => "not_found",
            Error::LoginRefused { .. } => "credentials_invalid",
            Error::MfaRefused { .. } => "mfa_invalid",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::TooLarge { .. } => "body_too_large",
            Error::RequestTimeout => "request_timeout",
            Error::RateLimited { .. } => "rate_limited",
            Error::Internal(_) => "internal",
        }
    }
}

impl Error {
    /// The code the audit record carries: the public code, except where the public answer is
    /// deliberately vaguer than the truth.
    pub fn audit_code(&self) -> &'static str {
        match self {
            Error::LoginRefused { locked: true, .. } | Error::MfaRefused { locked: true, .. } => {
                "account_locked"
            }
            _ => self.code(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Internal(e.into())
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Error {
        Error::Internal(e)
    }
}
