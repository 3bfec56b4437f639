//! SMTP, sans-IO: the server session a peer talks to ([`Session`]) and the client it
//! forwards each transaction through ([`client::Upstream`]), in-line: the peer hears the
//! next hop's answer to each MAIL, RCPT and message before anything else.
//!
//! ```text
//!  220 banner ─► Open ── EHLO/HELO ──► Greeted ─── MAIL ──► (next hop: connect, MAIL) ──► Mail
//!                 ▲                       ▲  ▲                                              │ RCPT
//!                 │                       │  └─ final reply ◄─ (next hop: ".") ◄── Body ◄── Rcpt ◄─┐
//!                 │                       │                    CRLF.CRLF    354 ▲   │ DATA   │ RCPT│
//!                 │                       └─ RSET ───────────────────────────────┘   ▼        └─────┘
//!   QUIT, idle, shutdown, improper pipelining: last reply, Closing ──► Closed   (next hop: DATA)
//! ```
//!
//! Routes (`[[relay.route]]`, [`Settings::routed`]): the next hop follows the recipient's
//! domain, so MAIL is answered `250` here and goes to the next hop with the first
//! recipient that passes (`policy` picks its route); the transaction keeps that route
//! and its next hop's answers from then on, as above. A recipient of another route gets
//! `452 4.5.3` (one in-line transaction reaches one next hop; the peer sends it again in
//! another), a sender the next hop refuses has that refusal given to each recipient, and
//! a route none of whose next hops can be reached answers each recipient `451 4.4.1`
//! (the next recipient tries its route afresh). Without routes the transaction's route
//! is the default, fixed at MAIL.
//!
//! Draining ([`Session::shutdown`], on SIGTERM): a session outside a transaction says
//! `421 4.3.2` and closes at once; one inside a transaction finishes it (its commands,
//! its body, the next hop's final answer) and answers the command after it with the 421
//! (QUIT still gets 221). [`Session::abort`] (the drain timeout) says 421 and closes
//! whatever is under way; an abandoned transaction is never answered 250.
//!
//! While a command waits for the next hop, further input is processed only when it is a
//! RCPT, or a DATA ending what was received, of the transaction whose MAIL or RCPT is
//! waiting, and the next hop offers PIPELINING (RFC 2920): it goes out behind them in the
//! same write. Every other command waits in the input buffer (one read's worth is still
//! taken). Replies are owed in a queue (`Forward::waiting`): the next hop's, and ours to
//! commands processed meanwhile, given in the order of the commands. At [`MAX_OWED`]
//! replies owed, nothing more is processed nor read (a peer flooding RCPT while the next
//! hop is slow holds one read and a bounded queue, and costs nothing more); our 452 for
//! a recipient past `max_recipients` counts as a failed recipient like a 5xx.
//!
//! The peer's dialogue and the connection to the next hop are two values: the
//! [`Session`] (what the peer said, the transaction, the replies owed in order) and the
//! [`Link`] (link.rs: which next hop, pooled or new, the client on it, whether it is
//! clean, the failover rule). Their owner (`conn::Connection`) keeps both and lends the
//! link to each session call that may forward, answer or fail over; it dials, adopts,
//! releases and closes the link itself. Its loop, after every input, serves both ports
//! until neither has anything to do, and keeps a timer at [`Session::poll_timeout`]:
//! - peer port, [`Session::poll_transmit`]: `Send` (then `consume_output`), `Receive`
//!   (then `handle_input`, or `handle_eof`), `Wait`, `Close`;
//! - next-hop port, [`Link::poll`] (with [`Session::is_open`]): `Connect` a next hop (a
//!   pooled connection, or a new one: `Link::dialing`, then `Link::attach` and
//!   `Session::link_attached`, or `handle_relay_error`), `Send` (then
//!   `consume_relay_output`), `Receive` (then `handle_relay_input`, or
//!   `handle_relay_error`), `Release` an idle connection to the pool or `Close` it (both
//!   with `Link::detach`, told what the session still needs: `Session::wanted_link`).
//!
//! Memory per session is bounded: a read holds at most `READ_LEN` bytes, input is only
//! read when everything before it was processed, each command line gets one reply of
//! bounded size, and body bytes are only read while the next hop keeps up.
//!
//! Improper pipelining (RFC 2920: DATA must end a group): input received after DATA and
//! before our 354 (in the same read, or read while the next hop decided) could only be a
//! body sent too early: `503 5.5.0`, the connection closed, nothing of it forwarded.

mod command;
mod forward;
mod link;
pub mod outcome;
mod session;
mod verbs;

pub mod address;
pub mod client;
pub mod data;
pub mod outbuf;
pub mod policy;
pub mod replies;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{self, Config};
use policy::RelayDomains;

