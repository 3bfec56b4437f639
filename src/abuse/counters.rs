//! Failures per address across conversations: exact counts in memory fixed at start.
//!
//! A bounded hash table of the keys that failed (an IPv4 address or an IPv6 prefix, see
//! [`AbuseKey`]): shards of [`SHARD_BUCKETS`] buckets, each shard behind a lock of its own,
//! each bucket [`WAYS`] entries on two cache lines. A randomly keyed hash gives a key its
//! shard and two buckets there (a peer can aim neither at another's entries nor at one
//! shard). An entry holds the whole key, so a count is the key's own: an address is banned
//! only when its own failures within the window reach the threshold, however many others
//! fail.
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
//! An entry is [`ENTRY_BYTES`]: the key, its prefix tag, the newest sub-window counted
//! and the sub-window counts. A failure reads and writes nothing but the two buckets'
//! four cache lines, all four asked for at once before the lock is taken: one trip to
//! memory a failure, however many keys are held (a line of heads per bucket with the
//! entries apart cost a second trip after the first), and a few dozen instructions
//! besides (see `State`), so that the next failure's trip starts while this one's ends.
//!
//! Two choices of four: 1,000,000 addresses fill the default 64 MiB to 48 %, where
//! filling it evicted 11 of them (measured; 431 at 60 %). Past capacity (more keys failing
//! within one window than the table holds, or two buckets full), what is lost is
//! counting, never exactness: an evicted key's failures are forgotten, so it may reach
//! the threshold later than it should or not at all; a key is never counted a failure
//! that was not its own. Keys with the most failures are the last evicted.
//!
//! Each entry keeps [`SUB_WINDOWS`] sub-window counts: a failure ages out within
//! `failure_window` plus an eighth, with no sweeping thread. A sub-window's count stops at
//! [`COUNT_MAX`] (a key that fails that often within one sub-window has reached any
//! threshold up to [`COUNT_MAX`] in that sub-window alone).
//!
//! Memory: `[abuse] counter_memory` / [`ENTRY_BYTES`] entries, mapped at start (pages
//! are touched as keys arrive) and never grown.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use ipnet::IpNet;

use super::AbuseKey;

/// Sub-windows per entry: a count ages out within `failure_window` plus an eighth.
pub const SUB_WINDOWS: usize = 8;
/// Entries per bucket: two cache lines.
pub const WAYS: usize = 4;
/// Buckets per shard (one lock): 64 KiB of the table.
pub const SHARD_BUCKETS: usize = 512;
/// Bytes one key takes: address (16), then newest sub-window (4), prefix tag (1) and
/// eight sub-window counts of `COUNT_BITS` (11).
pub const ENTRY_BYTES: usize = std::mem::size_of::<Bucket>() / WAYS;
/// Bits of one sub-window's count.
const COUNT_BITS: usize = 11;
/// Where a sub-window's count stops.
pub const COUNT_MAX: u16 = (1 << COUNT_BITS) - 1;

/// [`WAYS`] entries of four words: the address (two words), then the entry's [`State`]
/// over the last two (high word first). A third word of 0: never used. Atomics, so that
/// the workers share the buckets without `UnsafeCell`: every access is under the shard's
/// lock, with relaxed loads and stores (plain moves).
#[repr(C, align(128))]
#[derive(Debug)]
struct Bucket {
    entry: [[AtomicU64; 4]; WAYS],
}

impl Bucket {
    /// Entry `w`'s third word: its newest sub-window and tag (0: never used).
    fn head(&self, w: usize) -> u64 {
        self.entry[w][2].load(Relaxed)
    }

    fn addr(&self, w: usize) -> [u64; 2] {
        [self.entry[w][0].load(Relaxed), self.entry[w][1].load(Relaxed)]
    }

    fn state(&self, w: usize) -> State {
        State((u128::from(self.head(w)) << 64) | u128::from(self.entry[w][3].load(Relaxed)))
    }

    fn set(&self, w: usize, addr: [u64; 2], state: State) {
        let words = [addr[0], addr[1], (state.0 >> 64) as u64, state.0 as u64];
        for (atomic, word) in self.entry[w].iter().zip(words) {
            atomic.store(word, Relaxed);
        }
    }
}

