//! DNS blocklists, sans-IO: the names to ask, a small resolver client for one worker, its
//! cache, and the score of the answers. Messages are encoded and decoded with
//! hickory-proto; nothing here reads a socket or a clock.
//!
//! ```text
//!   lookup(token, ip, zone) ─┬─ cached ─────────────────────────────► Some(answer) at once
//!                            └─ a query (random id) ─► poll_transmit ─► (server, datagram)
//!   handle_datagram(from, bytes): id, server and question must match a query in flight,
//!       else it is ignored (a forged or late answer) ─► poll_event: (token, answer), cached
//!   handle_timeout(now): queries past dns_timeout ─► poll_event: (token, TimedOut)
//! ```
//!
//! Answers: NXDOMAIN (not listed), the A records of a listing (with their TTL), or a
//! failure (SERVFAIL and the like, a truncated answer, no answer in time): a failure
//! scores 0 and is counted, never cached. A truncated UDP answer is not retried over TCP:
//! a DNSBL answer is one or two A records, so a truncated one means a broken server, and
//! it is counted as a failure like a timeout.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Queries in flight at once on one worker; past it a lookup fails at once (counted).
pub const MAX_IN_FLIGHT: usize = 4096;
/// Cache slots per worker (each holds one zone's answer for one address).
pub const CACHE_SLOTS: usize = 16384;
/// The longest an answer is kept, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long "not listed" is kept (NXDOMAIN carries no TTL of its own here).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Addresses kept of one listing.
const MAX_LISTED: usize = 4;

/// The name to ask for `ip` in `zone`: IPv4 octets reversed, IPv6 nibbles reversed.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    use std::fmt::Write as _;
    let mut name = String::with_capacity(80);
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            let _ = write!(name, "{d}.{c}.{b}.{a}.");
        }
        IpAddr::V6(a) => {
            for byte in a.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone.trim_end_matches('.'));
    name.push('.');
    name.make_ascii_lowercase();
    name
}

