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

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rustls::{ServerConfig, ServerConnection};

use crate::smtp::{Session, Transmit};
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
                Transmit::Send(_) | Transmit::Close => Transmit::Close,
            };
        }
        match session.poll_transmit() {
            Transmit::Close => Transmit::Close,
            Transmit::Receive if self.pending.is_empty() => Transmit::Receive,
            // a reply rustls would not take yet, or ciphertext waiting for the session
            _ => Transmit::Wait,
        }
    }

    pub fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.out.len() {
            self.sent = 0;
            if self.out.capacity() > KEEP {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        }
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
