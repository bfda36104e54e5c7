//! Tenant network values: what the controller validates and allocates, and what the agent turns
//! into bridges, nftables rules and tc limits. Every value here is typed (addresses, prefixes,
//! port numbers, protocols), so nothing a tenant writes reaches a host tool as free text.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The protocols a security-group or ACL rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Every IPv4 protocol.
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    /// Whether rules of this protocol may name ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl FromStr for Protocol {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Protocol, NetError> {
        match s {
            "any" | "all" => Ok(Protocol::Any),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            _ => Err(NetError(format!(
                "unknown protocol {:?}: one of any, tcp, udp, icmp",
                shown(s)
            ))),
        }
    }
}

/// Which way a rule looks: `ingress` = traffic to the port, `egress` = traffic from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl FromStr for Direction {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Direction, NetError> {
        match s {
            "ingress" | "in" => Ok(Direction::Ingress),
            "egress" | "out" => Ok(Direction::Egress),
            _ => Err(NetError(format!(
                "unknown direction {:?}: ingress or egress",
                shown(s)
            ))),
        }
    }
}

/// What a network ACL rule does with the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    Allow,
    Deny,
}

/// An inclusive TCP or UDP port range, 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

impl PortRange {
    /// Checks numbers as the API received them (wider than u16, so 70000 gets a clear message).
    pub fn new(from: u32, to: u32) -> Result<PortRange, NetError> {
        for p in [from, to] {
            if !(1..=65535).contains(&p) {
                return Err(NetError(format!("port {p} is out of range 1-65535")));
            }
        }
        if from > to {
            return Err(NetError(format!("port range {from}-{to} is backwards")));
        }
        Ok(PortRange {
            from: from as u16,
            to: to as u16,
        })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}-{}", self.from, self.to)
        }
    }
}

/// An Ethernet address. Palisade gives ports locally administered unicast addresses (`02:…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The port's address, derived from its id: locally administered, unicast.
    pub fn for_port(port_id: &str) -> Mac {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(port_id.as_bytes());
        let mut bytes = [0u8; 6];
        bytes[0] = 0x02;
        bytes[1..].copy_from_slice(&digest[..5]);
        Mac(bytes)
    }

    /// The IPv6 link-local address the guest's kernel derives from it (EUI-64).
    pub fn link_local(&self) -> std::net::Ipv6Addr {
        let b = self.0;
        std::net::Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            b[0] ^ 0x02,
            b[1],
            b[2],
            0xff,
            0xfe,
            b[3],
            b[4],
            b[5],
        ])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Mac, NetError> {
        let bad = || NetError(format!("{:?} is not a MAC address", shown(s)));
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(bytes))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A refused network value; the message says what was wrong and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetError(pub String);

