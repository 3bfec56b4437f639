//! The gate: the decision made on a peer's address before anything else exists for it
//! (no buffer, no session, no banner), and the one line a denied peer gets.

use crate::abuse::{Abuse, AbuseKey, Admission, Limit};
use crate::access::Action;
use crate::datetime::UnixTime;
pub use crate::peer::PeerIp;
use crate::smtp::replies;
use crate::snapshot::Snapshot;
use crate::template::{MAX_REPLY_LEN, ReplyTemplate};

/// Judges a peer by the access list.
#[inline]
pub fn judge(snapshot: &Snapshot, peer: PeerIp) -> Action {
    snapshot.access.action(peer.ip())
}

/// The gate's decision on a new connection.
#[derive(Debug)]
pub enum Verdict {
    /// Serve it, holding its place in the connection counts; a whitelisted peer is never
    /// counted or banned.
    Allow { whitelisted: bool, admission: Admission },
    /// One line, then close.
    Refuse(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The access list denies it: the deny line.
    Deny,
    /// A ban is in force: the ban line.
    Banned,
    /// A concurrency limit: its 421 line.
    Limit(Limit),
}

/// Judges a peer by the access list, then by the bans and the concurrency limits (which
/// the whitelist overrides).
#[inline]
pub fn admit(snapshot: &Snapshot, abuse: &Abuse, peer: PeerIp, now: UnixTime) -> Verdict {
    if judge(snapshot, peer) == Action::Deny {
        return Verdict::Refuse(Refusal::Deny);
    }
    let config = &snapshot.config;
    let whitelisted = snapshot.whitelist.action(peer.ip()) == Action::Allow;
    let key = AbuseKey::new(peer, config.abuse.ipv6_prefix);
    if !whitelisted && abuse.banned(key, now).is_some() {
        return Verdict::Refuse(Refusal::Banned);
    }
    let limits = (config.listen.max_connections, config.abuse.max_connections_per_ip);
    match abuse.connections.admit(key, whitelisted, limits.0, limits.1) {
        Ok(admission) => Verdict::Allow { whitelisted, admission },
        Err(limit) => Verdict::Refuse(Refusal::Limit(limit)),
    }
}

/// The line for each refusal, per worker thread; every line lives as long as the
/// process (for a pointer handed to the kernel).
pub struct RefusalLines {
    deny: DenyLines,
    ban: DenyLines,
}

impl Default for RefusalLines {
    fn default() -> Self {
        RefusalLines {
            deny: DenyLines::of(|s| &s.config.access.deny_reply),
            ban: DenyLines::of(|s| &s.config.abuse.ban_reply),
        }
    }
}

impl RefusalLines {
    pub fn line(&mut self, refusal: Refusal, snapshot: &Snapshot, now: UnixTime) -> &'static [u8] {
        match refusal {
            Refusal::Deny => self.deny.line(snapshot, now),
            Refusal::Banned => self.ban.line(snapshot, now),
            Refusal::Limit(Limit::PerAddress) => replies::TOO_MANY_FROM_ADDRESS,
            Refusal::Limit(Limit::Total) => replies::BUSY,
        }
    }
}

/// Slots of [`DenyLines`]; a slot is rewritten at most once every this many seconds.
const SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct Slot {
    second: i64,
    generation: u64,
    len: usize,
    bytes: [u8; MAX_REPLY_LEN],
}

/// The rendered deny line, per worker thread: `{time}` changes once a second, so the
/// line is rendered once a second, not once a connection, and a denied connection
/// costs no allocation.
///
/// Lines live in `SLOTS` slots chosen by the second, in memory that is never freed, so
/// that an io_uring send may still read a line after the call that asked for it: a slot
/// is only rewritten `SLOTS` seconds later, and a send of one short line on a fresh
/// connection completes when it is submitted (the socket's send buffer is empty).
struct DenyLines {
    slots: &'static mut [Slot; SLOTS],
    template: fn(&Snapshot) -> &ReplyTemplate,
}

impl DenyLines {
    fn of(template: fn(&Snapshot) -> &ReplyTemplate) -> Self {
        let empty = Slot { second: i64::MIN, generation: 0, len: 0, bytes: [0; MAX_REPLY_LEN] };
        // Two leaks per worker thread, bounded by the number of workers ever started.
        DenyLines { slots: Box::leak(Box::new([empty; SLOTS])), template }
    }

    /// The line (CRLF included) for this snapshot at this time. Its memory stays
    /// valid for the life of the process (for a pointer handed to the kernel).
    pub fn line(&mut self, snapshot: &Snapshot, now: UnixTime) -> &'static [u8] {
        let slot = &mut self.slots[now.0.rem_euclid(SLOTS as i64) as usize];
        if slot.second != now.0 || slot.generation != snapshot.generation {
            let deny = (self.template)(snapshot);
            slot.len = deny.render(&snapshot.config.hostname, now, &mut slot.bytes);
            slot.second = now.0;
            slot.generation = snapshot.generation;
        }
        let line = &slot.bytes[..slot.len];
        // SAFETY: the slots are leaked, never freed; a caller hands the line to a send at
        // once (a pointer for the kernel, as the type's doc says) and keeps it no longer.
        unsafe { std::slice::from_raw_parts(line.as_ptr(), line.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn deny_line_follows_the_second_and_the_snapshot() {
        let config =
            |host: &str| Config::parse(&format!("hostname = \"{host}\""), Path::new("t"), Path::new(".")).unwrap();
        let a = Snapshot::without_lists(config("mx.a.example"));
        let b = Snapshot::without_lists(config("mx.b.example"));
        let mut lines = DenyLines::of(|s| &s.config.access.deny_reply);
        let t = UnixTime(1_795_894_760);
        assert_eq!(
            lines.line(&a, t),
            b"530 5.7.1 mx.a.example ESMTP denied access at Sat, 28 Nov 2026 19:39:20 +0000\r\n"
        );
        assert_eq!(
            lines.line(&a, UnixTime(t.0 + 1)),
            b"530 5.7.1 mx.a.example ESMTP denied access at Sat, 28 Nov 2026 19:39:21 +0000\r\n"
        );
        assert_eq!(
            lines.line(&b, UnixTime(t.0 + 1)),
            b"530 5.7.1 mx.b.example ESMTP denied access at Sat, 28 Nov 2026 19:39:21 +0000\r\n"
        );
    }
}
