//! Session transcripts: bytes in, replies out, with a clock the test moves.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;

struct Transcript {
    session: Session,
    now: Instant,
}

impl Transcript {
    fn new() -> Self {
        let text = "hostname = \"mx.test\"\n[smtp]\ncommand_timeout = \"60s\"\n";
        let config = Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap();
        let now = Instant::now();
        let mut t = Transcript { session: Session::new(Arc::new(Snapshot::without_lists(config)), now), now };
        assert_eq!(t.drain(), "220 mx.test ESMTP mxgate\r\n");
        t
    }

    /// Everything the session has to send, as the driver would send it.
    fn drain(&mut self) -> String {
        let mut got = Vec::new();
        while let Transmit::Send(bytes) = self.session.poll_transmit() {
            got.extend_from_slice(bytes);
            let n = bytes.len();
            self.session.consume_output(n);
        }
        String::from_utf8(got).unwrap()
    }

    fn send(&mut self, bytes: &[u8]) -> String {
        assert_eq!(self.session.poll_transmit(), Transmit::Receive, "the driver only reads when asked to");
        self.session.handle_input(bytes, self.now);
        self.drain()
    }

    /// Moves the clock; fires the timer when it is due, as a driver would.
    fn wait(&mut self, d: Duration) -> String {
        self.now += d;
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(self.now);
        }
        self.drain()
    }

    fn closed(&self) -> bool {
        self.session.poll_transmit() == Transmit::Close
    }
}

