//! The fuzz targets' bodies: every parser that reads outside bytes, driven by arbitrary
//! input, with the invariants each must keep asserted. `fuzz/` (cargo-fuzz, nightly) runs
//! them under libFuzzer; `tests/fuzz_corpus.rs` (stable) replays every seed and every
//! input a campaign kept, so CI keeps them passing.
//!
//! | target     | outside bytes                         | what must hold                                   |
//! |------------|---------------------------------------|--------------------------------------------------|
//! | `session`  | a peer (and a scripted next hop)      | no 250 after DATA without the hop's 250; replies bounded; it settles |
//! | `proxy`    | a balancer's PROXY v1/v2 header       | consumed within the bytes; a v1 header within its line |
//! | `dns`      | a DNS server's answer                 | only an answer to the question asked is taken    |
//! | `upstream` | a next hop's replies                  | events only for commands sent; a failure ends it |
//! | `config`   | the operator's config, lists, ban file | a clear error or a value, never a panic        |
//! | `control`  | a control-socket request              | an answer for every line                         |
//! | `fleet`    | what Redis holds and publishes        | a ban or an error; an end within 100 years       |
//!
//! Nothing here reads a socket or a clock: time is the input's.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, RelayTls};
use crate::datetime::UnixTime;
use crate::peer::PeerIp;
use crate::scripted::ScriptedHop;
use crate::smtp::client::{Command, Progress, Upstream};
use crate::smtp::{HopTransmit, Link, Session, Settings, Transmit};

/// The session's configuration: small limits, so that the input reaches them.
const SESSION_CONFIG: &str = "hostname = \"mx.test\"\n[smtp]\nmax_recipients = 5\nmax_message_size = \"2KiB\"\n\
    command_timeout = \"60s\"\ndata_timeout = \"30s\"\nmin_data_rate = \"0\"\n[abuse]\nmax_failed_commands = 8\n\
    max_failed_recipients = 4\n[relay]\ndomains = [\"example.com\"]\nnext_hops = [\"127.0.0.1:2526\"]\nreply_timeout = \"20s\"\n";

/// The same, with a route: recipients of `.example.org` go to a next hop of their own
/// (MAIL waits for the first recipient, whose route the transaction keeps).
const ROUTED: &str = "[[relay.route]]\ndomains = [\".example.org\"]\nnext_hops = [\"127.0.0.1:2527\"]\n";

/// Most bytes a session may answer a command line with (the EHLO reply is the longest).
const MAX_REPLY: usize = 600;

/// The SMTP session driven by a peer's arbitrary bytes, against a scripted next hop, on
/// a clock the input moves. Input: one byte of hop behaviour (what it refuses, what it
/// offers: PIPELINING and SIZE or not, CHUNKING, XCLIENT and DSN), then operations of one
/// byte each (`op % 8`), some followed by a length byte and that many bytes:
/// 0-3 peer bytes, 4 the clock moves by the next byte's seconds, 5 the peer's EOF,
/// 6 the next hop's connection fails, 7 shutdown (drain). An input of odd length runs
/// under the configuration with a route (`ROUTED`).
pub fn session(data: &[u8]) {
    messages_acknowledged(data);
}

