//! What one worker's connections share, above its driver: the gate at accept, the slab of
//! connections, the pool of idle next-hop connections, the deadlines, the drain, and what
//! sessions report (the mail log, stats, failures counted against addresses).
//!
//! A driver implements [`Io`] (start or perform one operation on a connection's sockets)
//! and calls the host: [`Host::admit`] for each accepted socket, [`Host::advance`] after
//! each completion it handed to a connection, [`Host::tick`] once per loop turn,
//! [`Host::start_drain`] when told to stop. The host never touches a socket: it polls each
//! connection's outputs, hands the socket operations to the driver, and acts itself on the
//! rest (the pool, the deadlines, the reports).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::pool::Pool;
use super::timers::{ConnId, Timers};
use super::{Connection, HopState, Input, NoHeader, Output, Report, Screened, Screening};
use crate::abuse::{AbuseKey, Reason};
use crate::access::{AccessList, Action};
use crate::datetime::{UnixTime, WallClock};
use crate::gate::{self, RefusalLines, Verdict};
use crate::histogram::Hist;
use crate::peer::PeerIp;
use crate::proxy;
use crate::screen::dnsbl::{Answer, LookupFailure, Resolver};
use crate::shared::{Shared, SnapshotCache};
use crate::smtp::{Event, Session};
use crate::snapshot::Snapshot;
use crate::stats::{Count, Counts};

/// Outputs one connection may have before the worker moves on to others.
const STEPS_PER_TURN: usize = 64;

/// The operations a driver performs for the host: on io_uring each starts a submission
/// whose completion comes later, on epoll each is done at once while the socket is ready.
pub trait Io {
    /// A connection's sockets and what is in flight on them.
    type Sockets;
    /// A next-hop connection waiting in the pool (closed when dropped).
    type Pooled;

    /// Starts a socket operation a connection asked for (`PeerSend`, `PeerReceive`,
    /// `PeerLast`, `PeerClose`, `HopSend`, `HopReceive`, `HopClose`; the host acts on the
    /// other outputs itself). A completion known at once is returned (its bytes in the
    /// driver's buffer); any other comes later, handed to the connection by the driver.
    fn perform<'s>(&'s mut self, id: ConnId, sockets: &mut Self::Sockets, op: Output<'_>) -> Option<Input<'s>>;
    /// Starts connecting the next-hop socket to `addr`; completes with
    /// `Input::HopConnected` or `Input::HopFailed`.
    fn dial(&mut self, id: ConnId, sockets: &mut Self::Sockets, addr: SocketAddr) -> io::Result<()>;
    /// Makes a pooled connection the next-hop socket; false when it cannot be used.
    fn adopt(&mut self, id: ConnId, sockets: &mut Self::Sockets, pooled: Self::Pooled) -> bool;
    /// Takes the next-hop socket out for the pool, if it has one with nothing in flight.
    fn unplug(&mut self, sockets: &mut Self::Sockets) -> Option<Self::Pooled>;
    /// Closes a pooled connection, sending `last` (its QUIT) first without waiting: an
    /// idle connection's send buffer takes a few bytes at once.
    fn retire(&mut self, pooled: Self::Pooled, last: &[u8]);
    /// Both sockets are closed and nothing is in flight: the memory may be freed.
    fn closed(&self, sockets: &Self::Sockets) -> bool;
    /// Sends a DNS query on the worker's UDP socket (its answers come back through
    /// [`Host::dns_input`]); a datagram that cannot go is dropped (the query times out).
    fn dns_send(&mut self, to: SocketAddr, datagram: &[u8]);
}

/// A worker's blocklist resolver, with the settings it was made for.
struct Dns {
    resolver: Resolver<(ConnId, usize)>,
    /// `[screen] resolvers` as configured (empty: /etc/resolv.conf's, read when made).
    configured: Vec<SocketAddr>,
    timeout: Duration,
}

/// The gate's answer for an accepted socket.
#[allow(
    clippy::large_enum_variant,
    reason = "a refusal only writes the tag and the slice; boxing the connection would cost every allowed peer an allocation"
)]
pub enum Admit<'a> {
    /// Send this one line and close (a driver that hands it to the kernel copies it: it
    /// is the worker's, borrowed until the next call).
    Refuse(&'a [u8]),
    /// Serve it: hand the connection to [`Host::open`] with its sockets.
    Serve(Connection),
}