#[test]
fn greeting_commands_and_quit() {
    let mut t = Transcript::new();
    assert_eq!(t.send(b"EHLO client.example\r\n"), "250-mx.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n");
    assert_eq!(t.send(b"HELO client.example\r\n"), "250 mx.test\r\n");
    assert_eq!(t.send(b"noop\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(t.send(b"NOOP anything at all\r\n"), "250 2.0.0 OK\r\n");
    assert_eq!(t.send(b"RSET\r\n"), "250 2.0.0 OK\r\n");
    assert!(t.send(b"HELP\r\n").starts_with("214 2.0.0 "));
    assert!(!t.closed());
    assert_eq!(t.send(b"QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
    assert!(t.closed());
}

#[test]
fn errors_keep_the_session_in_sync() {
    let mut t = Transcript::new();
    assert_eq!(t.send(b"EHLO\r\n"), "501 5.5.4 syntax: EHLO domain\r\n");
    assert_eq!(t.send(b"HELO a b\r\n"), "501 5.5.4 syntax: HELO domain\r\n");
    assert_eq!(t.send(b"RSET now\r\n"), "501 5.5.4 this command takes no parameters\r\n");
    assert_eq!(t.send(b"QUIT later\r\n"), "501 5.5.4 this command takes no parameters\r\n");
    assert_eq!(t.send(b"MAIL FROM:<a@b.example>\r\n"), "502 5.5.1 command not implemented\r\n");
    assert_eq!(t.send(b"DATA\r\n"), "502 5.5.1 command not implemented\r\n");
    assert_eq!(t.send(b"XYZZY\r\n"), "500 5.5.2 command unrecognized\r\n");
    assert_eq!(t.send(b"\r\n"), "500 5.5.2 command unrecognized\r\n");
    assert_eq!(t.send(b"NOOP\n"), "500 5.5.2 line must end with CRLF\r\n");
    assert_eq!(t.send(b"NOOP\rQUIT\r\n"), "500 5.5.2 CR or NUL inside a command line\r\n");
    assert_eq!(t.send(b"NO\0OP\r\n"), "500 5.5.2 CR or NUL inside a command line\r\n");
    assert!(!t.closed());
    assert_eq!(t.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n");
}

#[test]
fn pipelined_commands_each_get_their_reply_in_order() {
    let mut t = Transcript::new();
    let got = t.send(b"EHLO a.example\r\nNOOP\r\nXYZ\r\nRSET\r\nMAIL FROM:<>\r\nNOOP\r\n");
    assert_eq!(
        got,
        "250-mx.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n250 2.0.0 OK\r\n500 5.5.2 command unrecognized\r\n\
         250 2.0.0 OK\r\n502 5.5.1 command not implemented\r\n250 2.0.0 OK\r\n"
    );
    // after QUIT nothing more is read or answered
    assert_eq!(t.send(b"NOOP\r\nQUIT\r\nNOOP\r\nNOOP\r\n"), "250 2.0.0 OK\r\n221 2.0.0 mx.test closing connection\r\n");
    assert!(t.closed());
}

#[test]
fn lines_split_across_reads_and_byte_by_byte() {
    let mut t = Transcript::new();
    assert_eq!(t.send(b"NO"), "");
    assert_eq!(t.send(b"OP\r"), "");
    assert_eq!(t.send(b"\nRS"), "250 2.0.0 OK\r\n");
    assert_eq!(t.send(b"ET\r\n"), "250 2.0.0 OK\r\n");
    let mut all = String::new();
    for b in b"HELO x\r\nQUIT\r\n" {
        all += &t.send(&[*b]);
    }
    assert_eq!(all, "250 mx.test\r\n221 2.0.0 mx.test closing connection\r\n");
}

#[test]
fn line_too_long_gets_one_reply_and_stays_in_sync() {
    let mut t = Transcript::new();
    // 510 octets and CRLF: exactly the limit, fine
    let longest = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(longest.len(), MAX_LINE_LEN);
    assert_eq!(t.send(longest.as_bytes()), "250 2.0.0 OK\r\n");
    // one more octet: too long, in one read or in many
    let too_long = format!("NOOP {}\r\n", "x".repeat(506));
    assert_eq!(t.send(too_long.as_bytes()), "500 5.5.2 line too long\r\n");
    let huge = format!("NOOP {}\r\nNOOP\r\n", "y".repeat(100_000));
    let mut got = String::new();
    for chunk in huge.as_bytes().chunks(4096) {
        got += &t.send(chunk);
    }
    assert_eq!(got, "500 5.5.2 line too long\r\n250 2.0.0 OK\r\n");
    assert!(t.session.line.capacity() <= 2 * MAX_LINE_LEN, "memory stays bounded");
}

#[test]
fn non_utf8_bytes_are_just_bad_commands() {
    let mut t = Transcript::new();
    assert_eq!(t.send(b"\xff\xfe\xfd\r\n"), "500 5.5.2 command unrecognized\r\n");
    assert_eq!(t.send(b"EHLO \xc3\x28\r\n"), "501 5.5.4 syntax: EHLO domain\r\n");
    assert_eq!(t.send(b"NOOP \x80\x81\r\n"), "250 2.0.0 OK\r\n");
    let noise: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    t.send(&noise);
    assert!(!t.closed());
}

#[test]
fn idle_timeout_closes_with_421() {
    let mut t = Transcript::new();
    assert_eq!(t.wait(Duration::from_secs(59)), "");
    assert_eq!(t.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n");
    // a command resets the clock; bytes of an unfinished line do not
    assert_eq!(t.wait(Duration::from_secs(59)), "");
    assert_eq!(t.send(b"NO"), "");
    assert_eq!(t.wait(Duration::from_secs(1)), "421 4.4.2 mx.test timeout exceeded, closing connection\r\n");
    assert!(t.closed());
}

#[test]
fn a_peer_that_never_reads_its_last_reply_is_dropped() {
    let mut t = Transcript::new();
    t.session.handle_input(b"QUIT\r\n", t.now);
    assert!(matches!(t.session.poll_transmit(), Transmit::Send(_)));
    t.now += CLOSE_GRACE;
    t.session.handle_timeout(t.now);
    assert_eq!(t.session.poll_transmit(), Transmit::Close);
    assert_eq!(t.session.poll_timeout(), None);
}

#[test]
fn shutdown_says_421_and_closes() {
    let mut t = Transcript::new();
    t.session.shutdown(t.now);
    assert_eq!(t.drain(), "421 4.3.2 mx.test service shutting down, closing connection\r\n");
    assert!(t.closed());
}

#[test]
fn eof_closes_at_once() {
    let mut t = Transcript::new();
    t.session.handle_eof();
    assert!(t.closed());
}
