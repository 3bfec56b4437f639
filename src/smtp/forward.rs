//! The session's side toward the next hop: asking its [`Link`] for a connection (pooled
//! or new, the transaction's route's next hops in order: link.rs), forwarding each
//! command and answering the peer with the reply in the order owed, and streaming the
//! body through the filter.
//!
//! Failures: a next hop that cannot be reached, breaks the protocol, closes or stays
//! silent past `reply_timeout` gets its connection dropped. Before the next hop has
//! acknowledged anything (connecting, greeting, MAIL on a pooled connection that may be
//! stale) the next connection or next hop is tried; after, the peer gets `451 4.4.1`,
//! never `250`, and the rest of the transaction gets `451 4.4.1` too.
//!
//! A connection is clean (the pool may have it) only while no transaction is open at the
//! next hop as far as its replies say:
//!
//! ```text
//!  clean ── MAIL ──► dirty ── 250 to the final dot ─────────────────────────► clean
//!                      │ refused MAIL or final dot: our RSET (Waiting::Reset)
//!                      │ the peer's RSET: forwarded (Waiting::Rset)
//!                      └──► RSET answered 250 ──► clean;   anything else ──► dropped
//! ```

use std::sync::Arc;
use std::time::Instant;

use super::address::Path;
use super::client::{Command, Progress, Reply};
use super::data::BodyFilter;
use super::link::Link;
use super::outcome::{HopFault, Outcome, Undelivered};
use super::replies::*;
use super::session::{Body, Phase, Reader, Session, Waiting};
use crate::config::ForwardClient;

impl Session {
    // ---- the next hop's port -------------------------------------------------------------

    /// How long a probe of a next hop that was down may take before another is allowed.
    fn probe_time(&self) -> std::time::Duration {
        self.settings.relay.connect_timeout + self.settings.relay.reply_timeout
    }

    /// Still in conversation: the link it is lent serves it (else the link is let go).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The connection the session asked for came up on `link`: new (its greeting still to
    /// come) or from the pool (ready for MAIL).
    pub fn link_attached(&mut self, link: &mut Link, now: Instant) {
        self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
        if link.ready() {
            self.link_ready(link, now);
        }
    }

    /// Bytes from the next hop, on `link`.
    pub fn handle_relay_input(&mut self, link: &mut Link, data: &[u8], now: Instant) {
        if let Link::Up(l) = link {
            l.up.handle_input(data);
            self.upstream_events(link, now);
        }
        self.drop_if_over(now);
    }

    /// `n` bytes of what `link` had to send went out.
    pub fn consume_relay_output(&mut self, link: &mut Link, n: usize, now: Instant) {
        if let Link::Up(l) = link {
            l.up.consume_output(n);
            if self.fwd.waiting.is_empty() {
                // body streaming: the next hop keeps taking bytes
                let pending = !l.up.output().is_empty();
                self.fwd.deadline = pending.then(|| now + self.settings.relay.reply_timeout);
            }
        }
    }

    /// The connection to the next hop failed: refused, broken, closed.
    pub fn handle_relay_error(&mut self, link: &mut Link, now: Instant) {
        self.relay_failed(link, HopFault::Connection, now);
    }

    /// What the session still needs once its link's connection is let go: a connection
    /// for MAIL (to `next_hops[hop]`, pooled when `pooled_ok`), after a failed one.
    pub fn wanted_link(&self) -> Option<(usize, bool)> {
        match (self.fwd.waiting.front(), self.phase) {
            (Some(Waiting::Link { hop, pooled_ok }), Phase::Open) => Some((*hop, *pooled_ok)),
            _ => None,
        }
    }

    // ---- forwarding commands -------------------------------------------------------------

    /// MAIL was accepted here (no routes): it goes to the default route's next hop.
    pub(super) fn send_sender(&mut self, link: &mut Link, now: Instant) {
        if let Err(fault) = self.start_mail(link, now) {
            self.answer_failure(Waiting::Mail, fault, now);
        }
    }

    /// Routed: the transaction's first recipient passed, and fixed its route: MAIL and it
    /// go to the route's next hop (behind a connection to it, when one must be made).
    pub(super) fn send_first_recipient(&mut self, link: &mut Link, to: Path, dsn: Box<str>, now: Instant) {
        if let Err(fault) = self.start_mail(link, now) {
            tracing::debug!(peer = %self.peer, ?fault, "no next hop for the recipient's route");
            if let Some(t) = &mut self.txn {
                t.route = None;
            }
            return self.refuse_recipient(NEXT_HOP_FAILED);
        }
        match self.fwd.waiting.front() {
            // refused here after all (8BITMIME): the transaction is over
            _ if self.txn.is_none() => {}
            Some(Waiting::Link { .. }) => self.fwd.waiting.push_back(Waiting::Rcpt(to, dsn)),
            _ => self.forward_rcpt(link, to, dsn, now),
        }
    }

