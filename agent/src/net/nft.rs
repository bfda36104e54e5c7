//! The host's whole tenant-network ruleset, rendered from [`HostNetwork`] as one nftables
//! script that replaces both Palisade tables in a single transaction.
//!
//! Where each check runs (all inside the agent's network namespace, which holds the VPC
//! bridges and nothing else):
//!
//! 1. `bridge palisade`, prerouting: every frame from a port goes through that port's
//!    anti-spoofing chain before anything can accept it: source MAC, ARP sender and IPv4 source
//!    pinned to the port; only IPv4 and ARP (so no IPv6 router adverts or neighbour spoofing,
//!    no VLAN or QinQ tags, no other ethertypes); no DHCP server replies; no VXLAN
//!    encapsulation. Frames from an
//!    interface the ruleset does not know (a tap being set up) are dropped: the base policy is
//!    drop. A frame that passes gets its port's number in the packet mark (bits 0-14).
//! 2. `bridge palisade`, forward: the destination port's number goes in bits 16-30, and only
//!    frames addressed to the port's own MAC (or broadcast) reach it: no flooding of unknown
//!    unicast, nothing for a guest in promiscuous mode to see.
//! 3. `inet palisade` (bridged IPv4 is handed to it by br_netfilter): the conntrack zone of the
//!    VPC; then, per packet, the network ACLs of the subnets it leaves and enters (stateless),
//!    the sending port's egress security-group rules and the receiving port's ingress rules
//!    (stateful: replies pass). Rules are set lookups (address . port intervals), so their
//!    cost does not grow with their number. A packet that passes gets bit 31 of the mark.
//! 4. `bridge palisade`, forward after br_netfilter: an IPv4 frame without bit 31 was never
//!    filtered (br_netfilter off or missing) and is dropped. The filter fails closed.
//!
//! Port numbers in marks follow the order of the ports in the rendered network and are
//! meaningful only within one render; everything read back (counters, flow sets) is mapped to
//! port ids with the [`Render`] that made it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_common::agent_api::{AclRuleNet, HostNetwork, PortNet, SgRuleNet, VpcNet};
use palisade_common::net::{AclAction, Direction, Ipv4Net, Mac, PortRange, Protocol};

/// The metadata service's address, served by each VPC's router.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// UDP ports of VXLAN (IANA) and of Linux's historical default: guests may not send either.
const VXLAN_PORTS: &str = "{ 4789, 8472 }";
/// Mark bit set on every packet the inet filter let through.
const FILTERED: u32 = 0x8000_0000;
/// Most ports (and routers) one host can number in a mark's 15 bits.
pub const MAX_MARKS: usize = 0x7fff;

/// The tap of a port: `pt` and the first 12 hex digits of its id.
pub fn tap_name(port_id: &str) -> String {
    let hex: String = port_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("pt{hex}")
}

/// The bridge of a VPC on this host.
pub fn bridge_name(vni: u32) -> String {
    format!("pb{vni}")
}

/// The bridge's end of the veth pair to the VPC's router.
pub fn router_link_name(vni: u32) -> String {
    format!("pr{vni}")
}

/// The MAC of a VPC router's inner interface, fixed so the ruleset can pin it.
pub fn router_mac(vpc_id: &str) -> Mac {
    Mac::for_port(&format!("router/{vpc_id}"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("VPC {vpc}: VNI {vni} is outside 1-65535")]
    Vni { vpc: String, vni: u32 },
    #[error("VNI {0} is used by two VPCs")]
    DuplicateVni(u32),
    #[error("port {port}: {what}")]
    Port { port: String, what: String },
    #[error("ports {0} and {1} would share the tap name {2}")]
    TapClash(String, String, String),
    #[error("{0} ports and routers: at most {MAX_MARKS} per host")]
    TooMany(usize),
}

/// One rendered ruleset and what its numbers mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Render {
    pub script: String,
    /// Mark number → port id.
    pub ports: BTreeMap<u32, String>,
}

