//! The io_uring driver: one ring per worker thread, built on the `io-uring` crate.
//!
//! - A multishot accept per listener yields accepted sockets without a new submission
//!   per connection.
//! - A denied peer costs one `getpeername`, the table lookup, a copy of its line into one
//!   of the worker's [`Lines`] and two linked entries, send-the-line then close: two
//!   completions (the accept; the close, which gives the line's buffer back) and no
//!   allocation once the worker has as many buffers as refusals in flight.
//! - An allowed peer's [`Connection`] is served on two sockets: the peer's and, while a
//!   transaction needs one, the next hop's (pooled by the [`Host`]). Each socket has at
//!   most one recv and one send in flight (and the next hop's one connect). Bytes to send
//!   are copied into the socket's own buffer first, so the connection may be called at any
//!   time; closing a socket cancels what is in flight and closes once it has completed.
//!
//! The driver owns the ring, the listeners and the sockets and moves bytes; accept, the
//! gate, sessions, the pool and deadlines are the host's.
//!
//! - A peer's socket has no receive buffer of its own: its recv takes one of the worker's
//!   provided buffers (a registered buffer ring) when data arrives, and the buffer goes
//!   back once the connection has taken the bytes. A session waiting for its next command
//!   holds no buffer. (The next hop's socket, busy only during a transaction, keeps one.)
//!
//! Memory handed to the kernel outlives the operation: a connection's buffers live until
//! its last operation completes, a refusal's line until its close completes; the wake
//! buffer and the buffer ring are never freed (nor are lines still in flight when the
//! worker stops).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use socket2::SockRef;

use super::READ_LEN;
use super::dns::{DATAGRAM_LEN, DnsSockets};
use crate::conn::{Admit, ConnId, Connection, Host, Input, Io, Output};
use crate::datetime::UnixTime;
use crate::shared::Shared;
use crate::template::MAX_REPLY_LEN;

/// Submission queue entries per ring; completions get twice as many.
const RING_ENTRIES: u32 = 4096;
/// Wait before accepting again after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// user_data: tag in the top byte; for connection operations, the connection's
// generation in the next 24 bits and its slab key in the low 32.
const TAG_ACCEPT: u8 = 1;
const TAG_CLOSE: u8 = 4;
const TAG_DENY_SEND: u8 = 5;
/// The close linked behind a refusal's send; the key is the line's buffer.
const TAG_DENY_CLOSE: u8 = 14;
const TAG_WAKE: u8 = 6;
const TAG_CANCEL: u8 = 7;
/// The DNS socket of the key is readable.
const TAG_DNS: u8 = 13;
// connection operations: the peer's socket, then the next hop's
const TAG_PEER_RECV: u8 = 8;
const TAG_PEER_SEND: u8 = 9;
const TAG_RELAY_RECV: u8 = 10;
const TAG_RELAY_SEND: u8 = 11;
const TAG_RELAY_CONNECT: u8 = 12;

/// Largest single send; the rest follows when it completes.
const MAX_SEND: usize = 32 * 1024;
/// Provided receive buffers per worker, each `READ_LEN` bytes (1 MiB in all, a fixed cost
/// whatever the sessions): enough for the peers with data waiting in one loop turn; when
/// they run out a recv fails with ENOBUFS and is asked again once buffers came back.
/// A power of two (the ring's index mask).
const PROVIDED_BUFFERS: u16 = 256;
/// The buffer group of the provided buffers.
const BUFFER_GROUP: u16 = 0;

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

/// Why the driver cannot run here (then `auto` takes epoll).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// A step failed with the system's error.
    #[error("{step}: {error}")]
    Call { step: &'static str, error: io::Error },
    #[error("the kernel's io_uring is too old (needs Linux 5.19 or later)")]
    TooOld,
    #[error("io_uring opcode {0} is not allowed")]
    Opcode(u8),
    #[error("multishot accept is not supported (needs Linux 5.19 or later)")]
    NoMultishotAccept,
}

