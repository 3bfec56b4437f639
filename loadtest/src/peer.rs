//! One peer's conversation, sans-IO: what it sends, what it expects, and what came of it.
//! The engine moves the bytes; every reply is checked here.
//!
//! ```text
//!  deny:   connect ─► the deny line (first bytes, no banner) ─► EOF ─► Denied
//!  relay:  connect ─► 220 ─EHLO─► 250 ─MAIL─► 250 ─RCPT─► 250 ─DATA─► 354 ─body.─► 250
//!          (--tls: after EHLO's 250, STARTTLS ─► 220 ─► the engine's handshake ─► EHLO
//!           again under TLS ─► 250 ─MAIL─► ...)
//!                                   ▲  (--pipeline: MAIL RCPT DATA in one write,  │ more
//!                                   │   three replies; --bdat: BDAT <n> LAST and   │ messages
//!                                   │   the message in place of DATA, 354, body.)  │
//!                                   └──────────────────────────────────────────────┘
//!                                  last message ─QUIT─► 221 ─► EOF ─► Done
//! ```

use std::hash::Hasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::TlsClient;

/// What a peer does.
#[derive(Clone, Debug)]
pub enum Script {
    /// Expects one line starting with `expect`, then the close; never a banner.
    Deny {
        expect: String,
    },
    Relay(Relay),
    /// RCPTs for unknown users of `domain` until dropped, again until the first line is
    /// the ban line (`ban_line`), once more to see it in force (see `attack`).
    Dictionary {
        domain: String,
        ban_line: String,
        /// Whitelisted: dropped, never banned (see `attack`).
        whitelisted: bool,
    },
    /// Silent after the banner, or (`trickle`) one byte a second.
    Slow {
        trickle: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Relay {
    pub pipeline: bool,
    /// Each message in one `BDAT <n> LAST` chunk (CHUNKING) in place of DATA.
    pub bdat: bool,
    /// STARTTLS after the first EHLO.
    pub tls: Option<TlsClient>,
    pub messages: u32,
    /// `RCPT TO:<rcpt>\r\n`, made once.
    rcpt_line: Vec<u8>,
    /// What follows each message's own header lines, made once (a message costs a
    /// header's formatting and a copy, no allocation): as sent (dot-stuffed), and the
    /// content it stands for (what the sink hashes).
    tail_wire: Vec<u8>,
    tail_content: Vec<u8>,
    /// Messages are hashed (a sink checks them).
    hashed: bool,
}

impl Relay {
    /// Messages of about `body_size` bytes of content to `rcpt`.
    pub fn new(rcpt: &str, pipeline: bool, messages: u32, body_size: usize) -> Self {
        let mut tail_content = b"\r\n.a line that starts with a dot\r\n".to_vec();
        let filler = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
        while tail_content.len() + HEADER_ROOM < body_size {
            tail_content.extend_from_slice(filler);
        }
        let mut tail_wire = Vec::with_capacity(tail_content.len() + 8);
        for line in tail_content.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                tail_wire.push(b'.');
            }
            tail_wire.extend_from_slice(line);
        }
        let rcpt_line = format!("RCPT TO:<{rcpt}>\r\n").into_bytes();
        Relay { pipeline, bdat: false, tls: None, messages, rcpt_line, tail_wire, tail_content, hashed: true }
    }

    /// Messages in BDAT chunks.
    pub fn in_chunks(self) -> Self {
        Relay { bdat: true, ..self }
    }

    /// Appends message `id` as one last chunk, `BDAT <n> LAST` and its content as it is
    /// (nothing stuffed), to `out`; returns the hash of its content.
    pub fn chunk(&self, id: u64, out: &mut Vec<u8>) -> u64 {
        use std::io::Write;
        let header = format!("Subject: loadtest {id}\r\nX-Loadtest-Id: {id}\r\n");
        let _ = write!(out, "BDAT {} LAST\r\n", header.len() + self.tail_content.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.tail_content);
        if !self.hashed {
            return 0;
        }
        let mut h = std::hash::DefaultHasher::new();
        h.write(header.as_bytes());
        h.write(&self.tail_content);
        h.finish()
    }

    /// Over STARTTLS.
    pub fn with_tls(self, tls: TlsClient) -> Self {
        Relay { tls: Some(tls), ..self }
    }