/// The nameservers of /etc/resolv.conf (port 53), read when a worker makes its resolver.
pub fn system_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// What a zone said of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    NotListed,
    /// Listed, with these result addresses (the first few).
    Listed(Vec<Ipv4Addr>),
    /// No usable answer: it scores 0.
    Failed(LookupFailure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupFailure {
    TimedOut,
    /// SERVFAIL, REFUSED or another error code.
    ServerError,
    Truncated,
    /// Too many queries in flight, or no resolver.
    NotAsked,
}

struct InFlight<T> {
    name: String,
    server: SocketAddr,
    token: T,
    deadline: Instant,
}

#[derive(Clone, Copy, Default)]
struct CacheSlot {
    /// A keyed hash of the query name; 0: empty.
    key: u64,
    until: Option<Instant>,
    listed: [Option<Ipv4Addr>; MAX_LISTED],
}

/// One worker's DNS client for blocklists; `T` tells the caller's lookups apart.
pub struct Resolver<T> {
    servers: Vec<SocketAddr>,
    next_server: usize,
    timeout: Duration,
    in_flight: HashMap<u16, InFlight<T>, ahash::RandomState>,
    /// Query ids in the order they time out (one timeout for all).
    deadlines: VecDeque<(Instant, u16)>,
    out: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Answers, with how long an answered query took (none: timed out, not asked).
    events: VecDeque<(T, Answer, Option<Duration>)>,
    cache: Box<[CacheSlot]>,
    hasher: ahash::RandomState,
    random: Box<dyn FnMut() -> u16 + Send>,
}

impl<T: Copy> Resolver<T> {
    /// `random`: a source of unpredictable query ids (the server's, a CSPRNG).
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration, random: Box<dyn FnMut() -> u16 + Send>) -> Self {
        Resolver::with_cache_slots(servers, timeout, random, CACHE_SLOTS)
    }

    /// The same with a cache of `slots` slots (the fuzz target's is small: a resolver
    /// each run).
    pub fn with_cache_slots(
        servers: Vec<SocketAddr>,
        timeout: Duration,
        random: Box<dyn FnMut() -> u16 + Send>,
        slots: usize,
    ) -> Self {
        Resolver {
            servers,
            next_server: 0,
            timeout,
            in_flight: HashMap::with_hasher(ahash::RandomState::new()),
            deadlines: VecDeque::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            cache: vec![CacheSlot::default(); slots.max(1)].into_boxed_slice(),
            hasher: ahash::RandomState::new(),
            random,
        }
    }

    /// What `zone` says of `ip`: at once from the cache, else `None` and the answer comes
    /// later as an event for `token`.
    pub fn lookup(&mut self, token: T, ip: IpAddr, zone: &str, now: Instant) -> Option<Answer> {
        let name = query_name(ip, zone);
        if let Some(answer) = self.cached(&name, now) {
            return Some(answer);
        }
        if self.servers.is_empty() || self.in_flight.len() >= MAX_IN_FLIGHT {
            return Some(Answer::Failed(LookupFailure::NotAsked));
        }
        let Ok(query_name) = Name::from_ascii(&name) else {
            return Some(Answer::Failed(LookupFailure::NotAsked));
        };
        let mut id = (self.random)();
        while self.in_flight.contains_key(&id) {
            id = (self.random)();
        }
        let mut message = Message::new();
        message
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(query_name, RecordType::A));
        let Ok(bytes) = message.to_vec() else {
            return Some(Answer::Failed(LookupFailure::NotAsked));
        };
        let server = self.servers[self.next_server % self.servers.len()];
        self.next_server = self.next_server.wrapping_add(1);
        let deadline = now + self.timeout;
        self.in_flight.insert(id, InFlight { name, server, token, deadline });
        self.deadlines.push_back((deadline, id));
        self.out.push_back((server, bytes));
        None
    }

    /// A datagram for the driver to send on the worker's UDP socket.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.pop_front()
    }

    /// A datagram that came to the worker's UDP socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) {
        let Ok(message) = Message::from_vec(bytes) else { return };
        if message.message_type() != MessageType::Response {
            return;
        }
        let id = message.id();
        // the answer must come from the server asked, for the name asked
        let matches = self.in_flight.get(&id).is_some_and(|q| {
            q.server == from
                && message.queries().len() == 1
                && message.queries()[0].query_type() == RecordType::A
                && message.queries()[0].name().to_ascii().eq_ignore_ascii_case(&q.name)
        });
        if !matches {
            return;
        }
        let Some(query) = self.in_flight.remove(&id) else { return };
        let answer = if message.truncated() {
            Answer::Failed(LookupFailure::Truncated)
        } else {
            match message.response_code() {
                ResponseCode::NXDomain => Answer::NotListed,
                ResponseCode::NoError => {
                    let listed: Vec<Ipv4Addr> = message
                        .answers()
                        .iter()
                        .filter_map(|r| match r.data() {
                            RData::A(a) => Some(a.0),
                            _ => None,
                        })
                        .take(MAX_LISTED)
                        .collect();
                    if listed.is_empty() { Answer::NotListed } else { Answer::Listed(listed) }
                }
                _ => Answer::Failed(LookupFailure::ServerError),
            }
        };
        let ttl = match &answer {
            Answer::Listed(_) => {
                let secs = message.answers().iter().map(|r| r.ttl()).min().unwrap_or(0);
                Some(Duration::from_secs(u64::from(secs)).min(MAX_TTL))
            }
            Answer::NotListed => Some(NEGATIVE_TTL),
            Answer::Failed(_) => None,
        };
        if let Some(ttl) = ttl {
            self.remember(&query.name, &answer, now + ttl);
        }
        let asked = query.deadline.checked_sub(self.timeout).unwrap_or(query.deadline);
        self.events.push_back((query.token, answer, Some(now.saturating_duration_since(asked))));
    }

    /// The earliest deadline of a query in flight.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.iter().find(|(_, id)| self.in_flight.contains_key(id)).map(|(at, _)| *at)
    }

    /// Queries past their deadline fail.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(q) = self.in_flight.get(&id)
                && q.deadline <= now
                && let Some(q) = self.in_flight.remove(&id)
            {
                self.events.push_back((q.token, Answer::Failed(LookupFailure::TimedOut), None));
            }
        }
    }

    /// An answer for a lookup, with how long its query took when it was answered.
    pub fn poll_event(&mut self) -> Option<(T, Answer, Option<Duration>)> {
        self.events.pop_front()
    }

    /// Queries in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes the cache holds (fixed).
    pub fn cache_bytes(&self) -> usize {
        self.cache.len() * std::mem::size_of::<CacheSlot>()
    }

    fn slot(&self, name: &str) -> (usize, u64) {
        let key = self.hasher.hash_one(name).max(1);
        ((key as usize) % self.cache.len(), key)
    }

    fn cached(&self, name: &str, now: Instant) -> Option<Answer> {
        let (i, key) = self.slot(name);
        let slot = &self.cache[i];
        if slot.key != key || slot.until.is_none_or(|u| u <= now) {
            return None;
        }
        let listed: Vec<Ipv4Addr> = slot.listed.iter().flatten().copied().collect();
        Some(if listed.is_empty() { Answer::NotListed } else { Answer::Listed(listed) })
    }

    fn remember(&mut self, name: &str, answer: &Answer, until: Instant) {
        let (i, key) = self.slot(name);
        let mut listed = [None; MAX_LISTED];
        if let Answer::Listed(addrs) = answer {
            for (slot, a) in listed.iter_mut().zip(addrs) {
                *slot = Some(*a);
            }
        }
        self.cache[i] = CacheSlot { key, until: Some(until), listed };
    }
}

