//! Abuse control: failures counted per address across conversations, and the bans they
//! lead to.

pub mod bans;
pub mod counters;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::datetime::UnixTime;
use crate::gate::PeerIp;
use crate::snapshot::Snapshot;

pub use bans::{Ban, BanBook, BanSet, Reason};
pub use counters::FailureCounters;

/// Ban requests that may wait for the keeper; past this a request is dropped (the
/// address's next failure asks again).
const QUEUE: usize = 65_536;

/// What workers share for abuse control: the failure counters, the bans in force, and
/// the way to the keeper thread that makes bans.
pub struct Abuse {
    pub counters: FailureCounters,
    bans: Arc<ArcSwap<BanSet>>,
    requests: Sender<(AbuseKey, Reason)>,
}

impl Abuse {
    /// Starts the keeper thread; it ends when the `Abuse` is dropped.
    pub fn start(snapshots: Arc<ArcSwap<Snapshot>>) -> std::io::Result<Arc<Abuse>> {
        let window = snapshots.load().config.abuse.failure_window;
        let bans = Arc::new(ArcSwap::from_pointee(BanSet::default()));
        let (requests, queue) = crossbeam_channel::bounded(QUEUE);
        let published = Arc::clone(&bans);
        std::thread::Builder::new().name("mxgate-bans".into()).spawn(move || keep(&queue, &published, &snapshots))?;
        Ok(Arc::new(Abuse { counters: FailureCounters::new(window), bans, requests }))
    }

    /// When the ban on `key` ends, if one is in force.
    #[inline]
    pub fn banned(&self, key: AbuseKey, now: UnixTime) -> Option<i64> {
        self.bans.load().banned(key, now.0)
    }

    /// Counts a failure of `key`; asks for a ban when it reaches `threshold`.
    pub fn failed(&self, key: AbuseKey, now: UnixTime, threshold: u32) {
        let count = self.counters.add(key, now.0);
        if count >= threshold && self.banned(key, now).is_none() {
            self.ban(key, Reason::Failures(count));
        }
    }

    /// Asks the keeper to ban `key`.
    pub fn ban(&self, key: AbuseKey, reason: Reason) {
        if let Err(TrySendError::Full(_)) = self.requests.try_send((key, reason)) {
            tracing::warn!("ban requests queue full: {key} not banned yet");
        }
    }
}

/// The keeper: applies ban requests in batches and publishes the set after each.
fn keep(queue: &Receiver<(AbuseKey, Reason)>, published: &ArcSwap<BanSet>, snapshots: &ArcSwap<Snapshot>) {
    let mut book = BanBook::default();
    while let Ok(first) = queue.recv() {
        let snapshot = snapshots.load();
        let config = &snapshot.config.abuse;
        let now = UnixTime::now();
        book.expire(now.0, config);
        let batch = std::iter::once(first).chain(queue.try_iter());
        let made: Vec<(AbuseKey, Ban)> =
            batch.filter_map(|(key, reason)| book.ban(key, reason, now.0, config).map(|b| (key, b))).collect();
        if made.is_empty() {
            continue;
        }
        // in force first, then told
        published.store(Arc::new(book.set()));
        for (key, ban) in made {
            tracing::info!(
                "IP address {key} banned: {}, until {} (offence {})",
                ban.reason,
                UnixTime(ban.until).rfc3339(),
                ban.offence
            );
        }
    }
}

/// What failures are counted and bans are made against: an IPv4 address, or the IPv6
/// prefix of `[abuse] ipv6_prefix` bits holding the address (one host may hold a whole
/// /64, so counting its addresses apart would let it fail for ever).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbuseKey {
    V4(Ipv4Addr),
    /// The prefix's address (host bits zero) and its length.
    V6(Ipv6Addr, u8),
}

impl AbuseKey {
    pub fn new(peer: PeerIp, ipv6_prefix: u8) -> Self {
        match peer.ip() {
            IpAddr::V4(a) => AbuseKey::V4(a),
            IpAddr::V6(a) => {
                let len = ipv6_prefix.min(128);
                let mask = u128::MAX.checked_shl(u32::from(128 - len)).unwrap_or(0);
                AbuseKey::V6(Ipv6Addr::from(u128::from(a) & mask), len)
            }
        }
    }
}

impl fmt::Display for AbuseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbuseKey::V4(a) => a.fmt(f),
            AbuseKey::V6(a, 128) => a.fmt(f),
            AbuseKey::V6(a, len) => write!(f, "{a}/{len}"),
        }
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
    }
}
