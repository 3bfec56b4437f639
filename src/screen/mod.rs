//! Screening before the banner (`[screen]`), and who passed it: a peer that passed is
//! remembered for `pass_ttl` and skips the tests on later connections. The tests
//! themselves are sans-IO: the DNS blocklists (asking, the answers a connection awaits,
//! scoring) are [`dnsbl`], the pregreet test is [`pregreet`]; a connection runs them
//! (`conn/stage.rs`) and its host asks the resolver.
//!
//! [`Passed`] is that memory: fixed, shared by the workers, lock-free. Each address has
//! two candidate slots (two keyed hashes); a slot holds a tag of the address (32 bits of a
//! randomly keyed hash) and the minute its pass ends. A new pass takes the slot already
//! holding the address, else an ended or empty one, else the one ending sooner: under a
//! flood of new addresses older passes are forgotten (those peers are screened again),
//! never mistaken for others but by a 32-bit tag collision.
//!
//! With `[screen] cache_file`, passes outlive a restart: each one also goes (over a
//! bounded channel, never blocking a worker) to a writer thread that keeps the passes in
//! force (at most `SLOTS`) and rewrites the file atomically, as the ban file is, at most
//! every `FLUSH_EVERY`; at start the file's passes still in force are loaded.

pub mod dnsbl;
pub mod pregreet;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::datetime::UnixTime;

/// Slots in the table: 8 bytes each, 1 MiB in all.
pub const SLOTS: usize = 1 << 17;

/// How often the cache file is written, when passes came.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Passed {
    slots: Box<[AtomicU64]>,
    hashers: [ahash::RandomState; 2],
    /// To the cache file's writer: the address and when its pass ends.
    file: Option<std::sync::mpsc::SyncSender<(IpAddr, i64)>>,
}

impl Default for Passed {
    fn default() -> Self {
        Passed {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hashers: [ahash::RandomState::new(), ahash::RandomState::new()],
            file: None,
        }
    }
}

/// A slot's value: the tag above, the minute the pass ends below.
fn pack(tag: u32, until_minute: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(until_minute)
}

fn minute(t: UnixTime) -> u32 {
    t.0.div_euclid(60).clamp(0, i64::from(u32::MAX)) as u32
}

impl Passed {
    /// The address's two slots, and its tag (never 0, which marks an empty slot).
    fn place(&self, ip: IpAddr) -> ([usize; 2], u32) {
        let [a, b] = &self.hashers;
        let (ha, hb) = (a.hash_one(ip), b.hash_one(ip));
        let tag = ((ha >> 32) as u32).max(1);
        ([ha as usize % SLOTS, hb as usize % SLOTS], tag)
    }

    /// `ip` passed, and its pass has not ended at `now`.
    pub fn holds(&self, ip: IpAddr, now: UnixTime) -> bool {
        self.until(ip, now).is_some()
    }

    /// When the pass of `ip` ends, if it holds at `now`.
    pub fn until(&self, ip: IpAddr, now: UnixTime) -> Option<UnixTime> {
        let (slots, tag) = self.place(ip);
        slots
            .iter()
            .map(|&i| self.slots[i].load(Ordering::Relaxed))
            .filter(|v| (v >> 32) as u32 == tag && (*v as u32) > minute(now))
            .map(|v| UnixTime(i64::from(v as u32) * 60))
            .max()
    }

    /// `ip` passed at `now`: it skips screening until `now + ttl` (to the minute); a zero
    /// `ttl` remembers nothing (every connection is screened).
    pub fn remember(&self, ip: IpAddr, now: UnixTime, ttl: std::time::Duration) {
        if ttl.is_zero() {
            return;
        }
        let (slots, tag) = self.place(ip);
        let until = minute(UnixTime(now.0.saturating_add(ttl.as_secs() as i64))).max(minute(now) + 1);
        let current = minute(now);
        let values = slots.map(|i| self.slots[i].load(Ordering::Relaxed));
        let ended = |v: u64| v == 0 || (v as u32) <= current;
        let pick = if (values[0] >> 32) as u32 == tag {
            0
        } else if (values[1] >> 32) as u32 == tag || ended(values[1]) && !ended(values[0]) {
            1
        } else if ended(values[0]) {
            0
        } else if (values[1] as u32) < (values[0] as u32) {
            1
        } else {
            0
        };
        // a race with another worker costs at most one of the two passes: screened again
        self.slots[slots[pick]].store(pack(tag, until), Ordering::Relaxed);
        if let Some(file) = &self.file {
            // full: this pass is not kept across a restart
            let _ = file.try_send((ip, i64::from(until) * 60));
        }
    }

