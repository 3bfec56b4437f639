//! SIGHUP end to end: the real binary, both drivers. A reload applies the files as they
//! are now to new connections, keeps open ones going, and a bad file changes nothing.

#[macro_use]
mod common;

use common::config::Config;

use std::net::SocketAddr;

use common::nexthop::{AtDot, NextHop};
use common::{Mxgate, assert_allowed, assert_denied, connect_from, read_replies, read_to_end, run_cli, send};

fn config(hostname: &str, extra: &str) -> String {
    Config::new()
        .set("", "hostname", format!("\"{hostname}\""))
        .set("access", "list", "\"access.list\"")
        .extra(extra)
        .to_string()
}

fn write(m: &Mxgate, name: &str, text: &str) {
    std::fs::write(m.files.path(name), text).expect("write");
}

/// Sends SIGHUP and waits (bounded) for the reload's outcome line.
fn reload(m: &mut Mxgate, outcome: &str) -> String {
    m.signal(libc::SIGHUP);
    m.wait_for_log(outcome)
}

fn a_changed_list_applies_to_new_connections_and_open_ones_go_on(io: &str) {
    let mut m = Mxgate::start(&config("mx.test", ""), &[("access.list", "deny 127.0.7.3\n")], io);
    let mut open = connect_from("127.0.7.2", m.addr());
    assert!(read_replies(&mut open, 1).starts_with("220 mx.test"));
    send(&mut open, b"EHLO client.test\r\n");
    read_replies(&mut open, 1);

    write(&m, "access.list", "deny 127.0.7.2\n");
    let line = reload(&mut m, "SIGHUP: reloaded");
    assert!(line.contains("access_entries=1"), "{line}");
    assert_denied(&m, "127.0.7.2", 0);
    assert_allowed(&m, "127.0.7.3", 0);

    // the conversation that began before the reload is not judged again
    send(&mut open, b"NOOP\r\n");
    assert_eq!(read_replies(&mut open, 1), "250 2.0.0 OK\r\n");
    send(&mut open, b"QUIT\r\n");
    assert!(read_to_end(&mut open).0.starts_with("221 "));
}

fn a_bad_file_changes_nothing(io: &str) {
    let mut m = Mxgate::start(&config("mx.test", ""), &[("access.list", "deny 127.0.7.3\n")], io);

    write(&m, "access.list", "deny 127.0.7.4\nallow not-an-address\n");
    reload(&mut m, "SIGHUP: reload refused: 1 problem(s); nothing changed");
    let problem = m.saw("not-an-address").expect("the problem is logged").to_owned();
    assert!(problem.contains("access.list:2: "), "names file and line: {problem}");
    assert_denied(&m, "127.0.7.3", 0);
    assert_allowed(&m, "127.0.7.4", 0);

    // a broken config file: the lists are not even read
    write(&m, "access.list", "deny 127.0.7.4\n");
    write(&m, "mxgate.toml", "hostname = \"mx.test\"\n[listen\n");
    reload(&mut m, "SIGHUP: reload refused: 1 problem(s); nothing changed");
    assert!(m.saw("mxgate.toml:2: TOML syntax").is_some(), "names file and line");
    assert_denied(&m, "127.0.7.3", 0);
    assert_allowed(&m, "127.0.7.4", 0);

    // fixed, the next reload takes both files
    write(&m, "mxgate.toml", &config("mx.test", ""));
    reload(&mut m, "SIGHUP: reloaded");
    assert_denied(&m, "127.0.7.4", 0);
    assert_allowed(&m, "127.0.7.3", 0);
}

fn settings_apply_and_those_read_at_start_wait_for_the_next(io: &str) {
    let mut m = Mxgate::start(&config("mx.test", ""), &[("access.list", "deny 127.0.7.3\n")], io);
    let started_on = m.addr();
    let changed = config("mx2.test", "deny_reply = \"554 5.7.1 {hostname} go away\"\n")
        .replace("127.0.0.1:0", "127.0.0.1:1")
        .replace("threads = 2", "threads = 1");
    write(&m, "mxgate.toml", &changed);
    reload(&mut m, "SIGHUP: reloaded");
    for setting in ["listen.addresses", "listen.threads"] {
        let warning = m.saw(&format!("SIGHUP: {setting} changed")).expect("a warning for each");
        assert!(warning.contains("takes effect at the next start"), "{warning}");
    }
    // still on the address it started on, with the new name and reply
    let mut s = connect_from("127.0.7.3", started_on);
    assert_eq!(read_to_end(&mut s).0, "554 5.7.1 mx2.test go away\r\n");
    let mut s = connect_from("127.0.7.9", started_on);
    assert_eq!(read_replies(&mut s, 1), "220 mx2.test ESMTP mxgate\r\n");
}

