//! The DHCP server of a VPC's router: it answers only the MACs the platform gave the VPC's
//! ports, each with its own fixed address; anything else is ignored. Guests cannot answer
//! for it (anti-spoofing drops DHCP server replies from ports).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, RwLock};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tracing::{debug, warn};

/// Leases last a day; the address never changes while the port lives.
const LEASE_SECS: u32 = 86_400;

/// What one port is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

pub type Leases = Arc<RwLock<HashMap<[u8; 6], Lease>>>;

/// The answer to one request, if it gets one.
pub fn answer(request: &[u8], leases: &HashMap<[u8; 6], Lease>) -> Option<Vec<u8>> {
    let msg = Message::decode(&mut Decoder::new(request)).ok()?;
    if msg.opcode() != Opcode::BootRequest || msg.chaddr().len() < 6 {
        return None;
    }
    let mac: [u8; 6] = msg.chaddr()[..6].try_into().ok()?;
    let lease = leases.get(&mac)?;
    let kind = match msg.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            let asked = match msg.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => msg.ciaddr(),
            };
            if asked == lease.ip {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        _ => return None,
    };
    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_xid(msg.xid())
        .set_flags(msg.flags())
        .set_chaddr(msg.chaddr())
        .set_siaddr(lease.gateway);
    if kind != MessageType::Nak {
        reply.set_yiaddr(lease.ip);
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.gateway));
    if kind != MessageType::Nak {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(lease.prefix_len))
            .unwrap_or(0);
        opts.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::from(mask)));
        opts.insert(DhcpOption::Router(vec![lease.gateway]));
    }
    let mut out = Vec::new();
    reply.encode(&mut Encoder::new(&mut out)).ok()?;
    Some(out)
}

/// A UDP socket bound to `bind` on `device`, made inside the network namespace at `netns`
/// (by a short-lived thread that enters it, so the agent's own threads stay where they are).
pub fn socket_in(
    netns: &Path,
    bind: SocketAddrV4,
    device: &str,
) -> io::Result<std::net::UdpSocket> {
    let netns = netns.to_path_buf();
    let device = device.to_string();
    std::thread::spawn(move || -> io::Result<std::net::UdpSocket> {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let socket = std::net::UdpSocket::bind(bind)?;
        crate::net::bind_to_device(&socket, &device)?;
        socket.set_broadcast(true)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Serves until the task is aborted (its VPC is gone).
pub async fn serve(socket: std::net::UdpSocket, leases: Leases, vpc: String) {
    let socket = match tokio::net::UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            warn!(%vpc, error = %e, "DHCP socket");
            return;
        }
    };
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                warn!(%vpc, error = %e, "DHCP receive");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let reply = {
            let leases = leases.read().unwrap_or_else(|p| p.into_inner());
            answer(&buf[..n], &leases)
        };
        let Some(reply) = reply else {
            debug!(%vpc, %from, "DHCP request not answered");
            continue;
        };
        let to = SocketAddr::from((Ipv4Addr::BROADCAST, 68));
        if let Err(e) = socket.send_to(&reply, to).await {
            warn!(%vpc, error = %e, "DHCP reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: MessageType, mac: [u8; 6], asked: Option<Ipv4Addr>) -> Vec<u8> {
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootRequest)
            .set_xid(0x1234)
            .set_chaddr(&mac);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(ip) = asked {
            msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        let mut out = Vec::new();
        msg.encode(&mut Encoder::new(&mut out)).unwrap();
        out
    }

    fn decoded(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    #[test]
    fn known_macs_get_their_address_others_nothing() {
        let mac = [2, 1, 2, 3, 4, 5];
        let lease = Lease {
            ip: "10.1.1.4".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.1.1.1".parse().unwrap(),
        };
        let leases = HashMap::from([(mac, lease.clone())]);
        let offer = decoded(&answer(&request(MessageType::Discover, mac, None), &leases).unwrap());
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), lease.ip);
        assert_eq!(offer.xid(), 0x1234);
        assert_eq!(
            offer.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask("255.255.255.0".parse().unwrap()))
        );
        assert_eq!(
            offer.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![lease.gateway]))
        );
        let ack =
            decoded(&answer(&request(MessageType::Request, mac, Some(lease.ip)), &leases).unwrap());
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        let other: Ipv4Addr = "10.1.1.9".parse().unwrap();
        let nak =
            decoded(&answer(&request(MessageType::Request, mac, Some(other)), &leases).unwrap());
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(answer(
            &request(MessageType::Discover, [2, 9, 9, 9, 9, 9], None),
            &leases
        )
        .is_none());
        assert!(answer(b"garbage", &leases).is_none());
    }
}
