//! Calls the controller makes to addresses tenants choose (alert webhooks, identity
//! providers): public HTTPS only, checked at every use, no redirects — unless the operator
//! allows private endpoints (on-premises receivers and providers, tests).

use std::net::IpAddr;
use std::time::Duration;

/// Where outbound calls may go: public HTTPS endpoints, or with `allow_private` (an operator's
/// choice) also loopback, private addresses and plain HTTP.
#[derive(Debug, Clone, Copy)]
pub struct OutboundPolicy {
    pub allow_private: bool,
}

/// A URL that passed [`check_url`], with the addresses its host resolved to then: the client
/// from [`client_for`] connects to exactly those (no second lookup a DNS rebinding could turn).
pub struct Checked {
    pub url: reqwest::Url,
    host: String,
    addresses: Vec<std::net::SocketAddr>,
}

/// Checks an outbound URL against the policy: scheme, and every address its host resolves to.
pub async fn check(url: &str, policy: OutboundPolicy) -> anyhow::Result<Checked> {
    let parsed = reqwest::Url::parse(url)?;
    match parsed.scheme() {
        "https" => {}
        "http" if policy.allow_private => {}
        _ => anyhow::bail!("the URL must be https"),
    }
    anyhow::ensure!(
        parsed.username().is_empty() && parsed.password().is_none(),
        "the URL must carry no credentials"
    );
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("the URL has no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .collect();
    anyhow::ensure!(!addresses.is_empty(), "the host does not resolve");
    if !policy.allow_private {
        for address in &addresses {
            let ip = address.ip();
            anyhow::ensure!(is_public(&ip), "{ip} is not a public address");
        }
    }
    Ok(Checked {
        url: parsed,
        host,
        addresses,
    })
}

/// [`check`], for callers that only need the verdict and the normalized URL.
pub async fn check_url(url: &str, policy: OutboundPolicy) -> anyhow::Result<reqwest::Url> {
    Ok(check(url, policy).await?.url)
}

/// Not loopback, private, link-local, unspecified, multicast, documentation, benchmarking,
/// reserved or shared space, nor an IPv6 address that embeds or routes to such an IPv4 address
/// (IPv4-mapped or -compatible, NAT64, 6to4, Teredo): the platform's own networks stay
/// unreachable through URLs tenants set.
fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && c == 0)
                || (a == 192 && b == 88 && c == 99)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(&IpAddr::V4(v4));
            }
            // ::a.b.c.d (IPv4-compatible) and 64:ff9b::a.b.c.d (NAT64) carry an IPv4 address.
            if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return !v6.is_loopback()
                    && !v6.is_unspecified()
                    && is_public(&embedded(seg[6], seg[7]));
            }
            // 6to4 (2002::/16) routes to the IPv4 address in its next 32 bits.
            if seg[0] == 0x2002 {
                return is_public(&embedded(seg[1], seg[2]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (seg[0] == 0x2001 && seg[1] == 0) // Teredo
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || seg[0] == 0x0100) // discard-only
        }
    }
}

/// The HTTP client for one checked URL: the host's trust store, no redirects, a 10 s timeout,
/// and connections only to the addresses the check saw.
pub fn client_for(checked: &Checked) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(palisade_common::tls::public_client_config()?)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .resolve_to_addrs(&checked.host, &checked.addresses)
        .build()?)
}

/// Checks `url` and fetches it with a client pinned to what the check resolved.
pub async fn get(url: &str, policy: OutboundPolicy) -> anyhow::Result<reqwest::Response> {
    let checked = check(url, policy).await?;
    Ok(client_for(&checked)?
        .get(checked.url.clone())
        .send()
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_count_as_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "::a9fe:a9fe",
            "::127.0.0.1",
            "fec0::1",
            "2001::1",
            "2001:db8::1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(!is_public(&ip), "{private}");
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(&ip), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_before_use() {
        let strict = OutboundPolicy {
            allow_private: false,
        };
        for bad in [
            "http://93.184.216.34/hook",
            "https://127.0.0.1/hook",
            "https://169.254.169.254/latest",
            "https://user:pw@93.184.216.34/",
            "ftp://93.184.216.34/",
            "https://[::1]/hook",
            "not a url",
        ] {
            assert!(check_url(bad, strict).await.is_err(), "{bad}");
        }
        assert!(check_url("https://93.184.216.34/hook", strict)
            .await
            .is_ok());
        let lenient = OutboundPolicy {
            allow_private: true,
        };
        assert!(check_url("http://127.0.0.1:9/hook", lenient).await.is_ok());
    }
}
