//! The io_uring driver: one ring per worker thread, built on the `io-uring` crate.
//!
//! - A multishot accept per listener yields accepted sockets without a new submission
//!   per connection.
//! - A denied peer costs one `getpeername`, the table lookup and two linked entries,
//!   send-the-deny-line then close, both silent on success: one completion (the accept)
//!   per denied connection and no allocation.
//! - An allowed peer gets a [`Session`], served on two sockets: the peer's and, while a
//!   transaction needs one, the next hop's (pooled per worker). Each socket has at most
//!   one recv and one send in flight (and the next hop's one connect). Bytes to send are
//!   copied into the socket's own buffer first, so the session may be called at any time;
//!   closing a socket cancels what is in flight and closes once it has completed.
//!
//! Memory handed to the kernel outlives the operation: a connection's buffers live until
//! its last operation completes, the deny lines and the wake buffer are never freed.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use slab::Slab;
use socket2::SockRef;

use super::pool::Pool;
use super::timers::{ConnId, Timers};
use super::{Drain, READ_LEN, Shared, SnapshotCache, handle_events};
use crate::abuse::Admission;
use crate::datetime::UnixTime;
use crate::gate::{self, PeerIp, RefusalLines, Verdict};
use crate::smtp::client::Upstream;
use crate::smtp::{Relay, Session, Transmit};
use crate::stats::Counts;

/// Submission queue entries per ring; completions get twice as many.
const RING_ENTRIES: u32 = 4096;
/// Wait before accepting again after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// user_data: tag in the top byte; for connection operations, the connection's
// generation in the next 24 bits and its slab key in the low 32.
const TAG_ACCEPT: u8 = 1;
const TAG_CLOSE: u8 = 4;
const TAG_DENY_SEND: u8 = 5;
const TAG_WAKE: u8 = 6;
const TAG_CANCEL: u8 = 7;
// connection operations: the peer's socket, then the next hop's
const TAG_PEER_RECV: u8 = 8;
const TAG_PEER_SEND: u8 = 9;
const TAG_RELAY_RECV: u8 = 10;
const TAG_RELAY_SEND: u8 = 11;
const TAG_RELAY_CONNECT: u8 = 12;

/// Largest single send; the rest follows when it completes.
const MAX_SEND: usize = 32 * 1024;

fn user_data(tag: u8, key: usize, generation: u32) -> u64 {
    (u64::from(tag) << 56) | (u64::from(generation & 0xff_ffff) << 32) | (key as u64 & 0xffff_ffff)
}

fn split_user_data(ud: u64) -> (u8, usize, u32) {
    ((ud >> 56) as u8, (ud & 0xffff_ffff) as usize, ((ud >> 32) & 0xff_ffff) as u32)
}

fn new_ring() -> io::Result<IoUring> {
    // Fewer kernel-to-user interruptions first (Linux 6.1, 5.19), plain last.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// Checks that this kernel and its seccomp policy give us what the driver needs.
pub fn probe() -> Result<(), String> {
    let mut ring = new_ring().map_err(|e| format!("cannot create a ring: {e}"))?;
    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_skip_cqe_on_success() {
        return Err("the kernel's io_uring is too old (needs Linux 5.19 or later)".into());
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("cannot probe io_uring: {e}"))?;
    let needed = [
        opcode::Accept::CODE,
        opcode::Send::CODE,
        opcode::Recv::CODE,
        opcode::Close::CODE,
        opcode::AsyncCancel::CODE,
        opcode::Read::CODE,
    ];
    if let Some(op) = needed.iter().find(|&&op| !probe.is_supported(op)) {
        return Err(format!("io_uring opcode {op} is not allowed"));
    }
    // Multishot accept (Linux 5.19): arm one on a throwaway listener, then cancel it.
    let Ok(listener) = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) else {
        return Ok(());
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd())).build().user_data(1);
    let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
    push(&mut ring, &[accept, cancel]);
    ring.submit_and_wait(2).map_err(|e| format!("io_uring submit failed: {e}"))?;
    match ring.completion().find(|c| c.user_data() == 1).map(|c| c.result()) {
        Some(r) if r == -libc::EINVAL => Err("multishot accept is not supported (needs Linux 5.19 or later)".into()),
        _ => Ok(()),
    }
}

