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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The file cannot be read: which file it is, and the system's reason.
    Unreadable { what: &'static str, reason: String },
    /// The TOML does not parse (the parser's words).
    Syntax(String),
    /// A key its section does not have, and the keys it has.
    UnknownKey { known: String },
    /// A section that is not a table.
    NotATable { section: String, found: &'static str },
    /// An entry of an array of tables without the keys it needs.
    MissingKeys(&'static str),
    /// A value of the wrong form or out of range.
    Value(Invalid),
    /// Keys that do not go together.
    Conflict(Conflict),
    /// A list line.
    Entry(EntryError),
    /// The same prefix twice with contradicting actions.
    Contradiction { later: String, first: String, first_line: u32 },
    /// `deny` in the whitelist, which takes bare entries only.
    DenyInWhitelist,
    /// Bad lines past the ones reported.
    MoreBadLines(usize),
    /// More entries than the table takes.
    TooManyEntries,
    /// A ban-file line.
    Ban(BanLineError),
    /// A certificate, a key or roots.
    Tls(TlsFault),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Unreadable { what, reason } => write!(f, "cannot read {what}: {reason}"),
            Fault::Syntax(why) => write!(f, "TOML syntax: {why}"),
            Fault::UnknownKey { known } => write!(f, "unknown key; known keys here: {known}"),
            Fault::NotATable { section, found } => write!(f, "expected a table `[{section}]`, found {found}"),
            Fault::MissingKeys(keys) => write!(f, "each entry needs {keys}"),
            Fault::Value(v) => v.fmt(f),
            Fault::Conflict(c) => c.fmt(f),
            Fault::Entry(e) => e.fmt(f),
            Fault::Contradiction { later, first, first_line } => {
                write!(f, "`{later}` contradicts `{first}` on line {first_line}")
            }
            Fault::DenyInWhitelist => f.write_str("the whitelist takes bare entries only: `deny` has no meaning here"),
            Fault::MoreBadLines(n) => write!(f, "{n} more bad lines not shown"),
            Fault::TooManyEntries => f.write_str("more than 2^31 entries"),
            Fault::Ban(b) => b.fmt(f),
            Fault::Tls(t) => t.fmt(f),
        }
    }
}

macro_rules! fault_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for Fault {
            fn from(e: $t) -> Self {
                Fault::$v(e)
            }
        })*
    };
}
fault_from!(Invalid => Value, Conflict => Conflict, EntryError => Entry, BanLineError => Ban, TlsFault => Tls);

