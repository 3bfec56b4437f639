//! What the kernel's sets should hold, kept in step with the bans (sans-IO: events in,
//! element changes out; `kernel` sends them).
//!
//! ```text
//!  refused(key) ──► counted per ban key within a minute ──► after_refusals reached ─┐
//!  made(key)    ──► after_refusals = 0, or a key inside whose end moved ───────────┤
//!                                                                                   ▼
//!                        promote: the key's addresses less the excluded (whitelist,
//!                        balancers); covered by a range inside already: nothing; covering
//!                        ranges inside: they leave ─► pending adds (timeout: the ban's end)
//!  lifted(key)  ──► inside? its elements ─► pending removals
//!  take(now)    ──► the pending changes, removals first; `inside` records them
//! ```
//!
//! Ranges in an interval set must not overlap (the kernel refuses the batch): the keys
//! inside an interval set are prefixes none of which holds another. A key that a range
//! inside covers stays out (the range refuses it already; should the range end first,
//! the key's refusals bring it in again), and a key covering ranges inside takes their
//! place. Addresses (the hash set) may sit inside a range.
//!
//! Memory is bounded: the refusal counts hold at most [`MAX_COUNTED`] keys (past it a new
//! key is not counted: it stays refused in user space), and the keys inside at most the
//! ban book's own bound.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::netlink::Elem;
use crate::abuse::AbuseKey;
use crate::abuse::bans::MAX_BANS;

/// Banned keys whose refusals are counted at once; past this, a new key waits until
/// counts older than a minute are dropped.
pub const MAX_COUNTED: usize = 100_000;

/// The window refusals are counted in.
pub const WINDOW_MS: i64 = 60_000;

/// Changes for the kernel, in the order to apply: removals, then additions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub remove: Vec<Elem>,
    /// Each element with its timeout.
    pub add: Vec<(Elem, Duration)>,
    /// When each promotion among the additions was decided (for its latency).
    pub since: Vec<Instant>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// The address ranges no kernel element may cover: whitelisted addresses (they are
/// never refused) and trusted balancers (the kernel sees their address, not the
/// peer's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Excluded {
    /// Every address: the whitelist allows by default.
    pub everything: bool,
    /// The prefixes (any action of the whitelist's: a `deny` entry inside an allowed
    /// prefix is left out too, which only keeps more in user space).
    pub nets: Vec<IpNet>,
}

/// The keeper's state.
#[derive(Debug, Default)]
pub struct Keeper {
    after_refusals: u32,
    excluded: Excluded,
    /// Refusals per ban key: the count, and when its minute began (ms since the epoch).
    counted: HashMap<AbuseKey, (u32, i64), ahash::RandomState>,
    /// Keys with elements in the kernel, and their bans' ends (seconds since the epoch:
    /// the elements' timeouts end with them). The elements are worked out again when
    /// they leave (the exclusions they were cut by are those in force: new ones rebuild).
    inside: HashMap<AbuseKey, i64, ahash::RandomState>,
    /// Elements the keys inside have.
    elements: usize,
    /// The range keys inside, by family and first address (none holds another).
    ranges: BTreeMap<(bool, u128), AbuseKey>,
    pending: Changes,
}

/// A prefix as a closed range of addresses (IPv4 as numbers below 2^32), and its family.
fn span(net: IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (false, u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast()))),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

impl Keeper {
    pub fn new(after_refusals: u32, excluded: Excluded) -> Self {
        Keeper { after_refusals, excluded, ..Keeper::default() }
    }

    /// A reload's setting.
    pub fn set_after_refusals(&mut self, n: u32) {
        self.after_refusals = n;
    }

    /// Keys with elements inside, and elements inside.
    pub fn len(&self) -> (usize, usize) {
        (self.inside.len(), self.elements)
    }

    pub fn is_empty(&self) -> bool {
        self.inside.is_empty()
    }

    /// Keys counted (at most [`MAX_COUNTED`]).
    pub fn counted(&self) -> usize {
        self.counted.len()
    }

    /// A peer under the ban on `key` (ending at `until`) was refused at `now_ms`; `at`
    /// is when, for the latency of what follows.
    pub fn refused(&mut self, key: AbuseKey, until: i64, now_ms: i64, at: Instant) {
        if self.inside.get(&key) == Some(&until) {
            return; // a connection that was on its way before the kernel took the key
        }
        if !self.counted.contains_key(&key) && self.counted.len() >= MAX_COUNTED {
            self.counted.retain(|_, (_, began)| now_ms.saturating_sub(*began) < WINDOW_MS);
            if self.counted.len() >= MAX_COUNTED {
                return; // refused in user space, as without the kernel
            }
        }
        let entry = self.counted.entry(key).or_insert((0, now_ms));
        if now_ms.saturating_sub(entry.1) >= WINDOW_MS {
            *entry = (0, now_ms);
        }
        entry.0 = entry.0.saturating_add(1);
        if entry.0 >= self.after_refusals {
            self.counted.remove(&key);
            self.promote(key, until, now_ms, at);
        }
    }

