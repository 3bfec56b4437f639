//! The kernel keeper's own work, without the kernel: what one refusal costs it (counted,
//! the key not yet due), what a key's promotion costs (its elements worked out, the
//! changes taken), and encoding a batch of 1,500 addresses as netlink messages. The
//! keeper is one thread: its events a second are what a flood can make it decide.
//!
//! `cargo bench --bench kernel`

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mxgate::abuse::AbuseKey;
use mxgate::kernel::{Batch, Elem, Excluded, Keeper, PER_BATCH};

const NOW: i64 = 1_800_000_000_000;
const UNTIL: i64 = 1_800_003_600;

fn key(i: u32) -> AbuseKey {
    AbuseKey::from_net(ipnet::IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))))
}

fn keeper(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernel keeper");
    let at = Instant::now();
    // 65,536 keys refused in turn, never reaching the count: the counting alone
    let mut k = Keeper::new(u32::MAX, Excluded::default());
    let mut i = 0u32;
    g.bench_function("a refusal counted (65,536 keys)", |b| {
        b.iter(|| {
            i = (i + 1) & 0xffff;
            k.refused(key(i), UNTIL, NOW, at);
        })
    });
    // each refusal promotes a new key (after_refusals 1), its change taken at once
    let excluded = Excluded { everything: false, nets: vec!["10.0.0.0/30".parse().expect("a prefix")] };
    let mut k = Keeper::new(1, excluded);
    let mut n = 0u32;
    g.bench_function("a key promoted and its change taken", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            k.refused(key(n), UNTIL, NOW, at);
            std::hint::black_box(k.take());
        })
    });
    let elems: Vec<(Elem, Duration)> =
        (0..PER_BATCH as u32).map(|i| (Elem::Addr4(0x0a00_0000 | i), Duration::from_secs(3600))).collect();
    g.bench_function("a batch of 1,500 addresses encoded", |b| {
        b.iter(|| {
            let mut batch = Batch::new(1);
            batch.add_elements("mxgate", &elems);
            std::hint::black_box(batch.finish())
        })
    });
    g.finish();
}

criterion_group!(benches, keeper);
criterion_main!(benches);
