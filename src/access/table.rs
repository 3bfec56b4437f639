//! Longest-prefix match as a flat interval table.
//!
//! A set of CIDR prefixes cuts each address space into disjoint ranges, and inside one
//! range the longest matching prefix is the same. The table stores the first address of
//! each range and the value of its longest match, sorted; a lookup is one binary search.
//! The table is immutable: a changed list is a new table, swapped in whole.
//!
//! | operation | cost |
//! |-----------|------|
//! | build from n prefixes | O(n log n) (a sort), one pass after it |
//! | lookup | O(log r), r ≤ 2n + 1 ranges; no pointer chasing |
//! | memory | per range: key (4 bytes v4, 16 bytes v6) + 4-byte value |
//!
//! `benches/lookup.rs` compares it with a linear scan and two trie crates.
//!
//! Lookups take canonical addresses (`IpAddr::to_canonical`): IPv4-mapped IPv6 peers are
//! judged by the IPv4 table, and list entries are canonicalised the same way.

use std::net::IpAddr;

use ipnet::IpNet;

/// Value stored for the ranges no prefix covers.
const NONE: u32 = u32::MAX;

/// Longest-prefix-match table from prefixes to `u32` values (`u32::MAX` is reserved).
#[derive(Clone, Debug, Default)]
pub struct PrefixTable {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
}

impl PrefixTable {
    /// Builds the table. Prefixes must have no host bits set; for a prefix given more
    /// than once, the first occurrence's value is kept.
    pub fn build(prefixes: impl IntoIterator<Item = (IpNet, u32)>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, value) in prefixes {
            debug_assert!(value != NONE && net.trunc() == net);
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()), value)),
                IpNet::V6(n) => {
                    v6.push((u128::from(n.network()), u128::from(n.broadcast()), value))
                }
            }
        }
        PrefixTable {
            v4: Ranges::build(v4),
            v6: Ranges::build(v6),
        }
    }

    /// The value of the longest prefix that contains `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let value = match ip {
            IpAddr::V4(a) => self.v4.get(u32::from(a)),
            IpAddr::V6(a) => self.v6.get(u128::from(a)),
        };
        (value != NONE).then_some(value)
    }

    /// Bytes held by the table (not counting the struct itself).
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

/// An address as an unsigned integer.
trait Key: Copy + Ord + Default {
    fn next(self) -> Option<Self>;
}

impl Key for u32 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Key for u128 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// `starts[i]..starts[i + 1]` has value `values[i]`; `starts[0]` is always 0.
#[derive(Clone, Debug)]
struct Ranges<K> {
    starts: Vec<K>,
    values: Vec<u32>,
}

impl<K: Key> Default for Ranges<K> {
    fn default() -> Self {
        Ranges {
            starts: vec![K::default()],
            values: vec![NONE],
        }
    }
}

impl<K: Key> Ranges<K> {
    /// `prefixes` holds (first address, last address, value).
    fn build(mut prefixes: Vec<(K, K, u32)>) -> Self {
        // Enclosing prefixes before the ones they contain; equal prefixes in input order.
        prefixes.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        prefixes.dedup_by(|later, first| (later.0, later.1) == (first.0, first.1));

        let mut out = Ranges {
            starts: Vec::with_capacity(prefixes.len() + 1),
            values: Vec::new(),
        };
        out.values.reserve(prefixes.len() + 1);
        // Sweep in address order. `open` holds the prefixes containing the sweep point,
        // innermost last (CIDR prefixes nest or are disjoint); `cursor` is the first
        // address not yet given a value, `None` once the whole space is.
        let mut open: Vec<(K, u32)> = Vec::with_capacity(129);
        let mut cursor = Some(K::default());
        for (first, last, value) in prefixes {
            out.close_before(&mut open, &mut cursor, Some(first));
            if let Some(c) = cursor.filter(|&c| c < first) {
                out.push(c, open.last().map_or(NONE, |o| o.1));
            }
            cursor = Some(first);
            open.push((last, value));
        }
        out.close_before(&mut open, &mut cursor, None);
        if let Some(c) = cursor {
            out.push(c, NONE);
        }
        out.starts.shrink_to_fit();
        out.values.shrink_to_fit();
        out
    }

    /// Pops the open prefixes that end before `until` (all of them for `None`), giving
    /// each the addresses from the cursor to its end.
    fn close_before(&mut self, open: &mut Vec<(K, u32)>, cursor: &mut Option<K>, until: Option<K>) {
        while let Some(&(last, value)) = open.last() {
            if until.is_some_and(|u| last >= u) {
                break;
            }
            if let Some(c) = cursor.filter(|&c| c <= last) {
                self.push(c, value);
                *cursor = last.next();
            }
            open.pop();
        }
    }

    fn push(&mut self, start: K, value: u32) {
        if self.values.last() != Some(&value) {
            self.starts.push(start);
            self.values.push(value);
        }
    }

    #[inline]
    fn get(&self, key: K) -> u32 {
        // starts[0] == 0 <= key, so the partition point is at least 1
        let i = self.starts.partition_point(|&s| s <= key);
        self.values[i - 1]
    }

