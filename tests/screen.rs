//! Screening before the banner end to end: the real binary, both drivers, each peer its
//! own loopback address.

#[macro_use]
mod common;

use common::config::Config;

use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use common::dns::{DnsServer, Mode};
use common::{Mxgate, connect_from, read_replies, read_to_end, run_cli, send};

const FIRST: &str = "220-mx.test ESMTP\r\n";
const BANNER: &str = "220 mx.test ESMTP mxgate\r\n";
const TALKED_EARLY: &str = "554 5.7.1 protocol error: talked before the greeting\r\n";

fn start(io: &str, extra: &str) -> Mxgate {
    let config = Config::new()
        .set("access", "list", "\"access.list\"")
        .set("abuse", "whitelist", "\"white.list\"")
        .extra(extra)
        .extra(
            "[screen]\npregreet = true\ngreet_wait = \"1s\"\npass_ttl = \"1h\"\n[control]\nsocket = \"mxgate.sock\"\n",
        )
        .to_string();
    Mxgate::start(&config, &[("access.list", "allow 127.0.6.50\n"), ("white.list", "127.0.6.51\n")], io)
}

fn stat(m: &Mxgate, name: &str) -> u64 {
    let (_, out) = run_cli(&["stats"], &m.files.config());
    out.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

/// A peer that waits gets the two-line greeting after greet_wait, then its session; the
/// next connection from it gets the one-line banner at once (remembered).
fn a_patient_peer_passes_and_is_remembered(io: &str) {
    let m = start(io, "");
    let started = Instant::now();
    let mut s = connect_from("127.0.6.1", m.addr());
    assert_eq!(read_replies(&mut s, 1), format!("{FIRST}{BANNER}"));
    assert!(started.elapsed() >= Duration::from_millis(900), "the greeting ends after greet_wait");
    send(&mut s, b"EHLO client.test\r\n");
    assert!(read_replies(&mut s, 1).starts_with("250-mx.test"));
    let started = Instant::now();
    let mut again = connect_from("127.0.6.1", m.addr());
    assert_eq!(read_replies(&mut again, 1), BANNER, "remembered: no test");
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(stat(&m, "screen_passed"), 1);
    // whitelisted and allow-listed peers are never screened
    for source in ["127.0.6.50", "127.0.6.51"] {
        let mut s = connect_from(source, m.addr());
        assert_eq!(read_replies(&mut s, 1), BANNER, "{source}");
    }
}

/// A peer that talks before the greeting ends gets 554 and the close; it is a failure of
/// its address (two of them ban it here), logged with its first octets.
fn an_early_talker_fails_and_is_counted(io: &str) {
    let mut m = start(io, "failure_threshold = 2\n");
    for round in 0..2 {
        let mut s = connect_from("127.0.6.2", m.addr());
        send(&mut s, b"EHLO bot\r\n");
        let (got, _) = read_to_end(&mut s);
        assert_eq!(got, format!("{FIRST}{TALKED_EARLY}"), "round {round}");
    }
    let line = m.wait_for_log("pregreet: talked before the greeting");
    assert!(line.contains("127.0.6.2") && line.contains("EHLO bot\\r\\n"), "{line}");
    m.wait_for_log("IP address 127.0.6.2 banned: 2 failures");
    assert_eq!((stat(&m, "pregreet_failed"), stat(&m, "failures"), stat(&m, "screen_passed")), (2, 2, 0));
    let mut s = connect_from("127.0.6.2", m.addr());
    assert!(read_to_end(&mut s).0.starts_with("530 5.7.1 mx.test ESMTP denied access at "), "banned");
}

/// mxgate asking `dns` about two blocklists (weights 2 and 1) and an allowlist (-5).
fn with_blocklists(io: &str, dns: &DnsServer, threshold: u32, pregreet: bool) -> Mxgate {
    let config = Config::new().set("listen", "addresses", "[\"127.0.0.1:0\", \"[::1]:0\"]").extra(&format!(
        "[screen]\npregreet = {pregreet}\ngreet_wait = \"1s\"\nresolvers = [\"{}\"]\ndns_timeout = \"1s\"\n\
         dnsbl_threshold = {threshold}\n\
         [[screen.dnsbl]]\nzone = \"two.test\"\nweight = 2\nmatch = [\"127.0.0.2-127.0.0.11\"]\n\
         [[screen.dnsbl]]\nzone = \"one.test\"\nweight = 1\n\
         [[screen.dnsbl]]\nzone = \"white.test\"\nweight = -5\n\
         [control]\nsocket = \"mxgate.sock\"\n",
        dns.addr
    ));
    Mxgate::start(&config.to_string(), &[], io)
}

const BLOCKED: &str = "550 5.7.1 Service unavailable; client [127.0.6.20] blocked using two.test\r\n";

/// Weights summed against the threshold: 2 + 1 at threshold 3 is blocked, naming the
/// heaviest zone; at threshold 4 served; an allowlist listing lets a listed peer through;
/// a result outside a zone's match does not count; IPv6 peers are asked by nibbles.
fn blocklists_score_and_block(io: &str) {
    let dns = DnsServer::start();
    let two = Ipv4Addr::new(127, 0, 0, 2);
    for ip in ["127.0.6.20", "127.0.6.21", "::1"] {
        dns.list(ip, "two.test", two);
        dns.list(ip, "one.test", two);
    }
    dns.list("127.0.6.21", "white.test", two);
    dns.list("127.0.6.22", "two.test", Ipv4Addr::new(127, 0, 0, 99)); // outside the match
    dns.list("127.0.6.22", "one.test", two);
    let m = with_blocklists(io, &dns, 3, false);
    let mut s = connect_from("127.0.6.20", m.addr());
    assert_eq!(read_to_end(&mut s).0, BLOCKED);
    let mut s = connect_from("::1", m.addrs[1]);
    assert_eq!(read_to_end(&mut s).0, "550 5.7.1 Service unavailable; client [::1] blocked using two.test\r\n");
    for source in ["127.0.6.21", "127.0.6.22", "127.0.6.23"] {
        let mut s = connect_from(source, m.addr());
        assert_eq!(read_replies(&mut s, 1), BANNER, "{source}");
    }
    assert_eq!((stat(&m, "dnsbl_blocked"), stat(&m, "dns_timeouts")), (2, 0));
    assert_eq!(stat(&m, "dnsbl_blocked{zone=\"two.test\"}"), 2, "per zone");
    // explain asks the zones now, and the running instance what it remembers
    let (code, out) = run_cli(&["explain", "127.0.6.20"], &m.files.config());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dnsbl two.test (weight 2): listed (127.0.0.2; counts)"), "{out}");
    assert!(out.contains("dnsbl white.test (weight -5): not listed"), "{out}");
    assert!(out.contains("dnsbl score 3 (threshold 3): blocked using two.test"), "{out}");
    assert!(out.contains("live: screening: not remembered as passed"), "{out}");
    let (_, out) = run_cli(&["explain", "127.0.6.22"], &m.files.config());
    assert!(out.contains("listed (127.0.0.99; outside its match)") && out.contains("not blocked"), "{out}");
    assert!(out.contains("live: screening: passed, skips it until "), "{out}");
    let asked = dns.asked();
    let mut s = connect_from("127.0.6.20", m.addr());
    assert_eq!(read_to_end(&mut s).0, BLOCKED, "the same answer from the cache");
    assert!(dns.asked() <= asked + 3, "at most the other worker asks again");
    drop(m);
    let m = with_blocklists(io, &dns, 4, false);
    let mut s = connect_from("127.0.6.20", m.addr());
    assert_eq!(read_replies(&mut s, 1), BANNER, "score 3 under threshold 4");
}

/// The DNS server silent: the peer is served once dns_timeout passes, and the timeouts are
/// counted; with the pregreet test the two waits run side by side.
fn a_silent_dns_server_delays_no_one_past_dns_timeout(io: &str) {
    let dns = DnsServer::start();
    dns.answer(Mode::Silent);
    for pregreet in [false, true] {
        let m = with_blocklists(io, &dns, 1, pregreet);
        let started = Instant::now();
        let mut s = connect_from("127.0.6.30", m.addr());
        let greeting = read_replies(&mut s, 1);
        let waited = started.elapsed();
        assert!(greeting.ends_with(BANNER), "{greeting}");
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500), "{waited:?}");
        assert_eq!(stat(&m, "dns_timeouts"), 3, "one per zone");
    }
}

