//! Every reply the server gives, in one place: the fixed lines, and those that carry the
//! hostname, built once per snapshot ([`Params`]). A next hop's replies are passed on as
//! they come (see `client::Reply::render`); the deny and ban lines are templates in the
//! configuration.

use crate::config::Config;

pub const OK: &[u8] = b"250 2.0.0 OK\r\n";
pub const HELP: &[u8] = b"214 2.0.0 commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT\r\n";
pub const UNRECOGNIZED: &[u8] = b"500 5.5.2 command unrecognized\r\n";
pub const BARE_LF: &[u8] = b"500 5.5.2 line must end with CRLF\r\n";
pub const BAD_CHARACTER: &[u8] = b"500 5.5.2 CR or NUL inside a command line\r\n";
pub const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 command not implemented\r\n";
pub const EHLO_SYNTAX: &[u8] = b"501 5.5.4 syntax: EHLO domain\r\n";
pub const HELO_SYNTAX: &[u8] = b"501 5.5.4 syntax: HELO domain\r\n";
pub const NO_PARAMETERS: &[u8] = b"501 5.5.4 this command takes no parameters\r\n";
pub const GREET_FIRST: &[u8] = b"503 5.5.1 send EHLO or HELO first\r\n";
pub const NESTED_MAIL: &[u8] = b"503 5.5.1 a transaction is already open\r\n";
pub const MAIL_FIRST: &[u8] = b"503 5.5.1 send MAIL first\r\n";
pub const RCPT_FIRST: &[u8] = b"554 5.5.1 no valid recipients\r\n";
pub const MAIL_SYNTAX: &[u8] = b"501 5.5.4 syntax: MAIL FROM:<address> [parameters]\r\n";
pub const RCPT_SYNTAX: &[u8] = b"501 5.5.4 syntax: RCPT TO:<address>\r\n";
pub const BAD_PARAMETER: &[u8] = b"555 5.5.4 unsupported parameter\r\n";
pub const TOO_BIG: &[u8] = b"552 5.3.4 message size exceeds the limit\r\n";
/// BDAT whose size is not a number: where its octets end cannot be known, so the
/// connection is closed after this.
pub const BDAT_SYNTAX: &[u8] = b"501 5.5.4 syntax: BDAT size [LAST]\r\n";
/// BDAT (its octets swallowed) in a transaction without an accepted recipient.
pub const BDAT_NO_RCPT: &[u8] = b"503 5.5.1 no valid recipients\r\n";
/// DATA in a transaction whose body came in BDAT chunks.
pub const DATA_AFTER_BDAT: &[u8] = b"503 5.5.1 DATA after BDAT\r\n";

/// The reply to a BDAT chunk that is not the last: its octets are taken.
pub fn chunk_taken(octets: u64) -> Vec<u8> {
    format!("250 2.0.0 {octets} octets received\r\n").into_bytes()
}
pub const TOO_MANY_RECIPIENTS: &[u8] = b"452 4.5.3 too many recipients\r\n";
/// A recipient whose route (`[[relay.route]]`) is not the transaction's: one in-line
/// transaction goes to one next hop, so the peer sends it again in another.
pub const OTHER_ROUTE: &[u8] = b"452 4.5.3 recipient of another route: send it in another transaction\r\n";
/// A DSN parameter (RFC 3461) whose value is malformed, or given twice.
pub const DSN_SYNTAX: &[u8] = b"501 5.5.4 malformed DSN parameter\r\n";
/// EHLO's line offering DSN.
pub const DSN_OFFER: &[u8] = b"250-DSN\r\n";

