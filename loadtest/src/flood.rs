//! `banned-flood`'s clients: connection attempts from banned addresses at a fixed rate,
//! each refused one of three ways, all counted as refusals: the deny line read then the
//! close (user space), a reset (the kernel's `reset`), or no answer to the SYN within the
//! patience (the kernel's `drop`; the attempt is then abandoned, as a flooder's is).
//!
//! Each thread keeps its attempts in flight on an epoll of its own (nonblocking sockets,
//! the source bound with IP_BIND_ADDRESS_NO_PORT so 4-tuples, not ports, are the limit),
//! starting them on schedule whatever the answers' speed: the offered rate is the same
//! whichever way the server refuses, so the CPU per attempt compares.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// Attempts in flight at most, all threads together (past it an attempt due is counted
/// late and not made): the descriptors the process may open, raised to the hard limit
/// first, less a margin.
fn max_in_flight() -> usize {
    // SAFETY: valid pointers to an rlimit
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max
            && libc::setrlimit(libc::RLIMIT_NOFILE, &libc::rlimit { rlim_cur: lim.rlim_max, ..lim }) == 0
        {
            lim.rlim_cur = lim.rlim_max;
        }
        lim.rlim_cur as usize
    };
    limit.saturating_sub(256).max(64)
}

/// How each attempt ended.
#[derive(Debug)]
pub struct Outcomes {
    /// The deny line, then the close: refused in user space.
    pub user_space: u64,
    /// Reset at connect: the kernel's `reset`.
    pub reset: u64,
    /// The SYN unanswered within the patience: the kernel's `drop`.
    pub dropped: u64,
    /// Anything else (a banner, an error), by kind.
    pub errors: BTreeMap<String, u64>,
    /// Attempts the schedule could not start on time (the client fell behind).
    pub late: u64,
    /// Connect to the line's close (user space) or to the reset, microseconds.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

impl Outcomes {
    fn new() -> Self {
        Outcomes {
            user_space: 0,
            reset: 0,
            dropped: 0,
            errors: BTreeMap::new(),
            late: 0,
            latency: crate::engine::new_histogram(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn refused(&self) -> u64 {
        self.user_space + self.reset + self.dropped
    }

    fn add(&mut self, other: Outcomes) {
        self.user_space += other.user_space;
        self.reset += other.reset;
        self.dropped += other.dropped;
        self.late += other.late;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        let _ = self.latency.add(&other.latency);
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }
}

/// Floods `target` from `sources` (in turn) at `rate` attempts a second for `duration`,
/// on `threads` threads; an attempt unanswered after `patience` counts as dropped.
pub fn run(
    target: SocketAddr,
    sources: &[IpAddr],
    rate: u64,
    duration: Duration,
    threads: usize,
    patience: Duration,
    expect: &str,
) -> Outcomes {
    let threads = threads.max(1);
    let per_thread = (rate / threads as u64).max(1);
    let in_flight = max_in_flight() / threads;
    let mut all = Outcomes::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<IpAddr> = sources.iter().skip(t).step_by(threads).copied().collect();
                scope.spawn(move || one_thread(target, &mine, (per_thread, in_flight), duration, patience, expect))
            })
            .collect();
        for h in handles {
            if let Ok(o) = h.join() {
                all.add(o);
            }
        }
    });
    all
}

enum Stage {
    Connecting,
    Reading(Vec<u8>),
}

struct Attempt {
    socket: socket2::Socket,
    started: Instant,
    stage: Stage,
}

