//! What the fleet writes in Redis and on its channel, and the arithmetic of fleet-wide
//! counts: no I/O here.
//!
//! Names, all under `[cluster] prefix` (say `mxgate`):
//!
//! ```text
//! mxgate:ban:192.0.2.7            a ban in force: its ban-file line, node= included;
//! mxgate:ban:2001:db8:1:2::/64      the key expires when the ban ends (EXAT)
//! mxgate:bans                     the channel: "ban <line>" and "unban <prefix> node=<n>"
//! mxgate:fails:<slot>             a hash per sub-window slot: address -> failures counted
//!                                 in it by the whole fleet; expires with the window
//! ```
//!
//! A line that does not read (garbage on the channel, a bad value in a key) is an error
//! for its reader to log and skip, never a panic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::abuse::file::parse_line;
use crate::abuse::{AbuseKey, Ban};
use crate::access::list::parse_net;
use crate::config::valid_node_name;
use crate::problem::BanLineError;

/// The longest message or key value read; a ban line is well under it.
pub const MAX_LINE: usize = 1024;

/// The names of the fleet's keys and channel.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `prefix` as `[cluster] prefix` validated it (no glob characters).
    pub fn new(prefix: &str) -> Self {
        Names { prefix: prefix.to_owned() }
    }

    pub fn channel(&self) -> String {
        format!("{}:bans", self.prefix)
    }

    pub fn ban_key(&self, key: AbuseKey) -> String {
        format!("{}:ban:{key}", self.prefix)
    }

    /// The SCAN pattern matching every ban key.
    pub fn ban_pattern(&self) -> String {
        format!("{}:ban:*", self.prefix)
    }

    /// The counts of sub-window `slot`.
    pub fn fails(&self, slot: u64) -> String {
        format!("{}:fails:{slot}", self.prefix)
    }
}

/// What a line on the channel (or a ban key's value) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A ban in force, `ban.from` naming the node that made it.
    Ban(AbuseKey, Ban),
    /// The operator on `node` lifted the ban on the key.
    Unban(AbuseKey, Arc<str>),
}

/// The channel's message for a ban: its line (which names the node).
pub fn ban_message(line: &str) -> String {
    format!("ban {line}")
}

pub fn unban_message(key: AbuseKey, node: &str) -> String {
    format!("unban {key} node={node}")
}

/// Reads a message from the channel.
pub fn parse_message(payload: &[u8]) -> Result<Message, BanLineError> {
    let text = readable(payload)?;
    match text.split_once(' ') {
        Some(("ban", line)) => parse_ban(line.as_bytes()).map(|(key, ban)| Message::Ban(key, ban)),
        Some(("unban", rest)) => {
            let (prefix, node) = rest.split_once(" node=").ok_or(BanLineError::NotAnUnban)?;
            let net = parse_net(prefix)?;
            if net.trunc() != net {
                return Err(BanLineError::UnbanHostBits(prefix.to_owned()));
            }
            if !valid_node_name(node) {
                return Err(BanLineError::NotANode(node.to_owned()));
            }
            Ok(Message::Unban(AbuseKey::from_net(net), node.into()))
        }
        _ => Err(BanLineError::UnknownMessage),
    }
}

/// Reads a ban key's value (or a `ban` message's line): a ban-file line naming its node.
pub fn parse_ban(value: &[u8]) -> Result<(AbuseKey, Ban), BanLineError> {
    let (key, ban) = parse_line(readable(value)?)?;
    if ban.from.is_none() {
        return Err(BanLineError::NoNode);
    }
    Ok((key, ban))
}

fn readable(bytes: &[u8]) -> Result<&str, BanLineError> {
    if bytes.len() > MAX_LINE {
        return Err(BanLineError::TooLong { len: bytes.len(), max: MAX_LINE });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| BanLineError::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(BanLineError::ControlCharacters);
    }
    Ok(text)
}

/// The fleet's counting window: sub-windows of an eighth of `failure_window` (as the
/// local counters), each a hash in Redis; a count is the sum over the window's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    sub_secs: u64,
    slots: u64,
}

