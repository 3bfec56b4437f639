//! Per-core drivers: N threads, each with its own SO_REUSEPORT listener per configured
//! address and its own event loop, sharing nothing but the snapshot and a stop flag.
//!
//! Two drivers of one shape: `uring` (io_uring, the default) and `epoll` (mio, where the
//! kernel or a seccomp policy refuses io_uring). Each is a thin loop: accept, run the
//! [`gate`](crate::gate) on the peer's address, then either send the deny line and close,
//! or move bytes for an [`smtp::Session`](crate::smtp::Session) as it asks.
//! Nothing about SMTP or access lives in a driver.

mod epoll;
mod listen;
mod pool;
mod timers;
mod uring;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::abuse::{Abuse, AbuseKey, Reason};
use crate::config::{Config, IoMode};
use crate::datetime::UnixTime;
use crate::problem::Problems;
use crate::smtp::{Event, Session};
use crate::snapshot::Snapshot;
use crate::stats::{Count, Counts, Stats};

/// Bytes one read takes from a peer. A command line is at most 512 octets; this bounds
/// what one read can make a session answer (see `smtp`).
pub const READ_LEN: usize = 4096;

/// The driver a server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Uring => "uring",
            Driver::Epoll => "epoll",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("io_uring is not usable here ({0}); use `io = \"epoll\"` or `io = \"auto\"`")]
    UringUnavailable(String),
    #[error("cannot start worker thread {thread}: {source}")]
    Worker { thread: usize, source: io::Error },
}

type SnapshotCache = arc_swap::Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>;

/// What every worker shares.
pub struct Shared {
    snapshot: Arc<ArcSwap<Snapshot>>,
    abuse: Arc<Abuse>,
    stats: Stats,
    started: Instant,
    reloads: AtomicU64,
    /// Held by a reload: two at once (SIGHUP and the control socket) could otherwise
    /// store the older files last.
    reloading: std::sync::Mutex<()>,
    stopping: AtomicBool,
}

