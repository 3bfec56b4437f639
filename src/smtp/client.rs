//! The next-hop client, sans-IO: the other half of in-line relaying.
//!
//! ```text
//!  new() ─► Greeting ──220──► Hello ──250 to EHLO──┬──────────────────────────► Ready ◄─┐
//!              │               │ 5xx: HELO, then 250┘ (relay.tls "off", or not  │  commands and
//!              │               │                     offered and "opportunistic") └─┘  data, one
//!              │               │ 250, STARTTLS offered, relay.tls not "off"            reply each
//!              │               ▼                                                      ▲
//!              │            StartTls ──220──► Handshake ──tls_started()──► Hello ─────┘
//!              │               │ refused: "opportunistic" goes on in clear (Ready)     (EHLO again,
//!              │               │          "required" fails                              under TLS)
//!              └─ other ─┬─────┴─ other ─┐   (also: "required" and no STARTTLS offered; bytes
//!                        ▼               ▼    after the 220 in the same read, never executed)
//!                      Failed (any malformed, unexpected or unsolicited reply too)
//! ```
//!
//! Bytes in with [`Upstream::handle_input`], events out with [`Upstream::poll_event`]:
//! `Ready` once the greeting and EHLO are done, then one `Reply` per command, in order.
//! Bytes to send accumulate in an output buffer the driver drains, as for the server
//! session. An upstream in `Ready` with nothing pending can serve another transaction,
//! so it can go back to its worker's pool. In `Handshake` the connection's TLS layer
//! (`conn::tls`) takes over the bytes ([`Upstream::take_starttls`]) and reports the end
//! of the handshake with [`Upstream::tls_started`]; the upstream never sees ciphertext.

use std::collections::VecDeque;
use std::io::Write as _;

use super::outbuf::OutBuf;
use crate::config::RelayTls;

/// Longest next-hop reply line accepted (RFC 5321 says 512; be lenient with the inside).
pub const MAX_REPLY_LINE: usize = 2048;
/// Most lines one reply may have.
pub const MAX_REPLY_LINES: usize = 64;

/// A reply of the next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// Appends the reply for our peer: the next hop's code and text, reduced to
    /// printable ASCII. We offer ENHANCEDSTATUSCODES, so a 2xx, 4xx or 5xx line without
    /// an enhanced code gets its class's `X.0.0` (RFC 2034 §4), the text kept.
    pub fn render(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let class = self.code / 100;
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(out, "{}{sep}", self.code);
            if matches!(class, 2 | 4 | 5) && !starts_with_enhanced_code(line, class) {
                let _ = write!(out, "{class}.0.0 ");
            }
            out.extend(line.bytes().map(|b| if (32..127).contains(&b) { b } else { b'?' }));
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// `text` starts with an enhanced status code of `class` (`class.subject.detail`, each
/// number 1-3 digits), then a space or the end.
fn starts_with_enhanced_code(text: &str, class: u16) -> bool {
    let code = text.split(' ').next().unwrap_or("");
    let mut parts = code.split('.');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    parts.next() == Some(class.to_string().as_str())
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_none()
}

/// What the next hop offered in its EHLO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// `SIZE n`; `Some(0)` for SIZE without a limit.
    pub size: Option<u64>,
    pub starttls: bool,
    /// RFC 3030: takes BDAT.
    pub chunking: bool,
    /// RFC 3461: takes DSN parameters.
    pub dsn: bool,
    /// Postfix's XCLIENT: the attributes it takes (`attrs::*`); `None`: not offered.
    pub xclient: Option<u8>,
    /// Postfix's XFORWARD: the attributes it takes; `None`: not offered.
    pub xforward: Option<u8>,
}

/// The client attributes XCLIENT and XFORWARD carry, as a next hop lists them.
pub mod attrs {
    pub const NAME: u8 = 1;
    pub const ADDR: u8 = 2;
    pub const PORT: u8 = 4;
    pub const PROTO: u8 = 8;
    pub const HELO: u8 = 16;

    /// The attributes named in an EHLO line's words after the keyword.
    pub fn parse<'a>(words: impl Iterator<Item = &'a str>) -> u8 {
        words
            .map(|w| match w.to_ascii_uppercase().as_str() {
                "NAME" => NAME,
                "ADDR" => ADDR,
                "PORT" => PORT,
                "PROTO" => PROTO,
                "HELO" => HELO,
                _ => 0,
            })
            .fold(0, |a, b| a | b)
    }
}

