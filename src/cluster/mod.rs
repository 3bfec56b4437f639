//! The fleet (`[cluster]`): bans and failure counts shared with the other nodes through
//! Redis (or Valkey), so an attacker spread over the nodes is judged as one.
//!
//! The per-core loops never talk to Redis: they hand what happened to two threads over
//! bounded channels and never wait (a full channel drops the event and counts it). The
//! abuse control knows the channels only as an `abuse::Fleet`, which [`Outbox`]
//! implements, so that it depends on nothing here.
//!
//! ```text
//!  workers ── Abuse::ban / impose / lift ──try_send──► changes ──┐
//!             (and the prefixes due to escalate)                 │
//!  workers ── Abuse::failed ───────────────try_send──► failures ─┤
//!                                                                ▼
//!  mxgate-cluster (commands): a change at once: SET the ban key (EXAT its end) or DEL
//!      it, and PUBLISH on the channel. Every flush_interval, one pipeline: HINCRBY this
//!      slot's hash by each address's increment, HMGET the window's earlier slots. Where
//!      the fleet's count is at the threshold (whichever node's increment carried it
//!      there) and no ban is in force here: SET NX GET the ban key: won, Abuse::ban
//!      (published as any ban); lost, the winner's ban adopted. A shadow node only logs.
//!      A prefix due to escalate (its addresses' bans, made here or taken in, counted)
//!      is claimed the same way, so that one node bans it.
//!
//!  Redis ──► mxgate-cluster-sub: SUBSCRIBE, then SCAN the ban keys in force, then each
//!      message: a ban, Abuse::adopt (never one covering an address whitelisted here);
//!      an unban, Abuse::lift_from. Its own messages (node= itself) are skipped.
//! ```
//!
//! Each thread's connection:
//!
//! ```text
//!           connected (SUBSCRIBE + SCAN for the subscriber)
//!    Down ───────────────────────────────────────────────► Up
//!     ▲ │ refused / timed out: retry after a backoff           │ any error: dropped
//!     │ ▼ (100 ms, doubling to 2 s)                            │
//!    Down ◄────────────────────────────────────────────────────┘
//! ```
//!
//! The fleet's link is up when both are; one warning when it goes down, one info line
//! when it is back. While it is down the node gates, counts and bans as a single node:
//! bans and lifts made meanwhile are kept (bounded) and published when the commands
//! connection is back; failure increments are dropped (the local count stands); the
//! subscriber loads what the others did as soon as it is back. On each connection the
//! node also writes its own bans in force again (a Redis restarted empty gets them back).

pub mod wire;

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redis::IntoConnectionInfo;

use crate::abuse::{Abuse, AbuseKey, Ban, Change, Reason};
use crate::access::Action;
use crate::config::Cluster as ClusterConfig;
use crate::datetime::UnixTime;
use crate::snapshot::Snapshot;
use wire::{Batch, Message, Names, Window};

/// Waits for a connection to Redis, and for each reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The commands connection says PING when it has said nothing this long (so a lost
/// Redis is noticed, and its return announced, without waiting for a ban).
const IDLE_PING: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Each channel from the workers holds at most this many events.
const CHANNEL_CAP: usize = 65_536;
/// Bans and lifts kept while Redis is unreachable.
const MAX_PENDING: usize = 100_000;
/// At start, the longest wait for the fleet's bans before listening.
const START_WAIT: Duration = Duration::from_secs(3);
/// Commands in one pipeline when publishing kept bans.
const PUBLISH_CHUNK: usize = 1000;
/// SCAN rounds of 1,000 keys when taking in the bans: a database of 100 million keys
/// (SCAN visits every key, MATCH filters after), far more than a fleet's keys.
const MAX_SCAN_ROUNDS: usize = 100_000;

/// Addresses whose "whitelisted here" was logged (then forgotten all at once).
const MAX_SAID: usize = 4096;

