//! The kernel's side of bans (`[kernel]`): a banned key that keeps connecting moves into
//! an nftables set of mxgate's own table, and the kernel drops (or resets) its
//! connection attempts before they reach user space.
//!
//! ```text
//!  worker: a banned peer refused ──try_send──┐          (a full channel: dropped, counted)
//!  abuse: a ban made, adopted, lifted ───────┤
//!                                            ▼
//!   the keeper thread ── keeper::Keeper (what the sets should hold) ── netlink batches
//!     start: the table made afresh (leftovers gone), its sets, a chain on prerouting
//!            at raw priority with a rule per set and listening port; refused: one
//!            warning naming the cause, and refusals stay in user space
//!     each wake: events taken (up to EVENTS_PER_TURN), the changes sent at once
//!     a reload: the exclusions (whitelist, balancers) worked in again
//!     a batch the kernel refuses: counted, logged, and the sets loaded afresh
//!     stop: the table removed
//! ```
//!
//! Only a direct peer's refusals count: behind a balancer (PROXY) the kernel sees the
//! balancer's address, so proxied peers are never sent. Each element's timeout is the
//! ban's time left, so expiry needs no message; a lift or a new end is sent.

pub mod keeper;
mod netlink;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

pub use keeper::{Changes, Excluded, Keeper};
pub use netlink::{
    ADDR4, Action, Batch, Elem, NET4, NET6, PER_BATCH, SETS, SetKind, Socket, acknowledgements, set_for,
};

use crate::abuse::{AbuseKey, Change};
use crate::access::Action as ListAction;
use crate::histogram::Hist;
use crate::snapshot::Snapshot;
use crate::stats::Counts;

/// The chain mxgate's rules are in.
pub const CHAIN: &str = "refuse";

/// Events waiting for the keeper; past this a refusal is dropped (and counted): it stays
/// refused in user space.
const CHANNEL: usize = 65_536;

/// Events taken in one turn before the changes are sent.
const EVENTS_PER_TURN: usize = 16_384;

/// How often the keeper forgets keys whose bans ended.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// The longest the keeper is waited for at exit.
const STOP_WAIT: Duration = Duration::from_secs(3);

enum Event {
    Refused { key: AbuseKey, until: i64, at: Instant },
    Changed(Change, Instant),
    Stop(Sender<()>),
}

/// Counts for `mxgate stats` and the metrics.
#[derive(Debug, Default)]
struct KernelStats {
    elements: AtomicU64,
    added: AtomicU64,
    removed: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// The kernel fast path: shared by the workers (refusals), abuse control (bans and lifts)
/// and the keeper thread.
pub struct Kernel {
    tx: Sender<Event>,
    rx: Mutex<Option<Receiver<Event>>>,
    /// The table is up: refusals are worth sending.
    active: AtomicBool,
    action: Action,
    table: String,
    stats: KernelStats,
}

impl Kernel {
    /// The fast path `config` asks for (none when off); started by [`Kernel::start`].
    pub fn new(config: &crate::config::Kernel) -> Option<Arc<Kernel>> {
        let action = config.mode?;
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        Some(Arc::new(Kernel {
            tx,
            rx: Mutex::new(Some(rx)),
            active: AtomicBool::new(false),
            action,
            table: config.table.clone(),
            stats: KernelStats::default(),
        }))
    }

    /// The table is up and takes banned keys.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// A direct peer under the ban on `key`, ending at `until`, was refused.
    pub fn refused(&self, key: AbuseKey, until: i64) {
        self.send(Event::Refused { key, until, at: Instant::now() });
    }

    /// A ban made (here, by the operator, adopted) or lifted.
    pub fn changed(&self, change: &Change) {
        self.send(Event::Changed(change.clone(), Instant::now()));
    }

    fn send(&self, event: Event) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the keeper thread for the listening `addrs`: it makes the table afresh and
    /// keeps it until [`Kernel::stop`]. `bans` are those in force now; `counts` records
    /// the kernel's latency.
    pub fn start(
        self: &Arc<Self>,
        addrs: &[SocketAddr],
        snapshots: Arc<ArcSwap<Snapshot>>,
        bans: Vec<(AbuseKey, i64)>,
        counts: Arc<Counts>,
    ) -> io::Result<()> {
        let Some(rx) = self.rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
            return Ok(());
        };
        let mut ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        let kernel = Arc::clone(self);
        std::thread::Builder::new().name("mxgate-kernel".into()).spawn(move || {
            let Some(mut run) = Run::start(&kernel, ports, snapshots, counts) else {
                // refusals stay in user space; events are not read
                drop(rx);
                return;
            };
            run.serve(&rx, bans);
        })?;
        Ok(())
    }

