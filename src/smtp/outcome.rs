//! How a transaction ended, and when it ended without delivery, why and whose fault
//! that was: one type for every cause, with the party at fault and the reply the peer
//! gets, so the mail log and the counts say the same thing the peer heard.
//!
//! ```text
//!   Outcome ─┬─ Delivered                      (the next hop's 250, then ours)
//!            ├─ Undelivered(cause) ── party():  Peer     its body, its pipelining
//!            │                                   NextHop  refused, timed out, broke the
//!            │                                            protocol, no TLS, said 421
//!            │                                   Us       no next hop configured
//!            └─ Abandoned(why)                 (RSET, QUIT, disconnect, timeout)
//! ```

use std::fmt;

use super::data::BodyFault;
use super::replies::{BARE_LINE_END, IMPROPER_PIPELINING, NEXT_HOP_FAILED, NO_8BIT, NUL_IN_BODY, RCPT_FIRST, TOO_BIG};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The next hop said 250 to the message, and so did we.
    Delivered,
    /// The message was refused or could not be relayed.
    Undelivered(Undelivered),
    /// Ended without a reply to a message: RSET, QUIT, disconnect, timeout.
    Abandoned(&'static str),
}

/// Whose fault it is that a message was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    /// The peer: what it sent cannot be relayed.
    Peer,
    /// The next hop: it refused, or failed.
    NextHop,
    /// This server: its configuration left the message nowhere to go.
    Us,
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Party::Peer => "peer",
            Party::NextHop => "next_hop",
            Party::Us => "us",
        })
    }
}

/// Why a message was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// The peer's body broke a rule (a bare CR or LF, a NUL, the size).
    Body(BodyFault),
    /// Input sent after DATA before its 354.
    ImproperPipelining,
    /// The next hop said 354 with no recipient accepted: no body for it.
    NoValidRecipients,
    /// The next hop refused the sender, with this code.
    SenderRefused(u16),
    /// The next hop refused the message, with this code.
    MessageRefused(u16),
    /// The message needs 8BITMIME or SMTPUTF8, which the next hop lacks.
    Lacks8Bit,
    /// No next hop answered for the transaction (before or during it).
    HopFailed(HopFault),
}

/// How the next hop failed (the details are logged at debug where they happen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopFault {
    /// No next hop is configured.
    NoneConfigured,
    /// The connection could not be made, or broke (refused, reset, closed).
    Connection,
    /// No reply within `reply_timeout`.
    TimedOut,
    /// It said 421: it is closing the connection.
    Closing,
    /// It broke the protocol (a malformed, unsolicited or out-of-step reply) or refused
    /// us before any command.
    Protocol,
    /// It gives no TLS where `relay.tls = "required"`.
    NoTls,
    /// Every next hop is down (could not be reached or timed out lately): not tried.
    AllDown,
}

impl Undelivered {
    pub fn party(self) -> Party {
        match self {
            Undelivered::Body(_) | Undelivered::ImproperPipelining => Party::Peer,
            Undelivered::HopFailed(HopFault::NoneConfigured) => Party::Us,
            Undelivered::NoValidRecipients
            | Undelivered::SenderRefused(_)
            | Undelivered::MessageRefused(_)
            | Undelivered::Lacks8Bit
            | Undelivered::HopFailed(_) => Party::NextHop,
        }
    }

    /// The reply code the peer got.
    pub fn code(self) -> u16 {
        match self {
            Undelivered::SenderRefused(code) | Undelivered::MessageRefused(code) => code,
            ours => reply_code(ours.reply().unwrap_or_default()),
        }
    }

    /// Our reply for it; `None` where the peer gets the next hop's own.
    pub fn reply(self) -> Option<&'static [u8]> {
        Some(match self {
            Undelivered::Body(BodyFault::BareLineEnd) => BARE_LINE_END,
            Undelivered::Body(BodyFault::Nul) => NUL_IN_BODY,
            Undelivered::Body(BodyFault::TooBig) => TOO_BIG,
            Undelivered::ImproperPipelining => IMPROPER_PIPELINING,
            Undelivered::NoValidRecipients => RCPT_FIRST,
            Undelivered::Lacks8Bit => NO_8BIT,
            Undelivered::HopFailed(_) => NEXT_HOP_FAILED,
            Undelivered::SenderRefused(_) | Undelivered::MessageRefused(_) => return None,
        })
    }

    /// The words for the mail log.
    fn why(self) -> &'static str {
        match self {
            Undelivered::Body(BodyFault::BareLineEnd) => "bare CR or LF in the body",
            Undelivered::Body(BodyFault::Nul) => "NUL in the body",
            Undelivered::Body(BodyFault::TooBig) => "message too big",
            Undelivered::ImproperPipelining => "improper pipelining",
            Undelivered::NoValidRecipients => "no valid recipients",
            Undelivered::SenderRefused(_) => "next hop refused the sender",
            Undelivered::MessageRefused(_) => "next hop refused the message",
            Undelivered::Lacks8Bit => "next hop lacks 8BITMIME/SMTPUTF8",
            Undelivered::HopFailed(HopFault::NoneConfigured) => "no next hop configured",
            Undelivered::HopFailed(HopFault::Connection) => "next hop unavailable: connection failed",
            Undelivered::HopFailed(HopFault::TimedOut) => "next hop unavailable: timed out",
            Undelivered::HopFailed(HopFault::Closing) => "next hop unavailable: it said 421",
            Undelivered::HopFailed(HopFault::Protocol) => "next hop unavailable: it broke the protocol",
            Undelivered::HopFailed(HopFault::NoTls) => "next hop unavailable: no TLS",
            Undelivered::HopFailed(HopFault::AllDown) => "next hop unavailable: every next hop is down",
        }
    }
}

