//! What every worker shares, and what the control socket and the metrics read: the
//! current snapshot (swapped whole by a reload), abuse control, the workers' counts and
//! the stop flag. Nothing here knows the I/O drivers.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::abuse::Abuse;
use crate::config::Config;
use crate::datetime::UnixTime;
use crate::problem::Problems;
use crate::shadow::Shadow;
use crate::snapshot::Snapshot;
use crate::stats::{Counts, Stats};

/// A worker's own view of the current snapshot.
pub type SnapshotCache = arc_swap::Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>;

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
    /// Every listener is bound and every worker serves (`/readyz`).
    serving: AtomicBool,
    /// Workers that stopped before the server did: a panic or a fatal error (`/healthz`).
    workers_died: AtomicU64,
    shadow: Shadow,
    passed: crate::screen::Passed,
    /// Peers each blocklist zone blocked (the heaviest listing of each), by zone name.
    blocked_by_zone: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The fleet's link, with `[cluster]` (read at start).
    cluster: Option<crate::cluster::Cluster>,
    /// The mail log's transaction ids, unique to the process.
    transaction_ids: Arc<crate::smtp::TransactionIds>,
    /// The kernel fast path, with `[kernel]` on (read at start).
    kernel: Option<Arc<crate::kernel::Kernel>>,
}

impl Shared {
    /// Shared state for `snapshot`; loads the ban file and starts the abuse-control
    /// threads (and the fleet's, with `[cluster]`).
    pub fn new(snapshot: Snapshot) -> io::Result<Arc<Self>> {
        let cache_file = snapshot.config.screen.cache_file.clone();
        let cluster_config = snapshot.config.cluster.clone();
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let (outbox, inbox) = cluster_config.as_ref().map(|_| crate::cluster::channels()).unzip();
        let fleet = outbox.map(|o| Box::new(o) as Box<dyn crate::abuse::Fleet>);
        let abuse = Abuse::start(Arc::clone(&snapshot), fleet)?;
        let kernel = crate::kernel::Kernel::new(&snapshot.load().config.kernel);
        if let Some(kernel) = &kernel {
            abuse.tell_kernel(Arc::clone(kernel));
        }
        let cluster = match (&cluster_config, inbox) {
            (Some(config), Some(inbox)) => Some(crate::cluster::start(config, inbox, &abuse, Arc::clone(&snapshot))?),
            _ => None,
        };
        Ok(Arc::new(Shared {
            snapshot,
            abuse,
            stats: Stats::default(),
            started: Instant::now(),
            reloads: AtomicU64::new(0),
            reloading: std::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            workers_died: AtomicU64::new(0),
            shadow: Shadow::default(),
            passed: match &cache_file {
                Some(path) => crate::screen::Passed::with_file(path, UnixTime::now())?,
                None => crate::screen::Passed::default(),
            },
            blocked_by_zone: std::sync::Mutex::default(),
            cluster,
            transaction_ids: Arc::new(crate::smtp::TransactionIds::new(UnixTime::now())),
            kernel,
        }))
    }

    /// The kernel fast path, while its table is up.
    #[inline]
    pub fn kernel(&self) -> Option<&crate::kernel::Kernel> {
        self.kernel.as_deref().filter(|k| k.active())
    }

    /// Starts the kernel fast path (with `[kernel]` on) for the listening `addrs`.
    pub fn start_kernel(&self, addrs: &[std::net::SocketAddr]) -> io::Result<()> {
        let Some(kernel) = &self.kernel else { return Ok(()) };
        let now = UnixTime::now();
        kernel.start(addrs, Arc::clone(&self.snapshot), self.abuse.ends_in_force(now), self.stats.worker())
    }

    /// Removes the kernel's table (with `[kernel]` on), waiting a few seconds at most.
    pub fn stop_kernel(&self) {
        if let Some(kernel) = &self.kernel {
            kernel.stop();
        }
    }

    /// A peer was blocked using `zone` (rare: a lock is fine).
    pub fn count_blocked(&self, zone: &str) {
        if let Ok(mut zones) = self.blocked_by_zone.lock() {
            *zones.entry(zone.to_owned()).or_default() += 1;
        }
    }

