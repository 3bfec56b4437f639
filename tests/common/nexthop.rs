//! A next hop for end-to-end tests: an SMTP server on 127.0.0.1 that records exactly
//! what it receives, and can be told to misbehave, or to offer STARTTLS (rustls).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

impl Message {
    /// The body with dot-stuffing undone.
    pub fn content(&self) -> Vec<u8> {
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
        Self::serving(at_dot, None)
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
        Self::serving(at_dot, Some(Arc::new(config)))
    }

    fn serving(at_dot: AtDot, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
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
                std::thread::spawn(move || serve(stream, s, st, at_dot, tls));
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

fn serve(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    at_dot: AtDot,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let _ = stream.set_read_timeout(Some(WAIT));
    let Ok(raw) = stream.try_clone() else { return };
    let mut reader: BufReader<Box<dyn Wire>> = BufReader::new(Box::new(stream));
    let say = |reader: &mut BufReader<Box<dyn Wire>>, line: &str| {
        let out = reader.get_mut();
        out.write_all(format!("{line}\r\n").as_bytes()).is_ok() && out.flush().is_ok()
    };
    if !say(&mut reader, "220 hop.test ESMTP test next hop") {
        return;
    }
    let (mut from, mut rcpts, mut secured) = (String::new(), Vec::new(), false);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        state.lock().expect("lock").commands.push(text.clone());
        let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let ok = match verb.as_str() {
            "EHLO" => {
                let starttls = if tls.is_some() && !secured { "250-STARTTLS\r\n" } else { "" };
                say(
                    &mut reader,
                    &format!("250-hop.test\r\n{starttls}250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 0"),
                )
            }
            "STARTTLS" => {
                let Some(config) = tls.as_ref().filter(|_| !secured) else {
                    say(&mut reader, "503 5.5.1 not now");
                    continue;
                };
                if !reader.buffer().is_empty() {
                    // a client must wait for the 220 (RFC 3207 §4)
                    state.lock().expect("lock").commands.push("(pipelined after STARTTLS)".into());
                    return;
                }
                say(&mut reader, "220 2.0.0 go ahead");
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else { return };
                let Ok(sock) = raw.try_clone() else { return };
                reader = BufReader::new(Box::new(rustls::StreamOwned::new(conn, sock)));
                secured = true;
                true
            }
            "MAIL" => {
                from = text.clone();
                rcpts.clear();
                say(&mut reader, "250 2.1.0 ok")
            }
            "RCPT" => {
                rcpts.push(text.clone());
                say(&mut reader, "250 2.1.5 ok")
            }
            "DATA" => {
                say(&mut reader, "354 go ahead");
                let Some(body) = read_body(&mut reader) else { return };
                match at_dot {
                    AtDot::Accept | AtDot::Reply(_) => {
                        if at_dot == AtDot::Accept {
                            let m = Message {
                                mail_from: from.clone(),
                                rcpt_to: rcpts.clone(),
                                wire_body: body,
                                tls: secured,
                            };
                            state.lock().expect("lock").messages.push(m);
                        }
                        let reply = match at_dot {
                            AtDot::Reply(r) => r,
                            _ => "250 2.0.0 queued",
                        };
                        say(&mut reader, reply)
                    }
                    AtDot::Close => return,
                    AtDot::Silent => {
                        let mut sink = [0u8; 1024];
                        while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
                        return;
                    }
                }
            }
            "RSET" | "NOOP" => say(&mut reader, "250 2.0.0 ok"),
            "QUIT" => {
                say(&mut reader, "221 bye");
                return;
            }
            _ => say(&mut reader, "500 unknown"),
        };
        if !ok {
            return;
        }
    }
}

/// Reads a body up to CRLF.CRLF; returns it with the CRLF before the dot.
fn read_body(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        if line == b".\r\n" {
            return Some(body);
        }
        body.extend_from_slice(&line);
    }
}
