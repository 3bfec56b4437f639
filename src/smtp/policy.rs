//! Which recipients we relay for: never an open relay.
//!
//! A recipient is accepted only when its domain is one of `[relay] domains` (ASCII
//! case-insensitive, a trailing dot tolerated); an entry written `.example.com` matches
//! `example.com` and every subdomain, a plain entry only itself. Refused whatever the
//! domain: address literals (never local), and local parts holding `%`, `!` or (quoted)
//! `@`, which are routing tricks, not mailboxes. `<postmaster>` is always accepted
//! (RFC 5321 §4.5.1). Source routes were already dropped by the parser.
//!
//! An accepted recipient's route (`[[relay.route]]`) is the one with the most specific
//! domain matching it: a plain entry naming its domain, else the `.` entry of its
//! nearest parent (itself included); none: the default route (`[relay] next_hops`),
//! which `<postmaster>` takes too.

use std::collections::{HashMap, HashSet};

use crate::config::Route;

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
    /// Routes by the domain a plain route entry names, and by the parent a `.` entry
    /// names (its index in `relay.routes`).
    route_exact: HashMap<String, usize>,
    route_parents: HashMap<String, usize>,
}

impl RelayDomains {
    /// From `[relay] domains` (already lower case, without trailing dots) and the routes
    /// (`routes[0]`: the default).
    pub fn new(domains: &[String], routes: &[Route]) -> Self {
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
        for (i, route) in routes.iter().enumerate() {
            for d in &route.domains {
                match d.strip_prefix('.') {
                    Some(parent) => r.route_parents.insert(parent.to_owned(), i),
                    None => r.route_exact.insert(d.clone(), i),
                };
            }
        }
        r
    }

    /// Whether mail for `path` may be relayed, and by which route (its index in
    /// `relay.routes`; 0: the default).
    pub fn judge(&self, path: &Path) -> Result<usize, NotOurs> {
        match path {
            Path::Postmaster => Ok(0),
            Path::Null => Err(NotOurs::NotOurDomain),
            Path::Mailbox(m) => self.judge_mailbox(m),
        }
    }

    fn judge_mailbox(&self, m: &Mailbox) -> Result<usize, NotOurs> {
        let local = m.local_unquoted();
        if local.contains(['%', '!']) || (m.is_quoted() && local.contains('@')) {
            return Err(NotOurs::RoutingInLocalPart);
        }
        let name = match &m.domain {
            Domain::Literal(_) => return Err(NotOurs::AddressLiteral),
            Domain::Name(n) => n.trim_end_matches('.').to_lowercase(),
        };
        let ours = self.exact.contains(&name) || parents(&name).any(|p| self.parents.contains(p));
        if !ours {
            return Err(NotOurs::NotOurDomain);
        }
        if self.route_exact.is_empty() && self.route_parents.is_empty() {
            return Ok(0);
        }
        let route = self
            .route_exact
            .get(&name)
            .or_else(|| std::iter::once(name.as_str()).chain(parents(&name)).find_map(|p| self.route_parents.get(p)));
        Ok(route.copied().unwrap_or(0))
    }
}

/// The parent domains of `name`, nearest first: `a.b.c` gives `b.c`, then `c`.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(name.split_once('.').map(|(_, p)| p), |rest| rest.split_once('.').map(|(_, p)| p))
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
        let r = RelayDomains::new(&domains.iter().map(|d| d.to_string()).collect::<Vec<_>>(), &[]);
        match parse_path(rcpt.as_bytes(), true) {
            Ok((path, _)) => r.judge(&path).map(|_| ()).map_err(Refused::Policy),
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

    #[test]
    fn the_most_specific_route_takes_a_recipient() {
        let route = |domains: &[&str]| Route {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            next_hop_names: Vec::new(),
            hops: Vec::new(),
        };
        let routes = [route(&[]), route(&[".example.org"]), route(&["a.example.org"]), route(&[".b.example.org"])];
        let ours = [".example.org".to_string(), "example.com".to_string()];
        let r = RelayDomains::new(&ours, &routes);
        let route_of = |rcpt: &str| r.judge(&parse_path(rcpt.as_bytes(), true).unwrap().0);
        for (rcpt, want) in [
            ("<u@example.com>", Ok(0)),
            ("<postmaster>", Ok(0)),
            ("<u@example.org>", Ok(1)),
            ("<u@x.example.org>", Ok(1)),
            ("<u@A.Example.Org.>", Ok(2)),
            ("<u@x.a.example.org>", Ok(1)),
            ("<u@b.example.org>", Ok(3)),
            ("<u@x.y.b.example.org>", Ok(3)),
            ("<u@outside.example>", Err(NotOurs::NotOurDomain)),
            ("<u@mail.example.com>", Err(NotOurs::NotOurDomain)),
        ] {
            assert_eq!(route_of(rcpt), want, "{rcpt}");
        }
    }
}
