//! The scenarios, and the mxgate a run may start for itself (`--spawn PATH`: a generated
//! configuration and access list, its own sink as the next hop, stopped at the end).
//!
//! - `deny-storm`: peers from denied addresses; each must get the deny line first (no
//!   banner), then the close.
//! - `relay`: complete messages from allowed addresses to the built-in sink; every
//!   message that got 250 must reach the sink byte-exact, once.
//! - `dictionary`: attackers guessing recipients the sink refuses; each address must be
//!   dropped, then banned (its later connections get the ban line).
//! - `mixed`: relay alone, then relay while deny-storm and dictionary attackers run (and
//!   whitelisted attackers, who must never be banned): the good mail's latency under
//!   attack and without, none of it lost.
//! - `slowloris`: silent and one-byte-a-second peers, cut off by the timeouts, while
//!   relay traffic flows.
//! - `reload`: `mixed`'s attacked phase while the spawned mxgate gets SIGHUP every
//!   `--reload-every`: no connection errors.
//! - `drain`: relay while the spawned mxgate gets SIGTERM: every message that got 250
//!   arrived; the rest got a 4xx or a closed connection.
//! - `banned-flood`: connection attempts at a fixed rate (`--rate`) from banned addresses
//!   (the spawned mxgate's ban file bans each of `--sources`, default 127.88.0.0/20), with
//!   `[kernel] mode = --kernel` (off, drop or reset): each attempt must be refused, by the
//!   deny line, a reset or an unanswered SYN; after `--warmup` the flood phase measures
//!   the whole machine's CPU per attempt (and mxgate's), and with the kernel on, how long
//!   each key took to reach the kernel (`mxgate_kernel_ban_seconds`, p99 under 50 ms).
//! - `tls`: `relay` three times: in clear, over STARTTLS with a full handshake on every
//!   connection, and with resumed ones (TLS 1.3 tickets); the relay checks in each, and
//!   (spawned) mxgate's CPU per message in each.

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
use crate::tls::{TlsClient, read_root, self_signed};

/// Denied peers come from here by default (the spawned mxgate denies it).
pub const DENY_SOURCES: &str = "127.66.0.0/16";
/// Allowed peers come from here by default.
pub const ALLOW_SOURCES: &str = "127.77.0.0/16";
/// The recipient domain the spawned mxgate relays for.
pub const RCPT_DOMAIN: &str = "loadtest.test";
/// Dictionary attackers come from here.
pub const ATTACK_SOURCES: &str = "127.44.0.0/16";
/// Whitelisted attackers come from here (the spawned mxgate whitelists it).
pub const WHITELISTED_SOURCES: &str = "127.45.0.0/24";
/// Banned flooders come from here by default (`banned-flood`: each address banned).
pub const BANNED_SOURCES: &str = "127.88.0.0/20";
/// How long a flooder's SYN waits for an answer before it counts as dropped.
pub const FLOOD_PATIENCE: Duration = Duration::from_millis(100);
/// Slow peers come from here.
pub const SLOW_SOURCES: &str = "127.46.0.0/16";
/// The spawned mxgate's `command_timeout` in the slowloris scenario.
pub const SLOW_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    DenyStorm,
    Relay,
    Dictionary,
    Mixed,
    Slowloris,
    Reload,
    Drain,
    Tls,
    BannedFlood,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::DenyStorm,
        Scenario::Relay,
        Scenario::Dictionary,
        Scenario::Mixed,
        Scenario::Slowloris,
        Scenario::Reload,
        Scenario::Drain,
        Scenario::Tls,
        Scenario::BannedFlood,
    ];

    pub fn parse(name: &str) -> Result<Self, String> {
        Scenario::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario `{name}` ({})", names.join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::DenyStorm => "deny-storm",
            Scenario::Relay => "relay",
            Scenario::Dictionary => "dictionary",
            Scenario::Mixed => "mixed",
            Scenario::Slowloris => "slowloris",
            Scenario::Reload => "reload",
            Scenario::Drain => "drain",
            Scenario::Tls => "tls",
            Scenario::BannedFlood => "banned-flood",
        }
    }

    /// Needs a relay sink.
    fn relays(self) -> bool {
        !matches!(self, Scenario::DenyStorm | Scenario::BannedFlood)
    }

    /// Signals the server (or writes its ban file), so it must be the spawned one.
    fn signals(self) -> bool {
        matches!(self, Scenario::Reload | Scenario::Drain | Scenario::BannedFlood)
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
    /// Messages in BDAT chunks (CHUNKING), not DATA.
    pub bdat: bool,
    pub messages_per_connection: u32,
    pub body_size: usize,
    /// What a denied peer's line starts with.
    pub expect: String,
    /// Where the sink listens (with `--target`, the target's next hop must be this).
    pub sink: Option<SocketAddr>,
    /// The sink forgets every Nth message it answers 250 to (a faulty next hop; 0: never).
    pub sink_drops_every: u64,
    /// The sink offers XCLIENT (and greets again after one, as Postfix does).
    pub sink_xclient: bool,
    /// A progress line a second on standard error.
    pub progress: bool,
    /// `relay` against a server whose next hop is not the harness's sink (the C yardstick,
    /// or a relay to one): no sink is started and delivery is not checked here (the
    /// caller checks the count at the next hop).
    pub unchecked: bool,
    /// `reload`: SIGHUP this often.
    pub reload_every: Duration,
    /// The recipients' domain (a spawned mxgate relays `RCPT_DOMAIN`).
    pub domain: String,
    /// `tls` with `--target`: the root the server's certificate chains to (PEM), and the
    /// name it bears. A spawned mxgate gets a generated certificate for `SPAWNED_NAME`.
    pub tls_root: Option<PathBuf>,
    pub tls_name: String,
    /// Every connection first sends a PROXY header carrying its own address, as a load
    /// balancer would (a spawned mxgate trusts 127.0.0.0/8 for it).
    pub proxy: Option<crate::proxy::Version>,
    /// `banned-flood`: the spawned mxgate's `[kernel] mode` (off, drop, reset).
    pub kernel: String,
    /// `banned-flood`: attempts a second.
    pub rate: u64,
    /// `banned-flood`: the flood before the measured phase (keys move into the kernel).
    pub warmup: Duration,
}

