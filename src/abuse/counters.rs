//! Failures per address across conversations, in memory fixed at start.
//!
//! A count-min sketch of atomic slots: a key counts in one slot of each of [`ROWS`] rows,
//! chosen by a randomly keyed hash (a peer cannot aim at another's slots), and its count
//! is the least of its slots. Each slot keeps [`SUB_WINDOWS`] sub-window counts, each
//! tagged with the sub-window it counts, so counts age out an eighth of the window at a
//! time with no sweeping thread.
//!
//! What a collision can and cannot cause: a slot shared by two keys holds both their
//! counts, so a key's count is never less than its true count: an address that fails
//! `failure_threshold` times is always promoted (a heavy hitter is never missed, however
//! many other addresses fail). A key is over-counted only when every one of its slots is
//! shared with failing keys, so an address may be banned early when very many distinct
//! addresses fail within one window: with 100,000 distinct addresses failing once each
//! per window, a slot holds ~3 failures of others, and both of a key's slots must hold
//! `failure_threshold` together with its own. Every failure grows both slots: growing only
//! the least (conservative update) would let a key's count fall below its true count once
//! the other failures in its slot age out, and a heavy hitter could then be missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::AbuseKey;

/// Rows of the sketch.
pub const ROWS: usize = 2;
/// Slots per row. 2 rows × 32,768 slots × 64 bytes = 4 MiB, whatever the addresses.
pub const SLOTS: usize = 1 << 15;
/// Sub-windows per slot: a count ages out within `failure_window` plus an eighth.
pub const SUB_WINDOWS: usize = 8;

/// One key's counts in one row: a cache line of its own, so cores counting different
/// keys never write the same line (no false sharing). Each word is a sub-window's
/// number (high 32 bits) and its count (low 32 bits).
#[repr(align(64))]
struct Slot([AtomicU64; SUB_WINDOWS]);

pub struct FailureCounters {
    hasher: ahash::RandomState,
    slots: Box<[Slot]>,
    sub_window_secs: u64,
}

impl std::fmt::Debug for FailureCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureCounters").field("bytes", &self.bytes()).finish()
    }
}

impl FailureCounters {
    /// Counters whose counts cover `window`.
    pub fn new(window: Duration) -> Self {
        let slots = (0..ROWS * SLOTS).map(|_| Slot(std::array::from_fn(|_| AtomicU64::new(0)))).collect();
        let sub_window_secs = (window.as_secs() / SUB_WINDOWS as u64).max(1);
        FailureCounters { hasher: ahash::RandomState::new(), slots, sub_window_secs }
    }

    /// Memory held by the counters: fixed at construction.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    /// Adds one failure of `key` at `now` (seconds since the epoch); returns its count
    /// within the window, this failure included.
    pub fn add(&self, key: AbuseKey, now: i64) -> u32 {
        let epoch = self.epoch(now);
        let slots = self.slots_of(key);
        for slot in slots {
            bump(&slot.0[epoch as usize % SUB_WINDOWS], epoch);
        }
        slots.into_iter().map(|s| self.sum(s, epoch)).min().unwrap_or(0)
    }

    /// The count of `key` within the window at `now`.
    pub fn count(&self, key: AbuseKey, now: i64) -> u32 {
        let epoch = self.epoch(now);
        self.slots_of(key).into_iter().map(|s| self.sum(s, epoch)).min().unwrap_or(0)
    }

    fn epoch(&self, now: i64) -> u32 {
        // u32 sub-windows of at least a second last until 2106
        (now.max(0) as u64 / self.sub_window_secs) as u32
    }

    fn slots_of(&self, key: AbuseKey) -> [&Slot; ROWS] {
        let h = self.hasher.hash_one(key);
        [&self.slots[(h as usize) % SLOTS], &self.slots[SLOTS + ((h >> 32) as usize) % SLOTS]]
    }

    fn sum(&self, slot: &Slot, epoch: u32) -> u32 {
        slot.0
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .filter(|&w| epoch.wrapping_sub((w >> 32) as u32) < SUB_WINDOWS as u32)
            .fold(0u32, |sum, w| sum.saturating_add(w as u32))
    }
}

/// One more in `word` for sub-window `epoch`, restarting it when it held an older one.
fn bump(word: &AtomicU64, epoch: u32) {
    let mut current = word.load(Ordering::Relaxed);
    loop {
        if (current >> 32) as u32 == epoch {
            // the common case: one atomic add (a count reaching 2^32 in one sub-window
            // would need that many failures from one address in seconds)
            word.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let restarted = (u64::from(epoch) << 32) | 1;
        match word.compare_exchange_weak(current, restarted, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerIp;

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    const T0: i64 = 1_795_894_760;

    #[test]
    fn counts_age_out_over_the_window() {
        let c = FailureCounters::new(Duration::from_secs(80)); // sub-windows of 10 s
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
    fn two_threads_lose_no_update() {
        let c = FailureCounters::new(Duration::from_secs(600));
        let k = key("192.0.2.9");
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..1_000_000 {
                        c.add(k, T0);
                    }
                });
            }
        });
        assert_eq!(c.count(k, T0), 2_000_000);
    }

    #[test]
    fn two_threads_restarting_a_sub_window_lose_no_update() {
        // sub-windows of 10 s: each round reuses the same word for a sub-window 80 s later,
        // so both threads race to restart it
        let c = FailureCounters::new(Duration::from_secs(80));
        let k = key("192.0.2.10");
        let barrier = std::sync::Barrier::new(2);
        let counts: Vec<Vec<u32>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..10_000)
                            .map(|round| {
                                let now = T0 + round * 80;
                                barrier.wait();
                                c.add(k, now);
                                barrier.wait();
                                c.count(k, now)
                            })
                            .collect()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (thread, counts) in counts.iter().enumerate() {
            let wrong: Vec<_> = counts.iter().enumerate().filter(|(_, n)| **n != 2).take(5).collect();
            assert!(wrong.is_empty(), "thread {thread}: rounds whose two failures were not both counted: {wrong:?}");
        }
    }

    #[test]
    fn a_heavy_hitter_among_ten_million_addresses_is_counted_in_fixed_memory() {
        let c = FailureCounters::new(Duration::from_secs(600));
        let bytes = c.bytes();
        let heavy = key("198.51.100.7");
        let mut seen = 0;
        for i in 0..10_000_000u32 {
            // distinct addresses outside 198.51.100.0/24, all within one window
            c.add(AbuseKey::new(PeerIp::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()), 64), T0 + 500);
            if i % 333_333 == 0 {
                seen = c.add(heavy, T0 + 500);
            }
        }
        assert!(seen >= 30, "the heavy hitter's 30 failures were counted as {seen}");
        assert_eq!(c.bytes(), bytes);
        assert_eq!(bytes, ROWS * SLOTS * 64);
    }

    #[test]
    fn addresses_of_one_ipv6_prefix_share_a_count() {
        let c = FailureCounters::new(Duration::from_secs(600));
        c.add(key("2001:db8:1:2::1"), T0);
        c.add(key("2001:db8:1:2:ffff::9"), T0);
        assert_eq!(c.count(key("2001:db8:1:2::77"), T0), 2);
        assert_eq!(c.count(key("2001:db8:1:3::1"), T0), 0, "the neighbouring /64 is not counted");
    }
}
