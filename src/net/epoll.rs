//! The epoll driver, on mio: the fallback where io_uring is refused. Same shape as
//! `uring`: accept, judge, deny line and close, or serve a [`Session`]'s two ports, the
//! peer's socket and the next hop's.
//!
//! Sockets are edge-triggered, and each remembers what it last reported (readable,
//! writable) until an operation would block: a connection's step loop performs what its
//! session asks on either socket while the socket is ready for it, so no read is tried
//! before an answer can have arrived. A busy connection yields after `STEPS_PER_TURN`
//! steps, a listener after `ACCEPTS_PER_TURN` accepts, so that others get their turn.

use std::io::{self, Read, Write};
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::pool::Pool;
use super::timers::{ConnId, Timers};
use super::{Drain, READ_LEN, Shared, SnapshotCache, handle_events};
use crate::abuse::Admission;
use crate::datetime::UnixTime;
use crate::gate::{self, PeerIp, RefusalLines, Verdict};
use crate::smtp::client::Upstream;
use crate::smtp::{Relay, Session, Transmit};
use crate::stats::Counts;

/// Wait before accepting again after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Socket operations one connection may do before the loop moves on to others.
const STEPS_PER_TURN: usize = 32;
/// Connections one listener may accept before the loop moves on to others.
const ACCEPTS_PER_TURN: usize = 256;
const WAKE: Token = Token(usize::MAX);
/// Listener `i` has token `LISTENER_BASE + i`; connection `key` has `2 * key` for the
/// peer's socket and `2 * key + 1` for the next hop's.
const LISTENER_BASE: usize = 1 << 48;

/// What a socket last reported, cleared when an operation would block.
#[derive(Clone, Copy, Default)]
struct Ready {
    read: bool,
    write: bool,
}

impl Ready {
    fn note(&mut self, event: &mio::event::Event) {
        // errors and hang-ups are found by the next read or write
        self.read |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.write |= event.is_writable() || event.is_write_closed() || event.is_error();
    }
}

struct Conn {
    /// The peer's socket; `None` once closed.
    peer: Option<TcpStream>,
    peer_ready: Ready,
    relay: Option<RelaySocket>,
    generation: u32,
    session: Session,
    whitelisted: bool,
    /// Its place in the connection counts, given back when the connection is freed.
    _admission: Admission,
    armed: Option<Instant>,
}

struct RelaySocket {
    stream: TcpStream,
    /// Connecting: the socket becomes writable when the connection is made or refused.
    connecting: bool,
    ready: Ready,
}

struct Listener {
    socket: TcpListener,
    /// When to accept again: after a resource error, or at once when a turn ended with
    /// connections left in the backlog.
    retry_at: Option<Instant>,
}

