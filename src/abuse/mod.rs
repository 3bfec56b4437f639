//! Abuse control: failures counted per address across conversations, and the bans they
//! lead to.

pub mod bans;
pub mod connections;
pub mod counters;
pub mod file;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::Abuse as AbuseConfig;
use crate::datetime::UnixTime;
use crate::peer::PeerIp;
use crate::snapshot::Snapshot;

pub use bans::{Ban, BanBook, BanSet, Reason};
pub use connections::{Admission, Connections, Limit};
pub use counters::FailureCounters;

/// What the abuse control tells a fleet of nodes, never waiting for it (with `[cluster]`,
/// the fleet's threads: `cluster` implements this from above, so that the abuse control
/// knows nothing of Redis).
pub trait Fleet: Send + Sync {
    /// A ban made here or lifted here (adopted bans are not handed back).
    fn changed(&self, change: Change);
    /// A prefix due to escalate, counting the bans taken in from the fleet.
    fn escalate(&self, prefix: AbuseKey, distinct: u32);
    /// A failure counted here.
    fn failed(&self, key: AbuseKey);
}

/// What workers share for abuse control: the failure counters, the connection counts
/// and the bans.
///
/// A ban is made by the worker whose peer earned it, under the book's lock, and is in
/// force (published) before that worker handles anything else: waking another thread
/// would wait for a free core exactly when the cores are busiest. The ban-file writer
/// thread is told afterwards, and a housekeeping thread drops bans that ended.
///
/// With `[cluster]`, a [`Fleet`] is told too (the fleet's threads, never waited for: see
/// `cluster`, which implements it from above): each ban made here, each lift, each
/// failure counted, and each prefix due to escalate (counting the bans taken in: the
/// fleet claims the prefix's ban so that one node makes it). They bring back what other nodes did through
/// [`Abuse::adopt`] and [`Abuse::lift_from`], and ban through [`Abuse::ban`] when the
/// fleet's count crosses the threshold or a claim is won.
pub struct Abuse {
    pub counters: FailureCounters,
    pub connections: Arc<Connections>,
    book: Mutex<BanBook>,
    bans: ArcSwap<BanSet>,
    /// To the ban-file writer, with a `ban_file`.
    changes: Option<Sender<Change>>,
    /// To the fleet's threads, with `[cluster]`.
    fleet: Option<Box<dyn Fleet>>,
    /// To the kernel's keeper, with `[kernel]`: told what the ban-file writer is told.
    kernel: std::sync::OnceLock<Arc<crate::kernel::Kernel>>,
    /// Closed when the `Abuse` is dropped, which ends the housekeeping thread.
    _alive: Sender<()>,
}