/// The spawned mxgate's hostname, and its certificate's name.
pub const SPAWNED_NAME: &str = "mx.loadtest";

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
            bdat: false,
            messages_per_connection: 1,
            body_size: 2048,
            expect: "530".into(),
            sink: None,
            sink_drops_every: 0,
            sink_xclient: false,
            progress: false,
            unchecked: false,
            reload_every: Duration::from_millis(200),
            domain: RCPT_DOMAIN.into(),
            tls_root: None,
            tls_name: SPAWNED_NAME.into(),
            proxy: None,
            kernel: "off".into(),
            rate: 20_000,
            warmup: Duration::from_secs(3),
        }
    }
}

/// Runs the scenario; the report says whether every check held.
pub fn run(opts: &Options) -> Result<Report, String> {
    if opts.unchecked && opts.scenario != Scenario::Relay {
        return Err("--unchecked goes with the relay scenario only".into());
    }
    if opts.proxy.is_some() && !matches!(opts.scenario, Scenario::DenyStorm | Scenario::Relay) {
        return Err("--proxy goes with the deny-storm and relay scenarios".into());
    }
    let sink = if opts.scenario.relays() && !opts.unchecked {
        let at = opts.sink.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        check_target(at)?;
        Some(
            Sink::start(at, opts.sink_drops_every, opts.sink_xclient)
                .map_err(|e| format!("cannot start the sink on {at}: {e}"))?,
        )
    } else {
        None
    };
    let mut spawned = match (&opts.target, &opts.spawn) {
        (Some(_), Some(_)) => return Err("give --target or --spawn, not both".into()),
        (None, None) => return Err("give --target ADDR (a running server) or --spawn PATH (an mxgate binary)".into()),
        (Some(_), None) if opts.scenario.signals() => {
            return Err(format!("{} signals the server: give --spawn PATH", opts.scenario.name()));
        }
        (Some(_), None) => None,
        (None, Some(path)) => Some(Spawned::start(path, opts, sink.as_ref().map(|s| s.addr))?),
    };
    let target = match (&spawned, opts.target) {
        (Some(s), _) => s.addr,
        (None, Some(t)) => t,
        (None, None) => unreachable!("checked above"),
    };
    check_target(target)?;
    let groups = Groups::new(opts, target)?;
    let server = spawned.as_ref().map(|s| s.child.id());
    // the spawned mxgate's CPU, and this process's (the clients and the sink: what shares
    // the machine with it)
    let cpu_now = || (server.and_then(cpu_ticks), cpu_ticks(std::process::id()));
    let server_cpu = |phase: &mut Phase, before: (Option<u64>, Option<u64>)| {
        let (now_server, now_harness) = cpu_now();
        let per_op = |before: u64, after: u64| ticks_to_us(after.saturating_sub(before)) / phase.ops.max(1) as f64;
        if let (Some(before), Some(after)) = (before.0, now_server) {
            phase.server_cpu_us = Some(per_op(before, after));
        }
        if let (Some(before), Some(after)) = (before.1, now_harness) {
            phase.harness_cpu_us = Some(per_op(before, after));
        }
    };
    let phases = match opts.scenario {
        Scenario::DenyStorm => {
            let tally = go(opts, std::slice::from_ref(&groups.deny), None)?.remove(0);
            vec![deny_phase("main", &tally)]
        }
        Scenario::Relay => {
            let before = cpu_now();
            let tally = go(opts, std::slice::from_ref(&groups.relay), None)?.remove(0);
            let mut phase = relay_phase("main", &tally, sink.as_ref());
            server_cpu(&mut phase, before);
            vec![phase]
        }
        Scenario::Dictionary => {
            let tally = go(opts, std::slice::from_ref(&groups.dictionary), None)?.remove(0);
            dictionary_phases(&tally)
        }
        Scenario::Mixed | Scenario::Reload => {
            let mut phases = Vec::new();
            if opts.scenario == Scenario::Mixed {
                let alone = go(opts, std::slice::from_ref(&groups.half_relay), None)?.remove(0);
                phases.push(relay_phase("alone", &alone, sink.as_ref()));
            }
            let plans = [groups.half_relay, groups.deny, groups.dictionary, groups.whitelisted];
            let reloads = (opts.scenario == Scenario::Reload).then_some(opts.reload_every);
            let pid = spawned.as_ref().map(|s| s.child.id());
            let mut tallies = go(opts, &plans, reloads.zip(pid))?.into_iter();
            let (relay, deny, dictionary, whitelisted) =
                (tallies.next(), tallies.next(), tallies.next(), tallies.next());
            let (Some(relay), Some(deny), Some(dictionary), Some(whitelisted)) = (relay, deny, dictionary, whitelisted)
            else {
                return Err("a group's threads did not report".into());
            };
            let mut attacked = relay_phase("attacked", &relay, sink.as_ref());
            if let Some(s) = &spawned
                && let Some(n) = reloads.map(|_| s.signals_sent())
            {
                attacked.check(format!("{n} reloads (SIGHUP) during the phase"), n > 0);
            }
            phases.push(attacked);
            phases.push(deny_phase("deny-storm", &deny));
            phases.extend(dictionary_phases(&dictionary));
            let mut spared = Phase::new("whitelisted", whitelisted.elapsed, whitelisted.spared, &whitelisted.dropped);
            spared.errors = errors(&whitelisted);
            spared.check(
                format!("{} whitelisted attackers dropped, never banned", whitelisted.spared),
                whitelisted.spared > 0 && whitelisted.error_count() == 0,
            );
            phases.push(spared);
            phases
        }
        Scenario::Slowloris => {
            let plans = [groups.relay, groups.idle, groups.trickle];
            let mut tallies = go(opts, &plans, None)?.into_iter();
            let mut phases = Vec::new();
            if let Some(relay) = tallies.next() {
                phases.push(relay_phase("relay", &relay, sink.as_ref()));
            }
            for (name, tally) in ["idle", "trickle"].into_iter().zip(tallies) {
                let cut = tally.cut_off.len();
                let mut phase = Phase::new(name, tally.elapsed, cut, &tally.cut_off);
                phase.errors = errors(&tally);
                phase.check(
                    format!("{cut} slow peers cut off with 421, none left open"),
                    cut > 0 && tally.error_count() == 0,
                );
                phases.push(phase);
            }
            phases
        }
        Scenario::Tls => {
            let root = match (&spawned, &opts.tls_root) {
                (Some(s), _) => s.tls_root.clone().ok_or("the spawned mxgate has no certificate")?,
                (None, Some(path)) => read_root(path)?,
                (None, None) => return Err("tls with --target needs --tls-root FILE (and --tls-name)".into()),
            };
            let mut phases = Vec::new();
            for (name, resume) in [("plain", None), ("tls-full", Some(false)), ("tls-resumed", Some(true))] {
                let plan = match resume {
                    None => groups.relay.clone(),
                    Some(resume) => groups.relay_over(TlsClient::new(root.clone(), &opts.tls_name, resume)?),
                };
                let before = cpu_now();
                let tally = go(opts, std::slice::from_ref(&plan), None)?.remove(0);
                let mut phase = relay_phase(name, &tally, sink.as_ref());
                let (done, resumed) = (tally.handshakes, tally.resumed);
                match resume {
                    None => {}
                    Some(false) => phase.check(format!("{done} full handshakes, {resumed} resumed"), resumed == 0),
                    // the first connections have no ticket yet
                    Some(true) => phase.check(
                        format!("{resumed} of {done} handshakes resumed an earlier session"),
                        resumed > 0 && resumed * 2 > done,
                    ),
                }
                if resume.is_some() {
                    phase.check(format!("{done} handshakes for {} connections", tally.connections), done > 0);
                }
                server_cpu(&mut phase, before);
                phases.push(phase);
            }
            phases
        }
        Scenario::BannedFlood => {
            let metrics = spawned.as_ref().and_then(|s| s.metrics).ok_or("banned-flood needs --spawn")?;
            banned_flood(opts, target, metrics, server)?
        }
        Scenario::Drain => {
            let pid = spawned.as_ref().map(|s| s.child.id());
            let tally = go(opts, std::slice::from_ref(&groups.relay), pid.map(|p| (opts.duration / 2, p)))?.remove(0);
            let mut phase = relay_phase("main", &tally, sink.as_ref());
            // refused connections and 421s are what a draining server says: only losses count
            phase.checks.retain(|(what, _)| !what.contains("connections made"));
            let status = spawned.as_mut().and_then(Spawned::wait_exit);
            let said = status.map_or("no exit status".to_owned(), |c| format!("exit status {c}"));
            phase.check(format!("the server stopped after SIGTERM with {said}"), status == Some(0));
            vec![phase]
        }
    };
    drop(spawned);
    Ok(Report { scenario: opts.scenario.name().into(), phases })
}

