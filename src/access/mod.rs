//! The access list: which peers may talk to us at all.
//!
//! A list file (syntax in [`list`]) is parsed into [`Rule`]s and flattened into a
//! [`PrefixTable`]; the longest matching prefix decides, and an address no rule covers
//! gets `[access] default`. A bare entry takes the action opposite to the default, so
//! with `default = "allow"` a plain list of addresses is a deny list, and with
//! `default = "deny"` it is the list of the only peers granted.

pub mod list;
pub mod table;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::problem::{Fault, Problem};
pub use table::PrefixTable;

/// What happens to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn opposite(self) -> Action {
        match self {
            Action::Allow => Action::Deny,
            Action::Deny => Action::Allow,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// One entry of a loaded list, with where it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub net: IpNet,
    pub action: Action,
    /// 1-based line in the list file.
    pub line: u32,
}

/// The decision for one address, and the rule that made it (`None`: the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    pub action: Action,
    pub rule: Option<&'a Rule>,
}

/// An immutable, loaded access list.
#[derive(Debug)]
pub struct AccessList {
    file: Option<PathBuf>,
    default: Action,
    rules: Vec<Rule>,
    /// Values are `rule index << 1 | (action == Deny)`, so the hot path reads the
    /// action from the table alone without touching `rules`.
    table: PrefixTable,
}

impl AccessList {
    /// An empty list: every address gets `default`.
    pub fn empty(default: Action) -> Self {
        AccessList { file: None, default, rules: Vec::new(), table: PrefixTable::default() }
    }

    /// Reads and parses `file`; every problem is pushed to `problems`.
    pub fn load(file: &Path, default: Action, problems: &mut Vec<Problem>) -> Self {
        match std::fs::read(file) {
            Ok(bytes) => AccessList::from_bytes(&bytes, file, default, problems),
            Err(e) => {
                problems.push(Problem::in_file(file, Fault::Unreadable { what: "the list", reason: e.to_string() }));
                AccessList { file: Some(file.to_owned()), ..AccessList::empty(default) }
            }
        }
    }

    /// Parses a list's contents, as if read from `file`.
    pub fn from_bytes(bytes: &[u8], file: &Path, default: Action, problems: &mut Vec<Problem>) -> Self {
        let mut list = AccessList { file: Some(file.to_owned()), ..AccessList::empty(default) };
        list.add_lines(&list::parse(bytes, file, problems), file, problems);
        list
    }

    fn add_lines(&mut self, lines: &[list::Line], file: &Path, problems: &mut Vec<Problem>) {
        let bare = self.default.opposite();
        self.rules =
            lines.iter().map(|l| Rule { net: l.net, action: l.action.unwrap_or(bare), line: l.line }).collect();
        // rule index << 1 | 1 must stay below the table's reserved u32::MAX
        if self.rules.len() >= (1 << 31) - 1 {
            problems.push(Problem::in_file(file, Fault::TooManyEntries));
            self.rules.clear();
        }
        // The same prefix twice with different actions is a contradiction to report;
        // the same prefix twice with the same action is harmless (the first is kept).
        let rules = &self.rules;
        let pack = |(i, r): (usize, &Rule)| (r.net, (i as u32) << 1 | u32::from(r.action == Action::Deny));
        self.table = PrefixTable::build_with(rules.iter().enumerate().map(pack), |kept, dropped| {
            let (first, later) = (&rules[(kept >> 1) as usize], &rules[(dropped >> 1) as usize]);
            if later.action != first.action {
                let contradiction = Fault::Contradiction {
                    later: format!("{} {}", later.action, later.net),
                    first: format!("{} {}", first.action, first.net),
                    first_line: first.line,
                };
                problems.push(Problem::at_line(file, later.line, contradiction));
            }
        });
    }

    /// The action for a canonical address: the gate's hot path.
    #[inline]
    pub fn action(&self, ip: IpAddr) -> Action {
        match self.table.lookup(ip) {
            Some(v) if v & 1 == 1 => Action::Deny,
            Some(_) => Action::Allow,
            None => self.default,
        }
    }

    /// The action for a canonical address and the rule that decided it.
    pub fn decide(&self, ip: IpAddr) -> Decision<'_> {
        match self.table.lookup(ip) {
            Some(v) => {
                let rule = &self.rules[(v >> 1) as usize];
                Decision { action: rule.action, rule: Some(rule) }
            }
            None => Decision { action: self.default, rule: None },
        }
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn default_action(&self) -> Action {
        self.default
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str, default: Action) -> AccessList {
        let mut problems = Vec::new();
        let l = AccessList::from_bytes(text.as_bytes(), Path::new("t.list"), default, &mut problems);
        assert_eq!(problems, []);
        l
    }

    fn ip(s: &str) -> IpAddr {
        s.parse::<IpAddr>().unwrap().to_canonical()
    }

    #[test]
    fn nested_allow_and_deny() {
        let l = list("deny 127.0.0.0/8\nallow 127.0.1.0/24\ndeny 127.0.1.7\n", Action::Allow);
        assert_eq!(l.action(ip("127.0.1.7")), Action::Deny);
        assert_eq!(l.action(ip("127.0.1.8")), Action::Allow);
        assert_eq!(l.action(ip("127.0.2.1")), Action::Deny);
        assert_eq!(l.action(ip("128.0.0.1")), Action::Allow);
        assert_eq!(l.action(ip("::ffff:127.0.2.1")), Action::Deny);
        let v = l.decide(ip("127.0.1.8"));
        assert_eq!((v.action, v.rule.map(|r| r.line)), (Action::Allow, Some(2)));
        assert_eq!(l.decide(ip("10.0.0.1")).rule, None);
    }

    #[test]
    fn bare_entries_take_the_opposite_of_the_default() {
        let deny_list = list("192.0.2.1\n", Action::Allow);
        assert_eq!(deny_list.action(ip("192.0.2.1")), Action::Deny);
        assert_eq!(deny_list.action(ip("192.0.2.2")), Action::Allow);
        let grant_list = list("192.0.2.1\n", Action::Deny);
        assert_eq!(grant_list.action(ip("192.0.2.1")), Action::Allow);
        assert_eq!(grant_list.action(ip("192.0.2.2")), Action::Deny);
    }

    #[test]
    fn contradicting_duplicates_are_reported() {
        let mut problems = Vec::new();
        AccessList::from_bytes(
            b"deny 10.0.0.0/8\n10.0.0.1\nallow 10.0.0.0/8\ndeny 10.0.0.0/8\n",
            Path::new("t.list"),
            Action::Allow,
            &mut problems,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, Some(3));
        assert!(problems[0].fault.to_string().contains("line 1"), "{}", problems[0]);
    }
}