/// A reply that is a failure of the peer's address: every 5xx, and our 452 for a
/// recipient past the limit (a peer flooding RCPT earns it). Never a 4xx that says the
/// next hop or this server cannot serve now.
pub fn counts_as_failure(reply: &[u8]) -> bool {
    reply.first() == Some(&b'5') || reply == TOO_MANY_RECIPIENTS
}
pub const RELAY_DENIED: &[u8] = b"550 5.7.1 relay access denied\r\n";
pub const NO_NULL_RECIPIENT: &[u8] = b"501 5.1.3 the null path is no recipient\r\n";
pub const NEXT_HOP_FAILED: &[u8] = b"451 4.4.1 next hop unavailable, try again later\r\n";
pub const IMPROPER_PIPELINING: &[u8] = b"503 5.5.0 improper use of SMTP command pipelining\r\n";
pub const CANNOT_VERIFY: &[u8] = b"252 2.5.0 cannot verify the user, but will relay the message\r\n";
pub const MAIL_OK: &[u8] = b"250 2.1.0 sender OK\r\n";
pub const RCPT_OK: &[u8] = b"250 2.1.5 recipient OK\r\n";
pub const GO_AHEAD: &[u8] = b"354 end data with <CR><LF>.<CR><LF>\r\n";
pub const NO_8BIT: &[u8] = b"555 5.3.3 8BITMIME or SMTPUTF8 mail cannot be relayed now\r\n";
pub const BARE_LINE_END: &[u8] = b"554 5.6.0 message refused: bare CR or LF in the body\r\n";
pub const NUL_IN_BODY: &[u8] = b"554 5.6.0 message refused: NUL in the body\r\n";
/// Before the banner, past `max_connections_per_ip`.
pub const TOO_MANY_FROM_ADDRESS: &[u8] = b"421 4.7.0 too many connections from your address\r\n";
/// Before the banner, past `listen.max_connections`.
pub const BUSY: &[u8] = b"421 4.3.2 service busy\r\n";
pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 line too long\r\n";
pub const NEEDS_SMTPUTF8: &[u8] = b"553 5.6.7 non-ASCII address without SMTPUTF8\r\n";
pub const READY_FOR_TLS: &[u8] = b"220 2.0.0 ready to start TLS\r\n";
pub const STARTTLS_NOT_NOW: &[u8] = b"503 5.5.1 STARTTLS not allowed now\r\n";
pub const TLS_FIRST: &[u8] = b"530 5.7.0 must issue a STARTTLS command first\r\n";
/// The pregreet test: the peer spoke before the greeting was complete.
pub const TALKED_EARLY: &[u8] = b"554 5.7.1 protocol error: talked before the greeting\r\n";

/// The reply to the end of data when the next hop took the message: our id, and the
/// next hop's when its reply gave one.
pub fn queued(id: &str, hop_id: Option<&str>) -> Vec<u8> {
    match hop_id {
        Some(hop) => format!("250 2.0.0 OK: queued as {id} (next hop: {hop})\r\n").into_bytes(),
        None => format!("250 2.0.0 OK: queued as {id}\r\n").into_bytes(),
    }
}

/// Replies fixed for one configuration, built once per snapshot.
#[derive(Debug)]
pub struct Params {
    pub(super) banner: Box<[u8]>,
    /// The pregreet test's first line of a two-line greeting; the banner is the second.
    pub greeting_first: Box<[u8]>,
    /// The EHLO reply in parts, as the session puts it together (see `HopBook`): up to
    /// its SIZE number, the number, then `ehlo_mid`, DSN when offered, and the end: with
    /// STARTTLS when `[tls]` offers it, without after STARTTLS.
    pub(super) ehlo_head: Box<[u8]>,
    pub(super) ehlo_mid: Box<[u8]>,
    pub(super) ehlo_end: Box<[u8]>,
    pub(super) ehlo_end_tls: Box<[u8]>,
    pub(super) helo: Box<[u8]>,
    pub(super) quit: Box<[u8]>,
    pub(super) idle_timeout: Box<[u8]>,
    pub(super) shutdown: Box<[u8]>,
    pub(super) too_many_errors: Box<[u8]>,
}

impl Params {
    pub fn new(config: &Config, starttls: bool) -> Self {
        let host = &config.hostname;
        let lines = |s: String| s.into_bytes().into_boxed_slice();
        let ehlo_end = |starttls: bool| {
            let tls = if starttls { "250-STARTTLS\r\n" } else { "" };
            format!("{tls}250 ENHANCEDSTATUSCODES\r\n")
        };
        Params {
            banner: lines(format!("220 {host} ESMTP mxgate\r\n")),
            greeting_first: lines(format!("220-{host} ESMTP\r\n")),
            ehlo_head: lines(format!("250-{host}\r\n250-PIPELINING\r\n250-SIZE ")),
            ehlo_mid: lines("\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n".into()),
            ehlo_end: lines(ehlo_end(starttls)),
            ehlo_end_tls: lines(ehlo_end(false)),
            helo: lines(format!("250 {host}\r\n")),
            quit: lines(format!("221 2.0.0 {host} closing connection\r\n")),
            idle_timeout: lines(format!("421 4.4.2 {host} timeout exceeded, closing connection\r\n")),
            shutdown: lines(format!("421 4.3.2 {host} service shutting down, closing connection\r\n")),
            too_many_errors: lines(format!("421 4.7.0 {host} too many errors\r\n")),
        }
    }
}
