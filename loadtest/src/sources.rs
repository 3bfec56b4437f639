//! Where peers come from: a range of loopback addresses, handed out in turn, so that many
//! peers are many addresses (as the gate, the counters and the bans see them). Each
//! connection binds its address with a port of its own: the n-th pass over the range
//! uses port `FIRST_PORT + (start + n) mod 64,512`, so an (address, port) pair comes back
//! only after `len() * 64,512` connections: never while the server still holds the
//! TIME_WAIT entry of its last use (a /16 is 4 billion connections; `::1` alone, 64,512).
//! `start` is random, so that a run right after another (a benchmark alternating two
//! servers) does not meet the 4-tuples the last one left in TIME_WAIT either.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

/// The first source port used; ports below it are left to the system's services.
pub const FIRST_PORT: u16 = 1024;
/// Source ports per address.
pub const PORTS: u16 = u16::MAX - FIRST_PORT + 1;

/// A range of source addresses: an IPv4 prefix inside 127.0.0.0/8, or `::1`.
#[derive(Debug)]
pub struct Sources {
    first: u32,
    count: u32,
    v6: bool,
    next: AtomicU32,
    /// The first pass's port offset: random, so that the next run (of this or another
    /// process) does not start on the 4-tuples whose TIME_WAIT the last run left.
    start: u32,
}

impl Sources {
    /// `127.a.b.c/n` (n from 8 to 32) or `::1`; anything off loopback is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "::1" || text == "::1/128" {
            return Ok(Sources { first: 0, count: 1, v6: true, next: AtomicU32::new(0), start: random_start() });
        }
        let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("`{text}`: not an IPv4 prefix or ::1"))?;
        let len: u32 =
            len.parse().ok().filter(|l| (8..=32).contains(l)).ok_or(format!("`{text}`: bad prefix length"))?;
        if addr.octets()[0] != 127 {
            return Err(format!("`{text}`: peers come from loopback only (127.0.0.0/8 or ::1)"));
        }
        let size = 1u64 << (32 - len);
        let base = u32::from(addr) & !((size - 1) as u32);
        // leave out the range's first and last address when there are more than two
        let (first, count) = if size > 2 { (base + 1, (size - 2) as u32) } else { (base, size as u32) };
        Ok(Sources { first, count, v6: false, next: AtomicU32::new(0), start: random_start() })
    }

    /// Every address of the range, in order (`::1` alone for IPv6).
    pub fn all(&self) -> Vec<IpAddr> {
        if self.v6 {
            return vec![IpAddr::V6(Ipv6Addr::LOCALHOST)];
        }
        (self.first..self.first + self.count).map(|a| IpAddr::V4(Ipv4Addr::from(a))).collect()
    }

    /// The next address, in turn (any port).
    pub fn next(&self) -> IpAddr {
        self.next_with_port().ip()
    }

    /// The next address, in turn, and the port for this pass over the range.
    pub fn next_with_port(&self) -> SocketAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let port = FIRST_PORT + ((n / self.count + self.start) % u32::from(PORTS)) as u16;
        let ip = if self.v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::from(self.first + n % self.count))
        };
        SocketAddr::new(ip, port)
    }
}

/// A port offset from the clock's nanoseconds (no randomness is needed beyond "not the
/// same as the last run's").
fn random_start() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos % u32::from(PORTS)
}

/// Targets are on this machine only.
pub fn check_target(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!("{addr}: the harness talks to loopback targets only (127.0.0.0/8, ::1)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_loopback_and_taken_in_turn() {
        let s = Sources::parse("127.66.0.0/30").unwrap();
        let got: Vec<IpAddr> = (0..3).map(|_| s.next()).collect();
        assert_eq!(
            got,
            ["127.66.0.1".parse::<IpAddr>().unwrap(), "127.66.0.2".parse().unwrap(), "127.66.0.1".parse().unwrap()]
        );
        assert_eq!(Sources::parse("127.77.0.0/16").unwrap().count, 65534);
        // a new port on each pass over the range, from a random first one
        let s = Sources::parse("127.66.0.0/30").unwrap();
        let ports: Vec<u32> = (0..5).map(|_| u32::from(s.next_with_port().port()) - u32::from(FIRST_PORT)).collect();
        let p0 = ports[0];
        let next = |k: u32| (p0 + k) % u32::from(PORTS);
        assert_eq!(ports, [p0, p0, next(1), next(1), next(2)]);
        assert!(Sources::parse("10.0.0.0/8").unwrap_err().contains("loopback only"));
        assert!(Sources::parse("127.0.0.0/4").is_err());
        assert_eq!(Sources::parse("::1").unwrap().next(), "::1".parse::<IpAddr>().unwrap());
        assert!(check_target("192.0.2.1:25".parse().unwrap()).is_err());
        assert!(check_target("127.0.0.1:25".parse().unwrap()).is_ok());
    }
}