/// At most 64 characters of what the caller sent, for an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses an IPv4 prefix in canonical form: `10.0.0.0/24`, not `10.0.0.5/24` (whose host bits
/// would be silently dropped) and not a bare address (say `/32`).
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, NetError> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        NetError(format!(
            "{:?} is not an IPv4 prefix like 10.0.0.0/24",
            shown(s)
        ))
    })?;
    if net.trunc() != net {
        return Err(NetError(format!(
            "{s} has host bits set: the prefix is {}",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Address ranges no tenant network may use: they would shadow the host, the metadata
/// service, multicast or the Internet's special blocks.
const RESERVED: [&str; 6] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
];

/// The private ranges a VPC may draw from (RFC 1918 and shared address space, RFC 6598).
const PRIVATE: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

fn nets(list: &[&str]) -> Vec<Ipv4Net> {
    list.iter()
        .map(|s| s.parse().expect("constant prefix"))
        .collect()
}

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A VPC's address block: private, /16 to /28.
pub fn check_vpc_cidr(net: &Ipv4Net) -> Result<(), NetError> {
    if !(16..=28).contains(&net.prefix_len()) {
        return Err(NetError(format!(
            "a VPC's block must be /16 to /28, not /{}",
            net.prefix_len()
        )));
    }
    if !nets(&PRIVATE).iter().any(|p| p.contains(net)) {
        return Err(NetError(format!(
            "{net} is not private: use 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10"
        )));
    }
    Ok(())
}

/// A subnet: /16 to /29, inside its VPC, overlapping none of its siblings.
pub fn check_subnet_cidr(
    net: &Ipv4Net,
    vpc: &Ipv4Net,
    siblings: &[Ipv4Net],
) -> Result<(), NetError> {
    if !(16..=29).contains(&net.prefix_len()) {
        return Err(NetError(format!(
            "a subnet must be /16 to /29, not /{}",
            net.prefix_len()
        )));
    }
    if !vpc.contains(net) {
        return Err(NetError(format!("{net} is not inside the VPC's {vpc}")));
    }
    if let Some(other) = siblings.iter().find(|s| overlaps(s, net)) {
        return Err(NetError(format!("{net} overlaps the VPC's subnet {other}")));
    }
    Ok(())
}

/// A remote prefix in a rule may be anything but the reserved blocks' insides (0.0.0.0/0 is
/// fine: it means everyone).
pub fn check_remote_cidr(net: &Ipv4Net) -> Result<(), NetError> {
    if net.prefix_len() == 0 {
        return Ok(());
    }
    if let Some(r) = nets(&RESERVED).iter().find(|r| r.contains(net)) {
        return Err(NetError(format!("{net} lies in the reserved block {r}")));
    }
    Ok(())
}

/// The gateway of a subnet: its first usable address.
pub fn gateway(subnet: &Ipv4Net) -> Ipv4Addr {
    nth(subnet, 1)
}

/// The `n`th address of a prefix.
pub fn nth(net: &Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Addresses a port can get: all but the network address, the gateway, the broadcast address
/// and two reserved for the platform (DHCP server and a future second router).
pub fn assignable(subnet: &Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(subnet.network());
    let size = 1u32 << (32 - subnet.prefix_len());
    (4..size - 1).map(move |n| Ipv4Addr::from(base + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_checked_with_clear_messages() {
        assert_eq!(PortRange::new(22, 22).unwrap().to_string(), "22");
        assert_eq!(PortRange::new(80, 90).unwrap().to_string(), "80-90");
        assert_eq!(
            PortRange::new(1, 70000).unwrap_err().0,
            "port 70000 is out of range 1-65535"
        );
        assert!(PortRange::new(0, 5).is_err());
        assert!(PortRange::new(9, 5).unwrap_err().0.contains("backwards"));
    }

    #[test]
    fn prefixes_must_be_canonical() {
        assert_eq!(
            parse_cidr("10.0.0.0/24").unwrap().to_string(),
            "10.0.0.0/24"
        );
        assert!(parse_cidr("10.0.0.5/24")
            .unwrap_err()
            .0
            .contains("10.0.0.0/24"));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "300.0.0.0/8",
            "",
            "abc",
            "10.0.0.0/24 ",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vpc_and_subnet_blocks() {
        let vpc = parse_cidr("10.1.0.0/16").unwrap();
        assert!(check_vpc_cidr(&vpc).is_ok());
        assert!(check_vpc_cidr(&parse_cidr("8.8.0.0/16").unwrap()).is_err());
        assert!(check_vpc_cidr(&parse_cidr("10.0.0.0/8").unwrap()).is_err());
        assert!(check_vpc_cidr(&parse_cidr("169.254.0.0/16").unwrap()).is_err());
        let a = parse_cidr("10.1.1.0/24").unwrap();
        assert!(check_subnet_cidr(&a, &vpc, &[]).is_ok());
        assert!(
            check_subnet_cidr(&parse_cidr("10.1.1.128/25").unwrap(), &vpc, &[a])
                .unwrap_err()
                .0
                .contains("overlaps")
        );
        assert!(check_subnet_cidr(&parse_cidr("10.2.0.0/24").unwrap(), &vpc, &[]).is_err());
        assert!(check_subnet_cidr(&parse_cidr("10.1.2.0/30").unwrap(), &vpc, &[]).is_err());
    }

    #[test]
    fn remote_prefixes_avoid_reserved_blocks() {
        assert!(check_remote_cidr(&parse_cidr("0.0.0.0/0").unwrap()).is_ok());
        assert!(check_remote_cidr(&parse_cidr("192.0.2.0/24").unwrap()).is_ok());
        assert!(check_remote_cidr(&parse_cidr("169.254.169.254/32").unwrap()).is_err());
        assert!(check_remote_cidr(&parse_cidr("127.0.0.1/32").unwrap()).is_err());
    }

    #[test]
    fn addresses_of_a_subnet() {
        let net = parse_cidr("10.1.1.0/29").unwrap();
        assert_eq!(gateway(&net).to_string(), "10.1.1.1");
        let all: Vec<String> = assignable(&net).map(|a| a.to_string()).collect();
        assert_eq!(all, ["10.1.1.4", "10.1.1.5", "10.1.1.6"]);
    }

    #[test]
    fn macs_are_local_unicast_and_round_trip() {
        let mac = Mac::for_port("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(mac.0[0], 0x02);
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        assert!("02:00:00:00:00".parse::<Mac>().is_err());
        assert!("02:00:00:00:00:0g".parse::<Mac>().is_err());
        let ll = Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]).link_local();
        assert_eq!(ll.to_string(), "fe80::11:22ff:fe33:4455");
    }

    #[test]
    fn protocols_and_directions_parse() {
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert!("gre"
            .parse::<Protocol>()
            .unwrap_err()
            .0
            .contains("unknown protocol"));
        assert_eq!("in".parse::<Direction>().unwrap(), Direction::Ingress);
    }
}
