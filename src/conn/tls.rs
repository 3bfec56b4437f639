//! A connection's TLS transport after STARTTLS: rustls's sans-IO `ServerConnection`
//! between the driver's bytes and the session. The driver still only moves bytes: it
//! sends what [`TlsLayer::outgoing`] holds and hands received bytes to
//! [`TlsLayer::received`]; [`TlsLayer::settle`] moves everything it can between rustls
//! and the session.
//!
//! ```text
//!   STARTTLS ─► 220 in clear (first bytes of `out`) ─► handshake ─┬─ done ─► session reset
//!                                                                  │         (tls_started)
//!                                                                  ├─ error ─► alert, close
//!                                                                  │          (tls_failed)
//!                                                                  └─ the session's timeout
//!                                                                     or the drain: close
//!   after it:  peer bytes ─► pending ─► rustls ─► plaintext ─► session (when it reads)
//!              session replies ─► rustls ─► records ─► out ─► peer
//!              session closes ─► close_notify ─► out ─► Close
//! ```
//!
//! Memory: ciphertext is taken from the peer only when the session would read (or
//! during the handshake), and `out` and `pending` give their space back when empty.
//!
//! [`HopTls`] is the same for the next hop's side (`[relay] tls`), with rustls's
//! `ClientConnection` between the driver's bytes and the session's next-hop client:
//!
//! ```text
//!   220 to STARTTLS (Upstream: Handshake) ─► HopTls::new: our hello ─► handshake ─┬─ done ─► EHLO
//!                                                                                 │  (tls_started)
//!                                                                                 └─ error ─► failed
//!   after it:  the client's commands and body ─► rustls ─► out (≤ HOP_HIGH) ─► next hop   next hop
//!              next hop's records ─► rustls ─► replies ─► client                  (the session
//!   pooled with its socket: the TLS session goes on with the next transaction      tries the next)
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::smtp::{Relay, Session, Transmit};
use crate::tls::Negotiated;

/// Buffers above this are freed when they empty (an idle session keeps none).
const KEEP: usize = 4096;

#[derive(Debug)]
pub struct TlsLayer {
    tls: ServerConnection,
    /// Bytes for the peer, from `sent` on: the 220 in clear first, then records.
    out: Vec<u8>,
    sent: usize,
    /// Received from the peer, not yet taken by rustls.
    pending: Vec<u8>,
    handshaking: bool,
    failed: bool,
    close_notify: bool,
}

impl TlsLayer {
    /// The handshake starts once `clear` (the 220) is out.
    pub fn new(config: Arc<ServerConfig>, clear: Vec<u8>) -> Result<Self, rustls::Error> {
        let tls = ServerConnection::new(config)?;
        Ok(TlsLayer {
            tls,
            out: clear,
            sent: 0,
            pending: Vec::new(),
            handshaking: true,
            failed: false,
            close_notify: false,
        })
    }

    /// What the driver does next on the peer's socket.
    pub fn poll<'a>(&'a self, session: &'a Session) -> Transmit<'a> {
        if self.sent < self.out.len() {
            return Transmit::Send(&self.out[self.sent..]);
        }
        if self.failed {
            return Transmit::Close;
        }
        if self.handshaking {
            // the session says nothing during the handshake unless it gave up (its timeout,
            // a drain): a reply can go neither in clear nor under TLS, so the connection ends
            return match session.poll_transmit() {
                Transmit::Receive | Transmit::Wait if self.pending.is_empty() => Transmit::Receive,
                Transmit::Receive | Transmit::Wait => Transmit::Wait,
                Transmit::Send(_) | Transmit::Close | Transmit::Last(_) => Transmit::Close,
            };
        }
        match session.poll_transmit() {
            Transmit::Close | Transmit::Last(_) => Transmit::Close,
            Transmit::Receive if self.pending.is_empty() => Transmit::Receive,
            // a reply rustls would not take yet, or ciphertext waiting for the session
            _ => Transmit::Wait,
        }
    }

    pub fn sent(&mut self, n: usize) {
        sent(&mut self.out, &mut self.sent, n);
    }