/// What the fleet's threads counted, for `mxgate stats` and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    bans_sent: AtomicU64,
    unbans_sent: AtomicU64,
    bans_received: AtomicU64,
    unbans_received: AtomicU64,
    fleet_bans: AtomicU64,
    events_dropped: AtomicU64,
    ignored: AtomicU64,
    failures_sent: AtomicU64,
    commands: AtomicU64,
    /// Pipelines with a command Redis refused (dropped, never retried).
    refused: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What the commands thread is told at once.
#[derive(Debug)]
enum Event {
    /// A ban made here or lifted here.
    Change(Change),
    /// A prefix due to escalate (this many of its addresses banned in the fleet): to be
    /// claimed, so that one node bans it.
    Escalate(AbuseKey, u32),
}

/// The workers' side: hands events to the fleet's threads, never waiting.
#[derive(Clone, Debug)]
pub struct Outbox {
    changes: Sender<Event>,
    failures: Sender<AbuseKey>,
    stats: Arc<Stats>,
}

impl Outbox {
    fn send(&self, event: Event) {
        if self.changes.try_send(event).is_err() {
            add(&self.stats.events_dropped, 1);
        }
    }
}

impl crate::abuse::Fleet for Outbox {
    fn changed(&self, change: Change) {
        self.send(Event::Change(change));
    }

    fn escalate(&self, prefix: AbuseKey, distinct: u32) {
        self.send(Event::Escalate(prefix, distinct));
    }

    fn failed(&self, key: AbuseKey) {
        if self.failures.try_send(key).is_err() {
            add(&self.stats.events_dropped, 1);
        }
    }
}

/// The fleet's threads' side of the channels.
pub struct Inbox {
    changes: Receiver<Event>,
    failures: Receiver<AbuseKey>,
    stats: Arc<Stats>,
}

/// The channels between the workers and the fleet's threads.
pub fn channels() -> (Outbox, Inbox) {
    let (changes, changes_in) = crossbeam_channel::bounded(CHANNEL_CAP);
    let (failures, failures_in) = crossbeam_channel::bounded(CHANNEL_CAP);
    let stats = Arc::new(Stats::default());
    (
        Outbox { changes, failures, stats: Arc::clone(&stats) },
        Inbox { changes: changes_in, failures: failures_in, stats },
    )
}

/// A running fleet link: what `mxgate stats` reads.
pub struct Cluster {
    stats: Arc<Stats>,
    link: Arc<Link>,
}

impl Cluster {
    /// Its lines for `mxgate stats`: name, value, whether a gauge.
    pub fn stats(&self) -> Vec<(&'static str, u64, bool)> {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("cluster_connected", u64::from(self.link.is_up()), true),
            ("cluster_bans_sent", n(&s.bans_sent), false),
            ("cluster_unbans_sent", n(&s.unbans_sent), false),
            ("cluster_bans_received", n(&s.bans_received), false),
            ("cluster_unbans_received", n(&s.unbans_received), false),
            ("cluster_fleet_bans", n(&s.fleet_bans), false),
            ("cluster_events_dropped", n(&s.events_dropped), false),
            ("cluster_ignored", n(&s.ignored), false),
            ("cluster_failures_sent", n(&s.failures_sent), false),
            ("cluster_commands", n(&s.commands), false),
            ("cluster_commands_refused", n(&s.refused), false),
        ]
    }
}

