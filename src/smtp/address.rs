//! Paths of `MAIL FROM:` and `RCPT TO:` (RFC 5321 §4.1.2), with the length limits of
//! §4.5.3.1 and, after `SMTPUTF8`, the UTF-8 forms of RFC 6531.
//!
//! ```text
//! Path       = "<" [ A-d-l ":" ] Mailbox ">"      A-d-l: a source route, parsed and dropped
//! Mailbox    = Local-part "@" ( Domain / address-literal )
//! Local-part = Dot-string / Quoted-string
//! ```

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part, in octets.
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain, in octets.
pub const MAX_DOMAIN: usize = 255;
/// Longest path, angle brackets included, in octets.
pub const MAX_PATH: usize = 256;

/// A mailbox as the peer wrote it (source route removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part as written: a quoted one keeps its quotes and escapes.
    pub local: String,
    pub domain: Domain,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Domain {
    /// A domain name as written (ASCII, or U-labels after SMTPUTF8).
    Name(String),
    /// An address literal, brackets included: `[192.0.2.1]`, `[IPv6:2001:db8::1]`.
    Literal(String),
}

/// A parsed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// `<>`: the null reverse-path of bounces.
    Null,
    /// `<postmaster>` without a domain, which every server must accept (§4.5.1).
    Postmaster,
    Mailbox(Mailbox),
}

impl Mailbox {
    /// True when the local part was quoted.
    pub fn is_quoted(&self) -> bool {
        self.local.starts_with('"')
    }

    /// The local part with quoting undone.
    pub fn local_unquoted(&self) -> String {
        match self.local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
            Some(inner) => {
                let mut out = String::with_capacity(inner.len());
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    out.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
                }
                out
            }
            None => self.local.clone(),
        }
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.domain {
            Domain::Name(d) | Domain::Literal(d) => write!(f, "{}@{d}", self.local),
        }
    }
}

