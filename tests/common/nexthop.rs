//! A next hop for end-to-end tests: the library's scripted next hop on a socket on
//! 127.0.0.1, recording exactly what it receives; it can be told to misbehave at the
//! final dot, or to offer STARTTLS (rustls).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mxgate::scripted::ScriptedHop;

use super::WAIT;

/// How the next hop answers the final dot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtDot {
    Accept,
    Reply(&'static str),
    /// Close the connection without answering.
    Close,
    /// Never answer.
    Silent,
}

/// One message as received: envelope and the exact body bytes (dot-stuffed, up to and
/// including the CRLF before the final dot).
#[derive(Clone, Debug)]
pub struct Message {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub wire_body: Vec<u8>,
    /// It came after a STARTTLS handshake.
    pub tls: bool,
    /// It came in BDAT chunks: `wire_body` is the octets as sent, nothing stuffed.
    pub chunked: bool,
}

impl Message {
    /// The body with dot-stuffing undone.
    pub fn content(&self) -> Vec<u8> {
        if self.chunked {
            return self.wire_body.clone();
        }
        let mut out = Vec::new();
        for line in self.wire_body.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }
}

#[derive(Default)]
struct State {
    connections: usize,
    messages: Vec<Message>,
    commands: Vec<String>,
}

pub struct NextHop {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl NextHop {
    pub fn start(at_dot: AtDot) -> Self {
        Self::serving(at_dot, None, false)
    }

    /// Offers CHUNKING (and takes BDAT) besides the rest.
    pub fn chunking(at_dot: AtDot) -> Self {
        Self::serving(at_dot, None, true)
    }

    /// Offers STARTTLS with this certificate chain and key (PEM).
    pub fn start_tls(at_dot: AtDot, cert: &str, key: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().expect("PEM chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("PEM key");
        let config = rustls::ServerConfig::builder_with_provider(mxgate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("the next hop's certificate");
        Self::serving(at_dot, Some(Arc::new(config)), false)
    }

    fn serving(at_dot: AtDot, tls: Option<Arc<rustls::ServerConfig>>, chunking: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the next hop");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                s.lock().expect("lock").connections += 1;
                let (s, st, tls) = (s.clone(), st.clone(), tls.clone());
                std::thread::spawn(move || serve(stream, s, st, at_dot, tls, chunking));
            }
        });
        NextHop { addr, state, stop }
    }

    pub fn connections(&self) -> usize {
        self.state.lock().expect("lock").connections
    }

    pub fn messages(&self) -> Vec<Message> {
        self.state.lock().expect("lock").messages.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().expect("lock").commands.clone()
    }

    /// Waits (bounded) until `n` messages have arrived.
    pub fn wait_messages(&self, n: usize) -> Vec<Message> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for NextHop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// A byte stream in clear or under TLS.
trait Wire: Read + Write + Send {}
impl<T: Read + Write + Send> Wire for T {}

/// One connection: the library's scripted next hop (`mxgate::scripted`) on the socket,
/// switched to rustls after its 220 to STARTTLS; what it received goes to `state`.
fn serve(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    at_dot: AtDot,
    tls: Option<Arc<rustls::ServerConfig>>,
    chunking: bool,
) {
    let _ = stream.set_read_timeout(Some(WAIT));
    let Ok(raw) = stream.try_clone() else { return };
    let mut wire: Box<dyn Wire> = Box::new(stream);
    let mut hop = ScriptedHop::offering(&["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 0"]);
    hop.starttls = tls.is_some();
    if chunking {
        hop.ehlo.push("CHUNKING");
    }
    match at_dot {
        AtDot::Accept => {}
        AtDot::Reply(reply) => hop.dot_reply = Some(reply),
        AtDot::Close => hop.close_at_dot = true,
        AtDot::Silent => hop.silent_at_dot = true,
    }
    if wire.write_all(b"220 hop.test ESMTP test next hop\r\n").is_err() {
        return;
    }
    let (mut secured, mut buf) = (false, vec![0u8; 64 << 10]);
    while !stop.load(Ordering::Relaxed) {
        let n = match wire.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let answers = hop.receive(&buf[..n]);
        {
            let mut state = state.lock().expect("lock");
            state.commands.append(&mut hop.commands);
            let bodies = std::mem::take(&mut hop.messages);
            let envelopes = hop.envelopes.drain(..).zip(hop.chunked.drain(..));
            for (body, ((mail_from, rcpt_to), chunked)) in bodies.into_iter().zip(envelopes) {
                if at_dot == AtDot::Accept {
                    state.messages.push(Message { mail_from, rcpt_to, wire_body: body, tls: secured, chunked });
                }
            }
            if hop.injected {
                // a client must wait for the 220 (RFC 3207 §4)
                state.commands.push("(pipelined after STARTTLS)".into());
                return;
            }
        }
        if wire.write_all(&answers).and_then(|()| wire.flush()).is_err() || hop.closing {
            return;
        }
        if std::mem::take(&mut hop.tls_now) {
            let (Some(config), Ok(sock)) = (tls.as_ref(), raw.try_clone()) else { return };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else { return };
            wire = Box::new(rustls::StreamOwned::new(conn, sock));
            secured = true;
        }
    }
}
