//! Application policies (contract section 5.5): the user's time zone, quiet hours and frequency
//! caps, from a policy file (`policy_for` instead of `id`) in the journeys directory, with the
//! journey-level overrides; and the calendar arithmetic they need (quiet-hours release instants
//! across DST changes, calendar days and ISO weeks in a zone). Pure functions of their inputs.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike};
use chrono_tz::Tz;
use serde_json::{Map, Value};

use super::condition::{kind, lookup_in};
use super::window::first_after_gap;
use super::{Problem, Problems};
use crate::time::Millis;

/// Local hours during which a session is not moved out of an action step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl QuietHours {
    /// True when the local time of day `t` is in `[start, end)` (spanning midnight when
    /// `start > end`).
    pub fn contains(&self, t: NaiveTime) -> bool {
        if self.start < self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// When a session about to leave an action step at `at` must be held: `Some(release)`, the
    /// first instant after `at` at which the local clock in `tz` shows `end` (after a DST jump
    /// that skips `end`, the first instant after the jump; where `end` is shown twice, the first
    /// of those after `at`). `None` when `at` is outside quiet hours.
    pub fn hold_until(&self, at: Millis, tz: Tz) -> Option<Millis> {
        let local = tz.timestamp_millis_opt(at).single()?.naive_local();
        if !self.contains(local.time()) {
            return None;
        }
        let mut date = local.date();
        for _ in 0..4 {
            let mut candidates = local_instants(date.and_time(self.end), tz);
            candidates.sort_unstable();
            if let Some(&c) = candidates.iter().find(|&&c| c > at) {
                return Some(c);
            }
            date = date.succ_opt()?;
        }
        None
    }
}

/// The instants at which the local clock in `tz` shows `naive`: one, two (a repeated hour), or,
/// where it is skipped by a jump, the first instant after the jump.
pub fn local_instants(naive: NaiveDateTime, tz: Tz) -> Vec<Millis> {
    use chrono::LocalResult;
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(dt) => vec![dt.timestamp_millis()],
        LocalResult::Ambiguous(a, b) => vec![a.timestamp_millis(), b.timestamp_millis()],
        LocalResult::None => first_after_gap(naive, tz).into_iter().collect(),
    }
}

/// The period a frequency cap counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A calendar day in the user's zone.
    Day,
    /// An ISO week (Monday first) in the user's zone.
    Week,
}

impl Period {
    /// The calendar bucket of `at` in `tz`: the local date, or the ISO week as (year, week).
    pub fn bucket(self, at: Millis, tz: Tz) -> Option<(i32, u32)> {
        let d: NaiveDate = tz.timestamp_millis_opt(at).single()?.date_naive();
        Some(match self {
            Period::Day => (d.year(), d.ordinal()),
            Period::Week => {
                let w = d.iso_week();
                (w.year(), w.week())
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
        }
    }
}

/// At most `max` delivered actions named `action` per `per`, per user, across the journeys of
/// the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub action: String,
    pub max: u64,
    pub per: Period,
}

/// Delivered actions are remembered this long (a week plus a day of zone slack) behind the
/// newest one: the longest period a cap can count over.
pub const DELIVERY_HISTORY_MS: Millis = 8 * 86_400_000;

/// An application's policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub application: String,
    pub timezone_attribute: String,
    pub default_timezone: Tz,
    pub quiet_hours: Option<QuietHours>,
    pub caps: Vec<Cap>,
    pub file: String,
    pub source: Value,
}

impl Policy {
    /// Whether any cap counts deliveries of `action`.
    pub fn caps_action(&self, action: &str) -> bool {
        self.caps.iter().any(|c| c.action == action)
    }
}

