//! The sending side of the PROXY protocol (HAProxy's `proxy-protocol.txt`): the header a
//! load balancer puts first on each connection, for `--proxy` runs (the harness playing a
//! balancer in front of mxgate) and for the tests. mxgate's own `proxy` module reads them.

use std::net::{IpAddr, SocketAddr};

/// The 12 octets a v2 header starts with.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Which header a connection sends first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The header for a connection from `source` to `destination`.
    pub fn header(self, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        match self {
            Version::V1 => v1_header(source, destination).into_bytes(),
            Version::V2 => v2_header(source, destination, &[]),
        }
    }
}

/// A v1 header for `source` → `destination`.
pub fn v1_header(source: SocketAddr, destination: SocketAddr) -> String {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
}

/// A v2 PROXY header for `source` → `destination` (both of one family), with `tlvs`
/// (type, value) after the addresses; a mixed pair goes as IPv6, the IPv4 address mapped.
pub fn v2_header(source: SocketAddr, destination: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, family]);
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}
