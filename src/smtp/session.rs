//! The session's state, its peer's port and its clock. Commands are in `verbs.rs`, what
//! goes to the next hop over the lent [`Link`] and the body in `forward.rs`.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Settings;
use super::address::Path;
use super::command::{self, Verb};
use super::data::{BodyFilter, ChunkFilter};
use super::link::Link;
use super::outbuf::OutBuf;
use super::outcome::{HopFault, Outcome};
use super::replies::{LINE_TOO_LONG, counts_as_failure};
use super::{ABORT_GRACE, CLOSE_GRACE, DATA_RATE_GRACE, MAX_LINE_LEN, MAX_OWED, RELAY_HIGH_WATER};
use crate::datetime::{UnixTime, WallClock};
use crate::peer::PeerIp;
use crate::tls::Negotiated;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Open,
    /// The last reply is draining.
    Closing {
        until: Instant,
    },
    Closed,
}

/// What the driver does next on the peer's socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit<'a> {
    Send(&'a [u8]),
    Receive,
    /// Nothing until something else happens (the next hop answers, a timer fires).
    Wait,
    Close,
    /// Send these bytes and close at once, without waiting for the send (nothing
    /// completes: the peer's side is over): one short line on a fresh connection, as the
    /// gate's refusal at accept (a driver that hands it to the kernel keeps its own copy
    /// until the send is done). Only a connection's front says it (the deny line after a balancer's PROXY
    /// header); a session never does.
    Last(&'a [u8]),
}

/// Something for the driver to log or count.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A transaction ended; one mail-log line.
    Transaction(Box<Transaction>),
    /// A command or a recipient was answered 5xx: one more failure of the peer's address.
    Failed(Failure),
    /// The conversation passed `max_failed_commands` or `max_failed_recipients` and is
    /// being dropped with 421 (for `ban_on_drop`).
    Dropped,
    /// A STARTTLS handshake ended: done, or failed (then `Failed` follows).
    Handshake { ok: bool, took: Duration },
    /// The next hop replied to a command of a transaction, after this long (since the
    /// command went out, or the reply before it came).
    HopReply(Duration),
}

/// What failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A recipient refused, by policy or by the next hop.
    Recipient,
    /// Any other command answered 5xx.
    Command,
}

/// A finished transaction, for the mail log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub id: String,
    pub peer: PeerIp,
    /// The peer's HELO or EHLO name (empty if none).
    pub helo: String,
    pub from: String,
    pub accepted: u32,
    pub refused: u32,
    pub size: u64,
    /// With `[[relay.route]]`s: the route it took (`Route::name`), once a recipient
    /// fixed it.
    pub route: Option<String>,
    pub next_hop: Option<SocketAddr>,
    /// The accepted recipients, the first `LOGGED_RECIPIENTS` of them (`accepted` says how
    /// many in all).
    pub to: Vec<String>,
    /// The next hop's own id for the message, from its reply to the end of data.
    pub hop_id: Option<String>,
    /// From the end of its data sent on to the next hop's final reply (a message the
    /// next hop answered).
    pub relay: Option<Duration>,
    /// The TLS version the message came under, if it did.
    pub tls: Option<&'static str>,
    pub outcome: Outcome,
    pub duration: Duration,
}

impl Transaction {
    /// The accepted recipients as the mail log names them: the first
    /// `LOGGED_RECIPIENTS`, then `+N` for the rest; none without any.
    pub fn recipients(&self) -> Option<String> {
        if self.to.is_empty() {
            return None;
        }
        let more = (self.accepted as usize).saturating_sub(self.to.len());
        let mut to = self.to.join(",");
        if more > 0 {
            to.push_str(&format!(",+{more}"));
        }
        Some(to)
    }
}

