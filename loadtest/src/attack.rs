//! Hostile peers, sans-IO like [`crate::peer::Peer`].
//!
//! ```text
//!  dictionary, one address:  220 ─EHLO─MAIL─► RCPT unknown ─550─► RCPT unknown ... ─421─► Dropped
//!                            │                                      (the server closes)
//!                            └─ the next connection from the same address, until the
//!                               first line is the ban line (Banned), then once more to
//!                               see the ban still in force (Confirmed); next address
//!  slow: 220 ─► silence, or one byte a second of an endless line ─► 421 ─► close (CutOff)
//! ```

use std::time::{Duration, Instant};

use crate::peer::{Event, Failure};

/// Conversations one attacking address may take to be banned before it counts as a failure.
pub const MAX_CONVERSATIONS: u32 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    /// A whitelisted attacker, seen unbanned, leaves.
    Quit,
    /// Dropped or banned: only the close is left.
    Closing,
}

/// Conversations a whitelisted attacker makes before it checks it was not banned (enough
/// failures to pass the default `failure_threshold` of 30, dropped at 11 each).
pub const WHITELISTED_CONVERSATIONS: u32 = 4;

/// One attacking address's dictionary attack, over as many connections as it takes.
pub struct Dictionary {
    domain: String,
    ban_line: String,
    /// A whitelisted address: never banned, only dropped.
    whitelisted: bool,
    step: Step,
    address_started: Instant,
    dropped: bool,
    banned: bool,
    /// The ban was seen again on a later connection: this address is done.
    confirmed: bool,
    conversations: u32,
    tried: u64,
    line: Vec<u8>,
    out: Vec<u8>,
    pub events: Vec<Event>,
}

impl Dictionary {
    pub fn new(domain: &str, ban_line: &str, whitelisted: bool, now: Instant) -> Self {
        Dictionary {
            domain: domain.to_owned(),
            ban_line: ban_line.to_owned(),
            whitelisted,
            step: Step::Greeting,
            address_started: now,
            dropped: false,
            banned: false,
            confirmed: false,
            conversations: 1,
            tried: 0,
            line: Vec::new(),
            out: Vec::new(),
            events: Vec::new(),
        }
    }

    /// A new address: everything from the start.
    pub fn restart(&mut self, now: Instant) {
        let (domain, ban_line) = (std::mem::take(&mut self.domain), std::mem::take(&mut self.ban_line));
        let events = std::mem::take(&mut self.events);
        *self = Dictionary { events, ..Dictionary::new(&domain, &ban_line, self.whitelisted, now) };
    }

    /// The next connection comes from the same address (it is not banned and seen so yet).
    pub fn same_source(&self) -> bool {
        !self.confirmed
    }

