//! Failures per address across conversations: exact counts in memory fixed at start.
//!
//! A bounded hash table of the keys that failed (an IPv4 address or an IPv6 prefix, see
//! [`AbuseKey`]): shards of [`SHARD_BUCKETS`] buckets, each shard behind a lock of its own,
//! each bucket [`WAYS`] entries. A randomly keyed hash gives a key its shard and two
//! buckets there (a peer can aim neither at another's entries nor at one shard). An
//! entry holds the whole key, so a count is the key's own: an address is banned only when
//! its own failures within the window reach the threshold, however many others fail.
//!
//! ```text
//!  key ──keyed hash──► shard (its lock) ──► buckets b1, b2, WAYS entries each
//!     the key's entry in either ─────────────────────────► count it
//!     not held; an entry free in either (never used, or stale: no failure within the
//!       window) ──► take one in the bucket holding fewer live keys (b1 on a tie)
//!     not held, none free (2 × WAYS keys failing now) ─► evict the one of the 2 × WAYS
//!       with the fewest failures in the window (the least recently counted among
//!       equals), count the key from 1, and count the eviction
//! ```
//!
//! A bucket is one cache line of entry heads (fingerprint, prefix tag, newest sub-window:
//! all a look-up reads to find a key or a free entry) and four of keys and counts, so a
//! failure reads at most two head lines and one entry line under the lock. Two choices
//! keep a table at 60 % without an eviction: 1,000,000 addresses fit the default 64 MiB.
//!
//! Past capacity (more keys failing within one window than the table holds), what is lost
//! is counting, never exactness: an evicted key's failures are forgotten, so it may reach
//! the threshold later than it should or not at all; a key is never counted a failure
//! that was not its own. Keys with the most failures are the last evicted.
//!
//! Each entry keeps [`SUB_WINDOWS`] sub-window counts: a failure ages out within
//! `failure_window` plus an eighth, with no sweeping thread. A sub-window's count stops at
//! 65,535 (a key that fails that often within one sub-window has reached any threshold up
//! to 65,535 in that sub-window alone).
//!
//! Memory: `[abuse] counter_memory` / [`ENTRY_BYTES`] entries, mapped at start (pages
//! are touched as keys arrive) and never grown.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ipnet::IpNet;

use super::AbuseKey;

/// Sub-windows per entry: a count ages out within `failure_window` plus an eighth.
pub const SUB_WINDOWS: usize = 8;
/// Entries per bucket: one cache line of heads.
pub const WAYS: usize = 8;
/// Buckets per shard (one lock): 160 KiB of the table.
pub const SHARD_BUCKETS: usize = 512;
/// Bytes one key takes: head (8: newest sub-window, prefix tag, fingerprint), address
/// (16), counts (16).
pub const ENTRY_BYTES: usize = std::mem::size_of::<Bucket>() / WAYS;

/// [`WAYS`] entries: their heads in the first cache line, then addresses and counts.
/// Atomics, so that the workers share the buckets without `UnsafeCell`: every access is
/// under the shard's lock, with relaxed loads and stores (plain moves).
#[repr(C, align(64))]
#[derive(Debug)]
struct Bucket {
    /// Per entry: newest sub-window counted (high 32 bits), prefix tag (16), fingerprint
    /// (low 16). 0: never used. The prefix tag is `1 + prefix length` for IPv4 and
    /// `256 + prefix length` for IPv6, never 0.
    head: [AtomicU64; WAYS],
    /// Per entry, on one half of a cache line: the address (two words), then the counts,
    /// four sub-window counts a word: `s % SUB_WINDOWS` indexes sub-window `s`'s count,
    /// for `s` in `newest - 7 ..= newest`.
    entry: [[AtomicU64; 4]; WAYS],
}

impl Bucket {
    fn head(&self, w: usize) -> u64 {
        self.head[w].load(Relaxed)
    }

    fn addr(&self, w: usize) -> [u64; 2] {
        [self.entry[w][0].load(Relaxed), self.entry[w][1].load(Relaxed)]
    }

