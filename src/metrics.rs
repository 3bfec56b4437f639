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

/// The exposition text.
fn text(shared: &Shared) -> String {
    let mut out = String::new();
    for (name, value, gauge) in shared.stats() {
        let (name, kind) =
            if gauge { (format!("mxgate_{name}"), "gauge") } else { (format!("mxgate_{name}_total"), "counter") };
        out.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
    }
    // each next hop of the snapshot in force (its counts start again at a reload)
    let snapshot = shared.snapshot();
    let settings = &snapshot.smtp;
    let hops: Vec<_> = settings.relay.next_hops.iter().zip(settings.hop_book.report()).collect();
    if !hops.is_empty() {
        out.push_str("# TYPE mxgate_next_hop_up gauge\n");
        for (addr, hop) in &hops {
            out.push_str(&format!("mxgate_next_hop_up{{next_hop=\"{addr}\"}} {}\n", u8::from(hop.up)));
        }
        out.push_str("# TYPE mxgate_next_hop_failures_total counter\n");
        for (addr, hop) in &hops {
            out.push_str(&format!("mxgate_next_hop_failures_total{{next_hop=\"{addr}\"}} {}\n", hop.failures));
        }
        out.push_str("# TYPE mxgate_next_hop_replies_total counter\n");
        for (addr, hop) in &hops {
            out.push_str(&format!("mxgate_next_hop_replies_total{{next_hop=\"{addr}\"}} {}\n", hop.replies));
        }
        out.push_str("# TYPE mxgate_next_hop_reply_seconds_total counter\n");
        for (addr, hop) in &hops {
            out.push_str(&format!(
                "mxgate_next_hop_reply_seconds_total{{next_hop=\"{addr}\"}} {:.6}\n",
                hop.reply_seconds
            ));
        }
    }
    shared.histograms(&mut out);
    let zones = shared.blocked_by_zone();
    if !zones.is_empty() {
        out.push_str("# TYPE mxgate_dnsbl_blocked_by_zone_total counter\n");
        for (zone, n) in zones {
            out.push_str(&format!("mxgate_dnsbl_blocked_by_zone_total{{zone=\"{zone}\"}} {n}\n"));
        }
    }
    out
}