    fn heap_bytes(&self) -> usize {
        self.starts.capacity() * size_of::<K>() + self.values.capacity() * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn table(entries: &[&str]) -> PrefixTable {
        PrefixTable::build(
            entries
                .iter()
                .enumerate()
                .map(|(i, s)| (s.parse().unwrap(), i as u32)),
        )
    }

    fn at(t: &PrefixTable, ip: &str) -> Option<u32> {
        t.lookup(ip.parse().unwrap())
    }

    #[test]
    fn longest_match_wins() {
        let t = table(&[
            "127.0.0.0/8",
            "127.0.1.0/24",
            "127.0.1.7/32",
            "::1/128",
            "2001:db8::/32",
            "0.0.0.0/0",
        ]);
        assert_eq!(at(&t, "127.0.1.7"), Some(2));
        assert_eq!(at(&t, "127.0.1.8"), Some(1));
        assert_eq!(at(&t, "127.0.1.6"), Some(1));
        assert_eq!(at(&t, "127.0.2.1"), Some(0));
        assert_eq!(at(&t, "128.0.0.0"), Some(5));
        assert_eq!(at(&t, "255.255.255.255"), Some(5));
        assert_eq!(at(&t, "::1"), Some(3));
        assert_eq!(at(&t, "::2"), None);
        assert_eq!(at(&t, "2001:db8:ffff::1"), Some(4));
        assert_eq!(at(&t, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), None);
    }

    #[test]
    fn edges_of_the_address_space() {
        let t = table(&[
            "255.255.255.255/32",
            "0.0.0.0/32",
            "::/0",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ]);
        assert_eq!(at(&t, "0.0.0.0"), Some(1));
        assert_eq!(at(&t, "0.0.0.1"), None);
        assert_eq!(at(&t, "255.255.255.254"), None);
        assert_eq!(at(&t, "255.255.255.255"), Some(0));
        assert_eq!(at(&t, "::"), Some(2));
        assert_eq!(at(&t, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"), Some(2));
        assert_eq!(at(&t, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), Some(3));
        assert_eq!(at(&PrefixTable::default(), "10.0.0.1"), None);
        assert_eq!(at(&table(&[]), "::"), None);
    }

    #[test]
    fn first_duplicate_is_kept() {
        let t = table(&["10.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16"]);
        assert_eq!(at(&t, "10.1.0.0"), Some(0));
        assert_eq!(at(&t, "10.0.1.0"), Some(2));
    }

    fn brute_force(prefixes: &[(IpNet, u32)], ip: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for &(net, value) in prefixes {
            if net.contains(&ip) && best.is_none_or(|(len, _)| net.prefix_len() > len) {
                best = Some((net.prefix_len(), value));
            }
        }
        best.map(|b| b.1)
    }

    /// Prefixes drawn near each other so that they nest and overlap often.
    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..64, any::<u32>(), 0u8..=32).prop_map(|(hi, lo, len)| {
                let a = Ipv4Addr::from((hi << 26) | (lo >> 6));
                IpNet::V4(ipnet::Ipv4Net::new(a, len).unwrap().trunc())
            }),
            (0u128..64, any::<u128>(), 0u8..=128).prop_map(|(hi, lo, len)| {
                let a = Ipv6Addr::from((hi << 122) | (lo >> 6));
                IpNet::V6(ipnet::Ipv6Net::new(a, len).unwrap().trunc())
            }),
        ]
    }

    fn probe(prefixes: &[IpNet]) -> impl Strategy<Value = IpAddr> + use<> {
        // Probe at the edges of the given prefixes and at random addresses.
        let edges: Vec<IpAddr> = prefixes
            .iter()
            .flat_map(|n| {
                let (lo, hi) = (n.network(), n.broadcast());
                let step = |ip: IpAddr, up: bool| match ip {
                    IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(if up {
                        u32::from(a).wrapping_add(1)
                    } else {
                        u32::from(a).wrapping_sub(1)
                    })),
                    IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(if up {
                        u128::from(a).wrapping_add(1)
                    } else {
                        u128::from(a).wrapping_sub(1)
                    })),
                };
                [lo, hi, step(lo, false), step(hi, true)]
            })
            .collect();
        let random = prop_oneof![
            (0u32..64, any::<u32>())
                .prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from((hi << 26) | (lo >> 6)))),
            (0u128..64, any::<u128>())
                .prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from((hi << 122) | (lo >> 6)))),
        ];
        if edges.is_empty() {
            random.boxed()
        } else {
            prop_oneof![random, proptest::sample::select(edges)].boxed()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_brute_force_longest_match(
            (prefixes, probes) in proptest::collection::vec(prefix(), 0..60)
                .prop_flat_map(|p| { let probes = proptest::collection::vec(probe(&p), 1..40); (Just(p), probes) })
        ) {
            let valued: Vec<(IpNet, u32)> = prefixes.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();
            let t = PrefixTable::build(valued.iter().copied());
            for ip in probes {
                // equal prefixes: the first is kept, and brute force keeps the first too
                prop_assert_eq!(t.lookup(ip), brute_force(&valued, ip), "{}", ip);
            }
        }
    }
}