    fn counts(&self, w: usize) -> [u16; SUB_WINDOWS] {
        let words = [self.entry[w][2].load(Relaxed), self.entry[w][3].load(Relaxed)];
        std::array::from_fn(|i| (words[i / 4] >> (16 * (i % 4))) as u16)
    }

    fn set(&self, w: usize, head: u64, addr: [u64; 2], counts: &[u16; SUB_WINDOWS]) {
        let word = |half: usize| (0..4).fold(0u64, |word, i| word | (u64::from(counts[half * 4 + i]) << (16 * i)));
        let words = [addr[0], addr[1], word(0), word(1)];
        for (atomic, word) in self.entry[w].iter().zip(words) {
            atomic.store(word, Relaxed);
        }
        self.head[w].store(head, Relaxed);
    }

    /// Entry `w`'s failures within the window that ends with sub-window `now`.
    fn sum(&self, w: usize, now: u32) -> u32 {
        sum(newest_of(self.head(w)), &self.counts(w), now)
    }
}

fn head(newest: u32, tag: u16, fingerprint: u16) -> u64 {
    (u64::from(newest) << 32) | (u64::from(tag) << 16) | u64::from(fingerprint)
}

fn newest_of(head: u64) -> u32 {
    (head >> 32) as u32
}

/// The head without its sub-window: what identifies a key (with its address).
fn identity(head: u64) -> u32 {
    head as u32
}

/// An entry's failures within the window that ends with sub-window `now`.
fn sum(newest: u32, counts: &[u16; SUB_WINDOWS], now: u32) -> u32 {
    (0..SUB_WINDOWS as u32)
        .filter_map(|i| {
            // the sub-window held at index i: the one in newest-7..=newest that is ≡ i
            let back = newest.wrapping_sub(i) % SUB_WINDOWS as u32;
            let s = newest.checked_sub(back)?;
            (s <= now && now - s < SUB_WINDOWS as u32).then_some(u32::from(counts[i as usize]))
        })
        .sum()
}

/// No failure counted up to `newest` counts at `now` any longer.
fn stale(newest: u32, now: u32) -> bool {
    newest.saturating_add(SUB_WINDOWS as u32) <= now
}

/// One more failure in sub-window `now`; the entry's newest sub-window after it.
fn add(newest: u32, counts: &mut [u16; SUB_WINDOWS], now: u32) -> u32 {
    let mut newest = newest;
    if now > newest {
        if now - newest >= SUB_WINDOWS as u32 {
            *counts = [0; SUB_WINDOWS];
        } else {
            for s in newest + 1..=now {
                counts[s as usize % SUB_WINDOWS] = 0;
            }
        }
        newest = now;
    }
    // a clock that went back: the failure is counted in the oldest sub-window held, at
    // worst ageing out later than it should
    let at = now.max(newest.saturating_sub(SUB_WINDOWS as u32 - 1));
    let c = &mut counts[at as usize % SUB_WINDOWS];
    *c = c.saturating_add(1);
    newest
}

/// A key as an entry holds it: address bits and prefix tag.
fn encode(key: AbuseKey) -> ([u64; 2], u16) {
    let net = key.net();
    let len = u16::from(net.prefix_len());
    match net {
        IpNet::V4(n) => ([0, u64::from(u32::from(n.addr()))], 1 + len),
        IpNet::V6(n) => {
            let a = u128::from(n.addr());
            ([(a >> 64) as u64, a as u64], 256 + len)
        }
    }
}

/// A shard's lock, on a cache line of its own; it guards the shard's buckets and holds
/// how many keys were evicted from them.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Lock(Mutex<u64>);

/// Where a key is in its shard, or goes.
struct Place {
    b1: usize,
    b2: usize,
    fingerprint: u16,
}

enum Found {
    /// The key's own entry.
    Held(usize, usize),
    /// An entry no key in the window holds: the key takes it.
    Free(usize, usize),
    /// Every entry of both buckets is held within the window: the key evicts this one.
    Full(usize, usize),
}