/// Pushes entries as one batch, submitting first if the queue lacks room; linked
/// entries must not be split across submissions.
fn push(ring: &mut IoUring, entries: &[squeue::Entry]) {
    loop {
        let mut sq = ring.submission();
        if sq.capacity() - sq.len() >= entries.len() {
            // SAFETY: every entry's buffers outlive its operation (see the module docs).
            let pushed = unsafe { sq.push_multiple(entries) };
            debug_assert!(pushed.is_ok());
            return;
        }
        drop(sq);
        if let Err(e) = ring.submit() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }
}

/// Wakes a worker: a write to the eventfd its ring reads.
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    pub fn wake(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
        let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

/// One of a connection's sockets and what is in flight on it.
struct Socket {
    /// -1: none (not yet, or closed).
    fd: RawFd,
    recv: bool,
    send: bool,
    connect: bool,
    /// A cancel of what is in flight was asked for (the socket is being closed).
    cancelling: bool,
    read_buf: Box<[u8]>,
    /// The bytes of the send in flight (a copy: the session may append meanwhile).
    write_buf: Vec<u8>,
    /// The address being connected to, for the connect in flight.
    connect_to: Option<Box<socket2::SockAddr>>,
}

impl Socket {
    fn none() -> Self {
        Socket {
            fd: -1,
            recv: false,
            send: false,
            connect: false,
            cancelling: false,
            read_buf: Box::default(),
            write_buf: Vec::new(),
            connect_to: None,
        }
    }

    fn open(fd: RawFd) -> Self {
        Socket { fd, ..Socket::none() }
    }

    fn busy(&self) -> bool {
        self.recv || self.send || self.connect
    }
}

struct Conn {
    generation: u32,
    session: Session,
    whitelisted: bool,
    /// Its place in the connection counts, given back when the connection is freed.
    _admission: Admission,
    peer: Socket,
    relay: Socket,
    armed: Option<Instant>,
}

/// A pooled next-hop connection's socket (closed when dropped), with its read buffer
/// for the next user.
struct Pooled {
    fd: OwnedFd,
    read_buf: Box<[u8]>,
}

impl Pooled {
    /// Back into a connection's socket slot.
    fn into_socket(self) -> Socket {
        Socket { read_buf: self.read_buf, ..Socket::open(self.fd.into_raw_fd()) }
    }
}

struct Listener {
    /// `None` once draining: closed, so the kernel refuses new connections (an armed
    /// accept holds its own reference to the socket until it is cancelled).
    socket: Option<TcpListener>,
    armed: bool,
    /// When to arm the accept again after a resource error.
    retry_at: Option<Instant>,
    closing: bool,
}

pub struct Worker {
    ring: IoUring,
    shared: Arc<Shared>,
    /// This worker's own counts, for `mxgate stats`.
    counts: Arc<Counts>,
    snapshot: SnapshotCache,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    pool: Pool<Pooled>,
    timers: Timers,
    refusals: RefusalLines,
    generation: u32,
    wake_fd: Arc<OwnedFd>,
    /// Never freed: the kernel may write to it until the ring is gone.
    wake_buf: &'static mut [u8; 8],
    drain: Drain,
}

impl Worker {
    /// Creates the ring on the calling thread (it is the ring's only submitter) and
    /// arms the accepts.
    pub fn new(shared: Arc<Shared>, sockets: Vec<TcpListener>) -> io::Result<Self> {
        let ring = new_ring()?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let wake_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let listeners = sockets
            .into_iter()
            .map(|socket| Listener { socket: Some(socket), armed: false, retry_at: None, closing: false })
            .collect();
        let mut w = Worker {
            ring,
            snapshot: shared.snapshot_cache(),
            counts: shared.worker_counts(),
            shared,
            listeners,
            conns: Slab::new(),
            pool: Pool::default(),
            timers: Timers::default(),
            refusals: RefusalLines::default(),
            generation: 0,
            wake_fd,
            wake_buf: Box::leak(Box::new([0; 8])),
            drain: Drain::Serving,
        };
        w.arm_wake();
        for i in 0..w.listeners.len() {
            w.arm_accept(i);
        }
        w.ring.submit()?;
        Ok(w)
    }

    pub fn waker(&self) -> Waker {
        Waker(self.wake_fd.clone())
    }

    pub fn run(mut self) {
        let mut completions: Vec<cqueue::Entry> = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            let conns = &self.conns;
            self.timers.compact(conns.len(), |(key, generation)| {
                conns.get(key).filter(|c| c.generation == generation).map(|c| c.armed)
            });
            self.retry_accepts(now);
            let idle_timeout = self.snapshot.load().config.relay.idle_timeout;
            drop(self.pool.expire(now, idle_timeout));
            if self.finished() {
                break;
            }
            let waited = match self.next_wakeup().map(|at| at.saturating_duration_since(now)) {
                Some(wait) => {
                    let ts = types::Timespec::from(wait);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            if let Err(e) = waited
                && !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY))
            {
                tracing::error!("io_uring wait failed: {e}; this worker stops");
                break;
            }
            completions.extend(self.ring.completion());
            let now = Instant::now();
            let unix = UnixTime::now();
            for c in completions.drain(..) {
                self.complete(c.user_data(), c.result(), c.flags(), now, unix);
            }
        }
        drop(self.pool.drain());
        // Anything still queued (closes of denied sockets) goes before the ring does.
        let _ = self.ring.submit();
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32, now: Instant, unix: UnixTime) {
        let (tag, key, generation) = split_user_data(ud);
        match tag {
            TAG_ACCEPT => self.accepted(key, res, flags, now, unix),
            TAG_PEER_RECV..=TAG_RELAY_CONNECT => self.op_done(tag, (key, generation), res, now),
            TAG_WAKE => self.woken(now),
            TAG_CLOSE if res == -libc::ECANCELED => {
                // SAFETY: the close was cancelled before it ran, so we still own `key` (the fd).
                unsafe { libc::close(key as RawFd) };
            }
            // Failed deny sends (the peer left; the linked close still runs), failed
            // closes and cancels that found nothing: nothing to do.
            _ => {}
        }
    }

    fn accepted(&mut self, index: usize, res: i32, flags: u32, now: Instant, unix: UnixTime) {
        if !cqueue::more(flags) {
            self.listeners[index].armed = false;
        }
        if res < 0 {
            match -res {
                libc::ECANCELED => {}
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    tracing::warn!(
                        "accept: {}; pausing accepts for {ACCEPT_BACKOFF:?}",
                        io::Error::from_raw_os_error(-res)
                    );
                    self.listeners[index].retry_at = Some(now + ACCEPT_BACKOFF);
                }
                e => tracing::debug!("accept: {}", io::Error::from_raw_os_error(e)),
            }
            return;
        }
        let fd: RawFd = res;
        let Some(peer) = peer_addr(fd).map(PeerIp::from) else {
            // the peer already left (ENOTCONN)
            push(&mut self.ring, &[close_entry(fd)]);
            return;
        };
        let snapshot = self.snapshot.load();
        let verdict = gate::admit(snapshot, &self.shared.abuse, peer, unix);
        self.counts.verdict(&verdict);
        let (whitelisted, admission) = match verdict {
            Verdict::Allow { whitelisted, admission } => (whitelisted, admission),
            Verdict::Refuse(refusal) => {
                let line = self.refusals.line(refusal, snapshot, unix);
                let send = opcode::Send::new(types::Fd(fd), line.as_ptr(), line.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
                    .user_data(user_data(TAG_DENY_SEND, 0, 0));
                push(&mut self.ring, &[send, close_entry(fd)]);
                tracing::debug!(%peer, ?refusal, "refused");
                return;
            }
        };
        let mut session = Session::new(snapshot.clone(), peer, now, unix);
        if self.drain != Drain::Serving {
            session.shutdown(now);
        }
        tracing::debug!(%peer, "allowed");
        self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
        let mut peer_socket = Socket::open(fd);
        peer_socket.read_buf = vec![0; READ_LEN].into_boxed_slice();
        let conn = Conn {
            generation: self.generation,
            session,
            whitelisted,
            _admission: admission,
            peer: peer_socket,
            relay: Socket::none(),
            armed: None,
        };
        let key = self.conns.insert(conn);
        self.advance(key, now);
    }

    /// An operation on one of a connection's sockets completed.
    fn op_done(&mut self, tag: u8, (key, generation): ConnId, res: i32, now: Instant) {
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.generation == generation) else { return };
        let failed = res < 0 && res != -libc::ECANCELED;
        match tag {
            TAG_PEER_RECV => {
                conn.peer.recv = false;
                match res {
                    0 => conn.session.handle_eof(now),
                    n if n > 0 => conn.session.handle_input(&conn.peer.read_buf[..n as usize], now),
                    _ if failed => conn.session.handle_eof(now),
                    _ => {}
                }
            }
            TAG_PEER_SEND => {
                conn.peer.send = false;
                match res {
                    n if n >= 0 => conn.session.consume_output(n as usize),
                    _ if failed => conn.session.handle_eof(now),
                    _ => {}
                }
            }
            TAG_RELAY_RECV => {
                conn.relay.recv = false;
                match res {
                    n if n > 0 => conn.session.handle_relay_input(&conn.relay.read_buf[..n as usize], now),
                    0 => conn.session.handle_relay_error(now),
                    _ if failed => conn.session.handle_relay_error(now),
                    _ => {}
                }
            }
            TAG_RELAY_SEND => {
                conn.relay.send = false;
                match res {
                    n if n >= 0 => conn.session.consume_relay_output(n as usize, now),
                    _ if failed => conn.session.handle_relay_error(now),
                    _ => {}
                }
            }
            _ => {
                conn.relay.connect = false;
                conn.relay.connect_to = None;
                if res == 0 && !conn.relay.cancelling {
                    let upstream = Upstream::new(conn.session.hostname());
                    conn.session.attach_upstream(upstream, false, now);
                } else {
                    if failed {
                        tracing::debug!("next hop connection failed: {}", io::Error::from_raw_os_error(-res));
                    }
                    push(&mut self.ring, &[close_entry(conn.relay.fd)]);
                    conn.relay.fd = -1;
                    if failed {
                        conn.session.handle_relay_error(now);
                    }
                }
            }
        }
        if !conn.peer.busy() {
            conn.peer.cancelling = false;
        }
        if !conn.relay.busy() {
            conn.relay.cancelling = false;
        }
        self.advance(key, now);
    }

    /// Serves the connection's two sockets as its session asks until nothing more can
    /// start; frees the connection when both are closed.
    fn advance(&mut self, key: usize, now: Instant) {
        // a few rounds: handing a connection over (pool, close) can let the session go on
        for _ in 0..8 {
            let peer_changed = self.serve_peer(key);
            let relay_changed = self.serve_relay(key, now);
            let Some(conn) = self.conns.get_mut(key) else { return };
            handle_events(&mut conn.session, &self.shared.abuse, &self.counts, conn.whitelisted);
            if !peer_changed && !relay_changed {
                break;
            }
        }
        let Some(conn) = self.conns.get_mut(key) else { return };
        let done = conn.peer.fd < 0
            && conn.relay.fd < 0
            && !conn.peer.busy()
            && !conn.relay.busy()
            && conn.session.poll_relay() == Relay::Idle;
        if done {
            self.conns.remove(key);
        } else {
            self.timers.arm(&mut conn.armed, conn.session.poll_timeout(), (key, conn.generation));
        }
    }

    /// Starts what the session asks on the peer's socket; true when it closed the socket.
    fn serve_peer(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let generation = conn.generation;
        let s = &mut conn.peer;
        if s.fd < 0 {
            return false;
        }
        match conn.session.poll_transmit() {
            Transmit::Send(bytes) if !s.send => {
                s.write_buf.clear();
                s.write_buf.extend_from_slice(&bytes[..bytes.len().min(MAX_SEND)]);
                s.send = true;
                let e = send_entry(s.fd, &s.write_buf, user_data(TAG_PEER_SEND, key, generation));
                push(&mut self.ring, &[e]);
            }
            Transmit::Receive if !s.recv => {
                s.recv = true;
                let e = recv_entry(s.fd, &mut s.read_buf, user_data(TAG_PEER_RECV, key, generation));
                push(&mut self.ring, &[e]);
            }
            Transmit::Close => return close_socket(&mut self.ring, s, key, generation, [TAG_PEER_RECV, TAG_PEER_SEND]),
            _ => {}
        }
        false
    }

    /// Starts what the session asks on the next hop's side; true when the connection
    /// changed hands (attached, pooled, closed) so the session may have more to do.
    fn serve_relay(&mut self, key: usize, now: Instant) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return false };
        let generation = conn.generation;
        let s = &mut conn.relay;
        match conn.session.poll_relay() {
            Relay::Idle => false,
            Relay::Connect { .. } if s.fd >= 0 => false,
            Relay::Connect { addr, pooled_ok } => {
                if pooled_ok && let Some((pooled, upstream)) = self.pool.take(addr) {
                    *s = pooled.into_socket();
                    conn.session.attach_upstream(upstream, true, now);
                    return true;
                }
                conn.session.dialing();
                let socket = match socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM.cloexec(),
                    None,
                ) {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::warn!("cannot create a socket for the next hop: {e}");
                        conn.session.handle_relay_error(now);
                        return true;
                    }
                };
                // commands and the final dot are small writes awaited one at a time
                let _ = socket.set_tcp_nodelay(true);
                *s = Socket::open(socket.into_raw_fd());
                s.read_buf = vec![0; READ_LEN].into_boxed_slice();
                let target = Box::new(socket2::SockAddr::from(addr));
                let e = opcode::Connect::new(types::Fd(s.fd), target.as_ptr().cast(), target.len())
                    .build()
                    .user_data(user_data(TAG_RELAY_CONNECT, key, generation));
                s.connect_to = Some(target);
                s.connect = true;
                push(&mut self.ring, &[e]);
                false
            }
            Relay::Send(bytes) if !s.send && !s.connect && s.fd >= 0 => {
                s.write_buf.clear();
                s.write_buf.extend_from_slice(&bytes[..bytes.len().min(MAX_SEND)]);
                s.send = true;
                let e = send_entry(s.fd, &s.write_buf, user_data(TAG_RELAY_SEND, key, generation));
                push(&mut self.ring, &[e]);
                false
            }
            Relay::Receive if !s.recv && !s.connect && s.fd >= 0 => {
                s.recv = true;
                let e = recv_entry(s.fd, &mut s.read_buf, user_data(TAG_RELAY_RECV, key, generation));
                push(&mut self.ring, &[e]);
                false
            }
            Relay::Release if !s.busy() && s.fd >= 0 => {
                if let Some((upstream, addr)) = conn.session.detach_relay() {
                    let max = self.snapshot.load().config.relay.max_idle_connections as usize;
                    // SAFETY: the connection owned this descriptor, with nothing in flight on
                    // it (`!s.busy()`); the slot forgets it below.
                    let fd = unsafe { OwnedFd::from_raw_fd(s.fd) };
                    let pooled = Pooled { fd, read_buf: std::mem::take(&mut s.read_buf) };
                    drop(self.pool.put(addr, pooled, upstream, max, now));
                } else {
                    push(&mut self.ring, &[close_entry(s.fd)]);
                }
                s.fd = -1;
                true
            }
            Relay::Release | Relay::Close => {
                if s.fd < 0 && !s.busy() {
                    conn.session.detach_relay();
                    return true;
                }
                let closed = close_socket(&mut self.ring, s, key, generation, [TAG_RELAY_RECV, TAG_RELAY_SEND]);
                if closed {
                    conn.session.detach_relay();
                }
                closed
            }
            _ => false,
        }
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
            self.drain = Drain::Aborting;
            tracing::warn!("drain timeout: closing {} connections", self.conns.len());
            for (_, conn) in &mut self.conns {
                conn.session.abort(now);
            }
            self.advance_all(now);
        }
    }

    fn woken(&mut self, now: Instant) {
        if !self.shared.stopping() {
            return self.arm_wake();
        }
        if self.drain != Drain::Serving {
            return;
        }
        self.drain = Drain::Draining { deadline: now + self.snapshot.load().config.listen.drain_timeout };
        for (i, l) in self.listeners.iter_mut().enumerate() {
            l.closing = true;
            drop(l.socket.take());
            if l.armed {
                let cancel = opcode::AsyncCancel::new(user_data(TAG_ACCEPT, i, 0))
                    .build()
                    .user_data(user_data(TAG_CANCEL, 0, 0));
                push(&mut self.ring, &[cancel]);
            }
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

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(TAG_WAKE, 0, 0));
        push(&mut self.ring, &[read]);
    }

    fn arm_accept(&mut self, index: usize) {
        let Some(fd) = self.listeners[index].socket.as_ref().map(AsRawFd::as_raw_fd) else { return };
        let accept = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(TAG_ACCEPT, index, 0));
        push(&mut self.ring, &[accept]);
        self.listeners[index].armed = true;
    }

    fn retry_accepts(&mut self, now: Instant) {
        for i in 0..self.listeners.len() {
            let l = &mut self.listeners[i];
            if !l.armed && !l.closing && l.retry_at.is_none_or(|t| t <= now) {
                l.retry_at = None;
                self.arm_accept(i);
            }
        }
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        let pool = self.pool.next_expiry(self.snapshot.load().config.relay.idle_timeout);
        let retries = self.listeners.iter().filter(|l| !l.armed && !l.closing).filter_map(|l| l.retry_at);
        retries.chain(self.timers.next()).chain(self.drain.deadline()).chain(pool).min()
    }

    /// Draining is done: no connection left and no accept armed.
    fn finished(&self) -> bool {
        self.drain != Drain::Serving && self.conns.is_empty() && self.listeners.iter().all(|l| !l.armed)
    }
}

