//! The load engine: threads of non-blocking connections (mio, edge-triggered), each
//! running a [`Peer`] script from a source address of its own; a finished conversation
//! makes room for the next until the duration is up, then those in flight get a bounded
//! drain. Latencies go into an HdrHistogram per thread (no allocation per record),
//! merged at the end.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::attack::{Dictionary, Slow};
use crate::peer::{Event, Failure, Peer, Script};
use crate::sources::Sources;
use crate::tls::TlsClient;

/// How long a slot waits after a refused connect.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// What to run.
#[derive(Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub script: Arc<Script>,
    pub sources: Arc<Sources>,
    pub concurrency: usize,
    pub threads: usize,
    pub duration: Duration,
    /// After the duration: how long conversations in flight may take to end.
    pub drain: Duration,
    /// The longest a conversation may wait for the server.
    pub timeout: Duration,
    /// A PROXY header first on every connection, carrying its own address.
    pub proxy: Option<crate::proxy::Version>,
}

/// Counted so far, for the progress line.
#[derive(Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
}

/// What the threads did.
pub struct Tally {
    /// Latencies in microseconds: to the deny line, or from MAIL to the reply after the
    /// message.
    pub latency: Histogram<u64>,
    pub connections: u64,
    pub denied: u64,
    /// Messages that got 250: (id, hash of the content sent).
    pub accepted: Vec<(u64, u64)>,
    pub refused: u64,
    /// Attacking addresses dropped, banned, and seen banned again; their times from the
    /// address's first connection, in microseconds.
    pub dropped: Histogram<u64>,
    pub banned: Histogram<u64>,
    pub confirmed: u64,
    /// Attacking addresses refused at their first connection (an escalated prefix).
    pub banned_on_sight: u64,
    /// Whitelisted attackers that still got the banner after enough failures.
    pub spared: u64,
    /// Slow peers cut off, and when (microseconds after they connected).
    pub cut_off: Histogram<u64>,
    /// STARTTLS handshakes done, and how many of them resumed an earlier session.
    pub handshakes: u64,
    pub resumed: u64,
    /// Conversations that went wrong, by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// Conversations still open when the drain ended.
    pub unfinished: u64,
    pub elapsed: Duration,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency: new_histogram(),
            connections: 0,
            denied: 0,
            accepted: Vec::new(),
            refused: 0,
            dropped: new_histogram(),
            banned: new_histogram(),
            confirmed: 0,
            banned_on_sight: 0,
            spared: 0,
            cut_off: new_histogram(),
            handshakes: 0,
            resumed: 0,
            errors: BTreeMap::new(),
            unfinished: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        self.connections += other.connections;
        self.denied += other.denied;
        self.accepted.extend(other.accepted);
        self.refused += other.refused;
        let _ = self.dropped.add(&other.dropped);
        let _ = self.banned.add(&other.banned);
        self.confirmed += other.confirmed;
        self.banned_on_sight += other.banned_on_sight;
        self.spared += other.spared;
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
        let _ = self.cut_off.add(&other.cut_off);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.unfinished += other.unfinished;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits: allocated once, fixed size
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// Runs several plans at once (honest and hostile peers together), each on its own
/// threads; one tally per plan.
pub fn run_all(plans: &[Plan], progress: &Progress) -> Vec<Tally> {
    // message ids never repeat within a process: the run, the plan and the thread in the
    // top bits
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed) & 0xff;
    let started = Instant::now();
    let mut tallies: Vec<Tally> = plans.iter().map(|_| Tally::new()).collect();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (p, plan) in plans.iter().enumerate() {
            let threads = plan.threads.max(1);
            for i in 0..threads {
                let slots = plan.concurrency / threads + usize::from(i < plan.concurrency % threads);
                let id_base = (run << 56) | ((p as u64 & 0xff) << 48) | ((i as u64 & 0xff) << 40);
                handles.push((p, scope.spawn(move || worker(id_base, slots, plan, progress, started))));
            }
        }
        for (p, h) in handles {
            if let Ok(t) = h.join() {
                tallies[p].merge(t);
            }
        }
    });
    for (tally, plan) in tallies.iter_mut().zip(plans) {
        tally.elapsed = started.elapsed().min(plan.duration + plan.drain);
    }
    tallies
}

