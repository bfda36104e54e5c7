//! All of Palisade's integration tests, in one binary (one link of the dependency tree).
//! They run the real `palisade` binary against real QEMU, real files and a real SQLite file,
//! and need root (chroot, setuid, cgroups).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with its line

mod agent;
mod audit;
mod auth;
mod e2e;
mod federation;
mod iam;
mod network;
mod quota;
mod reconcile;
mod support;
mod up;
mod webauthn;
