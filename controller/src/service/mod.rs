//! The service layer: what the API does, independent of HTTP.

/// SQL: whether the account in `$users` (the `users` table or its alias) has a second factor
/// enrolled, TOTP or a security key. Every "is MFA enrolled" question asks this, so a new kind
/// of factor is added in one place.
macro_rules! mfa_enrolled_sql {
    ($users:literal) => {
        concat!(
            "(",
            $users,
            ".totp_confirmed <> 0 OR EXISTS (SELECT 1 FROM webauthn_credentials ",
            "wc WHERE wc.user_id = ",
            $users,
            ".id))"
        )
    };
}

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod compute;
pub mod federation;
pub mod identity;
pub mod mfa;
pub mod network;
pub mod outbound;
pub mod retention;
pub mod secrets;
pub mod syslog;
pub mod webauthn;
