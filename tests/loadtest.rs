//! The load harness against the real binary: a short run of each scenario (deny-storm,
//! relay and dictionary on both drivers, the others on one), and a run against a next hop
//! that loses a message, which must fail.

#[macro_use]
mod common;

use std::time::Duration;

use loadtest::scenario::{self, Options, Scenario};

fn options(scenario: Scenario, io: &str) -> Options {
    Options {
        scenario,
        spawn: Some(common::mxgate_bin().into()),
        io: Some(io.into()),
        duration: Duration::from_millis(800),
        concurrency: 8,
        threads: 2,
        ..Options::default()
    }
}

fn deny_storm_gets_the_deny_line_every_time(io: &str) {
    let report = scenario::run(&options(Scenario::DenyStorm, io)).expect("a run");
    let phase = &report.phases[0];
    assert!(report.passed(), "{}", report.table());
    assert!(phase.ops > 100, "{}", report.table());
    assert!(phase.latency_ms[0] > 0.0 && phase.latency_ms[4] >= phase.latency_ms[2]);
}

fn relayed_messages_arrive_byte_exact_once(io: &str) {
    for pipeline in [false, true] {
        let opts = Options { pipeline, messages_per_connection: 3, ..options(Scenario::Relay, io) };
        let report = scenario::run(&opts).expect("a run");
        assert!(report.passed(), "pipeline {pipeline}: {}", report.table());
        assert!(report.phases[0].ops > 50, "{}", report.table());
        let json = report.json();
        assert_eq!(json["verdict"], "pass");
        assert!(json["phases"][0]["latency_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0), "{json}");
    }
}

fn a_next_hop_that_loses_mail_fails_the_run(io: &str) {
    let opts = Options { sink_drops_every: 5, ..options(Scenario::Relay, io) };
    let report = scenario::run(&opts).expect("a run");
    assert!(!report.passed(), "{}", report.table());
    let lost = report.phases[0].checks.iter().find(|(what, _)| what.contains("lost")).expect("the loss check");
    assert!(!lost.1, "{}", report.table());
    assert_eq!(report.json()["verdict"], "fail");
}

fn dictionary_attackers_are_dropped_then_banned(io: &str) {
    let report = scenario::run(&options(Scenario::Dictionary, io)).expect("a run");
    assert!(report.passed(), "{}", report.table());
    let (dropped, banned) = (&report.phases[0], &report.phases[1]);
    assert!(dropped.ops > 0 && banned.ops == dropped.ops, "{}", report.table());
    assert!(banned.latency_ms[0] >= dropped.latency_ms[0], "banned after dropped: {}", report.table());
}

#[test]
fn mixed_traffic_loses_no_good_mail_and_never_bans_the_whitelist() {
    let opts = Options { duration: Duration::from_millis(1600), ..options(Scenario::Mixed, "epoll") };
    let report = scenario::run(&opts).expect("a run");
    assert!(report.passed(), "{}", report.table());
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alone", "attacked", "deny-storm", "dropped", "banned", "whitelisted"]);
    assert!(report.phases[5].ops > 0, "whitelisted attackers checked: {}", report.table());
    // --plot: a line per phase
    let dir = tempfile::tempdir().expect("temp dir");
    let svg = dir.path().join("mixed.svg");
    report.plot(&svg).expect("the plot");
    let text = std::fs::read_to_string(&svg).expect("an SVG");
    assert!(text.matches("<polyline").count() >= 6 && text.contains("whitelisted"), "{}", &text[..200]);
}

#[test]
fn reloads_under_mixed_traffic_cause_no_errors() {
    let opts = Options {
        duration: Duration::from_millis(1600),
        reload_every: Duration::from_millis(100),
        ..options(Scenario::Reload, "epoll")
    };
    let report = scenario::run(&opts).expect("a run");
    assert!(report.passed(), "{}", report.table());
    assert!(report.phases[0].checks.iter().any(|(what, ok)| what.contains("reloads") && *ok), "{}", report.table());
}

#[test]
fn slow_peers_are_cut_off_while_mail_flows() {
    let report = scenario::run(&options(Scenario::Slowloris, "uring")).expect("a run");
    assert!(report.passed(), "{}", report.table());
    for slow in &report.phases[1..] {
        // cut at the spawned mxgate's command_timeout, not long after
        let cut = slow.latency_ms[4] / 1000.0;
        assert!((2.0..4.0).contains(&cut), "{}: {cut} s: {}", slow.name, report.table());
    }
}

#[test]
fn drain_never_answers_250_without_delivery() {
    let opts = Options { duration: Duration::from_millis(1600), ..options(Scenario::Drain, "uring") };
    let report = scenario::run(&opts).expect("a run");
    assert!(report.passed(), "{}", report.table());
    assert!(report.phases[0].checks.iter().any(|(what, ok)| what.contains("exit status 0") && *ok));
}

#[test]
fn tls_relays_byte_exact_with_full_and_resumed_handshakes() {
    let opts = Options { duration: Duration::from_millis(800), concurrency: 8, ..options(Scenario::Tls, "uring") };
    let report = scenario::run(&opts).expect("a run");
    assert!(report.passed(), "{}", report.table());
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["plain", "tls-full", "tls-resumed"]);
    for phase in &report.phases[1..] {
        assert!(phase.checks.iter().any(|(what, ok)| what.contains("handshakes") && *ok), "{}", report.table());
        assert!(phase.server_cpu_us.is_some(), "the spawned mxgate's CPU is read");
        assert!(phase.harness_cpu_us.is_some_and(|us| us > 0.0), "and the harness's own");
    }
}

#[test]
fn targets_off_loopback_and_wrong_expectations_are_refused() {
    let opts = Options { target: Some("192.0.2.1:25".parse().unwrap()), ..Options::default() };
    assert!(scenario::run(&opts).unwrap_err().contains("loopback"));
    let opts = Options {
        sources: Some("10.1.0.0/16".into()),
        target: Some("127.0.0.1:9".parse().unwrap()),
        ..Options::default()
    };
    assert!(scenario::run(&opts).unwrap_err().contains("loopback only"));
    // a server that is not mxgate's deny path: the deny check fails the run
    let opts = Options { expect: "999".into(), ..options(Scenario::DenyStorm, "epoll") };
    let report = scenario::run(&opts).expect("a run");
    assert!(!report.passed(), "{}", report.table());
}

for_both_drivers!(
    dictionary_attackers_are_dropped_then_banned,
    deny_storm_gets_the_deny_line_every_time,
    relayed_messages_arrive_byte_exact_once,
    a_next_hop_that_loses_mail_fails_the_run,
);

/// `banned-flood` with the kernel off: every attempt from a banned address gets the deny
/// line; with `reset` (root only: the kernel's table), the flood phase is the kernel's and
/// the keys' way into it is read from the metrics.
#[test]
fn a_banned_flood_is_refused_in_user_space_then_by_the_kernel() {
    let opts = Options {
        rate: 2000,
        warmup: Duration::from_millis(1500),
        sources: Some("127.89.0.0/26".into()),
        ..options(Scenario::BannedFlood, "uring")
    };
    let report = scenario::run(&opts).expect("a run");
    assert!(report.passed(), "{}", report.table());
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["warm-up", "flood"]);
    assert!(report.phases[1].ops > 500, "{}", report.table());
    assert!(report.phases[1].server_cpu_us.is_some(), "{}", report.table());
    if !common::root("banned-flood with the kernel (CAP_NET_ADMIN)") {
        return;
    }
    let report = scenario::run(&Options { kernel: "reset".into(), ..opts }).expect("a run");
    assert!(report.passed(), "{}", report.table());
    let kernel = report.phases[1].checks.iter().any(|(what, ok)| *ok && what.contains("keys into the kernel"));
    assert!(kernel, "{}", report.table());
}