/// A config value that is not what its key takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Another TOML type: what the key takes, and what was given.
    Type {
        expected: &'static str,
        found: &'static str,
    },
    /// A whole number outside its range.
    Range {
        min: i64,
        max: i64,
    },
    /// A size outside its range, in bytes.
    SizeRange {
        min: u64,
        max: u64,
    },
    /// Zero where it means nothing: the rule.
    Zero(&'static str),
    /// Not one of the words the key takes.
    NotOneOf {
        given: String,
        what: &'static str,
        choices: &'static str,
    },
    /// A duration or a size.
    Unit(UnitError),
    /// An element of an array (1-based).
    Element {
        index: usize,
        fault: Box<Invalid>,
    },
    /// A path that is not a readable file.
    NotAFile(PathBuf),
    NotASocketAddress(String),
    NotADomain(String),
    /// Not a name a certificate can carry (DNS name or IP address).
    NotAServerName(String),
    /// An address or prefix.
    Net(EntryError),
    /// `cluster.redis`.
    Redis(RedisUrlFault),
    NotAnIpv4Range(String),
    BackwardsRange(String),
    /// The same thing given twice.
    Twice(String),
    NoAddress,
    /// `cluster.prefix`: a character it cannot have.
    KeyPrefix(String),
    /// A reply line.
    Template(TemplateError),
    /// A reply line that can render longer than the longest reply.
    ReplyTooLong {
        max: usize,
    },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Type { expected, found } => write!(f, "expected {expected}, found {found}"),
            Invalid::Range { min, max } => write!(f, "must be a whole number from {min} to {max}"),
            Invalid::SizeRange { min, max } => write!(f, "must be from {} to {}", show_size(*min), show_size(*max)),
            Invalid::Zero(rule) => f.write_str(rule),
            Invalid::NotOneOf { given, what, choices } => write!(f, "`{given}` is not {what}: use {choices}"),
            Invalid::Unit(u) => u.fmt(f),
            Invalid::Element { index, fault } => write!(f, "element {index}: {fault}"),
            Invalid::NotAFile(p) => write!(f, "`{}` is not a readable file", p.display()),
            Invalid::NotASocketAddress(s) => {
                write!(f, "`{s}` is not a socket address (e.g. \"127.0.0.1:25\" or \"[::]:25\")")
            }
            Invalid::NotADomain(s) => {
                write!(f, "`{s}` is not a domain name (letters, digits and hyphens in labels separated by dots)")
            }
            Invalid::NotAServerName(s) => write!(f, "`{s}`: not a DNS name or IP address"),
            Invalid::Net(e) => e.fmt(f),
            Invalid::Redis(r) => r.fmt(f),
            Invalid::NotAnIpv4Range(s) => write!(f, "`{s}`: not an IPv4 address or range"),
            Invalid::BackwardsRange(s) => write!(f, "`{s}`: the range ends before it starts"),
            Invalid::Twice(s) => write!(f, "`{s}` is given twice"),
            Invalid::NoAddress => f.write_str("give at least one address"),
            Invalid::KeyPrefix(p) => write!(f, "`{p}`: letters, digits, `_`, `.` and `-` only"),
            Invalid::Template(t) => t.fmt(f),
            Invalid::ReplyTooLong { max } => write!(f, "the reply can be longer than {max} octets"),
        }
    }
}

impl std::error::Error for Invalid {}

impl From<UnitError> for Invalid {
    fn from(e: UnitError) -> Self {
        Invalid::Unit(e)
    }
}

impl From<EntryError> for Invalid {
    fn from(e: EntryError) -> Self {
        Invalid::Net(e)
    }
}

impl From<TemplateError> for Invalid {
    fn from(e: TemplateError) -> Self {
        Invalid::Template(e)
    }
}

impl From<RedisUrlFault> for Invalid {
    fn from(e: RedisUrlFault) -> Self {
        Invalid::Redis(e)
    }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    BanLongerThanMax,
    HalfTls,
    RequireTlsWithoutTls,
    ClusterWithoutRedis,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Conflict::BanLongerThanMax => "is longer than abuse.max_ban_duration",
            Conflict::HalfTls => "give both `cert` and `key`, or neither (no STARTTLS)",
            Conflict::RequireTlsWithoutTls => "needs [tls] cert and key (STARTTLS)",
            Conflict::ClusterWithoutRedis => "give the fleet's Redis: `redis://host:port/db`",
        })
    }
}

/// `cluster.redis`, refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisUrlFault {
    NotAUrl(String),
    PasswordInUrl,
    NotAUser(String),
    NotADatabase(String),
    NotAPort(String),
    NoHost(String),
}

impl fmt::Display for RedisUrlFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisUrlFault::NotAUrl(s) => write!(f, "`{s}`: a redis:// or rediss:// URL"),
            RedisUrlFault::PasswordInUrl => f.write_str("no password in the URL: give password_file"),
            RedisUrlFault::NotAUser(u) => write!(f, "`{u}`: not a user name"),
            RedisUrlFault::NotADatabase(d) => write!(f, "`{d}`: not a database number"),
            RedisUrlFault::NotAPort(p) => write!(f, "`{p}`: not a port"),
            RedisUrlFault::NoHost(s) => write!(f, "`{s}`: no host"),
        }
    }
}

