//! Tenant networks on this host: VPC bridges, ports, routers, and the rules that isolate them.

// The renderer is wired into the agent's API in the next step of the networking work; until
// then its tests are its only callers.
#![cfg_attr(not(test), allow(dead_code))]

pub mod nft;
