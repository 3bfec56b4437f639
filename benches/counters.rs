//! Failure counting: ns per failure for `FailureCounters` (exact, 64 MiB) against the
//! count-min sketch it replaced (4 MiB, estimates), a `Mutex<HashMap>` and a sharded map
//! (64 mutexes), behind one trait, on one thread and on two.
//!
//! `cargo bench --bench counters` (criterion, each contender on its own), or
//! `cargo bench --bench counters -- --interleaved`: the exact table, the sketch and the
//! 64 MiB floor with two threads, taken in turns (see [`interleaved`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use mxgate::abuse::{AbuseKey, FailureCounters};
use mxgate::gate::PeerIp;

const NOW: i64 = 1_795_894_760;
/// Distinct failing addresses the failures are spread over: a few abusers, many, the
/// million the default table is sized for (48 % full), and a wide attack (10 million
/// addresses failing in one window: past the table's capacity; the maps hold them all).
const KEY_SETS: [usize; 4] = [1_000, 100_000, 1_000_000, 10_000_000];

trait Count: Sync {
    /// Adds one failure; returns the count.
    fn add(&self, key: AbuseKey) -> u32;
}

impl Count for FailureCounters {
    fn add(&self, key: AbuseKey) -> u32 {
        FailureCounters::add(self, key, NOW)
    }
}

/// The counters before the exact table: a count-min sketch of 2 rows × 32,768 cache lines,
/// each line eight sub-window words (sub-window number, count). Kept here as the yardstick
/// for the exact table's cost; it over-counts once many addresses fail.
struct CountMinSketch {
    hasher: ahash::RandomState,
    slots: Box<[SketchSlot]>,
}

const SKETCH_SLOTS: usize = 1 << 15;

#[repr(align(64))]
struct SketchSlot([AtomicU64; 8]);

impl CountMinSketch {
    fn new() -> Self {
        let slots = (0..2 * SKETCH_SLOTS).map(|_| SketchSlot(std::array::from_fn(|_| AtomicU64::new(0)))).collect();
        CountMinSketch { hasher: ahash::RandomState::new(), slots }
    }
}

impl Count for CountMinSketch {
    fn add(&self, key: AbuseKey) -> u32 {
        let epoch = (NOW as u64 / 75) as u32;
        let h = self.hasher.hash_one(key);
        let rows =
            [&self.slots[(h as usize) % SKETCH_SLOTS], &self.slots[SKETCH_SLOTS + ((h >> 32) as usize) % SKETCH_SLOTS]];
        for slot in rows {
            let word = &slot.0[epoch as usize % 8];
            let mut current = word.load(Ordering::Relaxed);
            loop {
                if (current >> 32) as u32 == epoch {
                    word.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let restarted = (u64::from(epoch) << 32) | 1;
                match word.compare_exchange_weak(current, restarted, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        }
        rows.into_iter()
            .map(|s| {
                s.0.iter()
                    .map(|w| w.load(Ordering::Relaxed))
                    .filter(|&w| epoch.wrapping_sub((w >> 32) as u32) < 8)
                    .fold(0u32, |sum, w| sum.saturating_add(w as u32))
            })
            .min()
            .unwrap_or(0)
    }
}

struct MutexMap(Mutex<HashMap<AbuseKey, u32, ahash::RandomState>>);

impl Count for MutexMap {
    fn add(&self, key: AbuseKey) -> u32 {
        let mut map = self.0.lock().expect("not poisoned");
        let n = map.entry(key).or_insert(0);
        *n += 1;
        *n
    }
}

struct ShardedMap {
    hasher: ahash::RandomState,
    shards: Vec<Mutex<HashMap<AbuseKey, u32, ahash::RandomState>>>,
}

impl Count for ShardedMap {
    fn add(&self, key: AbuseKey) -> u32 {
        let shard = self.hasher.hash_one(key) as usize % self.shards.len();
        let mut map = self.shards[shard].lock().expect("not poisoned");
        let n = map.entry(key).or_insert(0);
        *n += 1;
        *n
    }
}

/// The least any count shared by the cores can cost: one keyed hash and one atomic add
/// on a cache line of its own (no rows, no window, no key). Not a counter for mxgate (it
/// neither ages nor bounds anything); the yardstick the others are read against. On 4 MiB
/// (what the sketch takes: in the cache) and on 64 MiB in huge pages (what the exact
/// table takes: past the cache, so one trip to memory for each count).
struct OneAtomicAdd {
    hasher: ahash::RandomState,
    lines: &'static [Line],
}

impl OneAtomicAdd {
    /// `bytes` of lines in transparent huge pages where the kernel has them, held to
    /// the end of the process.
    fn new(bytes: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(bytes, 2 << 20).expect("a valid layout");
        // SAFETY: a layout of non-zero size
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: advice on the allocation just made, before any of it is touched
        unsafe { libc::madvise(ptr.cast(), bytes, libc::MADV_HUGEPAGE) };
        let len = bytes / std::mem::size_of::<Line>();
        let lines = ptr.cast::<Line>();
        for i in 0..len {
            // SAFETY: within the allocation, aligned for Line (2 MiB aligned, lines of 64)
            unsafe { lines.add(i).write(Line(AtomicU64::new(0))) };
        }
        // SAFETY: `len` Lines, each written above, never freed
        OneAtomicAdd { hasher: ahash::RandomState::new(), lines: unsafe { std::slice::from_raw_parts(lines, len) } }
    }
}

#[repr(align(64))]
struct Line(AtomicU64);

impl Count for OneAtomicAdd {
    fn add(&self, key: AbuseKey) -> u32 {
        let line = &self.lines[self.hasher.hash_one(key) as usize % self.lines.len()];
        line.0.fetch_add(1, Ordering::Relaxed) as u32 + 1
    }
}

fn keys(n: usize) -> Vec<AbuseKey> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            AbuseKey::new(PeerIp::new(Ipv4Addr::from(x as u32).into()), 64)
        })
        .collect()
}