struct Conn {
    stream: TcpStream,
    peer: Talker,
    source: std::net::IpAddr,
    last_io: Instant,
    /// After STARTTLS: the peer's bytes go through it.
    tls: Option<Box<rustls::ClientConnection>>,
}

/// One connection's conversation, by script.
pub enum Talker {
    Smtp(Peer),
    Dictionary(Dictionary),
    Slow(Slow),
}

macro_rules! each {
    ($self:expr, $p:ident => $e:expr) => {
        match $self {
            Talker::Smtp($p) => $e,
            Talker::Dictionary($p) => $e,
            Talker::Slow($p) => $e,
        }
    };
}

impl Talker {
    fn new(script: &Arc<Script>, first_id: u64, now: Instant) -> Self {
        match &**script {
            Script::Dictionary { domain, ban_line, whitelisted } => {
                Talker::Dictionary(Dictionary::new(domain, ban_line, *whitelisted, now))
            }
            Script::Slow { trickle } => Talker::Slow(Slow::new(*trickle, now)),
            Script::Deny { .. } | Script::Relay(_) => Talker::Smtp(Peer::new(Arc::clone(script), first_id, now)),
        }
    }

    /// The same script again on a new connection: a new address's conversation, or
    /// (`same_source`) the same address's next one.
    fn restart(&mut self, first_id: u64, now: Instant, same_source: bool) {
        match self {
            Talker::Smtp(p) => p.restart(first_id, now),
            Talker::Dictionary(d) if same_source => d.reconnect(),
            Talker::Dictionary(d) => d.restart(now),
            Talker::Slow(s) => s.restart(now),
        }
    }

    /// The next connection must come from the same address.
    fn same_source(&self) -> bool {
        matches!(self, Talker::Dictionary(d) if d.same_source())
    }

    fn output(&self) -> &[u8] {
        each!(self, p => p.output())
    }

    fn sent(&mut self, n: usize) {
        each!(self, p => p.sent(n))
    }

    /// Bytes to go before anything the conversation says (a PROXY header; the scenarios
    /// that take one have SMTP peers only).
    fn preface(&mut self, bytes: &[u8]) {
        if let Talker::Smtp(p) = self {
            p.preface(bytes);
        }
    }

    fn input(&mut self, bytes: &[u8], now: Instant) -> Result<(), Failure> {
        each!(self, p => p.input(bytes, now))
    }

    fn eof(&mut self) -> Result<(), Failure> {
        each!(self, p => p.eof())
    }

    fn finished(&self) -> bool {
        each!(self, p => p.finished())
    }

    /// STARTTLS was answered: the client configuration to do the handshake with.
    fn starttls(&mut self) -> Option<TlsClient> {
        let Talker::Smtp(p) = self else { return None };
        if !p.take_starttls() {
            return None;
        }
        match p.script() {
            Script::Relay(r) => r.tls.clone(),
            _ => None,
        }
    }

    /// Over without waiting for the server's close: a relaying peer whose QUIT got its
    /// 221 (a deny line, or an attacker's, must be followed by the close to count).
    fn over(&self) -> bool {
        matches!(self, Talker::Smtp(p) if p.quit_answered())
    }

    fn events(&mut self) -> &mut Vec<Event> {
        each!(self, p => &mut p.events)
    }

    fn tick(&mut self, now: Instant) {
        if let Talker::Slow(s) = self {
            s.tick(now);
        }
    }
}