/// Checks that this kernel and its seccomp policy give us what the driver needs.
pub fn probe() -> Result<(), Unavailable> {
    let call = |step| move |error| Unavailable::Call { step, error };
    let mut ring = new_ring().map_err(call("cannot create a ring"))?;
    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_skip_cqe_on_success() {
        return Err(Unavailable::TooOld);
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(call("cannot probe io_uring"))?;
    let needed = [
        opcode::Accept::CODE,
        opcode::Send::CODE,
        opcode::Recv::CODE,
        opcode::Close::CODE,
        opcode::AsyncCancel::CODE,
        opcode::Read::CODE,
    ];
    if let Some(op) = needed.iter().find(|&&op| !probe.is_supported(op)) {
        return Err(Unavailable::Opcode(*op));
    }
    // Provided buffer rings (Linux 5.19), for peers' receives.
    BufRing::new(&ring).map_err(call("cannot register provided buffers"))?;
    // Multishot accept (Linux 5.19): arm one on a throwaway listener, then cancel it.
    let Ok(listener) = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) else {
        return Ok(());
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd())).build().user_data(1);
    let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
    push(&mut ring, &[accept, cancel]);
    ring.submit_and_wait(2).map_err(call("io_uring submit failed"))?;
    match ring.completion().find(|c| c.user_data() == 1).map(|c| c.result()) {
        Some(r) if r == -libc::EINVAL => Err(Unavailable::NoMultishotAccept),
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

/// The worker's provided receive buffers: a ring of buffer descriptors shared with the
/// kernel, which takes one for each recv that completes with data; we put it back.
struct BufRing {
    /// The descriptors, `PROVIDED_BUFFERS` of them (page-aligned, never freed).
    entries: *mut types::BufRingEntry,
    /// The buffers, `READ_LEN` bytes each (never freed).
    bufs: *mut u8,
    /// Our next slot to fill; the kernel reads it from the ring's tail field.
    tail: u16,
}

impl BufRing {
    /// Allocates the ring and its buffers, registers them with `ring` and provides them all.
    fn new(ring: &IoUring) -> io::Result<Self> {
        let n = usize::from(PROVIDED_BUFFERS);
        let entries = std::alloc::Layout::from_size_align(n * std::mem::size_of::<types::BufRingEntry>(), 4096)
            .map_err(io::Error::other)?;
        let bufs = std::alloc::Layout::from_size_align(n * READ_LEN, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size; the results are checked for null.
        let (entries, bufs): (*mut types::BufRingEntry, *mut u8) =
            unsafe { (std::alloc::alloc_zeroed(entries).cast(), std::alloc::alloc(bufs)) };
        if entries.is_null() || bufs.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // SAFETY: the ring memory is page-aligned, sized for PROVIDED_BUFFERS entries and
        // never freed, so it outlives the registration (and the ring).
        unsafe { ring.submitter().register_buf_ring_with_flags(entries as u64, PROVIDED_BUFFERS, BUFFER_GROUP, 0)? };
        let mut ring = BufRing { entries, bufs, tail: 0 };
        for bid in 0..PROVIDED_BUFFERS {
            ring.provide(bid);
        }
        Ok(ring)
    }

    /// Puts buffer `bid` (back) in the ring.
    fn provide(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (PROVIDED_BUFFERS - 1));
        // SAFETY: `slot` is within the ring and `bid` names one of its buffers; the kernel
        // reads a slot only once the tail below has passed it.
        unsafe {
            let entry = &mut *self.entries.add(slot);
            entry.set_addr(self.bufs.add(usize::from(bid) * READ_LEN) as u64);
            entry.set_len(READ_LEN as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field is the ring's first entry's `resv`, a u16 the kernel reads;
        // the release store publishes the slot written above.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries).cast_mut();
            (*tail.cast::<std::sync::atomic::AtomicU16>()).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The first `len` bytes the kernel put in buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        // SAFETY: the kernel wrote `len` (at most READ_LEN) bytes into buffer `bid`, which
        // stays ours until `provide(bid)`.
        unsafe { std::slice::from_raw_parts(self.bufs.add(usize::from(bid) * READ_LEN), len.min(READ_LEN)) }
    }
}

/// One of a connection's sockets and what is in flight on it.
struct Socket {
    /// -1: none (not yet, or closed).
    fd: RawFd,
    recv: bool,
    send: bool,
    connect: bool,
    /// The socket is to be closed once what is in flight (cancelled) has completed.
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

/// A connection's sockets.
pub struct Sockets {
    peer: Socket,
    relay: Socket,
}

/// A pooled next-hop connection's socket (closed when dropped), with its read buffer
/// for the next user.
pub struct Pooled {
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

/// The operations, on the ring.
pub struct Uring {
    ring: IoUring,
    provided: BufRing,
    dns: DnsSockets,
    lines: Lines,
}

/// Refusal lines on their way out: each refusal's send reads its own copy, which goes
/// back for the next refusal when the close linked behind the send completes. The count
/// of buffers is the most refusals ever in flight at once on this worker (each holds a
/// socket, so the descriptor limit bounds it).
#[derive(Default)]
struct Lines {
    /// Each line's bytes and the socket it goes to (closed by hand if its close was
    /// cancelled). Boxed: a buffer the kernel reads must not move when the list grows.
    buffers: Vec<(Box<[u8; MAX_REPLY_LEN]>, RawFd)>,
    free: Vec<u32>,
}

impl Lines {
    /// A copy of `line` for a send to `fd`: its buffer's index and the bytes.
    fn copy(&mut self, line: &[u8], fd: RawFd) -> (usize, &[u8]) {
        debug_assert!(line.len() <= MAX_REPLY_LEN, "templates are checked at load, replies are short");
        let len = line.len().min(MAX_REPLY_LEN);
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.buffers.push((Box::new([0; MAX_REPLY_LEN]), fd));
                self.buffers.len() - 1
            }
        };
        let (bytes, owner) = &mut self.buffers[index];
        bytes[..len].copy_from_slice(&line[..len]);
        *owner = fd;
        (index, &bytes[..len])
    }

    /// The close behind buffer `index`'s send completed: the buffer is free; the socket
    /// it went to, unless `closed`, is closed here.
    fn done(&mut self, index: usize, closed: bool) {
        let Some((_, fd)) = self.buffers.get(index) else { return };
        if !closed {
            // SAFETY: the close was cancelled before it ran, so the worker still owns `fd`.
            unsafe { libc::close(*fd) };
        }
        self.free.push(index as u32);
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if self.free.len() < self.buffers.len() {
            // sends still in flight when the worker stops may read their lines until the
            // ring is gone: those buffers are left to the end of the process
            std::mem::forget(std::mem::take(&mut self.buffers));
        }
    }
}

pub struct Worker {
    io: Uring,
    host: Host<Uring>,
    listeners: Vec<Listener>,
    wake_fd: Arc<OwnedFd>,
    /// Never freed: the kernel may write to it until the ring is gone.
    wake_buf: &'static mut [u8; 8],
    dns_buf: Box<[u8]>,
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
        let provided = BufRing::new(&ring)?;
        let mut w = Worker {
            io: Uring { ring, provided, dns: DnsSockets::default(), lines: Lines::default() },
            host: Host::new(shared),
            listeners,
            wake_fd,
            wake_buf: Box::leak(Box::new([0; 8])),
            dns_buf: vec![0; DATAGRAM_LEN].into_boxed_slice(),
        };
        w.arm_wake();
        for i in 0..w.listeners.len() {
            w.arm_accept(i);
        }
        w.io.ring.submit()?;
        Ok(w)
    }

    pub fn waker(&self) -> Waker {
        Waker(self.wake_fd.clone())
    }

    pub fn run(mut self) {
        let mut completions: Vec<cqueue::Entry> = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            let now = Instant::now();
            self.host.tick(now, UnixTime::now(), &mut self.io);
            self.retry_accepts(now);
            if self.host.finished() && self.listeners.iter().all(|l| !l.armed) {
                break;
            }
            let retries = self.listeners.iter().filter(|l| !l.armed && !l.closing).filter_map(|l| l.retry_at);
            let waited = match retries.chain(self.host.next_wakeup(now)).min() {
                Some(at) => {
                    let ts = types::Timespec::from(at.saturating_duration_since(now));
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.io.ring.submitter().submit_with_args(1, &args)
                }
                None => self.io.ring.submit_and_wait(1),
            };
            if let Err(e) = waited
                && !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY))
            {
                tracing::error!("io_uring wait failed: {e}; this worker stops");
                break;
            }
            completions.extend(self.io.ring.completion());
            let now = Instant::now();
            let unix = UnixTime::now();
            for c in completions.drain(..) {
                self.complete(c.user_data(), c.result(), c.flags(), now, unix);
            }
        }
        self.host.close_pool(&mut self.io);
        // Anything still queued (closes of denied sockets) goes before the ring does.
        let _ = self.io.ring.submit();
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32, now: Instant, unix: UnixTime) {
        let (tag, key, generation) = split_user_data(ud);
        match tag {
            TAG_ACCEPT => self.accepted(key, res, flags, now, unix),
            TAG_PEER_RECV..=TAG_RELAY_CONNECT => {
                let provided = cqueue::buffer_select(flags);
                if let Some((conn, sockets)) = self.host.get_current((key, generation)) {
                    op_done(&mut self.io, (tag, key, generation), conn, sockets, (res, provided), now);
                    self.host.advance(key, now, &mut self.io);
                } else if let Some(bid) = provided {
                    self.io.provided.provide(bid);
                }
            }
            TAG_WAKE => self.woken(now),
            TAG_DNS => {
                while let Some((from, n)) = self.io.dns.receive(key, &mut self.dns_buf) {
                    self.host.dns_input(from, &self.dns_buf[..n], now, &mut self.io);
                }
                if let Some(fd) = self.io.dns.fd(key) {
                    push(&mut self.io.ring, &[dns_poll(fd, key)]);
                }
            }
            TAG_DENY_CLOSE => self.io.lines.done(key, res != -libc::ECANCELED),
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
        let Some(addr) = peer_addr(fd) else {
            // the peer already left (ENOTCONN)
            self.host.vanished();
            push(&mut self.io.ring, &[close_entry(fd)]);
            return;
        };
        let conn = match self.host.admit(addr, now, unix) {
            Admit::Serve(conn) => conn,
            Admit::Refuse(line) => return self.io.refuse(fd, line),
        };
        let peer = Socket::open(fd);
        self.host.open(conn, Sockets { peer, relay: Socket::none() }, now, &mut self.io);
    }

    fn woken(&mut self, now: Instant) {
        if !self.host.stopping() {
            return self.arm_wake();
        }
        if !self.host.start_drain(now, &mut self.io) {
            return;
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            l.closing = true;
            drop(l.socket.take());
            if l.armed {
                let cancel = opcode::AsyncCancel::new(user_data(TAG_ACCEPT, i, 0))
                    .build()
                    .user_data(user_data(TAG_CANCEL, 0, 0));
                push(&mut self.io.ring, &[cancel]);
            }
        }
    }

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(TAG_WAKE, 0, 0));
        push(&mut self.io.ring, &[read]);
    }

    fn arm_accept(&mut self, index: usize) {
        let Some(fd) = self.listeners[index].socket.as_ref().map(AsRawFd::as_raw_fd) else { return };
        let accept = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(TAG_ACCEPT, index, 0));
        push(&mut self.io.ring, &[accept]);
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
}

