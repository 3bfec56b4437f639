//! The `mxgate` command: run the server, check a configuration, explain a verdict.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use mxgate::abuse::AbuseKey;
use mxgate::access::Action;
use mxgate::config::{Config, IoMode, LogFormat};
use mxgate::datetime::UnixTime;
use mxgate::net::Server;
use mxgate::peer::PeerIp;
use mxgate::problem::Problems;
use mxgate::shared::Shared;
use mxgate::snapshot::Snapshot;

#[derive(Parser)]
#[command(name = "mxgate", version, about = "SMTP edge relay: judges every peer before the banner")]
struct Cli {
    /// TOML configuration file; without it, the embedded default (127.0.0.1:2525).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// I/O driver, overriding `[listen] io`: auto, uring or epoll.
    #[arg(long, value_name = "DRIVER")]
    io: Option<IoMode>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and every list file; print every problem.
    Check,
    /// Print the verdict for an address and why.
    Explain {
        /// An IPv4 or IPv6 address.
        ip: IpAddr,
    },
    /// Have the running instance load its configuration and lists again (as SIGHUP does)
    /// over its control socket; the files are checked here first.
    Reload,
    /// Ban an address or a prefix on the running instance, over its control socket;
    /// recorded in the ban file like every ban.
    Ban {
        /// An IPv4 or IPv6 address (IPv6: its `ipv6_prefix` is banned), or a prefix
        /// (`192.0.2.0/24`, `2001:db8::/48`).
        target: String,
        /// How long (e.g. `2h`, `7d`; at most `36525d`, 100 years); without it,
        /// `ban_duration` doubled for each remembered offence, as for automatic bans.
        #[arg(long = "for", value_name = "DURATION", value_parser = mxgate::units::parse_ban_duration)]
        duration: Option<std::time::Duration>,
        /// Why, as the log and the ban file will say.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Lift the ban on an address or on a banned prefix (as `bans` lists it) on the
    /// running instance, and forget its offences.
    Unban {
        /// An IP address or a prefix.
        key: String,
    },
    /// List the bans in force on the running instance, in the ban file's syntax.
    Bans,
    /// What the running instance has done since it started: `name value` lines.
    Stats,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_some() {
        // a command's output piped into `head` and the like: end quietly when the reader
        // has gone, as Unix tools do (the server itself keeps ignoring SIGPIPE)
        // SAFETY: restores the default disposition of one signal, before any thread starts
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let config = match &cli.config {
        Some(file) => Config::load(file),
        None => Ok(Config::embedded()),
    };
    // as the file says, or (a file with problems: they are logged) the defaults
    init_logging(&config.as_ref().map_or_else(|_| Config::embedded().log, |c| c.log.clone()));
    let snapshot = config.and_then(Snapshot::load);
    match cli.command {
        Some(Command::Check) => check(snapshot),
        Some(Command::Explain { ip }) => explain(snapshot, ip),
        Some(Command::Reload) => {
            ask_running(snapshot, "reload", "not reloaded (the running instance would refuse them)")
        }
        Some(Command::Ban { target, duration, reason }) => match ban_request(&target, duration, reason) {
            Ok(request) => ask_running(snapshot, &request, "nothing asked"),
            Err(e) => {
                println!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Unban { key }) => ask_running(snapshot, &format!("unban {}", key.trim()), "nothing asked"),
        Some(Command::Bans) => ask_running(snapshot, "bans", "nothing asked"),
        Some(Command::Stats) => ask_running(snapshot, "stats", "nothing asked"),
        None => run(snapshot, cli.io),
    }
}

/// Log lines to stderr, as `[log]` says (`MXGATE_LOG` or `RUST_LOG`, when set, is the
/// filter instead of `level`).
fn init_logging(log: &mxgate::config::Log) {
    let filter =
        std::env::var("MXGATE_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| log.level.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            mxgate::logfmt::set_json();
            builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init()
        }
    }
}

fn check(snapshot: Result<Snapshot, Problems>) -> ExitCode {
    match snapshot {
        Ok(s) => {
            // a ban file that does not read would be moved aside at start
            let bans = match &s.config.abuse.ban_file {
                Some(path) => match std::fs::read(path) {
                    Ok(text) => match mxgate::abuse::file::parse(&text, path) {
                        Ok(bans) => bans.len(),
                        Err(problem) => {
                            println!("{problem}");
                            println!("1 problem(s): mxgate would move the ban file aside at start");
                            return ExitCode::FAILURE;
                        }
                    },
                    Err(_) => 0, // created with the first ban
                },
                None => 0,
            };
            for warning in s.warnings() {
                println!("warning: {warning}");
            }
            let tls = if s.tls.is_some() { ", STARTTLS with its certificate" } else { "" };
            let fleet = match &s.config.cluster {
                Some(c) => format!(", node {} of the fleet on Redis at {}:{}", c.node, c.host, c.port),
                None => String::new(),
            };
            println!(
                "{}: valid ({} access entries, {} whitelist entries, {bans} bans in the ban file{tls}{fleet})",
                s.config.describe(),
                s.access.len(),
                s.whitelist.len()
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("{problems}");
            println!("{} problem(s); nothing was changed", problems.0.len());
            ExitCode::FAILURE
        }
    }
}

fn explain(snapshot: Result<Snapshot, Problems>, ip: IpAddr) -> ExitCode {
    let s = match snapshot {
        Ok(s) => s,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    let peer = PeerIp::new(ip);
    if peer.ip() != ip {
        println!("{ip} is IPv4-mapped: judged as {peer}");
    }
    let verdict = s.access.decide(peer.ip());
    let whitelisted = s.whitelist.decide(peer.ip()).rule.is_some();
    // the headline is what the peer gets: a ban in force refuses an address the lists allow
    match (verdict.action, ban_in_file(&s, peer)) {
        (Action::Allow, Ok(Some((key, ban)))) if !whitelisted => {
            println!("{peer}: deny (banned: {key} until {})", UnixTime(ban.until).rfc3339())
        }
        (action, _) => println!("{peer}: {action}"),
    }
    if s.config.listen.is_balancer(peer.ip()) {
        println!(
            "  a trusted balancer (listen.proxy_protocol_from): its connections are judged on the \
             address their PROXY header carries; this verdict is for its own health checks (LOCAL)"
        );
    }
    match (verdict.rule, s.access.file()) {
        (Some(rule), Some(file)) => {
            println!("  rule: {} {} at {}:{}", rule.action, rule.net, file.display(), rule.line)
        }
        _ => println!("  no list entry matches: [access] default = \"{}\"", s.access.default_action()),
    }
    if verdict.action == Action::Deny {
        println!("  reply: {}", s.config.access.deny_reply.to_line(&s.config.hostname, UnixTime::now()));
    }
    if let (Some(shadow), Some(file)) = (&s.shadow, &s.config.access.shadow_list) {
        let v = shadow.decide(peer.ip());
        let line = v.rule.map_or_else(|| "its default".to_owned(), |r| format!("line {}", r.line));
        println!("  shadow list: would {} ({}, {line}; never enforced)", v.action, file.display());
    }
    let white = s.whitelist.decide(peer.ip());
    match (white.rule, s.whitelist.file()) {
        (Some(rule), Some(file)) => println!("  whitelisted: {} at {}:{}", rule.net, file.display(), rule.line),
        _ => println!("  not whitelisted"),
    }
    explain_bans(&s, peer);
    explain_screening(&s, peer);
    if s.config.abuse.shadow {
        println!("  [abuse] shadow = true: no ban is made for failures or drops, only logged");
    }
    ExitCode::SUCCESS
}

/// What screening would ask of the address: the blocklists' answers now, and the score.
fn explain_screening(s: &Snapshot, peer: PeerIp) {
    let screen = &s.config.screen;
    if screen.dnsbl.is_empty() {
        return;
    }
    let servers =
        if screen.resolvers.is_empty() { mxgate::screen::dnsbl::system_resolvers() } else { screen.resolvers.clone() };
    let answers = mxgate::screen::dnsbl::ask_now(&servers, screen.dns_timeout, peer.ip(), &screen.dnsbl);
    for (zone, answer) in screen.dnsbl.iter().zip(&answers) {
        let said = match answer {
            mxgate::screen::dnsbl::Answer::NotListed => "not listed".to_owned(),
            mxgate::screen::dnsbl::Answer::Listed(a) => {
                let results: Vec<String> = a.iter().map(ToString::to_string).collect();
                let counts = if zone.lists(answer) { "counts" } else { "outside its match" };
                format!("listed ({}; {counts})", results.join(", "))
            }
            mxgate::screen::dnsbl::Answer::Failed(f) => format!("no answer ({f:?}): scores 0"),
        };
        println!("  dnsbl {} (weight {}): {said}", zone.zone, zone.weight);
    }
    let answers: Vec<Option<mxgate::screen::dnsbl::Answer>> = answers.into_iter().map(Some).collect();
    let (score, heaviest) = mxgate::screen::dnsbl::score(&screen.dnsbl, &answers);
    match heaviest.filter(|_| score >= screen.dnsbl_threshold) {
        Some(i) => println!(
            "  dnsbl score {score} (threshold {}): blocked using {} (unless remembered as passed)",
            screen.dnsbl_threshold, screen.dnsbl[i].zone
        ),
        None => println!("  dnsbl score {score} (threshold {}): not blocked", screen.dnsbl_threshold),
    }
}

/// The ban file's entry for the address, and the running instance's live state.
/// The ban in force on the peer's address (or its prefix) in the ban file, if any; Err
/// says why the file cannot tell.
fn ban_in_file(s: &Snapshot, peer: PeerIp) -> Result<Option<(AbuseKey, mxgate::abuse::Ban)>, String> {
    let key = AbuseKey::new(peer, s.config.abuse.ipv6_prefix);
    let now = UnixTime::now();
    let Some(path) = &s.config.abuse.ban_file else {
        return Err("ban file: none configured (bans live in memory only)".into());
    };
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("ban file {}: {e}", path.display())),
        Ok(text) => match mxgate::abuse::file::parse(&text, path) {
            Err(problem) => Err(format!("ban file unreadable: {problem}")),
            Ok(bans) => {
                Ok(bans.into_iter().find(|(k, b)| (*k == key || Some(*k) == key.escalation()) && b.until > now.0))
            }
        },
    }
}

fn explain_bans(s: &Snapshot, peer: PeerIp) {
    match (ban_in_file(s, peer), &s.config.abuse.ban_file) {
        (Err(why), _) => println!("  {why}"),
        (Ok(Some((k, b))), Some(path)) => println!(
            "  banned: {k} until {} ({}, offence {}{}) in {}",
            UnixTime(b.until).rfc3339(),
            b.reason,
            b.offence,
            b.from.as_ref().map(|n| format!(", made by node {n}")).unwrap_or_default(),
            path.display()
        ),
        (Ok(_), Some(path)) => println!("  not banned in {}", path.display()),
        (Ok(_), None) => {}
    }
    match &s.config.control {
        None => println!("  live state (failure count): needs [control] socket"),
        Some(c) => match mxgate::control::ask(&c.socket, &format!("explain {}", peer.ip())) {
            Ok(answer) => answer.lines().for_each(|l| println!("  live: {l}")),
            Err(e) => println!("  live state: no running mxgate on {} ({e})", c.socket.display()),
        },
    }
}

/// Sends `request` to the running instance's control socket and prints its answer; a
/// failure when its first line starts `error:`. With problems in the files, nothing is
/// asked (`not_asked` says so).
fn ask_running(snapshot: Result<Snapshot, Problems>, request: &str, not_asked: &str) -> ExitCode {
    let s = match snapshot {
        Ok(s) => s,
        Err(problems) => {
            println!("{problems}");
            println!("{} problem(s): {not_asked}", problems.0.len());
            return ExitCode::FAILURE;
        }
    };
    let Some(control) = &s.config.control else {
        println!(
            "{}: talking to the running instance needs [control] socket (or send SIGHUP to reload)",
            s.config.describe()
        );
        return ExitCode::FAILURE;
    };
    match mxgate::control::ask(&control.socket, request) {
        Ok(answer) => {
            print!("{answer}");
            if answer.starts_with("error:") { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(e) => {
            println!("no running mxgate on {} ({e})", control.socket.display());
            ExitCode::FAILURE
        }
    }
}

/// `mxgate ban` arguments that cannot go in one control request.
#[derive(Debug, thiserror::Error)]
enum BanRequestError {
    #[error("--reason: one line of at most 200 bytes")]
    ReasonTooLong,
    #[error("`{0}` is neither an IP address nor a prefix (e.g. 192.0.2.7 or 192.0.2.0/24)")]
    NotATarget(String),
}

/// The control request for `mxgate ban`: an address or a prefix, a reason of one line,
/// short enough for it.
fn ban_request(
    target: &str,
    duration: Option<std::time::Duration>,
    reason: Option<String>,
) -> Result<String, BanRequestError> {
    let target = match mxgate::control::Target::parse(target.trim()) {
        Some(mxgate::control::Target::Addr(ip)) => ip.to_string(),
        Some(mxgate::control::Target::Net(net)) => net.to_string(),
        None => return Err(BanRequestError::NotATarget(target.to_owned())),
    };
    let reason = reason.unwrap_or_default();
    if reason.chars().any(char::is_control) || reason.len() > 200 {
        return Err(BanRequestError::ReasonTooLong);
    }
    let secs = duration.map_or(0, |d| d.as_secs().max(1));
    Ok(format!("ban {target} {secs} {reason}"))
}

fn control_socket(shared: &Shared) -> Option<PathBuf> {
    shared.snapshot().config.control.as_ref().map(|c| c.socket.clone())
}

fn run(snapshot: Result<Snapshot, Problems>, io: Option<IoMode>) -> ExitCode {
    let snapshot = match snapshot {
        Ok(s) => s,
        Err(problems) => {
            for p in &problems.0 {
                tracing::error!("{p}");
            }
            tracing::error!("{} problem(s) in the configuration; not started", problems.0.len());
            return ExitCode::FAILURE;
        }
    };
    // Before any thread starts, so that every thread inherits the mask and the
    // signals wait for `sigwait` below.
    let signals = signals::block();
    signals::raise_fd_limit();
    let io = io.unwrap_or(snapshot.config.listen.io);
    for warning in snapshot.warnings() {
        tracing::warn!("{warning}");
    }
    let (access_entries, whitelist_entries) = (snapshot.access.len(), snapshot.whitelist.len());
    let shared = match Shared::new(snapshot) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start the ban keeper thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let control = control_socket(&shared);
    // metrics first: /readyz says 503 until the listeners are up
    if let Some(addr) = shared.snapshot().config.metrics.as_ref().map(|m| m.listen) {
        match mxgate::metrics::serve(addr, Arc::clone(&shared)) {
            Ok(bound) => tracing::info!("metrics at http://{bound}/metrics"),
            Err(e) => {
                tracing::error!("cannot serve metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let server = match Server::start(Arc::clone(&shared), io) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = shared.start_kernel(server.local_addrs()) {
        tracing::error!("cannot start the kernel keeper thread: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(path) = control
        && let Err(e) = mxgate::control::serve(&path, Arc::clone(&shared))
    {
        tracing::error!("cannot serve the control socket {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let addresses: Vec<String> = server.local_addrs().iter().map(ToString::to_string).collect();
    let config = &shared.snapshot().config;
    let next_hops: Vec<String> = config.relay.next_hops.iter().map(ToString::to_string).collect();
    let ban_file = config.abuse.ban_file.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string());
    tracing::info!(
        addresses = %addresses.join(","),
        threads = server.threads(),
        io = %server.driver(),
        access_entries,
        whitelist_entries,
        relay_domains = %mxgate::logfmt::value(&config.relay.domains.join(",")),
        next_hops = %next_hops.join(","),
        ban_file = %mxgate::logfmt::value(&ban_file),
        "mxgate listening"
    );
    mxgate::notify::notify(&format!("READY=1\nSTATUS=listening on {}", addresses.join(",")));
    loop {
        match signals::wait(&signals) {
            libc::SIGHUP => {
                let _ = shared.reload("SIGHUP"); // logged
            }
            sig => {
                tracing::info!("signal {sig}: draining connections, then exiting (send it again to exit at once)");
                mxgate::notify::notify("STOPPING=1");
                server.shutdown();
                break;
            }
        }
    }
    let drained = Arc::clone(&shared);
    std::thread::spawn(move || {
        server.join();
        drained.stop_kernel();
        tracing::info!("mxgate stopped");
        std::process::exit(0);
    });
    let sig = signals::wait(&signals);
    tracing::warn!("signal {sig} while draining: exiting now");
    shared.stop_kernel();
    ExitCode::FAILURE
}

mod signals {
    /// Blocks SIGTERM, SIGINT and SIGHUP for this thread and the threads it starts.
    pub fn block() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data; every call gets valid pointers to it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        }
    }

    /// Waits for one of the blocked signals.
    pub fn wait(set: &libc::sigset_t) -> i32 {
        let mut sig = 0;
        // SAFETY: valid pointers to a sigset_t and an int.
        while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
        sig
    }

    /// Each connection is a descriptor: use all the kernel allows us.
    pub fn raise_fd_limit() {
        // SAFETY: valid pointers to an rlimit.
        unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}