    /// MAIL was accepted here, and the transaction's route is known: MAIL goes to the
    /// route's next hop once a connection to it is ready (the one the session has, when it
    /// is the route's). Err: no next hop of the route can be tried now.
    fn start_mail(&mut self, link: &mut Link, now: Instant) -> Result<(), HopFault> {
        let settings = Arc::clone(&self.settings);
        let hops = settings.route_hops(self.txn.as_ref().and_then(|t| t.route).unwrap_or(0));
        if hops.is_empty() {
            return Err(HopFault::NoneConfigured);
        }
        match link.hop() {
            Some(hop) if !hops.contains(&hop) => link.leave(),
            _ if link.ready() => {
                self.send_mail(link, now);
                return Ok(());
            }
            _ => {}
        }
        let Some(hop) = settings.hop_book.pick(hops, now, self.probe_time()) else {
            return Err(HopFault::AllDown);
        };
        self.fwd.waiting.push_back(Waiting::Link { hop, pooled_ok: true });
        link.want(hop, true);
        self.fwd.deadline = Some(now + self.settings.relay.connect_timeout);
        Ok(())
    }

    /// A connection is ready: MAIL goes out, with what was pipelined behind it (commands
    /// sent again after a stale or failed connection), then pipelined input goes on.
    fn link_ready(&mut self, link: &mut Link, now: Instant) {
        if !matches!(self.fwd.waiting.front(), Some(Waiting::Link { .. })) {
            return;
        }
        let behind = std::mem::take(&mut self.fwd.waiting);
        self.send_mail(link, now);
        if matches!(self.fwd.waiting.front(), Some(Waiting::Link { .. })) {
            // MAIL waits for the next hop to greet again (XCLIENT): so does what followed it
            self.fwd.waiting.extend(behind.into_iter().skip(1));
            return;
        }
        for waiting in behind.into_iter().skip(1) {
            match waiting {
                Waiting::Rcpt(to, dsn) if self.txn.is_some() => self.forward_rcpt(link, to, dsn, now),
                Waiting::Data if self.txn.is_some() => self.forward_data(link, now),
                Waiting::Local { .. } => self.fwd.waiting.push_back(waiting),
                // the sender was refused here after all (8BITMIME): no transaction to go on
                _ => self.reply(MAIL_FIRST),
            }
        }
        self.process(link, now);
    }

    fn send_mail(&mut self, link: &mut Link, now: Instant) {
        if self.txn.as_ref().is_some_and(|t| !t.introduced) && self.introduce(link, now) {
            // MAIL once the next hop greeted again (XCLIENT) or said yes (XFORWARD)
            return;
        }
        let (Link::Up(l), Some(txn)) = (link, &mut self.txn) else { return };
        let ext = l.up.extensions();
        if (txn.eight_bit && !ext.eight_bit_mime) || (txn.smtputf8 && !ext.smtputf8) {
            self.reply(NO_8BIT);
            return self.end_transaction(Outcome::Undelivered(Undelivered::Lacks8Bit), now);
        }
        let mut line = format!("MAIL FROM:{}", txn.from);
        if txn.eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        if txn.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        if let (Some(size), Some(_)) = (txn.size, ext.size) {
            line.push_str(&format!(" SIZE={size}"));
        }
        if ext.dsn {
            line.push_str(&txn.dsn);
        }
        l.up.command(Command::Mail, line.as_bytes());
        l.clean = false;
        txn.hop = Some(l.hop);
        self.await_reply(Waiting::Mail, now);
    }

    /// A recipient, with its DSN parameters when the next hop takes DSN (else they are
    /// left out: DSN was offered because the next hops known then took it).
    /// Tells the next hop who the peer is before the transaction (`[relay]
    /// forward_client`), as it offers: XCLIENT (it greets again; MAIL follows its
    /// Ready), else XFORWARD (its reply goes to no one; MAIL right behind it, as Postfix,
    /// the one server that offers it, takes). True when MAIL must wait.
    fn introduce(&mut self, link: &mut Link, now: Instant) -> bool {
        let Some(txn) = &mut self.txn else { return false };
        txn.introduced = true;
        let Link::Up(l) = link else { return false };
        let ext = l.up.extensions();
        let mode = self.settings.relay.forward_client;
        let (verb, offered) = match (mode, ext.xclient, ext.xforward) {
            (Some(ForwardClient::Off), ..) => return false,
            (None | Some(ForwardClient::Xclient), Some(offered), _) => ("XCLIENT", offered),
            (None | Some(ForwardClient::Xforward), _, Some(offered)) => ("XFORWARD", offered),
            _ => return false,
        };
        let line = format!("{verb}{}", self.client_attributes(offered));
        if verb == "XCLIENT" {
            // XCLIENT's new session keeps the HELO and PROTO it carried (Postfix's
            // XCLIENT_README: they are not reset): MAIL may follow the greeting at once;
            // without them (Exim offers neither) the next hop needs EHLO again
            use super::client::attrs;
            let carried = offered & attrs::HELO != 0 && offered & attrs::PROTO != 0 && self.helo.is_some();
            l.up.xclient(line.as_bytes(), !carried);
            self.fwd.waiting.push_front(Waiting::Link { hop: l.hop, pooled_ok: false });
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
            return true;
        }
        l.up.command(Command::Xforward, line.as_bytes());
        self.await_reply(Waiting::Xforward, now);
        false
    }