impl Abuse {
    /// Loads the ban file and starts the housekeeping thread (and the ban-file writer,
    /// with a `ban_file`); they end when the `Abuse` is dropped. Bans, lifts and failures
    /// are handed to `fleet` too, when given.
    pub fn start(snapshots: Arc<ArcSwap<Snapshot>>, fleet: Option<Box<dyn Fleet>>) -> io::Result<Arc<Abuse>> {
        let snapshot = snapshots.load_full();
        let config = &snapshot.config.abuse;
        let mut book = BanBook::default();
        if fleet.is_some() {
            book.in_fleet();
        }
        let changes = match &config.ban_file {
            Some(path) => {
                let restored = file::load(path, UnixTime::now());
                if !restored.is_empty() {
                    tracing::info!("{} bans in force restored from {}", restored.len(), path.display());
                }
                book.restore_all(restored);
                let (changes, received) = crossbeam_channel::unbounded();
                let records: Records = book.iter().map(|(k, b)| (*k, b.clone())).collect();
                let path = path.clone();
                std::thread::Builder::new()
                    .name("mxgate-banfile".into())
                    .spawn(move || persist(&path, &received, records))?;
                Some(changes)
            }
            None => None,
        };
        let (alive, dropped) = crossbeam_channel::bounded(0);
        let abuse = Arc::new(Abuse {
            counters: FailureCounters::new(config.failure_window, config.counter_memory),
            connections: Arc::default(),
            bans: ArcSwap::from_pointee(book.set()),
            book: Mutex::new(book),
            changes,
            fleet,
            kernel: std::sync::OnceLock::new(),
            _alive: alive,
        });
        let weak = Arc::downgrade(&abuse);
        std::thread::Builder::new().name("mxgate-bans".into()).spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = dropped.recv_timeout(EXPIRE_EVERY) {
                let Some(abuse) = weak.upgrade() else { return };
                abuse.expire(&snapshots.load().config.abuse);
            }
        })?;
        Ok(abuse)
    }

    /// When the ban on `key` ends, if one is in force.
    #[inline]
    pub fn banned(&self, key: AbuseKey, now: UnixTime) -> Option<i64> {
        self.bans.load().banned(key, now.0)
    }

    /// The key whose ban refuses `key`, and when it ends, if one is in force.
    #[inline]
    pub fn banned_by(&self, key: AbuseKey, now: UnixTime) -> Option<(AbuseKey, i64)> {
        self.bans.load().banned_by(key, now.0)
    }

    /// Tells `kernel` each ban made (here, by the operator, adopted) and lifted from now on.
    pub fn tell_kernel(&self, kernel: Arc<crate::kernel::Kernel>) {
        let _ = self.kernel.set(kernel);
    }

    /// Counts a failure of `key`; bans it when it reaches `failure_threshold`. With
    /// `[abuse] shadow`: no ban, and the reason of the ban it would have made.
    #[must_use]
    pub fn failed(&self, key: AbuseKey, now: UnixTime, config: &AbuseConfig) -> Option<Reason> {
        let count = self.counters.add(key, now.0);
        if let Some(fleet) = &self.fleet {
            fleet.failed(key);
        }
        if count >= config.failure_threshold && self.banned(key, now).is_none() {
            return self.ban(key, Reason::Failures(count), now, config);
        }
        None
    }

    /// Bans `key` (unless it is banned already): in force at once, then logged and
    /// handed to the ban-file writer. With `[abuse] shadow`: no ban, and `reason` back.
    #[must_use]
    pub fn ban(&self, key: AbuseKey, reason: Reason, now: UnixTime, config: &AbuseConfig) -> Option<Reason> {
        if config.shadow {
            return Some(reason);
        }
        let (made, escalations) = {
            let mut book = self.book();
            let made = book.ban(key, reason, now.0, config);
            if !made.is_empty() {
                self.bans.store(Arc::new(book.set()));
            }
            (made, book.take_escalations())
        };
        self.tell_fleet_escalations(escalations);
        for (key, ban) in made {
            // a ban for other reasons still tells how often the address failed
            let counted = match ban.reason {
                Reason::Dropped => format!(" ({} failures counted)", self.counters.count(key, now.0)),
                _ => String::new(),
            };
            tracing::info!(
                "IP address {key} banned: {}{counted}, until {} (offence {})",
                ban.reason,
                UnixTime(ban.until).rfc3339(),
                ban.offence
            );
            self.tell_fleet(Change::Made(key, ban.clone()));
            self.tell_writer(Change::Made(key, ban));
        }
        None
    }

    /// The ban [`Abuse::ban`] would make of `key` now (without escalation), not made.
    pub fn preview(&self, key: AbuseKey, reason: Reason, now: UnixTime, config: &AbuseConfig) -> Ban {
        self.book().preview(key, reason, now.0, config)
    }

    /// Puts in force a ban another node of the fleet made (`ban.from`), unless one here
    /// ends as late or later; logged and written to the ban file, not handed back to the
    /// fleet (but a prefix it makes due to escalate is). Whether it was taken in.
    pub fn adopt(&self, key: AbuseKey, ban: Ban, now: UnixTime, config: &AbuseConfig) -> bool {
        let (adopted, escalations) = {
            let mut book = self.book();
            let adopted = book.adopt(key, ban.clone(), now.0, config);
            if adopted {
                self.bans.store(Arc::new(book.set()));
            }
            (adopted, book.take_escalations())
        };
        self.tell_fleet_escalations(escalations);
        if adopted {
            let node = ban.from.as_deref().unwrap_or("?");
            tracing::info!("ban from {node}: {key} until {}", UnixTime(ban.until).rfc3339());
            self.tell_writer(Change::Made(key, ban));
        }
        adopted
    }

    /// Lifts a ban because `node` of the fleet lifted it; not handed back to the fleet.
    pub fn lift_from(&self, key: AbuseKey, node: &str, now: UnixTime) -> Option<Ban> {
        let lifted = {
            let mut book = self.book();
            let lifted = book.lift(key, now.0);
            if lifted.is_some() {
                self.bans.store(Arc::new(book.set()));
            }
            lifted
        };
        if lifted.is_some() {
            tracing::info!("IP address {key} unbanned by the operator on {node}");
            self.tell_writer(Change::Lifted(key));
        }
        lifted
    }

    /// The bans in force that this node made (not adopted from the fleet).
    pub fn own_bans(&self, now: UnixTime) -> Vec<(AbuseKey, Ban)> {
        self.book().iter().filter(|(_, b)| b.from.is_none() && b.until > now.0).map(|(k, b)| (*k, b.clone())).collect()
    }

    /// The ban in force on `key` (or on the prefix it escalates to), as recorded.
    pub fn ban_of(&self, key: AbuseKey, now: UnixTime) -> Option<(AbuseKey, Ban)> {
        let book = self.book();
        [Some(key), key.escalation()]
            .into_iter()
            .flatten()
            .find_map(|k| book.get(k).filter(|b| b.until > now.0).map(|b| (k, b.clone())))
    }

    /// Bans `key` as the operator says (see [`BanBook::impose`]); logged like every ban.
    /// `None` when the book is full.
    pub fn impose(
        &self,
        key: AbuseKey,
        reason: String,
        until: Option<i64>,
        now: UnixTime,
        config: &AbuseConfig,
    ) -> Option<Ban> {
        let ban = {
            let mut book = self.book();
            let ban = book.impose(key, Reason::Recorded(reason), until, now.0, config)?;
            self.bans.store(Arc::new(book.set()));
            ban
        };
        tracing::info!(
            "IP address {key} banned: {} (by the operator), until {} (offence {})",
            ban.reason,
            UnixTime(ban.until).rfc3339(),
            ban.offence
        );
        self.tell_fleet(Change::Made(key, ban.clone()));
        self.tell_writer(Change::Made(key, ban.clone()));
        Some(ban)
    }

    /// Lifts the ban on `key`, if one is in force (see [`BanBook::lift`]).
    pub fn lift(&self, key: AbuseKey, now: UnixTime) -> Option<Ban> {
        let lifted = {
            let mut book = self.book();
            let lifted = book.lift(key, now.0);
            self.bans.store(Arc::new(book.set()));
            lifted
        };
        if let Some(ban) = &lifted {
            tracing::info!("IP address {key} unbanned by the operator (was until {})", UnixTime(ban.until).rfc3339());
        }
        // the fleet lifts it even where this node never had it (whitelisted here)
        self.tell_fleet(Change::Lifted(key));
        self.tell_writer(Change::Lifted(key));
        lifted
    }

    /// Every ban in force at `now`, ordered by key.
    pub fn bans_in_force(&self, now: UnixTime) -> Vec<(AbuseKey, Ban)> {
        let mut bans: Vec<_> =
            self.book().iter().filter(|(_, b)| b.until > now.0).map(|(k, b)| (*k, b.clone())).collect();
        bans.sort_by_key(|(k, _)| *k);
        bans
    }

    /// Every ban in force at `now`: its key and end (no order).
    pub fn ends_in_force(&self, now: UnixTime) -> Vec<(AbuseKey, i64)> {
        self.book().iter().filter(|(_, b)| b.until > now.0).map(|(k, b)| (*k, b.until)).collect()
    }

    /// How many bans are in force at `now`.
    pub fn bans_count(&self, now: UnixTime) -> usize {
        self.book().iter().filter(|(_, b)| b.until > now.0).count()
    }

    fn tell_fleet(&self, change: Change) {
        if let Some(fleet) = &self.fleet {
            fleet.changed(change);
        }
    }

    /// Prefixes due to escalate, for the fleet to claim (only a fleet's book has any).
    fn tell_fleet_escalations(&self, due: Vec<(AbuseKey, u32)>) {
        if let Some(fleet) = &self.fleet {
            for (prefix, distinct) in due {
                fleet.escalate(prefix, distinct);
            }
        }
    }

    fn tell_writer(&self, change: Change) {
        if let Some(kernel) = self.kernel.get() {
            kernel.changed(&change);
        }
        if let Some(changes) = &self.changes {
            let _ = changes.send(change);
        }
    }

    fn expire(&self, config: &AbuseConfig) {
        let mut book = self.book();
        book.expire(UnixTime::now().0, config);
        self.bans.store(Arc::new(book.set()));
    }

    fn book(&self) -> std::sync::MutexGuard<'_, BanBook> {
        // a panic while it was held leaves at worst one ban half made: keep serving
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