/// The user's zone: the IANA name in `context` under `attribute` (in the profile for a
/// `profile.` name), else `default` (a name that is not a known zone counts as absent).
pub fn user_zone(
    context: &Map<String, Value>,
    profile: Option<&Map<String, Value>>,
    attribute: &str,
    default: Tz,
) -> Tz {
    match lookup_in(context, profile, attribute) {
        Some(Value::String(s)) => s.parse::<Tz>().unwrap_or(default),
        _ => default,
    }
}

const POLICY_KEYS: &[&str] = &[
    "policy_for",
    "name",
    "description",
    "timezone_attribute",
    "default_timezone",
    "quiet_hours",
    "frequency_caps",
];

/// Checks and compiles a policy file's value.
pub fn compile_policy(file: &str, v: &Value) -> Result<Policy, Vec<Problem>> {
    let mut p = Problems::new(file);
    let Some(root) = v.as_object() else {
        p.add(
            "$",
            format!("a policy must be a JSON object, found {}", kind(v)),
        );
        return Err(p.list);
    };
    p.unknown_keys(root, "$", POLICY_KEYS);
    let application = match root.get("policy_for") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        other => {
            p.add(
                "$.policy_for",
                format!("policy_for must be an application name, found {other:?}"),
            );
            None
        }
    };
    for key in ["name", "description"] {
        if let Some(v) = root.get(key).filter(|v| !v.is_null() && !v.is_string()) {
            p.add(
                format!("$.{key}"),
                format!("{key} must be a string, found {v}"),
            );
        }
    }
    let timezone_attribute = zone_attribute(root, "$", &mut p).unwrap_or_else(|| "timezone".into());
    let default_timezone = default_zone(root, "$", &mut p).unwrap_or(Tz::UTC);
    let quiet_hours = match root.get("quiet_hours") {
        None | Some(Value::Null) => None,
        Some(v) => compile_quiet_hours(v, "$.quiet_hours", &mut p),
    };
    let caps = compile_caps(root, &mut p);
    match application {
        Some(application) if p.is_empty() => Ok(Policy {
            application,
            timezone_attribute,
            default_timezone,
            quiet_hours,
            caps,
            file: file.to_string(),
            source: v.clone(),
        }),
        _ => Err(p.list),
    }
}

/// `timezone_attribute` of a policy or journey (an attribute name), if set.
pub fn zone_attribute(obj: &Map<String, Value>, path: &str, p: &mut Problems) -> Option<String> {
    match obj.get("timezone_attribute") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            p.add(
                format!("{path}.timezone_attribute"),
                format!("timezone_attribute must be an attribute name, found {other}"),
            );
            None
        }
    }
}

/// `default_timezone` of a policy or journey (an IANA zone), if set.
pub fn default_zone(obj: &Map<String, Value>, path: &str, p: &mut Problems) -> Option<Tz> {
    match obj.get("default_timezone") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                p.add(
                    format!("{path}.default_timezone"),
                    format!("unknown IANA timezone {s:?} (use names such as \"Europe/Berlin\" or \"UTC\")"),
                );
                None
            }
        },
        Some(other) => {
            p.add(
                format!("{path}.default_timezone"),
                format!("default_timezone must be an IANA zone name, found {other}"),
            );
            None
        }
    }
}

/// A `quiet_hours` object: `{ "start": "HH:MM", "end": "HH:MM" }` with `start != end`.
pub fn compile_quiet_hours(v: &Value, path: &str, p: &mut Problems) -> Option<QuietHours> {
    let Some(o) = v.as_object() else {
        p.add(
            path,
            format!("quiet_hours must be {{\"start\": \"HH:MM\", \"end\": \"HH:MM\"}} or null, found {}", kind(v)),
        );
        return None;
    };
    p.unknown_keys(o, path, &["start", "end"]);
    let time = |key: &str, p: &mut Problems| -> Option<NaiveTime> {
        match o.get(key) {
            Some(Value::String(s)) => match parse_hhmm(s) {
                Some(t) => Some(t),
                None => {
                    p.add(
                        format!("{path}.{key}"),
                        format!(
                            "{key} must be a local time as HH:MM (00:00 to 23:59), found {s:?}"
                        ),
                    );
                    None
                }
            },
            Some(other) => {
                p.add(
                    format!("{path}.{key}"),
                    format!("{key} must be a local time as HH:MM, found {other}"),
                );
                None
            }
            None => {
                p.add(path, format!("missing field {key:?}"));
                None
            }
        }
    };
    let start = time("start", p);
    let end = time("end", p);
    let (start, end) = (start?, end?);
    if start == end {
        p.add(
            format!("{path}.end"),
            format!(
                "quiet hours start and end are both {}: they must differ",
                start.format("%H:%M")
            ),
        );
        return None;
    }
    Some(QuietHours { start, end })
}