    /// A ban was made (here, by the operator, or adopted from the fleet): in at once with
    /// `after_refusals = 0`, and a key inside follows its new end.
    pub fn made(&mut self, key: AbuseKey, until: i64, now_ms: i64, at: Instant) {
        let moved = self.inside.get(&key).is_some_and(|&u| u != until);
        if self.after_refusals == 0 || moved {
            self.promote(key, until, now_ms, at);
        }
    }

    /// A ban was lifted: its elements leave.
    pub fn lifted(&mut self, key: AbuseKey, now_ms: i64) {
        self.counted.remove(&key);
        self.remove(key, now_ms);
    }

    /// Puts `key` in (or follows its new end).
    fn promote(&mut self, key: AbuseKey, until: i64, now_ms: i64, at: Instant) {
        if until.saturating_mul(1000) <= now_ms {
            return;
        }
        if self.inside.contains_key(&key) {
            self.remove(key, now_ms);
        }
        if self.covered(key) {
            return;
        }
        let elems = self.elements(key);
        if elems.is_empty() || self.inside.len() >= MAX_BANS {
            return;
        }
        if !matches!(elems[..], [Elem::Addr4(_)]) {
            // ranges this key holds leave: it takes their place
            let (v6, first, last) = span(key.net());
            let held: Vec<AbuseKey> = self.ranges.range((v6, first)..=(v6, last)).map(|(_, k)| *k).collect();
            for k in held {
                self.remove(k, now_ms);
            }
            self.ranges.insert((v6, first), key);
        }
        let timeout = Duration::from_millis(u64::try_from(until.saturating_mul(1000) - now_ms).unwrap_or(1));
        self.pending.add.extend(elems.iter().map(|&e| (e, timeout)));
        self.pending.since.push(at);
        self.elements += elems.len();
        self.inside.insert(key, until);
    }

    /// A range inside holds `key` already (a range key's own entry is not counted).
    fn covered(&self, key: AbuseKey) -> bool {
        let (v6, first, last) = span(key.net());
        self.ranges
            .range(..=(v6, first))
            .next_back()
            .is_some_and(|(&(f6, _), k)| f6 == v6 && *k != key && span(k.net()).2 >= last)
    }

    /// Takes `key`'s elements out (those whose timeout has not run out: the kernel
    /// removed those itself, and refuses a removal of what it does not hold).
    fn remove(&mut self, key: AbuseKey, now_ms: i64) {
        let Some(until) = self.inside.remove(&key) else { return };
        let (v6, first, _) = span(key.net());
        if self.ranges.get(&(v6, first)) == Some(&key) {
            self.ranges.remove(&(v6, first));
        }
        let elems = self.elements(key);
        self.elements = self.elements.saturating_sub(elems.len());
        // a second's margin: an element about to time out is left to it
        if until.saturating_mul(1000) > now_ms.saturating_add(1000) {
            // an addition still pending is withdrawn instead
            let pending_before = self.pending.add.len();
            self.pending.add.retain(|(e, _)| !elems.contains(e));
            if self.pending.add.len() == pending_before {
                self.pending.remove.extend(elems);
            }
        }
    }

    /// `key`'s addresses less the excluded, as elements.
    fn elements(&self, key: AbuseKey) -> Vec<Elem> {
        if self.excluded.everything {
            return Vec::new();
        }
        let (v6, first, last) = span(key.net());
        let mut holes: Vec<(u128, u128)> = self
            .excluded
            .nets
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .map(|n| span(*n))
            .filter(|&(_, f, l)| f <= last && l >= first)
            .map(|(_, f, l)| (f.max(first), l.min(last)))
            .collect();
        holes.sort_unstable();
        let mut out = Vec::new();
        let mut at = Some(first);
        for (f, l) in holes {
            if let Some(a) = at {
                if a < f {
                    out.push((a, f - 1));
                }
                if l >= a {
                    at = l.checked_add(1).filter(|&n| n <= last);
                }
            }
        }
        if let Some(a) = at {
            out.push((a, last));
        }
        let end = |l: u128, max: u128| (l < max).then(|| l + 1);
        out.into_iter()
            .map(|(f, l)| match (v6, u32::try_from(f), u32::try_from(l)) {
                (false, Ok(f), Ok(l)) if f == l && key.net().prefix_len() == 32 => Elem::Addr4(f),
                (false, Ok(f), Ok(l)) => Elem::Range4(f, l.checked_add(1)),
                _ => Elem::Range6(f, end(l, u128::MAX)),
            })
            .collect()
    }

