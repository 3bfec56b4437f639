//! Prometheus text at `http://<[metrics] listen>/metrics`: what `mxgate stats` says, as
//! `mxgate_<name>_total` counters and `mxgate_<name>` gauges, per next hop (label
//! `next_hop`) whether it is up, its failures, its replies and the time waited for them,
//! and the latency and size histograms (`histogram`). One request a connection,
//! served as [`crate::service`] serves every operator's client (a thread each, a few at
//! once, the whole request within a deadline). Beside it, for a balancer's or an
//! orchestrator's probes: `GET /healthz`, 200 while every worker runs (503 once one
//! died: a panic, a fatal error), and `GET /readyz`, 200 while listening and accepting
//! (503 before the listeners are up and while draining). A query string is ignored;
//! any other path is answered 404 (a malformed request 400).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use std::fmt::Write as _;

use crate::shared::Shared;

/// Longest request head read.
const MAX_REQUEST: usize = 4096;

/// Listens on `addr` and answers for the life of the process; returns the address bound
/// (`addr` with port 0 gets one).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
    crate::service::serve("mxgate-metrics", incoming, move |stream| answer(stream, &shared))?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let ended = |h: &[u8]| h.windows(4).any(|w| w == b"\r\n\r\n") || h.windows(2).any(|w| w == b"\n\n");
    let head = crate::service::read_request(&mut stream, Instant::now(), MAX_REQUEST, ended)?;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    // the path, without a query string (a scraper may add one)
    let path = |target: &[u8]| target.split(|&b| b == b'?').next().map(<[u8]>::to_vec).unwrap_or_default();
    let (status, body) = match (words.next(), words.next().map(path).as_deref()) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", text(shared)),
        (Some(b"GET"), Some(b"/healthz")) if shared.healthy() => ("200 OK", "ok\n".to_owned()),
        (Some(b"GET"), Some(b"/healthz")) => ("503 Service Unavailable", "a worker died\n".to_owned()),
        (Some(b"GET"), Some(b"/readyz")) if shared.ready() => ("200 OK", "ready\n".to_owned()),
        (Some(b"GET"), Some(b"/readyz")) if shared.stopping() => ("503 Service Unavailable", "draining\n".to_owned()),
        (Some(b"GET"), Some(b"/readyz")) => ("503 Service Unavailable", "starting\n".to_owned()),
        (Some(_), Some(_)) => ("404 Not Found", "not found: try /metrics, /healthz or /readyz\n".to_owned()),
        _ => ("400 Bad Request", "bad request\n".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    crate::service::write_answer(&mut stream, reply.as_bytes())
}

/// A metric's type in the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric mxgate exports: what docs/metrics.md lists (a test holds the two alike)
/// and what its `# HELP` line says.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Its labels, comma-separated; empty: none.
    pub labels: &'static str,
    pub help: &'static str,
    /// When it is exported at all (empty: always).
    pub when: &'static str,
}

const fn metric(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric { name, kind, labels: "", help, when: "" }
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    metric(name, Kind::Counter, help)
}

const fn fleet(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric { name, kind, labels: "", help, when: "with [cluster]" }
}

const fn kernel(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric { name, kind, labels: "", help, when: "with [kernel] on" }
}

const fn per_hop(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric { name, kind, labels: "next_hop", help, when: "" }
}

