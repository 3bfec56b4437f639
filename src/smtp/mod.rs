//! The SMTP server session, sans-IO: bytes and the time go in, reply bytes, a close and
//! a deadline come out. It never reads a clock, awaits or touches a socket.
//!
//! ```text
//!            new(): 220 banner queued
//!                     │
//!                     ▼
//!   ┌──────────────► Open ── QUIT: 221 ─────────────┐
//!   │ a command line  │ ── idle past command_timeout: 421 4.4.2
//!   └─ its reply ─────┘ ── shutdown(): 421 4.3.2 ───┤
//!                     │                             ▼
//!                     │                  Closing (flushing the last reply;
//!                     │                           CLOSE_GRACE at most)
//!                     │ peer EOF                    │ flushed, or grace over
//!                     ▼                             ▼
//!                   Closed ◄────────────────────────┘
//! ```
//!
//! The driver's loop, after every input (`handle_input`, `handle_eof`, `handle_timeout`,
//! `shutdown`), asks [`Session::poll_transmit`] what to do next and does it, and keeps a
//! timer at [`Session::poll_timeout`]:
//! - `Send(bytes)`: write them, then report how many went with `consume_output`;
//! - `Receive`: read and pass what arrived to `handle_input` (EOF: `handle_eof`);
//! - `Close`: close the socket; the session is over.
//!
//! The driver never reads while output is pending. A read holds at most `READ_LEN`
//! bytes and each command line of it gets one reply of bounded size, so the output
//! buffer is bounded too, whatever a peer pipelines.

pub mod address;
pub mod client;
mod command;
pub mod data;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::snapshot::Snapshot;
use command::Verb;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE_LEN: usize = 512;
/// How long a closing session waits for its last reply to drain before giving up.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Replies fixed for one configuration, built once per snapshot.
#[derive(Debug)]
pub struct Params {
    banner: Box<[u8]>,
    ehlo: Box<[u8]>,
    helo: Box<[u8]>,
    quit: Box<[u8]>,
    idle_timeout: Box<[u8]>,
    shutdown: Box<[u8]>,
    command_timeout: Duration,
}

impl Params {
    pub fn new(config: &Config) -> Self {
        let host = &config.hostname;
        let lines = |s: String| s.into_bytes().into_boxed_slice();
        Params {
            banner: lines(format!("220 {host} ESMTP mxgate\r\n")),
            ehlo: lines(format!("250-{host}\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")),
            helo: lines(format!("250 {host}\r\n")),
            quit: lines(format!("221 2.0.0 {host} closing connection\r\n")),
            idle_timeout: lines(format!("421 4.4.2 {host} timeout exceeded, closing connection\r\n")),
            shutdown: lines(format!("421 4.3.2 {host} service shutting down, closing connection\r\n")),
            command_timeout: config.smtp.command_timeout,
        }
    }
}

const OK: &[u8] = b"250 2.0.0 OK\r\n";
const HELP: &[u8] = b"214 2.0.0 commands: EHLO HELO NOOP RSET HELP QUIT\r\n";
const UNRECOGNIZED: &[u8] = b"500 5.5.2 command unrecognized\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 line too long\r\n";
const BARE_LF: &[u8] = b"500 5.5.2 line must end with CRLF\r\n";
const BAD_CHARACTER: &[u8] = b"500 5.5.2 CR or NUL inside a command line\r\n";
const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 command not implemented\r\n";
const EHLO_SYNTAX: &[u8] = b"501 5.5.4 syntax: EHLO domain\r\n";
const HELO_SYNTAX: &[u8] = b"501 5.5.4 syntax: HELO domain\r\n";
const NO_PARAMETERS: &[u8] = b"501 5.5.4 this command takes no parameters\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Closing { until: Instant },
    Closed,
}

/// What the driver does next for this session.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit<'a> {
    Send(&'a [u8]),
    Receive,
    Close,
}

/// One peer's SMTP conversation.
#[derive(Debug)]
pub struct Session {
    /// The snapshot the connection was accepted under, kept for its whole life.
    snapshot: Arc<Snapshot>,
    phase: Phase,
    /// The command line being received, CRLF not yet seen.
    line: Vec<u8>,
    /// The current line passed `MAX_LINE_LEN`: skip to its end, then reply once.
    overlong: bool,
    out: Vec<u8>,
    /// How much of `out` the driver has sent.
    sent: usize,
    /// When waiting for the next command ends.
    idle_deadline: Instant,
}

