//! Relaying end to end: the real binary, both drivers, a recording next hop on loopback.

#[macro_use]
mod common;

use common::config::Config;

use std::net::{SocketAddr, TcpStream};

use common::exim;
use common::nexthop::{AtDot, NextHop};
use common::{End, Mxgate, connect_from, read_replies, read_to_end, send};

fn config(next_hops: &[SocketAddr], extra: &str) -> String {
    Config::new().relay_to(next_hops).extra(extra).to_string()
}

/// Connects from `source`, reads the banner, says EHLO.
fn session(m: &Mxgate, source: &str) -> TcpStream {
    let mut s = connect_from(source, m.addr());
    assert!(read_replies(&mut s, 1).starts_with("220 mx.test"));
    send(&mut s, b"EHLO client.test\r\n");
    read_replies(&mut s, 1);
    s
}

/// One transaction; returns the reply to the end of data.
fn transaction(s: &mut TcpStream, mail_params: &str, body: &[u8]) -> String {
    send(s, format!("MAIL FROM:<sender@client.test>{mail_params}\r\n").as_bytes());
    assert_eq!(read_replies(s, 1), "250 2.1.0 sender OK\r\n");
    send(s, b"RCPT TO:<user@example.com>\r\n");
    assert_eq!(read_replies(s, 1), "250 2.1.5 recipient OK\r\n");
    send(s, b"DATA\r\n");
    assert!(read_replies(s, 1).starts_with("354 "));
    send(s, body);
    read_replies(s, 1)
}

/// What follows our Received header: folded over three lines, it ends with the date.
fn after_received(message: &[u8]) -> &[u8] {
    assert!(message.starts_with(b"Received: "), "the Received header comes first");
    let end = message.windows(7).position(|w| w == b"+0000\r\n").expect("the header's date") + 7;
    &message[end..]
}

/// The client's dot-stuffing of `content` (CRLF lines) and the final dot.
fn stuffed(content: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    wire
}

fn bodies_are_relayed_byte_exact(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.1");
    let mut content = b"Subject: exact\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n \r\n".to_vec();
    content.extend_from_slice(&[b'.'; 1]);
    content.extend_from_slice(&[b'x'; 997]); // a 998-octet line starting with a dot
    content.extend_from_slice(b"\r\n");
    content.extend_from_slice("8-bit: caf\u{e9} \u{fc}ber \u{2603}\r\n".as_bytes());
    content.extend_from_slice(&[0x80, 0xfe, b'\r', b'\n']);
    let reply = transaction(&mut s, " BODY=8BITMIME", &stuffed(&content));
    assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
    let messages = hop.wait_messages(1);
    assert_eq!(messages.len(), 1);
    let got = messages[0].content();
    assert!(got.starts_with(b"Received: from client.test ([127.0.10.1])\r\n\tby mx.test (mxgate) with ESMTP id "));
    assert_eq!(after_received(&got), &content[..], "the body arrives byte-exact after the Received header");
    assert_eq!(messages[0].mail_from, "MAIL FROM:<sender@client.test> BODY=8BITMIME");
    assert_eq!(messages[0].rcpt_to, ["RCPT TO:<user@example.com>"]);
}

fn next_hop_refusals_never_become_250(io: &str) {
    for (at_dot, want) in [
        (AtDot::Reply("451 4.3.0 try later"), "451 4.3.0 try later\r\n"),
        (AtDot::Reply("554 5.7.1 spam"), "554 5.7.1 spam\r\n"),
        (AtDot::Close, "451 4.4.1 next hop unavailable, try again later\r\n"),
    ] {
        let hop = NextHop::start(at_dot);
        let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
        let mut s = session(&m, "127.0.10.2");
        assert_eq!(transaction(&mut s, "", b"hello\r\n.\r\n"), want, "{at_dot:?}");
    }
}

fn a_silent_next_hop_times_out(io: &str) {
    let hop = NextHop::start(AtDot::Silent);
    let m = Mxgate::start(&config(&[hop.addr], "reply_timeout = \"1s\"\n"), &[], io);
    let mut s = session(&m, "127.0.10.3");
    let reply = transaction(&mut s, "", b"hello\r\n.\r\n");
    assert_eq!(reply, "451 4.4.1 next hop unavailable, try again later\r\n");
    // the session goes on
    send(&mut s, b"NOOP\r\n");
    assert_eq!(read_replies(&mut s, 1), "250 2.0.0 OK\r\n");
}