/// Every metric but the histograms (`histogram::Hist`), in the exposition's order.
const METRICS: &[Metric] = &[
    metric("mxgate_uptime_seconds", Kind::Gauge, "Seconds since the process started."),
    counter("mxgate_connections_accepted_total", "Connections the kernel handed over."),
    counter("mxgate_refused_denied_total", "Connections refused by the access list."),
    counter("mxgate_refused_banned_total", "Connections refused by a ban."),
    counter("mxgate_refused_too_many_from_address_total", "Connections refused past abuse.max_connections_per_ip."),
    counter("mxgate_refused_busy_total", "Connections refused past listen.max_connections."),
    counter("mxgate_sessions_total", "Connections allowed: given the banner and a session."),
    counter("mxgate_messages_delivered_total", "Messages the next hop took (250 to the peer)."),
    counter("mxgate_messages_refused_total", "Transactions ended with a refusal of the message."),
    counter("mxgate_transactions_abandoned_total", "Transactions ended without a reply to a message."),
    counter("mxgate_failures_total", "Replies counted as failures of the peer (5xx)."),
    counter("mxgate_conversations_dropped_total", "Conversations dropped for too many failures."),
    counter("mxgate_gone_before_judged_total", "Connections whose peer was gone before the gate judged it."),
    counter("mxgate_tls_handshakes_total", "STARTTLS handshakes completed."),
    counter("mxgate_tls_handshakes_failed_total", "STARTTLS handshakes that failed."),
    counter("mxgate_refused_proxy_header_total", "A trusted balancer's connections without a valid PROXY header."),
    counter("mxgate_screen_passed_total", "Peers that passed screening."),
    counter("mxgate_pregreet_failed_total", "Peers that talked before the greeting."),
    counter("mxgate_dnsbl_blocked_total", "Peers refused by the DNS blocklists' score."),
    counter("mxgate_dns_timeouts_total", "Blocklist lookups unanswered within screen.dns_timeout."),
    counter("mxgate_dns_failures_total", "Blocklist lookups answered with an error, or not asked."),
    counter("mxgate_shadow_would_deny_total", "Allowed peers access.shadow_list would have denied."),
    counter("mxgate_shadow_would_ban_total", "Bans abuse.shadow withheld."),
    metric("mxgate_connections_open", Kind::Gauge, "Connections open now."),
    metric("mxgate_bans_in_force", Kind::Gauge, "Bans in force now."),
    counter("mxgate_failure_keys_evicted_total", "Failing addresses forgotten to make room in abuse.counter_memory."),
    counter("mxgate_reloads_total", "Reloads that made a new configuration current."),
    fleet("mxgate_cluster_connected", Kind::Gauge, "1 while both connections to Redis are up."),
    fleet("mxgate_cluster_bans_sent_total", Kind::Counter, "Bans handed to the fleet."),
    fleet("mxgate_cluster_unbans_sent_total", Kind::Counter, "Lifted bans handed to the fleet."),
    fleet("mxgate_cluster_bans_received_total", Kind::Counter, "Other nodes' bans taken in."),
    fleet("mxgate_cluster_unbans_received_total", Kind::Counter, "Other nodes' lifted bans taken in."),
    fleet("mxgate_cluster_fleet_bans_total", Kind::Counter, "Bans this node made on the fleet's counts."),
    fleet("mxgate_cluster_events_dropped_total", Kind::Counter, "Bans, lifts or failures not handed to the fleet."),
    fleet("mxgate_cluster_ignored_total", Kind::Counter, "Fleet bans not taken in (whitelisted here, unreadable)."),
    fleet("mxgate_cluster_failures_sent_total", Kind::Counter, "Failures handed to the fleet's counts."),
    fleet("mxgate_cluster_commands_total", Kind::Counter, "Redis commands sent."),
    fleet("mxgate_cluster_commands_refused_total", Kind::Counter, "Pipelines holding a command Redis refused."),
    kernel("mxgate_kernel_active", Kind::Gauge, "1 while mxgate's nftables table is up (0: refused, see the log)."),
    kernel(
        "mxgate_kernel_set_elements",
        Kind::Gauge,
        "Elements in the kernel's sets (those whose bans ended leave within 10 s).",
    ),
    kernel("mxgate_kernel_elements_added_total", Kind::Counter, "Elements added to the kernel's sets."),
    kernel(
        "mxgate_kernel_elements_removed_total",
        Kind::Counter,
        "Elements removed from the kernel's sets (lifts, new ends).",
    ),
    kernel("mxgate_kernel_errors_total", Kind::Counter, "Changes the kernel refused (each loads the sets afresh)."),
    kernel(
        "mxgate_kernel_events_dropped_total",
        Kind::Counter,
        "Refusals or bans not handed to the keeper: its queue was full.",
    ),
    per_hop("mxgate_next_hop_up", Kind::Gauge, "1 while the next hop is up, 0 while down for a backoff."),
    per_hop("mxgate_next_hop_failures_total", Kind::Counter, "Connections to the next hop that failed or timed out."),
    per_hop("mxgate_next_hop_replies_total", Kind::Counter, "The next hop's replies to transactions' commands."),
    per_hop("mxgate_next_hop_reply_seconds_total", Kind::Counter, "Seconds waited for those replies."),
    Metric {
        name: "mxgate_dnsbl_blocked_by_zone_total",
        kind: Kind::Counter,
        labels: "zone",
        help: "Peers blocked, by the zone of their heaviest listing.",
        when: "once a zone blocked a peer",
    },
    Metric {
        name: "mxgate_tls_certificate_expiry_seconds",
        kind: Kind::Gauge,
        labels: "name",
        help: "When each STARTTLS certificate ends, in seconds since the epoch (name: default or the SNI name).",
        when: "with [tls]",
    },
    Metric {
        name: "mxgate_build_info",
        kind: Kind::Gauge,
        labels: "version",
        help: "1, labelled with the version running.",
        when: "",
    },
    counter("process_cpu_seconds_total", "User and system CPU seconds the process used."),
    metric("process_resident_memory_bytes", Kind::Gauge, "Resident memory of the process."),
    metric("process_open_fds", Kind::Gauge, "File descriptors open."),
    metric("process_max_fds", Kind::Gauge, "Most file descriptors the process may open."),
    metric("process_start_time_seconds", Kind::Gauge, "When the process started, in seconds since the epoch."),
];

/// Every metric mxgate exports, histograms included.
pub fn reference() -> Vec<Metric> {
    let hists = crate::histogram::Hist::ALL.map(|h| Metric {
        name: h.metric_name(),
        kind: Kind::Histogram,
        labels: "",
        help: h.help(),
        when: "",
    });
    METRICS.iter().copied().chain(hists).collect()
}

