//! Command verbs. Verbs are ASCII and case-insensitive; anything else, non-UTF-8 bytes
//! included, is simply not a verb we know.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    /// RFC 3030 CHUNKING.
    Bdat,
    Noop,
    Vrfy,
    Rset,
    Help,
    Quit,
    StartTls,
    /// A real SMTP command that mxgate does not (yet) offer.
    NotImplemented,
    Unknown,
}

const NOT_IMPLEMENTED: &[&[u8]] =
    &[b"MAIL", b"RCPT", b"DATA", b"VRFY", b"EXPN", b"AUTH", b"ETRN", b"TURN", b"ATRN", b"SEND", b"SOML", b"SAML"];

impl Verb {
    pub fn parse(word: &[u8]) -> Verb {
        let is = |name: &[u8]| word.eq_ignore_ascii_case(name);
        if is(b"EHLO") {
            Verb::Ehlo
        } else if is(b"HELO") {
            Verb::Helo
        } else if is(b"MAIL") {
            Verb::Mail
        } else if is(b"RCPT") {
            Verb::Rcpt
        } else if is(b"DATA") {
            Verb::Data
        } else if is(b"BDAT") {
            Verb::Bdat
        } else if is(b"NOOP") {
            Verb::Noop
        } else if is(b"VRFY") {
            Verb::Vrfy
        } else if is(b"RSET") {
            Verb::Rset
        } else if is(b"HELP") {
            Verb::Help
        } else if is(b"QUIT") {
            Verb::Quit
        } else if is(b"STARTTLS") {
            Verb::StartTls
        } else if NOT_IMPLEMENTED.iter().any(|n| is(n)) {
            Verb::NotImplemented
        } else {
            Verb::Unknown
        }
    }
}

/// Splits a command line (CRLF removed) into its verb and its arguments, the single
/// space between them dropped. `MAIL FROM:<a>` has the verb `MAIL`.
pub fn split(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(Verb::parse(b"ehlo"), Verb::Ehlo);
        assert_eq!(Verb::parse(b"QuIt"), Verb::Quit);
        assert_eq!(Verb::parse(b"mail"), Verb::Mail);
        assert_eq!(Verb::parse(b"bdat"), Verb::Bdat);
        assert_eq!(Verb::parse(b"EXPN"), Verb::NotImplemented);
        assert_eq!(Verb::parse(b"EHLOX"), Verb::Unknown);
        assert_eq!(Verb::parse(b"\xff\xfe"), Verb::Unknown);
        assert_eq!(Verb::parse(b""), Verb::Unknown);
        assert_eq!(split(b"MAIL FROM:<a@b>"), (&b"MAIL"[..], &b"FROM:<a@b>"[..]));
        assert_eq!(split(b"NOOP"), (&b"NOOP"[..], &b""[..]));
    }
}
