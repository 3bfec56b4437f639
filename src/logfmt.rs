//! Outside text in log lines: the one rule for every value a peer, a next hop, a
//! balancer, a DNS server or Redis supplies (a HELO name, an address, pregreet octets, a
//! PROXY id, a Redis key), so that no such value can forge a field or a line, nor hide
//! what it says from the reader.
//!
//! A value is written bare when it is plain: not empty, UTF-8, and no space, `"`, `=`,
//! `\`, control, format, bidirectional or line/paragraph-separator character in it.
//! Anything else is written quoted, logfmt's way: `"` and `\` escaped with a backslash,
//! `\n` `\r` `\t`, any other such character as `\u{XXXX}`, and each byte that is not
//! UTF-8 as `\xNN`.
//!
//! ```text
//!  <a@client.test>                   ->  <a@client.test>
//!  <"x result=250 peer=8.8.8.8"@a>   ->  "<\"x result=250 peer=8.8.8.8\"@a>"
//!  EHLO bot\r\n                      ->  "EHLO bot\r\n"
//!  <a\u{2028}b@c> (SMTPUTF8)         ->  "<a\u{2028}b@c>"
//! ```

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};

/// Log lines are JSON objects (`[log] format = "json"`), set once at start.
static JSON_LINES: AtomicBool = AtomicBool::new(false);

/// From now on, log lines are JSON objects: events that carry outside values give them
/// as fields of their own (see [`json`]).
pub fn set_json() {
    JSON_LINES.store(true, Ordering::Relaxed);
}

/// Log lines are JSON objects.
pub fn json_lines() -> bool {
    JSON_LINES.load(Ordering::Relaxed)
}

/// `text` as a log field's value (see the module's rule).
pub fn value<T: AsRef<[u8]> + ?Sized>(text: &T) -> Value<'_> {
    Value(text.as_ref())
}

/// A log field's value, written by the module's rule.
#[derive(Clone, Copy, Debug)]
pub struct Value<'a>(&'a [u8]);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Ok(text) = std::str::from_utf8(self.0)
            && !text.is_empty()
            && !text.chars().any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || hidden(c))
        {
            return f.write_str(text);
        }
        f.write_char('"')?;
        escape(self.0, true, f)?;
        f.write_char('"')
    }
}

/// `text` as a JSON log field's string: the module's rule but for the quotes (JSON
/// quotes the string, and escapes `"` and `\` once more): `\`, `\n` `\r` `\t`, any
/// other hidden character as `\u{XXXX}`, each byte that is not UTF-8 as `\xNN`.
pub fn json<T: AsRef<[u8]> + ?Sized>(text: &T) -> Json<'_> {
    Json(text.as_ref())
}

/// A JSON log field's string, written by the module's rule (see [`json`]).
#[derive(Clone, Copy, Debug)]
pub struct Json<'a>(&'a [u8]);

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        escape(self.0, false, f)
    }
}

/// Writes `bytes` with the hidden characters, backslashes and bytes that are not UTF-8
/// escaped (and `"` too when `quoted`).
fn escape(bytes: &[u8], quoted: bool, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' if quoted => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if hidden(c) => write!(f, "\\u{{{:04x}}}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// A character a reader would not see as written: controls (C0, DEL, C1), the format
/// characters that reorder or hide text (bidirectional marks, embeddings, overrides and
/// isolates; zero-width characters; the soft hyphen; tags) and the line and paragraph
/// separators.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &[u8]) -> String {
        value(text).to_string()
    }

    #[test]
    fn plain_values_stay_bare() {
        assert_eq!(v(b"<a@client.test>"), "<a@client.test>");
        assert_eq!(v("<jörg@bücher.example>".as_bytes()), "<jörg@bücher.example>");
        assert_eq!(v(b"192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn a_value_cannot_forge_a_field_or_a_line() {
        assert_eq!(v(br#"<"x result=250 peer=8.8.8.8"@a.test>"#), r#""<\"x result=250 peer=8.8.8.8\"@a.test>""#);
        assert_eq!(v(b"EHLO bot\r\nINFO forged"), r#""EHLO bot\r\nINFO forged""#);
        assert_eq!(v(b"a\\b"), r#""a\\b""#);
        assert_eq!(v(b""), r#""""#);
        assert_eq!(v(b"SRS0=ab=cd@x"), r#""SRS0=ab=cd@x""#);
    }

    #[test]
    fn hidden_characters_are_shown_escaped() {
        assert_eq!(v("<a\u{2028}b@c>".as_bytes()), r#""<a\u{2028}b@c>""#);
        assert_eq!(v("<\u{202e}moc.evil@x>".as_bytes()), r#""<\u{202e}moc.evil@x>""#);
        assert_eq!(v("x\u{200b}y\u{0}z\u{7f}\u{85}".as_bytes()), r#""x\u{200b}y\u{0000}z\u{007f}\u{0085}""#);
        assert_eq!(v(b"\xff\xfeok\x1b[31m"), r#""\xff\xfeok\u{001b}[31m""#);
    }

    #[test]
    fn every_escaped_value_reads_back_as_one_quoted_field() {
        // whatever the bytes, the value is one bare word or one quoted string whose
        // inner quotes are all escaped, on one line
        for bytes in [&b"a b"[..], b"\"", b"\\\"", b"x\ny", "\u{2029}".as_bytes(), b"\x00\x01"] {
            let out = v(bytes);
            assert!(!out.contains('\n') && !out.contains('\r'), "{out}");
            let inner = out.strip_prefix('"').and_then(|o| o.strip_suffix('"')).unwrap_or(&out);
            let mut escaped = false;
            for c in inner.chars() {
                assert!(escaped || c != '"', "an unescaped quote in {out}");
                escaped = !escaped && c == '\\';
            }
        }
    }
}
