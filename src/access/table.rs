//! Longest-prefix match as a flat interval table.
//!
//! A set of CIDR prefixes cuts each address space into disjoint ranges, and inside one
//! range the longest matching prefix is the same. The table stores the first address of
//! each range and the value of its longest match, sorted. A bucket index over the
//! address bits where the range starts differ narrows a lookup to a few neighbouring
//! starts (about `BUCKET_V4` or `BUCKET_V6`: one or two cache lines), searched after it.
//! The table is immutable: a changed list is a new table, swapped in whole.
//!
//! | operation | cost |
//! |-----------|------|
//! | build from n prefixes | O(n log n) (a sort), then one pass |
//! | lookup | one index read, then O(log b) in a bucket of b ≈ 8 (v4) or 4 (v6) starts |
//! | memory | per range: key (4 bytes v4, 16 bytes v6) + 4-byte value; index ≤ 1 byte |
//!
//! Why not a trie: a lookup here is about two dependent memory reads whatever the list
//! size; a binary trie makes one per prefix bit, a plain binary search one per halving.
//! `benches/lookup.rs` measures it against a linear scan and two trie crates.
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
        Self::build_with(prefixes, |_, _| {})
    }

    /// Like `build`, and calls `duplicate(kept, dropped)` with the values of each
    /// prefix given more than once.
    pub fn build_with(prefixes: impl IntoIterator<Item = (IpNet, u32)>, mut duplicate: impl FnMut(u32, u32)) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, value) in prefixes {
            debug_assert!(value != NONE && net.trunc() == net);
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()), value)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()), value)),
            }
        }
        PrefixTable { v4: Ranges::build(v4, &mut duplicate), v6: Ranges::build(v6, &mut duplicate) }
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

/// Target starts per index bucket: 8 IPv4 keys or 4 IPv6 keys fill 32 or 64 bytes.
const BUCKET_V4: usize = 8;
const BUCKET_V6: usize = 4;
/// Largest index: 2^20 buckets of 4 bytes, for lists of millions of entries.
const MAX_INDEX_BITS: u32 = 20;

/// An address as an unsigned integer.
trait Key: Copy + Ord + Default + std::fmt::Debug {
    const BITS: u32;
    const BUCKET: usize;
    fn next(self) -> Option<Self>;
    fn leading_zeros(self) -> u32;
    fn xor(self, other: Self) -> Self;
    /// `self` with its low `bits` bits cleared.
    fn clear_low(self, bits: u32) -> Self;
    /// `(self - base) >> shift`, saturated to usize; `self >= base`.
    fn bucket(self, base: Self, shift: u32) -> usize;
    /// `base + (bucket << shift)`, `None` past the end of the space.
    fn bucket_start(base: Self, bucket: usize, shift: u32) -> Option<Self>;
}

macro_rules! key_impl {
    ($t:ty, $bucket:expr) => {
        impl Key for $t {
            const BITS: u32 = <$t>::BITS;
            const BUCKET: usize = $bucket;
            fn next(self) -> Option<Self> {
                self.checked_add(1)
            }
            fn leading_zeros(self) -> u32 {
                <$t>::leading_zeros(self)
            }
            fn xor(self, other: Self) -> Self {
                self ^ other
            }
            fn clear_low(self, bits: u32) -> Self {
                if bits >= Self::BITS { 0 } else { self & (<$t>::MAX << bits) }
            }
            #[inline]
            fn bucket(self, base: Self, shift: u32) -> usize {
                let b = (self - base).checked_shr(shift).unwrap_or(0);
                usize::try_from(b).unwrap_or(usize::MAX)
            }
            fn bucket_start(base: Self, bucket: usize, shift: u32) -> Option<Self> {
                let bucket = <$t>::try_from(bucket).ok()?;
                if bucket == 0 {
                    return Some(base);
                }
                let offset = bucket.checked_shl(shift)?;
                if offset >> shift != bucket {
                    return None;
                }
                base.checked_add(offset)
            }
        }
    };
}
key_impl!(u32, BUCKET_V4);
key_impl!(u128, BUCKET_V6);

/// `starts[i]..starts[i + 1]` has value `values[i]`; `starts[0]` is always 0.
///
/// The index covers the keys from `base` up: key k ≥ base is in bucket
/// `(k - base) >> shift`, and `index[b]` is the first start at or after bucket b's
/// first key. Keys below `base` or past the last bucket are below `starts[1]` or at or
/// after the last start, which the same search handles with the index's two ends.
#[derive(Clone, Debug)]
struct Ranges<K> {
    starts: Vec<K>,
    values: Vec<u32>,
    base: K,
    shift: u32,
    index: Vec<u32>,
}