    /// Removes the table (waiting for the keeper at most [`STOP_WAIT`]).
    pub fn stop(&self) {
        self.active.store(false, Ordering::Relaxed);
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Event::Stop(done), STOP_WAIT).is_ok() {
            let _ = wait.recv_timeout(STOP_WAIT);
        }
    }

    /// `name value gauge` lines for `mxgate stats` and the metrics.
    pub fn stats(&self) -> Vec<(&'static str, u64, bool)> {
        let s = &self.stats;
        vec![
            ("kernel_active", u64::from(self.active()), true),
            ("kernel_set_elements", s.elements.load(Ordering::Relaxed), true),
            ("kernel_elements_added", s.added.load(Ordering::Relaxed), false),
            ("kernel_elements_removed", s.removed.load(Ordering::Relaxed), false),
            ("kernel_errors", s.errors.load(Ordering::Relaxed), false),
            ("kernel_events_dropped", s.dropped.load(Ordering::Relaxed), false),
        ]
    }
}

/// The addresses no element may cover: the whitelist's (every one, when it allows by
/// default) and the trusted balancers'.
pub fn excluded(snapshot: &Snapshot) -> Excluded {
    let mut nets: Vec<_> = snapshot.whitelist.rules().iter().map(|r| r.net).collect();
    nets.extend(snapshot.config.listen.proxy_protocol_from.iter().copied());
    Excluded { everything: snapshot.whitelist.default_action() == ListAction::Allow, nets }
}

