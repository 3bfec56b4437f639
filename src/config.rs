//! Configuration: a TOML file parsed once into types.
//!
//! Every key has a default, so a file gives only what it changes, and no file at all is
//! the embedded default (listen on 127.0.0.1:2525). Unknown keys are errors. Loading
//! reports every problem at once, each with file, line and key, and a config with any
//! problem is not used. Paths are relative to the config file's folder.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::access::Action;
use crate::problem::{Conflict, EntryError, Fault, Invalid, Problem, Problems, RedisUrlFault};
use crate::template::{MAX_REPLY_LEN, ReplyTemplate};
use crate::units::{parse_duration, parse_size};

/// The default reply to a denied or banned peer.
pub const DEFAULT_DENY_REPLY: &str = "530 5.7.1 {hostname} ESMTP denied access at {time}";

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from; `None` for the embedded default.
    pub file: Option<PathBuf>,
    /// Our name in the banner, replies and `Received:` headers.
    pub hostname: String,
    pub listen: Listen,
    pub access: Access,
    pub abuse: Abuse,
    pub smtp: Smtp,
    pub relay: Relay,
    pub tls: Option<Tls>,
    pub screen: Screen,
    /// `[cluster]`: the fleet's Redis; absent: a single node.
    pub cluster: Option<Cluster>,
    pub control: Option<Control>,
    pub metrics: Option<Metrics>,
    pub log: Log,
    pub kernel: Kernel,
}

/// `[cluster]`: bans and failure counts shared through Redis (or Valkey).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    pub redis: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: u32,
    /// The password, in a file of its own (not in the configuration).
    pub password_file: Option<PathBuf>,
    /// This node's name in the fleet (default: `hostname`).
    pub node: String,
    /// The namespace of keys and of the channel.
    pub prefix: String,
    /// How often the failure counts' increments go to Redis.
    pub flush_interval: Duration,
}

/// `[screen]`: tests before the banner for allowed peers not remembered as passing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Screen {
    /// The pregreet test: the greeting's first line, then `greet_wait` of silence.
    pub pregreet: bool,
    pub greet_wait: Duration,
    /// How long a peer that passed skips the tests.
    pub pass_ttl: Duration,
    /// Where the passes in force are kept across restarts (none: in memory only).
    pub cache_file: Option<PathBuf>,
    /// `[[screen.dnsbl]]`: the zones asked, with their weights.
    pub dnsbl: Vec<Zone>,
    /// A score at or over it blocks the peer.
    pub dnsbl_threshold: i32,
    /// The DNS servers asked; empty: the nameservers of /etc/resolv.conf.
    pub resolvers: Vec<SocketAddr>,
    pub dns_timeout: Duration,
}

/// One `[[screen.dnsbl]]` entry (asked and scored by `dnsbl`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    /// Lower case, without the trailing dot.
    pub zone: String,
    /// Added to the score when it lists the peer; negative for allowlists.
    pub weight: i32,
    /// Result addresses that count (inclusive ranges); empty: any.
    pub matches: Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring, or epoll where the kernel refuses io_uring.
    Auto,
    Uring,
    Epoll,
}

