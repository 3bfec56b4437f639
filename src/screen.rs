//! Screening before the banner (`[screen]`), and who passed it: a peer that passed is
//! remembered for `pass_ttl` and skips the tests on later connections.
//!
//! [`Passed`] is that memory: fixed, shared by the workers, lock-free. Each address has
//! two candidate slots (two keyed hashes); a slot holds a tag of the address (32 bits of a
//! randomly keyed hash) and the minute its pass ends. A new pass takes the slot already
//! holding the address, else an ended or empty one, else the one ending sooner: under a
//! flood of new addresses older passes are forgotten (those peers are screened again),
//! never mistaken for others but by a 32-bit tag collision.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::datetime::UnixTime;

/// Slots in the table: 8 bytes each, 1 MiB in all.
pub const SLOTS: usize = 1 << 17;

pub struct Passed {
    slots: Box<[AtomicU64]>,
    hashers: [ahash::RandomState; 2],
}

impl Default for Passed {
    fn default() -> Self {
        Passed {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hashers: [ahash::RandomState::new(), ahash::RandomState::new()],
        }
    }
}

/// A slot's value: the tag above, the minute the pass ends below.
fn pack(tag: u32, until_minute: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(until_minute)
}

fn minute(t: UnixTime) -> u32 {
    t.0.div_euclid(60).clamp(0, i64::from(u32::MAX)) as u32
}

impl Passed {
    /// The address's two slots, and its tag (never 0, which marks an empty slot).
    fn place(&self, ip: IpAddr) -> ([usize; 2], u32) {
        let [a, b] = &self.hashers;
        let (ha, hb) = (a.hash_one(ip), b.hash_one(ip));
        let tag = ((ha >> 32) as u32).max(1);
        ([ha as usize % SLOTS, hb as usize % SLOTS], tag)
    }

    /// `ip` passed, and its pass has not ended at `now`.
    pub fn holds(&self, ip: IpAddr, now: UnixTime) -> bool {
        let (slots, tag) = self.place(ip);
        let now = minute(now);
        slots.iter().any(|&i| {
            let v = self.slots[i].load(Ordering::Relaxed);
            (v >> 32) as u32 == tag && (v as u32) > now
        })
    }

    /// When the pass of `ip` ends, if it holds at `now`.
    pub fn until(&self, ip: IpAddr, now: UnixTime) -> Option<UnixTime> {
        let (slots, tag) = self.place(ip);
        slots
            .iter()
            .map(|&i| self.slots[i].load(Ordering::Relaxed))
            .filter(|v| (v >> 32) as u32 == tag && (*v as u32) > minute(now))
            .map(|v| UnixTime(i64::from(v as u32) * 60))
            .max()
    }

    /// `ip` passed at `now`: it skips screening until `now + ttl` (to the minute).
    pub fn remember(&self, ip: IpAddr, now: UnixTime, ttl: std::time::Duration) {
        let (slots, tag) = self.place(ip);
        let until = minute(UnixTime(now.0.saturating_add(ttl.as_secs() as i64))).max(minute(now) + 1);
        let current = minute(now);
        let values = slots.map(|i| self.slots[i].load(Ordering::Relaxed));
        let ended = |v: u64| v == 0 || (v as u32) <= current;
        let pick = if (values[0] >> 32) as u32 == tag {
            0
        } else if (values[1] >> 32) as u32 == tag || ended(values[1]) && !ended(values[0]) {
            1
        } else if ended(values[0]) {
            0
        } else if (values[1] as u32) < (values[0] as u32) {
            1
        } else {
            0
        };
        // a race with another worker costs at most one of the two passes: screened again
        self.slots[slots[pick]].store(pack(tag, until), Ordering::Relaxed);
    }

    /// Bytes the table holds (fixed, whatever the number of peers).
    pub fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<AtomicU64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from((0x0a00_0000 + i).to_be_bytes())
    }

    #[test]
    fn a_pass_holds_until_its_ttl() {
        let t = Passed::default();
        let now = UnixTime(1_800_000_000);
        assert!(!t.holds(ip(1), now));
        t.remember(ip(1), now, Duration::from_secs(3600));
        assert!(t.holds(ip(1), now) && t.holds(ip(1), UnixTime(now.0 + 3500)));
        assert!(!t.holds(ip(1), UnixTime(now.0 + 3600)), "ended");
        assert!(!t.holds(ip(2), now), "another address");
        assert_eq!(t.until(ip(1), now).map(|u| u.0 / 60), Some((now.0 + 3600) / 60));
    }

    #[test]
    fn fixed_memory_whatever_the_peers_and_recent_passes_kept() {
        let t = Passed::default();
        let now = UnixTime(1_800_000_000);
        let bytes = t.heap_bytes();
        for i in 0..1_000_000 {
            t.remember(ip(i), now, Duration::from_secs(86_400));
        }
        assert_eq!(t.heap_bytes(), bytes, "fixed");
        // the most recent passes are all held; older ones may have been pushed out
        let recent = (990_000..1_000_000).filter(|&i| t.holds(ip(i), now)).count();
        assert!(recent > 9_000, "{recent} of the last 10,000");
        let never = (2_000_000..2_100_000).filter(|&i| t.holds(ip(i), now)).count();
        assert!(never < 5, "{never} addresses never seen held (tag collisions only)");
    }
}