/// `# HELP` and `# TYPE` of `name` (one of `METRICS`).
fn header(out: &mut String, name: &str) {
    let (kind, help) = METRICS.iter().find(|m| m.name == name).map_or(("untyped", ""), |m| (m.kind.name(), m.help));
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition text.
fn text(shared: &Shared) -> String {
    let mut out = String::new();
    for (name, value, gauge) in shared.stats() {
        let name = if gauge { format!("mxgate_{name}") } else { format!("mxgate_{name}_total") };
        header(&mut out, &name);
        let _ = writeln!(out, "{name} {value}");
    }
    // each next hop of the snapshot in force (its counts start again at a reload)
    let snapshot = shared.snapshot();
    let settings = &snapshot.smtp;
    let hops: Vec<_> = settings.relay.next_hops.iter().zip(settings.hop_book.report()).collect();
    if !hops.is_empty() {
        type Value = fn(&crate::smtp::HopReport) -> String;
        let per_hop: [(&str, Value); 4] = [
            ("mxgate_next_hop_up", |h| u8::from(h.up).to_string()),
            ("mxgate_next_hop_failures_total", |h| h.failures.to_string()),
            ("mxgate_next_hop_replies_total", |h| h.replies.to_string()),
            ("mxgate_next_hop_reply_seconds_total", |h| format!("{:.6}", h.reply_seconds)),
        ];
        for (name, value) in per_hop {
            header(&mut out, name);
            for (addr, hop) in &hops {
                let _ = writeln!(out, "{name}{{next_hop=\"{addr}\"}} {}", value(hop));
            }
        }
    }
    shared.histograms(&mut out);
    let zones = shared.blocked_by_zone();
    if !zones.is_empty() {
        header(&mut out, "mxgate_dnsbl_blocked_by_zone_total");
        for (zone, n) in zones {
            let _ = writeln!(out, "mxgate_dnsbl_blocked_by_zone_total{{zone=\"{zone}\"}} {n}");
        }
    }
    if let Some(tls) = &snapshot.tls {
        header(&mut out, "mxgate_tls_certificate_expiry_seconds");
        for (name, end) in &tls.expiry {
            let _ = writeln!(out, "mxgate_tls_certificate_expiry_seconds{{name=\"{name}\"}} {end}");
        }
    }
    header(&mut out, "mxgate_build_info");
    let _ = writeln!(out, "mxgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    process(&mut out, shared.started_unix());
    out
}

/// The process's own metrics, as Prometheus's client libraries name them: from /proc
/// (CPU, resident memory, open descriptors) and the descriptor limit; a value that
/// cannot be read is left out.
fn process(out: &mut String, started_unix: u64) {
    // SAFETY: sysconf reads configuration values and has no other effect
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // after the command name's closing parenthesis: field 3 on; utime and stime are 14, 15
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let cpu = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    if let (Some(user), Some(system), true) = (cpu(11), cpu(12), ticks > 0) {
        header(out, "process_cpu_seconds_total");
        let _ = writeln!(out, "process_cpu_seconds_total {}", (user + system) as f64 / ticks as f64);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    if let (Some(pages), true) = (statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()), page > 0) {
        header(out, "process_resident_memory_bytes");
        let _ = writeln!(out, "process_resident_memory_bytes {}", pages * page as u64);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        header(out, "process_open_fds");
        let _ = writeln!(out, "process_open_fds {}", dir.count());
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limit into the struct it is given
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        header(out, "process_max_fds");
        let _ = writeln!(out, "process_max_fds {}", limit.rlim_cur);
    }
    header(out, "process_start_time_seconds");
    let _ = writeln!(out, "process_start_time_seconds {started_unix}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::snapshot::Snapshot;

    /// docs/metrics.md's table, as `reference` makes it.
    fn table() -> String {
        let mut out = String::from("| metric | type | labels | exported | meaning |\n|---|---|---|---|---|\n");
        for m in reference() {
            let labels = if m.labels.is_empty() { "-" } else { m.labels };
            let when = if m.when.is_empty() { "always" } else { m.when };
            let _ = writeln!(out, "| `{}` | {} | {labels} | {when} | {} |", m.name, m.kind.name(), m.help);
        }
        out
    }

    #[test]
    fn the_metrics_reference_is_the_code_s() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
        let table = table();
        assert!(doc.contains(&table), "docs/metrics.md must hold this table:\n{table}");
    }

    #[test]
    fn every_metric_exported_has_its_help_and_is_in_the_reference() {
        let shared = Shared::new(Snapshot::without_lists(Config::embedded())).unwrap();
        let text = text(&shared);
        let reference = reference();
        let typed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        for name in &typed {
            let m =
                reference.iter().find(|m| m.name == *name).unwrap_or_else(|| panic!("{name} is not in the reference"));
            assert!(text.contains(&format!("# HELP {name} {}\n# TYPE {name} {}\n", m.help, m.kind.name())), "{name}");
        }
        for m in reference.iter().filter(|m| m.when.is_empty()) {
            assert!(typed.contains(&m.name), "{} is exported always\n{text}", m.name);
        }
        assert!(text.contains(&format!("mxgate_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
        let rss = text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).unwrap();
        assert!(rss.parse::<u64>().unwrap() > 1 << 20, "a process this size holds over 1 MiB");
    }
}
