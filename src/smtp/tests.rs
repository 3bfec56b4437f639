//! Session transcripts: the peer's bytes in, replies out, against a scripted next hop
//! that answers at the wire level and records every byte; the clock is the test's.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Reply, Upstream};
use super::outcome::{HopFault, Outcome, Undelivered};
use super::*;
use crate::config::Config;
use crate::datetime::UnixTime;
use crate::peer::PeerIp;
use crate::scripted::ScriptedHop;

struct Harness {
    session: Session,
    /// The next-hop connection the session is lent, as a connection keeps it.
    link: Link,
    now: Instant,
    hop: ScriptedHop,
    /// Connections asked for: (hop index, pooled ok).
    dials: Vec<(usize, bool)>,
    /// Hops whose connection attempts fail.
    unreachable: Vec<usize>,
    /// Idle connections, by next hop.
    pool: Vec<(std::net::SocketAddr, Upstream)>,
    released: usize,
    closed: usize,
    /// When a pooled connection is handed out, it turns out dead.
    stale_pool: bool,
    /// Most bytes one relay send takes (a kernel takes what fits in its socket buffer).
    relay_send_limit: usize,
}

const CONFIG: &str = "hostname = \"mx.test\"\n[smtp]\ncommand_timeout = \"60s\"\nmax_recipients = 5\n\
    max_message_size = \"1KiB\"\ndata_timeout = \"30s\"\nmin_data_rate = \"0\"\n\
    [relay]\ndomains = [\"example.com\", \".example.org\"]\nnext_hops = [\"127.0.0.1:2526\", \"127.0.0.1:2527\"]\nreply_timeout = \"20s\"\n";

impl Harness {
    fn new() -> Self {
        Harness::with_config(CONFIG)
    }

    fn with_config(text: &str) -> Self {
        let config = Config::parse(text, FsPath::new("t.toml"), FsPath::new(".")).unwrap();
        Harness::with_settings(Settings::new(&config, false))
    }

    /// A session of a server with `[tls]` (STARTTLS offered); `require_tls` as given.
    fn with_starttls(require_tls: bool) -> Self {
        let mut config = Config::parse(CONFIG, FsPath::new("t.toml"), FsPath::new(".")).unwrap();
        config.smtp.require_tls = require_tls;
        Harness::with_settings(Settings::new(&config, true))
    }

    /// A second session under the same settings (of one snapshot) as `h`.
    fn with_settings_of(h: &Harness) -> Self {
        Harness::with_arc(Arc::clone(&h.session.settings))
    }

    fn with_settings(settings: Settings) -> Self {
        Harness::with_arc(Arc::new(settings))
    }

    fn with_arc(settings: Arc<Settings>) -> Self {
        let now = Instant::now();
        let peer = PeerIp::new("192.0.2.7".parse().unwrap());
        let session = Session::new(
            settings,
            Arc::new(TransactionIds::new(UnixTime(1_795_894_760))),
            peer,
            now,
            UnixTime(1_795_894_760),
        );
        let hop = ScriptedHop::offering(&["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 100000"]);
        let mut h = Harness {
            session,
            link: Link::None,
            now,
            hop,
            dials: Vec::new(),
            unreachable: Vec::new(),
            pool: Vec::new(),
            released: 0,
            closed: 0,
            stale_pool: false,
            relay_send_limit: usize::MAX,
        };
        assert_eq!(h.drive(), "220 mx.test ESMTP mxgate\r\n");
        h
    }

    /// What the next hop's socket is wanted for.
    fn relay(&self) -> HopTransmit<'_> {
        self.link.poll(self.session.is_open(), &self.session.settings().relay.next_hops)
    }

    /// Lets go of the next-hop connection, as the connection does after `Release` or
    /// `Close`.
    fn detach(&mut self) -> Option<(Upstream, std::net::SocketAddr)> {
        let next_hops = &self.session.settings().relay.next_hops;
        self.link.detach(next_hops, self.session.wanted_link())
    }

    /// Serves both ports until neither has anything to do; returns what the peer got.
    fn drive(&mut self) -> String {
        let mut peer_got = Vec::new();
        for _ in 0..10_000 {
            let mut busy = false;
            if let Transmit::Send(b) = self.session.poll_transmit(&self.link) {
                peer_got.extend_from_slice(b);
                let n = b.len();
                self.session.consume_output(n);
                busy = true;
            }
            match self.link.poll(self.session.is_open(), &self.session.settings().relay.next_hops) {
                HopTransmit::Connect { addr, pooled_ok } => {
                    busy = true;
                    // CONFIG's next hops are ports 2526 and 2527
                    let hop = usize::from(addr.port() - 2526);
                    self.dials.push((hop, pooled_ok));
                    let pooled = self.pool.iter().rposition(|(a, _)| *a == addr);
                    if pooled_ok && let Some((_, up)) = pooled.map(|i| self.pool.remove(i)) {
                        self.link.attach(up, true);
                        self.session.link_attached(&mut self.link, self.now);
                        if self.stale_pool {
                            self.session.handle_relay_error(&mut self.link, self.now);
                        }
                    } else if self.unreachable.contains(&hop) {
                        self.link.dialing();
                        self.session.handle_relay_error(&mut self.link, self.now);
                    } else {
                        self.link.dialing();
                        self.link.attach(Upstream::new("mx.test", crate::config::RelayTls::Off), false);
                        self.session.link_attached(&mut self.link, self.now);
                        self.session.handle_relay_input(&mut self.link, b"220 hop.test ESMTP\r\n", self.now);
                    }
                }
                HopTransmit::Send(b) => {
                    busy = true;
                    let b = &b[..b.len().min(self.relay_send_limit)];
                    let answers = self.hop.receive(b);
                    let n = b.len();
                    self.session.consume_relay_output(&mut self.link, n, self.now);
                    if !answers.is_empty() {
                        self.session.handle_relay_input(&mut self.link, &answers, self.now);
                    }
                }
                HopTransmit::Release => {
                    busy = true;
                    self.released += 1;
                    let (up, addr) = self.detach().unwrap();
                    self.pool.push((addr, up));
                }
                HopTransmit::Close => {
                    busy = true;
                    self.closed += 1;
                    self.detach();
                    self.hop.disconnect();
                }
                HopTransmit::Receive | HopTransmit::Idle => {}
            }
            if !busy {
                return String::from_utf8(peer_got).unwrap();
            }
        }
        panic!("the session never settles");
    }

    /// The peer sends; returns what it got back.
    fn send(&mut self, bytes: &[u8]) -> String {
        assert_eq!(self.session.poll_transmit(&self.link), Transmit::Receive, "the driver reads only when asked");
        self.session.handle_input(&mut self.link, bytes, self.now);
        self.drive()
    }

    /// Moves the clock, firing the timer when it is due.
    fn wait(&mut self, d: Duration) -> String {
        self.now += d;
        if self.session.poll_timeout(&self.link).is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(&mut self.link, self.now);
        }
        self.drive()
    }

    fn closed(&self) -> bool {
        self.session.poll_transmit(&self.link) == Transmit::Close
    }

    fn transactions(&mut self) -> Vec<super::Transaction> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Transaction(t) => Some(*t),
                _ => None,
            })
            .collect()
    }

    /// The session's events but the next hop's reply times (see `hop_replies`).
    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.session.poll_event()).filter(|e| !matches!(e, Event::HopReply(_))).collect()
    }

    fn greet(&mut self) {
        assert!(self.send(b"EHLO client.test\r\n").starts_with("250-mx.test\r\n"));
    }

    /// One whole transaction; returns the reply to the final dot.
    fn deliver(&mut self, rcpt: &str, body: &[u8]) -> String {
        assert_eq!(self.send(b"MAIL FROM:<sender@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
        assert_eq!(self.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()), "250 2.1.5 recipient OK\r\n");
        assert_eq!(self.send(b"DATA\r\n"), "354 end data with <CR><LF>.<CR><LF>\r\n");
        self.send(body)
    }
}

// ---- the command layer -----------------------------------------------------------------

#[test]
fn greeting_and_simple_commands() {
    let mut h = Harness::new();
    assert_eq!(
        h.send(b"EHLO client.test\r\n"),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1024\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
    );
    assert_eq!(h.send(b"HELO client.test\r\n"), "250 mx.test\r\n");
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert!(h.send(b"VRFY someone\r\n").starts_with("252 2.5.0 "));
    assert!(h.send(b"HELP\r\n").starts_with("214 2.0.0 "));
    assert_eq!(h.send(b"EXPN staff\r\n"), "502 5.5.1 command not implemented\r\n");
    assert_eq!(h.send(b"STARTTLS\r\n"), "502 5.5.1 command not implemented\r\n");
    assert_eq!(h.send(b"QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
    assert!(h.closed());
    assert!(h.dials.is_empty(), "no next hop without a transaction");
}

#[test]
fn errors_keep_the_session_in_sync() {
    let mut h = Harness::new();
    assert_eq!(h.send(b"EHLO\r\n"), "501 5.5.4 syntax: EHLO domain\r\n");
    assert_eq!(h.send(b"RSET now\r\n"), "501 5.5.4 this command takes no parameters\r\n");
    assert_eq!(h.send(b"XYZZY\r\n"), "500 5.5.2 command unrecognized\r\n");
    assert_eq!(h.send(b"NOOP\n"), "500 5.5.2 line must end with CRLF\r\n");
    assert_eq!(h.send(b"NOOP\rQUIT\r\n"), "500 5.5.2 CR or NUL inside a command line\r\n");
    assert_eq!(h.send(b"\xff\xfe\r\n"), "500 5.5.2 command unrecognized\r\n");
    let too_long = format!("NOOP {}\r\n", "x".repeat(506));
    assert_eq!(h.send(too_long.as_bytes()), "500 5.5.2 line too long\r\n");
    let longest = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(h.send(longest.as_bytes()), "250 2.0.0 OK\r\n");
    assert!(!h.closed());
}

#[test]
fn commands_out_of_sequence_get_503() {
    let mut h = Harness::new();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "503 5.5.1 send EHLO or HELO first\r\n");
    h.greet();
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "503 5.5.1 send MAIL first\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "503 5.5.1 send MAIL first\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "503 5.5.1 a transaction is already open\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "554 5.5.1 no valid recipients\r\n");
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(h.hop.commands.last().map(String::as_str), Some("RSET"), "RSET went to the next hop");
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "503 5.5.1 send MAIL first\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
}

#[test]
fn a_whole_transaction_is_relayed_in_line() {
    let mut h = Harness::new();
    h.greet();
    let reply = h.deliver("user@example.com", b"Subject: hi\r\n\r\nhello\r\n..dot\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
    assert_eq!(
        h.hop.commands[..4],
        ["EHLO mx.test", "MAIL FROM:<sender@client.test>", "RCPT TO:<user@example.com>", "DATA"]
    );
    let message = String::from_utf8(h.hop.messages[0].clone()).unwrap();
    let (received, rest) = message.split_once(";\r\n\t").unwrap();
    assert!(
        received.starts_with("Received: from client.test ([192.0.2.7])\r\n\tby mx.test (mxgate) with ESMTP id "),
        "{message}"
    );
    assert!(received.ends_with("\r\n\tfor <user@example.com>"), "{received}");
    assert_eq!(rest, "Sat, 28 Nov 2026 19:39:20 +0000\r\nSubject: hi\r\n\r\nhello\r\n..dot\r\n");
    let t = h.transactions();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].accepted, t[0].refused, t[0].outcome), (1, 0, Outcome::Delivered));
    assert_eq!(t[0].size, "Subject: hi\r\n\r\nhello\r\n.dot\r\n".len() as u64);
    assert!(reply.contains(&t[0].id));
    // QUIT: the clean connection goes back to the pool
    h.send(b"QUIT\r\n");
    assert_eq!((h.released, h.closed), (1, 0));
}

