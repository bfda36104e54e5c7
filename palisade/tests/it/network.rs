//! Tenant networks on one host, through the agent's API, with real TCG guests sending real
//! packets through the real bridges and nftables rules (TESTING.md group E).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use palisade_common::agent_api::{
    AclRuleNet, HostNetwork, NicSpec, PortNet, SgRuleNet, SubnetNet, VpcNet,
};
use palisade_common::net::{parse_cidr, AclAction, Direction, Mac, PortRange, Protocol};
use serde_json::json;

use crate::agent::{Api, Env, GuestImage, Identity};

/// A serial console: the agent's API, or the controller's.
pub(crate) trait ConsoleIo {
    /// New output from `offset`: the text and the offset after it.
    fn read(&self, id: &str, offset: u64) -> (String, u64);
    fn write(&self, id: &str, text: &str);
}

impl ConsoleIo for Api {
    fn read(&self, id: &str, offset: u64) -> (String, u64) {
        let chunk = self.console(id, offset);
        (chunk.data, chunk.next_offset)
    }

    fn write(&self, id: &str, text: &str) {
        self.type_on_console(id, text);
    }
}

/// The controller's console API, as one tenant user.
pub(crate) struct Tenant<'a> {
    pub(crate) p: &'a crate::support::Platform,
    pub(crate) who: &'a crate::support::Signer,
}

impl ConsoleIo for Tenant<'_> {
    fn read(&self, id: &str, offset: u64) -> (String, u64) {
        let chunk: palisade_common::api::ConsoleOutput = self
            .p
            .block_on(
                self.who
                    .client
                    .get(&format!("/v1/instances/{id}/console?offset={offset}")),
            )
            .unwrap();
        (chunk.data, chunk.next_offset)
    }

    fn write(&self, id: &str, text: &str) {
        self.p
            .block_on(self.who.client.send(
                reqwest::Method::POST,
                &format!("/v1/instances/{id}/console"),
                text.as_bytes().to_vec(),
            ))
            .unwrap();
    }
}

/// A guest driven through its serial console.
pub(crate) struct Console<'a> {
    api: &'a dyn ConsoleIo,
    pub(crate) id: String,
    offset: u64,
    serial: u32,
}

