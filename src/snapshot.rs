//! Everything a connection is judged and served by, loaded and checked as one immutable
//! value. The server holds the current one in an `ArcSwap`; a connection loads it once
//! at accept and keeps it for its whole life.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::access::{AccessList, Action};
use crate::config::Config;
use crate::datetime::UnixTime;
use crate::problem::{Fault, Problem, Problems};
use crate::smtp;
use crate::tls::TlsSettings;

static GENERATION: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub struct Snapshot {
    /// Distinct for every snapshot made by this process, so caches can tell them apart.
    pub generation: u64,
    pub config: Config,
    pub access: AccessList,
    /// Peers that are never counted or banned: an entry matching is `Action::Allow`.
    pub whitelist: AccessList,
    /// `[access] shadow_list`: judged after the real decision, never enforced.
    pub shadow: Option<AccessList>,
    /// What sessions need of it.
    pub smtp: Arc<smtp::Settings>,
    /// STARTTLS's configuration, when `[tls]` is given.
    pub tls: Option<TlsSettings>,
    /// The client side of STARTTLS to next hops, when `[relay] tls` is not "off".
    pub relay_tls: Option<Arc<rustls::ClientConfig>>,
}

/// A snapshot's address lists.
pub struct Lists {
    pub access: AccessList,
    pub whitelist: AccessList,
    pub shadow: Option<AccessList>,
}

impl Snapshot {
    /// Loads every list file the config names; any problem anywhere rejects the whole.
    pub fn load(config: Config) -> Result<Self, Problems> {
        let mut problems = Vec::new();
        let access = match &config.access.list {
            Some(file) => AccessList::load(file, config.access.default, &mut problems),
            None => AccessList::empty(config.access.default),
        };
        let whitelist = match &config.abuse.whitelist {
            Some(file) => load_whitelist(file, &mut problems),
            None => AccessList::empty(Action::Deny),
        };
        let shadow =
            config.access.shadow_list.as_ref().map(|f| AccessList::load(f, config.access.default, &mut problems));
        let tls = config.tls.as_ref().and_then(|t| TlsSettings::load(t, UnixTime::now().0, &mut problems));
        let file = config.file.clone().unwrap_or_default();
        let relay_tls = crate::tls::relay_client(&config.relay, &file, &mut problems);
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(Snapshot::new(config, Lists { access, whitelist, shadow }, tls, relay_tls))
    }

    /// A snapshot from parts already loaded.
    pub fn new(
        config: Config,
        lists: Lists,
        tls: Option<TlsSettings>,
        relay_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let Lists { access, whitelist, shadow } = lists;
        let smtp = Arc::new(smtp::Settings::new(&config, tls.is_some()));
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        Snapshot { generation, config, access, whitelist, shadow, smtp, tls, relay_tls }
    }

    /// What works but needs the operator's attention soon (a certificate near its end).
    /// What is valid but likely not meant: a certificate near its end, a hostname that is
    /// not fully qualified (peers see it in the banner and the trace header; the embedded
    /// default is the machine's name), no relay domain (nothing will be relayed).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.tls.as_ref().map(|t| t.warnings.clone()).unwrap_or_default();
        let host = &self.config.hostname;
        if !host.contains('.') {
            warnings.push(format!(
                "hostname \"{host}\" is not a fully qualified name: peers see it in the banner and \
                 Received: headers (set hostname = \"mx.example.com\")"
            ));
        }
        if self.config.relay.domains.is_empty() {
            warnings.push("relay.domains is empty: no recipient is accepted, nothing will be relayed".into());
        }
        warnings
    }

    /// A snapshot of `config` with empty lists and no TLS.
    pub fn without_lists(config: Config) -> Self {
        let access = AccessList::empty(config.access.default);
        let lists = Lists { access, whitelist: AccessList::empty(Action::Deny), shadow: None };
        Snapshot::new(config, lists, None, None)
    }
}

/// The whitelist has the list syntax with bare entries only.
fn load_whitelist(file: &Path, problems: &mut Vec<Problem>) -> AccessList {
    let list = AccessList::load(file, Action::Deny, problems);
    for rule in list.rules().iter().filter(|r| r.action == Action::Deny) {
        problems.push(Problem::at_line(file, rule.line, Fault::DenyInWhitelist));
    }
    list
}
