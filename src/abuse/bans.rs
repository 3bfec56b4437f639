//! Bans: the addresses (and IPv6 prefixes) refused at the gate until a time.
//!
//! Workers read the current [`BanSet`] through an `ArcSwap` (one pointer load and a hash
//! lookup or two per connection). The [`BanBook`] behind [`super::Abuse`]'s lock is the
//! record: the worker whose peer earned a ban applies it there and publishes a new set.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::AbuseKey;
use crate::config::Abuse as AbuseConfig;

/// Most bans held at once; past it a new ban is refused with a warning (a flood of
/// distinct addresses is for prefix escalation, not for unbounded memory). Past offences
/// are remembered for at most as many addresses.
pub const MAX_BANS: usize = 1_000_000;

/// The longest a ban lasts (100 years): a ban asked for longer (by the operator, a ban
/// file, another node) ends then. Defined with the durations the configuration reads,
/// which refuse longer ones.
pub use crate::units::MAX_BAN_SECS;

/// The latest a ban made or taken in at `now` may end.
pub fn latest_end(now: i64) -> i64 {
    now.saturating_add(MAX_BAN_SECS)
}

/// Why an address was banned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `failures` within `failure_window` reached `failure_threshold`.
    Failures(u32),
    /// A conversation passed a failure limit and `ban_on_drop` is set.
    Dropped,
    /// This many addresses of the prefix were banned within `failure_window`.
    Escalated(u32),
    /// `failures` within `failure_window` on all the fleet's nodes together reached
    /// `failure_threshold` (`[cluster]`).
    FleetFailures(u32),
    /// As read from the ban file, or given by the operator.
    Recorded(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Failures(n) => write!(f, "{n} failures"),
            Reason::Dropped => f.write_str("dropped for too many errors"),
            Reason::Escalated(n) => write!(f, "{n} addresses banned in the prefix"),
            Reason::FleetFailures(n) => write!(f, "{n} failures across the fleet"),
            Reason::Recorded(text) => f.write_str(text),
        }
    }
}

/// One ban in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    /// Seconds since the epoch when it ends.
    pub until: i64,
    pub reason: Reason,
    /// This ban's number for the key while its offences are remembered (1: first).
    pub offence: u32,
    /// The fleet node that made it (`[cluster]`); `None`: made here.
    pub from: Option<Arc<str>>,
}

/// Bans made since the base was last rebuilt; past this many the base is rebuilt, so a
/// publication copies at most this many entries however many bans are in force (and
/// once every this many bans, a rebuild copies them all).
const RECENT_MAX: usize = 1024;

type Untils = HashMap<AbuseKey, i64, ahash::RandomState>;

/// What the gate reads: the keys banned and until when. A large base shared between
/// publications and the few bans made since.
#[derive(Clone, Debug, Default)]
pub struct BanSet {
    base: Arc<Untils>,
    recent: Untils,
    /// The prefix lengths banned keys have (bit n: some key of length n), IPv4 and
    /// IPv6: besides an address's own key and the prefix it escalates to, a peer is
    /// looked up under each shorter length an operator banned a prefix of.
    lengths_v4: u64,
    lengths_v6: [u64; 3],
    /// Some key has a length failures never make (an operator's prefix): only then are
    /// the other lengths looked at.
    others: bool,
}

impl BanSet {
    /// When the ban on `key` (or on the prefix it escalates to, or on a prefix of it an
    /// operator banned) ends, if one is in force at `now`.
    #[inline]
    pub fn banned(&self, key: AbuseKey, now: i64) -> Option<i64> {
        self.banned_by(key, now).map(|(_, until)| until)
    }