/// Asks every zone about `ip` now, blocking up to `timeout` (for `mxgate explain`):
/// one answer per zone, in order.
pub fn ask_now(servers: &[SocketAddr], timeout: Duration, ip: IpAddr, zones: &[Zone]) -> Vec<Answer> {
    let mut answers: Vec<Option<Answer>> = vec![None; zones.len()];
    let Some(server) = servers.first() else {
        return vec![Answer::Failed(LookupFailure::NotAsked); zones.len()];
    };
    let any: SocketAddr = if server.is_ipv6() { ([0u16; 8], 0).into() } else { ([0, 0, 0, 0], 0).into() };
    let Ok(socket) = std::net::UdpSocket::bind(any) else {
        return vec![Answer::Failed(LookupFailure::NotAsked); zones.len()];
    };
    let mut resolver = Resolver::new(servers.to_vec(), timeout, Box::new(crate::random::u16));
    let start = Instant::now();
    for (i, zone) in zones.iter().enumerate() {
        answers[i] = resolver.lookup(i, ip, &zone.zone, start);
    }
    while let Some((to, datagram)) = resolver.poll_transmit() {
        let _ = socket.send_to(&datagram, to);
    }
    let mut buf = [0u8; 1232];
    while answers.iter().any(Option::is_none) {
        let now = Instant::now();
        resolver.handle_timeout(now);
        while let Some((i, answer, _)) = resolver.poll_event() {
            answers[i] = Some(answer);
        }
        let Some(left) = resolver.poll_timeout().map(|t| t.saturating_duration_since(now)) else { break };
        let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            resolver.handle_datagram(from, &buf[..n], Instant::now());
        }
    }
    answers.into_iter().map(|a| a.unwrap_or(Answer::Failed(LookupFailure::TimedOut))).collect()
}

/// One `[[screen.dnsbl]]` entry, as the configuration reads it.
pub use crate::config::Zone;

impl Zone {
    /// The zone's answer counts as a listing.
    pub fn lists(&self, answer: &Answer) -> bool {
        let Answer::Listed(addrs) = answer else { return false };
        self.matches.is_empty() || addrs.iter().any(|a| self.matches.iter().any(|(lo, hi)| lo <= a && a <= hi))
    }
}

/// The score of the answers (one per zone, in the zones' order), and the zone that
/// listed the peer with the heaviest weight (the first of equals).
pub fn score(zones: &[Zone], answers: &[Option<Answer>]) -> (i32, Option<usize>) {
    let mut total = 0i32;
    let mut heaviest: Option<usize> = None;
    for (i, (zone, answer)) in zones.iter().zip(answers).enumerate() {
        if let Some(answer) = answer
            && zone.lists(answer)
        {
            total = total.saturating_add(zone.weight);
            if zone.weight > 0 && heaviest.is_none_or(|h| zones[h].weight < zone.weight) {
                heaviest = Some(i);
            }
        }
    }
    (total, heaviest)
}

/// One connection's lookups: an answer per zone, awaited.
#[derive(Debug)]
pub struct Pending {
    answers: Box<[Option<Answer>]>,
    /// The lookups were asked for.
    asked: bool,
}

/// All answers are in: the peer is blocked (the zone of its heaviest listing, its
/// score, and its reply) or passed.
#[derive(Debug, PartialEq, Eq)]
pub enum Scored {
    Blocked { zone: String, score: i32, reply: Vec<u8> },
    Passed,
}