    /// The peer's attributes the next hop takes (`offered`), each value xtext: its
    /// address (IPv6 as `IPV6:`), port, greeting name and protocol; its name unknown.
    fn client_attributes(&self, offered: u8) -> String {
        use super::client::attrs;
        use std::fmt::Write as _;
        let mut out = String::new();
        if offered & attrs::NAME != 0 {
            out.push_str(" NAME=[UNAVAILABLE]");
        }
        if offered & attrs::ADDR != 0 {
            let _ = match self.peer.ip() {
                std::net::IpAddr::V4(a) => write!(out, " ADDR={a}"),
                std::net::IpAddr::V6(a) => write!(out, " ADDR=IPV6:{a}"),
            };
        }
        if let (true, Some(port)) = (offered & attrs::PORT != 0, self.port) {
            let _ = write!(out, " PORT={port}");
        }
        if let (true, Some(helo)) = (offered & attrs::HELO != 0, &self.helo) {
            out.push_str(" HELO=");
            xtext(helo.name.as_bytes(), &mut out);
        }
        if offered & attrs::PROTO != 0 {
            let extended = self.helo.as_ref().is_some_and(|h| h.extended);
            out.push_str(if extended { " PROTO=ESMTP" } else { " PROTO=SMTP" });
        }
        out
    }

    pub(super) fn forward_rcpt(&mut self, link: &mut Link, to: Path, dsn: Box<str>, now: Instant) {
        let hop_dsn = matches!(link, Link::Up(l) if l.up.extensions().dsn);
        let line = if hop_dsn { format!("RCPT TO:{to}{dsn}") } else { format!("RCPT TO:{to}") };
        self.forward(link, Command::Rcpt, line.as_bytes(), Waiting::Rcpt(to, dsn), now);
    }

    pub(super) fn forward_data(&mut self, link: &mut Link, now: Instant) {
        self.forward(link, Command::Data, b"DATA", Waiting::Data, now);
    }

    /// DATA for a message that comes in BDAT chunks: its 354 opens the body.
    pub(super) fn forward_chunk_data(&mut self, link: &mut Link, now: Instant) {
        self.forward(link, Command::Data, b"DATA", Waiting::ChunkData, now);
    }

    /// A chunk to a next hop that takes BDAT: the command now (the first chunk carries the
    /// trace header ahead of the peer's octets), the octets as they come (`chunk_input`);
    /// the next hop's reply is the peer's.
    pub(super) fn forward_chunk(&mut self, link: &mut Link, size: u64, last: bool, first: bool, now: Instant) {
        let header = if first { self.received_header(now) } else { String::new() };
        let total = size.saturating_add(header.len() as u64);
        let (cmd, waiting, line) = match last {
            true => (Command::BdatLast, Waiting::ChunkLast, format!("BDAT {total} LAST")),
            false => (Command::Bdat, Waiting::Chunk, format!("BDAT {total}")),
        };
        self.forward(link, cmd, line.as_bytes(), waiting, now);
        if let Link::Up(l) = link
            && l.up.is_ready()
        {
            l.up.send_data(header.as_bytes());
            // the command and header wait for the first octets, to go out in one segment
            l.hold = size > 0;
        }
    }

    pub(super) fn forward_rset(&mut self, link: &mut Link, now: Instant) {
        self.forward(link, Command::Rset, b"RSET", Waiting::Rset, now);
    }

    fn forward(&mut self, link: &mut Link, cmd: Command, line: &[u8], waiting: Waiting, now: Instant) {
        match link {
            Link::Up(l) if l.up.is_ready() => {
                l.up.command(cmd, line);
                self.await_reply(waiting, now);
            }
            _ => {
                // the connection is gone: the transaction cannot go on
                let fault = self.txn.as_ref().and_then(|t| t.broken).unwrap_or(HopFault::Connection);
                if let Some(t) = &mut self.txn {
                    t.broken = Some(fault);
                }
                self.answer_failure(waiting, fault, now);
            }
        }
    }

