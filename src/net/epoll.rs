//! The epoll driver, on mio: the fallback where io_uring is refused. It owns the
//! listeners and sockets and moves bytes for the [`Host`]; accept, the gate, sessions,
//! the pool and deadlines are the host's.
//!
//! Sockets are edge-triggered, and each remembers what it last reported (readable,
//! writable) until an operation would block: an operation the connection asks for is
//! performed at once while its socket is ready for it, so no read is tried before an
//! answer can have arrived. A listener yields after `ACCEPTS_PER_TURN` accepts, so that
//! connections get their turn.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::READ_LEN;
use super::dns::{DATAGRAM_LEN, DnsSockets};
use crate::conn::{Admit, ConnId, Connection, Host, Input, Io};
use crate::datetime::UnixTime;
use crate::shared::Shared;
use crate::smtp::{HopTransmit, Transmit};

/// Wait before accepting again after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections one listener may accept before the loop moves on to others.
const ACCEPTS_PER_TURN: usize = 256;
const WAKE: Token = Token(usize::MAX);
/// The DNS sockets: `DNS + key` (see `dns::KEYS`).
const DNS: usize = usize::MAX - 1 - super::dns::KEYS;
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

/// A connection's sockets.
pub struct Sockets {
    /// The peer's socket; `None` once closed.
    peer: Option<TcpStream>,
    peer_ready: Ready,
    relay: Option<RelaySocket>,
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

/// The operations, on mio.
pub struct Epoll {
    poll: Poll,
    read_buf: Box<[u8]>,
    dns: DnsSockets,
}

pub struct Worker {
    io: Epoll,
    host: Host<Epoll>,
    listeners: Vec<Listener>,
    dns_buf: Box<[u8]>,
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
        let io = Epoll { poll, read_buf: vec![0; READ_LEN].into_boxed_slice(), dns: DnsSockets::default() };
        let dns_buf = vec![0; DATAGRAM_LEN].into_boxed_slice();
        Ok(Worker { io, host: Host::new(shared), listeners, dns_buf })
    }