/// A worker's stage on the way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Serving,
    /// Not accepting; sessions finish what they started until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// The deadline passed: every connection was told 421 and is being closed.
    Aborting,
}

struct Entry<S> {
    conn: Connection,
    sockets: S,
    /// The connection's deadline as it last gave it.
    deadline: Option<Instant>,
    /// Its entry in the timers, if any.
    armed: Option<Instant>,
}

pub struct Host<I: Io> {
    shared: Arc<Shared>,
    /// This worker's own counts, for `mxgate stats`.
    counts: Arc<Counts>,
    snapshot: SnapshotCache,
    refusals: RefusalLines,
    conns: Slab<Entry<I::Sockets>>,
    pool: Pool<I::Pooled>,
    timers: Timers,
    generation: u32,
    /// Connections that used up their turn with work left.
    busy: Vec<ConnId>,
    drain: Drain,
    /// Made at the first blocklist lookup.
    dns: Option<Dns>,
    /// The wall clock as the driver last gave it: the host reads no clock of its own.
    clock: WallClock,
}

impl<I: Io> Host<I> {
    pub fn new(shared: Arc<Shared>) -> Self {
        Host {
            snapshot: shared.snapshot_cache(),
            counts: shared.worker_counts(),
            shared,
            refusals: RefusalLines::default(),
            conns: Slab::new(),
            pool: Pool::default(),
            timers: Timers::default(),
            generation: 0,
            busy: Vec::new(),
            drain: Drain::Serving,
            dns: None,
            clock: WallClock { at: Instant::now(), unix: UnixTime(0) },
        }
    }

    // ---- accepting -----------------------------------------------------------------------

