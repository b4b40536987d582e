//! Per-peer limits on the API address: how many connections one source address may hold open
//! (`max_connections_per_peer`) and how many requests per second it may make
//! (`peer_requests_per_second`, a GCRA quota kept in this process), whatever tenant it sends
//! them as. They matter most where tenants are anonymous or shared: a tenant's quota is spent
//! by all its clients together, and without these one client could spend it for everyone.
//!
//! The peer is the connection's source address. A connection from a `trusted_proxies` address
//! is a proxy's: it is not counted against the connection cap (it carries many clients), and
//! each of its requests is charged to the client named in `X-Forwarded-For`, the rightmost
//! address there that is not itself a trusted proxy ([`client_address`]). An untrusted peer's
//! `X-Forwarded-For` is ignored, so a client cannot pick whose quota it spends. An IPv6 peer is
//! counted by its /64 (one host's usual allocation, which it can fill with addresses at will).
//!
//! The state is bounded: one entry per peer that holds a connection or has spent part of its
//! burst, at most [`MAX_PEERS`]; a full table first drops the entries that carry nothing (no
//! connection, quota full again), then, if still three-quarters full, forgets every rate
//! entry of a peer with no connection open (such a peer gets a fresh burst; only a client with
//! tens of thousands of addresses can cause that, and it has their bursts anyway).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use serde::Deserialize;

use super::ratelimit::{gcra_reserve, monotonic_clock, Clock, Decision, Quota};

/// The most peers whose state is kept at once (about 40 bytes each: ~3 MiB when full).
pub const MAX_PEERS: usize = 1 << 16;

/// An address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (all of its bits).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or a CIDR range"))?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `address` is in the range (an IPv4-mapped IPv6 address as its IPv4 one).
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                prefix_eq(u32::from(net).into(), u32::from(a).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                prefix_eq(u128::from(net), u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = bits - u32::from(prefix);
    (a >> shift) == (b >> shift)
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The key a peer's limits are kept under: an IPv4 address, or an IPv6 address's /64.
pub fn peer_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// An `X-Forwarded-For` entry: an address, or an address with a port (`a.b.c.d:p`, `[x::y]:p`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(|a| a.to_canonical())
}

/// The client a request is charged to: `peer` itself unless it is a trusted proxy; then the
/// rightmost `X-Forwarded-For` address (all such headers, in order) that is not trusted, or the
/// leftmost one when every one is trusted. An entry that is not an address ends the walk (the
/// client is the last trusted hop read): what a client wrote left of its own address never
/// counts.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |a: IpAddr| trusted.iter().any(|c| c.contains(a));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    for value in values.iter().rev() {
        let Ok(value) = std::str::from_utf8(value) else {
            return client;
        };
        for entry in value.rsplit(',') {
            match forwarded_address(entry) {
                Some(address) if is_trusted(address) => client = address,
                Some(address) => return address,
                None => return client,
            }
        }
    }
    client
}

/// The per-peer settings (from the serve config).
#[derive(Debug, Clone, Default)]
pub struct PeerLimits {
    /// Connections one peer may hold open (0: no cap).
    pub max_connections: u32,
    /// Requests per second one client may make, and their burst (`None`: no limit).
    pub requests: Option<Quota>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
}

/// What a peer's entry holds.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    connections: u32,
    /// The GCRA's theoretical arrival time, in the clock's microseconds (0: quota full).
    tat: f64,
}

/// The per-peer state.
pub struct Peers {
    limits: PeerLimits,
    clock: Clock,
    max_peers: usize,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// Why a request was refused: how long until one more fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimited {
    pub retry_after: Duration,
}

impl Peers {
    pub fn new(limits: PeerLimits) -> Peers {
        Peers::with(limits, monotonic_clock(), MAX_PEERS)
    }