/// Renders the script. Checks the network's own consistency; values are typed, so nothing in
/// it can break out of the syntax.
pub fn render(net: &HostNetwork) -> Result<Render, RenderError> {
    let vpcs: BTreeMap<&str, &VpcNet> = net.vpcs.iter().map(|v| (v.id.as_str(), v)).collect();
    let mut vnis = HashSet::new();
    for vpc in &net.vpcs {
        if !(1..=65535).contains(&vpc.vni) {
            return Err(RenderError::Vni {
                vpc: vpc.id.clone(),
                vni: vpc.vni,
            });
        }
        if !vnis.insert(vpc.vni) {
            return Err(RenderError::DuplicateVni(vpc.vni));
        }
    }
    let mut ports: Vec<&PortNet> = net.ports.iter().collect();
    ports.sort_by(|a, b| a.id.cmp(&b.id));
    let count = ports.len() + net.vpcs.len();
    if count > MAX_MARKS {
        return Err(RenderError::TooMany(count));
    }
    let mut taps: HashMap<String, &str> = HashMap::new();
    for port in &ports {
        let bad = |what: String| RenderError::Port {
            port: port.id.clone(),
            what,
        };
        let vpc = vpcs
            .get(port.vpc_id.as_str())
            .ok_or_else(|| bad(format!("unknown VPC {}", port.vpc_id)))?;
        let subnet = vpc
            .subnets
            .iter()
            .find(|s| s.id == port.subnet_id)
            .ok_or_else(|| bad(format!("unknown subnet {}", port.subnet_id)))?;
        if !subnet.cidr.contains(&port.ip) {
            return Err(bad(format!("{} is not in {}", port.ip, subnet.cidr)));
        }
        let tap = tap_name(&port.id);
        if let Some(other) = taps.insert(tap.clone(), &port.id) {
            return Err(RenderError::TapClash(other.into(), port.id.clone(), tap));
        }
    }

    let mut r = Renderer::default();
    let mut marks = BTreeMap::new();
    let port_marks: Vec<(u32, &PortNet)> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32 + 1, *p))
        .collect();
    for (mark, port) in &port_marks {
        marks.insert(*mark, port.id.clone());
    }
    let router_marks: Vec<(u32, &VpcNet)> = net
        .vpcs
        .iter()
        .enumerate()
        .map(|(i, v)| ((ports.len() + i) as u32 + 1, v))
        .collect();
    let router_of: HashMap<&str, u32> = router_marks
        .iter()
        .map(|(m, v)| (v.id.as_str(), *m))
        .collect();

    // Replace both tables in one transaction: create (in case they do not exist), delete,
    // define anew.
    for family in ["bridge", "inet"] {
        let _ = writeln!(r.out, "table {family} palisade");
        let _ = writeln!(r.out, "delete table {family} palisade");
    }
    r.bridge_table(&port_marks, &router_marks);
    r.inet_table(net, &port_marks, &router_of);
    Ok(Render {
        script: r.out,
        ports: marks,
    })
}

#[derive(Default)]
struct Renderer {
    out: String,
}

