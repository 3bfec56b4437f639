//! The session's side toward the next hop: asking its [`Link`] for a connection (pooled
//! or new, next hops in order: link.rs), forwarding each command and answering the peer
//! with the reply in the order owed, and streaming the body through the filter.
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

use std::net::SocketAddr;
use std::time::Instant;

use super::client::{Command, Progress, Reply, Upstream};
use super::data::BodyFilter;
use super::link::Link;
use super::outcome::{HopFault, Outcome, Undelivered};
use super::replies::*;
use super::session::{Body, HopTransmit, Phase, Session, Waiting};

impl Session {
    // ---- the next hop's port -------------------------------------------------------------

    /// What the driver does next on the next hop's side.
    pub fn poll_relay(&self) -> HopTransmit<'_> {
        self.fwd.link.poll(self.phase == Phase::Open, &self.settings.relay.next_hops)
    }

    /// The driver started connecting to the hop `poll_relay` asked for.
    pub fn dialing(&mut self) {
        self.fwd.link.dialing();
    }

    /// A connection to the hop asked for: new (greeting still to come) or, when
    /// `reused`, from the pool (ready).
    pub fn attach_upstream(&mut self, up: Upstream, reused: bool, now: Instant) {
        let ready = up.is_ready();
        self.fwd.link.attach(up, reused);
        self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
        if ready {
            self.link_ready(now);
        }
    }

    /// Bytes from the next hop.
    pub fn handle_relay_input(&mut self, data: &[u8], now: Instant) {
        if let Link::Up(l) = &mut self.fwd.link {
            l.up.handle_input(data);
            self.upstream_events(now);
        }
        self.drop_if_over(now);
    }

    /// `n` bytes of the last relay `Send` went out.
    pub fn consume_relay_output(&mut self, n: usize, now: Instant) {
        if let Link::Up(l) = &mut self.fwd.link {
            l.up.consume_output(n);
            if self.fwd.waiting.is_empty() {
                // body streaming: the next hop keeps taking bytes
                let pending = !l.up.output().is_empty();
                self.fwd.deadline = pending.then(|| now + self.settings.relay.reply_timeout);
            }
        }
    }

    /// The connection to the next hop failed: refused, broken, closed.
    pub fn handle_relay_error(&mut self, now: Instant) {
        self.relay_failed(HopFault::Connection, now);
    }

    /// Hands the next-hop connection back to the driver, with its next hop's address (as
    /// this session's settings name it, whatever a reload changed since): the driver
    /// pools it after `Release` and closes it after `Close`.
    pub fn detach_relay(&mut self) -> Option<(Upstream, SocketAddr)> {
        let wanted = match (self.fwd.waiting.front(), self.phase) {
            (Some(Waiting::Link { hop, pooled_ok }), Phase::Open) => Some((*hop, *pooled_ok)),
            _ => None,
        };
        self.fwd.link.detach(&self.settings.relay.next_hops, wanted)
    }

    /// The next hop said 220 to STARTTLS: its address (as this session's settings name
    /// it), once, for the connection's TLS layer to start the handshake.
    pub fn take_relay_starttls(&mut self) -> Option<SocketAddr> {
        let Link::Up(l) = &mut self.fwd.link else { return None };
        if !l.up.take_starttls() {
            return None;
        }
        self.settings.relay.next_hops.get(l.hop).copied()
    }

    /// The handshake with the next hop is done: EHLO again, under TLS.
    pub fn relay_tls_started(&mut self) {
        if let Link::Up(l) = &mut self.fwd.link {
            l.up.tls_started();
        }
    }

    // ---- forwarding commands -------------------------------------------------------------

    /// MAIL was accepted here: send it on once a connection is ready.
    pub(super) fn start_mail(&mut self, now: Instant) {
        if self.settings.relay.next_hops.is_empty() {
            return self.answer_failure(Waiting::Mail, HopFault::NoneConfigured, now);
        }
        if self.fwd.link.ready() {
            return self.send_mail(now);
        }
        self.fwd.waiting.push_back(Waiting::Link { hop: 0, pooled_ok: true });
        self.fwd.link.want(0, true);
        self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
    }

    /// A connection is ready: MAIL goes out, with what was pipelined behind it (commands
    /// sent again after a stale or failed connection), then pipelined input goes on.
    fn link_ready(&mut self, now: Instant) {
        if !matches!(self.fwd.waiting.front(), Some(Waiting::Link { .. })) {
            return;
        }
        let behind = std::mem::take(&mut self.fwd.waiting);
        self.send_mail(now);
        for waiting in behind.into_iter().skip(1) {
            match waiting {
                Waiting::Rcpt(to) if self.txn.is_some() => self.forward_rcpt(to, now),
                Waiting::Data if self.txn.is_some() => self.forward_data(now),
                Waiting::Local { .. } => self.fwd.waiting.push_back(waiting),
                // the sender was refused here after all (8BITMIME): no transaction to go on
                _ => self.reply(MAIL_FIRST),
            }
        }
        self.process(now);
    }

    fn send_mail(&mut self, now: Instant) {
        let (Link::Up(l), Some(txn)) = (&mut self.fwd.link, &mut self.txn) else { return };
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
        l.up.command(Command::Mail, line.as_bytes());
        l.clean = false;
        txn.hop = Some(l.hop);
        self.await_reply(Waiting::Mail, now);
    }

    pub(super) fn forward_rcpt(&mut self, to: super::address::Path, now: Instant) {
        let line = format!("RCPT TO:{to}");
        self.forward(Command::Rcpt, line.as_bytes(), Waiting::Rcpt(to), now);
    }

    pub(super) fn forward_data(&mut self, now: Instant) {
        self.forward(Command::Data, b"DATA", Waiting::Data, now);
    }

    pub(super) fn forward_rset(&mut self, now: Instant) {
        self.forward(Command::Rset, b"RSET", Waiting::Rset, now);
    }

    fn forward(&mut self, cmd: Command, line: &[u8], waiting: Waiting, now: Instant) {
        match &mut self.fwd.link {
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
        }
        self.fwd.waiting.push_back(waiting);
    }

    // ---- the next hop's answers ----------------------------------------------------------

    fn upstream_events(&mut self, now: Instant) {
        while self.phase == Phase::Open {
            let Link::Up(l) = &mut self.fwd.link else { return };
            let Some(event) = l.up.poll_event() else { return };
            match event {
                Progress::Ready => self.link_ready(now),
                // 421: the next hop is closing the connection
                Progress::Reply(_, reply) if reply.code == 421 => return self.relay_failed(HopFault::Closing, now),
                Progress::Reply(cmd, reply) => {
                    l.untested = false;
                    self.answer(cmd, &reply, now);
                }
                Progress::Failed(why) => {
                    tracing::debug!(peer = %self.peer, "next hop failed: {why}");
                    return self.relay_failed(HopFault::Protocol, now);
                }
                Progress::NoTls(why) => {
                    let hop = self.settings.relay.next_hops.get(l.hop).map(ToString::to_string).unwrap_or_default();
                    tracing::warn!(peer = %self.peer, "next hop {hop} {why} (relay.tls = \"required\")");
                    return self.relay_failed(HopFault::NoTls, now);
                }
            }
        }
    }

    /// The next hop's reply to the oldest command forwarded; then our own replies that
    /// waited behind it, and the input that waited.
    fn answer(&mut self, cmd: Command, reply: &Reply, now: Instant) {
        let waiting = self.fwd.waiting.pop_front();
        let more = self.fwd.waiting.iter().any(Waiting::forwarded);
        self.fwd.deadline = more.then(|| now + self.settings.relay.reply_timeout);
        self.answering_rcpt = cmd == Command::Rcpt;
        match (waiting, cmd) {
            (Some(Waiting::Mail), Command::Mail) => self.answer_mail(reply, now),
            (Some(Waiting::Rcpt(to)), Command::Rcpt) => self.answer_rcpt(to, reply),
            (Some(Waiting::Data), Command::Data) => self.answer_data(reply, now),
            (Some(Waiting::Dot), Command::Dot) => self.answer_dot(reply, now),
            (Some(Waiting::Rset), Command::Rset) => {
                // the peer's transaction is gone whatever the next hop says; its
                // connection is only kept when it said 250
                self.settle_reset(reply);
                self.emit(OK);
            }
            (Some(Waiting::Reset), Command::Rset) => self.settle_reset(reply),
            (waiting, cmd) => {
                tracing::debug!(peer = %self.peer, ?cmd, ?waiting, "next hop reply out of step");
                if let Some(w) = waiting {
                    self.fwd.waiting.push_front(w);
                }
                return self.relay_failed(HopFault::Protocol, now);
            }
        }
        self.flush_local();
        self.process(now);
    }

    fn answer_mail(&mut self, reply: &Reply, now: Instant) {
        if reply.is_positive() {
            if let Some(t) = &mut self.txn {
                t.open_upstream = true;
            }
            return self.emit(MAIL_OK);
        }
        // what was pipelined behind MAIL gets the next hop's answers to it (503 or 5xx);
        // the connection is clean again only once the next hop said 250 to our RSET (a
        // refused MAIL may leave it in any state: it must reach no other sender)
        self.pass_on(reply);
        self.end_transaction(Outcome::Undelivered(Undelivered::SenderRefused(reply.code)), now);
        self.reset_hop(now);
    }

    fn answer_rcpt(&mut self, to: super::address::Path, reply: &Reply) {
        match &mut self.txn {
            Some(t) if reply.is_positive() => {
                t.accepted += 1;
                t.first_rcpt.get_or_insert(to);
                self.emit(RCPT_OK);
            }
            // a next hop that accepts a recipient without a sender is out of its mind
            None if reply.is_positive() => self.confused_hop(MAIL_FIRST),
            // pipelined behind a sender the next hop refused: its refusal follows from
            // that one, which was counted
            None => self.pass_on_uncounted(reply),
            Some(_) => {
                self.count_refused();
                self.pass_on(reply);
            }
        }
    }

    fn answer_data(&mut self, reply: &Reply, now: Instant) {
        if reply.code != 354 {
            // behind a refused sender (no transaction here any more): uncounted, as above
            return if self.txn.is_none() { self.pass_on_uncounted(reply) } else { self.pass_on(reply) };
        }
        // The 354 comes only after a recipient was accepted: a next hop that says it
        // anyway (DATA pipelined behind refused RCPTs) gets no body.
        match &self.txn {
            None => return self.confused_hop(MAIL_FIRST),
            Some(t) if t.accepted == 0 => {
                self.confused_hop(RCPT_FIRST);
                return self.end_transaction(Outcome::Undelivered(Undelivered::NoValidRecipients), now);
            }
            Some(_) => {}
        }
        // Input that arrived while the next hop was deciding was sent before our 354.
        if !self.unprocessed().is_empty() {
            self.end_transaction(Outcome::Undelivered(Undelivered::ImproperPipelining), now);
            self.drop_link();
            return self.close_with(IMPROPER_PIPELINING, now);
        }
        let header = self.received_header(now);
        let max = self.settings.smtp.max_message_size;
        if let (Link::Up(l), Some(t)) = (&mut self.fwd.link, &mut self.txn) {
            l.up.send_data(header.as_bytes());
            l.hold = true;
            t.body = Some(Body { filter: BodyFilter::new(max), started: now, last_input: now });
        }
        self.emit(GO_AHEAD);
    }

    fn answer_dot(&mut self, reply: &Reply, now: Instant) {
        if let Some(t) = &mut self.txn {
            t.open_upstream = false;
        }
        if reply.code == 250 {
            self.set_clean();
            let id = self.txn.as_ref().map(|t| t.id.clone()).unwrap_or_default();
            self.emit(&queued(&id));
            return self.end_transaction(Outcome::Delivered, now);
        }
        self.pass_on(reply);
        self.end_transaction(Outcome::Undelivered(Undelivered::MessageRefused(reply.code)), now);
        self.reset_hop(now);
    }

    /// After the next hop refused the sender or the message: RSET, so that the
    /// connection is clean for whoever comes next (see [`Waiting::Reset`]).
    fn reset_hop(&mut self, now: Instant) {
        if let Link::Up(l) = &mut self.fwd.link
            && l.up.is_ready()
        {
            l.clean = false;
            l.up.command(Command::Rset, b"RSET");
            self.await_reply(Waiting::Reset, now);
        }
    }

    /// The next hop's reply to an RSET: 250 leaves its connection clean; anything else,
    /// and it is dropped (its state is unknown).
    fn settle_reset(&mut self, reply: &Reply) {
        if reply.code == 250 {
            self.set_clean();
        } else {
            tracing::debug!(peer = %self.peer, code = reply.code, "next hop refused RSET: its connection is dropped");
            self.drop_link();
        }
    }

    /// The next hop answered positively where it could not have: our own refusal instead,
    /// and that connection goes (its state is unknown).
    fn confused_hop(&mut self, refusal: &[u8]) {
        tracing::debug!(peer = %self.peer, "next hop accepted a command out of sequence");
        self.drop_link();
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

    fn set_clean(&mut self) {
        self.fwd.link.set_clean();
    }

    /// Drops the connection to the next hop (the driver closes it).
    pub(super) fn drop_link(&mut self) {
        self.fwd.link.drop();
    }

    /// The connection failed, timed out or broke the protocol.
    pub(super) fn relay_failed(&mut self, fault: HopFault, now: Instant) {
        let failover = self.fwd.link.failover(self.settings.relay.next_hops.len());
        self.drop_link();
        self.fwd.deadline = None;
        let mut owed = std::mem::take(&mut self.fwd.waiting);
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
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
            return;
        }
        if let Some(t) = &mut self.txn {
            t.broken = Some(fault);
        }
        for waiting in owed {
            match waiting {
                Waiting::Local { reply, rcpt } => {
                    self.answering_rcpt = rcpt;
                    self.emit(&reply);
                }
                forwarded => {
                    self.answering_rcpt = matches!(forwarded, Waiting::Rcpt(_));
                    self.answer_failure(forwarded, fault, now);
                }
            }
        }
        self.process(now);
    }

    /// The peer's answer for a command the next hop could not answer.
    fn answer_failure(&mut self, waiting: Waiting, fault: HopFault, now: Instant) {
        match waiting {
            Waiting::Rset => self.reply(OK),
            Waiting::Reset => {}
            Waiting::Rcpt(_) => self.refuse_recipient(NEXT_HOP_FAILED),
            Waiting::Data => self.reply(NEXT_HOP_FAILED),
            Waiting::Link { .. } | Waiting::Mail | Waiting::Dot => self.undelivered(Undelivered::HopFailed(fault), now),
            Waiting::Local { reply, .. } => self.reply(&reply),
        }
    }

    // ---- the body ------------------------------------------------------------------------

    /// Feeds buffered input to the body filter, up to the end of data.
    pub(super) fn body_input(&mut self, now: Instant) {
        let input = &self.reader.input[self.reader.pos..];
        let Some(txn) = self.txn.as_mut() else { return };
        let Some(body) = txn.body.as_mut() else { return };
        let faulted = body.filter.fault().is_some();
        let mut discard = Vec::new();
        let sink = match &mut self.fwd.link {
            Link::Up(l) if txn.broken.is_none() && !faulted => {
                l.hold &= input.is_empty();
                l.up.data_sink()
            }
            _ => &mut discard,
        };
        let end = body.filter.feed(input, sink);
        let fault_now = !faulted && body.filter.fault().is_some();
        self.reader.pos = end.map_or(self.reader.input.len(), |n| self.reader.pos + n);
        if fault_now {
            // abandon what the next hop has of the message: close without the final dot
            self.drop_link();
        }
        if let Link::Up(l) = &self.fwd.link
            && self.fwd.deadline.is_none()
            && !l.up.output().is_empty()
        {
            self.fwd.deadline = Some(now + self.settings.relay.reply_timeout);
        }
        if end.is_some() {
            self.end_of_data(now);
        }
    }

    fn end_of_data(&mut self, now: Instant) {
        let Some(txn) = &self.txn else { return };
        let fault = txn.body.as_ref().and_then(|b| b.filter.fault());
        match (fault, txn.broken) {
            (Some(fault), _) => self.undelivered(Undelivered::Body(fault), now),
            (None, Some(hop)) => self.undelivered(Undelivered::HopFailed(hop), now),
            (None, None) => match &mut self.fwd.link {
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