    /// No sink checks the messages: no hash (0 stands in).
    pub fn unhashed(self) -> Self {
        Relay { hashed: false, ..self }
    }

    /// Appends message `id`, dot-stuffed for the wire (a line starting with a dot
    /// included, to check the stuffing end to end), to `out`; returns the hash of its
    /// content as the sink will compute it (header lines have no leading dot: the same
    /// bytes on the wire and in the content).
    pub fn message(&self, id: u64, out: &mut Vec<u8>) -> u64 {
        use std::io::Write;
        let start = out.len();
        let _ = write!(out, "Subject: loadtest {id}\r\nX-Loadtest-Id: {id}\r\n");
        if !self.hashed {
            out.extend_from_slice(&self.tail_wire);
            return 0;
        }
        let mut h = std::hash::DefaultHasher::new();
        h.write(&out[start..]);
        h.write(&self.tail_content);
        out.extend_from_slice(&self.tail_wire);
        h.finish()
    }
}

/// About the length of a message's own header lines.
const HEADER_ROOM: usize = 64;

/// Why a conversation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// A reply that is not the one expected (a banner to a denied peer, a 5xx...).
    WrongReply,
    /// The server closed before the conversation ended.
    Closed,
    /// A reply line that is not SMTP.
    Malformed,
    /// An attacking address was never banned.
    NeverBanned,
    /// A whitelisted address got the ban line.
    WhitelistedBanned,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::WrongReply => "wrong_reply",
            Failure::Closed => "closed_early",
            Failure::Malformed => "malformed_reply",
            Failure::NeverBanned => "never_banned",
            Failure::WhitelistedBanned => "whitelisted_banned",
        }
    }
}

/// What the engine records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The deny line came, as expected, this long after the connect started.
    Denied(Duration),
    /// A message got 250 after its final dot: its id, its content's hash, and the time
    /// from MAIL to that reply.
    Accepted { id: u64, hash: u64, latency: Duration },
    /// A message got something else (4xx/5xx) to one of its commands.
    Refused { code: u16 },
    /// An attacking address's conversation was dropped (421), this long after its
    /// first connection.
    Dropped(Duration),
    /// An attacking address got the ban line, this long after its first connection.
    Banned(Duration),
    /// An attacking address got the ban line on its first connection, before it failed
    /// (a prefix ban: others in its /24 earned it).
    BannedOnSight,
    /// A later connection of a banned address got the ban line again.
    Confirmed,
    /// A slow peer was cut off (421), this long after it connected.
    CutOff(Duration),
    /// A whitelisted attacker still got the banner after enough failures for a ban.
    Spared,
    /// A STARTTLS handshake finished; `resumed`: with a ticket of an earlier connection.
    Handshake { resumed: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Deny,
    Banner,
    Ehlo,
    /// STARTTLS sent, its 220 awaited.
    StartTls,
    /// The engine is doing the handshake.
    Handshake,
    Mail,
    Rcpt,
    Data,
    Dot,
    Rset,
    Quit,
    Finished,
}

pub struct Peer {
    script: Arc<Script>,
    state: State,
    started: Instant,
    message_started: Instant,
    /// Received, not yet a whole line.
    line: Vec<u8>,
    /// The reply being received (multi-line): its code.
    out: Vec<u8>,
    sent: usize,
    /// Messages left to send.
    left: u32,
    /// This peer's next message id; the engine gives each peer its own range.
    next_id: u64,
    current: (u64, u64),
    /// STARTTLS was answered 220: the engine starts the handshake.
    start_tls: bool,
    /// The handshake is done (EHLO again, then mail).
    under_tls: bool,
    pub events: Vec<Event>,
}

impl Peer {
    pub fn new(script: Arc<Script>, first_id: u64, now: Instant) -> Self {
        let mut peer = Peer {
            script,
            state: State::Finished,
            started: now,
            message_started: now,
            line: Vec::new(),
            out: Vec::new(),
            sent: 0,
            left: 0,
            next_id: first_id,
            current: (0, 0),
            start_tls: false,
            under_tls: false,
            events: Vec::new(),
        };
        peer.restart(first_id, now);
        peer
    }

