//! `palisade vpc | subnet | sg | port`: tenant networks.

use clap::Subcommand;
use palisade_common::api;
use reqwest::Method;

use crate::{call, joined, segment, with_query, Ctx};

#[derive(Debug, Subcommand)]
pub enum VpcCmd {
    /// A new VPC: its own L2 domain, from a private block (/16 to /28).
    Create {
        name: String,
        #[arg(long)]
        cidr: String,
    },
    List {
        /// The tenant whose VPCs to list (platform operators).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a VPC that has no subnets left.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum SubnetCmd {
    /// A new subnet of a VPC (inside its block, overlapping no other).
    Create {
        vpc: String,
        name: String,
        #[arg(long)]
        cidr: String,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        id: String,
    },
    /// Delete a subnet no instance uses.
    Delete {
        id: String,
    },
    /// Replace the subnet's network ACL with the rules in FILE (a JSON list of
    /// {direction, action, protocol, port_from, port_to, cidr}; first match wins; `[]` for
    /// none).
    Acl {
        id: String,
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// A new security group: nothing in, everything out.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// A group and its rules.
    Show { id: String },
    /// Delete a group no port and no other group's rule uses.
    Delete { id: String },
    /// Allow traffic (stateful: replies pass too).
    Allow {
        group: String,
        /// ingress (to the group's ports) or egress (from them).
        #[arg(long)]
        direction: String,
        /// any, tcp, udp or icmp.
        #[arg(long)]
        protocol: String,
        /// A port or range (tcp and udp): 22, 8000-8080.
        #[arg(long)]
        ports: Option<String>,
        /// The far end as a prefix …
        #[arg(long, conflicts_with = "remote_group")]
        cidr: Option<String>,
        /// … or as the ports of one of the tenant's groups.
        #[arg(long)]
        remote_group: Option<String>,
    },
    /// Remove a rule (by its id).
    Revoke { rule: String },
}

#[derive(Debug, Subcommand)]
pub enum PortCmd {
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        id: String,
    },
    /// The port's flows of the last two minutes, and the frames its anti-spoofing dropped.
    Traffic {
        id: String,
    },
    /// Change a port's security groups or bandwidth (kbit/s, within the flavor's ceiling).
    Update {
        id: String,
        /// Replaces the port's groups; repeat for more.
        #[arg(long = "security-group", value_name = "ID")]
        security_groups: Vec<String>,
        /// Remove every group (nothing in or out).
        #[arg(long, conflicts_with = "security_groups")]
        no_security_groups: bool,
        #[arg(long)]
        ingress_kbit: Option<u32>,
        #[arg(long)]
        egress_kbit: Option<u32>,
    },
}

/// `22` or `8000-8080`.
fn port_range(text: &str) -> anyhow::Result<(u32, u32)> {
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| anyhow::anyhow!("{text:?} is not a port or a range like 8000-8080"))
    };
    Ok(match text.split_once('-') {
        Some((from, to)) => (number(from)?, number(to)?),
        None => (number(text)?, number(text)?),
    })
}