    /// Peers blocked by each zone since start (`dnsbl_blocked` is their sum).
    pub fn blocked_by_zone(&self) -> Vec<(String, u64)> {
        self.blocked_by_zone.lock().map(|z| z.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default()
    }

    /// Peers that passed screening, and until when.
    pub fn passed(&self) -> &crate::screen::Passed {
        &self.passed
    }

    /// Shadow mode's log samplers.
    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }

    /// Failure counters, bans and connection counts.
    pub fn abuse(&self) -> &Abuse {
        &self.abuse
    }

    /// The mail log's transaction ids, for the sessions.
    pub fn transaction_ids(&self) -> &Arc<crate::smtp::TransactionIds> {
        &self.transaction_ids
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
            ("failure_keys_evicted", self.abuse.counters.evictions(), false),
            ("reloads", self.reloads.load(Ordering::Relaxed), false),
        ]);
        if let Some(cluster) = &self.cluster {
            lines.extend(cluster.stats());
        }
        if let Some(kernel) = &self.kernel {
            lines.extend(kernel.stats());
        }
        lines
    }

    /// When the process started, in seconds since the epoch.
    pub fn started_unix(&self) -> u64 {
        u64::try_from(UnixTime::now().0).unwrap_or(0).saturating_sub(self.started.elapsed().as_secs())
    }

    /// The histograms' exposition (`/metrics`), summed over the workers.
    pub fn histograms(&self, out: &mut String) {
        self.stats.histograms(out);
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
        crate::notify::notify(&crate::notify::reloading());
        let outcome = self.load_again();
        crate::notify::notify("READY=1");
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
            warnings: new.warnings(),
        };
        self.store(new);
        Ok(reloaded)
    }

    /// A worker's own view of the current snapshot: loading it is one pointer check
    /// while the snapshot is unchanged.
    pub fn snapshot_cache(&self) -> SnapshotCache {
        arc_swap::Cache::new(self.snapshot.clone())
    }

    /// Counts for a new worker.
    pub fn worker_counts(&self) -> Arc<Counts> {
        self.stats.worker()
    }

    /// Tells the workers to stop accepting and drain (they still need waking).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The server is stopping: workers drain.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Every listener is bound and every worker serves.
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Ready for new connections (`/readyz`): serving, and not draining.
    pub fn ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && !self.stopping()
    }

    /// A worker stopped before the server did (its thread's guard says so).
    pub fn worker_died(&self) {
        self.workers_died.fetch_add(1, Ordering::Relaxed);
    }

    /// Every worker that started still runs, or stopped because the server did
    /// (`/healthz`).
    pub fn healthy(&self) -> bool {
        self.workers_died.load(Ordering::Relaxed) == 0
    }
}

/// Held by a worker's thread for its life: when it ends (returns or unwinds) before the
/// server stops, the worker died, and `/healthz` says so.
pub struct WorkerAlive(pub Arc<Shared>, pub usize);

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        if !self.0.stopping() {
            tracing::error!("worker {} stopped while the server runs: /healthz answers 503", self.1);
            self.0.worker_died();
        }
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
    /// Things that work but will not for long (a certificate near its end).
    pub warnings: Vec<String>,
}

impl Reloaded {
    /// Logs the reload: a warning for each setting left as it was, then one line.
    fn log(&self, cause: &str) {
        for name in &self.at_restart {
            tracing::warn!("{cause}: {name} changed: read at start only, it takes effect at the next start");
        }
        for warning in &self.warnings {
            tracing::warn!("{cause}: {warning}");
        }
        tracing::info!(
            access_entries = self.access_entries,
            whitelist_entries = self.whitelist_entries,
            "{cause}: reloaded {}: new connections use it, open ones keep what they started with",
            self.from
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn ready_once_serving_until_the_drain_and_healthy_until_a_worker_dies() {
        let shared = Shared::new(Snapshot::without_lists(Config::embedded())).unwrap();
        assert!(!shared.ready(), "before the listeners are up");
        shared.set_serving();
        assert!(shared.ready() && shared.healthy());
        drop(WorkerAlive(Arc::clone(&shared), 0));
        assert!(!shared.healthy(), "a worker stopped while the server runs");
        let shared = Shared::new(Snapshot::without_lists(Config::embedded())).unwrap();
        shared.set_serving();
        let alive = WorkerAlive(Arc::clone(&shared), 1);
        shared.stop();
        assert!(!shared.ready(), "draining");
        drop(alive);
        assert!(shared.healthy(), "a worker that ends with the server did not die");
    }
}