/// With cache_file, a pass outlives a restart (even kill -9, once written).
fn passes_are_kept_across_a_restart(io: &str) {
    let m = start(io, "");
    let config = std::fs::read_to_string(m.files.config()).expect("config");
    std::fs::write(m.files.config(), config.replace("[screen]\n", "[screen]\ncache_file = \"passes.txt\"\n"))
        .expect("config");
    let mut m = m.kill_and_restart(io);
    let mut s = connect_from("127.0.6.40", m.addr());
    assert_eq!(read_replies(&mut s, 1), format!("{FIRST}{BANNER}"));
    let file = m.files.path("passes.txt");
    common::wait_until("the pass is written", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.starts_with("127.0.6.40 "))
    });
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).expect("the cache").permissions());
    assert_eq!(mode & 0o777, 0o600, "the cache names senders: private whatever the umask");
    m = m.kill_and_restart(io);
    let mut s = connect_from("127.0.6.40", m.addr());
    assert_eq!(read_replies(&mut s, 1), BANNER, "remembered after the restart");
    let mut s = connect_from("127.0.6.41", m.addr());
    assert_eq!(read_replies(&mut s, 1), format!("{FIRST}{BANNER}"), "others are still screened");
}

/// Forged answers (from another port, or with another id) are ignored: the listed peer
/// is served once dns_timeout passes, its lookups counted as timeouts.
fn forged_answers_are_ignored(io: &str) {
    let dns = DnsServer::start();
    for ip in ["127.0.6.50", "127.0.6.51", "127.0.6.52"] {
        dns.list(ip, "two.test", Ipv4Addr::new(127, 0, 0, 2));
        dns.list(ip, "one.test", Ipv4Addr::new(127, 0, 0, 2));
    }
    let m = with_blocklists(io, &dns, 1, false);
    for (mode, source) in [(Mode::FromAnotherPort, "127.0.6.50"), (Mode::WrongId, "127.0.6.51")] {
        dns.answer(mode);
        let mut s = connect_from(source, m.addr());
        assert_eq!(read_replies(&mut s, 1), BANNER, "{mode:?}: the forged listing is not believed");
    }
    assert_eq!(stat(&m, "dns_timeouts"), 6);
    dns.answer(Mode::Honest);
    let mut s = connect_from("127.0.6.52", m.addr());
    assert!(read_to_end(&mut s).0.starts_with("550 5.7.1"), "an honest answer blocks");
}

