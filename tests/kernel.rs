//! The kernel fast path against the real kernel: nf_tables spoken over netlink by
//! `mxgate::kernel` (a table of mxgate's own, its sets, prefixes with timeouts, rules that
//! drop or reset), and `[kernel]` end to end on the real binary: a banned address's first
//! refusals in user space, then its SYNs dropped; a neighbour served; unban, expiry,
//! prefixes and the whitelist; the table removed at exit; without CAP_NET_ADMIN (capsh
//! drops it) one warning and refusals in user space. `nft` (Debian's nftables, which
//! .ci/run installs) inspects what the kernel holds. Needs root (CAP_NET_ADMIN): skipped
//! with a line elsewhere, failed under CI.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::config::Config;
use common::{Mxgate, NftTable, assert_allowed, assert_denied, run_cli, wait_until};

use mxgate::kernel::{ADDR4, Batch, NET4, NET6, Socket};

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("nft (apt-get install nftables)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_table_its_sets_and_prefixes_with_timeouts_reach_the_kernel() {
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let table = format!("mxgate_test_{}", std::process::id());
    let _cleanup = NftTable(table.clone());
    let socket = Socket::open().expect("a netfilter netlink socket");
    let mut b = Batch::new(1);
    b.new_table_with_sets(&table);
    socket.apply(b).expect("table and sets");
    let mut b = Batch::new(10);
    let hour = Duration::from_secs(3600);
    let prefixes = [
        ("192.0.2.0/24".parse().unwrap(), hour),
        ("198.51.100.7/32".parse().unwrap(), Duration::from_secs(60)),
        ("2001:db8::/48".parse().unwrap(), hour),
    ];
    b.add_prefixes(&table, &prefixes);
    socket.apply(b).expect("elements");
    let net4 = nft(&["list", "set", "inet", &table, NET4.name]);
    assert!(net4.contains("192.0.2.0/24 timeout 1h expires "), "{net4}");
    let addr4 = nft(&["list", "set", "inet", &table, ADDR4.name]);
    assert!(addr4.contains("198.51.100.7 timeout 1m expires "), "an address in the hash set: {addr4}");
    let v6 = nft(&["list", "set", "inet", &table, NET6.name]);
    assert!(v6.contains("2001:db8::/48 timeout 1h expires "), "{v6}");
    // removed again
    let mut b = Batch::new(20);
    b.del_prefixes(&table, &["192.0.2.0/24".parse().unwrap()]);
    socket.apply(b).expect("removal");
    let net4 = nft(&["list", "set", "inet", &table, NET4.name]);
    assert!(!net4.contains("192.0.2.0/24"), "{net4}");
    assert!(nft(&["list", "set", "inet", &table, ADDR4.name]).contains("198.51.100.7"));
    // an error comes back as one: the element is not there any more
    let mut b = Batch::new(30);
    b.del_prefixes(&table, &["192.0.2.0/24".parse().unwrap()]);
    assert!(socket.apply(b).is_err(), "removing what is not there is refused");
    let mut b = Batch::new(40);
    b.del_table(&table);
    socket.apply(b).expect("the table removed");
    assert!(!nft(&["list", "tables"]).contains(&table));
}

/// The chain on prerouting and a rule per set: TCP from a banned address to the port is
/// dropped (its connect never completes) or reset (refused at once); a neighbour still
/// connects; the table removed, the banned address connects again.
#[test]
fn banned_sources_are_dropped_or_reset_by_the_kernel() {
    use mxgate::kernel::{Action, NET6};
    use std::net::TcpListener;
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = listener.local_addr().expect("addr").port();
    let to: SocketAddr = ([127, 0, 0, 1], port).into();
    let connect = |source: &str| attempt(source, to, Duration::from_millis(300)).map(drop);
    for (action, n) in [(Action::Drop, 0u32), (Action::Reset, 1)] {
        let table = format!("mxgate_rule_{}_{n}", std::process::id());
        let _cleanup = NftTable(table.clone());
        let socket = Socket::open().expect("a netfilter netlink socket");
        let mut b = Batch::new(1);
        b.new_table_with_sets(&table);
        b.new_chain(&table, "refuse");
        for set in [ADDR4, NET4, NET6] {
            b.new_rule(&table, "refuse", set, port, action);
        }
        socket.apply(b).unwrap_or_else(|e| panic!("{action:?}: {e}\n{}", nft(&["list", "ruleset"])));
        let mut b = Batch::new(100);
        b.add_prefixes(&table, &[("127.0.40.7/32".parse().unwrap(), Duration::from_secs(60))]);
        socket.apply(b).expect("the banned address");
        let refused = connect("127.0.40.7").expect_err("the kernel stops it");
        match action {
            Action::Drop => assert_eq!(refused.kind(), std::io::ErrorKind::TimedOut, "{refused}"),
            Action::Reset => assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}"),
        }
        connect("127.0.40.8").expect("a neighbour connects");
        let rules = nft(&["list", "chain", "inet", &table, "refuse"]);
        assert!(rules.contains(&format!("tcp dport {port} ip saddr @addr4")), "{rules}");
        let mut b = Batch::new(200);
        b.del_table(&table);
        socket.apply(b).expect("the table removed");
        connect("127.0.40.7").expect("no table, no refusal");
    }
}

