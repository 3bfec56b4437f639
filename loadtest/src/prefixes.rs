//! Deterministic random prefixes and probe addresses.
//!
//! Shape, roughly that of public blocklists: 70 % IPv4 (half single hosts, a third
//! /24s, the rest /8 to /23), 30 % IPv6 inside 2000::/3 (hosts, /64s, /48s, /32 to
//! /47). Loopback (127.0.0.0/8, ::1) is never generated, so tests and benches on
//! loopback decide for themselves who is denied there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// SplitMix64: small, fast, and the same sequence on every machine for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A prefix: network address (host bits zero) and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask_v4(a: u32, len: u8) -> u32 {
    if len == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(len))) }
}

fn mask_v6(a: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(len))) }
}

fn v4_len(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..50 => 32,
        50..80 => 24,
        80..95 => 16 + rng.below(8) as u8,
        _ => 8 + rng.below(8) as u8,
    }
}

fn v6_len(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..30 => 128,
        30..70 => 64,
        70..90 => 48,
        _ => 32 + rng.below(16) as u8,
    }
}

fn v4_addr(rng: &mut Rng) -> u32 {
    loop {
        let a = rng.next_u64() as u32;
        if a >> 24 != 127 {
            return a;
        }
    }
}

fn v6_addr(rng: &mut Rng) -> u128 {
    // 2000::/3, where the global unicast space is
    let a = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    (a >> 3) | (1u128 << 125)
}

/// `n` random prefixes (a few may repeat).
pub fn random_prefixes(n: usize, seed: u64) -> Vec<Prefix> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            if rng.below(100) < 70 {
                let len = v4_len(&mut rng);
                Prefix { addr: IpAddr::V4(Ipv4Addr::from(mask_v4(v4_addr(&mut rng), len))), len }
            } else {
                let len = v6_len(&mut rng);
                Prefix { addr: IpAddr::V6(Ipv6Addr::from(mask_v6(v6_addr(&mut rng), len))), len }
            }
        })
        .collect()
}

/// `n` addresses to look up: half inside random prefixes of `prefixes` (hits), half
/// random in the same spaces (mostly misses).
pub fn probes(prefixes: &[Prefix], n: usize, seed: u64) -> Vec<IpAddr> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    (0..n)
        .map(|i| {
            if i % 2 == 0 && !prefixes.is_empty() {
                let p = prefixes[rng.below(prefixes.len() as u64) as usize];
                match p.addr {
                    IpAddr::V4(a) => {
                        let host = if p.len == 32 { 0 } else { (rng.next_u64() as u32) >> p.len };
                        IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
                    }
                    IpAddr::V6(a) => {
                        let r = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
                        let host = if p.len == 128 { 0 } else { r >> p.len };
                        IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
                    }
                }
            } else if rng.below(100) < 70 {
                IpAddr::V4(Ipv4Addr::from(v4_addr(&mut rng)))
            } else {
                IpAddr::V6(Ipv6Addr::from(v6_addr(&mut rng)))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_well_formed_and_never_loopback() {
        let a = random_prefixes(10_000, 7);
        assert_eq!(a, random_prefixes(10_000, 7));
        let v4 = a.iter().filter(|p| p.addr.is_ipv4()).count();
        assert!((6_500..7_500).contains(&v4), "{v4}");
        for p in &a {
            match p.addr {
                IpAddr::V4(x) => {
                    assert_eq!(mask_v4(u32::from(x), p.len), u32::from(x));
                    assert!(p.len >= 8 && x.octets()[0] != 127, "{p}");
                }
                IpAddr::V6(x) => {
                    assert_eq!(mask_v6(u128::from(x), p.len), u128::from(x));
                    assert_eq!(u128::from(x) >> 125, 1, "{p} in 2000::/3");
                }
            }
        }
        let probes = probes(&a, 1000, 7);
        assert_eq!(probes.len(), 1000);
    }
}