    /// The changes decided since the last call.
    pub fn take(&mut self) -> Changes {
        std::mem::take(&mut self.pending)
    }

    /// Keys whose bans ended: forgotten (the kernel timed their elements out).
    pub fn expire(&mut self, now_ms: i64) {
        let ended: Vec<AbuseKey> =
            self.inside.iter().filter(|(_, u)| u.saturating_mul(1000) <= now_ms).map(|(k, _)| *k).collect();
        for key in ended {
            self.remove(key, now_ms);
        }
        self.counted.retain(|_, (_, began)| now_ms.saturating_sub(*began) < WINDOW_MS);
    }

    /// New exclusions (a reload): every key inside is worked out again; what to load
    /// into fresh sets is returned (the caller empties them first), and nothing is
    /// pending.
    pub fn rebuild(&mut self, excluded: Excluded, now_ms: i64) -> Vec<(Elem, Duration)> {
        self.excluded = excluded;
        self.pending = Changes::default();
        let mut keys: Vec<(AbuseKey, i64)> = self.inside.drain().collect();
        self.ranges.clear();
        self.elements = 0;
        let now = Instant::now();
        // shortest prefixes first: a covered key then stays out
        keys.sort_by_key(|(k, _)| k.net().prefix_len());
        for (key, until) in keys {
            self.promote(key, until, now_ms, now);
        }
        self.take().add
    }

