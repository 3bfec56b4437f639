//! The service manager's readiness protocol (systemd's `Type=notify`, `sd_notify`):
//! when `NOTIFY_SOCKET` names a socket, one datagram says `READY=1` once every listener
//! is up, `RELOADING=1` and `READY=1` around a reload, `STOPPING=1` when the drain
//! begins. Without the variable nothing is sent; a send that fails is logged once at
//! debug and changes nothing.

use std::os::unix::net::UnixDatagram;

/// `RELOADING=1` with the monotonic clock's microseconds, as systemd asks of a reload.
pub fn reloading() -> String {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the time into the struct it is given
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let micros = i128::from(now.tv_sec) * 1_000_000 + i128::from(now.tv_nsec) / 1000;
    format!("RELOADING=1\nMONOTONIC_USEC={micros}")
}

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager, if one
/// listens.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        // `@name`: a name in Linux's abstract namespace
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::debug!("NOTIFY_SOCKET: cannot tell the service manager {state:?}: {e}");
    }
}