    /// A command went to the next hop; the deadline runs for the oldest reply owed.
    fn await_reply(&mut self, waiting: Waiting, now: Instant) {
        if self.fwd.waiting.is_empty() {
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
            self.fwd.since = Some(now);
        }
        self.fwd.waiting.push_back(waiting);
    }

    // ---- the next hop's answers ----------------------------------------------------------

    fn upstream_events(&mut self, link: &mut Link, now: Instant) {
        while self.phase == Phase::Open {
            let Link::Up(l) = link else { return };
            let Some(event) = l.up.poll_event() else { return };
            match event {
                Progress::Ready => {
                    // a new connection's EHLO (not the greeting after our XCLIENT)
                    if !self.txn.as_ref().is_some_and(|t| t.introduced) {
                        let addr = self.settings.relay.next_hops.get(l.hop).copied();
                        self.settings.hop_book.learn(l.hop, addr, &l.up.extensions());
                    }
                    self.link_ready(link, now);
                }
                // 421: the next hop is closing the connection
                Progress::Reply(_, reply) if reply.code == 421 => {
                    return self.relay_failed(link, HopFault::Closing, now);
                }
                Progress::Reply(cmd, reply) => {
                    l.untested = false;
                    self.answer(link, cmd, &reply, now);
                }
                Progress::Failed(why) => {
                    tracing::debug!(peer = %self.peer, "next hop failed: {why}");
                    return self.relay_failed(link, HopFault::Protocol, now);
                }
                Progress::NoTls(why) => {
                    let hop = self.settings.relay.next_hops.get(l.hop).map(ToString::to_string).unwrap_or_default();
                    tracing::warn!(peer = %self.peer, "next hop {hop} {why} (relay.tls = \"required\")");
                    return self.relay_failed(link, HopFault::NoTls, now);
                }
            }
        }
    }

    /// The next hop's reply to the oldest command forwarded; then our own replies that
    /// waited behind it, and the input that waited.
    fn answer(&mut self, link: &mut Link, cmd: Command, reply: &Reply, now: Instant) {
        let waiting = self.fwd.waiting.pop_front();
        let more = self.fwd.waiting.iter().any(Waiting::forwarded);
        self.fwd.deadline = more.then(|| now + self.settings.relay.reply_timeout);
        if let (Some(since), Some(t)) = (std::mem::replace(&mut self.fwd.since, more.then_some(now)), &mut self.txn) {
            let waited = now.saturating_duration_since(since);
            t.hop_replies += 1;
            t.hop_wait += waited;
            self.events.push_back(super::session::Event::HopReply(waited));
        }
        self.answering_rcpt = cmd == Command::Rcpt;
        match (waiting, cmd) {
            (Some(Waiting::Mail), Command::Mail) => self.answer_mail(link, reply, now),
            (Some(Waiting::Rcpt(to, _)), Command::Rcpt) => self.answer_rcpt(link, to, reply),
            // refused or not, MAIL went on behind it
            (Some(Waiting::Xforward), Command::Xforward) => {}
            (Some(Waiting::Data), Command::Data) => self.answer_data(link, reply, now),
            (Some(Waiting::ChunkData), Command::Data) => self.answer_chunk_data(link, reply, now),
            (Some(Waiting::Chunk), Command::Bdat) => self.answer_chunk(link, reply, now),
            (Some(Waiting::ChunkLast), Command::BdatLast) => self.answer_dot(link, reply, now),
            (Some(Waiting::Dot), Command::Dot) => self.answer_dot(link, reply, now),
            (Some(Waiting::Rset), Command::Rset) => {
                // the peer's transaction is gone whatever the next hop says; its
                // connection is only kept when it said 250
                self.settle_reset(link, reply);
                self.emit(OK);
            }
            (Some(Waiting::Reset), Command::Rset) => self.settle_reset(link, reply),
            (waiting, cmd) => {
                tracing::debug!(peer = %self.peer, ?cmd, ?waiting, "next hop reply out of step");
                if let Some(w) = waiting {
                    self.fwd.waiting.push_front(w);
                }
                return self.relay_failed(link, HopFault::Protocol, now);
            }
        }
        self.flush_local();
        self.process(link, now);
    }

    fn answer_mail(&mut self, link: &mut Link, reply: &Reply, now: Instant) {
        let routed = self.settings.routed();
        if reply.is_positive() {
            if let Some(t) = &mut self.txn {
                t.open_upstream = true;
            }
            // routed: the peer had our 250 already
            if !routed {
                self.emit(MAIL_OK);
            }
            return;
        }
        if routed {
            // the peer had our 250: each recipient gets this refusal instead, and it
            // counts once, as the refused sender it is (as without routes)
            if let Some(t) = &mut self.txn {
                let mut refusal = Vec::new();
                reply.render(&mut refusal);
                t.sender_refused = Some(refusal.into());
            }
            if reply.code >= 500 {
                self.answering_rcpt = false;
                self.failed();
            }
            return self.reset_hop(link, now);
        }
        // what was pipelined behind MAIL gets the next hop's answers to it (503 or 5xx);
        // the connection is clean again only once the next hop said 250 to our RSET (a
        // refused MAIL may leave it in any state: it must reach no other sender)
        self.pass_on(reply);
        self.end_transaction(Outcome::Undelivered(Undelivered::SenderRefused(reply.code)), now);
        self.reset_hop(link, now);
    }

