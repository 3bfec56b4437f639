//! One method per command verb. Each answers the peer, or forwards the command to the
//! next hop and sets `waiting` (the answer comes from `forward.rs`).

use std::time::Instant;

use super::address::{AddressError, Path, parse_path};
use super::command::{self, Verb};
use super::data::{BodyFault, ChunkFilter};
use super::link::Link;
use super::outcome::{Outcome, Undelivered};
use super::replies::*;
use super::session::{Chunk, Chunks, Helo, Session, Txn};

impl Session {
    /// One command line, LF removed.
    pub(super) fn command(&mut self, link: &mut Link, line: &[u8], now: Instant) {
        let Some(line) = line.strip_suffix(b"\r") else {
            return self.reply(BARE_LF);
        };
        if line.iter().any(|&b| b == b'\r' || b == 0) {
            return self.reply(BAD_CHARACTER);
        }
        let (verb, args) = command::split(line);
        let verb = Verb::parse(verb);
        if self.draining && self.txn.is_none() && verb != Verb::Quit {
            // the server is stopping and no transaction is left to finish
            return self.say_shutdown(now);
        }
        self.answering_rcpt = verb == Verb::Rcpt;
        match verb {
            Verb::Ehlo => self.hello(link, args, true, now),
            Verb::Helo => self.hello(link, args, false, now),
            Verb::Mail => self.mail(link, args, now),
            Verb::Rcpt => self.rcpt(link, args, now),
            Verb::Data => self.data(link, args, now),
            Verb::Bdat => self.bdat(link, args, now),
            Verb::Rset => self.rset(link, args, now),
            Verb::Noop => self.reply(OK),
            Verb::Vrfy => self.reply(CANNOT_VERIFY),
            Verb::Help => self.reply(HELP),
            Verb::Quit => self.quit(args, now),
            Verb::StartTls => self.starttls(args, now),
            Verb::NotImplemented => self.reply(NOT_IMPLEMENTED),
            Verb::Unknown => self.reply(UNRECOGNIZED),
        }
    }

    fn hello(&mut self, link: &mut Link, args: &[u8], extended: bool, now: Instant) {
        // One word of printable ASCII: a domain or an address literal. It is not
        // checked further; it only ever goes into our own trace headers.
        if args.is_empty() || !args.iter().all(u8::is_ascii_graphic) {
            return self.reply(if extended { EHLO_SYNTAX } else { HELO_SYNTAX });
        }
        // a new greeting resets any transaction (RFC 5321 §4.1.4); one open at the next
        // hop leaves that connection unusable, so it goes
        self.abandon_transaction("new EHLO/HELO", now);
        if matches!(link, Link::Up(l) if !l.clean) {
            link.drop();
        }
        let name = String::from_utf8_lossy(args).into_owned();
        // DSN is offered (and its parameters taken) when the next hops take it
        let dsn = extended && self.settings.hop_book.dsn();
        self.helo = Some(Helo { name, extended, dsn });
        let replies = &self.settings.replies;
        if !extended {
            return self.out.push(&replies.helo);
        }
        let size = self.size_limit().to_string();
        let end = if self.tls.is_some() { &replies.ehlo_end_tls } else { &replies.ehlo_end };
        for part in [&replies.ehlo_head[..], size.as_bytes(), &replies.ehlo_mid] {
            self.out.push(part);
        }
        if dsn {
            self.out.push(DSN_OFFER);
        }
        self.out.push(end);
    }

    /// RFC 3207. After the 220 the connection starts the handshake (`take_starttls`);
    /// whatever the peer sent after this line is dropped unread: it was sent in clear,
    /// before the handshake, and would otherwise run as if it came under TLS.
    fn starttls(&mut self, args: &[u8], now: Instant) {
        if !self.settings.starttls {
            return self.reply(NOT_IMPLEMENTED);
        }
        if !args.is_empty() {
            return self.reply(NO_PARAMETERS);
        }
        if self.tls.is_some() || self.txn.is_some() || !self.fwd.waiting.is_empty() {
            return self.reply(STARTTLS_NOT_NOW);
        }
        self.discard_input();
        self.emit(READY_FOR_TLS);
        self.tls_pending = true;
        self.tls_begun = Some(now);
    }

