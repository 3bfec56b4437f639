//! PROXY protocol end to end: the real binary, both drivers. Client sockets bound to
//! 127.0.8.x play trusted balancers (`proxy_protocol_from`), each header carrying the
//! client it speaks for; sockets bound elsewhere are direct peers.

#[macro_use]
mod common;

use common::config::Config;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::nexthop::{AtDot, NextHop};
use common::{DENY_PREFIX, End, Mxgate, connect_from, read_replies, read_to_end, run_cli, send};
use loadtest::proxy::{v1_header, v2_header};

const BANNER: &str = "220 mx.test ESMTP mxgate\r\n";

fn config(next_hop: SocketAddr, extra: &str) -> String {
    Config::new()
        .set("listen", "proxy_protocol_from", "[\"127.0.8.0/24\"]")
        .set("listen", "proxy_timeout", "\"1s\"")
        .set("access", "list", "\"access.list\"")
        .relay_to(&[next_hop])
        .set("control", "socket", "\"mxgate.sock\"")
        .extra(extra)
        .to_string()
}

const LIST: &str = "deny 192.0.2.66\ndeny 2001:db8::66\ndeny 127.0.8.9\n";

fn start(io: &str, extra: &str) -> (Mxgate, NextHop) {
    let hop = NextHop::start(AtDot::Accept);
    let m = Mxgate::start(&config(hop.addr, extra), &[("access.list", LIST)], io);
    (m, hop)
}

/// A connection from `balancer` that sends `header` first.
fn through(m: &Mxgate, balancer: &str, header: &[u8]) -> TcpStream {
    let mut s = connect_from(balancer, m.addr());
    send(&mut s, header);
    s
}

fn to(m: &Mxgate) -> SocketAddr {
    m.addr()
}

/// The four header kinds carrying `client` (v1 and v2; TCP4 or TCP6 by its family).
fn headers(client: &str, m: &Mxgate) -> Vec<(&'static str, Vec<u8>)> {
    let client: SocketAddr = client.parse().expect("client");
    let dst = if client.is_ipv4() { to(m) } else { "[2001:db8::25]:25".parse().expect("destination") };
    vec![("v1", v1_header(client, dst).into_bytes()), ("v2", v2_header(client, dst, &[]))]
}

fn a_denied_client_gets_the_deny_line_through_the_balancer(io: &str) {
    let (m, hop) = start(io, "");
    // a balancer on IPv6 (::1) too
    let config = config(hop.addr, "")
        .replace("[\"127.0.0.1:0\"]", "[\"127.0.0.1:0\", \"[::1]:0\"]")
        .replace("[\"127.0.8.0/24\"]", "[\"127.0.8.0/24\", \"::1\"]");
    let m6 = Mxgate::start(&config, &[("access.list", LIST)], io);
    for (client, line) in [("[2001:db8::66]:1", DENY_PREFIX), ("[2001:db8::67]:1", BANNER)] {
        let client: SocketAddr = client.parse().expect("client");
        let mut s = connect_from("::1", m6.addrs[1]);
        send(&mut s, &v2_header(client, m6.addrs[1], &[]));
        let mut got = [0u8; 256];
        let n = std::io::Read::read(&mut s, &mut got).expect("read");
        assert!(String::from_utf8_lossy(&got[..n]).starts_with(line), "{client}: {:?}", &got[..n]);
    }
    for client in ["192.0.2.66:40000", "[2001:db8::66]:40000"] {
        for (kind, header) in headers(client, &m) {
            let mut s = through(&m, "127.0.8.1", &header);
            let (got, end) = read_to_end(&mut s);
            assert!(got.starts_with(DENY_PREFIX) && got.matches("\r\n").count() == 1, "{kind} {client}: {got:?}");
            assert_eq!(end, End::Eof, "{kind} {client}");
        }
    }
}