    fn answer_rcpt(&mut self, link: &mut Link, to: Path, reply: &Reply) {
        if let Some(refusal) = self.txn.as_ref().and_then(|t| t.sender_refused.clone()) {
            // behind the sender the next hop refused (routed: after our 250 to MAIL); that
            // refusal was counted
            self.count_refused();
            return if reply.is_positive() { self.confused_hop(link, &refusal) } else { self.out.push(&refusal) };
        }
        match &mut self.txn {
            Some(t) if reply.is_positive() => {
                t.accepted += 1;
                if t.to.len() < super::session::LOGGED_RECIPIENTS {
                    t.to.push(to.to_string());
                }
                t.first_rcpt.get_or_insert(to);
                self.emit(RCPT_OK);
            }
            // a next hop that accepts a recipient without a sender is out of its mind
            None if reply.is_positive() => self.confused_hop(link, MAIL_FIRST),
            // pipelined behind a sender the next hop refused: its refusal follows from
            // that one, which was counted
            None => self.pass_on_uncounted(reply),
            Some(_) => {
                self.count_refused();
                self.pass_on(reply);
            }
        }
    }

    fn answer_data(&mut self, link: &mut Link, reply: &Reply, now: Instant) {
        if reply.code != 354 {
            // behind a refused sender (no transaction here any more): uncounted, as above
            return if self.txn.is_none() { self.pass_on_uncounted(reply) } else { self.pass_on(reply) };
        }
        // The 354 comes only after a recipient was accepted: a next hop that says it
        // anyway (DATA pipelined behind refused RCPTs) gets no body.
        match &self.txn {
            None => return self.confused_hop(link, MAIL_FIRST),
            Some(t) if t.accepted == 0 => {
                self.confused_hop(link, RCPT_FIRST);
                return self.end_transaction(Outcome::Undelivered(Undelivered::NoValidRecipients), now);
            }
            Some(_) => {}
        }
        // Input that arrived while the next hop was deciding was sent before our 354.
        if !self.unprocessed().is_empty() {
            self.end_transaction(Outcome::Undelivered(Undelivered::ImproperPipelining), now);
            link.drop();
            return self.close_with(IMPROPER_PIPELINING, now);
        }
        let header = self.received_header(now);
        let max = self.settings.smtp.max_message_size;
        if let (Link::Up(l), Some(t)) = (link, &mut self.txn) {
            l.up.send_data(header.as_bytes());
            l.hold = true;
            t.body = Some(Body { filter: BodyFilter::new(max), started: now, last_input: now });
        }
        self.emit(GO_AHEAD);
    }

    fn answer_dot(&mut self, link: &mut Link, reply: &Reply, now: Instant) {
        if let Some(t) = &mut self.txn {
            t.open_upstream = false;
            t.relay = t.data_end.map(|at| now.saturating_duration_since(at));
        }
        if reply.code == 250 {
            link.set_clean();
            let hop_id = hop_queue_id(reply);
            let id = self.txn.as_ref().map(|t| t.id.clone()).unwrap_or_default();
            self.emit(&queued(&id, hop_id.as_deref()));
            if let Some(t) = &mut self.txn {
                t.hop_id = hop_id;
            }
            return self.end_transaction(Outcome::Delivered, now);
        }
        self.pass_on(reply);
        self.end_transaction(Outcome::Undelivered(Undelivered::MessageRefused(reply.code)), now);
        self.reset_hop(link, now);
    }

    /// After the next hop refused the sender or the message: RSET, so that the
    /// connection is clean for whoever comes next (see [`Waiting::Reset`]).
    fn reset_hop(&mut self, link: &mut Link, now: Instant) {
        if let Link::Up(l) = link
            && l.up.is_ready()
        {
            l.clean = false;
            l.up.command(Command::Rset, b"RSET");
            self.await_reply(Waiting::Reset, now);
        }
    }

    /// The next hop's reply to an RSET: 250 leaves its connection clean; anything else,
    /// and it is dropped (its state is unknown).
    fn settle_reset(&mut self, link: &mut Link, reply: &Reply) {
        if reply.code == 250 {
            link.set_clean();
        } else {
            tracing::debug!(peer = %self.peer, code = reply.code, "next hop refused RSET: its connection is dropped");
            link.drop();
        }
    }