#[test]
fn the_trace_header_goes_out_with_the_first_body_bytes() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 end data with <CR><LF>.<CR><LF>\r\n");
    // a segment of its own would cost a send here and a wakeup and an ACK at the next hop
    assert_eq!(h.relay(), HopTransmit::Idle, "the header waits for the body");
    h.session.handle_input(&mut h.link, b"Subject: x\r\n", h.now);
    let HopTransmit::Send(first) = h.relay() else { panic!("the body is not sent") };
    assert!(first.starts_with(b"Received: from client.test ") && first.ends_with(b"Subject: x\r\n"));
    h.drive();
    assert!(h.send(b"\r\nbody\r\n.\r\n").starts_with("250 2.0.0 OK"));
    // an empty message still carries the header
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    assert!(h.send(b".\r\n").starts_with("250 2.0.0 OK"));
    assert!(h.hop.messages[1].starts_with(b"Received: from client.test "));
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let mut h = Harness::new();
    let mut batch = b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n".to_vec();
    for i in 0..5 {
        batch.extend_from_slice(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
    }
    batch.extend_from_slice(b"RCPT TO:<x@outside.test>\r\nRCPT TO:<u6@example.com>\r\n");
    for _ in 0..10 {
        batch.extend_from_slice(b"NOOP\r\n");
    }
    batch.extend_from_slice(b"RSET\r\nNOOP\r\n");
    let got = h.send(&batch);
    let replies: Vec<&str> = got.lines().filter(|l| l.as_bytes().get(3) == Some(&b' ')).collect();
    // EHLO, MAIL, 5 RCPT, 2 over the limit of 5, 10 NOOP, RSET, NOOP
    assert_eq!(replies.len(), 21, "{got}");
    assert_eq!(replies[1], "250 2.1.0 sender OK");
    assert!(replies[2..7].iter().all(|r| *r == "250 2.1.5 recipient OK"), "{replies:?}");
    assert_eq!(replies[7..9], ["452 4.5.3 too many recipients"; 2]);
    assert!(replies[9..21].iter().all(|r| *r == "250 2.0.0 OK"), "{replies:?}");
    assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("RCPT")).count(), 5);
}

// ---- addresses and limits ----------------------------------------------------------------

#[test]
fn address_table() {
    let mut h = Harness::with_config(&CONFIG.replace("max_recipients = 5", "max_recipients = 100"));
    h.greet();
    let local64 = "a".repeat(64);
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM: <sender@client.test>", "250 2.1.0"),
        ("MAIL FROM:<\"quoted sender\"@client.test>", "250 2.1.0"),
        ("MAIL FROM:<sender@[192.0.2.1]>", "250 2.1.0"),
        ("MAIL FROM:<@route.test:sender@client.test>", "250 2.1.0"),
        ("MAIL FROM:sender@client.test", "501 5.1.7"),
        ("MAIL FROM:<sender@client..test>", "501 5.1.7"),
        ("MAIL TO:<sender@client.test>", "501 5.5.4"),
        ("MAIL FROM:<s\u{e9}@client.test>", "553 5.6.7"),
        ("MAIL FROM:<s@client.test> SIZE=2000", "552 5.3.4"),
        ("MAIL FROM:<s@client.test> AUTH=<>", "555 5.5.4"),
        ("MAIL FROM:<s@client.test> BODY=BINARYMIME", "555 5.5.4"),
    ];
    for (cmd, want) in cases {
        let got = h.send(format!("{cmd}\r\n").as_bytes());
        assert!(got.starts_with(want), "{cmd}: {got}");
        if got.starts_with("250") {
            assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
        }
    }
    assert_eq!(h.send(b"MAIL FROM:<s@client.test> SIZE=1000 BODY=8BITMIME\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.hop.commands.last().unwrap(), "MAIL FROM:<s@client.test> BODY=8BITMIME SIZE=1000");
    let cases: Vec<(String, &str)> = vec![
        ("RCPT TO:<user@example.com>".into(), "250 2.1.5"),
        ("RCPT TO: <User@EXAMPLE.com.>".into(), "250 2.1.5"),
        ("RCPT TO:<postmaster>".into(), "250 2.1.5"),
        ("RCPT TO:<\"quoted user\"@example.com>".into(), "250 2.1.5"),
        (format!("RCPT TO:<{local64}@example.com>"), "250 2.1.5"),
        (format!("RCPT TO:<{local64}a@example.com>"), "501 5.1.3 local part too long"),
        ("RCPT TO:<>".into(), "501 5.1.3"),
        ("RCPT TO:<user@[192.0.2.1]>".into(), "550 5.7.1"),
        ("RCPT TO:<user@example.com> NOTIFY=NEVER".into(), "555 5.5.4"),
        ("RCPT TO:user@example.com".into(), "501 5.1.3"),
    ];
    for (cmd, want) in &cases {
        let got = h.send(format!("{cmd}\r\n").as_bytes());
        assert!(got.starts_with(want), "{cmd}: {got}");
    }
}

#[test]
fn a_path_over_256_octets_is_refused() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<s@client.test>\r\n");
    // a domain of 252 octets makes `<a@domain>` exactly 256 octets; 253 is one too many
    let label = "b".repeat(63);
    let domain = |len: usize| format!("{label}.{label}.{label}.{}.example.org", "c".repeat(len - 204));
    assert_eq!(domain(252).len(), 252);
    assert!(h.send(format!("RCPT TO:<a@{}>\r\n", domain(252)).as_bytes()).starts_with("250"));
    let got = h.send(format!("RCPT TO:<a@{}>\r\n", domain(253)).as_bytes());
    assert!(
        got.starts_with("501 5.1.3 syntax error in address") || got.starts_with("501 5.1.3 path too long"),
        "{got}"
    );
    assert_eq!(got, "501 5.1.3 path too long\r\n");
}

#[test]
fn recipient_limit_is_exact() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<s@client.test>\r\n");
    for i in 0..5 {
        assert!(h.send(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes()).starts_with("250"));
    }
    assert_eq!(h.send(b"RCPT TO:<u5@example.com>\r\n"), "452 4.5.3 too many recipients\r\n");
}

// ---- never an open relay ------------------------------------------------------------------

#[test]
fn open_relay_probes_reach_nothing() {
    let probes = [
        "<user@outside.test>",
        "<user@mail.example.com>",
        "<user@example.com.outside.test>",
        "<user@notexample.com>",
        "<user%outside.test@example.com>",
        "<outside.test!user@example.com>",
        "<\"user@outside.test\"@example.com>",
        "<\"user%outside.test\"@example.com>",
        "<user@outside.test@example.com>",
        "<@example.com:user@outside.test>",
        "<@example.com,@example.org:user@outside.test>",
        "<user@[192.0.2.1]>",
        "<user@[IPv6:2001:db8::1]>",
        "<user@[127.0.0.1]>",
        "<user@com>",
        "<user@org>",
        "<user@outside.test.>",
    ];
    assert!(probes.len() >= 16);
    let mut h = Harness::with_config(&limits(100, 100));
    h.greet();
    assert!(h.send(b"MAIL FROM:<a@client.test>\r\n").starts_with("250"));
    for probe in probes {
        let got = h.send(format!("RCPT TO:{probe}\r\n").as_bytes());
        assert!(got.starts_with("550 5.7.1") || got.starts_with("501 "), "{probe}: {got}");
    }
    assert_eq!(h.send(b"DATA\r\n"), "554 5.5.1 no valid recipients\r\n");
    assert!(!h.hop.commands.iter().any(|c| c.starts_with("RCPT") || c == "DATA"), "{:?}", h.hop.commands);
    assert!(h.hop.messages.is_empty());
}

// ---- smuggling and pipelining ---------------------------------------------------------------

