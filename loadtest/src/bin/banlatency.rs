//! `banlatency PORT SOURCES [FIRST]`: time from a promoting failure to the first refused
//! connection. For each of SOURCES fresh addresses in 127.99.0.0/16 (from the FIRST-th),
//! against an mxgate on
//! 127.0.0.1:PORT that bans on the first failure: connect, send one unknown command, and
//! from the moment its 500 reply arrives, reconnect until the connection is refused
//! (`530`). Prints the latencies (µs): p50, p99, max, and the most connections one
//! address needed after its failure (1: the first one after the failure was refused).
//!
//! `banlatency PORT SOURCES FIRST OBSERVE_PORT`: the refusals are awaited on another
//! node of a fleet (`[cluster]`) listening on 127.0.0.1:OBSERVE_PORT: the time a ban
//! takes to cross the fleet.

use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use loadtest::probe::{connect, line};

fn probe(source: Ipv4Addr, port: u16, observe: u16) -> std::io::Result<(Duration, u32)> {
    let mut r = connect(source, port)?;
    if !line(&mut r)?.starts_with("220") {
        return Err(std::io::Error::other(format!("{source}: no banner (banned before it failed?)")));
    }
    r.get_mut().write_all(b"BOGUS\r\n")?;
    let reply = line(&mut r)?;
    let failed = Instant::now();
    if !reply.starts_with('5') {
        return Err(std::io::Error::other(format!("{source}: `{}` to an unknown command", reply.trim())));
    }
    drop(r);
    let deadline = failed + Duration::from_secs(5);
    let mut attempts = 0;
    while Instant::now() < deadline {
        attempts += 1;
        let mut r = connect(source, observe)?;
        if line(&mut r)?.starts_with("530") {
            return Ok((failed.elapsed(), attempts));
        }
    }
    Err(std::io::Error::other(format!("{source}: not refused within 5 s")))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(n)) =
        (args.next().and_then(|a| a.parse::<u16>().ok()), args.next().and_then(|a| a.parse::<u32>().ok()))
    else {
        eprintln!("usage: banlatency PORT SOURCES [FIRST [OBSERVE_PORT]]");
        std::process::exit(2);
    };
    let first = args.next().and_then(|a| a.parse::<u32>().ok()).unwrap_or(0);
    let observe = args.next().and_then(|a| a.parse::<u16>().ok()).unwrap_or(port);
    let mut micros = Vec::new();
    let mut most_attempts = 0;
    for i in first..first + n.min(65_000) {
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 99, 0, 1)) + i);
        match probe(source, port, observe) {
            Ok((d, attempts)) => {
                micros.push(d.as_micros());
                most_attempts = most_attempts.max(attempts);
            }
            Err(e) => {
                eprintln!("banlatency: {e}");
                std::process::exit(1);
            }
        }
    }
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    println!("ban_latency_us n={} p50={p50} p99={p99} max={max} most_connections={most_attempts}", micros.len());
}