/// An operation on one of a connection's sockets completed: its result (and the
/// provided buffer it took), to the connection; a socket being closed is closed once
/// nothing is in flight on it.
fn op_done(
    io: &mut Uring,
    (tag, key, generation): (u8, usize, u32),
    conn: &mut Connection,
    s: &mut Sockets,
    done: (i32, Option<u16>),
    now: Instant,
) {
    let (res, provided) = done;
    let failed = res < 0 && res != -libc::ECANCELED;
    match tag {
        TAG_PEER_RECV => {
            s.peer.recv = false;
            match (res, provided) {
                (0, _) => conn.handle(Input::PeerEof, now),
                (n, Some(bid)) if n > 0 => conn.handle(Input::PeerBytes(io.provided.bytes(bid, n as usize)), now),
                // no provided buffer was left: asked again (buffers come back as this
                // turn's completions are handled)
                _ if res == -libc::ENOBUFS && !s.peer.cancelling => io.peer_recv(&mut s.peer, key, generation),
                _ if failed => conn.handle(Input::PeerEof, now),
                _ => {}
            }
            if let Some(bid) = provided {
                io.provided.provide(bid);
            }
        }
        TAG_PEER_SEND => {
            s.peer.send = false;
            match res {
                n if n >= 0 => conn.handle(Input::PeerSent(n as usize), now),
                _ if failed => conn.handle(Input::PeerEof, now),
                _ => {}
            }
        }
        TAG_RELAY_RECV => {
            s.relay.recv = false;
            match res {
                n if n > 0 => conn.handle(Input::HopBytes(&s.relay.read_buf[..n as usize]), now),
                0 => conn.handle(Input::HopFailed, now),
                _ if failed => conn.handle(Input::HopFailed, now),
                _ => {}
            }
        }
        TAG_RELAY_SEND => {
            s.relay.send = false;
            match res {
                n if n >= 0 => conn.handle(Input::HopSent(n as usize), now),
                _ if failed => conn.handle(Input::HopFailed, now),
                _ => {}
            }
        }
        _ => {
            s.relay.connect = false;
            s.relay.connect_to = None;
            if res == 0 && !s.relay.cancelling {
                conn.handle(Input::HopConnected, now);
            } else {
                if failed {
                    tracing::debug!("next hop connection failed: {}", io::Error::from_raw_os_error(-res));
                }
                push(&mut io.ring, &[close_entry(s.relay.fd)]);
                s.relay.fd = -1;
                if failed {
                    conn.handle(Input::HopFailed, now);
                }
            }
        }
    }
    if s.peer.cancelling && !s.peer.busy() {
        close_socket(&mut io.ring, &mut s.peer, key, generation, [TAG_PEER_RECV, TAG_PEER_SEND]);
    }
    if s.relay.cancelling && !s.relay.busy() {
        close_socket(&mut io.ring, &mut s.relay, key, generation, [TAG_RELAY_RECV, TAG_RELAY_SEND]);
        conn.handle(Input::HopClosed, now);
    }
}