#[test]
fn smuggled_ends_of_data_never_end_the_data() {
    for trick in super::data::tests::SMUGGLING_TRICKS {
        let mut h = Harness::new();
        h.greet();
        let mut body = b"Subject: one\r\n\r\nfirst".to_vec();
        body.extend_from_slice(trick);
        body.extend_from_slice(
            b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n",
        );
        body.extend_from_slice(b"\r\n.\r\n");
        let reply = h.deliver("user@example.com", &body);
        let why = if trick.contains(&0) { "NUL" } else { "bare CR or LF" };
        assert_eq!(reply, format!("554 5.6.0 message refused: {why} in the body\r\n"), "{trick:?}");
        assert!(h.hop.messages.is_empty(), "{trick:?}: the next hop must get no message");
        assert_eq!(h.closed, 1, "{trick:?}: the next hop's connection is dropped without a final dot");
        assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("MAIL")).count(), 1, "{trick:?}: one MAIL only");
        // still in sync: the next command is a command
        assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n", "{trick:?}");
    }
}

#[test]
fn input_after_data_in_the_same_write_is_improper_pipelining() {
    let mut h = Harness::new();
    h.greet();
    let got = h.send(
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@outside.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n\
          MAIL FROM:<evil@client.test>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
    );
    assert!(got.ends_with("503 5.5.0 improper use of SMTP command pipelining\r\n"), "{got}");
    assert!(h.closed());
    assert!(!h.hop.commands.iter().any(|c| c == "DATA"), "{:?}", h.hop.commands);
    assert!(h.hop.messages.is_empty());
    assert_eq!(h.closed, 1, "the next hop's half-open transaction is dropped");
}

#[test]
fn a_refused_recipient_then_data_and_body_in_one_write() {
    let mut h = Harness::new();
    h.greet();
    let got = h.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@outside.test>\r\nDATA\r\nMAIL FROM:<b@c.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\nhi\r\n.\r\n");
    assert!(got.contains("550 5.7.1 relay access denied"), "{got}");
    assert!(got.ends_with("503 5.5.0 improper use of SMTP command pipelining\r\n"), "{got}");
    assert!(h.closed());
    assert!(h.hop.messages.is_empty() && !h.hop.commands.iter().any(|c| c.starts_with("RCPT")));
}

// ---- the next hop's answers and failures -----------------------------------------------------

#[test]
fn next_hop_refusals_are_passed_on_with_their_codes() {
    let mut h = Harness::new();
    h.hop.refuse_rcpt = Some(("unknown", "550 5.1.1 no such user here"));
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    assert_eq!(h.send(b"RCPT TO:<unknown@example.com>\r\n"), "550 5.1.1 no such user here\r\n");
    assert_eq!(h.send(b"RCPT TO:<known@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    h.hop.dot_reply = Some("452 4.3.1 insufficient storage");
    h.send(b"DATA\r\n");
    assert_eq!(h.send(b"hello\r\n.\r\n"), "452 4.3.1 insufficient storage\r\n");
    let t = h.transactions();
    assert_eq!((t[0].accepted, t[0].refused), (1, 1));
    assert_eq!(t[0].outcome, Outcome::Undelivered(Undelivered::MessageRefused(452)));
    // the connection is clean again: the next transaction reuses it
    h.hop.dot_reply = None;
    assert!(h.deliver("known@example.com", b"again\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(h.dials.len(), 1);
}

#[test]
fn failover_to_the_second_next_hop() {
    let mut h = Harness::new();
    h.unreachable = vec![0];
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.dials, [(0, true), (1, true)]);
    assert!(h.deliver_rest("u@example.com").starts_with("250 2.0.0"));
    assert_eq!(h.transactions()[0].next_hop, Some("127.0.0.1:2527".parse().unwrap()));
}

impl Harness {
    fn deliver_rest(&mut self, rcpt: &str) -> String {
        assert!(self.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).starts_with("250"));
        assert!(self.send(b"DATA\r\n").starts_with("354"));
        self.send(b"body\r\n.\r\n")
    }
}

#[test]
fn no_next_hop_reachable_is_451_never_250() {
    let mut h = Harness::new();
    h.unreachable = vec![0, 1];
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert_eq!(h.dials.len(), 2);
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "503 5.5.1 send MAIL first\r\n");
}

#[test]
fn next_hop_closing_after_the_dot_is_451() {
    let mut h = Harness::new();
    h.greet();
    h.hop.silent = false;
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    h.hop.silent = true;
    assert_eq!(h.send(b"body\r\n.\r\n"), "");
    h.session.handle_relay_error(&mut h.link, h.now); // the next hop closed the connection
    assert_eq!(h.drive(), "451 4.4.1 next hop unavailable, try again later\r\n");
    let connection = Undelivered::HopFailed(HopFault::Connection);
    assert_eq!(h.transactions()[0].outcome, Outcome::Undelivered(connection));
    assert_eq!(connection.party(), outcome::Party::NextHop);
}

#[test]
fn a_silent_next_hop_times_out_with_451() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    h.hop.silent = true;
    assert_eq!(h.send(b"body\r\n.\r\n"), "");
    assert_eq!(h.wait(Duration::from_secs(19)), "");
    assert_eq!(h.wait(Duration::from_secs(1)), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert_eq!(h.closed, 1);
    assert!(!h.closed(), "the peer may try again");
}

#[test]
fn a_stale_pooled_connection_is_replaced_transparently() {
    let mut h = Harness::new();
    h.greet();
    assert!(h.deliver("u@example.com", b"one\r\n.\r\n").starts_with("250"));
    h.send(b"QUIT\r\n");
    // a second session on the same worker gets the pooled connection, which is dead
    let pool = std::mem::take(&mut h.pool);
    let mut h2 = Harness::new();
    h2.pool = pool;
    h2.stale_pool = true;
    h2.greet();
    assert_eq!(h2.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h2.dials, [(0, true), (0, false)]);
}

#[test]
fn eight_bit_mail_needs_a_next_hop_that_takes_it() {
    let mut h = Harness::new();
    h.hop.ehlo = vec!["PIPELINING"];
    h.greet();
    assert_eq!(
        h.send(b"MAIL FROM:<a@client.test> BODY=8BITMIME\r\n"),
        "555 5.3.3 8BITMIME or SMTPUTF8 mail cannot be relayed now\r\n"
    );
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
}

#[test]
fn utf8_addresses_after_smtputf8() {
    let mut h = Harness::new();
    h.greet();
    assert_eq!(h.send("MAIL FROM:<s\u{e9}@client.test> SMTPUTF8\r\n".as_bytes()), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send("RCPT TO:<\u{fc}ser@example.com>\r\n".as_bytes()), "250 2.1.5 recipient OK\r\n");
    h.send(b"DATA\r\n");
    assert!(h.send(b"x\r\n.\r\n").starts_with("250"));
    assert!(String::from_utf8_lossy(&h.hop.messages[0]).contains("with UTF8SMTP id"));
}

// ---- the body ----------------------------------------------------------------------------

#[test]
fn a_body_over_the_size_limit_is_refused_at_its_end() {
    let mut h = Harness::new();
    h.greet();
    let mut body = vec![b'x'; 2000];
    body.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(h.deliver("u@example.com", &body), "552 5.3.4 message size exceeds the limit\r\n");
    assert!(h.hop.messages.is_empty());
    assert_eq!(h.closed, 1);
    assert!(h.deliver("u@example.com", b"small\r\n.\r\n").starts_with("250"), "a new connection for the next one");
}

#[test]
fn bodies_stream_with_bounded_memory() {
    let mut h = Harness::with_config(&CONFIG.replace("\"1KiB\"", "\"50MiB\""));
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    let line = [&[b'z'; 998][..], b"\r\n"].concat();
    let chunk: Vec<u8> = line.iter().cycle().take(4096).copied().collect();
    let mut total = 0;
    // As a driver does: input keeps arriving while the next hop takes 3000 bytes a
    // send, so its queue never quite drains.
    while total < 5 << 20 {
        if h.session.poll_transmit(&h.link) == Transmit::Receive {
            h.session.handle_input(&mut h.link, &chunk, h.now);
            total += chunk.len();
        }
        if let HopTransmit::Send(b) = h.relay() {
            let n = b.len().min(3000);
            h.session.consume_relay_output(&mut h.link, n, h.now);
        }
        let relay_held = match &h.link {
            super::link::Link::Up(l) => l.up.held(),
            _ => 0,
        };
        assert!(relay_held <= 2 * RELAY_HIGH_WATER + 8192, "the next-hop queue holds {relay_held} bytes after {total}");
        assert!(h.session.reader.input.capacity() <= 64 << 10 && h.session.out.held() <= 64 << 10);
    }
}

#[test]
fn data_timeout_and_trickling_peers() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    h.send(b"some");
    assert_eq!(h.wait(Duration::from_secs(29)), "");
    h.send(b" more");
    assert_eq!(h.wait(Duration::from_secs(30)), "421 4.4.2 mx.test timeout exceeded, closing connection\r\n");
    assert!(h.closed());
    assert_eq!(h.transactions()[0].outcome, Outcome::Abandoned("timeout"));

    // 100 bytes a second at a minimum of 1 KiB/s: cut off after the 30 s grace
    let mut h = Harness::with_config(&CONFIG.replace("min_data_rate = \"0\"", "min_data_rate = \"1KiB\""));
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.send(b"DATA\r\n");
    let mut got = String::new();
    for _ in 0..40 {
        if h.closed() {
            break;
        }
        h.send(&[b'y'; 100]);
        got += &h.wait(Duration::from_secs(1));
    }
    assert_eq!(got, "421 4.4.2 mx.test timeout exceeded, closing connection\r\n");
}

#[test]
fn idle_timeout_closes_with_421() {
    let mut h = Harness::new();
    assert_eq!(h.wait(Duration::from_secs(59)), "");
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(h.wait(Duration::from_secs(59)), "");
    assert_eq!(h.send(b"NO"), "");
    assert_eq!(h.wait(Duration::from_secs(1)), "421 4.4.2 mx.test timeout exceeded, closing connection\r\n");
    assert!(h.closed());
}

const SHUTTING_DOWN: &str = "421 4.3.2 mx.test service shutting down, closing connection\r\n";