    /// The key whose ban refuses `key` (its own, the prefix it escalates to, or an
    /// operator's prefix holding it) and when that ban ends.
    #[inline]
    pub fn banned_by(&self, key: AbuseKey, now: i64) -> Option<(AbuseKey, i64)> {
        if self.base.is_empty() && self.recent.is_empty() {
            return None;
        }
        let until = |k: AbuseKey| {
            self.recent.get(&k).or_else(|| self.base.get(&k)).copied().filter(|&u| u > now).map(|u| (k, u))
        };
        if let Some(u) = until(key).or_else(|| key.escalation().and_then(until)) {
            return Some(u);
        }
        if !self.others {
            return None;
        }
        // the other lengths banned, shorter than the key's (none, unless an operator
        // banned a prefix: then a bit each, visited by its set bits only)
        let mut words = match key.net() {
            ipnet::IpNet::V4(_) => [self.lengths_v4, 0, 0],
            ipnet::IpNet::V6(_) => self.lengths_v6,
        };
        let len = usize::from(key.net().prefix_len());
        let escalated = key.escalation().map(|e| usize::from(e.net().prefix_len()));
        for (w, word) in words.iter_mut().enumerate() {
            // the bits of this word for lengths below the key's
            let first = w * 64;
            *word &= match len.saturating_sub(first) {
                0 => 0,
                n if n >= 64 => u64::MAX,
                n => (1 << n) - 1,
            };
            if let Some(e) = escalated.filter(|e| e / 64 == w) {
                *word &= !(1 << (e % 64));
            }
        }
        for (w, mut bits) in words.into_iter().enumerate() {
            while bits != 0 {
                let l = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(u) = u8::try_from(l).ok().and_then(|l| key.within(l)).and_then(until) {
                    return Some(u);
                }
            }
        }
        None
    }

    #[cfg(test)]
    fn has_length(&self, v6: bool, len: u8) -> bool {
        let bit = usize::from(len);
        if v6 { self.lengths_v6[bit / 64] >> (bit % 64) & 1 == 1 } else { self.lengths_v4 >> (bit % 64) & 1 == 1 }
    }

    fn mark_length(&mut self, key: AbuseKey) {
        let bit = usize::from(key.net().prefix_len());
        // an address (IPv4), an IPv6 peer's key (64 and longer by default), or the
        // prefixes failures escalate to
        let made_by_failures = match key.net() {
            ipnet::IpNet::V4(_) => bit == 32 || bit == 24,
            ipnet::IpNet::V6(_) => bit == 48 || bit >= 64,
        };
        self.others |= !made_by_failures;
        match key.net() {
            ipnet::IpNet::V4(_) => self.lengths_v4 |= 1 << (bit % 64),
            ipnet::IpNet::V6(_) => self.lengths_v6[bit / 64] |= 1 << (bit % 64),
        }
    }