/// Queries leave from many source ports (issue 19: one port per worker for the process's
/// life left only the 16-bit id to guess): 60 consecutive queries from at least 20, and
/// answers still reach their peers (a listed peer is blocked).
fn queries_leave_from_many_ports(io: &str) {
    let dns = DnsServer::start();
    dns.list("127.0.6.20", "two.test", Ipv4Addr::new(127, 0, 0, 2));
    dns.list("127.0.6.20", "one.test", Ipv4Addr::new(127, 0, 0, 2));
    let m = with_blocklists(io, &dns, 3, false);
    // 20 peers, three zones each: 60 queries
    for i in 0..20 {
        let mut s = connect_from(&format!("127.0.7.{}", i + 1), m.addr());
        assert_eq!(read_replies(&mut s, 1), BANNER);
    }
    let ports = dns.source_ports();
    assert_eq!(ports.len(), 60);
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 20, "60 queries from {} ports: {ports:?}", distinct.len());
    let mut s = connect_from("127.0.6.20", m.addr());
    assert_eq!(read_to_end(&mut s).0, BLOCKED);
}

for_both_drivers!(
    queries_leave_from_many_ports,
    forged_answers_are_ignored,
    a_silent_dns_server_delays_no_one_past_dns_timeout,
);

on_one_driver!(
    a_patient_peer_passes_and_is_remembered,
    an_early_talker_fails_and_is_counted,
    blocklists_score_and_block,
    passes_are_kept_across_a_restart,
);