    /// Judges an accepted peer. A refusal costs the lookup and no allocation.
    #[inline]
    pub fn admit(&mut self, addr: SocketAddr, now: Instant, unix: UnixTime) -> Admit<'_> {
        self.clock = WallClock { at: now, unix };
        let peer = PeerIp::from(addr);
        let snapshot = self.snapshot.load();
        if snapshot.config.listen.is_balancer(peer.ip()) {
            // judged on the address its PROXY header carries, once read (`judge`)
            let session =
                Session::new(Arc::clone(&snapshot.smtp), Arc::clone(self.shared.transaction_ids()), peer, now, unix);
            let deadline = now + snapshot.config.listen.proxy_timeout;
            self.generation = self.generation.wrapping_add(1) & GENERATION_MASK;
            return Admit::Serve(Connection::behind_balancer(Arc::clone(snapshot), session, deadline, self.generation));
        }
        let verdict = gate::admit(snapshot, self.shared.abuse(), peer, unix);
        self.counts.verdict(&verdict);
        // from the loop turn that took the connection in
        self.counts.hists.observe_duration(Hist::Verdict, Instant::now().saturating_duration_since(now));
        match verdict {
            Verdict::Refuse(refusal) => {
                tracing::debug!(%peer, ?refusal, "refused");
                // a direct peer: the kernel sees its address (never one behind a balancer)
                if let gate::Refusal::Banned { by, until } = refusal
                    && let Some(kernel) = self.shared.kernel()
                {
                    kernel.refused(by, until);
                }
                Admit::Refuse(self.refusals.line(refusal, snapshot, unix))
            }
            Verdict::Allow { whitelisted, admission } => {
                tracing::debug!(%peer, "allowed");
                if let Some(list) = &snapshot.shadow {
                    shadow_list(list, peer, unix, &self.shared, &self.counts);
                }
                let mut session = Session::new(
                    Arc::clone(&snapshot.smtp),
                    Arc::clone(self.shared.transaction_ids()),
                    peer,
                    now,
                    unix,
                );
                session.set_port(addr.port());
                if self.drain != Drain::Serving {
                    session.shutdown(now);
                }
                self.generation = self.generation.wrapping_add(1) & GENERATION_MASK;
                let screening = screening(snapshot, &self.shared, peer, whitelisted, now, unix);
                let gate = (whitelisted, admission);
                Admit::Serve(Connection::new(Arc::clone(snapshot), session, gate, screening, self.generation))
            }
        }
    }

    /// A socket the kernel handed over whose peer was gone before it could be judged.
    pub fn vanished(&mut self) {
        self.counts.add(Count::Vanished);
    }

    /// The slab key the next [`Host::open`] will use (for a driver that registers the
    /// sockets under it first).
    pub fn next_key(&self) -> usize {
        self.conns.vacant_key()
    }

    /// Starts serving an admitted connection on its sockets.
    pub fn open(&mut self, conn: Connection, sockets: I::Sockets, now: Instant, io: &mut I) -> ConnId {
        let generation = conn.generation();
        let key = self.conns.insert(Entry { conn, sockets, deadline: None, armed: None });
        self.advance(key, now, io);
        (key, generation)
    }

    // ---- serving -------------------------------------------------------------------------

    /// The connection under `key` (whatever its generation), with its sockets.
    pub fn get(&mut self, key: usize) -> Option<(&mut Connection, &mut I::Sockets)> {
        self.conns.get_mut(key).map(|e| (&mut e.conn, &mut e.sockets))
    }

    /// The connection `id` if it is still the one that key holds.
    pub fn get_current(&mut self, (key, generation): ConnId) -> Option<(&mut Connection, &mut I::Sockets)> {
        self.get(key).filter(|(c, _)| c.generation() == generation)
    }

    /// Acts on the connection's outputs until it has none, it ends (freed once its sockets
    /// are closed) or its turn is over.
    pub fn advance(&mut self, key: usize, now: Instant, io: &mut I) {
        let Some(entry) = self.conns.get_mut(key) else { return };
        let id = (key, entry.conn.generation());
        let unix = self.clock.at(now);
        let mut turn_over = true;
        for _ in 0..STEPS_PER_TURN {
            let Entry { conn, sockets, deadline, armed } = &mut *entry;
            let Some(output) = conn.poll() else {
                turn_over = false;
                break;
            };
            match output {
                Output::Report(report) => {
                    let mut parts = Parts { shared: &self.shared, counts: &self.counts, refusals: &mut self.refusals };
                    act(id, conn, report, &mut parts, &mut self.dns, (now, unix), io);
                }
                Output::Deadline(at) => {
                    *deadline = at;
                    self.timers.arm(armed, at, id);
                }
                Output::HopConnect { addr, pooled_ok } => {
                    connect(&mut self.pool, id, sockets, conn, addr, pooled_ok, now, io)
                }
                Output::HopRelease { hop, addr } => {
                    let max = conn.snapshot().config.relay.max_idle_connections as usize;
                    let closed = match io.unplug(sockets) {
                        Some(pooled) => {
                            retire(io, self.pool.put(addr, pooled, hop, max, now));
                            Some(Input::HopClosed)
                        }
                        // something in flight on it: closed instead (after it ends)
                        None => io.perform(id, sockets, Output::HopClose),
                    };
                    if let Some(input) = closed {
                        conn.handle(input, now);
                    }
                }
                op => {
                    if let Some(input) = io.perform(id, sockets, op) {
                        conn.handle(input, now);
                    }
                }
            }
        }
        let Entry { conn, sockets, .. } = &mut *entry;
        if io.closed(sockets) && conn.finished() {
            if conn.served() {
                self.counts
                    .hists
                    .observe_duration(Hist::Session, now.saturating_duration_since(conn.session().opened()));
            }
            self.conns.remove(key);
            return;
        }
        if turn_over {
            self.busy.push(id);
        }
    }

    /// Once per loop turn, with the clocks the driver read: deadlines that came (the
    /// drain's too), connections whose turn ran out, pooled connections idle too long.
    pub fn tick(&mut self, now: Instant, unix: UnixTime, io: &mut I) {
        self.clock = WallClock { at: now, unix };
        if let Some(dns) = &mut self.dns {
            dns.resolver.handle_timeout(now);
            self.dns_events(now, io);
        }
        let due = self.timers.expired(now, &mut self.conns, |e| (e.conn.generation(), &mut e.armed, e.deadline));
        for key in due {
            if let Some(e) = self.conns.get_mut(key) {
                e.conn.handle(Input::Timeout, now);
            }
            self.advance(key, now, io);
        }
        if let Drain::Draining { deadline } = self.drain
            && deadline <= now
        {
            tracing::warn!("drain timeout: closing {} connections", self.conns.len());
            self.drain = Drain::Aborting;
            for (_, e) in &mut self.conns {
                e.conn.handle(Input::Abort, now);
            }
            self.advance_all(now, io);
        }
        for (key, generation) in std::mem::take(&mut self.busy) {
            if self.conns.get(key).is_some_and(|e| e.conn.generation() == generation) {
                self.advance(key, now, io);
            }
        }
        let conns = &self.conns;
        self.timers.compact(conns.len(), |(key, generation)| {
            conns.get(key).filter(|e| e.conn.generation() == generation).map(|e| e.armed)
        });
        let idle_timeout = self.idle_timeout();
        retire(io, self.pool.expire(now, idle_timeout));
    }

    /// When [`Host::tick`] has something to do next; `now` when a connection's turn ran out.
    pub fn next_wakeup(&mut self, now: Instant) -> Option<Instant> {
        if !self.busy.is_empty() {
            return Some(now);
        }
        let idle_timeout = self.idle_timeout();
        let pool = self.pool.next_expiry(idle_timeout);
        let drain = match self.drain {
            Drain::Draining { deadline } => Some(deadline),
            _ => None,
        };
        let dns = self.dns.as_ref().and_then(|d| d.resolver.poll_timeout());
        self.timers.next().into_iter().chain(drain).chain(pool).chain(dns).min()
    }

    /// A datagram came to the worker's UDP socket: the blocklists' answers.
    pub fn dns_input(&mut self, from: SocketAddr, bytes: &[u8], now: Instant, io: &mut I) {
        if let Some(dns) = &mut self.dns {
            dns.resolver.handle_datagram(from, bytes, now);
            self.dns_events(now, io);
        }
    }

    /// Hands the resolver's answers to their connections.
    fn dns_events(&mut self, now: Instant, io: &mut I) {
        let Some(dns) = &mut self.dns else { return };
        let mut touched = Vec::new();
        while let Some(((id, zone), answer, took)) = dns.resolver.poll_event() {
            count_dns_failure(&self.counts, &answer);
            if let Some(took) = took {
                self.counts.hists.observe_duration(Hist::Dnsbl, took);
            }
            if let Some(e) = self.conns.get_mut(id.0).filter(|e| e.conn.generation() == id.1) {
                e.conn.handle(Input::DnsAnswer { zone, answer }, now);
                touched.push(id.0);
            }
        }
        for key in touched {
            self.advance(key, now, io);
        }
    }

    fn idle_timeout(&mut self) -> Duration {
        self.snapshot.load().config.relay.idle_timeout
    }

    // ---- stopping ------------------------------------------------------------------------

    /// The server was told to stop.
    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }

    /// Starts the drain (once): every session finishes what it started, within
    /// `[listen] drain_timeout`. True when it started now: the driver stops accepting.
    pub fn start_drain(&mut self, now: Instant, io: &mut I) -> bool {
        if self.drain != Drain::Serving {
            return false;
        }
        self.drain = Drain::Draining { deadline: now + self.snapshot.load().config.listen.drain_timeout };
        for (_, e) in &mut self.conns {
            e.conn.handle(Input::Drain, now);
        }
        self.advance_all(now, io);
        true
    }

    /// Drained: no connection left.
    pub fn finished(&self) -> bool {
        self.drain != Drain::Serving && self.conns.is_empty()
    }

    /// Closes the pooled connections (each with QUIT), at exit.
    pub fn close_pool(&mut self, io: &mut I) {
        retire(io, self.pool.drain());
    }

    fn advance_all(&mut self, now: Instant, io: &mut I) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.advance(key, now, io);
        }
    }

    /// Open connections (for tests).
    #[cfg(test)]
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Every pooled connection (for tests).
    #[cfg(test)]
    pub fn pooled_mut(&mut self) -> impl Iterator<Item = &mut I::Pooled> {
        self.pool.iter_mut()
    }

    /// Idle pooled connections to `addr` (for tests).
    #[cfg(test)]
    pub fn pooled(&self, addr: SocketAddr) -> usize {
        self.pool.len(addr)
    }
}

