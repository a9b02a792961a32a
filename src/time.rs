//! Event time: milliseconds since the Unix epoch, UTC, and the two text forms the contract uses
//! (RFC 3339 in, RFC 3339 UTC with milliseconds out) plus journey durations (`30s`, `1d12h`).

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Milliseconds since 1970-01-01T00:00:00Z. Every instant in waymark is one of these.
pub type Millis = i64;

/// Parses an RFC 3339 timestamp (any offset) into epoch milliseconds, flooring sub-millisecond digits.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let dt = DateTime::parse_from_rfc3339(s).ok()?;
    Some(dt.timestamp_millis())
}

/// Formats epoch milliseconds as the contract's output form: `2026-11-28T10:00:00.000Z`.
pub fn format_millis(ms: Millis) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => format!("{ms}"),
    }
}

/// Parses a journey duration: `30s`, `15m`, `2h`, `3d`, combinations such as `1d12h` or `1h 30m`,
/// and the longer unit names humantime accepts (`90min`, `2hours`). Returns milliseconds; zero,
/// negative and sub-millisecond results are refused, as is anything humantime cannot read.
pub fn parse_duration(s: &str) -> Result<Millis, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err("empty duration".into());
    }
    let d = humantime::parse_duration(trimmed)
        .map_err(|e| format!("bad duration {s:?}: {e} (use forms like 30s, 15m, 2h, 3d, 1d12h)"))?;
    let ms = d.as_millis();
    if ms == 0 {
        return Err(format!("duration {s:?} must be at least 1ms"));
    }
    i64::try_from(ms).map_err(|_| format!("duration {s:?} is too long"))
}

/// Formats milliseconds as a compact duration, e.g. `1d 12h`; for messages and `inspect`.
pub fn format_duration(ms: Millis) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_with_millis() {
        let ms = parse_rfc3339("2026-11-28T10:00:00Z").unwrap();
        assert_eq!(format_millis(ms), "2026-11-28T10:00:00.000Z");
        let ms = parse_rfc3339("2026-11-28T11:00:00.1239+01:00").unwrap();
        assert_eq!(format_millis(ms), "2026-11-28T10:00:00.123Z");
        assert!(parse_rfc3339("2026-11-28 10:00").is_none());
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn durations_of_the_contract() {
        assert_eq!(parse_duration("30s").unwrap(), 30_000);
        assert_eq!(parse_duration("15m").unwrap(), 900_000);
        assert_eq!(parse_duration("2h").unwrap(), 7_200_000);
        assert_eq!(parse_duration("3d").unwrap(), 259_200_000);
        assert_eq!(parse_duration("1d12h").unwrap(), 129_600_000);
        assert_eq!(parse_duration("1h 30m").unwrap(), 5_400_000);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("3 days please").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-5m").is_err());
    }
}
