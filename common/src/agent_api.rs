//! The host agent's API, spoken by the controller over mutually authenticated TLS.
//!
//! Every call is idempotent: the controller's reconciler may repeat any of them after a crash
//! of either side, and the agent answers with the state it reached.

use serde::{Deserialize, Serialize};

/// What the agent needs to boot one instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Instance id (UUID, lower-case, hyphenated). Also names its directory and cgroups.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the writable disk the instance gets (qcow2, created on first start).
    pub disk_gib: u32,
    pub image: ImageSpec,
}

/// A bootable image: a kernel and an initramfs, each pinned by its SHA-256 digest.
/// The agent re-checks both digests before every boot and refuses a mismatch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub kernel_path: String,
    pub kernel_sha256: String,
    pub initrd_path: String,
    pub initrd_sha256: String,
    /// Extra kernel command line (the agent always adds `console=ttyS0`).
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Stopped,
}

/// What the agent knows of one instance: it has a directory on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatus {
    pub id: String,
    pub state: PowerState,
    /// Host pid of the QEMU process while running.
    pub pid: Option<u32>,
    /// The unprivileged uid the QEMU process runs as.
    pub uid: u32,
}

/// Answer to `DELETE /v1/instances/{id}`: the instance is gone from this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EraseReport {
    pub id: String,
    /// RFC 3339 UTC time at which the disk had been overwritten, synced and unlinked.
    /// `None` when there was nothing left to erase (a repeated delete).
    pub disk_erased_at: Option<String>,
    pub disk_bytes_overwritten: u64,
}

/// A piece of an instance's console log. `offset` counts bytes since the log began, so a reader
/// can resume; when the capped log has dropped old bytes, `offset` jumps forward.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleChunk {
    pub offset: u64,
    pub next_offset: u64,
    /// The bytes, decoded as UTF-8 with replacement characters.
    pub data: String,
}

/// Answer to `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    pub hostname: String,
    /// `kvm` or `tcg`: what `auto` resolved to on this host.
    pub accelerator: String,
    /// `v1` or `v2`.
    pub cgroup_version: String,
}

/// Query of `GET /v1/instances/{id}/console`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    #[serde(default)]
    pub offset: u64,
}
