//! Calendar dates from Unix time, for reply lines and headers (RFC 5322 §3.3, always UTC).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock as a driver read it, with the monotonic instant it read it at: code
/// that must read no clock of its own (the host, the session) derives the wall clock at
/// any later instant from it.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    pub at: std::time::Instant,
    pub unix: UnixTime,
}

impl WallClock {
    /// The wall clock at `now` (not before the reading).
    pub fn at(&self, now: std::time::Instant) -> UnixTime {
        UnixTime(self.unix.0 + now.saturating_duration_since(self.at).as_secs() as i64)
    }
}

/// A UTC instant with one-second resolution, formatted as RFC 5322 wants:
/// `Sat, 28 Nov 2026 19:39:20 +0000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(pub i64);

impl UnixTime {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// The instant as RFC 3339 in UTC, `2026-11-28T19:39:20Z` (ban files, log lines).
    pub fn rfc3339(self) -> Rfc3339 {
        Rfc3339(self)
    }
}

/// [`UnixTime::rfc3339`].
pub struct Rfc3339(UnixTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.0;
        let (year, month, day) = civil_from_days(t.div_euclid(86_400));
        let secs = t.rem_euclid(86_400);
        write!(f, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
    }
}

impl From<SystemTime> for UnixTime {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => UnixTime(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => UnixTime(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }
}

/// The proleptic Gregorian date of a day number counted from 1970-01-01.
/// Works in 400-year eras (146 097 days), each starting on 1 March so that the leap
/// day falls at the end of a year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z.rem_euclid(DAYS_PER_ERA); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // month is in 1..=12 and day in 1..=31 by construction
    (year, month as u32, day as u32)
}

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let weekday = WEEKDAYS[days.rem_euclid(7) as usize];
        let month = MONTHS[(month - 1) as usize];
        write!(f, "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} +0000", secs / 3600, secs / 60 % 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(UnixTime(1_795_894_760).rfc3339().to_string(), "2026-11-28T19:39:20Z");
        assert_eq!(UnixTime(0).rfc3339().to_string(), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn known_dates() {
        assert_eq!(UnixTime(0).to_string(), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(UnixTime(951_782_400).to_string(), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(UnixTime(1_795_894_760).to_string(), "Sat, 28 Nov 2026 19:39:20 +0000");
        assert_eq!(UnixTime(4_107_542_399).to_string(), "Sun, 28 Feb 2100 23:59:59 +0000");
        assert_eq!(UnixTime(4_107_542_400).to_string(), "Mon, 01 Mar 2100 00:00:00 +0000");
        assert_eq!(UnixTime(-1).to_string(), "Wed, 31 Dec 1969 23:59:59 +0000");
    }

    #[test]
    fn every_day_follows_the_previous_one() {
        // walk 1600-03-01 .. 2400-03-01 day by day: dates must advance by exactly one day
        let mut prev = civil_from_days(-135_080 - 1);
        for days in -135_080..157_100 {
            let (y, m, d) = civil_from_days(days);
            let next_in_month = (y, m, d) == (prev.0, prev.1, prev.2 + 1);
            let next_month =
                d == 1 && ((y == prev.0 && m == prev.1 + 1) || (y == prev.0 + 1 && m == 1 && prev.1 == 12));
            assert!(next_in_month || next_month, "{prev:?} -> {:?}", (y, m, d));
            prev = (y, m, d);
        }
    }
}
