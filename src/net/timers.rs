//! Deadlines of one worker's connections, nearest first.
//!
//! Each connection keeps at most one entry armed (`armed`): a deadline that moves later,
//! the usual case (each command pushes the idle deadline out), needs no heap operation;
//! when the armed entry comes due the connection's real deadline is checked and, if it
//! moved, armed again. So the heap holds about one entry per connection.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

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

    /// Pops one entry due at `now`, with the time it was armed for.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, ConnId)> {
        if self.next()? <= now { self.heap.pop().map(|Reverse(e)| e) } else { None }
    }
}

/// Called with an entry popped for a connection: forgets it if it was the armed one.
pub fn disarm(armed: &mut Option<Instant>, fired: Instant) {
    if *armed == Some(fired) {
        *armed = None;
    }
}