pub use link::{HopTransmit, Link};
pub use outcome::Outcome;
pub use replies::Params;
pub use session::{Event, Failure, Session, Transaction, TransactionIds, Transmit};

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE_LEN: usize = 512;
/// How long a closing session waits for its last reply to drain before giving up.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// The same after the drain timeout, when the process is about to exit.
pub const ABORT_GRACE: Duration = Duration::from_secs(1);
/// Replies owed to a peer (commands pipelined behind one waiting for the next hop) at
/// which no more of its commands are processed: the rest waits in the one read already
/// taken, and nothing more is read until replies went out. A whole envelope of the
/// default 100 recipients fits; a peer pipelining more waits its turn.
pub const MAX_OWED: usize = 128;
/// Body bytes queued for the next hop above which no more are read from the peer.
pub const RELAY_HIGH_WATER: usize = 32 * 1024;
/// Room left under a next hop's SIZE for the trace header mxgate adds to each message.
pub const TRACE_ROOM: u64 = 1024;
/// The start of a body during which the minimum data rate is not enforced.
pub const DATA_RATE_GRACE: Duration = Duration::from_secs(30);

/// What a session needs of a snapshot, built once per snapshot and shared by the sessions
/// accepted under it: smtp does not see the lists, the gate or abuse control.
#[derive(Debug)]
pub struct Settings {
    pub hostname: String,
    pub smtp: config::Smtp,
    pub relay: config::Relay,
    /// `[abuse] max_failed_commands`, `max_failed_recipients`: the conversation's limits.
    pub max_failed_commands: u32,
    pub max_failed_recipients: u32,
    pub replies: Params,
    pub relay_domains: RelayDomains,
    /// `[tls]` is configured: STARTTLS is offered.
    pub starttls: bool,
    /// What the next hops said they take, learned by the sessions' connections.
    pub hop_book: HopBook,
}

/// What mxgate knows of each next hop, shared by the sessions of one snapshot: what it
/// said it takes in its EHLO reply (SIZE, DSN), learned by every new connection to it, so
/// that mxgate offers what it can pass on (SIZE: the smaller of `max_message_size` and
/// theirs, so a message a next hop would refuse whole is refused before it is sent; DSN:
/// when the next hops known so far all take it); and whether it is down.
///
/// ```text
///   up ── could not be reached, or timed out ──► down until now + backoff (5 s first;
///    ▲                                            WARN once)  │ skipped meanwhile
///    │                                                        ▼ backoff over
///    └──── its EHLO came (INFO when it was down) ◄── one probe (the next transaction;
///                                                     others skip it for a probe's time)
///                                       the probe failed: backoff doubled, to 2 min at most
/// ```
#[derive(Debug)]
pub struct HopBook {
    /// Per next hop, in `next_hops` order: 0 until its first EHLO, `u64::MAX` when it
    /// states no limit.
    sizes: Box<[AtomicU64]>,
    /// Per next hop: 0 until its first EHLO, then 1 without DSN, 2 with.
    dsn: Box<[AtomicU8]>,
    health: Box<[Mutex<Health>]>,
    /// Per next hop: connections that failed or timed out (the metrics' failures).
    failures: Box<[AtomicU64]>,
    /// Per next hop: replies to a transaction's commands, and the time waited for them
    /// in microseconds (added once per transaction, not per reply).
    replies: Box<[AtomicU64]>,
    reply_micros: Box<[AtomicU64]>,
}

/// What the metrics show of a next hop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HopReport {
    /// Not down for a backoff.
    pub up: bool,
    /// Connections that failed or timed out.
    pub failures: u64,
    /// Replies to transactions' commands, and the seconds waited for them in all.
    pub replies: u64,
    pub reply_seconds: f64,
}

/// A next hop's health: down until when (none: up), and the backoff that put it there.
#[derive(Debug, Default)]
struct Health {
    down_until: Option<Instant>,
    backoff: Duration,
}

/// The first backoff of a next hop gone down, and the longest.
pub const HOP_BACKOFF: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(120));