pub struct FailureCounters {
    hasher: ahash::RandomState,
    /// Every shard's buckets, one after the other: shard `i` holds
    /// `buckets[i * per_shard .. (i + 1) * per_shard]`.
    buckets: Table,
    locks: Box<[Lock]>,
    /// Buckets in each shard.
    per_shard: usize,
    sub_window_secs: u64,
}

impl std::fmt::Debug for FailureCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureCounters").field("capacity", &self.capacity()).finish()
    }
}

impl FailureCounters {
    /// Counters whose counts cover `window`, holding as many keys as `memory` bytes take
    /// ([`ENTRY_BYTES`] each; at least two buckets).
    pub fn new(window: Duration, memory: u64) -> Self {
        let buckets = usize::try_from(memory / std::mem::size_of::<Bucket>() as u64).unwrap_or(usize::MAX).max(2);
        let shards = buckets.div_ceil(SHARD_BUCKETS);
        let per_shard = (buckets / shards).max(2);
        let buckets = Table::new(shards * per_shard);
        let locks = (0..shards).map(|_| Lock::default()).collect();
        let sub_window_secs = (window.as_secs() / SUB_WINDOWS as u64).max(1);
        FailureCounters { hasher: ahash::RandomState::new(), buckets, locks, per_shard, sub_window_secs }
    }

    /// How many keys the counters hold at most.
    pub fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Memory held by the counters' entries: fixed at construction.
    pub fn bytes(&self) -> usize {
        self.capacity() * ENTRY_BYTES
    }

    /// Keys evicted so far to make room (the table full of keys failing within the window).
    pub fn evictions(&self) -> u64 {
        self.locks.iter().map(|l| *lock(l)).sum()
    }

    /// Adds one failure of `key` at `now` (seconds since the epoch); returns its count
    /// within the window, this failure included.
    pub fn add(&self, key: AbuseKey, now: i64) -> u32 {
        let now = self.sub_window(now);
        let (addr, tag) = encode(key);
        let (shard, place) = self.place(key);
        let buckets = self.shard(shard);
        prefetch(&buckets[place.b1]);
        prefetch(&buckets[place.b2]);
        let mut evictions = lock(&self.locks[shard]);
        let (b, w, held) = match find(buckets, &place, addr, tag, now) {
            Found::Held(b, w) => (b, w, true),
            Found::Free(b, w) => (b, w, false),
            Found::Full(b, w) => {
                *evictions += 1;
                (b, w, false)
            }
        };
        let bucket = &buckets[b];
        let (newest, mut counts) =
            if held { (newest_of(bucket.head(w)), bucket.counts(w)) } else { (now, [0; SUB_WINDOWS]) };
        let newest = add(newest, &mut counts, now);
        bucket.set(w, head(newest, tag, place.fingerprint), addr, &counts);
        sum(newest, &counts, now)
    }

    /// The count of `key` within the window at `now`.
    pub fn count(&self, key: AbuseKey, now: i64) -> u32 {
        let now = self.sub_window(now);
        let (addr, tag) = encode(key);
        let (shard, place) = self.place(key);
        let _held = lock(&self.locks[shard]);
        let buckets = self.shard(shard);
        match find(buckets, &place, addr, tag, now) {
            Found::Held(b, w) => buckets[b].sum(w, now),
            Found::Free(..) | Found::Full(..) => 0,
        }
    }

    /// Shard `i`'s buckets (to be read and written under its lock only).
    fn shard(&self, i: usize) -> &[Bucket] {
        &self.buckets[i * self.per_shard..(i + 1) * self.per_shard]
    }

    /// The shard of `key` and its place there.
    fn place(&self, key: AbuseKey) -> (usize, Place) {
        let h = self.hasher.hash_one(key);
        // multiply-shift: the high half picks the shard, each quarter of the low half a
        // bucket, and bits of the high half nearly independent of the shard's the
        // fingerprint
        let shard = ((u128::from(h >> 32) * self.locks.len() as u128) >> 32) as usize;
        let bucket = |bits: u64| (((bits & 0xffff) * self.per_shard as u64) >> 16) as usize;
        (shard, Place { b1: bucket(h), b2: bucket(h >> 16), fingerprint: (h >> 32) as u16 })
    }

