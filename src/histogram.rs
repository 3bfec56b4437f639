//! Latency and size histograms for the metrics: each worker records into buckets of its
//! own (one writer: a plain load and store, no locked instruction, no cache line shared
//! between cores, as `stats` counts), and a scrape adds the workers' buckets up.
//!
//! Each quantity has fixed bucket bounds fitted to it (in microseconds for durations,
//! bytes for sizes); an observation goes to the first bucket whose bound it does not
//! exceed, or to the last (`+Inf`). The exposition is Prometheus's histogram: cumulative
//! `_bucket{le="..."}` lines, `_sum` and `_count`.
//!
//! Why not the `prometheus-client` crate: its histogram is one set of shared atomic
//! buckets per metric, so every observation is a locked add on a line every worker
//! writes (the contention this avoids); and the exposition around it is a page of text
//! that mxgate writes already.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hist {
    /// From the kernel's handing over of a connection (or its PROXY header's start) to
    /// the gate's verdict.
    Verdict,
    /// An allowed peer's connection, from accept to close.
    Session,
    /// A message's relay: from the end of its data sent on to the next hop's final reply.
    Relay,
    /// The next hop's reply to each command of a transaction (since the command went out,
    /// or the reply before it came).
    HopReply,
    /// A STARTTLS handshake, from our 220 to its end (done or failed).
    Handshake,
    /// A DNS blocklist query answered (timeouts are counted apart).
    Dnsbl,
    /// A message delivered, as it reached the next hop.
    MessageSize,
    /// A banned key's way into the kernel's set (`[kernel]`): from the refusal (or the
    /// ban) that decided it to the kernel's acknowledgement.
    KernelBan,
}

/// Most bounds a quantity has (its `+Inf` bucket comes after them).
const MAX_BOUNDS: usize = 19;

const MS: u64 = 1000;
const S: u64 = 1_000_000;

/// Every duration bound, microseconds, 1-2.5-5 steps from 10 µs to 10 s, then on to 30
/// minutes; each duration histogram takes a stretch of it.
const LADDER: [u64; 25] = [
    10,
    25,
    50,
    100,
    250,
    500,
    MS,
    2500,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2 * S + S / 2,
    5 * S,
    10 * S,
    30 * S,
    60 * S,
    120 * S,
    300 * S,
    600 * S,
    1800 * S,
];

/// Message size bounds, bytes: 1 KiB to 256 MiB in steps of 4.
const SIZES: [u64; 10] =
    [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20];

impl Hist {
    pub const ALL: [Hist; 8] = [
        Hist::Verdict,
        Hist::Session,
        Hist::Relay,
        Hist::HopReply,
        Hist::Handshake,
        Hist::Dnsbl,
        Hist::MessageSize,
        Hist::KernelBan,
    ];

    /// Its metric's name.
    pub fn metric_name(self) -> &'static str {
        match self {
            Hist::Verdict => "mxgate_verdict_seconds",
            Hist::Session => "mxgate_session_seconds",
            Hist::Relay => "mxgate_relay_seconds",
            Hist::HopReply => "mxgate_next_hop_reply_seconds",
            Hist::Handshake => "mxgate_tls_handshake_seconds",
            Hist::Dnsbl => "mxgate_dnsbl_lookup_seconds",
            Hist::MessageSize => "mxgate_message_size_bytes",
            Hist::KernelBan => "mxgate_kernel_ban_seconds",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Hist::Verdict => "Accept (or the PROXY header's start) to the gate's verdict.",
            Hist::Session => "An allowed peer's connection, accept to close.",
            Hist::Relay => "A message's end of data sent to the next hop, to its final reply.",
            Hist::HopReply => "The next hop's reply to each command of a transaction.",
            Hist::Handshake => "A STARTTLS handshake with a peer, done or failed.",
            Hist::Dnsbl => "A DNS blocklist query, to its answer (timeouts apart).",
            Hist::MessageSize => "Size of a message delivered, as the next hop got it.",
            Hist::KernelBan => {
                "A banned key's refusal (or ban) that sent it to the kernel, to the kernel's acknowledgement."
            }
        }
    }

    /// Bucket bounds, ascending: microseconds (a stretch of [`LADDER`] fitted to the
    /// quantity), or bytes for `MessageSize`.
    fn bounds(self) -> &'static [u64] {
        match self {
            // 10 us to 5 s
            Hist::Verdict | Hist::KernelBan => &LADDER[0..18],
            // 10 ms to 30 min
            Hist::Session => &LADDER[9..25],
            // 100 us to 2 min
            Hist::Relay | Hist::HopReply => &LADDER[3..22],
            // 100 us to 10 s
            Hist::Handshake | Hist::Dnsbl => &LADDER[3..19],
            Hist::MessageSize => &SIZES,
        }
    }

    /// Units of its bounds in one of the exposition's unit (seconds, bytes).
    fn per_unit(self) -> f64 {
        match self {
            Hist::MessageSize => 1.0,
            _ => 1e6,
        }
    }
}

