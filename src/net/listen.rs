//! Listening sockets: one per configured address per worker, all bound to the same
//! address with SO_REUSEPORT so the kernel spreads connections across the workers.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use super::StartError;

/// Pending connections the kernel queues per listener (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Binds `threads` listeners for every address. Returns them per thread, and the bound
/// addresses: for port 0 the kernel picks a port for the first listener and the others
/// join it there.
pub fn bind(
    addrs: &[SocketAddr],
    threads: usize,
    share: bool,
) -> Result<(Vec<Vec<TcpListener>>, Vec<SocketAddr>), StartError> {
    let mut per_thread: Vec<Vec<TcpListener>> = (0..threads).map(|_| Vec::with_capacity(addrs.len())).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let err = |source| StartError::Bind { addr, source };
        // `[::]` also takes IPv4 (as ::ffff:a.b.c.d), unless 0.0.0.0 on the same port is
        // configured too, which would then collide with it.
        let v4_elsewhere = addrs.iter().any(|a| a.is_ipv4() && a.ip().is_unspecified() && a.port() == addr.port());
        let only_v6 = !addr.ip().is_unspecified() || v4_elsewhere;
        if !share && addr.port() != 0 && taken(addr, only_v6).map_err(err)? {
            return Err(StartError::InUse(addr));
        }
        let first = listener(addr, only_v6).map_err(err)?;
        let actual = first.local_addr().map_err(err)?;
        per_thread[0].push(first);
        for listeners in per_thread.iter_mut().skip(1) {
            listeners.push(listener(actual, only_v6).map_err(err)?);
        }
        bound.push(actual);
    }
    Ok((per_thread, bound))
}

/// Another socket listens on `addr` already: a probe bound without SO_REUSEPORT is
/// refused (SO_REUSEADDR lets it past connections left in TIME_WAIT, never past a
/// listener). Without this, our SO_REUSEPORT listeners would join another process's
/// group and take part of its traffic.
fn taken(addr: SocketAddr, only_v6: bool) -> io::Result<bool> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(only_v6)?;
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e),
    }
}

fn listener(addr: SocketAddr, only_v6: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // SMTP is small replies awaited one at a time: Nagle's delay would stall each one
    // behind the peer's delayed ACK. Accepted sockets inherit the option.
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(only_v6)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