/// Recipients a mail-log line names (the rest are counted).
pub const LOGGED_RECIPIENTS: usize = 10;

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "id={} peer={} helo={} from={} rcpt={}/{} size={} ",
            self.id,
            self.peer,
            crate::logfmt::value(&self.helo),
            crate::logfmt::value(&self.from),
            self.accepted,
            self.refused,
            self.size
        )?;
        if let Some(to) = self.recipients() {
            write!(f, "to={} ", crate::logfmt::value(&to))?;
        }
        if let Some(route) = &self.route {
            write!(f, "route={} ", crate::logfmt::value(route))?;
        }
        match self.next_hop {
            Some(h) => write!(f, "next_hop={h} ")?,
            None => write!(f, "next_hop=- ")?,
        }
        if let Some(id) = &self.hop_id {
            write!(f, "hop_id={} ", crate::logfmt::value(id))?;
        }
        if let Some(version) = self.tls {
            write!(f, "tls={version} ")?;
        }
        write!(f, "{} ms={}", self.outcome, self.duration.as_millis())
    }
}

/// The peer's greeting.
#[derive(Debug)]
pub(super) struct Helo {
    pub(super) name: String,
    pub(super) extended: bool,
    /// Its EHLO reply offered DSN: DSN parameters are taken.
    pub(super) dsn: bool,
}

/// A transaction from MAIL to the reply after its body (or its abandonment).
#[derive(Debug)]
pub(super) struct Txn {
    pub(super) id: String,
    pub(super) started: Instant,
    pub(super) from: Path,
    /// The size the peer declared with `SIZE=`.
    pub(super) size: Option<u64>,
    /// `BODY=8BITMIME`.
    pub(super) eight_bit: bool,
    /// `SMTPUTF8`: addresses and headers may be UTF-8.
    pub(super) smtputf8: bool,
    /// The next hop said 250 to MAIL.
    pub(super) open_upstream: bool,
    pub(super) first_rcpt: Option<Path>,
    pub(super) accepted: u32,
    pub(super) refused: u32,
    pub(super) body: Option<Body>,
    /// The body, when it comes in BDAT chunks.
    pub(super) chunks: Option<Chunks>,
    /// MAIL's DSN parameters as given (" RET=... ENVID=..."), for a next hop that takes
    /// DSN.
    pub(super) dsn: String,
    /// Accepted recipients, for the mail log (the first `LOGGED_RECIPIENTS`).
    pub(super) to: Vec<String>,
    /// The next hop's id for the message, from its reply to the end of data.
    pub(super) hop_id: Option<String>,
    /// The peer's identity was told to the next hop (XCLIENT, XFORWARD), or need not be.
    pub(super) introduced: bool,
    /// The next hop failed mid-transaction, how: the rest gets 451.
    pub(super) broken: Option<HopFault>,
    pub(super) hop: Option<usize>,
    /// Its route (its index in `relay.routes`): fixed at MAIL when no routes are
    /// configured, else by the first recipient sent on (see `Settings::routed`).
    pub(super) route: Option<usize>,
    /// Routed: the next hop refused the sender after our 250 to MAIL; every recipient
    /// gets this refusal.
    pub(super) sender_refused: Option<Box<[u8]>>,
    /// The next hop's replies to its commands, and the time waited for them (its
    /// `HopBook` adds them up at the end).
    pub(super) hop_replies: u32,
    pub(super) hop_wait: Duration,
    /// When the end of its data went to the next hop (the final dot, or the last chunk).
    pub(super) data_end: Option<Instant>,
    /// The next hop's final reply came this long after `data_end`.
    pub(super) relay: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct Body {
    pub(super) filter: BodyFilter,
    pub(super) started: Instant,
    pub(super) last_input: Instant,
}

/// The body of a transaction that comes in BDAT chunks (forward.rs): it goes to the
/// next hop as a DATA body.
#[derive(Debug)]
pub(super) struct Chunks {
    pub(super) filter: ChunkFilter,
    /// The next hop said 354 to our DATA: octets go out.
    pub(super) open: bool,
    pub(super) last_input: Instant,
}

/// A BDAT chunk being received: its octets are data, never commands.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) size: u64,
    pub(super) remaining: u64,
    pub(super) last: bool,
    /// Its octets are swallowed and this reply is given after them; `None`: they go to
    /// the message.
    pub(super) refused: Option<Box<[u8]>>,
}