    /// The next hop answered positively where it could not have: our own refusal instead,
    /// and that connection goes (its state is unknown).
    fn confused_hop(&mut self, link: &mut Link, refusal: &[u8]) {
        tracing::debug!(peer = %self.peer, "next hop accepted a command out of sequence");
        link.drop();
        self.emit(refusal);
    }

    /// The next hop's reply, to the peer: its code and text.
    fn pass_on(&mut self, reply: &Reply) {
        let mut out = Vec::new();
        reply.render(&mut out);
        self.emit(&out);
    }

    /// The next hop's reply, to the peer, not counted as a failure of it.
    fn pass_on_uncounted(&mut self, reply: &Reply) {
        let mut out = Vec::new();
        reply.render(&mut out);
        self.out.push(&out);
    }

    /// The connection failed, timed out or broke the protocol.
    pub(super) fn relay_failed(&mut self, link: &mut Link, fault: HopFault, now: Instant) {
        // a next hop that could not be reached or that hangs is down for a while
        if let Some(hop) = link.hop()
            && (fault == HopFault::TimedOut || (fault == HopFault::Connection && link.connecting()))
        {
            let addr = self.settings.relay.next_hops.get(hop).copied();
            let why = if fault == HopFault::TimedOut { "timed out" } else { "connection failed" };
            self.settings.hop_book.failed(hop, addr, why, now);
        }
        let settings = Arc::clone(&self.settings);
        let failover = match link.failover(settings.route_hops(self.txn.as_ref().and_then(|t| t.route).unwrap_or(0))) {
            Some((same, false)) => same.first().map(|&hop| (hop, false)),
            // the route's next hop in order that is not down
            Some((after, true)) => settings.hop_book.pick(after, now, self.probe_time()).map(|hop| (hop, true)),
            None => None,
        };
        link.drop();
        self.fwd.deadline = None;
        let mut owed = std::mem::take(&mut self.fwd.waiting);
        if matches!(owed.front(), Some(Waiting::Xforward)) {
            // the introduction goes again on the next connection, with MAIL
            owed.pop_front();
        }
        if let Some(t) = &mut self.txn {
            t.introduced = false;
        }
        if owed.is_empty() {
            // between commands or during a body: the transaction cannot complete
            if let Some(t) = &mut self.txn {
                t.broken = Some(fault);
            }
            return;
        }
        // Nothing acknowledged yet (MAIL unanswered): try a new connection (a pooled one
        // may just have been stale), then the next hop in order; what was pipelined behind
        // MAIL is sent again there.
        if let (Some(Waiting::Link { .. } | Waiting::Mail), Some((hop, pooled_ok))) = (owed.front(), failover)
            && self.txn.is_some()
        {
            owed[0] = Waiting::Link { hop, pooled_ok };
            self.fwd.waiting = owed;
            self.fwd.deadline = Some(now + self.settings.relay.connect_timeout);
            return;
        }
        if let Some(t) = &mut self.txn {
            t.broken = Some(fault);
        }
        for waiting in owed {
            match waiting {
                Waiting::Local { reply, rcpt, counted } => self.give(&reply, rcpt, counted),
                forwarded => {
                    self.answering_rcpt = matches!(forwarded, Waiting::Rcpt(..));
                    self.answer_failure(forwarded, fault, now);
                }
            }
        }
        self.process(link, now);
    }

    /// The peer's answer for a command the next hop could not answer.
    fn answer_failure(&mut self, waiting: Waiting, fault: HopFault, now: Instant) {
        match waiting {
            Waiting::Rset => self.reply(OK),
            Waiting::Reset | Waiting::Xforward => {}
            Waiting::Rcpt(..) => self.refuse_recipient(NEXT_HOP_FAILED),
            Waiting::Data => self.reply(NEXT_HOP_FAILED),
            Waiting::ChunkData | Waiting::Chunk | Waiting::ChunkLast => {
                // the chunk being received gets the 451 after its octets
                match &mut self.reader.chunk {
                    Some(chunk) => chunk.refused = Some(NEXT_HOP_FAILED.into()),
                    None => self.reply(NEXT_HOP_FAILED),
                }
                self.end_transaction(Outcome::Undelivered(Undelivered::HopFailed(fault)), now);
            }
            Waiting::Link { .. } | Waiting::Mail if self.settings.routed() => {
                // our 250 to MAIL was given: the recipients behind get the 451; the next
                // one tries its route afresh
                if let Some(t) = &mut self.txn {
                    (t.route, t.broken) = (None, None);
                }
            }
            Waiting::Link { .. } | Waiting::Mail | Waiting::Dot => self.undelivered(Undelivered::HopFailed(fault), now),
            Waiting::Local { reply, counted, .. } => self.reply_counted(&reply, counted),
        }
    }

    // ---- the body ------------------------------------------------------------------------