type Records = HashMap<AbuseKey, Ban, ahash::RandomState>;

/// How often bans that ended are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// What the ban-file writer (and the fleet's thread, and the kernel's keeper) is told.
#[derive(Clone, Debug)]
pub enum Change {
    Made(AbuseKey, Ban),
    Lifted(AbuseKey),
}

/// The ban-file writer: applies the bans made and lifted, in batches, and rewrites the
/// file after each batch (bans that ended are left out). A write that fails (a full disk)
/// is one error line; the bans stay in force in memory and the write is tried again
/// every [`RETRY_WRITE`] until it succeeds.
fn persist(path: &Path, changes: &Receiver<Change>, mut records: Records) {
    let mut failing = crate::statefile::Failing::default();
    loop {
        let first = if failing.is_failing() {
            match changes.recv_timeout(RETRY_WRITE) {
                Ok(change) => Some(change),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match changes.recv() {
                Ok(change) => Some(change),
                Err(_) => return,
            }
        };
        for change in first.into_iter().chain(changes.try_iter()) {
            match change {
                Change::Made(key, ban) => records.insert(key, ban),
                Change::Lifted(key) => records.remove(&key),
            };
        }
        let now = UnixTime::now();
        records.retain(|_, b| b.until > now.0);
        let written = crate::statefile::write(path, file::render(records.iter()).as_bytes());
        failing.report("the ban file", path, written, "bans stay in force in memory");
    }
}

/// How soon a ban file that could not be written is tried again.
const RETRY_WRITE: Duration = Duration::from_secs(5);

/// What failures are counted and bans are made against: an IPv4 address, or the IPv6
/// prefix of `[abuse] ipv6_prefix` bits holding the address (one host may hold a whole
/// /64, so counting its addresses apart would let it fail for ever); for escalated bans,
/// an IPv4 /24 or an IPv6 /48.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbuseKey(IpNet);

/// Prefix lengths a ban escalates to: the network many banned addresses share.
const ESCALATE_V4: u8 = 24;
const ESCALATE_V6: u8 = 48;

impl AbuseKey {
    /// The key a peer is counted and banned by.
    pub fn new(peer: PeerIp, ipv6_prefix: u8) -> Self {
        let net = match peer.ip() {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::from(a)),
            IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, ipv6_prefix.min(128)).unwrap_or(Ipv6Net::from(a)).trunc()),
        };
        AbuseKey(net)
    }

    /// A key for a prefix as written in a ban file (host bits must be clear).
    pub fn from_net(net: IpNet) -> Self {
        AbuseKey(net)
    }

    /// The address or prefix.
    pub fn net(self) -> IpNet {
        self.0
    }

    /// The key of the prefix of length `len` holding this one (`len` no longer than its).
    pub fn within(self, len: u8) -> Option<AbuseKey> {
        (len <= self.0.prefix_len()).then(|| IpNet::new(self.0.addr(), len).ok()).flatten().map(|n| AbuseKey(n.trunc()))
    }

    /// The prefix bans of this key escalate to, when it is longer than that.
    pub fn escalation(self) -> Option<AbuseKey> {
        let len = match self.0 {
            IpNet::V4(_) => ESCALATE_V4,
            IpNet::V6(_) => ESCALATE_V6,
        };
        (self.0.prefix_len() > len).then(|| AbuseKey(IpNet::new(self.0.addr(), len).unwrap_or(self.0).trunc()))
    }
}

impl fmt::Display for AbuseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() { self.0.addr().fmt(f) } else { self.0.fmt(f) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_addresses_or_ipv6_prefixes() {
        let k = |ip: &str, len| AbuseKey::new(PeerIp::new(ip.parse().unwrap()), len).to_string();
        assert_eq!(k("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::/64");
        assert_eq!(k("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::/48");
        assert_eq!(k("2001:db8::1", 128), "2001:db8::1");
        let e =
            |ip: &str, len| AbuseKey::new(PeerIp::new(ip.parse().unwrap()), len).escalation().map(|k| k.to_string());
        assert_eq!(e("192.0.2.7", 64).as_deref(), Some("192.0.2.0/24"));
        assert_eq!(e("2001:db8:1:2::9", 64).as_deref(), Some("2001:db8:1::/48"));
        assert_eq!(e("2001:db8:1:2::9", 32), None);
    }
}