impl std::str::FromStr for IoMode {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            _ => Err(Invalid::NotOneOf {
                given: s.to_owned(),
                what: "an I/O driver",
                choices: "\"auto\", \"uring\" or \"epoll\"",
            }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Listen {
    pub addresses: Vec<SocketAddr>,
    /// Acceptor threads; 0 means one per core.
    pub threads: usize,
    pub io: IoMode,
    pub max_connections: u32,
    pub drain_timeout: Duration,
    /// Balancers whose connections start with a PROXY header (v1 or v2).
    pub proxy_protocol_from: Vec<IpNet>,
    /// Longest wait for that header.
    pub proxy_timeout: Duration,
    /// Join another process's listener on the same address on purpose (SO_REUSEPORT);
    /// false: an address another process listens on is an error at start.
    pub share: bool,
}

impl Listen {
    /// The acceptor threads this setting makes: `threads`, or one per core for 0.
    pub fn threads_in_force(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Listen {
    /// `ip` (canonical) is a trusted balancer: its connections carry a PROXY header.
    #[inline]
    pub fn is_balancer(&self, ip: std::net::IpAddr) -> bool {
        !self.proxy_protocol_from.is_empty() && self.proxy_protocol_from.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Clone, Debug)]
pub struct Access {
    pub default: Action,
    pub list: Option<PathBuf>,
    pub deny_reply: ReplyTemplate,
    /// A candidate list, same syntax: what it would deny is logged and counted, never
    /// enforced.
    pub shadow_list: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Abuse {
    pub max_failed_commands: u32,
    pub max_failed_recipients: u32,
    pub ban_on_drop: bool,
    pub whitelist: Option<PathBuf>,
    pub ban_file: Option<PathBuf>,
    pub failure_threshold: u32,
    pub failure_window: Duration,
    /// Bytes for the failure counters' table of failing keys (read at start).
    pub counter_memory: u64,
    pub ban_duration: Duration,
    pub max_ban_duration: Duration,
    pub ipv6_prefix: u8,
    pub escalate_after: u32,
    pub ban_reply: ReplyTemplate,
    pub max_connections_per_ip: u32,
    /// Log and count the bans failures and drops would make, and make none.
    pub shadow: bool,
}

#[derive(Clone, Debug)]
pub struct Smtp {
    pub max_recipients: u32,
    pub max_message_size: u64,
    /// Longest wait for the next command.
    pub command_timeout: Duration,
    /// Longest wait for the next block of a message body.
    pub data_timeout: Duration,
    /// Longest a whole transaction (MAIL to the reply after the body) may take.
    pub transaction_timeout: Duration,
    /// Slowest body a peer may send, in bytes per second (after `DATA_RATE_GRACE`); 0: no minimum.
    pub min_data_rate: u64,
    /// MAIL only after STARTTLS (`530 5.7.0` before it).
    pub require_tls: bool,
}

#[derive(Clone, Debug)]
pub struct Relay {
    /// Lower-case domains; a leading `.` also matches every subdomain.
    pub domains: Vec<String>,
    /// Every next hop's address, once: the default route's in order first, then each
    /// route's not already among them (a name's addresses where it stood, once the file
    /// is loaded: see `Config::load`). A route names its next hops by their place here.
    pub next_hops: Vec<SocketAddr>,
    /// The routes: `[relay] next_hops` (the default route, `routes[0]`, without domains),
    /// then each `[[relay.route]]` in the file's order.
    pub routes: Vec<Route>,
    /// Longest wait for a connection to the next hop to be made.
    pub connect_timeout: Duration,
    /// Longest wait for any reply of the next hop (its greeting too).
    pub reply_timeout: Duration,
    /// Idle next-hop connections each worker keeps per next hop for reuse.
    pub max_idle_connections: u32,
    /// How long an idle next-hop connection is kept.
    pub idle_timeout: Duration,
    /// STARTTLS to the next hop.
    pub tls: RelayTls,
    /// Roots the next hops' certificates must chain to (PEM); none: the machine's store.
    pub tls_ca: Option<PathBuf>,
    /// Check the next hop's certificate (chain and name); false: any certificate will do
    /// (the handshake's own signature is still checked).
    pub tls_verify: bool,
    /// The name next hops' certificates must carry; none: each next hop's IP address.
    pub tls_name: Option<String>,
    /// How the peer's identity is told to the next hop; `None`: whichever it offers
    /// (XCLIENT first).
    pub forward_client: Option<ForwardClient>,
}

/// A route: recipients of its domains go to its next hops (`[[relay.route]]`; the most
/// specific domain wins, see `smtp::policy`), others to the default route's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Lower-case domains, each covered by `[relay] domains`; a leading `.` also matches
    /// every subdomain. None for the default route.
    pub domains: Vec<String>,
    /// Its next hops as written: addresses, and names to resolve.
    pub next_hop_names: Vec<HopName>,
    /// Its next hops in order, as places in `Relay::next_hops`.
    pub hops: Vec<usize>,
}

impl Route {
    /// What the mail log calls it: its first domain as written, or `default`.
    pub fn name(&self) -> &str {
        self.domains.first().map_or("default", String::as_str)
    }
}

/// A `[relay] next_hops` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HopName {
    Addr(SocketAddr),
    /// `host:port`, resolved when the file is loaded (at start and at each reload).
    Name(String, u16),
}

impl std::fmt::Display for HopName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HopName::Addr(a) => write!(f, "{a}"),
            HopName::Name(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// `[relay] forward_client`: the peer's address, port and greeting told to the next hop
/// (Postfix's XCLIENT or XFORWARD), or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardClient {
    Xclient,
    Xforward,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelayTls {
    Off,
    /// STARTTLS when the next hop offers it, in clear otherwise.
    Opportunistic,
    /// A next hop without STARTTLS, or whose handshake fails, is a failed next hop.
    Required,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The oldest protocol version offered.
    pub min_version: TlsVersion,
    /// `[[tls.sni]]`: certificates chosen by the name the peer asks for.
    pub sni: Vec<SniCert>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniCert {
    /// Lower case; `*.example.com` matches one label before `example.com`.
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub socket: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metrics {
    pub listen: SocketAddr,
}

/// `[log]`: how log lines are written, and which (read at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// The least severe level written: error, warn, info, debug or trace
    /// (`MXGATE_LOG`, when set, takes its place: a filter with targets).
    pub level: String,
}

/// `[kernel]`: banned floods refused by the kernel (nftables), not in user space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// `None`: off (read at start).
    pub mode: Option<crate::kernel::Action>,
    /// The nftables table (family inet) mxgate owns (read at start).
    pub table: String,
    /// Refusals of a banned key within a minute before it enters the kernel's set (0: as
    /// soon as the ban is made).
    pub after_refusals: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line an event, logfmt-compatible (`key=value`, every outside value escaped).
    Text,
    /// One JSON object a line, with stable field names (docs/operations.md).
    Json,
}

/// Every key, declared once: its section (`""`: the top level) and name. Parsing
/// refuses any other key, and a test holds the key table of docs/operations.md against this list.
pub const KEYS: &[(&str, &str)] = &[
    ("", "hostname"),
    ("listen", "addresses"),
    ("listen", "threads"),
    ("listen", "io"),
    ("listen", "drain_timeout"),
    ("listen", "max_connections"),
    ("listen", "proxy_protocol_from"),
    ("listen", "proxy_timeout"),
    ("listen", "share"),
    ("access", "default"),
    ("access", "list"),
    ("access", "deny_reply"),
    ("access", "shadow_list"),
    ("abuse", "whitelist"),
    ("abuse", "max_failed_commands"),
    ("abuse", "max_failed_recipients"),
    ("abuse", "ban_on_drop"),
    ("abuse", "failure_threshold"),
    ("abuse", "failure_window"),
    ("abuse", "counter_memory"),
    ("abuse", "ban_duration"),
    ("abuse", "max_ban_duration"),
    ("abuse", "ipv6_prefix"),
    ("abuse", "ban_reply"),
    ("abuse", "ban_file"),
    ("abuse", "escalate_after"),
    ("abuse", "max_connections_per_ip"),
    ("abuse", "shadow"),
    ("smtp", "max_recipients"),
    ("smtp", "max_message_size"),
    ("smtp", "command_timeout"),
    ("smtp", "data_timeout"),
    ("smtp", "transaction_timeout"),
    ("smtp", "min_data_rate"),
    ("smtp", "require_tls"),
    ("relay", "domains"),
    ("relay", "next_hops"),
    ("relay", "connect_timeout"),
    ("relay", "reply_timeout"),
    ("relay", "max_idle_connections"),
    ("relay", "idle_timeout"),
    ("relay", "tls"),
    ("relay", "tls_ca"),
    ("relay", "tls_verify"),
    ("relay", "tls_name"),
    ("relay", "forward_client"),
    ("relay", "route"),
    ("tls", "cert"),
    ("tls", "key"),
    ("tls", "min_version"),
    ("tls", "sni"),
    ("screen", "pregreet"),
    ("screen", "greet_wait"),
    ("screen", "pass_ttl"),
    ("screen", "cache_file"),
    ("screen", "dnsbl"),
    ("screen", "dnsbl_threshold"),
    ("screen", "resolvers"),
    ("screen", "dns_timeout"),
    ("cluster", "redis"),
    ("cluster", "password_file"),
    ("cluster", "node"),
    ("cluster", "prefix"),
    ("cluster", "flush_interval"),
    ("control", "socket"),
    ("metrics", "listen"),
    ("log", "format"),
    ("log", "level"),
    ("kernel", "mode"),
    ("kernel", "table"),
    ("kernel", "after_refusals"),
];

/// The keys a running instance reads once, at start: a reload that changes one warns
/// and leaves it until the next start (the failure counters' window is sized at start).
pub const READ_AT_START: &[&str] = &[
    "listen.addresses",
    "listen.threads",
    "listen.io",
    "listen.share",
    "abuse.failure_window",
    "abuse.counter_memory",
    "abuse.ban_file",
    "screen.cache_file",
    "cluster.redis",
    "cluster.password_file",
    "cluster.node",
    "cluster.prefix",
    "cluster.flush_interval",
    "control.socket",
    "metrics.listen",
    "log.format",
    "log.level",
    "kernel.mode",
    "kernel.table",
];

/// The keys of `section`.
fn keys_of(section: &str) -> Vec<&'static str> {
    KEYS.iter().filter(|(s, _)| *s == section).map(|(_, k)| *k).collect()
}

/// The top level's keys: its own and the sections.
fn top_keys() -> Vec<&'static str> {
    let mut keys = keys_of("");
    for (section, _) in KEYS.iter().filter(|(s, _)| !s.is_empty()) {
        if !keys.contains(section) {
            keys.push(section);
        }
    }
    keys
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded() -> Self {
        // The empty document is valid: every key takes its default.
        match Config::parse("", Path::new("<embedded>"), Path::new(".")) {
            Ok(c) => c,
            Err(p) => unreachable!("the embedded default is valid: {p}"),
        }
    }

    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Self, Problems> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Problems(vec![Problem::in_file(file, Fault::Unreadable { what: "the config file", reason: e.to_string() })])
        })?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Config::parse(&text, file, &base)?;
        config.file = Some(file.to_owned());
        place_hops(&mut config.relay, resolve).map_err(|(route, fault)| {
            let key = if route == 0 { "relay.next_hops" } else { "relay.route.next_hops" };
            Problems(vec![Problem { key: Some(key.into()), ..Problem::in_file(file, fault) }])
        })?;
        Ok(config)
    }

    /// Validates config text as if read from `file`; relative paths are resolved
    /// against `base`.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<Self, Problems> {
        let mut r = Reader { file, line_starts: line_starts(text), base, problems: Vec::new() };
        let (root, syntax) = DeTable::parse_recoverable(text);
        for e in syntax {
            r.problem(e.span(), "", Fault::Syntax(e.message().to_owned()));
        }
        if !r.problems.is_empty() {
            return Err(Problems(r.problems));
        }
        let root = Some(root.get_ref());
        r.unknown_keys(root, "", &top_keys());

        let hostname = r.value(root, "", "hostname", |v| valid_hostname(str_of(v)?)).unwrap_or_else(default_hostname);

        let t = r.section(root, "listen", &keys_of("listen"));
        let listen = Listen {
            addresses: r
                .value(t, "listen", "addresses", socket_addrs)
                .unwrap_or_else(|| vec![SocketAddr::from(([127, 0, 0, 1], 2525))]),
            threads: r.value(t, "listen", "threads", |v| int_in(v, 0, 1024)).unwrap_or(0) as usize,
            io: r.value(t, "listen", "io", |v| str_of(v)?.parse()).unwrap_or(IoMode::Auto),
            max_connections: r.value(t, "listen", "max_connections", |v| int_in(v, 1, 10_000_000)).unwrap_or(10_000)
                as u32,
            drain_timeout: r.value(t, "listen", "drain_timeout", duration).unwrap_or(Duration::from_secs(30)),
            proxy_protocol_from: r.value(t, "listen", "proxy_protocol_from", prefixes).unwrap_or_default(),
            proxy_timeout: r.value(t, "listen", "proxy_timeout", positive_duration).unwrap_or(Duration::from_secs(5)),
            share: r.value(t, "listen", "share", boolean).unwrap_or(false),
        };

        let t = r.section(root, "access", &keys_of("access"));
        let access = Access {
            default: r
                .value(t, "access", "default", |v| match str_of(v)? {
                    "allow" => Ok(Action::Allow),
                    "deny" => Ok(Action::Deny),
                    s => Err(Invalid::NotOneOf {
                        given: s.to_owned(),
                        what: "an action",
                        choices: "\"allow\" or \"deny\"",
                    }),
                })
                .unwrap_or(Action::Allow),
            list: r.path(t, "access", "list"),
            deny_reply: r.reply(t, "access", "deny_reply", &hostname),
            shadow_list: r.path(t, "access", "shadow_list"),
        };

        let t = r.section(root, "abuse", &keys_of("abuse"));
        let abuse = Abuse {
            max_failed_commands: r.value(t, "abuse", "max_failed_commands", |v| int_in(v, 1, 1_000_000)).unwrap_or(20)
                as u32,
            max_failed_recipients: r
                .value(t, "abuse", "max_failed_recipients", |v| int_in(v, 1, 1_000_000))
                .unwrap_or(10) as u32,
            ban_on_drop: r.value(t, "abuse", "ban_on_drop", boolean).unwrap_or(false),
            whitelist: r.path(t, "abuse", "whitelist"),
            ban_file: r.value(t, "abuse", "ban_file", |v| Ok(PathBuf::from(str_of(v)?))).map(|p| base.join(p)),
            failure_threshold: r.value(t, "abuse", "failure_threshold", |v| int_in(v, 1, 1_000_000)).unwrap_or(30)
                as u32,
            failure_window: r.value(t, "abuse", "failure_window", duration).unwrap_or(Duration::from_secs(600)),
            counter_memory: r
                .value(t, "abuse", "counter_memory", |v| size_in(v, COUNTER_MEMORY_MIN, COUNTER_MEMORY_MAX))
                .unwrap_or(COUNTER_MEMORY_DEFAULT),
            ban_duration: r.value(t, "abuse", "ban_duration", ban_duration).unwrap_or(Duration::from_secs(3600)),
            max_ban_duration: r
                .value(t, "abuse", "max_ban_duration", ban_duration)
                .unwrap_or(Duration::from_secs(7 * 86_400)),
            ipv6_prefix: r.value(t, "abuse", "ipv6_prefix", |v| int_in(v, 1, 128)).unwrap_or(64) as u8,
            escalate_after: r.value(t, "abuse", "escalate_after", |v| int_in(v, 0, 65_536)).unwrap_or(8) as u32,
            ban_reply: r.reply(t, "abuse", "ban_reply", &hostname),
            max_connections_per_ip: r
                .value(t, "abuse", "max_connections_per_ip", |v| int_in(v, 1, 10_000_000))
                .unwrap_or(20) as u32,
            shadow: r.value(t, "abuse", "shadow", boolean).unwrap_or(false),
        };
        if abuse.ban_duration > abuse.max_ban_duration {
            r.problem(None, "abuse.ban_duration", Conflict::BanLongerThanMax.into());
        }

        let t = r.section(root, "smtp", &keys_of("smtp"));
        let smtp = Smtp {
            max_recipients: r.value(t, "smtp", "max_recipients", |v| int_in(v, 1, 100_000)).unwrap_or(100) as u32,
            max_message_size: r.value(t, "smtp", "max_message_size", size).unwrap_or(50 << 20),
            command_timeout: r
                .value(t, "smtp", "command_timeout", positive_duration)
                .unwrap_or(Duration::from_secs(300)),
            data_timeout: r.value(t, "smtp", "data_timeout", positive_duration).unwrap_or(Duration::from_secs(180)),
            transaction_timeout: r
                .value(t, "smtp", "transaction_timeout", positive_duration)
                .unwrap_or(Duration::from_secs(1800)),
            min_data_rate: r.value(t, "smtp", "min_data_rate", |v| Ok(parse_size(str_of(v)?)?)).unwrap_or(1024),
            require_tls: r.value(t, "smtp", "require_tls", boolean).unwrap_or(false),
        };

        let t = r.section(root, "relay", &keys_of("relay"));
        let relay_domains = r.value(t, "relay", "domains", domains).unwrap_or_default();
        let default_route = Route {
            domains: Vec::new(),
            next_hop_names: r
                .value(t, "relay", "next_hops", hop_names)
                .unwrap_or_else(|| vec![HopName::Addr(SocketAddr::from(([127, 0, 0, 1], 2526)))]),
            hops: Vec::new(),
        };
        let mut routes = vec![default_route];
        routes.extend(r.routes(t, &relay_domains));
        let mut relay = Relay {
            domains: relay_domains,
            next_hops: Vec::new(),
            routes,
            connect_timeout: r
                .value(t, "relay", "connect_timeout", positive_duration)
                .unwrap_or(Duration::from_secs(10)),
            reply_timeout: r.value(t, "relay", "reply_timeout", positive_duration).unwrap_or(Duration::from_secs(120)),
            max_idle_connections: r.value(t, "relay", "max_idle_connections", |v| int_in(v, 0, 10_000)).unwrap_or(32)
                as u32,
            idle_timeout: r.value(t, "relay", "idle_timeout", positive_duration).unwrap_or(Duration::from_secs(30)),
            tls: r
                .value(t, "relay", "tls", |v| match str_of(v)? {
                    "off" => Ok(RelayTls::Off),
                    "opportunistic" => Ok(RelayTls::Opportunistic),
                    "required" => Ok(RelayTls::Required),
                    other => Err(Invalid::NotOneOf {
                        given: other.to_owned(),
                        what: "a TLS mode",
                        choices: "\"off\", \"opportunistic\" or \"required\"",
                    }),
                })
                .unwrap_or(RelayTls::Off),
            tls_ca: r.path(t, "relay", "tls_ca"),
            tls_verify: r.value(t, "relay", "tls_verify", boolean).unwrap_or(true),
            tls_name: r.value(t, "relay", "tls_name", |v| {
                let name = str_of(v)?;
                match rustls::pki_types::ServerName::try_from(name) {
                    Ok(_) => Ok(name.to_ascii_lowercase()),
                    Err(_) => Err(Invalid::NotAServerName(name.to_owned())),
                }
            }),
            forward_client: r
                .value(t, "relay", "forward_client", |v| match str_of(v)? {
                    "auto" => Ok(None),
                    "xclient" => Ok(Some(ForwardClient::Xclient)),
                    "xforward" => Ok(Some(ForwardClient::Xforward)),
                    "off" => Ok(Some(ForwardClient::Off)),
                    other => Err(Invalid::NotOneOf {
                        given: other.to_owned(),
                        what: "a way to forward the client",
                        choices: "\"auto\", \"xclient\", \"xforward\" or \"off\"",
                    }),
                })
                .flatten(),
        };
        // the addresses written as such now; names once the file is loaded
        let written = |names: &[HopName]| {
            Ok(names
                .iter()
                .filter_map(|n| match n {
                    HopName::Addr(a) => Some(*a),
                    HopName::Name(..) => None,
                })
                .collect())
        };
        let Ok(()) = place_hops::<std::convert::Infallible>(&mut relay, written);

        let t = r.section(root, "tls", &keys_of("tls"));
        let given = |key| t.and_then(|t| find(t, key)).is_some();
        if given("cert") != given("key") {
            r.problem(None, "tls", Conflict::HalfTls.into());
        }
        let min_version = r
            .value(t, "tls", "min_version", |v| match str_of(v)? {
                "1.2" => Ok(TlsVersion::V1_2),
                "1.3" => Ok(TlsVersion::V1_3),
                other => Err(Invalid::NotOneOf {
                    given: other.to_owned(),
                    what: "a TLS version",
                    choices: "\"1.2\" or \"1.3\"",
                }),
            })
            .unwrap_or(TlsVersion::V1_2);
        let sni = r.sni(t);
        let tls = match (r.path(t, "tls", "cert"), r.path(t, "tls", "key")) {
            (Some(cert), Some(key)) => Some(Tls { cert, key, min_version, sni }),
            _ => None,
        };
        if smtp.require_tls && tls.is_none() && given("cert") == given("key") {
            r.problem(None, "smtp.require_tls", Conflict::RequireTlsWithoutTls.into());
        }
        let t = r.section(root, "screen", &keys_of("screen"));
        let screen = Screen {
            pregreet: r.value(t, "screen", "pregreet", boolean).unwrap_or(false),
            greet_wait: r.value(t, "screen", "greet_wait", positive_duration).unwrap_or(Duration::from_secs(6)),
            pass_ttl: r.value(t, "screen", "pass_ttl", duration).unwrap_or(Duration::from_secs(86_400)),
            cache_file: r.value(t, "screen", "cache_file", |v| Ok(PathBuf::from(str_of(v)?))).map(|p| base.join(p)),
            dnsbl: r.dnsbl(t),
            dnsbl_threshold: r.value(t, "screen", "dnsbl_threshold", |v| int_in(v, 1, 1000)).unwrap_or(1) as i32,
            resolvers: r.value(t, "screen", "resolvers", socket_addrs).unwrap_or_default(),
            dns_timeout: r.value(t, "screen", "dns_timeout", positive_duration).unwrap_or(Duration::from_secs(2)),
        };
        let t = r.section(root, "cluster", &keys_of("cluster"));
        let cluster = t.and_then(|_| {
            let url = r.value(t, "cluster", "redis", |v| Ok(redis_url(str_of(v)?)?));
            if url.is_none() && t.and_then(|t| find(t, "redis")).is_none() {
                r.problem(None, "cluster.redis", Conflict::ClusterWithoutRedis.into());
            }
            let node =
                r.value(t, "cluster", "node", |v| valid_hostname(str_of(v)?)).unwrap_or_else(|| hostname.clone());
            let prefix = r
                .value(t, "cluster", "prefix", |v| {
                    let p = str_of(v)?;
                    let ok = !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                    if ok { Ok(p.to_owned()) } else { Err(Invalid::KeyPrefix(p.to_owned())) }
                })
                .unwrap_or_else(|| "mxgate".into());
            let flush_interval =
                r.value(t, "cluster", "flush_interval", positive_duration).unwrap_or(Duration::from_millis(200));
            let password_file = r.path(t, "cluster", "password_file");
            let (redis, tls, host, port, db) = url?;
            Some(Cluster { redis, tls, host, port, db, password_file, node, prefix, flush_interval })
        });
        let t = r.section(root, "control", &keys_of("control"));
        let control = r
            .value(t, "control", "socket", |v| Ok(PathBuf::from(str_of(v)?)))
            .map(|p| Control { socket: base.join(p) });
        let t = r.section(root, "metrics", &keys_of("metrics"));
        let metrics = t.map(|_| Metrics {
            listen: r
                .value(t, "metrics", "listen", |v| socket_addr(str_of(v)?))
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9425))),
        });

        let t = r.section(root, "log", &keys_of("log"));
        let log = Log {
            format: r
                .value(t, "log", "format", |v| match str_of(v)? {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    other => Err(Invalid::NotOneOf {
                        given: other.to_owned(),
                        what: "a log format",
                        choices: "\"text\" or \"json\"",
                    }),
                })
                .unwrap_or(LogFormat::Text),
            level: r
                .value(t, "log", "level", |v| match str_of(v)? {
                    l @ ("error" | "warn" | "info" | "debug" | "trace") => Ok(l.to_owned()),
                    other => Err(Invalid::NotOneOf {
                        given: other.to_owned(),
                        what: "a log level",
                        choices: "\"error\", \"warn\", \"info\", \"debug\" or \"trace\"",
                    }),
                })
                .unwrap_or_else(|| "info".to_owned()),
        };

        let t = r.section(root, "kernel", &keys_of("kernel"));
        let kernel = Kernel {
            mode: r
                .value(t, "kernel", "mode", |v| match str_of(v)? {
                    "off" => Ok(None),
                    "drop" => Ok(Some(crate::kernel::Action::Drop)),
                    "reset" => Ok(Some(crate::kernel::Action::Reset)),
                    other => Err(Invalid::NotOneOf {
                        given: other.to_owned(),
                        what: "a kernel mode",
                        choices: "\"off\", \"drop\" or \"reset\"",
                    }),
                })
                .flatten(),
            table: r
                .value(t, "kernel", "table", |v| {
                    let name = str_of(v)?;
                    let ok = (1..=64).contains(&name.len())
                        && name.starts_with(|c: char| c.is_ascii_alphabetic())
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
                    if ok { Ok(name.to_owned()) } else { Err(Invalid::TableName(name.to_owned())) }
                })
                .unwrap_or_else(|| "mxgate".into()),
            after_refusals: r
                .value(t, "kernel", "after_refusals", |v| int_in(v, 0, 1_000_000))
                .map_or(3, |n| u32::try_from(n).unwrap_or(3)),
        };

        if !r.problems.is_empty() {
            r.problems.sort_by_key(|p| p.line.unwrap_or(u32::MAX)); // stable: file order, then the rest
            return Err(Problems(r.problems));
        }
        Ok(Config {
            file: None,
            hostname,
            listen,
            access,
            abuse,
            smtp,
            relay,
            tls,
            screen,
            cluster,
            control,
            metrics,
            log,
            kernel,
        })
    }

    /// The keys read once at start ([`READ_AT_START`]) that `new` gives otherwise: a
    /// reload leaves them as they are until the next start.
    pub fn fixed_at_start_changed(&self, new: &Config) -> Vec<&'static str> {
        fn cluster(c: &Config) -> Option<&Cluster> {
            c.cluster.as_ref()
        }
        let same = |key: &str| match key {
            "listen.addresses" => self.listen.addresses == new.listen.addresses,
            // what is in force: 0 is one per core
            "listen.threads" => self.listen.threads_in_force() == new.listen.threads_in_force(),
            "listen.io" => self.listen.io == new.listen.io,
            "listen.share" => self.listen.share == new.listen.share,
            "abuse.ban_file" => self.abuse.ban_file == new.abuse.ban_file,
            "screen.cache_file" => self.screen.cache_file == new.screen.cache_file,
            "cluster.redis" => cluster(self).map(|c| &c.redis) == cluster(new).map(|c| &c.redis),
            "cluster.password_file" => {
                cluster(self).map(|c| &c.password_file) == cluster(new).map(|c| &c.password_file)
            }
            "cluster.node" => cluster(self).map(|c| &c.node) == cluster(new).map(|c| &c.node),
            "cluster.prefix" => cluster(self).map(|c| &c.prefix) == cluster(new).map(|c| &c.prefix),
            "cluster.flush_interval" => {
                cluster(self).map(|c| c.flush_interval) == cluster(new).map(|c| c.flush_interval)
            }
            "abuse.failure_window" => self.abuse.failure_window == new.abuse.failure_window,
            "abuse.counter_memory" => self.abuse.counter_memory == new.abuse.counter_memory,
            "control.socket" => self.control == new.control,
            "metrics.listen" => self.metrics == new.metrics,
            "log.format" => self.log.format == new.log.format,
            "log.level" => self.log.level == new.log.level,
            "kernel.mode" => self.kernel.mode == new.kernel.mode,
            "kernel.table" => self.kernel.table == new.kernel.table,
            other => unreachable!("READ_AT_START names {other}, which is not compared here"),
        };
        READ_AT_START.iter().copied().filter(|key| !same(key)).collect()
    }

    /// Where this config came from, for messages.
    pub fn describe(&self) -> String {
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "the embedded default configuration".into(),
        }
    }
}