/// A connection to the next hop, with the pool's policy: a pooled connection to the
/// same address when the session allows one, else a new one.
#[allow(clippy::too_many_arguments, reason = "the host's parts, taken apart for the borrow")]
fn connect<I: Io>(
    pool: &mut Pool<I::Pooled>,
    id: ConnId,
    sockets: &mut I::Sockets,
    conn: &mut Connection,
    addr: SocketAddr,
    pooled_ok: bool,
    now: Instant,
    io: &mut I,
) {
    let pooled = if pooled_ok { pool.take(addr, conn.snapshot().config.relay.tls) } else { None };
    if let Some((socket, hop)) = pooled
        && io.adopt(id, sockets, socket)
    {
        return conn.handle(Input::HopAdopted(hop), now);
    }
    conn.handle(Input::HopDialing, now);
    if let Err(e) = io.dial(id, sockets, addr) {
        tracing::debug!("cannot connect to next hop {addr}: {e}");
        conn.handle(Input::HopFailed, now);
    }
}

/// Closes pooled connections, each saying QUIT (through its TLS, if it has one).
fn retire<I: Io>(io: &mut I, gone: impl IntoIterator<Item = (I::Pooled, Box<HopState>)>) {
    for (pooled, mut hop) in gone {
        io.retire(pooled, &hop.farewell());
    }
}

