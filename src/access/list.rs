//! List files: one address or CIDR prefix a line, optionally preceded by `allow` or
//! `deny`; `#` starts a comment; blank lines are ignored.
//!
//! ```text
//! # spam sources
//! deny 192.0.2.0/24
//! allow 192.0.2.25          # our partner's relay inside it
//! 2001:db8::/32             # bare: the action opposite to [access] default
//! ```
//!
//! Entries are canonicalised: an IPv4-mapped IPv6 entry (`::ffff:10.0.0.0/104`) is the IPv4
//! entry it names (`10.0.0.0/8`), because peers are canonicalised the same way before they
//! are judged. A prefix with host bits set (`10.1.2.3/8`) is refused as a likely typo.

use std::net::IpAddr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use super::Action;
use crate::problem::{EntryError, Fault, Problem};

/// At most this many problems are reported per file; a file of a million bad lines
/// gets a summary line instead of a million lines of output.
pub const MAX_PROBLEMS_PER_FILE: usize = 100;

/// One entry of a list file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    /// `allow` or `deny` when written; `None` for a bare entry.
    pub action: Option<Action>,
    pub net: IpNet,
    /// 1-based line number in its file.
    pub line: u32,
}

/// Parses a whole list file. Every problem is pushed to `problems` (capped per file);
/// lines with problems are left out of the result.
pub fn parse(bytes: &[u8], file: &Path, problems: &mut Vec<Problem>) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut bad = 0usize;
    for (n, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = u32::try_from(n + 1).unwrap_or(u32::MAX);
        match parse_line(raw) {
            Ok(Some((action, net))) => lines.push(Line { action, net, line: number }),
            Ok(None) => {}
            Err(fault) => {
                bad += 1;
                if bad <= MAX_PROBLEMS_PER_FILE {
                    problems.push(Problem::at_line(file, number, fault));
                }
            }
        }
    }
    if bad > MAX_PROBLEMS_PER_FILE {
        let more = bad - MAX_PROBLEMS_PER_FILE;
        problems.push(Problem::in_file(file, Fault::MoreBadLines(more)));
    }
    lines
}

/// One line: `Ok(None)` for a blank or comment line.
fn parse_line(raw: &[u8]) -> Result<Option<(Option<Action>, IpNet)>, EntryError> {
    let text = std::str::from_utf8(raw).map_err(|_| EntryError::NotUtf8)?;
    let text = text.split('#').next().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let mut words = text.split_ascii_whitespace();
    let mut word = words.next().unwrap_or("");
    let action = match word.to_ascii_lowercase().as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        _ => None,
    };
    if action.is_some() {
        word = words.next().ok_or_else(|| EntryError::NoAddress { text: text.to_owned(), action: word.to_owned() })?;
    }
    let net = parse_net(word)?;
    if let Some(extra) = words.next() {
        return Err(EntryError::Trailing { extra: extra.to_owned(), after: word.to_owned() });
    }
    Ok(Some((action, net)))
}

/// An address (a host prefix) or a CIDR prefix, canonicalised.
pub fn parse_net(word: &str) -> Result<IpNet, EntryError> {
    let net = if word.contains('/') {
        let net: IpNet = word.parse().map_err(|_| EntryError::NotAPrefix(word.to_owned()))?;
        if net.trunc() != net {
            return Err(EntryError::HostBits { given: word.to_owned(), meant: net.trunc().to_string() });
        }
        net
    } else {
        let ip: IpAddr = word.parse().map_err(|_| EntryError::NotAnAddress(word.to_owned()))?;
        IpNet::from(ip)
    };
    Ok(canonical(net))
}

/// `::ffff:a.b.c.d/n` with n ≥ 96 is the IPv4 prefix `a.b.c.d/(n-96)`.
pub fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => match Ipv4Net::new(v4, v6.prefix_len() - 96) {
                Ok(n) => IpNet::V4(n),
                Err(_) => net,
            },
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Option<(Option<Action>, IpNet)>, EntryError> {
        parse_line(line.as_bytes())
    }

    #[test]
    fn entries() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(one("deny 192.0.2.0/24"), Ok(Some((Some(Action::Deny), n("192.0.2.0/24")))));
        assert_eq!(one("  ALLOW 192.0.2.7 # partner"), Ok(Some((Some(Action::Allow), n("192.0.2.7/32")))));
        assert_eq!(one("2001:db8::/32"), Ok(Some((None, n("2001:db8::/32")))));
        assert_eq!(one("::1"), Ok(Some((None, n("::1/128")))));
        assert_eq!(one("\tdeny\t10.0.0.0/8\r"), Ok(Some((Some(Action::Deny), n("10.0.0.0/8")))));
        assert_eq!(one("::ffff:10.0.0.0/104"), Ok(Some((None, n("10.0.0.0/8")))));
        assert_eq!(one("::ffff:127.0.0.9"), Ok(Some((None, n("127.0.0.9/32")))));
        assert_eq!(one("# only a comment"), Ok(None));
        assert_eq!(one("   "), Ok(None));
    }

    #[test]
    fn bad_entries_say_why() {
        for (line, why) in [
            ("deny", "must follow"),
            ("deny 10.0.0.0/33", "not an IP prefix"),
            ("10.1.2.3/8", "did you mean 10.0.0.0/8"),
            ("deny 10.0.0.1 10.0.0.2", "unexpected `10.0.0.2`"),
            ("block 10.0.0.1", "not an IP address"),
            ("300.1.1.1", "not an IP address"),
            ("10.0.0.0/", "not an IP prefix"),
        ] {
            let err = one(line).unwrap_err().to_string();
            assert!(err.contains(why), "{line:?}: {err}");
        }
        assert_eq!(parse_line(b"deny \xff\xfe"), Err(EntryError::NotUtf8));
    }

    #[test]
    fn every_bad_line_is_named_and_output_is_capped() {
        let text = "deny 10.0.0.0/8\nnonsense\n\n# c\n1.2.3.4/40\nallow 1.2.3.4\n";
        let mut problems = Vec::new();
        let lines = parse(text.as_bytes(), Path::new("a.list"), &mut problems);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].line, 6);
        let at: Vec<_> = problems.iter().map(|p| p.line).collect();
        assert_eq!(at, [Some(2), Some(5)]);

        let many = "x\n".repeat(MAX_PROBLEMS_PER_FILE + 7);
        let mut problems = Vec::new();
        parse(many.as_bytes(), Path::new("b.list"), &mut problems);
        assert_eq!(problems.len(), MAX_PROBLEMS_PER_FILE + 1);
        assert!(problems.last().unwrap().fault.to_string().starts_with("7 more"));
    }
}