/// Walks the spanned TOML tree, collecting problems instead of stopping at the first.
struct Reader<'a> {
    file: &'a Path,
    line_starts: Vec<usize>,
    base: &'a Path,
    problems: Vec<Problem>,
}

type Table<'t> = DeTable<'t>;
type Value<'t> = Spanned<DeValue<'t>>;

impl Reader<'_> {
    fn problem(&mut self, span: Option<Range<usize>>, key: &str, fault: Fault) {
        let line = span.map(|s| self.line_starts.partition_point(|&start| start <= s.start) as u32);
        let key = (!key.is_empty()).then(|| key.to_owned());
        self.problems.push(Problem { file: self.file.to_owned(), line, key, fault });
    }

    /// A sub-table of the root, checked for unknown keys.
    fn section<'t>(&mut self, root: Option<&'t Table<'t>>, name: &str, known: &[&str]) -> Option<&'t Table<'t>> {
        let value = root.and_then(|t| find(t, name))?;
        match value.get_ref() {
            DeValue::Table(t) => {
                self.unknown_keys(Some(t), name, known);
                Some(t)
            }
            other => {
                let fault = Fault::NotATable { section: name.to_owned(), found: other.type_str() };
                self.problem(Some(value.span()), name, fault);
                None
            }
        }
    }

    fn unknown_keys(&mut self, table: Option<&Table<'_>>, section: &str, known: &[&str]) {
        for (key, _) in table.into_iter().flatten() {
            if !known.contains(&key.get_ref().as_ref()) {
                let full = join(section, key.get_ref());
                self.problem(Some(key.span()), &full, Fault::UnknownKey { known: known.join(", ") });
            }
        }
    }

    /// The value of `key`, converted; `None` when absent or invalid (then a problem is
    /// recorded at the value's line).
    fn value<'t, T>(
        &mut self,
        table: Option<&'t Table<'t>>,
        section: &str,
        key: &str,
        convert: impl FnOnce(&Value<'t>) -> Result<T, Invalid>,
    ) -> Option<T> {
        let value = table.and_then(|t| find(t, key))?;
        match convert(value) {
            Ok(v) => Some(v),
            Err(invalid) => {
                self.problem(Some(value.span()), &join(section, key), invalid.into());
                None
            }
        }
    }

    /// A file that must exist, relative to the config's folder.
    fn path<'t>(&mut self, table: Option<&'t Table<'t>>, section: &str, key: &str) -> Option<PathBuf> {
        let base = self.base;
        self.value(table, section, key, |v| {
            let path = base.join(PathBuf::from(str_of(v)?));
            if path.is_file() { Ok(path) } else { Err(Invalid::NotAFile(path)) }
        })
    }

    /// `[[tls.sni]]`: an array of tables with `name`, `cert` and `key`.
    fn sni<'t>(&mut self, tls: Option<&'t Table<'t>>) -> Vec<SniCert> {
        const SNI: Entries = Entries {
            section: "tls.sni",
            keys: &["name", "cert", "key"],
            needed: &["name", "cert", "key"],
            array: "`[[tls.sni]]` tables",
            entry: "a table with name, cert and key",
            needs: "name, cert and key",
        };
        let mut entries = Vec::new();
        for (t, _) in self.entries(tls, "sni", &SNI) {
            let name = self.value(Some(t), "tls.sni", "name", |v| {
                let s = str_of(v)?;
                valid_hostname(s.strip_prefix("*.").unwrap_or(s)).map(|_| s.to_ascii_lowercase())
            });
            let (cert, key) = (self.path(Some(t), "tls.sni", "cert"), self.path(Some(t), "tls.sni", "key"));
            if let (Some(name), Some(cert), Some(key)) = (name, cert, key) {
                entries.push(SniCert { name, cert, key });
            }
        }
        entries
    }

    /// The tables of an array of tables (`key` in `parent`) as `spec` says they must be,
    /// each with where it stands; a problem for each that is not.
    fn entries<'t>(
        &mut self,
        parent: Option<&'t Table<'t>>,
        key: &str,
        spec: &Entries,
    ) -> Vec<(&'t Table<'t>, Range<usize>)> {
        let Some(value) = parent.and_then(|t| find(t, key)) else { return Vec::new() };
        let DeValue::Array(items) = value.get_ref() else {
            self.problem(Some(value.span()), spec.section, type_fault(spec.array, value));
            return Vec::new();
        };
        let mut tables = Vec::new();
        for item in items {
            let DeValue::Table(t) = item.get_ref() else {
                self.problem(Some(item.span()), spec.section, type_fault(spec.entry, item));
                continue;
            };
            self.unknown_keys(Some(t), spec.section, spec.keys);
            if spec.needed.iter().any(|k| find(t, k).is_none()) {
                self.problem(Some(item.span()), spec.section, Fault::MissingKeys(spec.needs));
                continue;
            }
            tables.push((t, item.span()));
        }
        tables
    }

    /// `[[relay.route]]` entries: `domains` (each covered by `relay_domains`, none in two
    /// routes) and `next_hops` (as `[relay] next_hops`), both needed.
    fn routes<'t>(&mut self, relay: Option<&'t Table<'t>>, relay_domains: &[String]) -> Vec<Route> {
        const ROUTE: Entries = Entries {
            section: "relay.route",
            keys: &["domains", "next_hops"],
            needed: &["domains", "next_hops"],
            array: "`[[relay.route]]` tables",
            entry: "a table with domains and next_hops",
            needs: "domains and next_hops",
        };
        let mut routes: Vec<Route> = Vec::new();
        for (t, _) in self.entries(relay, "route", &ROUTE) {
            let taken: Vec<&String> = routes.iter().flat_map(|r| &r.domains).collect();
            let domains = self.value(Some(t), "relay.route", "domains", |v| {
                let list = domains(v)?;
                if list.is_empty() {
                    return Err(Invalid::NoDomain);
                }
                for (i, d) in list.iter().enumerate() {
                    if list[..i].contains(d) || taken.contains(&d) {
                        return Err(Invalid::Twice(d.clone()));
                    }
                    if !covered(relay_domains, d) {
                        return Err(Invalid::NotARelayDomain(d.clone()));
                    }
                }
                Ok(list)
            });
            let next_hop_names = self.value(Some(t), "relay.route", "next_hops", hop_names);
            if let (Some(domains), Some(next_hop_names)) = (domains, next_hop_names) {
                routes.push(Route { domains, next_hop_names, hops: Vec::new() });
            }
        }
        routes
    }

    /// `[[screen.dnsbl]]` entries: `zone` (a domain name), `weight` (a non-zero whole
    /// number, negative for allowlists), `match` (result addresses or ranges
    /// `a.b.c.d-e.f.g.h`; none: any result counts).
    fn dnsbl<'t>(&mut self, screen: Option<&'t Table<'t>>) -> Vec<Zone> {
        const DNSBL: Entries = Entries {
            section: "screen.dnsbl",
            keys: &["zone", "weight", "match"],
            needed: &["zone", "weight"],
            array: "`[[screen.dnsbl]]` tables",
            entry: "a table with zone and weight",
            needs: "zone and weight",
        };
        let mut zones: Vec<Zone> = Vec::new();
        for (t, span) in self.entries(screen, "dnsbl", &DNSBL) {
            let zone = self.value(Some(t), "screen.dnsbl", "zone", |v| {
                let s = str_of(v)?.trim_end_matches('.');
                valid_hostname(s).map(|_| s.to_ascii_lowercase())
            });
            let weight = self.value(Some(t), "screen.dnsbl", "weight", |v| match int_in(v, -1000, 1000)? {
                0 => Err(Invalid::Zero("must not be 0 (a zone that weighs nothing: leave it out)")),
                w => Ok(w as i32),
            });
            let matches = self.value(Some(t), "screen.dnsbl", "match", |v| list_of(v, ipv4_range)).unwrap_or_default();
            if let (Some(zone), Some(weight)) = (zone, weight) {
                if zones.iter().any(|z| z.zone == zone) {
                    self.problem(Some(span), "screen.dnsbl", Invalid::Twice(zone).into());
                    continue;
                }
                zones.push(Zone { zone, weight, matches });
            }
        }
        zones
    }

    fn reply<'t>(&mut self, table: Option<&'t Table<'t>>, section: &str, key: &str, hostname: &str) -> ReplyTemplate {
        let parsed = self.value(table, section, key, |v| {
            let t = ReplyTemplate::parse(str_of(v)?)?;
            if t.max_len(hostname) > MAX_REPLY_LEN {
                return Err(Invalid::ReplyTooLong { max: MAX_REPLY_LEN });
            }
            Ok(t)
        });
        parsed.unwrap_or_else(|| ReplyTemplate::parse(DEFAULT_DENY_REPLY).unwrap_or_else(|e| unreachable!("{e}")))
    }
}