    fn mail(&mut self, link: &mut Link, args: &[u8], now: Instant) {
        let Some((extended, dsn)) = self.helo.as_ref().map(|h| (h.extended, h.dsn)) else {
            return self.reply(GREET_FIRST);
        };
        if self.settings.smtp.require_tls && self.tls.is_none() {
            // policy, not a peer's mistake: given without `emit`, which would count a 5xx
            // (MAIL is processed only when no reply is owed, so it is in order)
            return self.out.push(TLS_FIRST);
        }
        if self.txn.is_some() {
            return self.reply(NESTED_MAIL);
        }
        let Some(rest) = strip_keyword(args, b"FROM:") else {
            return self.reply(MAIL_SYNTAX);
        };
        // SMTPUTF8 is a parameter after the path, so look for it first
        let utf8 = extended && rest.split(|&b| b == b' ').any(|w| w.eq_ignore_ascii_case(b"SMTPUTF8"));
        let (from, params) = match parse_path(rest, utf8) {
            Ok(parsed) => parsed,
            Err(e) => return self.address_error(e, b"5.1.7"),
        };
        let has_utf8_param = params.split(|&b| b == b' ').any(|w| w.eq_ignore_ascii_case(b"SMTPUTF8"));
        if utf8 && !has_utf8_param && !from.to_string().is_ascii() {
            return self.address_error(AddressError::NeedsSmtpUtf8, b"5.6.7");
        }
        let mut txn = Txn {
            id: String::new(),
            started: now,
            from,
            size: None,
            eight_bit: false,
            smtputf8: has_utf8_param,
            open_upstream: false,
            first_rcpt: None,
            accepted: 0,
            refused: 0,
            body: None,
            chunks: None,
            dsn: String::new(),
            to: Vec::new(),
            hop_id: None,
            introduced: false,
            broken: None,
            hop: None,
            route: None,
            sender_refused: None,
            hop_replies: 0,
            hop_wait: std::time::Duration::ZERO,
            data_end: None,
            relay: None,
        };
        for param in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
            if dsn && let Some(valid) = dsn_parameter(param, &[b"RET", b"ENVID"], &mut txn.dsn) {
                if !valid {
                    return self.reply(DSN_SYNTAX);
                }
                continue;
            }
            if !extended || !mail_parameter(param, &mut txn) {
                return self.reply(BAD_PARAMETER);
            }
        }
        if txn.size.is_some_and(|s| s > self.size_limit()) {
            return self.reply(TOO_BIG);
        }
        txn.id = self.transaction_id();
        if self.settings.routed() {
            // the next hop follows the first recipient: MAIL goes on with it
            self.txn = Some(txn);
            return self.reply(MAIL_OK);
        }
        txn.route = Some(0);
        self.txn = Some(txn);
        self.send_sender(link, now);
    }

    fn rcpt(&mut self, link: &mut Link, args: &[u8], now: Instant) {
        let Some(txn) = &self.txn else {
            return self.reply(MAIL_FIRST);
        };
        let utf8 = txn.smtputf8;
        // recipients pipelined to the next hop count as accepted until it answers
        if txn.accepted + self.recipients_pending() >= self.settings.smtp.max_recipients {
            return self.refuse_recipient(TOO_MANY_RECIPIENTS);
        }
        let Some(rest) = strip_keyword(args, b"TO:") else {
            return self.refuse_recipient(RCPT_SYNTAX);
        };
        let (to, params) = match parse_path(rest, utf8) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.count_refused();
                return self.address_error(e, b"5.1.3");
            }
        };
        let dsn = self.helo.as_ref().is_some_and(|h| h.dsn);
        let mut dsn_params = String::new();
        for param in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
            match dsn.then(|| dsn_parameter(param, &[b"NOTIFY", b"ORCPT"], &mut dsn_params)).flatten() {
                Some(true) => {}
                Some(false) => return self.refuse_recipient(DSN_SYNTAX),
                None => return self.refuse_recipient(BAD_PARAMETER),
            }
        }
        if to == Path::Null {
            return self.refuse_recipient(NO_NULL_RECIPIENT);
        }
        let route = match self.settings.relay_domains.judge(&to) {
            Ok(route) => route,
            Err(why) => {
                tracing::debug!(peer = %self.peer, rcpt = %crate::logfmt::value(&to.to_string()), ?why, "relay denied");
                return self.refuse_recipient(RELAY_DENIED);
            }
        };
        let Some(txn) = &mut self.txn else { return self.reply(MAIL_FIRST) };
        if txn.broken.is_some() {
            return self.refuse_recipient(NEXT_HOP_FAILED);
        }
        if let Some(refusal) = txn.sender_refused.clone() {
            self.count_refused();
            return self.reply_uncounted(&refusal);
        }
        match txn.route {
            Some(r) if r == route => self.forward_rcpt(link, to, dsn_params.into(), now),
            Some(_) => {
                // one in-line transaction goes to one next hop: the peer sends these again
                self.count_refused();
                self.reply(OTHER_ROUTE);
            }
            None => {
                txn.route = Some(route);
                self.send_first_recipient(link, to, dsn_params.into(), now);
            }
        }
    }

    fn data(&mut self, link: &mut Link, args: &[u8], now: Instant) {
        // RFC 2920: DATA ends a pipelined group; anything already sent after it could
        // only be meant as a body, sent before a 354 allowed one. Whatever DATA's own
        // answer would have been, none of it may be read as commands or as a message.
        if !self.unprocessed().is_empty() {
            tracing::debug!(peer = %self.peer, "improper pipelining after DATA");
            self.end_transaction(Outcome::Undelivered(Undelivered::ImproperPipelining), now);
            link.drop();
            return self.close_with(IMPROPER_PIPELINING, now);
        }
        let Some(txn) = &self.txn else {
            return self.reply(MAIL_FIRST);
        };
        if !args.is_empty() {
            return self.reply(NO_PARAMETERS);
        }
        if txn.chunks.is_some() {
            return self.reply(DATA_AFTER_BDAT);
        }
        // with recipients still before the next hop, DATA goes behind them: its 354 comes
        // only if one of them was accepted
        if txn.accepted == 0 && self.recipients_pending() == 0 {
            return self.reply(RCPT_FIRST);
        }
        if txn.broken.is_some() {
            return self.reply(NEXT_HOP_FAILED);
        }
        self.forward_data(link, now);
    }

    /// RFC 3030: `BDAT size [LAST]`, then exactly `size` octets, taken as data whatever
    /// the state (a refused chunk's octets are swallowed before its reply). A size that is
    /// not a number leaves the octets' end unknown: 501 and close. The chunk's octets
    /// are taken by `chunk_input` (forward.rs).
    fn bdat(&mut self, link: &mut Link, args: &[u8], now: Instant) {
        let mut words = args.split(|&b| b == b' ');
        let size = words.next().filter(|w| !w.is_empty() && w.iter().all(u8::is_ascii_digit));
        let size = size.and_then(|w| std::str::from_utf8(w).ok()).and_then(|w| w.parse::<u64>().ok());
        let last = match (words.next(), words.next()) {
            (None, None) => Some(false),
            (Some(w), None) if w.eq_ignore_ascii_case(b"LAST") => Some(true),
            _ => None,
        };
        let (Some(size), Some(last)) = (size, last) else {
            self.end_transaction(Outcome::Abandoned("malformed BDAT"), now);
            link.drop();
            return self.close_with(BDAT_SYNTAX, now);
        };
        let refused: Option<&[u8]> = match &self.txn {
            None => Some(MAIL_FIRST),
            Some(t) if t.accepted == 0 => Some(BDAT_NO_RCPT),
            Some(t) if t.broken.is_some() => Some(NEXT_HOP_FAILED),
            Some(t) => {
                let so_far = t.chunks.as_ref().map_or(0, |c| c.filter.size());
                (so_far.saturating_add(size) > self.settings.smtp.max_message_size).then_some(TOO_BIG)
            }
        };
        if refused == Some(TOO_BIG) {
            // the transaction ends here; what the next hop has of it is abandoned
            self.end_transaction(Outcome::Undelivered(Undelivered::Body(BodyFault::TooBig)), now);
            link.drop();
        }
        self.reader.chunk = Some(Chunk { size, remaining: size, last, refused: refused.map(Into::into) });
        let Some(t) = self.txn.as_mut().filter(|_| refused.is_none()) else { return };
        let first = t.chunks.is_none();
        // a next hop that takes BDAT gets the chunks as chunks, one that does not a DATA body
        let verbatim = match (&t.chunks, &*link) {
            (Some(chunks), _) => chunks.filter.is_verbatim(),
            (None, Link::Up(l)) => l.up.extensions().chunking,
            (None, _) => false,
        };
        if first {
            let filter = if verbatim { ChunkFilter::verbatim() } else { ChunkFilter::default() };
            t.chunks = Some(Chunks { filter, open: verbatim, last_input: now });
        }
        match (verbatim, first) {
            (true, _) => self.forward_chunk(link, size, last, first, now),
            (false, true) => self.forward_chunk_data(link, now),
            (false, false) => {}
        }
    }

    fn rset(&mut self, link: &mut Link, args: &[u8], now: Instant) {
        if !args.is_empty() {
            return self.reply(NO_PARAMETERS);
        }
        let open_upstream = self.txn.as_ref().is_some_and(|t| t.open_upstream);
        if self.txn.as_ref().is_some_and(|t| t.chunks.is_some()) {
            // the next hop is inside our DATA: no RSET can reach it there
            link.drop();
        }
        self.abandon_transaction("RSET", now);
        match link {
            Link::Up(l) if open_upstream && !l.clean => self.forward_rset(link, now),
            _ => self.reply(OK),
        }
    }

    fn quit(&mut self, args: &[u8], now: Instant) {
        if !args.is_empty() {
            return self.reply(NO_PARAMETERS);
        }
        self.out.push(&self.settings.replies.quit);
        self.begin_close(now);
    }

    pub(super) fn refuse_recipient(&mut self, reply: &[u8]) {
        self.count_refused();
        self.reply(reply);
    }

    pub(super) fn count_refused(&mut self) {
        if let Some(t) = &mut self.txn {
            t.refused += 1;
        }
    }

    fn address_error(&mut self, e: AddressError, code: &[u8]) {
        let text = match e {
            AddressError::NeedsSmtpUtf8 => {
                return self.reply(NEEDS_SMTPUTF8);
            }
            AddressError::Syntax(_) | AddressError::TooLong(_) => e.to_string(),
        };
        let mut line = b"501 ".to_vec();
        line.extend_from_slice(code);
        line.push(b' ');
        line.extend_from_slice(text.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.reply(&line);
    }
}