/// A reply owed to the peer, in the order of its commands: a command forwarded to the
/// next hop waits for the next hop's reply; a reply of ours to a command pipelined
/// behind forwarded ones waits behind them.
#[derive(Debug)]
pub(super) enum Waiting {
    /// A connection for MAIL: to `next_hops[hop]`, from the pool when `pooled_ok`.
    Link {
        hop: usize,
        pooled_ok: bool,
    },
    Mail,
    /// Our XFORWARD before MAIL: its reply goes to no one.
    Xforward,
    /// A recipient and its DSN parameters as given (" NOTIFY=... ORCPT=...").
    Rcpt(Path, Box<str>),
    Data,
    /// Our DATA for a message that comes in BDAT chunks: its 354 opens the body; any
    /// other reply refuses the chunk being received.
    ChunkData,
    /// A BDAT chunk forwarded as one (the next hop takes BDAT): its reply is the peer's.
    Chunk,
    /// The last BDAT chunk forwarded: the next hop's reply to the whole message.
    ChunkLast,
    Dot,
    Rset,
    /// Our own RSET to the next hop after it refused the sender or the message, so that
    /// its connection is clean again: the reply goes to no one (250: clean; else the
    /// connection is dropped).
    Reset,
    /// Our own reply to a pipelined command; `rcpt`: to RCPT (a 5xx is a failed recipient);
    /// `counted`: a 5xx counts as a failure (not when it follows from one counted before).
    Local {
        reply: Box<[u8]>,
        rcpt: bool,
        counted: bool,
    },
}

impl Waiting {
    /// Awaits the next hop's reply (not one of ours).
    pub(super) fn forwarded(&self) -> bool {
        !matches!(self, Waiting::Local { .. })
    }
}

/// The peer's bytes on their way to commands.
#[derive(Debug, Default)]
pub(super) struct Reader {
    /// Received and not yet processed (while a command waits for the next hop), from
    /// `pos` on.
    pub(super) input: Vec<u8>,
    pub(super) pos: usize,
    /// The command line being received, CRLF not yet seen.
    pub(super) line: Vec<u8>,
    /// The current line passed `MAX_LINE_LEN`: skip to its end, then reply once.
    pub(super) overlong: bool,
    /// The octets of a BDAT chunk come next.
    pub(super) chunk: Option<Chunk>,
}

/// The session's side toward the next hop (forward.rs): what it owes the peer and by
/// when the next hop must answer; the connection itself is the [`Link`] the session is
/// lent for each call that may use it.
#[derive(Debug)]
pub(super) struct Forward {
    /// Replies owed, oldest first; the first is always a forwarded command's.
    pub(super) waiting: VecDeque<Waiting>,
    /// When the next hop must have answered (or taken more body) by.
    pub(super) deadline: Option<Instant>,
    /// Since when the oldest reply owed by the next hop is awaited: its command went out,
    /// or the reply before it came.
    pub(super) since: Option<Instant>,
}

/// Failures of one conversation, against `max_failed_commands` and
/// `max_failed_recipients`.
#[derive(Debug, Default)]
pub(super) struct Strikes {
    pub(super) commands: u32,
    pub(super) recipients: u32,
    /// A failure passed a limit: the 421 goes out once the current reply is queued.
    pub(super) dropping: bool,
}

