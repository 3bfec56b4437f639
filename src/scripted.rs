//! A next hop that answers like an SMTP server, sans-IO, its behaviour set by the caller:
//! the one scripted next hop of the in-crate tests (`smtp` and `conn`), of the `session`
//! fuzz target, and (on a socket, with rustls after STARTTLS) of the end-to-end tests
//! (`tests/common/nexthop.rs`). It records what it received (command lines, messages
//! with their envelopes, each write) and counts the messages it accepted.
//!
//! ```text
//!   bytes ─► receive ─► command lines ─► replies (EHLO: `ehlo`'s keywords; MAIL, RCPT,
//!                    │                    DATA, RSET as set; anything else 250)
//!                    ├─ after 354: the body up to CRLF.CRLF ─► `messages`, `dot_reply`
//!                    └─ BDAT n [LAST] (offered when `ehlo` has CHUNKING): n octets; the
//!                       last chunk's ─► `messages` (the chunks joined), `dot_reply`
//! ```

/// What it does; everything else answers as a well-behaved server.
#[derive(Debug, Default)]
pub struct ScriptedHop {
    /// EHLO keywords offered (after the greeting line).
    pub ehlo: Vec<&'static str>,
    /// The reply to MAIL instead of 250.
    pub refuse_mail: Option<&'static str>,
    /// The reply to RCPT for recipients whose line holds the first text.
    pub refuse_rcpt: Option<(&'static str, &'static str)>,
    /// The reply to DATA instead of 354.
    pub refuse_data: Option<&'static str>,
    /// The reply to the final dot instead of 250.
    pub dot_reply: Option<&'static str>,
    /// The reply to RSET instead of 250 (the transaction is not reset then).
    pub rset_reply: Option<&'static str>,
    /// Stops answering (a silent next hop).
    pub silent: bool,
    /// Never answers MAIL, nor anything after it (a hop checking senders, slowly).
    pub stall_mail: bool,
    /// Holds back the reply to DATA (in `held`) until the test releases it.
    pub hold_data_reply: bool,
    pub held: Vec<u8>,
    /// Answers RCPT without MAIL and DATA without a recipient positively, as no sane
    /// server does (for the fuzz target).
    pub lax: bool,
    /// Offers STARTTLS (until it is done); after its 220 the caller takes `tls_now` and
    /// starts the handshake.
    pub starttls: bool,
    pub tls_now: bool,
    /// Bytes came after the STARTTLS line, before the handshake (RFC 3207 §4 forbids it):
    /// nothing after them was read.
    pub injected: bool,
    /// At the final dot: no answer, and the connection is to be closed (`closing`).
    pub close_at_dot: bool,
    /// At the final dot: no answer, ever again.
    pub silent_at_dot: bool,
    /// QUIT was answered, or the dot closes: the caller closes the connection.
    pub closing: bool,
    /// Each message's MAIL line and RCPT lines, as `messages`.
    pub envelopes: Vec<(String, Vec<String>)>,
    /// Each write received, as it came (for pipelining).
    pub writes: Vec<Vec<u8>>,
    /// All command lines received, over all connections.
    pub commands: Vec<String>,
    /// Complete messages (the body up to, not including, the final dot).
    pub messages: Vec<Vec<u8>>,
    /// For each of `messages`: it came in BDAT chunks (as sent), not as a DATA body.
    pub chunked: Vec<bool>,
    /// Final dots answered with a 2xx.
    pub accepted: usize,
    unread: Vec<u8>,
    in_body: bool,
    /// A BDAT chunk's octets still to come, and whether it is the last.
    chunk: Option<(usize, bool)>,
    /// The message so far, from BDAT chunks.
    chunk_bytes: Vec<u8>,
    /// Where the search for the end of the body resumes.
    scan: usize,
    /// MAIL was accepted, and how many recipients since.
    mail_open: bool,
    rcpts_ok: u32,
    /// The transaction's MAIL and RCPT lines.
    envelope: (String, Vec<String>),
    /// STARTTLS was done on this connection.
    secured: bool,
}

impl ScriptedHop {
    /// A hop offering `ehlo`.
    pub fn offering(ehlo: &[&'static str]) -> Self {
        ScriptedHop { ehlo: ehlo.to_vec(), ..ScriptedHop::default() }
    }

    /// Bytes from the client (one write); the replies they earn (none while silent).
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.writes.push(bytes.to_vec());
        self.unread.extend_from_slice(bytes);
        self.answers()
    }

    /// The connection closed: whatever was half-received is gone.
    pub fn disconnect(&mut self) {
        self.secured = false;
        self.unread.clear();
        self.mail_open = false;
        self.rcpts_ok = 0;
        self.in_body = false;
        self.scan = 0;
        self.chunk = None;
        self.chunk_bytes.clear();
    }