    /// Whether these are the exclusions in force.
    pub fn excludes_as(&self, excluded: &Excluded) -> bool {
        self.excluded == *excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> AbuseKey {
        AbuseKey::from_net(s.parse().unwrap())
    }
    const NOW: i64 = 1_800_000_000_000;
    const UNTIL: i64 = 1_800_003_600;

    fn elem(s: &str) -> Elem {
        Elem::of(s.parse().unwrap())
    }

    #[test]
    fn a_key_enters_after_its_refusals_within_a_minute() {
        let at = Instant::now();
        let mut k = Keeper::new(3, Excluded::default());
        let a = key("192.0.2.7/32");
        k.refused(a, UNTIL, NOW, at);
        k.refused(a, UNTIL, NOW + 1000, at);
        assert!(k.take().is_empty(), "two refusals: still refused in user space");
        // a minute later the count starts again
        k.refused(a, UNTIL, NOW + WINDOW_MS + 1000, at);
        k.refused(a, UNTIL, NOW + WINDOW_MS + 2000, at);
        assert!(k.take().is_empty());
        k.refused(a, UNTIL, NOW + WINDOW_MS + 3000, at);
        let c = k.take();
        assert_eq!(c.add.len(), 1);
        assert_eq!(c.add[0].0, Elem::Addr4(0xc000_0207));
        let left = Duration::from_millis((UNTIL * 1000 - NOW - WINDOW_MS - 3000) as u64);
        assert_eq!(c.add[0].1, left, "the timeout is the ban's time left");
        // later refusals (connections already on their way) change nothing
        k.refused(a, UNTIL, NOW + WINDOW_MS + 4000, at);
        assert!(k.take().is_empty());
        assert_eq!(k.len(), (1, 1));
    }

    #[test]
    fn made_enters_at_once_with_zero_and_lifts_and_new_ends_follow() {
        let at = Instant::now();
        let mut k = Keeper::new(0, Excluded::default());
        let a = key("192.0.2.7/32");
        k.made(a, UNTIL, NOW, at);
        assert_eq!(k.take().add.len(), 1);
        k.made(a, UNTIL + 60, NOW, at);
        let c = k.take();
        assert_eq!(c.remove, [elem("192.0.2.7/32")], "the old timeout removed, then the new added");
        assert_eq!(c.add[0].1, Duration::from_secs(3660));
        k.lifted(a, NOW);
        assert_eq!(k.take().remove, [elem("192.0.2.7/32")]);
        assert!(k.is_empty());
        // with refusals counted, a ban made is not in until refused
        let mut k = Keeper::new(3, Excluded::default());
        k.made(a, UNTIL, NOW, at);
        assert!(k.take().is_empty());
        // a ban that ended, or an element about to time out, is not touched
        k.refused(a, NOW / 1000, NOW, at);
        assert!(k.take().is_empty());
    }

    #[test]
    fn a_lift_before_the_kernel_heard_withdraws_the_addition() {
        let mut k = Keeper::new(0, Excluded::default());
        k.made(key("192.0.2.7/32"), UNTIL, NOW, Instant::now());
        k.lifted(key("192.0.2.7/32"), NOW);
        assert!(k.take().is_empty(), "nothing sent: nothing to remove");
    }

    #[test]
    fn ranges_never_overlap_a_covering_prefix_takes_the_place_of_those_it_holds() {
        let at = Instant::now();
        let mut k = Keeper::new(0, Excluded::default());
        k.made(key("2001:db8:1:2::/64"), UNTIL, NOW, at);
        k.made(key("2001:db8:1:3::/64"), UNTIL, NOW, at);
        k.made(key("192.0.2.7/32"), UNTIL, NOW, at);
        k.take();
        k.made(key("2001:db8:1::/48"), UNTIL, NOW, at);
        let c = k.take();
        assert_eq!(c.remove, [elem("2001:db8:1:2::/64"), elem("2001:db8:1:3::/64")], "the /64s inside leave");
        assert_eq!(c.add.iter().map(|a| a.0).collect::<Vec<_>>(), [elem("2001:db8:1::/48")]);
        // a key the range covers stays out; an address may sit in a range
        k.made(key("2001:db8:1:4::/64"), UNTIL, NOW, at);
        assert!(k.take().is_empty());
        k.made(key("192.0.2.0/24"), UNTIL, NOW, at);
        assert_eq!(k.take().add.len(), 1, "the /24 beside the address it holds: another set");
        assert_eq!(k.len(), (3, 3));
    }

    #[test]
    fn whitelisted_addresses_and_balancers_never_enter() {
        let at = Instant::now();
        let excluded = Excluded {
            everything: false,
            nets: vec![
                "192.0.2.9/32".parse().unwrap(),
                "192.0.2.128/25".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
        };
        let mut k = Keeper::new(0, excluded);
        k.made(key("192.0.2.0/24"), UNTIL, NOW, at);
        let add: Vec<Elem> = k.take().add.into_iter().map(|a| a.0).collect();
        assert_eq!(add, [Elem::Range4(0xc000_0200, Some(0xc000_0209)), Elem::Range4(0xc000_020a, Some(0xc000_0280))]);
        k.made(key("10.1.2.3/32"), UNTIL, NOW, at);
        k.made(key("10.0.0.0/16"), UNTIL, NOW, at);
        assert!(k.take().is_empty(), "wholly excluded");
        let mut k = Keeper::new(0, Excluded { everything: true, nets: Vec::new() });
        k.made(key("192.0.2.7/32"), UNTIL, NOW, at);
        assert!(k.take().is_empty(), "a whitelist allowing by default: nothing enters");
        // a reload that whitelists an address inside works every key out again
        let mut k = Keeper::new(0, Excluded::default());
        k.made(key("192.0.2.0/24"), UNTIL, NOW, at);
        k.made(key("198.51.100.1/32"), UNTIL, NOW, at);
        k.take();
        let nets = vec!["198.51.100.1/32".parse().unwrap(), "192.0.2.255/32".parse().unwrap()];
        let fresh = k.rebuild(Excluded { everything: false, nets }, NOW);
        assert_eq!(fresh.iter().map(|a| a.0).collect::<Vec<_>>(), [Elem::Range4(0xc000_0200, Some(0xc000_02ff))]);
        assert_eq!(k.len(), (1, 1));
    }

    #[test]
    fn counts_are_bounded_and_ended_bans_forgotten() {
        let at = Instant::now();
        let mut k = Keeper::new(5, Excluded::default());
        for i in 0..MAX_COUNTED as u32 + 10 {
            k.refused(AbuseKey::from_net(IpNet::from(std::net::IpAddr::from(i.to_be_bytes()))), UNTIL, NOW, at);
        }
        assert_eq!(k.counted(), MAX_COUNTED, "past the bound a new key is not counted");
        k.expire(NOW + WINDOW_MS);
        assert_eq!(k.counted(), 0, "counts older than a minute dropped");
        let mut k = Keeper::new(0, Excluded::default());
        k.made(key("192.0.2.7/32"), UNTIL, NOW, at);
        k.take();
        k.expire(UNTIL * 1000);
        assert!(k.is_empty());
        assert!(k.take().is_empty(), "the kernel timed it out itself: no removal");
    }
}