/// `banned-flood`'s sources, each banned in the spawned mxgate's ban file: at most a /12.
fn banned_sources(opts: &Options) -> Result<Vec<std::net::IpAddr>, String> {
    let all = Sources::parse(opts.sources.as_deref().unwrap_or(BANNED_SOURCES))?.all();
    if all.len() > 1 << 20 {
        return Err("banned-flood: at most a /12 of sources (each is a line of the ban file)".into());
    }
    Ok(all)
}

/// `banned-flood`: the warm-up, then the measured flood.
fn banned_flood(
    opts: &Options,
    target: SocketAddr,
    metrics: SocketAddr,
    server: Option<u32>,
) -> Result<Vec<Phase>, String> {
    let sources = banned_sources(opts)?;
    let flood =
        |duration| crate::flood::run(target, &sources, opts.rate, duration, opts.threads, FLOOD_PATIENCE, &opts.expect);
    let warm = flood(opts.warmup);
    let before = (crate::flood::machine_busy_ticks(), server.and_then(cpu_ticks), cpu_ticks(std::process::id()));
    let measured = flood(opts.duration);
    let after = (crate::flood::machine_busy_ticks(), server.and_then(cpu_ticks), cpu_ticks(std::process::id()));
    let mut phases = Vec::new();
    for (name, o) in [("warm-up", &warm), ("flood", &measured)] {
        let mut phase = Phase::new(name, o.elapsed, o.refused(), &o.latency);
        phase.errors = o.errors.clone();
        phase.check(
            format!(
                "{} attempts refused: {} by the deny line, {} reset, {} dropped; {} started late",
                o.refused(),
                o.user_space,
                o.reset,
                o.dropped,
                o.late
            ),
            o.errors.is_empty() && o.refused() > 0,
        );
        phases.push(phase);
    }
    let per = |a: Option<u64>, b: Option<u64>| {
        a.zip(b).map(|(a, b)| ticks_to_us(b.saturating_sub(a)) / measured.refused().max(1) as f64)
    };
    let machine = per(before.0, after.0);
    let (mxgate, harness) = (per(before.1, after.1), per(before.2, after.2));
    let flood_phase = phases.last_mut().ok_or("no phase")?;
    flood_phase.server_cpu_us = mxgate;
    flood_phase.harness_cpu_us = harness;
    if let (Some(m), Some(h), Some(x)) = (machine, harness, mxgate) {
        // the flooders' own work (socket, connect, close) is the harness's; the rest is
        // the kernel's outside both processes (softirq) and whatever else ran
        flood_phase.check(
            format!(
                "CPU per attempt (kernel {}): whole machine {m:.1} us = the flooders (harness) {h:.1} + mxgate {x:.1} \
                 + the rest {:.1}; the machine less the flooders {:.1} us",
                opts.kernel,
                m - h - x,
                m - h
            ),
            true,
        );
    }
    if opts.kernel == "off" {
        // a SYN unanswered here is a full backlog: more than user space takes at this rate
        flood_phase.check(
            format!(
                "every attempt answered by the deny line ({} not: lower --rate)",
                measured.reset + measured.dropped
            ),
            measured.reset + measured.dropped == 0,
        );
    } else {
        let kept = measured.reset + measured.dropped;
        flood_phase.check(
            format!("{kept} of {} attempts refused by the kernel (at least 99 %)", measured.refused()),
            kept * 100 >= measured.refused() * 99,
        );
        let text = crate::probe::http_get(metrics, "/metrics").map_err(|e| format!("metrics: {e}"))?;
        match crate::flood::p99_bound(&text, "mxgate_kernel_ban_seconds") {
            Some((p99, n)) => flood_phase.check(
                format!("{n} keys into the kernel; p99 from the decision to the kernel's acknowledgement <= {} ms (under 50 ms)", p99 * 1000.0),
                n > 0 && p99 <= 0.05,
            ),
            None => flood_phase.check("mxgate_kernel_ban_seconds in the metrics".into(), false),
        }
    }
    Ok(phases)
}

