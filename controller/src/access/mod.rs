//! The access layer: the HTTPS server, request authentication, and the handlers that turn HTTP
//! into service calls. Every request passes through [`guard::guard`], which authenticates it
//! and makes sure it leaves exactly one audit record.

pub mod authz;
pub mod guard;
pub mod handlers;
pub mod limits;
pub mod net_handlers;
pub mod server;