/// An entry's state as one number: newest sub-window counted (bits 96..128), prefix tag
/// (88..96), and sub-window `s`'s count in the [`COUNT_BITS`] at
/// `COUNT_BITS × (s % SUB_WINDOWS)`, for `s` in `newest - 7 ..= newest`. Counted, aged
/// and summed in place (masks and shifts, no unpacking): a failure's work is a few dozen
/// instructions besides its trip to memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State(u128);

/// The counts' bits.
const COUNTS: u128 = (1 << (COUNT_BITS * SUB_WINDOWS)) - 1;

impl State {
    /// A key's state before its first failure, at sub-window `now`.
    fn new(tag: u8, now: u32) -> State {
        State((u128::from(now) << 96) | (u128::from(tag) << 88))
    }

    fn newest(self) -> u32 {
        (self.0 >> 96) as u32
    }

    /// Its failures within the window that ends with sub-window `now`: of the sub-windows
    /// it holds (`newest - 7 ..= newest`), those within `now - 7 ..= now`, which are the
    /// `8 - gap` up to the earlier of the two.
    fn sum(self, now: u32) -> u32 {
        let newest = self.newest();
        if newest == now {
            // the common case (a key failing again within a sub-window, a fresh key):
            // all eight
            return total(self.0 & COUNTS);
        }
        let gap = now.abs_diff(newest) as usize;
        if gap >= SUB_WINDOWS {
            return 0;
        }
        let first = (now.min(newest) as usize + 1 + gap) % SUB_WINDOWS;
        total(self.0 & fields(first, SUB_WINDOWS - gap))
    }

    /// The state after one more failure in sub-window `now`: sub-windows between the
    /// newest and `now` restarted, `now`'s count one more (stopping at [`COUNT_MAX`]).
    fn count(self, now: u32) -> State {
        let (mut bits, mut newest) = (self.0, self.newest());
        if now > newest {
            let restarted = (now - newest).min(SUB_WINDOWS as u32) as usize;
            bits &= !fields((newest as usize + 1) % SUB_WINDOWS, restarted);
            newest = now;
            bits = (bits & !(u128::from(u32::MAX) << 96)) | (u128::from(newest) << 96);
        }
        // a clock that went back: the failure is counted in the oldest sub-window held, at
        // worst ageing out later than it should
        let at = now.max(newest.saturating_sub(SUB_WINDOWS as u32 - 1)) as usize % SUB_WINDOWS;
        if (bits >> (COUNT_BITS * at)) as u16 & COUNT_MAX < COUNT_MAX {
            bits += 1 << (COUNT_BITS * at);
        }
        State(bits)
    }
}

/// The bits of `n` counts from index `first` on, wrapping after the last.
fn fields(first: usize, n: usize) -> u128 {
    let run = if n >= SUB_WINDOWS { COUNTS } else { (1 << (COUNT_BITS * n)) - 1 };
    let at = COUNT_BITS * first;
    ((run << at) | (run >> (COUNT_BITS * SUB_WINDOWS - at))) & COUNTS
}

/// The sum of the counts in `bits` (fields outside [`COUNTS`] cleared): adjacent counts
/// added into four slots of twice the width, then the four into the top slot by one
/// multiplication (each partial sum fits its slot: 4 × 4,094 < 2²²).
fn total(bits: u128) -> u32 {
    const B: usize = COUNT_BITS;
    const SLOTS: [usize; 4] = [0, 2 * B, 4 * B, 6 * B];
    const EVEN: u128 = (COUNT_MAX as u128) << SLOTS[0]
        | (COUNT_MAX as u128) << SLOTS[1]
        | (COUNT_MAX as u128) << SLOTS[2]
        | (COUNT_MAX as u128) << SLOTS[3];
    const SPREAD: u128 = 1 << SLOTS[0] | 1 << SLOTS[1] | 1 << SLOTS[2] | 1 << SLOTS[3];
    let pairs = (bits & EVEN) + ((bits >> B) & EVEN);
    ((pairs.wrapping_mul(SPREAD) >> SLOTS[3]) & ((1 << (2 * B)) - 1)) as u32
}