/// A process's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the fields after the command name, which is in parentheses and may hold spaces
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn ticks_to_us(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 * 1e6 / hz as f64
}

/// The peer groups a scenario may run.
struct Groups {
    relay_script: Relay,
    relay: Plan,
    /// Relay at half the concurrency (beside attackers).
    half_relay: Plan,
    deny: Plan,
    dictionary: Plan,
    whitelisted: Plan,
    idle: Plan,
    trickle: Plan,
}

impl Groups {
    /// The relay group, over STARTTLS.
    fn relay_over(&self, tls: TlsClient) -> Plan {
        Plan { script: Arc::new(Script::Relay(self.relay_script.clone().with_tls(tls))), ..self.relay.clone() }
    }

    fn new(opts: &Options, target: SocketAddr) -> Result<Groups, String> {
        let sources = |default: &str| -> Result<Arc<Sources>, String> {
            Ok(Arc::new(Sources::parse(opts.sources.as_deref().unwrap_or(default))?))
        };
        let fixed = |range: &str| -> Result<Arc<Sources>, String> { Ok(Arc::new(Sources::parse(range)?)) };
        let plan = |script: Script, sources: Arc<Sources>, concurrency: usize| Plan {
            target,
            script: Arc::new(script),
            sources,
            concurrency: concurrency.max(1),
            threads: opts.threads.max(1),
            duration: opts.duration,
            drain: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            proxy: opts.proxy,
        };
        let relay = Relay::new(
            &format!("user@{}", opts.domain),
            opts.pipeline,
            opts.messages_per_connection.max(1),
            opts.body_size,
        );
        let relay = if opts.bdat { relay.in_chunks() } else { relay };
        let relay_script = if opts.unchecked { relay.unhashed() } else { relay };
        let relay = Script::Relay(relay_script.clone());
        let dictionary = |whitelisted| Script::Dictionary {
            domain: opts.domain.clone(),
            ban_line: opts.expect.clone(),
            whitelisted,
        };
        let c = opts.concurrency.max(1);
        let attackers = (c / 4).max(2);
        let single = opts.scenario != Scenario::Mixed && opts.scenario != Scenario::Reload;
        let relay_sources = if single { sources(ALLOW_SOURCES)? } else { fixed(ALLOW_SOURCES)? };
        Ok(Groups {
            relay_script: relay_script.clone(),
            relay: plan(relay.clone(), relay_sources.clone(), c),
            half_relay: Plan { duration: opts.duration / 2, ..plan(relay, relay_sources, c) },
            deny: Plan {
                duration: if single { opts.duration } else { opts.duration / 2 },
                ..plan(
                    Script::Deny { expect: opts.expect.clone() },
                    if single { sources(DENY_SOURCES)? } else { fixed(DENY_SOURCES)? },
                    if single { c } else { attackers },
                )
            },
            dictionary: Plan {
                duration: if single { opts.duration } else { opts.duration / 2 },
                ..plan(
                    dictionary(false),
                    if single { sources(ATTACK_SOURCES)? } else { fixed(ATTACK_SOURCES)? },
                    if single { c } else { attackers },
                )
            },
            whitelisted: Plan { duration: opts.duration / 2, ..plan(dictionary(true), fixed(WHITELISTED_SOURCES)?, 2) },
            idle: plan(Script::Slow { trickle: false }, fixed(SLOW_SOURCES)?, attackers),
            trickle: plan(Script::Slow { trickle: true }, fixed(SLOW_SOURCES)?, attackers),
        })
    }
}