fn failover_to_the_second_next_hop(io: &str) {
    let dead = common::unused_port();
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[dead, hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.4");
    assert!(transaction(&mut s, "", b"via the second\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(hop.wait_messages(1).len(), 1);
}

/// A next hop that takes connections and never says a word (hung): the first message
/// waits `reply_timeout` for its greeting and goes to the next hop in order; from then on
/// it is down, and the next message goes straight to the second hop (one WARN line says
/// so), never connecting to the hung one during its backoff.
fn a_hung_next_hop_is_skipped_after_it_timed_out(io: &str) {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("address");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hung.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream); // open and silent
        }
    });
    let hop = NextHop::start(AtDot::Accept);
    let config = config(&[hung_addr, hop.addr], "").replace("[relay]\n", "[relay]\nreply_timeout = \"1s\"\n")
        + "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let mut m = Mxgate::start(&config, &[], io);
    let mut s = session(&m, "127.0.10.10");
    assert!(transaction(&mut s, "", b"Subject: first\r\n\r\nx\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    m.wait_for_log(&format!("next hop {hung_addr} is down (timed out)"));
    let mut s = session(&m, "127.0.10.11");
    assert!(transaction(&mut s, "", b"Subject: second\r\n\r\nx\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(hop.wait_messages(2).len(), 2);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "the hung hop was not tried again");
    // the metrics say which hop is down, and its failures
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let metrics = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address");
    let mut c = connect_from("127.0.0.1", metrics.parse().expect("address"));
    send(&mut c, b"GET /metrics HTTP/1.1\r\n\r\n");
    let body = read_to_end(&mut c).0;
    assert!(body.contains(&format!("mxgate_next_hop_up{{next_hop=\"{hung_addr}\"}} 0\n")), "{body}");
    assert!(body.contains(&format!("mxgate_next_hop_up{{next_hop=\"{}\"}} 1\n", hop.addr)), "{body}");
    assert!(body.contains(&format!("mxgate_next_hop_failures_total{{next_hop=\"{hung_addr}\"}} 1\n")), "{body}");
    // the replies of the hop that took both messages: MAIL, RCPT, DATA and the dot each
    let replies = format!("mxgate_next_hop_replies_total{{next_hop=\"{}\"}} ", hop.addr);
    let count = body.lines().find_map(|l| l.strip_prefix(&replies)).and_then(|n| n.parse::<u64>().ok());
    assert_eq!(count, Some(8), "{body}");
    assert!(body.contains(&format!("mxgate_next_hop_reply_seconds_total{{next_hop=\"{}\"}} ", hop.addr)));
    // the histograms: each reply, each message's relay time and size
    for line in [
        "mxgate_next_hop_reply_seconds_count 8\n",
        "mxgate_relay_seconds_count 2\n",
        "mxgate_message_size_bytes_count 2\n",
    ] {
        assert!(body.contains(line), "{line}{body}");
    }
}

/// A next hop given by name (`localhost:port`, from /etc/hosts: no query leaves the
/// machine) is resolved when the file is loaded and relayed to.
fn a_next_hop_by_name(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let by_name =
        config(&[hop.addr], "").replace(&format!("\"{}\"", hop.addr), &format!("\"localhost:{}\"", hop.addr.port()));
    assert!(by_name.contains("\"localhost:"), "{by_name}");
    let m = Mxgate::start(&by_name, &[], io);
    let mut s = session(&m, "127.0.10.12");
    assert!(transaction(&mut s, "", b"Subject: by name\r\n\r\nx\r\n.\r\n").starts_with("250 2.0.0"));
    assert_eq!(hop.wait_messages(1).len(), 1);
}

/// `[[relay.route]]`: recipients of `.example.org` go to their own next hop, the rest to
/// `next_hops`; one transaction goes to one of them (another route's recipient: 452, sent
/// again in the next transaction), and a session switching routes gives its idle
/// connection back to the pool and takes it again.
fn routes_send_each_domain_to_its_next_hop(io: &str) {
    let (default, routed) = (NextHop::start(AtDot::Accept), NextHop::start(AtDot::Accept));
    let text = Config::new()
        .relay_to(&[default.addr])
        .set("relay", "domains", "[\"example.com\", \".example.org\"]")
        .extra(&format!("[[relay.route]]\ndomains = [\".example.org\"]\nnext_hops = [\"{}\"]\n", routed.addr))
        .to_string();
    let mut m = Mxgate::start(&text, &[], io);
    let start = m.saw("mxgate listening").expect("the start-up line").to_owned();
    assert!(start.contains(" relay_domains=example.com,.example.org "), "{start}");
    assert!(start.contains(&format!(" next_hops={},{} ", default.addr, routed.addr)), "{start}");
    let mut s = session(&m, "127.0.10.13");
    let mut deliver = |rcpts: &[&str]| {
        send(&mut s, b"MAIL FROM:<sender@client.test>\r\n");
        assert_eq!(read_replies(&mut s, 1), "250 2.1.0 sender OK\r\n");
        let mut replies = Vec::new();
        for rcpt in rcpts {
            send(&mut s, format!("RCPT TO:<{rcpt}>\r\n").as_bytes());
            replies.push(read_replies(&mut s, 1));
        }
        send(&mut s, b"DATA\r\n");
        assert!(read_replies(&mut s, 1).starts_with("354 "));
        send(&mut s, b"Subject: routed\r\n\r\nx\r\n.\r\n");
        assert!(read_replies(&mut s, 1).starts_with("250 2.0.0 OK: queued as "));
        replies
    };
    let replies = deliver(&["a@example.com", "b@mail.example.org", "c@example.com"]);
    assert_eq!(replies[0], "250 2.1.5 recipient OK\r\n");
    assert_eq!(replies[1], "452 4.5.3 recipient of another route: send it in another transaction\r\n");
    assert_eq!(replies[2], "250 2.1.5 recipient OK\r\n");
    deliver(&["b@mail.example.org"]);
    deliver(&["d@example.com"]);
    let to_default = default.wait_messages(2);
    assert_eq!(to_default[0].rcpt_to, ["RCPT TO:<a@example.com>", "RCPT TO:<c@example.com>"]);
    assert_eq!(to_default[1].rcpt_to, ["RCPT TO:<d@example.com>"]);
    assert_eq!(routed.wait_messages(1)[0].rcpt_to, ["RCPT TO:<b@mail.example.org>"]);
    assert_eq!(default.connections(), 1, "the default route's connection waited in the pool");
    m.wait_for_log(&format!("route=.example.org next_hop={} ", routed.addr));
    assert_eq!(default.messages().len() + routed.messages().len(), 3);
}

fn no_next_hop_means_451(io: &str) {
    let dead = common::unused_port();
    let m = Mxgate::start(&config(&[dead], ""), &[], io);
    let mut s = session(&m, "127.0.10.5");
    send(&mut s, b"MAIL FROM:<a@client.test>\r\n");
    assert_eq!(read_replies(&mut s, 1), "451 4.4.1 next hop unavailable, try again later\r\n");
}

fn a_hundred_messages_reuse_one_connection(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.6");
    for i in 0..100 {
        let reply = transaction(&mut s, "", format!("Subject: {i}\r\n\r\nmessage {i}\r\n.\r\n").as_bytes());
        assert!(reply.starts_with("250 2.0.0"), "{i}: {reply}");
    }
    assert_eq!(hop.wait_messages(100).len(), 100);
    assert_eq!(hop.connections(), 1);
}

/// CHUNKING through the driver: a message of several chunks, the biggest far over what a
/// read or the relay's high water holds, written as a sender would (command and octets
/// in one stream), with bare LFs and a line starting with a dot inside; the next hop gets
/// it as one DATA body with CRLF line ends, the last chunk the next hop's 250.
fn bdat_chunks_are_relayed_whole(io: &str) {
    // a next hop that takes DATA gets the chunks as one DATA body
    chunks_to(NextHop::start(AtDot::Accept), io, "250 2.0.0 {n} octets received\r\n");
    // one that takes BDAT gets them as chunks, the octets as sent, and answers each
    chunks_to(NextHop::chunking(AtDot::Accept), io, "250 2.0.0 chunk taken\r\n");
}

fn chunks_to(hop: NextHop, io: &str, chunk_reply: &str) {
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.9");
    send(&mut s, b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<user@example.com>\r\n");
    assert_eq!(read_replies(&mut s, 2), "250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n");
    let line = |i: usize| format!("line {i:06} {}\n", "x".repeat(60));
    let big: String = (0..20_000).map(line).collect(); // 1.4 MB, bare LFs
    let chunks: [&[u8]; 3] = [b"Subject: chunked\r\n\r\n.dot first\n", big.as_bytes(), b"the end"];
    for (i, chunk) in chunks.iter().enumerate() {
        let last = if i == chunks.len() - 1 { " LAST" } else { "" };
        let mut wire = format!("BDAT {}{last}\r\n", chunk.len()).into_bytes();
        wire.extend_from_slice(chunk);
        send(&mut s, &wire);
        let reply = read_replies(&mut s, 1);
        if last.is_empty() {
            assert_eq!(reply, chunk_reply.replace("{n}", &chunk.len().to_string()));
        } else {
            assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
        }
    }
    let messages = hop.wait_messages(1);
    assert_eq!(messages[0].chunked, chunk_reply.contains("chunk taken"), "BDAT exactly to a hop that takes it");
    let expected = match messages[0].chunked {
        false => {
            [b"Subject: chunked\r\n\r\n.dot first\r\n".as_slice(), big.replace('\n', "\r\n").as_bytes(), b"the end\r\n"]
                .concat()
        }
        true => chunks.concat(),
    };
    assert_eq!(after_received(&messages[0].content()), &expected[..], "whole (as DATA: line ends CRLF, a last CRLF)");
}

/// A real Exim (the client Exim installations and Microsoft's resemble: BDAT whenever it
/// is offered) delivers through mxgate with CHUNKING: its whole pipelined MAIL, RCPT and
/// BDAT LAST, and the next hop gets the message with CRLF line ends.
fn a_real_exim_sends_with_chunking(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let message = b"Subject: from exim\n\nline one\n.leading dot\nlast line\n";
    let Some(sent) = exim::send(m.addr(), "user@example.com", message) else { return };
    assert!(sent.transcript.contains("will write message using CHUNKING"), "{}", sent.transcript);
    assert!(sent.transcript.contains("BDAT "), "{}", sent.transcript);
    assert!(sent.ok, "{}", sent.transcript);
    assert!(sent.transcript.contains("250 2.0.0 OK: queued as "), "{}", sent.transcript);
    let messages = hop.wait_messages(1);
    assert_eq!(messages.len(), 1);
    let content = String::from_utf8_lossy(&messages[0].content()).into_owned();
    assert!(content.contains("\r\nSubject: from exim\r\n"), "{content}");
    assert!(content.ends_with("\r\n\r\nline one\r\n.leading dot\r\nlast line\r\n"), "{content}");
}

fn sessions_reuse_pooled_connections(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], "").replace("threads = 2", "threads = 1"), &[], io);
    for i in 0..20 {
        let mut s = session(&m, &format!("127.0.11.{}", i + 1));
        assert!(transaction(&mut s, "", b"pooled\r\n.\r\n").starts_with("250 2.0.0"));
        send(&mut s, b"QUIT\r\n");
        assert_eq!(read_to_end(&mut s).0, "221 2.0.0 mx.test closing connection\r\n");
    }
    assert_eq!(hop.wait_messages(20).len(), 20);
    assert_eq!(hop.connections(), 1, "one worker, one pooled connection for 20 sessions");
}

fn smuggling_reaches_nothing(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.7");
    let body = b"Subject: a\r\n\r\nhi\n.\nMAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nevil\r\n.\r\n";
    assert_eq!(transaction(&mut s, "", body), "554 5.6.0 message refused: bare CR or LF in the body\r\n");
    // in sync, and a clean message still goes through on a new connection
    assert!(transaction(&mut s, "", b"clean\r\n.\r\n").starts_with("250 2.0.0"));
    let messages = hop.wait_messages(1);
    assert_eq!(messages.len(), 1);
    assert_eq!(hop.commands().iter().filter(|c| c.starts_with("MAIL")).count(), 2);
    assert!(!hop.commands().iter().any(|c| c.contains("evil")));
}

fn a_nul_in_the_body_is_refused_and_reaches_nothing(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.9");
    // CRLF NUL "." CRLF: the end of data to a next hop that drops NULs
    let body = b"Subject: a\r\n\r\nhi\r\n\0.\r\nMAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@example.com>\r\n\
                 DATA\r\nevil\r\n.\r\n";
    assert_eq!(transaction(&mut s, "", body), "554 5.6.0 message refused: NUL in the body\r\n");
    assert!(transaction(&mut s, "", b"clean\r\n.\r\n").starts_with("250 2.0.0"));
    let messages = hop.wait_messages(1);
    assert_eq!(messages.len(), 1);
    assert!(!messages[0].content().contains(&0), "a NUL reached the next hop");
    assert!(!hop.commands().iter().any(|c| c.contains("evil")));
}

/// Two peers flooding RCPT while the next hop sits on their MAIL (issue 19) cost the
/// process next to nothing, and another peer still gets its banner at once: each holds a
/// bounded queue of replies owed and is not read from past it. Once the hop answers,
/// the 452s for recipients past max_recipients are failures that drop them (before, every
/// RCPT was queued, each scanning the queue, and 452s were never failures).
fn a_rcpt_flood_while_the_hop_stalls_mail_is_held_back(io: &str) {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let hop = loadtest::stallhop::StallingHop::start("127.0.0.1:0").expect("the stalling hop");
    let m = Mxgate::start(&config(&[hop.addr], "reply_timeout = \"60s\"\n"), &[], io);
    let peers: Vec<TcpStream> = ["127.0.12.1", "127.0.12.2"]
        .into_iter()
        .map(|source| {
            let mut s = session(&m, source);
            send(&mut s, b"MAIL FROM:<sender@client.test>\r\n");
            s
        })
        .collect();
    common::wait_until("both MAILs at the next hop", || hop.mails() == 2);
    // one line a write, paced, so that each read ends at a line's end: every RCPT read
    // is a command the session may take
    let flood_until = Instant::now() + Duration::from_millis(2000);
    let flooders: Vec<_> = peers
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let sent = loadtest::stallhop::drip_rcpts(&mut s, flood_until, Duration::from_micros(200));
                (s, sent)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (cpu_before, started) = (m.cpu_time(), Instant::now());
    let mut slowest = Duration::ZERO;
    while Instant::now() + Duration::from_millis(200) < flood_until {
        let asked = Instant::now();
        let mut s = connect_from("127.0.12.9", m.addr());
        assert!(read_replies(&mut s, 1).starts_with("220 mx.test"));
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (cpu, wall) = (m.cpu_time() - cpu_before, started.elapsed());
    assert!(cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(), "{cpu:?} of CPU in {wall:?} of flooding");
    assert!(slowest < Duration::from_millis(300), "a fresh peer waited {slowest:?} for its banner");
    hop.release();
    for f in flooders {
        let (mut s, sent) = f.join().expect("flooder");
        assert!(sent > 500, "only {sent} RCPTs sent");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        let replies: Vec<&str> = got.lines().collect();
        assert_eq!(replies.first(), Some(&"250 2.1.0 sender OK"), "{got}");
        assert_eq!(replies.iter().filter(|r| r.starts_with("250 2.1.5")).count(), 100, "{got}");
        assert_eq!(replies.iter().filter(|r| r.starts_with("452 4.5.3")).count(), 11, "10 allowed, the 11th drops it");
        assert_eq!(replies.last(), Some(&"421 4.7.0 mx.test too many errors"), "{got}");
    }
}

/// The keys of a logfmt line as a logfmt reader sees them: `key=value` pairs, a value
/// bare up to the next space or quoted up to an unescaped quote; bare words are keys
/// without a value.
fn logfmt_keys(line: &str) -> Vec<String> {
    let (mut keys, mut chars) = (Vec::new(), line.chars().peekable());
    while chars.peek().is_some() {
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != ' ' && *c != '=')).collect();
        if chars.next_if_eq(&'=').is_some() {
            if chars.next_if_eq(&'"').is_some() {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if !escaped && c == '"' {
                        break;
                    }
                    escaped = !escaped && c == '\\';
                }
            } else {
                while chars.next_if(|c| *c != ' ').is_some() {}
            }
        }
        chars.next_if_eq(&' ');
        keys.push(key);
    }
    keys
}

