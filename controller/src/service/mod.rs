//! The service layer: what the API does, independent of HTTP.

pub mod audit;
pub mod compute;
pub mod identity;