/// What the entries of an array of tables (`[[section]]`) must be.
struct Entries {
    section: &'static str,
    /// Their keys, and those each needs.
    keys: &'static [&'static str],
    needed: &'static [&'static str],
    /// The shape wanted, for a value that is not an array, and for an entry that is not a
    /// table; the keys needed, in words.
    array: &'static str,
    entry: &'static str,
    needs: &'static str,
}

fn find<'t>(table: &'t Table<'t>, key: &str) -> Option<&'t Value<'t>> {
    table.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
}

fn join(section: &str, key: &str) -> String {
    if section.is_empty() { key.to_owned() } else { format!("{section}.{key}") }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

/// A value of another TOML type than `expected`.
fn type_fault(expected: &'static str, v: &Value<'_>) -> Fault {
    Invalid::Type { expected, found: v.get_ref().type_str() }.into()
}

fn str_of<'v>(v: &'v Value<'_>) -> Result<&'v str, Invalid> {
    match v.get_ref() {
        DeValue::String(s) => Ok(s.as_ref()),
        other => Err(Invalid::Type { expected: "a string", found: other.type_str() }),
    }
}

fn boolean(v: &Value<'_>) -> Result<bool, Invalid> {
    v.get_ref().as_bool().ok_or_else(|| Invalid::Type { expected: "true or false", found: v.get_ref().type_str() })
}

fn int_in(v: &Value<'_>, min: i64, max: i64) -> Result<i64, Invalid> {
    let n = match v.get_ref() {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
        other => return Err(Invalid::Type { expected: "a whole number", found: other.type_str() }),
    };
    n.filter(|n| (min..=max).contains(n)).ok_or(Invalid::Range { min, max })
}

fn duration(v: &Value<'_>) -> Result<Duration, Invalid> {
    Ok(parse_duration(str_of(v)?)?)
}

fn ban_duration(v: &Value<'_>) -> Result<Duration, Invalid> {
    Ok(crate::units::parse_ban_duration(str_of(v)?)?)
}

fn positive_duration(v: &Value<'_>) -> Result<Duration, Invalid> {
    duration(v).and_then(|d| if d.is_zero() { Err(Invalid::Zero("must be longer than zero")) } else { Ok(d) })
}

fn size(v: &Value<'_>) -> Result<u64, Invalid> {
    let s = parse_size(str_of(v)?)?;
    if s == 0 { Err(Invalid::Zero("must be larger than zero")) } else { Ok(s) }
}

/// A size from `min` to `max` bytes.
fn size_in(v: &Value<'_>, min: u64, max: u64) -> Result<u64, Invalid> {
    let s = parse_size(str_of(v)?)?;
    if (min..=max).contains(&s) { Ok(s) } else { Err(Invalid::SizeRange { min, max }) }
}

/// `[abuse] counter_memory`: 64 MiB holds 2,097,152 failing keys (32 bytes each); a
/// million addresses failing within one window fill 48 % of the table.
pub const COUNTER_MEMORY_DEFAULT: u64 = 64 << 20;
const COUNTER_MEMORY_MIN: u64 = 1 << 20;
const COUNTER_MEMORY_MAX: u64 = 64 << 30;

/// An array of strings, each converted; the first bad element is named.
fn list_of<T, E: Into<Invalid>>(v: &Value<'_>, convert: impl Fn(&str) -> Result<T, E>) -> Result<Vec<T>, Invalid> {
    let DeValue::Array(items) = v.get_ref() else {
        return Err(Invalid::Type { expected: "an array of strings", found: v.get_ref().type_str() });
    };
    let element = |index: usize| move |fault: Invalid| Invalid::Element { index: index + 1, fault: Box::new(fault) };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| str_of(item).and_then(|s| convert(s).map_err(Into::into)).map_err(element(i)))
        .collect()
}

