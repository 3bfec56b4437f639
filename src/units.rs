//! Durations (`30s`, `10m`, `1h`, `7d`) and sizes (`50MiB`) as written in the config file.

use std::time::Duration;

use crate::problem::UnitError;

/// Parses `<integer><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let hint = || UnitError::NotADuration(text.to_owned());
    let (n, unit) = split(text).ok_or_else(hint)?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => return Err(hint()),
    };
    d.ok_or_else(|| UnitError::DurationTooLong(text.to_owned()))
}

/// The longest a ban lasts: 100 years (36,525 days). Durations in the configuration and
/// on the command line are refused past it; `abuse::bans` ends longer ones (a ban file,
/// another node) then.
pub const MAX_BAN_SECS: i64 = 36_525 * 86_400;

/// A ban's length: a duration of at most the longest ban (100 years, `36525d`).
pub fn parse_ban_duration(text: &str) -> Result<Duration, UnitError> {
    let max = MAX_BAN_SECS;
    let d = parse_duration(text)?;
    if d.as_secs() > max as u64 {
        return Err(UnitError::LongerThanBan { given: text.to_owned(), max_days: max / 86_400 });
    }
    Ok(d)
}

/// Parses `<integer>[unit]` with unit `B`, `KiB`, `MiB` or `GiB` (no unit: bytes).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let hint = || UnitError::NotASize(text.to_owned());
    let (n, unit) = split(text).ok_or_else(hint)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(hint()),
    };
    n.checked_mul(mult).ok_or_else(|| UnitError::SizeTooLarge(text.to_owned()))
}

/// `"50 MiB"` -> `(50, "MiB")`.
fn split(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let n = text[..digits].parse().ok()?;
    Some((n, text[digits..].trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "10", "m", "1.5h", "-1s", "10 minutes", "10M", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn ban_durations_stop_at_a_hundred_years() {
        assert_eq!(parse_ban_duration("36525d"), Ok(Duration::from_secs(3_155_760_000)));
        for long in ["36526d", "100000000d"] {
            let e = parse_ban_duration(long).unwrap_err().to_string();
            assert!(e.contains("longer than the longest ban (36525d, 100 years)"), "{e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MiB"), Ok(50 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        for bad in ["", "MiB", "5MB", "1.5MiB", "-1B", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