/// A duration (`30s`) or a size (`50MiB`) that does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitError {
    NotADuration(String),
    DurationTooLong(String),
    /// Longer than the longest ban, `max_days`.
    LongerThanBan {
        given: String,
        max_days: i64,
    },
    NotASize(String),
    SizeTooLarge(String),
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitError::NotADuration(t) => {
                write!(f, "`{t}` is not a duration: write a whole number and a unit (ms, s, m, h, d), e.g. `30s`")
            }
            UnitError::DurationTooLong(t) => write!(f, "`{t}` is too long a duration"),
            UnitError::LongerThanBan { given, max_days } => {
                write!(f, "`{given}` is longer than the longest ban ({max_days}d, 100 years)")
            }
            UnitError::NotASize(t) => {
                write!(f, "`{t}` is not a size: write a whole number and a unit (B, KiB, MiB, GiB), e.g. `50MiB`")
            }
            UnitError::SizeTooLarge(t) => write!(f, "`{t}` is too large a size"),
        }
    }
}

impl std::error::Error for UnitError {}

/// A reply line (`deny_reply`, `ban_reply`) that cannot be one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    NoCode(String),
    Control(char),
    NotAscii,
    UnmatchedClose(String),
    UnmatchedOpen(String),
    UnknownPlaceholder(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::NoCode(t) => {
                write!(f, "`{t}` must start with a 4xx or 5xx reply code and a space, e.g. `530 5.7.1 ...`")
            }
            TemplateError::Control(c) => write!(f, "control character {c:?} in a reply line"),
            TemplateError::NotAscii => f.write_str("a reply line must be ASCII"),
            TemplateError::UnmatchedClose(t) => write!(f, "unmatched `}}` in `{t}`"),
            TemplateError::UnmatchedOpen(t) => write!(f, "unmatched `{{` in `{t}`"),
            TemplateError::UnknownPlaceholder(p) => {
                write!(f, "unknown placeholder `{{{p}}}`: known are {{hostname}} and {{time}}")
            }
        }
    }
}

/// A list line (or an address or prefix elsewhere) that does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryError {
    NotUtf8,
    /// `allow` or `deny` and nothing after it.
    NoAddress {
        text: String,
        action: String,
    },
    NotAPrefix(String),
    /// Host bits set, and the prefix meant.
    HostBits {
        given: String,
        meant: String,
    },
    NotAnAddress(String),
    /// Words after the entry.
    Trailing {
        extra: String,
        after: String,
    },
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::NotUtf8 => f.write_str("not UTF-8 text"),
            EntryError::NoAddress { text, action } => {
                write!(f, "`{text}`: an address or prefix must follow `{action}`")
            }
            EntryError::NotAPrefix(w) => {
                write!(f, "`{w}` is not an IP prefix (expected e.g. 192.0.2.0/24 or 2001:db8::/32)")
            }
            EntryError::HostBits { given, meant } => write!(f, "`{given}` has host bits set: did you mean {meant}?"),
            EntryError::NotAnAddress(w) => write!(
                f,
                "`{w}` is not an IP address or prefix (expected e.g. 192.0.2.7, 192.0.2.0/24 or 2001:db8::/32)"
            ),
            EntryError::Trailing { extra, after } => {
                write!(f, "unexpected `{extra}` after `{after}`: one entry a line, `#` starts a comment")
            }
        }
    }
}

/// A ban-file line (or a ban the fleet published) that does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BanLineError {
    NotUtf8,
    Prefix(EntryError),
    NotNameValue(String),
    Unterminated(String),
    NotATime(String),
    NotAnOffence { given: String, max: u32 },
    NotANode(String),
    UnknownField(String),
    NoUntil(String),
    // what only the fleet's messages can get wrong
    TooLong { len: usize, max: usize },
    ControlCharacters,
    NoNode,
    NotAnUnban,
    UnbanHostBits(String),
    UnknownMessage,
}