fn socket_addr(s: &str) -> Result<SocketAddr, Invalid> {
    s.parse().map_err(|_| Invalid::NotASocketAddress(s.to_owned()))
}

/// `redis://host[:port][/db]` or `rediss://...` (TLS): the URL, TLS, host, port
/// (default 6379) and database (default 0). A password goes in `password_file`, never in
/// the URL.
fn redis_url(s: &str) -> Result<(String, bool, String, u16, u32), RedisUrlFault> {
    let (tls, rest) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(RedisUrlFault::NotAUrl(s.to_owned())),
    };
    // `user@host`: an ACL user (its password in password_file, never in the URL)
    let rest = match rest.split_once('@') {
        Some((user, _)) if user.contains(':') => return Err(RedisUrlFault::PasswordInUrl),
        Some((user, _))
            if user.is_empty() || !user.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) =>
        {
            return Err(RedisUrlFault::NotAUser(user.to_owned()));
        }
        Some((_, rest)) => rest,
        None => rest,
    };
    let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
    let db =
        if db.is_empty() { 0 } else { db.parse::<u32>().map_err(|_| RedisUrlFault::NotADatabase(db.to_owned()))? };
    // `[v6]:port`, `[v6]`, `host:port`, `host`
    let (host, port) = match authority.strip_prefix('[').and_then(|a| a.split_once(']')) {
        Some((v6, rest)) => (v6, rest.strip_prefix(':')),
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| RedisUrlFault::NotAPort(p.to_owned()))?,
        None => 6379,
    };
    if host.is_empty() || (host.parse::<std::net::IpAddr>().is_err() && valid_hostname(host).is_err()) {
        return Err(RedisUrlFault::NoHost(s.to_owned()));
    }
    Ok((s.to_owned(), tls, host.to_owned(), port, db))
}

