//! The gate end to end: the real binary, both drivers, peers on many loopback addresses.

#[macro_use]
mod common;

use common::config::Config;

use common::{DENY_PREFIX, End, Mxgate, assert_allowed, assert_denied, connect_from, read_replies, read_to_end, send};

fn config(extra: &str) -> String {
    Config::new().set("access", "list", "\"access.list\"").extra(extra).to_string()
}

fn denied_and_allowed_peers(io: &str) {
    let m = Mxgate::start(&config(""), &[("access.list", "127.0.0.9\n")], io);
    assert_denied(&m, "127.0.0.9", 0);
    assert_allowed(&m, "127.0.0.10", 0);
    assert_allowed(&m, "127.0.0.1", 0);
}

fn longest_prefix_decides(io: &str) {
    let list = "deny 127.0.0.0/8\nallow 127.0.1.0/24\ndeny 127.0.1.7\n";
    let m = Mxgate::start(&config(""), &[("access.list", list)], io);
    assert_denied(&m, "127.0.1.7", 0);
    assert_allowed(&m, "127.0.1.8", 0);
    assert_denied(&m, "127.0.2.1", 0);
    assert_denied(&m, "127.0.0.1", 0);
}

fn default_deny_grants_only_listed_peers(io: &str) {
    let m = Mxgate::start(&config("default = \"deny\"\n"), &[("access.list", "127.0.3.1\n127.0.4.0/24\n")], io);
    assert_allowed(&m, "127.0.3.1", 0);
    assert_allowed(&m, "127.0.4.200", 0);
    assert_denied(&m, "127.0.3.2", 0);
    assert_denied(&m, "127.0.0.1", 0);
}

fn dual_stack_listener_judges_ipv4_peers_by_ipv4_rules(io: &str) {
    let config = &config("[listen]\naddresses = [\"[::]:0\"]\n");
    // the entry in mapped form must act exactly like the plain one
    let m = Mxgate::start(config, &[("access.list", "127.0.0.1\n::ffff:127.0.5.0/120\n")], io);
    let port = m.addr().port();
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for (source, denied) in [("127.0.0.1", true), ("127.0.5.9", true), ("127.0.0.2", false)] {
        let mut s = connect_from(source, v4);
        let (got, _) = read_to_end_after_quit(&mut s);
        assert_eq!(got.starts_with(DENY_PREFIX), denied, "{source}: {got:?}");
        assert_eq!(got.starts_with("220 "), !denied, "{source}: {got:?}");
    }
}

fn ipv6_rules_on_an_ipv6_listener(io: &str) {
    let config = &config("[listen]\naddresses = [\"[::1]:0\", \"127.0.0.1:0\"]\n");
    let m = Mxgate::start(config, &[("access.list", "deny ::1\n")], io);
    assert_denied(&m, "::1", 0);
    assert_allowed(&m, "127.0.0.1", 1);
    let m = Mxgate::start(config, &[("access.list", "deny ::2\n")], io);
    assert_allowed(&m, "::1", 0);
}

fn read_to_end_after_quit(s: &mut std::net::TcpStream) -> (String, End) {
    let mut first = [0u8; 1];
    // wait for the first byte before writing, so that a denied peer sends nothing
    let n = std::io::Read::read(s, &mut first).expect("first byte");
    if first[..n] == *b"2" {
        send(s, b"QUIT\r\n");
    }
    let (rest, end) = read_to_end(s);
    (format!("{}{rest}", String::from_utf8_lossy(&first[..n])), end)
}

fn pipelined_commands_are_answered_in_order(io: &str) {
    let m = Mxgate::start(&config(""), &[("access.list", "")], io);
    let mut s = connect_from("127.0.6.1", m.addr());
    read_replies(&mut s, 1);
    let mut batch = b"EHLO client.test\r\n".to_vec();
    for _ in 0..18 {
        batch.extend_from_slice(b"NOOP\r\n");
    }
    batch.extend_from_slice(b"XYZZY\r\n");
    send(&mut s, &batch);
    let got = read_replies(&mut s, 20);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines[0], "250-mx.test");
    assert_eq!(lines[4], "250-CHUNKING");
    assert_eq!(lines[6], "250 ENHANCEDSTATUSCODES");
    assert!(lines[7..25].iter().all(|l| *l == "250 2.0.0 OK"), "{lines:?}");
    assert_eq!(lines[25], "500 5.5.2 command unrecognized");
    assert_eq!(lines.len(), 26);
}

fn idle_peers_are_dropped_with_421(io: &str) {
    let m = Mxgate::start(&config("[smtp]\ncommand_timeout = \"1s\"\n"), &[("access.list", "")], io);
    let mut s = connect_from("127.0.7.1", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"NOOP\r\n");
    read_replies(&mut s, 1);
    let (got, end) = read_to_end(&mut s);
    assert_eq!((got.as_str(), end), ("421 4.4.2 mx.test timeout exceeded, closing connection\r\n", End::Eof));
}

fn sigterm_drains_and_exits(io: &str) {
    let mut m = Mxgate::start(&config(""), &[("access.list", "")], io);
    let mut s = connect_from("127.0.8.1", m.addr());
    read_replies(&mut s, 1);
    m.signal(libc::SIGTERM);
    let (got, end) = read_to_end(&mut s);
    assert_eq!((got.as_str(), end), ("421 4.3.2 mx.test service shutting down, closing connection\r\n", End::Eof));
    assert!(m.wait_exit().success());
    m.wait_for_log("mxgate stopped");
}

fn many_peers_at_once(io: &str) {
    let list = "deny 127.1.0.0/16\n";
    let m = Mxgate::start(&config(""), &[("access.list", list)], io);
    let peers: Vec<_> = (0..200u32)
        .map(|i| {
            let source = format!("127.{}.0.{}", 1 + i % 2, 1 + i / 2);
            (source.clone(), connect_from(&source, m.addr()))
        })
        .collect();
    for (source, mut s) in peers {
        let (got, _) = read_to_end_after_quit(&mut s);
        let denied = source.starts_with("127.1.");
        assert_eq!(got.starts_with(DENY_PREFIX), denied, "{source}: {got:?}");
        assert_eq!(got.starts_with("220 mx.test"), !denied, "{source}: {got:?}");
    }
}

for_both_drivers!(
    denied_and_allowed_peers,
    dual_stack_listener_judges_ipv4_peers_by_ipv4_rules,
    ipv6_rules_on_an_ipv6_listener,
    pipelined_commands_are_answered_in_order,
    idle_peers_are_dropped_with_421,
    sigterm_drains_and_exits,
    many_peers_at_once,
);

on_one_driver!(longest_prefix_decides, default_deny_grants_only_listed_peers,);