    /// The same script again, on a new connection, keeping the buffers (no allocation
    /// per connection once they have grown).
    pub fn restart(&mut self, first_id: u64, now: Instant) {
        (self.state, self.left) = match &*self.script {
            Script::Deny { .. } => (State::Deny, 0),
            Script::Relay(r) => (State::Banner, r.messages.max(1)),
            Script::Dictionary { .. } | Script::Slow { .. } => (State::Finished, 0),
        };
        self.started = now;
        self.message_started = now;
        self.line.clear();
        self.out.clear();
        self.sent = 0;
        self.next_id = first_id;
        self.current = (0, 0);
        self.start_tls = false;
        self.under_tls = false;
        self.events.clear();
    }

    /// STARTTLS was answered: true once, when the engine must start the handshake.
    pub fn take_starttls(&mut self) -> bool {
        std::mem::take(&mut self.start_tls)
    }

    /// The engine's handshake is done: greet again, under TLS.
    pub fn tls_ready(&mut self, resumed: bool) {
        self.events.push(Event::Handshake { resumed });
        self.under_tls = true;
        self.out.extend_from_slice(b"EHLO loadtest.test\r\n");
        self.state = State::Ehlo;
    }

    /// Bytes to go before anything it says (a PROXY header).
    pub fn preface(&mut self, bytes: &[u8]) {
        self.out.splice(self.sent..self.sent, bytes.iter().copied());
    }

    /// Bytes to send.
    pub fn output(&self) -> &[u8] {
        &self.out[self.sent..]
    }

