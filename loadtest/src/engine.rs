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

use crate::peer::{Event, Peer, Script};
use crate::sources::Sources;

/// What to run.
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
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.unfinished += other.unfinished;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits: allocated once, fixed size
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

/// Runs the plan on its threads; returns when every thread is done.
pub fn run(plan: &Plan, progress: &Progress) -> Tally {
    let started = Instant::now();
    let threads = plan.threads.max(1);
    let mut tally = Tally::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let slots = plan.concurrency / threads + usize::from(i < plan.concurrency % threads);
                scope.spawn(move || worker(i as u64, slots, plan, progress, started))
            })
            .collect();
        for h in handles {
            if let Ok(t) = h.join() {
                tally.merge(t);
            }
        }
    });
    tally.elapsed = started.elapsed();
    tally
}

struct Conn {
    stream: TcpStream,
    peer: Peer,
    last_io: Instant,
}

fn worker(thread: u64, slots: usize, plan: &Plan, progress: &Progress, started: Instant) -> Tally {
    let mut tally = Tally::new();
    let Ok(mut poll) = Poll::new() else {
        *tally.errors.entry("poll").or_default() += 1;
        return tally;
    };
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<Conn>> = (0..slots).map(|_| None).collect();
    let end = started + plan.duration;
    let hard_end = end + plan.drain;
    // each thread's message ids: its index in the top bits
    let mut next_id = thread << 40;
    let per_peer = match &*plan.script {
        Script::Relay(r) => u64::from(r.messages.max(1)),
        Script::Deny { .. } => 1,
    };
    let mut buf = vec![0u8; 64 * 1024];
    for (i, slot) in conns.iter_mut().enumerate() {
        *slot = open(plan, &mut poll, i, (&mut next_id, per_peer), None, &mut tally);
    }
    let mut ended = Vec::with_capacity(slots);
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
                match step(conn, &mut buf, now) {
                    Ok(false) => {}
                    done => ended.push((i, done)),
                }
            }
        }
        // conversations waiting too long
        for (i, slot) in conns.iter().enumerate() {
            if slot.as_ref().is_some_and(|c| now.saturating_duration_since(c.last_io) > plan.timeout) {
                ended.push((i, Err("timeout")));
            }
        }
        for (i, done) in ended.drain(..) {
            // closing the socket takes it out of the poll set: no deregistering call
            let Some(mut conn) = conns[i].take() else { continue };
            collect(&mut conn.peer, &mut tally);
            drop(conn.stream);
            match done {
                Ok(_) => progress.ops.fetch_add(1, Ordering::Relaxed),
                Err(kind) => {
                    *tally.errors.entry(kind).or_default() += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed)
                }
            };
            if now < end {
                conns[i] = open(plan, &mut poll, i, (&mut next_id, per_peer), Some(conn.peer), &mut tally);
            }
        }
    }
    for conn in conns.iter_mut().filter_map(Option::take) {
        let mut peer = conn.peer;
        collect(&mut peer, &mut tally);
        tally.unfinished += 1;
    }
    tally
}

/// A new connection in slot `i`, from the next source address; `ids`: the next message
/// id and how many a peer takes; `reuse`: the slot's last peer, whose buffers serve again.
fn open(
    plan: &Plan,
    poll: &mut Poll,
    i: usize,
    ids: (&mut u64, u64),
    reuse: Option<Peer>,
    tally: &mut Tally,
) -> Option<Conn> {
    let (next_id, per_peer) = ids;
    let source = plan.sources.next();
    tally.connections += 1;
    // a denied peer only reads; a relaying one writes small commands awaited one at a time
    let relay = matches!(*plan.script, Script::Relay(_));
    let mut stream = match connect(source, plan.target, relay) {
        Ok(s) => s,
        Err(_) => {
            *tally.errors.entry("connect").or_default() += 1;
            return None;
        }
    };
    let interest = if relay { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
    if poll.registry().register(&mut stream, Token(i), interest).is_err() {
        *tally.errors.entry("connect").or_default() += 1;
        return None;
    }
    let now = Instant::now();
    let peer = match reuse {
        Some(mut peer) => {
            peer.restart(*next_id, now);
            peer
        }
        None => Peer::new(Arc::clone(&plan.script), *next_id, now),
    };
    *next_id += per_peer;
    Some(Conn { stream, peer, last_io: now })
}

fn connect(source: std::net::IpAddr, target: SocketAddr, nodelay: bool) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Moves what bytes can move; `Ok(true)`: the conversation ended as expected, `Err`: it
/// failed, `Ok(false)`: it waits. A connect still under way or refused shows in the
/// first read or write (no extra system call to ask).
fn step(conn: &mut Conn, buf: &mut [u8], now: Instant) -> Result<bool, &'static str> {
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect",
        _ => "reset",
    };
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
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && conn.peer.finished() => return Ok(true),
            Err(e) => return Err(failed(e)),
        }
    }
}

fn collect(peer: &mut Peer, tally: &mut Tally) {
    for event in peer.events.drain(..) {
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
        }
    }
}