/// The command a reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Mail,
    Rcpt,
    Data,
    /// The final dot after the body.
    Dot,
    /// A BDAT chunk but the last, its octets after it.
    Bdat,
    /// `BDAT n LAST`: its reply is the one to the whole message.
    BdatLast,
    /// XFORWARD: the client's attributes for the next transaction.
    Xforward,
    Rset,
    Quit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Greeted and EHLO done: commands may be sent.
    Ready,
    Reply(Command, Reply),
    /// The next hop broke the protocol or refused us; close the connection.
    Failed(ProtocolFault),
    /// The next hop cannot give the TLS `relay.tls = "required"` asks for (a fault of the
    /// operator's setup, worth a warning); close the connection.
    NoTls(NoTls),
}

/// How a next hop broke the protocol, or refused us before any command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolFault {
    #[error("reply line too long")]
    LineTooLong,
    #[error("malformed reply")]
    Malformed,
    #[error("malformed multi-line reply")]
    MalformedMultiLine,
    /// A reply to no command.
    #[error("unsolicited reply {0}")]
    Unsolicited(u16),
    /// Its greeting, or its answer to our EHLO or HELO.
    #[error("refused us with {code} {text}")]
    RefusedUs { code: u16, text: String },
    /// Bytes behind its 220 to STARTTLS, before the handshake: an injection.
    #[error("sent more after its 220 to STARTTLS")]
    AfterStartTls,
}

/// Why a next hop gives no TLS where `relay.tls = "required"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoTls {
    #[error("does not offer STARTTLS")]
    NotOffered,
    #[error("knows no EHLO, so no STARTTLS")]
    NoEhlo,
    #[error("refused STARTTLS: {code} {text}")]
    Refused { code: u16, text: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Hello {
        extended: bool,
    },
    /// STARTTLS sent, its reply awaited.
    StartTls,
    /// 220 to STARTTLS: the TLS layer does the handshake.
    Handshake,
    /// XCLIENT sent: the next hop greets again (220), then EHLO again when `ehlo_again`.
    Xclient {
        ehlo_again: bool,
    },
    Ready,
    Failed,
}

#[derive(Debug)]
pub struct Upstream {
    state: State,
    hostname: String,
    out: OutBuf,
    /// The reply line being received.
    line: Vec<u8>,
    /// The reply being received: its code and the lines so far.
    reply: Option<Reply>,
    pending: VecDeque<Command>,
    events: VecDeque<Progress>,
    ext: Extensions,
    /// `[relay] tls`: whether to ask for STARTTLS.
    tls: RelayTls,
    /// The handshake is done: everything goes through TLS.
    secured: bool,
    /// Handshake entered, not yet taken by the TLS layer.
    starttls: bool,
}

impl Upstream {
    /// A client for a freshly connected next hop; `hostname` is our EHLO name, `tls` when
    /// to ask for STARTTLS.
    pub fn new(hostname: &str, tls: RelayTls) -> Self {
        Upstream {
            tls,
            secured: false,
            starttls: false,
            state: State::Greeting,
            hostname: hostname.to_owned(),
            out: OutBuf::default(),
            line: Vec::new(),
            reply: None,
            pending: VecDeque::new(),
            events: VecDeque::new(),
            ext: Extensions::default(),
        }
    }

    /// Bytes from the next hop.
    pub fn handle_input(&mut self, mut data: &[u8]) {
        while self.state != State::Failed && !data.is_empty() {
            let Some(lf) = memchr::memchr(b'\n', data) else {
                if self.line.len() + data.len() > MAX_REPLY_LINE {
                    return self.fail(ProtocolFault::LineTooLong);
                }
                self.line.extend_from_slice(data);
                return;
            };
            if self.line.len() + lf > MAX_REPLY_LINE {
                return self.fail(ProtocolFault::LineTooLong);
            }
            self.line.extend_from_slice(&data[..lf]);
            data = &data[lf + 1..];
            let mut line = std::mem::take(&mut self.line);
            self.reply_line(line.strip_suffix(b"\r").unwrap_or(&line));
            line.clear();
            self.line = line; // its capacity serves the next line
            if self.state == State::Handshake && !data.is_empty() {
                // the handshake starts with our hello: anything before it is an injection
                return self.fail(ProtocolFault::AfterStartTls);
            }
        }
    }