    /// The same address connects again.
    pub fn reconnect(&mut self) {
        self.conversations += 1;
        self.step = Step::Greeting;
        self.line.clear();
        self.out.clear();
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn sent(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    pub fn finished(&self) -> bool {
        self.step == Step::Closing
    }

    pub fn eof(&mut self) -> Result<(), Failure> {
        if self.step == Step::Closing { Ok(()) } else { Err(Failure::Closed) }
    }

    pub fn input(&mut self, bytes: &[u8], now: Instant) -> Result<(), Failure> {
        let mut rest = bytes;
        while let Some(lf) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..lf]);
            rest = &rest[lf + 1..];
            let line = std::mem::take(&mut self.line);
            self.reply(line.strip_suffix(b"\r").unwrap_or(&line), now)?;
        }
        if self.line.len() + rest.len() > 4096 {
            return Err(Failure::Malformed);
        }
        self.line.extend_from_slice(rest);
        Ok(())
    }

    fn reply(&mut self, line: &[u8], now: Instant) -> Result<(), Failure> {
        let since = now.saturating_duration_since(self.address_started);
        if self.step == Step::Greeting && line.starts_with(self.ban_line.as_bytes()) {
            if self.whitelisted {
                return Err(Failure::WhitelistedBanned);
            }
            if self.banned {
                self.confirmed = true;
                self.events.push(Event::Confirmed);
            } else if self.dropped {
                self.banned = true;
                self.events.push(Event::Banned(since));
            } else {
                // banned before it failed at all: its prefix was escalated
                self.banned = true;
                self.events.push(Event::BannedOnSight);
            }
            self.step = Step::Closing;
            return Ok(());
        }
        if line.get(3) == Some(&b'-') {
            return Ok(());
        }
        let code = line.get(..3).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code else { return Err(Failure::Malformed) };
        if code == 421 && self.step != Step::Greeting {
            if !self.dropped {
                self.dropped = true;
                self.events.push(Event::Dropped(since));
            }
            self.step = Step::Closing;
            return Ok(());
        }
        if self.conversations > MAX_CONVERSATIONS && !self.whitelisted {
            return Err(Failure::NeverBanned);
        }
        match (self.step, code) {
            (Step::Greeting, 220) if self.whitelisted && self.conversations > WHITELISTED_CONVERSATIONS => {
                // enough failures to ban anyone else: still the banner
                self.out.extend_from_slice(b"QUIT\r\n");
                self.step = Step::Quit;
            }
            (Step::Quit, 221) => {
                self.confirmed = true;
                self.events.push(Event::Spared);
                self.step = Step::Closing;
            }
            (Step::Greeting, 220) => {
                self.out.extend_from_slice(b"EHLO attacker.test\r\n");
                self.step = Step::Ehlo;
            }
            (Step::Ehlo, 250) => {
                self.out.extend_from_slice(b"MAIL FROM:<spammer@attacker.test>\r\n");
                self.step = Step::Mail;
            }
            (Step::Mail, 250) | (Step::Rcpt, 500..=599) => {
                self.tried += 1;
                self.out.extend_from_slice(format!("RCPT TO:<unknown{}@{}>\r\n", self.tried, self.domain).as_bytes());
                self.step = Step::Rcpt;
            }
            // a recipient the dictionary should not have found
            _ => return Err(Failure::WrongReply),
        }
        Ok(())
    }
}

/// A peer that takes the banner, then says nothing, or one byte a second of a line that
/// never ends; the server must cut it off with a 421.
pub struct Slow {
    trickle: bool,
    started: Instant,
    greeted: bool,
    cut_off: bool,
    next_byte: Instant,
    line: Vec<u8>,
    out: Vec<u8>,
    pub events: Vec<Event>,
}