fn worker(id_base: u64, slots: usize, plan: &Plan, progress: &Progress, started: Instant) -> Tally {
    let mut tally = Tally::new();
    let Ok(mut poll) = Poll::new() else {
        *tally.errors.entry("poll").or_default() += 1;
        return tally;
    };
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = (0..slots).map(|_| None).collect();
    let end = started + plan.duration;
    let hard_end = end + plan.drain;
    let mut next_id = id_base;
    let per_peer = match &*plan.script {
        Script::Relay(r) => u64::from(r.messages.max(1)),
        _ => 1,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut ended = Vec::with_capacity(slots);
    // a slot whose connect failed waits a little before the next try (a server that has
    // stopped listening is not hammered)
    let mut retry_at: Vec<Option<Instant>> = vec![None; slots];
    for (i, slot) in conns.iter_mut().enumerate() {
        *slot = open(plan, &mut poll, i, (&mut next_id, per_peer), (None, None), &mut tally);
        if slot.is_none() {
            retry_at[i] = Some(Instant::now() + CONNECT_RETRY);
        }
    }
    loop {
        let now = Instant::now();
        if now >= hard_end || (now >= end && conns.iter().all(Option::is_none)) {
            break;
        }
        let wait = Duration::from_millis(50).min(hard_end.saturating_duration_since(now));
        if let Err(e) = poll.poll(&mut events, Some(wait))
            && e.kind() != io::ErrorKind::Interrupted
        {
            *tally.errors.entry("poll").or_default() += 1;
            break;
        }
        let now = Instant::now();
        for event in &events {
            let i = event.token().0;
            if let Some(Some(conn)) = conns.get_mut(i) {
                match step(conn, &mut buf, now, event.is_read_closed()) {
                    Ok(false) => {}
                    done => ended.push((i, done)),
                }
            }
        }
        // conversations waiting too long (each slot ends once a turn)
        for (i, slot) in conns.iter().enumerate() {
            let stale = slot.as_ref().is_some_and(|c| now.saturating_duration_since(c.last_io) > plan.timeout);
            if stale && !ended.iter().any(|(e, _)| *e == i) {
                ended.push((i, Err("timeout")));
            }
        }
        for (i, slot) in conns.iter_mut().enumerate() {
            if slot.is_none() && retry_at[i].is_some_and(|t| t <= now) {
                retry_at[i] = None;
                if now < end {
                    *slot = open(plan, &mut poll, i, (&mut next_id, per_peer), (None, None), &mut tally);
                    if slot.is_none() {
                        retry_at[i] = Some(now + CONNECT_RETRY);
                    }
                }
            }
            let Some(conn) = slot.as_mut() else { continue };
            conn.peer.tick(now);
            if !conn.peer.output().is_empty() && !ended.iter().any(|(e, _)| *e == i) {
                match step(conn, &mut buf, now, false) {
                    Ok(false) => {}
                    done => ended.push((i, done)),
                }
            }
        }
        for (i, done) in ended.drain(..) {
            // closing the socket takes it out of the poll set: no deregistering call
            let Some(mut conn) = conns[i].take() else { continue };
            let counted = collect(&mut conn.peer, &mut tally);
            drop(conn.stream);
            let again = done.is_ok() && conn.peer.same_source();
            match done {
                Ok(_) => progress.ops.fetch_add(counted, Ordering::Relaxed),
                Err(kind) => {
                    *tally.errors.entry(kind).or_default() += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed)
                }
            };
            if matches!(done, Err("connect")) && !again {
                retry_at[i] = Some(now + CONNECT_RETRY);
                continue;
            }
            // an attacking address keeps going until its ban is seen, even past the end
            if now < end || again {
                let source = again.then_some(conn.source);
                conns[i] = open(plan, &mut poll, i, (&mut next_id, per_peer), (Some(conn.peer), source), &mut tally);
                if conns[i].is_none() {
                    retry_at[i] = Some(now + CONNECT_RETRY);
                }
            }
        }
    }
    for mut conn in conns.iter_mut().filter_map(Option::take) {
        collect(&mut conn.peer, &mut tally);
        tally.unfinished += 1;
    }
    tally
}

