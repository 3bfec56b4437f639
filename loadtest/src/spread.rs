//! A failure-counting attack spread over many addresses, each failing fewer times than
//! the threshold (`falsebans` and the abuse tests): blocking conversations from chosen
//! loopback sources, many threads at once.
//!
//! ```text
//!  per address: connect from it ─► 220 ─► BOGUS × n (pipelined) ─► n × 5xx ─► QUIT
//!               or, banned: the first line is the ban line (530) ─► Banned
//! ```

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::probe::{connect, line};

/// What one address's conversation met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Met {
    /// Served, and its `n` failures answered with 5xx.
    Failed,
    /// Refused before the banner with `530`.
    Banned,
}

/// One conversation from `source` to 127.0.0.1:`port` with `failures` unknown commands.
pub fn fail(source: Ipv4Addr, port: u16, failures: usize) -> std::io::Result<Met> {
    fail_at(source, port, failures).map(|(met, _)| met)
}

/// The same, with when its last failing reply came.
pub fn fail_at(source: Ipv4Addr, port: u16, failures: usize) -> std::io::Result<(Met, Instant)> {
    let mut r = connect(source, port)?;
    let first = line(&mut r)?;
    if first.starts_with("530") {
        return Ok((Met::Banned, Instant::now()));
    }
    if !first.starts_with("220") {
        return Err(std::io::Error::other(format!("{source}: `{}` as the first line", first.trim())));
    }
    r.get_mut().write_all(&b"BOGUS\r\n".repeat(failures))?;
    for _ in 0..failures {
        let reply = line(&mut r)?;
        if !reply.starts_with('5') {
            return Err(std::io::Error::other(format!("{source}: `{}` to an unknown command", reply.trim())));
        }
    }
    let failed = Instant::now();
    r.get_mut().write_all(b"QUIT\r\n")?;
    line(&mut r)?;
    Ok((Met::Failed, failed))
}

/// Whether `source` is refused with `530`.
pub fn refused(source: Ipv4Addr, port: u16) -> std::io::Result<bool> {
    Ok(line(&mut connect(source, port)?)?.starts_with("530"))
}

/// Addresses from `first` on, `stride` apart (256: each in a /24 of its own, so that
/// their bans do not escalate to the prefix).
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub first: Ipv4Addr,
    pub stride: u32,
    pub count: u32,
}

impl Range {
    /// The `i`-th address.
    pub fn nth(self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first).wrapping_add(i.wrapping_mul(self.stride)))
    }
}

/// Each address of `range` holds one conversation that fails `failures` times, over
/// `threads` threads; returns how many met a ban instead.
pub fn attack(range: Range, failures: usize, port: u16, threads: u32) -> std::io::Result<u64> {
    each(range.count, threads, |i| fail(range.nth(i), port, failures).map(|met| met == Met::Banned))
}

/// How many addresses of `range` are refused with `530`.
pub fn count_refused(range: Range, port: u16, threads: u32) -> std::io::Result<u64> {
    each(range.count, threads, |i| refused(range.nth(i), port))
}

/// Runs `one` for 0..n over `threads` threads; how many returned true; the first error.
fn each(n: u32, threads: u32, one: impl Fn(u32) -> std::io::Result<bool> + Sync) -> std::io::Result<u64> {
    let next = AtomicU32::new(0);
    let yes = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        if one(i)? {
                            yes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("panicked"))))
    })?;
    Ok(yes.into_inner())
}
