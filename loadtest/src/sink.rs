//! The next hop the relay scenarios relay to: an SMTP server on loopback that takes every
//! message, finds its `X-Loadtest-Id`, hashes its content as the peer wrote it (the
//! `Received:` header the relay added taken off, the dot-stuffing undone) and counts it.
//! Recipients whose local part starts with `unknown` do not exist (550 5.1.1), for the
//! dictionary attacks. A thread per connection: a relay keeps few, pooled, connections
//! to its next hop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::peer::content_hash;

/// What the sink received.
#[derive(Debug, Default)]
pub struct Received {
    /// By message id: the content's hash, and how many times it came.
    pub messages: HashMap<u64, (u64, u32)>,
    /// Messages without an `X-Loadtest-Id` header.
    pub unknown: u64,
}

pub struct Sink {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    /// Messages taken (a progress figure; `received` is the record).
    pub count: Arc<AtomicU64>,
}

impl Sink {
    /// Listens on `addr` (port 0: any). `drop_every`: answer 250 to every such message but
    /// forget it, as a faulty next hop would (0: never), for the harness's own test.
    /// `xclient`: offers XCLIENT (Postfix's) and, after one, greets again as Postfix does.
    pub fn start(addr: SocketAddr, drop_every: u64, xclient: bool) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (r, s, c) = (received.clone(), stop.clone(), count.clone());
        std::thread::Builder::new().name("sink".into()).spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (r, c) = (r.clone(), c.clone());
                let _ = std::thread::Builder::new().name("sink-conn".into()).spawn(move || {
                    let _ = serve(stream, &r, &c, drop_every, xclient);
                });
            }
        })?;
        Ok(Sink { addr, received, stop, count })
    }

    /// What was received so far.
    pub fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn serve(
    stream: TcpStream,
    received: &Mutex<Received>,
    count: &AtomicU64,
    drop_every: u64,
    xclient: bool,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    out.write_all(b"220 sink.loadtest ESMTP\r\n")?;
    let mut line = Vec::new();
    let mut replies = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let verb = line.split(|&b| b == b' ' || b == b'\r').next().unwrap_or_default().to_ascii_uppercase();
        match verb.as_slice() {
            b"EHLO" => {
                replies.extend_from_slice(b"250-sink.loadtest\r\n250-PIPELINING\r\n250-8BITMIME\r\n");
                if xclient {
                    replies.extend_from_slice(b"250-XCLIENT NAME ADDR PORT PROTO HELO\r\n");
                }
                replies.extend_from_slice(b"250 SIZE 0\r\n");
            }
            b"XCLIENT" if xclient => replies.extend_from_slice(b"220 sink.loadtest ESMTP\r\n"),
            // the users a dictionary attack guesses do not exist
            b"RCPT" if line.windows(8).any(|w| w.eq_ignore_ascii_case(b"<unknown")) => {
                replies.extend_from_slice(b"550 5.1.1 no such user here\r\n");
            }
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => replies.extend_from_slice(b"250 2.0.0 ok\r\n"),
            b"DATA" => {
                out.write_all(&replies)?;
                replies.clear();
                out.write_all(b"354 go ahead\r\n")?;
                let Some(content) = body(&mut reader)? else { return Ok(()) };
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                if drop_every == 0 || !n.is_multiple_of(drop_every) {
                    record(&content, received);
                }
                replies.extend_from_slice(b"250 2.0.0 queued\r\n");
            }
            b"QUIT" => {
                replies.extend_from_slice(b"221 2.0.0 bye\r\n");
                out.write_all(&replies)?;
                return Ok(());
            }
            _ => replies.extend_from_slice(b"500 5.5.2 unknown\r\n"),
        }
        // answer once the pipelined commands read so far are all answered
        if reader.buffer().is_empty() {
            out.write_all(&replies)?;
            replies.clear();
        }
    }
}

/// The body up to the final dot, unstuffed; `None` when the connection ends first.
fn body(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut content = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" {
            return Ok(Some(content));
        }
        content.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
    }
}

/// Counts a message by its id, hashing it without the trace headers a relay put first.
fn record(content: &[u8], received: &Mutex<Received>) {
    let mut start = 0;
    // leading `Received:` headers, with their folded continuation lines
    let mut in_received = false;
    for line in content.split_inclusive(|&b| b == b'\n') {
        let folded = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if line.starts_with(b"Received:") || (in_received && folded) {
            in_received = true;
            start += line.len();
        } else {
            break;
        }
    }
    let content = &content[start..];
    let id = content
        .split(|&b| b == b'\n')
        .take_while(|l| l != b"\r")
        .find_map(|l| l.strip_prefix(b"X-Loadtest-Id: "))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut r = received.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match id {
        Some(id) => {
            let entry = r.messages.entry(id).or_insert((content_hash(content), 0));
            entry.1 += 1;
        }
        None => r.unknown += 1,
    }
}
