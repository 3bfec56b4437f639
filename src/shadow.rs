//! Shadow mode, for rolling out access lists and abuse thresholds on a live edge: what a
//! candidate list (`[access] shadow_list`) would deny, and what bans the abuse rules
//! would make (`[abuse] shadow = true`), counted and logged but never enforced.
//!
//! The log is sampled, since a shadow verdict may hold for every connection of an
//! address: [`Sampler`] lets at most one line per address (or banned prefix) per minute
//! through, whatever the number of workers, in fixed memory.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of a [`Sampler`] (8 bytes each).
const SLOTS: usize = 4096;

/// At most one "yes" per key per minute, shared by the workers. Each slot holds a key's
/// tag (32 bits of a randomly keyed hash) and the minute it was let through; a slot taken
/// by another key within the same minute says no (the log is a sample, the counts are
/// not), so a key is never let through twice in one minute.
pub struct Sampler {
    slots: Box<[AtomicU64]>,
    hasher: ahash::RandomState,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(), hasher: ahash::RandomState::new() }
    }
}

impl Sampler {
    /// True when `key` was not let through yet in `minute` (seconds since the epoch / 60),
    /// and now is.
    pub fn first_this_minute(&self, key: impl Hash, minute: i64) -> bool {
        let hash = self.hasher.hash_one(key);
        let slot = &self.slots[(hash as usize) % SLOTS];
        // tag 0 would be read as an empty slot
        let tag = ((hash >> 32) as u32).max(1);
        let want = (u64::from(tag) << 32) | u64::from(minute as u32);
        let held = slot.load(Ordering::Relaxed);
        if held == want || (held != 0 && held as u32 == minute as u32) {
            return false;
        }
        slot.compare_exchange(held, want, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// What shadow mode shares: one sampler for the shadow list's log, one for the bans'.
#[derive(Default)]
pub struct Shadow {
    pub list: Sampler,
    pub bans: Sampler,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn once_per_key_per_minute() {
        let s = Sampler::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(s.first_this_minute(a, 100));
        assert!(!s.first_this_minute(a, 100), "twice in a minute");
        assert!(s.first_this_minute(a, 101), "again the next minute");
        assert!(!s.first_this_minute(a, 101));
    }

    #[test]
    fn never_twice_in_a_minute_whatever_shares_its_slot() {
        let s = Sampler::default();
        let addrs: Vec<IpAddr> = (0..20_000u32).map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes())).collect();
        let first: Vec<bool> = addrs.iter().map(|a| s.first_this_minute(a, 7)).collect();
        // more keys than slots: some are not sampled, none is let through twice
        assert!(first.iter().filter(|y| **y).count() <= SLOTS);
        assert!(first.iter().filter(|y| **y).count() > SLOTS / 2);
        for a in &addrs {
            assert!(!s.first_this_minute(a, 7));
        }
    }
}
