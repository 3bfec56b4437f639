//! What a run says: a summary table per phase (throughput, latency percentiles, errors by
//! kind, the checks and the verdict), and the same figures as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// One phase of a scenario, measured and judged.
#[derive(Debug)]
pub struct Phase {
    pub name: String,
    pub elapsed: Duration,
    /// Conversations (deny) or messages (relay) that went as expected.
    pub ops: u64,
    /// Latency percentiles in milliseconds: p50, p90, p99, p99.9, max.
    pub latency_ms: [f64; 5],
    pub errors: BTreeMap<String, u64>,
    /// Each check: what it says, and whether it holds.
    pub checks: Vec<(String, bool)>,
    /// The latencies themselves (microseconds), for the plot.
    pub histogram: Histogram<u64>,
    /// The spawned server's CPU time (user + system) per op during the phase, µs.
    pub server_cpu_us: Option<f64>,
    /// The harness's own CPU per operation (its clients and its sink), beside it.
    pub harness_cpu_us: Option<f64>,
}

impl Phase {
    pub fn new(name: &str, elapsed: Duration, ops: u64, latency: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |p: f64| if latency.is_empty() { 0.0 } else { ms(latency.value_at_quantile(p)) };
        Phase {
            name: name.to_owned(),
            elapsed,
            ops,
            latency_ms: [q(0.5), q(0.9), q(0.99), q(0.999), if latency.is_empty() { 0.0 } else { ms(latency.max()) }],
            errors: BTreeMap::new(),
            checks: Vec::new(),
            histogram: latency.clone(),
            server_cpu_us: None,
            harness_cpu_us: None,
        }
    }

    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|(_, ok)| *ok)
    }

    pub fn check(&mut self, what: String, holds: bool) {
        self.checks.push((what, holds));
    }
}

/// A scenario's phases.
#[derive(Debug)]
pub struct Report {
    pub scenario: String,
    pub phases: Vec<Phase>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.phases.iter().all(Phase::passed)
    }

    /// The summary table, for a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}  verdict",
            "phase", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
        );
        for p in &self.phases {
            let l = p.latency_ms;
            let _ = writeln!(
                out,
                "{:<10} {:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}  {}",
                p.name,
                p.ops,
                p.throughput(),
                l[0],
                l[1],
                l[2],
                l[3],
                l[4],
                p.errors.values().sum::<u64>(),
                if p.passed() { "pass" } else { "FAIL" }
            );
            for (kind, n) in &p.errors {
                let _ = writeln!(out, "    error {kind}: {n}");
            }
            for (what, holds) in &p.checks {
                let _ = writeln!(out, "    [{}] {what}", if *holds { "ok" } else { "FAILED" });
            }
            if let Some(us) = p.server_cpu_us {
                let harness = p.harness_cpu_us.map(|h| format!(" (the harness's, clients and sink: {h:.1} us)"));
                let _ = writeln!(out, "    mxgate's CPU per op: {us:.1} us{}", harness.unwrap_or_default());
            }
        }
        out
    }

    /// Draws every phase's latency distribution into an SVG file.
    pub fn plot(&self, path: &std::path::Path) -> Result<(), String> {
        let series: Vec<(String, &Histogram<u64>)> =
            self.phases.iter().map(|p| (p.name.clone(), &p.histogram)).collect();
        crate::plot::latency_svg(path, &format!("mxgate-loadtest {}: latency by percentile", self.scenario), &series)
    }

    /// The same figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        let phases: Vec<serde_json::Value> = self
            .phases
            .iter()
            .map(|p| {
                let l = p.latency_ms;
                serde_json::json!({
                    "phase": p.name,
                    "seconds": p.elapsed.as_secs_f64(),
                    "ops": p.ops,
                    "throughput": p.throughput(),
                    "latency_ms": { "p50": l[0], "p90": l[1], "p99": l[2], "p999": l[3], "max": l[4] },
                    "errors": p.errors,
                    "checks": p.checks.iter().map(|(w, ok)| serde_json::json!({"check": w, "holds": ok})).collect::<Vec<_>>(),
                    "verdict": if p.passed() { "pass" } else { "fail" },
                    "server_cpu_us_per_op": p.server_cpu_us,
                    "harness_cpu_us_per_op": p.harness_cpu_us,
                })
            })
            .collect();
        serde_json::json!({ "scenario": self.scenario, "phases": phases, "verdict": if self.passed() { "pass" } else { "fail" } })
    }
}