    fn answers(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            if let Some((remaining, last)) = self.chunk {
                let take = remaining.min(self.unread.len());
                self.chunk_bytes.extend(self.unread.drain(..take));
                if take < remaining {
                    self.chunk = Some((remaining - take, last));
                    break;
                }
                self.chunk = None;
                if !last {
                    out.extend_from_slice(b"250 2.0.0 chunk taken\r\n");
                    continue;
                }
                let message = std::mem::take(&mut self.chunk_bytes);
                self.messages.push(message);
                self.chunked.push(true);
                self.envelopes.push(std::mem::take(&mut self.envelope));
                self.mail_open = false;
                self.rcpts_ok = 0;
                let reply = self.dot_reply.unwrap_or("250 2.0.0 queued");
                self.accepted += usize::from(reply.starts_with('2'));
                out.extend_from_slice(reply.as_bytes());
                out.extend_from_slice(b"\r\n");
                continue;
            }
            if self.in_body {
                let from = self.scan.saturating_sub(4);
                let Some(end) = find(&self.unread[from..], b"\r\n.\r\n").map(|e| e + from) else {
                    self.scan = self.unread.len();
                    break;
                };
                self.messages.push(self.unread[..end + 2].to_vec());
                self.chunked.push(false);
                self.envelopes.push(std::mem::take(&mut self.envelope));
                self.unread.drain(..end + 5);
                self.in_body = false;
                self.scan = 0;
                self.mail_open = false;
                self.rcpts_ok = 0;
                if self.close_at_dot || self.silent_at_dot {
                    self.closing |= self.close_at_dot;
                    self.silent = true;
                    self.unread.clear();
                    break;
                }
                let reply = self.dot_reply.unwrap_or("250 2.0.0 queued");
                self.accepted += usize::from(reply.starts_with('2'));
                out.extend_from_slice(reply.as_bytes());
                out.extend_from_slice(b"\r\n");
                continue;
            }
            let Some(lf) = find(&self.unread, b"\r\n") else { break };
            let line = String::from_utf8_lossy(&self.unread[..lf]).into_owned();
            self.unread.drain(..lf + 2);
            self.commands.push(line.clone());
            let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => {
                    let mut r = String::from("250-hop.test");
                    if self.starttls && !self.secured {
                        r += "\r\n250-STARTTLS";
                    }
                    for k in &self.ehlo {
                        r += &format!("\r\n250-{k}");
                    }
                    r + "\r\n250 ENHANCEDSTATUSCODES"
                }
                "MAIL" if self.stall_mail => {
                    self.silent = true;
                    continue;
                }
                "STARTTLS" if !self.starttls || self.secured => "503 5.5.1 not now".into(),
                "STARTTLS" => {
                    if !self.unread.is_empty() {
                        self.injected = true;
                        self.unread.clear();
                        break;
                    }
                    self.secured = true;
                    self.tls_now = true;
                    "220 2.0.0 go ahead".into()
                }
                "MAIL" => match self.refuse_mail {
                    Some(reply) => reply.into(),
                    None => {
                        self.mail_open = true;
                        self.envelope = (line.clone(), Vec::new());
                        "250 2.1.0 ok".into()
                    }
                },
                "RCPT" if !self.mail_open && !self.lax => "503 5.5.1 need MAIL first".into(),
                "RCPT" => match self.refuse_rcpt {
                    Some((needle, reply)) if line.contains(needle) => reply.into(),
                    _ => {
                        self.rcpts_ok += 1;
                        self.envelope.1.push(line.clone());
                        "250 2.1.5 ok".into()
                    }
                },
                "DATA" if !self.mail_open && !self.lax => "503 5.5.1 need MAIL first".into(),
                "DATA" if self.rcpts_ok == 0 && !self.lax => "554 5.5.1 no valid recipients".into(),
                "RSET" if self.rset_reply.is_some() => self.rset_reply.unwrap_or_default().into(),
                "RSET" => {
                    self.mail_open = false;
                    self.rcpts_ok = 0;
                    "250 2.0.0 ok".into()
                }
                "BDAT" => {
                    let mut words = line.split(' ').skip(1);
                    let size = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                    self.chunk = Some((size, last));
                    continue;
                }
                "XCLIENT" => {
                    // a new session for the client named: greeted again (EHLO may follow)
                    self.mail_open = false;
                    self.rcpts_ok = 0;
                    "220 hop.test ESMTP".into()
                }
                "DATA" if self.refuse_data.is_some() => self.refuse_data.unwrap_or_default().into(),
                "DATA" if self.hold_data_reply => {
                    self.in_body = true;
                    self.held.extend_from_slice(b"354 go ahead\r\n");
                    continue;
                }
                "DATA" => {
                    self.in_body = true;
                    "354 go ahead".into()
                }
                "QUIT" => {
                    self.closing = true;
                    "221 bye".into()
                }
                _ => "250 2.0.0 ok".into(),
            };
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.silent { Vec::new() } else { out }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_a_transaction_and_records_it() {
        let mut hop = ScriptedHop::offering(&["PIPELINING"]);
        let got = hop.receive(b"EHLO mx.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
        assert_eq!(
            String::from_utf8_lossy(&got),
            "250-hop.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
        );
        assert_eq!(hop.receive(b"hi\r\n.."), b"");
        assert_eq!(hop.receive(b"\r\n.\r\n"), b"250 2.0.0 queued\r\n");
        assert_eq!((hop.messages.len(), &hop.messages[0][..], hop.accepted), (1, &b"hi\r\n..\r\n"[..], 1));
        assert_eq!(hop.receive(b"RCPT TO:<u@example.com>\r\n"), b"503 5.5.1 need MAIL first\r\n");
        hop.silent = true;
        assert_eq!(hop.receive(b"NOOP\r\n"), b"");
        assert_eq!(hop.commands.len(), 6);
    }
}