/// One peer's SMTP conversation: its transactions, each relayed in-line over the
/// [`Link`] its connection lends it, and the replies it owes, in order.
#[derive(Debug)]
pub struct Session {
    /// The settings of the snapshot the connection was accepted under, kept for its
    /// whole life.
    pub(super) settings: Arc<Settings>,
    /// Where its transactions' ids come from (one per process).
    ids: Arc<TransactionIds>,
    pub(super) peer: PeerIp,
    /// The peer's source port, when known (for XCLIENT and XFORWARD).
    pub(super) port: Option<u16>,
    pub(super) phase: Phase,
    /// The peer's bytes: those not yet processed, the command line being received.
    pub(super) reader: Reader,
    pub(super) out: OutBuf,
    /// When waiting for the next command ends.
    pub(super) idle_deadline: Instant,
    /// The wall clock when it began: dates are derived from it, the session reads no
    /// clock.
    clock: WallClock,
    pub(super) helo: Option<Helo>,
    pub(super) txn: Option<Txn>,
    /// The side toward the next hop: replies owed, and by when.
    pub(super) fwd: Forward,
    pub(super) events: VecDeque<Event>,
    /// The reply being given is to RCPT: a 5xx is a failed recipient.
    pub(super) answering_rcpt: bool,
    /// Failures counted against this conversation's limits.
    pub(super) strikes: Strikes,
    /// The server is stopping: the transaction under way finishes, the next command
    /// after it gets 421.
    pub(super) draining: bool,
    /// STARTTLS was answered 220: the connection starts the handshake next, and no input
    /// is processed until it is done.
    pub(super) tls_pending: bool,
    /// The session runs over TLS (after STARTTLS and a completed handshake).
    pub(super) tls: Option<Negotiated>,
    /// When STARTTLS was answered 220 (the handshake's start, for its duration).
    pub(super) tls_begun: Option<Instant>,
    /// When the connection was accepted (for balancers': when its PROXY header began).
    opened: Instant,
}

impl Session {
    /// A session for a peer the gate has allowed; the banner is queued.
    pub fn new(settings: Arc<Settings>, ids: Arc<TransactionIds>, peer: PeerIp, now: Instant, unix: UnixTime) -> Self {
        let idle_deadline = now + settings.smtp.command_timeout;
        let out = OutBuf::from_vec(settings.replies.banner.to_vec());
        Session {
            settings,
            ids,
            peer,
            port: None,
            phase: Phase::Open,
            reader: Reader::default(),
            out,
            idle_deadline,
            clock: WallClock { at: now, unix },
            helo: None,
            txn: None,
            fwd: Forward { waiting: VecDeque::new(), deadline: None, since: None },
            events: VecDeque::new(),
            answering_rcpt: false,
            strikes: Strikes::default(),
            draining: false,
            tls_pending: false,
            tls: None,
            tls_begun: None,
            opened: now,
        }
    }

    /// When the connection was accepted.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// What the session is served by (its snapshot's part).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The peer's address.
    pub fn peer(&self) -> PeerIp {
        self.peer
    }

    /// The peer is another than the connection's own address: the client a trusted
    /// balancer's PROXY header named (before the banner goes out).
    pub fn set_peer(&mut self, peer: PeerIp) {
        self.peer = peer;
    }

    /// The peer's source port (told to a next hop that takes XCLIENT or XFORWARD).
    pub fn set_port(&mut self, port: u16) {
        self.port = Some(port);
    }

    /// The message size offered, and held to at MAIL: the smaller of `max_message_size`
    /// and what the next hops said they take.
    pub(super) fn size_limit(&self) -> u64 {
        self.settings.hop_book.size(self.settings.smtp.max_message_size)
    }

    /// Our name, for the next hop's EHLO.
    pub fn hostname(&self) -> &str {
        &self.settings.hostname
    }

    // ---- the peer's port ---------------------------------------------------------------

    /// Bytes from the peer. Each complete command line gets its reply, in order (those
    /// for the next hop forwarded on `link`).
    pub fn handle_input(&mut self, link: &mut Link, data: &[u8], now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        if let Some(t) = self.txn.as_mut() {
            if let Some(body) = t.body.as_mut() {
                body.last_input = now;
            }
            if let Some(chunks) = t.chunks.as_mut() {
                chunks.last_input = now;
            }
        }
        self.reader.input.extend_from_slice(data);
        self.process(link, now);
        self.drop_if_over(now);
    }

    // ---- STARTTLS (the connection's transport does the handshake) ------------------------

    /// STARTTLS was answered: true once, when the connection must start the handshake as
    /// soon as the 220 (still in `poll_transmit`) is out.
    pub fn take_starttls(&mut self) -> bool {
        std::mem::take(&mut self.tls_pending)
    }

