//! Which peers an allocation may relay to (RFC 8656 §21.2, and coturn's
//! defaults after CVE-2020-26262).
//!
//! By default the relay refuses (403) peers in loopback, RFC 1918, link-local,
//! CGNAT, multicast, reserved, `0.0.0.0/8`, `::`, `::1`, `fc00::/7`,
//! `fe80::/10`, `ff00::/8` and NAT64 ranges, and the relay's own service
//! ports; an allow-list (`allowed_peer_ip`) overrides all of that, and
//! operators add ranges with `denied_peer_ip`. Allowing loopback peers
//! (all-in-one on localhost) does not open the service ports. IPv4-mapped IPv6 addresses are
//! judged as the IPv4 address they carry, so `::ffff:127.0.0.1` is loopback.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// An inclusive range of addresses of one family, written as `IP`,
/// `IP/PREFIX` or `IP1-IP2` (coturn's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    v6: bool,
    first: u128,
    last: u128,
}

/// Why a range does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an IP, IP/PREFIX or IP1-IP2 range")]
pub struct BadRange(pub String);

fn to_bits(ip: IpAddr) -> (bool, u128) {
    match canonical(ip) {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, bits) = to_bits(ip);
        v6 == self.v6 && (self.first..=self.last).contains(&bits)
    }

    fn cidr(ip: IpAddr, prefix: u32) -> Option<Self> {
        let (v6, bits) = to_bits(ip);
        let width = if v6 { 128 } else { 32 };
        if prefix > width {
            return None;
        }
        let host_bits = width - prefix;
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        Some(Self {
            v6,
            first: bits & !host_mask,
            last: bits | host_mask,
        })
    }
}

impl FromStr for IpRange {
    type Err = BadRange;

    fn from_str(text: &str) -> Result<Self, BadRange> {
        let bad = || BadRange(text.to_string());
        let text = text.trim();
        if let Some((ip, prefix)) = text.split_once('/') {
            let ip: IpAddr = ip.trim().parse().map_err(|_| bad())?;
            let prefix: u32 = prefix.trim().parse().map_err(|_| bad())?;
            return Self::cidr(ip, prefix).ok_or_else(bad);
        }
        if let Some((a, b)) = text.split_once('-') {
            let (a, b): (IpAddr, IpAddr) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            let ((v6a, first), (v6b, last)) = (to_bits(a), to_bits(b));
            if v6a != v6b || first > last {
                return Err(bad());
            }
            return Ok(Self { v6: v6a, first, last });
        }
        let ip: IpAddr = text.parse().map_err(|_| bad())?;
        let (v6, bits) = to_bits(ip);
        Ok(Self {
            v6,
            first: bits,
            last: bits,
        })
    }
}

/// The ranges denied unless allow-listed.
pub const DEFAULT_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Why a peer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// In a denied range.
    DeniedRange,
    /// One of the server's own service ports.
    ServicePort,
}

/// The peer-address policy of one relay.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    denied: Vec<IpRange>,
    allowed: Vec<IpRange>,
    /// The server's own listeners (TURN, HTTP): peers may not reach them.
    services: Vec<SocketAddr>,
    /// IPs of this server besides the listeners' (relay and external IPs).
    own_ips: Vec<IpAddr>,
    /// Loopback peers allowed (still not the service ports).
    loopback: bool,
}

impl PeerPolicy {
    /// The defaults plus `denied`, overridden by `allowed`.
    pub fn new(denied: &[IpRange], allowed: &[IpRange]) -> Self {
        let mut all: Vec<IpRange> = DEFAULT_DENIED.iter().filter_map(|r| r.parse().ok()).collect();
        all.extend_from_slice(denied);
        Self {
            denied: all,
            allowed: allowed.to_vec(),
            services: Vec::new(),
            own_ips: Vec::new(),
            loopback: false,
        }
    }

    /// Allows loopback peers (all-in-one on localhost), except the service ports.
    pub fn allow_loopback(&mut self) {
        self.loopback = true;
    }

    /// Registers one of the server's own listeners.
    pub fn add_service(&mut self, addr: SocketAddr) {
        self.services.push(addr);
    }

