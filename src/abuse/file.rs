//! The ban file: the list-file syntax, one ban a line, with `until=` (RFC 3339, UTC),
//! `reason="..."` and `offence=` after the prefix, so an operator can read and edit it:
//!
//! ```text
//! 192.0.2.7 until=2026-11-28T20:39:20Z reason="30 failures" offence=1
//! 2001:db8:1:2::/64 until=2026-11-29T19:39:20Z reason="dropped for too many errors" offence=2
//! 198.51.100.9 until=2026-11-29T19:40:02Z reason="30 failures" offence=1 node=mx2
//! ```
//!
//! `node=` names the fleet node that made a ban (`[cluster]`); absent: made here. The
//! same line is what the fleet's Redis holds and publishes.
//!
//! It is written whole, atomically and privately by [`crate::statefile`], so a crash
//! leaves the old file or the new one, never a mix.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{AbuseKey, Ban, Reason};
use crate::access::list::parse_net;
use crate::datetime::UnixTime;
use crate::problem::{BanLineError, Problem};

/// The highest offence number a ban file or the fleet may give: a ban's length stops
/// doubling long before (at `max_ban_duration`).
pub const MAX_OFFENCE: u32 = 1000;

const HEADER: &str = "# mxgate bans: written by mxgate, read at start. One ban a line:\n\
                      # PREFIX until=RFC3339 reason=\"TEXT\" offence=N\n";

/// The file's text for these bans.
pub fn render<'a>(bans: impl Iterator<Item = (&'a AbuseKey, &'a Ban)>) -> String {
    let mut bans: Vec<_> = bans.collect();
    bans.sort_by_key(|(k, _)| **k);
    let mut text = String::with_capacity(HEADER.len() + bans.len() * 80);
    text.push_str(HEADER);
    for (key, ban) in bans {
        text.push_str(&line(*key, ban, ban.from.as_deref()));
        text.push('\n');
    }
    text
}

/// One ban's line (no line end), naming `node` when given.
pub fn line(key: AbuseKey, ban: &Ban, node: Option<&str>) -> String {
    let reason = ban.reason.to_string().replace('\\', "\\\\").replace('"', "\\\"");
    let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut line = format!("{key} until={} reason=\"{reason}\" offence={}", UnixTime(ban.until).rfc3339(), ban.offence);
    if let Some(node) = node {
        let _ = write!(line, " node={node}");
    }
    line
}

/// The bans in `text`; the first bad line makes the whole file bad.
pub fn parse(text: &[u8], file: &Path) -> Result<Vec<(AbuseKey, Ban)>, Problem> {
    let mut bans = Vec::new();
    for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = u32::try_from(n + 1).unwrap_or(u32::MAX);
        let bad = |why: BanLineError| Problem::at_line(file, line, why);
        let text = std::str::from_utf8(raw).map_err(|_| bad(BanLineError::NotUtf8))?.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        bans.push(parse_line(text).map_err(bad)?);
    }
    Ok(bans)
}

/// One ban's line, as [`line()`] writes it (a `deny` before the prefix allowed).
pub fn parse_line(text: &str) -> Result<(AbuseKey, Ban), BanLineError> {
    let text = text.strip_prefix("deny ").map_or(text, str::trim_start);
    let (prefix, mut rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let key = AbuseKey::from_net(parse_net(prefix)?);
    let (mut until, mut reason, mut offence, mut from) = (None, None, 1, None);
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (name, value) = rest.split_once('=').ok_or_else(|| BanLineError::NotNameValue(rest.to_owned()))?;
        let value_end = if let Some(quoted) = value.strip_prefix('"') {
            let (text, len) = unquote(quoted).ok_or_else(|| BanLineError::Unterminated(name.to_owned()))?;
            if name == "reason" {
                reason = Some(text);
            }
            len + 1
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        let word = &value[..value_end];
        match name {
            "until" => {
                until = Some(parse_rfc3339(word).ok_or_else(|| BanLineError::NotATime(word.to_owned()))?);
            }
            "offence" => {
                offence = word
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_OFFENCE).contains(n))
                    .ok_or_else(|| BanLineError::NotAnOffence { given: word.to_owned(), max: MAX_OFFENCE })?;
            }
            "node" if crate::config::valid_node_name(word) => from = Some(word.into()),
            "node" => return Err(BanLineError::NotANode(word.to_owned())),
            "reason" if reason.is_some() => {}
            other => return Err(BanLineError::UnknownField(other.to_owned())),
        }
        rest = &value[value_end..];
    }
    let until = until.ok_or_else(|| BanLineError::NoUntil(prefix.to_owned()))?;
    Ok((key, Ban { until, reason: Reason::Recorded(reason.unwrap_or_default()), offence, from }))
}

