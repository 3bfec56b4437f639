//! What the workers did, for `mxgate stats`: each worker counts in cache lines of its own
//! (one writer: a plain load and store, no locked instruction, no line shared between
//! cores), and a request adds the workers' counts up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::abuse::Limit;
use crate::gate::{Refusal, Verdict};
use crate::histogram::{Hist, Histograms};
use crate::smtp::Outcome;

/// Everything counted, in the order `mxgate stats` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Refused by the access list.
    Denied,
    /// Refused by a ban.
    Banned,
    /// Refused by `max_connections_per_ip`.
    TooManyFromAddress,
    /// Refused by `listen.max_connections`.
    Busy,
    /// Allowed: given the banner and a session.
    Sessions,
    MessagesDelivered,
    MessagesRefused,
    /// Transactions ended without a reply to a message (RSET, QUIT, timeout...).
    TransactionsAbandoned,
    /// Replies counted as failures (5xx), whitelisted peers' included.
    Failures,
    /// Conversations dropped for too many failures.
    Dropped,
    /// Handed over by the kernel, but the peer was gone before it could be judged.
    Vanished,
    /// STARTTLS handshakes completed.
    TlsHandshakes,
    /// STARTTLS handshakes that failed (the connection closed).
    TlsFailed,
    /// A trusted balancer's connection without a valid PROXY header (malformed,
    /// oversized, truncated, late): closed without a banner.
    RefusedProxyHeader,
    /// Peers that passed screening (remembered for `pass_ttl`).
    ScreenPassed,
    /// Peers that talked before the greeting (the pregreet test).
    PregreetFailed,
    /// Peers refused by the DNS blocklists' score.
    DnsblBlocked,
    /// Blocklist lookups that got no answer within `dns_timeout` (scored 0).
    DnsTimeouts,
    /// Blocklist lookups answered with an error (SERVFAIL, truncated...), or not asked.
    DnsFailures,
    /// Allowed peers `[access] shadow_list` would have denied.
    ShadowWouldDeny,
    /// Bans `[abuse] shadow` withheld (at most one per address a minute).
    ShadowWouldBan,
}

impl Count {
    const ALL: [Count; 21] = [
        Count::Denied,
        Count::Banned,
        Count::TooManyFromAddress,
        Count::Busy,
        Count::Sessions,
        Count::MessagesDelivered,
        Count::MessagesRefused,
        Count::TransactionsAbandoned,
        Count::Failures,
        Count::Dropped,
        Count::Vanished,
        Count::TlsHandshakes,
        Count::TlsFailed,
        Count::RefusedProxyHeader,
        Count::ScreenPassed,
        Count::PregreetFailed,
        Count::DnsblBlocked,
        Count::DnsTimeouts,
        Count::DnsFailures,
        Count::ShadowWouldDeny,
        Count::ShadowWouldBan,
    ];

    fn name(self) -> &'static str {
        match self {
            Count::Denied => "refused_denied",
            Count::Banned => "refused_banned",
            Count::TooManyFromAddress => "refused_too_many_from_address",
            Count::Busy => "refused_busy",
            Count::Vanished => "gone_before_judged",
            Count::Sessions => "sessions",
            Count::MessagesDelivered => "messages_delivered",
            Count::MessagesRefused => "messages_refused",
            Count::TransactionsAbandoned => "transactions_abandoned",
            Count::Failures => "failures",
            Count::Dropped => "conversations_dropped",
            Count::TlsHandshakes => "tls_handshakes",
            Count::TlsFailed => "tls_handshakes_failed",
            Count::RefusedProxyHeader => "refused_proxy_header",
            Count::ScreenPassed => "screen_passed",
            Count::PregreetFailed => "pregreet_failed",
            Count::DnsblBlocked => "dnsbl_blocked",
            Count::DnsTimeouts => "dns_timeouts",
            Count::DnsFailures => "dns_failures",
            Count::ShadowWouldDeny => "shadow_would_deny",
            Count::ShadowWouldBan => "shadow_would_ban",
        }
    }
}

/// One worker's counts and histograms. Only its worker adds to them.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Counts {
    counts: [AtomicU64; Count::ALL.len()],
    pub hists: Histograms,
}

impl Counts {
    #[inline]
    pub fn add(&self, count: Count) {
        let c = &self.counts[count as usize];
        // one writer: no read-modify-write needed, and readers see whole values
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Counts the gate's decision on a new connection.
    #[inline]
    pub fn verdict(&self, verdict: &Verdict) {
        self.add(match verdict {
            Verdict::Allow { .. } => Count::Sessions,
            Verdict::Refuse(Refusal::Deny) => Count::Denied,
            Verdict::Refuse(Refusal::Banned { .. }) => Count::Banned,
            Verdict::Refuse(Refusal::Limit(Limit::PerAddress)) => Count::TooManyFromAddress,
            Verdict::Refuse(Refusal::Limit(Limit::Total)) => Count::Busy,
        });
    }

    /// Counts how a transaction ended.
    pub fn transaction(&self, outcome: Outcome) {
        self.add(match outcome {
            Outcome::Delivered => Count::MessagesDelivered,
            Outcome::Undelivered(_) => Count::MessagesRefused,
            Outcome::Abandoned(_) => Count::TransactionsAbandoned,
        });
    }
}

/// Every worker's counts.
#[derive(Debug, Default)]
pub struct Stats(Mutex<Vec<Arc<Counts>>>);

impl Stats {
    /// Counts for a new worker.
    pub fn worker(&self) -> Arc<Counts> {
        let counts = Arc::<Counts>::default();
        self.workers().push(Arc::clone(&counts));
        counts
    }

    /// `name value` for each count, summed over the workers; the connections accepted
    /// first (every one is refused, given a session, or gone before it was judged; a
    /// balancer's may also be refused for its PROXY header).
    pub fn lines(&self) -> Vec<(&'static str, u64)> {
        let workers = self.workers();
        let sums: Vec<(&'static str, u64)> = Count::ALL
            .iter()
            .map(|&c| (c.name(), workers.iter().map(|w| w.counts[c as usize].load(Ordering::Relaxed)).sum()))
            .collect();
        let judged: u64 = sums[..=Count::Sessions as usize].iter().map(|(_, n)| n).sum();
        let accepted = judged + sums[Count::Vanished as usize].1 + sums[Count::RefusedProxyHeader as usize].1;
        std::iter::once(("connections_accepted", accepted)).chain(sums).collect()
    }

    /// Every histogram's exposition, summed over the workers.
    pub fn histograms(&self, out: &mut String) {
        let workers = self.workers();
        for hist in Hist::ALL {
            crate::histogram::expose(hist, workers.iter().map(|w| &w.hists), out);
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Counts>>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_counts_add_up() {
        let stats = Stats::default();
        let (a, b) = (stats.worker(), stats.worker());
        a.add(Count::Denied);
        b.add(Count::Denied);
        b.add(Count::Sessions);
        a.transaction(Outcome::Delivered);
        let lines = stats.lines();
        let get = |name| lines.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        assert_eq!(get("connections_accepted"), Some(3));
        assert_eq!(get("refused_denied"), Some(2));
        assert_eq!(get("sessions"), Some(1));
        assert_eq!(get("messages_delivered"), Some(1));
        assert_eq!(get("refused_banned"), Some(0));
        assert_eq!(lines.len(), Count::ALL.len() + 1);
    }
}
