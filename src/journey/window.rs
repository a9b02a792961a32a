//! Entry windows (contract section 2, `availability`): a start date, an end date and an IANA zone.
//!
//! The window opens at the first instant of the start date in the zone and closes at the last
//! instant of the end date, both included. Where local midnight does not exist (a DST jump at
//! 00:00) the day starts at its first existing instant; where midnight happens twice, the earlier
//! one counts. The window is judged on event time.

use chrono::{Days, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use chrono_tz::Tz;

use crate::time::Millis;

/// A resolved entry window: `[opens, closes_before)` in epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub opens: Millis,
    /// The first instant after the window (the start of the day after the end date).
    pub closes_before: Millis,
}

impl Window {
    /// Resolves a window from its dates and zone. `end` must not be before `start`.
    pub fn new(start: NaiveDate, end: NaiveDate, tz: Tz) -> Option<Window> {
        let after = end.checked_add_days(Days::new(1))?;
        Some(Window {
            opens: day_start(start, tz)?,
            closes_before: day_start(after, tz)?,
        })
    }

    /// True when an event at `t` may enter.
    pub fn contains(&self, t: Millis) -> bool {
        t >= self.opens && t < self.closes_before
    }
}

/// The first instant of `date` in `tz`, in epoch milliseconds.
pub fn day_start(date: NaiveDate, tz: Tz) -> Option<Millis> {
    let midnight = date.and_time(NaiveTime::MIN);
    if let Some(dt) = tz.from_local_datetime(&midnight).earliest() {
        return Some(dt.timestamp_millis());
    }
    // Midnight falls in a gap: the day starts at the first instant after it.
    first_after_gap(midnight, tz)
}

/// The first instant whose local time in `tz` is at or after `naive`, where `naive` falls in a
/// gap (a DST jump skips it): the instant of the jump.
pub fn first_after_gap(naive: NaiveDateTime, tz: Tz) -> Option<Millis> {
    // Find the first local minute after it that exists, then narrow to the exact transition
    // instant: the smallest instant whose local time is on or after `naive`.
    let mut probe = naive;
    let mut later = None;
    for _ in 0..(26 * 60) {
        probe += chrono::Duration::minutes(1);
        if let Some(dt) = tz.from_local_datetime(&probe).earliest() {
            later = Some(dt.timestamp_millis());
            break;
        }
    }
    let hi = later?;
    let is_on_or_after = |ms: Millis| -> bool {
        match tz.timestamp_millis_opt(ms).single() {
            Some(dt) => dt.naive_local() >= naive,
            None => false,
        }
    };
    // Every instant in (hi - 1 minute, hi] maps to the probe's minute or to before the gap.
    let (mut lo, mut hi) = (hi - 60_000, hi);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if is_on_or_after(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{format_millis, parse_rfc3339};

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn berlin_window_bounds_are_inclusive() {
        let w = Window::new(d("2026-12-01"), d("2026-12-24"), chrono_tz::Europe::Berlin).unwrap();
        assert_eq!(format_millis(w.opens), "2026-11-30T23:00:00.000Z");
        assert_eq!(format_millis(w.closes_before), "2026-12-24T23:00:00.000Z");
        assert!(w.contains(parse_rfc3339("2026-11-30T23:00:00Z").unwrap()));
        assert!(!w.contains(parse_rfc3339("2026-11-30T22:59:59.999Z").unwrap()));
        assert!(w.contains(parse_rfc3339("2026-12-24T22:59:59.999Z").unwrap()));
        assert!(!w.contains(parse_rfc3339("2026-12-24T23:00:00Z").unwrap()));
    }

    #[test]
    fn single_day_window() {
        let w = Window::new(d("2026-06-01"), d("2026-06-01"), chrono_tz::UTC).unwrap();
        assert_eq!(w.closes_before - w.opens, 86_400_000);
    }

    #[test]
    fn missing_midnight_starts_at_first_existing_instant() {
        // Sao Paulo sprang forward at 00:00 on 2018-11-04: the day began at 01:00 local (-02:00).
        let s = day_start(d("2018-11-04"), chrono_tz::America::Sao_Paulo).unwrap();
        assert_eq!(format_millis(s), "2018-11-04T03:00:00.000Z");
        // Beirut springs forward at 00:00 on the last Sunday of March.
        let b = day_start(d("2024-03-31"), chrono_tz::Asia::Beirut).unwrap();
        assert_eq!(format_millis(b), "2024-03-30T22:00:00.000Z");
    }

    #[test]
    fn ambiguous_midnight_takes_the_earlier() {
        // Sao Paulo fell back from 00:00 to 23:00 on 2019-02-17: 2019-02-16 23:00 happened twice,
        // and so did its midnight in zones that fall back at 01:00 -> 00:00, such as Havana.
        let h = day_start(d("2024-11-03"), chrono_tz::America::Havana).unwrap();
        // Havana falls back at 01:00 CDT to 00:00 CST: midnight happens first at 04:00Z.
        assert_eq!(format_millis(h), "2024-11-03T04:00:00.000Z");
    }
}
