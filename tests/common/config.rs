//! The one config builder of the tests: what every test starts mxgate with (hostname
//! `mx.test`, an ephemeral loopback port, two workers), and what each test adds, one
//! section at a time, rendered with each section once.

use std::fmt::{self, Display};
use std::net::SocketAddr;

#[derive(Clone, Debug)]
pub struct Config {
    /// Sections in the order first named, each with its `key = value` lines; `""` is
    /// the top level.
    sections: Vec<(String, Vec<(String, String)>)>,
    /// `[[...]]` tables, after the sections.
    tables: String,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    pub fn new() -> Self {
        Config { sections: Vec::new(), tables: String::new() }
            .set("", "hostname", "\"mx.test\"")
            .set("listen", "addresses", "[\"127.0.0.1:0\"]")
            .set("listen", "threads", 2)
    }

    /// `key = value` (TOML, as written) in `[section]`, replacing what the key had.
    pub fn set(mut self, section: &str, key: &str, value: impl Display) -> Self {
        let value = value.to_string();
        let at = self.section(section);
        let lines = &mut self.sections[at].1;
        match lines.iter_mut().find(|(k, _)| k == key) {
            Some(line) => line.1 = value,
            None => lines.push((key.to_owned(), value)),
        }
        self
    }

    /// Relays `example.com` to `next_hops`.
    pub fn relay_to(self, next_hops: &[SocketAddr]) -> Self {
        let hops: Vec<String> = next_hops.iter().map(|h| format!("\"{h}\"")).collect();
        self.set("relay", "domains", "[\"example.com\"]").set("relay", "next_hops", format!("[{}]", hops.join(", ")))
    }

    /// TOML text as a test writes it (`[section]` headers, `key = value` lines, `[[...]]`
    /// tables), merged into the sections as if appended to the file: lines before a
    /// header go to the section named last.
    pub fn extra(mut self, toml: &str) -> Self {
        let mut section = self.sections.last().map(|(s, _)| s.clone()).unwrap_or_default();
        let mut in_table = false;
        for line in toml.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.starts_with("[[") {
                in_table = true;
            } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                in_table = false;
                section = name.trim().to_owned();
                self.section(&section);
                continue;
            }
            if in_table {
                self.tables.push_str(line);
                self.tables.push('\n');
                continue;
            }
            let (key, value) = line.split_once('=').expect("key = value");
            self = self.set(&section, key.trim(), value.trim());
        }
        self
    }

    /// Where `[name]` is, added at the end when new.
    fn section(&mut self, name: &str) -> usize {
        self.sections.iter().position(|(s, _)| s == name).unwrap_or_else(|| {
            self.sections.push((name.to_owned(), Vec::new()));
            self.sections.len() - 1
        })
    }
}

impl Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (section, lines) in &self.sections {
            if !section.is_empty() {
                writeln!(f, "[{section}]")?;
            }
            for (key, value) in lines {
                writeln!(f, "{key} = {value}")?;
            }
        }
        f.write_str(&self.tables)
    }
}
