//! Reply templates such as `530 5.7.1 {hostname} ESMTP denied access at {time}`.

use std::io::Write;

use crate::datetime::UnixTime;
use crate::problem::TemplateError;

/// Longest reply line, CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LEN: usize = 512;
/// Longest `{time}`: `Sat, 28 Nov 2026 19:39:20 +0000`, with a 5-digit year to spare.
const MAX_TIME_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Hostname,
    Time,
}

/// A one-line SMTP reply with `{hostname}` and `{time}` placeholders, checked at load:
/// it starts with a 4xx or 5xx code, holds no control characters and fits one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyTemplate {
    parts: Vec<Part>,
}

impl ReplyTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let code_ok = text.len() >= 3
            && matches!(text.as_bytes()[0], b'4' | b'5')
            && text.as_bytes()[1..3].iter().all(u8::is_ascii_digit)
            && text.as_bytes().get(3).is_none_or(|&b| b == b' ');
        if !code_ok {
            return Err(TemplateError::NoCode(text.to_owned()));
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(TemplateError::Control(c));
        }
        if !text.is_ascii() {
            return Err(TemplateError::NotAscii);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(TemplateError::UnmatchedClose(text.to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| TemplateError::UnmatchedOpen(text.to_owned()))? + open;
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            parts.push(match &rest[open + 1..close] {
                "hostname" => Part::Hostname,
                "time" => Part::Time,
                other => {
                    return Err(TemplateError::UnknownPlaceholder(other.to_owned()));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(ReplyTemplate { parts })
    }

    /// The longest rendered line, CRLF included, for this hostname.
    pub fn max_len(&self, hostname: &str) -> usize {
        let part_len = |p: &Part| match p {
            Part::Text(t) => t.len(),
            Part::Hostname => hostname.len(),
            Part::Time => MAX_TIME_LEN,
        };
        self.parts.iter().map(part_len).sum::<usize>() + 2
    }

    /// Writes the line and its CRLF; `out` must hold `max_len` bytes. Returns the length.
    pub fn render(&self, hostname: &str, time: UnixTime, out: &mut [u8]) -> usize {
        let total = out.len();
        let mut w = &mut out[..];
        for part in &self.parts {
            // cannot fail: callers size `out` with `max_len`
            let _ = match part {
                Part::Text(t) => w.write_all(t.as_bytes()),
                Part::Hostname => w.write_all(hostname.as_bytes()),
                Part::Time => write!(w, "{time}"),
            };
        }
        let _ = w.write_all(b"\r\n");
        total - w.len()
    }

    /// The rendered line as a string, for logs and `mxgate explain`.
    pub fn to_line(&self, hostname: &str, time: UnixTime) -> String {
        let mut buf = vec![0; self.max_len(hostname)];
        let n = self.render(hostname, time, &mut buf);
        String::from_utf8_lossy(&buf[..n - 2]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders() {
        let t = ReplyTemplate::parse("530 5.7.1 {hostname} ESMTP denied access at {time}").unwrap();
        let line = t.to_line("mx.example.com", UnixTime(0));
        assert_eq!(line, "530 5.7.1 mx.example.com ESMTP denied access at Thu, 01 Jan 1970 00:00:00 +0000");
        assert!(t.max_len("mx.example.com") >= line.len() + 2);
        assert_eq!(ReplyTemplate::parse("554").unwrap().to_line("h", UnixTime(0)), "554");
    }

    #[test]
    fn refuses_what_would_break_the_protocol() {
        for (bad, why) in [
            ("250 ok", "4xx or 5xx"),
            ("53 denied", "4xx or 5xx"),
            ("530denied", "4xx or 5xx"),
            ("530 a\r\n250 b", "control character"),
            ("530 {host}", "unknown placeholder"),
            ("530 {time", "unmatched `{`"),
            ("530 time}", "unmatched `}`"),
            ("530 dénié", "ASCII"),
        ] {
            let err = ReplyTemplate::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
