//! The operator's listeners (the metrics endpoint, the control socket): how a client is
//! served, the same for both, so that no client can hold them.
//!
//! ```text
//!  accept ──► MAX_CLIENTS served already? ── yes ──► closed at once
//!               │ no: a thread of its own
//!               ▼
//!  the request, whole, within REQUEST_DEADLINE (however it trickles in) ──► late: closed
//!               ▼
//!  the answer, whole, within ANSWER_DEADLINE (a client that does not read) ──► cut off
//! ```

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Clients served at once by one listener; one more is closed as soon as it is accepted.
pub const MAX_CLIENTS: usize = 16;
/// The whole request must have come within this, from the accept.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(1);
/// The whole answer must have been taken within this (`bans` may be a million lines).
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// A connection a listener serves.
pub trait Client: Read + Write + Send + 'static {
    fn read_timeout(&self, timeout: Duration) -> io::Result<()>;
    fn write_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Client for TcpStream {
    fn read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
    fn write_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout))
    }
}

impl Client for UnixStream {
    fn read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
    fn write_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout))
    }
}

/// Accepts from `incoming` on a thread named `name`, for the life of the process, and
/// serves each client with `handle` on a thread of its own, at most [`MAX_CLIENTS`] at
/// once. A handler's error is logged at debug.
pub fn serve<C: Client>(
    name: &str,
    incoming: impl Iterator<Item = io::Result<C>> + Send + 'static,
    handle: impl Fn(C) -> io::Result<()> + Send + Sync + 'static,
) -> io::Result<()> {
    let handle = Arc::new(handle);
    let busy = Arc::new(AtomicUsize::new(0));
    let client_name = format!("{name}-client");
    let what = name.to_owned();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        for client in incoming.flatten() {
            if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                busy.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closed at once
            }
            // given back when the client's thread ends (or cannot start), whatever happened
            let slot = Slot(Arc::clone(&busy));
            let (handle, what) = (Arc::clone(&handle), what.clone());
            let _ = std::thread::Builder::new().name(client_name.clone()).spawn(move || {
                let _slot = slot;
                if let Err(e) = handle(client) {
                    tracing::debug!("{what}: {e}");
                }
            });
        }
    })?;
    Ok(())
}

/// One client's place among [`MAX_CLIENTS`].
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads a request of at most `max` bytes until `complete` says it is whole, the client
/// ends it, or `max` is reached; an error once [`REQUEST_DEADLINE`] from `accepted` has
/// passed, however the bytes trickle in.
pub fn read_request<C: Client>(
    client: &mut C,
    accepted: Instant,
    max: usize,
    complete: impl Fn(&[u8]) -> bool,
) -> io::Result<Vec<u8>> {
    let deadline = accepted + REQUEST_DEADLINE;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while request.len() < max && !complete(&request) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the request did not come in time"));
        }
        client.read_timeout(left)?;
        let n = client.read(&mut buf[..(max - request.len()).min(1024)])?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    Ok(request)
}

/// Writes `answer` whole within [`ANSWER_DEADLINE`] from now.
pub fn write_answer<C: Client>(client: &mut C, answer: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + ANSWER_DEADLINE;
    let mut rest = answer;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the answer was not taken in time"));
        }
        client.write_timeout(left)?;
        match client.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