/// [`session`]'s run: how many messages the peer was told were queued.
pub fn messages_acknowledged(data: &[u8]) -> usize {
    static CONFIGS: std::sync::OnceLock<[Config; 2]> = std::sync::OnceLock::new();
    let Some((&flags, mut ops)) = data.split_first() else { return 0 };
    let configs = CONFIGS.get_or_init(|| {
        let parse = |text: &str| match Config::parse(text, Path::new("fuzz.toml"), Path::new(".")) {
            Ok(config) => config,
            Err(e) => panic!("the fuzz configuration is valid: {e}"),
        };
        let routed = SESSION_CONFIG.replace("[\"example.com\"]", "[\"example.com\", \".example.org\"]") + ROUTED;
        [parse(SESSION_CONFIG), parse(&routed)]
    });
    let config = &configs[data.len() % 2];
    // fresh each run: what a run learns of its next hop (SIZE, DSN, health) is its own
    let settings = Arc::new(Settings::new(config, false));
    let start = Instant::now();
    let mut now = start;
    let peer = PeerIp::new(IpAddr::from([192, 0, 2, 7]));
    let mut s = Session::new(
        settings,
        Arc::new(crate::smtp::TransactionIds::new(UnixTime(1_795_894_760))),
        peer,
        now,
        UnixTime(1_795_894_760),
    );
    let ehlo: &[&'static str] =
        if flags & 16 == 0 { &["PIPELINING", "8BITMIME", "SIZE 100000"] } else { &["8BITMIME"] };
    let mut hop = ScriptedHop::offering(ehlo);
    if flags & 64 != 0 {
        hop.ehlo.push("CHUNKING");
    }
    if flags & 128 != 0 {
        hop.ehlo.extend(["XCLIENT NAME ADDR PORT PROTO HELO", "DSN"]);
    }
    hop.refuse_mail = (flags & 1 != 0).then_some("552 5.3.4 too big");
    hop.refuse_rcpt = (flags & 2 != 0).then_some(("", "550 5.1.1 no such user"));
    hop.rset_reply = (flags & 4 != 0).then_some("502 5.5.1 no");
    hop.dot_reply = (flags & 8 != 0).then_some("554 5.7.1 refused");
    // a hop that answers RCPT without MAIL and DATA without a recipient
    hop.lax = flags & 32 != 0;
    let mut link = Link::None;
    let (mut peer_got, mut lines_in, mut total_out) = (Vec::new(), 0usize, 0usize);
    let mut queued = 0usize;
    drive(&mut s, &mut link, &mut hop, &mut peer_got, now); // the banner
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 8 {
            0..=3 => {
                let len = ops.first().map_or(0, |&n| usize::from(n)).min(ops.len().saturating_sub(1));
                let bytes = ops.get(1..=len).unwrap_or_default();
                ops = ops.get(len + 1..).unwrap_or_default();
                if s.poll_transmit(&link) == Transmit::Receive {
                    lines_in += bytes.iter().filter(|&&b| b == b'\n').count();
                    s.handle_input(&mut link, bytes, now);
                }
            }
            4 => {
                let secs = ops.first().copied().unwrap_or(1);
                ops = ops.get(1..).unwrap_or_default();
                now += Duration::from_secs(u64::from(secs));
                if s.poll_timeout(&link).is_some_and(|t| t <= now) {
                    s.handle_timeout(&mut link, now);
                }
            }
            5 => s.handle_eof(now),
            6 => s.handle_relay_error(&mut link, now),
            _ => s.shutdown(now),
        }
        drive(&mut s, &mut link, &mut hop, &mut peer_got, now);
        queued += count(&peer_got, b"250 2.0.0 OK: queued as ");
        total_out += peer_got.len();
        peer_got.clear();
        // a bounded reply per line received (and the banner, a last 421)
        assert!(total_out <= MAX_REPLY * (lines_in + 3), "{total_out} bytes out for {lines_in} lines in");
        // no 250 to the end of data without the next hop's 250 to it
        assert!(queued <= hop.accepted, "{queued} messages acknowledged, the next hop took {}", hop.accepted);
        if s.poll_transmit(&link) == Transmit::Close {
            break;
        }
    }
    queued
}