impl Window {
    pub fn new(window: Duration) -> Self {
        let secs = window.as_secs().max(1);
        let sub_secs = (secs / 8).max(1);
        Window { sub_secs, slots: secs.div_ceil(sub_secs).clamp(1, 8) }
    }

    /// The sub-window `now` (seconds since the epoch) falls in.
    pub fn slot(&self, now: i64) -> u64 {
        now.max(0) as u64 / self.sub_secs
    }

    /// The window's other slots, newest first.
    pub fn earlier(&self, slot: u64) -> impl Iterator<Item = u64> {
        (1..self.slots).filter_map(move |back| slot.checked_sub(back))
    }

    /// How long a slot's hash is kept: as long as it counts, and one sub-window more.
    pub fn ttl_secs(&self) -> u64 {
        self.sub_secs * (self.slots + 1)
    }
}

/// The most addresses a batch holds; failures of further addresses are dropped (and
/// counted) until the next flush. Fixed memory whatever a flood does.
pub const MAX_BATCH: usize = 65_536;

/// Failures counted here since the last flush, per address.
#[derive(Debug, Default)]
pub struct Batch {
    counts: HashMap<AbuseKey, u32, ahash::RandomState>,
}

impl Batch {
    /// One more failure of `key`; false (not kept) when the batch is full.
    pub fn add(&mut self, key: AbuseKey) -> bool {
        if let Some(n) = self.counts.get_mut(&key) {
            *n = n.saturating_add(1);
            return true;
        }
        if self.counts.len() >= MAX_BATCH {
            return false;
        }
        self.counts.insert(key, 1);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The increments, leaving the batch empty.
    pub fn take(&mut self) -> Vec<(AbuseKey, u32)> {
        self.counts.drain().collect()
    }
}

/// The addresses of this flush whose fleet-wide count is at `threshold` or past it, with
/// their counts and whether this node's increment carried it there (the count without it
/// was below). `now_counts[i]` is the count in the current slot after `sent[i]`'s
/// increment, `earlier[s][i]` the count in the `s`th earlier slot. Counts from Redis are
/// added with saturation: whoever can write to Redis cannot make them wrap.
pub fn reached(sent: &[(AbuseKey, u32)], now_counts: &[u64], earlier: &[Vec<u64>], threshold: u32) -> Vec<Reached> {
    let threshold = u64::from(threshold);
    sent.iter()
        .enumerate()
        .filter_map(|(i, &(key, n))| {
            let total = earlier
                .iter()
                .map(|slot| slot.get(i).copied().unwrap_or(0))
                .fold(now_counts.get(i).copied().unwrap_or(0), u64::saturating_add);
            let before = total.saturating_sub(u64::from(n));
            (total >= threshold).then(|| Reached {
                key,
                total: u32::try_from(total).unwrap_or(u32::MAX),
                crossed: before < threshold,
            })
        })
        .collect()
}

/// An address whose fleet-wide count is at the threshold or past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reached {
    pub key: AbuseKey,
    pub total: u32,
    /// This node's increment carried the count to the threshold.
    pub crossed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abuse::Reason;
    use crate::abuse::file::line;
    use crate::peer::PeerIp;

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    #[test]
    fn bans_and_lifts_read_back() {
        let ban = Ban { until: 1_900_000_000, reason: Reason::Failures(9), offence: 2, from: Some("mx-a".into()) };
        let k = key("2001:db8:1:2::7");
        let message = ban_message(&line(k, &ban, ban.from.as_deref()));
        assert!(message.starts_with("ban 2001:db8:1:2::/64 until="), "{message}");
        let Message::Ban(got_key, got) = parse_message(message.as_bytes()).unwrap() else { panic!("a ban") };
        assert_eq!((got_key, got.until, got.offence, got.from.as_deref()), (k, ban.until, 2, Some("mx-a")));
        assert_eq!(got.reason.to_string(), "9 failures");
        let lift = unban_message(key("192.0.2.9"), "mx-c");
        assert_eq!(parse_message(lift.as_bytes()).unwrap(), Message::Unban(key("192.0.2.9"), "mx-c".into()));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let long = format!("ban 192.0.2.1 until=2030-01-01T00:00:00Z node=a reason=\"{}\"", "x".repeat(2000));
        for bad in [
            &b""[..],
            b"hello",
            b"ban",
            b"ban 192.0.2.1 until=2030-01-01T00:00:00Z",
            b"ban 192.0.2.1 until=2030-01-01T00:00:00Z node=bad/name",
            b"ban 192.0.2.300 until=2030-01-01T00:00:00Z node=a",
            b"ban 192.0.2.1 until=never node=a",
            b"unban 192.0.2.1",
            b"unban 192.0.2.1/24 node=a",
            b"unban 192.0.2.1 node=",
            b"ban 192.0.2.1 until=2030-01-01T00:00:00Z node=a\r\nQUIT",
            b"\xff\xfe",
            long.as_bytes(),
        ] {
            assert!(parse_message(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_ban(b"192.0.2.1 until=2030-01-01T00:00:00Z").is_err(), "a key's line names its node");
    }

    #[test]
    fn names_live_under_the_prefix() {
        let n = Names::new("edge");
        assert_eq!(n.ban_key(key("192.0.2.7")), "edge:ban:192.0.2.7");
        assert_eq!(n.ban_pattern(), "edge:ban:*");
        assert_eq!(n.channel(), "edge:bans");
        assert_eq!(n.fails(7), "edge:fails:7");
    }

    #[test]
    fn the_window_is_eight_slots_that_age_out() {
        let w = Window::new(Duration::from_secs(600));
        assert_eq!(w.slot(1_000_000), 1_000_000 / 75);
        assert_eq!(w.earlier(100).collect::<Vec<_>>(), [99, 98, 97, 96, 95, 94, 93]);
        assert_eq!(w.ttl_secs(), 675);
        let short = Window::new(Duration::from_secs(3));
        assert_eq!((short.slot(10), short.earlier(10).count()), (10, 2), "three one-second slots");
    }

    #[test]
    fn a_flush_reports_every_count_at_the_threshold_and_which_it_crossed() {
        let (a, b, c) = (key("192.0.2.1"), key("192.0.2.2"), key("192.0.2.3"));
        let sent = [(a, 2), (b, 1), (c, 1)];
        // a: 2 here + 3 elsewhere = 5 (was 3): crossed here; b: 6 before this one: past
        // it already (another node's flush crossed it, a shadow node's perhaps); c: 2 in all
        let now_counts = [4, 5, 2];
        let earlier = vec![vec![1, 2, 0]];
        assert_eq!(
            reached(&sent, &now_counts, &earlier, 5),
            [Reached { key: a, total: 5, crossed: true }, Reached { key: b, total: 7, crossed: false }]
        );
        assert_eq!(reached(&sent, &now_counts, &earlier, 8), []);
        // counts written into Redis by someone else cannot wrap the sum
        let huge = reached(&[(a, 1)], &[u64::MAX], &[vec![u64::MAX]], 5);
        assert_eq!(huge, [Reached { key: a, total: u32::MAX, crossed: false }]);
    }

    #[test]
    fn the_batch_holds_fixed_memory() {
        let mut batch = Batch::default();
        assert!(batch.add(key("192.0.2.1")) && batch.add(key("192.0.2.1")));
        for i in 0..MAX_BATCH as u32 {
            batch.add(AbuseKey::new(PeerIp::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()), 64));
        }
        assert!(!batch.add(key("198.51.100.1")), "full: a new address is dropped");
        assert!(batch.add(key("192.0.2.1")), "one already held still counts");
        let taken = batch.take();
        assert_eq!(taken.len(), MAX_BATCH);
        assert_eq!(taken.iter().find(|(k, _)| *k == key("192.0.2.1")).map(|(_, n)| *n), Some(3));
        assert!(batch.is_empty());
    }
}