pub struct Worker {
    poll: Poll,
    shared: Arc<Shared>,
    /// This worker's own counts, for `mxgate stats`.
    counts: Arc<Counts>,
    snapshot: SnapshotCache,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    pool: Pool<TcpStream>,
    timers: Timers,
    refusals: RefusalLines,
    generation: u32,
    read_buf: Box<[u8]>,
    /// Connections that used up their turn with work left.
    busy: Vec<ConnId>,
    drain: Drain,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, sockets: Vec<StdListener>) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            socket.set_nonblocking(true)?;
            let mut socket = TcpListener::from_std(socket);
            poll.registry().register(&mut socket, Token(LISTENER_BASE + i), Interest::READABLE)?;
            listeners.push(Listener { socket, retry_at: None });
        }
        Ok(Worker {
            poll,
            snapshot: shared.snapshot_cache(),
            counts: shared.worker_counts(),
            shared,
            listeners,
            conns: Slab::new(),
            pool: Pool::default(),
            timers: Timers::default(),
            refusals: RefusalLines::default(),
            generation: 0,
            read_buf: vec![0; READ_LEN].into_boxed_slice(),
            busy: Vec::new(),
            drain: Drain::Serving,
        })
    }

    pub fn waker(&self) -> io::Result<mio::Waker> {
        mio::Waker::new(self.poll.registry(), WAKE)
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            let conns = &self.conns;
            self.timers.compact(conns.len(), |(key, generation)| {
                conns.get(key).filter(|c| c.generation == generation).map(|c| c.armed)
            });
            self.retry_accepts(now);
            self.expire_pool(now);
            if self.finished() {
                break;
            }
            let wait = if self.busy.is_empty() {
                self.next_wakeup().map(|at| at.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, wait)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("epoll wait failed: {e}; this worker stops");
                break;
            }
            let now = Instant::now();
            let unix = UnixTime::now();
            for busy in std::mem::take(&mut self.busy) {
                if self.conns.get(busy.0).is_some_and(|c| c.generation == busy.1) {
                    self.advance(busy.0, now);
                }
            }
            for event in &events {
                match event.token() {
                    WAKE => self.woken(now),
                    Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE, now, unix),
                    Token(t) => {
                        if let Some(conn) = self.conns.get_mut(t / 2) {
                            match (t % 2, conn.relay.as_mut()) {
                                (0, _) => conn.peer_ready.note(event),
                                (_, Some(relay)) => relay.ready.note(event),
                                _ => {}
                            }
                        }
                        if t % 2 == 1 {
                            self.relay_event(t / 2, now);
                        }
                        self.advance(t / 2, now);
                    }
                }
            }
        }
        for stream in self.pool.drain() {
            drop(stream);
        }
    }

    fn accept(&mut self, index: usize, now: Instant, unix: UnixTime) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.listeners.get_mut(index) else {
                return;
            };
            let (mut stream, addr) = match listener.socket.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        tracing::warn!("accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                        listener.retry_at = Some(now + ACCEPT_BACKOFF);
                        return;
                    }
                    _ => {
                        tracing::debug!("accept: {e}");
                        continue;
                    }
                },
            };
            let peer = PeerIp::from(addr);
            let snapshot = self.snapshot.load();
            let verdict = gate::admit(snapshot, &self.shared.abuse, peer, unix);
            self.counts.verdict(&verdict);
            let (whitelisted, admission) = match verdict {
                Verdict::Allow { whitelisted, admission } => (whitelisted, admission),
                Verdict::Refuse(refusal) => {
                    let line = self.refusals.line(refusal, snapshot, unix);
                    // a fresh socket's send buffer is empty: the line goes in one write
                    let _ = stream.write(line);
                    tracing::debug!(%peer, ?refusal, "refused");
                    continue; // dropping the stream closes it
                }
            };
            let mut session = Session::new(snapshot.clone(), peer, now, unix);
            if self.drain != Drain::Serving {
                session.shutdown(now);
            }
            tracing::debug!(%peer, "allowed");
            self.generation = self.generation.wrapping_add(1);
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) =
                self.poll.registry().register(&mut stream, Token(2 * key), Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!(%peer, "cannot register a connection: {e}");
                continue;
            }
            // accepted sockets can take the banner at once; input is reported by an event
            let peer_ready = Ready { read: false, write: true };
            let conn = Conn {
                peer: Some(stream),
                peer_ready,
                relay: None,
                generation: self.generation,
                session,
                whitelisted,
                _admission: admission,
                armed: None,
            };
            entry.insert(conn);
            self.advance(key, now);
        }
        // The backlog may hold more: come back after the others had their turn.
        if let Some(listener) = self.listeners.get_mut(index) {
            listener.retry_at = Some(now);
        }
    }

    /// An event on a next-hop socket: a connection being made is made or refused.
    fn relay_event(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Some(relay) = conn.relay.as_mut().filter(|r| r.connecting) else { return };
        let connected = match relay.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => relay.stream.peer_addr().map(|_| ()),
        };
        match connected {
            Ok(()) => {
                relay.connecting = false;
                let upstream = Upstream::new(conn.session.hostname());
                conn.session.attach_upstream(upstream, false, now);
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {} // still connecting
            Err(e) => {
                tracing::debug!("next hop connection failed: {e}");
                if let Some(mut relay) = conn.relay.take() {
                    let _ = self.poll.registry().deregister(&mut relay.stream);
                }
                conn.session.handle_relay_error(now);
            }
        }
    }

    /// Performs what the connection's session asks on both sockets until neither can go
    /// on without waiting, the session ends, or the connection's turn is over.
    fn advance(&mut self, key: usize, now: Instant) {
        for _ in 0..STEPS_PER_TURN {
            let peer_step = self.peer_step(key, now);
            let relay_step = self.relay_step(key, now);
            let Some(conn) = self.conns.get_mut(key) else { return };
            handle_events(&mut conn.session, &self.shared.abuse, &self.counts, conn.whitelisted);
            if !peer_step && !relay_step {
                if conn.peer.is_none() && conn.relay.is_none() && conn.session.poll_relay() == Relay::Idle {
                    self.conns.remove(key);
                } else {
                    self.timers.arm(&mut conn.armed, conn.session.poll_timeout(), (key, conn.generation));
                }
                return;
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            self.timers.arm(&mut conn.armed, conn.session.poll_timeout(), (key, conn.generation));
            self.busy.push((key, conn.generation));
        }
    }

    /// One operation on the peer's socket; false when it would have to wait.
    fn peer_step(&mut self, key: usize, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let Some(stream) = conn.peer.as_mut() else { return false };
        let ready = &mut conn.peer_ready;
        let result = match conn.session.poll_transmit() {
            Transmit::Send(bytes) if ready.write => stream
                .write(bytes)
                .map(|n| conn.session.consume_output(n))
                .inspect_err(|e| ready.write &= e.kind() != io::ErrorKind::WouldBlock),
            Transmit::Receive if ready.read => stream
                .read(&mut self.read_buf)
                .map(|n| {
                    // a short read emptied the socket: the next input comes with an event
                    ready.read = n == self.read_buf.len();
                    match n {
                        0 => conn.session.handle_eof(now),
                        n => conn.session.handle_input(&self.read_buf[..n], now),
                    }
                })
                .inspect_err(|e| ready.read &= e.kind() != io::ErrorKind::WouldBlock),
            Transmit::Send(_) | Transmit::Receive | Transmit::Wait => return false,
            Transmit::Close => {
                // closing the socket also takes it out of the epoll set
                drop(conn.peer.take());
                return true;
            }
        };
        match result {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                tracing::debug!("peer connection error: {e}");
                conn.session.handle_eof(now);
                true
            }
        }
    }

    /// One operation on the next hop's side; false when it would have to wait.
    fn relay_step(&mut self, key: usize, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let connecting = conn.relay.as_ref().is_some_and(|r| r.connecting);
        let result = match conn.session.poll_relay() {
            Relay::Idle => return false,
            Relay::Connect { addr, pooled_ok } => {
                if pooled_ok && let Some((mut stream, upstream)) = self.pool.take(addr) {
                    // pooled sockets stay registered: point this one at its new connection
                    let registered = self.poll.registry().reregister(
                        &mut stream,
                        Token(2 * key + 1),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if registered.is_ok() {
                        let ready = Ready { read: false, write: true };
                        conn.relay = Some(RelaySocket { stream, connecting: false, ready });
                        conn.session.attach_upstream(upstream, true, now);
                        return true;
                    }
                }
                conn.session.dialing();
                match TcpStream::connect(addr) {
                    Ok(mut stream) => {
                        // commands and the final dot are small writes awaited one at a time
                        let _ = stream.set_nodelay(true);
                        let token = Token(2 * key + 1);
                        match self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        {
                            Ok(()) => {
                                conn.relay = Some(RelaySocket { stream, connecting: true, ready: Ready::default() })
                            }
                            Err(e) => {
                                tracing::warn!("cannot register a next-hop connection: {e}");
                                conn.session.handle_relay_error(now);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!("cannot connect to next hop {addr}: {e}");
                        conn.session.handle_relay_error(now);
                    }
                }
                return true;
            }
            Relay::Release => return self.finish_relay(key, true, now),
            Relay::Close => return self.finish_relay(key, false, now),
            _ if connecting => return false,
            Relay::Send(bytes) => match conn.relay.as_mut() {
                Some(r) if !r.ready.write => return false,
                Some(r) => r
                    .stream
                    .write(bytes)
                    .map(|n| conn.session.consume_relay_output(n, now))
                    .inspect_err(|e| r.ready.write &= e.kind() != io::ErrorKind::WouldBlock),
                None => Err(io::Error::from(io::ErrorKind::NotConnected)),
            },
            Relay::Receive => match conn.relay.as_mut() {
                Some(r) if !r.ready.read => return false,
                Some(r) => r
                    .stream
                    .read(&mut self.read_buf)
                    .and_then(|n| {
                        r.ready.read = n == self.read_buf.len();
                        match n {
                            0 => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                            n => {
                                conn.session.handle_relay_input(&self.read_buf[..n], now);
                                Ok(())
                            }
                        }
                    })
                    .inspect_err(|e| r.ready.read &= e.kind() != io::ErrorKind::WouldBlock),
                None => Err(io::Error::from(io::ErrorKind::NotConnected)),
            },
        };
        match result {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                tracing::debug!("next hop connection error: {e}");
                conn.session.handle_relay_error(now);
                true
            }
        }
    }

    /// Takes the next-hop connection from the session: into the pool when `release`,
    /// else closed.
    fn finish_relay(&mut self, key: usize, release: bool, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let detached = conn.session.detach_relay();
        // A closed socket leaves the epoll set by itself. A pooled one stays registered
        // under its old token until reused: an event of it meanwhile (the next hop
        // closing it) only makes that token's connection take one more look.
        let Some(relay) = conn.relay.take() else { return true };
        if let (true, false, Some((upstream, addr))) = (release, relay.connecting, detached) {
            let max = self.snapshot.load().config.relay.max_idle_connections as usize;
            drop(self.pool.put(addr, relay.stream, upstream, max, now));
        }
        true
    }

    fn fire_timers(&mut self, now: Instant) {
        let due = self.timers.expired(now, &mut self.conns, |c| (c.generation, &mut c.armed, c.session.poll_timeout()));
        for key in due {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.session.handle_timeout(now);
            }
            self.advance(key, now);
        }
        if let Drain::Draining { deadline } = self.drain
            && deadline <= now
        {
            tracing::warn!("drain timeout: closing {} connections", self.conns.len());
            self.drain = Drain::Aborting;
            for (_, conn) in &mut self.conns {
                conn.session.abort(now);
            }
            self.advance_all(now);
        }
    }

    fn woken(&mut self, now: Instant) {
        if !self.shared.stopping() || self.drain != Drain::Serving {
            return;
        }
        self.drain = Drain::Draining { deadline: now + self.snapshot.load().config.listen.drain_timeout };
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        for (_, conn) in &mut self.conns {
            conn.session.shutdown(now);
        }
        self.advance_all(now);
    }

    fn advance_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.advance(key, now);
        }
    }

    fn retry_accepts(&mut self, now: Instant) {
        let unix = UnixTime::now();
        for i in 0..self.listeners.len() {
            if self.listeners[i].retry_at.is_some_and(|t| t <= now) {
                self.listeners[i].retry_at = None;
                self.accept(i, now, unix);
            }
        }
    }

    fn expire_pool(&mut self, now: Instant) {
        let timeout = self.snapshot.load().config.relay.idle_timeout;
        for stream in self.pool.expire(now, timeout) {
            drop(stream);
        }
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        let pool = self.pool.next_expiry(self.snapshot.load().config.relay.idle_timeout);
        let retries = self.listeners.iter().filter_map(|l| l.retry_at);
        retries.chain(self.timers.next()).chain(self.drain.deadline()).chain(pool).min()
    }

    fn finished(&self) -> bool {
        self.drain != Drain::Serving && self.conns.is_empty()
    }
}