/// Serves both ports until neither has anything to do; what the peer got is appended.
fn drive(s: &mut Session, link: &mut Link, hop: &mut ScriptedHop, peer_got: &mut Vec<u8>, now: Instant) {
    for _ in 0..10_000 {
        let mut busy = false;
        if let Transmit::Send(bytes) = s.poll_transmit(link) {
            assert!(bytes.len() <= MAX_REPLY * 200, "{} bytes owed to the peer at once", bytes.len());
            peer_got.extend_from_slice(bytes);
            let n = bytes.len();
            s.consume_output(n);
            busy = true;
        }
        match link.poll(s.is_open(), &s.settings().relay.next_hops) {
            HopTransmit::Connect { .. } => {
                busy = true;
                link.dialing();
                hop.disconnect();
                link.attach(Upstream::new("mx.test", RelayTls::Off), false);
                s.link_attached(link, now);
                s.handle_relay_input(link, b"220 hop ESMTP\r\n", now);
            }
            HopTransmit::Send(bytes) => {
                busy = true;
                let answers = hop.receive(bytes);
                let n = bytes.len();
                s.consume_relay_output(link, n, now);
                if !answers.is_empty() {
                    s.handle_relay_input(link, &answers, now);
                }
            }
            HopTransmit::Release | HopTransmit::Close => {
                busy = true;
                link.detach(&s.settings().relay.next_hops, s.wanted_link());
                hop.disconnect();
            }
            HopTransmit::Receive | HopTransmit::Idle => {}
        }
        if !busy {
            return;
        }
    }
    panic!("the session never settles");
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The kernel's netlink answer to a batch (`kernel::acknowledgements`), from arbitrary
/// bytes: at most one acknowledgement per 16 bytes, and never a panic.
pub fn netlink(data: &[u8]) {
    if let Ok(acks) = crate::kernel::acknowledgements(data) {
        assert!(acks as usize <= data.len() / 16, "{acks} acknowledgements in {} bytes", data.len());
    }
}

/// A balancer's PROXY header, v1 or v2, read from arbitrary bytes.
pub fn proxy(data: &[u8]) {
    if let crate::proxy::Parsed::Done { consumed, header } = crate::proxy::parse(data) {
        assert!(consumed <= data.len(), "consumed {consumed} of {} bytes", data.len());
        if data.starts_with(b"PROXY ") {
            assert!(consumed <= 107, "a v1 header is one line of at most 107 bytes");
        }
        let _ = header;
    }
}

/// A DNS server's datagram, as the answer to a blocklist query in flight: the first two
/// bytes are replaced by the query's id (so the input reaches past the id check), the
/// third byte picks where it came from (the server asked, or another port).
pub fn dns(data: &[u8]) {
    let server: SocketAddr = ([127, 0, 0, 1], 53).into();
    let now = Instant::now();
    let mut resolver =
        crate::screen::dnsbl::Resolver::with_cache_slots(vec![server], Duration::from_secs(2), Box::new(|| 0x1234), 16);
    let peer = IpAddr::from([192, 0, 2, 7]);
    assert!(resolver.lookup(1u32, peer, "zen.example.org", now).is_none(), "nothing cached yet");
    let Some((_, query)) = resolver.poll_transmit() else { panic!("a query goes out") };
    let mut answer = data.to_vec();
    if answer.len() >= 2 {
        answer[..2].copy_from_slice(&query[..2]);
    }
    let from = if data.get(2).is_some_and(|b| b & 1 == 1) { ([127, 0, 0, 1], 5353).into() } else { server };
    resolver.handle_datagram(from, &answer, now);
    while let Some((token, _, _)) = resolver.poll_event() {
        assert_eq!(token, 1, "an answer only for the query asked");
        assert_eq!(from, server, "an answer only from the server asked");
    }
    resolver.handle_timeout(now + Duration::from_secs(3));
}

/// A next hop's replies, in the pieces the input cuts them into, to a client that sends
/// MAIL, RCPT, DATA, the body, the dot and RSET as it becomes ready.
pub fn upstream(data: &[u8]) {
    let mut up = Upstream::new("mx.test", RelayTls::Off);
    let mut sent = 0usize;
    let mut answered = 0usize;
    for piece in data.split(|&b| b == 0xff) {
        up.handle_input(piece);
        let out = up.output().len();
        up.consume_output(out);
        while let Some(event) = up.poll_event() {
            match event {
                // commands go only to a client that is ready (Command's precondition): a
                // failure may already be behind the event in the same input
                Progress::Ready if up.is_ready() => {
                    for (cmd, line) in [
                        (Command::Mail, &b"MAIL FROM:<a@b.test>"[..]),
                        (Command::Rcpt, b"RCPT TO:<c@example.com>"),
                        (Command::Data, b"DATA"),
                    ] {
                        up.command(cmd, line);
                        sent += 1;
                    }
                }
                Progress::Reply(Command::Data, reply) if reply.code == 354 && up.is_ready() => {
                    answered += 1;
                    up.send_data(b"hi\r\n");
                    up.end_data();
                    up.command(Command::Rset, b"RSET");
                    sent += 2;
                }
                Progress::Ready => {}
                Progress::Reply(_, _) => answered += 1,
                Progress::Failed(_) | Progress::NoTls(_) => return,
            }
            assert!(answered <= sent, "{answered} replies to {sent} commands");
        }
    }
}

/// The operator's files: the configuration, an access list and a ban file, all from the
/// same bytes.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("fuzz.toml"), Path::new("/nonexistent"));
    }
    let mut problems = Vec::new();
    let _ = crate::access::list::parse(data, Path::new("fuzz.list"), &mut problems);
    if let Ok(bans) = crate::abuse::file::parse(data, Path::new("bans.list")) {
        for (_, ban) in bans {
            assert!((1..=crate::abuse::file::MAX_OFFENCE).contains(&ban.offence));
            assert!(ban.until < 253_402_300_800, "until within 9999");
        }
    }
}

/// A request on the control socket.
pub fn control(data: &[u8]) {
    if let crate::control::Request::Ban { secs, .. } = crate::control::parse_request(data) {
        assert!((0..=crate::abuse::bans::MAX_BAN_SECS).contains(&secs));
    }
}

/// What Redis holds (a ban key's value) and what its channel carries (a message).
pub fn fleet(data: &[u8]) {
    if let Ok((_, ban)) = crate::cluster::wire::parse_ban(data) {
        assert!((1..=crate::abuse::file::MAX_OFFENCE).contains(&ban.offence));
    }
    let _ = crate::cluster::wire::parse_message(data);
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (for the corpus replay).
pub const TARGETS: [(&str, Target); 8] = [
    ("session", session),
    ("proxy", proxy),
    ("dns", dns),
    ("upstream", upstream),
    ("config", config),
    ("control", control),
    ("fleet", fleet),
    ("netlink", netlink),
];