    /// The handshake is done: the session starts again as after the banner (RFC 3207 §4.2:
    /// the peer greets again, nothing from before is kept).
    pub fn tls_started(&mut self, negotiated: Negotiated, now: Instant) {
        let took = self.tls_begun.take().map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.events.push_back(Event::Handshake { ok: true, took });
        self.tls = Some(negotiated);
        self.helo = None;
        self.discard_input();
        self.reader.overlong = false;
        self.idle_deadline = now + self.settings.smtp.command_timeout;
    }

    /// The handshake failed: one failed command of the address, and the connection is
    /// closed (nothing can be said to the peer in clear any more).
    pub fn tls_failed(&mut self, now: Instant) {
        let took = self.tls_begun.take().map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.events.push_back(Event::Handshake { ok: false, took });
        self.answering_rcpt = false;
        self.failed();
        self.abandon_transaction("TLS handshake failed", now);
        self.discard_input();
        self.phase = Phase::Closed;
    }

    /// Processes buffered input until it is used up or a command waits for the next hop.
    pub(super) fn process(&mut self, link: &mut Link, now: Instant) {
        while self.phase == Phase::Open
            && !self.strikes.dropping
            && !self.tls_pending
            && (self.reader.pos < self.reader.input.len()
                || self.reader.chunk.as_ref().is_some_and(|c| c.remaining == 0))
        {
            if self.reader.chunk.is_some() {
                if !self.chunk_input(link, now) {
                    break;
                }
                continue;
            }
            if !self.may_go_on(link) {
                break;
            }
            if self.in_body() {
                self.body_input(link, now);
                continue;
            }
            let rest = &self.reader.input[self.reader.pos..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                self.take_partial_line(self.reader.input.len());
                break;
            };
            self.take_partial_line(self.reader.pos + lf);
            self.reader.pos += 1; // the LF
            self.answering_rcpt = false;
            if std::mem::take(&mut self.reader.overlong) {
                self.reply(LINE_TOO_LONG);
            } else {
                let line = std::mem::take(&mut self.reader.line);
                self.command(link, &line, now);
                self.reader.line = line;
                self.reader.line.clear();
            }
            self.idle_deadline = now + self.settings.smtp.command_timeout;
        }
        if self.reader.pos >= self.reader.input.len() {
            self.reader.input.clear();
            self.reader.pos = 0;
        }
    }

    /// The next command may be processed: no reply is owed, or (RFC 2920) it is a RCPT,
    /// or a DATA that ends what was received, pipelined behind commands forwarded to a
    /// next hop that takes pipelined commands: it goes out behind them, in the same
    /// write, and its reply is given after theirs.
    fn may_go_on(&self, link: &Link) -> bool {
        let Some(first) = self.fwd.waiting.front() else { return true };
        if self.fwd.waiting.len() >= MAX_OWED {
            return false;
        }
        let pipelining = matches!(link, Link::Up(l) if l.up.is_ready() && l.up.extensions().pipelining);
        // behind MAIL or a RCPT of the same transaction only (not behind the final dot)
        let in_envelope = matches!(first, Waiting::Mail | Waiting::Rcpt(..));
        if !pipelining || !in_envelope || self.in_body() || !self.reader.line.is_empty() {
            return false;
        }
        let rest = self.unprocessed();
        let Some(lf) = memchr::memchr(b'\n', rest) else { return false };
        let Some(line) = rest[..lf].strip_suffix(b"\r") else { return false };
        match Verb::parse(command::split(line).0) {
            Verb::Rcpt => true,
            Verb::Data => lf + 1 == rest.len(),
            _ => false,
        }
    }

    /// Moves input up to `end` into the line being received, or drops it once the line
    /// is too long to be valid.
    fn take_partial_line(&mut self, end: usize) {
        let part = &self.reader.input[self.reader.pos..end];
        // MAX_LINE_LEN counts the CRLF; the LF is never stored
        if !self.reader.overlong && self.reader.line.len() + part.len() < MAX_LINE_LEN {
            self.reader.line.extend_from_slice(part);
        } else {
            self.reader.overlong = true;
            self.reader.line.clear();
        }
        self.reader.pos = end;
    }

    /// Input received and not processed yet.
    pub(super) fn unprocessed(&self) -> &[u8] {
        &self.reader.input[self.reader.pos..]
    }

