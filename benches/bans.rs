//! The gate's ban lookup (`BanSet::banned`) for a peer that is not banned, while 10,000
//! addresses are: the cost every allowed connection pays once any ban is in force. With
//! only the bans failures make (addresses, and their /24 escalations), and with an
//! operator's prefix ban besides (a /16: one more length to look under).
//!
//! `cargo bench --bench bans`

use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use mxgate::abuse::AbuseKey;
use mxgate::abuse::bans::{BanBook, Reason};
use mxgate::config::Config;
use mxgate::peer::PeerIp;

const T0: i64 = 1_795_894_760;

fn book(with_prefix: bool) -> BanBook {
    let config = Config::embedded().abuse;
    let mut book = BanBook::default();
    for i in 0..10_000u32 {
        let ip = Ipv4Addr::from(0x0a00_0000 | (i * 7));
        let _ = book.ban(AbuseKey::new(PeerIp::new(IpAddr::V4(ip)), 64), Reason::Failures(30), T0, &config);
    }
    if with_prefix {
        let net = AbuseKey::from_net("198.51.0.0/16".parse().expect("a prefix"));
        book.impose(net, Reason::Recorded("a range".into()), Some(T0 + 3600), T0, &config);
    }
    book
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("ban lookup, a peer not banned, 10,000 bans");
    let probes: Vec<AbuseKey> =
        (0..1024u32).map(|i| AbuseKey::new(PeerIp::new(IpAddr::V4(Ipv4Addr::from(0xc000_0000 | i))), 64)).collect();
    for (name, with_prefix) in [("failures' bans only", false), ("and an operator's /16", true)] {
        let set = book(with_prefix).set();
        g.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % probes.len();
                std::hint::black_box(set.banned(probes[i], T0))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
