//! A connection's TLS after STARTTLS, bytes in and bytes out: rustls's sans-IO
//! `ServerConnection` ([`TlsLayer`]) and `ClientConnection` ([`HopTls`]) with their
//! ciphertext buffers. Neither knows the session: the connection moves plaintext
//! between them and the session, the driver moves ciphertext between them and the
//! sockets.
//!
//! ```text
//!   STARTTLS ─► 220 in clear (first bytes of `out`) ─► handshake ─┬─ done ─► started()
//!                                                                  │         (session reset)
//!                                                                  ├─ error ─► alert, close
//!                                                                  └─ the session's timeout
//!                                                                     or the drain: close
//!   after it:  peer bytes ─► pending ─► take_in ─► read ─► (connection) ─► session
//!              session ─► (connection) ─► write ─► records ─► out ─► peer
//!              close ─► close_notify ─► out ─► Close
//! ```
//!
//! Memory: ciphertext is taken from the peer only when the session would read (or
//! during the handshake: the connection says which), and `out` and `pending` give their
//! space back when empty.
//!
//! [`HopTls`] is the next hop's side (`[relay] tls`):
//!
//! ```text
//!   220 to STARTTLS (Upstream: Handshake) ─► HopTls::new: our hello ─► handshake ─┬─ done ─► EHLO
//!                                                                                 │  (tls_started)
//!                                                                                 └─ error ─► failed
//!   after it:  the client's commands and body ─► write ─► out (≤ HOP_HIGH) ─► next hop
//!              next hop's records ─► received ─► plaintext ─► the client
//!   pooled with its socket: the TLS session goes on with the next transaction
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::smtp::{HopTransmit, Transmit};
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

    /// What the driver does next on the peer's socket, given what the session would do
    /// (`session`) if it had the socket.
    pub fn poll(&self, session: Transmit<'_>) -> Transmit<'_> {
        if self.sent < self.out.len() {
            return Transmit::Send(&self.out[self.sent..]);
        }
        if self.failed {
            return Transmit::Close;
        }
        if self.handshaking {
            // the session says nothing during the handshake unless it gave up (its timeout,
            // a drain): a reply can go neither in clear nor under TLS, so the connection ends
            return match session {
                Transmit::Receive | Transmit::Wait if self.pending.is_empty() => Transmit::Receive,
                Transmit::Receive | Transmit::Wait => Transmit::Wait,
                Transmit::Send(_) | Transmit::Close | Transmit::Last(_) => Transmit::Close,
            };
        }
        match session {
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

    pub fn handshaking(&self) -> bool {
        self.handshaking
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Ciphertext received into rustls (only while the handshake runs or the session
    /// reads, so what waits stays in `pending`): true when some was taken. An error fails
    /// the layer; the alert rustls queued goes out before the close.
    pub fn take_in(&mut self) -> Result<bool, rustls::Error> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let mut rest = &self.pending[..];
        // an error here is rustls's plaintext buffer being full: the session reads first
        let taken = self.tls.read_tls(&mut rest).unwrap_or(0);
        self.pending.drain(..taken);
        match self.tls.process_new_packets() {
            Ok(_) => Ok(taken > 0),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// What was negotiated, once, when the handshake has just completed.
    pub fn started(&mut self) -> Option<Negotiated> {
        if self.handshaking && !self.tls.is_handshaking() {
            self.handshaking = false;
            return Some(Negotiated::of(&self.tls));
        }
        None
    }

    /// Plaintext from the peer into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> Plaintext {
        match self.tls.reader().read(buf) {
            Ok(0) => Plaintext::Closed,
            Ok(n) => Plaintext::Data(n),
            Err(_) => Plaintext::None,
        }
    }

    /// Plaintext for the peer: how much rustls took.
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        self.tls.writer().write(bytes).unwrap_or(0)
    }

    /// The session closes: close_notify, once.
    pub fn close(&mut self) {
        if !self.close_notify {
            self.tls.send_close_notify();
            self.close_notify = true;
        }
    }

    /// Records rustls has for the peer into `out`; `pending`'s space back when empty.
    pub fn flush(&mut self) {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.out).is_err() {
                break;
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > KEEP {
            self.pending = Vec::new();
        }
    }
}

/// What reading decrypted data gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plaintext {
    Data(usize),
    /// close_notify: the other side is done.
    Closed,
    /// Nothing decrypted yet.
    None,
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

/// What records from the next hop gave.
#[derive(Debug, Default)]
pub struct HopRead {
    /// The handshake completed.
    pub started: bool,
    /// close_notify: the next hop is done with the connection.
    pub closed: bool,
}

/// The next hop's side after its 220 to STARTTLS.
#[derive(Debug)]
pub struct HopTls {
    tls: ClientConnection,
    /// The next hop, for the log.
    addr: SocketAddr,
    /// Records for the next hop, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    /// What the last records carried, for the connection to hand to the client.
    plain: Vec<u8>,
    handshaking: bool,
    failed: bool,
}

impl HopTls {
    /// Our hello goes out first; `name` is what the next hop's certificate must carry.
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>, addr: SocketAddr) -> Result<Self, rustls::Error> {
        let tls = ClientConnection::new(config, name)?;
        let mut hop =
            HopTls { tls, addr, out: Vec::new(), sent: 0, plain: Vec::new(), handshaking: true, failed: false };
        hop.flush();
        Ok(hop)
    }

    /// What the driver does next on the next hop's socket, given what the session's
    /// next-hop side would do (`relay`) if it had the socket.
    pub fn poll<'a>(&'a self, relay: HopTransmit<'a>) -> HopTransmit<'a> {
        if matches!(relay, HopTransmit::Close | HopTransmit::Connect { .. }) || self.failed {
            return if self.failed { HopTransmit::Close } else { relay };
        }
        if self.sent < self.out.len() {
            return HopTransmit::Send(&self.out[self.sent..]);
        }
        match relay {
            // plaintext `write` could not take yet: the next hop reads what is out first
            HopTransmit::Send(_) => HopTransmit::Receive,
            other => other,
        }
    }

    pub fn sent(&mut self, n: usize) {
        sent(&mut self.out, &mut self.sent, n);
    }

    /// The next hop, for the log.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records from the next hop, all taken: whether the handshake completed with them,
    /// and whether the next hop closed (close_notify); the plaintext they carried is
    /// [`HopTls::plaintext`] until the next call. An error fails the layer.
    pub fn received(&mut self, mut bytes: &[u8]) -> Result<HopRead, rustls::Error> {
        let mut read = HopRead::default();
        if self.plain.capacity() > KEEP {
            self.plain = Vec::new();
        } else {
            self.plain.clear();
        }
        while !bytes.is_empty() {
            let before = bytes.len();
            // an error here is rustls's plaintext buffer being full: emptied below
            let _ = self.tls.read_tls(&mut bytes);
            if let Err(e) = self.tls.process_new_packets() {
                self.failed = true;
                return Err(e);
            }
            if self.handshaking && !self.tls.is_handshaking() {
                self.handshaking = false;
                read.started = true;
            }
            let mut buf = [0u8; 4096];
            loop {
                match self.tls.reader().read(&mut buf) {
                    Ok(0) => {
                        self.failed = true;
                        read.closed = true;
                        return Ok(read);
                    }
                    Ok(n) => self.plain.extend_from_slice(&buf[..n]),
                    Err(_) => break, // nothing more decrypted
                }
            }
            if bytes.len() == before {
                break;
            }
        }
        Ok(read)
    }

    /// The plaintext the last [`HopTls::received`] decrypted.
    pub fn plaintext(&self) -> &[u8] {
        &self.plain
    }

    /// Room for more plaintext: the handshake is done and few records wait to go out.
    pub fn takes_more(&self) -> bool {
        !self.handshaking && !self.failed && self.out.len() - self.sent < HOP_HIGH
    }

    /// Plaintext for the next hop into records: how much rustls took.
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        let n = self.tls.writer().write(bytes).unwrap_or(0);
        self.flush();
        n
    }

    pub fn flush(&mut self) {
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