/// A new connection in slot `i`, from the next source address (or, for an attacker not
/// done with its address, the same one); `ids`: the next message id and how many a peer
/// takes; `reuse`: the slot's last conversation, whose buffers serve again.
fn open(
    plan: &Plan,
    poll: &mut Poll,
    i: usize,
    ids: (&mut u64, u64),
    reuse: (Option<Talker>, Option<std::net::IpAddr>),
    tally: &mut Tally,
) -> Option<Conn> {
    let (next_id, per_peer) = ids;
    let (reuse, same_source) = reuse;
    let source = match same_source {
        Some(ip) => SocketAddr::new(ip, 0),
        None => plan.sources.next_with_port(),
    };
    tally.connections += 1;
    // before the connect: on loopback the server may accept (and start its clocks) before
    // connect() returns, and a latency must never come out shorter than the server's
    let now = Instant::now();
    // a denied peer only reads; a relaying one writes small commands awaited one at a time
    let relay = !matches!(*plan.script, Script::Deny { .. });
    let mut stream = match connect(source, plan.target, relay) {
        Ok(s) => s,
        Err(_) => {
            // counted; the slot is tried again after CONNECT_RETRY (see `worker`)
            *tally.errors.entry("connect").or_default() += 1;
            return None;
        }
    };
    // with a PROXY header a denied peer writes first too
    let writes = relay || plan.proxy.is_some();
    let interest = if writes { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
    if poll.registry().register(&mut stream, Token(i), interest).is_err() {
        *tally.errors.entry("connect").or_default() += 1;
        return None;
    }
    let peer = match reuse {
        Some(mut peer) => {
            peer.restart(*next_id, now, same_source.is_some());
            peer
        }
        None => Talker::new(&plan.script, *next_id, now),
    };
    *next_id += per_peer;
    let mut peer = peer;
    if let (Some(version), Ok(local)) = (plan.proxy, stream.local_addr()) {
        peer.preface(&version.header(local, plan.target));
    }
    Some(Conn { stream, peer, source: source.ip(), last_io: now, tls: None })
}

/// A non-blocking connect from `source` (its port taken if free, else any).
fn connect(source: SocketAddr, target: SocketAddr, nodelay: bool) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    if socket.bind(&source.into()).is_err() {
        socket.bind(&SocketAddr::new(source.ip(), 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Moves a conversation's bytes until the socket would block; `Ok(true)`: it ended as
/// expected, `Err`: it failed, `Ok(false)`: it waits. A connect still under way or refused
/// shows in the first read or write (no extra system call to ask). `read_closed`: the poll
/// said the server's FIN has arrived; a conversation that has all it waited for (a deny
/// line) and whose read did not fill `buf` needs no read of its own for the close. Any
/// other ends only on a read of 0 (a read may return before all that came is queued).
fn step(conn: &mut Conn, buf: &mut [u8], now: Instant, read_closed: bool) -> Result<bool, &'static str> {
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect",
        _ => "reset",
    };
    if conn.tls.is_some() {
        return step_tls(conn, buf, now);
    }
    loop {
        while !conn.peer.output().is_empty() {
            match conn.stream.write(conn.peer.output()) {
                Ok(n) => {
                    conn.peer.sent(n);
                    conn.last_io = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e)),
            }
        }
        match conn.stream.read(buf) {
            Ok(0) => return conn.peer.eof().map(|()| true).map_err(|f| f.name()),
            Ok(n) => {
                conn.last_io = now;
                conn.peer.input(&buf[..n], now).map_err(|f| f.name())?;
                if conn.peer.over() {
                    return Ok(true);
                }
                if let Some(tls) = conn.peer.starttls() {
                    let client = rustls::ClientConnection::new(tls.config, tls.name).map_err(|_| "tls")?;
                    conn.tls = Some(Box::new(client));
                    return step_tls(conn, buf, now);
                }
                if read_closed && n < buf.len() && conn.peer.finished() {
                    return conn.peer.eof().map(|()| true).map_err(|f| f.name());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && conn.peer.finished() => return Ok(true),
            Err(e) => return Err(failed(e)),
        }
    }
}

/// `step` for a conversation under TLS: the peer's plaintext goes through rustls.
fn step_tls(conn: &mut Conn, buf: &mut [u8], now: Instant) -> Result<bool, &'static str> {
    let Conn { stream, peer, tls, last_io, .. } = conn;
    let Some(tls) = tls.as_mut() else { return Err("tls") };
    loop {
        if !tls.is_handshaking() && !peer.output().is_empty() {
            let n = tls.writer().write(peer.output()).map_err(|_| "tls")?;
            peer.sent(n);
        }
        while tls.wants_write() {
            match tls.write_tls(stream) {
                Ok(_) => *last_io = now,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err("reset"),
            }
        }
        let handshaking = tls.is_handshaking();
        match tls.read_tls(stream) {
            Ok(0) => return peer.eof().map(|()| true).map_err(|f| f.name()),
            Ok(_) => *last_io = now,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if peer.finished() => return Ok(true),
            Err(_) => return Err("reset"),
        }
        if tls.process_new_packets().is_err() {
            return Err("tls");
        }
        if handshaking
            && !tls.is_handshaking()
            && let Talker::Smtp(p) = peer
        {
            p.tls_ready(tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        }
        loop {
            match tls.reader().read(buf) {
                Ok(0) => return peer.eof().map(|()| true).map_err(|f| f.name()),
                Ok(n) => {
                    peer.input(&buf[..n], now).map_err(|f| f.name())?;
                    if peer.over() {
                        return Ok(true);
                    }
                }
                Err(_) => break, // nothing more decrypted
            }
        }
    }
}

/// Takes a conversation's events into the tally; returns how many of them the summary's
/// throughput counts (refusals and messages relayed), for the progress line.
fn collect(peer: &mut Talker, tally: &mut Tally) -> u64 {
    let us = |d: Duration| d.as_micros().max(1) as u64;
    let mut counted = 0;
    for event in peer.events().drain(..) {
        counted += u64::from(matches!(event, Event::Denied(_) | Event::Accepted { .. }));
        match event {
            Event::Denied(latency) => {
                tally.denied += 1;
                let _ = tally.latency.record(latency.as_micros().max(1) as u64);
            }
            Event::Accepted { id, hash, latency } => {
                tally.accepted.push((id, hash));
                let _ = tally.latency.record(latency.as_micros().max(1) as u64);
            }
            Event::Refused { .. } => tally.refused += 1,
            Event::Dropped(d) => {
                let _ = tally.dropped.record(us(d));
            }
            Event::Banned(d) => {
                let _ = tally.banned.record(us(d));
            }
            Event::Confirmed => tally.confirmed += 1,
            Event::BannedOnSight => tally.banned_on_sight += 1,
            Event::Spared => tally.spared += 1,
            Event::Handshake { resumed } => {
                tally.handshakes += 1;
                tally.resumed += u64::from(resumed);
            }
            Event::CutOff(d) => {
                let _ = tally.cut_off.record(us(d));
            }
        }
    }
    counted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Relay;

    /// The progress line counts what the summary's throughput counts: a connection
    /// that relayed three messages adds three, not one.
    #[test]
    fn a_conversation_adds_its_messages_to_the_progress() {
        let now = Instant::now();
        let script = Arc::new(Script::Relay(Relay::new("u@example.com", true, 3, 100)));
        let mut talker = Talker::new(&script, 1, now);
        let Talker::Smtp(peer) = &mut talker else { panic!("an SMTP peer") };
        peer.input(b"220 mx\r\n250 mx\r\n", now).expect("greeted");
        for _ in 0..3 {
            let n = peer.output().len();
            peer.sent(n);
            peer.input(b"250 ok\r\n250 ok\r\n354 go\r\n", now).expect("envelope");
            let n = peer.output().len();
            peer.sent(n);
            peer.input(b"250 queued\r\n", now).expect("queued");
        }
        let mut tally = Tally::new();
        assert_eq!(collect(&mut talker, &mut tally), 3);
        assert_eq!(tally.accepted.len(), 3);
    }
}