impl fmt::Display for BanLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanLineError::NotUtf8 => f.write_str("not UTF-8 text"),
            BanLineError::Prefix(e) => e.fmt(f),
            BanLineError::NotNameValue(rest) => write!(f, "`{rest}`: expected name=value"),
            BanLineError::Unterminated(name) => write!(f, "{name}: unterminated quoted text"),
            BanLineError::NotATime(w) => {
                write!(f, "until: `{w}` is not an RFC 3339 UTC time from 1970 to 9999 (e.g. 2030-01-01T00:00:00Z)")
            }
            BanLineError::NotAnOffence { given, max } => {
                write!(f, "offence: `{given}` is not a number from 1 to {max}")
            }
            BanLineError::NotANode(w) => write!(f, "node: `{w}` is not a node name"),
            BanLineError::UnknownField(n) => write!(f, "unknown `{n}=`: expected until=, reason=, offence=, node="),
            BanLineError::NoUntil(prefix) => write!(f, "`{prefix}`: until= is missing"),
            BanLineError::TooLong { len, max } => write!(f, "{len} bytes: longer than {max}"),
            BanLineError::ControlCharacters => f.write_str("control characters in the line"),
            BanLineError::NoNode => f.write_str("the ban names no node= (who made it)"),
            BanLineError::NotAnUnban => f.write_str("unban: expected `unban PREFIX node=NAME`"),
            BanLineError::UnbanHostBits(p) => write!(f, "unban: `{p}` has host bits set"),
            BanLineError::UnknownMessage => f.write_str("expected `ban LINE` or `unban PREFIX node=NAME`"),
        }
    }
}

impl From<EntryError> for BanLineError {
    fn from(e: EntryError) -> Self {
        BanLineError::Prefix(e)
    }
}

/// A certificate, a key or roots that cannot serve (the TLS library's words in `why`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFault {
    /// rustls refused the configuration.
    Setup {
        key: &'static str,
        why: String,
    },
    NotAChain(String),
    CannotRead(String),
    NoCertificate,
    Expired(String),
    NotYetValid,
    /// Certificate `index` (1-based) of the chain.
    BadCertificate {
        index: usize,
        why: String,
    },
    NotAKey(String),
    CannotSign(String),
    KeyMismatch {
        cert: PathBuf,
        why: String,
    },
    NotRoots(String),
    UnusableRoots {
        added: usize,
        ignored: usize,
    },
    NoMachineRoots(String),
}

impl fmt::Display for TlsFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFault::Setup { key, why } => write!(f, "{key}: {why}"),
            TlsFault::NotAChain(why) => write!(f, "not a PEM certificate chain: {why}"),
            TlsFault::CannotRead(why) => write!(f, "cannot read it: {why}"),
            TlsFault::NoCertificate => f.write_str("no certificate in it (PEM `BEGIN CERTIFICATE`)"),
            TlsFault::Expired(on) => write!(f, "the certificate expired on {on}"),
            TlsFault::NotYetValid => f.write_str("the certificate is not valid yet"),
            TlsFault::BadCertificate { index, why } => write!(f, "certificate {index} of the chain: {why}"),
            TlsFault::NotAKey(why) => write!(f, "not a PEM private key (PKCS#8, RSA or EC): {why}"),
            TlsFault::CannotSign(why) => write!(f, "the key cannot sign: {why}"),
            TlsFault::KeyMismatch { cert, why } => {
                write!(f, "does not match the certificate in {}: {why}", cert.display())
            }
            TlsFault::NotRoots(why) => write!(f, "not PEM certificates: {why}"),
            TlsFault::UnusableRoots { added, ignored } => {
                write!(f, "{added} usable root certificates, {ignored} unusable")
            }
            TlsFault::NoMachineRoots(why) => {
                write!(f, "relay.tls: no root certificate in this machine's trust store{why}: give relay.tls_ca")
            }
        }
    }
}