    /// With its clock and table size given (tests).
    pub fn with(limits: PeerLimits, clock: Clock, max_peers: usize) -> Peers {
        Peers {
            limits,
            clock,
            max_peers: max_peers.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> &PeerLimits {
        &self.limits
    }

    /// Entries held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        // A map of plain numbers: valid after any panic in another holder.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key`'s entry, making room for it first when the table is full.
    fn entry<'a>(
        &self,
        table: &'a mut HashMap<IpAddr, Entry>,
        key: IpAddr,
        now: f64,
    ) -> &'a mut Entry {
        if !table.contains_key(&key) && table.len() >= self.max_peers {
            table.retain(|_, e| e.connections > 0 || e.tat > now);
            if table.len() * 4 >= self.max_peers * 3 {
                table.retain(|_, e| e.connections > 0);
            }
        }
        table.entry(key).or_default()
    }

    /// A new connection from `peer`: its place in the peer's count (given back on drop), or
    /// `None` when the peer already holds `max_connections`. A trusted proxy's connections are
    /// not counted.
    pub fn connect(self: &Arc<Self>, peer: IpAddr) -> Option<PeerConnection> {
        let cap = self.limits.max_connections;
        if cap == 0 || self.limits.trusted_proxies.iter().any(|c| c.contains(peer)) {
            return Some(PeerConnection {
                peers: self.clone(),
                key: None,
            });
        }
        let key = peer_key(peer);
        let now = (self.clock)();
        let mut table = self.lock();
        let entry = self.entry(&mut table, key, now);
        if entry.connections >= cap {
            return None;
        }
        entry.connections += 1;
        Some(PeerConnection {
            peers: self.clone(),
            key: Some(key),
        })
    }

    /// One request from `client` (see [`client_address`]): `Err` with the wait when its rate
    /// is spent.
    pub fn request(&self, client: IpAddr) -> Result<(), PeerLimited> {
        let Some(quota) = self.limits.requests else {
            return Ok(());
        };
        let key = peer_key(client);
        let now = (self.clock)();
        let mut table = self.lock();
        let entry = self.entry(&mut table, key, now);
        let tat = (entry.tat > 0.0).then_some(entry.tat);
        match gcra_reserve(quota, tat, now, 1) {
            (_, Some(new_tat)) => {
                entry.tat = new_tat;
                Ok(())
            }
            (Decision::Limited { retry_after, .. }, None) => {
                let entry = *entry;
                if entry.connections == 0 && entry.tat <= now {
                    table.remove(&key);
                }
                Err(PeerLimited {
                    // A cost of one never exceeds a burst of at least one.
                    retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
                })
            }
            (Decision::Allowed { .. }, None) => Ok(()),
        }
    }

    fn disconnect(&self, key: IpAddr) {
        let now = (self.clock)();
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(&key) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 && entry.tat <= now {
                table.remove(&key);
            }
        }
    }
}