/// Runs plans at once; with `signal` = (every, pid): SIGHUP every `every` (reload), or
/// one SIGTERM after `every` (drain: the only scenario giving a single plan a signal).
fn go(opts: &Options, plans: &[Plan], signal: Option<(Duration, u32)>) -> Result<Vec<engine::Tally>, String> {
    let progress = Progress::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let done = &done;
    std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            let tallies = engine::run_all(plans, &progress);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            tallies
        });
        if let Some((every, pid)) = signal {
            let sig = if opts.scenario == Scenario::Drain { libc::SIGTERM } else { libc::SIGHUP };
            scope.spawn(move || signal_loop(done, every, pid, sig));
        }
        if opts.progress {
            show_progress(&run, &progress);
        }
        run.join().map_err(|_| "the load threads panicked".to_owned())
    })
}

/// Sends `sig` to `pid` every `every` until `done` (SIGTERM: once).
fn signal_loop(done: &std::sync::atomic::AtomicBool, every: Duration, pid: u32, sig: i32) {
    let mut next = Instant::now() + every;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
        if Instant::now() >= next {
            // SAFETY: kill(2) on the child this run spawned.
            unsafe { libc::kill(pid as i32, sig) };
            SIGNALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if sig == libc::SIGTERM {
                return;
            }
            next += every;
        }
    }
}