impl<'a> Console<'a> {
    /// Waits for the guest's console shell.
    pub(crate) fn attach(api: &'a dyn ConsoleIo, id: &str) -> Console<'a> {
        let mut console = Console {
            api,
            id: id.to_string(),
            offset: 0,
            serial: 0,
        };
        console.wait_for("PALISADE-CONSOLE-READY", Duration::from_secs(120));
        // The shell prints its banner and prompt after the marker.
        std::thread::sleep(Duration::from_millis(500));
        // Past everything printed so far (a console attached again after a restart), and end
        // markers no earlier command used.
        loop {
            let (data, next) = console.api.read(&console.id, console.offset);
            console.offset = next;
            if data.is_empty() {
                break;
            }
        }
        console.serial = u32::from(random_marker()[0]) * 1000;
        console
    }

    /// Reads the console until `text` appears; returns what was read.
    pub(crate) fn wait_for(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = String::new();
        loop {
            let (data, next) = self.api.read(&self.id, self.offset);
            self.offset = next;
            seen.push_str(&data.replace('\r', ""));
            if seen.contains(text) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {text:?} within {timeout:?}; console:\n{seen}",
                self.id
            );
            if data.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Runs `command` in the guest's shell and returns its output. The end marker is split in
    /// what is typed, so only the shell's own output matches it.
    pub(crate) fn run(&mut self, command: &str) -> String {
        self.serial += 1;
        let end = format!("END-{}", self.serial);
        self.api.write(
            &self.id,
            &format!("{command}; echo E\"\"ND-{}\n", self.serial),
        );
        self.wait_for(&end, Duration::from_secs(60))
    }
}

// ---- frames ---------------------------------------------------------------------------

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(crate) fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

pub(crate) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    header.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    let sum = checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

/// UDP without a checksum (allowed over IPv4).
pub(crate) fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&sport.to_be_bytes());
    datagram.extend_from_slice(&dport.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

pub(crate) fn arp_reply(sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    arp
}

/// A BOOTP/DHCP offer of `offered` to `client`, with `marker` in the server name field.
pub(crate) fn dhcp_offer(client: [u8; 6], offered: Ipv4Addr, marker: &[u8]) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 2; // reply
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    bootp[16..20].copy_from_slice(&offered.octets());
    bootp[28..34].copy_from_slice(&client);
    bootp[44..44 + marker.len()].copy_from_slice(marker);
    bootp.extend_from_slice(&[99, 130, 83, 99, 53, 1, 2, 255]);
    bootp
}

fn mac_bytes(mac: Mac) -> [u8; 6] {
    mac.0
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A random UUID (version 4), as instance ids are.
fn random_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn random_marker() -> [u8; 32] {
    let mut marker = [0u8; 32];
    getrandom::fill(&mut marker).unwrap();
    marker
}

// ---- the test ---------------------------------------------------------------------------

fn rule(
    direction: Direction,
    protocol: Protocol,
    ports: Option<(u32, u32)>,
    remote: &str,
) -> SgRuleNet {
    SgRuleNet {
        direction,
        protocol,
        ports: ports.map(|(a, b)| PortRange::new(a, b).unwrap()),
        remote: parse_cidr(remote).unwrap(),
    }
}

fn port(id: &str, vpc: &str, subnet: &str, ip: &str, rules: Vec<SgRuleNet>) -> PortNet {
    PortNet {
        id: id.into(),
        instance_id: format!("{id}-vm"),
        vpc_id: vpc.into(),
        subnet_id: subnet.into(),
        mac: Mac::for_port(id),
        ip: ip.parse().unwrap(),
        rules,
        ingress_kbit: 0,
        egress_kbit: 0,
    }
}

const A1: &str = "a1000000-0000-4000-8000-000000000001";
const A2: &str = "a2000000-0000-4000-8000-000000000002";
const B1: &str = "b1000000-0000-4000-8000-000000000003";
/// In tenant A's second subnet.
const A3: &str = "a3000000-0000-4000-8000-000000000004";

fn vpc(id: &str, vni: u32, subnet: &str) -> VpcNet {
    VpcNet {
        id: id.into(),
        vni,
        subnets: vec![SubnetNet {
            id: subnet.into(),
            cidr: parse_cidr("10.11.1.0/24").unwrap(),
            acl: vec![],
        }],
        external_ip: None,
        floating: vec![],
    }
}

/// Tenant A's VPC holds a1 and a2; tenant B's VPC reuses the same addresses for b1.
fn network(a1_extra: Vec<SgRuleNet>) -> HostNetwork {
    let mut a1_rules = vec![
        rule(
            Direction::Ingress,
            Protocol::Tcp,
            Some((5001, 5001)),
            "10.11.1.0/24",
        ),
        rule(
            Direction::Ingress,
            Protocol::Tcp,
            Some((5001, 5001)),
            "10.11.2.0/24",
        ),
        rule(
            Direction::Ingress,
            Protocol::Udp,
            Some((1, 65535)),
            "10.11.1.0/24",
        ),
        rule(Direction::Egress, Protocol::Any, None, "0.0.0.0/0"),
    ];
    a1_rules.extend(a1_extra);
    let mut vpc_a = vpc("vpc-a", 11, "subnet-a");
    vpc_a.subnets.push(SubnetNet {
        id: "subnet-a2".into(),
        cidr: parse_cidr("10.11.2.0/24").unwrap(),
        acl: vec![],
    });
    HostNetwork {
        vpcs: vec![vpc_a, vpc("vpc-b", 12, "subnet-b")],
        ports: vec![
            port(A1, "vpc-a", "subnet-a", "10.11.1.4", a1_rules),
            port(
                A2,
                "vpc-a",
                "subnet-a",
                "10.11.1.5",
                vec![rule(Direction::Egress, Protocol::Any, None, "0.0.0.0/0")],
            ),
            port(
                B1,
                "vpc-b",
                "subnet-b",
                "10.11.1.5",
                vec![
                    rule(Direction::Ingress, Protocol::Any, None, "0.0.0.0/0"),
                    rule(Direction::Egress, Protocol::Any, None, "0.0.0.0/0"),
                ],
            ),
            port(
                A3,
                "vpc-a",
                "subnet-a2",
                "10.11.2.4",
                vec![rule(Direction::Egress, Protocol::Any, None, "0.0.0.0/0")],
            ),
        ],
    }
}

fn put_network(api: &Api, network: &HostNetwork) {
    let (status, body) = api.call(
        "PUT",
        "/v1/network",
        Some(serde_json::to_value(network).unwrap()),
    );
    assert_eq!(status, 204, "PUT /v1/network: {body}");
}

#[test]
fn security_groups_isolation_and_anti_spoofing_with_real_guests() {
    let image = GuestImage::locate();
    let mut env = Env::new();
    let agent = env.spawn_agent();
    let api = env.client(&agent, Identity::Platform);

    // A bad network is refused whole and changes nothing.
    let mut bad = network(vec![]);
    bad.ports[0].ip = "10.99.0.1".parse().unwrap();
    let (status, body) = api.call(
        "PUT",
        "/v1/network",
        Some(serde_json::to_value(&bad).unwrap()),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let (status, _) = api.call("PUT", "/v1/network", Some(json!({"vpcs": [], "bogus": 1})));
    assert_eq!(status, 400);

    put_network(&api, &network(vec![]));
    let net = network(vec![]);
    // Fresh instance ids each run: cgroups and leftovers of another run never mix in.
    let ids = [A1, A2, B1, A3].map(|_| random_id());
    for (port, id) in [A1, A2, B1, A3].iter().zip(&ids) {
        let mut spec = image.spec(id, 1, 128, "");
        spec.nics = vec![NicSpec {
            port_id: port.to_string(),
            mac: Mac::for_port(port),
        }];
        api.start(&spec);
    }
    let mut consoles: Vec<Console> = ids[..3]
        .iter()
        .map(|id| Console::attach(&api, id))
        .collect();
    let mut a3 = Console::attach(&api, &ids[3]);
    let out = a3.run("ip -o -4 addr show eth0; ip route");
    assert!(
        out.contains("inet 10.11.2.4/24") && out.contains("default via 10.11.2.1"),
        "a3's lease:\n{out}"
    );
    // Each guest got its port's address from its VPC's DHCP server at boot, and reaches its
    // gateway (the router), whose address is the same in both VPCs.
    for (console, port) in consoles.iter_mut().zip(&net.ports) {
        let out = console.run("ip -o link show eth0; ip -o -4 addr show eth0; ip route");
        assert!(out.contains(&port.mac.to_string()), "{out}");
        assert!(
            out.contains(&format!("inet {}/24", port.ip)),
            "no DHCP lease:\n{out}"
        );
        assert!(out.contains("default via 10.11.1.1"), "{out}");
        let out = console.run("ping -c 1 -W 2 10.11.1.1");
        assert!(out.contains("1 packets received"), "the gateway:\n{out}");
    }
    let [a1, a2, b1] = &mut consoles[..] else {
        unreachable!()
    };

    // E1: what a rule names is open; nothing else is; one-way rules give one-way traffic.
    a1.run("(probe serve 5001 &) ; (probe serve 5002 &) ; sleep 0.5");
    let talk = |from: &mut Console, to: &str, port: u16| {
        from.run(&format!("probe talk {to} {port} 3 300"))
    };
    let out = talk(a2, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "a2 -> a1:5001 must pass:\n{out}"
    );
    let out = talk(a2, "10.11.1.4", 5002);
    assert!(
        out.contains("PROBE connect failed"),
        "a2 -> a1:5002 is not open:\n{out}"
    );
    a2.run("(probe serve 5001 &) ; sleep 0.5");
    let out = talk(a1, "10.11.1.5", 5001);
    assert!(
        out.contains("PROBE connect failed"),
        "a2 allows no ingress:\n{out}"
    );
    // Tenant B's guest has the same address as a2 and allows everything in: it is still
    // unreachable from tenant A, and tenant A from it.
    b1.run("(probe serve 5001 &) ; sleep 0.5");
    let out = talk(b1, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE connect failed"),
        "tenant B reached tenant A:\n{out}"
    );

    // A changed rule holds within 2 s.
    let changed = Instant::now();
    put_network(
        &api,
        &network(vec![rule(
            Direction::Ingress,
            Protocol::Tcp,
            Some((5002, 5002)),
            "10.11.1.5/32",
        )]),
    );
    let out = talk(a2, "10.11.1.4", 5002);
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "the new rule does not hold:\n{out}"
    );
    assert!(changed.elapsed() < Duration::from_secs(10));

    // Subnets of one VPC reach each other through its router, and a subnet's ACL (stateless,
    // in order) filters what crosses into it, not what stays inside it.
    let out = talk(&mut a3, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "a3 -> a1 across subnets:\n{out}"
    );
    // (Keeping the 5002 rule of the step before: the session test below uses it.)
    let still = || {
        network(vec![rule(
            Direction::Ingress,
            Protocol::Tcp,
            Some((5002, 5002)),
            "10.11.1.5/32",
        )])
    };
    let mut with_acl = still();
    with_acl.vpcs[0].subnets[0].acl = vec![
        AclRuleNet {
            direction: Direction::Ingress,
            action: AclAction::Deny,
            protocol: Protocol::Tcp,
            ports: Some(PortRange::new(5001, 5001).unwrap()),
            cidr: parse_cidr("10.11.2.0/24").unwrap(),
        },
        AclRuleNet {
            direction: Direction::Ingress,
            action: AclAction::Allow,
            protocol: Protocol::Any,
            ports: None,
            cidr: parse_cidr("0.0.0.0/0").unwrap(),
        },
        AclRuleNet {
            direction: Direction::Egress,
            action: AclAction::Allow,
            protocol: Protocol::Any,
            ports: None,
            cidr: parse_cidr("0.0.0.0/0").unwrap(),
        },
    ];
    put_network(&api, &with_acl);
    let out = talk(&mut a3, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE connect failed"),
        "the ACL's deny:\n{out}"
    );
    let out = talk(a2, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "inside the subnet:\n{out}"
    );
    put_network(&api, &still());
    let out = talk(&mut a3, "10.11.1.4", 5001);
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "the ACL removed:\n{out}"
    );
    drop(a3);

    // E2: removing the rule ends a session it allowed, there and then.
    let started = a2.run("(probe talk 10.11.1.4 5002 40 200 &) ; sleep 1");
    if !started.contains("PROBE connected") {
        a2.wait_for("PROBE connected", Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    put_network(&api, &network(vec![]));
    let out = a2.wait_for("PROBE echoed", Duration::from_secs(60));
    let line = out
        .lines()
        .find(|l| l.contains("PROBE echoed"))
        .unwrap()
        .to_string();
    let echoed: Vec<u32> = line
        .rsplit(": ")
        .next()
        .unwrap()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert!(
        echoed.contains(&1) && !echoed.contains(&40) && echoed.len() < 30,
        "the session outlived its rule: {line}"
    );

    // Bandwidth: what a2 sends is policed to its limit, what a1 receives is shaped to its
    // limit; both take far longer than the same transfer without one.
    a1.run("(probe sink 5003 &) ; sleep 0.5");
    let open = vec![rule(
        Direction::Ingress,
        Protocol::Tcp,
        Some((5003, 5003)),
        "10.11.1.0/24",
    )];
    let push_ms = |console: &mut Console| -> u64 {
        let out = console.run("probe push 10.11.1.4 5003 300000");
        let line = out
            .lines()
            .find(|l| l.starts_with("PROBE pushed 300000 bytes in "))
            .unwrap_or_else(|| panic!("no push result:\n{out}"));
        line.trim_start_matches("PROBE pushed 300000 bytes in ")
            .trim_end_matches(" ms")
            .trim()
            .parse()
            .unwrap()
    };
    put_network(&api, &network(open.clone()));
    let free = push_ms(a2);
    let mut limited = network(open.clone());
    limited.ports[1].egress_kbit = 800;
    put_network(&api, &limited);
    let policed = push_ms(a2);
    let mut limited = network(open.clone());
    limited.ports[0].ingress_kbit = 800;
    put_network(&api, &limited);
    let shaped = push_ms(a2);
    put_network(&api, &network(vec![]));
    // 300 kB at 100 kB/s: about 3 s once the burst is spent (less when the guest's
    // offloaded segments outrun the bucket's accounting); without a limit, tens of ms.
    for (what, ms) in [("policed", policed), ("shaped", shaped)] {
        assert!(
            ms >= 1000 && ms > 10 * free.max(1),
            "{what}: {ms} ms against {free} ms without a limit"
        );
    }

    // E4, the metadata service: a session token by PUT (sent with an IP TTL of 2), then
    // answers about the asking guest only, whatever headers it sends.
    let meta = "probe http GET 169.254.169.254 80 /latest/meta-data/instance-id";
    let out = a2.run(meta);
    assert!(
        out.contains("PROBE http HTTP/1.") && out.contains(" 401 "),
        "no token:\n{out}"
    );
    let out = a2.run(
        "(probe ttl eth0 169.254.169.254 3 &) ; sleep 0.5 ; probe http PUT 169.254.169.254 80 \
         /latest/api/token X-aws-ec2-metadata-token-ttl-seconds:60",
    );
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("PROBE body "))
        .unwrap_or_else(|| panic!("no token:\n{out}"))
        .trim()
        .to_string();
    let out = a2.wait_for("PROBE ttl", Duration::from_secs(30));
    assert!(out.contains("PROBE ttl 2"), "the token's hop limit:\n{out}");
    let out = a2.run(&format!(
        "{meta} X-aws-ec2-metadata-token:{token} X-Forwarded-For:10.11.1.4 X-Real-IP:10.11.1.4"
    ));
    assert!(
        out.contains(&format!("PROBE body {A2}-vm")),
        "a2's own id:\n{out}"
    );
    assert!(!out.contains(A1), "a1's id given to a2:\n{out}");
    // a1 with a2's token, and a token asked for through a proxy: refused.
    let out = a1.run(&format!("{meta} X-aws-ec2-metadata-token:{token}"));
    assert!(out.contains(" 401 "), "a token from another guest:\n{out}");
    let out = a2.run(
        "probe http PUT 169.254.169.254 80 /latest/api/token \
         X-aws-ec2-metadata-token-ttl-seconds:60 X-Forwarded-For:1.2.3.4",
    );
    assert!(out.contains(" 403 "), "a proxied token request:\n{out}");

    // E4: no guest reaches the host: a listener on every host address hears nothing, and
    // neither does the router beyond DHCP, metadata and ping.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let shown = std::process::Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .unwrap();
    let mut targets: Vec<String> = serde_json::from_slice::<Vec<serde_json::Value>>(&shown.stdout)
        .unwrap()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .filter(|a| !a.starts_with("127."))
        .collect();
    assert!(!targets.is_empty(), "the host has no address to try");
    targets.extend(["10.11.1.1".to_string(), "169.254.169.254".to_string()]);
    for target in &targets {
        let out = a1.run(&format!("probe talk {target} {port} 1 100"));
        assert!(
            out.contains("PROBE connect failed"),
            "a guest reached {target}:\n{out}"
        );
    }
    assert!(
        listener.accept().is_err(),
        "the host's listener was reached"
    );
    // The control: the host itself reaches it.
    std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();

    // E3: forged frames from a2 never reach a1; the same frame sent honestly does (so the
    // sniffer would see them).
    let a1_mac = mac_bytes(Mac::for_port(A1));
    let a2_mac = mac_bytes(Mac::for_port(A2));
    let a1_ip: Ipv4Addr = "10.11.1.4".parse().unwrap();
    let a2_ip: Ipv4Addr = "10.11.1.5".parse().unwrap();
    let broadcast = [0xff; 6];
    let marker = random_marker();
    let honest = ethernet(
        a1_mac,
        a2_mac,
        0x0800,
        &ipv4(a2_ip, a1_ip, 17, &udp(4000, 7777, &marker)),
    );
    let mut vlan_payload = vec![0x00, 0x05, 0x08, 0x00];
    vlan_payload.extend(ipv4(a2_ip, a1_ip, 17, &udp(4000, 7777, &marker)));
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 0x2a, 0];
    vxlan.extend(ethernet(
        a1_mac,
        [2, 0, 0, 0, 0, 9],
        0x0800,
        &ipv4(
            "10.11.1.9".parse().unwrap(),
            a1_ip,
            17,
            &udp(4000, 7777, &marker),
        ),
    ));
    let mut arp = arp_reply(a2_mac, a1_ip, broadcast, a1_ip);
    arp.extend_from_slice(&marker);
    let mut ra = vec![0x60, 0, 0, 0, 0, 40, 58, 255];
    ra.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 5]);
    ra.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ra.extend_from_slice(&[134, 0, 0, 0, 64, 0, 0x0e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]);
    ra.extend_from_slice(&marker[..24]);
    let forged: Vec<(&str, Vec<u8>)> = vec![
        (
            "a forged source IP",
            ethernet(
                a1_mac,
                a2_mac,
                0x0800,
                &ipv4(
                    "10.11.1.77".parse().unwrap(),
                    a1_ip,
                    17,
                    &udp(4000, 7777, &marker),
                ),
            ),
        ),
        (
            "a forged source MAC",
            ethernet(
                a1_mac,
                [2, 0x66, 0, 0, 0, 1],
                0x0800,
                &ipv4(a2_ip, a1_ip, 17, &udp(4000, 7777, &marker)),
            ),
        ),
        (
            "gratuitous ARP for a neighbour",
            ethernet(broadcast, a2_mac, 0x0806, &arp),
        ),
        (
            "a DHCP offer",
            ethernet(
                broadcast,
                a2_mac,
                0x0800,
                &ipv4(
                    a2_ip,
                    "255.255.255.255".parse().unwrap(),
                    17,
                    &udp(
                        67,
                        68,
                        &dhcp_offer(a1_mac, "10.11.1.99".parse().unwrap(), &marker),
                    ),
                ),
            ),
        ),
        (
            "an IPv6 router advert",
            ethernet([0x33, 0x33, 0, 0, 0, 1], a2_mac, 0x86dd, &ra),
        ),
        (
            "a VLAN-tagged frame",
            ethernet(a1_mac, a2_mac, 0x8100, &vlan_payload),
        ),
        (
            "a VXLAN-encapsulated frame",
            ethernet(
                a1_mac,
                a2_mac,
                0x0800,
                &ipv4(a2_ip, a1_ip, 17, &udp(4000, 4789, &vxlan)),
            ),
        ),
        (
            "unknown unicast",
            ethernet(
                [2, 0x77, 0, 0, 0, 1],
                a2_mac,
                0x0800,
                &ipv4(
                    a2_ip,
                    "10.11.1.77".parse().unwrap(),
                    17,
                    &udp(4000, 7777, &marker),
                ),
            ),
        ),
    ];
    for (what, frame) in &forged {
        a1.run(&format!(
            "(probe sniff eth0 {} 4 &) ; sleep 1",
            hex_of(&marker)
        ));
        a2.run(&format!("probe send eth0 {} 5", hex_of(frame)));
        let out = a1.wait_for("PROBE sniffed", Duration::from_secs(30));
        assert!(out.contains("PROBE sniffed 0"), "{what} reached a1:\n{out}");
        // Tenant B's guest sees none of it either.
    }
    a1.run(&format!(
        "(probe sniff eth0 {} 4 &) ; sleep 1",
        hex_of(&marker)
    ));
    a2.run(&format!("probe send eth0 {} 5", hex_of(&honest)));
    let out = a1.wait_for("PROBE sniffed", Duration::from_secs(30));
    assert!(
        !out.contains("PROBE sniffed 0"),
        "the honest frame did not arrive:\n{out}"
    );
    // Monitoring: a2's anti-spoofing counted what it dropped (IPv6 apart), and the flows of
    // a1 show the honest datagrams as accepted.
    let traffic: palisade_common::agent_api::HostTraffic =
        api.ok("GET", "/v1/network/traffic", None);
    let of = |port: &str| {
        traffic
            .ports
            .iter()
            .find(|t| t.port_id == port)
            .unwrap()
            .clone()
    };
    let (a1_traffic, a2_traffic) = (of(A1), of(A2));
    assert!(a2_traffic.spoofed_frames >= 30, "{a2_traffic:?}");
    assert!(a2_traffic.ipv6_frames >= 5, "{a2_traffic:?}");
    assert_eq!(a1_traffic.spoofed_frames, 0, "{a1_traffic:?}");
    assert!(
        a1_traffic.flows.iter().any(|f| f.verdict == "accepted"
            && f.protocol == "udp"
            && f.dport == 7777
            && f.src == a2_ip
            && f.packets >= 5),
        "{:?}",
        a1_traffic.flows
    );
    // Another change of rules (any tenant's) keeps the counts.
    put_network(
        &api,
        &network(vec![rule(
            Direction::Ingress,
            Protocol::Tcp,
            Some((6000, 6000)),
            "10.11.1.0/24",
        )]),
    );
    let after: palisade_common::agent_api::HostTraffic = api.ok("GET", "/v1/network/traffic", None);
    let a2_after = after.ports.iter().find(|t| t.port_id == A2).unwrap();
    assert!(
        a2_after.spoofed_frames >= a2_traffic.spoofed_frames,
        "a rule change wiped the count: {a2_after:?}"
    );
    // The DHCP exception of a port's egress rules reaches the router only: a2 without any
    // egress rule cannot send "DHCP" to a1, which would let it in.
    let mut no_egress = network(vec![]);
    no_egress.ports[1].rules.clear();
    put_network(&api, &no_egress);
    let dhcp_like = ethernet(
        a1_mac,
        a2_mac,
        0x0800,
        &ipv4(a2_ip, a1_ip, 17, &udp(68, 67, &marker)),
    );
    a1.run(&format!(
        "(probe sniff eth0 {} 4 &) ; sleep 1",
        hex_of(&marker)
    ));
    a2.run(&format!("probe send eth0 {} 5", hex_of(&dhcp_like)));
    let out = a1.wait_for("PROBE sniffed", Duration::from_secs(30));
    assert!(
        out.contains("PROBE sniffed 0"),
        "DHCP to a guest, past a2's egress rules:\n{out}"
    );
    put_network(&api, &network(vec![]));
    drop(consoles);

    // E5: the agent dies and comes back. Its rules stayed in the kernel meanwhile (nothing
    // removes them); it applies what it saved, and everything still holds.
    agent.kill();
    let agent = env.spawn_agent();
    let api = env.client(&agent, Identity::Platform);
    let mut a1 = Console::attach(&api, &ids[0]);
    let mut a2 = Console::attach(&api, &ids[1]);
    a1.run(&format!(
        "(probe sniff eth0 {} 4 &) ; sleep 1",
        hex_of(&marker)
    ));
    a2.run(&format!("probe send eth0 {} 5", hex_of(&forged[0].1)));
    let out = a1.wait_for("PROBE sniffed", Duration::from_secs(30));
    assert!(
        out.contains("PROBE sniffed 0"),
        "a forged IP after the restart:\n{out}"
    );
    let out = a2.run("probe talk 10.11.1.4 5001 3 100");
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "after the restart:\n{out}"
    );
    let out = a2.run("udhcpc -i eth0 -n -q -t 3 -T 1 2>&1 | tail -2; ip -o -4 addr show eth0");
    assert!(
        out.contains("inet 10.11.1.5/24"),
        "DHCP after the restart:\n{out}"
    );
    let out = a2.run("probe talk 10.11.1.4 5002 1 100");
    assert!(
        out.contains("PROBE connect failed"),
        "5002 opened by the restart:\n{out}"
    );
}