    /// The next hop's reply to our DATA for a chunked message: 354 opens the body (the
    /// trace header first); anything else is the reply the chunk being received gets,
    /// after its octets, and the transaction's end.
    fn answer_chunk_data(&mut self, link: &mut Link, reply: &Reply, now: Instant) {
        if reply.code == 354 {
            let header = self.received_header(now);
            if let (Link::Up(l), Some(t)) = (link, &mut self.txn)
                && let Some(chunks) = &mut t.chunks
            {
                l.up.send_data(header.as_bytes());
                l.hold = true;
                chunks.open = true;
            }
            return;
        }
        let mut out = Vec::new();
        reply.render(&mut out);
        if let Some(chunk) = &mut self.reader.chunk {
            chunk.refused = Some(out.into());
        }
        self.end_transaction(Outcome::Undelivered(Undelivered::MessageRefused(reply.code)), now);
        self.reset_hop(link, now);
    }

    /// The next hop's reply to a chunk but the last: the peer's; a refusal ends the
    /// transaction (and RSETs the next hop, for whoever comes next).
    fn answer_chunk(&mut self, link: &mut Link, reply: &Reply, now: Instant) {
        self.pass_on(reply);
        if !reply.is_positive() {
            self.end_transaction(Outcome::Undelivered(Undelivered::MessageRefused(reply.code)), now);
            self.reset_hop(link, now);
        }
    }

    /// The octets of the BDAT chunk being received: swallowed (a refused chunk), or into
    /// the message once the next hop said 354 to our DATA; at the chunk's end, its reply
    /// (the last chunk's is the next hop's reply to the final dot). False when nothing
    /// could be taken: the octets wait for the 354, or for the peer.
    pub(super) fn chunk_input(&mut self, link: &mut Link, now: Instant) -> bool {
        let Reader { input, pos, chunk: Some(chunk), .. } = &mut self.reader else { return false };
        let take = usize::try_from(chunk.remaining).unwrap_or(usize::MAX).min(input.len() - *pos);
        let octets = &input[*pos..*pos + take];
        if chunk.refused.is_none() {
            let Some(txn) = self.txn.as_mut() else { return false };
            let Some(chunks) = txn.chunks.as_mut() else { return false };
            if !chunks.open && txn.broken.is_none() {
                return false;
            }
            let faulted = chunks.filter.fault().is_some();
            let mut discard = Vec::new();
            let sink = body_sink(link, txn.broken.is_none() && !faulted, octets, &mut discard);
            chunks.filter.feed(octets, sink);
            if !faulted && chunks.filter.fault().is_some() {
                // abandon what the next hop has of the message: close without its end; a
                // chunk's reply will never come from it
                link.drop();
                self.fwd.waiting.retain(|w| !matches!(w, Waiting::Chunk | Waiting::ChunkLast));
                self.fwd.deadline = None;
            }
        }
        chunk.remaining -= take as u64;
        *pos += take;
        if let Link::Up(l) = &*link
            && self.fwd.deadline.is_none()
            && !l.up.output().is_empty()
        {
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
        }
        if self.reader.chunk.as_ref().is_some_and(|c| c.remaining > 0) {
            return take > 0;
        }
        if let Some(chunk) = self.reader.chunk.take() {
            self.chunk_done(link, chunk, now);
        }
        true
    }

    /// A chunk's octets are all in: its reply.
    fn chunk_done(&mut self, link: &mut Link, chunk: super::session::Chunk, now: Instant) {
        if let Some(reply) = chunk.refused {
            return self.reply(&reply);
        }
        let Some(txn) = &mut self.txn else { return };
        if chunk.last {
            txn.data_end = Some(now);
        }
        let Some(chunks) = &mut txn.chunks else { return };
        match (chunks.filter.fault(), txn.broken) {
            (Some(fault), _) => self.undelivered(Undelivered::Body(fault), now),
            (None, Some(hop)) => self.undelivered(Undelivered::HopFailed(hop), now),
            // the next hop's reply to the chunk is the peer's
            (None, None) if chunks.filter.is_verbatim() => {}
            (None, None) if !chunk.last => self.reply(&chunk_taken(chunk.size)),
            (None, None) => match link {
                Link::Up(l) => {
                    chunks.filter.finish(l.up.data_sink());
                    l.hold = false;
                    l.up.end_data();
                    self.await_reply(Waiting::Dot, now);
                }
                _ => self.undelivered(Undelivered::HopFailed(HopFault::Connection), now),
            },
        }
    }

