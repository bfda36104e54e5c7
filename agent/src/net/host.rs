//! The host side of tenant networks: one network namespace per agent holding the VPC bridges
//! and the instances' taps, and nothing else (no address, no route, IPv6 off), so no guest
//! frame can reach the host's own stack or its management network.
//!
//! [`NetHost::apply`] makes the namespace match a [`HostNetwork`]: first the whole ruleset, in
//! one nftables transaction (so a tap never exists without its rules: until then the base
//! policy drops its frames), then bridges and taps, then removal of what is no longer wanted.
//! The last network applied is kept in `<data-dir>/network.json` and applied again when the
//! agent starts, before any instance is started or adopted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_common::agent_api::{Flow, HostNetwork, HostTraffic, PortTraffic};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::info;

use crate::host_cmd::{self, HostCmdError};
use crate::net::nft::{self, Render, RenderError};
use crate::net::{conntrack, dhcp, metadata};

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the network is inconsistent: {0}")]
    Invalid(#[from] RenderError),
    #[error(transparent)]
    Tool(#[from] HostCmdError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsafe(String),
}

/// What was applied last.
#[derive(Default)]
struct Applied {
    network: HostNetwork,
    render: Option<Render>,
    /// Each port's (spoofed, IPv6) frames counted by rulesets already replaced: a new ruleset
    /// starts its counters at zero, so what they held is carried here (no change of rules,
    /// by any tenant, can wipe a port's count).
    carried: HashMap<String, (u64, u64)>,
}

pub struct NetHost {
    /// The namespace's name, under `/run/netns`.
    name: String,
    saved: PathBuf,
    applied: Mutex<Applied>,
    /// Each VPC's router, by VNI: the addresses its DHCP server hands out, and that server.
    routers: Mutex<HashMap<u32, Router>>,
}

struct Router {
    leases: dhcp::Leases,
    dhcp: tokio::task::JoinHandle<()>,
    guests: metadata::Guests,
    metadata: tokio::task::JoinHandle<()>,
}

impl Drop for Router {
    fn drop(&mut self) {
        self.dhcp.abort();
        self.metadata.abort();
    }
}

/// The router's side of its link to the VPC bridge, inside the router's namespace.
const ROUTER_LINK: &str = "gw";

impl NetHost {
    /// Creates (or takes over) the agent's namespace and applies the saved network.
    pub async fn open(data_dir: &Path) -> Result<NetHost, NetError> {
        let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
        let name = format!("pal-{}", &hex::encode(digest)[..10]);
        let host = NetHost {
            name,
            saved: data_dir.join("network.json"),
            applied: Mutex::new(Applied::default()),
            routers: Mutex::new(HashMap::new()),
        };
        host.ensure_namespace().await?;
        let saved = match std::fs::read(&host.saved) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetError::Io {
                what: format!("reading {}", host.saved.display()),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HostNetwork::default(),
            Err(source) => {
                return Err(NetError::Io {
                    what: format!("reading {}", host.saved.display()),
                    source,
                })
            }
        };
        host.apply(saved).await?;
        Ok(host)
    }

    /// `/run/netns/<name>`: what the jailer enters to open a tap.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Whether `port_id` is a port of the applied network (its tap exists, with its rules).
    pub async fn has_port(&self, port_id: &str) -> bool {
        let applied = self.applied.lock().await;
        applied.network.ports.iter().any(|p| p.id == port_id)
    }

    async fn ensure_namespace(&self) -> Result<(), NetError> {
        if !self.netns_path().exists() {
            self.ip(&["netns", "add", &self.name]).await?;
            info!(netns = %self.name, "network namespace created");
        }
        // Bridged IPv4 must pass through the inet hooks (the ruleset drops what did not);
        // no IPv6 anywhere in the namespace, so no interface gets a link-local address; no
        // routing (the namespace has no address to route from anyway).
        self.in_ns(
            "sysctl",
            &[
                "-q",
                "-w",
                "net.bridge.bridge-nf-call-iptables=1",
                "net.bridge.bridge-nf-call-arptables=0",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv4.ip_forward=0",
            ],
        )
        .await?;
        let value = self
            .in_ns("sysctl", &["-n", "net.bridge.bridge-nf-call-iptables"])
            .await?;
        if String::from_utf8_lossy(&value.stdout).trim() != "1" {
            return Err(NetError::Unsafe(
                "bridge-nf-call-iptables did not stay on: bridged traffic would not be filtered"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Makes the namespace carry exactly `network`.
    pub async fn apply(&self, network: HostNetwork) -> Result<(), NetError> {
        let render = nft::render(&network)?;
        let mut applied = self.applied.lock().await;
        // What the ruleset being replaced counted, carried over.
        if applied.render.is_some() {
            if let Ok(counts) = self.drop_counts(&applied.network).await {
                for (port, (spoofed, ipv6)) in counts {
                    let total = applied.carried.entry(port).or_default();
                    total.0 += spoofed;
                    total.1 += ipv6;
                }
            }
        }
        let kept: Vec<String> = network.ports.iter().map(|p| p.id.clone()).collect();
        applied.carried.retain(|port, _| kept.contains(port));
        // 1. Every rule, at once. Rules name interfaces, so they hold before the taps exist.
        self.nft(&render.script).await?;
        // 2. Bridges and taps.
        let links = self.links().await?;
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        for vpc in &network.vpcs {
            let bridge = nft::bridge_name(vpc.vni);
            wanted.insert(bridge.clone());
            if !links.contains_key(&bridge) {
                self.ip_ns(&["link", "add", &bridge, "type", "bridge"])
                    .await?;
            }
            self.ip_ns(&["link", "set", &bridge, "up"]).await?;
        }
        for port in &network.ports {
            let vpc = network
                .vpcs
                .iter()
                .find(|v| v.id == port.vpc_id)
                .expect("checked by render");
            let bridge = nft::bridge_name(vpc.vni);
            let tap = nft::tap_name(&port.id);
            wanted.insert(tap.clone());
            if !links.contains_key(&tap) {
                self.ip_ns(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])
                    .await?;
            }
            self.attach_to_bridge(&tap, &bridge, &port.mac.to_string())
                .await?;
            self.limit_bandwidth(&tap, port.ingress_kbit).await?;
        }
        // 3. Each VPC's router: its namespace, its link into the bridge, its DHCP server.
        let mut routers = self.routers.lock().await;
        for vpc in &network.vpcs {
            self.ensure_router(vpc, &links).await?;
            wanted.insert(nft::router_link_name(vpc.vni));
            let leases: HashMap<[u8; 6], dhcp::Lease> = network
                .ports
                .iter()
                .filter(|p| p.vpc_id == vpc.id)
                .filter_map(|p| {
                    let subnet = vpc.subnets.iter().find(|s| s.id == p.subnet_id)?;
                    Some((
                        p.mac.0,
                        dhcp::Lease {
                            ip: p.ip,
                            prefix_len: subnet.cidr.prefix_len(),
                            gateway: palisade_common::net::gateway(&subnet.cidr),
                        },
                    ))
                })
                .collect();
            let guests: HashMap<std::net::Ipv4Addr, metadata::GuestMeta> = network
                .ports
                .iter()
                .filter(|p| p.vpc_id == vpc.id)
                .map(|p| {
                    (
                        p.ip,
                        metadata::GuestMeta {
                            instance_id: p.instance_id.clone(),
                            mac: p.mac.to_string(),
                            ip: p.ip,
                        },
                    )
                })
                .collect();
            match routers.get(&vpc.vni) {
                Some(router) if !router.dhcp.is_finished() && !router.metadata.is_finished() => {
                    *router.leases.write().unwrap_or_else(|p| p.into_inner()) = leases;
                    *router.guests.write().unwrap_or_else(|p| p.into_inner()) = guests;
                }
                _ => {
                    // Any half-dead router's tasks end first, so their sockets are free.
                    routers.remove(&vpc.vni);
                    let socket = dhcp::socket_in(
                        &self.router_path(vpc.vni),
                        std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 67),
                        ROUTER_LINK,
                    )
                    .map_err(|source| NetError::Io {
                        what: format!("opening the DHCP socket of VPC {}", vpc.id),
                        source,
                    })?;
                    let listener = metadata::listener_in(
                        &self.router_path(vpc.vni),
                        std::net::SocketAddrV4::new(nft::METADATA_IP, 80),
                    )
                    .map_err(|source| NetError::Io {
                        what: format!("opening the metadata listener of VPC {}", vpc.id),
                        source,
                    })?;
                    let leases = std::sync::Arc::new(std::sync::RwLock::new(leases));
                    let guests = std::sync::Arc::new(std::sync::RwLock::new(guests));
                    let dhcp = tokio::spawn(dhcp::serve(socket, leases.clone(), vpc.id.clone()));
                    let served =
                        tokio::spawn(metadata::serve(listener, guests.clone(), vpc.id.clone()));
                    routers.insert(
                        vpc.vni,
                        Router {
                            leases,
                            dhcp,
                            guests,
                            metadata: served,
                        },
                    );
                }
            }
        }
        let gone: Vec<u32> = routers
            .keys()
            .filter(|vni| !network.vpcs.iter().any(|v| v.vni == **vni))
            .copied()
            .collect();
        for vni in gone {
            routers.remove(&vni);
        }
        drop(routers);
        self.remove_stale_routers(&network).await?;

        // 4. What is no longer wanted: taps and router links first, then bridges.
        for (name, _) in links
            .iter()
            .filter(|(n, _)| n.starts_with("pt") || n.starts_with("pr"))
        {
            if !wanted.contains(name) {
                self.ip_ns(&["link", "del", name]).await?;
            }
        }
        for (name, _) in links.iter().filter(|(n, _)| n.starts_with("pb")) {
            if !wanted.contains(name) {
                self.ip_ns(&["link", "del", name]).await?;
            }
        }
        // 5. Sessions the new rules no longer allow end now, not when they go idle.
        let changed: BTreeSet<u32> = network
            .ports
            .iter()
            .filter(|p| {
                applied
                    .network
                    .ports
                    .iter()
                    .find(|old| old.id == p.id)
                    .is_some_and(|old| old.rules != p.rules)
            })
            .filter_map(|p| network.vpcs.iter().find(|v| v.id == p.vpc_id))
            .map(|v| v.vni)
            .collect();
        for zone in changed {
            self.end_refused_sessions(&network, zone).await?;
        }
        save(&self.saved, &network)?;
        applied.network = network;
        applied.render = Some(render);
        Ok(())
    }

    /// The bandwidth limit of what reaches a port's guest, in kbit/s (0: none): a token bucket
    /// on the tap's egress, which queues rather than drops. (What the guest sends is policed
    /// by the ruleset, `nft.rs`: this host's kernel has no tc police action.)
    async fn limit_bandwidth(&self, tap: &str, ingress_kbit: u32) -> Result<(), NetError> {
        if ingress_kbit == 0 {
            return self.tc_absent(&["qdisc", "del", "dev", tap, "root"]).await;
        }
        // A burst of 100 ms at the rate, at least 16 KiB (a few full frames).
        let burst = (u64::from(ingress_kbit) * 1000 / 8 / 10)
            .max(16 * 1024)
            .to_string();
        let rate = format!("{ingress_kbit}kbit");
        self.tc(&[
            "qdisc", "replace", "dev", tap, "root", "tbf", "rate", &rate, "burst", &burst,
            "latency", "50ms",
        ])
        .await?;
        Ok(())
    }

    async fn tc(&self, args: &[&str]) -> Result<std::process::Output, NetError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        Ok(host_cmd::run(Path::new("tc"), &os(&all), TOOL_TIMEOUT).await?)
    }

    /// A `tc … del` whose object may not exist (then tc exits 2: nothing to do).
    async fn tc_absent(&self, args: &[&str]) -> Result<(), NetError> {
        match self.tc(args).await {
            Ok(_) => Ok(()),
            Err(NetError::Tool(HostCmdError::Failed { status, .. }))
                if status.code() == Some(2) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Each port's (spoofed, IPv6) frames counted by the ruleset in the kernel.
    async fn drop_counts(
        &self,
        network: &HostNetwork,
    ) -> Result<HashMap<String, (u64, u64)>, NetError> {
        let out = self
            .in_ns(
                "nft",
                &["-j", "list", "counters", "table", "bridge", "palisade"],
            )
            .await?;
        let counters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
        for item in counters["nftables"].as_array().into_iter().flatten() {
            let counter = &item["counter"];
            let (Some(name), Some(packets)) =
                (counter["name"].as_str(), counter["packets"].as_u64())
            else {
                continue;
            };
            for port in &network.ports {
                let tap = nft::tap_name(&port.id);
                let entry = counts.entry(port.id.clone()).or_default();
                if name == format!("{tap}_spoof") {
                    entry.0 = packets;
                } else if name == format!("{tap}_ipv6") {
                    entry.1 = packets;
                }
            }
        }
        Ok(counts)
    }

    /// What each port sent and was refused: the spoof counters (since the agent started) and
    /// the flow sets (the last two minutes, since the last change of rules).
    pub async fn traffic(&self) -> Result<HostTraffic, NetError> {
        let applied = self.applied.lock().await;
        let network = &applied.network;
        let json = |out: std::process::Output| -> serde_json::Value {
            serde_json::from_slice(&out.stdout).unwrap_or_default()
        };
        let counts = self.drop_counts(network).await?;
        let mut ports: Vec<PortTraffic> = network
            .ports
            .iter()
            .map(|p| {
                let now = counts.get(&p.id).copied().unwrap_or_default();
                let before = applied.carried.get(&p.id).copied().unwrap_or_default();
                PortTraffic {
                    port_id: p.id.clone(),
                    spoofed_frames: now.0 + before.0,
                    ipv6_frames: now.1 + before.1,
                    ..PortTraffic::default()
                }
            })
            .collect();
        for vpc in &network.vpcs {
            for (set, verdict) in [("acc", "accepted"), ("den", "denied")] {
                let name = format!("v{}_{set}", vpc.vni);
                let listed = json(
                    self.in_ns("nft", &["-j", "list", "set", "inet", "palisade", &name])
                        .await?,
                );
                let elements = listed["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["set"]["elem"].as_array())
                    .flatten();
                for element in elements {
                    let Some(flow) = parse_flow(element, verdict) else {
                        continue;
                    };
                    for (traffic, port) in ports.iter_mut().zip(&network.ports) {
                        if port.vpc_id == vpc.id && (port.ip == flow.src || port.ip == flow.dst) {
                            traffic.flows.push(flow.clone());
                        }
                    }
                }
            }
        }
        Ok(HostTraffic { ports })
    }

    /// Puts `link` on `bridge` with no learning and no flooding of unknown unicast, and pins
    /// `mac` to it: a frame reaches the link only when it is addressed to that MAC.
    async fn attach_to_bridge(&self, link: &str, bridge: &str, mac: &str) -> Result<(), NetError> {
        self.ip_ns(&["link", "set", link, "master", bridge, "up"])
            .await?;
        self.bridge(&[
            "link",
            "set",
            "dev",
            link,
            "learning",
            "off",
            "flood",
            "off",
            "mcast_flood",
            "off",
        ])
        .await?;
        self.bridge(&["fdb", "replace", mac, "dev", link, "master", "static"])
            .await?;
        Ok(())
    }

    /// `/run/netns/<agent namespace>-r<vni>`.
    fn router_path(&self, vni: u32) -> PathBuf {
        Path::new("/run/netns").join(self.router_name(vni))
    }

    fn router_name(&self, vni: u32) -> String {
        format!("{}-r{vni}", self.name)
    }

    /// The router of `vpc`: a namespace of its own (IPv6 off), linked into the VPC bridge by a
    /// veth pair whose router end has the pinned router MAC and each subnet's gateway address,
    /// and whose own firewall lets guests reach DHCP, the metadata service and a ping of the
    /// gateway, nothing else of it.
    async fn ensure_router(
        &self,
        vpc: &palisade_common::agent_api::VpcNet,
        links: &BTreeMap<String, String>,
    ) -> Result<(), NetError> {
        let ns = self.router_name(vpc.vni);
        if !self.router_path(vpc.vni).exists() {
            self.ip(&["netns", "add", &ns]).await?;
        }
        self.ip(&[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            // It routes between the VPC's subnets (in and out of the same link: no
            // redirects, the guests must keep going through it and its rules).
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ])
        .await?;
        let outer = nft::router_link_name(vpc.vni);
        if !links.contains_key(&outer) {
            self.ip_ns(&[
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                ROUTER_LINK,
                "netns",
                &ns,
            ])
            .await?;
        }
        let bridge = nft::bridge_name(vpc.vni);
        let mac = nft::router_mac(&vpc.id).to_string();
        self.ip(&["-n", &ns, "link", "set", ROUTER_LINK, "address", &mac])
            .await?;
        self.ip(&["-n", &ns, "link", "set", ROUTER_LINK, "up"])
            .await?;
        self.ip(&["-n", &ns, "link", "set", "lo", "up"]).await?;
        // The metadata service's address, on the router itself.
        let meta = format!("{}/32", nft::METADATA_IP);
        self.ip(&["-n", &ns, "addr", "replace", &meta, "dev", "lo"])
            .await?;
        // The gateway of each subnet, and no other address.
        let wanted: BTreeSet<String> = vpc
            .subnets
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    palisade_common::net::gateway(&s.cidr),
                    s.cidr.prefix_len()
                )
            })
            .collect();
        let shown = self
            .ip(&["-n", &ns, "-j", "addr", "show", "dev", ROUTER_LINK])
            .await?;
        let have: BTreeSet<String> =
            serde_json::from_slice::<Vec<serde_json::Value>>(&shown.stdout)
                .unwrap_or_default()
                .iter()
                .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
                .filter(|a| a["family"] == "inet")
                .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
                .collect();
        for extra in have.difference(&wanted) {
            self.ip(&["-n", &ns, "addr", "del", extra, "dev", ROUTER_LINK])
                .await?;
        }
        for missing in wanted.difference(&have) {
            self.ip(&["-n", &ns, "addr", "add", missing, "dev", ROUTER_LINK])
                .await?;
        }
        self.attach_to_bridge(&outer, &bridge, &mac).await?;
        let script = format!(
            "table inet palisade_router
             delete table inet palisade_router
             table inet palisade_router {{
               chain pal_in {{
                 type filter hook input priority 0; policy drop;
                 iif lo accept
                 ct state established,related accept
                 iifname \"{ROUTER_LINK}\" udp dport 67 accept
                 iifname \"{ROUTER_LINK}\" ip daddr {meta} tcp dport 80 accept
                 iifname \"{ROUTER_LINK}\" icmp type echo-request limit rate 10/second accept
               }}
               chain pal_fwd {{
                 type filter hook forward priority 0; policy drop;
                 iifname \"{ROUTER_LINK}\" oifname \"{ROUTER_LINK}\" accept
               }}
             }}
",
            meta = nft::METADATA_IP,
        );
        host_cmd::run_with_input(
            Path::new("ip"),
            &os(&["netns", "exec", &ns, "nft", "-f", "-"]),
            Some(script.as_bytes()),
            TOOL_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Router namespaces of VPCs this host no longer carries.
    async fn remove_stale_routers(&self, network: &HostNetwork) -> Result<(), NetError> {
        let prefix = format!("{}-r", self.name);
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(vni) = name
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u32>().ok())
            else {
                continue;
            };
            if !network.vpcs.iter().any(|v| v.vni == vni) {
                self.ip(&["netns", "del", &name]).await?;
            }
        }
        Ok(())
    }

    async fn end_refused_sessions(&self, network: &HostNetwork, zone: u32) -> Result<(), NetError> {
        let zone = zone.to_string();
        let listing = self.in_ns("conntrack", &["-L", "-w", &zone]).await?;
        let sessions = conntrack::parse(&String::from_utf8_lossy(&listing.stdout));
        for session in sessions.iter().filter(|s| !conntrack::allowed(network, s)) {
            let (src, dst) = (session.src.to_string(), session.dst.to_string());
            let mut args = vec![
                "-D",
                "-w",
                &zone,
                "-p",
                &session.protocol_name,
                "-s",
                &src,
                "-d",
                &dst,
            ];
            let (sport, dport) = (
                session.sport.map(|p| p.to_string()),
                session.dport.map(|p| p.to_string()),
            );
            if let (Some(sport), Some(dport)) = (&sport, &dport) {
                args.extend_from_slice(&["--sport", sport, "--dport", dport]);
            }
            // Exit status 1: the session ended by itself meanwhile.
            match self.in_ns("conntrack", &args).await {
                Ok(_) => info!(?session, "session no longer allowed: ended"),
                Err(NetError::Tool(HostCmdError::Failed { status, .. }))
                    if status.code() == Some(1) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The namespace's interfaces, by name (with their kind, as `ip -j -d` says).
    async fn links(&self) -> Result<BTreeMap<String, String>, NetError> {
        let out = self.ip_ns(&["-j", "-d", "link", "show"]).await?;
        let list: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| NetError::Io {
                what: "parsing `ip -j link show`".into(),
                source: std::io::Error::other(e),
            })?;
        Ok(list
            .iter()
            .filter_map(|l| {
                let name = l["ifname"].as_str()?.to_string();
                let kind = l["linkinfo"]["info_kind"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                Some((name, kind))
            })
            .collect())
    }

    async fn ip(&self, args: &[&str]) -> Result<std::process::Output, NetError> {
        Ok(host_cmd::run(Path::new("ip"), &os(args), TOOL_TIMEOUT).await?)
    }

    /// `ip -n <ns> …`
    async fn ip_ns(&self, args: &[&str]) -> Result<std::process::Output, NetError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        self.ip(&all).await
    }

    async fn bridge(&self, args: &[&str]) -> Result<std::process::Output, NetError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        Ok(host_cmd::run(Path::new("bridge"), &os(&all), TOOL_TIMEOUT).await?)
    }

    /// A tool run inside the namespace (`ip netns exec`).
    async fn in_ns(&self, tool: &str, args: &[&str]) -> Result<std::process::Output, NetError> {
        let mut all = vec!["netns", "exec", &self.name, tool];
        all.extend_from_slice(args);
        self.ip(&all).await
    }

    async fn nft(&self, script: &str) -> Result<(), NetError> {
        let args = os(&["netns", "exec", &self.name, "nft", "-f", "-"]);
        host_cmd::run_with_input(
            Path::new("ip"),
            &args,
            Some(script.as_bytes()),
            TOOL_TIMEOUT,
        )
        .await?;
        Ok(())
    }
}

/// One element of a flow set, as `nft -j` shows it:
/// `{"elem": {"val": {"concat": [src, dst, proto, sport, dport]}, "counter": {…}}}`.
fn parse_flow(element: &serde_json::Value, verdict: &str) -> Option<Flow> {
    let elem = &element["elem"];
    let parts = elem["val"]["concat"].as_array()?;
    let port = |v: &serde_json::Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
    let protocol = match &parts[2] {
        serde_json::Value::String(name) => name.clone(),
        other => other.to_string(),
    };
    Some(Flow {
        src: parts[0].as_str()?.parse().ok()?,
        dst: parts[1].as_str()?.parse().ok()?,
        protocol,
        sport: port(&parts[3])?,
        dport: port(&parts[4])?,
        packets: elem["counter"]["packets"].as_u64().unwrap_or(0),
        bytes: elem["counter"]["bytes"].as_u64().unwrap_or(0),
        verdict: verdict.into(),
    })
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn save(path: &Path, network: &HostNetwork) -> Result<(), NetError> {
    let bytes = serde_json::to_vec_pretty(network).map_err(|e| NetError::Io {
        what: "encoding the network".into(),
        source: std::io::Error::other(e),
    })?;
    crate::fsutil::write_durably(path, &bytes).map_err(|source| NetError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}