#[test]
fn shutdown_lets_the_transaction_under_way_finish() {
    let mut h = Harness::new();
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 end data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(h.send(b"Subject: drain\r\n\r\nfirst half\r\n"), "");
    h.session.shutdown(h.now);
    assert_eq!(h.drive(), "", "nothing is said in the middle of a body");
    let reply = h.send(b"second half\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
    assert_eq!(h.hop.messages.len(), 1);
    assert!(h.hop.messages[0].ends_with(b"Subject: drain\r\n\r\nfirst half\r\nsecond half\r\n"));
    assert!(matches!(h.transactions()[..], [Transaction { outcome: Outcome::Delivered, .. }]));
    // the next command is answered 421, and nothing of it reaches the next hop
    assert_eq!(h.send(b"MAIL FROM:<b@client.test>\r\n"), SHUTTING_DOWN);
    assert!(h.closed());
    assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("MAIL")).count(), 1);
    assert_eq!((h.released, h.closed), (1, 0), "the clean next-hop connection is kept");
}

#[test]
fn shutdown_between_commands_of_a_transaction_waits_for_its_end() {
    let mut h = Harness::new();
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    h.session.shutdown(h.now);
    assert_eq!(h.drive(), "");
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n", "RSET ends the transaction");
    assert_eq!(h.send(b"QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n", "QUIT is still QUIT");
    assert!(h.closed());
}

#[test]
fn abort_cuts_a_transaction_off_without_250() {
    let mut h = Harness::new();
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "354 end data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(h.send(b"Subject: slow\r\n"), "");
    h.session.shutdown(h.now);
    h.session.abort(h.now);
    assert_eq!(h.drive(), SHUTTING_DOWN);
    assert!(h.closed());
    assert!(h.hop.messages.is_empty(), "the next hop never got the final dot");
    assert_eq!(h.closed, 1, "the next-hop connection with a transaction open is closed");
    assert!(matches!(h.transactions()[..], [Transaction { outcome: Outcome::Abandoned(_), .. }]));

    // a closing peer that does not read gets ABORT_GRACE, not CLOSE_GRACE
    let mut h = Harness::new();
    h.session.handle_input(&mut h.link, b"QUIT\r\n", h.now);
    h.session.abort(h.now);
    h.now += ABORT_GRACE;
    h.session.handle_timeout(&mut h.link, h.now);
    assert_eq!(h.session.poll_transmit(&h.link), Transmit::Close);
}

#[test]
fn shutdown_says_421_and_a_peer_that_never_reads_is_dropped() {
    let mut h = Harness::new();
    h.session.shutdown(h.now);
    assert_eq!(h.drive(), SHUTTING_DOWN, "an idle session is told at once");
    assert!(h.closed());

    let mut h = Harness::new();
    h.session.handle_input(&mut h.link, b"QUIT\r\n", h.now);
    assert!(matches!(h.session.poll_transmit(&h.link), Transmit::Send(_)));
    h.now += CLOSE_GRACE;
    h.session.handle_timeout(&mut h.link, h.now);
    assert_eq!(h.session.poll_transmit(&h.link), Transmit::Close);
}

#[test]
fn a_hundred_messages_over_one_session_use_one_connection() {
    let mut h = Harness::with_config(&CONFIG.replace("max_recipients = 5", "max_recipients = 100"));
    h.greet();
    for i in 0..100 {
        let reply = h.deliver("u@example.com", format!("message {i}\r\n.\r\n").as_bytes());
        assert!(reply.starts_with("250 2.0.0"), "{i}: {reply}");
    }
    assert_eq!(h.dials.len(), 1);
    assert_eq!(h.hop.messages.len(), 100);
    assert_eq!(h.transactions().len(), 100);
}

#[test]
fn a_disconnect_mid_transaction_closes_the_next_hop_connection() {
    let mut h = Harness::new();
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    h.session.handle_eof(h.now);
    h.drive();
    assert_eq!((h.released, h.closed), (0, 1), "a half-open transaction is never pooled");
    assert_eq!(h.transactions()[0].outcome, Outcome::Abandoned("peer disconnected"));
}

#[test]
fn the_101st_recipient_gets_452_by_default() {
    let mut h = Harness::with_config(&CONFIG.replace("max_recipients = 5\n", ""));
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    let mut batch = Vec::new();
    for i in 0..101 {
        batch.extend_from_slice(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
    }
    let got = h.send(&batch);
    let replies: Vec<&str> = got.lines().collect();
    assert_eq!(replies.len(), 101);
    assert!(replies[..100].iter().all(|r| *r == "250 2.1.5 recipient OK"));
    assert_eq!(replies[100], "452 4.5.3 too many recipients");
}

/// A peer flooding RCPT while the next hop sits on MAIL (issue 19) holds a bounded queue
/// and one read: nothing more is read from it until replies went out, and once the hop
/// answers, its 452s past max_recipients are failed recipients that drop it.
#[test]
fn a_peer_flooding_rcpt_while_the_hop_stalls_mail_is_held_at_a_bounded_queue() {
    let mut h = Harness::with_config(&CONFIG.replace("max_recipients = 5\n", ""));
    h.hop.stall_mail = true;
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "");
    let flood: Vec<u8> = (0..20_000).flat_map(|i| format!("RCPT TO:<u{i}@example.com>\r\n").into_bytes()).collect();
    assert_eq!(h.send(&flood), "", "nothing answered while MAIL waits");
    assert_eq!(h.session.fwd.waiting.len(), MAX_OWED, "replies owed stop at the bound");
    assert_eq!(h.session.poll_transmit(&h.link), Transmit::Wait, "and nothing more is read");
    assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("RCPT")).count(), 100, "max_recipients forwarded");
    // the hop answers MAIL and the 100 recipients: then our 27 452s, failures that drop it
    let answers = "250 2.1.0 ok\r\n".to_owned() + &"250 2.1.5 ok\r\n".repeat(100);
    h.session.handle_relay_input(&mut h.link, answers.as_bytes(), h.now);
    let got = h.drive();
    let replies: Vec<&str> = got.lines().collect();
    assert_eq!(replies[0], "250 2.1.0 sender OK");
    assert!(replies[1..101].iter().all(|r| *r == "250 2.1.5 recipient OK"), "{replies:?}");
    assert_eq!(replies[101..112], ["452 4.5.3 too many recipients"; 11], "10 allowed, the 11th passes the limit");
    assert_eq!(replies[112..], ["421 4.7.0 mx.test too many errors"]);
    let failed = h.events().into_iter().filter(|e| matches!(e, Event::Failed(Failure::Recipient))).count();
    assert_eq!(failed, 11, "each 452 counted against the address");
    assert!(h.closed());
}

#[test]
fn a_body_sent_before_the_354_is_improper_pipelining() {
    let mut h = Harness::new();
    h.hop.hold_data_reply = true;
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    h.send(b"RCPT TO:<u@example.com>\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "");
    // the client does not wait for the 354; the session still reads while it waits
    assert_eq!(h.send(b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<v@example.com>\r\n"), "");
    let held = std::mem::take(&mut h.hop.held);
    h.session.handle_relay_input(&mut h.link, &held, h.now);
    assert_eq!(h.drive(), "503 5.5.0 improper use of SMTP command pipelining\r\n");
    assert!(h.closed());
    assert!(h.hop.messages.is_empty());
    assert_eq!(h.closed, 1, "the next hop's DATA is abandoned with its connection");
}

// ---- connection dropping ---------------------------------------------------------------

fn limits(commands: u32, recipients: u32) -> String {
    CONFIG.replace(
        "[relay]",
        &format!("[abuse]\nmax_failed_commands = {commands}\nmax_failed_recipients = {recipients}\n[relay]"),
    )
}

#[test]
fn the_failed_command_past_the_limit_drops_the_conversation() {
    let mut h = Harness::with_config(&limits(3, 100));
    h.greet();
    for _ in 0..3 {
        assert_eq!(h.send(b"BOGUS\r\n"), "500 5.5.2 command unrecognized\r\n");
    }
    assert!(!h.closed(), "three failures are within max_failed_commands = 3");
    assert_eq!(h.send(b"MAIL FROM:<bad\r\n").lines().count(), 2);
    assert!(h.closed());
    let events = h.events();
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Command)).count(), 4);
    assert_eq!(events.last(), Some(&Event::Dropped));
}

#[test]
fn pipelined_failures_stop_at_the_limit() {
    let mut h = Harness::with_config(&limits(3, 100));
    h.greet();
    let got = h.send(&b"BOGUS\r\n".repeat(10));
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 5, "{got}");
    assert_eq!(lines[4], "421 4.7.0 mx.test too many errors");
    assert!(h.closed());
}

#[test]
fn refused_recipients_past_the_limit_drop_the_conversation() {
    let mut h = Harness::with_config(&limits(100, 2));
    h.hop.refuse_rcpt = Some(("nobody", "550 5.1.1 no such user"));
    h.greet();
    h.send(b"MAIL FROM:<a@client.test>\r\n");
    assert!(h.send(b"RCPT TO:<x@outside.test>\r\n").starts_with("550 5.7.1"));
    assert!(h.send(b"RCPT TO:<nobody@example.com>\r\n").starts_with("550 5.1.1"), "the next hop's refusal counts");
    assert!(!h.closed());
    assert_eq!(h.send(b"RCPT TO:<y@outside.test>\r\n").lines().nth(1), Some("421 4.7.0 mx.test too many errors"));
    assert!(h.closed());
    let events = h.events();
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Recipient)).count(), 3);
    assert!(!events.contains(&Event::Failed(Failure::Command)), "{events:?}");
    assert!(events.contains(&Event::Dropped));
}

// ---- pipelining to the next hop (RFC 2920) ---------------------------------------------

const BATCH: &[u8] = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<v@example.com>\r\nDATA\r\n";
const GO_AHEAD: &str = "354 end data with <CR><LF>.<CR><LF>\r\n";

