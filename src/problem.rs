//! A problem with the operator's input (the config, a list, the ban file, a certificate)
//! or with what the fleet published, and where it is: every fault as a type, whose
//! `Display` is the sentence the operator reads.
//!
//! This module imports nothing of the crate: the parsers above it return these types,
//! and [`Problem`] gathers them with the file, line and key.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a config or list file. Loading collects every problem and
/// reports them together, so one `mxgate check` run shows all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line, when the problem is on one line.
    pub line: Option<u32>,
    /// The config key (`listen.threads`), when the problem is about one.
    pub key: Option<String>,
    pub fault: Fault,
}

impl Problem {
    pub fn in_file(file: &Path, fault: impl Into<Fault>) -> Self {
        Problem { file: file.to_owned(), line: None, key: None, fault: fault.into() }
    }

    pub fn at_line(file: &Path, line: u32, fault: impl Into<Fault>) -> Self {
        Problem { line: Some(line), ..Problem::in_file(file, fault) }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.fault)
    }
}

/// All the problems found while loading; the input was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// What is wrong with a file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The file cannot be read: which file it is, and the system's reason.
    #[error("cannot read {what}: {reason}")]
    Unreadable { what: &'static str, reason: String },
    /// The TOML does not parse (the parser's words).
    #[error("TOML syntax: {0}")]
    Syntax(String),
    /// A key its section does not have, and the keys it has.
    #[error("unknown key; known keys here: {known}")]
    UnknownKey { known: String },
    /// A section that is not a table.
    #[error("expected a table `[{section}]`, found {found}")]
    NotATable { section: String, found: &'static str },
    /// An entry of an array of tables without the keys it needs.
    #[error("each entry needs {0}")]
    MissingKeys(&'static str),
    /// A value of the wrong form or out of range.
    #[error(transparent)]
    Value(#[from] Invalid),
    /// Keys that do not go together.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// A list line.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The same prefix twice with contradicting actions.
    #[error("`{later}` contradicts `{first}` on line {first_line}")]
    Contradiction { later: String, first: String, first_line: u32 },
    /// `deny` in the whitelist, which takes bare entries only.
    #[error("the whitelist takes bare entries only: `deny` has no meaning here")]
    DenyInWhitelist,
    /// Bad lines past the ones reported.
    #[error("{0} more bad lines not shown")]
    MoreBadLines(usize),
    /// More entries than the table takes.
    #[error("more than 2^31 entries")]
    TooManyEntries,
    /// A ban-file line.
    #[error(transparent)]
    Ban(#[from] BanLineError),
    /// A certificate, a key or roots.
    #[error(transparent)]
    Tls(#[from] TlsFault),
}

/// A config value that is not what its key takes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Another TOML type: what the key takes, and what was given.
    #[error("expected {expected}, found {found}")]
    Type { expected: &'static str, found: &'static str },
    /// A whole number outside its range.
    #[error("must be a whole number from {min} to {max}")]
    Range { min: i64, max: i64 },
    /// A size outside its range, in bytes.
    #[error("must be from {} to {}", show_size(*.min), show_size(*.max))]
    SizeRange { min: u64, max: u64 },
    /// Zero where it means nothing: the rule.
    #[error("{0}")]
    Zero(&'static str),
    /// Not one of the words the key takes.
    #[error("`{given}` is not {what}: use {choices}")]
    NotOneOf { given: String, what: &'static str, choices: &'static str },
    /// A duration or a size.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// An element of an array (1-based).
    #[error("element {index}: {fault}")]
    Element { index: usize, fault: Box<Invalid> },
    /// A path that is not a readable file.
    #[error("`{}` is not a readable file", .0.display())]
    NotAFile(PathBuf),
    #[error("`{0}` is not a socket address (e.g. \"127.0.0.1:25\" or \"[::]:25\")")]
    NotASocketAddress(String),
    #[error("`{0}` is not a domain name (letters, digits and hyphens in labels separated by dots)")]
    NotADomain(String),
    /// Not a name a certificate can carry (DNS name or IP address).
    #[error("`{0}`: not a DNS name or IP address")]
    NotAServerName(String),
    /// An address or prefix.
    #[error(transparent)]
    Net(#[from] EntryError),
    /// `cluster.redis`.
    #[error(transparent)]
    Redis(#[from] RedisUrlFault),
    #[error("`{0}`: not an IPv4 address or range")]
    NotAnIpv4Range(String),
    #[error("`{0}`: the range ends before it starts")]
    BackwardsRange(String),
    /// The same thing given twice.
    #[error("`{0}` is given twice")]
    Twice(String),
    #[error("give at least one address")]
    NoAddress,
    #[error("give at least one domain")]
    NoDomain,
    #[error("`{0}`: not (wholly) among relay.domains, whose recipients alone are accepted")]
    NotARelayDomain(String),
    /// A next hop's name that does not resolve (the resolver's words).
    #[error("`{name}` does not resolve: {why}")]
    Unresolved { name: String, why: String },
    #[error("`{0}` is neither a socket address nor host:port (e.g. \"mail.internal:25\")")]
    NotAHostPort(String),
    /// `cluster.prefix`: a character it cannot have.
    #[error("`{0}`: letters, digits, `_`, `.` and `-` only")]
    KeyPrefix(String),
    #[error("`{0}` is not a table name: a letter, then letters, digits, `_` or `-`; at most 64")]
    TableName(String),
    /// A reply line.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A reply line that can render longer than the longest reply.
    #[error("the reply can be longer than {max} octets")]
    ReplyTooLong { max: usize },
}

/// `64MiB`, `1GiB`: a size as written in the config file (whole units only).
fn show_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// Keys that do not go together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("is longer than abuse.max_ban_duration")]
    BanLongerThanMax,
    #[error("give both `cert` and `key`, or neither (no STARTTLS)")]
    HalfTls,
    #[error("needs [tls] cert and key (STARTTLS)")]
    RequireTlsWithoutTls,
    #[error("give the fleet's Redis: `redis://host:port/db`")]
    ClusterWithoutRedis,
}

/// `cluster.redis`, refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedisUrlFault {
    #[error("`{0}`: a redis:// or rediss:// URL")]
    NotAUrl(String),
    #[error("no password in the URL: give password_file")]
    PasswordInUrl,
    #[error("`{0}`: not a user name")]
    NotAUser(String),
    #[error("`{0}`: not a database number")]
    NotADatabase(String),
    #[error("`{0}`: not a port")]
    NotAPort(String),
    #[error("`{0}`: no host")]
    NoHost(String),
}

/// A duration (`30s`) or a size (`50MiB`) that does not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is not a duration: write a whole number and a unit (ms, s, m, h, d), e.g. `30s`")]
    NotADuration(String),
    #[error("`{0}` is too long a duration")]
    DurationTooLong(String),
    /// Longer than the longest ban, `max_days`.
    #[error("`{given}` is longer than the longest ban ({max_days}d, 100 years)")]
    LongerThanBan { given: String, max_days: i64 },
    #[error("`{0}` is not a size: write a whole number and a unit (B, KiB, MiB, GiB), e.g. `50MiB`")]
    NotASize(String),
    #[error("`{0}` is too large a size")]
    SizeTooLarge(String),
}

/// A reply line (`deny_reply`, `ban_reply`) that cannot be one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{0}` must start with a 4xx or 5xx reply code and a space, e.g. `530 5.7.1 ...`")]
    NoCode(String),
    #[error("control character {0:?} in a reply line")]
    Control(char),
    #[error("a reply line must be ASCII")]
    NotAscii,
    #[error("unmatched `}}` in `{0}`")]
    UnmatchedClose(String),
    #[error("unmatched `{{` in `{0}`")]
    UnmatchedOpen(String),
    #[error("unknown placeholder `{{{0}}}`: known are {{hostname}} and {{time}}")]
    UnknownPlaceholder(String),
}

/// A list line (or an address or prefix elsewhere) that does not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("not UTF-8 text")]
    NotUtf8,
    /// `allow` or `deny` and nothing after it.
    #[error("`{text}`: an address or prefix must follow `{action}`")]
    NoAddress { text: String, action: String },
    #[error("`{0}` is not an IP prefix (expected e.g. 192.0.2.0/24 or 2001:db8::/32)")]
    NotAPrefix(String),
    /// Host bits set, and the prefix meant.
    #[error("`{given}` has host bits set: did you mean {meant}?")]
    HostBits { given: String, meant: String },
    #[error("`{0}` is not an IP address or prefix (expected e.g. 192.0.2.7, 192.0.2.0/24 or 2001:db8::/32)")]
    NotAnAddress(String),
    /// Words after the entry.
    #[error("unexpected `{extra}` after `{after}`: one entry a line, `#` starts a comment")]
    Trailing { extra: String, after: String },
}

/// A ban-file line (or a ban the fleet published) that does not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BanLineError {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error(transparent)]
    Prefix(#[from] EntryError),
    #[error("`{0}`: expected name=value")]
    NotNameValue(String),
    #[error("{0}: unterminated quoted text")]
    Unterminated(String),
    #[error("until: `{0}` is not an RFC 3339 UTC time from 1970 to 9999 (e.g. 2030-01-01T00:00:00Z)")]
    NotATime(String),
    #[error("offence: `{given}` is not a number from 1 to {max}")]
    NotAnOffence { given: String, max: u32 },
    #[error("node: `{0}` is not a node name")]
    NotANode(String),
    #[error("unknown `{0}=`: expected until=, reason=, offence=, node=")]
    UnknownField(String),
    #[error("`{0}`: until= is missing")]
    NoUntil(String),
    // what only the fleet's messages can get wrong
    #[error("{len} bytes: longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("control characters in the line")]
    ControlCharacters,
    #[error("the ban names no node= (who made it)")]
    NoNode,
    #[error("unban: expected `unban PREFIX node=NAME`")]
    NotAnUnban,
    #[error("unban: `{0}` has host bits set")]
    UnbanHostBits(String),
    #[error("expected `ban LINE` or `unban PREFIX node=NAME`")]
    UnknownMessage,
}

/// A certificate, a key or roots that cannot serve (the TLS library's words in `why`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsFault {
    /// rustls refused the configuration.
    #[error("{key}: {why}")]
    Setup { key: &'static str, why: String },
    #[error("not a PEM certificate chain: {0}")]
    NotAChain(String),
    #[error("cannot read it: {0}")]
    CannotRead(String),
    #[error("no certificate in it (PEM `BEGIN CERTIFICATE`)")]
    NoCertificate,
    #[error("the certificate expired on {0}")]
    Expired(String),
    #[error("the certificate is not valid yet")]
    NotYetValid,
    /// Certificate `index` (1-based) of the chain.
    #[error("certificate {index} of the chain: {why}")]
    BadCertificate { index: usize, why: String },
    #[error("not a PEM private key (PKCS#8, RSA or EC): {0}")]
    NotAKey(String),
    #[error("the key cannot sign: {0}")]
    CannotSign(String),
    #[error("does not match the certificate in {}: {why}", .cert.display())]
    KeyMismatch { cert: PathBuf, why: String },
    #[error("not PEM certificates: {0}")]
    NotRoots(String),
    #[error("{added} usable root certificates, {ignored} unusable")]
    UnusableRoots { added: usize, ignored: usize },
    #[error("relay.tls: no root certificate in this machine's trust store{0}: give relay.tls_ca")]
    NoMachineRoots(String),
}
