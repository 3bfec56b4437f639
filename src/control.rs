//! The control socket: a Unix socket (mode 0600) on which the running instance answers
//! one request a connection, a line of text in, lines of text out.
//!
//! Requests: `explain IP` — the address's live state: failures counted within the
//! window, open connections, and the ban in force; `reload` — load the configuration and
//! lists again, as SIGHUP does, and say what came of it; `ban IP SECONDS REASON` (0
//! seconds: the doubling `ban_duration`), `unban IP|PREFIX`, `bans` (in the ban file's
//! syntax), `stats` (`name value` lines). An answer whose first line starts `error:`
//! reports a failure.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abuse::AbuseKey;
use crate::abuse::bans::MAX_BAN_SECS;
use crate::datetime::UnixTime;
use crate::peer::PeerIp;
use crate::shared::Shared;

/// Longest request line.
const MAX_REQUEST: usize = 512;
/// How long `ask` waits for the running instance.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Longest answer read: `bans` lists up to a million bans, a line each.
const MAX_ANSWER: u64 = 256 << 20;

/// Listens on `path` (replacing a stale socket file) and answers requests on a thread
/// of its own for the life of the process.
pub fn serve(path: &Path, shared: Arc<Shared>) -> io::Result<()> {
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another mxgate answers on it"));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = bind_private(path)?;
    let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
    crate::service::serve("mxgate-control", incoming, move |stream| answer(stream, &shared))
}

/// Binds a socket at `path` that only this user can connect to, from the first moment:
/// it is made inside a fresh folder of mode 0700, set to 0600 there, then renamed into
/// place. (The process-wide umask is not touched: worker threads create files too.)
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| io::Error::other("the control socket path names no file"))?;
    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(name);
    private_name.push(format!(".{}", std::process::id()));
    let private = path.with_file_name(private_name);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let made = private.join("s");
    let bound = UnixListener::bind(&made).and_then(|listener| {
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&made, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&made);
    let _ = std::fs::remove_dir(&private);
    bound
}

fn answer(mut stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let line = crate::service::read_request(&mut stream, Instant::now(), MAX_REQUEST, |r| r.contains(&b'\n'))?;
    let reply = match parse_request(&line) {
        Request::Explain(ip) => explain(shared, PeerIp::new(ip)),
        Request::Reload => reload(shared),
        Request::Stats => {
            let mut out: String = shared.stats().iter().map(|(name, value, _)| format!("{name} {value}\n")).collect();
            for (zone, n) in shared.blocked_by_zone() {
                out.push_str(&format!("dnsbl_blocked{{zone=\"{zone}\"}} {n}\n"));
            }
            out
        }
        Request::Ban { target, secs, reason } => ban(shared, target, secs, &reason),
        Request::Unban(key) => unban(shared, &key),
        Request::Bans => {
            let bans = shared.abuse().bans_in_force(UnixTime::now());
            crate::abuse::file::render(bans.iter().map(|(k, b)| (k, b)))
        }
        Request::Bad(why) => format!("error: {why}\n"),
    };
    crate::service::write_answer(&mut stream, reply.as_bytes())
}

/// What an operator bans or unbans: an address (IPv6: its `ipv6_prefix`), or a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(IpAddr),
    Net(ipnet::IpNet),
}

impl Target {
    /// An address, or a prefix (`192.0.2.0/24`, `2001:db8::/48`; host bits are cleared).
    pub fn parse(text: &str) -> Option<Target> {
        match (text.parse::<IpAddr>(), text.parse::<ipnet::IpNet>()) {
            (Ok(ip), _) => Some(Target::Addr(PeerIp::new(ip).ip())),
            (_, Ok(net)) => Some(Target::Net(net.trunc())),
            _ => None,
        }
    }

    /// The key its ban is kept under.
    fn key(self, ipv6_prefix: u8) -> AbuseKey {
        match self {
            Target::Addr(ip) => AbuseKey::new(PeerIp::new(ip), ipv6_prefix),
            Target::Net(net) => AbuseKey::from_net(net),
        }
    }
}

/// A request on the control socket, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Explain(IpAddr),
    Reload,
    Stats,
    /// SECONDS 0: the doubling `ban_duration`.
    Ban {
        target: Target,
        secs: i64,
        reason: String,
    },
    Unban(String),
    Bans,
    /// Not a request: what to answer (after `error: `).
    Bad(String),
}

/// Reads a request: its first line, at most `MAX_REQUEST` bytes (outside bytes: any
/// of them gets an answer, never a panic).
pub fn parse_request(bytes: &[u8]) -> Request {
    let line = String::from_utf8_lossy(bytes.split(|&b| b == b'\n').next().unwrap_or_default());
    let request = line.trim();
    match request.split_once(' ').unwrap_or((request, "")) {
        ("explain", ip) => match ip.trim().parse::<IpAddr>() {
            Ok(ip) => Request::Explain(ip),
            Err(_) => Request::Bad(format!("`{}` is not an IP address", ip.trim())),
        },
        ("reload", "") => Request::Reload,
        ("stats", "") => Request::Stats,
        ("ban", args) => {
            let mut words = args.trim().splitn(3, ' ');
            let (Some(Some(target)), Some(Ok(secs))) =
                (words.next().map(Target::parse), words.next().map(str::parse::<i64>))
            else {
                return Request::Bad("expected `ban IP|PREFIX SECONDS REASON`".into());
            };
            if !(0..=MAX_BAN_SECS).contains(&secs) {
                return Request::Bad(format!("SECONDS must be from 0 to {MAX_BAN_SECS} (100 years)"));
            }
            let reason = words.next().map(str::trim).filter(|r| !r.is_empty()).unwrap_or("no reason given");
            Request::Ban { target, secs, reason: reason.to_owned() }
        }
        ("unban", key) => Request::Unban(key.trim().to_owned()),
        ("bans", "") => Request::Bans,
        _ => Request::Bad(
            "unknown request (known: explain IP, reload, ban IP|PREFIX SECONDS REASON, unban IP|PREFIX, bans, stats)"
                .into(),
        ),
    }
}

