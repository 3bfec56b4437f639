//! `fleetattack PORTS ADDRESSES FAILURES [THREADS]`: a dictionary attack spread over a
//! fleet. PORTS: the nodes, comma-separated, each an mxgate on 127.0.0.1 with `[cluster]`
//! whose `failure_threshold` is FAILURES × the number of nodes (so no node reaches it
//! alone). Each of ADDRESSES fresh addresses in 127.77.0.0/16 holds one conversation
//! with every node, failing FAILURES times in each; from its last failing reply, every
//! node is asked again (a connection every 2 ms) until all refuse it (`530`).
//!
//! Prints the time until each address was refused by the whole fleet (ms: p50, p99,
//! max), how many failures were made, and the attack's wall time.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loadtest::spread::{Met, fail_at, refused};

/// One conversation failing `failures` times; when its last failing reply came.
fn fail(source: Ipv4Addr, port: u16, failures: usize) -> std::io::Result<Instant> {
    match fail_at(source, port, failures)? {
        (Met::Failed, at) => Ok(at),
        (Met::Banned, _) => Err(std::io::Error::other(format!("{source} on {port}: banned before it failed"))),
    }
}

/// The whole fleet's attack on one address: the time from its last failure until every
/// node refused it.
fn attack(source: Ipv4Addr, ports: &[u16], failures: usize) -> std::io::Result<Duration> {
    let mut last = Instant::now();
    for &port in ports {
        last = fail(source, port, failures)?;
    }
    let deadline = last + Duration::from_secs(10);
    for &port in ports {
        while !refused(source, port)? {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("{source}: not refused on {port} within 10 s")));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(last.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ports: Vec<u16> =
        args.first().map(|p| p.split(',').filter_map(|p| p.parse().ok()).collect()).unwrap_or_default();
    let (Some(addresses), Some(failures)) =
        (args.get(1).and_then(|a| a.parse::<u32>().ok()), args.get(2).and_then(|a| a.parse::<usize>().ok()))
    else {
        eprintln!("usage: fleetattack PORTS ADDRESSES FAILURES [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|a| a.parse::<u32>().ok()).unwrap_or(16);
    if ports.is_empty() {
        eprintln!("fleetattack: no ports");
        std::process::exit(2);
    }
    let next = Arc::new(AtomicU32::new(0));
    let times = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (next, times, ports) = (Arc::clone(&next), Arc::clone(&times), ports.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= addresses.min(65_000) {
                        return;
                    }
                    let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 77, 0, 1)) + i);
                    match attack(source, &ports, failures) {
                        Ok(d) => times.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(d),
                        Err(e) => {
                            eprintln!("fleetattack: {e}");
                            std::process::exit(1);
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = started.elapsed();
    let mut ms: Vec<f64> = times
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "fleet_ban_ms n={} p50={:.1} p99={:.1} max={:.1} failures={} wall_s={:.2}",
        ms.len(),
        at(0.5),
        at(0.99),
        at(1.0),
        ms.len() * ports.len() * failures,
        wall.as_secs_f64()
    );
}