impl Shared {
    /// Shared state for `snapshot`; loads the ban file and starts the abuse-control threads.
    pub fn new(snapshot: Snapshot) -> io::Result<Arc<Self>> {
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let abuse = Abuse::start(Arc::clone(&snapshot))?;
        Ok(Arc::new(Shared {
            snapshot,
            abuse,
            stats: Stats::default(),
            started: Instant::now(),
            reloads: AtomicU64::new(0),
            reloading: std::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Failure counters, bans and connection counts.
    pub fn abuse(&self) -> &Abuse {
        &self.abuse
    }

    /// What `mxgate stats` prints and `/metrics` serves: each name and value, and
    /// whether it is a gauge (a level now) rather than a count since start.
    pub fn stats(&self) -> Vec<(&'static str, u64, bool)> {
        let now = UnixTime::now();
        let mut lines = vec![("uptime_seconds", self.started.elapsed().as_secs(), true)];
        lines.extend(self.stats.lines().into_iter().map(|(name, value)| (name, value, false)));
        lines.extend([
            ("connections_open", u64::from(self.abuse.connections.total()), true),
            ("bans_in_force", self.abuse.bans_count(now) as u64, true),
            ("reloads", self.reloads.load(Ordering::Relaxed), false),
        ]);
        lines
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Makes `snapshot` current for new connections; existing ones keep theirs.
    pub fn store(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Loads the configuration file this instance runs on and every list file it names
    /// again, and makes them current: new connections are judged and served by them,
    /// open ones keep theirs to the end. Any problem anywhere changes nothing. The
    /// outcome is logged, naming `cause` (what asked for the reload).
    pub fn reload(&self, cause: &str) -> Result<Reloaded, Problems> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = self.load_again();
        match &outcome {
            Ok(reloaded) => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
                reloaded.log(cause);
            }
            Err(problems) => {
                for p in &problems.0 {
                    tracing::error!("{p}");
                }
                tracing::error!("{cause}: reload refused: {} problem(s); nothing changed", problems.0.len());
            }
        }
        outcome
    }

    fn load_again(&self) -> Result<Reloaded, Problems> {
        let old = self.snapshot();
        let config = match &old.config.file {
            Some(file) => Config::load(file)?,
            None => Config::embedded(),
        };
        let new = Snapshot::load(config)?;
        let reloaded = Reloaded {
            from: new.config.describe(),
            access_entries: new.access.len(),
            whitelist_entries: new.whitelist.len(),
            at_restart: old.config.fixed_at_start_changed(&new.config),
        };
        self.store(new);
        Ok(reloaded)
    }

    /// A worker's own view of the current snapshot: loading it is one pointer check
    /// while the snapshot is unchanged.
    fn snapshot_cache(&self) -> SnapshotCache {
        arc_swap::Cache::new(self.snapshot.clone())
    }

    /// Counts for a new worker.
    fn worker_counts(&self) -> Arc<Counts> {
        self.stats.worker()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// What a reload made current.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration file, for messages.
    pub from: String,
    pub access_entries: usize,
    pub whitelist_entries: usize,
    /// Settings given otherwise that only the next start applies.
    pub at_restart: Vec<&'static str>,
}

impl Reloaded {
    /// Logs the reload: a warning for each setting left as it was, then one line.
    fn log(&self, cause: &str) {
        for name in &self.at_restart {
            tracing::warn!("{cause}: {name} changed: read at start only, it takes effect at the next start");
        }
        tracing::info!(
            access_entries = self.access_entries,
            whitelist_entries = self.whitelist_entries,
            "{cause}: reloaded {}: new connections use it, open ones keep what they started with",
            self.from
        );
    }
}

/// A running server: its workers and how to stop them.
pub struct Server {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    driver: Driver,
    wakers: Vec<Waker>,
    threads: Vec<JoinHandle<()>>,
}

/// Wakes one worker out of its wait.
enum Waker {
    Uring(uring::Waker),
    Epoll(mio::Waker),
}

impl Server {
    /// Binds every listener, starts the workers and returns once all of them serve.
    pub fn start(shared: Arc<Shared>, io: IoMode) -> Result<Server, StartError> {
        let snapshot = shared.snapshot();
        let driver = match io {
            IoMode::Epoll => Driver::Epoll,
            IoMode::Uring => {
                uring::probe().map_err(StartError::UringUnavailable)?;
                Driver::Uring
            }
            IoMode::Auto => match uring::probe() {
                Ok(()) => Driver::Uring,
                Err(why) => {
                    tracing::warn!("io_uring is not usable here ({why}); using epoll");
                    Driver::Epoll
                }
            },
        };
        let threads = match snapshot.config.listen.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (per_thread, local_addrs) = listen::bind(&snapshot.config.listen.addresses, threads)?;

        let mut server =
            Server { shared: shared.clone(), local_addrs, driver, wakers: Vec::new(), threads: Vec::new() };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (i, listeners) in per_thread.into_iter().enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new().name(format!("mxgate-{driver}-{i}")).spawn(move || {
                let result = match driver {
                    Driver::Uring => uring::Worker::new(shared, listeners)
                        .map(|w| (Waker::Uring(w.waker()), Worker::Uring(Box::new(w)))),
                    Driver::Epoll => epoll::Worker::new(shared, listeners)
                        .and_then(|w| Ok((Waker::Epoll(w.waker()?), Worker::Epoll(Box::new(w))))),
                };
                match result {
                    Ok((waker, worker)) => {
                        let _ = ready.send(Ok(waker));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
            let handle = spawned.map_err(|source| StartError::Worker { thread: i, source })?;
            server.threads.push(handle);
            match ready_rx.recv() {
                Ok(Ok(waker)) => server.wakers.push(waker),
                Ok(Err(source)) => return Err(StartError::Worker { thread: i, source }),
                Err(_) => {
                    return Err(StartError::Worker {
                        thread: i,
                        source: io::Error::other("worker exited while starting"),
                    });
                }
            }
        }
        Ok(server)
    }

    /// The addresses listened on (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Stops accepting, tells every session the service is shutting down, and lets
    /// them finish within `[listen] drain_timeout`. Returns at once; `join` waits.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        for w in &self.wakers {
            let woken = match w {
                Waker::Uring(w) => w.wake(),
                Waker::Epoll(w) => w.wake(),
            };
            if let Err(e) = woken {
                tracing::error!("cannot wake a worker to stop it: {e}");
            }
        }
    }

    /// Waits for every worker to finish.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// A worker's stage on the way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Serving,
    /// Not accepting; sessions were told to close and have until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// The deadline passed: every connection is being closed.
    Aborting,
}

impl Drain {
    fn deadline(self) -> Option<Instant> {
        match self {
            Drain::Draining { deadline } => Some(deadline),
            _ => None,
        }
    }
}

enum Worker {
    Uring(Box<uring::Worker>),
    Epoll(Box<epoll::Worker>),
}

impl Worker {
    fn run(self) {
        match self {
            Worker::Uring(w) => w.run(),
            Worker::Epoll(w) => w.run(),
        }
    }
}

/// Acts on what a session reports: one log line per transaction (the mail log), and
/// failures counted against the peer's address (never a whitelisted one's).
fn handle_events(session: &mut Session, abuse: &Abuse, counts: &Counts, whitelisted: bool) {
    while let Some(event) = session.poll_event() {
        let config = &session.snapshot().config.abuse;
        let key = || AbuseKey::new(session.peer(), config.ipv6_prefix);
        match event {
            Event::Transaction(t) => {
                counts.transaction(t.outcome);
                tracing::info!("mail {t}");
            }
            Event::Failed(_) if whitelisted => counts.add(Count::Failures),
            Event::Failed(_) => {
                counts.add(Count::Failures);
                abuse.failed(key(), UnixTime::now(), config);
            }
            Event::Dropped => {
                counts.add(Count::Dropped);
                tracing::info!(peer = %session.peer(), "dropped: too many errors");
                if config.ban_on_drop && !whitelisted {
                    abuse.ban(key(), Reason::Dropped, UnixTime::now(), config);
                }
            }
        }
    }
}