    pub fn sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    /// The conversation is over: only the close is left to wait for.
    pub fn finished(&self) -> bool {
        self.state == State::Finished
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// A relaying peer's QUIT got its 221: nothing is left to check.
    pub fn quit_answered(&self) -> bool {
        self.state == State::Finished && matches!(*self.script, Script::Relay(_))
    }

    /// Bytes from the server; `Err` ends the conversation as failed.
    pub fn input(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Failure> {
        while let Some(lf) = bytes.iter().position(|&b| b == b'\n') {
            let whole = &bytes[..lf];
            bytes = &bytes[lf + 1..];
            if self.line.is_empty() {
                // the usual case: the line came whole, no copy
                self.reply_line(whole, now)?;
            } else {
                self.line.extend_from_slice(whole);
                let mut line = std::mem::take(&mut self.line);
                let replied = self.reply_line(&line, now);
                line.clear();
                self.line = line;
                replied?;
            }
        }
        if self.line.len() + bytes.len() > 4096 {
            return Err(Failure::Malformed);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// The server closed the connection.
    pub fn eof(&mut self) -> Result<(), Failure> {
        match self.state {
            State::Finished => Ok(()),
            _ => Err(Failure::Closed),
        }
    }

    fn reply_line(&mut self, line: &[u8], now: Instant) -> Result<(), Failure> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.state == State::Deny {
            let Script::Deny { expect } = &*self.script else { return Err(Failure::WrongReply) };
            if !line.starts_with(expect.as_bytes()) {
                return Err(Failure::WrongReply);
            }
            self.events.push(Event::Denied(now.saturating_duration_since(self.started)));
            self.state = State::Finished;
            return Ok(());
        }
        let code = line.get(..3).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code.filter(|c| (200..600).contains(c)) else { return Err(Failure::Malformed) };
        match line.get(3) {
            Some(b'-') => return Ok(()), // more lines of this reply
            None | Some(b' ') => {}
            Some(_) => return Err(Failure::Malformed),
        }
        self.reply(code, now)
    }

    /// A whole reply, to the command (or greeting) it answers.
    fn reply(&mut self, code: u16, now: Instant) -> Result<(), Failure> {
        let Script::Relay(relay) = &*self.script else { return Err(Failure::WrongReply) };
        let pipeline = relay.pipeline;
        let expected = match self.state {
            State::Banner | State::StartTls => 220,
            State::Ehlo | State::Mail | State::Rcpt | State::Dot | State::Rset => 250,
            State::Data => 354,
            State::Quit => 221,
            State::Deny | State::Handshake | State::Finished => return Err(Failure::WrongReply),
        };
        if code != expected {
            if matches!(self.state, State::Banner | State::Ehlo | State::StartTls | State::Quit | State::Rset)
                || code < 400
            {
                return Err(Failure::WrongReply);
            }
            // a refused transaction: one event, the batch's other replies awaited, then RSET
            if self.current.0 != u64::MAX {
                self.events.push(Event::Refused { code });
                self.current.0 = u64::MAX;
            }
            match self.state {
                State::Mail if pipeline => self.state = State::Rcpt,
                State::Rcpt if pipeline => self.state = if relay.bdat { State::Dot } else { State::Data },
                _ => return self.after_message(true),
            }
            return Ok(());
        }
        match self.state {
            State::Banner => {
                self.out.extend_from_slice(b"EHLO loadtest.test\r\n");
                self.state = State::Ehlo;
            }
            State::Ehlo if relay.tls.is_some() && !self.under_tls => {
                self.out.extend_from_slice(b"STARTTLS\r\n");
                self.state = State::StartTls;
            }
            State::StartTls => {
                self.start_tls = true;
                self.state = State::Handshake;
            }
            State::Ehlo => self.start_message(now),
            State::Mail if pipeline => self.state = State::Rcpt,
            State::Mail => self.send_state(State::Rcpt),
            State::Rcpt if pipeline => self.state = if relay.bdat { State::Dot } else { State::Data },
            State::Rcpt if relay.bdat => {
                self.current.1 = relay.chunk(self.current.0, &mut self.out);
                self.state = State::Dot;
            }
            State::Rcpt => self.send_state(State::Data),
            State::Data if self.current.0 == u64::MAX => {
                // a 354 after a refused MAIL or RCPT of the batch
                return Err(Failure::WrongReply);
            }
            State::Data => {
                self.current.1 = relay.message(self.current.0, &mut self.out);
                self.out.extend_from_slice(b".\r\n");
                self.state = State::Dot;
            }
            State::Dot => {
                let latency = now.saturating_duration_since(self.message_started);
                self.events.push(Event::Accepted { id: self.current.0, hash: self.current.1, latency });
                return self.after_message(false);
            }
            State::Rset => self.start_message(now),
            State::Quit => self.state = State::Finished,
            State::Deny | State::Handshake | State::Finished => {}
        }
        Ok(())
    }

    /// The message ended; the next one, or QUIT. After a refusal a transaction may be
    /// open at the server: RSET first.
    fn after_message(&mut self, refused: bool) -> Result<(), Failure> {
        self.left = self.left.saturating_sub(1);
        if self.left == 0 {
            self.out.extend_from_slice(b"QUIT\r\n");
            self.state = State::Quit;
        } else if refused {
            self.out.extend_from_slice(b"RSET\r\n");
            self.state = State::Rset;
        } else {
            self.start_message(Instant::now());
        }
        Ok(())
    }

    fn start_message(&mut self, now: Instant) {
        let Script::Relay(relay) = &*self.script else { return };
        self.current = (self.next_id, 0);
        self.next_id += 1;
        self.message_started = now;
        let mail = b"MAIL FROM:<loadtest@loadtest.test>\r\n";
        self.out.extend_from_slice(mail);
        if relay.pipeline {
            self.out.extend_from_slice(&relay.rcpt_line);
            if relay.bdat {
                self.current.1 = relay.chunk(self.current.0, &mut self.out);
            } else {
                self.out.extend_from_slice(b"DATA\r\n");
            }
        }
        self.state = State::Mail;
    }

    fn send_state(&mut self, next: State) {
        let Script::Relay(relay) = &*self.script else { return };
        match next {
            State::Rcpt => self.out.extend_from_slice(&relay.rcpt_line),
            State::Data => self.out.extend_from_slice(b"DATA\r\n"),
            _ => {}
        }
        self.state = next;
    }
}

/// The hash both ends compute over a message's content.
pub fn content_hash(content: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(content);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(pipeline: bool, messages: u32) -> Peer {
        let script = Script::Relay(Relay::new("u@example.com", pipeline, messages, 200));
        Peer::new(Arc::new(script), 7, Instant::now())
    }

    fn take(p: &mut Peer) -> String {
        let s = String::from_utf8_lossy(p.output()).into_owned();
        p.sent(s.len());
        s
    }

    #[test]
    fn a_relay_conversation_checks_each_reply() {
        let now = Instant::now();
        let mut p = relay(false, 1);
        p.input(b"220 mx ESMTP\r\n", now).unwrap();
        assert_eq!(take(&mut p), "EHLO loadtest.test\r\n");
        p.input(b"250-mx\r\n250 PIPELINING\r\n", now).unwrap();
        assert_eq!(take(&mut p), "MAIL FROM:<loadtest@loadtest.test>\r\n");
        p.input(b"250 ok\r\n", now).unwrap();
        assert_eq!(take(&mut p), "RCPT TO:<u@example.com>\r\n");
        p.input(b"250 ok\r\n", now).unwrap();
        assert_eq!(take(&mut p), "DATA\r\n");
        p.input(b"354 go\r\n", now).unwrap();
        let body = take(&mut p);
        assert!(body.contains("X-Loadtest-Id: 7\r\n") && body.contains("\r\n..a line") && body.ends_with("\r\n.\r\n"));
        p.input(b"250 queued\r\n", now).unwrap();
        assert_eq!(take(&mut p), "QUIT\r\n");
        assert!(matches!(p.events[..], [Event::Accepted { id: 7, .. }]));
        assert_eq!(p.eof(), Err(Failure::Closed), "before 221");
        p.input(b"221 bye\r\n", now).unwrap();
        assert!(p.finished() && p.eof().is_ok());
    }

    #[test]
    fn a_message_in_one_last_chunk_hashes_as_its_data_twin() {
        let now = Instant::now();
        let script = Relay::new("u@example.com", true, 1, 200).in_chunks();
        let mut p = Peer::new(Arc::new(Script::Relay(script.clone())), 7, now);
        p.input(b"220 mx\r\n250 mx\r\n", now).unwrap();
        let sent = take(&mut p);
        let (commands, content) = sent.split_once("BDAT ").expect("a chunk");
        assert_eq!(commands, "EHLO loadtest.test\r\nMAIL FROM:<loadtest@loadtest.test>\r\nRCPT TO:<u@example.com>\r\n");
        let (size, content) = content.split_once(" LAST\r\n").expect("LAST");
        assert_eq!(size.parse::<usize>().unwrap(), content.len(), "the chunk is exactly its octets");
        assert!(content.contains("\r\n.a line that starts with a dot\r\n"), "nothing stuffed");
        p.input(b"250 ok\r\n250 ok\r\n250 queued\r\n", now).unwrap();
        let Event::Accepted { hash, .. } = p.events[0] else { panic!("{:?}", p.events) };
        assert_eq!(hash, content_hash(content.as_bytes()), "what a sink hashes of the content");
        assert_eq!(take(&mut p), "QUIT\r\n");
    }

    #[test]
    fn pipelined_batches_and_refusals() {
        let now = Instant::now();
        let mut p = relay(true, 2);
        p.input(b"220 mx\r\n250 mx\r\n", now).unwrap();
        assert_eq!(
            take(&mut p),
            "EHLO loadtest.test\r\nMAIL FROM:<loadtest@loadtest.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
        );
        p.input(b"250 ok\r\n550 no such user\r\n503 no recipients\r\n", now).unwrap();
        assert_eq!(p.events, [Event::Refused { code: 550 }], "one event for the message");
        assert_eq!(take(&mut p), "RSET\r\n");
        p.input(b"250 ok\r\n", now).unwrap();
        assert!(take(&mut p).starts_with("MAIL FROM:"), "the next message");
        assert_eq!(p.input(b"250 ok\r\n250 ok\r\n354 go\r\n", now), Ok(()));
        let mut q = relay(false, 1);
        assert_eq!(q.input(b"554 go away\r\n", now), Err(Failure::WrongReply));
        let mut d = Peer::new(Arc::new(Script::Deny { expect: "530".into() }), 0, now);
        assert_eq!(d.input(b"220 banner\r\n", now), Err(Failure::WrongReply), "a denied peer never gets a banner");
        let mut d = Peer::new(Arc::new(Script::Deny { expect: "530".into() }), 0, now);
        d.input(b"530 5.7.1 denied\r\n", now).unwrap();
        assert!(d.finished() && matches!(d.events[..], [Event::Denied(_)]));
    }

    #[test]
    fn messages_are_stuffed_and_hashed_unstuffed() {
        let mut wire = Vec::new();
        let hash = Relay::new("u@example.com", false, 1, 1000).message(3, &mut wire);
        assert!(wire.len() >= 1000 && wire.len() < 1100, "{}", wire.len());
        assert!(wire.windows(6).any(|w| w == b"\r\n..a "), "the dot line is stuffed");
        let unstuffed: Vec<u8> =
            wire.split_inclusive(|&b| b == b'\n').flat_map(|l| l.strip_prefix(b".").unwrap_or(l).to_vec()).collect();
        assert_eq!(content_hash(&unstuffed), hash);
    }
}
