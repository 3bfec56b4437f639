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
    /// A ban is in force: the ban line. `by` is the ban's own key (the peer's, the
    /// prefix it escalated to, or an operator's prefix holding it), ending at `until`.
    Banned { by: AbuseKey, until: i64 },
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
    if !whitelisted && let Some((by, until)) = abuse.banned_by(key, now) {
        return Verdict::Refuse(Refusal::Banned { by, until });
    }
    let limits = (config.listen.max_connections, config.abuse.max_connections_per_ip);
    match abuse.connections.admit(key, whitelisted, limits.0, limits.1) {
        Ok(admission) => Verdict::Allow { whitelisted, admission },
        Err(limit) => Verdict::Refuse(Refusal::Limit(limit)),
    }
}

/// The line for each refusal, per worker thread. A line is borrowed until the next
/// call: a driver that hands it to the kernel copies it first.
pub struct RefusalLines {
    deny: DenyLine,
    ban: DenyLine,
}

impl Default for RefusalLines {
    fn default() -> Self {
        RefusalLines {
            deny: DenyLine::of(|s| &s.config.access.deny_reply),
            ban: DenyLine::of(|s| &s.config.abuse.ban_reply),
        }
    }
}

impl RefusalLines {
    pub fn line(&mut self, refusal: Refusal, snapshot: &Snapshot, now: UnixTime) -> &[u8] {
        match refusal {
            Refusal::Deny => self.deny.line(snapshot, now),
            Refusal::Banned { .. } => self.ban.line(snapshot, now),
            Refusal::Limit(Limit::PerAddress) => replies::TOO_MANY_FROM_ADDRESS,
            Refusal::Limit(Limit::Total) => replies::BUSY,
        }
    }
}

/// A rendered deny line, per worker thread: `{time}` changes once a second, so the line
/// is rendered once a second (or when a reload makes a new snapshot), not once a
/// connection, and a denied connection costs no allocation.
struct DenyLine {
    second: i64,
    generation: u64,
    len: usize,
    bytes: Box<[u8; MAX_REPLY_LEN]>,
    template: fn(&Snapshot) -> &ReplyTemplate,
}

impl DenyLine {
    fn of(template: fn(&Snapshot) -> &ReplyTemplate) -> Self {
        DenyLine { second: i64::MIN, generation: 0, len: 0, bytes: Box::new([0; MAX_REPLY_LEN]), template }
    }

    /// The line (CRLF included) for this snapshot at this time.
    fn line(&mut self, snapshot: &Snapshot, now: UnixTime) -> &[u8] {
        if self.second != now.0 || self.generation != snapshot.generation {
            self.len = (self.template)(snapshot).render(&snapshot.config.hostname, now, &mut self.bytes[..]);
            self.second = now.0;
            self.generation = snapshot.generation;
        }
        &self.bytes[..self.len]
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
        let mut lines = DenyLine::of(|s| &s.config.access.deny_reply);
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
