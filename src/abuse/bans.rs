//! Bans: the addresses (and IPv6 prefixes) refused at the gate until a time.
//!
//! Workers read the current [`BanSet`] through an `ArcSwap` (one pointer load and a hash
//! lookup per connection); one keeper thread ([`super::Abuse`]) owns the [`BanBook`], applies
//! the bans workers ask for in batches, and publishes a new set after each batch.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::AbuseKey;
use crate::config::Abuse as AbuseConfig;

/// Most bans held at once; past it a new ban is refused with a warning (a flood of
/// distinct addresses is for prefix escalation, not for unbounded memory).
pub const MAX_BANS: usize = 1_000_000;

/// Why an address was banned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `failures` within `failure_window` reached `failure_threshold`.
    Failures(u32),
    /// A conversation passed a failure limit and `ban_on_drop` is set.
    Dropped,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Failures(n) => write!(f, "{n} failures"),
            Reason::Dropped => f.write_str("dropped for too many errors"),
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
}

/// What the gate reads: the keys banned and until when.
#[derive(Clone, Debug, Default)]
pub struct BanSet {
    until: HashMap<AbuseKey, i64, ahash::RandomState>,
}

impl BanSet {
    /// When the ban on `key` ends, if one is in force at `now`.
    #[inline]
    pub fn banned(&self, key: AbuseKey, now: i64) -> Option<i64> {
        if self.until.is_empty() {
            return None;
        }
        self.until.get(&key).copied().filter(|&until| until > now)
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

/// The keeper's record: bans in force and past offences.
#[derive(Debug, Default)]
pub struct BanBook {
    bans: HashMap<AbuseKey, Ban, ahash::RandomState>,
    /// Offences per key and when each key's last ban ended; remembered for
    /// `max_ban_duration` after that, so a repeat offender's ban doubles.
    offences: HashMap<AbuseKey, (u32, i64), ahash::RandomState>,
}

impl BanBook {
    /// Bans `key` at `now`: `ban_duration`, doubled for each remembered offence, up to
    /// `max_ban_duration`. `None` when it is banned already or the book is full.
    pub fn ban(&mut self, key: AbuseKey, reason: Reason, now: i64, config: &AbuseConfig) -> Option<Ban> {
        if self.bans.get(&key).is_some_and(|b| b.until > now) {
            return None;
        }
        if self.bans.len() >= MAX_BANS {
            self.expire(now, config);
            if self.bans.len() >= MAX_BANS {
                tracing::warn!("{MAX_BANS} bans in force: not banning {key}");
                return None;
            }
        }
        let remember = secs(config.max_ban_duration);
        let offence = match self.offences.get(&key) {
            Some(&(n, ended)) if now < ended.saturating_add(remember) => n + 1,
            _ => 1,
        };
        let doubled = secs(config.ban_duration).saturating_mul(1i64 << (offence - 1).min(40));
        let until = now.saturating_add(doubled.min(remember));
        self.offences.insert(key, (offence, until));
        let ban = Ban { until, reason, offence };
        self.bans.insert(key, ban.clone());
        Some(ban)
    }

    /// Drops bans that ended and offences no longer remembered.
    pub fn expire(&mut self, now: i64, config: &AbuseConfig) {
        self.bans.retain(|_, b| b.until > now);
        let remember = secs(config.max_ban_duration);
        self.offences.retain(|_, &mut (_, ended)| now < ended.saturating_add(remember));
    }

    pub fn get(&self, key: AbuseKey) -> Option<&Ban> {
        self.bans.get(&key)
    }

    /// The set the gate reads.
    pub fn set(&self) -> BanSet {
        BanSet { until: self.bans.iter().map(|(k, b)| (*k, b.until)).collect() }
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gate::PeerIp;
    use std::path::Path;

    const T0: i64 = 1_795_894_760;

    fn config() -> AbuseConfig {
        let text = "[abuse]\nban_duration = \"1h\"\nmax_ban_duration = \"5h\"\n";
        Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap().abuse
    }

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    #[test]
    fn a_repeat_offender_is_banned_twice_as_long_up_to_the_most() {
        let c = config();
        let mut book = BanBook::default();
        let k = key("192.0.2.1");
        let hour = 3600;
        let first = book.ban(k, Reason::Failures(30), T0, &c).unwrap();
        assert_eq!((first.until, first.offence), (T0 + hour, 1));
        assert_eq!(book.ban(k, Reason::Dropped, T0 + 10, &c), None, "banned already");
        assert_eq!(book.set().banned(k, T0 + hour - 1), Some(T0 + hour));
        assert_eq!(book.set().banned(k, T0 + hour), None, "expired");
        let second = book.ban(k, Reason::Failures(30), T0 + hour, &c).unwrap();
        assert_eq!(second.until, T0 + 3 * hour, "doubled");
        let third = book.ban(k, Reason::Failures(30), T0 + 3 * hour, &c).unwrap();
        assert_eq!(third.until, T0 + 7 * hour, "doubled again");
        let fourth = book.ban(k, Reason::Failures(30), T0 + 7 * hour, &c).unwrap();
        assert_eq!(fourth.until, T0 + 12 * hour, "8h capped at max_ban_duration (5h)");
        // forgotten max_ban_duration after the last ban ended
        book.expire(T0 + 17 * hour, &c);
        assert_eq!(book.ban(k, Reason::Failures(30), T0 + 17 * hour, &c).unwrap().offence, 1);
        assert_eq!(book.set().banned(key("192.0.2.2"), T0), None);
    }
}