impl Renderer {
    fn line(&mut self, indent: usize, text: &str) {
        for _ in 0..indent {
            self.out.push_str("  ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn chain(&mut self, name: &str, lines: &[String]) {
        self.line(1, &format!("chain {name} {{"));
        for l in lines {
            self.line(2, l);
        }
        self.line(1, "}");
    }

    fn bridge_table(&mut self, ports: &[(u32, &PortNet)], routers: &[(u32, &VpcNet)]) {
        self.line(0, "table bridge palisade {");
        for (_, port) in ports {
            self.line(1, &format!("counter {}_spoof {{ }}", tap_name(&port.id)));
            self.line(1, &format!("counter {}_ipv6 {{ }}", tap_name(&port.id)));
        }

        // Ingress into the bridge: anti-spoofing, then the sender's number.
        let mut vmap = Vec::new();
        for (mark, port) in ports {
            vmap.push(format!("\"{}\" : goto p{mark}_out", tap_name(&port.id)));
        }
        for (mark, vpc) in routers {
            vmap.push(format!(
                "\"{}\" : goto r{mark}_out",
                router_link_name(vpc.vni)
            ));
        }
        let mut pre = vec!["type filter hook prerouting priority -300; policy drop;".into()];
        if !vmap.is_empty() {
            pre.push(format!("iifname vmap {{ {} }}", vmap.join(", ")));
        }
        self.chain("pal_pre", &pre);

        for (mark, port) in ports {
            let spoof = format!("counter name \"{}_spoof\" drop", tap_name(&port.id));
            let (mac, ip) = (port.mac, port.ip);
            // What the guest may send, policed here (after the MAC check, so a spoofer
            // cannot spend its neighbour's budget): bytes over the rate are dropped.
            let police = match port.egress_kbit {
                0 => String::new(),
                kbit => {
                    let kbytes = (kbit / 8).max(1);
                    format!(
                        "limit rate over {kbytes} kbytes/second burst {} kbytes drop",
                        (kbytes / 10).max(16)
                    )
                }
            };
            let mut lines = vec![format!("ether saddr != {mac} {spoof}")];
            if !police.is_empty() {
                lines.push(police);
            }
            lines.extend([
                format!("ether type arp goto p{mark}_arp"),
                format!("ether type ip goto p{mark}_ip"),
                // A guest kernel speaks IPv6 by itself: dropped (VPCs are IPv4-only), but not
                // counted as an attack.
                format!(
                    "ether type ip6 counter name \"{}_ipv6\" drop",
                    tap_name(&port.id)
                ),
                spoof.clone(),
            ]);
            self.chain(&format!("p{mark}_out"), &lines);
            self.chain(
                &format!("p{mark}_arp"),
                &[
                    format!("arp htype != 1 {spoof}"),
                    format!("arp ptype != ip {spoof}"),
                    format!("arp saddr ether != {mac} {spoof}"),
                    // 0.0.0.0: an address probe (RFC 5227), which poisons no cache.
                    format!("arp saddr ip != {{ {ip}, 0.0.0.0 }} {spoof}"),
                    format!("meta mark set {mark:#x} accept"),
                ],
            );
            self.chain(
                &format!("p{mark}_ip"),
                &[
                    // A DHCP client has no address yet.
                    format!(
                        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 \
                         meta mark set {mark:#x} accept"
                    ),
                    format!("ip saddr != {ip} {spoof}"),
                    format!("udp sport {{ 67, 68 }} udp dport 68 {spoof}"),
                    format!("udp dport {VXLAN_PORTS} {spoof}"),
                    format!("meta mark set {mark:#x} accept"),
                ],
            );
        }
        for (mark, vpc) in routers {
            let rmac = router_mac(&vpc.id);
            self.chain(
                &format!("r{mark}_out"),
                &[
                    format!("ether saddr != {rmac} drop"),
                    format!("ether type {{ ip, arp }} meta mark set {mark:#x} accept"),
                    "drop".into(),
                ],
            );
        }

        // Out of the bridge: the receiver's number; only its own MAC or broadcast.
        let mut vmap = Vec::new();
        for (mark, port) in ports {
            vmap.push(format!("\"{}\" : goto p{mark}_in", tap_name(&port.id)));
        }
        for (mark, vpc) in routers {
            vmap.push(format!(
                "\"{}\" : goto r{mark}_in",
                router_link_name(vpc.vni)
            ));
        }
        let mut fwd = vec!["type filter hook forward priority -200; policy drop;".into()];
        if !vmap.is_empty() {
            fwd.push(format!("oifname vmap {{ {} }}", vmap.join(", ")));
        }
        self.chain("pal_fwd", &fwd);
        for (mark, port) in ports {
            self.chain(
                &format!("p{mark}_in"),
                &[
                    format!("ether daddr != {{ {}, ff:ff:ff:ff:ff:ff }} drop", port.mac),
                    format!("meta mark set meta mark | {:#x} accept", mark << 16),
                ],
            );
        }
        for (mark, vpc) in routers {
            self.chain(
                &format!("r{mark}_in"),
                &[
                    format!(
                        "ether daddr != {{ {}, ff:ff:ff:ff:ff:ff }} drop",
                        router_mac(&vpc.id)
                    ),
                    format!("meta mark set meta mark | {:#x} accept", mark << 16),
                ],
            );
        }

        // After br_netfilter: IPv4 that the inet filter never saw does not pass.
        self.chain(
            "pal_check",
            &[
                "type filter hook forward priority 100; policy accept;".into(),
                format!("ether type ip meta mark & {FILTERED:#x} == 0 counter drop"),
            ],
        );
        self.line(0, "}");
    }

    fn inet_table(
        &mut self,
        net: &HostNetwork,
        ports: &[(u32, &PortNet)],
        router_of: &HashMap<&str, u32>,
    ) {
        self.line(0, "table inet palisade {");
        // Flow records, per VPC (addresses may repeat across VPCs): what passed and what was
        // dropped, per 5-tuple (ports 0 for protocols without them).
        for vpc in &net.vpcs {
            for verdict in ["acc", "den"] {
                self.line(1, &format!("set v{}_{verdict} {{", vpc.vni));
                self.line(
                    2,
                    "type ipv4_addr . ipv4_addr . inet_proto . inet_service . inet_service",
                );
                self.line(2, "flags dynamic, timeout");
                self.line(2, "timeout 120s");
                self.line(2, "size 65536");
                self.line(2, "counter");
                self.line(1, "}");
            }
        }
        for (_, port) in ports {
            let tap = tap_name(&port.id);
            for (dir, tag) in [(Direction::Ingress, "in"), (Direction::Egress, "eg")] {
                let rules: Vec<&SgRuleNet> =
                    port.rules.iter().filter(|r| r.direction == dir).collect();
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    let elements = port_elements(&rules, proto);
                    self.set(
                        &format!("{tap}_{tag}_{}", proto.as_str()),
                        "ipv4_addr . inet_service",
                        &elements,
                    );
                }
                for proto in [Protocol::Icmp, Protocol::Any] {
                    let elements = address_elements(&rules, proto);
                    self.set(
                        &format!("{tap}_{tag}_{}", proto.as_str()),
                        "ipv4_addr",
                        &elements,
                    );
                }
            }
        }

        let zones: Vec<String> = net
            .vpcs
            .iter()
            .map(|v| format!("\"{}\" : {}", bridge_name(v.vni), v.vni))
            .collect();
        let mut zone = vec!["type filter hook prerouting priority -300; policy accept;".into()];
        if !zones.is_empty() {
            zone.push(format!(
                "meta nfproto ipv4 ct zone set iifname map {{ {} }}",
                zones.join(", ")
            ));
        }
        self.chain("pal_zone", &zone);

        let eg: Vec<String> = ports
            .iter()
            .map(|(m, _)| format!("{m:#x} : jump p{m}_eg"))
            .collect();
        let ing: Vec<String> = ports
            .iter()
            .map(|(m, _)| format!("{:#x} : jump p{m}_in", m << 16))
            .collect();
        let mut fwd = vec![
            "type filter hook forward priority 0; policy drop;".into(),
            "meta mark & 0x7fff == 0 drop".into(),
            "meta mark & 0x7fff0000 == 0 drop".into(),
        ];
        if !eg.is_empty() {
            fwd.push(format!("meta mark & 0x7fff vmap {{ {} }}", eg.join(", ")));
            fwd.push(format!(
                "meta mark & 0x7fff0000 vmap {{ {} }}",
                ing.join(", ")
            ));
        }
        let by_vpc = |verdict: &str| -> Vec<String> {
            net.vpcs
                .iter()
                .map(|v| format!("\"{}\" : jump v{}_{verdict}", bridge_name(v.vni), v.vni))
                .collect()
        };
        let (accepted, denied) = (by_vpc("acc"), by_vpc("den"));
        if !accepted.is_empty() {
            fwd.push(format!("iifname vmap {{ {} }}", accepted.join(", ")));
        }
        fwd.push(format!("meta mark set meta mark | {FILTERED:#x} accept"));
        self.chain("pal_fwd", &fwd);
        let mut deny = Vec::new();
        if !denied.is_empty() {
            deny.push(format!("iifname vmap {{ {} }}", denied.join(", ")));
        }
        deny.push("drop".into());
        self.chain("pal_deny", &deny);
        for vpc in &net.vpcs {
            for verdict in ["acc", "den"] {
                let set = format!("v{}_{verdict}", vpc.vni);
                self.chain(
                    &set,
                    &[
                        format!(
                            "meta l4proto {{ tcp, udp }} update @{set} {{ ip saddr . ip daddr . \
                             meta l4proto . th sport . th dport }}"
                        ),
                        format!(
                            "meta l4proto != {{ tcp, udp }} update @{set} {{ ip saddr . ip daddr \
                             . meta l4proto . 0 . 0 }}"
                        ),
                    ],
                );
            }
        }

        let vpcs: HashMap<&str, &VpcNet> = net.vpcs.iter().map(|v| (v.id.as_str(), v)).collect();
        let mut acl_chains = BTreeSet::new();
        for (mark, port) in ports {
            let tap = tap_name(&port.id);
            let vpc = vpcs[port.vpc_id.as_str()];
            let subnet = vpc
                .subnets
                .iter()
                .find(|s| s.id == port.subnet_id)
                .expect("checked in render");
            let router = router_of[port.vpc_id.as_str()];
            let has_acl = !subnet.acl.is_empty();
            if has_acl {
                acl_chains.insert(subnet.id.clone());
            }
            let acl = subnet_chain(&subnet.id);

            // Sent by the port.
            let mut lines = vec![
                // Platform services, open whatever the rules say: DHCP and the metadata
                // service, both answered by the VPC's router, and only when it is the router
                // that receives them (not a guest the same packet is addressed to).
                format!(
                    "meta mark & 0x7fff0000 == {:#x} udp sport 68 udp dport 67 return",
                    router << 16
                ),
                format!(
                    "meta mark & 0x7fff0000 == {:#x} ip daddr {METADATA_IP} tcp dport 80 return",
                    router << 16
                ),
            ];
            if has_acl {
                lines.push(format!("ip daddr != {} jump {acl}_eg", subnet.cidr));
            }
            lines.extend(sg_lines(&tap, "eg", "daddr"));
            self.chain(&format!("p{mark}_eg"), &lines);

            // Received by the port.
            let mut lines = vec![
                format!("meta mark & 0x7fff == {router:#x} udp sport 67 udp dport 68 return"),
                format!(
                    "meta mark & 0x7fff == {router:#x} ip saddr {METADATA_IP} tcp sport 80 return"
                ),
            ];
            if has_acl {
                lines.push(format!("ip saddr != {} jump {acl}_in", subnet.cidr));
            }
            lines.extend(sg_lines(&tap, "in", "saddr"));
            self.chain(&format!("p{mark}_in"), &lines);
        }
        for vpc in &net.vpcs {
            for subnet in &vpc.subnets {
                if acl_chains.contains(&subnet.id) {
                    let name = subnet_chain(&subnet.id);
                    for (dir, tag, far) in [
                        (Direction::Egress, "eg", "daddr"),
                        (Direction::Ingress, "in", "saddr"),
                    ] {
                        let mut lines: Vec<String> = subnet
                            .acl
                            .iter()
                            .filter(|r| r.direction == dir)
                            .map(|r| acl_line(r, far))
                            .collect();
                        lines.push("goto pal_deny".into());
                        self.chain(&format!("{name}_{tag}"), &lines);
                    }
                }
            }
        }
        self.line(0, "}");
    }

    fn set(&mut self, name: &str, kind: &str, elements: &[String]) {
        self.line(1, &format!("set {name} {{"));
        self.line(2, &format!("type {kind}"));
        self.line(2, "flags interval");
        if !elements.is_empty() {
            self.line(2, &format!("elements = {{ {} }}", elements.join(", ")));
        }
        self.line(1, "}");
    }
}

fn subnet_chain(subnet_id: &str) -> String {
    format!("s{}", &tap_name(subnet_id)[2..])
}

/// A port's security-group checks in one direction: replies, then one lookup per protocol.
fn sg_lines(tap: &str, tag: &str, far: &str) -> Vec<String> {
    vec![
        "ct state established,related return".into(),
        "ct state invalid goto pal_deny".into(),
        format!("meta l4proto tcp ip {far} . tcp dport @{tap}_{tag}_tcp return"),
        format!("meta l4proto udp ip {far} . udp dport @{tap}_{tag}_udp return"),
        format!("meta l4proto icmp ip {far} @{tap}_{tag}_icmp return"),
        format!("ip {far} @{tap}_{tag}_any return"),
        "goto pal_deny".into(),
    ]
}

fn acl_line(rule: &AclRuleNet, far: &str) -> String {
    let verdict = match rule.action {
        AclAction::Allow => "return",
        AclAction::Deny => "goto pal_deny",
    };
    let mut text = String::new();
    match rule.protocol {
        Protocol::Any => {}
        p => {
            let _ = write!(text, "meta l4proto {} ", p.as_str());
        }
    }
    let _ = write!(text, "ip {far} {} ", rule.cidr);
    if let (Some(ports), true) = (rule.ports, rule.protocol.has_ports()) {
        let _ = write!(text, "{} dport {ports} ", rule.protocol.as_str());
    }
    text.push_str(verdict);
    text
}

/// `address . port-range` elements for one protocol, made disjoint as nftables requires: each
/// prefix keeps only the ports no enclosing prefix already allows (prefixes nest or are
/// disjoint, so this covers every overlap). A rule of protocol `any` allows every port.
fn port_elements(rules: &[&SgRuleNet], proto: Protocol) -> Vec<String> {
    let all = PortRange { from: 1, to: 65535 };
    let mut by_prefix: BTreeMap<Ipv4Net, Vec<PortRange>> = BTreeMap::new();
    for rule in rules {
        let range = match rule.protocol {
            p if p == proto => rule.ports.unwrap_or(all),
            Protocol::Any => all,
            _ => continue,
        };
        by_prefix.entry(rule.remote).or_default().push(range);
    }
    let merged: BTreeMap<Ipv4Net, Vec<PortRange>> = by_prefix
        .into_iter()
        .map(|(net, ranges)| (net, union(ranges)))
        .collect();
    let mut out = Vec::new();
    for (net, ranges) in &merged {
        let mut covered = Vec::new();
        for len in 0..net.prefix_len() {
            let outer = Ipv4Net::new(net.network(), len)
                .expect("shorter prefix")
                .trunc();
            if let Some(r) = merged.get(&outer) {
                covered.extend_from_slice(r);
            }
        }
        for range in subtract(ranges, &union(covered)) {
            out.push(format!("{} . {}", element_net(net), range_text(range)));
        }
    }
    out
}

/// Address elements for ICMP (rules of protocol icmp or any) or for `any`: prefixes inside
/// another are left out (nftables refuses overlapping intervals).
fn address_elements(rules: &[&SgRuleNet], proto: Protocol) -> Vec<String> {
    let nets: BTreeSet<Ipv4Net> = rules
        .iter()
        .filter(|r| r.protocol == proto || r.protocol == Protocol::Any)
        .map(|r| r.remote)
        .collect();
    nets.iter()
        .filter(|net| {
            !(0..net.prefix_len()).any(|len| {
                nets.contains(&Ipv4Net::new(net.network(), len).expect("shorter").trunc())
            })
        })
        .map(element_net)
        .collect()
}

fn element_net(net: &Ipv4Net) -> String {
    if net.prefix_len() == 32 {
        net.network().to_string()
    } else {
        net.to_string()
    }
}

fn range_text(r: PortRange) -> String {
    if r.from == r.to {
        r.from.to_string()
    } else {
        format!("{}-{}", r.from, r.to)
    }
}

/// Sorted, merged, disjoint ranges.
fn union(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.from) <= u32::from(last.to) + 1 => {
                last.to = last.to.max(r.to);
            }
            _ => out.push(r),
        }
    }
    out
}

