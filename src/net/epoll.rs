//! The epoll driver, on mio: the fallback where io_uring is refused. It owns the
//! listeners and sockets and moves bytes for the [`Host`]; accept, the gate, sessions,
//! the pool and deadlines are the host's.
//!
//! Sockets are edge-triggered, and each remembers what it last reported (readable,
//! writable) until an operation would block: an operation the connection asks for is
//! performed at once while its socket is ready for it, so no read is tried before an
//! answer can have arrived; otherwise it waits for the socket's event (a receive is then
//! done, a send answered `Sent(0)` for the connection to ask again: nothing is copied). A
//! listener yields after `ACCEPTS_PER_TURN` accepts, so that connections get their turn.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::READ_LEN;
use super::dns::{DATAGRAM_LEN, DnsSockets};
use crate::conn::{Admit, ConnId, Connection, Host, Input, Io, Output};
use crate::datetime::UnixTime;
use crate::shared::Shared;

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
    peer: Option<Port>,
    relay: Option<RelaySocket>,
}

struct RelaySocket {
    port: Port,
    /// Connecting: the socket becomes writable when the connection is made or refused.
    connecting: bool,
}

/// A socket, what it last reported, and the operation asked of it that waits for it.
struct Port {
    stream: TcpStream,
    ready: Ready,
    /// A receive found nothing yet: done when the socket is readable.
    receive: bool,
    /// A send found the socket full: answered `Sent(0)` when it is writable.
    send: bool,
}

impl Port {
    fn new(stream: TcpStream, ready: Ready) -> Self {
        Port { stream, ready, receive: false, send: false }
    }

    /// Sends what the socket takes of `bytes`: `None` when it is full (the send then
    /// waits for the socket to be writable).
    fn send(&mut self, bytes: &[u8]) -> Option<io::Result<usize>> {
        if self.ready.write {
            match self.stream.write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.write = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Some(Ok(0)),
                done => return Some(done),
            }
        }
        self.send = true;
        None
    }

    /// Reads into `buf`: `None` when nothing is there (the receive then waits for the
    /// socket to be readable); 0 at the end.
    fn receive(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        while self.ready.read {
            match self.stream.read(buf) {
                Ok(n) => {
                    // a short read emptied the socket: the next input comes with an event
                    self.ready.read = n == buf.len();
                    self.receive = false;
                    return Some(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.read = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.receive = false;
                    return Some(Err(e));
                }
            }
        }
        self.receive = true;
        None
    }

    /// The socket reported `event`: what waited for it, done for the connection.
    fn ready(&mut self, event: &mio::event::Event, conn: &mut Connection, buf: &mut [u8], hop: bool, now: Instant) {
        self.ready.note(event);
        if self.send && self.ready.write {
            self.send = false;
            conn.handle(if hop { Input::HopSent(0) } else { Input::PeerSent(0) }, now);
        }
        if self.receive
            && self.ready.read
            && let Some(read) = self.receive(buf)
        {
            conn.handle(if hop { hop_read(read, buf) } else { peer_read(read, buf) }, now);
        }
    }
}

/// What a read from the peer is for its connection.
fn peer_read(read: io::Result<usize>, buf: &[u8]) -> Input<'_> {
    match read {
        Ok(0) => Input::PeerEof,
        Ok(n) => Input::PeerBytes(&buf[..n]),
        Err(e) => {
            tracing::debug!("peer connection error: {e}");
            Input::PeerEof
        }
    }
}

/// What a read from the next hop is for its connection.
fn hop_read(read: io::Result<usize>, buf: &[u8]) -> Input<'_> {
    match read {
        Ok(n) if n > 0 => Input::HopBytes(&buf[..n]),
        Ok(_) => Input::HopFailed,
        Err(e) => {
            tracing::debug!("next hop connection error: {e}");
            Input::HopFailed
        }
    }
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
                            let buf = &mut self.io.read_buf;
                            match (t % 2, sockets.peer.as_mut(), sockets.relay.as_mut()) {
                                (0, Some(peer), _) => peer.ready(event, conn, buf, false, now),
                                (1, _, Some(relay)) => {
                                    if relay.connecting {
                                        relay.port.ready.note(event);
                                        connect_done(conn, relay, now);
                                    }
                                    if !relay.connecting {
                                        relay.port.ready(event, conn, buf, true, now);
                                    }
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
            let sockets = Sockets { peer: Some(Port::new(stream, Ready { read: false, write: true })), relay: None };
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
    let connected = match relay.port.stream.take_error() {
        Ok(Some(e)) | Err(e) => Err(e),
        Ok(None) => relay.port.stream.peer_addr().map(|_| ()),
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

    fn perform<'s>(&'s mut self, _: ConnId, s: &mut Sockets, op: Output<'_>) -> Option<Input<'s>> {
        let relay = s.relay.as_mut().map(|r| &mut r.port);
        match (op, s.peer.as_mut(), relay) {
            (Output::PeerSend(bytes), Some(peer), _) => peer.send(bytes).map(|sent| match sent {
                Ok(n) => Input::PeerSent(n),
                Err(e) => peer_read(Err(e), &[]),
            }),
            (Output::PeerReceive, Some(peer), _) => {
                let read = peer.receive(&mut self.read_buf)?;
                Some(peer_read(read, &self.read_buf))
            }
            (Output::PeerLast(line), Some(peer), _) => {
                // a fresh socket's send buffer is empty: the line goes in one write
                let _ = peer.stream.write(line);
                // closing the socket also takes it out of the epoll set
                s.peer = None;
                None
            }
            (Output::PeerClose, ..) => {
                s.peer = None;
                None
            }
            (Output::PeerSend(_) | Output::PeerReceive, None, _) => Some(Input::PeerEof),
            (Output::HopSend(bytes), _, Some(hop)) => hop.send(bytes).map(|sent| match sent {
                Ok(n) => Input::HopSent(n),
                Err(e) => hop_read(Err(e), &[]),
            }),
            (Output::HopReceive, _, Some(hop)) => {
                let read = hop.receive(&mut self.read_buf)?;
                Some(hop_read(read, &self.read_buf))
            }
            (Output::HopSend(_) | Output::HopReceive, _, None) => Some(Input::HopFailed),
            (Output::HopClose, ..) => {
                s.relay = None;
                Some(Input::HopClosed)
            }
            // the host's own
            _ => None,
        }
    }

    fn dial(&mut self, (key, _): ConnId, s: &mut Sockets, addr: SocketAddr) -> io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        // commands and the final dot are small writes awaited one at a time
        let _ = stream.set_nodelay(true);
        self.poll.registry().register(&mut stream, Token(2 * key + 1), Interest::READABLE | Interest::WRITABLE)?;
        s.relay = Some(RelaySocket { port: Port::new(stream, Ready::default()), connecting: true });
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
        s.relay = Some(RelaySocket { port: Port::new(stream, Ready { read: false, write: true }), connecting: false });
        true
    }

    fn unplug(&mut self, s: &mut Sockets) -> Option<TcpStream> {
        match s.relay.take() {
            Some(r) if !r.connecting && !r.port.receive && !r.port.send => Some(r.port.stream),
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