    pub(super) fn discard_input(&mut self) {
        self.reader.input.clear();
        self.reader.pos = 0;
        self.reader.line.clear();
    }

    /// Our reply to the command being processed: given now, or, when replies to earlier
    /// commands are still owed (pipelined behind forwarded ones), after them.
    pub(super) fn reply(&mut self, bytes: &[u8]) {
        self.reply_counted(bytes, true);
    }

    /// [`Session::reply`], for a refusal that follows from a failure counted already.
    pub(super) fn reply_uncounted(&mut self, bytes: &[u8]) {
        self.reply_counted(bytes, false);
    }

    pub(super) fn reply_counted(&mut self, bytes: &[u8], counted: bool) {
        if self.fwd.waiting.is_empty() {
            self.give(bytes, self.answering_rcpt, counted);
        } else {
            let rcpt = self.answering_rcpt;
            self.fwd.waiting.push_back(Waiting::Local { reply: bytes.into(), rcpt, counted });
        }
    }

    /// Gives one of our replies now (`rcpt`: to RCPT), counted when `counted`.
    pub(super) fn give(&mut self, bytes: &[u8], rcpt: bool, counted: bool) {
        self.answering_rcpt = rcpt;
        if counted {
            self.emit(bytes);
        } else {
            self.out.push(bytes);
        }
    }

    /// Gives a reply now: into the output, a refusal the peer earned counted as a failure.
    pub(super) fn emit(&mut self, bytes: &[u8]) {
        self.out.push(bytes);
        if counts_as_failure(bytes) {
            self.failed();
        }
    }

    /// Recipients forwarded to the next hop and not answered yet (at most [`MAX_OWED`]
    /// to look at).
    pub(super) fn recipients_pending(&self) -> u32 {
        self.fwd.waiting.iter().filter(|w| matches!(w, Waiting::Rcpt(..))).count() as u32
    }

    /// Gives our own replies that waited for the ones now given (none after a reply
    /// that passed a failure limit: the 421 comes next).
    pub(super) fn flush_local(&mut self) {
        while !self.strikes.dropping
            && let Some(Waiting::Local { .. }) = self.fwd.waiting.front()
        {
            if let Some(Waiting::Local { reply, rcpt, counted }) = self.fwd.waiting.pop_front() {
                self.give(&reply, rcpt, counted);
            }
        }
    }

    /// Counts a 5xx reply against the conversation's limits and the address.
    pub(super) fn failed(&mut self) {
        let limits = &self.settings;
        let (failure, over) = if self.answering_rcpt {
            self.strikes.recipients += 1;
            (Failure::Recipient, self.strikes.recipients > limits.max_failed_recipients)
        } else {
            self.strikes.commands += 1;
            (Failure::Command, self.strikes.commands > limits.max_failed_commands)
        };
        self.events.push_back(Event::Failed(failure));
        if over && self.phase == Phase::Open && !self.strikes.dropping {
            self.strikes.dropping = true;
            self.events.push_back(Event::Dropped);
        }
    }

    /// Too many failures: `421 4.7.0` after the reply that passed the limit, and close.
    pub(super) fn drop_if_over(&mut self, now: Instant) {
        if self.strikes.dropping && self.phase == Phase::Open {
            let settings = Arc::clone(&self.settings);
            self.out.push(&settings.replies.too_many_errors);
            self.begin_close(now);
        }
    }

    /// Queues the last reply and closes once it is out.
    pub(super) fn close_with(&mut self, reply: &[u8], now: Instant) {
        self.emit(reply);
        self.begin_close(now);
    }

    pub(super) fn begin_close(&mut self, now: Instant) {
        if self.phase == Phase::Open {
            self.phase = Phase::Closing { until: now + CLOSE_GRACE };
            self.discard_input();
            self.abandon_transaction("connection closed", now);
            // replies still owed to pipelined commands are never given
            self.fwd.waiting.clear();
        }
    }

    /// The peer closed its side or its connection broke: nothing more can be said.
    pub fn handle_eof(&mut self, now: Instant) {
        self.abandon_transaction("peer disconnected", now);
        self.phase = Phase::Closed;
    }

