//! The service layer: what the API does, independent of HTTP.

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod compute;
pub mod federation;
pub mod identity;
pub mod mfa;
pub mod outbound;
pub mod secrets;