impl<K: Key> Default for Ranges<K> {
    fn default() -> Self {
        let mut r =
            Ranges { starts: vec![K::default()], values: vec![NONE], base: K::default(), shift: 0, index: Vec::new() };
        r.build_index();
        r
    }
}

impl<K: Key> Ranges<K> {
    /// `prefixes` holds (first address, last address, value).
    fn build(mut prefixes: Vec<(K, K, u32)>, duplicate: &mut dyn FnMut(u32, u32)) -> Self {
        // Enclosing prefixes before the ones they contain; equal prefixes in input order.
        prefixes.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        prefixes.dedup_by(|later, first| {
            let same = (later.0, later.1) == (first.0, first.1);
            if same {
                duplicate(first.2, later.2);
            }
            same
        });

        let mut out = Ranges {
            starts: Vec::with_capacity(prefixes.len() + 1),
            values: Vec::new(),
            base: K::default(),
            shift: 0,
            index: Vec::new(),
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
        out.build_index();
        out
    }

    /// Sizes the index for about `K::BUCKET` starts per bucket, over the bits below
    /// the ones all starts after the first share (IPv6 lists live in 2000::/3, say).
    fn build_index(&mut self) {
        let n = self.starts.len();
        let (first, last) = (self.starts[n.min(2) - 1], self.starts[n - 1]);
        let common = if n > 2 { first.xor(last).leading_zeros() } else { K::BITS };
        let wanted = (n / K::BUCKET).max(1).next_power_of_two().trailing_zeros();
        let bits = wanted.min(MAX_INDEX_BITS).min(K::BITS - common);
        self.shift = K::BITS - common - bits;
        self.base = first.clear_low(K::BITS - common);
        let buckets = 1usize << bits;
        self.index = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for b in 0..=buckets {
            match K::bucket_start(self.base, b, self.shift) {
                Some(start) => i += self.starts[i..].partition_point(|&s| s < start),
                None => i = n,
            }
            self.index.push(i as u32);
        }
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
        let buckets = self.index.len() - 1;
        let (lo, hi) = if key < self.base {
            (0, self.index[0] as usize)
        } else {
            let b = key.bucket(self.base, self.shift);
            if b < buckets {
                (self.index[b] as usize, self.index[b + 1] as usize)
            } else {
                (self.index[buckets] as usize, self.starts.len())
            }
        };
        // The value is next to values[lo]: fetch its cache line while the keys are searched.
        prefetch(self.values.as_ptr().wrapping_add(lo));
        // The range holding `key` starts in this bucket, or it is the one before it
        // (lo ≥ 1 then: starts[0] == 0 is in the first bucket).
        let i = lo + self.starts[lo..hi].partition_point(|&s| s <= key);
        self.values[i - 1]
    }

    fn heap_bytes(&self) -> usize {
        self.starts.capacity() * size_of::<K>() + (self.values.capacity() + self.index.capacity()) * size_of::<u32>()
    }
}

/// A hint to load `p`'s cache line; never faults, whatever `p` is.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is only a hint: it reads nothing and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn table(entries: &[&str]) -> PrefixTable {
        PrefixTable::build(entries.iter().enumerate().map(|(i, s)| (s.parse().unwrap(), i as u32)))
    }

    fn at(t: &PrefixTable, ip: &str) -> Option<u32> {
        t.lookup(ip.parse().unwrap())
    }

    #[test]
    fn longest_match_wins() {
        let t = table(&["127.0.0.0/8", "127.0.1.0/24", "127.0.1.7/32", "::1/128", "2001:db8::/32", "0.0.0.0/0"]);
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
        let t = table(&["255.255.255.255/32", "0.0.0.0/32", "::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]);
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
            (0u32..64, any::<u32>()).prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from((hi << 26) | (lo >> 6)))),
            (0u128..64, any::<u128>()).prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from((hi << 122) | (lo >> 6)))),
        ];
        if edges.is_empty() { random.boxed() } else { prop_oneof![random, proptest::sample::select(edges)].boxed() }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
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

    proptest! {
        // each case is a few thousand prefixes: fewer cases
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn large_lists_match_brute_force_too(
            (prefixes, probes) in proptest::collection::vec(prefix(), 500..3000)
                .prop_flat_map(|p| { let probes = proptest::collection::vec(probe(&p), 200); (Just(p), probes) })
        ) {
            let valued: Vec<(IpNet, u32)> = prefixes.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();
            let t = PrefixTable::build(valued.iter().copied());
            prop_assert!(t.v4.index.len() > 16 || t.v6.index.len() > 16, "the index is exercised");
            for ip in probes {
                prop_assert_eq!(t.lookup(ip), brute_force(&valued, ip), "{}", ip);
            }
        }
    }
}
