//! The epoll driver, on mio: the fallback where io_uring is refused. Same shape as
//! `uring`: accept, judge, deny line and close, or move bytes for a [`Session`].
//!
//! Sockets are edge-triggered: a connection's step loop runs the operation its session
//! asks for until the socket would block, then waits for the next event. A busy
//! connection yields after `STEPS_PER_TURN` operations, a listener after
//! `ACCEPTS_PER_TURN` accepts, so that others get their turn.

use std::io::{self, Read, Write};
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::timers::{self, ConnId, Timers};
use super::{Drain, READ_LEN, Shared, SnapshotCache};
use crate::access::Action;
use crate::datetime::UnixTime;
use crate::gate::{self, DenyLines, PeerIp};
use crate::smtp::{Session, Transmit};

/// Wait before accepting again after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Reads or writes one connection may do before the loop moves on to others.
const STEPS_PER_TURN: usize = 32;
/// Connections one listener may accept before the loop moves on to others.
const ACCEPTS_PER_TURN: usize = 256;
const WAKE: Token = Token(usize::MAX);
/// Listener `i` has token `LISTENER_BASE + i`; connections have their slab key.
const LISTENER_BASE: usize = 1 << 48;

struct Conn {
    stream: TcpStream,
    generation: u32,
    session: Session,
    armed: Option<Instant>,
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
    snapshot: SnapshotCache,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    timers: Timers,
    deny: DenyLines,
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
            shared,
            listeners,
            conns: Slab::new(),
            timers: Timers::default(),
            deny: DenyLines::default(),
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
                    Token(key) => self.advance(key, now),
                }
            }
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
            if gate::judge(snapshot, peer) == Action::Deny {
                // a fresh socket's send buffer is empty: the line goes in one write
                let _ = stream.write(self.deny.line(snapshot, unix));
                tracing::debug!(%peer, "denied");
                continue; // dropping the stream closes it
            }
            let mut session = Session::new(snapshot.clone(), peer, now, unix);
            if self.drain != Drain::Serving {
                session.shutdown(now);
            }
            tracing::debug!(%peer, "allowed");
            self.generation = self.generation.wrapping_add(1);
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) =
                self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!(%peer, "cannot register a connection: {e}");
                continue;
            }
            entry.insert(Conn { stream, generation: self.generation, session, armed: None });
            self.advance(key, now);
        }
        // The backlog may hold more: come back after the others had their turn.
        if let Some(listener) = self.listeners.get_mut(index) {
            listener.retry_at = Some(now);
        }
    }

    /// Runs the operations the connection's session asks for until the socket would
    /// block, the session closes, or the connection's turn is over.
    fn advance(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        for _ in 0..STEPS_PER_TURN {
            let step = match conn.session.poll_transmit() {
                Transmit::Send(bytes) => conn.stream.write(bytes).map(|n| conn.session.consume_output(n)),
                Transmit::Receive => conn.stream.read(&mut self.read_buf).map(|n| match n {
                    0 => conn.session.handle_eof(now),
                    n => conn.session.handle_input(&self.read_buf[..n], now),
                }),
                Transmit::Wait => break,
                Transmit::Close => {
                    let mut conn = self.conns.remove(key);
                    let _ = self.poll.registry().deregister(&mut conn.stream);
                    return;
                }
            };
            match step {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.timers.arm(&mut conn.armed, conn.session.poll_timeout(), (key, conn.generation));
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("connection error: {e}");
                    conn.session.handle_eof(now);
                }
            }
        }
        self.timers.arm(&mut conn.armed, conn.session.poll_timeout(), (key, conn.generation));
        self.busy.push((key, conn.generation));
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some((at, (key, generation))) = self.timers.pop_due(now) {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else {
                continue;
            };
            timers::disarm(&mut conn.armed, at);
            match conn.session.poll_timeout() {
                Some(due) if due <= now => {
                    conn.session.handle_timeout(now);
                    self.advance(key, now);
                }
                later => self.timers.arm(&mut conn.armed, later, (key, generation)),
            }
        }
        if let Drain::Draining { deadline } = self.drain
            && deadline <= now
        {
            tracing::warn!("drain timeout: closing {} connections", self.conns.len());
            self.drain = Drain::Aborting;
            for (_, conn) in &mut self.conns {
                conn.session.handle_eof(now);
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

    fn next_wakeup(&self) -> Option<Instant> {
        self.listeners.iter().filter_map(|l| l.retry_at).chain(self.timers.next()).chain(self.drain.deadline()).min()
    }

    fn finished(&self) -> bool {
        self.drain != Drain::Serving && self.conns.is_empty()
    }
}
