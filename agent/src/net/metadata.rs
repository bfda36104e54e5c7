//! The metadata service of a VPC's router, at 169.254.169.254:80, in the form cloud-init's
//! EC2 data source reads (IMDSv2: a session token first, by PUT).
//!
//! Who asks is known by the connection's source address alone: anti-spoofing pins each port's
//! address, and the service listens inside one VPC's router, so (VPC, address) names exactly
//! one port. No request header can change the answer. Every reply leaves with an IP TTL of 2,
//! so a token cannot be carried further than a guest (or one container hop inside it).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use sha2::{Digest, Sha256};

/// The IP TTL of every answer.
pub const HOP_LIMIT: u32 = 2;
/// Longest session a token may ask for (as EC2: six hours).
const MAX_TOKEN_SECS: u64 = 21_600;

/// What the service says about one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMeta {
    pub instance_id: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

pub type Guests = Arc<RwLock<HashMap<Ipv4Addr, GuestMeta>>>;

#[derive(Clone)]
struct Service {
    guests: Guests,
    /// Keys the tokens; random per agent start (tokens do not outlive the agent).
    key: Arc<[u8; 32]>,
}

/// A TCP listener on `bind`, made inside the network namespace at `netns`, whose accepted
/// connections answer with an IP TTL of [`HOP_LIMIT`] (inherited from the listener).
pub fn listener_in(netns: &Path, bind: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> io::Result<std::net::TcpListener> {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let listener = std::net::TcpListener::bind(bind)?;
        listener.set_ttl(HOP_LIMIT)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Serves until the task is aborted (its VPC is gone).
pub async fn serve(listener: std::net::TcpListener, guests: Guests, vpc: String) {
    let mut key = [0u8; 32];
    if getrandom_fill(&mut key).is_err() {
        tracing::error!(%vpc, "no randomness for the metadata service's token key");
        return;
    }
    let service = Service {
        guests,
        key: Arc::new(key),
    };
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .route("/", get(|| async { "latest\n" }))
        .route("/latest", get(|| async { "meta-data/\n" }))
        .route("/latest/", get(|| async { "meta-data/\n" }))
        .route("/latest/meta-data", get(index))
        .route("/latest/meta-data/", get(index))
        .route("/latest/meta-data/{item}", get(item))
        .with_state(service)
        .into_make_service_with_connect_info::<SocketAddr>();
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%vpc, error = %e, "metadata listener");
            return;
        }
    };
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(%vpc, error = %e, "metadata service stopped");
    }
}

fn getrandom_fill(buf: &mut [u8]) -> io::Result<()> {
    let mut file = std::fs::File::open("/dev/urandom")?;
    io::Read::read_exact(&mut file, buf)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `<expiry>.<hex of SHA-256(key, expiry, address)>`: bound to the asking address.
fn make_token(key: &[u8; 32], ip: Ipv4Addr, expires: u64) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(expires.to_be_bytes());
    h.update(ip.octets());
    format!("{expires}.{}", hex::encode(h.finalize()))
}

fn token_valid(key: &[u8; 32], ip: Ipv4Addr, token: &str) -> bool {
    let Some((expires, _)) = token.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    let expected = make_token(key, ip, expires);
    expires >= now_secs()
        && expected.len() == token.len()
        && expected
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn refused(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// The asking guest, by its connection's source address only.
fn asker(service: &Service, peer: SocketAddr) -> Option<GuestMeta> {
    let SocketAddr::V4(peer) = peer else {
        return None;
    };
    service
        .guests
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(peer.ip())
        .cloned()
}

async fn token(
    State(service): State<Service>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    // A request relayed by a proxy in the guest is not the guest asking.
    if headers.contains_key("x-forwarded-for") {
        return refused(StatusCode::FORBIDDEN, "forbidden\n");
    }
    let Some(guest) = asker(&service, peer) else {
        return refused(StatusCode::NOT_FOUND, "not found\n");
    };
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| (1..=MAX_TOKEN_SECS).contains(t));
    let Some(ttl) = ttl else {
        return refused(
            StatusCode::BAD_REQUEST,
            "X-aws-ec2-metadata-token-ttl-seconds: 1 to 21600\n",
        );
    };
    make_token(&service.key, guest.ip, now_secs() + ttl).into_response()
}

type Refusal = (StatusCode, &'static str);

fn authorized(
    service: &Service,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<GuestMeta, Refusal> {
    let guest = asker(service, peer).ok_or((StatusCode::NOT_FOUND, "not found\n"))?;
    let token = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !token_valid(&service.key, guest.ip, token) {
        return Err((StatusCode::UNAUTHORIZED, "unauthorized\n"));
    }
    Ok(guest)
}

const ITEMS: &[&str] = &[
    "instance-id",
    "local-ipv4",
    "mac",
    "hostname",
    "local-hostname",
];

async fn index(
    State(service): State<Service>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match authorized(&service, peer, &headers) {
        Ok(_) => format!("{}\n", ITEMS.join("\n")).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn item(
    State(service): State<Service>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(item): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let guest = match authorized(&service, peer, &headers) {
        Ok(g) => g,
        Err(r) => return r.into_response(),
    };
    match item.as_str() {
        "instance-id" => guest.instance_id.into_response(),
        "local-ipv4" => guest.ip.to_string().into_response(),
        "mac" => guest.mac.into_response(),
        "hostname" | "local-hostname" => format!("i-{}", &guest.instance_id).into_response(),
        _ => refused(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_the_address_and_expire() {
        let key = [7u8; 32];
        let ip: Ipv4Addr = "10.1.1.4".parse().unwrap();
        let token = make_token(&key, ip, now_secs() + 60);
        assert!(token_valid(&key, ip, &token));
        assert!(!token_valid(&key, "10.1.1.5".parse().unwrap(), &token));
        assert!(!token_valid(&[8u8; 32], ip, &token));
        assert!(!token_valid(
            &key,
            ip,
            &make_token(&key, ip, now_secs() - 1)
        ));
        assert!(!token_valid(&key, ip, "garbage"));
        assert!(!token_valid(&key, ip, ""));
    }
}