/// `FROM:` / `TO:` (any case), then an optional space, then the path.
fn strip_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = &args[keyword.len()..];
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// One MAIL parameter: `SIZE=n`, `BODY=7BIT|8BITMIME`, `SMTPUTF8`. False: unsupported.
fn mail_parameter(param: &[u8], txn: &mut Txn) -> bool {
    let (key, value) = match param.iter().position(|&b| b == b'=') {
        Some(i) => (&param[..i], Some(&param[i + 1..])),
        None => (param, None),
    };
    let key = key.to_ascii_uppercase();
    match (key.as_slice(), value) {
        (b"SIZE", Some(v)) => match std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) {
            Some(n) => {
                txn.size = Some(n);
                true
            }
            None => false,
        },
        (b"BODY", Some(v)) if v.eq_ignore_ascii_case(b"7BIT") => true,
        (b"BODY", Some(v)) if v.eq_ignore_ascii_case(b"8BITMIME") => {
            txn.eight_bit = true;
            true
        }
        (b"SMTPUTF8", None) => true,
        _ => false,
    }
}

/// A DSN parameter (RFC 3461) among `keys`, checked and appended to `kept` as it came
/// (" KEY=value"): `None` when `param` is none of them, `Some(false)` when its value is
/// malformed or it was given already.
fn dsn_parameter(param: &[u8], keys: &[&[u8]], kept: &mut String) -> Option<bool> {
    let eq = param.iter().position(|&b| b == b'=')?;
    let (key, value) = (&param[..eq], &param[eq + 1..]);
    let key = keys.iter().find(|k| key.eq_ignore_ascii_case(k))?;
    let upper = value.to_ascii_uppercase();
    let valid = match *key {
        b"RET" => upper == b"FULL" || upper == b"HDRS",
        b"ENVID" => value.len() <= 100 && is_xtext(value),
        b"NOTIFY" => {
            upper == b"NEVER" || upper.split(|&b| b == b',').all(|w| matches!(w, b"SUCCESS" | b"FAILURE" | b"DELAY"))
        }
        // addr-type ";" xtext, as RFC 3461 §4.2 (rfc822, utf-8, ...)
        b"ORCPT" => match value.iter().position(|&b| b == b';') {
            Some(semi) => {
                let addr_type = &value[..semi];
                value.len() <= 500
                    && !addr_type.is_empty()
                    && addr_type.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                    && is_xtext(&value[semi + 1..])
            }
            None => false,
        },
        _ => false,
    };
    let name = std::str::from_utf8(key).unwrap_or_default();
    let again = kept.split(' ').any(|p| p.split('=').next().is_some_and(|k| k.eq_ignore_ascii_case(name)));
    if !valid || again {
        return Some(false);
    }
    // checked: printable ASCII only
    kept.push(' ');
    kept.push_str(&String::from_utf8_lossy(param));
    Some(true)
}

/// RFC 3461 xtext: printable ASCII but "+" and "=", and "+" two upper-case hex digits.
fn is_xtext(value: &[u8]) -> bool {
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'+' => {
                let hex = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b));
                if !(hex(value.get(i + 1)) && hex(value.get(i + 2))) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            b'!'..=b'~' => i += 1,
            _ => return false,
        }
    }
    !value.is_empty()
}