/// Text up to the closing quote (backslash escapes), and the bytes that took, the quote
/// included.
fn unquote(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// `YYYY-MM-DDTHH:MM:SSZ` (or `+00:00`) as seconds since the epoch, 1970 to 9999.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', 't'])?;
    let four_digit_year = date.split('-').next().is_some_and(|y| y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()));
    let digits = |text: &str, separator: u8| text.bytes().all(|b| b.is_ascii_digit() || b == separator);
    if !four_digit_year || date < "1970" || !digits(date, b'-') || !digits(time, b':') {
        return None;
    }
    let mut d = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':').map(str::parse::<i64>);
    let (h, m, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // every field in its range (digits only, so none is negative)
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&h)
        && (0..60).contains(&m)
        && (0..61).contains(&sec);
    if !valid || d.next().is_some() || t.next().is_some() {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of the calendar
/// in `datetime`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The bans in force in the file at `path` at `now`. A missing file has none; a file
/// that cannot be read as bans is moved aside to `<name>.corrupt-<unix time>` (so the
/// next write does not lose what an operator may want back) and has none.
pub fn load(path: &Path, now: UnixTime) -> Vec<(AbuseKey, Ban)> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!("cannot read the ban file {}: {e}; starting without its bans", path.display());
            return Vec::new();
        }
    };
    match parse(&text, path) {
        Ok(bans) => bans
            .into_iter()
            .filter(|(_, b)| b.until > now.0)
            .map(|(k, b)| (k, Ban { until: b.until.min(super::bans::latest_end(now.0)), ..b }))
            .collect(),
        Err(problem) => {
            let aside = corrupt_name(path, now);
            match fs::rename(path, &aside) {
                Ok(()) => tracing::error!(
                    "ban file corrupt: {problem}; moved aside to {}, starting with the static lists only",
                    aside.display()
                ),
                Err(e) => tracing::error!(
                    "ban file corrupt: {problem}; cannot move it aside ({e}); starting with the static lists only"
                ),
            }
            Vec::new()
        }
    }
}

