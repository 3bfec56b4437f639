//! `mxgate stats` end to end: the real binary, both drivers; every count exact.

#[macro_use]
mod common;

use common::config::Config;

use common::nexthop::{AtDot, NextHop};
use common::{
    Mxgate, assert_allowed, assert_denied, connect_from, read_replies, read_to_end, run_cli, send, wait_until,
};

fn stats(m: &Mxgate) -> String {
    let (code, out) = run_cli(&["stats"], &m.files.config());
    assert_eq!(code, 0, "{out}");
    out
}

/// The stats without the first line (uptime).
fn counts(m: &Mxgate) -> String {
    let out = stats(m);
    assert!(out.starts_with("uptime_seconds "), "{out}");
    out.lines().skip(1).map(|l| format!("{l}\n")).collect()
}

fn every_connection_and_transaction_is_counted(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let config = Config::new()
        .set("access", "list", "\"access.list\"")
        .relay_to(&[hop.addr])
        .set("control", "socket", "\"mxgate.sock\"")
        .to_string();
    let mut m = Mxgate::start(&config, &[("access.list", "deny 127.0.9.1\n")], io);
    assert_denied(&m, "127.0.9.1", 0);
    assert_denied(&m, "127.0.9.1", 0);
    assert_allowed(&m, "127.0.9.3", 0);
    let mut s = connect_from("127.0.9.2", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<x@elsewhere.org>\r\n");
    assert!(read_replies(&mut s, 3).ends_with("550 5.7.1 relay access denied\r\n"));
    send(&mut s, b"RCPT TO:<u@example.com>\r\nDATA\r\n");
    assert!(read_replies(&mut s, 2).ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"));
    send(&mut s, b"Subject: counted\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@client.test>\r\nQUIT\r\n");
    let (rest, _) = read_to_end(&mut s);
    assert!(rest.starts_with("250 ") && rest.contains("221 "), "{rest}");

    wait_until("both sessions closed", || stats(&m).contains("connections_open 0\n"));
    let expected = "connections_accepted 4\nrefused_denied 2\nrefused_banned 0\nrefused_too_many_from_address 0\n\
                    refused_busy 0\nsessions 2\nmessages_delivered 1\nmessages_refused 0\ntransactions_abandoned 1\n\
                    failures 1\nconversations_dropped 0\ngone_before_judged 0\ntls_handshakes 0\ntls_handshakes_failed 0\n\
                    refused_proxy_header 0\nscreen_passed 0\npregreet_failed 0\ndnsbl_blocked 0\ndns_timeouts 0\ndns_failures 0\n\
                    shadow_would_deny 0\nshadow_would_ban 0\n\
                    connections_open 0\nbans_in_force 0\nfailure_keys_evicted 0\nreloads 0\n";
    assert_eq!(counts(&m), expected);
    assert_eq!(hop.messages().len(), 1);

    m.signal(libc::SIGHUP);
    m.wait_for_log("SIGHUP: reloaded");
    assert!(counts(&m).ends_with("reloads 1\n"));
}

/// One HTTP request to the metrics address; the whole response.
fn http(addr: &str, request: &str) -> String {
    let mut s = connect_from("127.0.0.1", addr.parse().expect("the metrics address"));
    send(&mut s, request.as_bytes());
    read_to_end(&mut s).0
}

fn metrics_are_served_as_prometheus_text(io: &str) {
    let config = Config::new().set("access", "list", "\"access.list\"").set("metrics", "listen", "\"127.0.0.1:0\"");
    let m = Mxgate::start(&config.to_string(), &[("access.list", "deny 127.0.9.1\n")], io);
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let addr = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address").to_owned();
    assert_denied(&m, "127.0.9.1", 0);
    assert_allowed(&m, "127.0.9.2", 0);
    let got = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4"), "{got}");
    let body = got.split("\r\n\r\n").nth(1).expect("a body");
    assert!(body.contains("# TYPE mxgate_refused_denied_total counter\nmxgate_refused_denied_total 1\n"), "{body}");
    assert!(
        body.contains("mxgate_sessions_total 1\n") && body.contains("# TYPE mxgate_bans_in_force gauge\n"),
        "{body}"
    );
    // histograms: both verdicts, and the session once its connection is freed
    assert!(body.contains("# TYPE mxgate_verdict_seconds histogram\n"), "{body}");
    assert!(body.contains("mxgate_verdict_seconds_count 2\n"), "{body}");
    assert!(body.contains("mxgate_verdict_seconds_bucket{le=\"0.00001\"} "), "{body}");
    wait_until("the session's duration recorded", || {
        http(&addr, "GET /metrics HTTP/1.1\r\n\r\n").contains("mxgate_session_seconds_count 1\n")
    });
    assert!(http(&addr, "GET /metrics\r\n\r\n").starts_with("HTTP/1.1 200 OK\r\n"), "no version given");
    assert!(http(&addr, "GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert!(http(&addr, "\r\n\r\n").starts_with("HTTP/1.1 400 Bad Request\r\n"));
}

/// Clients that drip bytes hold neither listener (issue 19): with two of them on each,
/// `/metrics` and `mxgate stats` answer at once, and a dripping client is cut off one
/// second after it connected however it keeps sending.
fn dripping_clients_hold_neither_metrics_nor_control(io: &str) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    let config = Config::new().set("metrics", "listen", "\"127.0.0.1:0\"").set("control", "socket", "\"mxgate.sock\"");
    let m = Mxgate::start(&config.to_string(), &[], io);
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let addr = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address").to_owned();
    let socket = m.files.path("mxgate.sock");
    let drip = |mut w: Box<dyn Write + Send>| {
        std::thread::spawn(move || {
            let started = Instant::now();
            // one byte every 100 ms, never ending the request, until the server closes
            while w.write_all(b"G").is_ok() && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(100));
            }
            started.elapsed()
        })
    };
    let mut drippers = Vec::new();
    for _ in 0..2 {
        let http = connect_from("127.0.0.1", addr.parse().expect("address"));
        drippers.push(drip(Box::new(http)));
        drippers.push(drip(Box::new(UnixStream::connect(&socket).expect("the control socket"))));
    }
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    assert!(http(&addr, "GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(asked.elapsed() < Duration::from_secs(1), "/metrics took {:?}", asked.elapsed());
    let asked = Instant::now();
    let mut control = UnixStream::connect(&socket).expect("the control socket");
    control.write_all(b"stats\n").expect("ask");
    let mut answer = String::new();
    control.read_to_string(&mut answer).expect("the answer");
    assert!(answer.contains("sessions 0\n"), "{answer}");
    assert!(asked.elapsed() < Duration::from_secs(1), "stats took {:?}", asked.elapsed());
    for d in drippers {
        let held = d.join().expect("dripper");
        assert!(held < Duration::from_secs(3), "a dripping client was held {held:?}");
    }
}

/// Peers that reset their connection before it was handled are still connections the
/// kernel handed over: all of them are in `connections_accepted`.
fn connections_reset_at_once_are_counted(io: &str) {
    const PEERS: u32 = 300;
    let config = Config::new().set("control", "socket", "\"mxgate.sock\"");
    let m = Mxgate::start(&config.to_string(), &[], io);
    for i in 0..PEERS {
        let s = connect_from(&format!("127.0.31.{}", 1 + i % 250), m.addr());
        // SO_LINGER 0: the close is a reset, before the server has looked at the socket
        socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
        drop(s);
    }
    wait_until("every connection counted", || stats(&m).contains(&format!("connections_accepted {PEERS}\n")));
    let out = stats(&m);
    let get = |name: &str| -> u32 {
        out.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).expect(name)
    };
    assert_eq!(get("sessions") + get("gone_before_judged"), PEERS, "{out}");
}

for_both_drivers!(every_connection_and_transaction_is_counted, connections_reset_at_once_are_counted,);

/// `/healthz` and `/readyz` for a balancer's or an orchestrator's probes: both 200 while
/// serving; during the drain (a message still in flight) readyz says 503 and healthz 200.
fn health_and_readiness_probes(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let config = Config::new().relay_to(&[hop.addr]).set("metrics", "listen", "\"127.0.0.1:0\"");
    let mut m = Mxgate::start(&config.to_string(), &[], io);
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let addr = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address").to_owned();
    let get = |path: &str| http(&addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(get("/healthz").starts_with("HTTP/1.1 200 OK\r\n"), "{}", get("/healthz"));
    assert!(get("/readyz").starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(get("/metrics?name[]=x").starts_with("HTTP/1.1 200 OK\r\n"), "a query string is ignored");
    // a message in flight holds the drain open
    let mut s = connect_from("127.0.9.5", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    assert!(read_replies(&mut s, 4).ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"));
    send(&mut s, b"Subject: held\r\n");
    m.signal(libc::SIGTERM);
    wait_until("readyz says draining", || get("/readyz").starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    assert!(get("/readyz").ends_with("draining\n"));
    assert!(get("/healthz").starts_with("HTTP/1.1 200 OK\r\n"), "draining is not dying");
    send(&mut s, b"\r\nx\r\n.\r\n");
    assert!(read_replies(&mut s, 1).starts_with("250 2.0.0 OK: queued as "));
    send(&mut s, b"QUIT\r\n");
    assert!(read_replies(&mut s, 1).starts_with("221 "));
    assert!(m.wait_exit().success());
}

on_one_driver!(
    health_and_readiness_probes,
    metrics_are_served_as_prometheus_text,
    dripping_clients_hold_neither_metrics_nor_control,
);

/// A real Prometheus scrapes mxgate and stores its histograms: the verdict histogram's
/// buckets come back from its query API with mxgate's `le` labels, and the target is up.
#[test]
fn a_real_prometheus_scrapes_the_histograms() {
    let config = Config::new().set("access", "list", "\"access.list\"").set("metrics", "listen", "\"127.0.0.1:0\"");
    let m = Mxgate::start(&config.to_string(), &[("access.list", "deny 127.0.9.1\n")], "uring");
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let target = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address");
    assert_denied(&m, "127.0.9.1", 0);
    let Some(prometheus) = common::prometheus::Prometheus::scraping(target) else { return };
    wait_until("Prometheus stored the verdict histogram's count", || {
        prometheus.query("mxgate_verdict_seconds_count").contains(r#""value":["#)
    });
    let buckets = prometheus.query("mxgate_verdict_seconds_bucket");
    assert!(buckets.contains(r#""le":"+Inf""#) && buckets.contains(r#""le":"0.00001""#), "{buckets}");
    let up = prometheus.query("up");
    assert!(up.contains(r#""job":"mxgate""#) && up.contains(r#","1"]"#), "{up}");
    let count = prometheus.query("mxgate_refused_denied_total");
    assert!(count.contains(r#","1"]"#), "the refusal counted: {count}");
}