/// Generations fit in 24 bits (the io_uring driver's user data has room for no more).
pub const GENERATION_MASK: u32 = 0xff_ffff;

/// A trusted balancer's header is whole: the gate judges the address it carries (the
/// balancer's own for LOCAL and UNKNOWN), as it judges a direct peer at accept.
fn judge(
    conn: &mut Connection,
    header: proxy::Header,
    rest: &[u8],
    shared: &Shared,
    counts: &Counts,
    refusals: &mut RefusalLines,
    (now, unix): (Instant, UnixTime),
) {
    let balancer = conn.session().peer();
    let (peer, port, proxy_id) = match header {
        proxy::Header::Proxied { source, unique_id, .. } => (PeerIp::from(source), Some(source.port()), unique_id),
        proxy::Header::Local | proxy::Header::Unknown => (balancer, None, None),
    };
    let snapshot = Arc::clone(conn.snapshot_arc());
    let verdict = gate::admit(&snapshot, shared.abuse(), peer, unix);
    counts.verdict(&verdict);
    // from accept: the header's wait included
    counts.hists.observe_duration(Hist::Verdict, now.saturating_duration_since(conn.session().opened()));
    match verdict {
        Verdict::Refuse(refusal) => {
            tracing::debug!(%peer, %balancer, ?refusal, "refused");
            conn.handle(Input::Refused(refusals.line(refusal, &snapshot, unix)), now);
        }
        Verdict::Allow { whitelisted, admission } => {
            tracing::debug!(%peer, %balancer, "allowed");
            if let Some(list) = &snapshot.shadow {
                shadow_list(list, peer, unix, shared, counts);
            }
            let screening = screening(&snapshot, shared, peer, whitelisted, now, unix);
            conn.handle(Input::Allowed { peer, port, whitelisted, admission, proxy_id, screening, rest }, now);
        }
    }
}

/// Asks the blocklists about the connection's peer; cached answers are applied at once.
fn ask_dns<I: Io>(dns: &mut Option<Dns>, id: ConnId, conn: &mut Connection, counts: &Counts, now: Instant, io: &mut I) {
    let snapshot = Arc::clone(conn.snapshot_arc());
    let screen = &snapshot.config.screen;
    // a new resolver for new settings, once the old one has nothing in flight
    let stale = dns.as_ref().is_none_or(|d| {
        (d.configured != screen.resolvers || d.timeout != screen.dns_timeout) && d.resolver.in_flight() == 0
    });
    if stale {
        let servers = if screen.resolvers.is_empty() {
            crate::screen::dnsbl::system_resolvers()
        } else {
            screen.resolvers.clone()
        };
        let resolver = Resolver::new(servers, screen.dns_timeout, Box::new(crate::random::u16));
        *dns = Some(Dns { resolver, configured: screen.resolvers.clone(), timeout: screen.dns_timeout });
    }
    let Some(dns) = dns.as_mut() else { return };
    let ip = conn.session().peer().ip();
    let mut known = Vec::new();
    for (i, zone) in screen.dnsbl.iter().enumerate() {
        if let Some(answer) = dns.resolver.lookup((id, i), ip, &zone.zone, now) {
            known.push((i, answer));
        }
    }
    while let Some((to, datagram)) = dns.resolver.poll_transmit() {
        io.dns_send(to, &datagram);
    }
    for (i, answer) in known {
        count_dns_failure(counts, &answer);
        conn.handle(Input::DnsAnswer { zone: i, answer }, now);
    }
}

