//! A peer's address, as the gate, abuse control, sessions and logs all see it: its own
//! module, so that the gate (which consults abuse control) and abuse control (which counts
//! per peer) depend on it and not on each other.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A peer's address in canonical form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// what a dual-stack listener reports for IPv4 peers) is the IPv4 address, so it is
/// judged, counted and logged by its IPv4 rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerIp(IpAddr);

impl PeerIp {
    pub fn new(ip: IpAddr) -> Self {
        PeerIp(ip.to_canonical())
    }

    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl From<SocketAddr> for PeerIp {
    fn from(addr: SocketAddr) -> Self {
        PeerIp::new(addr.ip())
    }
}

impl fmt::Display for PeerIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