/// The newest sub-window in an entry's third word.
fn newest_of(head: u64) -> u32 {
    (head >> 32) as u32
}

/// The prefix tag in an entry's third word.
fn tag_of(head: u64) -> u8 {
    (head >> 24) as u8
}

/// No failure counted up to `newest` counts at `now` any longer.
fn stale(newest: u32, now: u32) -> bool {
    newest.saturating_add(SUB_WINDOWS as u32) <= now
}

/// A key as an entry holds it: address bits and prefix tag (`1 + prefix length` for
/// IPv4, `34 + prefix length` for IPv6: never 0).
fn encode(key: AbuseKey) -> ([u64; 2], u8) {
    let net = key.net();
    let len = net.prefix_len();
    match net {
        IpNet::V4(n) => ([0, u64::from(u32::from(n.addr()))], 1 + len),
        IpNet::V6(n) => {
            let a = u128::from(n.addr());
            ([(a >> 64) as u64, a as u64], 34 + len)
        }
    }
}

/// A shard's lock, on a cache line of its own, and how many keys were evicted from its
/// buckets. A spin lock: it is held for one look-up and one write (a few hundred
/// nanoseconds, nothing that can block), and let go with a plain store, so a failure
/// costs one locked instruction where `std`'s mutex takes two (it swaps on unlock, to
/// wake sleepers). A waiter spins a while, then yields its core.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Lock {
    held: AtomicBool,
    evictions: AtomicU64,
}

/// A shard's lock held; let go when dropped.
struct Held<'a>(&'a Lock);

impl Lock {
    fn lock(&self) -> Held<'_> {
        let mut spins = 0u32;
        while self.held.swap(true, Acquire) {
            while self.held.load(Relaxed) {
                if spins < 100 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        Held(self)
    }
}

impl Held<'_> {
    fn evicted(&self) {
        // under the lock: no other writer
        self.0.evictions.store(self.0.evictions.load(Relaxed).saturating_add(1), Relaxed);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.store(false, Release);
    }
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
        self.locks.iter().map(|l| l.evictions.load(Relaxed)).sum()
    }

    /// Adds one failure of `key` at `now` (seconds since the epoch); returns its count
    /// within the window, this failure included.
    pub fn add(&self, key: AbuseKey, now: i64) -> u32 {
        let now = self.sub_window(now);
        let (addr, tag) = encode(key);
        let (shard, b1, b2) = self.place(addr, tag);
        let buckets = self.shard(shard);
        prefetch(&buckets[b1]);
        prefetch(&buckets[b2]);
        let held = self.locks[shard].lock();
        let (b, w, state) = match find(buckets, [b1, b2], addr, tag, now) {
            Found::Held(b, w) => (b, w, buckets[b].state(w)),
            found @ (Found::Free(b, w) | Found::Full(b, w)) => {
                if matches!(found, Found::Full(..)) {
                    held.evicted();
                }
                (b, w, State::new(tag, now))
            }
        };
        let state = state.count(now);
        buckets[b].set(w, addr, state);
        drop(held);
        state.sum(now)
    }

    /// The count of `key` within the window at `now`.
    pub fn count(&self, key: AbuseKey, now: i64) -> u32 {
        let now = self.sub_window(now);
        let (addr, tag) = encode(key);
        let (shard, b1, b2) = self.place(addr, tag);
        let buckets = self.shard(shard);
        let _held = self.locks[shard].lock();
        match find(buckets, [b1, b2], addr, tag, now) {
            Found::Held(b, w) => buckets[b].state(w).sum(now),
            Found::Free(..) | Found::Full(..) => 0,
        }
    }

    /// Shard `i`'s buckets (to be read and written under its lock only).
    fn shard(&self, i: usize) -> &[Bucket] {
        &self.buckets[i * self.per_shard..(i + 1) * self.per_shard]
    }

    /// The shard of the key `addr`, `tag` and its two buckets there.
    fn place(&self, addr: [u64; 2], tag: u8) -> (usize, usize, usize) {
        let h = self.hasher.hash_one((addr, tag));
        // multiply-shift: the high half picks the shard, each quarter of the low half a
        // bucket
        let shard = ((u128::from(h >> 32) * self.locks.len() as u128) >> 32) as usize;
        let bucket = |bits: u64| (((bits & 0xffff) * self.per_shard as u64) >> 16) as usize;
        (shard, bucket(h), bucket(h >> 16))
    }

    fn sub_window(&self, now: i64) -> u32 {
        // u32 sub-windows of at least a second last until 2106; sub-window 0 (1970) is
        // never used, so that a used entry's third word is never 0
        u32::try_from(now.max(0) as u64 / self.sub_window_secs).unwrap_or(u32::MAX).max(1)
    }
}

