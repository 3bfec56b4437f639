//! Deadlines of one worker's connections, nearest first.
//!
//! Each connection keeps at most one entry armed (`armed`): a deadline that moves later,
//! the usual case (each command pushes the idle deadline out), needs no heap operation;
//! when the armed entry comes due the connection's real deadline is checked and, if it
//! moved, armed again. A closed connection's entry stays until it comes due, so the heap
//! is compacted whenever it holds more than twice the live connections (plus slack):
//! its size stays proportional to the connections open, whatever the churn.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use slab::Slab;

/// A connection: its slab key and the generation that tells reuses of a key apart.
pub type ConnId = (usize, u32);

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, ConnId)>>,
}

impl Timers {
    /// Makes sure an entry fires no later than `deadline`. `armed` is the connection's
    /// record of its entry in the heap.
    pub fn arm(&mut self, armed: &mut Option<Instant>, deadline: Option<Instant>, id: ConnId) {
        if let Some(d) = deadline
            && armed.is_none_or(|a| d < a)
        {
            self.heap.push(Reverse((d, id)));
            *armed = Some(d);
        }
    }

    /// The nearest entry's time.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops the entries that are no connection's armed one, when they outnumber the
    /// live connections. `armed(id)` is that connection's armed time (`None`: gone).
    pub fn compact(&mut self, live: usize, armed: impl Fn(ConnId) -> Option<Option<Instant>>) {
        if self.heap.len() > 2 * live + COMPACT_SLACK {
            self.heap.retain(|Reverse((at, id))| armed(*id) == Some(Some(*at)));
        }
    }

    /// Pops one entry due at `now`, with the time it was armed for.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, ConnId)> {
        if self.next()? <= now { self.heap.pop().map(|Reverse(e)| e) } else { None }
    }
}

/// Entries allowed beyond twice the live connections before a compaction.
const COMPACT_SLACK: usize = 1024;

impl Timers {
    /// Pops the entries due at `now` and returns the connections whose deadline has
    /// really come; the others are armed again at their real deadline. `timer(conn)`
    /// gives a connection's generation, its armed record and its session's deadline.
    pub fn expired<C>(
        &mut self,
        now: Instant,
        conns: &mut Slab<C>,
        timer: impl Fn(&mut C) -> (u32, &mut Option<Instant>, Option<Instant>),
    ) -> Vec<usize> {
        let mut due = Vec::new();
        while let Some((at, (key, generation))) = self.pop_due(now) {
            let Some(conn) = conns.get_mut(key) else { continue };
            let (current, armed, deadline) = timer(conn);
            if current != generation {
                continue;
            }
            if *armed == Some(at) {
                *armed = None;
            }
            match deadline {
                Some(d) if d <= now => due.push(key),
                later => self.arm(armed, later, (key, generation)),
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_order_and_only_when_due() {
        let now = Instant::now();
        let mut t = Timers::default();
        let (mut a, mut b) = (None, None);
        t.arm(&mut a, Some(now + Duration::from_secs(2)), (1, 1));
        t.arm(&mut b, Some(now + Duration::from_secs(1)), (2, 1));
        // a later deadline for an armed connection needs no new entry
        t.arm(&mut a, Some(now + Duration::from_secs(3)), (1, 1));
        assert_eq!(t.heap.len(), 2);
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.pop_due(now + Duration::from_secs(5)).map(|e| e.1), Some((2, 1)));
        assert_eq!(t.pop_due(now + Duration::from_secs(5)).map(|e| e.1), Some((1, 1)));
        assert_eq!(t.pop_due(now + Duration::from_secs(5)), None);
    }

    #[test]
    fn churn_of_closed_connections_stays_bounded() {
        let now = Instant::now();
        let mut t = Timers::default();
        let mut live: std::collections::HashMap<ConnId, Option<Instant>> = Default::default();
        for i in 0..100_000u32 {
            let id = (i as usize % 50, i);
            let mut armed = None;
            t.arm(&mut armed, Some(now + Duration::from_secs(300)), id);
            live.insert(id, armed);
            // the connection closes at once; only 10 stay open
            if i >= 10 {
                live.remove(&(i as usize % 50, i));
            }
            t.compact(live.len(), |id| live.get(&id).copied());
        }
        assert!(t.heap.len() <= 2 * live.len() + COMPACT_SLACK + 1, "{}", t.heap.len());
        // the open connections' entries survive compaction
        for id in live.keys() {
            assert!(t.heap.iter().any(|Reverse((_, e))| e == id));
        }
    }
}