/// Reads the password, starts the fleet's two threads, and waits (at most
/// `START_WAIT`) for the bans in force in Redis, so a node started after a ban refuses
/// the address from its first connection. Redis unreachable is not an error: the node
/// starts alone and joins when it can.
pub fn start(
    config: &ClusterConfig,
    inbox: Inbox,
    abuse: &Arc<Abuse>,
    snapshots: Arc<ArcSwap<Snapshot>>,
) -> io::Result<Cluster> {
    let node_name: Arc<str> = config.node.as_str().into();
    let link = Arc::new(Link {
        up: [AtomicBool::new(false), AtomicBool::new(false)],
        said: Mutex::new(None),
        redis: format!("{}:{}", config.host, config.port),
        node: Arc::clone(&node_name),
    });
    let node = Arc::new(Node {
        name: node_name,
        names: Names::new(&config.prefix),
        client: client(config)?,
        abuse: Arc::downgrade(abuse),
        snapshots,
        stats: Arc::clone(&inbox.stats),
        link: Arc::clone(&link),
        whitelisted_said: Mutex::default(),
        garbage_said: AtomicI64::new(0),
    });
    let (loaded, first_load) = crossbeam_channel::bounded(1);
    let subscriber = Arc::clone(&node);
    std::thread::Builder::new().name("mxgate-cluster-sub".into()).spawn(move || subscribe(&subscriber, loaded))?;
    let _ = first_load.recv_timeout(START_WAIT);
    let mut commands = Commands {
        pending: HashMap::default(),
        node: Arc::clone(&node),
        con: None,
        backoff: Backoff::default(),
        retry_at: Instant::now(),
        batch: Batch::default(),
        last_said: Instant::now(),
        // like the local counters', the window is the one read at start
        window: Window::new(node.snapshots.load().config.abuse.failure_window),
        expiring: None,
        claimed: HashSet::default(),
        refusal_logged: None,
    };
    // bans this node made before it (re)started are published when it connects
    for (key, ban) in abuse.own_bans(UnixTime::now()) {
        commands.keep(Change::Made(key, ban));
    }
    let interval = config.flush_interval;
    let stats = Arc::clone(&inbox.stats);
    std::thread::Builder::new().name("mxgate-cluster".into()).spawn(move || commands.run(&inbox, interval))?;
    Ok(Cluster { stats, link })
}

/// A client for `[cluster] redis`, with the password from `password_file`.
fn client(config: &ClusterConfig) -> io::Result<redis::Client> {
    let bad = |e: redis::RedisError| io::Error::other(format!("[cluster] redis {}: {e}", config.redis));
    let mut info = config.redis.as_str().into_connection_info().map_err(bad)?;
    if let Some(path) = &config.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("[cluster] password_file {}: {e}", path.display())))?;
        let settings = info.redis_settings().clone().set_password(text.trim_end_matches(['\r', '\n']));
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).map_err(bad)
}

const SUB: usize = 0;
const CMD: usize = 1;

/// Whether each thread's connection is up, and what was last said about the link.
struct Link {
    up: [AtomicBool; 2],
    said: Mutex<Option<bool>>,
    redis: String,
    node: Arc<str>,
}

impl Link {
    fn is_up(&self) -> bool {
        self.up.iter().all(|u| u.load(Ordering::Relaxed))
    }

    /// One side's connection is up or down (`error`: why): the link's change, if it
    /// changed, is logged once.
    fn set(&self, side: usize, up: bool, error: Option<&redis::RedisError>) {
        self.up[side].store(up, Ordering::Relaxed);
        let all = self.is_up();
        let mut said = self.said.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (all, *said) {
            (true, Some(true)) | (false, Some(false)) => {}
            (true, _) => {
                tracing::info!("cluster: node {} connected to Redis at {}", self.node, self.redis);
                *said = Some(true);
            }
            (false, _) if !up => {
                let why = error.map(|e| format!(" ({e})")).unwrap_or_default();
                let what = if said.is_some() { "lost" } else { "cannot reach" };
                tracing::warn!(
                    "cluster: {what} Redis at {}{why}: gating, counting and banning on this node alone; reconnecting",
                    self.redis
                );
                *said = Some(false);
            }
            (false, _) => {}
        }
    }
}

/// Waits between connection attempts: 100 ms, doubling to 2 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_FIRST)
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }
}

/// What both threads share.
struct Node {
    name: Arc<str>,
    names: Names,
    client: redis::Client,
    abuse: Weak<Abuse>,
    snapshots: Arc<ArcSwap<Snapshot>>,
    stats: Arc<Stats>,
    link: Arc<Link>,
    whitelisted_said: Mutex<HashSet<AbuseKey, ahash::RandomState>>,
    /// The second a bad line was last logged (at most one a second).
    garbage_said: AtomicI64,
}

