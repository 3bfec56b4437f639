//! The pregreet test (`[screen] pregreet`), sans-IO: the greeting's first line,
//! `220-<hostname> ESMTP`, then silence until `greet_wait` is over. A real MTA waits for
//! the end of the greeting; a bot often talks at once.
//!
//! ```text
//!   new ─► first line out (sent) ─► silence ─┬─ deadline ─► passed: the session's banner
//!                                            │              completes the greeting
//!                                            └─ any byte ─► talked early: 554 5.7.1,
//!                                                           close, a failure of the address
//! ```

use std::time::Instant;

/// How many of an early talker's octets the log shows.
const SHOWN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pregreet {
    /// Octets of the first line out.
    sent: usize,
    deadline: Instant,
}

impl Pregreet {
    pub fn new(deadline: Instant) -> Self {
        Pregreet { sent: 0, deadline }
    }

    /// What of `first` (the greeting's first line) is still to go out.
    pub fn output<'a>(&self, first: &'a [u8]) -> &'a [u8] {
        first.get(self.sent..).unwrap_or_default()
    }

    pub fn sent(&mut self, n: usize) {
        self.sent += n;
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Silent until the deadline: passed.
    pub fn passed(&self, now: Instant) -> bool {
        self.deadline <= now
    }

    /// The peer spoke first: its first octets, for the log.
    pub fn talked_early(bytes: &[u8]) -> Vec<u8> {
        bytes[..bytes.len().min(SHOWN)].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_line_then_silence_until_the_deadline() {
        let t0 = Instant::now();
        let mut p = Pregreet::new(t0 + Duration::from_secs(6));
        let first = b"220-mx.test ESMTP\r\n";
        assert_eq!(p.output(first), first);
        p.sent(4);
        assert_eq!(p.output(first), b"mx.test ESMTP\r\n");
        p.sent(15);
        assert!(p.output(first).is_empty());
        assert!(!p.passed(t0 + Duration::from_secs(5)));
        assert!(p.passed(t0 + Duration::from_secs(6)));
        assert_eq!(Pregreet::talked_early(b"EHLO bot.example.com\r\n"), b"EHLO bot.example");
    }
}
