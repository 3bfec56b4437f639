//! Is the interval table worth it? Longest-prefix match at 10k, 100k and 1M prefixes
//! (the v4/v6 mix of `loadtest::prefixes`), against the obvious alternatives:
//! - `linear`: a scan of `Vec<(IpNet, u32)>` keeping the longest match (10k only:
//!   at 1M one lookup takes milliseconds);
//! - `prefix_trie`: the prefix-trie crate's `PrefixMap` (a binary trie), one per family;
//! - `iptrie_lc`: the iptrie crate's level-compressed trie.
//!
//! Reports ns per lookup (random probes, half hits), build time, and bytes per prefix
//! (heap held after the build, counted by a wrapping allocator; printed first). As the
//! floor for large tables it also measures this machine's latency of one dependent
//! random read in 32 MiB: no structure larger than the caches beats that per lookup.
//! At 1M it also reports `lookup_hot`: the same lookups over 1,024 distinct peers that
//! repeat (regular senders), whose table lines stay cached: the structure's own cost
//! apart from the machine's memory latency.
//! Run: `cargo bench --bench lookup` (`-- lookup/` or `-- build/` for one part).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use loadtest::prefixes::{Prefix, probes, random_prefixes};
use mxgate::access::PrefixTable;

struct Counting;
static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HELD.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const PROBES: usize = 1 << 16;

trait Lpm: Sized {
    const NAME: &'static str;
    fn build(prefixes: &[(IpNet, u32)]) -> Self;
    fn lookup(&self, ip: IpAddr) -> Option<u32>;
}

impl Lpm for PrefixTable {
    const NAME: &'static str = "interval_table";
    fn build(p: &[(IpNet, u32)]) -> Self {
        PrefixTable::build(p.iter().copied())
    }
    fn lookup(&self, ip: IpAddr) -> Option<u32> {
        PrefixTable::lookup(self, ip)
    }
}

struct Linear(Vec<(IpNet, u32)>);

impl Lpm for Linear {
    const NAME: &'static str = "linear";
    fn build(p: &[(IpNet, u32)]) -> Self {
        Linear(p.to_vec())
    }
    fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for &(net, v) in &self.0 {
            if net.contains(&ip) && best.is_none_or(|(len, _)| net.prefix_len() > len) {
                best = Some((net.prefix_len(), v));
            }
        }
        best.map(|b| b.1)
    }
}

struct PrefixTrie(prefix_trie::PrefixMap<Ipv4Net, u32>, prefix_trie::PrefixMap<Ipv6Net, u32>);

impl Lpm for PrefixTrie {
    const NAME: &'static str = "prefix_trie";
    fn build(p: &[(IpNet, u32)]) -> Self {
        let mut t = PrefixTrie(prefix_trie::PrefixMap::new(), prefix_trie::PrefixMap::new());
        for &(net, v) in p {
            match net {
                IpNet::V4(n) => {
                    t.0.entry(n).or_insert(v);
                }
                IpNet::V6(n) => {
                    t.1.entry(n).or_insert(v);
                }
            }
        }
        t
    }
    fn lookup(&self, ip: IpAddr) -> Option<u32> {
        match ip {
            IpAddr::V4(a) => self.0.get_lpm(&Ipv4Net::from(a)).map(|(_, v)| *v),
            IpAddr::V6(a) => self.1.get_lpm(&Ipv6Net::from(a)).map(|(_, v)| *v),
        }
    }
}

struct IpTrieLc(iptrie::IpLCTrieMap<u32>);

impl Lpm for IpTrieLc {
    const NAME: &'static str = "iptrie_lc";
    fn build(p: &[(IpNet, u32)]) -> Self {
        let mut t = iptrie::IpRTrieMap::with_roots(u32::MAX, u32::MAX);
        for &(net, v) in p {
            if t.get(&net).is_none() {
                t.insert(net, v);
            }
        }
        IpTrieLc(t.compress())
    }
    fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let (_, &v) = self.0.lookup(&IpNet::from(ip));
        (v != u32::MAX).then_some(v)
    }
}