/// Where the key `addr`, `tag` is held in its buckets, or the entry it takes.
fn find(buckets: &[Bucket], choices: [usize; 2], addr: [u64; 2], tag: u8, now: u32) -> Found {
    // both buckets, even where they are one (then read twice: whatever it holds is found
    // in the first, and a tie goes to the first)
    let pair = choices.map(|b| &buckets[b]);
    // per bucket: its first free entry and how many live keys it holds
    let (mut free, mut live) = ([None; 2], [0; 2]);
    for (c, bucket) in pair.iter().enumerate() {
        for w in 0..WAYS {
            let head = bucket.head(w);
            if head == 0 || stale(newest_of(head), now) {
                free[c] = free[c].or(Some(w));
            } else {
                live[c] += 1;
            }
            if head != 0 && tag_of(head) == tag && bucket.addr(w) == addr {
                return Found::Held(choices[c], w);
            }
        }
    }
    let fewer = usize::from(free[1].is_some() && (free[0].is_none() || live[1] < live[0]));
    if let Some(w) = free[fewer] {
        return Found::Free(choices[fewer], w);
    }
    // fewest failures, then least recently counted, then first: one number each (sum,
    // newest sub-window, place), so that the least is found without a branch
    let least = (0..2 * WAYS)
        .map(|i| {
            let state = pair[i / WAYS].state(i % WAYS);
            (u64::from(state.sum(now)) << 35) | (u64::from(state.newest()) << 3) | i as u64
        })
        .min()
        .unwrap_or(0) as usize
        & (2 * WAYS - 1);
    Found::Full(choices[least / WAYS], least % WAYS)
}