    pub fn waker(&self) -> io::Result<mio::Waker> {
        mio::Waker::new(self.io.poll.registry(), WAKE)
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            self.host.tick(now, UnixTime::now(), &mut self.io);
            self.retry_accepts(now);
            if self.host.finished() {
                break;
            }
            let retries = self.listeners.iter().filter_map(|l| l.retry_at);
            let wakeup = retries.chain(self.host.next_wakeup(now)).min();
            if let Err(e) = self.io.poll.poll(&mut events, wakeup.map(|at| at.saturating_duration_since(now)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("epoll wait failed: {e}; this worker stops");
                break;
            }
            let now = Instant::now();
            let unix = UnixTime::now();
            for event in &events {
                match event.token() {
                    WAKE => self.woken(now),
                    Token(t) if (DNS..DNS + super::dns::KEYS).contains(&t) => {
                        while let Some((from, n)) = self.io.dns.receive(t - DNS, &mut self.dns_buf) {
                            self.host.dns_input(from, &self.dns_buf[..n], now, &mut self.io);
                        }
                    }
                    Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE, now, unix),
                    Token(t) => {
                        if let Some((conn, sockets)) = self.host.get(t / 2) {
                            match (t % 2, sockets.relay.as_mut()) {
                                (0, _) => sockets.peer_ready.note(event),
                                (_, Some(relay)) => {
                                    relay.ready.note(event);
                                    connect_done(conn, relay, now);
                                }
                                _ => {}
                            }
                        }
                        self.host.advance(t / 2, now, &mut self.io);
                    }
                }
            }
        }
        self.host.close_pool(&mut self.io);
    }

    fn accept(&mut self, index: usize, now: Instant, unix: UnixTime) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.listeners.get_mut(index) else { return };
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
            let conn = match self.host.admit(addr, now, unix) {
                Admit::Serve(conn) => conn,
                Admit::Refuse(line) => {
                    // a fresh socket's send buffer is empty: the line goes in one write
                    let _ = stream.write(line);
                    continue; // dropping the stream closes it
                }
            };
            let token = Token(2 * self.host.next_key());
            if let Err(e) =
                self.io.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!(peer = %addr, "cannot register a connection: {e}");
                continue;
            }
            // accepted sockets can take the banner at once; input is reported by an event
            let sockets = Sockets { peer: Some(stream), peer_ready: Ready { read: false, write: true }, relay: None };
            self.host.open(conn, sockets, now, &mut self.io);
        }
        // The backlog may hold more: come back after the others had their turn.
        if let Some(listener) = self.listeners.get_mut(index) {
            listener.retry_at = Some(now);
        }
    }

    fn woken(&mut self, now: Instant) {
        if self.host.stopping() && self.host.start_drain(now, &mut self.io) {
            for mut l in self.listeners.drain(..) {
                let _ = self.io.poll.registry().deregister(&mut l.socket);
            }
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
}

/// An event on a next-hop socket being connected: the connection is made or refused.
fn connect_done(conn: &mut Connection, relay: &mut RelaySocket, now: Instant) {
    if !relay.connecting {
        return;
    }
    let connected = match relay.stream.take_error() {
        Ok(Some(e)) | Err(e) => Err(e),
        Ok(None) => relay.stream.peer_addr().map(|_| ()),
    };
    match connected {
        Ok(()) => {
            relay.connecting = false;
            conn.handle(Input::HopConnected, now);
        }
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {} // still connecting
        Err(e) => {
            tracing::debug!("next hop connection failed: {e}");
            // the session lets go of the link: the socket is closed at its `Close`
            conn.handle(Input::HopFailed, now);
        }
    }
}

impl Io for Epoll {
    type Sockets = Sockets;
    type Pooled = TcpStream;

    fn peer(&mut self, _: ConnId, s: &mut Sockets, conn: &mut Connection, now: Instant) -> bool {
        let Some(stream) = s.peer.as_mut() else { return false };
        let ready = &mut s.peer_ready;
        let result = match conn.poll_peer() {
            Transmit::Send(bytes) if ready.write => stream
                .write(bytes)
                .map(|n| conn.handle(Input::PeerSent(n), now))
                .inspect_err(|e| ready.write &= e.kind() != io::ErrorKind::WouldBlock),
            Transmit::Receive if ready.read => stream
                .read(&mut self.read_buf)
                .map(|n| {
                    // a short read emptied the socket: the next input comes with an event
                    ready.read = n == self.read_buf.len();
                    match n {
                        0 => conn.handle(Input::PeerEof, now),
                        n => conn.handle(Input::PeerBytes(&self.read_buf[..n]), now),
                    }
                })
                .inspect_err(|e| ready.read &= e.kind() != io::ErrorKind::WouldBlock),
            Transmit::Send(_) | Transmit::Receive | Transmit::Wait => return false,
            Transmit::Last(line) => {
                // a fresh socket's send buffer is empty: the line goes in one write
                let _ = stream.write(line);
                drop(s.peer.take());
                conn.handle(Input::PeerSent(line.len()), now);
                return true;
            }
            Transmit::Close => {
                // closing the socket also takes it out of the epoll set
                drop(s.peer.take());
                return true;
            }
        };
        match result {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                tracing::debug!("peer connection error: {e}");
                conn.handle(Input::PeerEof, now);
                true
            }
        }
    }

    fn hop(&mut self, _: ConnId, s: &mut Sockets, conn: &mut Connection, now: Instant) -> bool {
        let result = match (conn.poll_hop(), s.relay.as_mut()) {
            (HopTransmit::Idle | HopTransmit::Connect { .. }, _) => return false,
            (HopTransmit::Release | HopTransmit::Close, _) => {
                // closing the socket also takes it out of the epoll set
                drop(s.relay.take());
                conn.handle(Input::HopClosed, now);
                return true;
            }
            (_, Some(r)) if r.connecting => return false,
            (HopTransmit::Send(_), Some(r)) if !r.ready.write => return false,
            (HopTransmit::Send(bytes), Some(r)) => r
                .stream
                .write(bytes)
                .map(|n| conn.handle(Input::HopSent(n), now))
                .inspect_err(|e| r.ready.write &= e.kind() != io::ErrorKind::WouldBlock),
            (HopTransmit::Receive, Some(r)) if !r.ready.read => return false,
            (HopTransmit::Receive, Some(r)) => r
                .stream
                .read(&mut self.read_buf)
                .and_then(|n| {
                    r.ready.read = n == self.read_buf.len();
                    match n {
                        0 => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        n => {
                            conn.handle(Input::HopBytes(&self.read_buf[..n]), now);
                            Ok(())
                        }
                    }
                })
                .inspect_err(|e| r.ready.read &= e.kind() != io::ErrorKind::WouldBlock),
            (HopTransmit::Send(_) | HopTransmit::Receive, None) => Err(io::Error::from(io::ErrorKind::NotConnected)),
        };
        match result {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                tracing::debug!("next hop connection error: {e}");
                conn.handle(Input::HopFailed, now);
                true
            }
        }
    }

    fn dial(&mut self, (key, _): ConnId, s: &mut Sockets, addr: SocketAddr) -> io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        // commands and the final dot are small writes awaited one at a time
        let _ = stream.set_nodelay(true);
        self.poll.registry().register(&mut stream, Token(2 * key + 1), Interest::READABLE | Interest::WRITABLE)?;
        s.relay = Some(RelaySocket { stream, connecting: true, ready: Ready::default() });
        Ok(())
    }

    fn adopt(&mut self, (key, _): ConnId, s: &mut Sockets, mut stream: TcpStream) -> bool {
        // pooled sockets stay registered: point this one at its new connection. An event
        // of it while pooled (the next hop closing it) only made its old token's
        // connection take one more look.
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self.poll.registry().reregister(&mut stream, Token(2 * key + 1), interest).is_err() {
            return false;
        }
        s.relay = Some(RelaySocket { stream, connecting: false, ready: Ready { read: false, write: true } });
        true
    }

    fn unplug(&mut self, s: &mut Sockets) -> Option<TcpStream> {
        match s.relay.take() {
            Some(r) if !r.connecting => Some(r.stream),
            other => {
                s.relay = other;
                None
            }
        }
    }

    fn retire(&mut self, pooled: TcpStream, last: &[u8]) {
        // non-blocking: what does not fit now is not waited for
        let _ = (&pooled).write(last);
    }

    fn closed(&self, s: &Sockets) -> bool {
        s.peer.is_none() && s.relay.is_none()
    }

    fn dns_send(&mut self, to: SocketAddr, datagram: &[u8]) {
        if let Some((key, fd)) = self.dns.send(to, datagram) {
            let mut source = mio::unix::SourceFd(&fd);
            if let Err(e) = self.poll.registry().register(&mut source, Token(DNS + key), Interest::READABLE) {
                tracing::warn!("cannot wait on the DNS socket: {e}");
            }
        }
    }
}