    /// The server is stopping (a graceful drain): a transaction under way (from MAIL to
    /// the reply after its body, or its RSET) finishes; a session outside one gets
    /// `421 4.3.2` at once, or in answer to its next command once its transaction ended.
    pub fn shutdown(&mut self, now: Instant) {
        if self.phase != Phase::Open || self.draining {
            return;
        }
        self.draining = true;
        if self.txn.is_none() && self.fwd.waiting.is_empty() {
            self.say_shutdown(now);
        }
    }

    /// The drain ran out of time: `421 4.3.2` and close, whatever is under way (a
    /// transaction is abandoned, never answered 250); the line gets `ABORT_GRACE` to go out.
    pub fn abort(&mut self, now: Instant) {
        if self.phase == Phase::Open {
            self.say_shutdown(now);
        }
        if let Phase::Closing { until } = self.phase {
            self.phase = Phase::Closing { until: until.min(now + ABORT_GRACE) };
        }
    }

    pub(super) fn say_shutdown(&mut self, now: Instant) {
        let settings = Arc::clone(&self.settings);
        self.out.push(&settings.replies.shutdown);
        self.begin_close(now);
    }

    /// What the driver does next on the peer's socket (`link`: the next hop's, whose
    /// backlog of body bytes holds back reading).
    pub fn poll_transmit(&self, link: &Link) -> Transmit<'_> {
        match self.phase {
            Phase::Closed => Transmit::Close,
            _ if !self.out.pending().is_empty() => Transmit::Send(self.out.pending()),
            Phase::Closing { .. } => Transmit::Close,
            // Input is read even while a command waits for the next hop (one read's
            // worth at most): pipelined commands wait their turn in the buffer, and a
            // body sent before our 354 is there to be seen as improper pipelining.
            Phase::Open if self.reader.pos < self.reader.input.len() || self.backpressured(link) => Transmit::Wait,
            Phase::Open => Transmit::Receive,
        }
    }

    /// Body bytes for the next hop are piling up: read no more from the peer.
    fn backpressured(&self, link: &Link) -> bool {
        (self.in_body() || self.reader.chunk.is_some())
            && matches!(link, Link::Up(l) if l.up.output().len() >= RELAY_HIGH_WATER)
    }

    /// `n` bytes of the last `Send` went out.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
    }

    /// A finished transaction or other news for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- time ---------------------------------------------------------------------------

    /// When [`Session::handle_timeout`] is due; `None` once closed.
    pub fn poll_timeout(&self, link: &Link) -> Option<Instant> {
        let txn_deadline = self.txn.as_ref().map(|t| t.started + self.settings.smtp.transaction_timeout);
        match self.phase {
            Phase::Closed => None,
            Phase::Closing { until } => Some(until),
            Phase::Open if !self.fwd.waiting.is_empty() => self.fwd.deadline.into_iter().chain(txn_deadline).min(),
            Phase::Open => match self.txn.as_ref().and_then(|t| t.body.as_ref()) {
                Some(body) => {
                    let smtp = &self.settings.smtp;
                    let block = body.last_input + smtp.data_timeout;
                    let relay = self.fwd.deadline.filter(|_| self.backpressured(link));
                    [Some(block), self.rate_deadline(body), relay, txn_deadline].into_iter().flatten().min()
                }
                // a chunk's octets are awaited as a body's are
                None => match (self.reader.chunk.as_ref(), self.txn.as_ref().and_then(|t| t.chunks.as_ref())) {
                    (Some(_), Some(chunks)) => {
                        let block = chunks.last_input + self.settings.smtp.data_timeout;
                        let relay = self.fwd.deadline.filter(|_| self.backpressured(link));
                        [Some(block), relay, txn_deadline].into_iter().flatten().min()
                    }
                    _ => Some(self.idle_deadline),
                },
            },
        }
    }

    /// When a body that has come this slowly is cut off: the time by which the minimum
    /// rate would have brought more than was received, and not before the grace period.
    fn rate_deadline(&self, body: &Body) -> Option<Instant> {
        let rate = self.settings.smtp.min_data_rate;
        if rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(body.filter.size() as f64 / rate as f64);
        Some(body.started + earned.max(DATA_RATE_GRACE))
    }

    /// The time reached [`Session::poll_timeout`] (or passed it).
    pub fn handle_timeout(&mut self, link: &mut Link, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::Closing { until } => {
                if now >= until {
                    self.phase = Phase::Closed;
                }
            }
            Phase::Open => {
                if self.poll_timeout(link).is_some_and(|t| t <= now) {
                    self.timed_out(link, now);
                }
            }
        }
    }

    fn timed_out(&mut self, link: &mut Link, now: Instant) {
        let relay_late = self.fwd.deadline.is_some_and(|d| d <= now);
        if relay_late && (!self.fwd.waiting.is_empty() || self.backpressured(link)) {
            tracing::debug!(peer = %self.peer, "next hop timed out");
            return self.relay_failed(link, HopFault::TimedOut, now);
        }
        if self.txn.is_some() {
            self.abandon_transaction("timeout", now);
        }
        self.out.push(&self.settings.replies.idle_timeout);
        self.begin_close(now);
    }

    /// Now on the wall clock.
    pub(super) fn unix_time(&self, now: Instant) -> UnixTime {
        self.clock.at(now)
    }

    // ---- transactions ------------------------------------------------------------------

    pub(super) fn in_body(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.body.is_some())
    }

    /// Ends the current transaction with a mail-log event.
    pub(super) fn end_transaction(&mut self, outcome: Outcome, now: Instant) {
        let Some(t) = self.txn.take() else { return };
        if let Some(hop) = t.hop {
            self.settings.hop_book.waited(hop, t.hop_replies, t.hop_wait);
        }
        let next_hop = t.hop.and_then(|h| self.settings.relay.next_hops.get(h).copied());
        let route = match (self.settings.routed(), t.route) {
            (true, Some(r)) => self.settings.relay.routes.get(r).map(|r| r.name().to_owned()),
            _ => None,
        };
        self.events.push_back(Event::Transaction(Box::new(Transaction {
            id: t.id,
            peer: self.peer,
            helo: self.helo.as_ref().map(|h| h.name.clone()).unwrap_or_default(),
            from: t.from.to_string(),
            accepted: t.accepted,
            refused: t.refused,
            size: t.body.map_or(0, |b| b.filter.size()) + t.chunks.map_or(0, |c| c.filter.size()),
            route,
            next_hop,
            to: t.to,
            hop_id: t.hop_id,
            relay: t.relay,
            tls: self.tls.map(|t| t.version),
            outcome,
            duration: now.saturating_duration_since(t.started),
        })));
    }

    /// The next transaction's id.
    pub(super) fn transaction_id(&self) -> String {
        self.ids.next()
    }

    pub(super) fn abandon_transaction(&mut self, why: &'static str, now: Instant) {
        if self.txn.is_some() {
            self.fwd.waiting.clear();
            self.end_transaction(Outcome::Abandoned(why), now);
        }
    }
}

/// Transaction ids unique to a process: its start second and a counter, in hex. The
/// process makes one and hands it to every session (the core keeps no global state).
#[derive(Debug)]
pub struct TransactionIds {
    start: u32,
    next: AtomicU64,
}

impl TransactionIds {
    /// Ids for a process started at `start`.
    pub fn new(start: UnixTime) -> Self {
        TransactionIds { start: start.0 as u32, next: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next(&self) -> String {
        format!("{:08X}{:06X}", self.start, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_the_start_and_a_count_shared_by_the_sessions() {
        let ids = Arc::new(TransactionIds::new(UnixTime(0x6935_1A28)));
        let (a, b) = (Arc::clone(&ids), Arc::clone(&ids));
        assert_eq!([a.next(), b.next(), a.next()], ["69351A28000000", "69351A28000001", "69351A28000002"]);
        let other = TransactionIds::new(UnixTime(0x6935_1A29));
        assert_eq!(other.next(), "69351A29000000", "another process, another start");
    }
}