impl Io for Uring {
    type Sockets = Sockets;
    type Pooled = Pooled;

    fn perform<'s>(
        &'s mut self,
        (key, generation): ConnId,
        sockets: &mut Sockets,
        op: Output<'_>,
    ) -> Option<Input<'s>> {
        let (peer, relay) = (&mut sockets.peer, &mut sockets.relay);
        match op {
            Output::PeerSend(_) | Output::PeerReceive if peer.fd < 0 => return Some(Input::PeerEof),
            Output::PeerSend(bytes) => self.send(peer, bytes, user_data(TAG_PEER_SEND, key, generation)),
            Output::PeerReceive => self.peer_recv(peer, key, generation),
            Output::PeerLast(line) if peer.fd >= 0 && !peer.busy() => {
                // as a refusal at accept: the send linked to the close
                self.refuse(peer.fd, line);
                peer.fd = -1;
            }
            Output::PeerLast(_) | Output::PeerClose => {
                close_socket(&mut self.ring, peer, key, generation, [TAG_PEER_RECV, TAG_PEER_SEND]);
            }
            Output::HopSend(_) | Output::HopReceive if relay.fd < 0 || relay.connect => return Some(Input::HopFailed),
            Output::HopSend(bytes) => self.send(relay, bytes, user_data(TAG_RELAY_SEND, key, generation)),
            Output::HopReceive => {
                relay.recv = true;
                let e = recv_entry(relay.fd, &mut relay.read_buf, user_data(TAG_RELAY_RECV, key, generation));
                push(&mut self.ring, &[e]);
            }
            Output::HopClose => {
                let closed = close_socket(&mut self.ring, relay, key, generation, [TAG_RELAY_RECV, TAG_RELAY_SEND]);
                // else once what is in flight has completed (`op_done`)
                return closed.then_some(Input::HopClosed);
            }
            // the host's own
            _ => {}
        }
        None
    }

    fn dial(&mut self, (key, generation): ConnId, sockets: &mut Sockets, addr: SocketAddr) -> io::Result<()> {
        let s = &mut sockets.relay;
        if s.fd >= 0 || s.busy() {
            return Err(io::Error::other("the next-hop socket is still being closed"));
        }
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM.cloexec(), None)?;
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
        Ok(())
    }

    fn adopt(&mut self, _: ConnId, sockets: &mut Sockets, pooled: Pooled) -> bool {
        if sockets.relay.fd >= 0 || sockets.relay.busy() {
            return false;
        }
        sockets.relay = pooled.into_socket();
        true
    }

    fn retire(&mut self, pooled: Pooled, last: &[u8]) {
        // one send without waiting (nothing of the pooled socket is on the ring), then
        // the close when `pooled` is dropped
        // SAFETY: the fd is the pooled socket's own, open until `pooled` drops below;
        // the buffer is `last`, valid for its length
        unsafe {
            libc::send(pooled.fd.as_raw_fd(), last.as_ptr().cast(), last.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
    }

    fn unplug(&mut self, sockets: &mut Sockets) -> Option<Pooled> {
        let s = &mut sockets.relay;
        if s.fd < 0 || s.busy() {
            return None;
        }
        // SAFETY: the connection owned this descriptor, with nothing in flight on it; the
        // slot forgets it below.
        let fd = unsafe { OwnedFd::from_raw_fd(s.fd) };
        s.fd = -1;
        Some(Pooled { fd, read_buf: std::mem::take(&mut s.read_buf) })
    }

    fn closed(&self, s: &Sockets) -> bool {
        s.peer.fd < 0 && s.relay.fd < 0 && !s.peer.busy() && !s.relay.busy()
    }

    fn dns_send(&mut self, to: SocketAddr, datagram: &[u8]) {
        if let Some((key, fd)) = self.dns.send(to, datagram) {
            push(&mut self.ring, &[dns_poll(fd, key)]);
        }
    }
}

/// Closes a connection's socket: at once when nothing is in flight (true), else cancels
/// what is (once) and closes it when that has completed (false; see `op_done`).
fn close_socket(ring: &mut IoUring, s: &mut Socket, key: usize, generation: u32, tags: [u8; 2]) -> bool {
    if !s.busy() {
        if s.fd >= 0 {
            push(ring, &[close_entry(s.fd)]);
            s.fd = -1;
        }
        s.cancelling = false;
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

impl Uring {
    /// Sends a copy of (the first `MAX_SEND` of) `bytes` on `s`: the connection may add
    /// to what it has to send meanwhile.
    fn send(&mut self, s: &mut Socket, bytes: &[u8], ud: u64) {
        debug_assert!(!s.send, "one send at a time");
        s.write_buf.clear();
        s.write_buf.extend_from_slice(&bytes[..bytes.len().min(MAX_SEND)]);
        s.send = true;
        push(&mut self.ring, &[send_entry(s.fd, &s.write_buf, ud)]);
    }

    /// A receive on the peer's socket `s`, into a provided buffer taken when data comes.
    fn peer_recv(&mut self, s: &mut Socket, key: usize, generation: u32) {
        s.recv = true;
        let e = opcode::Recv::new(types::Fd(s.fd), std::ptr::null_mut(), READ_LEN as u32)
            .buf_group(BUFFER_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(TAG_PEER_RECV, key, generation));
        push(&mut self.ring, &[e]);
    }

    /// A refusal: a copy of `line`, then the close, linked; the send completes only if it
    /// fails, the close always (giving the copy's buffer back).
    fn refuse(&mut self, fd: RawFd, line: &[u8]) {
        let (index, line) = self.lines.copy(line, fd);
        let send = opcode::Send::new(types::Fd(fd), line.as_ptr(), line.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data(TAG_DENY_SEND, 0, 0));
        let close = opcode::Close::new(types::Fd(fd)).build().user_data(user_data(TAG_DENY_CLOSE, index, 0));
        push(&mut self.ring, &[send, close]);
    }
}

/// Waits for DNS socket `key` to be readable.
fn dns_poll(fd: RawFd, key: usize) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(user_data(TAG_DNS, key, 0))
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

    /// A refusal's copy stays put while its send is in flight and its buffer serves the
    /// next refusal once the close completed: buffers are as many as refusals in flight.
    #[test]
    fn refusal_buffers_come_back_when_the_close_completes() {
        let mut lines = Lines::default();
        let (a, bytes) = lines.copy(b"530 first\r\n", -1);
        let at = bytes.as_ptr();
        let (b, _) = lines.copy(b"530 second\r\n", -1);
        assert_ne!(a, b, "two in flight, two buffers");
        assert_eq!(&lines.buffers[a].0[..11], b"530 first\r\n", "the first copy is untouched");
        lines.done(a, true);
        let (c, bytes) = lines.copy(b"530 third\r\n", -1);
        assert_eq!((c, bytes.as_ptr(), bytes), (a, at, &b"530 third\r\n"[..]));
        lines.done(b, true);
        lines.done(c, true);
        for _ in 0..1000 {
            let (i, _) = lines.copy(b"530 again\r\n", -1);
            lines.done(i, true);
        }
        assert_eq!(lines.buffers.len(), 2, "never more than were in flight at once");
    }
}
