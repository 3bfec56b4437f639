//! A connection's stage, one enum: before the session (a trusted balancer's PROXY header,
//! the host judging the address it carries, screening), the session, and the ends
//! (a refusal's line, a silent close).
//!
//! ```text
//!   accept (a balancer) ─► Header ──header whole──► Judge ──reported──► Waiting ──host: allowed──┐
//!                            │  ▲ need more                               │                      │
//!                            │  └──────┘                                  └─host: refused─► Refuse: the
//!                            │                                                line, close (Last)
//!                            └─ malformed, over its size, closed, late ─► Close (no banner)
//!
//!   accept (direct, allowed) ─┬─ screened ─► Screening { pregreet, dns } ─┬─ both behind ─► Session
//!   the balancer's address ───┘                 │ talked early (pregreet)  │   (a pass to remember)
//!   allowed                   └─ not screened ──┼─────────────────────────┼──────────────► Session
//!                                               └─► Reject: 554 / the DNSBL's 550, close ◄┘ blocked
//! ```
//!
//! Screening runs the pregreet test (`crate::screen::pregreet`: the greeting's first line,
//! then silence) and the blocklists (`crate::screen::dnsbl`, answers from the host's
//! resolver) side by side; without the pregreet test the session has the peer's bytes, and
//! its banner waits for the answers. Direct peers that need neither go straight to
//! Session.

use std::time::Instant;

use crate::proxy::{self, Header, Parsed};
use crate::screen::dnsbl::Pending;
use crate::screen::pregreet::Pregreet;

#[derive(Debug, Default)]
pub enum Stage {
    /// The session has the connection.
    #[default]
    Session,
    /// Reading the header, until `deadline`.
    Header { got: Vec<u8>, deadline: Instant },
    /// A whole header: the host judges the address it carries; `rest` is the session's.
    Judge { header: Header, rest: Vec<u8> },
    /// The host has the header and is judging it.
    Waiting,
    /// Refused after the header: this line (the gate's), then close.
    Refuse { line: Box<[u8]> },
    /// No header: close without a word.
    Close,
    /// Screening: the pregreet test while `pregreet`, the blocklists' answers awaited
    /// while `dns`; one of them at least.
    Screening { pregreet: Option<Pregreet>, dns: Option<Pending> },
    /// Refused by screening: `line` (`replies::TALKED_EARLY`, or the DNSBL's 550),
    /// `sent` of it out, then close.
    Reject { line: std::borrow::Cow<'static, [u8]>, sent: usize },
}

/// Why a balancer's header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadHeader {
    #[error("{0}")]
    Invalid(proxy::HeaderFault),
    #[error("truncated header")]
    Truncated,
    #[error("no header within proxy_timeout")]
    Late,
}

impl Stage {
    pub fn header(deadline: Instant) -> Self {
        Stage::Header { got: Vec::new(), deadline }
    }

    /// The stage an allowed peer starts in: screening, with the pregreet test until
    /// `pregreet` and `zones` blocklists to ask; the session when neither.
    pub fn screening(pregreet: Option<Instant>, zones: usize) -> Self {
        let pregreet = pregreet.map(Pregreet::new);
        let dns = (zones > 0).then(|| Pending::new(zones));
        if pregreet.is_none() && dns.is_none() { Stage::Session } else { Stage::Screening { pregreet, dns } }
    }

    /// The session has the peer's bytes (during screening too, once the pregreet test is
    /// behind it or when there is none).
    pub fn in_session(&self) -> bool {
        matches!(self, Stage::Session | Stage::Screening { pregreet: None, .. })
    }

    /// Bytes from the balancer; `Err` when they can never be a header. The parser says
    /// "need more" only short of a header's bounded size, so what is kept stays under
    /// `proxy::MAX_V2` and one read.
    pub fn input(&mut self, bytes: &[u8]) -> Result<(), BadHeader> {
        let Stage::Header { got, .. } = self else { return Ok(()) };
        let parsed = if got.is_empty() {
            // the common case: the whole header in the first read, parsed where it lies
            match proxy::parse(bytes) {
                Parsed::Done { header, consumed } => {
                    *self = Stage::Judge { header, rest: bytes[consumed..].to_vec() };
                    return Ok(());
                }
                Parsed::NeedMore => {
                    got.extend_from_slice(bytes);
                    return Ok(());
                }
                invalid => invalid,
            }
        } else {
            got.extend_from_slice(bytes);
            proxy::parse(got)
        };
        match parsed {
            Parsed::NeedMore => Ok(()),
            Parsed::Invalid(why) => self.fail(BadHeader::Invalid(why)),
            Parsed::Done { header, consumed } => {
                let rest = match self {
                    Stage::Header { got, .. } => got.split_off(consumed),
                    _ => Vec::new(),
                };
                *self = Stage::Judge { header, rest };
                Ok(())
            }
        }
    }

    /// The balancer closed its side (or the connection broke) before a whole header.
    pub fn eof(&mut self) -> Option<BadHeader> {
        let Stage::Header { got, .. } = self else { return None };
        // a bare TCP check (connect, close) is no malformed header
        let why = (!got.is_empty()).then_some(BadHeader::Truncated);
        *self = Stage::Close;
        why
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Stage::Header { deadline, .. } => Some(*deadline),
            Stage::Screening { pregreet: Some(test), .. } => Some(test.deadline()),
            _ => None,
        }
    }

    /// The deadline passed: late.
    pub fn timeout(&mut self, now: Instant) -> Option<BadHeader> {
        match self {
            Stage::Header { deadline, .. } if *deadline <= now => self.fail(BadHeader::Late).err(),
            _ => None,
        }
    }

    fn fail(&mut self, why: BadHeader) -> Result<(), BadHeader> {
        *self = Stage::Close;
        Err(why)
    }
}