/// Closes a connection's socket: at once when nothing is in flight (true), else cancels
/// what is (once) and waits for it to complete (false).
fn close_socket(ring: &mut IoUring, s: &mut Socket, key: usize, generation: u32, tags: [u8; 2]) -> bool {
    if s.fd < 0 {
        return false;
    }
    if !s.busy() {
        push(ring, &[close_entry(s.fd)]);
        s.fd = -1;
        return true;
    }
    if !s.cancelling {
        s.cancelling = true;
        let targets = [(s.recv, tags[0]), (s.send, tags[1]), (s.connect, TAG_RELAY_CONNECT)];
        for (_, tag) in targets.into_iter().filter(|(busy, _)| *busy) {
            let cancel = opcode::AsyncCancel::new(user_data(tag, key, generation))
                .build()
                .flags(squeue::Flags::SKIP_SUCCESS)
                .user_data(user_data(TAG_CANCEL, 0, 0));
            push(ring, &[cancel]);
        }
    }
    false
}

fn send_entry(fd: RawFd, bytes: &[u8], ud: u64) -> squeue::Entry {
    opcode::Send::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32).flags(libc::MSG_NOSIGNAL).build().user_data(ud)
}

fn recv_entry(fd: RawFd, buf: &mut [u8], ud: u64) -> squeue::Entry {
    opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build().user_data(ud)
}

fn close_entry(fd: RawFd) -> squeue::Entry {
    opcode::Close::new(types::Fd(fd)).build().flags(squeue::Flags::SKIP_SUCCESS).user_data(user_data(
        TAG_CLOSE,
        fd as usize,
        0,
    ))
}

fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: `fd` is an accepted socket this worker owns and has not closed.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&fd).peer_addr().ok()?.as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        assert_eq!(split_user_data(user_data(TAG_PEER_SEND, 123_456, 0xab_cdef)), (TAG_PEER_SEND, 123_456, 0xab_cdef));
        assert_eq!(split_user_data(user_data(TAG_CLOSE, 7, 0)), (TAG_CLOSE, 7, 0));
    }
}