/// `result=<code> "<why>" fault=<party>`, or `result=250 delivered`, or `result=- "<why>"`.
impl Outcome {
    /// The mail log's result (the code the peer got, `-` for none), what it says, and
    /// whose fault it was (none for a delivery or an abandonment).
    pub fn parts(&self) -> (String, &'static str, Option<Party>) {
        match self {
            Outcome::Delivered => ("250".to_owned(), "delivered", None),
            Outcome::Undelivered(u) => (u.code().to_string(), u.why(), Some(u.party())),
            Outcome::Abandoned(why) => ("-".to_owned(), why, None),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Delivered => write!(f, "result=250 delivered"),
            Outcome::Undelivered(u) => write!(f, "result={} \"{}\" fault={}", u.code(), u.why(), u.party()),
            Outcome::Abandoned(why) => write!(f, "result=- \"{why}\""),
        }
    }
}

fn reply_code(reply: &[u8]) -> u16 {
    reply.get(..3).and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cause: whose fault it is, the code the peer gets, and our reply's first
    /// words (none where the next hop's own reply is passed on).
    #[test]
    fn every_cause_has_its_party_and_reply() {
        let table: &[(Undelivered, Party, u16, Option<&str>)] = &[
            (Undelivered::Body(BodyFault::BareLineEnd), Party::Peer, 554, Some("554 5.6.0 message refused: bare CR")),
            (Undelivered::Body(BodyFault::Nul), Party::Peer, 554, Some("554 5.6.0 message refused: NUL")),
            (Undelivered::Body(BodyFault::TooBig), Party::Peer, 552, Some("552 5.3.4 ")),
            (Undelivered::ImproperPipelining, Party::Peer, 503, Some("503 5.5.0 improper use")),
            (Undelivered::NoValidRecipients, Party::NextHop, 554, Some("554 5.5.1 no valid recipients")),
            (Undelivered::SenderRefused(552), Party::NextHop, 552, None),
            (Undelivered::MessageRefused(452), Party::NextHop, 452, None),
            (Undelivered::Lacks8Bit, Party::NextHop, 555, Some("555 5.3.3 ")),
            (Undelivered::HopFailed(HopFault::NoneConfigured), Party::Us, 451, Some("451 4.4.1 next hop unavailable")),
            (Undelivered::HopFailed(HopFault::Connection), Party::NextHop, 451, Some("451 4.4.1 ")),
            (Undelivered::HopFailed(HopFault::TimedOut), Party::NextHop, 451, Some("451 4.4.1 ")),
            (Undelivered::HopFailed(HopFault::Closing), Party::NextHop, 451, Some("451 4.4.1 ")),
            (Undelivered::HopFailed(HopFault::Protocol), Party::NextHop, 451, Some("451 4.4.1 ")),
            (Undelivered::HopFailed(HopFault::NoTls), Party::NextHop, 451, Some("451 4.4.1 ")),
            (Undelivered::HopFailed(HopFault::AllDown), Party::NextHop, 451, Some("451 4.4.1 ")),
        ];
        for &(cause, party, code, reply) in table {
            assert_eq!((cause.party(), cause.code()), (party, code), "{cause:?}");
            let ours = cause.reply().map(|r| String::from_utf8_lossy(r).into_owned());
            match (reply, ours) {
                (Some(start), Some(ours)) => assert!(ours.starts_with(start) && ours.ends_with("\r\n"), "{ours}"),
                (None, None) => {}
                (want, got) => panic!("{cause:?}: {want:?} vs {got:?}"),
            }
            let line = Outcome::Undelivered(cause).to_string();
            assert!(line.starts_with(&format!("result={code} \"")) && line.ends_with(&format!(" fault={party}")));
        }
    }
}