/// Signals sent to the spawned server (for the report).
static SIGNALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn errors(tally: &engine::Tally) -> std::collections::BTreeMap<String, u64> {
    let mut errors: std::collections::BTreeMap<String, u64> =
        tally.errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    if tally.unfinished > 0 {
        errors.insert("unfinished".into(), tally.unfinished);
    }
    errors
}

fn deny_phase(name: &str, tally: &engine::Tally) -> Phase {
    let mut phase = Phase::new(name, tally.elapsed, tally.denied, &tally.latency);
    phase.errors = errors(tally);
    phase.check(format!("{} connections made, none failed", tally.connections), tally.error_count() == 0);
    phase.check(format!("{} peers got the deny line first, then the close", tally.denied), tally.denied > 0);
    phase
}

fn relay_phase(name: &str, tally: &engine::Tally, sink: Option<&Sink>) -> Phase {
    let mut phase = Phase::new(name, tally.elapsed, tally.accepted.len() as u64, &tally.latency);
    phase.errors = errors(tally);
    if tally.refused > 0 {
        phase.errors.insert("refused".into(), tally.refused);
    }
    phase.check(format!("{} connections made, none failed", tally.connections), tally.error_count() == 0);
    let Some(sink) = sink else {
        let accepted = tally.accepted.len();
        phase.check(format!("{accepted} messages got 250 (delivery not checked here: --unchecked)"), accepted > 0);
        return phase;
    };
    let received = Some(sink.received());
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
    phase
}

/// Two rows: the time each attacking address took to be dropped, and to be banned.
fn dictionary_phases(tally: &engine::Tally) -> Vec<Phase> {
    let (dropped, banned) = (tally.dropped.len(), tally.banned.len());
    let mut drop_phase = Phase::new("dropped", tally.elapsed, dropped, &tally.dropped);
    drop_phase.check(format!("{dropped} attacking addresses dropped (421 4.7.0)"), dropped > 0);
    let mut ban_phase = Phase::new("banned", tally.elapsed, banned, &tally.banned);
    ban_phase.errors = errors(tally);
    ban_phase.check(format!("{banned} of them banned"), banned > 0 && banned == dropped);
    let on_sight = tally.banned_on_sight;
    ban_phase.check(format!("{on_sight} more refused at their first connection (their /24 escalated)"), true);
    ban_phase.check(
        format!("{} banned addresses refused again on their next connection", tally.confirmed),
        tally.confirmed == banned + on_sight,
    );
    ban_phase.check("no conversation failed".into(), tally.error_count() == 0);
    vec![drop_phase, ban_phase]
}