/// `iters` failures over `threads` threads at once; the time until all are done.
fn run(counter: &dyn Count, keys: &[AbuseKey], threads: usize, iters: u64) -> Duration {
    let per_thread = iters / threads as u64;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t * 7919..).take(per_thread as usize) {
                    std::hint::black_box(counter.add(keys[i % keys.len()]));
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let floors = [OneAtomicAdd::new(4 << 20), OneAtomicAdd::new(64 << 20)];
    for n in KEY_SETS {
        bench_keys(c, &keys(n), &floors);
    }
}

fn bench_keys(c: &mut Criterion, keys: &[AbuseKey], floors: &[OneAtomicAdd; 2]) {
    let counters = FailureCounters::new(Duration::from_secs(600), 64 << 20);
    let sketch = CountMinSketch::new();
    let mutex = MutexMap(Mutex::new(HashMap::default()));
    let sharded = ShardedMap {
        hasher: ahash::RandomState::new(),
        shards: (0..64).map(|_| Mutex::new(HashMap::default())).collect(),
    };
    let contenders: [(&str, &dyn Count); 6] = [
        ("failure_counters", &counters),
        ("count_min_sketch", &sketch),
        ("mutex_hashmap", &mutex),
        ("sharded_map_64", &sharded),
        ("one_atomic_add_4mib", &floors[0]),
        ("one_atomic_add_64mib", &floors[1]),
    ];
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("add_{threads}_thread_{}_keys", keys.len()));
        for (name, counter) in contenders {
            group.bench_function(name, |b| b.iter_custom(|iters| run(counter, keys, threads, iters)));
        }
        group.finish();
    }
}

/// The exact table, the sketch and one atomic add on 64 MiB, two threads, in turns:
/// fifteen rounds, each running every contender once, starting with another one each
/// round, so that a noisy moment of a shared machine and the order fall on all of them.
/// Prints each one's median ns per failure and the median, least and most of the rounds'
/// exact / sketch ratios.
fn interleaved() {
    const ROUNDS: usize = 15;
    const OPS: u64 = 2_000_000;
    let floor = OneAtomicAdd::new(64 << 20);
    for n in KEY_SETS {
        let keys = keys(n);
        let counters = FailureCounters::new(Duration::from_secs(600), 64 << 20);
        let sketch = CountMinSketch::new();
        let contenders: [&dyn Count; 3] = [&counters, &sketch, &floor];
        for c in contenders {
            run(c, &keys, 2, OPS.max(2 * n as u64)); // every key in before the rounds
        }
        let mut ns = [const { Vec::new() }; 3];
        for round in 0..ROUNDS {
            for i in (0..contenders.len()).map(|i| (i + round) % contenders.len()) {
                ns[i].push(run(contenders[i], &keys, 2, OPS).as_nanos() as f64 / OPS as f64);
            }
        }
        let mut ratios: Vec<f64> = ns[0].iter().zip(&ns[1]).map(|(exact, sketch)| exact / sketch).collect();
        let median = |v: &mut [f64]| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let [exact, sketch, floor] = ns.map(|mut v| median(&mut v));
        let ratio = median(&mut ratios);
        println!(
            "{n:>10} addresses: exact {exact:5.1} ns, sketch {sketch:5.1} ns, one atomic add on 64 MiB {floor:5.1} ns; \
             exact / sketch {ratio:.2} ({:.2}-{:.2})",
            ratios[0],
            ratios[ROUNDS - 1]
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    if std::env::args().any(|a| a == "--interleaved") {
        interleaved();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