    /// Registers an IP the server owns (relay IP, external IP).
    pub fn add_own_ip(&mut self, ip: IpAddr) {
        self.own_ips.push(canonical(ip));
    }

    fn is_own(&self, ip: IpAddr, service: IpAddr) -> bool {
        ip == canonical(service) || service.is_unspecified() || ip.is_loopback() || self.own_ips.contains(&ip)
    }

    /// Whether `peer` may be relayed to.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denial> {
        let ip = canonical(peer.ip());
        if self.allowed.iter().any(|r| r.contains(ip)) {
            return Ok(());
        }
        if self
            .services
            .iter()
            .any(|s| s.port() == peer.port() && self.is_own(ip, s.ip()))
        {
            return Err(Denial::ServicePort);
        }
        if self.loopback && ip.is_loopback() {
            return Ok(());
        }
        if self.denied.iter().any(|r| r.contains(ip)) {
            return Err(Denial::DeniedRange);
        }
        Ok(())
    }
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self::new(&[], &[])
    }
}

/// Parses a list of ranges, naming the first bad one.
pub fn parse_ranges(texts: &[String]) -> Result<Vec<IpRange>, BadRange> {
    texts.iter().map(|t| t.parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn defaults_deny_the_cve_2020_26262_ranges() {
        let policy = PeerPolicy::default();
        for denied in [
            "127.0.0.1:80",
            "0.0.0.0:80",
            "0.1.2.3:80",
            "10.1.2.3:80",
            "172.31.255.255:80",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "224.0.0.251:5353",
            "255.255.255.255:9",
            "[::1]:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:10.0.0.1]:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "[ff02::1]:80",
            "[64:ff9b::a00:1]:80",
        ] {
            assert_eq!(policy.check(addr(denied)), Err(Denial::DeniedRange), "{denied}");
        }
        for allowed in ["8.8.8.8:53", "100.128.0.1:9", "172.32.0.1:9", "[2001:db8::1]:9"] {
            assert_eq!(policy.check(addr(allowed)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn allow_list_overrides_and_service_ports_are_refused() {
        let mut policy = PeerPolicy::new(
            &["8.8.4.0/24".parse().expect("range")],
            &["10.0.0.5-10.0.0.9".parse().expect("range")],
        );
        assert_eq!(policy.check(addr("10.0.0.7:1")), Ok(()));
        assert!(policy.check(addr("10.0.0.10:1")).is_err());
        assert!(policy.check(addr("8.8.4.4:1")).is_err());
        policy.add_own_ip("203.0.113.5".parse().expect("ip"));
        policy.add_service(addr("0.0.0.0:3478"));
        assert_eq!(policy.check(addr("203.0.113.5:3478")), Err(Denial::ServicePort));
        assert_eq!(policy.check(addr("203.0.113.5:3479")), Ok(()));
        policy.add_service(addr("127.0.0.1:8008"));
        assert_eq!(policy.check(addr("127.0.0.1:9")), Err(Denial::DeniedRange));
        policy.allow_loopback();
        assert_eq!(policy.check(addr("127.0.0.1:9")), Ok(()));
        assert_eq!(policy.check(addr("[::1]:9")), Ok(()));
        assert_eq!(policy.check(addr("127.0.0.2:9")), Ok(()));
        // Loopback allowed, yet not the server's own ports (on any of its addresses).
        assert_eq!(policy.check(addr("127.0.0.1:8008")), Err(Denial::ServicePort));
        assert_eq!(policy.check(addr("127.0.0.1:3478")), Err(Denial::ServicePort));
        assert_eq!(policy.check(addr("10.0.0.1:9")), Err(Denial::DeniedRange));
    }

    #[test]
    fn range_syntax() {
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("10.0.0.9-10.0.0.1".parse::<IpRange>().is_err());
        assert!("10.0.0.1-::1".parse::<IpRange>().is_err());
        assert!("nonsense".parse::<IpRange>().is_err());
        let all: IpRange = "::/0".parse().expect("range");
        assert!(all.contains("2001:db8::1".parse().expect("ip")));
        assert!(!all.contains("1.2.3.4".parse().expect("ip")));
    }
}
