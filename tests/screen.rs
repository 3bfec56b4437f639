//! Screening before the banner end to end: the real binary, both drivers, each peer its
//! own loopback address.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Mxgate, connect_from, read_replies, read_to_end, run_cli, send};

const FIRST: &str = "220-mx.test ESMTP\r\n";
const BANNER: &str = "220 mx.test ESMTP mxgate\r\n";
const TALKED_EARLY: &str = "554 5.7.1 protocol error: talked before the greeting\r\n";

fn start(io: &str, extra: &str) -> Mxgate {
    let config = format!(
        "hostname = \"mx.test\"\n[listen]\naddresses = [\"127.0.0.1:0\"]\nthreads = 2\n\
         [access]\nlist = \"access.list\"\n[abuse]\nwhitelist = \"white.list\"\n{extra}\
         [screen]\npregreet = true\ngreet_wait = \"1s\"\npass_ttl = \"1h\"\n\
         [control]\nsocket = \"mxgate.sock\"\n"
    );
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

for_both_drivers!(a_patient_peer_passes_and_is_remembered, an_early_talker_fails_and_is_counted);