fn count_dns_failure(counts: &Counts, answer: &Answer) {
    match answer {
        Answer::Failed(LookupFailure::TimedOut) => counts.add(Count::DnsTimeouts),
        Answer::Failed(_) => counts.add(Count::DnsFailures),
        _ => {}
    }
}

/// The screening an allowed peer gets: the pregreet test until when (with `[screen]
/// pregreet`), and how many blocklists to ask; none for a peer that is whitelisted,
/// allowed by an `allow` entry, or remembered as having passed.
fn screening(
    snapshot: &Snapshot,
    shared: &Shared,
    peer: PeerIp,
    whitelisted: bool,
    now: Instant,
    unix: UnixTime,
) -> Screening {
    let screen = &snapshot.config.screen;
    if (!screen.pregreet && screen.dnsbl.is_empty()) || whitelisted {
        return Screening::default();
    }
    let allow_listed = snapshot.access.decide(peer.ip()).rule.is_some_and(|r| r.action == Action::Allow);
    if allow_listed || shared.passed().holds(peer.ip(), unix) {
        return Screening::default();
    }
    Screening { pregreet: screen.pregreet.then(|| now + screen.greet_wait), zones: screen.dnsbl.len() }
}

/// What screening found: talking first is a failure of the address, like a 5xx; a
/// blocklist score over the threshold is logged and counted.
fn screened_peer(conn: &Connection, screened: Screened, shared: &Shared, counts: &Counts, now: UnixTime) {
    let peer = conn.session().peer();
    let snapshot = conn.snapshot();
    match screened {
        Screened::Blocked { zone, score } => {
            counts.add(Count::DnsblBlocked);
            shared.count_blocked(&zone);
            tracing::info!(%peer, "dnsbl: blocked using {zone} (score {score})");
        }
        Screened::TalkedEarly(octets) => {
            counts.add(Count::PregreetFailed);
            counts.add(Count::Failures);
            tracing::info!(%peer, "pregreet: talked before the greeting: {}", crate::logfmt::value(&octets));
            let config = &snapshot.config.abuse;
            let key = AbuseKey::new(peer, config.ipv6_prefix);
            if let Some(reason) = shared.abuse().failed(key, now, config) {
                shadow_ban(key, reason, now, shared, counts);
            }
        }
    }
}

/// `[access] shadow_list`: an allowed peer it would deny is counted, and logged at most
/// once a minute.
fn shadow_list(list: &AccessList, peer: PeerIp, unix: UnixTime, shared: &Shared, counts: &Counts) {
    let verdict = list.decide(peer.ip());
    if verdict.action != Action::Deny {
        return;
    }
    counts.add(Count::ShadowWouldDeny);
    if shared.shadow().list.first_this_minute(peer, unix.0.div_euclid(60)) {
        let file = list.file().map(|f| f.display().to_string()).unwrap_or_default();
        match verdict.rule {
            Some(rule) => tracing::info!("shadow: would deny {peer} ({file}:{})", rule.line),
            None => tracing::info!("shadow: would deny {peer} ({file}: its default)"),
        }
    }
}

/// `[abuse] shadow`: a ban withheld is counted and logged, at most once a minute per
/// address (its failures go on past the threshold where a ban would have stopped them).
fn shadow_ban(key: AbuseKey, reason: Reason, now: UnixTime, shared: &Shared, counts: &Counts) {
    if shared.shadow().bans.first_this_minute(key, now.0.div_euclid(60)) {
        counts.add(Count::ShadowWouldBan);
        tracing::info!("shadow: would ban {key}: {reason}");
    }
}

/// What acting on a connection's reports needs of the host.
struct Parts<'h> {
    shared: &'h Shared,
    counts: &'h Counts,
    refusals: &'h mut RefusalLines,
}

/// Acts on a connection's report: a balancer's header judged, the blocklists asked, the
/// rest counted and logged.
fn act<I: Io>(
    id: ConnId,
    conn: &mut Connection,
    report: Report,
    parts: &mut Parts<'_>,
    dns: &mut Option<Dns>,
    (now, unix): (Instant, UnixTime),
    io: &mut I,
) {
    match report {
        Report::Header { header, rest } => {
            judge(conn, header, &rest, parts.shared, parts.counts, parts.refusals, (now, unix));
        }
        Report::AskDns => ask_dns(dns, id, conn, parts.counts, now, io),
        report => record(conn, report, parts.shared, parts.counts, unix),
    }
}

