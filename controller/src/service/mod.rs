//! The service layer: what the API does, independent of HTTP.

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod compute;
pub mod identity;
pub mod mfa;
pub mod secrets;