fn parse_hhmm(s: &str) -> Option<NaiveTime> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = NaiveTime::from_hms_opt(h.parse().ok()?, m.parse().ok()?, 0)?;
    debug_assert_eq!(t.second(), 0);
    Some(t)
}

fn compile_caps(root: &Map<String, Value>, p: &mut Problems) -> Vec<Cap> {
    let items = match root.get("frequency_caps") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            p.add(
                "$.frequency_caps",
                format!("frequency_caps must be an array, found {}", kind(other)),
            );
            return Vec::new();
        }
    };
    let mut caps = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("$.frequency_caps[{i}]");
        let Some(o) = item.as_object() else {
            p.add(
                &path,
                format!("a cap must be an object, found {}", kind(item)),
            );
            continue;
        };
        p.unknown_keys(o, &path, &["action", "max", "per"]);
        let action = match o.get("action") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => {
                p.add(
                    format!("{path}.action"),
                    format!("action must be an action name, found {other}"),
                );
                None
            }
            None => {
                p.add(&path, "missing field \"action\"");
                None
            }
        };
        let max = match o.get("max") {
            Some(v) if v.as_u64().is_some() => v.as_u64(),
            Some(other) => {
                p.add(
                    format!("{path}.max"),
                    format!("max must be an integer >= 0, found {other}"),
                );
                None
            }
            None => {
                p.add(&path, "missing field \"max\"");
                None
            }
        };
        let per = match o.get("per") {
            Some(Value::String(s)) if s == "day" => Some(Period::Day),
            Some(Value::String(s)) if s == "week" => Some(Period::Week),
            Some(other) => {
                p.add(
                    format!("{path}.per"),
                    format!("per must be \"day\" or \"week\", found {other}"),
                );
                None
            }
            None => {
                p.add(&path, "missing field \"per\"");
                None
            }
        };
        if let (Some(action), Some(max), Some(per)) = (action, max, per) {
            caps.push(Cap { action, max, per });
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{format_millis, parse_rfc3339};
    use serde_json::json;

    fn t(s: &str) -> Millis {
        parse_rfc3339(s).unwrap()
    }

    fn qh(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: parse_hhmm(start).unwrap(),
            end: parse_hhmm(end).unwrap(),
        }
    }

    #[test]
    fn quiet_hours_spanning_midnight() {
        let q = qh("21:00", "08:00");
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 20:59:59.999 local is not quiet; 21:00 is; 07:59:59.999 is; 08:00 is not.
        assert_eq!(q.hold_until(t("2026-12-01T19:59:59.999Z"), tz), None);
        let rel = q.hold_until(t("2026-12-01T20:00:00Z"), tz).unwrap();
        assert_eq!(format_millis(rel), "2026-12-02T07:00:00.000Z");
        let rel = q.hold_until(t("2026-12-02T06:59:59.999Z"), tz).unwrap();
        assert_eq!(format_millis(rel), "2026-12-02T07:00:00.000Z");
        assert_eq!(q.hold_until(t("2026-12-02T07:00:00Z"), tz), None);
    }

    #[test]
    fn quiet_hours_within_one_day() {
        let q = qh("12:00", "14:00");
        assert_eq!(q.hold_until(t("2026-12-01T11:59:00Z"), Tz::UTC), None);
        let rel = q.hold_until(t("2026-12-01T13:30:00Z"), Tz::UTC).unwrap();
        assert_eq!(format_millis(rel), "2026-12-01T14:00:00.000Z");
    }

    #[test]
    fn release_in_a_dst_gap_is_the_first_instant_after_the_jump() {
        // Berlin 2026-03-29: 02:00 -> 03:00. Quiet hours end at 02:30, which does not exist.
        let q = qh("22:00", "02:30");
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let rel = q.hold_until(t("2026-03-28T22:00:00Z"), tz).unwrap();
        assert_eq!(format_millis(rel), "2026-03-29T01:00:00.000Z");
    }

    #[test]
    fn release_when_the_end_is_shown_twice_is_the_first_after_arrival() {
        // Berlin 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 happens at 00:30Z and 01:30Z.
        let q = qh("01:00", "02:30");
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let rel = q.hold_until(t("2026-10-24T23:30:00Z"), tz).unwrap(); // 01:30 CEST
        assert_eq!(format_millis(rel), "2026-10-25T00:30:00.000Z");
        // Arriving at 02:10 CET (the second pass), the first 02:30 is behind: the second one.
        let rel = q.hold_until(t("2026-10-25T01:10:00Z"), tz).unwrap();
        assert_eq!(format_millis(rel), "2026-10-25T01:30:00.000Z");
    }

    #[test]
    fn buckets_are_local_days_and_iso_weeks() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 03:00Z on 2026-12-02 is still 2026-12-01 in New York.
        let a = Period::Day.bucket(t("2026-12-02T03:00:00Z"), ny);
        let b = Period::Day.bucket(t("2026-12-01T15:00:00Z"), ny);
        assert_eq!(a, b);
        assert_ne!(a, Period::Day.bucket(t("2026-12-02T03:00:00Z"), Tz::UTC));
        // Sunday 2026-12-06 and Monday 2026-12-07 are in different ISO weeks.
        let sun = Period::Week.bucket(t("2026-12-06T12:00:00Z"), Tz::UTC);
        let mon = Period::Week.bucket(t("2026-12-07T12:00:00Z"), Tz::UTC);
        let tue = Period::Week.bucket(t("2026-12-08T12:00:00Z"), Tz::UTC);
        assert_ne!(sun, mon);
        assert_eq!(mon, tue);
    }

    #[test]
    fn hhmm_is_strict() {
        assert!(parse_hhmm("08:00").is_some());
        assert!(parse_hhmm("23:59").is_some());
        for bad in ["8:00", "24:00", "08:60", "08-00", "0800", "08:00:00", ""] {
            assert!(parse_hhmm(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn policy_problems_name_their_paths() {
        let v = json!({
            "policy_for": "app", "default_timezone": "Mars/Olympus",
            "quiet_hours": { "start": "21:00", "end": "21:00" },
            "frequency_caps": [ { "action": "push", "max": -1, "per": "month" } ],
            "colour": "red"
        });
        let ps: Vec<String> = compile_policy("p.json", &v)
            .unwrap_err()
            .iter()
            .map(|p| p.path.clone())
            .collect();
        for want in [
            "$.default_timezone",
            "$.quiet_hours.end",
            "$.frequency_caps[0].max",
            "$.frequency_caps[0].per",
            "$.colour",
        ] {
            assert!(ps.iter().any(|p| p == want), "{want} not in {ps:?}");
        }
        let ok = compile_policy(
            "p.json",
            &json!({"policy_for": "app", "quiet_hours": {"start": "21:00", "end": "08:00"},
                    "frequency_caps": [{"action": "push", "max": 3, "per": "day"}]}),
        )
        .unwrap();
        assert_eq!(ok.timezone_attribute, "timezone");
        assert_eq!(ok.default_timezone, Tz::UTC);
        assert!(ok.caps_action("push") && !ok.caps_action("email"));
    }
}