/// The mail log's line: logfmt text, or (`[log] format = "json"`) a JSON object whose
/// fields are the transaction's (docs/operations.md), every outside value escaped by
/// `logfmt`'s rule.
fn log_transaction(t: &crate::smtp::Transaction, proxy_id: Option<&[u8]>) {
    use crate::logfmt::{json, json_lines, value};
    if !json_lines() {
        return match proxy_id {
            Some(id) => tracing::info!("mail {t} proxy_id={}", value(id)),
            None => tracing::info!("mail {t}"),
        };
    }
    let (result, reply, fault) = t.outcome.parts();
    tracing::info!(
        id = %t.id,
        peer = %t.peer,
        helo = %json(&t.helo),
        from = %json(&t.from),
        rcpt_accepted = t.accepted,
        rcpt_refused = t.refused,
        to = %json(&t.recipients().unwrap_or_default()),
        size = t.size,
        route = t.route.as_deref().unwrap_or(""),
        next_hop = %t.next_hop.map(|h| h.to_string()).unwrap_or_default(),
        hop_id = %json(t.hop_id.as_deref().unwrap_or("")),
        tls = t.tls.unwrap_or(""),
        result = %result,
        reply = reply,
        fault = %fault.map(|p| p.to_string()).unwrap_or_default(),
        ms = u64::try_from(t.duration.as_millis()).unwrap_or(u64::MAX),
        proxy_id = %json(proxy_id.unwrap_or_default()),
        "mail"
    );
}

/// Records what a connection reports: a balancer's missing header, screening's findings
/// and passes, and its session's events: one log line per transaction (the mail log),
/// the histograms' observations, and failures counted against the peer's address (never
/// a whitelisted one's).
fn record(conn: &Connection, report: Report, shared: &Shared, counts: &Counts, now: UnixTime) {
    let session = conn.session();
    let config = &conn.snapshot().config;
    let key = || AbuseKey::new(session.peer(), config.abuse.ipv6_prefix);
    let event = match report {
        Report::Session(event) => event,
        Report::NoHeader(NoHeader::Refused(why)) => {
            counts.add(Count::RefusedProxyHeader);
            return tracing::debug!(balancer = %session.peer(), "PROXY header refused: {why}");
        }
        Report::NoHeader(NoHeader::Gone) => return counts.add(Count::Vanished),
        Report::Screened(screened) => return screened_peer(conn, screened, shared, counts, now),
        Report::Passed => {
            counts.add(Count::ScreenPassed);
            return shared.passed().remember(session.peer().ip(), now, config.screen.pass_ttl);
        }
        // acted on, not recorded (`act`)
        Report::Header { .. } | Report::AskDns => return,
    };
    let abuse = shared.abuse();
    match event {
        Event::Transaction(t) => {
            counts.transaction(t.outcome);
            if let Some(relay) = t.relay {
                counts.hists.observe_duration(Hist::Relay, relay);
            }
            if t.outcome == crate::smtp::Outcome::Delivered {
                counts.hists.observe(Hist::MessageSize, t.size);
            }
            log_transaction(&t, conn.proxy_id());
        }
        Event::Failed(_) if conn.whitelisted() => counts.add(Count::Failures),
        Event::Failed(_) => {
            counts.add(Count::Failures);
            if let Some(reason) = abuse.failed(key(), now, &config.abuse) {
                shadow_ban(key(), reason, now, shared, counts);
            }
        }
        Event::HopReply(waited) => counts.hists.observe_duration(Hist::HopReply, waited),
        Event::Handshake { ok: true, took } => {
            counts.add(Count::TlsHandshakes);
            counts.hists.observe_duration(Hist::Handshake, took);
        }
        Event::Handshake { ok: false, took } => {
            counts.add(Count::TlsFailed);
            counts.hists.observe_duration(Hist::Handshake, took);
            tracing::debug!(peer = %session.peer(), "TLS handshake failed");
        }
        Event::Dropped => {
            counts.add(Count::Dropped);
            tracing::info!(peer = %session.peer(), "dropped: too many errors");
            if config.abuse.ban_on_drop
                && !conn.whitelisted()
                && let Some(reason) = abuse.ban(key(), Reason::Dropped, now, &config.abuse)
            {
                shadow_ban(key(), reason, now, shared, counts);
            }
        }
    }
}