/// One connection's place in its peer's count.
pub struct PeerConnection {
    peers: Arc<Peers>,
    /// `None`: not counted (no cap, or a trusted proxy).
    key: Option<IpAddr>,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.peers.disconnect(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn manual_clock() -> (Clock, Arc<Mutex<f64>>) {
        let now = Arc::new(Mutex::new(1.0));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    #[test]
    fn cidr_ranges_contain_exactly_their_addresses() {
        let ten = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains(ip("10.255.0.1")));
        assert!(!ten.contains(ip("11.0.0.1")));
        // An IPv4-mapped IPv6 peer is its IPv4 address.
        assert!(ten.contains(ip("::ffff:10.1.2.3")));
        let one = Cidr::parse("192.168.1.7").unwrap();
        assert!(one.contains(ip("192.168.1.7")));
        assert!(!one.contains(ip("192.168.1.8")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fdff::1")));
        assert!(!v6.contains(ip("fe00::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address_and_only_behind_a_trusted_peer() {
        let trusted = [
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("fd00::/8").unwrap(),
        ];
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_address(ip("203.0.113.9"), &xff(&["198.51.100.1"]), &trusted),
            ip("203.0.113.9")
        );
        // Behind two proxies; the client forged an entry on the left, which never counts.
        let headers = xff(&["1.1.1.1, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(
            client_address(ip("10.0.0.3"), &headers, &trusted),
            ip("198.51.100.7")
        );
        // With a port, and IPv6.
        assert_eq!(
            client_address(ip("10.0.0.3"), &xff(&["[2001:db8::5]:443"]), &trusted),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_address(ip("10.0.0.3"), &xff(&["198.51.100.7:1234"]), &trusted),
            ip("198.51.100.7")
        );
        // All trusted: the leftmost. None: the proxy itself. Garbage: the last trusted hop.
        assert_eq!(
            client_address(ip("10.0.0.3"), &xff(&["10.9.9.9, 10.0.0.2"]), &trusted),
            ip("10.9.9.9")
        );
        assert_eq!(
            client_address(ip("10.0.0.3"), &HeaderMap::new(), &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_address(
                ip("10.0.0.3"),
                &xff(&["1.2.3.4, bogus, 10.0.0.2"]),
                &trusted
            ),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn ipv6_peers_share_their_64() {
        assert_eq!(peer_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(peer_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn a_peer_holds_at_most_its_connections_and_a_trusted_proxy_any_number() {
        let peers = Arc::new(Peers::new(PeerLimits {
            max_connections: 2,
            requests: None,
            trusted_proxies: vec![Cidr::parse("10.0.0.1").unwrap()],
        }));
        let a = peers.connect(ip("192.0.2.1")).unwrap();
        let b = peers.connect(ip("192.0.2.1")).unwrap();
        assert!(peers.connect(ip("192.0.2.1")).is_none());
        // Another peer, and the same /64 counted as one.
        let _other = peers.connect(ip("192.0.2.2")).unwrap();
        let _v6a = peers.connect(ip("2001:db8::1")).unwrap();
        let _v6b = peers.connect(ip("2001:db8::2")).unwrap();
        assert!(peers.connect(ip("2001:db8::3")).is_none());
        let proxied: Vec<_> = (0..5)
            .map(|_| peers.connect(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(peers.len(), 3);
        drop(a);
        let c = peers.connect(ip("192.0.2.1")).unwrap();
        drop((b, c, proxied));
        // A peer with no connection and no spent quota holds no entry.
        assert_eq!(peers.len(), 2);
    }

    #[test]
    fn a_peer_rate_admits_its_burst_then_waits_one_period() {
        let (clock, now) = manual_clock();
        let peers = Peers::with(
            PeerLimits {
                max_connections: 0,
                requests: Some(Quota {
                    per_second: 2.0,
                    burst: 3,
                }),
                trusted_proxies: Vec::new(),
            },
            clock,
            MAX_PEERS,
        );
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(peers.request(a), Ok(()));
        }
        assert_eq!(
            peers.request(a),
            Err(PeerLimited {
                retry_after: Duration::from_millis(500)
            })
        );
        // Another address is not affected.
        assert_eq!(peers.request(ip("192.0.2.2")), Ok(()));
        *now.lock().unwrap() += 500_000.0;
        assert_eq!(peers.request(a), Ok(()));
        assert!(peers.request(a).is_err());
    }

    #[test]
    fn the_table_never_holds_more_than_its_cap() {
        let (clock, now) = manual_clock();
        let peers = Arc::new(Peers::with(
            PeerLimits {
                max_connections: 4,
                requests: Some(Quota {
                    per_second: 1.0,
                    burst: 5,
                }),
                trusted_proxies: Vec::new(),
            },
            clock,
            64,
        ));
        // 1,000 addresses each spending part of its burst: at most 64 entries at any time.
        for i in 0..1000u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0xC000_0000 + i));
            peers.request(address).unwrap();
            assert!(peers.len() <= 64, "{} after {i}", peers.len());
        }
        // Connected peers are never forgotten while connected.
        let held: Vec<_> = (0..10u32)
            .map(|i| {
                peers
                    .connect(IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i)))
                    .unwrap()
            })
            .collect();
        for i in 0..1000u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0xC100_0000 + i));
            peers.request(address).unwrap();
        }
        assert!(peers.len() <= 64);
        for i in 0..10u32 {
            assert!(peers
                .lock()
                .contains_key(&IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i))));
        }
        drop(held);
        // Once every quota is full again and every connection closed, nothing is held.
        *now.lock().unwrap() += 10e6;
        for i in 0..64u32 {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0xC200_0000 + i));
            peers.request(address).unwrap();
        }
        assert!(peers.len() <= 64);
    }
}