fn explain(shared: &Shared, peer: PeerIp) -> String {
    let snapshot = shared.snapshot();
    let config = &snapshot.config.abuse;
    let abuse = shared.abuse();
    let key = AbuseKey::new(peer, config.ipv6_prefix);
    let now = UnixTime::now();
    let mut out = format!(
        "counted as {key}: {} failures in the last {:?} (ban at {}), {} connections open\n",
        abuse.counters.count(key, now.0),
        config.failure_window,
        config.failure_threshold,
        abuse.connections.of(key),
    );
    match abuse.ban_of(key, now) {
        Some((banned, ban)) => {
            let by = match &ban.from {
                Some(node) => format!("made by node {node} of the fleet"),
                None => "made here".to_owned(),
            };
            out.push_str(&format!(
                "banned as {banned} until {} ({}, {by})\n",
                UnixTime(ban.until).rfc3339(),
                ban.reason
            ));
        }
        None => out.push_str("not banned\n"),
    }
    match shared.passed().until(peer.ip(), now) {
        Some(until) => out.push_str(&format!("screening: passed, skips it until {}\n", until.rfc3339())),
        None => out.push_str("screening: not remembered as passed\n"),
    }
    out
}

fn reload(shared: &Shared) -> String {
    match shared.reload("control socket") {
        Ok(r) => {
            let mut out = format!(
                "reloaded {} ({} access entries, {} whitelist entries)\n",
                r.from, r.access_entries, r.whitelist_entries
            );
            for name in r.at_restart {
                out.push_str(&format!("{name} changed: read at start only, it takes effect at the next start\n"));
            }
            out
        }
        Err(problems) => {
            format!("error: reload refused: {} problem(s); nothing changed\n{problems}\n", problems.0.len())
        }
    }
}

/// `ban IP SECONDS REASON`: SECONDS 0 for the doubling `ban_duration`.
fn ban(shared: &Shared, target: Target, secs: i64, reason: &str) -> String {
    let snapshot = shared.snapshot();
    // an address the whitelist takes is never banned (a prefix's whitelisted addresses
    // stay served: the gate asks the whitelist first)
    if let Target::Addr(ip) = target
        && let (Some(rule), Some(file)) = (snapshot.whitelist.decide(ip).rule, snapshot.whitelist.file())
    {
        return format!(
            "error: {ip} is whitelisted ({} at {}:{}): never banned\n",
            rule.net,
            file.display(),
            rule.line
        );
    }
    let config = &snapshot.config.abuse;
    if let Target::Net(ipnet::IpNet::V6(net)) = target
        && net.prefix_len() > config.ipv6_prefix
    {
        return format!(
            "error: IPv6 peers are counted and banned per /{} (abuse.ipv6_prefix): ban {net} as a /{} or a wider prefix\n",
            config.ipv6_prefix, config.ipv6_prefix
        );
    }
    let key = target.key(config.ipv6_prefix);
    let now = UnixTime::now();
    let until = (secs > 0).then(|| now.0.saturating_add(secs));
    match shared.abuse().impose(key, reason.to_owned(), until, now, config) {
        Some(b) => format!("banned {key} until {} (offence {})\n", UnixTime(b.until).rfc3339(), b.offence),
        None => format!("error: {} bans in force: not banning {key}\n", crate::abuse::bans::MAX_BANS),
    }
}

/// `unban IP|PREFIX`: an address, or a prefix: its own ban and every ban inside it (the
/// addresses whose bans escalated to it, say), in one request.
fn unban(shared: &Shared, text: &str) -> String {
    let snapshot = shared.snapshot();
    let Some(target) = Target::parse(text) else {
        return format!("error: `{text}` is neither an IP address nor a prefix\n");
    };
    let key = target.key(snapshot.config.abuse.ipv6_prefix);
    let now = UnixTime::now();
    let abuse = shared.abuse();
    let inside: Vec<AbuseKey> = match target {
        Target::Net(net) => abuse
            .bans_in_force(now)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| *k != key && net.contains(&k.net()))
            .collect(),
        Target::Addr(_) => Vec::new(),
    };
    let mut out = String::new();
    if let Some(b) = abuse.lift(key, now) {
        out.push_str(&format!("unbanned {key} (was until {})\n", UnixTime(b.until).rfc3339()));
    }
    for k in inside {
        if let Some(b) = abuse.lift(k, now) {
            out.push_str(&format!("unbanned {k} (was until {})\n", UnixTime(b.until).rfc3339()));
        }
    }
    if out.is_empty() {
        out = format!("error: {key} is not banned\n");
    }
    if let Some(prefix) = key.escalation()
        && let Some(until) = abuse.banned(prefix, now)
    {
        out.push_str(&format!("{prefix} is banned until {}: still refused\n", UnixTime(until).rfc3339()));
    }
    out
}

/// Sends `request` to the instance listening on `path`; its answer.
pub fn ask(path: &Path, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream.take(MAX_ANSWER).read_to_string(&mut answer)?;
    Ok(answer)
}
