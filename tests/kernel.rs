//! nf_tables spoken over netlink by `mxgate::kernel`, against the real kernel: a table
//! of mxgate's own with its two sets, prefixes added with timeouts and removed, the table
//! removed; `nft` (Debian's nftables, which .ci/run installs) inspects what the kernel
//! holds. Needs root (CAP_NET_ADMIN): skipped with a line elsewhere, failed under CI.

use std::process::Command;
use std::time::Duration;

use mxgate::kernel::{ADDR4, Batch, NET4, NET6, Socket};

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("nft (apt-get install nftables)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn root() -> bool {
    // SAFETY: geteuid reads the process's effective user id
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").is_err(), "the kernel tests need root in CI");
        eprintln!("SKIPPED: nf_tables needs root (CAP_NET_ADMIN)");
    }
    root
}

#[test]
fn a_table_its_sets_and_prefixes_with_timeouts_reach_the_kernel() {
    if !root() {
        return;
    }
    let table = format!("mxgate_test_{}", std::process::id());
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
    use std::net::{SocketAddr, TcpListener};
    if !root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    let port = listener.local_addr().expect("addr").port();
    let connect = |source: &str| -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source.parse().expect("source"), 0).into())?;
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        socket.connect_timeout(&to.into(), Duration::from_millis(300))
    };
    for (action, n) in [(Action::Drop, 0u32), (Action::Reset, 1)] {
        let table = format!("mxgate_rule_{}_{n}", std::process::id());
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