/// Issue 19: a connection goes back to the pool only clean. After the next hop refused
/// the message, it gets RSET; its 250 keeps the connection for the next sender.
#[test]
fn after_a_refused_message_the_next_hop_gets_rset_before_the_pool() {
    let mut h = Harness::new();
    h.hop.dot_reply = Some("552 5.3.4 message too big for me");
    h.greet();
    assert_eq!(h.deliver("user@example.com", b"hi\r\n.\r\n"), "552 5.3.4 message too big for me\r\n");
    assert_eq!(h.hop.commands.last().map(String::as_str), Some("RSET"));
    h.send(b"QUIT\r\n");
    assert_eq!((h.released, h.closed), (1, 0), "reset, and pooled");
}

/// A next hop that refuses RSET (after its refusal, or the peer's RSET) loses its
/// connection: the peer still hears 250 to its RSET, and nobody else gets the connection.
#[test]
fn a_next_hop_that_refuses_rset_is_never_pooled() {
    for peer_rset in [false, true] {
        let mut h = Harness::new();
        h.hop.rset_reply = Some("500 5.5.1 no such command");
        h.greet();
        if peer_rset {
            assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
            assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n", "the peer's transaction is reset here");
        } else {
            h.hop.refuse_mail = Some("552 5.3.4 SIZE too big");
            assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "552 5.3.4 SIZE too big\r\n");
        }
        assert_eq!(h.hop.commands.last().map(String::as_str), Some("RSET"));
        assert_eq!((h.released, h.closed), (0, 1), "peer RSET {peer_rset}: dropped at once");
        // the next transaction gets a new connection
        h.hop.refuse_mail = None;
        h.hop.rset_reply = None;
        assert!(h.deliver("user@example.com", b"hi\r\n.\r\n").starts_with("250 2.0.0"));
        assert_eq!(h.dials.len(), 2);
    }
}

#[test]
fn a_pipelined_batch_reaches_the_next_hop_in_one_write() {
    let mut h = Harness::new();
    h.greet();
    let got = h.send(BATCH);
    assert_eq!(got, format!("250 2.1.0 sender OK\r\n{0}{0}{GO_AHEAD}", "250 2.1.5 recipient OK\r\n"));
    assert!(h.hop.writes.iter().any(|w| w == BATCH), "one write: {:?}", h.hop.writes);
    assert!(h.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").starts_with("250 2.0.0 OK: queued as "));

    // on the same connection, the next batch is again one write, one round trip
    let writes = h.hop.writes.len();
    assert!(h.send(BATCH).ends_with(GO_AHEAD));
    assert_eq!(h.hop.writes[writes..], [BATCH.to_vec()]);
}

#[test]
fn a_refused_sender_makes_the_batch_get_the_next_hops_refusals() {
    let mut h = Harness::new();
    h.hop.refuse_mail = Some("550 5.7.1 sender refused");
    h.greet();
    let got = h.send(BATCH);
    assert_eq!(
        got,
        "550 5.7.1 sender refused\r\n503 5.5.1 need MAIL first\r\n503 5.5.1 need MAIL first\r\n\
         503 5.5.1 need MAIL first\r\n"
    );
    // one failure, the refused sender: the 503s behind it follow from it
    let events = h.events();
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Recipient)).count(), 0);
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Command)).count(), 1);
    let refused = events.iter().filter(|e| matches!(e, Event::Transaction(t) if t.accepted == 0)).count();
    assert_eq!(refused, 1, "{events:?}");
    // the next hop got RSET behind the batch and said 250: the same connection serves
    // the next batch
    assert_eq!(h.hop.commands.last().map(String::as_str), Some("RSET"));
    h.hop.refuse_mail = None;
    assert!(h.send(BATCH).ends_with(GO_AHEAD));
    assert_eq!(h.dials.len(), 1);
}

#[test]
fn data_behind_refused_recipients_gets_the_next_hops_answer_not_354() {
    let mut h = Harness::new();
    h.hop.refuse_rcpt = Some(("example.com", "550 5.1.1 no such user"));
    h.greet();
    let got = h.send(BATCH);
    assert_eq!(
        got,
        "250 2.1.0 sender OK\r\n550 5.1.1 no such user\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n"
    );
    assert!(!h.session.in_body());
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
}

#[test]
fn our_own_refusals_keep_their_place_among_the_next_hops_replies() {
    let mut h = Harness::new();
    h.greet();
    let batch = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@outside.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n";
    let got = h.send(batch);
    assert_eq!(
        got,
        format!("250 2.1.0 sender OK\r\n550 5.7.1 relay access denied\r\n250 2.1.5 recipient OK\r\n{GO_AHEAD}")
    );
    let forwarded = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n";
    assert!(h.hop.writes.iter().any(|w| w == forwarded), "{:?}", h.hop.writes);
    let events = h.events();
    assert_eq!(events, [Event::Failed(Failure::Recipient)]);
}

#[test]
fn a_next_hop_without_pipelining_gets_one_command_at_a_time() {
    let mut h = Harness::new();
    h.hop.ehlo = vec!["8BITMIME"];
    h.greet();
    let got = h.send(BATCH);
    assert_eq!(got, format!("250 2.1.0 sender OK\r\n{0}{0}{GO_AHEAD}", "250 2.1.5 recipient OK\r\n"));
    let commands: Vec<&[u8]> = h.hop.writes.iter().map(Vec::as_slice).filter(|w| !w.starts_with(b"EHLO")).collect();
    assert_eq!(
        commands,
        [
            &b"MAIL FROM:<a@client.test>\r\n"[..],
            b"RCPT TO:<u@example.com>\r\n",
            b"RCPT TO:<v@example.com>\r\n",
            b"DATA\r\n"
        ]
    );
}