fn an_allowed_client_is_served_and_named_in_received(io: &str) {
    let (mut m, hop) = start(io, "");
    let mut n = 0;
    for client in ["192.0.2.7:40000", "[2001:db8::7]:40001"] {
        for (kind, header) in headers(client, &m) {
            // the header and EHLO in one write: the EHLO is answered
            let mut s = through(&m, "127.0.8.2", &[&header[..], b"EHLO client.test\r\n"].concat());
            let replies = read_replies(&mut s, 2);
            assert!(replies.starts_with(BANNER) && replies.contains("250-mx.test"), "{kind} {client}: {replies}");
            send(&mut s, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
            assert!(read_replies(&mut s, 3).contains("354 "), "{kind} {client}");
            send(&mut s, b"Subject: via the balancer\r\n\r\nhi\r\n.\r\nQUIT\r\n");
            assert!(read_replies(&mut s, 2).starts_with("250 2.0.0 OK"), "{kind} {client}");
            n += 1;
            let got = hop.wait_messages(n);
            let body = String::from_utf8_lossy(&got[n - 1].wire_body).into_owned();
            let ip = client.parse::<SocketAddr>().expect("client").ip();
            let named = match ip {
                std::net::IpAddr::V4(a) => format!("([{a}])"),
                std::net::IpAddr::V6(a) => format!("([IPv6:{a}])"),
            };
            assert!(body.contains(&named) && !body.contains("127.0.8.2"), "{kind} {client}: {body}");
        }
    }
    // the balancer's unique id goes to the mail log
    let client: SocketAddr = "192.0.2.8:1".parse().expect("client");
    let header = v2_header(client, to(&m), &[(0x05, b"lb-42")]);
    let mut s = through(&m, "127.0.8.2", &[&header[..], b"EHLO c\r\nMAIL FROM:<a@c.test>\r\n"].concat());
    assert!(read_replies(&mut s, 3).ends_with("250 2.1.0 sender OK\r\n"));
    send(&mut s, b"RCPT TO:<u@example.com>\r\nDATA\r\n");
    read_replies(&mut s, 2);
    send(&mut s, b"x\r\n.\r\n");
    read_replies(&mut s, 1);
    let line = m.wait_for_log("peer=192.0.2.8 ");
    assert!(line.contains("proxy_id=lb-42"), "{line}");
}

/// Failures counted through the balancer ban the client it named, not the balancer.
fn a_ban_earned_through_the_balancer_bans_the_client(io: &str) {
    let (mut m, _hop) = start(io, "[abuse]\nfailure_threshold = 3\n");
    let addr = m.addr();
    let client = |ip: &str| v1_header(format!("{ip}:5000").parse().expect("client"), addr).into_bytes();
    let mut s = through(&m, "127.0.8.3", &[&client("192.0.2.20")[..], b"BOGUS\r\nBOGUS\r\nBOGUS\r\n"].concat());
    assert!(read_replies(&mut s, 4).starts_with(BANNER));
    m.wait_for_log("IP address 192.0.2.20 banned");
    let (got, _) = read_to_end(&mut through(&m, "127.0.8.3", &client("192.0.2.20")));
    assert!(got.starts_with(DENY_PREFIX), "the client is banned: {got:?}");
    let mut other = through(&m, "127.0.8.3", &client("192.0.2.21"));
    assert_eq!(read_replies(&mut other, 1), BANNER, "another client of the same balancer is served");
}

/// From an address outside proxy_protocol_from a header is nobody's word: the peer is
/// judged by its own address, and the header's bytes are answered as bad commands.
fn untrusted_sources_are_never_proxied(io: &str) {
    let (m, _hop) = start(io, "");
    let denied: SocketAddr = "192.0.2.66:1".parse().expect("client");
    let mut s = connect_from("127.0.9.1", m.addr());
    assert_eq!(read_replies(&mut s, 1), BANNER, "judged by its own address");
    send(&mut s, v1_header(denied, m.addr()).as_bytes());
    assert_eq!(read_replies(&mut s, 1), "500 5.5.2 command unrecognized\r\n");
    let mut s = connect_from("127.0.9.2", m.addr());
    assert_eq!(read_replies(&mut s, 1), BANNER);
    send(&mut s, &v2_header(denied, m.addr(), &[]));
    send(&mut s, b"\r\nNOOP\r\n");
    // the signature's lines and the binary rest get 500s (QUIT inside it, ending in a bare
    // LF, is never run), then the NOOP its 250
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("250 2.0.0 OK\r\n") {
        let n = std::io::Read::read(&mut s, &mut buf).expect("read");
        assert!(n > 0, "closed after {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let (noop, rest) = got.rsplit_once("250 2.0.0 OK\r\n").map(|(a, b)| (a.to_owned(), b.to_owned())).expect("noop");
    assert!(rest.is_empty() && noop.lines().count() >= 4, "{got:?}");
    assert!(noop.lines().all(|l| l.starts_with("500 5.5.2 ")), "{got:?}");
}

/// A trusted balancer's connection without a valid header: closed, no banner, counted.
fn malformed_truncated_and_late_headers_close_without_a_banner(io: &str) {
    let (m, _hop) = start(io, "");
    let client: SocketAddr = "192.0.2.7:40000".parse().expect("client");
    let mut v2 = v2_header(client, m.addr(), &[(0x05, b"abc")]);
    let mut bad_signature = v2.clone();
    bad_signature[3] = b'X';
    let mut tlv_past_end = v2.clone();
    tlv_past_end[15] -= 2;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("v1 bad port", b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 25\r\nEHLO x\r\n".to_vec()),
        ("v1 without CRLF", b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 25\nEHLO x\r\n".to_vec()),
        ("v1 108 octets", format!("PROXY UNKNOWN {}\r\n", "x".repeat(92)).into_bytes()),
        ("v2 bad signature", bad_signature),
        ("v2 TLV past the end", tlv_past_end),
        ("no header at all", b"EHLO client.test\r\n".to_vec()),
    ];
    for (what, bytes) in &cases {
        let mut s = through(&m, "127.0.8.4", bytes);
        let (got, end) = read_to_end(&mut s);
        assert_eq!((got.as_str(), &end), ("", &End::Eof), "{what}");
    }
    // truncated: half a header, then the balancer closes its side
    v2.truncate(20);
    let mut s = through(&m, "127.0.8.4", &v2);
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(read_to_end(&mut s).0, "", "truncated");
    // late: nothing within proxy_timeout (1s)
    let started = Instant::now();
    let mut s = connect_from("127.0.8.4", m.addr());
    assert_eq!(read_to_end(&mut s), (String::new(), End::Eof), "late");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed at the timeout, not before");
    common::wait_until("counted", || {
        run_cli(&["stats"], &m.files.config()).1.contains(&format!("refused_proxy_header {}\n", cases.len() + 2))
    });
}

/// LOCAL (a balancer's health check) is judged as the balancer's own address.
fn local_is_judged_as_the_balancer(io: &str) {
    let (m, _hop) = start(io, "");
    let local = |v2: Vec<u8>| {
        let mut v2 = v2;
        v2[12] = 0x20;
        v2
    };
    let header = local(v2_header("192.0.2.66:1".parse().expect("a"), m.addr(), &[]));
    let mut s = through(&m, "127.0.8.5", &header);
    assert_eq!(read_replies(&mut s, 1), BANNER, "LOCAL: the balancer's address, allowed");
    let mut s = through(&m, "127.0.8.9", &header);
    assert!(read_to_end(&mut s).0.starts_with(DENY_PREFIX), "a denied balancer's own check");
    let mut s = through(&m, "127.0.8.5", b"PROXY UNKNOWN\r\n");
    assert_eq!(read_replies(&mut s, 1), BANNER, "UNKNOWN likewise");
}

/// HAProxy (Debian's package), started on loopback in front of mxgate.
struct HaProxy {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// `send`: "send-proxy" or "send-proxy-v2". None when haproxy is not installed
    /// (outside CI; in CI that fails the test).
    fn start(backend: SocketAddr, send: &str) -> Option<Self> {
        let found = std::process::Command::new("haproxy").arg("-v").output().is_ok_and(|o| o.status.success());
        if !found {
            assert!(std::env::var("CI").is_err(), "haproxy is not installed (.ci/run installs it)");
            eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a folder");
        let addr = common::unused_port();
        let config = format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    \
             timeout server 30s\nfrontend smtp\n    bind {addr}\n    default_backend mx\nbackend mx\n    \
             server mx {backend} {send}\n"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("write haproxy.cfg");
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy");
        let h = HaProxy { child, addr, _dir: dir };
        common::wait_until("haproxy listens", || TcpStream::connect(h.addr).is_ok());
        Some(h)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real balancer: HAProxy with send-proxy and with send-proxy-v2 in front of mxgate.
fn behind_a_real_haproxy(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let config = config(hop.addr, "").replace("127.0.8.0/24", "127.0.0.1/32");
    let m = Mxgate::start(&config, &[("access.list", "deny 127.0.8.66\n")], io);
    for (i, send_proxy) in ["send-proxy", "send-proxy-v2"].into_iter().enumerate() {
        let Some(h) = HaProxy::start(m.addr(), send_proxy) else { return };
        let mut s = connect_from("127.0.8.66", h.addr);
        let (got, _) = read_to_end(&mut s);
        assert!(got.starts_with(DENY_PREFIX), "{send_proxy}: the client's address is judged: {got:?}");
        let mut s = connect_from("127.0.8.67", h.addr);
        assert_eq!(read_replies(&mut s, 1), BANNER, "{send_proxy}");
        send(&mut s, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
        assert!(read_replies(&mut s, 4).contains("354 "), "{send_proxy}");
        send(&mut s, b"Subject: through haproxy\r\n\r\nhi\r\n.\r\nQUIT\r\n");
        assert!(read_replies(&mut s, 2).starts_with("250 2.0.0 OK"), "{send_proxy}");
        let got = hop.wait_messages(i + 1);
        let body = String::from_utf8_lossy(&got[i].wire_body).into_owned();
        assert!(body.contains("([127.0.8.67])"), "{send_proxy}: {body}");
    }
}

for_both_drivers!(
    behind_a_real_haproxy,
    a_denied_client_gets_the_deny_line_through_the_balancer,
    malformed_truncated_and_late_headers_close_without_a_banner,
);

on_one_driver!(
    an_allowed_client_is_served_and_named_in_received,
    a_ban_earned_through_the_balancer_bans_the_client,
    untrusted_sources_are_never_proxied,
    local_is_judged_as_the_balancer,
);