    /// One reply line, CRLF removed: `ddd-text` continues a reply, `ddd text` ends it.
    fn reply_line(&mut self, line: &[u8]) {
        let code = match line.get(..3).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse::<u16>().ok()) {
            Some(c) if (200..600).contains(&c) => c,
            _ => return self.fail(ProtocolFault::Malformed),
        };
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return self.fail(ProtocolFault::Malformed),
        };
        let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
        let reply = self.reply.get_or_insert_with(|| Reply { code, lines: Vec::new() });
        if reply.code != code || reply.lines.len() >= MAX_REPLY_LINES {
            return self.fail(ProtocolFault::MalformedMultiLine);
        }
        reply.lines.push(text);
        if last && let Some(reply) = self.reply.take() {
            self.complete(reply);
        }
    }

    fn complete(&mut self, reply: Reply) {
        match self.state {
            State::Greeting if reply.code == 220 => {
                self.state = State::Hello { extended: true };
                self.write_line(format!("EHLO {}", self.hostname).as_bytes());
            }
            State::Hello { extended: true } if reply.code == 250 => self.ready(&reply),
            // a server that knows no EHLO: say HELO instead (RFC 5321 §3.2)
            State::Hello { extended: true } if (500..600).contains(&reply.code) => {
                self.state = State::Hello { extended: false };
                self.write_line(format!("HELO {}", self.hostname).as_bytes());
            }
            State::Hello { extended: false } if reply.code == 250 => {
                if self.tls == RelayTls::Required {
                    return self.fail_tls(NoTls::NoEhlo);
                }
                self.state = State::Ready;
                self.events.push_back(Progress::Ready);
            }
            State::Xclient { ehlo_again: true } if reply.code == 220 => {
                // a new session at the next hop, for the client named: greet it again
                self.state = State::Hello { extended: true };
                self.write_line(format!("EHLO {}", self.hostname).as_bytes());
            }
            State::Xclient { ehlo_again: false } if reply.code == 220 => {
                // the client's HELO and PROTO stand at the next hop: ready for MAIL, with
                // what its EHLO offered
                self.state = State::Ready;
                self.events.push_back(Progress::Ready);
            }
            State::Xclient { .. } => {
                // refused (not authorized): on as ourselves
                tracing::debug!(code = reply.code, "next hop refused XCLIENT");
                self.state = State::Ready;
                self.events.push_back(Progress::Ready);
            }
            State::StartTls if reply.code == 220 => {
                self.state = State::Handshake;
                self.starttls = true;
            }
            State::StartTls if self.tls == RelayTls::Opportunistic => {
                // refused: on in clear, with what the first EHLO offered
                self.state = State::Ready;
                self.events.push_back(Progress::Ready);
            }
            State::StartTls => self.fail_tls(NoTls::Refused { code: reply.code, text: reply.lines.join(" ") }),
            State::Ready => match self.pending.pop_front() {
                Some(cmd) => self.events.push_back(Progress::Reply(cmd, reply)),
                None => self.fail(ProtocolFault::Unsolicited(reply.code)),
            },
            _ => self.fail(ProtocolFault::RefusedUs { code: reply.code, text: reply.lines.join(" ") }),
        }
    }

    /// The EHLO reply: what it offers, then STARTTLS or ready.
    fn ready(&mut self, ehlo: &Reply) {
        self.ext = Extensions::default();
        for line in ehlo.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => self.ext.pipelining = true,
                "8BITMIME" => self.ext.eight_bit_mime = true,
                "SMTPUTF8" => self.ext.smtputf8 = true,
                "SIZE" => self.ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "STARTTLS" => self.ext.starttls = true,
                "CHUNKING" => self.ext.chunking = true,
                "DSN" => self.ext.dsn = true,
                "XCLIENT" => self.ext.xclient = Some(attrs::parse(words)),
                "XFORWARD" => self.ext.xforward = Some(attrs::parse(words)),
                _ => {}
            }
        }
        tracing::debug!(ext = ?self.ext, "next hop said EHLO");
        match (self.tls, self.secured, self.ext.starttls) {
            (RelayTls::Off, ..) | (_, true, _) => {}
            (_, false, true) => {
                self.state = State::StartTls;
                return self.write_line(b"STARTTLS");
            }
            (RelayTls::Required, false, false) => return self.fail_tls(NoTls::NotOffered),
            (RelayTls::Opportunistic, false, false) => {}
        }
        self.state = State::Ready;
        self.events.push_back(Progress::Ready);
    }

    fn fail(&mut self, why: ProtocolFault) {
        self.starttls = false;
        if self.state != State::Failed {
            self.state = State::Failed;
            self.events.push_back(Progress::Failed(why));
        }
    }

    /// `relay.tls = "required"` and no TLS to be had.
    fn fail_tls(&mut self, why: NoTls) {
        self.state = State::Failed;
        self.events.push_back(Progress::NoTls(why));
    }

    fn write_line(&mut self, line: &[u8]) {
        self.out.push(line);
        self.out.push(b"\r\n");
    }

    /// Sends a command line (CRLF added); its reply will come as `Progress::Reply(cmd, _)`.
    pub fn command(&mut self, cmd: Command, line: &[u8]) {
        debug_assert_eq!(self.state, State::Ready);
        self.write_line(line);
        self.pending.push_back(cmd);
    }

    /// Sends XCLIENT (`line`, CRLF added): the next hop greets again, and is asked EHLO
    /// again when `ehlo_again` (else its greeting is enough: the line carried the client's
    /// HELO and PROTO, which its new session keeps); `Progress::Ready` comes when it is
    /// ready for MAIL (also when it refuses).
    pub fn xclient(&mut self, line: &[u8], ehlo_again: bool) {
        debug_assert_eq!(self.state, State::Ready);
        self.write_line(line);
        self.state = State::Xclient { ehlo_again };
    }

    /// Body bytes, already dot-stuffed, CRLF line ends only.
    pub fn send_data(&mut self, bytes: &[u8]) {
        self.out.push(bytes);
    }

    /// Where body bytes go: append them, already dot-stuffed, CRLF line ends only.
    pub fn data_sink(&mut self) -> &mut Vec<u8> {
        self.out.vec_mut()
    }

    /// Ends the body: the final dot, whose reply comes as `Progress::Reply(Command::Dot, _)`.
    pub fn end_data(&mut self) {
        self.out.push(b".\r\n");
        self.pending.push_back(Command::Dot);
    }

    /// The next hop said 220 to STARTTLS: true once, for the TLS layer to start the
    /// handshake (our hello is the next thing on the wire).
    pub fn take_starttls(&mut self) -> bool {
        std::mem::take(&mut self.starttls)
    }

    /// The handshake is done: EHLO again, under TLS (RFC 3207 §4.2: forget what the
    /// next hop said in clear).
    pub fn tls_started(&mut self) {
        if self.state == State::Handshake {
            self.secured = true;
            self.state = State::Hello { extended: true };
            self.write_line(format!("EHLO {}", self.hostname).as_bytes());
        }
    }

    /// The `[relay] tls` policy it was made under (pooled connections are kept apart by it).
    pub fn tls_policy(&self) -> RelayTls {
        self.tls
    }

    /// Everything goes through TLS.
    pub fn is_secured(&self) -> bool {
        self.secured
    }

    pub fn poll_event(&mut self) -> Option<Progress> {
        self.events.pop_front()
    }

    /// Bytes waiting to go to the next hop.
    pub fn output(&self) -> &[u8] {
        self.out.pending()
    }

    /// `n` bytes of the output went out.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
    }

    /// Bytes the output buffer holds, sent front included.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.out.held()
    }

    pub fn extensions(&self) -> Extensions {
        self.ext
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// A reply is expected: to the greeting, EHLO or a command sent.
    pub fn awaits_reply(&self) -> bool {
        match self.state {
            State::Greeting | State::Hello { .. } | State::StartTls | State::Handshake | State::Xclient { .. } => true,
            State::Ready => !self.pending.is_empty(),
            State::Failed => false,
        }
    }

    /// Ready, with no reply awaited and nothing left to send: reusable as it is.
    pub fn is_idle(&self) -> bool {
        self.state == State::Ready && self.pending.is_empty() && self.output().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_upstream(ehlo: &[u8]) -> Upstream {
        let mut u = Upstream::new("mx.test", RelayTls::Off);
        assert_eq!(u.output(), b"");
        u.handle_input(b"220 sink.test ESMTP\r\n");
        assert_eq!(u.output(), b"EHLO mx.test\r\n");
        u.consume_output(14);
        u.handle_input(ehlo);
        assert_eq!(u.poll_event(), Some(Progress::Ready));
        u
    }

    #[test]
    fn greeting_ehlo_and_extensions() {
        let u = ready_upstream(b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n");
        assert_eq!(
            u.extensions(),
            Extensions {
                pipelining: true,
                eight_bit_mime: true,
                smtputf8: true,
                size: Some(1000),
                starttls: false,
                chunking: false,
                dsn: false,
                xclient: None,
                xforward: None
            }
        );
        assert!(u.is_idle());
        let u = ready_upstream(b"250 sink.test\r\n");
        assert_eq!(u.extensions(), Extensions::default());
    }

    #[test]
    fn helo_when_ehlo_is_unknown() {
        let mut u = Upstream::new("mx.test", RelayTls::Off);
        u.handle_input(b"220 old.test\r\n");
        u.consume_output(u.output().len());
        u.handle_input(b"502 what?\r\n");
        assert_eq!(u.output(), b"HELO mx.test\r\n");
        u.handle_input(b"250 old.test\r\n");
        assert_eq!(u.poll_event(), Some(Progress::Ready));
    }

    #[test]
    fn replies_come_in_order_whatever_the_chunking() {
        let mut u = ready_upstream(b"250 sink.test\r\n");
        u.command(Command::Mail, b"MAIL FROM:<a@b.test>");
        u.command(Command::Rcpt, b"RCPT TO:<c@d.test>");
        assert_eq!(u.output(), b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n");
        for b in b"250 2.1.0 ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n" {
            u.handle_input(&[*b]);
        }
        assert_eq!(
            u.poll_event(),
            Some(Progress::Reply(Command::Mail, Reply { code: 250, lines: vec!["2.1.0 ok".into()] }))
        );
        let Some(Progress::Reply(Command::Rcpt, reply)) = u.poll_event() else { panic!() };
        assert_eq!(reply.lines, ["5.1.1 no such", "5.1.1 user"]);
        let mut out = Vec::new();
        reply.render(&mut out);
        assert_eq!(out, b"550-5.1.1 no such\r\n550 5.1.1 user\r\n");
        for (reply, rendered) in [
            ((451, &["Try again later"][..]), &b"451 4.0.0 Try again later\r\n"[..]),
            ((550, &["No such", "user here"]), b"550-5.0.0 No such\r\n550 5.0.0 user here\r\n"),
            ((550, &["5.1.1"]), b"550 5.1.1\r\n"),
            ((550, &["4.1.1 wrong class"]), b"550 5.0.0 4.1.1 wrong class\r\n"),
            ((550, &["5.1.1234 too long a detail"]), b"550 5.0.0 5.1.1234 too long a detail\r\n"),
            ((250, &["ok"]), b"250 2.0.0 ok\r\n"),
            ((354, &["go ahead"]), b"354 go ahead\r\n"),
        ] {
            let mut out = Vec::new();
            Reply { code: reply.0, lines: reply.1.iter().map(|l| l.to_string()).collect() }.render(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(rendered));
        }
        assert_eq!(u.poll_event(), None);
    }

    #[test]
    fn body_and_final_dot() {
        let mut u = ready_upstream(b"250 sink.test\r\n");
        u.command(Command::Data, b"DATA");
        u.handle_input(b"354 go ahead\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::Reply(Command::Data, Reply { code: 354, .. }))));
        u.consume_output(u.output().len());
        u.send_data(b"Subject: x\r\n\r\nhello\r\n");
        u.end_data();
        assert_eq!(u.output(), b"Subject: x\r\n\r\nhello\r\n.\r\n");
        assert!(!u.is_idle());
        u.consume_output(u.output().len());
        u.handle_input(b"250 queued\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::Reply(Command::Dot, Reply { code: 250, .. }))));
        assert!(u.is_idle());
    }

    /// A next hop offering STARTTLS, greeted and asked for it under `tls`.
    fn offered(tls: RelayTls, ehlo: &[u8]) -> Upstream {
        let mut u = Upstream::new("mx.test", tls);
        u.handle_input(b"220 sink.test ESMTP\r\n");
        u.consume_output(u.output().len());
        u.handle_input(ehlo);
        u
    }

    const WITH_STARTTLS: &[u8] = b"250-sink.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

    #[test]
    fn starttls_then_ehlo_again_under_tls() {
        for tls in [RelayTls::Opportunistic, RelayTls::Required] {
            let mut u = offered(tls, WITH_STARTTLS);
            assert_eq!(u.output(), b"STARTTLS\r\n");
            assert_eq!(u.poll_event(), None, "not ready in clear");
            u.consume_output(10);
            assert!(u.awaits_reply());
            u.handle_input(b"220 2.0.0 go ahead\r\n");
            assert!(u.take_starttls());
            assert!(!u.take_starttls(), "once");
            assert!(u.awaits_reply() && !u.is_ready() && u.output().is_empty());
            u.tls_started();
            assert!(u.is_secured());
            assert_eq!(u.output(), b"EHLO mx.test\r\n");
            u.consume_output(14);
            u.handle_input(b"250-sink.test\r\n250 8BITMIME\r\n");
            assert_eq!(u.poll_event(), Some(Progress::Ready));
            let ext = u.extensions();
            assert!(ext.eight_bit_mime && !ext.pipelining && !ext.starttls, "only what it said under TLS: {ext:?}");
        }
        let mut u = offered(RelayTls::Off, WITH_STARTTLS);
        assert_eq!(u.poll_event(), Some(Progress::Ready), "off: never asked");
        assert!(u.output().is_empty() && !u.is_secured());
    }

    #[test]
    fn without_starttls_opportunistic_goes_on_in_clear_and_required_fails() {
        let mut u = offered(RelayTls::Opportunistic, b"250 sink.test\r\n");
        assert_eq!(u.poll_event(), Some(Progress::Ready));
        assert!(!u.is_secured());
        let mut u = offered(RelayTls::Required, b"250 sink.test\r\n");
        assert!(
            matches!(u.poll_event(), Some(Progress::NoTls(w)) if w.to_string().contains("does not offer STARTTLS"))
        );
        // refused STARTTLS
        let mut u = offered(RelayTls::Opportunistic, WITH_STARTTLS);
        u.consume_output(10);
        u.handle_input(b"454 4.7.0 TLS not available\r\n");
        assert_eq!(u.poll_event(), Some(Progress::Ready));
        assert!(u.extensions().pipelining, "the first EHLO's extensions hold");
        let mut u = offered(RelayTls::Required, WITH_STARTTLS);
        u.consume_output(10);
        u.handle_input(b"454 4.7.0 TLS not available\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::NoTls(w)) if w.to_string().contains("refused STARTTLS: 454")));
        // a next hop that knows only HELO
        let mut u = Upstream::new("mx.test", RelayTls::Required);
        u.handle_input(b"220 old.test\r\n502 what?\r\n250 old.test\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::NoTls(w)) if w.to_string().contains("no STARTTLS")));
    }

    #[test]
    fn replies_injected_behind_the_220_are_never_read() {
        let mut u = offered(RelayTls::Required, WITH_STARTTLS);
        u.consume_output(10);
        u.handle_input(b"220 go ahead\r\n250 injected\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::Failed(w)) if w.to_string().contains("after its 220")));
        assert!(!u.take_starttls(), "no handshake on a failed connection");
        u.tls_started();
        assert!(!u.is_secured() && u.output().is_empty(), "a failed upstream stays failed");
    }

    #[test]
    fn protocol_violations_fail_once() {
        for (input, why) in [
            (&b"554 go away\r\n"[..], "refused us"),
            (b"22O typo\r\n", "malformed reply"),
            (b"220-a\r\n221 b\r\n", "malformed multi-line"),
            (b"hello\r\n", "malformed reply"),
        ] {
            let mut u = Upstream::new("mx.test", RelayTls::Off);
            u.handle_input(input);
            match u.poll_event() {
                Some(Progress::Failed(w)) => assert!(w.to_string().contains(why), "{w}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
            }
            u.handle_input(b"220 late\r\n");
            assert_eq!(u.poll_event(), None, "nothing after a failure");
        }
        let mut u = ready_upstream(b"250 sink.test\r\n");
        u.handle_input(b"421 shutting down\r\n");
        assert!(matches!(u.poll_event(), Some(Progress::Failed(w)) if w.to_string().contains("unsolicited")));
        let mut u = Upstream::new("mx.test", RelayTls::Off);
        u.handle_input(&vec![b'2'; MAX_REPLY_LINE + 1]);
        assert!(matches!(u.poll_event(), Some(Progress::Failed(w)) if w.to_string().contains("too long")));
    }
}