impl HopBook {
    fn new(hops: usize) -> Self {
        HopBook {
            sizes: (0..hops).map(|_| AtomicU64::new(0)).collect(),
            dsn: (0..hops).map(|_| AtomicU8::new(0)).collect(),
            health: (0..hops).map(|_| Mutex::default()).collect(),
            failures: (0..hops).map(|_| AtomicU64::new(0)).collect(),
            replies: (0..hops).map(|_| AtomicU64::new(0)).collect(),
            reply_micros: (0..hops).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Per next hop, in `next_hops` order: what the metrics show.
    pub fn report(&self) -> Vec<HopReport> {
        let load = |a: &[AtomicU64], hop: usize| a.get(hop).map_or(0, |v| v.load(Ordering::Relaxed));
        (0..self.health.len())
            .map(|hop| HopReport {
                up: self.health(hop).is_some_and(|h| h.down_until.is_none()),
                failures: load(&self.failures, hop),
                replies: load(&self.replies, hop),
                reply_seconds: load(&self.reply_micros, hop) as f64 / 1e6,
            })
            .collect()
    }

    /// A transaction's wait for next hop `hop`: `replies` replies, `waited` in all.
    pub(super) fn waited(&self, hop: usize, replies: u32, waited: Duration) {
        if let (Some(n), Some(micros)) = (self.replies.get(hop), self.reply_micros.get(hop)) {
            n.fetch_add(u64::from(replies), Ordering::Relaxed);
            micros.fetch_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    fn health(&self, hop: usize) -> Option<std::sync::MutexGuard<'_, Health>> {
        self.health.get(hop).map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The first of `hops` (places in `next_hops`, in a route's order) that may be tried
    /// at `now`: one that is up, or one whose backoff is over (this try is its probe: the
    /// others skip it for `probe`).
    pub fn pick(&self, hops: &[usize], now: Instant, probe: Duration) -> Option<usize> {
        hops.iter().copied().find(|&hop| {
            let Some(mut h) = self.health(hop) else { return false };
            match h.down_until {
                None => true,
                Some(until) if until <= now => {
                    h.down_until = Some(now + probe);
                    true
                }
                Some(_) => false,
            }
        })
    }

    /// Next hop `hop` (at `addr`) could not be reached, or timed out: down for a backoff,
    /// doubled when it was down already (a probe failed).
    pub fn failed(&self, hop: usize, addr: Option<std::net::SocketAddr>, why: &str, now: Instant) {
        let Some(mut h) = self.health(hop) else { return };
        if let Some(failures) = self.failures.get(hop) {
            failures.fetch_add(1, Ordering::Relaxed);
        }
        let was_up = h.down_until.is_none();
        h.backoff = if was_up { HOP_BACKOFF.0 } else { (h.backoff * 2).clamp(HOP_BACKOFF.0, HOP_BACKOFF.1) };
        h.down_until = Some(now + h.backoff);
        if was_up {
            let addr = addr.map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!("next hop {addr} is down ({why}): skipped for {:?}, then probed", h.backoff);
        }
    }

    /// Next hop `hop` answered (its greeting and EHLO): up.
    fn succeeded(&self, hop: usize, addr: Option<std::net::SocketAddr>) {
        let Some(mut h) = self.health(hop) else { return };
        if h.down_until.take().is_some() {
            let addr = addr.map(|a| a.to_string()).unwrap_or_default();
            tracing::info!("next hop {addr} is back");
        }
        h.backoff = Duration::ZERO;
    }

    /// Next hop `hop` (at `addr`) said EHLO offering `ext`: it is up.
    pub fn learn(&self, hop: usize, addr: Option<std::net::SocketAddr>, ext: &client::Extensions) {
        self.succeeded(hop, addr);
        // what we offer leaves room for the trace header we add ahead of the message
        let limit = ext.size.filter(|&s| s > 0).map_or(u64::MAX, |s| s.saturating_sub(TRACE_ROOM).max(1));
        if let (Some(size), Some(dsn)) = (self.sizes.get(hop), self.dsn.get(hop)) {
            size.store(limit, Ordering::Relaxed);
            dsn.store(if ext.dsn { 2 } else { 1 }, Ordering::Relaxed);
        }
    }

    /// DSN can be offered: some next hop is known, and every known one takes it.
    pub fn dsn(&self) -> bool {
        let known = self.dsn.iter().map(|d| d.load(Ordering::Relaxed)).filter(|&d| d > 0);
        let (mut any, mut all) = (false, true);
        for d in known {
            any = true;
            all &= d == 2;
        }
        any && all
    }

    /// The smaller of `max` and every next hop's limit known so far.
    pub fn size(&self, max: u64) -> u64 {
        self.sizes.iter().map(|s| s.load(Ordering::Relaxed)).filter(|&s| s > 0).fold(max, u64::min)
    }
}

impl Settings {
    /// `[[relay.route]]`s are configured: a transaction's next hop follows its first
    /// recipient, so MAIL is answered here and goes on with that recipient.
    pub fn routed(&self) -> bool {
        self.relay.routes.len() > 1
    }

    /// The next hops of route `route` (0: the default), as places in `relay.next_hops`.
    pub fn route_hops(&self, route: usize) -> &[usize] {
        self.relay.routes.get(route).map_or(&[], |r| r.hops.as_slice())
    }

    pub fn new(config: &Config, starttls: bool) -> Self {
        Settings {
            starttls,
            hostname: config.hostname.clone(),
            smtp: config.smtp.clone(),
            relay: config.relay.clone(),
            max_failed_commands: config.abuse.max_failed_commands,
            max_failed_recipients: config.abuse.max_failed_recipients,
            replies: Params::new(config, starttls),
            relay_domains: RelayDomains::new(&config.relay.domains, &config.relay.routes),
            hop_book: HopBook::new(config.relay.next_hops.len()),
        }
    }
}

#[cfg(test)]
mod tests;