impl Ctx {
    pub(crate) async fn vpc(&self, cmd: VpcCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            VpcCmd::Create { name, cidr } => {
                let vpc: api::Vpc = client
                    .post("/v1/vpcs", &api::VpcCreate { name, cidr })
                    .await?;
                self.show_one(&vpc, |c| c.show_vpcs(std::slice::from_ref(&vpc)))
            }
            VpcCmd::List { tenant } => {
                let path = with_query("/v1/vpcs", "tenant", tenant.as_deref());
                self.show_vpcs(&client.get::<Vec<api::Vpc>>(&path).await?)
            }
            VpcCmd::Delete { id } => {
                let path = format!("/v1/vpcs/{}", segment(&id));
                call(&client, Method::DELETE, &path, None::<&()>).await?;
                println!("VPC {id} deleted");
                Ok(())
            }
        }
    }

    fn show_vpcs(&self, vpcs: &[api::Vpc]) -> anyhow::Result<()> {
        self.show(&vpcs, |t| {
            t.row(["NAME", "ID", "CIDR", "VNI", "CREATED"]);
            for v in vpcs {
                t.row([
                    v.name.clone(),
                    v.id.clone(),
                    v.cidr.clone(),
                    v.vni.to_string(),
                    v.created_at.clone(),
                ]);
            }
        })
    }

    pub(crate) async fn subnet(&self, cmd: SubnetCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            SubnetCmd::Create { vpc, name, cidr } => {
                let path = format!("/v1/vpcs/{}/subnets", segment(&vpc));
                let subnet: api::Subnet = client
                    .post(&path, &api::SubnetCreate { name, cidr })
                    .await?;
                self.show_one(&subnet, |c| c.show_subnets(std::slice::from_ref(&subnet)))
            }
            SubnetCmd::List { tenant } => {
                let path = with_query("/v1/subnets", "tenant", tenant.as_deref());
                self.show_subnets(&client.get::<Vec<api::Subnet>>(&path).await?)
            }
            SubnetCmd::Show { id } => {
                let subnet: api::Subnet =
                    client.get(&format!("/v1/subnets/{}", segment(&id))).await?;
                self.show_one(&subnet, |c| c.show_subnet(&subnet))
            }
            SubnetCmd::Delete { id } => {
                let path = format!("/v1/subnets/{}", segment(&id));
                call(&client, Method::DELETE, &path, None::<&()>).await?;
                println!("subnet {id} deleted");
                Ok(())
            }
            SubnetCmd::Acl { id, file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                let rules: Vec<api::AclRule> = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let subnet: api::Subnet = client
                    .json(
                        Method::PUT,
                        &format!("/v1/subnets/{}/acl", segment(&id)),
                        Some(&api::AclSet { rules }),
                    )
                    .await?;
                self.show_one(&subnet, |c| c.show_subnet(&subnet))
            }
        }
    }

    fn show_subnets(&self, subnets: &[api::Subnet]) -> anyhow::Result<()> {
        self.show(&subnets, |t| {
            t.row(["NAME", "ID", "VPC", "CIDR", "GATEWAY", "ACL RULES"]);
            for s in subnets {
                t.row([
                    s.name.clone(),
                    s.id.clone(),
                    s.vpc_id.clone(),
                    s.cidr.clone(),
                    s.gateway.clone(),
                    s.acl.len().to_string(),
                ]);
            }
        })
    }

    fn show_subnet(&self, subnet: &api::Subnet) -> anyhow::Result<()> {
        self.show_subnets(std::slice::from_ref(subnet))?;
        if !subnet.acl.is_empty() {
            let mut t = crate::output::Table::default();
            t.row(["#", "DIRECTION", "ACTION", "PROTOCOL", "PORTS", "CIDR"]);
            for (i, r) in subnet.acl.iter().enumerate() {
                t.row([
                    (i + 1).to_string(),
                    r.direction.clone(),
                    r.action.clone(),
                    r.protocol.clone(),
                    ports_text(r.port_from, r.port_to),
                    r.cidr.clone(),
                ]);
            }
            print!("\n{t}");
        }
        Ok(())
    }

    pub(crate) async fn sg(&self, cmd: SgCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            SgCmd::Create { name, description } => {
                let group: api::SecurityGroup = client
                    .post(
                        "/v1/security-groups",
                        &api::SecurityGroupCreate { name, description },
                    )
                    .await?;
                self.show_one(&group, |c| c.show_group(&group))
            }
            SgCmd::List { tenant } => {
                let path = with_query("/v1/security-groups", "tenant", tenant.as_deref());
                let groups: Vec<api::SecurityGroup> = client.get(&path).await?;
                self.show(&groups, |t| {
                    t.row(["NAME", "ID", "RULES", "DESCRIPTION"]);
                    for g in &groups {
                        t.row([
                            g.name.clone(),
                            g.id.clone(),
                            g.rules.len().to_string(),
                            g.description.clone(),
                        ]);
                    }
                })
            }
            SgCmd::Show { id } => {
                let group: api::SecurityGroup = client
                    .get(&format!("/v1/security-groups/{}", segment(&id)))
                    .await?;
                self.show_one(&group, |c| c.show_group(&group))
            }
            SgCmd::Delete { id } => {
                let path = format!("/v1/security-groups/{}", segment(&id));
                call(&client, Method::DELETE, &path, None::<&()>).await?;
                println!("security group {id} deleted");
                Ok(())
            }
            SgCmd::Allow {
                group,
                direction,
                protocol,
                ports,
                cidr,
                remote_group,
            } => {
                let (port_from, port_to) = match ports.as_deref().map(port_range).transpose()? {
                    Some((from, to)) => (Some(from), Some(to)),
                    None => (None, None),
                };
                let rule: api::SecurityGroupRule = client
                    .post(
                        &format!("/v1/security-groups/{}/rules", segment(&group)),
                        &api::SecurityGroupRuleCreate {
                            direction,
                            protocol,
                            port_from,
                            port_to,
                            cidr,
                            remote_group,
                        },
                    )
                    .await?;
                self.show_one(&rule, |_| {
                    println!("rule {} added", rule.id);
                    Ok(())
                })
            }
            SgCmd::Revoke { rule } => {
                let path = format!("/v1/security-group-rules/{}", segment(&rule));
                call(&client, Method::DELETE, &path, None::<&()>).await?;
                println!("rule {rule} removed");
                Ok(())
            }
        }
    }

    fn show_group(&self, group: &api::SecurityGroup) -> anyhow::Result<()> {
        println!("{} ({})", group.name, group.id);
        self.show(&group.rules, |t| {
            t.row(["RULE", "DIRECTION", "PROTOCOL", "PORTS", "FAR END"]);
            for r in &group.rules {
                let far = match (&r.cidr, &r.remote_group) {
                    (Some(cidr), _) => cidr.clone(),
                    (None, Some(g)) => format!("group {g}"),
                    (None, None) => "-".into(),
                };
                t.row([
                    r.id.clone(),
                    r.direction.clone(),
                    r.protocol.clone(),
                    ports_text(r.port_from, r.port_to),
                    far,
                ]);
            }
        })
    }

    pub(crate) async fn port(&self, cmd: PortCmd) -> anyhow::Result<()> {
        let client = self.signed()?;
        match cmd {
            PortCmd::List { tenant } => {
                let path = with_query("/v1/ports", "tenant", tenant.as_deref());
                self.show_ports(&client.get::<Vec<api::Port>>(&path).await?)
            }
            PortCmd::Show { id } => {
                let port: api::Port = client.get(&format!("/v1/ports/{}", segment(&id))).await?;
                self.show_one(&port, |c| c.show_ports(std::slice::from_ref(&port)))
            }
            PortCmd::Traffic { id } => {
                let traffic: palisade_common::agent_api::PortTraffic = client
                    .get(&format!("/v1/ports/{}/traffic", segment(&id)))
                    .await?;
                self.show_one(&traffic, |c| {
                    println!(
                        "spoofed frames dropped: {}, IPv6 frames dropped: {}",
                        traffic.spoofed_frames, traffic.ipv6_frames
                    );
                    c.show(&traffic.flows, |t| {
                        t.row([
                            "VERDICT",
                            "PROTO",
                            "SOURCE",
                            "DESTINATION",
                            "PACKETS",
                            "BYTES",
                        ]);
                        for f in &traffic.flows {
                            t.row([
                                f.verdict.clone(),
                                f.protocol.clone(),
                                format!("{}:{}", f.src, f.sport),
                                format!("{}:{}", f.dst, f.dport),
                                f.packets.to_string(),
                                f.bytes.to_string(),
                            ]);
                        }
                    })
                })
            }
            PortCmd::Update {
                id,
                security_groups,
                no_security_groups,
                ingress_kbit,
                egress_kbit,
            } => {
                let groups = if no_security_groups {
                    Some(Vec::new())
                } else if security_groups.is_empty() {
                    None
                } else {
                    Some(security_groups)
                };
                let port: api::Port = client
                    .json(
                        Method::PATCH,
                        &format!("/v1/ports/{}", segment(&id)),
                        Some(&api::PortUpdate {
                            security_groups: groups,
                            ingress_kbit,
                            egress_kbit,
                        }),
                    )
                    .await?;
                self.show_one(&port, |c| c.show_ports(std::slice::from_ref(&port)))
            }
        }
    }

    fn show_ports(&self, ports: &[api::Port]) -> anyhow::Result<()> {
        self.show(&ports, |t| {
            t.row([
                "ID", "INSTANCE", "IP", "MAC", "GROUPS", "IN KBIT", "OUT KBIT",
            ]);
            for p in ports {
                t.row([
                    p.id.clone(),
                    p.instance_id.clone(),
                    p.ip.clone(),
                    p.mac.clone(),
                    joined(p.security_groups.iter()),
                    p.ingress_kbit.to_string(),
                    p.egress_kbit.to_string(),
                ]);
            }
        })
    }
}

fn ports_text(from: Option<u32>, to: Option<u32>) -> String {
    match (from, to) {
        (Some(f), Some(t)) if f == t => f.to_string(),
        (Some(f), Some(t)) => format!("{f}-{t}"),
        _ => "all".into(),
    }
}