/// Starts loading a bucket's two cache lines while the lock is taken.
#[inline]
fn prefetch(bucket: &Bucket) {
    #[cfg(target_arch = "x86_64")]
    for half in [&bucket.entry[0], &bucket.entry[WAYS / 2]] {
        // SAFETY: SSE is in every x86-64 CPU, and a prefetch reads nothing the program
        // sees (a hint to the cache, of a line of a live reference)
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(std::ptr::from_ref(half).cast())
        };
    }
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
                    let n = bucket.state(w).sum(now);
                    if bucket.head(w) != 0 && n > 0 {
                        held.push((decode(bucket.addr(w), tag_of(bucket.head(w))), n));
                    }
                }
            }
            held
        }
    }

    fn decode(addr: [u64; 2], tag: u8) -> AbuseKey {
        let net = if tag < 34 {
            IpNet::new(IpAddr::V4((addr[1] as u32).into()), tag - 1)
        } else {
            IpNet::new(IpAddr::V6(((u128::from(addr[0]) << 64) | u128::from(addr[1])).into()), tag - 34)
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
        let mut state = State::new(33, 100);
        for (s, n) in [(100, 3), (103, 2), (107, 1)] {
            for _ in 0..n {
                state = state.count(s);
            }
        }
        assert_eq!(state.sum(107), 6);
        assert_eq!(state.sum(108), 3, "sub-window 100 left the window");
        assert_eq!(state.sum(111), 1);
        assert_eq!(state.sum(115), 0);
        assert!(!stale(state.newest(), 114) && stale(state.newest(), 115));
        state = state.count(109); // restarts 108 and 109, which share fields with 100 and 101
        assert_eq!(state.sum(109), 4);
        assert_eq!(state.sum(104), 2, "asked about an earlier moment: what was counted up to it");
        state = state.count(90); // a clock far behind: counted in the oldest held (102)
        assert_eq!((state.newest(), state.sum(109)), (109, 5));
        assert_eq!(state.0 >> 88 & 0xff, 33, "the tag is kept");
        // every count at its limit: the sum is whole
        let full = State(State::new(1, 8).0 | COUNTS);
        assert_eq!((full.sum(8), full.count(8)), (8 * u32::from(COUNT_MAX), full));
        assert_eq!(full.sum(12), 4 * u32::from(COUNT_MAX));
    }

    #[test]
    fn sums_in_place_are_the_counts_added_one_by_one() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            // counts at random, at their limit, or 0; a window anywhere near the newest
            let counts: [u16; SUB_WINDOWS] = std::array::from_fn(|_| match round % 3 {
                0 => next() as u16 & COUNT_MAX,
                1 => COUNT_MAX,
                _ => [0, 1, COUNT_MAX][next() as usize % 3],
            });
            let newest = 1_000 + (next() % 8) as u32;
            let now = newest + (next() % 20) as u32 - 10;
            let mut state = State::new(33, newest);
            for (i, &c) in counts.iter().enumerate() {
                state.0 |= u128::from(c) << (COUNT_BITS * i);
            }
            let want: u32 = (newest - 7..=newest)
                .filter(|&s| s <= now && now - s < SUB_WINDOWS as u32)
                .map(|s| u32::from(counts[s as usize % SUB_WINDOWS]))
                .sum();
            assert_eq!(state.sum(now), want, "{counts:?} newest {newest} now {now}");
        }
    }

    #[test]
    fn two_threads_lose_no_update() {
        let c = FailureCounters::new(Duration::from_secs(600), MIB);
        let k = key("192.0.2.9");
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        c.add(k, T0);
                    }
                });
            }
        });
        assert_eq!(c.count(k, T0), 2_000);
    }

    #[test]
    fn a_sub_windows_count_stops_at_its_limit() {
        let c = FailureCounters::new(Duration::from_secs(80), MIB);
        let k = key("192.0.2.11");
        for _ in 0..3_000 {
            c.add(k, T0);
        }
        assert_eq!(c.count(k, T0), u32::from(COUNT_MAX));
        assert_eq!(c.add(k, T0 + 10), u32::from(COUNT_MAX) + 1);
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
    fn a_table_under_half_full_counts_every_key_it_keeps_exactly() {
        // the default 64 MiB holds 1,000,000 addresses at 48 %
        let c = FailureCounters::new(Duration::from_secs(600), 4 * MIB);
        let n = (c.capacity() * 48 / 100) as u32;
        for round in 0..4 {
            for i in 0..n {
                c.add(v4(i), T0 + round);
            }
        }
        let counts: Vec<u32> = (0..n).map(|i| c.count(v4(i), T0 + 4)).collect();
        assert!(counts.iter().all(|&k| k <= 4), "a key counted a failure not its own");
        let short = counts.iter().filter(|&&k| k < 4).count() as u64;
        assert!(short <= c.evictions(), "{short} counts short, {} evictions", c.evictions());
        assert!(c.evictions() <= u64::from(n) / 1_000, "{} evictions for {n} keys", c.evictions());
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
        // a few failures ahead of the flood: never the fewest in its buckets
        let (mut heavy_count, mut heavy_failures) = (0, 3);
        for _ in 0..heavy_failures {
            c.add(heavy, T0);
        }
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
        let filling = c.evictions();
        // a window later, a quarter as many others: they take the stale entries
        for i in 0..n / 4 {
            assert_eq!(c.add(v4(n + i), T0 + 100), 1);
        }
        assert_eq!(c.evictions(), filling);
        assert_eq!(c.count(v4(0), T0 + 100), 0);
    }

    #[test]
    fn memory_is_what_was_asked() {
        assert_eq!(ENTRY_BYTES, 32);
        for mib in [1, 64, 1000] {
            let c = FailureCounters::new(Duration::from_secs(600), mib * MIB);
            let slack = (c.locks.len() * WAYS * ENTRY_BYTES) as u64;
            assert!(c.bytes() as u64 <= mib * MIB && c.bytes() as u64 + slack > mib * MIB, "{mib} MiB");
        }
        assert!(FailureCounters::new(Duration::from_secs(600), 64 * MIB).capacity() > 2_000_000);
    }
}