/// `127.0.0.2` or `127.0.0.2-127.0.0.11`: an inclusive range of IPv4 addresses.
fn ipv4_range(s: &str) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), Invalid> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let parse = |a: &str| a.trim().parse::<std::net::Ipv4Addr>().map_err(|_| Invalid::NotAnIpv4Range(s.to_owned()));
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        return Err(Invalid::BackwardsRange(s.to_owned()));
    }
    Ok((lo, hi))
}

/// `[relay] next_hops`: socket addresses and `host:port` names, none twice.
fn hop_names(v: &Value<'_>) -> Result<Vec<HopName>, Invalid> {
    let names = list_of::<_, Invalid>(v, |s: &str| {
        if let Ok(addr) = s.parse() {
            return Ok(HopName::Addr(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| Invalid::NotAHostPort(s.to_owned()))?;
        let port = port.parse().map_err(|_| Invalid::NotAHostPort(s.to_owned()))?;
        let host = valid_hostname(host).map_err(|_| Invalid::NotAHostPort(s.to_owned()))?;
        Ok(HopName::Name(host.to_ascii_lowercase(), port))
    })?;
    if names.is_empty() {
        return Err(Invalid::NoAddress);
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(Invalid::Twice(n.to_string()));
        }
    }
    Ok(names)
}

/// The next hops' addresses: each address as it is, each name's addresses (A and AAAA,
/// as the system's resolver orders them) where the name stood, none twice. Only
/// `Config::load` resolves (the text alone never makes a query).
pub fn resolve(names: &[HopName]) -> Result<Vec<SocketAddr>, Invalid> {
    use std::net::ToSocketAddrs;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for name in names {
        let found: Vec<SocketAddr> = match name {
            HopName::Addr(a) => vec![*a],
            HopName::Name(host, port) => (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Invalid::Unresolved { name: format!("{host}:{port}"), why: e.to_string() })?
                .collect(),
        };
        if found.is_empty() {
            return Err(Invalid::Unresolved { name: name.to_string(), why: "no address".into() });
        }
        for a in found {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    Ok(addrs)
}

/// Gives each route its next hops' places in `relay.next_hops`, which becomes every
/// route's addresses once each (the default route's first), as `addrs_of` finds them; an
/// error names the route (its index in `relay.routes`).
fn place_hops<E>(
    relay: &mut Relay,
    mut addrs_of: impl FnMut(&[HopName]) -> Result<Vec<SocketAddr>, E>,
) -> Result<(), (usize, E)> {
    let mut all: Vec<SocketAddr> = Vec::new();
    for (i, route) in relay.routes.iter_mut().enumerate() {
        let addrs = addrs_of(&route.next_hop_names).map_err(|e| (i, e))?;
        route.hops = addrs
            .into_iter()
            .map(|a| match all.iter().position(|&b| b == a) {
                Some(place) => place,
                None => {
                    all.push(a);
                    all.len() - 1
                }
            })
            .collect();
    }
    relay.next_hops = all;
    Ok(())
}

/// Whether `[relay] domains` (`relay_domains`) accepts every recipient a route's domain
/// `d` matches: `.x` needs an entry taking x's subdomains, `x` one taking x.
fn covered(relay_domains: &[String], d: &str) -> bool {
    let (name, below) = match d.strip_prefix('.') {
        Some(name) => (name, true),
        None => (d, false),
    };
    relay_domains.iter().any(|r| match r.strip_prefix('.') {
        Some(parent) => name == parent || name.strip_suffix(parent).is_some_and(|head| head.ends_with('.')),
        None => !below && r == name,
    })
}

fn socket_addrs(v: &Value<'_>) -> Result<Vec<SocketAddr>, Invalid> {
    let addrs = list_of(v, socket_addr)?;
    if addrs.is_empty() {
        return Err(Invalid::NoAddress);
    }
    for (i, a) in addrs.iter().enumerate() {
        if addrs[..i].contains(a) {
            return Err(Invalid::Twice(a.to_string()));
        }
    }
    Ok(addrs)
}

fn prefixes(v: &Value<'_>) -> Result<Vec<IpNet>, Invalid> {
    list_of::<_, EntryError>(v, crate::access::list::parse_net)
}

fn domains(v: &Value<'_>) -> Result<Vec<String>, Invalid> {
    list_of(v, |s| {
        let name = s.strip_prefix('.').unwrap_or(s).trim_end_matches('.');
        valid_hostname(name).map(|_| s.trim_end_matches('.').to_ascii_lowercase())
    })
}

/// A fleet node's name as `[cluster] node` takes it (and a ban line's `node=`).
pub fn valid_node_name(s: &str) -> bool {
    valid_hostname(s).is_ok()
}

/// A domain name fit to appear in replies: letters, digits and hyphens in dot-separated
/// labels (RFC 1035 §2.3.1, RFC 5321 §4.1.2).
fn valid_hostname(s: &str) -> Result<String, Invalid> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(Invalid::NotADomain(s.to_owned()));
    }
    Ok(s.to_owned())
}

/// This machine's name when it is a valid domain name, else `localhost`.
fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is what we pass.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    valid_hostname(&name).unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(text, Path::new("m.toml"), Path::new("/nonexistent"))
    }

    /// The key table of docs/operations.md names exactly the declared keys, and says which are read
    /// at start only: the three cannot drift apart.
    #[test]
    fn the_documented_key_table_is_the_declared_keys() {
        let reference = include_str!("../docs/operations.md");
        let table = reference.split("\n| key |").nth(1).expect("the key table of docs/operations.md");
        let (mut documented, mut at_start) = (Vec::new(), Vec::new());
        for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let mut section = "";
            for name in cells[0].trim_start_matches("| ").split(", ") {
                let name = name.trim_matches('`');
                let (s, key) = name.split_once('.').unwrap_or((section, name));
                section = s;
                let full = if s.is_empty() { key.to_owned() } else { format!("{s}.{key}") };
                if cells.last().is_some_and(|c| c.contains("at start only")) {
                    at_start.push(full.clone());
                }
                documented.push(full);
            }
        }
        let declared: Vec<String> =
            KEYS.iter().map(|(s, k)| if s.is_empty() { (*k).to_owned() } else { format!("{s}.{k}") }).collect();
        assert_eq!(documented, declared, "docs/operations.md key table vs config::KEYS");
        assert_eq!(at_start, READ_AT_START, "docs/operations.md `at start only` vs config::READ_AT_START");
    }

    #[test]
    fn every_key_read_at_start_is_compared() {
        let base = parse("").unwrap();
        assert!(base.fixed_at_start_changed(&base).is_empty());
        let changed = parse(
            "[listen]\naddresses = [\"127.0.0.1:1\"]\nthreads = 3\nio = \"epoll\"\nshare = true\n[abuse]\nban_file = \"b\"\n\
             failure_window = \"1m\"\ncounter_memory = \"2MiB\"\n[screen]\ncache_file = \"p\"\n[control]\nsocket = \"c\"\n[metrics]\n\
             [cluster]\nredis = \"redis://x\"\nnode = \"n\"\nprefix = \"p\"\nflush_interval = \"1s\"\n\
             password_file = \"{}/Cargo.toml\"\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\
             [kernel]\nmode = \"drop\"\ntable = \"t\"\n"
                .replace("{}", env!("CARGO_MANIFEST_DIR"))
                .as_str(),
        )
        .unwrap();
        let names = base.fixed_at_start_changed(&changed);
        assert_eq!(names, READ_AT_START);
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.addresses, [SocketAddr::from(([127, 0, 0, 1], 2525))]);
        assert_eq!(c.listen.io, IoMode::Auto);
        assert_eq!(c.access.default, Action::Allow);
        assert_eq!(c.access.list, None);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(300));
        assert_eq!(c.abuse.ipv6_prefix, 64);
        assert!(c.tls.is_none() && c.control.is_none() && c.metrics.is_none());
    }

    #[test]
    fn cluster_urls() {
        let c = parse("hostname = \"mx1.test\"\n[cluster]\nredis = \"rediss://redis.internal:6380/2\"\n").unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.tls, cl.host.as_str(), cl.port, cl.db), (true, "redis.internal", 6380, 2));
        assert_eq!(
            (cl.node.as_str(), cl.prefix.as_str(), cl.flush_interval),
            ("mx1.test", "mxgate", Duration::from_millis(200))
        );
        let c = parse("[cluster]\nredis = \"redis://[::1]\"\nprefix = \"edge-1\"\n").unwrap().cluster.unwrap();
        assert_eq!((c.host.as_str(), c.port, c.db, c.prefix.as_str()), ("::1", 6379, 0, "edge-1"));
        assert!(parse("").unwrap().cluster.is_none(), "absent: a single node");
        let c = parse("[cluster]\nredis = \"rediss://edge@10.0.0.9/1\"\n").unwrap().cluster.unwrap();
        assert_eq!(
            (c.host.as_str(), c.db, c.redis.as_str()),
            ("10.0.0.9", 1, "rediss://edge@10.0.0.9/1"),
            "an ACL user"
        );
        for (bad, why) in [
            ("[cluster]\nredis = \"http://x\"\n", "redis:// or rediss://"),
            ("[cluster]\nredis = \"redis://:secret@x\"\n", "password_file"),
            ("[cluster]\nredis = \"redis://x:99999\"\n", "not a port"),
            ("[cluster]\nredis = \"redis://a b@x\"\n", "not a user name"),
            ("[cluster]\nprefix = \"a b\"\nredis = \"redis://x\"\n", "letters, digits"),
            ("[cluster]\nnode = \"n\"\n", "cluster.redis"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn screen_zones_weights_and_matches() {
        let text = "[screen]\ndnsbl_threshold = 3\nresolvers = [\"127.0.0.1:5353\"]\ndns_timeout = \"1s\"\n\
                    [[screen.dnsbl]]\nzone = \"ZEN.example.org.\"\nweight = 2\nmatch = [\"127.0.0.2-127.0.0.11\", \"127.0.0.20\"]\n\
                    [[screen.dnsbl]]\nzone = \"white.example.org\"\nweight = -5\n";
        let c = Config::parse(text, Path::new("m.toml"), Path::new(".")).unwrap();
        assert_eq!(c.screen.dnsbl.len(), 2);
        assert_eq!((c.screen.dnsbl[0].zone.as_str(), c.screen.dnsbl[0].weight), ("zen.example.org", 2));
        assert_eq!(c.screen.dnsbl[0].matches[1], ("127.0.0.20".parse().unwrap(), "127.0.0.20".parse().unwrap()));
        assert_eq!((c.screen.dnsbl[1].weight, c.screen.dnsbl_threshold), (-5, 3));
        assert_eq!(c.screen.dns_timeout, Duration::from_secs(1));
        for (bad, why) in [
            ("[[screen.dnsbl]]\nzone = \"a.test\"\nweight = 0\n", "must not be 0"),
            ("[[screen.dnsbl]]\nzone = \"a.test\"\n", "needs zone and weight"),
            ("[[screen.dnsbl]]\nzone = \"not a zone\"\nweight = 1\n", "screen.dnsbl.zone"),
            ("[[screen.dnsbl]]\nzone = \"a.test\"\nweight = 1\nmatch = [\"127.0.0.9-127.0.0.2\"]\n", "ends before"),
            (
                "[[screen.dnsbl]]\nzone = \"a.test\"\nweight = 1\n[[screen.dnsbl]]\nzone = \"a.test\"\nweight = 2\n",
                "twice",
            ),
            ("[screen]\ndnsbl_threshold = 0\n", "screen.dnsbl_threshold"),
        ] {
            let e = Config::parse(bad, Path::new("m.toml"), Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn values_are_typed() {
        let c = parse(
            "hostname = \"mx.example.com\"\n[listen]\naddresses = [\"127.0.0.1:25\", \"[::]:25\"]\nthreads = 4\nio = \"epoll\"\ndrain_timeout = \"1m\"\n\
             [smtp]\nmax_message_size = \"10MiB\"\ncommand_timeout = \"2s\"\n[relay]\ndomains = [\"Example.COM.\", \".example.org\"]\n[metrics]\n",
        )
        .unwrap();
        assert_eq!(c.hostname, "mx.example.com");
        assert_eq!(c.listen.addresses.len(), 2);
        assert_eq!((c.listen.threads, c.listen.io), (4, IoMode::Epoll));
        assert_eq!(c.listen.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.smtp.max_message_size, 10 << 20);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(2));
        assert_eq!(c.relay.domains, ["example.com", ".example.org"]);
        assert_eq!(c.metrics.unwrap().listen, SocketAddr::from(([127, 0, 0, 1], 9425)));
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_key() {
        let text = "hostname = \"bad host\"\n[listen]\nthreads = \"4\"\nio = \"kqueue\"\nbogus = 1\n\
                    [access]\ndeny_reply = \"250 ok\"\nlist = \"missing.list\"\n[smtp]\ncommand_timeout = \"5 minutes\"\n[tls]\ncert = \"c.pem\"\n";
        let problems = parse(text).unwrap_err().0;
        let got: Vec<(Option<u32>, Option<&str>)> = problems.iter().map(|p| (p.line, p.key.as_deref())).collect();
        assert_eq!(
            got,
            [
                (Some(1), Some("hostname")),
                (Some(3), Some("listen.threads")),
                (Some(4), Some("listen.io")),
                (Some(5), Some("listen.bogus")),
                (Some(7), Some("access.deny_reply")),
                (Some(8), Some("access.list")),
                (Some(10), Some("smtp.command_timeout")),
                (Some(12), Some("tls.cert")),
                (None, Some("tls")),
            ],
            "{}",
            Problems(problems.clone())
        );
        assert!(problems[3].to_string().starts_with("m.toml:5: listen.bogus: unknown key"), "{}", problems[3]);
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let problems = parse("[listen]\nthreads = = 4\n").unwrap_err().0;
        assert_eq!(problems[0].line, Some(2), "{}", problems[0]);
        assert!(problems[0].fault.to_string().contains("TOML syntax"));
    }

    #[test]
    fn unknown_top_level_keys_and_wrong_shapes() {
        let problems = parse("listen = 3\nfoo = 1\n").unwrap_err().0;
        let keys: Vec<_> = problems.iter().map(|p| p.key.clone().unwrap()).collect();
        assert_eq!(keys, ["listen", "foo"]);
        let problems = parse("[listen]\naddresses = []\n[relay]\nnext_hops = [\"x\"]\n").unwrap_err().0;
        assert_eq!(problems.len(), 2);
        assert!(problems[1].fault.to_string().contains("element 1"), "{}", problems[1]);
    }

    #[test]
    fn next_hops_by_address_or_name_resolved_only_when_the_file_is_loaded() {
        let text = "[relay]\nnext_hops = [\"127.0.0.1:2525\", \"Localhost:2626\", \"[::1]:2727\"]\n";
        let c = Config::parse(text, Path::new("m.toml"), Path::new(".")).unwrap();
        assert_eq!(
            c.relay.routes[0].next_hop_names,
            [
                HopName::Addr("127.0.0.1:2525".parse().unwrap()),
                HopName::Name("localhost".into(), 2626),
                HopName::Addr("[::1]:2727".parse().unwrap()),
            ]
        );
        assert_eq!(c.relay.next_hops.len(), 2, "parsing the text makes no query: the name waits");
        // resolved in place (this machine's /etc/hosts has localhost), duplicates dropped
        let addrs = resolve(&c.relay.routes[0].next_hop_names).unwrap();
        assert_eq!(addrs[0], "127.0.0.1:2525".parse().unwrap());
        assert!(addrs[1..].contains(&"127.0.0.1:2626".parse().unwrap()), "{addrs:?}");
        assert_eq!(addrs.last(), Some(&"[::1]:2727".parse().unwrap()));
        for bad in
            ["\"mail.internal\"", "\"mail internal:25\"", "\"mail.internal:99999\"", "\"a.test:25\", \"A.test:25\""]
        {
            let text = format!("[relay]\nnext_hops = [{bad}]\n");
            let e = Config::parse(&text, Path::new("m.toml"), Path::new(".")).unwrap_err().to_string();
            assert!(e.contains("relay.next_hops"), "{bad}: {e}");
        }
    }

    #[test]
    fn routes_name_their_domains_and_next_hops_and_share_the_hop_table() {
        let text = "[relay]\ndomains = [\"example.com\", \".example.org\"]\n\
                    next_hops = [\"127.0.0.1:2525\", \"127.0.0.1:2526\"]\nforward_client = \"auto\"\n\
                    [[relay.route]]\ndomains = [\".Example.org\"]\nnext_hops = [\"127.0.0.1:2527\", \"127.0.0.1:2525\"]\n\
                    [[relay.route]]\ndomains = [\"a.example.org\", \"example.com\"]\nnext_hops = [\"127.0.0.1:2528\"]\n";
        let c = Config::parse(text, Path::new("m.toml"), Path::new(".")).unwrap();
        let port = |hop: usize| c.relay.next_hops[hop].port();
        let ports = |route: usize| c.relay.routes[route].hops.iter().map(|&h| port(h)).collect::<Vec<_>>();
        assert_eq!(c.relay.next_hops.len(), 4, "each address once");
        assert_eq!(ports(0), [2525, 2526]);
        assert_eq!(ports(1), [2527, 2525]);
        assert_eq!(ports(2), [2528]);
        assert_eq!(c.relay.routes[1].domains, [".example.org"]);
        assert_eq!((c.relay.routes[0].name(), c.relay.routes[2].name()), ("default", "a.example.org"));
        assert_eq!(c.relay.forward_client, None, "auto: whichever the next hop offers");

        let head = "[relay]\ndomains = [\"example.com\", \".example.org\", \"example.net\"]\n";
        for (route, fault) in [
            ("domains = [\"other.example\"]\nnext_hops = [\"127.0.0.1:1\"]", "not (wholly) among relay.domains"),
            ("domains = [\".example.net\"]\nnext_hops = [\"127.0.0.1:1\"]", "not (wholly) among relay.domains"),
            ("domains = [\"mail.example.com\"]\nnext_hops = [\"127.0.0.1:1\"]", "not (wholly) among relay.domains"),
            ("domains = []\nnext_hops = [\"127.0.0.1:1\"]", "at least one domain"),
            ("domains = [\"example.com\", \"Example.com\"]\nnext_hops = [\"127.0.0.1:1\"]", "given twice"),
            ("domains = [\"example.com\"]", "each entry needs domains and next_hops"),
            ("domains = [\"example.com\"]\nnext_hops = []", "at least one address"),
            ("domains = [\"example.com\"]\nnext_hops = [\"127.0.0.1:1\"]\nweight = 1", "unknown key"),
        ] {
            let text = format!("{head}[[relay.route]]\n{route}\n");
            let e = Config::parse(&text, Path::new("m.toml"), Path::new(".")).unwrap_err().to_string();
            assert!(e.contains("relay.route") && e.contains(fault), "{route}: {e}");
        }
        let twice = format!(
            "{head}[[relay.route]]\ndomains = [\"example.net\"]\nnext_hops = [\"127.0.0.1:1\"]\n\
             [[relay.route]]\ndomains = [\"sub.example.org\", \"example.net\"]\nnext_hops = [\"127.0.0.1:2\"]\n"
        );
        let e = Config::parse(&twice, Path::new("m.toml"), Path::new(".")).unwrap_err().to_string();
        assert!(e.contains("`example.net` is given twice"), "a domain in two routes: {e}");
    }

    #[test]
    fn log_format_and_level() {
        let c = parse("[log]\nformat = \"json\"\nlevel = \"warn\"\n").unwrap();
        assert_eq!(c.log, Log { format: LogFormat::Json, level: "warn".into() });
        assert_eq!(parse("").unwrap().log, Log { format: LogFormat::Text, level: "info".into() });
        for bad in ["format = \"xml\"", "level = \"loud\"", "level = \"info,mxgate=debug\""] {
            let e = parse(&format!("[log]\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains("log."), "{bad}: {e}");
        }
    }

    #[test]
    fn kernel_mode_table_and_refusals() {
        let c = parse("[kernel]\nmode = \"reset\"\ntable = \"edge_1\"\nafter_refusals = 0\n").unwrap();
        let want = Kernel { mode: Some(crate::kernel::Action::Reset), table: "edge_1".into(), after_refusals: 0 };
        assert_eq!(c.kernel, want);
        let off = Kernel { mode: None, table: "mxgate".into(), after_refusals: 3 };
        assert_eq!(parse("").unwrap().kernel, off, "off by default");
        assert_eq!(parse("[kernel]\nmode = \"drop\"\n").unwrap().kernel.mode, Some(crate::kernel::Action::Drop));
        for bad in ["mode = \"block\"", "table = \"1x\"", "table = \"a b\"", "table = \"\"", "after_refusals = -1"] {
            let e = parse(&format!("[kernel]\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains("kernel."), "{bad}: {e}");
        }
        // the mode and the table are read at start; the refusals follow a reload
        let changed = parse("[kernel]\nafter_refusals = 9\n").unwrap();
        assert!(parse("").unwrap().fixed_at_start_changed(&changed).is_empty());
    }

    #[test]
    fn threads_compare_as_they_are_in_force() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let zero = parse("[listen]\nthreads = 0\n").unwrap();
        let same = parse(&format!("[listen]\nthreads = {cores}\n")).unwrap();
        let other = parse(&format!("[listen]\nthreads = {}\n", cores + 1)).unwrap();
        assert!(zero.fixed_at_start_changed(&same).is_empty(), "0 is one per core: nothing changed");
        assert_eq!(zero.fixed_at_start_changed(&other), ["listen.threads"]);
    }
}