/// `ranges` minus `minus`, both sorted and disjoint.
fn subtract(ranges: &[PortRange], minus: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut from = u32::from(r.from);
        let to = u32::from(r.to);
        for m in minus {
            let (mf, mt) = (u32::from(m.from), u32::from(m.to));
            if mt < from || mf > to {
                continue;
            }
            if mf > from {
                out.push(PortRange {
                    from: from as u16,
                    to: (mf - 1) as u16,
                });
            }
            from = mt + 1;
        }
        if from <= to {
            out.push(PortRange {
                from: from as u16,
                to: to as u16,
            });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use palisade_common::agent_api::SubnetNet;
    use palisade_common::net::parse_cidr;

    fn rule(dir: Direction, proto: Protocol, ports: Option<(u32, u32)>, remote: &str) -> SgRuleNet {
        SgRuleNet {
            direction: dir,
            protocol: proto,
            ports: ports.map(|(a, b)| PortRange::new(a, b).unwrap()),
            remote: parse_cidr(remote).unwrap(),
        }
    }

    #[test]
    fn nested_prefixes_get_disjoint_elements() {
        let rules = [
            rule(
                Direction::Ingress,
                Protocol::Tcp,
                Some((20, 30)),
                "10.0.0.0/16",
            ),
            rule(
                Direction::Ingress,
                Protocol::Tcp,
                Some((22, 22)),
                "10.0.0.0/24",
            ),
            rule(
                Direction::Ingress,
                Protocol::Tcp,
                Some((25, 40)),
                "10.0.0.0/24",
            ),
            rule(
                Direction::Ingress,
                Protocol::Tcp,
                Some((80, 80)),
                "0.0.0.0/0",
            ),
            rule(
                Direction::Ingress,
                Protocol::Udp,
                Some((53, 53)),
                "10.0.0.0/24",
            ),
            rule(Direction::Ingress, Protocol::Any, None, "10.9.9.9/32"),
        ];
        let refs: Vec<&SgRuleNet> = rules.iter().collect();
        assert_eq!(
            port_elements(&refs, Protocol::Tcp),
            [
                "0.0.0.0/0 . 80",
                "10.0.0.0/16 . 20-30",
                "10.0.0.0/24 . 31-40",
                "10.9.9.9 . 1-79",
                "10.9.9.9 . 81-65535",
            ]
        );
        assert_eq!(
            port_elements(&refs, Protocol::Udp),
            ["10.0.0.0/24 . 53", "10.9.9.9 . 1-65535"]
        );
        assert_eq!(address_elements(&refs, Protocol::Icmp), ["10.9.9.9"]);
    }

    #[test]
    fn address_sets_drop_nested_prefixes() {
        let rules = [
            rule(Direction::Egress, Protocol::Icmp, None, "10.0.0.0/8"),
            rule(Direction::Egress, Protocol::Icmp, None, "10.1.0.0/16"),
            rule(Direction::Egress, Protocol::Any, None, "192.168.1.0/24"),
        ];
        let refs: Vec<&SgRuleNet> = rules.iter().collect();
        assert_eq!(
            address_elements(&refs, Protocol::Icmp),
            ["10.0.0.0/8", "192.168.1.0/24"]
        );
        assert_eq!(address_elements(&refs, Protocol::Any), ["192.168.1.0/24"]);
    }

    #[test]
    fn range_arithmetic() {
        let r = |a, b| PortRange { from: a, to: b };
        assert_eq!(
            union(vec![r(5, 9), r(1, 3), r(4, 4), r(20, 30)]),
            [r(1, 9), r(20, 30)]
        );
        assert_eq!(
            subtract(&[r(1, 100)], &[r(10, 20), r(50, 100)]),
            [r(1, 9), r(21, 49)]
        );
        assert_eq!(subtract(&[r(1, 65535)], &[r(1, 65535)]), []);
    }

    pub(crate) fn sample() -> HostNetwork {
        let vpc = VpcNet {
            id: "vpc-a".into(),
            vni: 7,
            subnets: vec![SubnetNet {
                id: "5b1d9c1e-0000-4000-8000-000000000001".into(),
                cidr: parse_cidr("10.1.1.0/24").unwrap(),
                acl: vec![AclRuleNet {
                    direction: Direction::Ingress,
                    action: AclAction::Deny,
                    protocol: Protocol::Tcp,
                    ports: Some(PortRange::new(23, 23).unwrap()),
                    cidr: parse_cidr("0.0.0.0/0").unwrap(),
                }],
            }],
            external_ip: None,
            floating: vec![],
        };
        let port = |id: &str, ip: &str| PortNet {
            id: id.into(),
            instance_id: format!("i-{id}"),
            vpc_id: "vpc-a".into(),
            subnet_id: "5b1d9c1e-0000-4000-8000-000000000001".into(),
            mac: Mac::for_port(id),
            ip: ip.parse().unwrap(),
            rules: vec![
                rule(
                    Direction::Ingress,
                    Protocol::Tcp,
                    Some((22, 22)),
                    "10.1.1.0/24",
                ),
                rule(Direction::Egress, Protocol::Any, None, "0.0.0.0/0"),
            ],
            ingress_kbit: 0,
            egress_kbit: 0,
        };
        HostNetwork {
            vpcs: vec![vpc],
            ports: vec![
                port("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b", "10.1.1.4"),
                port("1a2b3c4d-1b2d-4e5f-8a9b-0c1d2e3f4a5b", "10.1.1.5"),
            ],
        }
    }

    #[test]
    fn the_script_pins_each_port_and_numbers_it() {
        let net = sample();
        let render = render(&net).unwrap();
        let s = &render.script;
        assert_eq!(render.ports[&1], "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b");
        assert!(s.starts_with("table bridge palisade\ndelete table bridge palisade\n"));
        assert!(s.contains("\"pt0f8e2a4c1b2d\" : goto p1_out"));
        assert!(s.contains(&format!("ether saddr != {} counter", net.ports[0].mac)));
        assert!(s.contains("ip saddr != 10.1.1.4 counter name \"pt0f8e2a4c1b2d_spoof\" drop"));
        assert!(s.contains("elements = { 10.1.1.0/24 . 22 }"));
        assert!(s.contains("\"pb7\" : 7"));
        assert!(s.contains("ip saddr != 10.1.1.0/24 jump s5b1d9c1e0000_in"));
        assert!(s.contains("meta l4proto tcp ip saddr 0.0.0.0/0 tcp dport 23 goto pal_deny"));
    }

    #[test]
    fn dump_sample() {
        if let Ok(path) = std::env::var("PALISADE_DUMP_NFT") {
            std::fs::write(path, render(&sample()).unwrap().script).unwrap();
        }
    }

    #[test]
    fn inconsistent_networks_are_refused() {
        let mut net = sample();
        net.ports[1].ip = "10.2.0.9".parse().unwrap();
        assert!(matches!(render(&net), Err(RenderError::Port { .. })));
        let mut net = sample();
        net.ports[1].id = "0f8e2a4c-1b2d-ffff-0000-000000000000".into();
        assert!(matches!(render(&net), Err(RenderError::TapClash(..))));
        let mut net = sample();
        net.vpcs[0].vni = 70000;
        assert!(matches!(render(&net), Err(RenderError::Vni { .. })));
    }
}