/// Why the kernel refused the table, for the one warning.
fn cause(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "no CAP_NET_ADMIN (run as root or grant the capability)".into(),
        Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::ENOENT) => {
            format!("no nf_tables in this kernel ({e})")
        }
        _ => e.to_string(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The keeper thread's state.
struct Run {
    kernel: Arc<Kernel>,
    socket: Socket,
    seq: u32,
    ports: Vec<u16>,
    snapshots: Arc<ArcSwap<Snapshot>>,
    generation: u64,
    keeper: Keeper,
    counts: Arc<Counts>,
}

impl Run {
    /// Opens the socket and makes the table afresh; `None` (warned) when refused.
    fn start(
        kernel: &Arc<Kernel>,
        ports: Vec<u16>,
        snapshots: Arc<ArcSwap<Snapshot>>,
        counts: Arc<Counts>,
    ) -> Option<Run> {
        let snapshot = snapshots.load_full();
        let keeper = Keeper::new(snapshot.config.kernel.after_refusals, excluded(&snapshot));
        let opened = Socket::open().and_then(|socket| {
            let mut run = Run {
                kernel: Arc::clone(kernel),
                socket,
                seq: 0,
                ports,
                snapshots: Arc::clone(&snapshots),
                generation: snapshot.generation,
                keeper,
                counts,
            };
            run.fresh_table()?;
            Ok(run)
        });
        match opened {
            Ok(run) => {
                kernel.active.store(true, Ordering::Relaxed);
                tracing::info!(
                    table = %kernel.table,
                    mode = kernel.action.name(),
                    ports = ?run.ports,
                    "kernel fast path on: banned floods refused in nftables"
                );
                Some(run)
            }
            Err(e) => {
                tracing::warn!("kernel fast path off: {}; banned peers are refused in user space", cause(&e));
                None
            }
        }
    }

    fn batch(&mut self) -> Batch {
        self.seq = self.seq.wrapping_add(1 << 12);
        Batch::new(self.seq)
    }

    /// The table made afresh: whatever a previous run left is removed first.
    fn fresh_table(&mut self) -> io::Result<()> {
        let table = self.kernel.table.clone();
        let mut b = self.batch();
        b.new_table(&table);
        b.del_table(&table);
        self.socket.apply(b)?;
        let mut b = self.batch();
        b.new_table_with_sets(&table);
        b.new_chain(&table, CHAIN);
        for set in SETS {
            for &port in &self.ports {
                b.new_rule(&table, CHAIN, set, port, self.kernel.action);
            }
        }
        self.socket.apply(b)
    }

    fn serve(&mut self, rx: &Receiver<Event>, bans: Vec<(AbuseKey, i64)>) {
        let at = Instant::now();
        let now = now_ms();
        for (key, until) in bans {
            self.keeper.made(key, until, now, at);
        }
        self.send_changes();
        let (keys, elements) = self.keeper.len();
        if keys > 0 {
            let ms = at.elapsed().as_millis();
            tracing::info!("{keys} bans in force loaded into the kernel ({elements} elements) in {ms} ms");
        }
        let mut expired = Instant::now();
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let now = now_ms();
            for event in first.into_iter().chain(rx.try_iter().take(EVENTS_PER_TURN)) {
                match event {
                    Event::Refused { key, until, at } => self.keeper.refused(key, until, now, at),
                    Event::Changed(Change::Made(key, ban), at) => self.keeper.made(key, ban.until, now, at),
                    Event::Changed(Change::Lifted(key), _) => self.keeper.lifted(key, now),
                    Event::Stop(done) => {
                        self.remove_table();
                        let _ = done.send(());
                        return;
                    }
                }
            }
            self.follow_reload(now);
            if expired.elapsed() >= EXPIRE_EVERY {
                self.keeper.expire(now);
                expired = Instant::now();
            }
            self.send_changes();
        }
        self.remove_table();
    }

    /// A reload: its `after_refusals`, and its exclusions worked into the sets.
    fn follow_reload(&mut self, now: i64) {
        let snapshot = self.snapshots.load_full();
        if snapshot.generation == self.generation {
            return;
        }
        self.generation = snapshot.generation;
        self.keeper.set_after_refusals(snapshot.config.kernel.after_refusals);
        let excluded = excluded(&snapshot);
        if !self.keeper.excludes_as(&excluded) {
            let fresh = self.keeper.rebuild(excluded, now);
            self.load_afresh(fresh);
        }
    }

    /// Sends what the keeper decided; a refused batch loads the sets afresh.
    fn send_changes(&mut self) {
        let changes = self.keeper.take();
        if changes.is_empty() {
            return;
        }
        let table = self.kernel.table.clone();
        let mut sent = Ok(());
        for chunk in changes.remove.chunks(PER_BATCH) {
            let mut b = self.batch();
            b.del_elements(&table, chunk);
            sent = sent.and_then(|()| self.socket.apply(b));
        }
        for chunk in changes.add.chunks(PER_BATCH) {
            let mut b = self.batch();
            b.add_elements(&table, chunk);
            sent = sent.and_then(|()| self.socket.apply(b));
        }
        let kernel = Arc::clone(&self.kernel);
        let stats = &kernel.stats;
        match sent {
            Ok(()) => {
                stats.removed.fetch_add(changes.remove.len() as u64, Ordering::Relaxed);
                stats.added.fetch_add(changes.add.len() as u64, Ordering::Relaxed);
                for since in changes.since {
                    self.counts.hists.observe_duration(Hist::KernelBan, since.elapsed());
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("the kernel refused a change to table {table}: {e}; loading its sets afresh");
                let excluded = excluded(&self.snapshots.load());
                let fresh = self.keeper.rebuild(excluded, now_ms());
                self.load_afresh(fresh);
            }
        }
        stats.elements.store(self.keeper.len().1 as u64, Ordering::Relaxed);
    }

    /// Empties the sets and loads `elements` (the first batch flushes: the kernel never
    /// holds a half-emptied set).
    fn load_afresh(&mut self, elements: Vec<(Elem, Duration)>) {
        let table = self.kernel.table.clone();
        let mut b = self.batch();
        for set in SETS {
            b.flush_set(&table, set);
        }
        let mut chunks = elements.chunks(PER_BATCH);
        if let Some(first) = chunks.next() {
            b.add_elements(&table, first);
        }
        let mut loaded = self.socket.apply(b);
        for chunk in chunks {
            let mut b = self.batch();
            b.add_elements(&table, chunk);
            loaded = loaded.and_then(|()| self.socket.apply(b));
        }
        let stats = &self.kernel.stats;
        if let Err(e) = loaded {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("cannot load table {table}'s sets: {e}; what is not in them is refused in user space");
        } else {
            stats.added.fetch_add(elements.len() as u64, Ordering::Relaxed);
        }
        stats.elements.store(self.keeper.len().1 as u64, Ordering::Relaxed);
    }

    fn remove_table(&mut self) {
        self.kernel.active.store(false, Ordering::Relaxed);
        let table = self.kernel.table.clone();
        let mut b = self.batch();
        b.del_table(&table);
        match self.socket.apply(b) {
            Ok(()) => tracing::info!("kernel table {table} removed"),
            Err(e) => tracing::error!("cannot remove kernel table {table}: {e} (`nft delete table inet {table}`)"),
        }
        self.kernel.stats.elements.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_named() {
        assert!(cause(&io::Error::from_raw_os_error(libc::EPERM)).contains("CAP_NET_ADMIN"));
        assert!(cause(&io::Error::from_raw_os_error(libc::EPROTONOSUPPORT)).contains("nf_tables"));
    }
}
