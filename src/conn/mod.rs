//! A peer's connection, sans-IO, and what a worker's connections share: the layer the
//! I/O drivers (`net::uring`, `net::epoll`) drive, as quinn's runtimes drive
//! `quinn_proto::Connection`. Drivers own sockets and buffers and move bytes; everything
//! a connection *is* lives here, once.
//!
//! ```text
//!   accept ─► Host::admit ── refused ──► the one line (the worker's), close: no Connection
//!   (gate: access list,     │
//!    bans, limits)          └ allowed ─► Connection ─────────────────────────────────► freed
//!   (a trusted balancer: a Connection     │ Stage (stage.rs): a balancer's PROXY header, ▲
//!    at once, judged after its header)    │   then the gate on the address it carries;  │
//!                                         │   screening: pregreet, DNSBL (host's resolver)│
//!                                         │ Transport: Plain, TLS after STARTTLS (tls.rs)│
//!                                         │ Session (smtp): banner … QUIT / 421 / EOF ──┤
//!                                         └ next hop: none ─► HopConnect ─► up ─────────┘
//!                                              ▲  pooled (Host's pool) ─┘  │ HopRelease /
//!                                              └───────────────────────────┘ HopClose
//! ```
//!
//! A [`Connection`] is driven like quinn-proto's: one way in, [`Connection::handle`] with
//! an [`Input`] and the time, and one way out, [`Connection::poll`], which gives one
//! [`Output`] at a time until it has nothing to ask. Each socket operation it asks for
//! is asked once and is in flight until its completion comes back as an input:
//!
//! ```text
//!   Output                       completes with (Input)
//!   PeerSend(bytes)              PeerSent(n), n <= len (0: ask again; the socket was full)
//!   PeerReceive                  PeerBytes(bytes) or PeerEof
//!   PeerLast(line), PeerClose    nothing: the peer's side is over
//!   HopConnect { addr, .. }      HopAdopted(pooled) (the host's pool), or HopDialing then
//!                                HopConnected or HopFailed (the driver)
//!   HopSend(bytes)               HopSent(n), or HopFailed
//!   HopReceive                   HopBytes(bytes), or HopFailed
//!   HopRelease { hop, addr }     HopClosed (the host pooled the socket, or closed it)
//!   HopClose                     HopClosed (once what was in flight on it has ended)
//!   Report(report)               the host acts on it (judges a header, asks the
//!                                blocklists: DnsAnswer), counts it, logs it
//!   Deadline(at)                 Timeout once `at` has come (the last one given counts)
//! ```
//!
//! Besides: `Drain` and `Abort` (the server's life). The run-loop rule: after every
//! input, poll until `None` ([`Host::advance`] does it).

mod host;
mod pool;
mod stage;
mod timers;
mod tls;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::abuse::Admission;
use crate::peer::PeerIp;
use crate::screen::dnsbl::{self, Answer};
use crate::screen::pregreet::Pregreet;
use crate::smtp::client::Upstream;
use crate::smtp::replies::TALKED_EARLY;
use crate::smtp::{Event, HopTransmit, Link, Session, Transmit};
use crate::snapshot::Snapshot;
use stage::Stage;

pub use host::{Admit, Host, Io};
pub use timers::ConnId;

/// How the peer's bytes are carried: in clear, or (after STARTTLS) through the TLS layer,
/// between the driver's bytes and the session, so that neither knows.
#[derive(Debug, Default)]
pub enum Transport {
    #[default]
    Plain,
    Tls(Box<tls::TlsLayer>),
}

