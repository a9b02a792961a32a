//! The pure decisions behind the journey controls of contract section 5: experiment and holdout
//! buckets, re-entry history, the user's zone and quiet hours, and frequency caps. Each is a
//! function of its inputs; [`super::Engine`] calls them and applies the result.

use chrono_tz::Tz;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::session::{Delivery, History, KeyEntry};
use super::Refusal;
use crate::journey::policy::{user_zone, DELIVERY_HISTORY_MS};
use crate::journey::{Cap, Journey, Policy, QuietHours, Reentry, Variant};
use crate::time::Millis;

/// The first 8 bytes, big-endian, of SHA-256 of `text`.
pub fn bucket_hash(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The variant of `user` at experiment step `step_id`: `h mod total` falls in the variants'
/// consecutive ranges, in list order (a 0-weight variant owns an empty range).
pub fn pick_variant<'a>(
    journey_id: &str,
    step_id: &str,
    user: &str,
    variants: &'a [Variant],
    total: u64,
) -> Option<&'a Variant> {
    let b = bucket_hash(&format!("{journey_id}/{step_id}/{user}")) % total.max(1);
    let mut upper = 0u64;
    for v in variants {
        upper += v.weight;
        if b < upper {
            return Some(v);
        }
    }
    None
}

/// Whether `user` is held out of `journey_id` at `hundredths` (percent * 100).
pub fn held_out(journey_id: &str, user: &str, hundredths: u32) -> bool {
    bucket_hash(&format!("{journey_id}/holdout/{user}")) % 10_000 < u64::from(hundredths)
}

/// Whether an entry key may enter now under the journey's re-entry rules, given its history.
/// Checked after `active_session`: `reentry` first, then `max_entries`.
pub fn reentry_refusal(
    journey: &Journey,
    history: &History,
    key: Option<&str>,
    at: Millis,
) -> Option<Refusal> {
    let h = history.journey(&journey.id)?;
    let last = h.last_entry(key);
    match (journey.entry.reentry, last) {
        (Reentry::Never, Some(_)) => return Some(Refusal::Reentry),
        (Reentry::After(d), Some(last)) if at < last.saturating_add(d) => {
            return Some(Refusal::Reentry)
        }
        _ => {}
    }
    match journey.entry.max_entries {
        Some(max) if h.entries >= max => Some(Refusal::MaxEntries),
        _ => None,
    }
}

/// Records an entry of `key` at `at` in the journey's history, dropping what can no longer
/// refuse an entry: `after` keys whose window has passed; every key when re-entry is `always`.
pub fn record_entry(journey: &Journey, history: &mut History, key: Option<&str>, at: Millis) {
    let h = history.journey_mut(&journey.id);
    h.entries = h.entries.saturating_add(1);
    match journey.entry.reentry {
        Reentry::Always => h.keys.clear(),
        Reentry::Never => set_last(&mut h.keys, key, at),
        Reentry::After(d) => {
            h.keys.retain(|k| k.last.saturating_add(d) > at);
            set_last(&mut h.keys, key, at);
        }
    }
}

fn set_last(keys: &mut Vec<KeyEntry>, key: Option<&str>, at: Millis) {
    match keys.iter_mut().find(|k| k.key.as_deref() == key) {
        Some(k) => k.last = k.last.max(at),
        None => keys.push(KeyEntry {
            key: key.map(str::to_string),
            last: at,
        }),
    }
}

/// The user's zone for a session of `journey`: the journey's keys over the policy's, over the
/// defaults (`timezone`, UTC).
pub fn zone(
    journey: &Journey,
    policy: Option<&Policy>,
    context: &Map<String, Value>,
    profile: Option<&Map<String, Value>>,
) -> Tz {
    let attribute = journey
        .timezone_attribute
        .as_deref()
        .or(policy.map(|p| p.timezone_attribute.as_str()))
        .unwrap_or("timezone");
    let default = journey
        .default_timezone
        .or(policy.map(|p| p.default_timezone))
        .unwrap_or(Tz::UTC);
    user_zone(context, profile, attribute, default)
}

/// The quiet hours that apply to the journey: its own (or none), else its application's.
pub fn quiet_hours(journey: &Journey, policy: Option<&Policy>) -> Option<QuietHours> {
    match journey.quiet_hours {
        Some(own) => own,
        None => policy.and_then(|p| p.quiet_hours),
    }
}

/// Whether delivering `action` at `at` in zone `tz` would exceed a cap: for some cap of that
/// action, the deliveries already recorded in the same calendar day or ISO week (in `tz`) have
/// reached its `max`.
pub fn cap_reached(history: &History, caps: &[Cap], action: &str, at: Millis, tz: Tz) -> bool {
    caps.iter().filter(|c| c.action == action).any(|c| {
        let Some(bucket) = c.per.bucket(at, tz) else {
            return false;
        };
        let n = history
            .deliveries
            .iter()
            .filter(|d| d.action == action && c.per.bucket(d.at, tz) == Some(bucket))
            .count() as u64;
        n >= c.max
    })
}

/// Records a delivered action of a capped name, and forgets deliveries that can no longer
/// count: of names no cap counts, or older than the newest by more than the longest period.
pub fn record_delivery(history: &mut History, policy: &Policy, action: &str, at: Millis) {
    history.deliveries.push(Delivery {
        action: action.to_string(),
        at,
    });
    let newest = history.deliveries.iter().map(|d| d.at).max().unwrap_or(at);
    let horizon = newest.saturating_sub(DELIVERY_HISTORY_MS);
    history
        .deliveries
        .retain(|d| d.at >= horizon && policy.caps_action(&d.action));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variants(weights: &[u64]) -> Vec<Variant> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Variant {
                id: format!("v{i}"),
                weight: w,
                next: None,
            })
            .collect()
    }

    #[test]
    fn bucket_is_sha256_big_endian() {
        // SHA-256("abc") = ba7816bf 8f01cfea ...
        assert_eq!(bucket_hash("abc"), 0xba78_16bf_8f01_cfea);
    }

    #[test]
    fn variants_own_consecutive_ranges_and_zero_weight_gets_nobody() {
        let vs = variants(&[1, 0, 1]);
        let mut seen = [0usize; 3];
        for u in 0..2000 {
            let v = pick_variant("j", "ab", &u.to_string(), &vs, 2).unwrap();
            seen[v.id[1..].parse::<usize>().unwrap()] += 1;
            let h = bucket_hash(&format!("j/ab/{u}")) % 2;
            assert_eq!(v.id, if h == 0 { "v0" } else { "v2" });
        }
        assert_eq!(seen[1], 0);
        assert!(seen[0] > 800 && seen[2] > 800, "{seen:?}");
    }

    #[test]
    fn holdout_is_the_hash_mod_10000_below_percent_times_100() {
        for u in 0..500 {
            let user = format!("u{u}");
            let h = bucket_hash(&format!("j/holdout/{user}")) % 10_000;
            assert_eq!(held_out("j", &user, 1000), h < 1000);
            assert!(!held_out("j", &user, 0));
            assert!(held_out("j", &user, 10_000));
        }
    }
}