    /// Feeds buffered input to the body filter, up to the end of data.
    pub(super) fn body_input(&mut self, link: &mut Link, now: Instant) {
        let input = &self.reader.input[self.reader.pos..];
        let Some(txn) = self.txn.as_mut() else { return };
        let Some(body) = txn.body.as_mut() else { return };
        let faulted = body.filter.fault().is_some();
        let mut discard = Vec::new();
        let sink = body_sink(link, txn.broken.is_none() && !faulted, input, &mut discard);
        let end = body.filter.feed(input, sink);
        let fault_now = !faulted && body.filter.fault().is_some();
        self.reader.pos = end.map_or(self.reader.input.len(), |n| self.reader.pos + n);
        if fault_now {
            // abandon what the next hop has of the message: close without the final dot
            link.drop();
        }
        if let Link::Up(l) = &*link
            && self.fwd.deadline.is_none()
            && !l.up.output().is_empty()
        {
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
        }
        if end.is_some() {
            self.end_of_data(link, now);
        }
    }

    fn end_of_data(&mut self, link: &mut Link, now: Instant) {
        let Some(txn) = &mut self.txn else { return };
        txn.data_end = Some(now);
        let fault = txn.body.as_ref().and_then(|b| b.filter.fault());
        match (fault, txn.broken) {
            (Some(fault), _) => self.undelivered(Undelivered::Body(fault), now),
            (None, Some(hop)) => self.undelivered(Undelivered::HopFailed(hop), now),
            (None, None) => match link {
                Link::Up(l) => {
                    l.up.end_data();
                    self.await_reply(Waiting::Dot, now);
                }
                _ => self.undelivered(Undelivered::HopFailed(HopFault::Connection), now),
            },
        }
    }

    /// Our refusal of the message (the reply the cause gets), and the transaction's end.
    fn undelivered(&mut self, cause: Undelivered, now: Instant) {
        if let Some(reply) = cause.reply() {
            self.reply(reply);
        }
        self.end_transaction(Outcome::Undelivered(cause), now);
    }

    /// The trace header (RFC 5321 §4.4), first in the message.
    fn received_header(&self, now: Instant) -> String {
        use std::fmt::Write as _;
        let Some(txn) = &self.txn else { return String::new() };
        let helo = self.helo.as_ref().map_or("unknown", |h| h.name.as_str());
        // RFC 3848 and RFC 6531: an S for TLS
        let protocol = match (txn.smtputf8, self.helo.as_ref().is_some_and(|h| h.extended), self.tls.is_some()) {
            (true, _, false) => "UTF8SMTP",
            (true, _, true) => "UTF8SMTPS",
            (false, true, false) => "ESMTP",
            (false, true, true) => "ESMTPS",
            (false, false, _) => "SMTP",
        };
        let mut h = String::with_capacity(256);
        let _ = match self.peer.ip() {
            std::net::IpAddr::V4(a) => write!(h, "Received: from {helo} ([{a}])"),
            std::net::IpAddr::V6(a) => write!(h, "Received: from {helo} ([IPv6:{a}])"),
        };
        if let Some(tls) = self.tls {
            let _ = write!(h, "\r\n\t(using {} with cipher {})", tls.version, tls.cipher);
        }
        let host = &self.settings.hostname;
        let _ = write!(h, "\r\n\tby {host} (mxgate) with {protocol} id {}", txn.id);
        // name the recipient only when there is exactly one (others stay private)
        if let (Some(r), 1) = (&txn.first_rcpt, txn.accepted) {
            let _ = write!(h, "\r\n\tfor {r}");
        }
        let _ = write!(h, ";\r\n\t{}\r\n", self.unix_time(now));
        h
    }
}

/// The next hop's own id for a message it took, from its reply to the end of data:
/// "queued as ID" (Postfix, mxgate) or "id=ID" (Exim); letters, digits, `.`, `-`, `_`,
/// at most 64, or none.
pub(super) fn hop_queue_id(reply: &Reply) -> Option<String> {
    let text = reply.lines.join(" ");
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let after_queued_as = words.windows(3).find(|w| w[0].eq_ignore_ascii_case("queued") && w[1] == "as").map(|w| w[2]);
    let id_equals = words.iter().find_map(|w| w.strip_prefix("id="));
    let id = after_queued_as.or(id_equals)?.trim_end_matches([')', '.', ',', ';']);
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    (plain && (1..=64).contains(&id.len())).then(|| id.to_owned())
}

/// Where a message's bytes go, DATA's or BDAT's: the next hop's output while it can take
/// them (`relaying`: the transaction is whole and the message not faulty), else `discard`.
/// The trace header waits for the first of `input` to go out with it.
fn body_sink<'a>(link: &'a mut Link, relaying: bool, input: &[u8], discard: &'a mut Vec<u8>) -> &'a mut Vec<u8> {
    match link {
        Link::Up(l) if relaying => {
            l.hold &= input.is_empty();
            l.up.data_sink()
        }
        _ => discard,
    }
}

/// Appends `value` as RFC 3461 xtext: printable ASCII but "+" and "=" as they are, any
/// other octet as "+XX".
pub(super) fn xtext(value: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}