/// Everything that happens to a connection, from its driver or its host: one way in,
/// [`Connection::handle`], with the time it happened.
#[derive(Debug)]
pub enum Input<'a> {
    /// Bytes the peer sent.
    PeerBytes(&'a [u8]),
    /// `n` bytes of the last `PeerSend` went out (0: none could; ask again).
    PeerSent(usize),
    /// The peer closed its side, or its connection broke.
    PeerEof,
    /// The host hands over a pooled connection to the address `HopConnect` named, ready
    /// for MAIL.
    HopAdopted(Box<HopState>),
    /// The driver started connecting to the address `HopConnect` named.
    HopDialing,
    /// The new connection to the next hop is made; its greeting comes next.
    HopConnected,
    /// Bytes from the next hop.
    HopBytes(&'a [u8]),
    /// `n` bytes of the last `HopSend` went out.
    HopSent(usize),
    /// Connecting failed, or the next hop's connection broke or closed.
    HopFailed,
    /// The next-hop socket is no longer the connection's, after `HopClose` or
    /// `HopRelease`: closed, or pooled.
    HopClosed,
    /// The gate allowed the address a balancer's header carries (`Report::Header`): the
    /// session is that peer's, after the screening it gets, and `rest` (what came after
    /// the header) is its first input.
    Allowed {
        peer: PeerIp,
        /// The peer's source port, when the header carries one.
        port: Option<u16>,
        whitelisted: bool,
        admission: Admission,
        proxy_id: Option<Vec<u8>>,
        screening: Screening,
        rest: &'a [u8],
    },
    /// The gate refused the address a balancer's header carries: this line, then close,
    /// as at accept.
    Refused(&'a [u8]),
    /// A blocklist's answer about the peer (zone `zone` of the snapshot's
    /// `[[screen.dnsbl]]`), from the host's resolver.
    DnsAnswer { zone: usize, answer: Answer },
    /// The last `Deadline` given came (an early or stale one changes nothing).
    Timeout,
    /// The server is draining (see `smtp::Session::shutdown`).
    Drain,
    /// The drain's time is over.
    Abort,
}

/// What a connection asks of its driver and host, one at a time ([`Connection::poll`]);
/// each socket operation once, until its completion comes back (see the module's table).
#[derive(Debug)]
pub enum Output<'a> {
    /// Send (a first part of) these bytes to the peer.
    PeerSend(&'a [u8]),
    /// Read what the peer sends next.
    PeerReceive,
    /// Send this line, then close the peer's socket: a refusal, as at accept.
    PeerLast(&'a [u8]),
    /// Close the peer's socket, cancelling what is in flight on it.
    PeerClose,
    /// A connection to the next hop at `addr`: a pooled one when `pooled_ok`, else a new one.
    HopConnect { addr: SocketAddr, pooled_ok: bool },
    /// Send (a first part of) these bytes to the next hop.
    HopSend(&'a [u8]),
    /// Read what the next hop sends next.
    HopReceive,
    /// The next-hop connection is idle and clean: into the pool with its state (its next
    /// hop's address as this connection's snapshot names it), or closed if it cannot go.
    HopRelease { hop: Box<HopState>, addr: SocketAddr },
    /// Close the next-hop socket, cancelling what is in flight on it.
    HopClose,
    /// For the host to act on, count and log.
    Report(Report),
    /// When `Timeout` is next due (`None`: never); given when it changed.
    Deadline(Option<Instant>),
}

/// What a connection tells its host ([`Output::Report`]): what to act on (judge a
/// balancer's address, ask the blocklists), and what to count and log.
#[derive(Debug)]
pub enum Report {
    /// A balancer's header is whole: the host judges the address it carries and gives
    /// its verdict (`Input::Allowed`, `Input::Refused`); `rest` is the session's.
    Header { header: crate::proxy::Header, rest: Vec<u8> },
    /// The blocklists are to be asked about the peer (answers: `dns_answer`).
    AskDns,
    /// A balancer's connection ended without a header.
    NoHeader(NoHeader),
    /// Screening refused the peer.
    Screened(Screened),
    /// The peer passed screening: remember it.
    Passed,
    /// What the session reports.
    Session(Event),
}

/// How a trusted balancer's connection ended before its header was whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoHeader {
    /// Malformed, oversized, truncated or late: refused (`refused_proxy_header`).
    Refused(stage::BadHeader),
    /// Closed before sending anything (a bare TCP health check): gone before judged.
    Gone,
}

/// What screening found, for the host to count and log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screened {
    /// The peer spoke first: its first octets, escaped for the log.
    TalkedEarly(Vec<u8>),
    /// The blocklists scored it at or over the threshold: refused with the 550 line
    /// naming `zone`.
    Blocked { zone: String, score: i32 },
}

/// The screening an allowed peer gets before its session: the pregreet test until
/// `pregreet` (the greeting's first line, then silence), and the answers of `zones`
/// blocklists awaited; none for a peer that needs none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Screening {
    pub pregreet: Option<Instant>,
    pub zones: usize,
}

/// A next-hop connection's state apart from its socket (its client, and its TLS after
/// STARTTLS): what the pool keeps with the socket between sessions.
#[derive(Debug)]
pub struct HopState {
    pub(crate) up: Upstream,
    tls: Option<Box<tls::HopTls>>,
}

impl HopState {
    /// What an idle connection sends before it is closed: QUIT, under its TLS (with the
    /// close_notify alert after it) when it has one; nothing is ever sent in clear after
    /// STARTTLS.
    pub fn farewell(&mut self) -> Vec<u8> {
        match &mut self.tls {
            None => b"QUIT\r\n".to_vec(),
            Some(tls) => tls.farewell(b"QUIT\r\n"),
        }
    }
}

/// One allowed peer's connection: its session, its next-hop side and its deadline.
#[derive(Debug)]
pub struct Connection {
    /// The snapshot it was accepted under, kept for its whole life (its session holds
    /// the part it needs).
    snapshot: Arc<Snapshot>,
    /// The peer's dialogue.
    session: Session,
    /// The connection to the next hop the session forwards on, lent to it call by call.
    link: Link,
    transport: Transport,
    /// The next hop's TLS, after its 220 to STARTTLS (`[relay] tls`).
    hop_tls: Option<Box<tls::HopTls>>,
    /// Where it is in its life: a balancer's header, judging, screening, the session,
    /// a refusal (stage.rs).
    stage: Stage,
    /// What the host is yet to hear, before the session's own events.
    reports: VecDeque<Report>,
    /// The balancer's unique id for the connection (PROXY v2), for the mail log.
    proxy_id: Option<Vec<u8>>,
    /// A whitelisted peer is never counted or banned.
    whitelisted: bool,
    /// Its place in the connection counts, given back when the connection is freed (none
    /// while a balancer's header is awaited).
    _admission: Option<Admission>,
    /// Tells reuses of a slab key apart.
    generation: u32,
    /// What is in flight on the sockets, and the deadline last given.
    ports: Ports,
}

/// The operations a connection asked for and has not had back, per socket, so that
/// [`Connection::poll`] asks each once; and the deadline it last gave.
#[derive(Debug, Default)]
struct Ports {
    peer_sending: bool,
    peer_receiving: bool,
    /// `PeerLast` or `PeerClose` was given: the peer's side is over.
    peer_closed: bool,
    /// `HopConnect` given, not yet answered (adopted, dialing, failed).
    hop_connect: bool,
    hop_sending: bool,
    hop_receiving: bool,
    /// `HopClose` or `HopRelease` given, `HopClosed` not yet back.
    hop_closing: bool,
    deadline: Option<Instant>,
}

impl Connection {
    /// An allowed peer's connection, its session after `screening`.
    pub fn new(
        snapshot: Arc<Snapshot>,
        session: Session,
        (whitelisted, admission): (bool, Admission),
        screening: Screening,
        generation: u32,
    ) -> Self {
        let stage = Stage::screening(screening.pregreet, screening.zones);
        let mut conn = Self::with_stage(snapshot, session, stage, generation);
        conn.whitelisted = whitelisted;
        conn._admission = Some(admission);
        conn
    }

    /// A trusted balancer's connection: its PROXY header first, by `deadline`; `session`
    /// waits (its banner unsent) for the address the header carries.
    pub fn behind_balancer(snapshot: Arc<Snapshot>, session: Session, deadline: Instant, generation: u32) -> Self {
        Self::with_stage(snapshot, session, Stage::header(deadline), generation)
    }

    fn with_stage(snapshot: Arc<Snapshot>, session: Session, stage: Stage, generation: u32) -> Self {
        Connection {
            snapshot,
            session,
            link: Link::None,
            transport: Transport::default(),
            hop_tls: None,
            stage,
            reports: VecDeque::new(),
            proxy_id: None,
            whitelisted: false,
            _admission: None,
            generation,
            ports: Ports::default(),
        }
    }

    /// What the connection asks next, if anything: the reports first (a balancer's whole
    /// header, the blocklists to ask, what the connection found, the session's events),
    /// then the next hop's connection given back, the peer's operations, the next hop's,
    /// and last the deadline, when it changed.
    pub fn poll(&mut self) -> Option<Output<'_>> {
        if let Some(report) = self.next_report() {
            return Some(Output::Report(report));
        }
        // an idle link is released once the session is over, or needs another next hop
        // (`Link::poll`)
        if !self.ports.hop_closing && hop_wants(&self.session, &self.link, &self.hop_tls) == HopTransmit::Release {
            self.ports.hop_closing = true;
            let tls = self.hop_tls.take();
            let next_hops = &self.session.settings().relay.next_hops;
            return Some(match self.link.detach(next_hops, self.session.wanted_link()) {
                Some((up, addr)) => Output::HopRelease { hop: Box::new(HopState { up, tls }), addr },
                // a next hop this snapshot does not name: cannot happen
                None => Output::HopClose,
            });
        }
        let Connection { stage, session, link, transport, hop_tls, ports, .. } = self;
        if !ports.peer_closed {
            match peer_wants(stage, session, link, transport) {
                Transmit::Send(bytes) if !ports.peer_sending => {
                    ports.peer_sending = true;
                    return Some(Output::PeerSend(bytes));
                }
                Transmit::Receive if !ports.peer_receiving => {
                    ports.peer_receiving = true;
                    return Some(Output::PeerReceive);
                }
                Transmit::Last(line) => {
                    ports.peer_closed = true;
                    return Some(Output::PeerLast(line));
                }
                Transmit::Close => {
                    ports.peer_closed = true;
                    return Some(Output::PeerClose);
                }
                _ => {}
            }
        }
        if !ports.hop_closing {
            match hop_wants(session, link, hop_tls) {
                HopTransmit::Connect { addr, pooled_ok } if !ports.hop_connect => {
                    ports.hop_connect = true;
                    return Some(Output::HopConnect { addr, pooled_ok });
                }
                HopTransmit::Send(bytes) if !ports.hop_sending => {
                    ports.hop_sending = true;
                    return Some(Output::HopSend(bytes));
                }
                HopTransmit::Receive if !ports.hop_receiving => {
                    ports.hop_receiving = true;
                    return Some(Output::HopReceive);
                }
                HopTransmit::Close => {
                    ports.hop_closing = true;
                    return Some(Output::HopClose);
                }
                _ => {}
            }
        }
        let deadline = if stage.in_session() { session.poll_timeout(link) } else { stage.deadline() };
        if deadline != ports.deadline {
            ports.deadline = deadline;
            return Some(Output::Deadline(deadline));
        }
        None
    }

    /// The next report: a balancer's whole header first, the blocklists to ask, what the
    /// connection found, then the session's events.
    fn next_report(&mut self) -> Option<Report> {
        if matches!(self.stage, Stage::Judge { .. })
            && let Stage::Judge { header, rest } = std::mem::replace(&mut self.stage, Stage::Waiting)
        {
            return Some(Report::Header { header, rest });
        }
        if let Stage::Screening { dns: Some(dns), .. } = &mut self.stage
            && dns.ask()
        {
            return Some(Report::AskDns);
        }
        self.reports.pop_front().or_else(|| self.session.poll_event().map(Report::Session))
    }

    /// Zone `zone`'s answer. With every answer in: a score at or over the threshold
    /// refuses the peer with the 550 line of its heaviest listing.
    fn dns_answer(&mut self, zone: usize, answer: Answer, now: Instant) {
        // refused already (it talked first), or draining: nothing left to decide
        let Stage::Screening { dns: Some(pending), .. } = &mut self.stage else { return };
        let screen = &self.snapshot.config.screen;
        let ip = self.session.peer().ip();
        let Some(scored) = pending.answer(zone, answer, &screen.dnsbl, screen.dnsbl_threshold, ip) else { return };
        match scored {
            dnsbl::Scored::Blocked { zone, score, reply } => {
                self.stage = Stage::Reject { line: reply.into(), sent: 0 };
                self.reports.push_back(Report::Screened(Screened::Blocked { zone, score }));
            }
            dnsbl::Scored::Passed => {
                if let Stage::Screening { dns, .. } = &mut self.stage {
                    *dns = None;
                }
                self.screen_done(now);
            }
        }
    }

    /// Both tests are behind the peer: passed (a refusal ends screening on its own).
    fn screen_done(&mut self, now: Instant) {
        if matches!(self.stage, Stage::Screening { pregreet: None, dns: None }) {
            self.stage = Stage::Session;
            self.reports.push_back(Report::Passed);
            self.settle(now);
        }
    }

    /// The gate's verdict on the address a balancer's header carries.
    fn judged(&mut self, input: Input<'_>, now: Instant) {
        if !matches!(self.stage, Stage::Waiting) {
            return;
        }
        match input {
            Input::Allowed { peer, port, whitelisted, admission, proxy_id, screening, rest } => {
                self.stage = Stage::screening(screening.pregreet, screening.zones);
                self.session.set_peer(peer);
                if let Some(port) = port {
                    self.session.set_port(port);
                }
                self.whitelisted = whitelisted;
                self._admission = Some(admission);
                self.proxy_id = proxy_id;
                if !rest.is_empty() {
                    self.peer_input(rest, now);
                }
            }
            Input::Refused(line) => self.stage = Stage::Refuse { line: line.into() },
            _ => {}
        }
    }

    pub(crate) fn proxy_id(&self) -> Option<&[u8]> {
        self.proxy_id.as_deref()
    }

    pub(crate) fn snapshot_arc(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn whitelisted(&self) -> bool {
        self.whitelisted
    }

    /// Something happened to the connection.
    pub fn handle(&mut self, input: Input<'_>, now: Instant) {
        match input {
            // what completes after the peer's side is over changes nothing
            Input::PeerBytes(_) | Input::PeerSent(_) | Input::PeerEof if self.ports.peer_closed => {}
            Input::PeerBytes(bytes) => {
                self.ports.peer_receiving = false;
                self.peer_input(bytes, now);
            }
            Input::PeerSent(n) => {
                self.ports.peer_sending = false;
                self.peer_sent(n, now);
            }
            Input::PeerEof => {
                self.ports.peer_receiving = false;
                self.peer_eof(now);
            }
            Input::HopClosed => self.hop_closed(),
            // nor what completes on a next-hop socket being closed
            _ if self.ports.hop_closing && input.on_hop() => {}
            Input::HopAdopted(hop) => {
                self.ports.hop_connect = false;
                self.hop_adopted(*hop, now);
            }
            Input::HopDialing => {
                self.ports.hop_connect = false;
                self.link.dialing();
            }
            Input::HopConnected => self.hop_connected(now),
            Input::HopBytes(bytes) => {
                self.ports.hop_receiving = false;
                self.hop_input(bytes, now);
            }
            Input::HopSent(n) => {
                self.ports.hop_sending = false;
                self.hop_sent(n, now);
            }
            Input::HopFailed => {
                self.ports.hop_connect = false;
                self.hop_failed(now);
            }
            input @ (Input::Allowed { .. } | Input::Refused(_)) => self.judged(input, now),
            Input::DnsAnswer { zone, answer } => self.dns_answer(zone, answer, now),
            Input::Timeout => self.handle_timeout(now),
            Input::Drain => self.shutdown(now),
            Input::Abort => self.abort(now),
        }
    }

    // ---- the peer ------------------------------------------------------------------------

    /// Bytes the peer sent.
    fn peer_input(&mut self, bytes: &[u8], now: Instant) {
        match self.stage {
            _ if self.stage.in_session() => {}
            Stage::Screening { pregreet: Some(_), .. } => {
                // spoke before the greeting was complete
                let octets = Pregreet::talked_early(bytes);
                self.reports.push_back(Report::Screened(Screened::TalkedEarly(octets)));
                self.stage = Stage::Reject { line: TALKED_EARLY.into(), sent: 0 };
                return;
            }
            _ => {
                if let Err(why) = self.stage.input(bytes) {
                    self.reports.push_back(Report::NoHeader(NoHeader::Refused(why)));
                }
                return;
            }
        }
        match &mut self.transport {
            Transport::Plain => self.session.handle_input(&mut self.link, bytes, now),
            Transport::Tls(t) => t.received(bytes),
        }
        self.settle(now);
    }

    /// `n` bytes of the last `Send` went out.
    fn peer_sent(&mut self, n: usize, now: Instant) {
        match &mut self.stage {
            Stage::Session | Stage::Screening { pregreet: None, .. } => {}
            Stage::Screening { pregreet: Some(test), .. } => return test.sent(n),
            Stage::Reject { sent, .. } => {
                *sent += n;
                return;
            }
            // no send is asked in the other stages (a refusal's line is `PeerLast`, which
            // completes with nothing)
            _ => return,
        }
        match &mut self.transport {
            Transport::Plain => self.session.consume_output(n),
            Transport::Tls(t) => t.sent(n),
        }
        self.settle(now);
    }

    /// The peer closed its side, or its connection broke.
    fn peer_eof(&mut self, now: Instant) {
        match &mut self.stage {
            stage if stage.in_session() => self.session.handle_eof(now),
            Stage::Header { .. } => {
                let ended = self.stage.eof().map_or(NoHeader::Gone, NoHeader::Refused);
                self.reports.push_back(Report::NoHeader(ended));
            }
            _ => self.stage = Stage::Close,
        }
    }

    /// After every completion that may have made the session say or want something (the
    /// detaching one, `hop_closed`, changes neither): a STARTTLS
    /// just answered switches the transport (the 220 still goes out in clear), and the TLS
    /// layer moves what it can between rustls and the session.
    fn settle(&mut self, now: Instant) {
        if matches!(self.transport, Transport::Plain) && self.session.take_starttls() {
            let mut clear = Vec::new();
            while let Transmit::Send(bytes) = self.session.poll_transmit(&self.link) {
                clear.extend_from_slice(bytes);
                let n = bytes.len();
                self.session.consume_output(n);
            }
            let config = self.snapshot.tls.as_ref().map(|t| Arc::clone(&t.server));
            match config.map(|c| tls::TlsLayer::new(c, clear)) {
                Some(Ok(layer)) => self.transport = Transport::Tls(Box::new(layer)),
                _ => {
                    // the snapshot that offered STARTTLS has no configuration: cannot happen
                    tracing::error!(peer = %self.session.peer(), "STARTTLS without a TLS configuration");
                    self.session.tls_failed(now);
                }
            }
        }
        if self.hop_tls.is_none()
            && let Some(addr) = self.link.take_starttls(&self.session.settings().relay.next_hops)
        {
            match self.hop_tls_layer(addr) {
                Ok(layer) => self.hop_tls = Some(Box::new(layer)),
                Err(e) => {
                    tracing::warn!(peer = %self.session.peer(), "next hop {addr}: cannot start TLS: {e}");
                    self.session.handle_relay_error(&mut self.link, now);
                }
            }
        }
        if let Transport::Tls(t) = &mut self.transport {
            while !t.failed() && tls_step(t, &mut self.session, &mut self.link, now) {}
            t.flush();
        }
        if let Some(t) = &mut self.hop_tls {
            // the session's commands and body into records, while few wait to go out
            while t.takes_more() {
                let open = self.session.is_open();
                let HopTransmit::Send(bytes) = self.link.poll(open, &self.session.settings().relay.next_hops) else {
                    break;
                };
                let n = t.write(bytes);
                if n == 0 {
                    break;
                }
                self.session.consume_relay_output(&mut self.link, n, now);
            }
            t.flush();
        }
    }

    /// TLS to the next hop at `addr`: the snapshot's client configuration, and the name
    /// its certificate must carry (`[relay] tls_name`, else its address).
    fn hop_tls_layer(&self, addr: std::net::SocketAddr) -> Result<tls::HopTls, rustls::Error> {
        use rustls::pki_types::ServerName;
        let config = self.snapshot.relay_tls.as_ref().ok_or(rustls::Error::General("no relay.tls".into()))?;
        let name = match &self.snapshot.config.relay.tls_name {
            // checked when the configuration was read
            Some(name) => ServerName::try_from(name.clone()).map_err(|e| rustls::Error::General(e.to_string()))?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        tls::HopTls::new(Arc::clone(config), name, addr)
    }

    // ---- the next hop --------------------------------------------------------------------

    /// The new connection to the next hop is made; its greeting comes next.
    fn hop_connected(&mut self, now: Instant) {
        let upstream = Upstream::new(self.session.hostname(), self.snapshot.config.relay.tls);
        self.hop_tls = None;
        self.link.attach(upstream, false);
        self.session.link_attached(&mut self.link, now);
        self.settle(now);
    }

    /// A pooled connection, ready for MAIL.
    fn hop_adopted(&mut self, hop: HopState, now: Instant) {
        self.hop_tls = hop.tls;
        self.link.attach(hop.up, true);
        self.session.link_attached(&mut self.link, now);
        self.settle(now);
    }

    fn hop_input(&mut self, bytes: &[u8], now: Instant) {
        match self.hop_tls.as_mut().map(|t| (t.addr(), t.received(bytes))) {
            None => self.session.handle_relay_input(&mut self.link, bytes, now),
            Some((_, Ok(read))) => {
                if read.started {
                    self.link.tls_started();
                }
                if let Some(t) = &self.hop_tls
                    && !t.plaintext().is_empty()
                {
                    self.session.handle_relay_input(&mut self.link, t.plaintext(), now);
                }
                if read.closed {
                    // close_notify: the next hop is done with this connection
                    self.session.handle_relay_error(&mut self.link, now);
                }
            }
            Some((addr, Err(e))) => {
                tracing::warn!(peer = %self.session.peer(), "next hop {addr}: TLS: {e}");
                self.session.handle_relay_error(&mut self.link, now);
            }
        }
        self.settle(now);
    }

    fn hop_sent(&mut self, n: usize, now: Instant) {
        match &mut self.hop_tls {
            None => self.session.consume_relay_output(&mut self.link, n, now),
            Some(t) => t.sent(n),
        }
        self.settle(now);
    }

    /// Connecting failed, or the connection broke or closed.
    fn hop_failed(&mut self, now: Instant) {
        self.session.handle_relay_error(&mut self.link, now);
        self.settle(now);
    }

    /// The next-hop socket is no longer the connection's (after `HopClose`, or
    /// `HopRelease`, which let go of its state already): whatever the session still
    /// needs comes on a new one.
    fn hop_closed(&mut self) {
        let ports = &mut self.ports;
        (ports.hop_connect, ports.hop_sending, ports.hop_receiving, ports.hop_closing) = (false, false, false, false);
        self.hop_tls = None;
        self.link.detach(&self.session.settings().relay.next_hops, self.session.wanted_link());
    }

    // ---- time and the server's life ------------------------------------------------------

    fn handle_timeout(&mut self, now: Instant) {
        let deadline =
            if self.stage.in_session() { self.session.poll_timeout(&self.link) } else { self.stage.deadline() };
        if deadline.is_none_or(|at| at > now) {
            return;
        }
        if let Stage::Screening { pregreet: pregreet @ Some(_), .. } = &mut self.stage {
            if pregreet.is_some_and(|test| test.passed(now)) {
                // silent for greet_wait: the session's banner ends the greeting (once the
                // blocklists have answered)
                *pregreet = None;
                self.screen_done(now);
            }
            return;
        }
        if !self.stage.in_session() {
            if let Some(why) = self.stage.timeout(now) {
                self.reports.push_back(Report::NoHeader(NoHeader::Refused(why)));
            }
            return;
        }
        self.session.handle_timeout(&mut self.link, now);
        self.settle(now);
    }

    /// The server is draining (see `smtp::Session::shutdown`); a balancer's connection
    /// still without a session just closes.
    fn shutdown(&mut self, now: Instant) {
        self.end_pregreet();
        if !self.stage.in_session() {
            return self.close_early();
        }
        self.session.shutdown(now);
        self.settle(now);
    }

    /// The drain timeout passed.
    fn abort(&mut self, now: Instant) {
        self.end_pregreet();
        if !self.stage.in_session() {
            return self.close_early();
        }
        self.session.abort(now);
        self.settle(now);
    }

    /// Draining before the session: a balancer's connection closes.
    fn close_early(&mut self) {
        if matches!(self.stage, Stage::Header { .. } | Stage::Judge { .. } | Stage::Waiting) {
            self.stage = Stage::Close;
        }
    }

    /// Draining during the pregreet test: the session's banner ends the greeting (a
    /// reply cannot change its code mid-way), then its 421; no pass is remembered.
    fn end_pregreet(&mut self) {
        match &mut self.stage {
            Stage::Screening { pregreet: Some(_), dns: None } => self.stage = Stage::Session,
            Stage::Screening { pregreet, .. } => *pregreet = None,
            _ => {}
        }
    }

    /// The peer got a session (allowed, screened): its connection's life is a session's.
    pub fn served(&self) -> bool {
        matches!(self.stage, Stage::Session)
    }

    /// Nothing left to do but free it, once the driver's sockets are closed: the peer's
    /// side is over and the next hop's socket given back.
    pub fn finished(&self) -> bool {
        let ports = &self.ports;
        ports.peer_closed
            && !(ports.hop_connect || ports.hop_sending || ports.hop_receiving || ports.hop_closing)
            && hop_wants(&self.session, &self.link, &self.hop_tls) == HopTransmit::Idle
    }
}

impl Input<'_> {
    /// A completion on the next hop's socket.
    fn on_hop(&self) -> bool {
        matches!(
            self,
            Input::HopAdopted(_)
                | Input::HopDialing
                | Input::HopConnected
                | Input::HopBytes(_)
                | Input::HopSent(_)
                | Input::HopFailed
        )
    }
}

/// What the peer's socket is wanted for now (whether or not it is asked already).
fn peer_wants<'a>(stage: &'a Stage, session: &'a Session, link: &Link, transport: &'a Transport) -> Transmit<'a> {
    match stage {
        Stage::Session => {}
        Stage::Header { .. } => return Transmit::Receive,
        Stage::Judge { .. } | Stage::Waiting => return Transmit::Wait,
        Stage::Refuse { line } => return Transmit::Last(line),
        Stage::Close => return Transmit::Close,
        Stage::Screening { pregreet: Some(test), .. } => {
            let rest = test.output(&session.settings().replies.greeting_first);
            return if rest.is_empty() { Transmit::Receive } else { Transmit::Send(rest) };
        }
        Stage::Screening { pregreet: None, .. } => {
            if session.poll_transmit(link) != Transmit::Close {
                // the banner waits for the blocklists' answers
                return Transmit::Wait;
            }
        }
        Stage::Reject { line, sent } => {
            return match line.get(*sent..) {
                Some(rest) if !rest.is_empty() => Transmit::Send(rest),
                _ => Transmit::Close,
            };
        }
    }
    match transport {
        Transport::Plain => session.poll_transmit(link),
        Transport::Tls(t) => t.poll(session.poll_transmit(link)),
    }
}