/// Peer text in the log line of a message cannot forge a field (issue 19): a quoted local
/// part carrying ` result=250 peer=8.8.8.8` stays inside one quoted, escaped value, and
/// hidden characters (SMTPUTF8's U+2028, a right-to-left override) are shown escaped.
fn peer_text_cannot_forge_log_fields(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let mut m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.10");
    let reply = transaction(&mut s, "", b"hi\r\n.\r\n");
    assert!(reply.starts_with("250"), "{reply}");
    send(&mut s, b"MAIL FROM:<\"x result=250 peer=8.8.8.8\"@a.test>\r\nRSET\r\n");
    assert_eq!(read_replies(&mut s, 2), "250 2.1.0 sender OK\r\n250 2.0.0 OK\r\n");
    let line = m.wait_for_log("from=\"<\\\"x result=250");
    assert!(line.contains(r#" from="<\"x result=250 peer=8.8.8.8\"@a.test>" "#), "{line}");
    let fields = logfmt_keys(&line);
    assert_eq!(fields.iter().filter(|k| *k == "peer").count(), 1, "one peer field: {fields:?}");
    assert_eq!(fields.iter().filter(|k| *k == "result").count(), 1, "one result field: {fields:?}");
    send(&mut s, "MAIL FROM:<a\u{2028}b\u{202e}c@a.test> SMTPUTF8\r\nRSET\r\n".as_bytes());
    assert_eq!(read_replies(&mut s, 2), "250 2.1.0 sender OK\r\n250 2.0.0 OK\r\n");
    let line = m.wait_for_log(r#"from="<a\u{2028}b\u{202e}c@a.test>""#);
    assert!(!line.contains('\u{2028}') && !line.contains('\u{202e}'), "{line}");
}

/// `[log] format = "json"`: every line is a JSON object; the mail log's has the
/// transaction's fields by name, and peer text in them is escaped by the text format's
/// rule (a quote cannot end a field, a bidirectional override is written as an escape).
fn json_log_lines_name_each_field_and_escape_peer_text(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let mut m = Mxgate::start(&config(&[hop.addr], "[log]\nformat = \"json\"\n"), &[], io);
    let mut s = connect_from("127.0.10.14", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, "EHLO bad\u{202e}helo.test\r\n".as_bytes());
    let ehlo = read_replies(&mut s, 1);
    if !ehlo.starts_with("250") {
        // a HELO name we refuse: greet plainly instead
        send(&mut s, b"EHLO client.test\r\n");
        read_replies(&mut s, 1);
    }
    send(&mut s, "MAIL FROM:<\"x\\\" result=250\u{202e}\"@a.test> SMTPUTF8\r\n".as_bytes());
    assert_eq!(read_replies(&mut s, 1), "250 2.1.0 sender OK\r\n");
    send(&mut s, b"RCPT TO:<user@example.com>\r\nDATA\r\n");
    assert_eq!(read_replies(&mut s, 2), "250 2.1.5 recipient OK\r\n354 end data with <CR><LF>.<CR><LF>\r\n");
    send(&mut s, b"Subject: json\r\n\r\nx\r\n.\r\n");
    assert!(read_replies(&mut s, 1).starts_with("250 2.0.0 OK: queued as "));
    let line = m.wait_for_log(r#""message":"mail""#);
    let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(json["level"], "INFO");
    assert_eq!(json["peer"], "127.0.10.14");
    assert_eq!(json["rcpt_accepted"], 1);
    assert_eq!(json["to"], "<user@example.com>");
    assert_eq!(json["next_hop"], hop.addr.to_string());
    assert_eq!(json["result"], "250");
    assert_eq!(json["reply"], "delivered");
    for field in ["id", "helo", "size", "tls", "ms", "timestamp", "fault", "hop_id", "route"] {
        assert!(json.get(field).is_some(), "{field}: {line}");
    }
    // the sender as written, its quote and backslash kept, the override escaped
    assert_eq!(json["from"], r#"<"x\\" result=250\u{202e}"@a.test>"#, "{line}");
    assert!(!line.contains('\u{202e}'), "no raw override in the log: {line}");
    assert!(m.saw("mxgate listening").is_some_and(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
}

/// A real Postfix that trusts mxgate for XCLIENT (`smtpd_authorized_xclient_hosts`)
/// logs the peer's own address for each message, not mxgate's: its checks judge the
/// sender (Postfix offers XCLIENT only to the hosts it trusts so; to others nothing is sent).
/// The HELO and PROTO that XCLIENT carries stand in Postfix's new session: MAIL follows its
/// greeting without EHLO, even where Postfix requires HELO, and nothing is pipelined where
/// Postfix would call it improper.
#[test]
fn postfix_sees_the_peer_through_xclient() {
    let main_cf = "smtpd_authorized_xclient_hosts = 127.0.0.0/8\nsmtpd_helo_required = yes\n\
                   smtpd_helo_restrictions = reject_invalid_helo_hostname\n";
    let Some(postfix) = common::postfix::Postfix::start(main_cf) else { return };
    let m = Mxgate::start(&config(&[postfix.addr], "").replace("threads = 2", "threads = 1"), &[], "uring");
    for i in 0..2 {
        let mut s = session(&m, &format!("127.0.23.{}", 5 + i));
        for _ in 0..2 {
            assert!(transaction(&mut s, "", b"Subject: who\r\n\r\nhi\r\n.\r\n").starts_with("250 2.0.0"));
        }
    }
    for peer in ["127.0.23.5", "127.0.23.6"] {
        common::wait_until("Postfix's log names the peer for both its messages", || {
            postfix.log().matches(&format!("client=unknown[{peer}]")).count() == 2
        });
    }
    let log = postfix.log();
    assert!(!log.contains("client=localhost[127.0.0.1]"), "{log}");
    assert!(!log.contains("improper command pipelining"), "{log}");
}

/// A real Postfix offers DSN: once mxgate has heard its EHLO it offers DSN too, and
/// Postfix takes the DSN parameters mxgate passes on verbatim (a malformed one it would
/// refuse with 501).
#[test]
fn dsn_parameters_reach_postfix() {
    let Some(postfix) = common::postfix::Postfix::start("") else { return };
    let m = Mxgate::start(&config(&[postfix.addr], "").replace("threads = 2", "threads = 1"), &[], "uring");
    let mut s = session(&m, "127.0.24.1");
    assert!(transaction(&mut s, "", b"Subject: first\r\n\r\nhi\r\n.\r\n").starts_with("250 2.0.0"));
    send(&mut s, b"EHLO client.test\r\n");
    assert!(read_replies(&mut s, 1).contains("250-DSN\r\n"), "Postfix's DSN learned");
    send(&mut s, b"MAIL FROM:<sender@client.test> RET=HDRS ENVID=env+2B1\r\n");
    // a positive reply is ours; a refusal would be Postfix's own, passed on
    assert_eq!(read_replies(&mut s, 1), "250 2.1.0 sender OK\r\n", "Postfix took RET and ENVID");
    send(&mut s, b"RCPT TO:<user@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@example.com\r\n");
    assert_eq!(read_replies(&mut s, 1), "250 2.1.5 recipient OK\r\n", "and NOTIFY and ORCPT");
    send(&mut s, b"DATA\r\n");
    assert!(read_replies(&mut s, 1).starts_with("354 "));
    send(&mut s, b"Subject: dsn\r\n\r\nhi\r\n.\r\n");
    let reply = read_replies(&mut s, 1);
    // our 250 names Postfix's queue id: its queue file carries the DSN fields
    let id = reply.split("(next hop: ").nth(1).and_then(|r| r.strip_suffix(")\r\n")).expect("Postfix's id");
    let records = postfix.postcat(id);
    // ENVID's xtext decoded; RET=HDRS is 2, NOTIFY=SUCCESS,FAILURE 6 (Postfix's flags)
    let fields = ["envelope_id=env+1", "ret_flags=2", "notify_flags=6", "dsn_orig_rcpt=rfc822;user@example.com"];
    for field in fields {
        assert!(records.contains(field), "{field}: {records}");
    }
}

/// A real Postfix's `message_size_limit` becomes the SIZE mxgate offers (less room for its
/// trace header) once a connection has heard Postfix's EHLO, and a MAIL declaring more is
/// refused at once, before anything reaches Postfix.
#[test]
fn the_size_offered_follows_postfixs_limit() {
    let Some(postfix) = common::postfix::Postfix::start("message_size_limit = 20000\n") else { return };
    let m = Mxgate::start(&config(&[postfix.addr], "").replace("threads = 2", "threads = 1"), &[], "uring");
    let mut s = connect_from("127.0.22.1", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"EHLO client.test\r\n");
    assert!(read_replies(&mut s, 1).contains("250-SIZE 52428800\r\n"), "nothing learned yet");
    assert!(transaction(&mut s, "", b"Subject: first\r\n\r\nhi\r\n.\r\n").starts_with("250 2.0.0"));
    send(&mut s, b"EHLO client.test\r\n");
    let ehlo = read_replies(&mut s, 1);
    assert!(ehlo.contains("250-SIZE 18976\r\n"), "Postfix's 20000 less 1 KiB: {ehlo}");
    send(&mut s, b"MAIL FROM:<big@client.test> SIZE=19000\r\n");
    // our words, not Postfix's ("Message size exceeds fixed limit"): refused here
    assert_eq!(read_replies(&mut s, 1), "552 5.3.4 message size exceeds the limit\r\n");
}

/// Issue 19: next-hop hygiene against a real Postfix whose message_size_limit is below
/// one peer's SIZE. Its 552 reaches that peer alone (one failure, the peer's); the
/// connection gets RSET before it goes back to the pool, and 30 fresh senders after it
/// on the same worker all get 250, nothing counted against them (before: 6 of 30 got
/// 552, until one was banned); at exit the pooled connection says QUIT.
#[test]
fn a_postfix_refusal_reaches_only_the_peer_that_caused_it() {
    let Some(postfix) = common::postfix::Postfix::start("message_size_limit = 1000000\n") else { return };
    for (n, io) in ["uring", "epoll"].into_iter().enumerate() {
        let config =
            config(&[postfix.addr], "").replace("threads = 2", "threads = 1") + "[control]\nsocket = \"mxgate.sock\"\n";
        // at debug level the log shows what the next hop offered, should this fail
        let mut m = Mxgate::start_as(&config, &[], io, io, |c| {
            c.env("MXGATE_LOG", "debug");
        });
        let mut s = session(&m, &format!("127.0.21.{}", 100 + n));
        send(&mut s, b"MAIL FROM:<big@client.test> SIZE=20000000\r\n");
        let reply = read_replies(&mut s, 1);
        assert!(reply.starts_with("552 5.3.4 "), "{io}: {reply}\nPostfix's log:\n{}", postfix.log());
        send(&mut s, b"QUIT\r\n");
        read_to_end(&mut s);
        for i in 0..30 {
            let mut s = session(&m, &format!("127.0.21.{}", 1 + i + 40 * n));
            let reply = transaction(&mut s, "", b"Subject: fresh\r\n\r\nhi\r\n.\r\n");
            assert!(reply.starts_with("250 2.0.0"), "{io}: fresh sender {i}: {reply}");
            send(&mut s, b"QUIT\r\n");
            read_to_end(&mut s);
        }
        let stats = common::run_cli(&["stats"], &m.files.config()).1;
        assert!(stats.contains("\nfailures 1\n") && stats.contains("messages_delivered 30\n"), "{io}: {stats}");
        m.signal(libc::SIGTERM);
        m.wait_exit();
        // Postfix's count of that connection's commands: one RSET, and QUIT at the end
        common::wait_until("the pooled connection's QUIT", || {
            postfix.log().lines().filter(|l| l.contains(" disconnect from ") && l.contains(" quit=1")).count() > n
        });
        let log = postfix.log();
        let last = log.lines().rfind(|l| l.contains(" disconnect from ")).unwrap_or_default();
        assert!(last.contains(" rset=1 ") && last.contains(" mail=30/31 "), "{io}: {last}");
    }
}

fn improper_pipelining_is_refused_and_closed(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.8");
    send(
        &mut s,
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@outside.test>\r\nDATA\r\nMAIL FROM:<b@client.test>\r\n\
          RCPT TO:<user@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
    );
    let (got, _) = read_to_end(&mut s);
    assert!(got.ends_with("503 5.5.0 improper use of SMTP command pipelining\r\n"), "{got}");
    assert!(hop.messages().is_empty());
    assert!(!hop.commands().iter().any(|c| c.starts_with("RCPT") || c == "DATA"), "{:?}", hop.commands());
}

fn relay_is_refused_for_other_domains(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.9");
    send(&mut s, b"MAIL FROM:<a@client.test>\r\n");
    read_replies(&mut s, 1);
    for rcpt in
        ["<u@outside.test>", "<u%outside.test@example.com>", "<u@[127.0.0.1]>", "<\"u@outside.test\"@example.com>"]
    {
        send(&mut s, format!("RCPT TO:{rcpt}\r\n").as_bytes());
        assert_eq!(read_replies(&mut s, 1), "550 5.7.1 relay access denied\r\n", "{rcpt}");
    }
    assert!(!hop.commands().iter().any(|c| c.starts_with("RCPT")));
}

/// Random bodies (printable and 8-bit bytes, leading dots, empty and long lines) survive
/// the relay byte-exact: a seeded property run over one session.
fn random_bodies_survive_byte_exact(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut s = session(&m, "127.0.10.10");
    let mut rng = loadtest::prefixes::Rng::new(0x5eed);
    let mut sent = Vec::new();
    for _ in 0..40 {
        let mut content = Vec::new();
        for _ in 0..rng.below(60) {
            let len = match rng.below(10) {
                0 => 0,
                1 => 990 + rng.below(9) as usize,
                _ => rng.below(120) as usize,
            };
            let mut line: Vec<u8> = (0..len)
                .map(|_| match rng.below(20) {
                    0 => b'.',
                    1 => 0x80 + rng.below(0x80) as u8,
                    _ => b' ' + rng.below(95) as u8,
                })
                .collect();
            if rng.below(4) == 0 {
                line.insert(0, b'.');
            }
            content.extend_from_slice(&line);
            content.extend_from_slice(b"\r\n");
        }
        let reply = transaction(&mut s, " BODY=8BITMIME", &stuffed(&content));
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        sent.push(content);
    }
    let got = hop.wait_messages(sent.len());
    assert_eq!(got.len(), sent.len());
    for (message, content) in got.iter().zip(&sent) {
        assert_eq!(after_received(&message.content()), &content[..]);
    }
}

/// SIGTERM while a message is being sent: it finishes, reaches the next hop byte-exact and
/// gets 250; the same session's next MAIL gets 421; an idle session gets 421 at once; new
/// connections are refused; the process exits 0.
fn sigterm_lets_the_message_in_flight_finish(io: &str) {
    const SHUTTING_DOWN: &str = "421 4.3.2 mx.test service shutting down, closing connection\r\n";
    let hop = NextHop::start(AtDot::Accept);
    let mut m = Mxgate::start(&config(&[hop.addr], ""), &[], io);
    let mut busy = session(&m, "127.0.21.1");
    let mut idle = session(&m, "127.0.21.2");
    send(&mut busy, b"MAIL FROM:<sender@client.test>\r\n");
    assert_eq!(read_replies(&mut busy, 1), "250 2.1.0 sender OK\r\n");
    send(&mut busy, b"RCPT TO:<user@example.com>\r\n");
    assert_eq!(read_replies(&mut busy, 1), "250 2.1.5 recipient OK\r\n");
    send(&mut busy, b"DATA\r\n");
    assert!(read_replies(&mut busy, 1).starts_with("354 "));
    let content = b"Subject: drained\r\n\r\nsent before SIGTERM\r\n.and after it\r\n";
    let wire = stuffed(content);
    send(&mut busy, &wire[..30]);

    m.signal(libc::SIGTERM);
    let (got, end) = read_to_end(&mut idle);
    assert_eq!((got.as_str(), end), (SHUTTING_DOWN, End::Eof), "an idle session is told at once");
    common::wait_until("new connections are refused", || TcpStream::connect(m.addr()).is_err());

    send(&mut busy, &wire[30..]);
    let reply = read_replies(&mut busy, 1);
    assert!(reply.starts_with("250 2.0.0 OK: queued as "), "{reply}");
    let messages = hop.wait_messages(1);
    assert_eq!(after_received(&messages[0].content()), content);
    send(&mut busy, b"MAIL FROM:<sender@client.test>\r\n");
    let (got, end) = read_to_end(&mut busy);
    assert_eq!((got.as_str(), end), (SHUTTING_DOWN, End::Eof), "the next MAIL is refused");
    assert!(m.wait_exit().success(), "exit 0");
    assert_eq!(hop.messages().len(), 1);
}

for_both_drivers!(
    sigterm_lets_the_message_in_flight_finish,
    bdat_chunks_are_relayed_whole,
    bodies_are_relayed_byte_exact,
    a_silent_next_hop_times_out,
    failover_to_the_second_next_hop,
    routes_send_each_domain_to_its_next_hop,
    no_next_hop_means_451,
    a_hundred_messages_reuse_one_connection,
    sessions_reuse_pooled_connections,
    a_rcpt_flood_while_the_hop_stalls_mail_is_held_back,
    random_bodies_survive_byte_exact,
);

on_one_driver!(
    a_next_hop_by_name,
    a_hung_next_hop_is_skipped_after_it_timed_out,
    a_real_exim_sends_with_chunking,
    next_hop_refusals_never_become_250,
    smuggling_reaches_nothing,
    a_nul_in_the_body_is_refused_and_reaches_nothing,
    improper_pipelining_is_refused_and_closed,
    peer_text_cannot_forge_log_fields,
    json_log_lines_name_each_field_and_escape_peer_text,
    relay_is_refused_for_other_domains,
);
