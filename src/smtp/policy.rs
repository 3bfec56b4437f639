//! Which recipients we relay for: never an open relay.
//!
//! A recipient is accepted only when its domain is one of `[relay] domains` (ASCII
//! case-insensitive, a trailing dot tolerated); an entry written `.example.com` matches
//! `example.com` and every subdomain, a plain entry only itself. Refused whatever the
//! domain: address literals (never local), and local parts holding `%`, `!` or (quoted)
//! `@`, which are routing tricks, not mailboxes. `<postmaster>` is always accepted
//! (RFC 5321 §4.5.1). Source routes were already dropped by the parser.

use std::collections::HashSet;

use super::address::{Domain, Mailbox, Path};

/// Why a recipient is not ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotOurs {
    NotOurDomain,
    AddressLiteral,
    RoutingInLocalPart,
}

/// The relay domains of one snapshot.
#[derive(Debug, Default)]
pub struct RelayDomains {
    /// Domains accepted as they are (lower case, no trailing dot).
    exact: HashSet<String>,
    /// Domains whose subdomains are accepted too.
    parents: HashSet<String>,
}

impl RelayDomains {
    /// From `[relay] domains` (already lower case, without trailing dots).
    pub fn new(domains: &[String]) -> Self {
        let mut r = RelayDomains::default();
        for d in domains {
            match d.strip_prefix('.') {
                Some(parent) => {
                    r.exact.insert(parent.to_owned());
                    r.parents.insert(parent.to_owned());
                }
                None => {
                    r.exact.insert(d.clone());
                }
            }
        }
        r
    }

    /// Whether mail for `path` may be relayed.
    pub fn judge(&self, path: &Path) -> Result<(), NotOurs> {
        match path {
            Path::Postmaster => Ok(()),
            Path::Null => Err(NotOurs::NotOurDomain),
            Path::Mailbox(m) => self.judge_mailbox(m),
        }
    }

    fn judge_mailbox(&self, m: &Mailbox) -> Result<(), NotOurs> {
        let local = m.local_unquoted();
        if local.contains(['%', '!']) || (m.is_quoted() && local.contains('@')) {
            return Err(NotOurs::RoutingInLocalPart);
        }
        let name = match &m.domain {
            Domain::Literal(_) => return Err(NotOurs::AddressLiteral),
            Domain::Name(n) => n.trim_end_matches('.').to_lowercase(),
        };
        if self.exact.contains(&name) {
            return Ok(());
        }
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if self.parents.contains(parent) {
                return Ok(());
            }
            rest = parent;
        }
        Err(NotOurs::NotOurDomain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::parse_path;

    /// Why a recipient is refused: its syntax, or the policy.
    #[derive(Debug, PartialEq, Eq)]
    enum Refused {
        Syntax,
        Policy(NotOurs),
    }

    fn judge(domains: &[&str], rcpt: &str) -> Result<(), Refused> {
        let r = RelayDomains::new(&domains.iter().map(|d| d.to_string()).collect::<Vec<_>>());
        match parse_path(rcpt.as_bytes(), true) {
            Ok((path, _)) => r.judge(&path).map_err(Refused::Policy),
            Err(_) => Err(Refused::Syntax),
        }
    }

    #[test]
    fn our_domains_are_accepted() {
        let ours = ["example.com", ".example.org"];
        for rcpt in [
            "<user@example.com>",
            "<user@EXAMPLE.COM>",
            "<user@example.com.>",
            "<user@example.org>",
            "<user@mail.example.org>",
            "<user@a.b.example.org>",
            "<\"quoted user\"@example.com>",
            "<@outside.example:user@example.com>",
            "<postmaster>",
            "<PostMaster>",
        ] {
            assert_eq!(judge(&ours, rcpt), Ok(()), "{rcpt}");
        }
    }

    /// Open-relay probes: each must be refused (by policy or as bad syntax).
    #[test]
    fn open_relay_probes_are_refused() {
        let ours = ["example.com", ".example.org"];
        let probes = [
            "<user@outside.example>",
            "<user@mail.example.com>",            // a plain entry does not take subdomains
            "<user@example.com.outside.example>", // suffix tricks
            "<user@notexample.com>",
            "<user@badexample.org>",
            "<user%outside.example@example.com>",     // percent hack
            "<outside.example!user@example.com>",     // bang path
            "<\"user@outside.example\"@example.com>", // quoted @
            "<\"user%outside.example\"@example.com>",
            "<\"outside!user\"@example.com>",
            "<user@outside.example@example.com>",  // u@ext@local
            "<@example.com:user@outside.example>", // source route through us
            "<@example.com,@example.org:user@outside.example>",
            "<user@[192.0.2.1]>", // address literals are never local
            "<user@[IPv6:2001:db8::1]>",
            "<user@[127.0.0.1]>",
            "<user@[x-tag:example.com]>",
            "<user@com>",
            "<user@org>",
            "<>",
            "<user@outside.example.>",
        ];
        assert!(probes.len() >= 16);
        for rcpt in probes {
            assert!(judge(&ours, rcpt).is_err(), "{rcpt} must be refused");
        }
    }

    #[test]
    fn no_domains_accept_nothing_but_postmaster() {
        assert!(judge(&[], "<user@example.com>").is_err());
        assert_eq!(judge(&[], "<postmaster>"), Ok(()));
    }
}