fn mxgate_reload_asks_the_running_instance(io: &str) {
    let control = "[control]\nsocket = \"mxgate.sock\"\n";
    let mut m = Mxgate::start(&config("mx.test", control), &[("access.list", "deny 127.0.7.3\n")], io);
    write(&m, "access.list", "deny 127.0.7.4\n");
    let (code, out) = run_cli(&["reload"], &m.files.config());
    let expected = format!("reloaded {} (1 access entries, 0 whitelist entries)\n", m.files.config().display());
    assert_eq!((code, out), (0, expected));
    m.wait_for_log("control socket: reloaded");
    assert_denied(&m, "127.0.7.4", 0);
    assert_allowed(&m, "127.0.7.3", 0);

    // a bad file is refused before the running instance is asked
    write(&m, "access.list", "deny 127.0.7.3\n127.0.7.300\n");
    let (code, out) = run_cli(&["reload"], &m.files.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("access.list:2: ") && out.contains("not reloaded"), "{out}");
    assert_denied(&m, "127.0.7.4", 0);
    assert_allowed(&m, "127.0.7.3", 0);

    // with no instance running, it says so
    m.signal(libc::SIGKILL);
    m.wait_exit();
    write(&m, "access.list", "deny 127.0.7.3\n");
    let (code, out) = run_cli(&["reload"], &m.files.config());
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("no running mxgate on "), "{out}");
}

fn relay_config(next_hop: SocketAddr) -> String {
    Config::new().set("listen", "threads", 1).relay_to(&[next_hop]).to_string()
}

/// A transaction open across a reload finishes on its next hop; that connection is then
/// pooled for its own next hop, and the next transaction goes to the new one.
fn a_transaction_open_across_a_reload_finishes_on_its_next_hop(io: &str) {
    let (a, b) = (NextHop::start(AtDot::Accept), NextHop::start(AtDot::Accept));
    let mut m = Mxgate::start(&relay_config(a.addr), &[], io);
    let mut s = connect_from("127.0.7.5", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"EHLO client.test\r\nMAIL FROM:<x@client.test>\r\nRCPT TO:<u@example.com>\r\n");
    assert!(read_replies(&mut s, 3).ends_with("250 2.1.5 recipient OK\r\n"));

    write(&m, "mxgate.toml", &relay_config(b.addr));
    reload(&mut m, "SIGHUP: reloaded");
    send(&mut s, b"DATA\r\n");
    assert!(read_replies(&mut s, 1).starts_with("354 "));
    send(&mut s, b"Subject: one\r\n\r\nbefore\r\n.\r\n");
    assert!(read_replies(&mut s, 1).starts_with("250 "));
    assert_eq!(a.wait_messages(1).len(), 1);
    send(&mut s, b"QUIT\r\n");
    assert!(read_to_end(&mut s).0.starts_with("221 "));

    // a new conversation (same worker, so the same pool) relays to the new next hop
    let mut s = connect_from("127.0.7.6", m.addr());
    read_replies(&mut s, 1);
    send(&mut s, b"EHLO client.test\r\nMAIL FROM:<x@client.test>\r\nRCPT TO:<u@example.com>\r\n");
    read_replies(&mut s, 3);
    send(&mut s, b"DATA\r\n");
    read_replies(&mut s, 1);
    send(&mut s, b"Subject: two\r\n\r\nafter\r\n.\r\n");
    assert!(read_replies(&mut s, 1).starts_with("250 "));
    let at_b = b.wait_messages(1);
    assert_eq!(at_b.len(), 1, "the new next hop got the second message");
    assert!(at_b[0].content().ends_with(b"after\r\n"));
    assert_eq!(a.messages().len(), 1, "the old next hop got only the first");
}