impl Slow {
    pub fn new(trickle: bool, now: Instant) -> Self {
        Slow {
            trickle,
            started: now,
            greeted: false,
            cut_off: false,
            next_byte: now,
            line: Vec::new(),
            out: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn restart(&mut self, now: Instant) {
        let events = std::mem::take(&mut self.events);
        *self = Slow { events, ..Slow::new(self.trickle, now) };
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn sent(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    pub fn finished(&self) -> bool {
        self.cut_off
    }

    /// Time passed: a trickling peer owes its next byte.
    pub fn tick(&mut self, now: Instant) {
        if self.trickle && self.greeted && !self.cut_off && now >= self.next_byte {
            self.out.push(b'X');
            self.next_byte = now + Duration::from_secs(1);
        }
    }

    pub fn eof(&mut self) -> Result<(), Failure> {
        if self.cut_off { Ok(()) } else { Err(Failure::Closed) }
    }

    pub fn input(&mut self, bytes: &[u8], now: Instant) -> Result<(), Failure> {
        self.line.extend_from_slice(bytes);
        while let Some(lf) = self.line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.line.drain(..=lf).collect();
            if line.starts_with(b"220 ") && !self.greeted {
                self.greeted = true;
                self.next_byte = now;
            } else if line.starts_with(b"421 ") && self.greeted {
                self.cut_off = true;
                self.events.push(Event::CutOff(now.saturating_duration_since(self.started)));
            } else {
                return Err(Failure::WrongReply);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dictionary_attacker_goes_on_until_banned_and_checks_the_ban() {
        let t0 = Instant::now();
        let mut d = Dictionary::new("loadtest.test", "530", false, t0);
        d.input(b"220 mx\r\n", t0).unwrap();
        d.input(b"250-mx\r\n250 OK\r\n", t0).unwrap();
        d.input(b"250 ok\r\n", t0).unwrap();
        assert_eq!(String::from_utf8_lossy(d.output()).lines().last(), Some("RCPT TO:<unknown1@loadtest.test>"));
        d.input(b"550 5.1.1 no such user\r\n", t0).unwrap();
        d.input(b"550 5.1.1 no such user\r\n421 4.7.0 mx too many errors\r\n", t0 + Duration::from_secs(1)).unwrap();
        assert!(d.finished() && d.same_source());
        assert_eq!(d.events, [Event::Dropped(Duration::from_secs(1))]);
        d.reconnect();
        d.input(b"530 5.7.1 mx denied access\r\n", t0 + Duration::from_secs(2)).unwrap();
        assert!(d.same_source(), "once more, to see the ban in force");
        d.reconnect();
        d.input(b"530 5.7.1 mx denied access\r\n", t0 + Duration::from_secs(3)).unwrap();
        assert!(!d.same_source());
        assert_eq!(d.events[1..], [Event::Banned(Duration::from_secs(2)), Event::Confirmed]);
        let mut d = Dictionary::new("loadtest.test", "530", false, t0);
        d.input(b"220 mx\r\n250 mx\r\n250 ok\r\n", t0).unwrap();
        assert_eq!(d.input(b"250 2.1.5 recipient OK\r\n", t0), Err(Failure::WrongReply), "an unknown user accepted");
        let mut d = Dictionary::new("loadtest.test", "530", false, t0);
        d.input(b"530 denied\r\n", t0).unwrap();
        assert_eq!(d.events, [Event::BannedOnSight], "an escalated prefix");
    }

    #[test]
    fn a_whitelisted_attacker_must_never_see_the_ban_line() {
        let t0 = Instant::now();
        let mut d = Dictionary::new("loadtest.test", "530", true, t0);
        for _ in 0..WHITELISTED_CONVERSATIONS {
            d.input(b"220 mx\r\n250 mx\r\n250 ok\r\n550 no\r\n421 4.7.0 too many errors\r\n", t0).unwrap();
            assert!(d.same_source());
            d.reconnect();
        }
        d.input(b"220 mx\r\n", t0).unwrap();
        assert_eq!(d.output(), b"QUIT\r\n");
        d.input(b"221 bye\r\n", t0).unwrap();
        assert!(!d.same_source() && d.events.ends_with(&[Event::Spared]));
        let mut d = Dictionary::new("loadtest.test", "530", true, t0);
        assert_eq!(d.input(b"530 denied\r\n", t0), Err(Failure::WhitelistedBanned));
    }

    #[test]
    fn a_slow_peer_expects_to_be_cut_off() {
        let t0 = Instant::now();
        let mut s = Slow::new(true, t0);
        s.input(b"220 mx\r\n", t0).unwrap();
        s.tick(t0);
        assert_eq!(s.output(), b"X");
        s.sent(1);
        s.tick(t0 + Duration::from_millis(500));
        assert_eq!(s.output(), b"");
        s.tick(t0 + Duration::from_secs(1));
        assert_eq!(s.output(), b"X");
        assert_eq!(s.eof(), Err(Failure::Closed));
        s.input(b"421 4.4.2 mx timeout exceeded\r\n", t0 + Duration::from_secs(2)).unwrap();
        assert!(s.finished() && s.eof().is_ok());
        assert_eq!(s.events, [Event::CutOff(Duration::from_secs(2))]);
    }
}
