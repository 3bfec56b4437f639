//! The scenarios, and the mxgate a run may start for itself (`--spawn PATH`: a generated
//! configuration and access list, its own sink as the next hop, stopped at the end).
//!
//! - `deny-storm`: peers from denied addresses; each must get the deny line first (no
//!   banner), then the close.
//! - `relay`: complete messages from allowed addresses to the built-in sink; every
//!   message that got 250 must reach the sink byte-exact, once.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::engine::{self, Plan, Progress};
use crate::peer::{Relay, Script};
use crate::report::{Phase, Report};
use crate::sink::Sink;
use crate::sources::{Sources, check_target};

/// Denied peers come from here by default (the spawned mxgate denies it).
pub const DENY_SOURCES: &str = "127.66.0.0/16";
/// Allowed peers come from here by default.
pub const ALLOW_SOURCES: &str = "127.77.0.0/16";
/// The recipient domain the spawned mxgate relays for.
pub const RCPT_DOMAIN: &str = "loadtest.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    DenyStorm,
    Relay,
}

impl Scenario {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "deny-storm" => Ok(Scenario::DenyStorm),
            "relay" => Ok(Scenario::Relay),
            other => Err(format!("unknown scenario `{other}` (deny-storm, relay)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::DenyStorm => "deny-storm",
            Scenario::Relay => "relay",
        }
    }
}

/// A run's options (the command line's).
#[derive(Clone, Debug)]
pub struct Options {
    pub scenario: Scenario,
    /// The server to load; without it, `spawn`.
    pub target: Option<SocketAddr>,
    /// An mxgate binary to start with a generated configuration.
    pub spawn: Option<PathBuf>,
    /// The spawned mxgate's I/O driver.
    pub io: Option<String>,
    pub duration: Duration,
    pub concurrency: usize,
    pub threads: usize,
    /// Source range; default by scenario.
    pub sources: Option<String>,
    pub pipeline: bool,
    pub messages_per_connection: u32,
    pub body_size: usize,
    /// What a denied peer's line starts with.
    pub expect: String,
    /// Where the sink listens (with `--target`, the target's next hop must be this).
    pub sink: Option<SocketAddr>,
    /// The sink forgets every Nth message it answers 250 to (a faulty next hop; 0: never).
    pub sink_drops_every: u64,
    /// A progress line a second on standard error.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scenario: Scenario::Relay,
            target: None,
            spawn: None,
            io: None,
            duration: Duration::from_secs(10),
            concurrency: 32,
            threads: 2,
            sources: None,
            pipeline: false,
            messages_per_connection: 1,
            body_size: 2048,
            expect: "530".into(),
            sink: None,
            sink_drops_every: 0,
            progress: false,
        }
    }
}