impl fmt::Display for Path {
    /// The path as it goes to the next hop, brackets included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Null => f.write_str("<>"),
            Path::Postmaster => f.write_str("<postmaster>"),
            Path::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressError {
    /// Not a path; the text says what was expected.
    Syntax(&'static str),
    /// Over a limit of §4.5.3.1; the text names which.
    TooLong(&'static str),
    /// Non-ASCII without `SMTPUTF8` on the MAIL command.
    NeedsSmtpUtf8,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Syntax(what) => write!(f, "syntax error in address: {what}"),
            AddressError::TooLong(what) => write!(f, "{what} too long"),
            AddressError::NeedsSmtpUtf8 => f.write_str("non-ASCII address without SMTPUTF8"),
        }
    }
}

/// Parses a path at the start of `input`; returns it and the bytes after its `>`.
pub fn parse_path(input: &[u8], utf8: bool) -> Result<(Path, &[u8]), AddressError> {
    let mut p = Parser { input, pos: 0, utf8 };
    let path = p.path()?;
    if p.pos > MAX_PATH {
        return Err(AddressError::TooLong("path"));
    }
    Ok((path, &input[p.pos..]))
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    utf8: bool,
}

/// Characters of an atom besides letters and digits (RFC 5322 atext).
const ATEXT_SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let yes = self.peek() == Some(b);
        self.pos += usize::from(yes);
        yes
    }

    fn expect(&mut self, b: u8, what: &'static str) -> Result<(), AddressError> {
        if self.eat(b) { Ok(()) } else { Err(AddressError::Syntax(what)) }
    }

    fn path(&mut self) -> Result<Path, AddressError> {
        self.expect(b'<', "expected <")?;
        if self.eat(b'>') {
            return Ok(Path::Null);
        }
        let routed = self.peek() == Some(b'@');
        if routed {
            // A-d-l = At-domain *( "," At-domain ) ":" -- obsolete; dropped (RFC 5321 C)
            loop {
                self.expect(b'@', "expected @ in source route")?;
                self.domain()?;
                if !self.eat(b',') {
                    break;
                }
            }
            self.expect(b':', "expected : after source route")?;
        }
        let local_start = self.pos;
        self.local_part()?;
        let local = self.text(local_start)?;
        if local.len() > MAX_LOCAL_PART {
            return Err(AddressError::TooLong("local part"));
        }
        if !routed && self.peek() == Some(b'>') && local.eq_ignore_ascii_case("postmaster") {
            self.pos += 1;
            return Ok(Path::Postmaster);
        }
        self.expect(b'@', "expected @domain")?;
        let domain_start = self.pos;
        let literal = self.peek() == Some(b'[');
        if literal {
            self.address_literal()?
        } else {
            self.domain()?
        }
        let domain = self.text(domain_start)?;
        if domain.len() > MAX_DOMAIN {
            return Err(AddressError::TooLong("domain"));
        }
        self.expect(b'>', "expected >")?;
        let domain = if literal { Domain::Literal(domain) } else { Domain::Name(domain) };
        Ok(Path::Mailbox(Mailbox { local, domain }))
    }

    /// The input from `start` to here, as text (already checked byte by byte).
    fn text(&self, start: usize) -> Result<String, AddressError> {
        std::str::from_utf8(&self.input[start..self.pos])
            .map(str::to_owned)
            .map_err(|_| AddressError::Syntax("invalid UTF-8"))
    }

    /// Consumes one UTF-8 encoded non-ASCII character, if allowed.
    fn utf8_char(&mut self) -> Result<bool, AddressError> {
        let Some(b) = self.peek().filter(|b| *b >= 0x80) else { return Ok(false) };
        if !self.utf8 {
            return Err(AddressError::NeedsSmtpUtf8);
        }
        let len = match b {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return Err(AddressError::Syntax("invalid UTF-8")),
        };
        let end = self.pos + len;
        let ok = self.input.get(self.pos..end).is_some_and(|s| std::str::from_utf8(s).is_ok());
        if !ok {
            return Err(AddressError::Syntax("invalid UTF-8"));
        }
        self.pos = end;
        Ok(true)
    }

    fn local_part(&mut self) -> Result<(), AddressError> {
        if self.eat(b'"') {
            return self.quoted_string();
        }
        // Dot-string = Atom *("." Atom)
        loop {
            let start = self.pos;
            loop {
                match self.peek() {
                    Some(b) if b.is_ascii_alphanumeric() || ATEXT_SPECIALS.contains(&b) => self.pos += 1,
                    Some(b) if b >= 0x80 => {
                        self.utf8_char()?;
                    }
                    _ => break,
                }
            }
            if self.pos == start {
                let dot = self.peek() == Some(b'.') || self.input.get(self.pos.wrapping_sub(1)) == Some(&b'.');
                return Err(AddressError::Syntax(if dot {
                    "empty or misplaced dot in local part"
                } else {
                    "expected a local part"
                }));
            }
            if !self.eat(b'.') {
                return Ok(());
            }
        }
    }

    fn quoted_string(&mut self) -> Result<(), AddressError> {
        loop {
            match self.peek() {
                None => return Err(AddressError::Syntax("unterminated quoted string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    // quoted-pairSMTP = "\" %d32-126
                    match self.input.get(self.pos + 1) {
                        Some(32..=126) => self.pos += 2,
                        _ => return Err(AddressError::Syntax("bad escape in quoted string")),
                    }
                }
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126
                Some(32..=126) => self.pos += 1,
                Some(b) if b >= 0x80 => {
                    self.utf8_char()?;
                }
                Some(_) => return Err(AddressError::Syntax("control character in quoted string")),
            }
        }
    }

    /// Domain = sub-domain *("." sub-domain); a trailing dot is tolerated.
    fn domain(&mut self) -> Result<(), AddressError> {
        loop {
            let start = self.pos;
            let mut last = 0u8;
            loop {
                match self.peek() {
                    Some(b) if b.is_ascii_alphanumeric() || (b == b'-' && self.pos > start) => {
                        last = b;
                        self.pos += 1;
                    }
                    Some(b) if b >= 0x80 => {
                        self.utf8_char()?;
                        last = b'a';
                    }
                    _ => break,
                }
            }
            if self.pos == start || last == b'-' {
                return Err(AddressError::Syntax("bad domain"));
            }
            if !self.eat(b'.') || !matches!(self.peek(), Some(b) if b.is_ascii_alphanumeric() || b >= 0x80) {
                return Ok(());
            }
        }
    }

    /// `[1.2.3.4]`, `[IPv6:...]` or a general literal `[tag:content]`.
    fn address_literal(&mut self) -> Result<(), AddressError> {
        self.expect(b'[', "expected [")?;
        let start = self.pos;
        while matches!(self.peek(), Some(33..=90 | 94..=126)) {
            self.pos += 1;
        }
        let inner = std::str::from_utf8(&self.input[start..self.pos]).unwrap_or("");
        self.expect(b']', "expected ] after address literal")?;
        let valid = match inner.split_once(':') {
            Some((tag, addr)) if tag.eq_ignore_ascii_case("IPv6") => addr.parse::<Ipv6Addr>().is_ok(),
            // General-address-literal = Standardized-tag ":" 1*dcontent
            Some((tag, content)) => {
                !tag.is_empty()
                    && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !tag.ends_with('-')
                    && !content.is_empty()
            }
            None => inner.parse::<Ipv4Addr>().is_ok(),
        };
        if valid { Ok(()) } else { Err(AddressError::Syntax("bad address literal")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str, utf8: bool) -> (Path, String) {
        let (p, rest) = parse_path(input.as_bytes(), utf8).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        (p, String::from_utf8(rest.to_vec()).unwrap())
    }

    fn mailbox(local: &str, domain: &str) -> Path {
        let domain = if domain.starts_with('[') { Domain::Literal(domain.into()) } else { Domain::Name(domain.into()) };
        Path::Mailbox(Mailbox { local: local.into(), domain })
    }

    #[test]
    fn valid_paths() {
        let cases: &[(&str, Path, &str)] = &[
            ("<>", Path::Null, ""),
            ("<user@example.com>", mailbox("user", "example.com"), ""),
            ("<user@example.com> SIZE=100", mailbox("user", "example.com"), " SIZE=100"),
            ("<first.last+tag@sub.example.com>", mailbox("first.last+tag", "sub.example.com"), ""),
            ("<!#$%&'*+-/=?^_`{|}~@x.example>", mailbox("!#$%&'*+-/=?^_`{|}~", "x.example"), ""),
            ("<\"quoted user\"@example.com>", mailbox("\"quoted user\"", "example.com"), ""),
            ("<\"a\\\"b\\\\c\"@example.com>", mailbox("\"a\\\"b\\\\c\"", "example.com"), ""),
            ("<\"a>b\"@example.com>", mailbox("\"a>b\"", "example.com"), ""),
            ("<user@[192.0.2.1]>", mailbox("user", "[192.0.2.1]"), ""),
            ("<user@[IPv6:2001:db8::1]>", mailbox("user", "[IPv6:2001:db8::1]"), ""),
            ("<user@[x-tag:anything]>", mailbox("user", "[x-tag:anything]"), ""),
            ("<@relay.example,@other.example:user@example.com>", mailbox("user", "example.com"), ""),
            ("<user@example.com.>", mailbox("user", "example.com."), ""),
            ("<Postmaster>", Path::Postmaster, ""),
            ("<a-b@x-y.example>", mailbox("a-b", "x-y.example"), ""),
        ];
        for (input, want, rest) in cases {
            assert_eq!(ok(input, false), (want.clone(), rest.to_string()), "{input}");
        }
    }

    #[test]
    fn invalid_paths() {
        let cases: &[(&[u8], AddressError)] = &[
            (b"user@example.com", AddressError::Syntax("expected <")),
            (b"<user@example.com", AddressError::Syntax("expected >")),
            (b"<user>", AddressError::Syntax("expected @domain")),
            (b"<@a.example:postmaster>", AddressError::Syntax("expected @domain")),
            (b"<.user@example.com>", AddressError::Syntax("empty or misplaced dot in local part")),
            (b"<user.@example.com>", AddressError::Syntax("empty or misplaced dot in local part")),
            (b"<us..er@example.com>", AddressError::Syntax("empty or misplaced dot in local part")),
            (b"<user@example..com>", AddressError::Syntax("expected >")),
            (b"<user@-example.com>", AddressError::Syntax("bad domain")),
            (b"<user@example-.com>", AddressError::Syntax("bad domain")),
            (b"<user@ext@local.example>", AddressError::Syntax("expected >")),
            (b"<user name@example.com>", AddressError::Syntax("expected @domain")),
            (b"<\"unterminated@example.com>", AddressError::Syntax("unterminated quoted string")),
            (b"<\"a\x01b\"@example.com>", AddressError::Syntax("control character in quoted string")),
            (b"<user@[300.1.1.1]>", AddressError::Syntax("bad address literal")),
            (b"<user@[IPv6:nonsense]>", AddressError::Syntax("bad address literal")),
            (b"<user@[192.0.2.1>", AddressError::Syntax("expected ] after address literal")),
            (b"<@relay.example user@example.com>", AddressError::Syntax("expected : after source route")),
            (b"<us\xc3\xa9r@example.com>", AddressError::NeedsSmtpUtf8),
            (b"<user@\xc3\xa9.example>", AddressError::NeedsSmtpUtf8),
            (b"<user@\xff.example>", AddressError::NeedsSmtpUtf8),
            (b"<", AddressError::Syntax("expected a local part")),
            (b"<@example.com>", AddressError::Syntax("expected : after source route")),
            (b"", AddressError::Syntax("expected <")),
        ];
        for (input, want) in cases {
            assert_eq!(parse_path(input, false).map(|p| p.0), Err(*want), "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn smtputf8_addresses() {
        assert_eq!(ok("<usér@exämple.com>", true).0, mailbox("usér", "exämple.com"));
        assert_eq!(ok("<\"ü ser\"@example.com>", true).0, mailbox("\"ü ser\"", "example.com"));
        assert_eq!(
            parse_path(b"<us\xffer@example.com>", true).map(|p| p.0),
            Err(AddressError::Syntax("invalid UTF-8"))
        );
        assert_eq!(parse_path(b"<us\xc3@example.com>", true).map(|p| p.0), Err(AddressError::Syntax("invalid UTF-8")));
    }

    #[test]
    fn limits_are_exact() {
        let local = |n: usize| "a".repeat(n);
        // domain of labels of 63 octets, dot-separated, `len` octets in all
        let domain = |len: usize| {
            let mut d = String::new();
            while d.len() < len {
                if !d.is_empty() {
                    d.push('.');
                }
                let take = (len - d.len()).min(63);
                d.push_str(&"b".repeat(take));
            }
            d
        };
        assert!(parse_path(format!("<{}@x.example>", local(64)).as_bytes(), false).is_ok());
        assert_eq!(
            parse_path(format!("<{}@x.example>", local(65)).as_bytes(), false).map(|p| p.0),
            Err(AddressError::TooLong("local part"))
        );
        // a domain of exactly 255 octets would make the path longer than 256
        let d255 = domain(255);
        assert_eq!(d255.len(), 255);
        assert_eq!(
            parse_path(format!("<a@{d255}>").as_bytes(), false).map(|p| p.0),
            Err(AddressError::TooLong("path"))
        );
        let d256 = domain(256);
        assert_eq!(
            parse_path(format!("<a@{d256}>").as_bytes(), false).map(|p| p.0),
            Err(AddressError::TooLong("domain"))
        );
        // path of exactly 256 octets: < + 1 + @ + 252 + > = 256
        let d252 = domain(252);
        assert!(parse_path(format!("<a@{d252}>").as_bytes(), false).is_ok());
        assert_eq!(
            parse_path(format!("<ab@{d252}>").as_bytes(), false).map(|p| p.0),
            Err(AddressError::TooLong("path"))
        );
    }

    #[test]
    fn unquoting_and_display() {
        let (Path::Mailbox(m), _) = ok("<\"a\\\"b c\"@example.com>", false) else { panic!() };
        assert!(m.is_quoted());
        assert_eq!(m.local_unquoted(), "a\"b c");
        assert_eq!(ok("<@r.example:u@d.example>", false).0.to_string(), "<u@d.example>");
        assert_eq!(Path::Null.to_string(), "<>");
    }
}
