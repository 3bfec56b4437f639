//! A worker's UDP sockets for DNS (the blocklists' queries): one per address family,
//! opened at the first query to a server of that family, on an ephemeral port the kernel
//! picks at random. Both drivers send through [`DnsSockets::send`] at once (a datagram
//! that cannot go is dropped: its query times out), wait for a socket to be readable
//! (epoll: registered; io_uring: a poll), and hand each datagram to `Host::dns_input`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

/// The largest DNS datagram read (EDNS's common size; a blocklist answer is far smaller).
pub const DATAGRAM_LEN: usize = 1232;

#[derive(Default)]
pub struct DnsSockets {
    /// IPv4, IPv6.
    sockets: [Option<UdpSocket>; 2],
}

impl DnsSockets {
    /// Sends `datagram` to `to`. `Some((family, fd))` when a socket was opened for it, for
    /// the driver to wait on (family 0: IPv4, 1: IPv6).
    pub fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> Option<(usize, RawFd)> {
        let family = usize::from(to.is_ipv6());
        let mut opened = None;
        if self.sockets[family].is_none() {
            let any: SocketAddr = if family == 0 { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            match UdpSocket::bind(any).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    opened = Some((family, s.as_raw_fd()));
                    self.sockets[family] = Some(s);
                }
                Err(e) => {
                    tracing::warn!("cannot open a UDP socket for DNS: {e}");
                    return None;
                }
            }
        }
        if let Some(s) = &self.sockets[family]
            && let Err(e) = s.send_to(datagram, to)
        {
            tracing::debug!("DNS query to {to} not sent: {e}");
        }
        opened
    }

    /// The next datagram waiting on the family's socket, into `buf`; `None` once none is.
    pub fn receive(&self, family: usize, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let socket = self.sockets.get(family)?.as_ref()?;
        loop {
            match socket.recv_from(buf) {
                Ok((n, from)) => return Some((from, n)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // WouldBlock: all read; anything else (an ICMP error reported): nothing now
                Err(_) => return None,
            }
        }
    }

    /// The family's socket, if open.
    pub fn fd(&self, family: usize) -> Option<RawFd> {
        self.sockets.get(family)?.as_ref().map(AsRawFd::as_raw_fd)
    }
}
