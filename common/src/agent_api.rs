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
    /// Its network ports (at most one today), each a port of the host network the agent was
    /// given (`PUT /v1/network`). None: the instance has no network at all.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

/// One virtio NIC, backed by the port's tap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub port_id: String,
    pub mac: crate::net::Mac,
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

/// The whole tenant network one host must carry. `PUT /v1/network` replaces it at once: the
/// agent renders every rule from it and applies them in one atomic nftables transaction, so a
/// repeated call changes nothing and a partial state is never visible.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct HostNetwork {
    pub vpcs: Vec<VpcNet>,
    pub ports: Vec<PortNet>,
}

/// One VPC: its own L2 domain (a bridge on each host, VXLAN VNI `vni` between hosts) and a
/// router giving it north-south access.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VpcNet {
    pub id: String,
    /// 1-65535 today: on each host it also numbers the VPC's conntrack zone.
    pub vni: u32,
    pub subnets: Vec<SubnetNet>,
    /// The router's address on the external network (source NAT), if it has one.
    pub external_ip: Option<std::net::Ipv4Addr>,
    pub floating: Vec<FloatingNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubnetNet {
    pub id: String,
    pub cidr: crate::net::Ipv4Net,
    /// The network ACL, in order; first match wins. Empty: no ACL, everything passes it.
    /// Non-empty: what no rule allows is denied.
    pub acl: Vec<AclRuleNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclRuleNet {
    pub direction: crate::net::Direction,
    pub action: crate::net::AclAction,
    pub protocol: crate::net::Protocol,
    pub ports: Option<crate::net::PortRange>,
    /// The far end: the source of ingress traffic, the destination of egress traffic.
    pub cidr: crate::net::Ipv4Net,
}

/// A floating address: traffic to `public` on the external network reaches `private`, and
/// `private`'s outgoing traffic leaves from `public`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FloatingNet {
    pub public: std::net::Ipv4Addr,
    pub private: std::net::Ipv4Addr,
}

/// One instance's network port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortNet {
    pub id: String,
    pub instance_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub mac: crate::net::Mac,
    pub ip: std::net::Ipv4Addr,
    /// The union of the port's security groups, remote groups already resolved to their
    /// members' addresses. What no rule allows is dropped (replies to allowed traffic pass).
    pub rules: Vec<SgRuleNet>,
    /// Bandwidth limits in kbit/s; 0 = none.
    pub ingress_kbit: u32,
    pub egress_kbit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgRuleNet {
    pub direction: crate::net::Direction,
    pub protocol: crate::net::Protocol,
    pub ports: Option<crate::net::PortRange>,
    /// The far end: who may send (ingress) or be sent to (egress).
    pub remote: crate::net::Ipv4Net,
}

/// Answer to `GET /v1/network/traffic`: what each port sent and was refused, over the flows
/// of the last two minutes and since the agent last applied the network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct HostTraffic {
    pub ports: Vec<PortTraffic>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct PortTraffic {
    pub port_id: String,
    /// Frames the port's anti-spoofing dropped (forged MAC, IP or ARP, DHCP server replies,
    /// VLAN tags, VXLAN, other ethertypes).
    pub spoofed_frames: u64,
    /// IPv6 frames dropped (VPCs are IPv4-only; not an attack).
    pub ipv6_frames: u64,
    /// Flows to or from the port, in either verdict.
    pub flows: Vec<Flow>,
}

/// One direction of one 5-tuple, as the port's rules judged it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub src: std::net::Ipv4Addr,
    pub dst: std::net::Ipv4Addr,
    /// `tcp`, `udp`, `icmp` or the protocol number.
    pub protocol: String,
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
    /// `accepted` or `denied`.
    pub verdict: String,
}