    fn sub_window(&self, now: i64) -> u32 {
        // u32 sub-windows of at least a second last until 2106; sub-window 0 (1970) is
        // never used, so that a head's newest sub-window is never 0
        u32::try_from(now.max(0) as u64 / self.sub_window_secs).unwrap_or(u32::MAX).max(1)
    }
}

/// Where `place`'s key is held, or the entry it takes.
fn find(buckets: &[Bucket], place: &Place, addr: [u64; 2], tag: u16, now: u32) -> Found {
    let wanted = identity(head(0, tag, place.fingerprint));
    let choices: &[usize] = if place.b1 == place.b2 { &[place.b1] } else { &[place.b1, place.b2] };
    // per bucket: a free entry and how many live keys it holds
    let mut free: [(Option<usize>, usize); 2] = [(None, 0); 2];
    for (c, &b) in choices.iter().enumerate() {
        let bucket = &buckets[b];
        for w in 0..WAYS {
            let h = bucket.head(w);
            if h == 0 || stale(newest_of(h), now) {
                free[c].0.get_or_insert(w);
            } else {
                free[c].1 += 1;
            }
            if h != 0 && identity(h) == wanted && bucket.addr(w) == addr {
                return Found::Held(b, w);
            }
        }
    }
    let fewer = usize::from(free[1].0.is_some() && (free[0].0.is_none() || free[1].1 < free[0].1));
    if let Some(w) = free[fewer].0 {
        return Found::Free(choices[fewer], w);
    }
    let mut least = (choices[0], 0, u32::MAX, u32::MAX);
    for &b in choices {
        for w in 0..WAYS {
            let newest = newest_of(buckets[b].head(w));
            let n = buckets[b].sum(w, now);
            if (n, newest) < (least.2, least.3) {
                least = (b, w, n, newest);
            }
        }
    }
    Found::Full(least.0, least.1)
}

/// Starts loading a bucket's heads while the lock is taken.
#[inline]
fn prefetch(bucket: &Bucket) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is in every x86-64 CPU, and a prefetch reads nothing the program sees
    // (a hint to the cache, of a line of a live reference)
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(std::ptr::from_ref(bucket).cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bucket;
}

/// The buckets, in memory of their own: an anonymous mapping (zero-filled by the kernel,
/// so pages are only touched, and counted in the process's memory, as keys arrive; an
/// allocator asked for zeroed memory aligned to 64 would write every byte at once), in
/// transparent huge pages where the kernel has them for `madvise` (no TLB miss a failure,
/// whatever the table's size).
struct Table {
    ptr: std::ptr::NonNull<Bucket>,
    len: usize,
}

// SAFETY: the mapping is owned by the Table alone, and Buckets are atomics (Sync)
unsafe impl Send for Table {}
// SAFETY: as above: shared access only reaches the Buckets' atomics
unsafe impl Sync for Table {}

impl Table {
    fn new(len: usize) -> Self {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<Bucket>();
        // SAFETY: a fresh private anonymous mapping; the kernel picks the address
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let Some(ptr) = std::ptr::NonNull::new(ptr.cast::<Bucket>()).filter(|_| ptr != libc::MAP_FAILED) else {
            // as the allocator does when memory runs out
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<Bucket>());
        };
        let start = ptr.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if to > from {
            // SAFETY: advice on whole pages inside this mapping; MADV_HUGEPAGE changes no
            // contents (refused where THP is off: then small pages, as before)
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
        Table { ptr, len }
    }
}

impl std::ops::Deref for Table {
    type Target = [Bucket];

    fn deref(&self) -> &[Bucket] {
        // SAFETY: the mapping holds `len` Buckets (page-aligned, so aligned for Bucket),
        // zero-filled by the kernel, and all zero is a valid Bucket (atomic integers,
        // every entry never used); it lives as long as the Table
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the mapping made in Table::new, of this size, no longer borrowed
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * std::mem::size_of::<Bucket>()) };
    }
}