    pub fn len(&self) -> usize {
        self.base.len() + self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The keeper's record: bans in force, past offences, and recent bans per prefix.
#[derive(Debug, Default)]
pub struct BanBook {
    bans: HashMap<AbuseKey, Ban, ahash::RandomState>,
    /// Offences per key and when each key's last ban ended; remembered for
    /// `max_ban_duration` after that, so a repeat offender's ban doubles.
    offences: HashMap<AbuseKey, (u32, i64), ahash::RandomState>,
    /// Bans of addresses per escalation prefix, with when they were made.
    by_prefix: HashMap<AbuseKey, Vec<(AbuseKey, i64)>, ahash::RandomState>,
    set: BanSet,
    /// In a fleet (`[cluster]`): a prefix due to escalate is not banned here but left in
    /// `escalations` for the fleet to claim (so one node makes it), and bans taken in
    /// from other nodes count towards it too.
    fleet: bool,
    escalations: Vec<(AbuseKey, u32)>,
}

impl BanBook {
    /// Bans `key` at `now`: `ban_duration`, doubled for each remembered offence, up to
    /// `max_ban_duration`. Returns the bans made: none when it is banned already or the
    /// book is full; two when it completes `escalate_after` bans in its prefix.
    pub fn ban(&mut self, key: AbuseKey, reason: Reason, now: i64, config: &AbuseConfig) -> Vec<(AbuseKey, Ban)> {
        let mut made = Vec::new();
        if self.bans.get(&key).is_some_and(|b| b.until > now) {
            return made;
        }
        if self.bans.len() >= MAX_BANS {
            self.expire(now, config);
            if self.bans.len() >= MAX_BANS {
                tracing::warn!("{MAX_BANS} bans in force: not banning {key}");
                return made;
            }
        }
        let offence = self.next_offence(key, now, config);
        let until = now.saturating_add(duration(offence, config));
        made.push((key, self.record(key, Ban { until, reason, offence, from: None })));
        if let Some((prefix, distinct)) = self.escalation_due(key, now, config) {
            if self.fleet {
                self.escalations.push((prefix, distinct));
            } else {
                made.extend(self.ban(prefix, Reason::Escalated(distinct), now, config));
            }
        }
        made
    }

    /// Counts `key`'s ban towards its prefix's escalation: the prefix and how many of its
    /// addresses were banned within `failure_window`, when that reaches `escalate_after`.
    fn escalation_due(&mut self, key: AbuseKey, now: i64, config: &AbuseConfig) -> Option<(AbuseKey, u32)> {
        let prefix = key.escalation().filter(|_| config.escalate_after > 0)?;
        let window = secs(config.failure_window);
        let recent = self.by_prefix.entry(prefix).or_default();
        recent.retain(|&(k, at)| k != key && now - at < window);
        recent.push((key, now));
        let distinct = recent.len() as u32;
        if distinct < config.escalate_after {
            return None;
        }
        self.by_prefix.remove(&prefix);
        Some((prefix, distinct))
    }

    /// Makes this book a fleet node's (see `escalations`).
    pub fn in_fleet(&mut self) {
        self.fleet = true;
    }

    /// The prefixes due to escalate since the last call, for the fleet to claim.
    pub fn take_escalations(&mut self) -> Vec<(AbuseKey, u32)> {
        std::mem::take(&mut self.escalations)
    }

    /// Bans `key` as the operator says: until `until`, or for the next offence's
    /// doubled `ban_duration` when `None`. A ban in force is replaced (longer or shorter)
    /// and keeps its offence number. Never escalates. `None` when the book is full.
    pub fn impose(
        &mut self,
        key: AbuseKey,
        reason: Reason,
        until: Option<i64>,
        now: i64,
        config: &AbuseConfig,
    ) -> Option<Ban> {
        let offence = match self.bans.get(&key) {
            Some(b) if b.until > now => b.offence,
            _ if self.bans.len() >= MAX_BANS => return None,
            _ => self.next_offence(key, now, config),
        };
        let until = until.unwrap_or_else(|| now.saturating_add(duration(offence, config))).min(latest_end(now));
        Some(self.record(key, Ban { until, reason, offence, from: None }))
    }

    /// Lifts the ban on `key`, if one is in force, and forgets its offences and its part
    /// in its prefix's escalation.
    pub fn lift(&mut self, key: AbuseKey, now: i64) -> Option<Ban> {
        self.offences.remove(&key);
        if let Some(prefix) = key.escalation()
            && let Some(recent) = self.by_prefix.get_mut(&prefix)
        {
            recent.retain(|&(k, _)| k != key);
        }
        let ban = self.bans.remove(&key)?;
        self.set.recent.remove(&key);
        if self.set.base.contains_key(&key) {
            self.rebuild();
        }
        (ban.until > now).then_some(ban)
    }

    /// The number the next ban of `key` gets: one more than the last while its offences
    /// are remembered.
    fn next_offence(&self, key: AbuseKey, now: i64, config: &AbuseConfig) -> u32 {
        match self.offences.get(&key) {
            Some(&(n, ended)) if now < ended.saturating_add(secs(config.max_ban_duration)) => n.saturating_add(1),
            _ => 1,
        }
    }

    /// Puts `ban` in force and remembers it as an offence; returns it.
    fn record(&mut self, key: AbuseKey, ban: Ban) -> Ban {
        // past offences outlive their bans by max_ban_duration: bounded like the bans
        if self.offences.len() < MAX_BANS || self.offences.contains_key(&key) {
            self.offences.insert(key, (ban.offence, ban.until));
        }
        self.insert(key, ban.clone());
        ban
    }

    /// What [`BanBook::ban`] would make of `key` at `now` (its first ban only), without
    /// making it: the fleet claims a ban in Redis before it is made.
    pub fn preview(&self, key: AbuseKey, reason: Reason, now: i64, config: &AbuseConfig) -> Ban {
        let offence = self.next_offence(key, now, config);
        Ban { until: now.saturating_add(duration(offence, config)), reason, offence, from: None }
    }

    /// Takes in a ban another node made: put in force unless one in force here ends as
    /// late or later; it counts towards its prefix's escalation. Whether it was taken in.
    pub fn adopt(&mut self, key: AbuseKey, ban: Ban, now: i64, config: &AbuseConfig) -> bool {
        let ban = Ban { until: ban.until.min(latest_end(now)), ..ban };
        if ban.until <= now || self.bans.get(&key).is_some_and(|b| b.until >= ban.until) {
            return false;
        }
        if self.bans.len() >= MAX_BANS && !self.bans.contains_key(&key) {
            return false;
        }
        self.restore(key, ban);
        if let Some(due) = self.escalation_due(key, now, config) {
            self.escalations.push(due);
        }
        true
    }

    /// Takes in a ban as recorded (the ban file at start).
    pub fn restore(&mut self, key: AbuseKey, ban: Ban) {
        self.offences.insert(key, (ban.offence, ban.until));
        self.insert(key, ban);
    }

    /// Takes in every ban of a ban file at once: the set the gate reads is built once at
    /// the end (ban by ban, a million would rebuild it a thousand times: 50 s).
    pub fn restore_all(&mut self, bans: impl IntoIterator<Item = (AbuseKey, Ban)>) {
        for (key, ban) in bans {
            self.offences.insert(key, (ban.offence, ban.until));
            self.bans.insert(key, ban);
        }
        self.rebuild();
    }

    fn insert(&mut self, key: AbuseKey, ban: Ban) {
        self.set.recent.insert(key, ban.until);
        self.set.mark_length(key);
        self.bans.insert(key, ban);
        if self.set.recent.len() > RECENT_MAX {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.set.base = Arc::new(self.bans.iter().map(|(k, b)| (*k, b.until)).collect());
        self.set.recent.clear();
        (self.set.lengths_v4, self.set.lengths_v6, self.set.others) = (0, [0; 3], false);
        let keys: Vec<AbuseKey> = self.bans.keys().copied().collect();
        for key in keys {
            self.set.mark_length(key);
        }
    }

    /// Drops bans that ended and offences no longer remembered.
    pub fn expire(&mut self, now: i64, config: &AbuseConfig) {
        let before = self.bans.len();
        self.bans.retain(|_, b| b.until > now);
        let remember = secs(config.max_ban_duration);
        self.offences.retain(|_, &mut (_, ended)| now < ended.saturating_add(remember));
        let window = secs(config.failure_window);
        self.by_prefix.retain(|_, recent| {
            recent.retain(|&(_, at)| now - at < window);
            !recent.is_empty()
        });
        if self.bans.len() != before {
            self.rebuild();
        }
    }

    pub fn get(&self, key: AbuseKey) -> Option<&Ban> {
        self.bans.get(&key)
    }

    /// Every ban in force or not yet expired from the book.
    pub fn iter(&self) -> impl Iterator<Item = (&AbuseKey, &Ban)> {
        self.bans.iter()
    }

    /// The set the gate reads (cheap: the base is shared).
    pub fn set(&self) -> BanSet {
        self.set.clone()
    }
}

/// How long the `offence`th ban lasts: `ban_duration` doubled for each earlier offence,
/// at most `max_ban_duration`.
fn duration(offence: u32, config: &AbuseConfig) -> i64 {
    let doubled = secs(config.ban_duration).saturating_mul(1i64 << (offence.max(1) - 1).min(40));
    doubled.min(secs(config.max_ban_duration))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::peer::PeerIp;
    use std::path::Path;

    const T0: i64 = 1_795_894_760;

    #[test]
    fn a_ban_file_is_restored_whole_and_read_as_ban_by_ban() {
        let mut book = BanBook::default();
        let bans = (0..3000u32).map(|i| {
            let key = AbuseKey::from_net(ipnet::IpNet::from(std::net::IpAddr::from((0xc000_0000 + i).to_be_bytes())));
            (key, Ban { until: T0 + 60 + i64::from(i), reason: Reason::Recorded("r".into()), offence: 1, from: None })
        });
        book.restore_all(bans.clone());
        let set = book.set();
        assert_eq!(set.len(), 3000);
        for (key, ban) in bans {
            assert_eq!(set.banned(key, T0), Some(ban.until));
        }
        let prefix = AbuseKey::from_net("198.51.100.0/22".parse().unwrap());
        let ban = Ban { until: T0 + 60, reason: Reason::Recorded("r".into()), offence: 1, from: None };
        book.restore_all([(prefix, ban)]);
        let inside = AbuseKey::from_net("198.51.101.7/32".parse().unwrap());
        assert_eq!(book.set().banned(inside, T0), Some(T0 + 60), "an operator's prefix: its length looked up");
    }

    fn config() -> AbuseConfig {
        let text = "[abuse]\nban_duration = \"1h\"\nmax_ban_duration = \"5h\"\n";
        Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap().abuse
    }

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    #[test]
    fn no_ban_outlasts_a_hundred_years_whoever_asks() {
        let c = config();
        let mut book = BanBook::default();
        let latest = T0 + MAX_BAN_SECS;
        let imposed = book.impose(key("192.0.2.1"), Reason::Dropped, Some(i64::MAX), T0, &c).unwrap();
        assert_eq!(imposed.until, latest, "the operator's");
        let theirs = Ban { until: i64::MAX, reason: Reason::Dropped, offence: u32::MAX, from: Some("b".into()) };
        assert!(book.adopt(key("192.0.2.2"), theirs, T0, &c));
        assert_eq!(book.get(key("192.0.2.2")).map(|b| b.until), Some(latest), "another node's");
        // an offence number at its limit does not wrap: the next is still the longest ban
        book.expire(latest + 1, &c);
        let next = one(book.ban(key("192.0.2.2"), Reason::Failures(30), latest + 1, &c));
        assert_eq!((next.offence, next.until), (u32::MAX, latest + 1 + 5 * 3600));
    }

    #[test]
    fn a_repeat_offender_is_banned_twice_as_long_up_to_the_most() {
        let c = config();
        let mut book = BanBook::default();
        let k = key("192.0.2.1");
        let hour = 3600;
        let first = one(book.ban(k, Reason::Failures(30), T0, &c));
        assert_eq!((first.until, first.offence), (T0 + hour, 1));
        assert_eq!(book.ban(k, Reason::Dropped, T0 + 10, &c), [], "banned already");
        assert_eq!(book.set().banned(k, T0 + hour - 1), Some(T0 + hour));
        assert_eq!(book.set().banned(k, T0 + hour), None, "expired");
        let second = one(book.ban(k, Reason::Failures(30), T0 + hour, &c));
        assert_eq!(second.until, T0 + 3 * hour, "doubled");
        let third = one(book.ban(k, Reason::Failures(30), T0 + 3 * hour, &c));
        assert_eq!(third.until, T0 + 7 * hour, "doubled again");
        let fourth = one(book.ban(k, Reason::Failures(30), T0 + 7 * hour, &c));
        assert_eq!(fourth.until, T0 + 12 * hour, "8h capped at max_ban_duration (5h)");
        // forgotten max_ban_duration after the last ban ended
        book.expire(T0 + 17 * hour, &c);
        assert_eq!(one(book.ban(k, Reason::Failures(30), T0 + 17 * hour, &c)).offence, 1);
        assert_eq!(book.set().banned(key("192.0.2.2"), T0), None);
    }

    #[test]
    fn the_operator_bans_for_a_time_and_lifts_bans() {
        let c = config();
        let mut book = BanBook::default();
        let (k, hour) = (key("192.0.2.1"), 3600);
        let manual = |text: &str| Reason::Recorded(text.into());
        // no time given: the next offence's doubled ban_duration
        let first = book.impose(k, manual("spam run"), None, T0, &c).unwrap();
        assert_eq!(first, book.preview(key("192.0.2.9"), manual("spam run"), T0, &c), "what a first ban would be");
        assert_eq!((first.until, first.offence), (T0 + hour, 1));
        // a ban in force is replaced, shorter too, keeping its offence
        let shorter = book.impose(k, manual("less"), Some(T0 + 60), T0 + 1, &c).unwrap();
        assert_eq!((shorter.until, shorter.offence), (T0 + 60, 1));
        assert_eq!(book.set().banned(k, T0 + 59), Some(T0 + 60));
        assert_eq!(book.set().banned(k, T0 + 60), None);
        // lifted: refused no more, and its offences forgotten
        book.impose(k, manual("again"), None, T0 + 100, &c).unwrap();
        assert!(book.set().banned(k, T0 + 101).is_some());
        assert_eq!(book.lift(k, T0 + 101).map(|b| b.offence), Some(2));
        assert_eq!(book.set().banned(k, T0 + 102), None);
        assert_eq!(book.lift(k, T0 + 102), None, "nothing left to lift");
        assert_eq!(one(book.ban(k, Reason::Failures(30), T0 + 200, &c)).offence, 1, "forgiven");
        // lifting a ban that sits in the shared base rebuilds it
        for i in 0..=RECENT_MAX as u32 {
            book.impose(key(&std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string()), manual("x"), None, T0, &c);
        }
        let old = key("10.0.0.0");
        assert!(book.set().base.contains_key(&old) && book.set().banned(old, T0).is_some());
        assert!(book.lift(old, T0).is_some());
        assert_eq!(book.set().banned(old, T0), None);
        assert!(book.set().banned(key("10.0.0.1"), T0).is_some());
    }

    fn one(made: Vec<(AbuseKey, Ban)>) -> Ban {
        assert_eq!(made.len(), 1, "{made:?}");
        made[0].1.clone()
    }

    #[test]
    fn bans_in_one_prefix_escalate_to_the_prefix() {
        let c = config(); // escalate_after = 8, failure_window = 10m
        let mut book = BanBook::default();
        for i in 1..8 {
            assert_eq!(book.ban(key(&format!("192.0.2.{i}")), Reason::Failures(30), T0 + i, &c).len(), 1);
        }
        // a neighbour's ban and a ban long ago do not count towards 192.0.2.0/24
        book.ban(key("192.0.3.1"), Reason::Failures(30), T0, &c);
        assert_eq!(book.set().banned(key("192.0.2.200"), T0 + 10), None);
        let made = book.ban(key("192.0.2.8"), Reason::Failures(30), T0 + 8, &c);
        assert_eq!(made.len(), 2, "{made:?}");
        assert_eq!(made[1].0.to_string(), "192.0.2.0/24");
        assert_eq!(made[1].1.reason, Reason::Escalated(8));
        assert!(book.set().banned(key("192.0.2.200"), T0 + 10).is_some());
        assert_eq!(book.set().banned(key("192.0.3.2"), T0 + 10), None);
        // IPv6: addresses are banned per /64, escalated per /48
        let mut book = BanBook::default();
        for i in 0..8 {
            book.ban(key(&format!("2001:db8:1:{i}::1")), Reason::Failures(30), T0, &c);
        }
        assert!(book.set().banned(key("2001:db8:1:ff::1"), T0).is_some());
        assert_eq!(book.set().banned(key("2001:db8:2::1"), T0), None);
    }

    #[test]
    fn in_a_fleet_escalation_is_left_to_claim_and_counts_bans_taken_in() {
        let c = config(); // escalate_after = 8
        let mut book = BanBook::default();
        book.in_fleet();
        for i in 1..=4 {
            assert_eq!(book.ban(key(&format!("192.0.2.{i}")), Reason::Failures(30), T0, &c).len(), 1);
        }
        let theirs = || Ban { until: T0 + 600, reason: Reason::Failures(30), offence: 1, from: Some("b".into()) };
        for i in 5..=7 {
            assert!(book.adopt(key(&format!("192.0.2.{i}")), theirs(), T0, &c));
        }
        assert!(book.take_escalations().is_empty());
        assert!(!book.adopt(key("192.0.2.7"), theirs(), T0, &c), "in force already: not counted twice");
        assert!(book.adopt(key("192.0.2.8"), theirs(), T0, &c));
        assert_eq!(book.take_escalations(), [(key("192.0.2.8").escalation().unwrap(), 8)], "the eighth: due");
        assert_eq!(book.set().banned(key("192.0.2.200"), T0), None, "not banned here: the fleet claims it");
        assert!(book.take_escalations().is_empty(), "said once");
    }

    #[test]
    fn window_and_off_switch_of_escalation() {
        let mut c = config();
        let mut book = BanBook::default();
        for i in 0..8 {
            // one ban every two minutes: never eight within ten minutes
            book.ban(key(&format!("192.0.2.{i}")), Reason::Failures(30), T0 + i * 120, &c);
        }
        assert_eq!(book.set().banned(key("192.0.2.200"), T0 + 1000), None);
        c.escalate_after = 0;
        let mut book = BanBook::default();
        for i in 0..50 {
            book.ban(key(&format!("192.0.2.{i}")), Reason::Failures(30), T0, &c);
        }
        assert_eq!(book.set().banned(key("192.0.2.200"), T0), None);
    }

    #[test]
    fn many_bans_publish_cheaply_and_stay_visible() {
        let c = config();
        let mut book = BanBook::default();
        let mut c2 = c.clone();
        c2.escalate_after = 0;
        for i in 0..10_000u32 {
            book.ban(
                AbuseKey::new(PeerIp::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()), 64),
                Reason::Dropped,
                T0,
                &c2,
            );
        }
        let set = book.set();
        assert!(set.recent.len() <= RECENT_MAX && set.len() == 10_000);
        assert!(set.banned(AbuseKey::new(PeerIp::new("10.0.0.1".parse().unwrap()), 64), T0).is_some());
        assert!(set.banned(AbuseKey::new(PeerIp::new("10.0.39.15".parse().unwrap()), 64), T0).is_some());
        book.expire(T0 + 3600, &c);
        assert!(book.set().is_empty());
    }

    #[test]
    fn a_prefix_an_operator_banned_refuses_every_address_in_it() {
        let c = config();
        let mut book = BanBook::default();
        let net = |n: &str| AbuseKey::from_net(n.parse::<ipnet::IpNet>().unwrap().trunc());
        book.impose(net("198.51.0.0/16"), Reason::Recorded("a hosting range".into()), Some(T0 + 3600), T0, &c);
        book.impose(net("2001:db8::/32"), Reason::Recorded("a hosting range".into()), Some(T0 + 3600), T0, &c);
        let set = book.set();
        assert_eq!(set.banned(key("198.51.100.7"), T0), Some(T0 + 3600), "inside the /16");
        assert_eq!(set.banned(key("198.52.0.1"), T0), None, "outside");
        assert_eq!(set.banned(key("2001:db8:1:2::9"), T0), Some(T0 + 3600), "its /64 lies in the /32");
        assert_eq!(set.banned(key("2001:db9::1"), T0), None);
        assert_eq!(set.banned(key("198.51.100.7"), T0 + 3600), None, "ended");
        // lifted: the lengths are forgotten once the set is rebuilt
        book.lift(net("198.51.0.0/16"), T0);
        book.rebuild();
        assert_eq!(book.set().banned(key("198.51.100.7"), T0), None);
        assert!(!book.set().has_length(false, 16));
    }
}