/// Runs the scenario; the report says whether every check held.
pub fn run(opts: &Options) -> Result<Report, String> {
    let sink = match opts.scenario {
        Scenario::Relay => {
            let at = opts.sink.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            check_target(at)?;
            Some(Sink::start(at, opts.sink_drops_every).map_err(|e| format!("cannot start the sink on {at}: {e}"))?)
        }
        Scenario::DenyStorm => None,
    };
    let default_sources = match opts.scenario {
        Scenario::DenyStorm => DENY_SOURCES,
        Scenario::Relay => ALLOW_SOURCES,
    };
    let sources = Arc::new(Sources::parse(opts.sources.as_deref().unwrap_or(default_sources))?);
    let spawned = match (&opts.target, &opts.spawn) {
        (Some(_), Some(_)) => return Err("give --target or --spawn, not both".into()),
        (None, None) => return Err("give --target ADDR (a running server) or --spawn PATH (an mxgate binary)".into()),
        (Some(_), None) => None,
        (None, Some(path)) => Some(Spawned::start(path, opts, sink.as_ref().map(|s| s.addr))?),
    };
    let target = match (&spawned, opts.target) {
        (Some(s), _) => s.addr,
        (None, Some(t)) => t,
        (None, None) => unreachable!("checked above"),
    };
    check_target(target)?;
    let script = match opts.scenario {
        Scenario::DenyStorm => Script::Deny { expect: opts.expect.clone() },
        Scenario::Relay => Script::Relay(Relay {
            rcpt: format!("user@{RCPT_DOMAIN}"),
            pipeline: opts.pipeline,
            messages: opts.messages_per_connection.max(1),
            body_size: opts.body_size,
        }),
    };
    let plan = Plan {
        target,
        script: Arc::new(script),
        sources,
        concurrency: opts.concurrency.max(1),
        threads: opts.threads.max(1),
        duration: opts.duration,
        drain: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
    };
    let progress = Progress::default();
    let tally = std::thread::scope(|scope| {
        let run = scope.spawn(|| engine::run(&plan, &progress));
        if opts.progress {
            show_progress(&run, &progress);
        }
        run.join().map_err(|_| "the load threads panicked".to_owned())
    })?;
    drop(spawned);

    let ops = match opts.scenario {
        Scenario::DenyStorm => tally.denied,
        Scenario::Relay => tally.accepted.len() as u64,
    };
    let mut phase = Phase::new("main", tally.elapsed, ops, &tally.latency);
    phase.errors = tally.errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    if tally.unfinished > 0 {
        phase.errors.insert("unfinished".into(), tally.unfinished);
    }
    phase.check(format!("{} connections made, none failed", tally.connections), tally.error_count() == 0);
    match opts.scenario {
        Scenario::DenyStorm => {
            phase.check(format!("{} peers got the deny line first, then the close", tally.denied), tally.denied > 0);
        }
        Scenario::Relay => {
            let received = sink.as_ref().map(|s| s.received());
            let (mut lost, mut altered, mut duplicated) = (0u64, 0u64, 0u64);
            if let Some(r) = &received {
                for (id, hash) in &tally.accepted {
                    match r.messages.get(id) {
                        None => lost += 1,
                        Some((h, _)) if h != hash => altered += 1,
                        Some((_, n)) if *n > 1 => duplicated += 1,
                        Some(_) => {}
                    }
                }
            }
            let accepted = tally.accepted.len();
            phase.check(format!("{accepted} messages got 250"), accepted > 0);
            phase.check(format!("{lost} of them lost (never reached the next hop)"), lost == 0);
            phase.check(format!("{altered} of them altered on the way"), altered == 0);
            phase.check(format!("{duplicated} of them delivered more than once"), duplicated == 0);
            if tally.refused > 0 {
                phase.errors.insert("refused".into(), tally.refused);
            }
        }
    }
    Ok(Report { scenario: opts.scenario.name().into(), phases: vec![phase] })
}

/// A line a second: elapsed, conversations done, per second, errors.
fn show_progress<T>(run: &std::thread::ScopedJoinHandle<'_, T>, progress: &Progress) {
    let started = Instant::now();
    let mut last = 0;
    while !run.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed().as_secs();
        if elapsed > last {
            last = elapsed;
            let ops = progress.ops.load(std::sync::atomic::Ordering::Relaxed);
            let errors = progress.errors.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("{elapsed:>4}s  {ops:>9} done  {:>9.0}/s  {errors} errors", ops as f64 / elapsed as f64);
        }
    }
}

/// An mxgate started for the run: listens on an ephemeral port, denies the deny range,
/// relays to the sink; stopped with SIGTERM when dropped.
struct Spawned {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Spawned {
    fn start(path: &std::path::Path, opts: &Options, sink: Option<SocketAddr>) -> Result<Spawned, String> {
        let dir = TempDir::new()?;
        let next_hop = sink.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)));
        let deny = opts.sources.as_deref().filter(|_| opts.scenario == Scenario::DenyStorm).unwrap_or(DENY_SOURCES);
        let config = format!(
            "hostname = \"mx.loadtest\"\n[listen]\naddresses = [\"127.0.0.1:0\"]\nmax_connections = 100000\n\
             [access]\nlist = \"access.list\"\n[abuse]\nmax_connections_per_ip = 10000\n\
             [relay]\ndomains = [\"{RCPT_DOMAIN}\"]\nnext_hops = [\"{next_hop}\"]\n"
        );
        let write = |name: &str, text: &str| {
            std::fs::write(dir.0.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))
        };
        write("mxgate.toml", &config)?;
        write("access.list", &format!("deny {deny}\n"))?;
        let mut command = Command::new(path);
        command.arg("--config").arg(dir.0.join("mxgate.toml"));
        if let Some(io) = &opts.io {
            command.args(["--io", io]);
        }
        command.env("MXGATE_LOG", "warn,mxgate=info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", path.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // the mail log is not needed: read and dropped, so mxgate never blocks on it
                if line.contains("mxgate listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let mut spawned = Spawned { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), _dir: dir };
        let line =
            rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the spawned mxgate did not start listening")?;
        spawned.addr = line
            .split("addresses=")
            .nth(1)
            .and_then(|s| s.split([' ', ',']).next())
            .and_then(|a| a.parse().ok())
            .ok_or(format!("no address in `{line}`"))?;
        Ok(spawned)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill(2) with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unique = format!("mxgate-loadtest-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