fn valued(prefixes: &[Prefix]) -> Vec<(IpNet, u32)> {
    prefixes.iter().enumerate().map(|(i, p)| (IpNet::new(p.addr, p.len).expect("valid prefix"), i as u32)).collect()
}

/// Builds, reports heap per prefix, and checks the answers against the reference.
fn build_checked<T: Lpm>(p: &[(IpNet, u32)], probes: &[IpAddr], reference: &[Option<u32>]) -> T {
    let before = HELD.load(Ordering::Relaxed);
    let started = Instant::now();
    let t = T::build(p);
    let took = started.elapsed();
    let held = HELD.load(Ordering::Relaxed) - before;
    println!(
        "memory {:<15} {:>9} prefixes: {:>6.1} bytes/prefix, built in {:>8.1} ms",
        T::NAME,
        p.len(),
        held as f64 / p.len() as f64,
        took.as_secs_f64() * 1e3
    );
    for (ip, want) in probes.iter().zip(reference) {
        assert_eq!(t.lookup(*ip), *want, "{} disagrees on {ip}", T::NAME);
    }
    t
}

/// Distinct peers in the `lookup_hot` case.
const HOT_PEERS: usize = 1024;

fn bench_lookup<T: Lpm>(c: &mut Criterion, n: usize, p: &[(IpNet, u32)], probes: &[IpAddr], reference: &[Option<u32>]) {
    let t: T = build_checked(p, probes, reference);
    let cases: &[(&str, usize)] =
        if n >= 1_000_000 { &[("lookup", PROBES), ("lookup_hot", HOT_PEERS)] } else { &[("lookup", PROBES)] };
    for &(group, distinct) in cases {
        let mut g = c.benchmark_group(format!("{group}/{n}"));
        g.throughput(Throughput::Elements(1));
        let mut i = 0;
        g.bench_function(T::NAME, |b| {
            b.iter(|| {
                i = (i + 1) & (distinct - 1);
                black_box(t.lookup(black_box(probes[i])))
            })
        });
        g.finish();
    }
}

fn bench_build<T: Lpm>(c: &mut Criterion, n: usize, p: &[(IpNet, u32)]) {
    let mut g = c.benchmark_group(format!("build/{n}"));
    g.sample_size(10);
    g.bench_function(T::NAME, |b| b.iter_batched(|| p.to_vec(), |p| black_box(T::build(&p)), BatchSize::LargeInput));
    g.finish();
}

/// ns per dependent random read in a `bytes`-sized array (a pointer chase).
fn memory_latency(bytes: usize) -> f64 {
    let n = bytes / size_of::<usize>();
    let mut rng = loadtest::prefixes::Rng::new(42);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next = vec![0usize; n];
    for w in 0..n {
        next[order[w]] = order[(w + 1) % n];
    }
    let reads = 5_000_000;
    let (mut p, started) = (0, Instant::now());
    for _ in 0..reads {
        p = next[p];
    }
    black_box(p);
    started.elapsed().as_nanos() as f64 / reads as f64
}

fn lookups(c: &mut Criterion) {
    println!("floor: one dependent random read in 32 MiB takes {:.0} ns here", memory_latency(32 << 20));
    for n in SIZES {
        let prefixes = random_prefixes(n, n as u64);
        let probes = probes(&prefixes, PROBES, n as u64);
        let p = valued(&prefixes);
        let ours = PrefixTable::build(p.iter().copied());
        let reference: Vec<Option<u32>> = probes.iter().map(|ip| ours.lookup(*ip)).collect();
        if n <= 10_000 {
            bench_lookup::<Linear>(c, n, &p, &probes, &reference);
        }
        bench_lookup::<PrefixTable>(c, n, &p, &probes, &reference);
        bench_lookup::<PrefixTrie>(c, n, &p, &probes, &reference);
        bench_lookup::<IpTrieLc>(c, n, &p, &probes, &reference);
    }
}

fn builds(c: &mut Criterion) {
    for n in SIZES {
        let p = valued(&random_prefixes(n, n as u64));
        bench_build::<PrefixTable>(c, n, &p);
        bench_build::<PrefixTrie>(c, n, &p);
        bench_build::<IpTrieLc>(c, n, &p);
    }
}

criterion_group!(benches, lookups, builds);
criterion_main!(benches);