    pub fn received(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Moves bytes between rustls and the session until neither can go on.
    pub fn settle(&mut self, session: &mut Session, now: Instant) {
        while !self.failed && self.step(session, now) {}
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.out).is_err() {
                break;
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > KEEP {
            self.pending = Vec::new();
        }
    }

    /// One round; true when something moved.
    fn step(&mut self, session: &mut Session, now: Instant) -> bool {
        let mut moved = false;
        let reading = self.handshaking || session.poll_transmit() == Transmit::Receive;
        // ciphertext into rustls
        if reading && !self.pending.is_empty() {
            let mut rest = &self.pending[..];
            // an error here is rustls's plaintext buffer being full: the session reads first
            let taken = self.tls.read_tls(&mut rest).unwrap_or(0);
            if taken > 0 {
                self.pending.drain(..taken);
                moved = true;
            }
            if let Err(e) = self.tls.process_new_packets() {
                tracing::debug!(peer = %session.peer(), "TLS: {e}");
                self.failed = true;
                // the alert rustls queued goes out before the close
                session.tls_failed(now);
                return false;
            }
        }
        if self.handshaking && !self.tls.is_handshaking() {
            self.handshaking = false;
            session.tls_started(Negotiated::of(&self.tls), now);
            moved = true;
        }
        if self.handshaking {
            return moved;
        }
        // plaintext to the session, when it reads
        if session.poll_transmit() == Transmit::Receive {
            let mut buf = [0u8; 4096];
            match self.tls.reader().read(&mut buf) {
                Ok(0) => {
                    // close_notify: the peer is done
                    session.handle_eof(now);
                    moved = true;
                }
                Ok(n) => {
                    session.handle_input(&buf[..n], now);
                    moved = true;
                }
                Err(_) => {} // nothing decrypted yet
            }
        }
        // the session's replies into records
        if let Transmit::Send(bytes) = session.poll_transmit() {
            let n = self.tls.writer().write(bytes).unwrap_or(0);
            if n > 0 {
                session.consume_output(n);
                moved = true;
            }
        }
        if session.poll_transmit() == Transmit::Close && !self.close_notify {
            self.tls.send_close_notify();
            self.close_notify = true;
        }
        moved
    }
}

/// `n` more bytes of `out` went out (from `*at` on); an emptied buffer is cleared, and
/// its space freed when it grew past `KEEP`.
fn sent(out: &mut Vec<u8>, at: &mut usize, n: usize) {
    *at += n;
    if *at >= out.len() {
        *at = 0;
        if out.capacity() > KEEP {
            *out = Vec::new();
        } else {
            out.clear();
        }
    }
}

/// Records waiting for the next hop above which no more of the body is encrypted: the
/// rest waits in the next-hop client's buffer, whose high-water mark stops the peer.
const HOP_HIGH: usize = 64 * 1024;

/// The next hop's side after its 220 to STARTTLS.
#[derive(Debug)]
pub struct HopTls {
    tls: ClientConnection,
    /// The next hop, for the log.
    addr: SocketAddr,
    /// Records for the next hop, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    handshaking: bool,
    failed: bool,
}

impl HopTls {
    /// Our hello goes out first; `name` is what the next hop's certificate must carry.
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>, addr: SocketAddr) -> Result<Self, rustls::Error> {
        let tls = ClientConnection::new(config, name)?;
        let mut hop = HopTls { tls, addr, out: Vec::new(), sent: 0, handshaking: true, failed: false };
        hop.flush();
        Ok(hop)
    }

    /// What the driver does next on the next hop's socket.
    pub fn poll<'a>(&'a self, session: &'a Session) -> Relay<'a> {
        let relay = session.poll_relay();
        if matches!(relay, Relay::Close | Relay::Connect { .. }) || self.failed {
            return if self.failed { Relay::Close } else { relay };
        }
        if self.sent < self.out.len() {
            return Relay::Send(&self.out[self.sent..]);
        }
        match relay {
            // plaintext `settle` could not take yet: the next hop reads what is out first
            Relay::Send(_) => Relay::Receive,
            other => other,
        }
    }

    pub fn sent(&mut self, n: usize) {
        sent(&mut self.out, &mut self.sent, n);
    }

    /// Records from the next hop: through rustls to the session's next-hop client.
    pub fn received(&mut self, mut bytes: &[u8], session: &mut Session, now: Instant) {
        while !self.failed && !bytes.is_empty() {
            let before = bytes.len();
            // an error here is rustls's plaintext buffer being full: emptied below
            let _ = self.tls.read_tls(&mut bytes);
            if let Err(e) = self.tls.process_new_packets() {
                tracing::warn!(peer = %session.peer(), "next hop {}: TLS: {e}", self.addr);
                self.failed = true;
                return session.handle_relay_error(now);
            }
            if self.handshaking && !self.tls.is_handshaking() {
                self.handshaking = false;
                session.relay_tls_started();
            }
            let mut buf = [0u8; 4096];
            loop {
                match self.tls.reader().read(&mut buf) {
                    Ok(0) => {
                        // close_notify: the next hop is done with this connection
                        self.failed = true;
                        return session.handle_relay_error(now);
                    }
                    Ok(n) => session.handle_relay_input(&buf[..n], now),
                    Err(_) => break, // nothing more decrypted
                }
            }
            if bytes.len() == before {
                break;
            }
        }
    }

    /// The session's commands and body into records, while few wait to go out.
    pub fn settle(&mut self, session: &mut Session, now: Instant) {
        while !self.handshaking && !self.failed && self.out.len() - self.sent < HOP_HIGH {
            let Relay::Send(bytes) = session.poll_relay() else { break };
            let n = self.tls.writer().write(bytes).unwrap_or(0);
            if n == 0 {
                break;
            }
            session.consume_relay_output(n, now);
            self.flush();
        }
        self.flush();
    }

    fn flush(&mut self) {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.out).is_err() {
                break;
            }
        }
    }

    /// The records carrying `last` and the close_notify alert, after whatever was still
    /// to go: the end of an idle connection.
    pub fn farewell(&mut self, last: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        if self.tls.writer().write_all(last).is_ok() {
            self.tls.send_close_notify();
            self.flush();
        }
        self.out.split_off(self.sent.min(self.out.len()))
    }
}