impl Session {
    /// A session for a peer the gate has allowed; the banner is queued.
    pub fn new(snapshot: Arc<Snapshot>, now: Instant) -> Self {
        let idle_deadline = now + snapshot.smtp.command_timeout;
        let out = snapshot.smtp.banner.to_vec();
        Session { snapshot, phase: Phase::Open, line: Vec::new(), overlong: false, out, sent: 0, idle_deadline }
    }

    /// Bytes from the peer. Each complete command line gets its reply, in order.
    pub fn handle_input(&mut self, mut data: &[u8], now: Instant) {
        while self.phase == Phase::Open && !data.is_empty() {
            let Some(lf) = memchr::memchr(b'\n', data) else {
                self.take_partial(data);
                return;
            };
            self.take_partial(&data[..lf]);
            data = &data[lf + 1..];
            if std::mem::take(&mut self.overlong) {
                self.reply(LINE_TOO_LONG);
            } else {
                let line = std::mem::take(&mut self.line);
                self.command(&line, now);
                self.line = line;
                self.line.clear();
            }
            self.idle_deadline = now + self.snapshot.smtp.command_timeout;
        }
    }

    /// Part of a line: kept while it can still be a valid line, else dropped.
    fn take_partial(&mut self, part: &[u8]) {
        // MAX_LINE_LEN counts the CRLF; the LF is never stored
        if !self.overlong && self.line.len() + part.len() < MAX_LINE_LEN {
            self.line.extend_from_slice(part);
        } else {
            self.overlong = true;
            self.line.clear();
        }
    }

    /// One command line, LF removed.
    fn command(&mut self, line: &[u8], now: Instant) {
        let Some(line) = line.strip_suffix(b"\r") else {
            return self.reply(BARE_LF);
        };
        if line.iter().any(|&b| b == b'\r' || b == 0) {
            return self.reply(BAD_CHARACTER);
        }
        let (verb, args) = command::split(line);
        match Verb::parse(verb) {
            Verb::Ehlo => self.hello(args, true),
            Verb::Helo => self.hello(args, false),
            Verb::Noop => self.reply(OK),
            Verb::Rset if args.is_empty() => self.reply(OK),
            Verb::Help => self.reply(HELP),
            Verb::Quit if args.is_empty() => {
                self.out.extend_from_slice(&self.snapshot.smtp.quit);
                self.phase = Phase::Closing { until: now + CLOSE_GRACE };
            }
            Verb::Rset | Verb::Quit => self.reply(NO_PARAMETERS),
            Verb::NotImplemented => self.reply(NOT_IMPLEMENTED),
            Verb::Unknown => self.reply(UNRECOGNIZED),
        }
    }

    fn hello(&mut self, args: &[u8], extended: bool) {
        // One word of printable ASCII: a domain or an address literal. It is not
        // checked further; it is only ever used in our own trace headers.
        let valid = !args.is_empty() && args.iter().all(|b| b.is_ascii_graphic());
        match (valid, extended) {
            (true, true) => self.out.extend_from_slice(&self.snapshot.smtp.ehlo),
            (true, false) => self.out.extend_from_slice(&self.snapshot.smtp.helo),
            (false, true) => self.reply(EHLO_SYNTAX),
            (false, false) => self.reply(HELO_SYNTAX),
        }
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The peer closed its side: nothing more can be said.
    pub fn handle_eof(&mut self) {
        self.phase = Phase::Closed;
    }

    /// The time reached [`Session::poll_timeout`] (or passed it).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Open if now >= self.idle_deadline => {
                self.out.extend_from_slice(&self.snapshot.smtp.idle_timeout);
                self.phase = Phase::Closing { until: now + CLOSE_GRACE };
            }
            Phase::Closing { until } if now >= until => self.phase = Phase::Closed,
            _ => {}
        }
    }

    /// The server is stopping: say so and close.
    pub fn shutdown(&mut self, now: Instant) {
        if self.phase == Phase::Open {
            self.out.extend_from_slice(&self.snapshot.smtp.shutdown);
            self.phase = Phase::Closing { until: now + CLOSE_GRACE };
        }
    }

    /// What the driver does next.
    pub fn poll_transmit(&self) -> Transmit<'_> {
        match self.phase {
            Phase::Closed => Transmit::Close,
            _ if self.sent < self.out.len() => Transmit::Send(&self.out[self.sent..]),
            Phase::Closing { .. } => Transmit::Close,
            Phase::Open => Transmit::Receive,
        }
    }

    /// `n` bytes of the last `Send` went out.
    pub fn consume_output(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.out.len());
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    /// When [`Session::handle_timeout`] is due; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open => Some(self.idle_deadline),
            Phase::Closing { until } => Some(until),
            Phase::Closed => None,
        }
    }
}

#[cfg(test)]
mod tests;
