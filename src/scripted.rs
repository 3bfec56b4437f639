//! A next hop that answers like an SMTP server, sans-IO, its behaviour set by the caller:
//! the one scripted next hop of the in-crate tests (`smtp` and `conn`) and of the
//! `session` fuzz target. It records what it received (command lines, messages, each
//! write) and counts the messages it accepted.
//!
//! ```text
//!   bytes ─► receive ─► command lines ─► replies (EHLO: `ehlo`'s keywords; MAIL, RCPT,
//!                    │                    DATA, RSET as set; anything else 250)
//!                    └─ after 354: the body up to CRLF.CRLF ─► `messages`, `dot_reply`
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
    /// Each write received, as it came (for pipelining).
    pub writes: Vec<Vec<u8>>,
    /// All command lines received, over all connections.
    pub commands: Vec<String>,
    /// Complete messages (the body up to, not including, the final dot).
    pub messages: Vec<Vec<u8>>,
    /// Final dots answered with a 2xx.
    pub accepted: usize,
    unread: Vec<u8>,
    in_body: bool,
    /// Where the search for the end of the body resumes.
    scan: usize,
    /// MAIL was accepted, and how many recipients since.
    mail_open: bool,
    rcpts_ok: u32,
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
        self.unread.clear();
        self.mail_open = false;
        self.rcpts_ok = 0;
        self.in_body = false;
        self.scan = 0;
    }

    fn answers(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            if self.in_body {
                let from = self.scan.saturating_sub(4);
                let Some(end) = find(&self.unread[from..], b"\r\n.\r\n").map(|e| e + from) else {
                    self.scan = self.unread.len();
                    break;
                };
                self.messages.push(self.unread[..end + 2].to_vec());
                self.unread.drain(..end + 5);
                self.in_body = false;
                self.scan = 0;
                self.mail_open = false;
                self.rcpts_ok = 0;
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
                    for k in &self.ehlo {
                        r += &format!("\r\n250-{k}");
                    }
                    r + "\r\n250 ENHANCEDSTATUSCODES"
                }
                "MAIL" if self.stall_mail => {
                    self.silent = true;
                    continue;
                }
                "MAIL" => match self.refuse_mail {
                    Some(reply) => reply.into(),
                    None => {
                        self.mail_open = true;
                        "250 2.1.0 ok".into()
                    }
                },
                "RCPT" if !self.mail_open && !self.lax => "503 5.5.1 need MAIL first".into(),
                "RCPT" => match self.refuse_rcpt {
                    Some((needle, reply)) if line.contains(needle) => reply.into(),
                    _ => {
                        self.rcpts_ok += 1;
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
                "DATA" if self.hold_data_reply => {
                    self.in_body = true;
                    self.held.extend_from_slice(b"354 go ahead\r\n");
                    continue;
                }
                "DATA" => {
                    self.in_body = true;
                    "354 go ahead".into()
                }
                "QUIT" => "221 bye".into(),
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