/// A connection attempt from `source` to `to`, waiting `patience` for the handshake.
fn attempt(source: &str, to: SocketAddr, patience: Duration) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source.parse().expect("source"), 0).into())?;
    socket.connect_timeout(&to.into(), patience)?;
    Ok(socket.into())
}

/// Whether the kernel drops `source`'s SYNs to `to` now: its connect times out.
fn dropped(source: &str, to: SocketAddr) -> bool {
    matches!(attempt(source, to, Duration::from_millis(60)), Err(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

fn kernel_config(table: &str, mode: &str, after_refusals: u32) -> Config {
    Config::new()
        .set("kernel", "mode", format!("\"{mode}\""))
        .set("kernel", "table", format!("\"{table}\""))
        .set("kernel", "after_refusals", after_refusals)
        .set("abuse", "whitelist", "\"white.list\"")
        .set("control", "socket", "\"mxgate.sock\"")
}

fn cli(m: &Mxgate, args: &[&str]) -> String {
    let (code, out) = run_cli(args, &m.files.config());
    assert_eq!(code, 0, "mxgate {args:?}: {out}");
    out
}

/// The acceptance test of `[kernel] mode = "drop"`.
#[test]
fn a_banned_flood_moves_into_the_kernel_and_out_again() {
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let table = format!("mxgate_e2e_{}", std::process::id());
    let _cleanup = NftTable(table.clone());
    let config = kernel_config(&table, "drop", 2).to_string();
    let mut m = Mxgate::start(&config, &[("white.list", "127.0.82.9\n")], "uring");
    m.wait_for_log_once("kernel fast path on");
    let to = m.addr();
    cli(&m, &["ban", "127.0.81.7"]);
    // its first refusals are the 530 line, in user space
    assert_denied(&m, "127.0.81.7", 0);
    assert_denied(&m, "127.0.81.7", 0);
    let decided = Instant::now();
    let mut refused_after = 0;
    while !dropped("127.0.81.7", to) {
        refused_after += 1; // an attempt that reached user space before the kernel had it
        assert!(decided.elapsed() < Duration::from_secs(2), "not dropped within 2 s");
    }
    let took = decided.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "SYNs dropped {took:?} after the last refusal counted ({refused_after} more refused)"
    );
    assert_allowed(&m, "127.0.81.8", 0);
    let set = nft(&["list", "set", "inet", &table, "addr4"]);
    assert!(set.contains("127.0.81.7 timeout"), "{set}");
    let stats = cli(&m, &["stats"]);
    assert!(stats.contains("kernel_active 1") && stats.contains("kernel_set_elements 1"), "{stats}");

    // unban lifts it from the kernel too
    cli(&m, &["unban", "127.0.81.7"]);
    wait_until("127.0.81.7 out of the kernel", || !dropped("127.0.81.7", to));
    assert_allowed(&m, "127.0.81.7", 0);

    // a prefix: its addresses refused twice in all bring it in, the whitelisted one never
    cli(&m, &["ban", "127.0.82.0/24"]);
    assert_denied(&m, "127.0.82.5", 0);
    assert_denied(&m, "127.0.82.6", 0);
    wait_until("127.0.82.0/24 in the kernel", || dropped("127.0.82.77", to));
    assert_allowed(&m, "127.0.82.9", 0);
    let set = nft(&["list", "set", "inet", &table, "net4"]);
    assert!(set.contains("127.0.82.0-127.0.82.8") && set.contains("127.0.82.10-127.0.82.255"), "{set}");

    // a short ban: the kernel lets it go when the ban ends
    cli(&m, &["ban", "127.0.83.7", "--for", "3s"]);
    assert_denied(&m, "127.0.83.7", 0);
    assert_denied(&m, "127.0.83.7", 0);
    wait_until("127.0.83.7 in the kernel", || dropped("127.0.83.7", to));
    wait_until("127.0.83.7's ban ended", || !dropped("127.0.83.7", to));
    assert_allowed(&m, "127.0.83.7", 0);

    // at exit the table goes
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit().success());
    assert!(!nft(&["list", "tables"]).contains(&table), "{}", nft(&["list", "tables"]));
}

/// `reset` with `after_refusals = 0`: the ban goes in as it is made (a ban made before the
/// start too), and an attempt is refused at once; a leftover table of the same name is
/// replaced.
#[test]
fn reset_mode_refuses_banned_attempts_at_once() {
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let table = format!("mxgate_reset_{}", std::process::id());
    let _cleanup = NftTable(table.clone());
    // a previous run's leftover, with an element
    let socket = Socket::open().expect("a netfilter netlink socket");
    let mut b = Batch::new(1);
    b.new_table_with_sets(&table);
    socket.apply(b).expect("a leftover table");
    let mut b = Batch::new(10);
    b.add_prefixes(&table, &[("127.0.84.99/32".parse().unwrap(), Duration::from_secs(600))]);
    socket.apply(b).expect("a leftover element");
    let config = kernel_config(&table, "reset", 0).to_string();
    let mut m = Mxgate::start(&config, &[("white.list", "")], "epoll");
    m.wait_for_log_once("kernel fast path on");
    let set = nft(&["list", "set", "inet", &table, "addr4"]);
    assert!(!set.contains("127.0.84.99"), "leftovers flushed: {set}");
    cli(&m, &["ban", "127.0.84.7"]);
    let to = m.addr();
    wait_until(
        "127.0.84.7 reset by the kernel",
        || matches!(attempt("127.0.84.7", to, Duration::from_secs(1)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
    );
    assert_allowed(&m, "127.0.84.8", 0);
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit().success());
    assert!(!nft(&["list", "tables"]).contains(&table));
}

/// Without CAP_NET_ADMIN (capsh drops it from the bounding set, so the process has it
/// nowhere): one warning naming the cause, and every refusal stays the 530 line.
#[test]
fn without_cap_net_admin_it_warns_and_refuses_in_user_space() {
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    if !Command::new("capsh").arg("--print").output().is_ok_and(|o| o.status.success()) {
        assert!(std::env::var("CI").is_err(), "capsh is not installed (.ci/run installs libcap2-bin)");
        eprintln!("SKIPPED: capsh is not installed (apt-get install libcap2-bin)");
        return;
    }
    let table = format!("mxgate_nocap_{}", std::process::id());
    let _cleanup = NftTable(table.clone());
    let config = kernel_config(&table, "drop", 1).to_string();
    let wrapper = ["capsh", "--drop=cap_net_admin", "--", "-c", "exec \"$0\" \"$@\""];
    let mut m = Mxgate::start_under(&wrapper, &config, &[("white.list", "")], "uring");
    let warning = m.wait_for_log_once("kernel fast path off");
    assert!(warning.contains("no CAP_NET_ADMIN") && warning.contains("refused in user space"), "{warning}");
    cli(&m, &["ban", "127.0.85.7"]);
    for _ in 0..5 {
        assert_denied(&m, "127.0.85.7", 0);
    }
    let stats = cli(&m, &["stats"]);
    assert!(stats.contains("kernel_active 0"), "{stats}");
    assert!(!nft(&["list", "tables"]).contains(&table));
    m.drain_log();
    assert_eq!(m.seen.iter().filter(|l| l.contains("kernel fast path")).count(), 1, "one warning");
}

/// Bans that failures make reach the kernel too: with `after_refusals = 0` each as it is
/// made, and the /24 they escalate to, less the whitelisted address inside it.
#[test]
fn failures_escalate_to_a_prefix_the_kernel_takes_but_never_the_whitelisted() {
    use common::{connect_from, read_replies, read_to_end, send};
    if !common::root("nf_tables (CAP_NET_ADMIN)") {
        return;
    }
    let table = format!("mxgate_esc_{}", std::process::id());
    let _cleanup = NftTable(table.clone());
    let config = kernel_config(&table, "drop", 0)
        .set("abuse", "failure_threshold", 1)
        .set("abuse", "escalate_after", 2)
        .to_string();
    let mut m = Mxgate::start(&config, &[("white.list", "127.0.86.9\n")], "epoll");
    m.wait_for_log_once("kernel fast path on");
    let to = m.addr();
    for source in ["127.0.86.1", "127.0.86.2"] {
        let mut s = connect_from(source, to);
        assert_eq!(read_replies(&mut s, 1), "220 mx.test ESMTP mxgate\r\n", "{source}");
        send(&mut s, b"BOGUS\r\n");
        assert!(read_replies(&mut s, 1).starts_with('5'), "{source}: a failure");
        send(&mut s, b"QUIT\r\n");
        read_to_end(&mut s);
    }
    m.wait_for_log("IP address 127.0.86.0/24 banned");
    wait_until("the /24 in the kernel", || dropped("127.0.86.77", to));
    assert!(dropped("127.0.86.1", to), "the first address, banned by its own failure");
    assert_allowed(&m, "127.0.86.9", 0);
    let set = nft(&["list", "set", "inet", &table, "net4"]);
    assert!(set.contains("127.0.86.0-127.0.86.8") && set.contains("127.0.86.10-127.0.86.255"), "{set}");
}
