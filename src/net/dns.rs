//! A worker's UDP sockets for DNS (the blocklists' queries): a pool of [`POOL`] sockets
//! per address family, each opened at its first query on an ephemeral port the kernel
//! picks at random, and taken in turn, query after query: any [`POOL`] consecutive
//! queries of a family leave from [`POOL`] different ports, so an off-path attacker
//! forging a "not listed" must match the query's 16-bit id and one of 32 unknown ports
//! (and the server's address and the question, which the resolver checks too).
//!
//! Both drivers send through [`DnsSockets::send`] at once (a datagram that cannot go is
//! dropped: its query times out), wait for each socket to be readable (epoll: registered;
//! io_uring: a poll) under its key (`family * POOL + slot`, below [`KEYS`]), and hand each
//! datagram to `Host::dns_input`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

/// The largest DNS datagram read (EDNS's common size; a blocklist answer is far smaller).
pub const DATAGRAM_LEN: usize = 1232;
/// Sockets per family.
pub const POOL: usize = 32;
/// Keys of the sockets: `0..KEYS`.
pub const KEYS: usize = 2 * POOL;

pub struct DnsSockets {
    /// IPv4's pool, then IPv6's.
    sockets: [Option<UdpSocket>; KEYS],
    /// Per family, the slot the next query leaves from.
    next: [usize; 2],
}

impl Default for DnsSockets {
    fn default() -> Self {
        DnsSockets { sockets: std::array::from_fn(|_| None), next: [0; 2] }
    }
}

impl DnsSockets {
    /// Sends `datagram` to `to` from the family's next socket. `Some((key, fd))` when a
    /// socket was opened for it, for the driver to wait on.
    pub fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> Option<(usize, RawFd)> {
        let family = usize::from(to.is_ipv6());
        let key = family * POOL + self.next[family];
        self.next[family] = (self.next[family] + 1) % POOL;
        let mut opened = None;
        if self.sockets[key].is_none() {
            let any: SocketAddr = if family == 0 { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            match UdpSocket::bind(any).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    opened = Some((key, s.as_raw_fd()));
                    self.sockets[key] = Some(s);
                }
                Err(e) => {
                    tracing::warn!("cannot open a UDP socket for DNS: {e}");
                    return None;
                }
            }
        }
        if let Some(s) = &self.sockets[key]
            && let Err(e) = s.send_to(datagram, to)
        {
            tracing::debug!("DNS query to {to} not sent: {e}");
        }
        opened
    }

    /// The next datagram waiting on socket `key`, into `buf`; `None` once none is.
    pub fn receive(&self, key: usize, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let socket = self.sockets.get(key)?.as_ref()?;
        loop {
            match socket.recv_from(buf) {
                Ok((n, from)) => return Some((from, n)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // WouldBlock: all read; anything else (an ICMP error reported): nothing now
                Err(_) => return None,
            }
        }
    }

    /// Socket `key`, if open.
    pub fn fd(&self, key: usize) -> Option<RawFd> {
        self.sockets.get(key)?.as_ref().map(AsRawFd::as_raw_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_consecutive_queries_leave_from_at_least_twenty_ports() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = sink.local_addr().unwrap();
        let mut dns = DnsSockets::default();
        let mut ports = Vec::new();
        for _ in 0..100 {
            dns.send(to, b"query");
            let mut buf = [0u8; 16];
            let (_, from) = sink.recv_from(&mut buf).unwrap();
            ports.push(from.port());
        }
        for window in ports.windows(60) {
            let mut distinct = window.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(distinct.len() >= 20, "{} ports in 60 queries", distinct.len());
        }
        assert_eq!((0..KEYS).filter_map(|k| dns.fd(k)).count(), POOL, "IPv4's pool, opened as used");
    }
}