fn corrupt_name(path: &Path, now: UnixTime) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{}", now.0));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerIp;

    const T0: i64 = 1_795_894_760;

    fn key(ip: &str) -> AbuseKey {
        AbuseKey::new(PeerIp::new(ip.parse().unwrap()), 64)
    }

    #[test]
    fn bans_survive_a_round_trip() {
        let bans = vec![
            (key("192.0.2.7"), Ban { until: T0 + 3600, reason: Reason::Failures(30), offence: 1, from: None }),
            (
                key("2001:db8:1:2::9"),
                Ban { until: T0 + 7200, reason: Reason::Dropped, offence: 2, from: Some("mx2".into()) },
            ),
            (
                AbuseKey::from_net("198.51.100.0/24".parse().unwrap()),
                Ban { until: T0, reason: Reason::Recorded("say \"no\" \\ twice".into()), offence: 3, from: None },
            ),
        ];
        let text = render(bans.iter().map(|(k, b)| (k, b)));
        assert!(text.contains("192.0.2.7 until=2026-11-28T20:39:20Z reason=\"30 failures\" offence=1\n"), "{text}");
        assert!(text.contains("2001:db8:1:2::/64 until="), "{text}");
        assert!(text.contains(" offence=2 node=mx2\n"), "{text}");
        let back = parse(text.as_bytes(), Path::new("bans.list")).unwrap();
        assert_eq!(back.len(), 3);
        for (k, b) in &bans {
            let (_, got) = back.iter().find(|(bk, _)| bk == k).unwrap();
            assert_eq!((got.until, got.offence, got.reason.to_string()), (b.until, b.offence, b.reason.to_string()));
            assert_eq!(got.from, b.from, "the node that made it is kept");
        }
    }

    #[test]
    fn an_operator_may_write_bans_by_hand() {
        let text = b"# hand-made\ndeny 203.0.113.5 until=2030-01-01T00:00:00+00:00 reason=\"manual\"\n\n";
        let bans = parse(text, Path::new("b")).unwrap();
        assert_eq!(bans[0].0.to_string(), "203.0.113.5");
        assert_eq!(bans[0].1.until, 1_893_456_000);
        assert_eq!(bans[0].1.offence, 1);
    }

    #[test]
    fn a_bad_line_is_named() {
        let bad: [&[u8]; 11] = [
            b"192.0.2.7 until=99999999-01-01T00:00:00Z\n",
            b"192.0.2.7 until=+2030-01-01T00:00:00Z\n",
            b"192.0.2.7 until=1969-12-31T23:59:59Z\n",
            b"192.0.2.7 until=2030-01-01T00:00:00Z offence=4294967295\n",
            b"192.0.2.7 until=2030-01-01T00:00:00Z offence=0\n",
            b"192.0.2.7 until=2030-01-01T00:00:00Z node=a/b\n",
            b"192.0.2.7 reason=\"x\"\n",
            b"192.0.2.7 until=yesterday\n",
            b"192.0.2.300 until=2030-01-01T00:00:00Z\n",
            b"192.0.2.7 until=2030-01-01T00:00:00Z colour=red\n",
            b"192.0.2.7 until=2030-01-01T00:00:00Z reason=\"open\n",
        ];
        for text in bad {
            let e = parse(&[b"# ok\n".as_slice(), text].concat(), Path::new("bans.list")).unwrap_err();
            assert!(e.to_string().starts_with("bans.list:2: "), "{e}");
        }
    }

    #[test]
    fn a_ban_ending_after_the_longest_ban_is_cut_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.list");
        fs::write(&path, "192.0.2.1 until=9999-12-31T23:59:59Z offence=1000\n").unwrap();
        let loaded = load(&path, UnixTime(T0));
        assert_eq!(loaded[0].1.until, T0 + super::super::bans::MAX_BAN_SECS);
        assert_eq!(loaded[0].1.offence, 1000);
    }

    /// Found by the `fleet` fuzz target: a negative hour passed `h < 24`, and the
    /// arithmetic after it overflowed.
    #[test]
    fn negative_fields_are_not_times() {
        for bad in [
            "2030-01-01T-9223372036854775808:00:00Z",
            "2030-01-01T00:-1:00Z",
            "2030-01-01T00:00:-5Z",
            "2030-01-01T+1:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        let line = "192.0.2.7 until=2030-01-01T-9223372036854775808:00:00Z";
        assert!(parse_line(line).is_err());
    }

    #[test]
    fn rfc3339_matches_the_calendar() {
        for t in [0, 951_782_400, T0, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&UnixTime(t).rfc3339().to_string()), Some(t));
        }
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_expired_bans_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.list");
        assert!(load(&path, UnixTime(T0)).is_empty(), "missing: none");
        let bans = [
            (key("192.0.2.1"), Ban { until: T0 + 10, reason: Reason::Dropped, offence: 1, from: None }),
            (key("192.0.2.2"), Ban { until: T0 - 10, reason: Reason::Dropped, offence: 1, from: None }),
        ];
        crate::statefile::write(&path, render(bans.iter().map(|(k, b)| (k, b))).as_bytes()).unwrap();
        let loaded = load(&path, UnixTime(T0));
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].0, key("192.0.2.1"));
        fs::write(&path, "192.0.2.1 until=garbage\n").unwrap();
        assert!(load(&path, UnixTime(T0)).is_empty());
        assert!(!path.exists());
        let aside = dir.path().join(format!("bans.list.corrupt-{T0}"));
        assert_eq!(fs::read_to_string(aside).unwrap(), "192.0.2.1 until=garbage\n");
    }
}