fn one_thread(
    target: SocketAddr,
    sources: &[IpAddr],
    (rate, max_in_flight): (u64, usize),
    duration: Duration,
    patience: Duration,
    expect: &str,
) -> Outcomes {
    let mut out = Outcomes::new();
    let Ok(mut poll) = Poll::new() else {
        out.error("epoll");
        return out;
    };
    let mut events = Events::with_capacity(1024);
    let mut attempts: Slab<Attempt> = Slab::new();
    let mut deadlines: VecDeque<(Instant, usize, Instant)> = VecDeque::new();
    let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let started = Instant::now();
    let end = started + duration;
    let mut next = started;
    let mut source = 0usize;
    loop {
        let now = Instant::now();
        // start what the schedule says is due
        while next <= now && next < end {
            if attempts.len() >= max_in_flight {
                out.late += 1;
            } else if let Some(ip) = sources.get(source % sources.len().max(1)) {
                source = source.wrapping_add(1);
                match start(&poll, &mut attempts, *ip, target) {
                    Ok(Some(key)) => deadlines.push_back((now + patience, key, attempts[key].started)),
                    Ok(None) => out.reset += 1, // refused at once
                    Err(e) => out.error(&format!("connect: {e}")),
                }
            }
            next += every;
        }
        // abandon what waited its patience out
        while let Some(&(at, key, began)) = deadlines.front() {
            if at > now {
                break;
            }
            deadlines.pop_front();
            if attempts.get(key).is_some_and(|a| a.started == began) {
                let a = attempts.remove(key);
                let _ = poll.registry().deregister(&mut SourceFd(&a.socket.as_raw_fd()));
                match a.stage {
                    // nothing came: the SYN, or (as the kernel took the key) the
                    // handshake's end, went unanswered
                    Stage::Connecting => out.dropped += 1,
                    Stage::Reading(got) if got.is_empty() => out.dropped += 1,
                    // the line came; its close is late under load
                    Stage::Reading(got) if got.starts_with(expect.as_bytes()) && got.ends_with(b"\r\n") => {
                        out.user_space += 1
                    }
                    Stage::Reading(_) => out.error("a partial line, then nothing"),
                }
            }
        }
        if now >= end && attempts.is_empty() {
            break;
        }
        let wait = if now < end { next.saturating_duration_since(now) } else { Duration::from_millis(5) };
        if poll.poll(&mut events, Some(wait.min(Duration::from_millis(5)))).is_err() {
            continue;
        }
        for event in &events {
            let key = event.token().0;
            let Some(a) = attempts.get_mut(key) else { continue };
            let done = progress(a, expect, &mut out);
            if done {
                let a = attempts.remove(key);
                let _ = poll.registry().deregister(&mut SourceFd(&a.socket.as_raw_fd()));
            }
        }
    }
    out.elapsed = started.elapsed();
    out
}

/// Starts one attempt: its key, or `None` when refused at once.
fn start(poll: &Poll, attempts: &mut Slab<Attempt>, ip: IpAddr, target: SocketAddr) -> std::io::Result<Option<usize>> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on our descriptor with a live int of its size
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e),
    }
    let entry = attempts.vacant_entry();
    let key = entry.key();
    poll.registry().register(
        &mut SourceFd(&socket.as_raw_fd()),
        Token(key),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    entry.insert(Attempt { socket, started: Instant::now(), stage: Stage::Connecting });
    Ok(Some(key))
}

/// Moves an attempt on; whether it ended.
fn progress(a: &mut Attempt, expect: &str, out: &mut Outcomes) -> bool {
    if let Stage::Connecting = a.stage {
        match a.socket.take_error() {
            // refused, or reset as the handshake ended (the kernel took the key meanwhile)
            Ok(Some(e))
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ) =>
            {
                out.reset += 1;
                let _ = out.latency.record(a.started.elapsed().as_micros() as u64);
                return true;
            }
            Ok(Some(e)) => {
                out.error(&format!("connect: {}", e.kind()));
                return true;
            }
            Ok(None) => a.stage = Stage::Reading(Vec::new()),
            Err(e) => {
                out.error(&format!("connect: {}", e.kind()));
                return true;
            }
        }
    }
    let Stage::Reading(got) = &mut a.stage else { return false };
    let mut buf = [0u8; 512];
    loop {
        match (&a.socket).read(&mut buf) {
            Ok(0) => {
                if got.starts_with(expect.as_bytes()) && got.ends_with(b"\r\n") {
                    out.user_space += 1;
                    let _ = out.latency.record(a.started.elapsed().as_micros() as u64);
                } else {
                    out.error("not the deny line");
                }
                return true;
            }
            Ok(n) if got.len() < 4096 => got.extend_from_slice(&buf[..n]),
            Ok(_) => {
                out.error("too long an answer");
                return true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && got.starts_with(expect.as_bytes()) => {
                out.user_space += 1;
                return true;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset && got.is_empty() => {
                out.reset += 1; // the kernel took the key as the handshake ended
                return true;
            }
            Err(e) => {
                out.error(&format!("read: {}", e.kind()));
                return true;
            }
        }
    }
}

/// The machine's busy CPU time so far (every core: user, nice, system, irq, softirq,
/// steal), in clock ticks.
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| fields.get(i)).sum())
}

/// The p99 of a Prometheus histogram in `metrics` (the exposition's text): the bound of
/// the first bucket holding 99 % of the observations, and their count.
pub fn p99_bound(metrics: &str, name: &str) -> Option<(f64, u64)> {
    let mut buckets = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else { continue };
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        buckets.push((le, count.trim().parse::<u64>().ok()?));
    }
    let total = buckets.last()?.1;
    let want = (total * 99).div_ceil(100);
    buckets.iter().find(|(_, c)| *c >= want).map(|(le, _)| (*le, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_is_the_bound_of_the_bucket_reaching_99_percent() {
        let text = "x_bucket{le=\"0.001\"} 90\nx_bucket{le=\"0.005\"} 99\nx_bucket{le=\"0.05\"} 100\n\
                    x_bucket{le=\"+Inf\"} 100\nx_sum 1\nx_count 100\n";
        assert_eq!(p99_bound(text, "x"), Some((0.005, 100)));
        assert_eq!(p99_bound("", "x"), None);
    }
}
