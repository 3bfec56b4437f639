//! What comes before the session: a trusted balancer's PROXY header, and screening.
//!
//! On a balancer's connection (`[listen] proxy_protocol_from`) the header is read and
//! parsed here (sans-IO, the parser is `crate::proxy`), then judged by the host on the
//! address it carries.
//!
//! ```text
//!   accept (a balancer) ─► Header ──header whole──► Judge ──reported──► Waiting ──host: allowed──►
//!                            │  ▲ need more                             │   None (the session gets
//!                            │  └──────┘                                │   the peer and the bytes
//!                            │                                          │   after the header)
//!                            │                                          └─host: refused──► Refuse:
//!                            │                                             the line, close (Last)
//!                            └─ malformed, over its size, closed, late ─► Close (no banner)
//! ```
//!
//! The pregreet test (`[screen] pregreet`, `screen::pregreet`) is a front too, for an allowed peer not
//! remembered as passing (after a balancer's header, or at accept):
//!
//! ```text
//!   Pregreet: "220-<host> ESMTP", then silence until greet_wait ──► None: the session's banner
//!      │                                                            completes the greeting
//!      └─ any byte first ─► Reject: 554 5.7.1, close (a failure of the address)
//! ```
//!
//! DNS blocklists run beside it (the connection's `dns`, answers from the host's
//! resolver): the session waits for both; a score at or over the threshold is a Reject
//! with the 550 line at once, whatever the pregreet test is at.
//!
//! Direct peers that need neither never get a front.

use std::time::Instant;

use crate::proxy::{self, Header, Parsed};

#[derive(Debug, Default)]
pub enum Front {
    /// The session has the connection.
    #[default]
    None,
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
    /// The pregreet test: the greeting's first line (`sent` of it out), then silence
    /// until `deadline`.
    Pregreet(crate::screen::pregreet::Pregreet),
    /// Refused by screening: `line` (`replies::TALKED_EARLY`, or the DNSBL's 550),
    /// `sent` of it out, then close.
    Reject { line: std::borrow::Cow<'static, [u8]>, sent: usize },
}

/// Why a balancer's connection ended without a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoHeader {
    #[error("{0}")]
    Invalid(proxy::HeaderFault),
    #[error("truncated header")]
    Truncated,
    #[error("no header within proxy_timeout")]
    Late,
}

impl Front {
    pub fn header(deadline: Instant) -> Self {
        Front::Header { got: Vec::new(), deadline }
    }

    /// Bytes from the balancer; `Err` when they can never be a header. The parser says
    /// "need more" only short of a header's bounded size, so what is kept stays under
    /// `proxy::MAX_V2` and one read.
    pub fn input(&mut self, bytes: &[u8]) -> Result<(), NoHeader> {
        let Front::Header { got, .. } = self else { return Ok(()) };
        let parsed = if got.is_empty() {
            // the common case: the whole header in the first read, parsed where it lies
            match proxy::parse(bytes) {
                Parsed::Done { header, consumed } => {
                    *self = Front::Judge { header, rest: bytes[consumed..].to_vec() };
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
            Parsed::Invalid(why) => self.fail(NoHeader::Invalid(why)),
            Parsed::Done { header, consumed } => {
                let rest = match self {
                    Front::Header { got, .. } => got.split_off(consumed),
                    _ => Vec::new(),
                };
                *self = Front::Judge { header, rest };
                Ok(())
            }
        }
    }

    /// The balancer closed its side (or the connection broke) before a whole header.
    pub fn eof(&mut self) -> Option<NoHeader> {
        let Front::Header { got, .. } = self else { return None };
        // a bare TCP check (connect, close) is no malformed header
        let why = (!got.is_empty()).then_some(NoHeader::Truncated);
        *self = Front::Close;
        why
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Front::Header { deadline, .. } => Some(*deadline),
            Front::Pregreet(test) => Some(test.deadline()),
            _ => None,
        }
    }

    /// The deadline passed: late.
    pub fn timeout(&mut self, now: Instant) -> Option<NoHeader> {
        match self {
            Front::Header { deadline, .. } if *deadline <= now => self.fail(NoHeader::Late).err(),
            _ => None,
        }
    }

    fn fail(&mut self, why: NoHeader) -> Result<(), NoHeader> {
        *self = Front::Close;
        Err(why)
    }
}