/// A line a second: elapsed, what the summary's throughput counts (refusals and messages
/// relayed) so far and per second, conversations failed.
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
            let rate = ops as f64 / elapsed as f64;
            eprintln!("{elapsed:>4}s  {ops:>9} refused or relayed  {rate:>9.0}/s  {errors} errors");
        }
    }
}

/// An mxgate started for the run: listens on an ephemeral port, denies the deny range,
/// relays to the sink; stopped with SIGTERM when dropped.
struct Spawned {
    child: Child,
    addr: SocketAddr,
    /// `banned-flood`: where its metrics are served.
    metrics: Option<SocketAddr>,
    /// `tls`: the generated certificate (its own root).
    tls_root: Option<rustls::pki_types::CertificateDer<'static>>,
    _dir: TempDir,
}

impl Spawned {
    fn start(path: &std::path::Path, opts: &Options, sink: Option<SocketAddr>) -> Result<Spawned, String> {
        let dir = TempDir::new()?;
        let next_hop = sink.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)));
        let deny = opts.sources.as_deref().filter(|_| opts.scenario == Scenario::DenyStorm).unwrap_or(DENY_SOURCES);
        if opts.domain != RCPT_DOMAIN {
            return Err(format!("a spawned mxgate relays {RCPT_DOMAIN}: no --domain with --spawn"));
        }
        let command_timeout = match opts.scenario {
            Scenario::Slowloris => format!("{}s", SLOW_COMMAND_TIMEOUT.as_secs()),
            _ => "5m".into(),
        };
        let mut config = format!(
            "hostname = \"{SPAWNED_NAME}\"\n[listen]\naddresses = [\"127.0.0.1:0\"]\nmax_connections = 100000\n\
             drain_timeout = \"10s\"\n[access]\nlist = \"access.list\"\n\
             [abuse]\nmax_connections_per_ip = 10000\nwhitelist = \"whitelist.list\"\n\
             [smtp]\ncommand_timeout = \"{command_timeout}\"\n\
             [relay]\ndomains = [\"{RCPT_DOMAIN}\"]\nnext_hops = [\"{next_hop}\"]\n"
        );
        let write = |name: &str, text: &str| {
            std::fs::write(dir.0.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))
        };
        if opts.proxy.is_some() {
            // the harness is the balancer: its headers carry the addresses judged
            config = config.replace("[listen]\n", "[listen]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n");
        }
        let mut metrics = None;
        if opts.scenario == Scenario::BannedFlood {
            let mut bans = String::new();
            for ip in banned_sources(opts)? {
                bans.push_str(&format!("{ip} until=2100-01-01T00:00:00Z reason=\"loadtest\" offence=1\n"));
            }
            write("bans.list", &bans)?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no port for the metrics: {e}"))?;
            metrics = Some(port);
            config = config.replace("[abuse]\n", "[abuse]\nban_file = \"bans.list\"\n");
            config.push_str(&format!(
                "[metrics]\nlisten = \"{port}\"\n[kernel]\nmode = \"{}\"\ntable = \"mxgate_flood_{}\"\n",
                opts.kernel,
                std::process::id()
            ));
        }
        write("access.list", &format!("deny {deny}\n"))?;
        write("whitelist.list", &format!("{WHITELISTED_SOURCES}\n"))?;
        let mut tls_root = None;
        if opts.scenario == Scenario::Tls {
            let (cert, key, der) =
                self_signed(&[SPAWNED_NAME.to_owned()]).map_err(|e| format!("cannot make a certificate: {e}"))?;
            write("cert.pem", &cert)?;
            write("key.pem", &key)?;
            config.push_str("[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
            tls_root = Some(der);
        }
        write("mxgate.toml", &config)?;
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
        let mut spawned = Spawned { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), metrics, tls_root, _dir: dir };
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

impl Spawned {
    /// Signals sent to it so far.
    fn signals_sent(&self) -> u64 {
        SIGNALS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) for it to exit after SIGTERM; its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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