/// One histogram's buckets (not cumulative; the last is `+Inf`) and sum.
#[derive(Debug, Default)]
struct Buckets {
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum: AtomicU64,
}

/// One worker's histograms. Only its worker records into them.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Histograms([Buckets; Hist::ALL.len()]);

/// One writer: no read-modify-write needed, and readers see whole values.
#[inline]
fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

impl Histograms {
    /// Records `value` (microseconds, or bytes for `MessageSize`).
    #[inline]
    pub fn observe(&self, hist: Hist, value: u64) {
        let b = &self.0[hist as usize];
        let at = hist.bounds().partition_point(|&bound| bound < value);
        bump(&b.counts[at], 1);
        bump(&b.sum, value);
    }

    #[inline]
    pub fn observe_duration(&self, hist: Hist, d: Duration) {
        self.observe(hist, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }
}

/// The exposition of `hist` summed over `workers`: `# HELP`, `# TYPE`, the cumulative
/// buckets, `_sum` and `_count`, appended to `out`.
pub fn expose<'a>(hist: Hist, workers: impl Iterator<Item = &'a Histograms>, out: &mut String) {
    let bounds = hist.bounds();
    let mut counts = [0u64; MAX_BOUNDS + 1];
    let mut sum = 0u64;
    for w in workers {
        let b = &w.0[hist as usize];
        for (total, c) in counts.iter_mut().zip(&b.counts) {
            *total = total.wrapping_add(c.load(Ordering::Relaxed));
        }
        sum = sum.wrapping_add(b.sum.load(Ordering::Relaxed));
    }
    let name = hist.metric_name();
    let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", hist.help());
    let mut cumulative = 0u64;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative = cumulative.wrapping_add(count);
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / hist.per_unit());
    }
    cumulative = cumulative.wrapping_add(counts[bounds.len()]);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", sum as f64 / hist.per_unit());
    let _ = writeln!(out, "{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_ascend_and_fit_the_buckets() {
        for h in Hist::ALL {
            let b = h.bounds();
            assert!(b.len() <= MAX_BOUNDS, "{h:?}");
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{h:?} ascending");
        }
        let ends = |h: Hist| (h.bounds()[0], h.bounds()[h.bounds().len() - 1]);
        assert_eq!(ends(Hist::Verdict), (10, 5 * S));
        assert_eq!(ends(Hist::Session), (10 * MS, 1800 * S));
        assert_eq!(ends(Hist::Relay), (100, 120 * S));
        assert_eq!(ends(Hist::Dnsbl), (100, 10 * S));
    }

    #[test]
    fn workers_buckets_add_up_cumulatively() {
        let (a, b) = (Histograms::default(), Histograms::default());
        a.observe_duration(Hist::Relay, Duration::from_micros(100)); // on the first bound: le 0.0001
        a.observe_duration(Hist::Relay, Duration::from_millis(3)); // le 0.005
        b.observe_duration(Hist::Relay, Duration::from_millis(3));
        b.observe_duration(Hist::Relay, Duration::from_secs(500)); // past the last: +Inf only
        let mut out = String::new();
        expose(Hist::Relay, [&a, &b].into_iter(), &mut out);
        let value = |line: &str| {
            let found = out.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line}\n{out}"));
            found.rsplit(' ').next().unwrap_or_default().to_owned()
        };
        assert!(out.starts_with("# HELP mxgate_relay_seconds "), "{out}");
        assert!(out.contains("# TYPE mxgate_relay_seconds histogram\n"), "{out}");
        assert_eq!(value("mxgate_relay_seconds_bucket{le=\"0.0001\"}"), "1");
        assert_eq!(value("mxgate_relay_seconds_bucket{le=\"0.0025\"}"), "1");
        assert_eq!(value("mxgate_relay_seconds_bucket{le=\"0.005\"}"), "3");
        assert_eq!(value("mxgate_relay_seconds_bucket{le=\"120\"}"), "3");
        assert_eq!(value("mxgate_relay_seconds_bucket{le=\"+Inf\"}"), "4");
        assert_eq!(value("mxgate_relay_seconds_count"), "4");
        assert_eq!(value("mxgate_relay_seconds_sum"), "500.0061");
        let mut out = String::new();
        let sizes = Histograms::default();
        sizes.observe(Hist::MessageSize, 2048);
        expose(Hist::MessageSize, std::iter::once(&sizes), &mut out);
        assert!(out.contains("mxgate_message_size_bytes_bucket{le=\"1024\"} 0\n"), "{out}");
        assert!(out.contains("mxgate_message_size_bytes_bucket{le=\"4096\"} 1\n"), "{out}");
        assert!(out.contains("mxgate_message_size_bytes_sum 2048\n"), "{out}");
    }
}