fn lock(lock: &Lock) -> std::sync::MutexGuard<'_, u64> {
    // the buckets are whole after any panic (each store is of a whole word)
    lock.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerIp;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    fn v4(i: u32) -> AbuseKey {
        AbuseKey::new(PeerIp::new(Ipv4Addr::from(0x0a00_0000 + i).into()), 64)
    }

    const T0: i64 = 1_795_894_760;
    const MIB: u64 = 1 << 20;

    impl FailureCounters {
        /// Every key held with a count at `now`.
        fn held(&self, now: i64) -> Vec<(AbuseKey, u32)> {
            let now = self.sub_window(now);
            let mut held = Vec::new();
            for bucket in self.buckets.iter() {
                for w in 0..WAYS {
                    let n = bucket.sum(w, now);
                    if bucket.head(w) != 0 && n > 0 {
                        held.push((decode(bucket.addr(w), (bucket.head(w) >> 16) as u16), n));
                    }
                }
            }
            held
        }
    }

    fn decode(addr: [u64; 2], tag: u16) -> AbuseKey {
        let net = if tag < 256 {
            IpNet::new(IpAddr::V4((addr[1] as u32).into()), (tag - 1) as u8)
        } else {
            IpNet::new(IpAddr::V6(((u128::from(addr[0]) << 64) | u128::from(addr[1])).into()), (tag - 256) as u8)
        };
        AbuseKey::from_net(net.unwrap())
    }

    #[test]
    fn counts_age_out_over_the_window() {
        let c = FailureCounters::new(Duration::from_secs(80), MIB); // sub-windows of 10 s
        let k = key("192.0.2.1");
        assert_eq!(c.add(k, T0), 1);
        assert_eq!(c.add(k, T0 + 35), 2);
        assert_eq!(c.count(k, T0 + 79), 2);
        // the first failure's sub-window is eight sub-windows old
        assert_eq!(c.count(k, T0 + 85), 1);
        assert_eq!(c.count(k, T0 + 200), 0);
        assert_eq!(c.add(k, T0 + 200), 1, "a sub-window reused is restarted");
        assert_eq!(c.count(key("192.0.2.2"), T0), 0);
    }

    #[test]
    fn an_entry_ages_sub_window_by_sub_window() {
        let mut counts = [0; SUB_WINDOWS];
        let mut newest = 100;
        for (s, n) in [(100, 3), (103, 2), (107, 1)] {
            for _ in 0..n {
                newest = add(newest, &mut counts, s);
            }
        }
        assert_eq!(sum(newest, &counts, 107), 6);
        assert_eq!(sum(newest, &counts, 108), 3, "sub-window 100 left the window");
        assert_eq!(sum(newest, &counts, 111), 1);
        assert_eq!(sum(newest, &counts, 115), 0);
        assert!(!stale(newest, 114) && stale(newest, 115));
        newest = add(newest, &mut counts, 109); // restarts 108 and 109, which share words with 100 and 101
        assert_eq!(sum(newest, &counts, 109), 4);
        assert_eq!(sum(newest, &counts, 104), 2, "asked about an earlier moment: what was counted up to it");
        newest = add(newest, &mut counts, 90); // a clock far behind: counted in the oldest held (102)
        assert_eq!((newest, sum(newest, &counts, 109)), (109, 5));
    }

    #[test]
    fn two_threads_lose_no_update() {
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        let k = key("192.0.2.9");
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..30_000 {
                        c.add(k, T0);
                    }
                });
            }
        });
        assert_eq!(c.count(k, T0), 60_000);
    }

    #[test]
    fn a_sub_windows_count_stops_at_its_limit() {
        let c = FailureCounters::new(Duration::from_secs(80), MIB);
        let k = key("192.0.2.11");
        for _ in 0..70_000 {
            c.add(k, T0);
        }
        assert_eq!(c.count(k, T0), 65_535);
        assert_eq!(c.add(k, T0 + 10), 65_536);
    }

    #[test]
    fn keys_are_held_whole() {
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        let keys = [
            key("192.0.2.1"),
            key("2001:db8:1:2::1"),
            AbuseKey::new(PeerIp::new("2001:db8:1:2::1".parse().unwrap()), 48),
            AbuseKey::new(PeerIp::new("2001:db8::1".parse().unwrap()), 128),
            AbuseKey::new(PeerIp::new("::c000:201".parse().unwrap()), 128),
        ];
        for (n, k) in keys.iter().enumerate() {
            for _ in 0..=n {
                c.add(*k, T0);
            }
        }
        let mut held = c.held(T0);
        held.sort();
        let mut want: Vec<_> = keys.iter().enumerate().map(|(n, k)| (*k, n as u32 + 1)).collect();
        want.sort();
        assert_eq!(held, want, "same address bits, other family or prefix length: other keys");
    }

    #[test]
    fn addresses_of_one_ipv6_prefix_share_a_count() {
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        c.add(key("2001:db8:1:2::1"), T0);
        c.add(key("2001:db8:1:2:ffff::9"), T0);
        assert_eq!(c.count(key("2001:db8:1:2::77"), T0), 2);
        assert_eq!(c.count(key("2001:db8:1:3::1"), T0), 0, "the neighbouring /64 is not counted");
    }

    #[test]
    fn a_table_sixty_percent_full_counts_every_key_exactly() {
        // the default 64 MiB holds 1,000,000 addresses at 60 %
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        let n = (c.capacity() * 3 / 5) as u32;
        for round in 0..4 {
            for i in 0..n {
                c.add(v4(i), T0 + round);
            }
        }
        let wrong = (0..n).filter(|&i| c.count(v4(i), T0 + 4) != 4).count();
        assert_eq!((wrong, c.evictions()), (0, 0));
        for i in 0..2_000 {
            assert_eq!(c.add(v4(n + i), T0 + 5), 1, "a fresh address's first failure is its first");
        }
    }

    #[test]
    fn past_capacity_keys_are_evicted_never_over_counted() {
        // eight times as many addresses as the table holds, failing 4 times each: most are
        // evicted, none is counted above its own failures, and a heavy hitter keeps its count
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        let n = c.capacity() as u32 * 8;
        let heavy = key("198.51.100.7");
        let (mut heavy_count, mut heavy_failures) = (0, 0);
        for round in 0..4 {
            for i in 0..n {
                assert!(c.add(v4(i), T0 + round) <= round as u32 + 1);
                if i % (n / 10) == 0 {
                    heavy_count = c.add(heavy, T0 + round);
                    heavy_failures += 1;
                }
            }
        }
        assert_eq!(heavy_count, heavy_failures, "the heavy hitter's count was lost");
        assert!(c.evictions() > u64::from(n));
        assert!(c.held(T0 + 4).iter().all(|(k, n)| *n <= if *k == heavy { heavy_failures } else { 4 }));
    }

    #[test]
    fn stale_entries_are_taken_over_without_eviction() {
        let c = FailureCounters::new(Duration::from_secs(80), MIB);
        let n = (c.capacity() * 3 / 5) as u32;
        for i in 0..n {
            c.add(v4(i), T0);
        }
        // a window later, as many others: they take the stale entries
        for i in 0..n {
            assert_eq!(c.add(v4(n + i), T0 + 100), 1);
        }
        assert_eq!(c.evictions(), 0);
        assert_eq!(c.count(v4(0), T0 + 100), 0);
    }

    #[test]
    fn memory_is_what_was_asked() {
        assert_eq!(ENTRY_BYTES, 40);
        for mib in [1, 64, 1000] {
            let c = FailureCounters::new(Duration::from_secs(600), mib * MIB);
            let slack = (c.locks.len() * WAYS * ENTRY_BYTES) as u64;
            assert!(c.bytes() as u64 <= mib * MIB && c.bytes() as u64 + slack > mib * MIB, "{mib} MiB");
        }
        assert!(FailureCounters::new(Duration::from_secs(600), 64 * MIB).capacity() > 1_600_000);
    }
}