    /// The table, with the passes of `path` still in force at `now`, and a writer
    /// thread keeping the file. A missing file is an empty one; a line that cannot be read
    /// is skipped with a warning.
    pub fn with_file(path: &Path, now: UnixTime) -> std::io::Result<Self> {
        let mut table = Passed::default();
        let mut kept: HashMap<IpAddr, i64> = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let mut words = line.split_whitespace();
                    let parsed = (words.next().map(str::parse::<IpAddr>), words.next().map(str::parse::<i64>));
                    match parsed {
                        (Some(Ok(ip)), Some(Ok(until))) if until > now.0 => {
                            table.remember_until(ip, until);
                            kept.insert(ip, until);
                        }
                        (Some(Ok(_)), Some(Ok(_))) => {} // ended
                        _ => tracing::warn!("{}:{}: not `<address> <unix time>`: skipped", path.display(), i + 1),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(4096);
        let path = path.to_owned();
        std::thread::Builder::new().name("mxgate-passes".into()).spawn(move || write_passes(&path, kept, &rx))?;
        table.file = Some(tx);
        Ok(table)
    }

    /// A pass read from the file (not sent back to it).
    fn remember_until(&self, ip: IpAddr, until: i64) {
        let (slots, tag) = self.place(ip);
        let pick = usize::from(self.slots[slots[0]].load(Ordering::Relaxed) != 0);
        self.slots[slots[pick]].store(pack(tag, minute(UnixTime(until))), Ordering::Relaxed);
    }

    /// Bytes the table holds (fixed, whatever the number of peers).
    pub fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<AtomicU64>()
    }
}

/// The cache file's writer: the passes in force, rewritten whole when some came, at most
/// every `FLUSH_EVERY`; it ends when the table is dropped (the channel closes).
fn write_passes(path: &Path, mut kept: HashMap<IpAddr, i64>, rx: &std::sync::mpsc::Receiver<(IpAddr, i64)>) {
    use std::fmt::Write as _;
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    let keep = |kept: &mut HashMap<IpAddr, i64>, (ip, until): (IpAddr, i64)| {
        if kept.len() < SLOTS || kept.contains_key(&ip) {
            kept.insert(ip, until);
        }
    };
    let mut dirty = false;
    let mut failing = crate::statefile::Failing::default();
    // the first pass is written at once; later ones at most every FLUSH_EVERY
    let mut written = Instant::now().checked_sub(FLUSH_EVERY).unwrap_or_else(Instant::now);
    loop {
        let wait = if dirty { FLUSH_EVERY.saturating_sub(written.elapsed()) } else { Duration::from_secs(3600) };
        let closed = match rx.recv_timeout(wait) {
            Ok(pass) => {
                keep(&mut kept, pass);
                while let Ok(pass) = rx.try_recv() {
                    keep(&mut kept, pass);
                }
                dirty = true;
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if dirty && (closed || written.elapsed() >= FLUSH_EVERY) {
            let now = UnixTime::now().0;
            kept.retain(|_, until| *until > now);
            let mut text = String::with_capacity(kept.len() * 32);
            for (ip, until) in &kept {
                let _ = writeln!(text, "{ip} {until}");
            }
            let outcome = crate::statefile::write(path, text.as_bytes());
            dirty = failing.report("the screening cache", path, outcome, "passes stay remembered in memory");
            written = Instant::now();
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from((0x0a00_0000 + i).to_be_bytes())
    }

    #[test]
    fn a_pass_holds_until_its_ttl() {
        let t = Passed::default();
        let now = UnixTime(1_800_000_000);
        assert!(!t.holds(ip(1), now));
        t.remember(ip(1), now, Duration::from_secs(3600));
        assert!(t.holds(ip(1), now) && t.holds(ip(1), UnixTime(now.0 + 3500)));
        assert!(!t.holds(ip(1), UnixTime(now.0 + 3600)), "ended");
        assert!(!t.holds(ip(2), now), "another address");
        assert_eq!(t.until(ip(1), now).map(|u| u.0 / 60), Some((now.0 + 3600) / 60));
    }

    #[test]
    fn fixed_memory_whatever_the_peers_and_recent_passes_kept() {
        let t = Passed::default();
        let now = UnixTime(1_800_000_000);
        let bytes = t.heap_bytes();
        for i in 0..1_000_000 {
            t.remember(ip(i), now, Duration::from_secs(86_400));
        }
        assert_eq!(t.heap_bytes(), bytes, "fixed");
        // the most recent passes are all held; older ones may have been pushed out
        let recent = (990_000..1_000_000).filter(|&i| t.holds(ip(i), now)).count();
        assert!(recent > 9_000, "{recent} of the last 10,000");
        let never = (2_000_000..2_100_000).filter(|&i| t.holds(ip(i), now)).count();
        assert!(never < 5, "{never} addresses never seen held (tag collisions only)");
    }
}
