//! Sessions a changed rule no longer allows. Conntrack lets the packets of a known session
//! through without looking at the rules again, so after a change the agent lists each VPC's
//! sessions, judges each one by the new rules as if it were starting now, and deletes those
//! they refuse: their next packet is then judged afresh, and dropped.

use std::net::Ipv4Addr;

use palisade_common::agent_api::{HostNetwork, PortNet, SgRuleNet};
use palisade_common::net::{Direction, Protocol};

/// One session, in its original direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub zone: u16,
    pub protocol: Protocol,
    /// The protocol's name as conntrack prints it (to delete exactly this entry).
    pub protocol_name: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// Parses `conntrack -L` lines (IPv4 only; others are skipped).
pub fn parse(listing: &str) -> Vec<Session> {
    listing.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Session> {
    let mut words = line.split_whitespace();
    let name = words.next()?.to_string();
    let protocol = match name.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        "ipv6-icmp" | "icmpv6" => return None,
        _ => Protocol::Any,
    };
    let field = |key: &str| -> Option<&str> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    Some(Session {
        zone: field("zone")?.parse().ok()?,
        protocol,
        protocol_name: name,
        src: field("src")?.parse().ok()?,
        dst: field("dst")?.parse().ok()?,
        sport: field("sport").and_then(|p| p.parse().ok()),
        dport: field("dport").and_then(|p| p.parse().ok()),
    })
}

/// Whether the security groups of `network` would let `session` start now. Platform services
/// (DHCP, metadata) and sessions with no port of ours at either end stay.
pub fn allowed(network: &HostNetwork, session: &Session) -> bool {
    let Some(vpc) = network
        .vpcs
        .iter()
        .find(|v| v.vni == u32::from(session.zone))
    else {
        return false;
    };
    let port_at = |ip: Ipv4Addr| -> Option<&PortNet> {
        network
            .ports
            .iter()
            .find(|p| p.vpc_id == vpc.id && p.ip == ip)
    };
    if session.dst == crate::net::nft::METADATA_IP
        || (session.protocol == Protocol::Udp && session.dport == Some(67))
    {
        return true;
    }
    let sent = port_at(session.src)
        .is_none_or(|p| rules_allow(&p.rules, Direction::Egress, session.dst, session));
    let received = port_at(session.dst)
        .is_none_or(|p| rules_allow(&p.rules, Direction::Ingress, session.src, session));
    sent && received
}

fn rules_allow(
    rules: &[SgRuleNet],
    direction: Direction,
    far: Ipv4Addr,
    session: &Session,
) -> bool {
    rules.iter().any(|r| {
        r.direction == direction
            && r.remote.contains(&far)
            && match r.protocol {
                Protocol::Any => true,
                p if p != session.protocol => false,
                Protocol::Tcp | Protocol::Udp => match (r.ports, session.dport) {
                    (None, _) => true,
                    (Some(range), Some(port)) => range.from <= port && port <= range.to,
                    (Some(_), None) => false,
                },
                _ => true,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::net::{parse_cidr, PortRange};

    const LISTING: &str = "\
tcp      6 431995 ESTABLISHED src=10.1.1.5 dst=10.1.1.4 sport=40000 dport=5001 \
src=10.1.1.4 dst=10.1.1.5 sport=5001 dport=40000 [ASSURED] mark=0 zone=7 use=1
udp      17 20 src=10.1.1.4 dst=10.1.1.5 sport=5353 dport=53 [UNREPLIED] src=10.1.1.5 \
dst=10.1.1.4 sport=53 dport=5353 mark=0 zone=7 use=1
icmp     1 29 src=10.1.1.5 dst=10.1.1.4 type=8 code=0 id=7 src=10.1.1.4 dst=10.1.1.5 \
type=0 code=0 id=7 mark=0 zone=7 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
";

    #[test]
    fn listings_parse() {
        let sessions = parse(LISTING);
        assert_eq!(sessions.len(), 3);
        assert_eq!(sessions[0].protocol, Protocol::Tcp);
        assert_eq!(sessions[0].src.to_string(), "10.1.1.5");
        assert_eq!(sessions[0].dport, Some(5001));
        assert_eq!(sessions[0].zone, 7);
        assert_eq!(sessions[2].protocol, Protocol::Icmp);
        assert_eq!(sessions[2].dport, None);
    }

    #[test]
    fn sessions_are_judged_by_both_ends_rules() {
        let mut net = crate::net::nft::tests::sample();
        let sessions = parse(LISTING);
        // The sample's ports: ingress tcp 22 from the subnet, egress anything.
        assert!(!allowed(&net, &sessions[0]), "tcp 5001 is not open");
        net.ports[0].rules.push(SgRuleNet {
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            ports: Some(PortRange::new(5000, 5010).unwrap()),
            remote: parse_cidr("10.1.1.5/32").unwrap(),
        });
        assert!(allowed(&net, &sessions[0]));
        // 10.1.1.5 allows no udp in.
        assert!(!allowed(&net, &sessions[1]));
        // Another zone: not ours any more.
        let mut elsewhere = sessions[0].clone();
        elsewhere.zone = 9;
        assert!(!allowed(&net, &elsewhere));
    }
}
