//! A next hop that sits on MAIL (`rcptflood` and the relay tests): it greets, offers
//! PIPELINING, and answers nothing from MAIL on until released, reading on (a hop doing
//! slow sender checks, or a hostile one); released, it accepts MAIL and every command it
//! got after it, and whatever comes later. And the peer that floods RCPT behind its MAIL
//! ([`drip_rcpts`]).
//!
//! ```text
//!  220 ─► EHLO: 250 PIPELINING ─► MAIL ... (silent, counting) ─release─► 250 × owed ─► 250 ...
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Sends RCPT lines on `s` until `until`, one line a write with `pause` between (so that
/// each read on the other side ends at a line's end: every line read is a command the
/// session may take); a write that cannot go within 50 ms is skipped. How many went.
pub fn drip_rcpts(s: &mut TcpStream, until: Instant, pause: Duration) -> u64 {
    let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
    let _ = s.set_nodelay(true);
    let mut sent = 0u64;
    while Instant::now() < until {
        if s.write_all(format!("RCPT TO:<u{sent}@example.com>\r\n").as_bytes()).is_ok() {
            sent += 1;
        }
        std::thread::sleep(pause);
    }
    sent
}

pub struct StallingHop {
    pub addr: SocketAddr,
    mails: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
}

impl StallingHop {
    /// Listens on `addr` and serves each connection on a thread of its own, for the life
    /// of the process.
    pub fn start(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let hop = StallingHop { addr: listener.local_addr()?, mails: Arc::default(), release: Arc::default() };
        let (mails, release) = (Arc::clone(&hop.mails), Arc::clone(&hop.release));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (mails, release) = (Arc::clone(&mails), Arc::clone(&release));
                std::thread::spawn(move || serve(stream, &mails, &release));
            }
        });
        Ok(hop)
    }

    /// MAIL commands received so far.
    pub fn mails(&self) -> usize {
        self.mails.load(Relaxed)
    }

    /// From now on, every command is answered 250 (those it sat on first).
    pub fn release(&self) {
        self.release.store(true, Relaxed);
    }
}

fn serve(stream: std::net::TcpStream, mails: &AtomicUsize, release: &AtomicBool) {
    let Ok(mut w) = stream.try_clone() else { return };
    // a short read timeout: a sitting hop looks at `release` between reads
    if stream.set_read_timeout(Some(Duration::from_millis(20))).is_err() || w.write_all(b"220 hop ESMTP\r\n").is_err() {
        return;
    }
    let (mut owed, mut sitting) = (0usize, false);
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if sitting && release.load(Relaxed) {
            sitting = false;
            if w.write_all(&b"250 2.0.0 ok\r\n".repeat(std::mem::take(&mut owed))).is_err() {
                return;
            }
        }
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with(b"\n") => {}
            Ok(_) | Err(_) => continue, // a partial line, or the timeout: look at `release`
        }
        let reply: &[u8] = if line.starts_with(b"MAIL") || sitting {
            if line.starts_with(b"MAIL") {
                mails.fetch_add(1, Relaxed);
            }
            if release.load(Relaxed) {
                b"250 2.0.0 ok\r\n"
            } else {
                sitting = true;
                owed += 1;
                b""
            }
        } else if line.starts_with(b"EHLO") {
            b"250-hop\r\n250 PIPELINING\r\n"
        } else if line.starts_with(b"DATA") {
            b"354 go ahead\r\n"
        } else if line.starts_with(b"QUIT") {
            b"221 bye\r\n"
        } else {
            b"250 2.0.0 ok\r\n"
        };
        if w.write_all(reply).is_err() {
            return;
        }
        line.clear();
    }
}