impl Pending {
    pub fn new(zones: usize) -> Self {
        Pending { answers: vec![None; zones].into_boxed_slice(), asked: false }
    }

    /// True once: the lookups are to be asked now.
    pub fn ask(&mut self) -> bool {
        !std::mem::replace(&mut self.asked, true)
    }

    /// Zone `zone`'s answer; with every answer in, the verdict on `ip` against
    /// `threshold`.
    pub fn answer(
        &mut self,
        zone: usize,
        answer: Answer,
        zones: &[Zone],
        threshold: i32,
        ip: IpAddr,
    ) -> Option<Scored> {
        if let Some(slot) = self.answers.get_mut(zone) {
            *slot = Some(answer);
        }
        if self.answers.iter().any(Option::is_none) {
            return None;
        }
        let (score, heaviest) = score(zones, &self.answers);
        if score < threshold {
            return Some(Scored::Passed);
        }
        let zone = heaviest.map(|i| zones[i].zone.clone()).unwrap_or_default();
        Some(Scored::Blocked { reply: blocked_reply(ip, &zone), zone, score })
    }
}

/// The reply to a peer scored at or over the threshold.
pub fn blocked_reply(ip: IpAddr, zone: &str) -> Vec<u8> {
    format!("550 5.7.1 Service unavailable; client [{}] blocked using {zone}\r\n", ip.to_canonical()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;
    use hickory_proto::rr::{Record, rdata::A};

    const SERVER: &str = "127.0.0.1:5353";

    fn resolver() -> Resolver<u32> {
        let mut n = 0u16;
        Resolver::new(
            vec![SERVER.parse().unwrap()],
            Duration::from_secs(2),
            Box::new(move || {
                n = n.wrapping_add(7919);
                n
            }),
        )
    }

    /// The server's answer to `query`: listed with `addrs` (TTL 60), or NXDOMAIN.
    fn answer(query: &[u8], addrs: &[Ipv4Addr], code: ResponseCode) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::new();
        r.set_id(q.id()).set_message_type(MessageType::Response).set_response_code(code);
        r.add_query(q.queries()[0].clone());
        for a in addrs {
            r.add_answer(Record::from_rdata(q.queries()[0].name().clone(), 60, RData::A(A(*a))));
        }
        r.to_vec().unwrap()
    }

    #[test]
    fn names_are_reversed_octets_and_nibbles() {
        assert_eq!(query_name("192.0.2.99".parse().unwrap(), "zen.example.org"), "99.2.0.192.zen.example.org.");
        assert_eq!(query_name("::ffff:192.0.2.99".parse().unwrap(), "Z.test."), "99.2.0.192.z.test.");
        let v6 = query_name("2001:db8::567:89ab".parse().unwrap(), "bl.test");
        assert_eq!(v6, "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test.");
    }

    #[test]
    fn an_answer_matched_by_id_server_and_name_is_delivered_and_cached() {
        let mut r = resolver();
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(r.lookup(1, ip, "bl.test", now), None);
        let (to, query) = r.poll_transmit().unwrap();
        assert_eq!(to, SERVER.parse().unwrap());
        let listed = [Ipv4Addr::new(127, 0, 0, 2)];
        // forged: another server, another port, another id, another name
        r.handle_datagram("127.0.0.2:5353".parse().unwrap(), &answer(&query, &listed, ResponseCode::NoError), now);
        r.handle_datagram("127.0.0.1:5354".parse().unwrap(), &answer(&query, &listed, ResponseCode::NoError), now);
        let mut wrong_id = answer(&query, &listed, ResponseCode::NoError);
        wrong_id[0] ^= 0xff;
        r.handle_datagram(to, &wrong_id, now);
        let (_, other) = {
            let mut o = resolver();
            o.lookup(9, "192.0.2.98".parse().unwrap(), "bl.test", now);
            o.poll_transmit().unwrap()
        };
        let mut other_name = answer(&other, &listed, ResponseCode::NoError);
        other_name[..2].copy_from_slice(&query[..2]);
        r.handle_datagram(to, &other_name, now);
        r.handle_datagram(to, b"garbage", now);
        assert_eq!(r.poll_event(), None, "none of those is the answer");
        // answered 30 ms after it was asked: the time it took comes with the answer
        let later = now + Duration::from_millis(30);
        r.handle_datagram(to, &answer(&query, &listed, ResponseCode::NoError), later);
        let took = Some(Duration::from_millis(30));
        assert_eq!(r.poll_event(), Some((1, Answer::Listed(listed.to_vec()), took)));
        r.handle_datagram(to, &answer(&query, &listed, ResponseCode::NoError), now);
        assert_eq!(r.poll_event(), None, "once");
        // cached for its TTL
        assert_eq!(r.lookup(2, ip, "bl.test", now + Duration::from_secs(59)), Some(Answer::Listed(listed.to_vec())));
        assert_eq!(r.lookup(3, ip, "bl.test", now + Duration::from_secs(61)), None, "expired: asked again");
    }

    #[test]
    fn nxdomain_is_not_listed_and_failures_are_not_cached() {
        let mut r = resolver();
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        r.lookup(1, ip, "bl.test", now);
        let (to, q) = r.poll_transmit().unwrap();
        r.handle_datagram(to, &answer(&q, &[], ResponseCode::NXDomain), now);
        assert_eq!(r.poll_event(), Some((1, Answer::NotListed, Some(Duration::ZERO))));
        assert_eq!(r.lookup(2, ip, "bl.test", now), Some(Answer::NotListed));
        r.lookup(3, ip, "other.test", now);
        let (to, q) = r.poll_transmit().unwrap();
        r.handle_datagram(to, &answer(&q, &[], ResponseCode::ServFail), now);
        assert_eq!(r.poll_event(), Some((3, Answer::Failed(LookupFailure::ServerError), Some(Duration::ZERO))));
        assert_eq!(r.lookup(4, ip, "other.test", now), None, "a failure is asked again");
        // silence: timed out at dns_timeout
        assert_eq!(r.poll_timeout(), Some(now + Duration::from_secs(2)));
        r.handle_timeout(now + Duration::from_millis(1999));
        assert_eq!(r.poll_event(), None);
        r.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(r.poll_event(), Some((4, Answer::Failed(LookupFailure::TimedOut), None)), "timeouts apart");
        assert_eq!((r.in_flight(), r.poll_timeout()), (0, None));
    }

    #[test]
    fn memory_stays_fixed_under_many_peers() {
        let mut r = resolver();
        let now = Instant::now();
        let bytes = r.cache_bytes();
        for i in 0..10_000u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            if r.lookup(i, ip, "bl.test", now).is_none() {
                let (to, q) = r.poll_transmit().unwrap();
                r.handle_datagram(to, &answer(&q, &[], ResponseCode::NXDomain), now);
            }
        }
        assert_eq!((r.cache_bytes(), r.in_flight()), (bytes, 0));
        // past MAX_IN_FLIGHT unanswered, lookups fail at once instead of queueing
        let mut r = resolver();
        for i in 0..MAX_IN_FLIGHT as u32 {
            assert_eq!(r.lookup(i, IpAddr::from(i.to_be_bytes()), "bl.test", now), None);
        }
        assert_eq!(
            r.lookup(0, "192.0.2.1".parse().unwrap(), "bl.test", now),
            Some(Answer::Failed(LookupFailure::NotAsked))
        );
    }

    #[test]
    fn scores_sum_weights_of_matching_listings() {
        let zone = |zone: &str, weight, matches: &[(&str, &str)]| Zone {
            zone: zone.into(),
            weight,
            matches: matches.iter().map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).collect(),
        };
        let zones =
            [zone("a.test", 2, &[]), zone("b.test", 1, &[("127.0.0.2", "127.0.0.11")]), zone("white.test", -5, &[])];
        let listed = |a: &str| Some(Answer::Listed(vec![a.parse().unwrap()]));
        assert_eq!(score(&zones, &[listed("127.0.0.2"), listed("127.0.0.4"), None]), (3, Some(0)));
        assert_eq!(score(&zones, &[listed("127.0.0.2"), listed("127.0.0.20"), None]), (2, Some(0)), "b: no match");
        let failed = Some(Answer::Failed(LookupFailure::TimedOut));
        assert_eq!(score(&zones, &[failed, listed("127.0.0.3"), Some(Answer::NotListed)]), (1, Some(1)));
        assert_eq!(score(&zones, &[listed("127.0.0.2"), listed("127.0.0.2"), listed("127.0.0.2")]).0, -2);
        assert_eq!(
            blocked_reply("::ffff:192.0.2.1".parse().unwrap(), "a.test"),
            b"550 5.7.1 Service unavailable; client [192.0.2.1] blocked using a.test\r\n"
        );
    }
}
