//! Open connections, in total and per address, for the gate's concurrency limits.
//!
//! Per address the counts live in a count-min sketch of atomic counters like the failure
//! counters (2 rows × 32,768 × 4 bytes = 256 KiB, whatever the addresses): a count is
//! never below the true one, so an address can never hold more than its limit; it can be
//! over-counted only when both its counters are shared with busy addresses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::AbuseKey;

const ROWS: usize = 2;
const SLOTS: usize = 1 << 15;

/// Why a connection is refused before the banner (the gate says it to the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections_per_ip`.
    PerAddress,
    /// `listen.max_connections`.
    Total,
}

pub struct Connections {
    hasher: ahash::RandomState,
    per_address: Box<[AtomicU32]>,
    total: AtomicU32,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            hasher: ahash::RandomState::new(),
            per_address: (0..ROWS * SLOTS).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU32::new(0),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("total", &self.total()).finish()
    }
}

impl Connections {
    /// Counts a new connection of `key` unless it would pass a limit. A whitelisted
    /// peer is counted in the total but never refused, and not counted per address.
    pub fn admit(
        self: &Arc<Self>,
        key: AbuseKey,
        whitelisted: bool,
        max_total: u32,
        max_per_address: u32,
    ) -> Result<Admission, Limit> {
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        let mut admission = Admission { connections: Arc::clone(self), slots: None };
        if whitelisted {
            return Ok(admission);
        }
        if total > max_total {
            return Err(Limit::Total); // dropping the admission takes the count back
        }
        let slots = self.slots(key);
        let count = slots.iter().map(|&i| self.per_address[i].fetch_add(1, Ordering::AcqRel) + 1).min().unwrap_or(0);
        admission.slots = Some(slots);
        if count > max_per_address {
            return Err(Limit::PerAddress);
        }
        Ok(admission)
    }

    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Open connections counted for `key` (never less than the true number).
    pub fn of(&self, key: AbuseKey) -> u32 {
        self.slots(key).iter().map(|&i| self.per_address[i].load(Ordering::Acquire)).min().unwrap_or(0)
    }

    fn slots(&self, key: AbuseKey) -> [usize; ROWS] {
        let h = self.hasher.hash_one(key);
        [(h as usize) % SLOTS, SLOTS + ((h >> 32) as usize) % SLOTS]
    }
}

/// One admitted connection; dropping it (when the connection is freed) counts it out.
#[derive(Debug)]
pub struct Admission {
    connections: Arc<Connections>,
    slots: Option<[usize; ROWS]>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.connections.total.fetch_sub(1, Ordering::AcqRel);
        for i in self.slots.into_iter().flatten() {
            self.connections.per_address[i].fetch_sub(1, Ordering::AcqRel);
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

    #[test]
    fn limits_are_exact_and_counted_out_on_drop() {
        let c = Arc::new(Connections::default());
        let a = key("192.0.2.1");
        let held: Vec<_> = (0..3).map(|_| c.admit(a, false, 100, 3).unwrap()).collect();
        assert_eq!(c.admit(a, false, 100, 3).unwrap_err(), Limit::PerAddress);
        assert_eq!(c.of(a), 3, "the refused one is counted out");
        assert!(c.admit(key("192.0.2.2"), false, 100, 3).is_ok(), "another address");
        let white: Vec<_> = (0..10).map(|_| c.admit(a, true, 100, 3).unwrap()).collect();
        assert_eq!(c.of(a), 3, "whitelisted peers are not counted per address");
        assert_eq!(c.total(), 13);
        assert_eq!(c.admit(key("192.0.2.3"), false, 13, 3).unwrap_err(), Limit::Total);
        assert!(c.admit(a, true, 13, 3).is_ok(), "whitelisted peers are never refused");
        drop(white);
        drop(held);
        assert_eq!((c.total(), c.of(a)), (0, 0));
        assert!(c.admit(a, false, 100, 3).is_ok());
    }
}