#[test]
fn a_batch_sent_on_a_stale_pooled_connection_is_sent_again_on_a_new_one() {
    let mut h = Harness::new();
    h.greet();
    assert!(h.deliver("u@example.com", b"one\r\n.\r\n").starts_with("250 2.0.0"));
    h.send(b"QUIT\r\n");
    assert_eq!(h.released, 1);
    let pool = std::mem::take(&mut h.pool);

    let mut h = Harness::new();
    h.pool = pool;
    h.stale_pool = true;
    h.greet();
    let got = h.send(BATCH);
    assert_eq!(got, format!("250 2.1.0 sender OK\r\n{0}{0}{GO_AHEAD}", "250 2.1.5 recipient OK\r\n"));
    assert_eq!(h.dials, [(0, true), (0, false)]);
    assert!(h.hop.writes.iter().any(|w| w == BATCH), "sent again whole: {:?}", h.hop.writes);
    assert!(h.send(b"two\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(h.hop.messages.len(), 1);
}

#[test]
fn data_is_not_pipelined_with_what_follows_it() {
    // a body sent before our 354 is improper pipelining, whatever the next hop offers
    let mut h = Harness::new();
    h.greet();
    let got = h.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\nSubject: early\r\n");
    assert!(got.ends_with("503 5.5.0 improper use of SMTP command pipelining\r\n"), "{got}");
    assert!(h.closed());
    assert!(!h.hop.commands.iter().any(|c| c == "DATA"), "{:?}", h.hop.commands);
}

#[test]
fn commands_after_the_final_dot_wait_for_its_reply() {
    let mut h = Harness::new();
    h.greet();
    assert!(h.send(BATCH).ends_with(GO_AHEAD));
    let got = h.send(b"body\r\n.\r\nRCPT TO:<late@example.com>\r\n");
    let replies: Vec<&str> = got.lines().collect();
    assert!(replies[0].starts_with("250 2.0.0 OK: queued as "), "{got}");
    assert_eq!(replies[1], "503 5.5.1 send MAIL first", "a new transaction needs MAIL");
    assert!(!h.hop.commands.iter().any(|c| c.contains("late@")), "{:?}", h.hop.commands);
}

const TLS13: crate::tls::Negotiated = crate::tls::Negotiated { version: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" };

#[test]
fn starttls_is_offered_and_nothing_sent_after_it_in_clear_is_ever_run() {
    let mut h = Harness::with_starttls(false);
    assert!(h.send(b"EHLO client.test\r\n").contains("\r\n250-STARTTLS\r\n"));
    assert_eq!(h.send(b"STARTTLS now\r\n"), "501 5.5.4 this command takes no parameters\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"STARTTLS\r\n"), "503 5.5.1 STARTTLS not allowed now\r\n", "inside a transaction");
    h.send(b"RSET\r\n");
    assert!(!h.session.take_starttls());
    // the CVE-2011-0411 class: commands pipelined behind STARTTLS, in clear
    let got = h.send(b"STARTTLS\r\nNOOP\r\nEHLO evil.test\r\nMAIL FROM:<x@client.test>\r\n");
    assert_eq!(got, "220 2.0.0 ready to start TLS\r\n");
    assert!(h.session.take_starttls(), "the connection starts the handshake");
    assert!(!h.session.take_starttls(), "once");
    h.session.tls_started(TLS13, h.now);
    assert_eq!(h.drive(), "", "none of it answered after the handshake either");
    // the state after the banner: greet again; STARTTLS no longer offered or allowed
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "503 5.5.1 send EHLO or HELO first\r\n");
    let ehlo = h.send(b"EHLO client.test\r\n");
    assert!(ehlo.ends_with("250 ENHANCEDSTATUSCODES\r\n") && !ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(h.send(b"STARTTLS\r\n"), "503 5.5.1 STARTTLS not allowed now\r\n");
    assert!(h.session.poll_transmit(&h.link) == Transmit::Receive);
}

#[test]
fn mail_under_tls_says_esmtps_and_the_cipher() {
    let mut h = Harness::with_starttls(false);
    h.send(b"EHLO client.test\r\n");
    h.send(b"STARTTLS\r\n");
    assert!(h.session.take_starttls());
    h.now += Duration::from_millis(7);
    h.session.tls_started(TLS13, h.now);
    let took = Duration::from_millis(7);
    assert!(h.events().contains(&Event::Handshake { ok: true, took }), "from our 220 to its end");
    h.send(b"EHLO client.test\r\n");
    assert!(h.deliver("user@example.com", b"Subject: hi\r\n\r\nhello\r\n.\r\n").starts_with("250 "));
    let received = String::from_utf8_lossy(&h.hop.messages[0]).into_owned();
    assert!(
        received.starts_with(
            "Received: from client.test ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)\r\n\tby mx.test (mxgate) with ESMTPS id "
        ),
        "{received}"
    );
    let log = h.transactions()[0].to_string();
    assert!(log.contains(" tls=TLSv1.3 "), "{log}");
}

#[test]
fn require_tls_refuses_mail_in_clear_without_counting_it() {
    let mut h = Harness::with_starttls(true);
    h.send(b"EHLO client.test\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "530 5.7.0 must issue a STARTTLS command first\r\n");
    assert!(!h.events().iter().any(|e| matches!(e, Event::Failed(_))), "policy, not a failure");
    h.send(b"STARTTLS\r\n");
    assert!(h.session.take_starttls());
    h.session.tls_started(TLS13, h.now);
    h.send(b"EHLO client.test\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
}

#[test]
fn a_failed_handshake_counts_one_failure_and_closes() {
    let mut h = Harness::with_starttls(false);
    h.send(b"EHLO client.test\r\n");
    h.send(b"STARTTLS\r\n");
    assert!(h.session.take_starttls());
    h.session.tls_failed(h.now);
    assert!(h.session.poll_transmit(&h.link) == Transmit::Close);
    let failures = h.events().iter().filter(|e| matches!(e, Event::Failed(Failure::Command))).count();
    assert_eq!(failures, 1);
}

// ---- CHUNKING (RFC 3030) ---------------------------------------------------------------

const QUEUED: &str = "250 2.0.0 OK: queued as ";

impl Harness {
    /// MAIL and one accepted recipient.
    fn envelope(&mut self) {
        assert_eq!(self.send(b"MAIL FROM:<sender@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
        assert_eq!(self.send(b"RCPT TO:<u@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    }

    /// The body of the last message the next hop took, after our trace header.
    fn last_body(&self) -> String {
        let message = String::from_utf8_lossy(self.hop.messages.last().expect("a message")).into_owned();
        // the trace header ends with its date line: ";" CRLF TAB date CRLF
        let (_, after) = message.split_once(";\r\n\t").expect("a trace header");
        after.split_once("\r\n").map_or("", |(_, body)| body).to_owned()
    }
}

#[test]
fn chunks_are_relayed_as_one_data_body_and_the_last_gets_the_hops_reply() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    assert_eq!(h.send(b"BDAT 12\r\nSubject: x\r\n"), "250 2.0.0 12 octets received\r\n");
    assert!(h.hop.commands.iter().any(|c| c == "DATA"), "the next hop is in DATA");
    let got = h.send(b"BDAT 11 LAST\r\n\r\n.body\nend");
    assert!(got.starts_with(QUEUED), "{got}");
    assert_eq!(h.hop.messages.len(), 1);
    // on the wire: line ends made CRLF, the leading dot stuffed, a last CRLF added
    assert_eq!(h.last_body(), "Subject: x\r\n\r\n..body\r\nend\r\n");
    let t = h.transactions();
    assert_eq!((t.len(), t[0].size, t[0].outcome), (1, 23, Outcome::Delivered));
    // and the session goes on: another message, in DATA this time
    assert!(h.deliver("u@example.com", b"Subject: y\r\n\r\nz\r\n.\r\n").starts_with(QUEUED));
}

#[test]
fn chunk_octets_are_never_commands() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    let evil = b"a\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n";
    let mut input = format!("BDAT {} LAST\r\n", evil.len()).into_bytes();
    input.extend_from_slice(evil);
    let got = h.send(&input);
    assert!(got.starts_with(QUEUED), "{got}");
    assert!(!h.closed(), "the QUIT inside was data");
    assert_eq!(h.hop.messages.len(), 1, "one message");
    assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("MAIL")).count(), 1, "{:?}", h.hop.commands);
    assert!(h.last_body().contains("\r\n..\r\nMAIL FROM:<evil@x.test>\r\n"), "{}", h.last_body());
}

#[test]
fn a_refused_chunk_is_swallowed_whole_before_its_reply() {
    let mut h = Harness::new();
    h.greet();
    // before MAIL: the octets (a QUIT among them) are data, swallowed
    assert_eq!(h.send(b"BDAT 6\r\nQUIT\r\n"), "503 5.5.1 send MAIL first\r\n");
    assert!(!h.closed());
    // without an accepted recipient
    assert_eq!(h.send(b"MAIL FROM:<sender@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@elsewhere.test>\r\n"), "550 5.7.1 relay access denied\r\n");
    assert_eq!(h.send(b"BDAT 4 LAST\r\nab"), "", "the reply waits for all the octets");
    assert_eq!(h.send(b"cd"), "503 5.5.1 no valid recipients\r\n");
    assert_eq!(h.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n");
    assert!(h.hop.messages.is_empty());
}

#[test]
fn a_chunk_past_the_size_limit_is_swallowed_and_ends_the_transaction() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    assert_eq!(h.send(b"BDAT 1000\r\n"), "");
    assert_eq!(h.send(&[b'x'; 1000]), "250 2.0.0 1000 octets received\r\n");
    let mut over = b"BDAT 25 LAST\r\n".to_vec();
    over.extend_from_slice(&[b'y'; 25]);
    assert_eq!(h.send(&over), "552 5.3.4 message size exceeds the limit\r\n", "1,025 octets of 1 KiB");
    assert!(h.hop.messages.is_empty(), "nothing delivered");
    assert_eq!(h.closed, 1, "what the next hop had of it was abandoned with its connection");
    let t = h.transactions();
    assert_eq!(t[0].outcome, Outcome::Undelivered(Undelivered::Body(super::data::BodyFault::TooBig)));
    assert_eq!(h.send(b"BDAT 1 LAST\r\nz"), "503 5.5.1 send MAIL first\r\n", "the transaction is over");
}

#[test]
fn a_malformed_bdat_closes_the_connection() {
    for line in ["BDAT\r\n", "BDAT x\r\n", "BDAT 5 FIRST\r\n", "BDAT -1\r\n", "BDAT 99999999999999999999999\r\n"] {
        let mut h = Harness::new();
        h.greet();
        h.envelope();
        assert_eq!(h.send(line.as_bytes()), "501 5.5.4 syntax: BDAT size [LAST]\r\n", "{line:?}");
        assert!(h.closed(), "{line:?}: where the octets end is unknown");
        assert!(h.hop.messages.is_empty());
    }
}

#[test]
fn bdat_0_last_ends_a_message_and_data_after_bdat_is_refused() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    assert_eq!(h.send(b"BDAT 3\r\nabc"), "250 2.0.0 3 octets received\r\n");
    assert_eq!(h.send(b"DATA\r\n"), "503 5.5.1 DATA after BDAT\r\n");
    assert!(h.send(b"BDAT 0 LAST\r\n").starts_with(QUEUED));
    assert_eq!(h.last_body(), "abc\r\n");
    // an empty message in one chunk
    h.envelope();
    assert!(h.send(b"BDAT 0 LAST\r\n").starts_with(QUEUED));
    assert_eq!(h.hop.messages.len(), 2);
}

#[test]
fn a_nul_in_a_chunk_refuses_the_message_and_relays_nothing() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    assert_eq!(h.send(b"BDAT 5 LAST\r\na\0bcd"), "554 5.6.0 message refused: NUL in the body\r\n");
    assert!(h.hop.messages.is_empty());
    assert_eq!(h.closed, 1, "the next hop's DATA abandoned with its connection");
    assert!(matches!(h.transactions()[0].outcome, Outcome::Undelivered(Undelivered::Body(_))));
}

#[test]
fn pipelined_envelope_and_chunks_are_answered_in_order() {
    let mut h = Harness::new();
    h.greet();
    let got = h.send(
        b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<w@elsewhere.test>\r\n\
          BDAT 4\r\nab\r\nBDAT 3 LAST\r\ncd\n",
    );
    let replies: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(replies.len(), 5, "{got}");
    assert_eq!(
        replies[..4],
        [
            "250 2.1.0 sender OK\r\n",
            "250 2.1.5 recipient OK\r\n",
            "550 5.7.1 relay access denied\r\n",
            "250 2.0.0 4 octets received\r\n"
        ]
    );
    assert!(replies[4].starts_with(QUEUED));
    assert_eq!(h.last_body(), "ab\r\ncd\r\n");
}

#[test]
fn rset_between_chunks_abandons_the_message() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    assert_eq!(h.send(b"BDAT 3\r\nabc"), "250 2.0.0 3 octets received\r\n");
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(h.closed, 1, "no RSET can reach a next hop inside DATA: its connection goes");
    assert!(h.hop.messages.is_empty());
    assert!(h.deliver("u@example.com", b"Subject: after\r\n\r\nok\r\n.\r\n").starts_with(QUEUED));
}

#[test]
fn a_next_hop_refusing_data_refuses_the_chunk() {
    let mut h = Harness::new();
    h.hop.lax = true;
    h.greet();
    h.envelope();
    h.hop.refuse_data = Some("554 5.7.1 no thanks");
    assert_eq!(h.send(b"BDAT 3\r\nabc"), "554 5.7.1 no thanks\r\n");
    assert_eq!(h.send(b"BDAT 1 LAST\r\nz"), "503 5.5.1 send MAIL first\r\n");
}

#[test]
fn a_next_hop_that_takes_bdat_gets_the_chunks_as_chunks() {
    let mut h = Harness::new();
    h.hop.ehlo.push("CHUNKING");
    h.greet();
    h.envelope();
    // bare LFs and NUL-free binary pass as they are; the next hop answers each chunk
    assert_eq!(h.send(b"BDAT 4\r\na\nb\r"), "250 2.0.0 chunk taken\r\n");
    assert!(h.hop.commands.iter().any(|c| c.starts_with("BDAT ") && !c.ends_with("LAST")), "{:?}", h.hop.commands);
    assert!(!h.hop.commands.iter().any(|c| c == "DATA"));
    assert!(h.send(b"BDAT 3 LAST\r\n\n.x").starts_with(QUEUED));
    let message = h.hop.messages.last().unwrap().clone();
    assert!(message.starts_with(b"Received: "), "the trace header comes first, in the first chunk");
    assert!(message.ends_with(b"+0000\r\na\nb\r\n.x"), "{:?}", String::from_utf8_lossy(&message));
    // the next hop's refusal of the whole message is the peer's reply to LAST
    h.hop.dot_reply = Some("554 5.7.1 not this one");
    h.envelope();
    assert_eq!(h.send(b"BDAT 2 LAST\r\nno"), "554 5.7.1 not this one\r\n");
    assert!(matches!(h.transactions().last().unwrap().outcome, Outcome::Undelivered(Undelivered::MessageRefused(554))));
    // a NUL: the next hop's connection goes before the message can end, the peer gets 554
    h.hop.dot_reply = None;
    h.envelope();
    let closed = h.closed;
    assert_eq!(h.send(b"BDAT 3 LAST\r\na\0b"), "554 5.6.0 message refused: NUL in the body\r\n");
    assert_eq!(h.closed, closed + 1);
    assert_eq!(h.hop.accepted, 1);
}

#[test]
fn the_size_offered_follows_the_next_hops() {
    let mut h = Harness::with_config(&CONFIG.replace("max_message_size = \"1KiB\"", "max_message_size = \"10MiB\""));
    h.hop.ehlo = vec!["PIPELINING", "8BITMIME", "SIZE 5000"];
    let ehlo = h.send(b"EHLO client.test\r\n");
    assert!(ehlo.contains("250-SIZE 10485760\r\n"), "nothing learned yet: our own limit\n{ehlo}");
    assert!(h.deliver("u@example.com", b"Subject: x\r\n\r\ny\r\n.\r\n").starts_with(QUEUED));
    // the next hop said SIZE 5000: that, less room for our trace header, from now on
    let ehlo = h.send(b"EHLO client.test\r\n");
    assert!(ehlo.contains("250-SIZE 3976\r\n"), "{ehlo}");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test> SIZE=3977\r\n"), "552 5.3.4 message size exceeds the limit\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test> SIZE=3976\r\n"), "250 2.1.0 sender OK\r\n");
    // another session of the same snapshot knows it too
    let mut other = Harness::with_settings_of(&h);
    assert!(other.send(b"EHLO other.test\r\n").contains("250-SIZE 3976\r\n"));
}

#[test]
fn dsn_is_offered_when_the_next_hops_take_it_and_its_parameters_pass_verbatim() {
    let mut h = Harness::new();
    h.hop.ehlo.push("DSN");
    let ehlo = h.send(b"EHLO client.test\r\n");
    assert!(!ehlo.contains("DSN"), "no next hop known yet: not offered\n{ehlo}");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test> RET=HDRS\r\n"), "555 5.5.4 unsupported parameter\r\n");
    h.envelope();
    assert!(h.send(b"BDAT 0 LAST\r\n").starts_with(QUEUED), "a first message: the next hop's EHLO is known");
    let ehlo = h.send(b"EHLO client.test\r\n");
    assert!(ehlo.contains("250-DSN\r\n"), "{ehlo}");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ+2B1\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(
        h.send(b"RCPT TO:<u@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40example.com\r\n"),
        "250 2.1.5 recipient OK\r\n"
    );
    let commands = h.hop.commands.clone();
    assert!(commands.contains(&"MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ+2B1".to_owned()), "{commands:?}");
    assert!(
        commands.contains(&"RCPT TO:<u@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40example.com".to_owned())
    );
    // malformed values and repeats: 501, nothing forwarded
    for (rcpt, why) in [
        ("NOTIFY=SOMETIMES", "not a NOTIFY value"),
        ("NOTIFY=NEVER NOTIFY=NEVER", "given twice"),
        ("ORCPT=u@example.com", "no address type"),
        ("ORCPT=rfc822;a=b", "= is not xtext"),
        ("ORCPT=rfc822;a+2", "a short hex escape"),
    ] {
        let line = format!("RCPT TO:<v@example.com> {rcpt}\r\n");
        assert_eq!(h.send(line.as_bytes()), "501 5.5.4 malformed DSN parameter\r\n", "{why}");
    }
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test> RET=MOST\r\n"), "501 5.5.4 malformed DSN parameter\r\n");
    let long = format!("MAIL FROM:<a@client.test> ENVID={}\r\n", "x".repeat(101));
    assert_eq!(h.send(long.as_bytes()), "501 5.5.4 malformed DSN parameter\r\n", "ENVID over 100");
}

#[test]
fn the_mail_log_names_recipients_and_the_next_hops_id() {
    let mut h = Harness::with_config(&CONFIG.replace("max_recipients = 5", "max_recipients = 20"));
    h.greet();
    h.hop.dot_reply = Some("250 2.0.0 Ok: queued as 783DA98C2DC");
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    for i in 0..12 {
        let rcpt = format!("RCPT TO:<u{i}@example.com>\r\n");
        assert_eq!(h.send(rcpt.as_bytes()), "250 2.1.5 recipient OK\r\n");
    }
    assert_eq!(h.send(b"RCPT TO:<x@elsewhere.test>\r\n"), "550 5.7.1 relay access denied\r\n");
    let got = h.send(b"BDAT 2 LAST\r\nhi");
    assert!(got.starts_with(QUEUED) && got.ends_with(" (next hop: 783DA98C2DC)\r\n"), "both ids: {got}");
    let t = h.transactions().remove(0);
    assert_eq!((t.accepted, t.to.len(), t.hop_id.as_deref()), (12, 10, Some("783DA98C2DC")));
    let line = t.to_string();
    assert!(line.contains(" to=<u0@example.com>,<u1@example.com>,"), "{line}");
    assert!(line.contains(",<u9@example.com>,+2 next_hop=127.0.0.1:2526 hop_id=783DA98C2DC "), "{line}");
}

#[test]
fn the_next_hops_id_is_read_from_its_words_and_only_when_plain() {
    let reply = |text: &str| Reply { code: 250, lines: vec![text.to_owned()] };
    let id = |text: &str| forward::hop_queue_id(&reply(text));
    assert_eq!(id("2.0.0 Ok: queued as 783DA98C2DC").as_deref(), Some("783DA98C2DC"), "Postfix");
    assert_eq!(id("OK id=1xacbV-0003kk-2O").as_deref(), Some("1xacbV-0003kk-2O"), "Exim");
    assert_eq!(id("2.0.0 OK: queued as 6B16EE1D000000 (next hop: 1)").as_deref(), Some("6B16EE1D000000"), "mxgate");
    assert_eq!(id("2.0.0 Ok"), None);
    assert_eq!(id("queued as <script>"), None, "not plain: left out");
    assert_eq!(id(&format!("queued as {}", "a".repeat(65))), None, "too long");
}

#[test]
fn a_next_hop_that_cannot_be_reached_is_skipped_until_its_backoff_is_over() {
    let mut h = Harness::new();
    h.unreachable = vec![0];
    h.greet();
    assert!(h.deliver("u@example.com", b"Subject: 1\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(h.dials, [(0, true), (1, true)], "hop 0 failed, hop 1 took it");
    // another session of the snapshot: hop 0 is down, straight to hop 1
    let session = |h: &Harness, after: u64| {
        let mut s = Harness::with_settings_of(h);
        s.now = h.now + Duration::from_secs(after);
        s.unreachable = h.unreachable.clone();
        s.greet();
        s
    };
    let mut s = session(&h, 1);
    assert!(s.deliver("u@example.com", b"Subject: 2\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(s.dials, [(1, true)], "hop 0 skipped while down");
    // its backoff (5 s) over: one probe, which fails; the next backoff is 10 s
    let mut s = session(&h, 6);
    assert!(s.deliver("u@example.com", b"Subject: 3\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(s.dials, [(0, true), (1, true)], "probed");
    let mut s = session(&h, 12);
    assert!(s.deliver("u@example.com", b"Subject: 4\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(s.dials, [(1, true)], "10 s from the failed probe: still skipped");
    // reachable again: the next probe brings it back
    h.unreachable.clear();
    let mut s = session(&h, 17);
    assert!(s.deliver("u@example.com", b"Subject: 5\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(s.dials, [(0, true)], "probed, up");
    let mut s = session(&h, 18);
    assert!(s.deliver("u@example.com", b"Subject: 6\r\n\r\nx\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(s.dials, [(0, true)], "up: first in order again");
}

#[test]
fn every_next_hop_down_is_451_at_once() {
    let mut h = Harness::new();
    h.unreachable = vec![0, 1];
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert_eq!(h.dials, [(0, true), (1, true)]);
    let mut s = Harness::with_settings_of(&h);
    s.now = h.now + Duration::from_secs(1);
    s.greet();
    assert_eq!(s.send(b"MAIL FROM:<a@client.test>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert!(s.dials.is_empty(), "both known down: not tried, no wait");
    let t = s.transactions();
    assert_eq!(t[0].outcome, Outcome::Undelivered(Undelivered::HopFailed(HopFault::AllDown)));
}

#[test]
fn the_peer_is_introduced_to_a_next_hop_by_xclient_before_each_transaction() {
    let mut h = Harness::new();
    h.session.set_port(40007);
    h.hop.ehlo.push("XCLIENT NAME ADDR PORT PROTO HELO LOGIN");
    assert!(h.send(b"EHLO client+x.test\r\n").starts_with("250-mx.test"));
    // pipelined envelope: the RCPT waits for the next hop to greet again after XCLIENT
    let got = h.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\n");
    assert_eq!(got, "250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n");
    let commands = h.hop.commands.clone();
    let xclient = "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40007 HELO=client+2Bx.test PROTO=ESMTP";
    let at = commands.iter().position(|c| c == xclient).unwrap_or_else(|| panic!("{commands:?}"));
    // the HELO and PROTO it carried stand in the next hop's new session: MAIL follows its
    // greeting, one round trip in all
    assert!(commands[at + 1].starts_with("MAIL FROM:<a@client.test>"), "{commands:?}");
    assert!(!commands.iter().any(|c| c.contains("LOGIN=")), "LOGIN never");
    assert!(h.send(b"BDAT 1 LAST\r\nx").starts_with(QUEUED));
    // the next transaction on the same connection is introduced again
    h.envelope();
    assert_eq!(h.hop.commands.iter().filter(|c| c.starts_with("XCLIENT ")).count(), 2);

    // a next hop whose XCLIENT takes no HELO (Exim's) is greeted with EHLO again
    let mut h = Harness::new();
    h.hop.ehlo.push("XCLIENT ADDR NAME PORT LOGIN DESTADDR DESTPORT");
    h.greet();
    h.envelope();
    let commands = h.hop.commands.clone();
    let at = commands.iter().position(|c| c.starts_with("XCLIENT ")).unwrap_or_else(|| panic!("{commands:?}"));
    assert_eq!(commands[at], "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7");
    assert!(commands[at + 1].starts_with("EHLO "), "greeted again, EHLO again: {commands:?}");
    assert!(commands[at + 2].starts_with("MAIL FROM:"), "{commands:?}");
}

#[test]
fn xforward_goes_ahead_of_mail_and_off_means_off() {
    let mut h = Harness::new();
    h.hop.ehlo.push("XFORWARD NAME ADDR PROTO HELO SOURCE");
    h.greet();
    h.envelope();
    let commands = h.hop.commands.clone();
    let at = commands.iter().position(|c| c.starts_with("XFORWARD ")).expect("XFORWARD");
    assert_eq!(commands[at], "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 HELO=client.test PROTO=ESMTP");
    assert!(commands[at + 1].starts_with("MAIL FROM:"), "{commands:?}");
    let mut off = Harness::with_config(&format!("{CONFIG}forward_client = \"off\"\n"));
    off.hop.ehlo.push("XCLIENT NAME ADDR PORT PROTO HELO");
    off.greet();
    off.envelope();
    assert!(!off.hop.commands.iter().any(|c| c.starts_with("XCLIENT")), "{:?}", off.hop.commands);
}

// ---- routes ------------------------------------------------------------------------------

/// CONFIG with a route: `.example.org` to 127.0.0.1:2528 (dialled as hop 2), then 2527.
fn routed() -> Harness {
    Harness::with_config(&format!(
        "{CONFIG}[[relay.route]]\ndomains = [\".example.org\"]\nnext_hops = [\"127.0.0.1:2528\", \"127.0.0.1:2527\"]\n"
    ))
}

const OTHER_ROUTE_452: &str = "452 4.5.3 recipient of another route: send it in another transaction\r\n";

#[test]
fn a_route_takes_the_transaction_of_its_first_recipient() {
    let mut h = routed();
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert!(h.dials.is_empty(), "MAIL waits for its first recipient: the route follows it");
    assert_eq!(h.send(b"RCPT TO:<u@mail.example.org>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert_eq!(h.dials, [(2, true)], "the route's first next hop");
    assert_eq!(h.hop.commands[1..], ["MAIL FROM:<a@client.test>", "RCPT TO:<u@mail.example.org>"]);
    assert_eq!(h.send(b"RCPT TO:<v@example.org>\r\n"), "250 2.1.5 recipient OK\r\n");
    // another route's recipient: sent again by the peer, in a transaction of its own
    assert_eq!(h.send(b"RCPT TO:<w@example.com>\r\n"), OTHER_ROUTE_452);
    assert_eq!(h.send(b"RCPT TO:<postmaster>\r\n"), OTHER_ROUTE_452, "postmaster: the default route");
    assert!(h.send(b"DATA\r\n").starts_with("354"));
    assert!(h.send(b"x\r\n.\r\n").starts_with(QUEUED));
    let events = h.events();
    assert!(!events.iter().any(|e| matches!(e, Event::Failed(_))), "a 452 for a route is no failure");
    assert_eq!(h.hop.envelopes[0].1, ["RCPT TO:<u@mail.example.org>", "RCPT TO:<v@example.org>"]);
    let Some(Event::Transaction(first)) = events.last() else { panic!("{events:?}") };
    let line = first.to_string();
    assert!(line.contains(" rcpt=2/2 "), "{line}");
    assert!(line.contains(" route=.example.org next_hop=127.0.0.1:2528 "), "{line}");

    // the next transaction, to the default route: the connection goes back to the pool
    assert!(h.deliver("w@example.com", b"y\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(h.dials, [(2, true), (0, true)]);
    assert_eq!(h.released, 1);
    // and back: the route's connection comes from the pool
    assert!(h.deliver("u@example.org", b"z\r\n.\r\n").starts_with(QUEUED));
    assert_eq!((h.dials.len(), h.pool.len()), (3, 1), "the default route's connection is pooled now");
    let line = h.transactions()[0].to_string();
    assert!(line.contains(" route=default next_hop=127.0.0.1:2526 "), "{line}");
}

#[test]
fn a_pipelined_routed_batch_goes_in_one_write_and_answers_in_order() {
    let mut h = routed();
    h.greet();
    let got = h.send(
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<v@example.org>\r\n\
          RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<w@example.com>\r\nDATA\r\n",
    );
    assert_eq!(
        got,
        format!(
            "250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n{OTHER_ROUTE_452}550 5.7.1 relay access denied\r\n\
             250 2.1.5 recipient OK\r\n{GO_AHEAD}"
        )
    );
    assert_eq!(h.dials, [(0, true)]);
    let batch = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<w@example.com>\r\nDATA\r\n";
    assert!(h.hop.writes.iter().any(|w| w == batch), "one write: {:?}", h.hop.writes);
    assert_eq!(h.hop.envelopes.len(), 0);
    assert!(h.send(b"x\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(h.hop.envelopes[0].1, ["RCPT TO:<u@example.com>", "RCPT TO:<w@example.com>"]);
}

#[test]
fn a_sender_refused_after_our_250_refuses_each_recipient() {
    let mut h = routed();
    h.hop.refuse_mail = Some("550 5.7.1 sender refused");
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.org>\r\n"), "550 5.7.1 sender refused\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.com>\r\n"), "550 5.7.1 sender refused\r\n", "whatever the route");
    assert_eq!(h.send(b"DATA\r\n"), "554 5.5.1 no valid recipients\r\n");
    // one failure for the refused sender, as without routes; the recipients' refusals
    // follow from it (DATA without a recipient is the peer's own)
    let events = h.events();
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Recipient)).count(), 0, "{events:?}");
    assert_eq!(events.iter().filter(|e| **e == Event::Failed(Failure::Command)).count(), 2, "{events:?}");
    assert_eq!(h.hop.commands.last().map(String::as_str), Some("RSET"), "the connection is clean again");
    // RSET and a new transaction: the next hop takes this sender
    h.hop.refuse_mail = None;
    assert_eq!(h.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert!(h.deliver("u@example.org", b"y\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(h.dials, [(2, true)], "one connection throughout");
}

#[test]
fn a_routes_hops_fail_over_in_its_order_and_a_dead_route_is_451_per_recipient() {
    let mut h = routed();
    h.unreachable = vec![2];
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.org>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert_eq!(h.dials, [(2, true), (1, true)], "the route's second next hop, not the default's first");
    assert!(h.send(b"DATA\r\n").starts_with("354"));
    assert!(h.send(b"x\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(h.transactions()[0].next_hop, Some("127.0.0.1:2527".parse().unwrap()));

    // both of the route's next hops unreachable: each recipient 451, the transaction
    // stays, and a recipient of the default route may still open it
    let mut h = routed();
    h.unreachable = vec![2, 1];
    h.greet();
    assert_eq!(h.send(b"MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    assert_eq!(h.send(b"RCPT TO:<u@example.org>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert_eq!(h.send(b"RCPT TO:<v@example.org>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert_eq!(h.dials, [(2, true), (1, true)], "both down now: the second recipient tries none");
    assert_eq!(h.send(b"RCPT TO:<w@example.com>\r\n"), "250 2.1.5 recipient OK\r\n");
    assert!(h.send(b"DATA\r\n").starts_with("354"));
    assert!(h.send(b"x\r\n.\r\n").starts_with(QUEUED));
    assert!(!h.events().iter().any(|e| matches!(e, Event::Failed(_))), "451s are no failures");
}

#[test]
fn a_next_hops_replies_and_the_time_waited_for_them_are_counted_per_transaction() {
    let mut h = Harness::new();
    h.greet();
    h.envelope();
    // the next hop takes 3 s to answer DATA
    h.hop.hold_data_reply = true;
    assert_eq!(h.send(b"DATA\r\n"), "");
    h.now += Duration::from_secs(3);
    let held = std::mem::take(&mut h.hop.held);
    h.hop.hold_data_reply = false;
    h.session.handle_relay_input(&mut h.link, &held, h.now);
    assert!(h.drive().starts_with("354"));
    let report = h.session.settings.hop_book.report();
    assert_eq!(report[0].replies, 0, "added once the transaction ends, not per reply");
    let waits: Vec<Duration> = std::iter::from_fn(|| h.session.poll_event())
        .filter_map(|e| match e {
            Event::HopReply(waited) => Some(waited),
            _ => None,
        })
        .collect();
    assert_eq!(waits, [Duration::ZERO, Duration::ZERO, Duration::from_secs(3)], "each reply, for the histogram");
    assert!(h.send(b"x\r\n.\r\n").starts_with(QUEUED));
    let report = h.session.settings.hop_book.report();
    assert_eq!(report[0].replies, 4, "MAIL, RCPT, DATA, the final dot");
    assert_eq!(report[0].reply_seconds, 3.0, "the clock moved only while DATA was answered");
    let t = h.transactions().remove(0);
    assert_eq!(t.relay, Some(Duration::ZERO), "the final reply came at once after the dot");
    assert_eq!((report[1].replies, report[1].reply_seconds), (0, 0.0));
}