/// A session opened before a reload that replaced `next_hops` relays its transactions to
/// its own snapshot's next hop, not the current one; a new session uses the new one; the
/// pool never hands a connection to the other.
fn a_session_keeps_the_next_hops_it_started_with(io: &str) {
    let (a, b) = (NextHop::start(AtDot::Accept), NextHop::start(AtDot::Accept));
    let mut m = Mxgate::start(&relay_config(a.addr), &[], io);
    let mut old = connect_from("127.0.7.7", m.addr());
    read_replies(&mut old, 1);
    send(&mut old, b"EHLO client.test\r\n");
    read_replies(&mut old, 1);

    write(&m, "mxgate.toml", &relay_config(b.addr));
    reload(&mut m, "SIGHUP: reloaded");
    let mut new = connect_from("127.0.7.8", m.addr());
    read_replies(&mut new, 1);
    send(&mut new, b"EHLO client.test\r\n");
    read_replies(&mut new, 1);
    for round in 0..2 {
        for (s, subject) in [(&mut old, "old"), (&mut new, "new")] {
            send(s, b"MAIL FROM:<x@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
            assert!(read_replies(s, 3).ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"));
            send(s, format!("Subject: {subject} {round}\r\n\r\nbody\r\n.\r\n").as_bytes());
            assert!(read_replies(s, 1).starts_with("250 "));
        }
    }
    let subjects = |hop: &NextHop, n| -> Vec<String> {
        hop.wait_messages(n).iter().map(|m| String::from_utf8_lossy(&m.content()).into_owned()).collect()
    };
    let (at_a, at_b) = (subjects(&a, 2), subjects(&b, 2));
    assert_eq!(at_a.len(), 2, "{at_a:?}");
    assert_eq!(at_b.len(), 2, "{at_b:?}");
    assert!(at_a.iter().all(|m| m.contains("Subject: old ")), "{at_a:?}");
    assert!(at_b.iter().all(|m| m.contains("Subject: new ")), "{at_b:?}");
}

/// `[access] shadow_list`: a peer it would deny is still served, counted, and logged once
/// a minute (naming the file and line); a reload that changes the list changes what is
/// logged.
fn a_shadow_list_is_logged_never_enforced(io: &str) {
    let config = config("mx.test", "shadow_list = \"candidate.list\"\n[control]\nsocket = \"mxgate.sock\"\n")
        .replace("threads = 2", "threads = 1");
    let files = [("access.list", "deny 127.0.7.40\n"), ("candidate.list", "# new\ndeny 127.0.7.41\n")];
    let mut m = Mxgate::start(&config, &files, io);
    let first = common::minute();
    assert_allowed(&m, "127.0.7.41", 0);
    let line = m.wait_for_log("shadow: would deny 127.0.7.41");
    assert!(line.contains("candidate.list:2)"), "{line}");
    assert_allowed(&m, "127.0.7.41", 0);
    assert_allowed(&m, "127.0.7.42", 0);
    assert_denied(&m, "127.0.7.40", 0);
    // one worker: its log is in order, so the reload's line comes after anything the
    // second connection could have logged
    write(&m, "candidate.list", "deny 127.0.7.42\n");
    reload(&mut m, "SIGHUP: reloaded");
    let logged = |m: &Mxgate, ip: &str| m.seen.iter().filter(|l| l.contains(&format!("would deny {ip} "))).count();
    // (twice only if a minute began in between)
    let once = logged(&m, "127.0.7.41") == 1 || (common::minute() != first && logged(&m, "127.0.7.41") == 2);
    assert!(once, "once a minute");
    assert_eq!(logged(&m, "127.0.7.42"), 0);
    assert_allowed(&m, "127.0.7.42", 0);
    m.wait_for_log("shadow: would deny 127.0.7.42 ");
    assert_allowed(&m, "127.0.7.41", 0);
    let (code, stats) = run_cli(&["stats"], &m.files.config());
    assert!(code == 0 && stats.contains("shadow_would_deny 3\n"), "{stats}");
}

on_one_driver!(
    a_session_keeps_the_next_hops_it_started_with,
    a_changed_list_applies_to_new_connections_and_open_ones_go_on,
    a_transaction_open_across_a_reload_finishes_on_its_next_hop,
    a_shadow_list_is_logged_never_enforced,
    a_bad_file_changes_nothing,
    settings_apply_and_those_read_at_start_wait_for_the_next,
    mxgate_reload_asks_the_running_instance,
);

/// Under a service manager (`NOTIFY_SOCKET`, systemd's `Type=notify`): READY=1 once
/// listening, RELOADING=1 then READY=1 around a reload, STOPPING=1 when the drain starts.
#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("a folder");
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    let mut m = Mxgate::start_as(&config("mx.test", ""), &[("access.list", "")], "epoll", "epoll", |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:"), "{ready}");
    m.signal(libc::SIGHUP);
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(next(), "READY=1");
    m.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert!(m.wait_exit().success());
}