// ---- through the controller ---------------------------------------------------------------

#[test]
fn bad_network_requests_get_clear_errors_and_change_nothing() {
    use crate::support::{api_error, Platform};
    use palisade_common::api;
    let p = Platform::start();
    let admin = p.admin();
    let (_, a) = p.tenant(&admin, "neta", None);
    let (_, b) = p.tenant(&admin, "netb", None);
    let post = |who: &crate::support::Signer, path: &str, body: serde_json::Value| {
        p.block_on(who.client.post::<_, serde_json::Value>(path, &body))
    };
    let vpc: api::Vpc = serde_json::from_value(
        post(&a, "/v1/vpcs", json!({"name": "v", "cidr": "10.20.0.0/16"})).unwrap(),
    )
    .unwrap();
    let sg: api::SecurityGroup =
        serde_json::from_value(post(&a, "/v1/security-groups", json!({"name": "web"})).unwrap())
            .unwrap();
    let theirs: api::SecurityGroup =
        serde_json::from_value(post(&b, "/v1/security-groups", json!({"name": "web"})).unwrap())
            .unwrap();
    let rules = format!("/v1/security-groups/{}/rules", sg.id);
    let rule = |extra: serde_json::Value| {
        let mut body = json!({"direction": "ingress", "protocol": "tcp", "cidr": "10.0.0.0/8"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, status, says) in [
        (rule(json!({"protocol": "gre"})), 400, "unknown protocol"),
        (
            rule(json!({"port_from": 70000})),
            400,
            "70000 is out of range",
        ),
        (
            rule(json!({"port_from": 90, "port_to": 80})),
            400,
            "backwards",
        ),
        (
            rule(json!({"cidr": "10.0.0.300/8"})),
            400,
            "not an IPv4 prefix",
        ),
        (rule(json!({"cidr": "10.1.2.3/8"})), 400, "host bits"),
        (rule(json!({"cidr": "169.254.0.0/16"})), 400, "reserved"),
        (
            rule(json!({"protocol": "icmp", "port_from": 1})),
            400,
            "take no ports",
        ),
        (rule(json!({"direction": "sideways"})), 400, "direction"),
        (
            rule(json!({"cidr": null, "remote_group": theirs.id})),
            404,
            "security group",
        ),
        (
            rule(json!({"remote_group": sg.id})),
            400,
            "exactly one of cidr and remote_group",
        ),
        (rule(json!({"ports": "all"})), 400, "unknown field"),
    ] {
        let e = api_error(post(&a, &rules, body.clone()).unwrap_err());
        assert_eq!(e.status, status, "{body}: {e:?}");
        assert!(e.message.contains(says), "{body}: {}", e.message);
    }
    // Nothing changed: the group still holds its one default rule.
    let now: api::SecurityGroup = p
        .block_on(a.client.get(&format!("/v1/security-groups/{}", sg.id)))
        .unwrap();
    assert_eq!(now.rules, sg.rules);
    // A good rule, then the same again: a conflict.
    post(&a, &rules, rule(json!({"port_from": 22}))).unwrap();
    let e = api_error(post(&a, &rules, rule(json!({"port_from": 22}))).unwrap_err());
    assert_eq!((e.status, e.code.as_str()), (409, "duplicate_rule"));

    // VPCs and subnets: private blocks only, subnets inside and apart.
    for (cidr, says) in [("8.8.0.0/16", "not private"), ("10.0.0.0/8", "/16 to /28")] {
        let e = api_error(post(&a, "/v1/vpcs", json!({"name": "x", "cidr": cidr})).unwrap_err());
        assert!(e.status == 400 && e.message.contains(says), "{cidr}: {e:?}");
    }
    let subnets = format!("/v1/vpcs/{}/subnets", vpc.id);
    post(&a, &subnets, json!({"name": "s1", "cidr": "10.20.1.0/24"})).unwrap();
    for (cidr, says) in [
        ("10.20.1.128/25", "overlaps"),
        ("10.30.0.0/24", "not inside"),
    ] {
        let e = api_error(post(&a, &subnets, json!({"name": "s2", "cidr": cidr})).unwrap_err());
        assert!(e.status == 400 && e.message.contains(says), "{cidr}: {e:?}");
    }
    // Tenant B sees none of it: 404, like a VPC that does not exist.
    let e =
        api_error(post(&b, &subnets, json!({"name": "s3", "cidr": "10.20.3.0/24"})).unwrap_err());
    assert_eq!(e.status, 404);
    let listed: Vec<api::Subnet> = p.block_on(a.client.get("/v1/subnets")).unwrap();
    assert_eq!(listed.len(), 1);
    // An ACL with one bad rule is refused whole.
    let acl = format!("/v1/subnets/{}/acl", listed[0].id);
    let e = api_error(
        p.block_on(a.client.json::<_, serde_json::Value>(
            reqwest::Method::PUT,
            &acl,
            Some(&json!({"rules": [
                {"direction": "ingress", "action": "allow", "protocol": "tcp",
                 "port_from": 22, "cidr": "0.0.0.0/0"},
                {"direction": "ingress", "action": "maybe", "protocol": "tcp",
                 "cidr": "0.0.0.0/0"}
            ]})),
        ))
        .unwrap_err(),
    );
    assert!(e.status == 400 && e.message.contains("rule 2"), "{e:?}");
    let subnet: api::Subnet = p
        .block_on(a.client.get(&format!("/v1/subnets/{}", listed[0].id)))
        .unwrap();
    assert!(subnet.acl.is_empty());
    // An instance in another tenant's subnet, or with its groups: not found.
    for body in [
        json!({"name": "vm", "image": "debian-12-busybox", "flavor": "tiny",
               "subnet": listed[0].id}),
        json!({"name": "vm", "image": "debian-12-busybox", "flavor": "tiny",
               "subnet": listed[0].id,
               "security_groups": [sg.id]}),
    ] {
        let e = api_error(post(&b, "/v1/instances", body.clone()).unwrap_err());
        assert_eq!(e.status, 404, "{body}");
    }
    let instances: Vec<api::Instance> = p.block_on(b.client.get("/v1/instances")).unwrap();
    assert!(instances.is_empty());
}

#[test]
fn tenants_build_their_networks_through_the_api_and_guests_follow_the_rules() {
    use crate::support::Platform;
    use palisade_common::api;
    let p = Platform::start();
    let admin = p.admin();
    let (_, a) = p.tenant(&admin, "neta", None);
    let (_, b) = p.tenant(&admin, "netb", None);
    let post = |who: &crate::support::Signer, path: &str, body: serde_json::Value| {
        p.block_on(who.client.post::<_, serde_json::Value>(path, &body))
            .unwrap()
    };
    // Both tenants build the same addresses; tenant A's group lets its own members in on
    // 5001; tenant B's lets everyone in.
    let mut wired = Vec::new();
    for (who, open) in [(&a, false), (&b, true)] {
        let vpc = post(
            who,
            "/v1/vpcs",
            json!({"name": "v", "cidr": "10.30.0.0/16"}),
        );
        let subnet = post(
            who,
            &format!("/v1/vpcs/{}/subnets", vpc["id"].as_str().unwrap()),
            json!({"name": "s", "cidr": "10.30.1.0/24"}),
        );
        let sg = post(who, "/v1/security-groups", json!({"name": "web"}));
        let sg_id = sg["id"].as_str().unwrap().to_string();
        let rule = if open {
            json!({"direction": "ingress", "protocol": "any", "cidr": "0.0.0.0/0"})
        } else {
            json!({"direction": "ingress", "protocol": "tcp", "port_from": 5001,
                   "remote_group": sg_id})
        };
        post(who, &format!("/v1/security-groups/{sg_id}/rules"), rule);
        let names: &[&str] = if open { &["b1"] } else { &["a1", "a2"] };
        for name in names {
            let created = post(
                who,
                "/v1/instances",
                json!({"name": name, "image": "debian-12-busybox", "flavor": "tiny",
                       "subnet": subnet["id"], "security_groups": [sg_id]}),
            );
            wired.push((created["id"].as_str().unwrap().to_string(), sg_id.clone()));
        }
    }
    let ports = |who: &crate::support::Signer| -> Vec<api::Port> {
        p.block_on(who.client.get("/v1/ports")).unwrap()
    };
    let (a_ports, b_ports) = (ports(&a), ports(&b));
    assert_eq!((a_ports.len(), b_ports.len()), (2, 1));
    let ip_of = |id: &str| -> String {
        a_ports
            .iter()
            .chain(&b_ports)
            .find(|port| port.instance_id == id)
            .unwrap()
            .ip
            .clone()
    };
    let (ta, tb) = (Tenant { p: &p, who: &a }, Tenant { p: &p, who: &b });
    let mut a1 = Console::attach(&ta, &wired[0].0);
    let mut a2 = Console::attach(&ta, &wired[1].0);
    let mut b1 = Console::attach(&tb, &wired[2].0);
    let (a1_ip, a2_ip) = (ip_of(&wired[0].0), ip_of(&wired[1].0));
    for (console, id) in [
        (&mut a1, &wired[0].0),
        (&mut a2, &wired[1].0),
        (&mut b1, &wired[2].0),
    ] {
        let out = console.run("ip -o -4 addr show eth0");
        assert!(out.contains(&format!("inet {}/24", ip_of(id))), "{out}");
    }
    assert_eq!(
        ip_of(&wired[2].0),
        a1_ip,
        "tenant B got the same address as a1"
    );

    a1.run("(probe serve 5001 &) ; (probe serve 5002 &) ; sleep 0.5");
    let out = a2.run(&format!("probe talk {a1_ip} 5001 3 100"));
    assert!(
        out.contains("PROBE echoed 3 of 3"),
        "the remote-group rule:\n{out}"
    );
    let out = a2.run(&format!("probe talk {a1_ip} 5002 1 100"));
    assert!(
        out.contains("PROBE connect failed"),
        "5002 is not open:\n{out}"
    );
    // Tenant B's guest, with everything open on its side, has another a1 at that address:
    // its own VPC's, so nothing.
    let out = b1.run(&format!("probe talk {a1_ip} 5001 1 100"));
    assert!(
        out.contains("PROBE connect failed"),
        "tenant B reached tenant A:\n{out}"
    );

    // A rule added through the API opens 5002, from a2 only; removing it closes it again.
    let rule: api::SecurityGroupRule = serde_json::from_value(post(
        &a,
        &format!("/v1/security-groups/{}/rules", wired[0].1),
        json!({"direction": "ingress", "protocol": "tcp", "port_from": 5002,
               "cidr": format!("{a2_ip}/32")}),
    ))
    .unwrap();
    let out = a2.run(&format!("probe talk {a1_ip} 5002 3 100"));
    assert!(out.contains("PROBE echoed 3 of 3"), "the new rule:\n{out}");
    p.block_on(a.client.json::<(), serde_json::Value>(
        reqwest::Method::DELETE,
        &format!("/v1/security-group-rules/{}", rule.id),
        None,
    ))
    .ok();
    std::thread::sleep(Duration::from_secs(2));
    let out = a2.run(&format!("probe talk {a1_ip} 5002 1 100"));
    assert!(
        out.contains("PROBE connect failed"),
        "the removed rule:\n{out}"
    );
    // The tenant reads its port's flows: a2's connections to a1, accepted and denied.
    let a1_port = a_ports
        .iter()
        .find(|port| port.instance_id == wired[0].0)
        .unwrap();
    let traffic: palisade_common::agent_api::PortTraffic = p
        .block_on(a.client.get(&format!("/v1/ports/{}/traffic", a1_port.id)))
        .unwrap();
    let from_a2 = |verdict: &str, port: u16| {
        traffic
            .flows
            .iter()
            .any(|f| f.verdict == verdict && f.src.to_string() == a2_ip && f.dport == port)
    };
    // (The sets start again at each change of rules: the last attempt, refused, is there.)
    assert!(from_a2("denied", 5002), "{:?}", traffic.flows);
    // Tenant B cannot read it: not found.
    let e = crate::support::api_error(
        p.block_on(
            b.client
                .get::<serde_json::Value>(&format!("/v1/ports/{}/traffic", a1_port.id)),
        )
        .unwrap_err(),
    );
    assert_eq!(e.status, 404);
    // A guest forging its address raises a spoofing alert for its tenant.
    let mut forged = ethernet(
        [0xff; 6],
        Mac::for_port(
            &a_ports
                .iter()
                .find(|port| port.instance_id == wired[1].0)
                .unwrap()
                .id,
        )
        .0,
        0x0800,
        &ipv4(
            "10.30.1.99".parse().unwrap(),
            a1_ip.parse().unwrap(),
            17,
            &udp(1, 2, b"x"),
        ),
    );
    forged.extend_from_slice(&[0; 8]);
    a2.run(&format!("probe send eth0 {} 3", hex_of(&forged)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(p.audit_log())
        .unwrap()
        .contains("alert.spoofing")
    {
        assert!(Instant::now() < deadline, "no spoofing alert");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every change reached the host as a recorded host operation.
    let audit = std::fs::read_to_string(p.audit_log()).unwrap();
    assert!(
        audit.matches("host.network_apply").count() >= 4,
        "network pushes not audited"
    );
}