/// What the next hop's socket is wanted for now (whether or not it is asked already).
fn hop_wants<'a>(session: &Session, link: &'a Link, hop_tls: &'a Option<Box<tls::HopTls>>) -> HopTransmit<'a> {
    let wants = link.poll(session.is_open(), &session.settings().relay.next_hops);
    match hop_tls {
        None => wants,
        Some(t) => t.poll(wants),
    }
}

/// One round of moving plaintext between the peer's TLS and the session; true when
/// something moved. Ciphertext goes into rustls only while the handshake runs or the
/// session reads; decrypted bytes reach the session only when it reads.
fn tls_step(t: &mut tls::TlsLayer, session: &mut Session, link: &mut Link, now: Instant) -> bool {
    let mut moved = false;
    if t.handshaking() || session.poll_transmit(link) == Transmit::Receive {
        match t.take_in() {
            Ok(took) => moved |= took,
            Err(e) => {
                tracing::debug!(peer = %session.peer(), "TLS: {e}");
                // the alert rustls queued goes out before the close
                session.tls_failed(now);
                return false;
            }
        }
    }
    if let Some(negotiated) = t.started() {
        session.tls_started(negotiated, now);
        moved = true;
    }
    if t.handshaking() {
        return moved;
    }
    if session.poll_transmit(link) == Transmit::Receive {
        let mut buf = [0u8; 4096];
        match t.read(&mut buf) {
            tls::Plaintext::Closed => {
                // close_notify: the peer is done
                session.handle_eof(now);
                moved = true;
            }
            tls::Plaintext::Data(n) => {
                session.handle_input(link, &buf[..n], now);
                moved = true;
            }
            tls::Plaintext::None => {}
        }
    }
    if let Transmit::Send(bytes) = session.poll_transmit(link) {
        let n = t.write(bytes);
        if n > 0 {
            session.consume_output(n);
            moved = true;
        }
    }
    if session.poll_transmit(link) == Transmit::Close {
        t.close();
    }
    moved
}
