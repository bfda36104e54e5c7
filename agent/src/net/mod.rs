//! Tenant networks on this host: VPC bridges, ports, routers, and the rules that isolate them.

pub mod conntrack;
pub mod host;
pub mod nft;