impl Node {
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(con)
    }

    /// Takes in every ban in force in Redis (SCAN, never KEYS: Redis keeps serving), at
    /// most [`MAX_SCAN_ROUNDS`] rounds: a SCAN whose cursor never comes back to 0 (a
    /// Redis not playing fair) ends there, with a warning.
    fn load(&self) -> redis::RedisResult<()> {
        let mut con = self.connect()?;
        let pattern = self.names.ban_pattern();
        let mut cursor = 0u64;
        for _ in 0..MAX_SCAN_ROUNDS {
            let (next, keys): (u64, Vec<Vec<u8>>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query(&mut con)?;
            add(&self.stats.commands, 1);
            if !keys.is_empty() {
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
                add(&self.stats.commands, 1);
                for (name, value) in keys.iter().zip(values) {
                    if let Some(value) = value {
                        self.stored(name, &value);
                    }
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
        tracing::warn!("cluster: SCAN of the bans in Redis did not end after {MAX_SCAN_ROUNDS} rounds; stopped there");
        Ok(())
    }

    /// A ban key's value, found by SCAN or by a lost SET NX.
    fn stored(&self, name: &[u8], value: &[u8]) {
        match wire::parse_ban(value) {
            Ok((key, ban)) if self.names.ban_key(key).as_bytes() == name => self.take_in(key, ban),
            Ok((key, _)) => {
                self.garbage("a ban key", &format!("{} holds a ban of {key}", String::from_utf8_lossy(name)))
            }
            Err(why) => self.garbage("a ban key", &format!("{}: {why}", String::from_utf8_lossy(name))),
        }
    }

    /// A message on the channel.
    fn heard(&self, payload: &[u8]) {
        match wire::parse_message(payload) {
            Ok(Message::Ban(_, ban)) if ban.from.as_deref() == Some(&*self.name) => {} // its own, echoed
            Ok(Message::Ban(key, ban)) => self.take_in(key, ban),
            Ok(Message::Unban(_, node)) if *node == *self.name => {}
            Ok(Message::Unban(key, node)) => {
                if let Some(abuse) = self.abuse.upgrade()
                    && abuse.lift_from(key, &node, UnixTime::now()).is_some()
                {
                    add(&self.stats.unbans_received, 1);
                }
            }
            Err(why) => self.garbage("a message on the channel", &why),
        }
    }

    /// Another node's ban (or this node's own, found in Redis): in force here unless it
    /// covers an address this node whitelists.
    fn take_in(&self, key: AbuseKey, ban: Ban) {
        let Some(abuse) = self.abuse.upgrade() else { return };
        let snapshot = self.snapshots.load();
        if whitelists(&snapshot.whitelist, key) {
            let node = ban.from.as_deref().unwrap_or("?");
            add(&self.stats.ignored, 1);
            let mut said = self.whitelisted_said.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if said.len() >= MAX_SAID {
                said.clear();
            }
            if said.insert(key) {
                tracing::info!("cluster: not applying the ban on {key} from {node}: whitelisted here");
            }
            return;
        }
        if abuse.adopt(key, ban, UnixTime::now(), &snapshot.config.abuse) {
            add(&self.stats.bans_received, 1);
        }
    }

    /// The line this node writes for its own ban of `key` (in Redis, on the channel).
    fn line(&self, key: AbuseKey, ban: &Ban) -> String {
        crate::abuse::file::line(key, ban, Some(&self.name))
    }

    /// A line that does not read: counted, logged at most once a second, skipped.
    fn garbage(&self, what: &str, why: &dyn std::fmt::Display) {
        add(&self.stats.ignored, 1);
        let now = UnixTime::now().0;
        if self.garbage_said.swap(now, Ordering::Relaxed) != now {
            // what Redis holds is outside text: escaped as one value
            tracing::warn!("cluster: ignored {what}: {}", crate::logfmt::value(&why.to_string()));
        }
    }
}

/// Whether `whitelist` holds an address the ban on `key` covers.
fn whitelists(whitelist: &crate::access::AccessList, key: AbuseKey) -> bool {
    let net = key.net();
    whitelist.action(net.addr()) == Action::Allow
        || whitelist.rules().iter().any(|r| r.action == Action::Allow && net.contains(&r.net))
}

/// The subscriber thread: (re)connects, subscribes, loads the bans in force, then takes
/// in what the channel says. `loaded` is told after the first attempt.
fn subscribe(node: &Node, loaded: Sender<()>) {
    let mut backoff = Backoff::default();
    let mut loaded = Some(loaded);
    while node.abuse.strong_count() > 0 {
        match listen(node, &mut loaded, &mut backoff) {
            Ok(()) => return,
            Err(e) => node.link.set(SUB, false, Some(&e)),
        }
        if let Some(loaded) = loaded.take() {
            let _ = loaded.send(());
        }
        std::thread::sleep(backoff.next());
    }
}

/// One connection's life: `Ok` when the node is gone, the error that ended it otherwise.
fn listen(node: &Node, loaded: &mut Option<Sender<()>>, backoff: &mut Backoff) -> redis::RedisResult<()> {
    let mut con = node.connect()?;
    let mut pubsub = con.as_pubsub();
    // subscribed before the SCAN: a ban made in between is heard, or found, or both
    pubsub.subscribe(node.names.channel())?;
    node.load()?;
    node.link.set(SUB, true, None);
    *backoff = Backoff::default();
    if let Some(loaded) = loaded.take() {
        let _ = loaded.send(());
    }
    loop {
        match pubsub.get_message() {
            Ok(message) => node.heard(message.get_payload_bytes()),
            Err(e) if e.is_timeout() => {
                if node.abuse.strong_count() == 0 {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The commands thread's state.
struct Commands {
    node: Arc<Node>,
    con: Option<redis::Connection>,
    backoff: Backoff,
    retry_at: Instant,
    /// Bans (`Some`) and lifts (`None`) made here and not yet in Redis, the latest per key.
    pending: HashMap<AbuseKey, Option<Ban>, ahash::RandomState>,
    batch: Batch,
    /// When the connection last said something.
    last_said: Instant,
    window: Window,
    /// The slot whose hash this node last set to expire (on this connection).
    expiring: Option<u64>,
    /// Bans this node claimed with SET NX: their key holds their line already, so their
    /// publication is the PUBLISH alone.
    claimed: HashSet<AbuseKey, ahash::RandomState>,
    /// When a refused command was last logged.
    refusal_logged: Option<Instant>,
}

/// Why a pipeline got no replies.
enum Failed {
    /// Redis is unreachable (or the connection broke, or Redis is loading, read-only,
    /// failing over): what was sent may be sent again once it is back.
    Down,
    /// Redis refused a command: sending it again would be refused again.
    Refused,
}

/// At most one warning a minute about commands Redis refused.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Redis answered with an error that says the command itself is refused, not that Redis
/// cannot serve now.
fn refused(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    matches!(
        e.kind(),
        ErrorKind::Extension
            | ErrorKind::Server(
                S::ResponseError | S::ExecAbort | S::NoScript | S::CrossSlot | S::NotBusy | S::NoSub | S::NoPerm
            )
    )
}

impl Commands {
    fn run(&mut self, inbox: &Inbox, interval: Duration) {
        self.connected();
        self.publish();
        let mut next_flush = Instant::now() + interval;
        loop {
            match inbox.changes.recv_deadline(next_flush) {
                Ok(event) => {
                    let mut escalations = Vec::new();
                    for event in std::iter::once(event).chain(inbox.changes.try_iter().take(CHANNEL_CAP)) {
                        match event {
                            Event::Change(change) => self.keep(change),
                            Event::Escalate(prefix, distinct) => escalations.push((prefix, distinct)),
                        }
                    }
                    self.publish();
                    for (prefix, distinct) in escalations {
                        self.escalate(prefix, distinct);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // due even while bans keep coming
            if Instant::now() >= next_flush {
                if self.node.abuse.strong_count() == 0 {
                    return;
                }
                self.tick(inbox);
                next_flush = (next_flush + interval).max(Instant::now());
            }
        }
    }

    /// Every `flush_interval`: the failures to the fleet's counts, then what is owed (bans
    /// kept while Redis was away, a PING when idle, a reconnection).
    fn tick(&mut self, inbox: &Inbox) {
        for key in inbox.failures.try_iter().take(CHANNEL_CAP) {
            if !self.batch.add(key) {
                add(&self.node.stats.events_dropped, 1);
            }
        }
        self.flush();
        if !self.pending.is_empty() {
            self.publish();
        } else if self.con.is_some() && self.last_said.elapsed() >= IDLE_PING {
            self.ping();
        } else if self.con.is_none() {
            self.connected();
        }
    }

    /// Keeps a ban or lift made here until it is in Redis.
    fn keep(&mut self, change: Change) {
        let (key, ban) = match change {
            Change::Made(_, ban) if ban.from.is_some() => return,
            Change::Made(key, ban) => (key, Some(ban)),
            Change::Lifted(key) => (key, None),
        };
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&key) {
            add(&self.node.stats.events_dropped, 1);
            return;
        }
        self.pending.insert(key, ban);
    }

    /// Whether the connection is up, connecting when it is down and its backoff is over.
    fn connected(&mut self) -> bool {
        if self.con.is_some() {
            return true;
        }
        if Instant::now() < self.retry_at {
            return false;
        }
        match self.node.connect() {
            Ok(con) => {
                self.con = Some(con);
                self.backoff = Backoff::default();
                self.last_said = Instant::now();
                self.node.link.set(CMD, true, None);
                self.restore();
                true
            }
            Err(e) => {
                self.lost(&e);
                false
            }
        }
    }

    /// Writes this node's bans in force again (SET, not published: the others hold
    /// them), those still to be published aside: a Redis restarted empty gets them back,
    /// for nodes that start later.
    fn restore(&mut self) {
        let Some(abuse) = self.node.abuse.upgrade() else { return };
        let own: Vec<(AbuseKey, Ban)> =
            abuse.own_bans(UnixTime::now()).into_iter().filter(|(key, _)| !self.pending.contains_key(key)).collect();
        for chunk in own.chunks(PUBLISH_CHUNK) {
            let mut pipe = redis::pipe();
            for (key, ban) in chunk {
                let line = self.node.line(*key, ban);
                pipe.cmd("SET").arg(self.node.names.ban_key(*key)).arg(line).arg("EXAT").arg(ban.until).ignore();
            }
            if let Err(Failed::Down) = self.query::<()>(&pipe, chunk.len()) {
                return;
            }
        }
    }

    fn lost(&mut self, error: &redis::RedisError) {
        self.con = None;
        // a restarted Redis holds no claimed key, and hashes with no expiry
        self.expiring = None;
        self.claimed.clear();
        self.retry_at = Instant::now() + self.backoff.next();
        self.node.link.set(CMD, false, Some(error));
    }

    /// Runs `pipe` on the connection (when it is up). Redis refusing a command (an
    /// error reply: a value past its limits, a key of another type, an ACL that forbids
    /// it) fails the pipeline's replies but not the others' effects, nor the connection:
    /// the batch is taken as done, with a warning at most once a minute, so that it is
    /// never retried for ever. Anything else drops the connection.
    fn query<T: redis::FromRedisValue>(&mut self, pipe: &redis::Pipeline, commands: usize) -> Result<T, Failed> {
        if !self.connected() {
            return Err(Failed::Down);
        }
        let con = self.con.as_mut().ok_or(Failed::Down)?;
        add(&self.node.stats.commands, commands as u64);
        match pipe.query(con) {
            Ok(value) => {
                self.last_said = Instant::now();
                Ok(value)
            }
            Err(e) if refused(&e) => {
                self.last_said = Instant::now();
                add(&self.node.stats.refused, 1);
                if self.refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                    self.refusal_logged = Some(Instant::now());
                    tracing::warn!("cluster: Redis refused a command ({e}); that batch is dropped");
                }
                Err(Failed::Refused)
            }
            Err(e) => {
                self.lost(&e);
                Err(Failed::Down)
            }
        }
    }

    fn ping(&mut self) {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        let _: Result<redis::Value, Failed> = self.query(&pipe, 1);
    }

    /// Writes the kept bans and lifts to Redis and publishes them; kept for later when
    /// Redis is unreachable.
    fn publish(&mut self) {
        let now = UnixTime::now().0;
        self.pending.retain(|_, ban| ban.as_ref().is_none_or(|b| b.until > now));
        while !self.pending.is_empty() {
            let chunk: Vec<(AbuseKey, Option<Ban>)> =
                self.pending.iter().take(PUBLISH_CHUNK / 2).map(|(k, b)| (*k, b.clone())).collect();
            let (names, node) = (&self.node.names, &*self.node.name);
            let channel = names.channel();
            let mut pipe = redis::pipe();
            let (mut bans, mut unbans, mut commands) = (0, 0, 0);
            for (key, ban) in &chunk {
                match ban {
                    Some(ban) => {
                        let line = self.node.line(*key, ban);
                        if !self.claimed.contains(key) {
                            pipe.cmd("SET").arg(names.ban_key(*key)).arg(&line).arg("EXAT").arg(ban.until).ignore();
                            commands += 1;
                        }
                        pipe.cmd("PUBLISH").arg(&channel).arg(wire::ban_message(&line)).ignore();
                        bans += 1;
                    }
                    None => {
                        pipe.cmd("DEL").arg(names.ban_key(*key)).ignore();
                        pipe.cmd("PUBLISH").arg(&channel).arg(wire::unban_message(*key, node)).ignore();
                        unbans += 1;
                        commands += 1;
                    }
                }
            }
            match self.query::<()>(&pipe, chunk.len() + commands) {
                Err(Failed::Down) => return, // kept: published once Redis is back
                Err(Failed::Refused) => {}   // never retried
                Ok(()) => {
                    add(&self.node.stats.bans_sent, bans);
                    add(&self.node.stats.unbans_sent, unbans);
                }
            }
            for (key, _) in &chunk {
                self.pending.remove(key);
                self.claimed.remove(key);
            }
        }
    }

    /// Adds this node's increments to the fleet's counts; bans where the fleet's count is
    /// at the threshold, whichever node's increment carried it there (a shadow node's
    /// flush may have, and it bans nothing).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if !self.connected() {
            self.batch.take(); // the local counts stand; the fleet misses these
            return;
        }
        let snapshot = self.node.snapshots.load_full();
        let config = &snapshot.config.abuse;
        let now = UnixTime::now();
        let window = self.window;
        let slot = window.slot(now.0);
        let sent = self.batch.take();
        let names = &self.node.names;
        let fields: Vec<String> = sent.iter().map(|(key, _)| key.to_string()).collect();
        let mut pipe = redis::pipe();
        let current = names.fails(slot);
        for ((_, n), field) in sent.iter().zip(&fields) {
            pipe.cmd("HINCRBY").arg(&current).arg(field).arg(*n);
        }
        let expire = self.expiring != Some(slot);
        if expire {
            pipe.cmd("EXPIRE").arg(&current).arg(window.ttl_secs()).ignore();
        }
        let earlier: Vec<u64> = window.earlier(slot).collect();
        for &s in &earlier {
            pipe.cmd("HMGET").arg(names.fails(s)).arg(&fields);
        }
        let commands = sent.len() + usize::from(expire) + earlier.len();
        let Ok(replies) = self.query::<Vec<redis::Value>>(&pipe, commands) else { return };
        self.expiring = Some(slot);
        add(&self.node.stats.failures_sent, sent.iter().map(|(_, n)| u64::from(*n)).sum());
        let mut replies = replies.into_iter();
        let now_counts: Vec<u64> =
            replies.by_ref().take(sent.len()).map(|v| redis::from_redis_value::<u64>(v).unwrap_or(0)).collect();
        let earlier_counts: Vec<Vec<u64>> = replies
            .map(|v| {
                let slot: Vec<Option<u64>> = redis::from_redis_value(v).unwrap_or_default();
                slot.into_iter().map(Option::unwrap_or_default).collect()
            })
            .collect();
        let Some(abuse) = self.node.abuse.upgrade() else { return };
        for wire::Reached { key, total, crossed } in
            wire::reached(&sent, &now_counts, &earlier_counts, config.failure_threshold)
        {
            // banned already, or this node's own count reached the threshold: it banned
            // locally then (a ban the operator may since have lifted)
            if abuse.banned(key, now).is_some() || abuse.counters.count(key, now.0) >= config.failure_threshold {
                continue;
            }
            if config.shadow {
                // counted, never claimed: an enforcing node's next flush bans it
                if crossed {
                    tracing::info!("shadow: would ban {key}: {total} failures across the fleet");
                }
                continue;
            }
            self.claim(&abuse, key, Reason::FleetFailures(total), now, config);
        }
    }

    /// A prefix is due to escalate: claimed like a ban the fleet's count made, so that
    /// one node bans it; with Redis unreachable, this node bans it as a single node would.
    fn escalate(&mut self, prefix: AbuseKey, distinct: u32) {
        let Some(abuse) = self.node.abuse.upgrade() else { return };
        let snapshot = self.node.snapshots.load_full();
        let config = &snapshot.config.abuse;
        let now = UnixTime::now();
        if abuse.banned(prefix, now).is_some() {
            return;
        }
        let reason = Reason::Escalated(distinct);
        if config.shadow {
            tracing::info!("shadow: would ban {prefix}: {reason}");
            return;
        }
        if self.claim(&abuse, prefix, reason.clone(), now, config).is_none() {
            let _ = abuse.ban(prefix, reason, now, config); // kept, published when Redis is back
        }
    }

    /// Claims the ban of `key` in Redis (SET NX GET on its key) and makes it when this
    /// node got it first; takes in the winner's ban otherwise. Whether this node made it;
    /// `None` when Redis did not answer.
    fn claim(
        &mut self,
        abuse: &Abuse,
        key: AbuseKey,
        reason: Reason,
        now: UnixTime,
        config: &crate::config::Abuse,
    ) -> Option<bool> {
        let ban = abuse.preview(key, reason.clone(), now, config);
        let line = self.node.line(key, &ban);
        let name = self.node.names.ban_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&name).arg(&line).arg("NX").arg("GET").arg("EXAT").arg(ban.until);
        match self.query::<(Option<Vec<u8>>,)>(&pipe, 1).ok()? {
            (None,) => {
                add(&self.node.stats.fleet_bans, 1);
                // made as any ban: logged here, handed back to this thread, published
                let _ = abuse.ban(key, reason, now, config);
                let as_claimed = abuse.ban_of(key, now).is_some_and(|(k, made)| k == key && made == ban);
                if as_claimed && self.claimed.len() < MAX_PENDING {
                    self.claimed.insert(key);
                }
                Some(true)
            }
            (Some(theirs),) => {
                self.node.stored(name.as_bytes(), &theirs);
                Some(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abuse::Fleet;
    use crate::peer::PeerIp;

    #[test]
    fn workers_never_wait_a_full_channel_drops_and_counts() {
        let (outbox, inbox) = channels();
        let key = AbuseKey::new(PeerIp::new("192.0.2.1".parse().unwrap()), 64);
        for _ in 0..CHANNEL_CAP {
            outbox.failed(key);
        }
        assert_eq!(inbox.stats.events_dropped.load(Ordering::Relaxed), 0);
        outbox.failed(key);
        outbox.changed(Change::Lifted(key));
        assert_eq!(inbox.failures.len(), CHANNEL_CAP, "bounded");
        assert_eq!(inbox.changes.len(), 1, "the other channel has room");
        assert_eq!(inbox.stats.events_dropped.load(Ordering::Relaxed), 1, "the one past the bound");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_restarts() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..7).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(Backoff::default().next(), BACKOFF_FIRST);
    }
}
