//! Shared by the controller, the host agent and the CLI.

pub mod agent_api;
pub mod api;
pub mod audit;
pub mod error;
pub mod merkle;
pub mod net;
pub mod ocsf;
pub mod signing;
pub mod tls;
